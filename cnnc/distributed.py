"""Many processes, one plan: MPI ranks that each own a contiguous block of logical devices.

Every rank walks the same programs in the same order (the executor's walk is a
function of the plan alone), runs the ops of its own devices, and turns each copy
whose two ends sit on different ranks into a host-staged message, in chunks of at
most CHUNK_BYTES: sent as soon as the last write to its source before the copy is
issued (`cross_rank_copies`), received into device memory only when the
destination's device needs it.  The kernels, and so every sum, are the
single-process ones in the single-process order, which keeps results bitwise
independent of the rank count.  Every wait has a deadline: a rank that dies or stops makes the
others fail with the rank and the operation named, never hang.

mpi4py is imported only when the process was started by an MPI launcher.
"""
from __future__ import annotations

import functools
import os
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from cnnc.ops import OPS, Role
from cnnc.plan.schedule import Op, Plan

DEFAULT_TIMEOUT = 60.0          # seconds any one wait on another rank may take, at least...
STEP_TIMEOUTS = 10              # ...or this many of the last training step, when no timeout is given
_POLL = 1e-5, 1e-3              # seconds between polls of a pending message: first, at most

# what the common launchers (MPICH's Hydra, Open MPI, PMIx) put in every rank's environment
_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE")
_RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")

_DATA, _COLLECTIVE = 1, 2       # message tags: host values, and exchanges of host results
_COPY_TAGS = 16                 # copies between ranks: tag _COPY_TAGS + the copy's number in its program

# A copy's message travels in chunks of at most this many bytes (CNNC_MPI_CHUNK_BYTES overrides
# it): each chunk is its own message, so the receiver writes the first chunks into device memory
# while later ones are still on the wire, and no one message pins a whole layer's gradient.
CHUNK_BYTES = 4 << 20


class CommError(Exception):
    """Another rank did not answer in time, or the ranks cannot share this plan."""


def _env_int(names: tuple[str, ...]) -> int | None:
    for name in names:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return None


def launched_ranks() -> int:
    """How many ranks the launcher started (1 outside mpiexec), read from the environment
    so that a plain run never initialises MPI."""
    return _env_int(_SIZE_VARIABLES) or 1


def launched_rank() -> int:
    """This process's rank as the launcher numbered it (0 outside mpiexec)."""
    return _env_int(_RANK_VARIABLES) or 0


def owned_devices(devices: list[int], rank: int, ranks: int) -> list[int]:
    """The contiguous block of logical devices rank `rank` of `ranks` owns."""
    if len(devices) % ranks:
        raise CommError(f"{ranks} ranks cannot share the plan's {len(devices)} logical devices: "
                        f"the number of ranks must divide it")
    per = len(devices) // ranks
    return devices[rank * per:(rank + 1) * per]


@dataclass(frozen=True)
class CrossCopy:
    """A copy whose two ends sit on different ranks: where its message goes, and when its
    source may leave (right after op `after` of device `source`, or at the start of the run
    when None: no write in the run happens before the copy)."""

    device: int                 # the destination's device, whose program holds the copy op
    index: int                  # the copy op's place in that program
    source: int                 # the source buffer's device
    tag: int                    # the message's tag, the same on every rank
    after: int | None           # the last op of `source` that writes the source's storage before the copy


def cross_rank_copies(plan: Plan, program: str, owner: dict[int, int]) -> list[CrossCopy]:
    """Every copy of `program` between ranks, with the point its source values are final.

    The values a copy reads are those of the writes that happen before it (by stream order
    and record/wait events; a race-free plan has no write to the source concurrent with it),
    so the sending rank can send as soon as the last of those writes is issued, however much
    later the copy itself comes in the destination device's program: a layer's gradient
    leaves once that layer's backward is done.  Happens-before is found with vector clocks
    over the (device, stream) queues, whatever order they are walked in."""
    ops = plan.programs[program]
    copies = [(d, i, op) for d in sorted(ops) for i, op in enumerate(ops[d])
              if op.kind == "copy" and owner[plan.buffers[op.src].device] != owner[d]]
    if not copies:
        return []
    # stamp[(device, index)]: (its stream, its count there); clock_at[(device, index)]: the clock it runs at
    stamp, clock_at = _vector_clocks(plan, program)
    writes = {d: [_writes(plan, w) for w in ops[d]] for d in {plan.buffers[op.src].device for _, _, op in copies}}
    out = []
    for number, (d, i, op) in enumerate(copies):
        src = plan.buffers[op.src]
        clock = clock_at[(d, i)]
        read = (src.storage, op.src_offset, op.src_offset + op.count)
        last = None
        for j, written in enumerate(writes[src.device]):
            stream, count = stamp[(src.device, j)]
            if clock.get(stream, 0) >= count and any(_overlap(read, w) for w in written):
                last = j
        out.append(CrossCopy(d, i, src.device, _COPY_TAGS + number, last))
    return out


