"""Kernels index in 64 bits exactly where what they reach exceeds 2^31-1 elements.

VGG16 at batch 672 fits one 80 GB GPU, yet conv1_1's output holds 672 x 64 x 224 x 224 =
2,157,969,408 values: a 32-bit `int` index wraps there and writes out of bounds.  The kernels
that touch such a buffer must form their indices and offsets in 64 bits (CUDA `long long`,
OpenCL C `long`; a GEMM's row and column indices only once they themselves pass 2^31-1); every
other kernel keeps `int`.  Nothing here allocates such a buffer: the
big plan is checked as text, by plan validation and the run-time memory check, and by nvcc
where it is present; the 64-bit code itself runs on PoCL, forced onto the small kernel cases.
"""
from __future__ import annotations

import re

import pytest

from cnnc.backends.base import Backend, BackendError, DeviceMemory
from cnnc.build import compile_file
from cnnc.codegen.dialect import CUDA, OPENCL, opencl_cpu
from cnnc.codegen.nvcc import compile_cubins, find_nvcc
from cnnc.codegen.render import cpu_kernel, render_kernel, render_source
from cnnc.executor import Executor
from cnnc.plan.schedule import Kernel
from cnnc.plan.validate import validate

import test_cpu_kernels
import test_kernels_opencl
from helpers import replace_once

INT_MAX = 2**31 - 1
# the 64-bit type of each generated file: CUDA C++ and OpenCL C (GPU- and CPU-shaped)
WIDE = {"gpu0.cu": r"\blong long\b", "gpu0.cl": r"\blong\b", "gpu0.cpu.cl": r"\blong\b"}


def kernel_texts(source: str) -> dict[str, str]:
    """Each kernel's text in a generated file, by name (every kernel opens with its header)."""
    parts = re.split(r"(?m)^// -{20,}\n// (\w+)\n", source)
    return dict(zip(parts[1::2], parts[2::2]))


@pytest.fixture(scope="module")
def vgg672(tmp_path_factory, repo_root):
    """examples/vgg16.cnn at batch 672, sources only."""
    root = tmp_path_factory.mktemp("vgg672")
    source = (repo_root / "examples" / "vgg16.cnn").read_text()
    (root / "vgg16.cnn").write_text(replace_once(source, "batch = 64", "batch = 672"))
    result = compile_file(root / "vgg16.cnn", root / "build", use_nvcc=False)
    return result.plan, root / "build"


def big_kernels(plan) -> set[str]:
    """The kernels launched on a buffer of more than 2^31-1 elements, from the plan's buffers."""
    return {op.kernel for program in plan.programs.values() for ops in program.values() for op in ops
            if op.kind == "launch" and any(plan.buffers[b].size > INT_MAX for b in op.args)}


def test_vgg16_at_batch_672_passes_the_checker_and_plan_validation(vgg672):
    plan, _ = vgg672
    assert plan.buffers["conv1_1.out"].size == 672 * 64 * 224 * 224 > INT_MAX
    validate(plan)


@pytest.mark.parametrize("file", sorted(WIDE))
def test_only_the_kernels_of_big_buffers_index_in_64_bits(vgg672, file):
    plan, build = vgg672
    texts = kernel_texts((build / file).read_text())
    assert set(texts) == set(plan.kernels)
    wide = {name for name, text in texts.items() if re.search(WIDE[file], text)}
    big = big_kernels(plan)
    assert {("conv1_1", "conv_fwd"), ("conv1_2", "neuron_bwd"), ("pool1", "pool_fwd")} <= \
        {(plan.kernels[name].layer, plan.kernels[name].op) for name in big}
    assert wide == big
    assert len(plan.kernels) - len(big) > 100          # conv2 onwards, fc, softmax, the updates keep int


