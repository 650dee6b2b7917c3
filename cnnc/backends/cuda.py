"""The CUDA backend (PyCUDA, an optional extra: ``pip install cnnc[cuda]``).

Kept thin on purpose: the executor decides what runs where and when; this
file only turns its calls into driver calls, in a way that lets the devices
run ahead of the host:

- one primary context per GPU (shared with any other CUDA library in the
  process), and per logical device three streams: the plan's ``compute`` and
  ``copy-in``, and ``copy-out`` for the device's reads back to the host;
- nothing in a training step waits for a whole device: the plan's events
  become CUDA events (without timing), host memory is page-locked, and the
  host waits only on the one event after a copy it needs (a download, or a
  staging buffer it wants to refill);
- minibatch uploads (on ``copy-in``) go through two page-locked buffers per
  destination, so the host fills batch k+1 while batch k is still copied;
- copies between GPUs go device to device where peer access is enabled, and
  otherwise through page-locked memory on the source GPU's ``copy-out``
  stream, ordered by events in both directions;
- each GPU loads the cubin of its major architecture with the highest minor
  not above its own, else lets the driver compile the build's PTX.
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from cnnc.backends.base import DTYPES, Backend, BackendError, DeviceMemory
from cnnc.plan.schedule import Buffer, Kernel

STREAMS = ("compute", "copy-in", "copy-out")     # copy-out: the backend's own, for reads to the host
CUBIN_RE = re.compile(r"gpu(\d+)\.(sm_(\d+)([af]?))\.cubin")


def cuda_usable() -> bool:
    """True when PyCUDA imports and at least one CUDA device answers."""
    try:
        import pycuda.driver as drv
        drv.init()
        return drv.Device.count() > 0
    except Exception:           # no PyCUDA, no driver, no device: all mean "not usable"
        return False


def pick_cubin(available: Iterable[str], device_cc: tuple[int, int]) -> str | None:
    """The architecture (e.g. ``sm_80``) among `available` whose cubin runs best on a device of
    compute capability `device_cc`: the same major version with the highest minor not above
    the device's (cubins run on later minors of their major), an ``a`` variant only on exactly
    its own capability; None when none can run there."""
    major, minor = device_cc
    best, best_key = None, None
    for arch in available:
        m = re.fullmatch(r"sm_(\d+)([af]?)", arch)
        if m is None:
            continue
        number, suffix = int(m.group(1)), m.group(2)
        a_major, a_minor = divmod(number, 10)
        if a_major != major or a_minor > minor or (suffix == "a" and a_minor != minor):
            continue
        key = (a_minor, "-fa".index(suffix or "-"))    # then prefer a > f > plain at one minor
        if best_key is None or key > best_key:
            best, best_key = arch, key
    return best


class DevicePointer(int):
    """A device address; its own type so that a launch passes it as a pointer, never as an int."""


# what each argument the executor passes becomes in a kernel's parameter struct
_ARG_CODES = {DevicePointer: "P", float: "f", np.float32: "f", np.float64: "f", np.int32: "i", int: "i"}


@dataclass
class _Lane:
    """One CUDA stream of a logical device; `busy`: work issued since the host last knew it done."""

    device: int
    name: str
    stream: Any
    fence: Any
    busy: bool = False


@dataclass
class _Slot:
    """A page-locked host buffer and the event after the last copy that used it."""

    host: Any
    done: Any
    pending: bool = False


@dataclass
class _Staging:
    """Page-locked memory between two GPUs without peer access, and its events: `inputs` marks
    what the destination stream waited for, `read` the source's copy into the buffer,
    `released` the destination's copy out of it."""

    host: Any
    inputs: Any
    read: Any
    released: Any
    used: bool = False


@dataclass
class _Launch:
    """What stays the same between launches of one kernel on one stream."""

    function: Any
    grid: tuple
    block: tuple
    lane: _Lane
    current: Any
    args: list | None = None
    codes: str = ""
    packed: bytes = b""


@dataclass
class _Loaded:
    module: Any
    how: str                              # for describe(): "sm_80 cubin", "PTX compiled by the driver", ...


class _Current:
    """Makes a context current for the calls inside `with` (push on entry, pop on exit)."""

    __slots__ = ("context", "drv")

    def __init__(self, context, drv):
        self.context, self.drv = context, drv

    def __enter__(self):
        self.context.push()

    def __exit__(self, *exc):
        self.drv.Context.pop()


