"""precision = fp32 | tf32 | bf16: the rounding of GEMM operands, written once in numpy
(cnnc/precision.py) and once for the devices (runtime/cnnc_precision.h), bit for bit the same;
the setting in the language; fp32 kernels left exactly as they were; and rounded kernels, on
every target and placement, computing what the reference computes."""
from __future__ import annotations

import subprocess

import numpy as np
import pytest

from cnnc.backends.cuda import cuda_usable
from cnnc.backends.reference_ops import REFERENCE_OPS
from cnnc.build import compile_network
from cnnc.check import check
from cnnc.codegen.dialect import CUDA, OPENCL, opencl_cpu
from cnnc.codegen.nvcc import find_nvcc
from cnnc.codegen.render import cpu_kernel, render_kernel, render_source
from cnnc.diagnostics import CompileError
from cnnc.frontend.parser import parse
from cnnc.ops import OPS
from cnnc.plan.schedule import Kernel
from cnnc.precision import UNIT_ROUNDOFF, round_bf16, round_tf32
from cnnc.resources import resource_dir

from helpers import replace_once, stable_seed
from test_kernels_opencl import cases, check_kernel, inputs_for
from test_parallel import PLACEMENTS, assert_same_training, source, train

RUNTIME = resource_dir("runtime")
HEADER = (RUNTIME / "cnnc_precision.h").read_text()


def bits(*words: int) -> np.ndarray:
    return np.array(words, np.uint32).view(np.float32)


def as_bits(x) -> list[int]:
    return np.asarray(x, np.float32).view(np.uint32).tolist()


# (input bits, tf32 bits, bf16 bits), worked out by hand from the rounding rules
KNOWN = [
    (0x3F800000, 0x3F800000, 0x3F800000),      # 1.0 is exact in both
    (0x3F801000, 0x3F802000, 0x3F800000),      # tf32 tie: away from zero; bf16: below half
    (0xBF801000, 0xBF802000, 0xBF800000),      # the same, negative: away from zero is down
    (0x3F800FFF, 0x3F800000, 0x3F800000),      # just below a tf32 tie
    (0x3F808000, 0x3F808000, 0x3F800000),      # bf16 tie, even neighbour below
    (0x3F818000, 0x3F818000, 0x3F820000),      # bf16 tie, even neighbour above
    (0x3F808001, 0x3F808000, 0x3F810000),      # just above a bf16 tie
    (0x7F7FFFFF, 0x7F800000, 0x7F800000),      # the largest float rounds past the range: infinity
    (0xFF7FFFFF, 0xFF800000, 0xFF800000),
    (0x7F7FEFFF, 0x7F7FE000, 0x7F800000),      # below tf32's half ulp of the top binade
    (0x00000001, 0x00000000, 0x00000000),      # the smallest denormal rounds to zero
    (0x00001000, 0x00002000, 0x00000000),      # a denormal tf32 tie: away from zero
    (0x00018000, 0x00018000, 0x00020000),      # a denormal bf16 tie, to even
    (0x007FFFFF, 0x00800000, 0x00800000),      # the largest denormal carries into the exponent
    (0x80000000, 0x80000000, 0x80000000),      # -0 stays -0
    (0x7F800000, 0x7F800000, 0x7F800000),      # infinities stay
    (0xFF800000, 0xFF800000, 0xFF800000),
    (0x7FC00000, 0x7FC00000, 0x7FC00000),      # the quiet NaN stays
    (0x7F800001, 0x7FC00000, 0x7FC00000),      # a NaN whose payload is all in the dropped bits: quiet NaN
    (0xFFBFFFFF, 0xFFFFE000, 0xFFFF0000),      # a negative signalling NaN: quiet, sign and high payload kept
]


def edge_and_random_bits() -> np.ndarray:
    """The known cases, then random bit patterns (every exponent, NaNs included) and random ties."""
    rng = np.random.default_rng(11)
    words = rng.integers(0, 2**32, 4096, dtype=np.uint64).astype(np.uint32)
    ties = (words & np.uint32(0xFFFF0000)) | np.uint32(0x8000)
    tf32_ties = (words & np.uint32(0xFFFFE000)) | np.uint32(0x1000)
    return np.concatenate([np.array([k[0] for k in KNOWN], np.uint32), words, ties, tf32_ties])


@pytest.mark.parametrize("column, fn", [(1, round_tf32), (2, round_bf16)], ids=["tf32", "bf16"])
def test_numpy_rounding_gives_the_worked_out_bits(column, fn):
    got = as_bits(fn(bits(*[k[0] for k in KNOWN])))
    assert [hex(g) for g in got] == [hex(k[column]) for k in KNOWN]


