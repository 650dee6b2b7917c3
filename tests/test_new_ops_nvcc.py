"""The layer kernels beyond conv/fc/pool/softmax compile with nvcc, without spills.

Every case of test_kernels_opencl.layer_op_cases() (the same shapes that are checked
against the reference on PoCL), plus full-size layers of the cuda-convnet2 nets, is
rendered as CUDA into one translation unit and built for sm_80 and sm_90; ptxas must
report no spills (and no stack) for any of them.
"""
from __future__ import annotations

import pytest

from cnnc.codegen.dialect import CUDA
from cnnc.codegen.nvcc import compile_cubins, find_nvcc
from cnnc.codegen.render import render_source
from cnnc.plan.schedule import Kernel
from test_kernels_opencl import conv, layer_op_cases, norm

pytestmark = [pytest.mark.nvcc,
              pytest.mark.skipif(find_nvcc() is None, reason="nvcc is not on PATH")]

ARCHS = ("sm_80", "sm_90")


def full_size_cases():
    """Layer shapes of the cuda-convnet2 ImageNet and CIFAR nets, where tiles are largest."""
    relu = {"name": "relu", "a": 1.0, "b": 0.0}
    local3 = conv(128, 64, 8, 8, 64, 3, 1, 1)              # CIFAR-10 11% net, local3
    grouped = dict(conv(128, 96, 27, 27, 256, 5, 1, 2), groups=2)
    unshared = dict(conv(128, 64, 16, 16, 64, 5, 1, 2), shared_biases=False)
    out = [("local_fwd", dict(local3, neuron=relu)), ("local_bwd_data", local3), ("local_bwd_filter", local3),
           ("bias_grad_unshared", dict(N=128, K=64, inner=64))]
    for p in (grouped, unshared):
        out += [("conv_fwd", dict(p, neuron=relu)), ("conv_bwd_data", dict(p, accumulate=True)),
                ("conv_bwd_filter", dict(p, accumulate=True))]
    cm = norm(128, 96, 55, 55, 5, scale=0.0001)
    sp = norm(128, 64, 16, 16, 9, scale=0.001)
    out += [("cmrnorm_fwd", cm), ("cmrnorm_bwd", cm), ("rnorm_fwd", sp), ("rnorm_bwd", sp),
            ("cnorm_meandiff", sp), ("cnorm_fwd", sp), ("cnorm_bwd_prep", sp), ("cnorm_bwd", sp)]
    drop = dict(N=128, D=4096, keep=0.5, layer_id=7, case_offset=128, variant="dropout")
    out += [("dropout_fwd", drop), ("dropout_bwd", dict(n=128 * 4096)),
            ("crossent_fwd", dict(N=128, C=1000)), ("softmax_crossent_bwd", dict(N=128, C=1000, coeff=1.0))]
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cases = layer_op_cases() + full_size_cases()
    kernels = [Kernel(f"layer{i}_{op}", op, p, "", 0, f"layer op case {i}") for i, (op, p) in enumerate(cases)]
    source, _ = render_source(kernels, CUDA, "test", "", "layer op cases")
    out = tmp_path_factory.mktemp("nvcc_layer_ops")
    path = out / "layer_ops.cu"
    path.write_text(source)
    return kernels, compile_cubins(path, out, archs=ARCHS)


def test_every_layer_kernel_compiles(built):
    kernels, result = built
    for arch in ARCHS:
        assert result.outputs[arch].stat().st_size > 0
    assert {k.name for k in kernels} <= set(result.resources)


@pytest.mark.parametrize("arch", ARCHS)
def test_no_spills(built, arch):
    kernels, result = built
    spilling = {k.name: result.resources[k.name][arch] for k in kernels
                if result.resources[k.name][arch].spills or result.resources[k.name][arch].stack_bytes}
    assert not spilling, f"kernels spill or use a stack on {arch}: {spilling}"
