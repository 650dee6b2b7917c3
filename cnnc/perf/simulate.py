"""A discrete-event simulation of a plan's programs on a machine model.

Every logical device has its streams (compute, copy-in), each an in-order queue of the device's
ops on that stream.  `record` marks an event when everything before it on its stream is done;
`wait` holds its stream until the event is marked.  Launches occupy their physical device's
compute engine, copies between two physical devices the link from one to the other, copies
within one the device's copy engine, and uploads the host's link to the device; an op starts
when its stream is ready and every resource it needs is free, earliest first.  Logical devices
share a physical one (`devices` below the plan's count) by sharing its resources.  Run as MPI
ranks (`ranks`), each rank is a node of its own, and a copy between two ranks is a message over
the network link that leaves when its source is final, as the executor sends it.

The core, `simulate`, takes the programs and a cost function, so that schedules written by hand
(tests) and a plan's (`simulate_plan`) run through the same code.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from cnnc.perf import PerfError
from cnnc.perf.machine import Link, Machine
from cnnc.plan.schedule import Op

STREAMS = ("compute", "copy-in")      # the plan's streams, in the order a trace shows them
DEFAULT_NETWORK = "infiniband-ndr"    # the link between the nodes of `cnnc simulate --ranks` unless named


class SimulationError(PerfError):
    """A program that cannot finish: a wait on an event nobody records."""


@dataclass(frozen=True)
class Activity:
    """What an op costs: its duration, the resources it holds meanwhile, its kind for the report."""
    seconds: float
    resources: tuple = ()
    category: str = "compute"             # compute | communication
    name: str = ""


@dataclass
class Span:
    device: int
    stream: str
    index: int                            # position in the device's program
    name: str
    category: str
    start: float
    end: float
    after: int | None = None              # the span whose end let this one start (None: the step's start)
    phase: str = ""


@dataclass
class Simulation:
    spans: list[Span]
    step_s: float
    critical_path: list[int] = field(default_factory=list)    # span indices, first to last

    def device_times(self) -> dict[int, dict]:
        """Per logical device: seconds computing, communicating, and idle (neither)."""
        out: dict[int, dict] = {}
        for dev in sorted({s.device for s in self.spans}):
            mine = [s for s in self.spans if s.device == dev]
            busy = _union([(s.start, s.end) for s in mine])
            out[dev] = {"compute_s": sum(s.end - s.start for s in mine if s.category == "compute"),
                        "communication_s": sum(s.end - s.start for s in mine if s.category == "communication"),
                        "idle_s": max(self.step_s - busy, 0.0)}
        return out


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def simulate(programs: dict[int, list[Op]], cost: Callable[[int, Op], Activity | None]) -> Simulation:
    """Run every device's program to the end; `cost(device, op)` gives a launch's, copy's or
    upload's Activity (None: it takes no time and holds nothing)."""
    queues = {(dev, stream): [(i, op) for i, op in enumerate(ops) if op.stream == stream]
              for dev, ops in programs.items() for stream in {op.stream for op in ops}}
    heads = dict.fromkeys(queues, 0)
    ready: dict[tuple, tuple[float, int | None]] = dict.fromkeys(queues, (0.0, None))
    events: dict[str, tuple[float, int | None]] = {}
    busy_until: dict = {}                 # resource -> (time, span)
    spans: list[Span] = []
    costs = {(dev, i): cost(dev, op) for dev, ops in programs.items() for i, op in enumerate(ops)
             if op.kind not in ("record", "wait")}

    def settle() -> None:
        """Take the zero-time ops at the heads of the queues: records, and waits already
        satisfied, until none is left (a record may free a wait in a queue already looked at)."""
        moved = True
        while moved:
            moved = False
            for q, ops in queues.items():
                while heads[q] < len(ops):
                    i, op = ops[heads[q]]
                    if op.kind == "record":
                        events[op.event] = ready[q]
                    elif op.kind == "wait":
                        if op.event not in events:
                            break
                        if events[op.event][0] > ready[q][0]:
                            ready[q] = events[op.event]
                    elif costs[(q[0], i)] is not None:
                        break
                    heads[q] += 1
                    moved = True

    def earliest(q) -> tuple[float, int | None]:
        i, _ = queues[q][heads[q]]
        act = costs[(q[0], i)]
        start = ready[q]
        for r in act.resources:
            if r in busy_until and busy_until[r][0] > start[0]:
                start = busy_until[r]
        return start

    order = sorted(queues, key=_queue_order)          # ties go to the lower device, compute first
    settle()
    while True:
        candidates = [(earliest(q)[0], q) for q in order
                      if heads[q] < len(queues[q]) and queues[q][heads[q]][1].kind not in ("record", "wait")]
        if not candidates:
            break
        _, q = min(candidates, key=lambda c: c[0])
        start, after = earliest(q)
        i, op = queues[q][heads[q]]
        act = costs[(q[0], i)]
        spans.append(Span(q[0], q[1], i, act.name or op.kernel or op.kind, act.category, start,
                          start + act.seconds, after, op.phase))
        done = (start + act.seconds, len(spans) - 1)
        ready[q] = done
        for r in act.resources:
            busy_until[r] = done
        heads[q] += 1
        settle()
    stuck = sorted(f"device {q[0]} {q[1]} waits for {queues[q][heads[q]][1].event}"
                   for q in queues if heads[q] < len(queues[q]))
    if stuck:
        raise SimulationError("the program deadlocks: " + "; ".join(stuck))
    step = max((s.end for s in spans), default=0.0)
    return Simulation(spans, step, _critical_path(spans))