def test_the_index_past_2_31_is_formed_in_64_bits(vgg672):
    """The bounds check of a 2,157,969,408-element kernel, where the writes went out of bounds,
    now tests a 64-bit index made from a 64-bit work-group index (blockIdx.x * 256 wraps in 32 bits)."""
    plan, build = vgg672
    name = next(k.name for k in plan.kernels.values() if (k.layer, k.op) == ("conv1_2", "neuron_bwd"))
    relu = kernel_texts((build / "gpu0.cu").read_text())[name]
    assert "const long long idx = (long long)blockIdx.x * 256 + threadIdx.x;" in relu
    assert "if (idx >= 2157969408) return;" in relu
    relu = kernel_texts((build / "gpu0.cl").read_text())[name]
    assert "const long idx = (long)get_group_id(0) * 64 + (int)get_local_id(0);" in relu


def test_gemm_positions_stay_32_bit_while_its_offsets_are_64(vgg672):
    """conv1_1's GEMM has 33,718,272 columns (cases x pixels): the column index stays an int, so
    splitting it into case and pixel divides in 32 bits, and the case index is widened before it
    scales a per-case stride."""
    plan, build = vgg672
    name = next(k.name for k in plan.kernels.values() if (k.layer, k.op) == ("conv1_1", "conv_fwd"))
    conv = kernel_texts((build / "gpu0.cu").read_text())[name]
    assert "const int n0 = blockIdx.x * 64;" in conv
    assert "const long long img = n / 50176, op = (n / 224) % 224, oq = n % 224;" in conv


def huge_gemm() -> Kernel:
    """A 1x1 convolution of 2^31-1 one-pixel cases: its GEMM's columns pass 2^31-1 (whole tiles)."""
    p = dict(N=INT_MAX, C=1, H=1, W=1, K=2, R=1, S=1, P=1, Q=1, stride=1, pad=0,
             neuron={"name": "ident", "a": 1.0, "b": 0.0})
    return Kernel("huge_gemm", "conv_fwd", p, "", 0, "2^31-1 cases")


def test_gemm_positions_past_2_31_are_64_bit():
    assert "const long long n0 = (long long)blockIdx.x * 64;" in render_kernel(huge_gemm(), CUDA)[0]
    assert "const long n0 = (long)get_group_id(0) * 128;" in render_kernel(huge_gemm(), OPENCL)[0]


class _Memory(Backend):
    """A device of `gib` GiB that refuses to allocate: only the memory check may run."""

    class Allocated(Exception):
        pass

    def __init__(self, gib: int):
        self.gib = gib

    def memory(self, device: int) -> DeviceMemory:
        return DeviceMemory(device, f"{self.gib} GiB card", self.gib * 2**30, self.gib * 2**30)

    def alloc(self, buffer, device):
        raise self.Allocated

    upload = download = launch = copy = None


def test_the_plan_fits_80_gb_and_is_refused_by_a_smaller_device(vgg672):
    plan, _ = vgg672
    with pytest.raises(_Memory.Allocated):          # past the memory check, at the first allocation
        Executor(plan, _Memory(80))
    with pytest.raises(BackendError) as refused:
        Executor(plan, _Memory(40))
    assert str(refused.value) == "logical device 0 (40 GiB card): the plan needs 47.8 GiB, the device has 40.0 GiB"


def test_a_launch_one_past_int_max_indexes_in_64_bits():
    """The last work-group is walked whole: 2^31-1 values in groups of 256 reach index 2^31."""
    def wide(n: int, d) -> bool:
        k = Kernel("k", "neuron_bwd", {"n": n, "neuron": {"name": "relu", "a": 1.0, "b": 0.0}}, "", 0, "")
        return bool(re.search(WIDE["gpu0.cu" if d is CUDA else "gpu0.cl"], render_kernel(k, d)[0]))
    assert wide(INT_MAX, CUDA) and wide(INT_MAX, OPENCL)
    assert not wide(INT_MAX + 1 - 256, CUDA) and not wide(INT_MAX + 1 - 256, OPENCL)


# --- the 64-bit code runs: forced onto the kernel cases, on PoCL -------------------------------

def first_of_each(kernels: list[Kernel], key) -> list[Kernel]:
    seen, out = set(), []
    for k in kernels:
        if key(k) not in seen:
            seen.add(key(k))
            out.append(k)
    return out


def variant(k: Kernel) -> tuple:
    """What changes a kernel's index code: its op, and the param switches its template branches on."""
    p = k.params
    return (k.op, p.get("groups", 1) > 1, p.get("split", 1) > 1, p.get("shared_biases", True), p.get("mode"),
            p.get("stride", 1) > 1, "case_ranges" in p)


