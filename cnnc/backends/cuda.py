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
            raise BackendError("this version of cnnc runs on one physical CUDA device at a time")
        self.dev = drv.Device(ordinal)
        self.ctx = self.dev.make_context()
        major, minor = self.dev.compute_capability()
        self.modules = {}
        for logical in physical:
            self.modules[logical] = self._load_module(build_dir, logical, major * 10 + minor)
        self.stream = drv.Stream()
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
        self.drv.memcpy_htod(handle, np.ascontiguousarray(array))

    def download(self, handle, buffer: Buffer) -> np.ndarray:
        out = np.empty(buffer.size, DTYPES[buffer.dtype])
        self.drv.memcpy_dtoh(out, handle)
        return out

    def launch(self, kernel: Kernel, device: int, args: Sequence) -> None:
        key = (device, kernel.name)
        if key not in self._functions:
            self._functions[key] = self.modules[device].get_function(kernel.name)
        geo = kernel.launch["cuda"]
        cu_args = [np.float32(a) if isinstance(a, float) else a for a in args]
        self._functions[key](*cu_args, grid=tuple(geo["grid"]), block=tuple(geo["block"]), stream=self.stream)

    def synchronize(self) -> None:
        self.stream.synchronize()

    def close(self) -> None:
        self.ctx.pop()

    def describe(self) -> str:
        return f"cuda ({self.dev.name()})"