def _queue_order(q) -> tuple:
    return (q[0], STREAMS.index(q[1]) if q[1] in STREAMS else len(STREAMS), q[1])


def _critical_path(spans: list[Span]) -> list[int]:
    """From the span that ends last back through what each waited for."""
    if not spans:
        return []
    i = max(range(len(spans)), key=lambda j: (spans[j].end, -j))
    path = [i]
    while spans[path[-1]].after is not None:
        path.append(spans[path[-1]].after)
    return path[::-1]


# ---------------------------------------------------------------- a plan on a machine

def op_label(op: Op) -> tuple[str, str]:
    """An op's name and category (compute | communication) in reports and traces, predicted or measured."""
    if op.kind == "launch":
        return op.kernel, "compute"
    if op.kind == "copy":
        return f"copy {op.src} -> {op.dst}", "communication"
    if op.kind == "upload":
        return f"upload {op.input} -> {op.dst}", "communication"
    if op.kind == "scalars":
        return f"step scalars -> {op.dst}", "communication"
    return op.kind, "communication"


def plan_cost(plan, machine: Machine, physical: dict[int, Any], rooflines: dict[str, dict],
              peer_link: Link | None = None, rank: dict[int, int] | None = None,
              network: Link | None = None, sends: bool = False) -> Callable[[int, Op], Activity | None]:
    """The cost function of a plan's ops on `machine`, logical device d running on physical
    device physical[d]; with `rank` (logical device -> MPI rank, one node each), a copy between
    two ranks' devices is a host-staged message over `network`: down the source's host link,
    across the network, up the destination's host link, one after the other, holding the
    source node's network port out and the destination's port in.  With `sends` (programs from
    `_early_sends`), the message is its own op on the source's side, and the copy op left in
    the destination's program only the last hop."""
    link = peer_link or machine.peer_link

    def cost(dev: int, op: Op) -> Activity | None:
        here = physical[dev]
        name, category = op_label(op)
        if op.kind == "launch":
            return Activity(rooflines[op.kernel]["time_us"] * 1e-6, (("compute", here),), category, name)
        if op.kind == "copy" and op.stream.startswith(SEND):    # a message, on its source's rank (`_early_sends`)
            nbytes, there = 4 * op.count, rank[int(op.stream.split()[1])]
            return Activity(machine.host_link.seconds(nbytes) + network.seconds(nbytes),
                            (("network out", rank[dev]), ("network in", there)), category,
                            f"send {op.src} -> {op.dst} (rank {rank[dev]} -> {there})")
        if op.kind == "copy" and rank is not None and rank[plan.buffers[op.src].device] != rank[dev]:
            nbytes, source = 4 * op.count, rank[plan.buffers[op.src].device]
            if sends:                           # the message has arrived: up the host link
                return Activity(machine.host_link.seconds(nbytes), (("host", here),), category,
                                f"{name} (from rank {source})")
            seconds = 2 * machine.host_link.seconds(nbytes) + network.seconds(nbytes)
            return Activity(seconds, (("network out", source), ("network in", rank[dev])), category,
                            f"{name} (rank {source} -> {rank[dev]})")
        if op.kind == "copy":
            nbytes = 4 * op.count
            there = physical[plan.buffers[op.src].device]
            if there == here:
                seconds = machine.launch_overhead_us * 1e-6 + 2 * nbytes / (machine.bandwidth * machine.memory_efficiency)
                return Activity(seconds, (("copy", here),), category, name)
            return Activity(link.seconds(nbytes), (("link", there, here),), category, name)
        if op.kind in ("upload", "scalars"):
            return Activity(machine.host_link.seconds(plan.buffers[op.dst].nbytes), (("host", here),),
                            category, name)
        return None
    return cost


