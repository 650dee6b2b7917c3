"""The CUDA backend (PyCUDA, an optional extra: ``pip install cnnc[cuda]``).

Kept thin on purpose: everything above it is backend-neutral.  It keeps a
context per physical GPU, a compute and a copy-in stream per logical device, loads the cubin nvcc
built for each GPU's architecture (JIT-compiling the .cu when none fits),
and copies between logical devices with, in order of preference: a plain
device copy (same GPU), a peer-to-peer copy (peer access is checked for every
pair of GPUs and enabled where possible), or a copy staged through pinned
host memory.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from cnnc.backends.base import DTYPES, Backend, BackendError, DeviceMemory
from cnnc.plan.schedule import Buffer, Kernel


def cuda_usable() -> bool:
    """True when PyCUDA imports and at least one CUDA device answers."""
    try:
        import pycuda.driver as drv
        drv.init()
        return drv.Device.count() > 0
    except Exception:           # no PyCUDA, no driver, no device: all mean "not usable"
        return False


class CudaBackend(Backend):
    name = "cuda"

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
        self.physical = physical
        self.contexts = {}
        for ordinal in sorted(set(physical.values())):
            ctx = drv.Device(ordinal).make_context()
            ctx.pop()
            self.contexts[ordinal] = ctx
        self.peer = self._enable_peer_access()
        self.modules, self.streams = {}, {}
        for logical, ordinal in physical.items():
            with self._on(logical):
                major, minor = drv.Device(ordinal).compute_capability()
                self.modules[logical] = self._load_module(Path(build_dir), logical, major * 10 + minor)
                for stream in ("compute", "copy-in"):      # copies run beside compute
                    self.streams[(logical, stream)] = drv.Stream()
        self.events: dict[str, object] = {}
        self._functions: dict[tuple[int, str], object] = {}
        self._staging: dict[int, np.ndarray] = {}
        self._device_of: dict[int, int] = {}

    # -- contexts, peers, modules -------------------------------------------------
    def _on(self, logical: int):
        backend = self

        class _Context:
            def __enter__(self):
                backend.contexts[backend.physical[logical]].push()

            def __exit__(self, *exc):
                backend.drv.Context.pop()
        return _Context()

    def _enable_peer_access(self) -> set[tuple[int, int]]:
        """Check every ordered pair of GPUs; enable peer access where the hardware allows it."""
        enabled = set()
        for a, ctx_a in self.contexts.items():
            for b, ctx_b in self.contexts.items():
                if a == b or not self.drv.Device(a).can_access_peer(self.drv.Device(b)):
                    continue
                ctx_a.push()
                try:
                    self.drv.Context.enable_peer_access(ctx_b)
                    enabled.add((a, b))
                except self.drv.Error:
                    pass                   # already enabled, or refused: fall back to staging
                finally:
                    self.drv.Context.pop()
        return enabled

    def _load_module(self, build_dir: Path, logical: int, cc: int):
        cubin = build_dir / f"gpu{logical}.sm_{cc}.cubin"
        if cubin.is_file():
            return self.drv.module_from_file(str(cubin))
        from pycuda.compiler import SourceModule
        source = (build_dir / f"gpu{logical}.cu").read_text()
        return SourceModule(source, no_extern_c=True, options=["-std=c++17"])

    # -- the Backend primitives ------------------------------------------------------
    def memory(self, device: int) -> DeviceMemory:
        """What the GPU has free now (other processes may hold the rest); one buffer may take all of it."""
        ordinal = self.physical[device]
        with self._on(device):
            free, _ = self.drv.mem_get_info()
        name = f"GPU {ordinal}, {self.drv.Device(ordinal).name()}"
        return DeviceMemory(ordinal, name, free, free)

    def alloc(self, buffer: Buffer, device: int):
        with self._on(device):
            mem = self.drv.mem_alloc(max(buffer.nbytes, 4))
            self.drv.memset_d32(mem, 0, max(buffer.size, 1))
        self._device_of[int(mem)] = device
        return mem

    def upload(self, handle, array: np.ndarray, stream: str = "compute") -> None:
        """Synchronous, whatever `stream` the plan names: waits for every stream, then copies
        from pageable host memory, so an upload does not overlap compute."""
        self.synchronize()
        with self._on(self._device_of[int(handle)]):
            self.drv.memcpy_htod(handle, np.ascontiguousarray(array))

    def download(self, handle, buffer: Buffer) -> np.ndarray:
        self.synchronize()
        out = np.empty(buffer.size, DTYPES[buffer.dtype])
        with self._on(self._device_of[int(handle)]):
            self.drv.memcpy_dtoh(out, handle)
        return out

    def launch(self, kernel: Kernel, device: int, args: Sequence, stream: str = "compute") -> None:
        key = (device, kernel.name)
        if key not in self._functions:
            self._functions[key] = self.modules[device].get_function(kernel.name)
        geo = kernel.launch["cuda"]
        cu_args = [np.float32(a) if isinstance(a, float) else a for a in args]
        with self._on(device):
            self._functions[key](*cu_args, grid=tuple(geo["grid"]), block=tuple(geo["block"]),
                                 stream=self.streams[(device, stream)])

    def copy(self, src, src_device, src_offset, dst, dst_device, dst_offset, count, stream="copy-in") -> None:
        if not count:
            return
        nbytes = 4 * count
        src_ptr, dst_ptr = int(src) + 4 * src_offset, int(dst) + 4 * dst_offset
        a, b = self.physical[src_device], self.physical[dst_device]
        stream = self.streams[(dst_device, stream)]
        with self._on(dst_device):
            if a == b:
                self.drv.memcpy_dtod_async(dst_ptr, src_ptr, nbytes, stream)
            elif (b, a) in self.peer:
                self.drv.memcpy_peer_async(dst_ptr, src_ptr, nbytes, self.contexts[b], self.contexts[a], stream)
            else:                              # no peer path: through pinned host memory
                self.synchronize()
                host = self._pinned(count)
                self.drv.memcpy_dtoh(host[:count], src_ptr)
                self.drv.memcpy_htod(dst_ptr, host[:count])

    def _pinned(self, count: int) -> np.ndarray:
        buf = self._staging.get(0)
        if buf is None or buf.size < count:
            buf = self.drv.pagelocked_empty(count, np.float32)
            self._staging[0] = buf
        return buf

    def record(self, event: str, device: int, stream: str = "compute") -> None:
        with self._on(device):
            self.events[event] = self.drv.Event().record(self.streams[(device, stream)])

    def wait(self, event: str, device: int, stream: str = "compute") -> None:
        with self._on(device):
            self.streams[(device, stream)].wait_for_event(self.events[event])

    def synchronize(self) -> None:
        for (logical, _), stream in self.streams.items():
            with self._on(logical):
                stream.synchronize()

    def describe(self) -> str:
        names = sorted({self.drv.Device(o).name() for o in self.contexts})
        peers = f", peer access on {len(self.peer)} of {len(self.contexts) * (len(self.contexts) - 1)} pairs" \
            if len(self.contexts) > 1 else ""
        return f"cuda ({', '.join(names)}{peers})"
