"""Run stage: one executor walks a plan's programs on any backend.

It allocates the plan's buffers, initialises the parameters on the host (so
every backend and every placement starts from the same numbers), and runs a
program: each logical device's ops in order, switching to another device
whenever one waits for an event not yet recorded.  Backends that execute
asynchronously get the record/wait calls too and turn them into real events.
Which queue of ops advances next is a pluggable order (`InOrder` by default;
cnnc.race runs each stream as its own queue, in a random order the events permit).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Hashable

import numpy as np

from cnnc.backends.base import Backend, BackendError
from cnnc.distributed import CrossCopy, Receive, Transport, cross_rank_copies, owned_devices
from cnnc.ir import Schedule
from cnnc.ops import OPS, scalar_bits
from cnnc.plan.schedule import Buffer, Op, Plan, StepScalar


class ExecutionError(Exception):
    """A plan that cannot run as written (a bug in the planner, never in user input)."""


class NoProbabilities(ValueError):
    """The network has no softmax cost, so it gives no class probabilities (a user's choice of network)."""


def initial_parameters(plan: Plan) -> dict[str, np.ndarray]:
    """Weights ~ N(0, init_w²), biases constant, drawn from (seed, parameter index).

    Keyed by export name (`conv1.weights`); every replica starts from these values."""
    out = {}
    for p in plan.parameters:
        if "normal" in p.init:
            rng = np.random.default_rng([plan.seed, p.index])
            out[p.export_name] = (rng.standard_normal(p.shape) * p.init["normal"]).astype(np.float32)
        else:
            out[p.export_name] = np.full(p.shape, p.init["const"], np.float32)
    return out


def _bytes(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_memory(backend: Backend, storages: list[Buffer]) -> None:
    """Refuse, before anything is allocated, a plan the devices cannot hold: each storage
    must fit one allocation, and the storages of every logical device placed on one
    physical device must fit its memory together."""
    memories = {d: backend.memory(d) for d in {b.device for b in storages}}
    on: dict = {}                                   # device key -> (memory, logical devices, bytes)
    for b in storages:
        memory = memories[b.device]
        if memory is None:
            continue
        if b.nbytes > memory.largest:
            raise BackendError(f"logical device {b.device} ({memory.name}): a buffer of {b.layer or b.id} "
                               f"needs {_bytes(b.nbytes)}, the device allocates at most "
                               f"{_bytes(memory.largest)} at once")
        _, devices, need = on.get(memory.key, (memory, set(), 0))
        on[memory.key] = memory, devices | {b.device}, need + b.nbytes
    for memory, devices, need in on.values():
        if need > memory.total:
            which = f"logical device {min(devices)}" if len(devices) == 1 else \
                "logical devices " + ", ".join(map(str, sorted(devices)))
            raise BackendError(f"{which} ({memory.name}): the plan needs {_bytes(need)}, "
                               f"the device has {_bytes(memory.total)}")


class InOrder:
    """The order every backend issues a program in: each device's ops as the plan lists them,
    moving on to the next device (cyclically) only when one waits for an event not yet
    recorded.  A device's streams are issued interleaved; cuda and opencl then run them
    concurrently as the events allow."""

    def queue(self, device: int, op: Op) -> Hashable:
        """The in-order queue `op` belongs to: the ops of one queue run in program order."""
        return device

    def choose(self, ready: Callable[[int], bool], count: int, last: int) -> int | None:
        """Which of the `count` queues runs its next op (None: none is ready, a deadlock):
        the last one again while it can."""
        for k in range(count):
            if ready((last + k) % count):
                return (last + k) % count
        return None

    def begin(self, program: str) -> None:
        """A run of `program` starts (for orders that watch what runs)."""

    def issue(self, device: int, index: int, op: Op) -> None:
        """`op`, op `index` of `device`'s program, runs next (for orders that watch what runs)."""


class Executor:
    """Runs a plan's programs; with a `transport`, only the logical devices this rank owns,
    and every host-side answer (costs, parameters, flags) is the same on every rank."""

    def __init__(self, plan: Plan, backend: Backend, parameters: dict[str, np.ndarray] | None = None,
                 transport: Transport | None = None, order: InOrder | None = None):
        self.plan = plan
        self.backend = backend
        self.transport = transport
        # a backend that models concurrent streams itself (cnnc.race) brings the order they run in
        self.order = order or backend.stream_order or InOrder()
        self._queues: dict[str, tuple[InOrder, list[Hashable], list[list[tuple[int, int, Op]]]]] = {}
        devices = plan.devices
        self.owner = {d: 0 for d in devices}
        if transport is not None:
            for rank in range(transport.size):
                self.owner.update({d: rank for d in owned_devices(devices, rank, transport.size)})
        self.rank = transport.rank if transport is not None else 0
        self.local = {d for d, rank in self.owner.items() if rank == self.rank}
        self._recorders: dict[str, dict[str, int]] = {}
        self._copies: dict[str, list[CrossCopy]] = {}      # program -> its copies between ranks
        # (device, stream) -> this run's receives not yet written to the device, and the records
        # after them, held back until they are: [("receive", Receive, op) | ("record", event)]
        self._held: dict[tuple[int, str], list[tuple]] = {}
        self._held_events: dict[str, tuple[int, str]] = {}
        self._receives: dict[int, list[Receive]] = {}     # device -> this run's receives, in program order
        self._sends_after: dict[tuple[int, int | None], list[CrossCopy]] = {}
        self.handles = self._allocate()
        self.host: dict[str, np.ndarray] = {}
        self.counters: dict[str, int] = {"seed": plan.seed, "step": 0}   # named integer scalars
        self._step_scalars: tuple = (None, None)        # (what they were evaluated at, values)
        self.set_parameters(parameters if parameters is not None else initial_parameters(plan))

    def _allocate(self) -> dict:
        """One allocation per storage (buffers with disjoint lifetimes share one), sized for
        its largest buffer; every buffer id maps to its storage's handle."""
        biggest: dict[str, Buffer] = {}
        for b in self._local_buffers():
            if b.storage not in biggest or b.size > biggest[b.storage].size:
                biggest[b.storage] = b
        storages = [Buffer(s, b.device, b.size, b.dtype, b.role, b.layer) for s, b in biggest.items()]
        check_memory(self.backend, storages)
        storage = {b.id: self.backend.alloc(b, b.device) for b in storages}
        return {b.id: self.backend.view(storage[b.storage], b) for b in self._local_buffers()}

    def _local_buffers(self) -> list[Buffer]:
        return [b for b in self.plan.buffers.values() if b.device in self.local]

    def _is_local(self, buffer_id: str) -> bool:
        return self.plan.buffers[buffer_id].device in self.local

    def _read_anywhere(self, buffer_ids: list[str]) -> dict[str, np.ndarray]:
        """Buffers of any rank's devices, read by their owners and shared with every rank (a
        download waits for what its device was given, so no synchronisation is needed)."""
        mine = {b: self.read(b) for b in buffer_ids if self._is_local(b)}
        if self.transport is None:
            return mine
        out: dict[str, np.ndarray] = {}
        for values in self.transport.allgather(mine, "buffers read on their owning rank"):
            out.update(values)
        return out

    def local_cases(self, program: str = "train") -> np.ndarray:
        """Which cases of the minibatch the `upload` ops of this rank's devices read."""
        used = np.zeros(self.plan.batch, bool)
        for dev, ops in self.plan.programs[program].items():
            if dev in self.local:
                for op in ops:
                    if op.kind == "upload":
                        for start, count in op.cases:
                            used[start:start + count] = True
        return used

    # -- parameters ---------------------------------------------------------------
    def set_parameters(self, values: dict[str, np.ndarray],
                       momenta: dict[str, np.ndarray] | None = None) -> None:
        """Load parameters (by export name) into every replica, with their momenta where given
        (a checkpoint); otherwise momentum restarts at zero."""
        for p in self.plan.parameters:
            if p.export_name in values:
                v = np.asarray(values[p.export_name], np.float32)
                inc = np.zeros(p.shape, np.float32) if momenta is None else \
                    np.asarray(momenta[p.export_name], np.float32)
                for value in (v, inc):
                    if value.shape != tuple(p.shape):
                        raise ValueError(f"{p.export_name}: expected shape {tuple(p.shape)}, got {value.shape}")
                for buf, inc_buf in zip(p.buffers, p.incs):
                    if not self._is_local(buf):
                        continue
                    self.backend.upload(self.handles[buf], v.reshape(-1))
                    self.backend.upload(self.handles[inc_buf], inc.reshape(-1))

    def momenta(self) -> dict[str, np.ndarray]:
        """Current momentum of every parameter by export name (replica 0, as `parameters`)."""
        values = self._read_anywhere([p.incs[0] for p in self.plan.parameters])
        return {p.export_name: values[p.incs[0]].reshape(p.shape) for p in self.plan.parameters}

    def parameters(self) -> dict[str, np.ndarray]:
        """Current parameter values by export name (replica 0; the replicas are identical)."""
        values = self._read_anywhere([p.buffers[0] for p in self.plan.parameters])
        return {p.export_name: values[p.buffers[0]].reshape(p.shape) for p in self.plan.parameters}

    def replica_parameters(self) -> dict[str, list[np.ndarray]]:
        values = self._read_anywhere([b for p in self.plan.parameters for b in p.buffers])
        return {p.export_name: [values[b].reshape(p.shape) for b in p.buffers] for p in self.plan.parameters}

    def read(self, buffer_id: str) -> np.ndarray:
        return self.backend.download(self.handles[buffer_id], self.plan.buffers[buffer_id])

    # -- numerical health -----------------------------------------------------------
    def parameters_flagged(self) -> bool:
        """Whether the training program's check has found a NaN or an infinity in a parameter
        on some device since the last `restore` (the flags only ever go from 0 to 1)."""
        flagged = any(int(self.read(b.id)[0]) for b in self._local_buffers() if b.role == "health")
        if self.transport is None:
            return flagged
        return any(self.transport.allgather(flagged, "the other ranks' parameter checks"))

    def snapshot(self) -> dict[str, np.ndarray]:
        """Host copy of the whole training state: every replica's parameters and momenta
        (of this rank's devices; each download waits for what its device was given)."""
        return {b: self.read(b) for p in self.plan.parameters for b in p.buffers + p.incs if self._is_local(b)}

    def restore(self, state: dict[str, np.ndarray]) -> None:
        """Put a `snapshot` back and zero every other buffer, flags included, so that nothing
        left by a later step (which may be non-finite) survives into a replay."""
        self.backend.synchronize()
        for b in self._local_buffers():
            value = state.get(b.id)
            self.backend.upload(self.handles[b.id], value if value is not None else
                                np.zeros(b.size, np.int32 if b.dtype == "i32" else np.float32))
        self.backend.synchronize()

    # -- running ------------------------------------------------------------------
    def buffer_args(self, op: Op) -> dict[str, str]:
        """A launch's buffer arguments by the op's argument name (without the step-scalar buffer
        that follows them in op.args for ops with runtime scalars)."""
        return dict(zip(OPS[self.plan.kernels[op.kernel].op].buffers, op.args))

    def _launch_args(self, op: Op) -> list[Any]:
        """Buffer handles only, the same at every step: runtime scalars reach the kernels
        through the step-scalar buffer that the `scalars` op writes."""
        return [self.handles[b] for b in op.args]

    def step_scalars(self, progress: float) -> np.ndarray:
        """The plan's step-scalar table evaluated for a run at `progress` with the counters as
        they are now, as the int32 entries the devices' buffers hold.  Evaluated once per run
        (every device's `scalars` op uploads the same array), and a new array each time, never
        changed later, so an asynchronous upload of it can still be in flight."""
        key = (progress, tuple(sorted(self.counters.items())))
        if self._step_scalars[0] != key:
            values = [scalar_bits(self._scalar_value(s, progress), s.dtype) for s in self.plan.scalars]
            self._step_scalars = (key, np.array(values, np.int32))
        return self._step_scalars[1]

    def _scalar_value(self, s: StepScalar, progress: float):
        if isinstance(s.source, dict):
            return Schedule.from_json(s.source).at(progress)
        return self.counters[s.source] if isinstance(s.source, str) else s.source

    def _execute(self, device: int, op: Op, progress: float, recorders: dict[str, int]) -> None:
        b = self.backend
        if device not in self.local:
            return                          # a copy to it left when its source was final (`_post_sends`)
        if self._held and self._hold(device, op):
            return
        if op.kind == "copy" and not self._is_local(op.src):
            self._receive_copy(device, op)
        elif op.kind == "wait" and recorders[op.event] not in self.local:
            pass                            # the message carrying the data is the synchronisation
        elif op.kind == "launch":
            b.launch(self.plan.kernels[op.kernel], device, self._launch_args(op), op.stream)
        elif op.kind == "scalars":
            b.upload(self.handles[op.dst], self.step_scalars(progress), op.stream)
        elif op.kind == "copy":
            src = self.plan.buffers[op.src]
            b.copy(self.handles[op.src], src.device, op.src_offset, self.handles[op.dst], device, op.dst_offset,
                   op.count, op.stream)
        elif op.kind == "upload":
            host = self.host[op.input]
            data = np.concatenate([host[start:start + count] for start, count in op.cases])
            b.upload(self.handles[op.dst], np.ascontiguousarray(data).reshape(-1), op.stream)
        elif op.kind == "record":
            b.record(op.event, device, op.stream)
        elif op.kind == "wait":
            b.wait(op.event, device, op.stream)
        else:
            raise ExecutionError(f"unknown op kind {op.kind!r}")

    # -- copies between ranks -----------------------------------------------------------
    # A copy's source leaves its rank as soon as the last write before it is issued
    # (`cross_rank_copies`), and its destination is written only when something on the
    # destination's device needs it: a later op on the copy's stream that touches the same
    # storage, or a wait for a record after it.  So a layer's gradient is on the wire while
    # the layers below compute theirs, and no rank waits for a message before it must.

    def _start_messages(self, program: str) -> None:
        """A run begins: post every receive of this rank's devices, and the sends whose
        sources no write of this run precedes."""
        if program not in self._copies:
            self._copies[program] = cross_rank_copies(self.plan, program, self.owner)
        self._receives, self._sends_after, self._held, self._held_events = {}, {}, {}, {}
        ops = self.plan.programs[program]
        first = []
        for copy in self._copies[program]:
            op = ops[copy.device][copy.index]
            if copy.device in self.local:
                dst = self.plan.buffers[op.dst]
                values = np.empty(op.count, np.int32 if dst.dtype == "i32" else np.float32)
                self._receives.setdefault(copy.device, []).append(self.transport.receive_array(
                    values, self.owner[copy.source], copy.tag,
                    f"{op.src} (logical device {copy.source}) for {op.dst}"))
            elif copy.source in self.local and copy.after is None:
                first.append(copy)
            elif copy.source in self.local:
                self._sends_after.setdefault((copy.source, copy.after), []).append(copy)
        for copy in first:
            self._send_copy(program, copy)

    def _post_sends(self, program: str, device: int, index: int) -> None:
        """Send the copies whose sources became final with op `index` of `device`."""
        for copy in self._sends_after.pop((device, index), ()):
            self._send_copy(program, copy)

    def _send_copy(self, program: str, copy: CrossCopy) -> None:
        """The source half of a copy to another rank's device: the values after everything
        issued on the source's device so far (a download waits for that, and for nothing else)."""
        op = self.plan.programs[program][copy.device][copy.index]
        for stream in [q for q in self._held if q[0] == copy.source]:
            self._release(stream)           # a held receive may have written the source
        values = self.read(op.src)[op.src_offset:op.src_offset + op.count]
        self.transport.send_array(np.ascontiguousarray(values), self.owner[copy.device], copy.tag)

    def _receive_copy(self, device: int, op: Op) -> None:
        """The destination half of a copy from another rank's device: held until needed."""
        self._held.setdefault((device, op.stream), []).append(("receive", self._receives[device].pop(0), op))

    def _hold(self, device: int, op: Op) -> bool:
        """Order `op` after the held receives it depends on; True when `op` is itself held
        (a record after a held receive on its stream, issued once the receive is written)."""
        stream = (device, op.stream)
        if op.kind == "wait":
            if op.event in self._held_events:
                self._release(self._held_events[op.event], op.event)
            return False
        held = self._held.get(stream)
        if not held:
            return False
        if op.kind == "record":
            held.append(("record", op.event))
            self._held_events[op.event] = stream
            return True
        if op.kind == "copy" and not self._is_local(op.src):
            return False
        touched = {self.plan.buffers[b].storage for b in (*op.reads(), op.dst) if b}
        if any(entry[0] == "receive" and self.plan.buffers[entry[2].dst].storage in touched for entry in held):
            self._release(stream)
        return False

    def _release(self, stream: tuple[int, str], event: str | None = None) -> None:
        """Write the held receives of `stream` into device memory, and issue the records held
        behind them: all of them, or up to `event`."""
        held = self._held.get(stream, [])
        while held:
            entry = held.pop(0)
            if entry[0] == "receive":
                _, receive, op = entry
                # only the copy's range, on the copy's stream: the rest of dst may be in use meanwhile
                for at, values in receive.chunks():
                    self.backend.upload(self.handles[op.dst], values, op.stream, op.dst_offset + at)
            else:
                self.backend.record(entry[1], stream[0], stream[1])
                del self._held_events[entry[1]]
                if entry[1] == event:
                    break
        if not held:
            self._held.pop(stream, None)

    def _finish_messages(self) -> None:
        """A run ends: every receive is written, every held record issued."""
        for stream in list(self._held):
            self._release(stream)

    def run(self, program: str, progress: float = 0.0, timer=None) -> None:
        """Run one program: the ops of each of the order's queues in program order, honouring
        events (a wait runs only once its event is recorded in this run).

        With `timer(device, op, seconds)`, every op is timed on its own (the backend is
        synchronised around it), which is what `cnnc bench` uses for per-layer numbers."""
        programs = self.plan.programs[program]
        self.backend.begin_run()
        if program not in self._recorders:
            self._recorders[program] = {op.event: d for d, ops in programs.items() for op in ops
                                        if op.kind == "record"}
        recorders = self._recorders[program]
        order = self.order
        keys, queues = self._split(program, order)
        head = [0] * len(queues)
        recorded: set[str] = set()

        def ready(q: int) -> bool:
            if head[q] == len(queues[q]):
                return False
            op = queues[q][head[q]][2]
            return op.kind != "wait" or op.event in recorded

        order.begin(program)
        if self.transport is not None:
            self._start_messages(program)
        current = 0
        for _ in range(sum(len(ops) for ops in queues)):
            current = order.choose(ready, len(queues), current)
            if current is None:
                stuck = {keys[q]: ops[head[q]][2].event for q, ops in enumerate(queues) if head[q] < len(ops)}
                raise ExecutionError(f"program '{program}' deadlocks: devices wait for {stuck}")
            dev, index, op = queues[current][head[current]]
            head[current] += 1
            order.issue(dev, index, op)
            if timer is None or dev not in self.local:
                self._execute(dev, op, progress, recorders)
            else:
                self.backend.synchronize()
                t0 = time.perf_counter()
                self._execute(dev, op, progress, recorders)
                self.backend.synchronize()
                timer(dev, op, time.perf_counter() - t0)
            if op.kind == "record":
                recorded.add(op.event)
            if self._sends_after:
                self._post_sends(program, dev, index)
        if self.transport is not None:
            self._finish_messages()

    def _split(self, program: str, order: InOrder) -> tuple[list[Hashable], list[list[tuple[int, int, Op]]]]:
        """The program cut into the order's queues of (device, index in its program, op), each
        in program order, and the queues' keys; kept per program while the order stays."""
        cached = self._queues.get(program)
        if cached is None or cached[0] is not order:
            queues: dict[Hashable, list[tuple[int, int, Op]]] = {}
            for dev, ops in self.plan.programs[program].items():
                for index, op in enumerate(ops):
                    queues.setdefault(order.queue(dev, op), []).append((dev, index, op))
            cached = self._queues[program] = (order, list(queues), list(queues.values()))
        return cached[1], cached[2]

    def load_batch(self, x: np.ndarray, y: np.ndarray) -> None:
        """Host-side minibatch; `upload` ops copy each device's share from here."""
        for name, kind in self.plan.inputs.items():
            self.host[name] = y if kind == "labels" else x

    def cost_outputs(self, cost: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Per-case loss and correctness of cost layer `cost` (the first by default), in minibatch order."""
        loss, correct = np.zeros(self.plan.batch, np.float32), np.zeros(self.plan.batch, np.float32)
        outputs = [(out["cases"], self.read(out["loss"]), self.read(out["correct"]))
                   for out in self.plan.costs[cost]["outputs"] if self._is_local(out["loss"])]
        if self.transport is not None:
            outputs = [o for rank in self.transport.allgather(outputs, "the other ranks' costs") for o in rank]
        for cases, *values in outputs:
            at = 0
            for start, count in cases:
                loss[start:start + count] = values[0][at:at + count]
                correct[start:start + count] = values[1][at:at + count]
                at += count
        return loss, correct

    def train_step(self, x: np.ndarray, y: np.ndarray, progress: float,
                   timer=None) -> tuple[np.ndarray, np.ndarray]:
        """Forward, backward, gradient exchange and updates on one minibatch;
        returns per-case loss and correctness (`timer` as in `run`)."""
        self.load_batch(x, y)
        self.run("train", progress, timer)
        self.counters["step"] += 1
        return self.cost_outputs()

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.load_batch(x, y)
        self.run("test")
        return self.cost_outputs()

    def cost_losses(self) -> dict[str, np.ndarray]:
        """Per-case loss of every cost layer after the last run, by layer name (unweighted by its coeff)."""
        return {cost["layer"]: self.cost_outputs(i)[0] for i, cost in enumerate(self.plan.costs)}

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities [batch, classes] of one minibatch x under the test program, read from
        the softmax the first cost reads, right after that cost has run (one process only)."""
        cases_of = self._probability_reads()
        found = np.zeros((self.plan.batch, self.plan.classes), np.float32)

        def capture(device, op, seconds):
            if op.kind != "launch":
                return
            args = self.buffer_args(op)
            if args.get("loss") in cases_of:
                probs = self.read(args["probs"]).reshape(-1, self.plan.classes)
                at = 0
                for start, count in cases_of[args["loss"]]:
                    found[start:start + count] = probs[at:at + count]
                    at += count

        self.load_batch(x, np.zeros(self.plan.batch, np.int32))
        self.run("test", 0.0, capture)
        return found

    def _probability_reads(self) -> dict[str, list]:
        """The test program's launches of the first cost that read a softmax: their loss buffer
        mapped to the minibatch cases it holds."""
        plan = self.plan
        cases = {out["loss"]: out["cases"] for out in plan.costs[0]["outputs"]} if plan.costs else {}
        reads = {}
        for ops in plan.programs["test"].values():
            for op in ops:
                if op.kind == "launch":
                    args = self.buffer_args(op)
                    if "probs" in args and args.get("loss") in cases:
                        reads[args["loss"]] = cases[args["loss"]]
        if not reads or reads.keys() != cases.keys():
            raise NoProbabilities(f"the network '{plan.network}' has no softmax cost (logreg or crossent) "
                                  f"to read class probabilities from")
        return reads
