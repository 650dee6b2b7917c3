"""A recording stand-in for ``pycuda.driver``, to test the CUDA backend's driver-call protocol
without a GPU.

Device memory is host memory (numpy bytes behind integer "device pointers"), and every
asynchronous operation is queued on its stream and runs only when it must: when the host
waits for it (an event, a stream, a context), or, with a `seed`, also at random moments once
everything it waits for has run.  So a missing wait shows up as wrong numbers, a staging
buffer refilled before its copy ran is caught when the copy runs, and a read before the copy
back finished returns the garbage the buffer was filled with.  Calls the protocol forbids
(the legacy stream, synchronous copies, waiting for an event never recorded, an event or
stream used from another context, a peer copy without peer access) raise ProtocolError.

What it cannot show: anything about real kernels, real timing, real driver limits.
"""
from __future__ import annotations

import random
import struct
import types
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

GARBAGE = 0xFF                      # fills fresh memory: NaN as float32, -1 as int32


class ProtocolError(AssertionError):
    """The backend broke a rule of the CUDA driver or of its own protocol."""


class Pointer(int):
    """A kernel argument the launch passed as a pointer ("P")."""


@dataclass
class Allocation:
    base: int
    memory: np.ndarray               # uint8
    device: int


@dataclass
class Pinned:
    address: int
    nbytes: int
    flags: int
    device: int                     # the context current when it was allocated


@dataclass
class Call:
    """One driver call as the log keeps it."""

    name: str
    device: int | None = None
    stream: Any = None
    detail: dict = field(default_factory=dict)