@pytest.fixture(scope="module")
def wide_device():
    """The kernel cases (one of each variant), every one rendered with 64-bit indices."""
    from cnnc.backends.opencl import OpenCLBackend
    kernels = first_of_each(test_kernels_opencl.cases(), variant)
    source, launches = render_source(kernels, OPENCL, "test", "", "64-bit index cases", wide_index=True)
    assert source.count("// 64-bit indices") == len(kernels)
    for k in kernels:
        k.launch["opencl"] = launches[k.name]
    return OpenCLBackend({0: source}, [0]), {k.name: k for k in kernels}


@pytest.mark.parametrize("name", [k.name for k in first_of_each(test_kernels_opencl.cases(), variant)])
def test_64_bit_kernels_match_the_reference(wide_device, name):
    test_kernels_opencl.test_kernel_matches_reference(wide_device, name)


CPU_WIDTH = 4          # every device the CPU target runs on takes float4


@pytest.fixture(scope="module")
def wide_cpu_device():
    from cnnc.backends.opencl import OpenCLBackend
    kernels = first_of_each(test_cpu_kernels.cpu_cases(CPU_WIDTH), variant)
    cpu_source, cpu_launches = render_source(kernels, opencl_cpu(CPU_WIDTH), "test", "", "64-bit CPU cases",
                                             wide_index=True)
    source, launches = render_source(kernels, OPENCL, "test", "", "64-bit cases", wide_index=True)
    for k in kernels:
        k.launch["opencl"], k.launch["opencl-cpu"] = launches[k.name], cpu_launches[k.name]
    with pytest.MonkeyPatch.context() as m:
        m.setenv("CNNC_OPENCL_TARGET", "cpu")
        backend = OpenCLBackend({0: source}, [0], cpu_sources={0: cpu_source}, cpu_width=CPU_WIDTH)
    assert backend.cpu and "long" in cpu_source
    return backend, {k.name: k for k in kernels}, cpu_source


@pytest.mark.parametrize("name", [k.name for k in first_of_each(test_cpu_kernels.cpu_cases(CPU_WIDTH), variant)])
def test_64_bit_cpu_kernels_match_the_reference(wide_cpu_device, name):
    assert cpu_kernel(wide_cpu_device[1][name], CPU_WIDTH)
    test_cpu_kernels.test_cpu_kernel_matches_reference(wide_cpu_device, name)


# --- nvcc --------------------------------------------------------------------------------------

no_nvcc = pytest.mark.skipif(find_nvcc() is None, reason="nvcc is not on PATH")


@pytest.mark.nvcc
@no_nvcc
def test_the_64_bit_kernels_of_vgg16_compile_for_sm_80(vgg672, tmp_path):
    """The plan's 64-bit kernels, as CUDA, build with nvcc and spill nothing."""
    plan, _build = vgg672
    kernels = [plan.kernels[name] for name in sorted(big_kernels(plan))]
    source, _launches = render_source(kernels, CUDA, "vgg16.cnn", "", "VGG16 at batch 672, 64-bit kernels")
    (tmp_path / "big.cu").write_text(source)
    result = compile_cubins(tmp_path / "big.cu", tmp_path, archs=("sm_80",))
    assert result.outputs["sm_80"].stat().st_size > 0
    for k in kernels:
        r = result.resources[k.name]["sm_80"]
        assert not r.spills and not r.stack_bytes, f"{k.name} spills: {r}"


@pytest.mark.nvcc
@no_nvcc
def test_every_template_forced_to_64_bits_compiles_for_sm_80(tmp_path):
    kernels = first_of_each(test_kernels_opencl.cases(), variant) + [huge_gemm()]
    source, _launches = render_source(kernels, CUDA, "test", "", "64-bit index cases", wide_index=True)
    assert source.count("// 64-bit indices") == len(kernels)
    (tmp_path / "forced.cu").write_text(source)
    result = compile_cubins(tmp_path / "forced.cu", tmp_path, archs=("sm_80",))
    assert {k.name for k in kernels} <= set(result.resources)
