"""The one Philox-4x32-10 in runtime/cnnc_rng.h, built against each dialect's prelude,
gives the generator's published known answers: on OpenCL (PoCL on this CPU), on CUDA
where a GPU is present, and it compiles with nvcc where nvcc is.  The preludes define
every macro the header uses, so neither dialect can drift from the other."""
from __future__ import annotations

import re
import subprocess

import numpy as np
import pytest

from cnnc.backends.cuda import cuda_usable
from cnnc.codegen.nvcc import find_nvcc
from cnnc.resources import resource_dir

RUNTIME = resource_dir("runtime")
HEADER = (RUNTIME / "cnnc_rng.h").read_text()

# (counter, key) -> the four output words, from the Random123 distribution's known answers
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8)),
    ((0xffffffff,) * 4, (0xffffffff,) * 2, (0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd)),
    ((0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), (0xa4093822, 0x299f31d0),
     (0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1)),
]
INPUTS = np.array([c + k for c, k, _ in KNOWN_ANSWERS], np.uint32).reshape(-1)
WANT = np.array([w for _, _, w in KNOWN_ANSWERS], np.uint32)


def kat_source(prelude: str, signature: str, index: str) -> str:
    """A translation unit of `prelude`, the header and one kernel, one thread per vector:
    six input words (counter, key) in, four output words out."""
    return (RUNTIME / prelude).read_text() + HEADER + f"""
{signature}
{{
    const int i = {index};
    const uint4 r = cnnc_philox4x32_10(words[6 * i], words[6 * i + 1], words[6 * i + 2],
                                       words[6 * i + 3], words[6 * i + 4], words[6 * i + 5]);
    out[4 * i] = r.x; out[4 * i + 1] = r.y; out[4 * i + 2] = r.z; out[4 * i + 3] = r.w;
}}
"""


OPENCL_SOURCE = kat_source("cnnc_opencl.h", "__kernel void kat(__global const unsigned int* words, "
                           "__global unsigned int* out)", "get_global_id(0)")
CUDA_SOURCE = kat_source("cnnc_cuda.h", 'extern "C" __global__ void kat(const unsigned int* words, '
                         "unsigned int* out)", "threadIdx.x")


def test_both_preludes_define_every_macro_the_header_uses():
    used = set(re.findall(r"\bCNNC_[A-Z0-9_]+\b", HEADER)) - {"CNNC_RNG_H"}
    assert used, "cnnc_rng.h is written against the preludes' macros"
    for prelude in ("cnnc_cuda.h", "cnnc_opencl.h"):
        defined = set(re.findall(r"#define\s+(CNNC_[A-Z0-9_]+)", (RUNTIME / prelude).read_text()))
        assert used <= defined, f"{prelude} lacks {sorted(used - defined)}"


def test_opencl_philox_gives_the_known_answers():
    import pyopencl as cl

    from cnnc.backends.base import BackendError
    from cnnc.backends.opencl import _pick_device

    try:
        device = _pick_device()
    except BackendError as e:
        pytest.skip(str(e))
    ctx = cl.Context([device])
    queue = cl.CommandQueue(ctx)
    program = cl.Program(ctx, OPENCL_SOURCE).build(options=["-cl-std=CL1.2"])
    mf = cl.mem_flags
    words = cl.Buffer(ctx, mf.READ_ONLY | mf.COPY_HOST_PTR, hostbuf=INPUTS)
    out = cl.Buffer(ctx, mf.WRITE_ONLY, WANT.nbytes)
    program.kat(queue, (len(KNOWN_ANSWERS),), None, words, out)
    got = np.empty_like(WANT)
    cl.enqueue_copy(queue, got, out)
    assert got.tolist() == WANT.tolist()


@pytest.mark.nvcc
@pytest.mark.skipif(find_nvcc() is None, reason="nvcc is not on PATH")
def test_cuda_philox_compiles_with_nvcc(tmp_path):
    source = tmp_path / "kat.cu"
    source.write_text(CUDA_SOURCE)
    done = subprocess.run([find_nvcc(), "-cubin", "-arch=sm_80", "-std=c++17", "-o", str(tmp_path / "kat.cubin"),
                           str(source)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_usable(), reason="needs PyCUDA and an NVIDIA GPU")
def test_cuda_philox_gives_the_known_answers():
    import pycuda.driver as drv
    from pycuda.compiler import SourceModule

    drv.init()
    context = drv.Device(0).make_context()
    try:
        kat = SourceModule(CUDA_SOURCE, no_extern_c=True, options=["-std=c++17"]).get_function("kat")
        got = np.zeros_like(WANT)
        kat(drv.In(INPUTS), drv.Out(got), block=(len(KNOWN_ANSWERS), 1, 1), grid=(1, 1))
    finally:
        context.pop()
    assert got.tolist() == WANT.tolist()