class FakeDriver(types.ModuleType):
    """The stand-in ``pycuda.driver`` module (see the module docstring)."""

    def __init__(self, capabilities=((8, 0),), peers=(), seed: int | None = None,
                 ptx_error: str | None = None, total_memory: int = 1 << 30, packed_launches: bool = True):
        super().__init__("pycuda.driver")
        self.capabilities = list(capabilities)
        self.peers = set(peers)                 # (a, b): device a can access device b's memory
        self.enabled: set[tuple[int, int]] = set()
        self.rng = random.Random(seed) if seed is not None else None
        self.ptx_error = ptx_error
        self.total_memory = total_memory
        self.log: list[Call] = []
        self.stack: list = []
        self.streams: list = []
        self.allocations: list[Allocation] = []
        self.pinned: list[Pinned] = []
        self._kept: list[np.ndarray] = []      # pinned arrays stay alive: their addresses stay theirs
        self.next_address = {d: (d + 1) << 36 for d in range(len(self.capabilities))}
        self.run_kernel: Callable[[str, list], None] = self._no_kernels
        self._driving: set = set()
        self._host_reads: list = []             # [host array, its contents when queued] per queued htod
        self._install(packed_launches)

    # -- inspection helpers for tests --------------------------------------------------
    def calls(self, *names: str, since: int = 0) -> list[Call]:
        return [c for c in self.log[since:] if c.name in names]

    def view(self, pointer: int, dtype, count: int) -> np.ndarray:
        """Device memory at `pointer` as `count` elements of `dtype` (writable)."""
        alloc, offset = self._find(int(pointer))
        nbytes = count * np.dtype(dtype).itemsize
        if offset + nbytes > alloc.memory.nbytes:
            raise ProtocolError(f"{nbytes} bytes at {pointer:#x} run past the end of their allocation")
        return alloc.memory[offset:offset + nbytes].view(dtype)

    def device_of(self, pointer: int) -> int:
        return self._find(int(pointer))[0].device

    def is_pinned(self, array: np.ndarray) -> bool:
        return self._pinned_of(array) is not None

    def drain(self) -> None:
        """Run everything still queued (a test's way to look at final device memory)."""
        for s in self.streams:
            self._drive_stream(s, len(s.queue))

    def pending(self) -> int:
        return sum(len(s.queue) for s in self.streams)

    @staticmethod
    def _no_kernels(name, args):
        raise ProtocolError(f"kernel {name} launched, but the test gave the stand-in no kernels")

    # -- bookkeeping ---------------------------------------------------------------------
    def _current(self):
        if not self.stack:
            raise ProtocolError("a driver call without a current context")
        return self.stack[-1]

    def _find(self, pointer: int) -> tuple[Allocation, int]:
        for a in self.allocations:
            if a.base <= pointer < a.base + a.memory.nbytes:
                return a, pointer - a.base
        raise ProtocolError(f"{pointer:#x} is not device memory")

    def _pinned_of(self, array: np.ndarray) -> Pinned | None:
        address = array.__array_interface__["data"][0]
        for p in self.pinned:
            if p.address <= address and address + array.nbytes <= p.address + p.nbytes:
                return p
        return None

    def _check_host(self, array: np.ndarray, stream, what: str) -> None:
        p = self._pinned_of(array)
        if p is None:
            raise ProtocolError(f"{what} from/to pageable host memory (not page-locked)")
        if p.device != stream.device and not p.flags & self.host_alloc_flags.PORTABLE:
            raise ProtocolError(f"{what}: page-locked memory of device {p.device}'s context used on device "
                                f"{stream.device} without PORTABLE")

    def _check_stream(self, stream, what: str):
        if stream is None:
            raise ProtocolError(f"{what} on the legacy default stream")
        ctx = self._current()
        if stream.device != ctx.device:
            raise ProtocolError(f"{what} on a stream of device {stream.device} while device {ctx.device}'s "
                                f"context is current")
        return ctx

    def _enqueue(self, stream, op) -> None:
        stream.queue.append(op)
        self._tick()

    def _tick(self) -> None:
        """With a seed: run a few ops whose waits are satisfied, on randomly chosen streams."""
        if self.rng is None:
            return
        for _ in range(self.rng.randrange(3)):
            ready = [s for s in self.streams if s.queue and self._ready(s.queue[0])]
            if not ready:
                return
            self._run_head(self.rng.choice(ready))

    @staticmethod
    def _ready(op) -> bool:
        return op[0] != "wait" or op[1].completed >= op[2]

    def _run_head(self, stream) -> None:
        op = stream.queue[0]
        if op[0] == "wait":
            if op[1].completed < op[2]:
                self._drive_event(op[1], op[2])
        else:
            op[1]()
        stream.queue.popleft()

    def _drive_stream(self, stream, count: int) -> None:
        if stream in self._driving:
            raise ProtocolError("streams wait for each other in a cycle: the work would never finish")
        self._driving.add(stream)
        try:
            for _ in range(min(count, len(stream.queue))):
                self._run_head(stream)
        finally:
            self._driving.discard(stream)

    def _drive_event(self, event, generation: int) -> None:
        while event.completed < generation:
            stream = event.where[generation]
            if not stream.queue:
                raise ProtocolError("an event's record vanished from its stream")
            self._drive_stream(stream, 1)

    # -- the module's contents ---------------------------------------------------------------
    def _install(self, packed_launches: bool) -> None:
        fake = self

        class Error(Exception):
            pass

        class LogicError(Error):
            pass

        self.Error, self.LogicError = Error, LogicError
        self.event_flags = types.SimpleNamespace(DEFAULT=0, BLOCKING_SYNC=1, DISABLE_TIMING=2)
        self.host_alloc_flags = types.SimpleNamespace(PORTABLE=1, DEVICEMAP=2, WRITECOMBINED=4)
        self.init = lambda flags=0: None

        class Context:
            def __init__(self, device):
                self.device = device

            def push(self):
                fake.stack.append(self)

            @staticmethod
            def pop():
                fake._current()
                fake.stack.pop()

            @staticmethod
            def get_current():
                return fake.stack[-1] if fake.stack else None

            @staticmethod
            def synchronize():
                ctx = fake._current()
                fake.log.append(Call("Context.synchronize", ctx.device))
                for s in fake.streams:
                    if s.device == ctx.device:
                        fake._drive_stream(s, len(s.queue))

            @staticmethod
            def enable_peer_access(peer, flags=0):
                a, b = fake._current().device, peer.device
                if (a, b) not in fake.peers:
                    raise LogicError("cuCtxEnablePeerAccess failed: peer access is not supported between "
                                     "these two devices")
                if (a, b) in fake.enabled:
                    raise LogicError("cuCtxEnablePeerAccess failed: peer access is already enabled")
                fake.enabled.add((a, b))
                fake.log.append(Call("enable_peer_access", a, detail={"peer": b}))

        self.Context = Context
        self._primary = {}

        class Device:
            def __init__(self, ordinal):
                if not 0 <= ordinal < len(fake.capabilities):
                    raise LogicError(f"cuDeviceGet failed: invalid device ordinal {ordinal}")
                self.ordinal = ordinal

            @staticmethod
            def count():
                return len(fake.capabilities)

            def compute_capability(self):
                return fake.capabilities[self.ordinal]

            def name(self):
                major, minor = fake.capabilities[self.ordinal]
                return f"Fake GPU sm_{major}{minor}"

            def total_memory(self):
                return fake.total_memory

            def can_access_peer(self, other):
                return (self.ordinal, other.ordinal) in fake.peers

            def retain_primary_context(self):
                fake.log.append(Call("retain_primary_context", self.ordinal))
                return fake._primary.setdefault(self.ordinal, Context(self.ordinal))

            def make_context(self, flags=0):
                raise ProtocolError("make_context: a context of its own instead of the primary context")

        self.Device = Device

        class Stream:
            def __init__(self, flags=0):
                self.device = fake._current().device
                self.queue: deque = deque()
                fake.streams.append(self)

            def synchronize(self):
                fake.log.append(Call("Stream.synchronize", self.device, self))
                fake._drive_stream(self, len(self.queue))

            def wait_for_event(self, event):
                fake._check_stream(self, "wait_for_event")
                if event.recorded == 0:
                    raise ProtocolError("a stream waits for an event that was never recorded (a no-op in CUDA)")
                fake.log.append(Call("wait", self.device, self, {"event": event, "generation": event.recorded}))
                fake._enqueue(self, ("wait", event, event.recorded))

        self.Stream = Stream

        class Event:
            def __init__(self, flags=0):
                self.device = fake._current().device
                self.flags = flags
                self.recorded = self.completed = 0
                self.where: dict[int, Any] = {}
                fake.log.append(Call("Event", self.device, detail={"flags": flags}))

            def record(self, stream=None):
                fake._check_stream(stream, "Event.record")
                if self.device != stream.device:
                    raise ProtocolError(f"an event of device {self.device} recorded on device {stream.device}")
                self.recorded += 1
                generation = self.recorded
                self.where[generation] = stream
                fake.log.append(Call("record", self.device, stream, {"event": self, "generation": generation}))

                def done():
                    self.completed = max(self.completed, generation)
                fake._enqueue(stream, ("record", done))
                return self

            def synchronize(self):
                fake.log.append(Call("Event.synchronize", self.device, detail={"event": self}))
                fake._drive_event(self, self.recorded)
                return self

            def query(self):
                return self.completed >= self.recorded

        self.Event = Event

        class DeviceAllocation:
            def __init__(self, base):
                self.base = base

            def __int__(self):
                return self.base

            __index__ = __int__

        def mem_alloc(nbytes):
            ctx = fake._current()
            base = fake.next_address[ctx.device]
            fake.next_address[ctx.device] += (nbytes + 255) // 256 * 256 + 256
            fake.allocations.append(Allocation(base, np.full(nbytes, GARBAGE, np.uint8), ctx.device))
            fake.log.append(Call("mem_alloc", ctx.device, detail={"bytes": nbytes}))
            return DeviceAllocation(base)

        def mem_get_info():
            fake._current()
            return fake.total_memory, fake.total_memory

        def pagelocked_empty(shape, dtype, order="C", mem_flags=0):
            ctx = fake._current()
            array = np.empty(shape, dtype)
            array.reshape(-1).view(np.uint8)[...] = GARBAGE
            fake.pinned.append(Pinned(array.__array_interface__["data"][0], array.nbytes, mem_flags, ctx.device))
            fake._kept.append(array)
            fake.log.append(Call("pagelocked_empty", ctx.device, detail={"bytes": array.nbytes,
                                                                          "flags": mem_flags}))
            return array

        def memset_d32_async(dest, data, size, stream=None):
            fake._check_stream(stream, "memset_d32_async")
            target = fake.view(int(dest), np.uint32, size)
            fake.log.append(Call("memset_d32_async", stream.device, stream, {"dest": int(dest)}))
            fake._enqueue(stream, ("memset", lambda: target.fill(data)))

        def memcpy_htod_async(dest, src, stream=None):
            fake._check_stream(stream, "memcpy_htod_async")
            fake._check_host(src, stream, "memcpy_htod_async")
            target = fake.view(int(dest), np.uint8, src.nbytes)
            pending = [src, np.array(src, copy=True), len(fake.log)]      # what the host meant to copy, when
            fake._host_reads.append(pending)

            def run():
                fake._host_reads[:] = [p for p in fake._host_reads if p is not pending]
                if not np.array_equal(src.view(np.uint8), pending[1].view(np.uint8)):
                    raise ProtocolError("a page-locked buffer was refilled before the copy from it ran")
                target[...] = src.reshape(-1).view(np.uint8)
            fake.log.append(Call("htod", stream.device, stream, {"dest": int(dest), "bytes": src.nbytes,
                                                                  "host": src}))
            fake._enqueue(stream, ("htod", run))

        def memcpy_dtoh_async(dest, src, stream=None):
            fake._check_stream(stream, "memcpy_dtoh_async")
            fake._check_host(dest, stream, "memcpy_dtoh_async")
            source = fake.view(int(src), np.uint8, dest.nbytes)
            dest.reshape(-1).view(np.uint8)[...] = GARBAGE    # what the host sees if it reads too early
            issued = len(fake.log)

            def run():
                for pending in fake._host_reads:
                    if np.shares_memory(pending[0], dest) and pending[2] < issued:
                        raise ProtocolError("a copy from the device overwrote page-locked memory that an "
                                            "earlier copy to a device had not read yet")
                dest.reshape(-1).view(np.uint8)[...] = source
                for pending in fake._host_reads:          # copies from here that come later read this
                    if np.shares_memory(pending[0], dest):
                        pending[1] = np.array(pending[0], copy=True)
            fake.log.append(Call("dtoh", stream.device, stream, {"src": int(src), "bytes": dest.nbytes}))
            fake._enqueue(stream, ("dtoh", run))

        def memcpy_dtod_async(dest, src, size, stream=None):
            ctx = fake._check_stream(stream, "memcpy_dtod_async")
            a_src, _ = fake._find(int(src))
            a_dst, _ = fake._find(int(dest))
            for other in {a_src.device, a_dst.device} - {ctx.device}:
                if (ctx.device, other) not in fake.enabled:
                    raise ProtocolError(f"a device-to-device copy between devices {ctx.device} and {other} "
                                        f"without peer access enabled")
            source, target = fake.view(int(src), np.uint8, size), fake.view(int(dest), np.uint8, size)
            fake.log.append(Call("dtod", stream.device, stream, {"src": int(src), "dest": int(dest),
                                                                  "bytes": size}))
            fake._enqueue(stream, ("dtod", lambda: target.__setitem__(Ellipsis, source)))

        def forbidden(name, why):
            def call(*args, **kwargs):
                raise ProtocolError(f"{name}: {why}")
            return call

        sync = "synchronous, on the legacy default stream: it waits for every stream of the context"
        for name in ("memcpy_htod", "memcpy_dtoh", "memcpy_dtod", "memset_d32"):
            setattr(self, name, forbidden(name, sync))
        for name in ("memcpy_peer", "memcpy_peer_async"):
            setattr(self, name, forbidden(name, "PyCUDA ignores the contexts passed to it"))

        class Function:
            def __init__(self, name, device):
                self.name, self.device = name, device
                self.arg_format = None

            def prepare(self, arg_types):
                self.arg_format = "".join(arg_types)
                fake.log.append(Call("prepare", self.device, detail={"kernel": self.name,
                                                                     "format": self.arg_format}))
                return self

            def __call__(self, *args, **kwargs):
                raise ProtocolError("an unprepared launch (PyCUDA builds its argument struct each call)")

            def prepared_async_call(self, grid, block, stream, *args, shared_size=0):
                if self.arg_format is None or len(self.arg_format) != len(args):
                    raise ProtocolError(f"{self.name}: {len(args)} arguments for format {self.arg_format!r}")
                for code, a in zip(self.arg_format, args):
                    fits = {"P": lambda v: isinstance(v, int) and not isinstance(v, (bool, np.integer)),
                            "f": lambda v: isinstance(v, (float, np.floating)),
                            "i": lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool)}[code](a)
                    if not fits:
                        raise ProtocolError(f"{self.name}: {a!r} passed as {code!r}")
                self._launch(grid, block, stream, list(args), "prepared_async_call")

            def _launch_kernel(self, grid, block, arg_buf, shared, stream):
                """What PyCUDA's launches end in: the packed struct, read back with the prepared format."""
                if self.arg_format is None:
                    raise ProtocolError(f"{self.name}: launched with a struct before prepare")
                if struct.calcsize(self.arg_format) != len(arg_buf):
                    raise ProtocolError(f"{self.name}: a struct of {len(arg_buf)} bytes for {self.arg_format!r}")
                self._launch(grid, block, stream, list(struct.unpack(self.arg_format, arg_buf)), "_launch_kernel")

            def _launch(self, grid, block, stream, args, how):
                fake._check_stream(stream, f"launch of {self.name}")
                if stream.device != self.device:
                    raise ProtocolError(f"{self.name} of device {self.device} launched on device {stream.device}")
                values = [Pointer(a) if code == "P" else a for code, a in zip(self.arg_format, args)]
                for v in values:
                    if isinstance(v, Pointer):
                        fake._find(v)
                fake.log.append(Call("launch", stream.device, stream, {"kernel": self.name, "grid": grid,
                                                                        "block": block, "how": how}))
                fake._enqueue(stream, ("launch", lambda: fake.run_kernel(self.name, values)))

        if not packed_launches:
            del Function._launch_kernel
        self.Function = Function

        class Module:
            def __init__(self, path, device):
                self.path, self.device = path, device

            def get_function(self, name):
                if fake._current().device != self.device:
                    raise ProtocolError("get_function outside the module's context")
                return Function(name, self.device)

        def module_from_file(filename):
            ctx = fake._current()
            fake.log.append(Call("module_from_file", ctx.device, detail={"path": str(filename)}))
            if str(filename).endswith(".ptx") and fake.ptx_error:
                raise LogicError(f"cuModuleLoad failed: {fake.ptx_error}")
            return Module(str(filename), ctx.device)

        for name, value in dict(mem_alloc=mem_alloc, mem_get_info=mem_get_info,
                                pagelocked_empty=pagelocked_empty, memset_d32_async=memset_d32_async,
                                memcpy_htod_async=memcpy_htod_async, memcpy_dtoh_async=memcpy_dtoh_async,
                                memcpy_dtod_async=memcpy_dtod_async, module_from_file=module_from_file,
                                DeviceAllocation=DeviceAllocation).items():
            setattr(self, name, value)


def install(monkeypatch, driver: FakeDriver) -> FakeDriver:
    """Make ``import pycuda.driver`` give `driver` (undone when the test ends)."""
    package = types.ModuleType("pycuda")
    package.driver = driver
    package.__path__ = []
    monkeypatch.setitem(__import__("sys").modules, "pycuda", package)
    monkeypatch.setitem(__import__("sys").modules, "pycuda.driver", driver)
    return driver