class CudaBackend(Backend):
    name = "cuda"
    BOUNCE_BYTES = 8 << 20          # each of the two page-locked buffers per device for other transfers

    def __init__(self, build_dir: Path, physical: dict[int, int]):
        """`physical` maps each logical device of the plan to a CUDA device ordinal."""
        try:
            import pycuda.driver as drv
        except ImportError:
            raise BackendError("the cuda backend needs PyCUDA: pip install 'cnnc[cuda]'") from None
        drv.init()
        count = drv.Device.count()
        bad = sorted({o for o in physical.values() if o >= count})
        if bad:
            raise BackendError(f"--gpus names CUDA device {bad[0]}, but only {count} device(s) are present")
        self.drv = drv
        self.physical = dict(physical)
        self._no_timing = drv.event_flags.DISABLE_TIMING
        self.contexts = {o: drv.Device(o).retain_primary_context() for o in sorted(set(physical.values()))}
        self._current = {o: _Current(c, drv) for o, c in self.contexts.items()}
        self.peer = self._enable_peer_access()
        self.lanes: dict[tuple[int, str], _Lane] = {}
        self.loaded: dict[int, _Loaded] = {}
        for logical, ordinal in self.physical.items():
            with self._current[ordinal]:
                self.loaded[logical] = self._load_module(Path(build_dir), logical, ordinal)
                for name in STREAMS:
                    self.lanes[(logical, name)] = _Lane(logical, name, drv.Stream(), self._event())
        self._hub = self.lanes[(min(self.physical), "compute")]
        self._events: dict[tuple[str, int], Any] = {}      # (plan event, logical device) -> its CUDA event
        self._latest: dict[str, Any] = {}                  # plan event -> the CUDA event last recorded
        self._launches: dict[tuple[int, str, str], _Launch] = {}
        # PyCUDA's prepared calls pack the arguments and set the block shape again at every
        # launch; its Function._launch_kernel (what they end in) takes a struct packed once
        self._launch_packed = hasattr(drv.Function, "_launch_kernel")
        self._allocations: dict[int, tuple[Any, int, int]] = {}   # pointer -> (allocation, device, bytes)
        self._uploads: dict[int, list] = {}                # destination pointer -> [next slot, slot, slot]
        self._bounce: dict[int, list] = {}                 # logical device -> [next slot, slot, slot]
        self._staging: dict[tuple[int, int], list] = {}    # (src, dst logical) -> [next, staging, staging]

    # -- contexts, peers, modules -------------------------------------------------
    def _on(self, logical: int) -> _Current:
        return self._current[self.physical[logical]]

    def _event(self):
        """An event without timing (cheaper to record and wait for); the current context's."""
        return self.drv.Event(self._no_timing)

    def _enable_peer_access(self) -> set[tuple[int, int]]:
        """(a, b) for every pair of GPUs where a may read b's memory, enabling it where allowed;
        access another library already enabled in the shared primary context counts too."""
        enabled = set()
        for a in self.contexts:
            for b, ctx_b in self.contexts.items():
                if a == b or not self.drv.Device(a).can_access_peer(self.drv.Device(b)):
                    continue
                with self._current[a]:
                    try:
                        self.drv.Context.enable_peer_access(ctx_b)
                    except self.drv.Error as e:
                        if "already enabled" not in str(e):
                            continue                      # refused: copies between them are staged
                enabled.add((a, b))
        return enabled

    def _load_module(self, build_dir: Path, logical: int, ordinal: int) -> _Loaded:
        """The cubin that fits the GPU best, else the build's PTX compiled by the driver, else
        (only where nvcc is at hand) the source compiled now."""
        device = self.drv.Device(ordinal)
        cc = device.compute_capability()
        arch = f"sm_{cc[0]}{cc[1]}"
        cubins = {m.group(2): f for f in build_dir.glob(f"gpu{logical}.sm_*.cubin")
                  if (m := CUBIN_RE.fullmatch(f.name)) and int(m.group(1)) == logical}
        chosen = pick_cubin(cubins, cc)
        if chosen is not None:
            return _Loaded(self.drv.module_from_file(str(cubins[chosen])), f"{chosen} cubin")
        ptx = build_dir / f"gpu{logical}.ptx"
        if ptx.is_file():
            try:
                return _Loaded(self.drv.module_from_file(str(ptx)), "PTX compiled by the driver")
            except self.drv.Error as e:
                raise BackendError(f"the CUDA driver cannot compile {ptx} for {device.name()} ({arch}): "
                                   f"{str(e).strip().splitlines()[0]}; update the driver, or recompile with "
                                   f"--arch {arch}") from None
        from cnnc.codegen.nvcc import find_nvcc
        has = ", ".join(sorted(cubins)) or "none"
        if find_nvcc() is None:
            raise BackendError(f"{build_dir} has no cubin for {device.name()} ({arch}; cubins: {has}) and no "
                               f"PTX; recompile with nvcc and --arch {arch}")
        from pycuda.compiler import SourceModule
        source = (build_dir / f"gpu{logical}.cu").read_text()
        return _Loaded(SourceModule(source, no_extern_c=True, options=["-std=c++17"]), "compiled by nvcc now")

    # -- memory ---------------------------------------------------------------------
    def memory(self, device: int) -> DeviceMemory:
        """What the GPU has free now (other processes may hold the rest); one buffer may take all of it."""
        ordinal = self.physical[device]
        with self._on(device):
            free, _ = self.drv.mem_get_info()
        return DeviceMemory(ordinal, f"GPU {ordinal}, {self.drv.Device(ordinal).name()}", free, free)

    def alloc(self, buffer: Buffer, device: int) -> DevicePointer:
        nbytes = max(buffer.nbytes, 4)
        lane = self.lanes[(device, "compute")]
        with self._on(device):
            mem = self.drv.mem_alloc(nbytes)
            self.drv.memset_d32_async(mem, 0, nbytes // 4, lane.stream)
        lane.busy = True
        pointer = DevicePointer(int(mem))
        self._allocations[pointer] = (mem, device, nbytes)
        return pointer

    def _pinned(self, nbytes: int, portable: bool = False) -> np.ndarray:
        flags = self.drv.host_alloc_flags.PORTABLE if portable else 0
        return self.drv.pagelocked_empty(max(nbytes, 4), np.uint8, mem_flags=flags)

    @staticmethod
    def _ready(slot: _Slot) -> None:
        """Wait (host side) until the copy that last used the slot is done."""
        if slot.pending:
            slot.done.synchronize()
            slot.pending = False

    def _next_slot(self, ring: list, device: int, nbytes: int) -> _Slot:
        """The ring's next slot, ready for `nbytes`; a ring is [index of next, slot, slot]."""
        index = ring[0]
        ring[0] = 3 - index
        slot = ring[index]
        if slot is None or slot.host.nbytes < nbytes:
            if slot is not None:
                self._ready(slot)                 # the old memory is freed: nothing may still read it
            with self._on(device):
                slot = ring[index] = _Slot(self._pinned(nbytes), self._event())
        self._ready(slot)
        return slot

    @staticmethod
    def _bytes(array: np.ndarray) -> np.ndarray:
        array = np.ascontiguousarray(array)
        if array.dtype.itemsize != 4:
            raise BackendError(f"cannot upload {array.dtype} values: device buffers hold 4-byte elements")
        return array.reshape(-1).view(np.uint8)

    def upload(self, handle, array: np.ndarray, stream: str = "compute", offset: int = 0) -> None:
        """Asynchronous on `stream`.  On copy-in (a minibatch, every step) through two page-locked
        buffers of the destination's own; otherwise through the device's two bounce buffers."""
        _, device, size = self._allocations[int(handle)]
        data = self._bytes(array)
        if 4 * offset + data.nbytes > size:
            raise BackendError(f"an upload of {data.nbytes} bytes at byte {4 * offset} into a buffer of {size}")
        handle = int(handle) + 4 * offset
        lane = self.lanes[(device, stream)]
        if stream == "copy-in":
            slot = self._next_slot(self._uploads.setdefault(int(handle), [1, None, None]), device, data.nbytes)
            self._to_device(slot, handle, data, lane)
            return
        for start in range(0, data.nbytes, self.BOUNCE_BYTES):
            piece = data[start:start + self.BOUNCE_BYTES]
            slot = self._next_slot(self._bounce.setdefault(device, [1, None, None]), device, self.BOUNCE_BYTES)
            self._to_device(slot, int(handle) + start, piece, lane)

    def _to_device(self, slot: _Slot, pointer: int, data: np.ndarray, lane: _Lane) -> None:
        host = slot.host[:data.nbytes]
        host[...] = data
        with self._on(lane.device):
            self.drv.memcpy_htod_async(pointer, host, lane.stream)
            slot.done.record(lane.stream)
        slot.pending = lane.busy = True

    def download(self, handle, buffer: Buffer) -> np.ndarray:
        """The buffer after everything issued so far on its device: the device's copy-out stream
        waits for its other streams, copies through the bounce buffers, and the host waits on
        the event after each piece."""
        _, device, _ = self._allocations[int(handle)]
        out = np.empty(buffer.size, DTYPES[buffer.dtype])
        result = out.view(np.uint8)
        if not result.nbytes:
            return out
        reader = self.lanes[(device, "copy-out")]
        with self._on(device):
            for name in ("compute", "copy-in"):
                lane = self.lanes[(device, name)]
                if lane.busy:
                    lane.fence.record(lane.stream)
                    reader.stream.wait_for_event(lane.fence)
        pieces = []
        for start in range(0, result.nbytes, self.BOUNCE_BYTES):
            n = min(self.BOUNCE_BYTES, result.nbytes - start)
            slot = self._next_slot(self._bounce.setdefault(device, [1, None, None]), device, self.BOUNCE_BYTES)
            with self._on(device):
                self.drv.memcpy_dtoh_async(slot.host[:n], int(handle) + start, reader.stream)
                slot.done.record(reader.stream)
            slot.pending = True
            pieces.append((slot, start, n))
            if len(pieces) == 2:                  # copy the previous piece out while this one runs
                self._collect(pieces.pop(0), result)
        for piece in pieces:
            self._collect(piece, result)
        for name in STREAMS:                      # all they had been given before is done now
            self.lanes[(device, name)].busy = False
        return out

    def _collect(self, piece: tuple, result: np.ndarray) -> None:
        slot, start, n = piece
        self._ready(slot)
        result[start:start + n] = slot.host[:n]

    # -- kernels and copies ---------------------------------------------------------
    def launch(self, kernel: Kernel, device: int, args: Sequence, stream: str = "compute") -> None:
        """Prepared once per kernel and stream; the argument struct is packed again only when the
        arguments differ from the last launch's (with every scalar in a device buffer, never)."""
        key = (device, kernel.name, stream)
        launch = self._launches.get(key)
        if launch is None:
            launch = self._launches[key] = self._prepare(kernel, device, stream)
        if launch.args != args:
            self._pack(launch, kernel, list(args))
        with launch.current:
            if self._launch_packed:
                launch.function._launch_kernel(launch.grid, launch.block, launch.packed, 0, launch.lane.stream)
            else:
                launch.function.prepared_async_call(launch.grid, launch.block, launch.lane.stream, *launch.args)
        launch.lane.busy = True

    @staticmethod
    def _pack(launch: _Launch, kernel: Kernel, args: list) -> None:
        """The parameter struct of `args`, laid out as PyCUDA's prepared calls lay it out (native
        alignment); each argument's kind follows its Python type."""
        try:
            codes = "".join(_ARG_CODES[type(a)] for a in args)
        except KeyError:
            bad = next(type(a) for a in args if type(a) not in _ARG_CODES)
            raise BackendError(f"kernel {kernel.name}: cannot pass a {bad.__name__} argument") from None
        if codes != launch.codes:
            launch.function.prepare(codes)
            launch.codes = codes
        launch.packed = struct.pack(codes, *args)
        launch.args = args

    def _prepare(self, kernel: Kernel, device: int, stream: str) -> _Launch:
        geo = kernel.launch["cuda"]
        with self._on(device):
            function = self.loaded[device].module.get_function(kernel.name)
        return _Launch(function, tuple(geo["grid"]), tuple(geo["block"]), self.lanes[(device, stream)],
                       self._on(device))

    def copy(self, src, src_device, src_offset, dst, dst_device, dst_offset, count, stream="copy-in") -> None:
        if not count:
            return
        nbytes = 4 * count
        src_ptr, dst_ptr = int(src) + 4 * src_offset, int(dst) + 4 * dst_offset
        a, b = self.physical[src_device], self.physical[dst_device]
        lane = self.lanes[(dst_device, stream)]
        if a == b or (b, a) in self.peer:         # one address space: the copy engine reads the source
            with self._on(dst_device):
                self.drv.memcpy_dtod_async(dst_ptr, src_ptr, nbytes, lane.stream)
            lane.busy = True
        else:
            self._staged_copy(src_ptr, src_device, dst_ptr, lane, nbytes)

    def _staged_copy(self, src_ptr: int, src_device: int, dst_ptr: int, lane: _Lane, nbytes: int) -> None:
        """Through page-locked memory: the source device's copy-out stream reads once the
        destination stream's inputs are ready (and the buffer's last copy out of it is done),
        and the destination stream writes once that read is done."""
        reader = self.lanes[(src_device, "copy-out")]
        ring = self._staging.setdefault((src_device, lane.device), [1, None, None])
        index = ring[0]
        ring[0] = 3 - index
        staging = ring[index]
        if staging is None or staging.host.nbytes < nbytes:
            if staging is not None and staging.used:
                staging.released.synchronize()    # the old memory is freed: nothing may still read it
            with self._on(lane.device):
                inputs, released = self._event(), self._event()
            with self._on(src_device):
                read = self._event()
                host = self._pinned(nbytes, portable=True)     # both GPUs' contexts use it
            staging = ring[index] = _Staging(host, inputs, read, released)
        host = staging.host[:nbytes]
        with self._on(lane.device):
            staging.inputs.record(lane.stream)
        with self._on(src_device):
            reader.stream.wait_for_event(staging.inputs)
            if staging.used:
                reader.stream.wait_for_event(staging.released)
            self.drv.memcpy_dtoh_async(host, src_ptr, reader.stream)
            staging.read.record(reader.stream)
        with self._on(lane.device):
            lane.stream.wait_for_event(staging.read)
            self.drv.memcpy_htod_async(dst_ptr, host, lane.stream)
            staging.released.record(lane.stream)
        staging.used = reader.busy = lane.busy = True

    # -- ordering -------------------------------------------------------------------
    def record(self, event: str, device: int, stream: str = "compute") -> None:
        lane = self.lanes[(device, stream)]
        with self._on(device):
            cuda_event = self._events.get((event, device))
            if cuda_event is None:
                cuda_event = self._events[(event, device)] = self._event()
            cuda_event.record(lane.stream)
        self._latest[event] = cuda_event

    def wait(self, event: str, device: int, stream: str = "compute") -> None:
        cuda_event = self._latest.get(event)
        if cuda_event is None:
            raise BackendError(f"logical device {device} waits for event {event!r}, which was never recorded")
        with self._on(device):
            self.lanes[(device, stream)].stream.wait_for_event(cuda_event)

    def begin_run(self) -> None:
        """Every stream waits, on the device, for what every busy stream was given before: the
        plan orders ops within one run only.  Costs nothing once the host has read results
        from every device (their streams are then known idle)."""
        busy = [lane for lane in self.lanes.values() if lane.busy]
        if not busy:
            return
        hub = self._hub
        for lane in busy:
            with self._on(lane.device):
                lane.fence.record(lane.stream)
        with self._on(hub.device):
            for lane in busy:
                if lane is not hub:
                    hub.stream.wait_for_event(lane.fence)
            hub.fence.record(hub.stream)
        for lane in self.lanes.values():
            if lane is not hub:
                with self._on(lane.device):
                    lane.stream.wait_for_event(hub.fence)
        hub.busy = True

    def synchronize(self) -> None:
        """Wait until everything issued on every stream is done (one event per busy stream)."""
        busy = [lane for lane in self.lanes.values() if lane.busy]
        for lane in busy:
            with self._on(lane.device):
                lane.fence.record(lane.stream)
        for lane in busy:
            lane.fence.synchronize()
            lane.busy = False

    def describe(self) -> str:
        gpus = []
        for ordinal in self.contexts:
            how = sorted({self.loaded[l].how for l, o in self.physical.items() if o == ordinal})
            gpus.append(f"{self.drv.Device(ordinal).name()}: {', '.join(how)}")
        n = len(self.contexts)
        peers = f"; peer access on {len(self.peer)} of {n * (n - 1)} pairs" if n > 1 else ""
        return f"cuda ({'; '.join(gpus)}{peers})"