def test_bf16_rounding_is_torchs():
    """PyTorch's float32 -> bfloat16 conversion is round to nearest even too: an independent
    check of every non-NaN pattern of the random set (NaN payloads are not PyTorch's to fix)."""
    torch = pytest.importorskip("torch")
    x = edge_and_random_bits().view(np.float32)
    x = x[~np.isnan(x)]
    want = torch.from_numpy(x).to(torch.bfloat16).to(torch.float32).numpy()
    assert as_bits(round_bf16(x)) == as_bits(want)


def test_tf32_rounding_is_nearest_with_ties_away():
    """Each finite value moves by at most half an ulp of 10 mantissa bits, exactly half only on a
    tie and then away from zero, and the result has its 13 low bits clear."""
    x = edge_and_random_bits().view(np.float32)
    x = x[np.isfinite(x) & (np.abs(x) < np.float32(3e38))].astype(np.float64)
    r = round_tf32(x.astype(np.float32)).astype(np.float64)
    assert not (r.astype(np.float32).view(np.uint32) & np.uint32(0x1FFF)).any()
    ulp = np.spacing(np.abs(x).astype(np.float32)).astype(np.float64) * 2**13
    assert (np.abs(r - x) <= ulp / 2).all()
    tie = np.abs(r - x) == ulp / 2
    assert tie.sum() > 1000 and (np.abs(r[tie]) > np.abs(x[tie])).all()


def round_trip_source(prelude: str, signature: str, index: str) -> str:
    """A prelude, the header and one kernel writing both roundings of each input word."""
    return (RUNTIME / prelude).read_text() + HEADER + f"""
{signature}
{{
    const int i = {index};
    tf32[i] = cnnc_round_tf32(words[i]);
    tf32_bits[i] = cnnc_round_tf32_bits(words[i]);
    bf16[i] = cnnc_round_bf16(words[i]);
}}
"""


OPENCL_SOURCE = round_trip_source(
    "cnnc_opencl.h", "__kernel void rounding(__global const float* words, __global float* tf32, "
    "__global float* tf32_bits, __global float* bf16)", "get_global_id(0)")
CUDA_SOURCE = round_trip_source(
    "cnnc_cuda.h", 'extern "C" __global__ void rounding(const float* words, float* tf32, float* tf32_bits, '
    "float* bf16)", "blockIdx.x * blockDim.x + threadIdx.x")


def test_opencl_rounding_is_numpys_bit_for_bit():
    import pyopencl as cl

    from cnnc.backends.base import BackendError
    from cnnc.backends.opencl import _pick_device

    try:
        device = _pick_device()
    except BackendError as e:
        pytest.skip(str(e))
    x = edge_and_random_bits().view(np.float32)
    ctx = cl.Context([device])
    queue = cl.CommandQueue(ctx)
    program = cl.Program(ctx, OPENCL_SOURCE).build(options=["-cl-std=CL1.2"])
    mf = cl.mem_flags
    words = cl.Buffer(ctx, mf.READ_ONLY | mf.COPY_HOST_PTR, hostbuf=x)
    outs = [cl.Buffer(ctx, mf.WRITE_ONLY, x.nbytes) for _ in range(3)]
    program.rounding(queue, (x.size,), None, words, *outs)
    got = [np.empty_like(x) for _ in outs]
    for host, buf in zip(got, outs):
        cl.enqueue_copy(queue, host, buf)
    want_tf32, want_bf16 = as_bits(round_tf32(x)), as_bits(round_bf16(x))
    assert as_bits(got[0]) == want_tf32 and as_bits(got[1]) == want_tf32
    assert as_bits(got[2]) == want_bf16


