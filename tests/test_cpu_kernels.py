"""The CPU target of the OpenCL backend: gpu<k>.cpu.cl, its kernels and how a run picks them.

The CPU-shaped kernels (templates/cpu_*.j2) must compute what the reference computes for
the same kernel cases as the GPU-shaped ones (tests/test_kernels_opencl.py), at every vector
width the device can run; `cnnc compile --cpu-width` fixes the width, and `cnnc run` refuses
a width the device does not prefer."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

from cnnc.backends.reference_ops import REFERENCE_OPS
from cnnc.cli import main
from cnnc.codegen.dialect import CPU_WIDTHS, OPENCL, opencl_cpu
from cnnc.codegen.render import cpu_kernel, render_source
from cnnc.ops import OPS, Role
from cnnc.plan.schedule import Buffer

from helpers import stable_seed
from test_kernels_opencl import cases, inputs_for


def cli(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def _device_width() -> int:
    from cnnc.backends.opencl import _pick_device, device_vector_width
    return device_vector_width(_pick_device())


# the widest width and the narrowest one (one vector of outputs per block) the device runs
WIDTHS = sorted({max(w for w in CPU_WIDTHS if w <= max(_device_width(), 4)), 4}, reverse=True)


def cpu_cases(width: int):
    return [k for k in cases() if cpu_kernel(k, width)]


@pytest.fixture(scope="module", params=WIDTHS, ids=lambda w: f"float{w}")
def cpu_device(request):
    """One backend running the CPU-shaped kernels of every case at one width."""
    from cnnc.backends.opencl import OpenCLBackend
    width = request.param
    kernels = cpu_cases(width)
    cpu_source, cpu_launches = render_source(kernels, opencl_cpu(width), "test", "", "CPU kernel cases")
    source, launches = render_source(kernels, OPENCL, "test", "", "GPU-shaped kernel cases")
    for k in kernels:
        k.launch["opencl"], k.launch["opencl-cpu"] = launches[k.name], cpu_launches[k.name]
    with pytest.MonkeyPatch.context() as m:
        m.setenv("CNNC_OPENCL_TARGET", "cpu")
        backend = OpenCLBackend({0: source}, [0], cpu_sources={0: cpu_source}, cpu_width=width)
    assert backend.cpu
    return backend, {k.name: k for k in kernels}, cpu_source


# the ops with a CPU kernel: the GEMM-shaped ones, and those that loop over planes or pixel vectors
CPU_OPS = ("conv_fwd", "conv_bwd_data", "conv_bwd_filter", "fc_fwd", "fc_bwd_data", "fc_bwd_filter",
           "local_fwd", "local_bwd_data", "local_bwd_filter", "pool_fwd", "pool_bwd", "cmrnorm_fwd", "cmrnorm_bwd",
           "rnorm_fwd", "rnorm_bwd", "cnorm_meandiff",
           "cnorm_fwd", "cnorm_bwd_prep", "cnorm_bwd")


def test_the_cases_have_cpu_kernels():
    """Every conv case (any stride, split-K too), fc, local, pooling and normalisation case of the
    GPU kernel matrix gets a CPU kernel: work-groups of one, no barriers."""
    for width in WIDTHS:
        kernels = cpu_cases(width)
        covered = [k for k in cases() if k.op in CPU_OPS]
        assert [k.name for k in kernels] == [k.name for k in covered]
        assert {k.op for k in kernels} == set(CPU_OPS)
        source, launches = render_source(kernels, opencl_cpu(width), "test", "", "cases")
        assert "barrier(" not in source and f"float{width} acc0_0" in source
        assert f"vload{width}(0, x + at" in source         # cmrnorm: vectors of pixels
        assert all(launches[k.name]["block"] == [1, 1, 1] and launches[k.name]["width"] == width for k in kernels)


def _run(backend, k, vals: dict) -> dict:
    """Kernel `k`'s outputs on `backend` from inputs `vals`."""
    handles = {}
    for n in OPS[k.op].arg_names:
        buf = Buffer(n, 0, vals[n].size, "f32", "test", "")
        handles[n] = (buf, backend.alloc(buf, 0))
        backend.upload(handles[n][1], vals[n])
    backend.launch(k, 0, [handles[n][1] for n in OPS[k.op].arg_names])
    return {n: backend.download(handles[n][1], handles[n][0])
            for n, role in OPS[k.op].args if role in (Role.OUT, Role.INOUT)}


@pytest.mark.parametrize("name", [k.name for k in cpu_cases(16)])
def test_cpu_kernel_matches_reference(cpu_device, name):
    backend, kernels, _ = cpu_device
    k = kernels[name]
    rng = np.random.default_rng(stable_seed(name))
    vals = inputs_for(k, rng)
    ref = {n: v.copy() for n, v in vals.items()}
    REFERENCE_OPS[k.op](k.params, *[ref[n] for n in OPS[k.op].arg_names])
    for n, got in _run(backend, k, vals).items():
        scale = max(float(np.abs(ref[n]).max()), 1.0)
        np.testing.assert_allclose(got, ref[n], rtol=1e-4, atol=1e-5 * scale, err_msg=f"{k.op} {k.params}")


