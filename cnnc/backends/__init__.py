"""Backends behind one small interface (see base.py): cuda, opencl, reference."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from cnnc.backends.base import Backend, BackendError
from cnnc.plan.schedule import Plan

BACKENDS = ("cuda", "opencl", "reference")


def default_backend() -> str:
    """cuda when PyCUDA and a GPU are usable, else opencl."""
    from cnnc.backends.cuda import cuda_usable
    return "cuda" if cuda_usable() else "opencl"


def make_backend(name: str, plan: Plan, build_dir: Path, gpus: Sequence[int]) -> Backend:
    """A ready backend for the plan; `gpus[i]` is the physical device of logical device i."""
    logical = plan.devices
    missing = [l for l in logical if l >= len(gpus)]
    if missing:
        raise BackendError(f"the plan uses logical device {missing[0]} but --gpus lists only {len(gpus)} "
                           f"device(s); give at least {max(logical) + 1}, e.g. --gpus "
                           + ",".join(str(i) for i in range(max(logical) + 1)))
    if name == "reference":
        from cnnc.backends.reference import ReferenceBackend
        return ReferenceBackend()
    if name == "opencl":
        from cnnc.backends.opencl import OpenCLBackend
        from cnnc.codegen.render import plan_cpu_width
        sources = {}
        for l in logical:
            f = Path(build_dir) / f"gpu{l}.cl"
            if not f.is_file():
                raise BackendError(f"{f} is missing; recompile with cnnc compile")
            sources[l] = f.read_text()
        cpu_files = {l: Path(build_dir) / f"gpu{l}.cpu.cl" for l in logical}
        cpu_sources = {l: f.read_text() for l, f in cpu_files.items()} if all(
            f.is_file() for f in cpu_files.values()) else None
        return OpenCLBackend(sources, logical, {l: gpus[l] for l in logical}, cpu_sources,
                             plan_cpu_width(plan.kernels.values()))
    if name == "cuda":
        from cnnc.backends.cuda import CudaBackend
        return CudaBackend(Path(build_dir), {l: gpus[l] for l in logical})
    raise BackendError(f"unknown backend '{name}' (choose from {', '.join(BACKENDS)})")