@pytest.mark.nvcc
@pytest.mark.skipif(find_nvcc() is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("arch, instruction", [("sm_75", False), ("sm_80", True), ("sm_90", True)])
def test_cuda_rounding_compiles_and_uses_the_instruction_from_sm_80(arch, instruction, tmp_path):
    """sm_80 and later round tf32 with cvt.rna.tf32.f32 itself; earlier parts with integers."""
    source = tmp_path / "rounding.cu"
    source.write_text(CUDA_SOURCE)
    ptx = tmp_path / "rounding.ptx"
    done = subprocess.run([find_nvcc(), "-ptx", f"-arch={arch}", "-std=c++17", "-o", str(ptx), str(source)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert ("cvt.rna.tf32.f32" in ptx.read_text()) == instruction


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_usable(), reason="needs PyCUDA and an NVIDIA GPU")
def test_cuda_rounding_is_numpys():
    """On the GPU: the integer tf32 and bf16 bit for bit, and the instruction (sm_80+) too except
    for which NaN it gives, which a GEMM cannot tell apart."""
    import pycuda.driver as drv
    from pycuda.compiler import SourceModule

    x = edge_and_random_bits().view(np.float32)
    drv.init()
    context = drv.Device(0).make_context()
    try:
        kernel = SourceModule(CUDA_SOURCE, no_extern_c=True, options=["-std=c++17"]).get_function("rounding")
        got = [np.zeros_like(x) for _ in range(3)]
        kernel(drv.In(x), *(drv.Out(g) for g in got), block=(256, 1, 1), grid=(-(-x.size // 256), 1))
    finally:
        context.pop()
    nan = np.isnan(x)
    assert as_bits(got[1]) == as_bits(round_tf32(x)) and as_bits(got[2]) == as_bits(round_bf16(x))
    assert as_bits(got[0][~nan]) == as_bits(round_tf32(x)[~nan]) and np.isnan(got[0][nan]).all()


# ------------------------------------------------------------------------------ the language

H = "network n\ninput data: 3x8x8\ninput labels: label(4)\n"
BODY = ("c = conv(data, filters=4, size=3, padding=1) relu\np = maxpool(c, size=2)\n"
        "f = fc(p, outputs=4)\nprobs = softmax(f)\ncost = logreg(labels, probs)\n")


def layer_precisions(src: str) -> dict[str, str]:
    return {l.name: l.train.precision for l in check(parse(src, "t.cnn")).layers if l.train}


def test_precision_defaults_to_fp32_and_train_sets_every_weight_layer():
    assert layer_precisions(H + BODY) == {"c": "fp32", "f": "fp32"}
    assert layer_precisions(H + "train { precision = tf32 }\n" + BODY) == {"c": "tf32", "f": "tf32"}


def test_a_layer_overrides_the_network_default():
    src = H + "train { precision = tf32 }\n" + replace_once(BODY, "outputs=4)", "outputs=4) { precision = bf16 }")
    assert layer_precisions(src) == {"c": "tf32", "f": "bf16"}
    src = replace_once(H + "train { precision = bf16 }\n" + BODY, "relu", "relu { precision = fp32 }")
    assert layer_precisions(src) == {"c": "fp32", "f": "bf16"}


def error_of(src: str) -> str:
    with pytest.raises(CompileError) as info:
        check(parse(src, "t.cnn"))
    return info.value.format()


def test_an_unknown_precision_is_a_located_error():
    assert error_of(H + "train { precision = tf3 }\n" + BODY) == """\
t.cnn:4:21: error: precision must be one of fp32, tf32, bf16
    4 | train { precision = tf3 }
      |                     ^~~
  hint: did you mean 'tf32'?"""
    assert "precision must be one of fp32, tf32, bf16" in error_of(
        replace_once(H + BODY, "relu", 'relu { precision = "tf32" }'))


def test_precision_on_a_layer_without_gemms_is_a_located_error():
    """Only conv, local and fc layers multiply matrices; saying otherwise of a pool is a mistake."""
    assert error_of(H + replace_once(BODY, "size=2)", "size=2) { precision = tf32 }")) == """\
t.cnn:5:26: error: 'precision' applies to layers with weights; p (maxpool) has none
    5 | p = maxpool(c, size=2) { precision = tf32 }
      |                          ^~~~~~~~~~~~~~~~"""


def test_a_bad_precision_exits_with_status_2(tmp_path):
    from click.testing import CliRunner

    from cnnc.cli import main
    path = tmp_path / "t.cnn"
    path.write_text(H + "train { precision = fp64 }\n" + BODY)
    result = CliRunner().invoke(main, ["check", str(path)])
    assert result.exit_code == 2 and "precision must be one of" in result.output
    assert "Traceback" not in result.output


# ------------------------------------------------------------------------ plans and kernels

def plan_of(src: str, tmp_path):
    return compile_network(src, "t.cnn", tmp_path, use_nvcc=False).plan


def test_gemm_kernels_carry_the_precision_and_a_name_of_their_own(tmp_path):
    fp32 = plan_of(H + BODY, tmp_path / "fp32")
    tf32 = plan_of(H + "train { precision = tf32 }\n" + BODY, tmp_path / "tf32")
    gemm = {k.name: k for k in tf32.kernels.values() if OPS[k.op].gemm}
    assert {k.op for k in gemm.values()} == {"conv_fwd", "conv_bwd_filter", "fc_fwd", "fc_bwd_data",
                                             "fc_bwd_filter"}
    assert all(k.params["precision"] == "tf32" and "_tf32" in name for name, k in gemm.items())
    assert not set(gemm) & set(fp32.kernels)
    # every other kernel is the fp32 network's, name and params
    others = {n: k.params for n, k in tf32.kernels.items() if n not in gemm}
    assert others == {n: k.params for n, k in fp32.kernels.items() if not OPS[k.op].gemm}
    assert all("precision" not in k.params for k in fp32.kernels.values())


def test_a_local_layers_data_gradient_stays_fp32(tmp_path):
    """local_bwd_data is a direct sum, not a GEMM: it takes no precision and keeps its name."""
    src = H + "train { precision = bf16 }\n" + replace_once(
        BODY, "c = conv(data, filters=4, size=3, padding=1) relu", "a = conv(data, filters=4, size=3, padding=1)\n"
        "c = local(a, filters=4, size=3, padding=1) relu")
    kernels = plan_of(src, tmp_path).kernels.values()
    local = {k.op: k for k in kernels if k.op.startswith("local_")}
    assert local["local_fwd"].params["precision"] == "bf16" and local["local_bwd_filter"].params["precision"] == "bf16"
    assert "precision" not in local["local_bwd_data"].params and "bf16" not in local["local_bwd_data"].name


def test_fp32_kernels_are_the_plain_ones():
    """Naming fp32 changes no kernel's text, on any target: the default rounds nothing and
    brings no rounding functions; tf32 rounds every staged operand."""
    for k in (k for k in cases() if OPS[k.op].gemm):
        named = Kernel(k.name, k.op, dict(k.params, precision="fp32"), "", 0, k.summary)
        for d in (CUDA, OPENCL, opencl_cpu(8)):
            assert render_kernel(named, d)[0] == render_kernel(k, d)[0], (k.name, d.name)
    conv = next(k for k in cases() if k.op == "conv_fwd")
    tf32 = Kernel(conv.name, conv.op, dict(conv.params, precision="tf32"), "", 0, conv.summary)
    text = render_kernel(tf32, OPENCL)[0]
    assert "CNNC_PRECISION_H" in text and text.count("cnnc_round_tf32(v)") == 2


# (precision, reduction) of each GEMM op's case, in turn: every pair of a precision and the
# shortest or longest reduction of the kernel tests' cases comes twice (a long one runs the
# tensor-core kernel where the target has one)
PAIRS = (("tf32", "shortest"), ("bf16", "longest"), ("bf16", "shortest"), ("tf32", "longest"))


def precision_cases() -> list[Kernel]:
    out = []
    for i, op in enumerate(name for name, spec in OPS.items() if spec.gemm):
        mine = sorted((k for k in cases() if k.op == op), key=lambda k: OPS[op].gemm(k.params)["K"])
        precision, which = PAIRS[i % len(PAIRS)]
        k = mine[0] if which == "shortest" else mine[-1]
        out.append(Kernel(f"{k.name}_{precision}", op, dict(k.params, precision=precision), "", 0, k.summary))
    return out


@pytest.fixture(scope="module")
def rounded_kernels():
    """One OpenCL backend with the GPU-shaped kernels of every precision case and, where the CPU
    target has one, its CPU-shaped kernel too."""
    from cnnc.backends.opencl import OpenCLBackend
    kernels = precision_cases()
    source, launches = render_source(kernels, OPENCL, "test", "", "precision cases")
    for k in kernels:
        k.launch["opencl"] = launches[k.name]
    cpu = [k for k in kernels if cpu_kernel(k, 8)]
    cpu_source, cpu_launches = render_source(cpu, opencl_cpu(8), "test", "", "precision cases, CPU")
    for k in cpu:
        k.launch["opencl-cpu"] = cpu_launches[k.name]
    with pytest.MonkeyPatch.context() as m:
        m.setenv("CNNC_OPENCL_TARGET", "cpu")
        cpu_backend = OpenCLBackend({0: source}, [0], cpu_sources={0: cpu_source}, cpu_width=8)
    return OpenCLBackend({0: source}, [0]), cpu_backend, {k.name: k for k in kernels}


@pytest.mark.parametrize("name", [k.name for k in precision_cases()])
def test_rounded_kernel_matches_the_rounded_reference(rounded_kernels, name):
    """Products of rounded operands are exact in float32, so a rounded kernel agrees with the
    rounded reference as closely as fp32 kernels agree with theirs (check_kernel's tolerance),
    on the GPU-shaped kernel and on the CPU target's."""
    gpu_shaped, cpu_target, kernels = rounded_kernels
    check_kernel(gpu_shaped, kernels[name])
    if cpu_kernel(kernels[name], 8):
        check_kernel(cpu_target, kernels[name])


@pytest.mark.parametrize("name", [k.name for k in precision_cases() if "bwd" in k.op])
def test_rounding_stays_within_its_bound_and_shows(name):
    """The rounded reference is within the precision's error bound of the fp32 one, each output
    within 2u+u^2 of the sum of |products| (u the precision's unit roundoff), and differs from it
    by more than check_kernel's tolerance, so a kernel that did not round would fail above."""
    k = next(k for k in precision_cases() if k.name == name)
    precision = k.params["precision"]
    plain = {key: v for key, v in k.params.items() if key != "precision"}
    vals = inputs_for(k, np.random.default_rng(stable_seed(name)))
    out = next(a for a, role in OPS[k.op].args if role.value == "out")
    ins = [a for a in OPS[k.op].arg_names if a != out]

    def run(params, values):
        arrays = {a: np.asarray(values[a], np.float64) for a in ins}
        arrays[out] = np.zeros(vals[out].size)
        REFERENCE_OPS[k.op](dict(params, accumulate=False), *[arrays[a] for a in OPS[k.op].arg_names])
        return arrays[out]

    rounded, exact = run(k.params, vals), run(plain, vals)
    bound = run(plain, {a: np.abs(v) for a, v in vals.items() if a in ins})
    u = UNIT_ROUNDOFF[precision]
    assert (np.abs(rounded - exact) <= (2 * u + u * u) * bound * (1 + 1e-9)).all()
    scale = max(float(np.abs(exact).max()), 1.0)
    assert np.abs(rounded - exact).max() > 1e-4 * scale


# ---------------------------------------------------------------------------- whole networks

TF32 = {"seed = 5;": "seed = 5; precision = tf32;"}


def tf32_source(placement: dict) -> str:
    text = source(placement)
    for old, new in TF32.items():
        text = replace_once(text, old, new)
    return text


@pytest.fixture(scope="module")
def tf32_single(tmp_path_factory):
    return train(tf32_source({}), "reference", 3, tmp_path_factory.mktemp("tf32"))


def largest_change(a: dict, b: dict) -> float:
    """max |a - b| over every parameter, relative to the network's largest parameter: a value
    whose tf32 rounding falls the other way after a differently ordered fp32 sum moves a product
    by 2^-11 of itself, which a small parameter (a bias near zero) cannot be measured against."""
    return max(float(np.abs(a[n] - b[n]).max()) for n in a) / max(float(np.abs(w).max()) for w in a.values())


def test_tf32_network_trains_alike_on_reference_and_opencl(tf32_single, tmp_path):
    """Three steps: max |dw| <= 1e-5 max |w|; and tf32 really changed the training, by more than
    that (it is not the fp32 run)."""
    _, want, _, _ = tf32_single
    _, got, _, _ = train(tf32_source({}), "opencl", 3, tmp_path, gpus=[0])
    assert largest_change(want, got) <= 1e-5
    _, fp32, _, _ = train(source({}), "reference", 3, tmp_path)
    assert largest_change(want, fp32) > 1e-5


@pytest.mark.parametrize("name", ["data-2", "hybrid-4-to-1"])
def test_tf32_placement_equals_the_single_device(tf32_single, name, tmp_path):
    assert_same_training(tf32_single, train(tf32_source(PLACEMENTS[name]), "reference", 3, tmp_path))


def test_torch_twin_reports_its_precision():
    """On a CPU PyTorch has no TF32: its side is fp32, and the report says so."""
    torch = pytest.importorskip("torch")
    from cnnc.bench_torch import match_precision
    net = check(parse(H + "train { precision = tf32 }\n" + BODY, "t.cnn"))
    said, _ = match_precision(torch, net, "cpu")
    assert said.startswith("fp32") and "tf32" in said
    said, _ = match_precision(torch, check(parse(H + BODY, "t.cnn")), "cpu")
    assert said == "fp32"
    mixed = check(parse(replace_once(H + BODY, "relu", "relu { precision = bf16 }"), "t.cnn"))
    said, _ = match_precision(torch, mixed, "cpu")
    assert said.startswith("fp32") and "differ" in said
