"""The CUDA backend (PyCUDA, an optional extra: ``pip install cnnc[cuda]``).

Kept thin on purpose: it loads the cubin nvcc built for the device's
architecture (or JIT-compiles the .cu when none fits), and launches kernels
with the geometry codegen chose.  Everything above it is backend-neutral.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from cnnc.backends.base import DTYPES, Backend, BackendError
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
        if drv.Device.count() == 0:
            raise BackendError("no CUDA device found")
        self.drv = drv
        self.physical = physical
        ordinal = next(iter(set(physical.values())))
        if len(set(physical.values())) > 1:
            raise BackendError("the cuda backend runs all logical devices on one physical GPU for now; "
                               "repeat its id, e.g. --gpus " + ",".join([str(ordinal)] * len(physical)))
        self.dev = drv.Device(ordinal)
        self.ctx = self.dev.make_context()
        major, minor = self.dev.compute_capability()
        self.modules = {}
        for logical in physical:
            self.modules[logical] = self._load_module(build_dir, logical, major * 10 + minor)
        self.streams = {logical: drv.Stream() for logical in physical}
        self.events: dict[str, object] = {}
        self._functions: dict[tuple[int, str], object] = {}

    def _load_module(self, build_dir: Path, logical: int, cc: int):
        cubins = sorted(build_dir.glob(f"gpu{logical}.sm_*.cubin"),
                        key=lambda p: int(p.suffixes[-2][4:]), reverse=True)
        for cubin in cubins:
            if int(cubin.suffixes[-2][4:]) == cc:
                return self.drv.module_from_file(str(cubin))
        from pycuda.compiler import SourceModule
        source = (build_dir / f"gpu{logical}.cu").read_text()
        return SourceModule(source, no_extern_c=True, options=["-std=c++17"])

    def alloc(self, buffer: Buffer, device: int):
        mem = self.drv.mem_alloc(max(buffer.nbytes, 4))
        self.drv.memset_d32(mem, 0, max(buffer.size, 1))
        return mem

    def upload(self, handle, array: np.ndarray) -> None:
        self.synchronize()
        self.drv.memcpy_htod(handle, np.ascontiguousarray(array))

    def download(self, handle, buffer: Buffer) -> np.ndarray:
        self.synchronize()
        out = np.empty(buffer.size, DTYPES[buffer.dtype])
        self.drv.memcpy_dtoh(out, handle)
        return out

    def launch(self, kernel: Kernel, device: int, args: Sequence) -> None:
        key = (device, kernel.name)
        if key not in self._functions:
            self._functions[key] = self.modules[device].get_function(kernel.name)
        geo = kernel.launch["cuda"]
        cu_args = [np.float32(a) if isinstance(a, float) else a for a in args]
        self._functions[key](*cu_args, grid=tuple(geo["grid"]), block=tuple(geo["block"]),
                             stream=self.streams[device])

    def copy(self, src, src_device, src_offset, dst, dst_device, dst_offset, count) -> None:
        if count:
            self.drv.memcpy_dtod_async(int(dst) + 4 * dst_offset, int(src) + 4 * src_offset, 4 * count,
                                       self.streams[dst_device])

    def record(self, event: str, device: int) -> None:
        self.events[event] = self.drv.Event().record(self.streams[device])

    def wait(self, event: str, device: int) -> None:
        self.streams[device].wait_for_event(self.events[event])

    def synchronize(self) -> None:
        for stream in self.streams.values():
            stream.synchronize()

    def close(self) -> None:
        self.ctx.pop()

    def describe(self) -> str:
        return f"cuda ({self.dev.name()})"