@pytest.fixture(scope="module")
def gpu_shaped_device():
    """A backend running the GPU-shaped kernels of the pooling cases on the same device."""
    from cnnc.backends.opencl import OpenCLBackend
    kernels = [k for k in cpu_cases(WIDTHS[0]) if k.op.startswith("pool")]
    source, launches = render_source(kernels, OPENCL, "test", "", "GPU-shaped pooling cases")
    for k in kernels:
        k.launch["opencl"] = launches[k.name]
    with pytest.MonkeyPatch.context() as m:
        m.setenv("CNNC_OPENCL_TARGET", "gpu")
        backend = OpenCLBackend({0: source}, [0])
    assert not backend.cpu
    return backend, {k.name: k for k in kernels}


@pytest.mark.parametrize("name", [k.name for k in cpu_cases(16) if k.op.startswith("pool")])
def test_cpu_pooling_is_the_gpu_shaped_pooling_to_the_bit(cpu_device, gpu_shaped_device, name):
    """Each input pixel adds its windows' terms in pool.j2's order, so the CPU kernels' gradients
    (ties included: x holds repeated values) are the GPU-shaped kernels' bit for bit, every run."""
    backend, kernels, _ = cpu_device
    gpu_backend, gpu_kernels = gpu_shaped_device
    rng = np.random.default_rng(stable_seed(name))
    vals = inputs_for(kernels[name], rng)
    vals["x"] = np.round(vals["x"] * 2).astype(np.float32)      # ties in most windows
    if kernels[name].op == "pool_bwd":
        REFERENCE_OPS["pool_fwd"](kernels[name].params, vals["x"], vals["y"])
    want = _run(gpu_backend, gpu_kernels[name], vals)
    for _ in range(2):
        got = _run(backend, kernels[name], {n: v.copy() for n, v in vals.items()})
        for n in want:
            np.testing.assert_array_equal(got[n], want[n], err_msg=name)


def test_compile_writes_cpu_kernels_of_the_chosen_width(tiny_cnn, tmp_path):
    """--cpu-width fixes the vector type of gpu0.cpu.cl and is recorded with each CPU launch;
    the GPU-shaped gpu0.cl and gpu0.cu stay what they are."""
    wide, narrow = tmp_path / "w16", tmp_path / "w8"
    assert cli("compile", tiny_cnn, "-o", wide, "--no-nvcc", "--cpu-width", "16").exit_code == 0
    result = cli("compile", tiny_cnn, "-o", narrow, "--no-nvcc", "--cpu-width", "8")
    assert result.exit_code == 0, result.output
    assert "gpu0.cpu.cl" in result.output
    for name in ("gpu0.cl", "gpu0.cu"):
        assert (wide / name).read_text() == (narrow / name).read_text()
    assert "float8 acc0_0" in (narrow / "gpu0.cpu.cl").read_text()
    kernels = json.loads((narrow / "plan.json").read_text())["kernels"]
    cpu = [k for k in kernels if "opencl-cpu" in k["launch"]]
    assert {k["op"] for k in cpu} == {"conv_fwd", "conv_bwd_filter", "fc_fwd", "fc_bwd_data", "fc_bwd_filter",
                                      "pool_fwd", "pool_bwd"}
    assert all(k["launch"]["opencl-cpu"]["width"] == 8 and k["launch"]["opencl-cpu"]["block"] == [1, 1, 1]
               for k in cpu)


def test_compile_refuses_other_widths(tiny_cnn, tmp_path):
    result = cli("compile", tiny_cnn, "-o", tmp_path / "b", "--no-nvcc", "--cpu-width", "32")
    assert result.exit_code == 2 and "'32' is not one of '16', '8', '4'" in result.output


def test_run_refuses_a_width_the_device_lacks(tiny_cnn, tmp_path, monkeypatch):
    """A build made for AVX-512 (16 floats) on a CPU that prefers 8 (AVX2): one line, exit 2."""
    import cnnc.backends.opencl as opencl
    out = tmp_path / "b"
    assert cli("compile", tiny_cnn, "-o", out, "--no-nvcc", "--cpu-width", "16").exit_code == 0
    monkeypatch.setenv("CNNC_OPENCL_TARGET", "cpu")
    monkeypatch.setattr(opencl, "device_vector_width", lambda device: 8)
    result = cli("run", out, "--backend", "opencl", "-q", "--save-dir", tmp_path / "run")
    assert result.exit_code == 2, result.output
    device = opencl._pick_device().name.strip()
    assert result.stderr == (f"error: this build's CPU kernels use vectors of 16 floats, but {device} prefers 8; "
                             f"recompile with cnnc compile --cpu-width 8, or run with CNNC_OPENCL_TARGET=gpu\n")
    monkeypatch.setenv("CNNC_OPENCL_TARGET", "gpu")      # the GPU-shaped kernels need no width
    assert cli("run", out, "--backend", "opencl", "-q", "--save-dir", tmp_path / "run").exit_code == 0