def simulate_plan(plan, machine: Machine, rooflines: dict[str, dict], devices: int | None = None,
                  peer_link: Link | None = None, program: str = "train", ranks: list[list[int]] | None = None,
                  network: Link | None = None) -> Simulation:
    """One step of `program` with the plan's logical devices spread round-robin over `devices`
    physical ones (default: one each); with `ranks` (each rank's logical devices, as the
    executor shares them out), every rank on its own node of `devices` physical devices, and
    the copies between ranks over `network`."""
    logical = sorted(plan.programs[program])
    n = devices or (max(logical) + 1 if logical else 1)
    rank = {d: r for r, block in enumerate(ranks) for d in block} if ranks else None
    physical = {d: (rank[d], d % n) if rank else d % n for d in logical}
    if not rank:
        return simulate(plan.programs[program], plan_cost(plan, machine, physical, rooflines, peer_link))
    programs, places = _early_sends(plan, program, rank)
    sim = simulate(programs, plan_cost(plan, machine, physical, rooflines, peer_link, rank, network, sends=True))
    for span in sim.spans:                # spans name ops by their place in the plan's programs
        span.index = places[span.device][span.index]
    return sim


SEND = "send"                             # streams `send <destination device> <n>`: one message each


def _early_sends(plan, program: str, rank: dict[int, int]) -> tuple[dict[int, list[Op]], dict[int, list[int]]]:
    """The programs as the executor runs them between ranks: each copy between ranks's message
    leaves as soon as the last write to its source before the copy is done (on a stream of its
    own on the source's device, after a record put right behind that write), and the copy op
    waits for its arrival and then writes device memory.  Also, per device, the place in the
    plan's program of every op of the new one (a message: its copy op's place)."""
    from cnnc.distributed import cross_rank_copies

    ops = plan.programs[program]
    before: dict[tuple[int, int], list[Op]] = {}       # (device, index) -> ops to put in front of it
    behind: dict[tuple[int, int], list[Op]] = {}       # ... right behind it
    added: dict[int, list[tuple[int, Op]]] = {}        # device -> its messages' ops, with their places
    for copy in cross_rank_copies(plan, program, rank):
        op = ops[copy.device][copy.index]
        sent, arrived = f"{SEND}:{copy.tag}", f"{SEND}:{copy.tag}:arrived"
        stream = f"{SEND} {copy.device} {copy.tag}"
        message = [Op("copy", stream=stream, src=op.src, dst=op.dst, count=op.count, phase=op.phase),
                   Op("record", stream=stream, event=arrived)]
        if copy.after is not None:
            after = ops[copy.source][copy.after]
            behind.setdefault((copy.source, copy.after), []).append(Op("record", stream=after.stream, event=sent))
            message.insert(0, Op("wait", stream=stream, event=sent))
        added.setdefault(copy.source, []).extend((copy.index, m) for m in message)
        before.setdefault((copy.device, copy.index), []).append(Op("wait", stream=op.stream, event=arrived))
    programs, places = {}, {}
    for d, program_ops in ops.items():
        mine = []
        for i, op in enumerate(program_ops):
            mine += [(i, o) for o in before.get((d, i), []) + [op] + behind.get((d, i), [])]
        mine += added.get(d, [])
        places[d], programs[d] = [i for i, _ in mine], [o for _, o in mine]
    return programs, places


def report(sim: Simulation, plan, machine: Machine, devices: int, ranks: int | None = None,
           network: Link | None = None) -> dict:
    """What `cnnc simulate --json` prints."""
    ms = 1e3
    over = {"ranks": ranks, "network_link": network.name} if ranks else {}
    return {
        "network": plan.network, "machine": machine.name, "devices": devices, **over, "batch": plan.batch,
        "step_ms": sim.step_s * ms, "images_per_s": plan.batch / sim.step_s if sim.step_s else None,
        "per_device": [{"logical": d, "compute_ms": t["compute_s"] * ms, "communication_ms": t["communication_s"] * ms,
                        "idle_ms": t["idle_s"] * ms} for d, t in sim.device_times().items()],
        "critical_path": [{"device": s.device, "stream": s.stream, "name": s.name, "category": s.category,
                           "start_ms": s.start * ms, "ms": (s.end - s.start) * ms}
                          for s in (sim.spans[i] for i in sim.critical_path)],
    }


def format_report(r: dict) -> str:
    over = f" per node, {r['ranks']} ranks over {r['network_link']}" if r.get("ranks") else ""
    out = [f"{r['network']} on {r['devices']} x {r['machine']}{over}, batch {r['batch']}: predicted "
           f"{r['step_ms']:.3f} ms per step, {r['images_per_s']:,.0f} images/s",
           f"  {'device':>6} {'compute ms':>11} {'comm ms':>9} {'idle ms':>9}"]
    for d in r["per_device"]:
        out.append(f"  {d['logical']:>6} {d['compute_ms']:>11.3f} {d['communication_ms']:>9.3f} {d['idle_ms']:>9.3f}")
    path = r["critical_path"]
    comm = sum(p["ms"] for p in path if p["category"] == "communication")
    out.append(f"critical path: {len(path)} ops, {sum(p['ms'] for p in path):.3f} ms busy "
               f"({comm:.3f} ms communication); longest:")
    for p in sorted(path, key=lambda p: -p["ms"])[:8]:
        out.append(f"  {p['ms']:8.3f} ms  device {p['device']} {p['stream']:<8} {p['name']}")
    return "\n".join(out)
