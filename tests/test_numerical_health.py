"""Numerical health: a diverging run stops with exit status 3 and says where it went wrong,
nothing non-finite reaches weights.npz or metrics.jsonl, a NaN case counts as an error, and
numbers that no 32-bit float can hold are refused where they are written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

from cnnc.backends.reference_ops import REFERENCE_OPS
from cnnc.cli import main
from cnnc.ops import OPS, Role
from cnnc.plan.schedule import Buffer, Kernel
from helpers import GROWING, replace_once

BACKENDS = ["reference", "opencl"]


def cli(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def compile_source(tmp_path: Path, source: str, name: str = "net") -> Path:
    src = tmp_path / f"{name}.cnn"
    src.write_text(source)
    out = tmp_path / f"{name}-build"
    result = cli("compile", src, "-o", out, "--no-nvcc")
    assert result.exit_code == 0, result.output
    return out


def diverged(result: Result) -> str:
    """Exit status 3, one line on stderr, no traceback; returns the line."""
    assert result.exit_code == 3, (result.exit_code, result.output)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    [line] = result.stderr.strip().splitlines()
    return line


def metrics(save: Path) -> list[dict]:
    """Every line of metrics.jsonl, read as strict JSON (NaN and Infinity are not JSON)."""
    def refuse(constant: str):
        raise AssertionError(f"metrics.jsonl holds {constant}")
    return [json.loads(line, parse_constant=refuse) for line in (save / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def growing(tmp_path: Path) -> tuple[Path, Path]:
    """The build of GROWING and its data: 16 identical training images, 8 test images."""
    x = np.ones((16, 1, 8, 8), np.float32)
    y = np.zeros(16, np.int32)
    data = tmp_path / "ones.npz"
    np.savez(data, train_x=x, train_y=y, test_x=x[:8], test_y=y[:8])
    return compile_source(tmp_path, GROWING, "grow"), data


@pytest.mark.parametrize("backend", BACKENDS)
def test_divergence_stops_with_status_3_and_keeps_the_last_finite_save(growing, tmp_path, backend):
    build, data = growing
    save = tmp_path / "run"
    line = diverged(cli("run", build, "--backend", backend, "--data", data, "--save-dir", save, "-q"))
    assert line == ("error: training diverged at step 99 (epoch 50): the loss is inf; first non-finite value: "
                    f"layer 'cost' (forward, loss); {save / 'weights.npz'} holds epoch 49")
    records = metrics(save)
    assert [r["epoch"] for r in records] == list(range(1, 50))
    last = records[-1]                  # epoch 49's test loss already overflows
    assert last["test_loss"] is None and last["nonfinite"] == ["test_loss"]
    assert all("nonfinite" not in r for r in records[:-2])
    with np.load(save / "weights.npz") as z:
        saved = {k: z[k] for k in z.files}
    assert all(np.isfinite(v).all() for v in saved.values())
    if backend == "reference":          # the file is exactly what a run stopping after epoch 49 saves
        again = tmp_path / "again"
        result = cli("run", build, "--backend", backend, "--data", data, "--save-dir", again, "--epochs", "49", "-q")
        assert result.exit_code == 0, result.output
        with np.load(again / "weights.npz") as z:
            assert all(np.array_equal(z[k], saved[k]) for k in z.files)


@pytest.mark.parametrize("backend", BACKENDS)
def test_divergence_in_the_first_epoch_leaves_weights_from_before_untouched(tmp_path, tiny_source, backend):
    build = compile_source(tmp_path, replace_once(tiny_source, "lr = 0.05", "lr = 1e30"))
    save = tmp_path / "run"
    save.mkdir()
    (save / "weights.npz").write_bytes(b"an earlier run's parameters")
    line = diverged(cli("run", build, "--backend", backend, "--save-dir", save, "-q"))
    assert line == ("error: training diverged at step 2 (epoch 1): the loss is nan; first non-finite value: "
                    f"layer 'fc2' (forward output); {save / 'weights.npz'} was not written")
    assert (save / "weights.npz").read_bytes() == b"an earlier run's parameters"
    assert not (save / "metrics.jsonl").exists()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_parameter_that_overflows_in_its_update_is_caught_on_the_device(tmp_path, tiny_source, backend):
    """The loss of step 1 is still finite: only the check after the updates can see it."""
    build = compile_source(tmp_path, replace_once(tiny_source, "lr = 0.05", "lr = 3e38; weight_decay = 1000"))
    save = tmp_path / "run"
    line = diverged(cli("run", build, "--backend", backend, "--save-dir", save, "-q"))
    assert line == ("error: training diverged at step 1 (epoch 1): a parameter is not finite after the update; "
                    f"first non-finite value: layer 'conv1' (update, its weights); {save / 'weights.npz'} "
                    "was not written")
    assert not (save / "weights.npz").exists()


# -- a NaN case is an error, on the reference and in the kernels alike ------------------------

def error_count_kernels() -> list[Kernel]:
    return [Kernel("nan_logreg_top1", "logreg_fwd", dict(N=4, C=3, top_k=1), "", 0, "top-1"),
            Kernel("nan_logreg_top3", "logreg_fwd", dict(N=4, C=3, top_k=3), "", 0, "top-k = classes"),
            Kernel("nan_crossent", "crossent_fwd", dict(N=4, C=3), "", 0, "cross-entropy"),
            Kernel("nan_flag", "nonfinite", dict(n=5), "", 0, "parameter check")]


# cases: all NaN; only the label's probability NaN; another class NaN; a healthy, right case
PROBS = np.array([[np.nan] * 3, [0.2, np.nan, 0.3], [0.5, 0.2, np.nan], [0.1, 0.7, 0.2]], np.float32)
LABELS = np.array([0, 1, 0, 1], np.int32)
TARGETS = np.eye(3, dtype=np.float32)[LABELS]


def error_count_inputs(k: Kernel) -> dict[str, np.ndarray]:
    if k.op == "nonfinite":
        return {"x": np.array([0.0, 1.0, -np.inf, 2.0, 3.0], np.float32), "flag": np.zeros(1, np.int32)}
    out = {"probs": PROBS.reshape(-1), "loss": np.zeros(4, np.float32), "correct": np.full(4, 7, np.float32)}
    out.update({"labels": LABELS} if k.op == "logreg_fwd" else {"targets": TARGETS.reshape(-1)})
    return out


EXPECTED = {"nan_logreg_top1": [0, 0, 0, 1], "nan_logreg_top3": [0, 0, 1, 1], "nan_crossent": [0, 0, 0, 1]}


@pytest.mark.parametrize("k", error_count_kernels(), ids=lambda k: k.name)
def test_reference_counts_a_nan_case_as_wrong(k):
    vals = error_count_inputs(k)
    REFERENCE_OPS[k.op](k.params, *[vals[n] for n in OPS[k.op].arg_names])
    if k.op == "nonfinite":
        assert vals["flag"].tolist() == [1]
    else:
        assert vals["correct"].tolist() == EXPECTED[k.name]


def test_opencl_kernels_count_errors_as_the_reference_does():
    from cnnc.backends.opencl import OpenCLBackend
    from cnnc.codegen.dialect import OPENCL
    from cnnc.codegen.render import render_source

    kernels = error_count_kernels()
    source, launches = render_source(kernels, OPENCL, "test", "", "NaN error counts")
    for k in kernels:
        k.launch["opencl"] = launches[k.name]
    backend = OpenCLBackend({0: source}, [0])
    for k in kernels:
        vals, ref = error_count_inputs(k), error_count_inputs(k)
        REFERENCE_OPS[k.op](k.params, *[ref[n] for n in OPS[k.op].arg_names])
        handles = {}
        for n, v in vals.items():
            buf = Buffer(n, 0, v.size, "i32" if v.dtype == np.int32 else "f32", "test", "")
            handles[n] = buf, backend.alloc(buf, 0)
            backend.upload(handles[n][1], v)
        backend.launch(k, 0, [handles[n][1] for n in OPS[k.op].arg_names])
        backend.synchronize()
        for n, role in OPS[k.op].args:
            if role is not Role.IN:
                got = backend.download(handles[n][1], handles[n][0])
                if n == "loss":
                    np.testing.assert_allclose(got, ref[n], rtol=1e-6, err_msg=k.name)
                else:
                    assert got.tolist() == ref[n].tolist(), (k.name, n)


# -- numbers that no 32-bit float can hold ------------------------------------------------

@pytest.mark.parametrize("old, new, where, number", [
    ("lr = 0.05", "lr = 1e400", "11:8", "1e400"),
    ("lr = 0.05", "lr = 1e39", "11:8", "1e39"),          # finite in Python, infinite as a float32
    ("outputs=10, init_w=0.01)", "outputs=10, init_w=-1e39)", "17:36", "-1e39"),
    ("padding=1) relu", "padding=1) tanh[1e400, 1]", "15:55", "1e400"),
])
def test_numbers_out_of_float32_range_are_located_errors(tmp_path, tiny_source, old, new, where, number):
    src = tmp_path / "tiny.cnn"
    src.write_text(replace_once(tiny_source, old, new))
    result = cli("check", src)
    assert result.exit_code == 2, result.output
    line, column = map(int, where.split(":"))
    text = src.read_text().splitlines()[line - 1]
    assert result.stderr.splitlines() == [
        f"{src}:{where}: error: number {number} is out of range: numbers must be finite 32-bit floats, "
        "at most 3.4028235e+38 in magnitude",
        f"{line:5d} | {text}",
        "      | " + " " * (column - 1) + "^" + "~" * (len(number) - 1)]


def test_a_derived_kernel_constant_out_of_range_is_an_error(tmp_path, tiny_source):
    src = tmp_path / "tiny.cnn"
    src.write_text(tiny_source + "cost2 = sum2(fc2, coeff=3e38)\n")
    result = cli("compile", src, "-o", tmp_path / "build", "--no-nvcc")
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (f"{src}:20:1: error: layer 'cost2' needs the constant 6e+38 in its kernel "
                                     "cost2_sum2_bwd_n8_d10, more than a 32-bit float holds")


def test_init_values_that_overflow_float32_are_refused(tmp_path, tiny_build_dir):
    values = {"conv1.weights": np.zeros((4, 1, 3, 3)), "conv1.biases": np.zeros(4),
              "fc2.weights": np.zeros((64, 10)), "fc2.biases": np.full(10, 1e39)}      # float64, finite
    init = tmp_path / "big.npz"
    np.savez(init, **values)
    result = cli("run", tiny_build_dir, "--backend", "reference", "--init", init, "--save-dir", tmp_path / "r")
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (f"error: {init}: array 'fc2.biases' holds values too large for float32 "
                                     "(largest magnitude 1e+39)")
    assert not (tmp_path / "r").exists()