def test_unknown_target_is_refused(tiny_build_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CNNC_OPENCL_TARGET", "fpga")
    result = cli("run", tiny_build_dir, "--backend", "opencl", "-q", "--save-dir", tmp_path / "run")
    assert result.exit_code == 2
    assert result.stderr == "error: CNNC_OPENCL_TARGET='fpga': choose auto, cpu, gpu\n"


def compiled_kernels(tmp_path: Path, text: str) -> tuple[Path, list[dict]]:
    """`text` compiled (without nvcc) into tmp_path/b, and its plan's kernels."""
    source, out = tmp_path / "net.cnn", tmp_path / "b"
    source.write_text(text)
    assert cli("compile", source, "-o", out, "--no-nvcc").exit_code == 0
    return out, json.loads((out / "plan.json").read_text())["kernels"]


def assert_targets_train_alike(build: Path, tmp_path: Path, monkeypatch) -> None:
    """One epoch of `build` on OpenCL with the CPU kernels and with the GPU-shaped ones ends
    with the same losses, up to rounding."""
    losses = {}
    for target in ("cpu", "gpu"):
        monkeypatch.setenv("CNNC_OPENCL_TARGET", target)
        result = cli("run", build, "--backend", "opencl", "-q", "--save-dir", tmp_path / target)
        assert result.exit_code == 0, result.output
        losses[target] = [json.loads(line)["train_loss"] for line in (tmp_path / target / "metrics.jsonl").open()]
    np.testing.assert_allclose(losses["cpu"], losses["gpu"], rtol=1e-4)


def test_cpu_and_gpu_targets_train_alike(tiny_cnn, tmp_path, monkeypatch):
    """One epoch of the tiny network with each target: the same losses up to rounding."""
    out = tmp_path / "b"
    assert cli("compile", tiny_cnn, "-o", out, "--no-nvcc").exit_code == 0
    assert_targets_train_alike(out, tmp_path, monkeypatch)


STRIDED_SOURCE = """\
network strided

input data: 1x8x8
input labels: label(10)

train {
  batch = 32
  epochs = 1
  seed = 1
  lr = 0.05
}

conv1 = conv(data, filters=8, size=3, padding=1) relu
conv2 = conv(conv1, filters=16, size=3, stride=2, padding=1) relu
fc3 = fc(conv2, outputs=10)
probs = softmax(fc3)
cost = logreg(labels, probs)
"""


def test_strided_and_split_k_gradients_train_alike_on_both_targets(tmp_path, monkeypatch):
    """A stride-2 conv's input gradient and a split-K weight gradient run as CPU kernels, and
    an epoch with them ends with the losses of the GPU-shaped kernels, up to rounding."""
    out, kernels = compiled_kernels(tmp_path, STRIDED_SOURCE)
    on_cpu = {(k["op"], k["params"].get("stride"), k["params"].get("split", 1))
              for k in kernels if "opencl-cpu" in k["launch"]}
    assert {("conv_bwd_data", 2, 1), ("conv_bwd_filter", 1, 2), ("conv_bwd_filter", 2, 1)} <= on_cpu
    assert_targets_train_alike(out, tmp_path, monkeypatch)


LOCAL_SOURCE = """\
network local

input data: 1x8x8
input labels: label(10)

train {
  batch = 24
  epochs = 1
  seed = 1
  lr = 0.05
}

conv1 = conv(data, filters=8, size=3, padding=1) relu
local2 = local(conv1, filters=20, size=3, padding=1) relu
local3 = local(local2, filters=6, size=3, stride=2) tanh
fc4 = fc(local3, outputs=10)
probs = softmax(fc4)
cost = logreg(labels, probs)
"""


def test_local_layers_train_alike_on_both_targets(tmp_path, monkeypatch):
    """A local layer's three kernels (padded and strided, a partial vector of filters) run as
    CPU kernels, and an epoch with them ends with the losses of the GPU-shaped kernels."""
    out, kernels = compiled_kernels(tmp_path, LOCAL_SOURCE)
    on_cpu = {(k["op"], k["params"]["stride"]) for k in kernels
              if "opencl-cpu" in k["launch"] and k["op"].startswith("local")}
    assert {(op, stride) for op in ("local_fwd", "local_bwd_data", "local_bwd_filter") for stride in (1, 2)} <= on_cpu
    assert_targets_train_alike(out, tmp_path, monkeypatch)
