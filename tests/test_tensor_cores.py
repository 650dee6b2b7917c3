"""Tensor-core GEMM kernels (templates/mma_gemm.j2) for the layers of precision tf32 and bf16.

OpenCL runs the same kernel as CUDA, its mma.sync emulated through work-group memory, so every
GEMM-family case of the kernel tests runs on PoCL with the tiling, staging, fragment layout and
epilogue that CUDA builds ship, against the reference op on rounded operands.  With nvcc, the
CUDA rendering compiles for sm_80 and sm_90, its SASS multiplies on tensor cores (HMMA), and
keeps everything in registers (no local memory).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import cnnc.codegen.render as render
from cnnc.backends.reference_ops import REFERENCE_OPS
from cnnc.codegen.dialect import CUDA, OPENCL
from cnnc.codegen.render import MmaTiles, choose_mma_tiles, mma_math, render_kernel, render_source
from cnnc.ops import OPS, Role
from cnnc.plan.schedule import Buffer, Kernel
from cnnc.precision import round_bf16, round_tf32

from helpers import stable_seed
from test_kernels_opencl import cases, inputs_for

ROUND = {"tf32": round_tf32, "bf16": round_bf16}
# float32's unit roundoff: the products of tf32 / bf16 operands are exact in float32, so a
# tensor-core kernel differs from the reference on rounded operands only by the order of its sums
FP32_UNIT = 2.0 ** -24


def gemm_cases() -> list[Kernel]:
    """Every GEMM-family case of the kernel tests, in tf32 and bf16 by turns (each op meets both;
    every case twice would double the time PoCL takes to compile them)."""
    out, seen = [], {}
    for k in cases():
        if OPS[k.op].gemm:
            precision = ("tf32", "bf16")[seen.setdefault(k.op, 0) % 2]
            seen[k.op] += 1
            out.append(Kernel(f"{k.name}_{precision}", k.op, dict(k.params, precision=precision), "", 0, k.summary))
    return out


def operands(op: str) -> list[str]:
    """The buffers a GEMM multiplies: its float inputs but the bias."""
    return [name for name, role in OPS[op].args if role is Role.IN and name != "b"]


@pytest.fixture(scope="module")
def every_case_on_tensor_cores():
    """All GEMM cases rendered with the tensor-core template, the K threshold lifted so the
    small ones take it too (their gathers and epilogues are the ones large layers use)."""
    saved, render.MMA_MIN_K = render.MMA_MIN_K, 0
    try:
        kernels = gemm_cases()
        source, launches = render_source(kernels, OPENCL, "test", "", "tensor-core cases")
    finally:
        render.MMA_MIN_K = saved
    for k in kernels:
        assert launches[k.name]["math"].startswith("mma.sync"), k.name
        k.launch["opencl"] = launches[k.name]
    from cnnc.backends.opencl import OpenCLBackend
    return OpenCLBackend({0: source}, [0]), {k.name: k for k in kernels}


def run(backend, k: Kernel, vals: dict) -> dict[str, np.ndarray]:
    handles = {}
    for name, _ in OPS[k.op].args:
        buf = Buffer(name, 0, vals[name].size, "f32", "test", "")
        handles[name] = (buf, backend.alloc(buf, 0))
        backend.upload(handles[name][1], vals[name])
    backend.launch(k, 0, [handles[n][1] for n in OPS[k.op].kernel_args])
    backend.synchronize()
    return {name: backend.download(handles[name][1], handles[name][0])
            for name, role in OPS[k.op].args if role in (Role.OUT, Role.INOUT)}


def reference(k: Kernel, vals: dict, rounding) -> dict[str, np.ndarray]:
    """The reference op on the kernel's inputs, its operands passed through `rounding`."""
    ref = {n: v.copy() for n, v in vals.items()}
    for name in operands(k.op):
        ref[name] = rounding(ref[name])
    REFERENCE_OPS[k.op](k.params, *[ref[n] for n in OPS[k.op].arg_names])
    return ref