def _writes(plan: Plan, op: Op) -> list[tuple[str, int, int]]:
    """The (storage, first element, end) ranges `op` writes: a launch the whole of its output
    arguments (by their roles), a copy its range, any other op the whole of its destination."""
    buffers = plan.buffers
    if op.kind == "launch":
        spec = OPS[plan.kernels[op.kernel].op]
        roles = dict(spec.args)
        return [(buffers[b].storage, 0, buffers[b].size) for name, b in zip(spec.buffers, op.args)
                if roles[name] in (Role.OUT, Role.INOUT)]
    if op.kind == "copy":
        return [(buffers[op.dst].storage, op.dst_offset, op.dst_offset + op.count)]
    return [(buffers[op.dst].storage, 0, buffers[op.dst].size)] if op.dst else []


def _overlap(a: tuple[str, int, int], b: tuple[str, int, int]) -> bool:
    return a[0] == b[0] and a[1] < b[2] and b[1] < a[2]


def _vector_clocks(plan: Plan, program: str) -> tuple[dict, dict]:
    """Walk the program's (device, stream) queues in any order the events allow, as a GPU
    may run them: each op's stamp (stream, count) and the clock it runs at (stream -> count
    of the ops known to have happened before it there)."""
    queues: dict[tuple[int, str], list[tuple[int, Op]]] = {}
    for d, ops in plan.programs[program].items():
        for i, op in enumerate(ops):
            queues.setdefault((d, op.stream), []).append((i, op))
    head = {q: 0 for q in queues}
    clocks = {q: {q: 1} for q in queues}
    events: dict[str, dict] = {}
    stamp, clock_at = {}, {}
    moved = True
    while moved:
        moved = False
        for q, items in queues.items():
            while head[q] < len(items):
                i, op = items[head[q]]
                clock = clocks[q]
                if op.kind == "wait":
                    if op.event not in events:
                        break
                    for k, v in events[op.event].items():
                        clock[k] = max(clock.get(k, 0), v)
                stamp[(q[0], i)] = (q, clock[q])
                clock_at[(q[0], i)] = dict(clock)
                if op.kind == "record":
                    events[op.event] = dict(clock)
                    clock[q] += 1
                head[q] += 1
                moved = True
    return stamp, clock_at


class Receive:
    """A copy's message on its way to this rank, received in chunks into one host array."""

    def __init__(self, transport: "Transport", values: np.ndarray, requests: list, peer: int, what: str):
        self.transport, self.values, self.requests, self.peer, self.what = transport, values, requests, peer, what

    def chunks(self):
        """(first element, values) of each chunk as it arrives, in order, each wait bounded."""
        at = 0
        for request, size in self.requests:
            self.transport._await(request.Test, self.peer, self.what)
            yield at, self.values[at:at + size]
            at += size


