"""Dialects: the few spellings in which CUDA C++ and OpenCL C differ.

Templates are written once against a dialect object, tinygrad-style; a new
target is a new row here, not a new set of templates.  Tile shapes differ by
target too (a GPU wants 256 threads of 4x4 register tiles, PoCL on a CPU
wants fewer, fatter work-items), so each dialect carries its GEMM defaults.
Templates and neuron expressions name C's math functions through
`Dialect.math`, so each target gets its own spelling of them.
"""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Dialect:
    name: str                    # "cuda" | "opencl" | "opencl-cpu"
    extension: str
    prelude: str                 # file under runtime/
    kernel: str                  # qualifier(s) before `void name(...)`
    global_ptr: str              # address-space qualifier of a device pointer
    restrict: str
    shared: str                  # address space of work-group memory
    barrier: str
    unroll: str
    # GEMM tiling defaults for this target: block tile, thread tile, K step
    gemm_block: tuple[int, int, int]
    gemm_thread: tuple[int, int]
    threads_1d: int              # work-group size of element-wise kernels
    reduce_threads: int          # work-group size of reductions (power of two)
    float_suffix: str            # single-precision math is C's function name with this suffix
    # floats per OpenCL vector of the CPU-shaped kernels (0: this dialect has none); see opencl_cpu
    vector_width: int = 0
    # the 64-bit signed integer of kernels that index past 2^31-1 (cnnc.codegen.render.index_type)
    int64: str = "long long"
    # reinterprets an int's bits as a float: how kernels read float step scalars
    int_as_float: str = "__int_as_float"
    # whether mma.sync runs natively (CUDA, sm_80+); elsewhere templates/mma_gemm.j2 emulates the
    # fragment operations through work-group memory, so the tensor-core tiling runs on any device
    tensor_cores: bool = False

    def math(self, name: str) -> str:
        """This target's single-precision spelling of C math function `name` (exp, fmax, ...):
        CUDA's overloads for float exist in C++ only as expf, fmaxf, ...; OpenCL's are generic."""
        return name + self.float_suffix

    def local_id(self, dim: int) -> str:
        return f"threadIdx.{'xyz'[dim]}" if self.name == "cuda" else f"(int)get_local_id({dim})"

    def group_id(self, dim: int, type: str = "int") -> str:
        """The work-group index as a value of `type`, the kernel's index type: cast before any
        product, since blockIdx * blockDim in unsigned 32 bits wraps past 2^32."""
        if self.name == "cuda":
            return f"blockIdx.{'xyz'[dim]}" if type == "int" else f"({type})blockIdx.{'xyz'[dim]}"
        return f"({type})get_group_id({dim})"

    def launch_bounds(self, threads: int) -> str:
        if self.name == "cuda":
            return f"__launch_bounds__({threads}) "
        return f"__attribute__((reqd_work_group_size({threads}, 1, 1))) "

    def ptr(self, const: bool = False) -> str:
        """The parameter type of a float buffer: `const float* __restrict__` / `__global const float* restrict`."""
        q = f"{self.global_ptr} " if self.global_ptr else ""
        return f"{q}{'const ' if const else ''}float* {self.restrict} "

    def int_ptr(self, const: bool = True) -> str:
        q = f"{self.global_ptr} " if self.global_ptr else ""
        return f"{q}{'const ' if const else ''}int* {self.restrict} "


CUDA = Dialect(
    name="cuda", extension="cu", prelude="cnnc_cuda.h",
    kernel='extern "C" __global__ void', global_ptr="", restrict="__restrict__",
    shared="__shared__", barrier="__syncthreads();", unroll="#pragma unroll",
    gemm_block=(64, 64, 16), gemm_thread=(4, 4), threads_1d=256, reduce_threads=256, float_suffix="f",
    tensor_cores=True,
)

OPENCL = Dialect(
    name="opencl", extension="cl", prelude="cnnc_opencl.h",
    kernel="__kernel void", global_ptr="__global", restrict="restrict",
    shared="__local", barrier="barrier(CLK_LOCAL_MEM_FENCE);", unroll="#pragma unroll",
    gemm_block=(64, 128, 16), gemm_thread=(8, 16), threads_1d=64, reduce_threads=64, float_suffix="",
    int64="long", int_as_float="as_float",
)

DIALECTS = {d.name: d for d in (CUDA, OPENCL)}

# The OpenCL target of CPU devices: OpenCL's spellings, and for the ops that have one a kernel
# shaped for a CPU (templates/cpu_gemm.j2, cnnc.codegen.render.cpu_kernel), written to
# gpu<k>.cpu.cl beside gpu<k>.cl with its launches under this name in plan.json.
CPU_WIDTHS = (16, 8, 4)
OPENCL_CPU_NAME = "opencl-cpu"


def opencl_cpu(width: int) -> Dialect:
    """The CPU target with vectors of `width` floats, a compile-time choice (cnnc compile
    --cpu-width) since the register blocks are written out for it."""
    if width not in CPU_WIDTHS:
        raise ValueError(f"CPU vector width {width}: choose {', '.join(map(str, CPU_WIDTHS))}")
    return replace(OPENCL, name=OPENCL_CPU_NAME, extension="cpu.cl", vector_width=width)


# The fields of a dialect that decide launch geometry rather than spelling
TILING_FIELDS = ("gemm_block", "gemm_thread", "threads_1d", "reduce_threads")


def with_tiles_of(dialect: Dialect, target: Dialect) -> Dialect:
    """`dialect`'s spellings with `target`'s tiling: OpenCL with CUDA's tiles runs the tile
    configuration of the CUDA kernels on any OpenCL device (PoCL on a CPU), so that tiling is
    tested on machines without an NVIDIA GPU."""
    return replace(dialect, **{field: getattr(target, field) for field in TILING_FIELDS})