def sum_order_bound(k: Kernel, vals: dict, rounding) -> float:
    """How far two float32 sums of the same exact products may differ, K * u * sum |a*b|, the
    magnitudes from the reference op on |operands| (no bias, old output or neuron), times 2 for
    the neurons' slopes and the bias added after."""
    p = dict(k.params, accumulate=False, bias=False)
    p.pop("neuron", None)
    ref = {n: np.abs(v) for n, v in vals.items()}
    for name in operands(k.op):
        ref[name] = np.abs(rounding(ref[name]))
    for name, role in OPS[k.op].args:
        if role is Role.OUT:
            ref[name] = np.zeros_like(ref[name])
    if "b" in ref:
        ref["b"] = np.zeros_like(ref["b"])
    REFERENCE_OPS[k.op](p, *[ref[n] for n in OPS[k.op].arg_names])
    K = OPS[k.op].gemm(k.params)["K"]
    magnitude = max(float(ref[name].max()) for name, role in OPS[k.op].args if role is Role.OUT)
    return 2 * K * FP32_UNIT * max(magnitude, 1.0)


@pytest.mark.parametrize("name", [k.name for k in gemm_cases()])
def test_tensor_core_kernel_matches_rounded_reference(every_case_on_tensor_cores, name):
    backend, kernels = every_case_on_tensor_cores
    k = kernels[name]
    rounding = ROUND[k.params["precision"]]
    vals = {n: v for n, v in inputs_for(k, np.random.default_rng(stable_seed(name))).items()}
    got = run(backend, k, vals)
    want = reference(k, vals, rounding)
    bound = sum_order_bound(k, vals, rounding)
    for n, out in got.items():
        np.testing.assert_allclose(out, want[n], rtol=0, atol=bound, err_msg=f"{k.op} {k.params} output {n}")


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_operands_are_rounded(every_case_on_tensor_cores, precision):
    """The kernels round their operands: a large case is an order of magnitude nearer the
    reference on rounded operands than the fp32 reference on the same inputs."""
    backend, kernels = every_case_on_tensor_cores
    k = next(k for k in kernels.values() if k.op == "conv_bwd_data" and k.params["precision"] == precision
             and OPS[k.op].gemm(k.params)["K"] >= 100)
    vals = inputs_for(k, np.random.default_rng(1))
    got = run(backend, k, vals)["dx"]
    rounded = reference(k, vals, ROUND[precision])["dx"]
    fp32 = Kernel(k.name, k.op, dict(k.params, precision="fp32"), "", 0, "")
    unrounded = reference(fp32, vals, lambda v: v)["dx"]
    assert np.abs(got - unrounded).max() > 10 * np.abs(got - rounded).max()


def test_small_reductions_stay_on_simt_and_fp32_is_unchanged():
    """K below the threshold keeps the SIMT kernel (its launch says why); fp32 kernels have no
    `math` entry and are the SIMT template's, byte for byte, with or without a precision param."""
    small = Kernel("small", "fc_fwd", dict(N=4, I=10, O=7, precision="tf32", neuron=None), "", 0, "")
    assert mma_math(small) == ("simt", f"K=10 < {render.MMA_MIN_K}: SIMT with tf32-rounded operands")
    big = Kernel("big", "fc_fwd", dict(N=64, I=256, O=96, precision="bf16", neuron=None), "", 0, "")
    assert mma_math(big)[0] == "mma.sync.m16n8k16.bf16"
    fp32 = Kernel("big", "fc_fwd", dict(N=64, I=256, O=96, neuron=None), "", 0, "")
    for d in (CUDA, OPENCL):
        text, launch = render_kernel(fp32, d)
        assert "math" not in launch and "mma" not in text
        assert render_kernel(Kernel("big", "fc_fwd", dict(fp32.params, precision="fp32"), "", 0, ""), d) == \
            (text, launch)
        assert "mma.sync" in render_kernel(big, CUDA)[0]