class Transport:
    """Host-staged messages between the ranks of MPI's COMM_WORLD, each wait bounded by `timeout`
    (None: the larger of DEFAULT_TIMEOUT and STEP_TIMEOUTS training steps)."""

    def __init__(self, timeout: float | None = None):
        try:
            from mpi4py import MPI
        except ImportError as e:
            raise CommError(f"started by mpiexec, but mpi4py cannot be imported ({e}); "
                            f"install cnnc[mpi]") from None
        self._mpi = MPI
        self.comm = MPI.COMM_WORLD
        self.comm.Set_errhandler(MPI.ERRORS_RETURN)     # a lost rank becomes an exception that names it
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.adaptive = timeout is None
        self.timeout = DEFAULT_TIMEOUT if timeout is None else timeout
        self._sends: list[Any] = []
        chunk = os.environ.get("CNNC_MPI_CHUNK_BYTES", "")
        if chunk and not (chunk.isdigit() and int(chunk) > 0):
            raise CommError(f"CNNC_MPI_CHUNK_BYTES must be a positive number of bytes, got {chunk!r}")
        self.chunk_bytes = int(chunk or CHUNK_BYTES)
        self._tag_limit = self.comm.Get_attr(MPI.TAG_UB) or 32767

    def step_took(self, seconds: float) -> None:
        """A training step's time, which a timeout left to the default grows with."""
        if self.adaptive:
            self.timeout = max(DEFAULT_TIMEOUT, STEP_TIMEOUTS * seconds)

    @property
    def root(self) -> bool:
        """Rank 0 alone writes files and shows progress."""
        return self.rank == 0

    def _await(self, ready: Callable[[], bool], peer: int | None, what: str) -> None:
        deadline, pause = time.monotonic() + self.timeout, _POLL[0]
        who = f"rank {peer}" if peer is not None else "another rank"
        while not self._guarded(ready, who, what):
            if time.monotonic() > deadline:
                raise CommError(f"rank {self.rank}: no answer from {who} within {self.timeout:g} s "
                                f"while waiting for {what}")
            time.sleep(pause)
            pause = min(2 * pause, _POLL[1])

    def _guarded(self, call: Callable[[], Any], who: str, what: str) -> Any:
        try:
            return call()
        except self._mpi.Exception as e:
            raise CommError(f"rank {self.rank}: lost {who} while waiting for {what} "
                            f"({e.Get_error_string().splitlines()[0]})") from None

    def send(self, value: Any, peer: int, tag: int = _DATA) -> None:
        """Start sending `value` to `peer` without waiting for it to be received."""
        self._sends = [(r, keep) for r, keep in self._sends if not r.Test()]
        self._sends.append((self.comm.isend(value, dest=peer, tag=tag), None))

    def recv(self, peer: int, what: str, tag: int = _DATA) -> Any:
        """The next value `peer` sent with `tag` (messages between two ranks arrive in order)."""
        self._await(lambda: self.comm.iprobe(source=peer, tag=tag), peer, what)
        return self._guarded(lambda: self.comm.recv(source=peer, tag=tag), f"rank {peer}", what)

    def _chunks(self, count: int, itemsize: int) -> list[tuple[int, int]]:
        step = max(1, self.chunk_bytes // itemsize)
        return [(at, min(step, count - at)) for at in range(0, count, step)]

    def _tag(self, tag: int) -> int:
        return _COPY_TAGS + (tag - _COPY_TAGS) % (self._tag_limit - _COPY_TAGS)

    def send_array(self, values: np.ndarray, peer: int, tag: int) -> None:
        """Start sending a copy's values to `peer`, chunk by chunk, without waiting for them."""
        self._sends = [(r, keep) for r, keep in self._sends if not r.Test()]
        for at, size in self._chunks(values.size, values.itemsize):
            chunk = values[at:at + size]
            self._sends.append((self.comm.Isend(chunk, dest=peer, tag=self._tag(tag)), chunk))

    def receive_array(self, values: np.ndarray, peer: int, tag: int, what: str) -> Receive:
        """Start receiving a copy's values from `peer` into `values`, chunked as the sender
        chunks them; the chunks of one tag arrive in order (MPI does not overtake)."""
        requests = [(self.comm.Irecv(values[at:at + size], source=peer, tag=self._tag(tag)), size)
                    for at, size in self._chunks(values.size, values.itemsize)]
        return Receive(self, values, requests, peer, what)

    def allgather(self, value: Any, what: str) -> list[Any]:
        """Every rank's `value`, in rank order, on every rank."""
        for peer in range(self.size):
            if peer != self.rank:
                self.send(value, peer, _COLLECTIVE)
        return [value if peer == self.rank else self.recv(peer, what, _COLLECTIVE) for peer in range(self.size)]

    def finish(self) -> None:
        """Wait for every message this rank sent to be taken, then for every rank to get here."""
        for request, _ in self._sends:
            self._await(request.Test, None, "a message it sent to be received")
        self._sends = []
        self.allgather(None, "the other ranks to finish")


def transport_for_launch(timeout: float | None = None) -> Transport | None:
    """A transport when mpiexec started more than one rank, else None (one process runs it all)."""
    if launched_ranks() < 2:
        return None
    transport = Transport(timeout)
    return transport if transport.size > 1 else None


def abort_on_failure(fn: Callable) -> Callable:
    """Under mpiexec, a rank that exits with an error takes every rank down with it
    (MPI_Abort), so that no rank is left waiting on it."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SystemExit as e:
            if e.code not in (0, None):
                _abort(e.code if isinstance(e.code, int) else 1)
            raise
        except Exception as e:
            code = getattr(e, "exit_code", None)    # click's usage errors, which click prints itself
            if code is None:                        # a bug: its traceback, then the job ends
                traceback.print_exc()
            _abort(code or 1)
            raise
    return wrapper


# MPI_Abort makes the launcher end the job at once, and its proxies drop output they have
# not yet forwarded: give them this long to forward this rank's last message first.
_FORWARD_GRACE_S = 0.5


def _abort(code: int) -> None:
    if launched_ranks() > 1 and "mpi4py.MPI" in sys.modules:
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(_FORWARD_GRACE_S)
        sys.modules["mpi4py.MPI"].COMM_WORLD.Abort(code)
