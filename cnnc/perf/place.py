"""Automatic placement: the fastest placement of a network on N devices of a machine model, among
a fixed search space, under each device's memory; what `cnnc place` writes.

The search space, for N devices and one batch B (the source's times N, or the source's with
--fixed-batch), every candidate written by cnnc.perf.placements:

- data: every layer replicated on all N devices;
- model: conv and fc layers sliced over K devices, for every divisor K > 1 of N;
- hybrid: for every cut c (a weight layer, conv, local or fc, after the first layer in the
  topological order): the layers before c replicated on all N devices, the top (layer c on and everything reading it)
  sliced over K devices (every divisor K > 1 of N), replicated on K devices (every divisor
  1 < K < N), or whole on device 0; with each exchange scheme (round_robin, all_gather,
  scatter) and the top's weights updated once per minibatch or after every pass
  (update_period 0 or 1; all_gather runs one pass, so only 0);
- pipeline: S stages (2 <= S <= N, on devices 0..S-1) cut to balance the layers' predicted
  one-device times, with S, 2S or 4S micro-batches, gpipe or one_f_one_b.

Candidates the language refuses (a replica count that does not divide, a batch that does not
split) drop out, and so do those whose peak memory on some device exceeds the machine's.

Each candidate is checked and planned in memory, its kernels given their launch geometry (no
source is rendered), and its step simulated as `cnnc simulate` does.  The search is exact
branch and bound: a step takes at least the busiest device's kernel time (one device runs
one kernel at a time), so candidates are simulated in order of that bound and the search stops
once the bound of the next exceeds the best step found; `brute_force` simulates them all.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from cnnc.check import check
from cnnc.check.kinds import KINDS
from cnnc.codegen.dialect import DIALECTS
from cnnc.codegen.render import geometry
from cnnc.diagnostics import CompileError
from cnnc.frontend import ast
from cnnc.frontend.parser import parse
from cnnc.ir import Network
from cnnc.perf import PerfError
from cnnc.perf.machine import Link, Machine
from cnnc.perf.placements import EXCHANGES, PIPELINE_SCHEDULES, Skipped, data_parallel, hybrid, model_parallel, \
    pipeline
from cnnc.perf.roofline import layer_times_us, plan_rooflines
from cnnc.perf.simulate import simulate_plan
from cnnc.plan.memory import storage_bytes
from cnnc.plan.planner import plan as make_plan


@dataclass
class Candidate:
    name: str
    text: str
    bound_s: float = 0.0                   # the busiest device's kernel time: no step is shorter
    peak_memory_bytes: int = 0
    step_s: float | None = None            # simulated; None: pruned or not yet
    batch: int = 0

    @property
    def step_ms(self) -> float:
        return self.step_s * 1e3

    @property
    def images_per_s(self) -> float:
        return self.batch / self.step_s


@dataclass
class SearchResult:
    network: str
    machine: str
    devices: int
    ranking: list[Candidate]               # simulated candidates that fit, fastest first
    candidates: int                        # in the search space and accepted by the language, fitting or not
    evaluated: int                         # simulated
    too_big: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"network": self.network, "machine": self.machine, "devices": self.devices,
                "candidates": self.candidates, "simulated": self.evaluated, "exceed_memory": len(self.too_big),
                "ranking": [{"placement": c.name, "step_ms": c.step_ms, "images_per_s": c.images_per_s,
                             "batch": c.batch, "peak_memory_mib": c.peak_memory_bytes / 2**20,
                             "lower_bound_ms": c.bound_s * 1e3} for c in self.ranking]}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def search_space(program: ast.Program, net: Network, devices: int, scale_batch: bool = True,
                 layer_costs: dict[str, float] | None = None) -> list[Candidate]:
    """Every candidate of the search space (see the module's docstring) the generator can write,
    without duplicates, in a fixed order."""
    batch = net.batch * devices if scale_batch else net.batch
    made: list[tuple[str, object]] = []

    def add(name: str, make) -> None:
        made.append((name, make))

    add(f"data parallel on {devices}", lambda: data_parallel(program, net, devices, batch=batch))
    for k in _divisors(devices)[1:]:
        add(f"model parallel over {k}", lambda k=k: model_parallel(program, net, k, batch=batch))
    for c in range(1, len(net.layers)):
        if not KINDS[net.layers[c].kind].has_weights:
            continue
        first = net.layers[c].name
        tops = [(f"sliced over {k}", k, False) for k in _divisors(devices)[1:]]
        tops += [(f"replicated on {k}", k, True) for k in _divisors(devices)[1:-1]]
        tops += [("on device 0", 1, False)]
        for top, k, rep in tops:
            for ex in EXCHANGES:
                for period in (0, 1) if ex != "all_gather" else (0,):      # all_gather runs one pass
                    every = ", update every pass" if period else ""
                    add(f"hybrid: below {first} replicated on {devices}, {first} and above {top}, {ex}{every}",
                        lambda c=c, k=k, rep=rep, ex=ex, period=period: hybrid(
                            program, net, devices, ex, high_devices=k, update_period=period, cut=c,
                            replicate_top=rep, batch=batch))
    for s in range(2, devices + 1):
        for m in (s, 2 * s, 4 * s):
            for sched in PIPELINE_SCHEDULES:
                add(f"pipeline of {s} stages, {m} micro-batches, {sched}",
                    lambda s=s, m=m, sched=sched: pipeline(program, net, s, m, sched, layer_costs=layer_costs,
                                                           batch=batch))
    out: list[Candidate] = []
    seen: set[str] = set()
    for name, make in made:
        try:
            p = make()
        except Skipped:
            continue
        body = p.text.split("\nnetwork ", 1)[1]          # the header comment differs, the network may not
        if body in seen:
            continue
        seen.add(body)
        out.append(Candidate(name, p.text, batch=p.batch))
    return out


class Evaluator:
    """Plans and simulates candidates on one machine, remembering kernels' launch geometry
    (a kernel's op and parameters fix it) and every candidate's plan."""

    def __init__(self, machine: Machine, devices: int, peer_link: Link | None = None):
        self.machine, self.devices, self.peer_link = machine, devices, peer_link
        self.dialect = DIALECTS.get(machine.dialect, DIALECTS["opencl"])
        self._geometry: dict[tuple, dict] = {}
        self._planned: dict[str, tuple] = {}
        self._steps: dict[str, float] = {}

    def planned(self, c: Candidate):
        """(plan, rooflines) of a candidate; fills in its bound and peak memory.  Raises
        CompileError when the language refuses it."""
        if c.text not in self._planned:
            plan = make_plan(check(parse(c.text, "placement.cnn")))
            for k in plan.kernels.values():
                key = (k.op, repr(sorted(k.params.items())))
                if key not in self._geometry:
                    self._geometry[key] = geometry(k, self.dialect)[0]
                k.launch[self.machine.dialect] = self._geometry[key]
            rooflines = plan_rooflines(plan, self.machine, {})
            busy: dict[int, float] = {}
            for dev, ops in plan.programs["train"].items():
                here = dev % self.devices
                busy[here] = busy.get(here, 0.0) + sum(rooflines[op.kernel]["time_us"] * 1e-6
                                                       for op in ops if op.kind == "launch")
            peak = max(storage_bytes(plan).values(), default=0)
            self._planned[c.text] = (plan, rooflines, max(busy.values(), default=0.0), peak)
        plan, rooflines, c.bound_s, c.peak_memory_bytes = self._planned[c.text]
        return plan, rooflines

    def step(self, c: Candidate) -> float:
        if c.text not in self._steps:
            plan, rooflines = self.planned(c)
            self._steps[c.text] = simulate_plan(plan, self.machine, rooflines, self.devices, self.peer_link).step_s
        c.step_s = self._steps[c.text]
        return c.step_s


def _fits(c: Candidate, machine: Machine) -> bool:
    return not machine.memory_gib or c.peak_memory_bytes <= machine.memory_gib * 2**30


def _admissible(cands: list[Candidate], ev: Evaluator) -> tuple[list[Candidate], list[Candidate]]:
    """The candidates the language accepts, split into those memory holds and those too big
    (planned, bounds filled in)."""
    ok, too_big = [], []
    for c in cands:
        try:
            ev.planned(c)
        except CompileError:
            continue
        (ok if _fits(c, ev.machine) else too_big).append(c)
    return ok, too_big


def _result(net: Network, ev: Evaluator, simulated: list[Candidate], admitted: int, too_big: list[str]) -> SearchResult:
    if not simulated:
        raise PerfError(f"no placement of {net.name} on {ev.devices} x {ev.machine.name} fits the devices' "
                        f"{ev.machine.memory_gib:g} GiB ({len(too_big)} exceed it)")
    ranking = sorted(simulated, key=lambda c: c.step_s)          # stable: ties keep the space's order
    return SearchResult(net.name, ev.machine.name, ev.devices, ranking, admitted, len(simulated), too_big)


def _layer_costs(program: ast.Program, net: Network, ev: Evaluator) -> dict[str, float]:
    """Each layer's predicted one-device kernel time, which the pipeline cuts balance."""
    one = data_parallel(program, net, 1, scale_batch=False)        # the source with every layer on device 0
    return layer_times_us(*ev.planned(Candidate("one device", one.text)))


def search(program: ast.Program, machine: Machine, devices: int, scale_batch: bool = True,
           peer_link: Link | None = None, evaluator: Evaluator | None = None) -> SearchResult:
    """Branch and bound over the search space: the fastest candidate that fits, and every
    candidate simulated on the way (those whose bound could still beat the best)."""
    net = check(program)
    ev = evaluator or Evaluator(machine, devices, peer_link)
    cands, too_big = _admissible(search_space(program, net, devices, scale_batch, _layer_costs(program, net, ev)), ev)
    best = math.inf
    simulated = []
    for c in sorted(cands, key=lambda c: c.bound_s):           # stable: ties keep the space's order
        if c.bound_s > best:
            break
        best = min(best, ev.step(c))
        simulated.append(c)
    order = {id(c): i for i, c in enumerate(cands)}
    simulated.sort(key=lambda c: order[id(c)])
    return _result(net, ev, simulated, len(cands) + len(too_big), [c.name for c in too_big])


def brute_force(program: ast.Program, machine: Machine, devices: int, scale_batch: bool = True,
                peer_link: Link | None = None, evaluator: Evaluator | None = None) -> SearchResult:
    """Every candidate simulated: what `search` must agree with."""
    net = check(program)
    ev = evaluator or Evaluator(machine, devices, peer_link)
    cands, too_big = _admissible(search_space(program, net, devices, scale_batch, _layer_costs(program, net, ev)), ev)
    for c in cands:
        ev.step(c)
    return _result(net, ev, cands, len(cands) + len(too_big), [c.name for c in too_big])


def annotated(result: SearchResult, machine: Machine) -> str:
    """The winning placement's text under a comment with its prediction and the runners-up."""
    best = result.ranking[0]
    lines = [f"Placed by cnnc place for {result.devices} x {machine.name}: {best.name}.",
             f"Predicted {best.step_ms:.3f} ms per step of {best.batch} cases, {best.images_per_s:,.0f} images/s, "
             f"peak {best.peak_memory_bytes / 2**20:.0f} MiB on the fullest device "
             f"({result.candidates} placements in the search space, {result.evaluated} simulated, "
             f"{len(result.too_big)} too big for {machine.memory_gib:g} GiB).",
             "Runners-up:"]
    lines += [f"  {c.step_ms:10.3f} ms  {c.name}" for c in result.ranking[1:11]]
    return "".join(f"# {l}\n" for l in lines) + "#\n" + best.text
