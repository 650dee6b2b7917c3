"""Race detection: run a plan on the reference backend as a GPU may run it, and check it.

On a GPU each (device, stream) is an in-order queue, and ops of different
queues are ordered only by record/wait events (a record marks everything
issued before it on its stream; a wait makes later work on its stream wait
for that).  The executor's usual order runs each device's ops as listed, so
on the reference backend a missing event changes nothing, or almost nothing.

Here every (device, stream) is its own queue and a seeded generator picks
which ready queue runs next (`RandomOrder`), and `RaceChecker` checks every
access against the streams and events with vector clocks: a read must come
after the last write of the elements it reads, and a write after the last
write and every read since, by program order on one stream or through
events, or the run stops with a `RaceError` naming both accesses.  The plan
orders ops within one run only: between runs, the fence of `begin_run` (or a
synchronize) orders everything issued before it before everything after it;
and a download waits for everything issued on its device, so host reads are
ordered after the writes they read.

Parameters and their momenta persist between steps, and the health flags
until the host resets them; every other buffer holds values for one run
only, so each is filled with NaN (int32: the most negative value) when its
lifetime starts, at its first access in a run.  That access must write it: a
first access that only reads is reported at once, with the op that writes it.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Callable, Hashable

import numpy as np

from cnnc.backends.base import BackendError
from cnnc.backends.reference import ReferenceBackend
from cnnc.executor import InOrder
from cnnc.ops import OPS, Role
from cnnc.plan.schedule import Buffer, Op, Plan

Stream = tuple[int, str]            # (device, stream): one in-order queue of a GPU
Range = tuple[str, int, int]        # (buffer, first element, end)
POISON = {"f32": np.float32("nan"), "i32": np.iinfo(np.int32).min}


def parse_stream_order(text: str) -> int | None:
    """`in-order` -> None, `random` -> seed 0, `random:SEED` -> SEED; ValueError otherwise."""
    name, colon, seed = text.partition(":")
    if text == "in-order":
        return None
    if name == "random" and (not colon or seed.isascii() and seed.isdigit()):
        return int(seed) if colon else 0
    raise ValueError(f"expected in-order, random or random:SEED (SEED a non-negative integer), got {text!r}")


class RandomOrder(InOrder):
    """Each (device, stream) its own queue; the next op comes from a ready queue drawn by a
    seeded generator.  `watch` (a RaceChecker) is told of every run and op."""

    def __init__(self, seed: int, watch: "RaceChecker | None" = None):
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.watch = watch

    def queue(self, device: int, op: Op) -> Hashable:
        return (device, op.stream)

    def choose(self, ready: Callable[[int], bool], count: int, last: int) -> int | None:
        options = [q for q in range(count) if ready(q)]
        return options[int(self.rng.integers(len(options)))] if options else None

    def begin(self, program: str) -> None:
        if self.watch is not None:
            self.watch.begin(program)

    def issue(self, device: int, index: int, op: Op) -> None:
        if self.watch is not None:
            self.watch.issue(device, index, op)


@dataclass(frozen=True)
class Access:
    """One op's read or write of a buffer, at its stream's clock, in the `run`-th run."""

    stream: Stream
    clock: int
    run: int
    program: str
    index: int                      # in its device's program
    op: str                         # what the op is, for people
    buffer: str
    verb: str                       # reads | writes | starts the lifetime of (a write of NaN)

    @property
    def device(self) -> int:
        return self.stream[0]

    def describe(self) -> str:
        return (f"device {self.device}, stream {self.stream[1]}, {self.program} op {self.index} ({self.op}) "
                f"{self.verb} {self.buffer}")


class RaceError(BackendError):
    """Accesses that nothing orders although one writes what the other touches: on a GPU they
    may run either way round.  `access` is the later one here, `other` the earlier one (or,
    for a read before any write, the op that writes it; None where nothing does)."""

    def __init__(self, message: str, access: Access | None, other: Access | None):
        super().__init__("race: " + message)
        self.access, self.other = access, other


@dataclass
class _Cell:
    """A run of elements of one storage: its last write and the reads since, one per stream
    (a later read of a stream is ordered after its earlier ones, so it stands for them)."""

    write: Access | None = None
    reads: dict[Stream, Access] = field(default_factory=dict)

    def copy(self) -> "_Cell":
        return _Cell(self.write, dict(self.reads))


class _Shadow:
    """The access history of one storage, as cells over element ranges."""

    def __init__(self, size: int):
        self.size = size
        self.starts = [0]
        self.cells = [_Cell()]

    def _cut(self, at: int) -> int:
        if at >= self.size:
            return len(self.cells)
        i = bisect.bisect_right(self.starts, at) - 1
        if self.starts[i] != at:
            i += 1
            self.starts.insert(i, at)
            self.cells.insert(i, self.cells[i - 1].copy())
        return i

    def span(self, lo: int, hi: int) -> tuple[int, int]:
        """Cell indices [first, last) that cover elements [lo, hi) exactly."""
        first = self._cut(lo)
        return first, self._cut(hi)

    def merge(self, first: int, last: int, cell: _Cell) -> None:
        """Cells [first, last) become one."""
        self.starts[first:last] = [self.starts[first]]
        self.cells[first:last] = [cell]


class RaceChecker(ReferenceBackend):
    """The reference backend running each stream as its own queue in a seeded random order the
    events permit (its `stream_order`, which the executor takes), checking every access.
    With execute=False it checks the order only and computes nothing (sweeps of large plans)."""

    def __init__(self, plan: Plan, seed: int = 0, execute: bool = True):
        self.plan = plan
        self.execute = execute
        self.stream_order = RandomOrder(seed, watch=self)
        self.persistent = {b for p in plan.parameters for b in (*p.buffers, *p.incs)} | \
            {b.id for b in plan.buffers.values() if b.role == "health"}
        size: dict[str, int] = {}
        for b in plan.buffers.values():
            size[b.storage] = max(size.get(b.storage, 0), b.size)
        self.shadows = {s: _Shadow(n) for s, n in size.items()}
        self.views: dict[str, np.ndarray] = {}
        self.clocks: dict[Stream, dict[Stream, int]] = {}
        self.fenced: dict[Stream, int] = {}         # what the last fence ordered before all later work
        self.events: dict[str, dict[Stream, int]] = {}
        self.runs = 0
        self.program = ""
        self.started: set[str] = set()             # buffers whose lifetime began in this run

    def describe(self) -> str:
        return (f"reference (numpy on the host), streams in random order (seed {self.stream_order.seed}), "
                f"race-checked")

    # -- memory -------------------------------------------------------------------------
    def memory(self, device: int):
        return super().memory(device) if self.execute else None

    def alloc(self, buffer: Buffer, device: int) -> np.ndarray:
        return super().alloc(buffer, device) if self.execute else np.zeros(0, np.float32)

    def view(self, handle: np.ndarray, buffer: Buffer) -> np.ndarray:
        self.views[buffer.id] = view = super().view(handle, buffer)
        return view

    def upload(self, handle: np.ndarray, array: np.ndarray, stream: str = "compute", offset: int = 0) -> None:
        if self.execute:
            super().upload(handle, array, stream, offset)

    def download(self, handle: np.ndarray, buffer: Buffer) -> np.ndarray:
        return super().download(handle, buffer) if self.execute else np.zeros(buffer.size, np.float32)

    # -- what runs --------------------------------------------------------------------
    def launch(self, kernel, device, args, stream="compute") -> None:
        if self.execute:
            super().launch(kernel, device, args, stream)

    def copy(self, src, src_device, src_offset, dst, dst_device, dst_offset, count, stream="copy-in") -> None:
        if self.execute:
            super().copy(src, src_device, src_offset, dst, dst_device, dst_offset, count, stream)

    def begin_run(self) -> None:
        """The fence between runs: everything issued so far happens before anything issued later."""
        for clock in self.clocks.values():
            _join(self.fenced, clock)
        for stream, clock in self.clocks.items():
            _join(clock, self.fenced)
            clock[stream] += 1

    def synchronize(self) -> None:
        self.begin_run()                # the host waits for everything: a fence, too
        super().synchronize()

    def begin(self, program: str) -> None:
        self.runs += 1
        self.program = program
        self.started = set()

    def issue(self, device: int, index: int, op: Op) -> None:
        """Check `op`'s accesses against its stream's clock before it runs; records and waits
        move the clocks."""
        stream = (device, op.stream)
        clock = self.clocks.get(stream)
        if clock is None:
            clock = self.clocks[stream] = dict(self.fenced)
            clock[stream] = 1
        if op.kind == "record":
            self.events[op.event] = dict(clock)
            clock[stream] += 1
            return
        if op.kind == "wait":
            _join(clock, self.events[op.event])
            return
        reads, writes = self._accesses(op)
        what = _what(op)

        def access(buffer: str, verb: str) -> Access:
            return Access(stream, clock[stream], self.runs, self.program, index, what, buffer, verb)

        written = {b for b, _, _ in writes}
        for buffer in dict.fromkeys(b for b, _, _ in reads + writes):
            if buffer in self.started or buffer in self.persistent:
                continue
            if buffer not in written:
                self._read_before_write(access(buffer, "reads"), device, index)
            self.started.add(buffer)
            b = self.plan.buffers[buffer]
            self._write(access(buffer, "starts the lifetime of"), clock, b.storage, 0, b.size)
            if self.execute:
                self.views[buffer][...] = POISON[b.dtype]
        for buffer, lo, hi in reads:
            self._read(access(buffer, "reads"), clock, self.plan.buffers[buffer].storage, lo, hi)
        for buffer, lo, hi in writes:
            self._write(access(buffer, "writes"), clock, self.plan.buffers[buffer].storage, lo, hi)

    def _accesses(self, op: Op) -> tuple[list[Range], list[Range]]:
        """What `op` reads and writes: a launch by its arguments' roles (arguments past the
        op's own buffers, such as its step scalars, are read), a copy its ranges, any other op
        with a destination the whole of it."""
        buffers = self.plan.buffers
        if op.kind == "launch":
            spec = OPS[self.plan.kernels[op.kernel].op]
            roles = dict(spec.args)
            reads, writes = [], []
            for i, buffer in enumerate(op.args):
                role = roles[spec.buffers[i]] if i < len(spec.buffers) else Role.IN
                whole = (buffer, 0, buffers[buffer].size)
                if role in (Role.IN, Role.INOUT):
                    reads.append(whole)
                if role in (Role.OUT, Role.INOUT):
                    writes.append(whole)
            return reads, writes
        if op.kind == "copy":
            return ([(op.src, op.src_offset, op.src_offset + op.count)],
                    [(op.dst, op.dst_offset, op.dst_offset + op.count)])
        return [], ([(op.dst, 0, buffers[op.dst].size)] if op.dst else [])

    def _read_before_write(self, access: Access, device: int, index: int) -> None:
        """A run's first access to a buffer only reads it: name an op of the run that writes
        it (on the reader's device and before it, where there is one)."""
        found = []
        for dev, ops in self.plan.programs[self.program].items():
            for i, op in enumerate(ops):
                if any(b == access.buffer for b, _, _ in self._accesses(op)[1]):
                    found.append((dev != device, dev == device and i > index, dev, i, op))
        if not found:
            raise RaceError(f"{access.describe()}, which no op of the {self.program} program writes",
                            access, None)
        *_, dev, i, op = min(found, key=lambda f: f[:4])
        writer = Access((dev, op.stream), 0, self.runs, self.program, i, _what(op), access.buffer, "writes")
        raise RaceError(f"{access.describe()} before anything in this run writes it; {writer.describe()}, "
                        f"and nothing orders that first (a record/wait pair is missing)", access, writer)

    def _read(self, access: Access, clock: dict, storage: str, lo: int, hi: int) -> None:
        shadow = self.shadows[storage]
        first, last = shadow.span(lo, hi)
        for cell in shadow.cells[first:last]:
            if cell.write is not None and not _before(cell.write, clock):
                _race(access, cell.write)
            cell.reads[access.stream] = access

    def _write(self, access: Access, clock: dict, storage: str, lo: int, hi: int) -> None:
        shadow = self.shadows[storage]
        first, last = shadow.span(lo, hi)
        if first == last:
            return
        for cell in shadow.cells[first:last]:
            if cell.write is not None and not _before(cell.write, clock):
                _race(access, cell.write)
            for read in cell.reads.values():
                if not _before(read, clock):
                    _race(access, read)
        shadow.merge(first, last, _Cell(access))


def _race(access: Access, other: Access) -> None:
    why = "a record/wait pair is missing" if other.run == access.run else \
        "no fence or synchronize between the two runs"
    raise RaceError(f"{access.describe()}, and {other.describe()}; nothing orders the two ({why})",
                    access, other)


def _what(op: Op) -> str:
    if op.kind == "launch":
        return f"launch {op.kernel}"
    if op.kind == "copy":
        return f"copy {op.src}[{op.src_offset}:{op.src_offset + op.count}] to {op.dst}[{op.dst_offset}:]"
    return f"{op.kind} {op.dst}" if op.dst else op.kind


def _before(access: Access, clock: dict) -> bool:
    """Whether `access` happens before everything at `clock`."""
    return clock.get(access.stream, 0) >= access.clock


def _join(into: dict, other: dict) -> None:
    for k, v in other.items():
        if into.get(k, 0) < v:
            into[k] = v