def test_tiles_fill_the_gpu():
    """Large GEMMs get 128x128 block tiles; smaller ones shrink the tile until the grid has 4
    work-groups per SM of the lowest default arch, or reach the smallest tile."""
    assert (choose_mma_tiles(4096, 4096, 1, "tf32").BM, choose_mma_tiles(4096, 4096, 1, "tf32").BN) == (128, 128)
    t = choose_mma_tiles(256, 27 * 27 * 128, 1, "tf32")
    assert -(-256 // t.BM) * -(-27 * 27 * 128 // t.BN) >= render.MMA_MIN_BLOCKS
    assert choose_mma_tiles(64, 64, 1, "bf16") == MmaTiles(32, 32, 16, 1, 2, 2, "bf16")


def test_fragment_loads_do_not_conflict():
    """The lanes of a warp load their fragment elements from 32 distinct shared-memory banks."""
    for precision in ("tf32", "bf16"):
        t = choose_mma_tiles(4096, 4096, 1, precision)
        row = t.BK + t.pad
        for offsets in (t.a_elems, t.b_elems):
            for drow, dk in offsets:
                banks = {((lane // 4 + drow) * row + lane % 4 + dk) % 32 for lane in range(32)}
                assert len(banks) == 32, (precision, drow, dk)


# --- nvcc: compiles for sm_80 and sm_90, runs on tensor cores, no local memory ---------------

# conv2 of examples/alexnet.cnn, as its plan has it
ALEXNET_CONV2 = Kernel("alexnet_conv2_fwd", "conv_fwd",
                       dict(N=128, C=64, H=27, W=27, K=192, R=5, S=5, P=27, Q=27, stride=1, pad=2,
                            neuron={"name": "relu", "a": 1.0, "b": 0.0}, precision="tf32"), "", 0, "AlexNet conv2")


def cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import nvidia.cu13
        path = Path(nvidia.cu13.__path__[0]) / "bin" / "cuobjdump"
        return str(path) if path.exists() else None
    except ImportError:
        return None


def sass_by_kernel(source: str, arch: str, tmp_path: Path) -> dict[str, str]:
    """The SASS of every kernel of a CUDA program, by kernel name."""
    from cnnc.codegen.nvcc import find_nvcc
    cu = tmp_path / f"{arch}.cu"
    cu.write_text(source)
    cubin = tmp_path / f"{arch}.cubin"
    subprocess.run([find_nvcc(), "-cubin", f"-arch={arch}", "-O3", "-o", str(cubin), str(cu)], check=True,
                   capture_output=True, text=True)
    text = subprocess.run([cuobjdump(), "-sass", str(cubin)], check=True, capture_output=True, text=True).stdout
    parts = re.split(r"\n\s*Function : (\w+)\n", text)
    return dict(zip(parts[1::2], parts[2::2]))


@pytest.mark.nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_kernels_use_tensor_cores(arch, tmp_path):
    if cuobjdump() is None:
        pytest.skip("cuobjdump not installed (pip install nvidia-cuda-cuobjdump)")
    tensor = [k for k in gemm_cases() if mma_math(k)[0] != "simt"] + [ALEXNET_CONV2]
    fp32 = [k for k in cases() if OPS[k.op].gemm][:6]
    source, _ = render_source(tensor + fp32, CUDA, "test", "", "tensor-core cases")
    sass = sass_by_kernel(source, arch, tmp_path)
    for k in tensor:
        assert "HMMA" in sass[k.name], k.name
        assert not re.search(r"\b(LDL|STL)\b", sass[k.name]), f"{k.name} uses local memory"
    for k in fp32:
        assert "HMMA" not in sass[k.name], k.name


def test_manifest_says_which_kernels_use_tensor_cores(tmp_path):
    """The manifest's launch of every reduced-precision GEMM kernel names its math, and why a
    SIMT one is not on tensor cores; conv2 of AlexNet (K = 1600) is."""
    from cnnc.build import compile_file
    compile_file(Path(__file__).parent.parent / "examples" / "alexnet.cnn", tmp_path, use_nvcc=False)
    kernels = json.loads((tmp_path / "manifest.json").read_text())["kernels"]
    reduced = {name: k["launch"]["cuda"] for name, k in kernels.items()
               if OPS[k["op"]].gemm and re.search(r"_(tf32|bf16)$", name) and "cuda" in k["launch"]}
    assert reduced, "the example has no reduced-precision GEMM"
    for name, launch in reduced.items():
        assert launch["math"].startswith("mma.sync") or "math_reason" in launch, name
    assert any(name.startswith("conv2_fwd") and launch["math"] == "mma.sync.m16n8k8.tf32"
               for name, launch in reduced.items())
