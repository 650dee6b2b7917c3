"""The `cnnc` command line: output of each command, and clean user errors
(exit status 2, a one-line message first, never a traceback)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

import cnnc
from cnnc.build import load_plan
from cnnc.cli import main

from helpers import replace_once

METRIC_KEYS = {"epoch", "step", "train_loss", "test_error", "test_loss", "images_per_s", "backend", "ranks"}
WEIGHTS = {"conv1.weights": (4, 1, 3, 3), "conv1.biases": (4,), "fc2.weights": (64, 10), "fc2.biases": (10,)}
DIGITS_TRAIN = 1438                  # 80 % of scikit-learn's 1797 digits


def cli(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_user_error(result: Result) -> str:
    """Exit status 2 with a message on stderr and no traceback; returns stderr."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert result.stderr.strip(), "no message"
    return result.stderr


def first_line(text: str) -> str:
    return text.splitlines()[0]


def sh(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnnc.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=120)


# --- compile -----------------------------------------------------------------------


def test_compile_then_up_to_date(tiny_cnn: Path, tmp_path: Path) -> None:
    out = tmp_path / "build"
    result = cli("compile", tiny_cnn, "-o", out, "--no-nvcc")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"compiled tiny: 5 layers, {len(load_plan(out).kernels)} kernels, 1 device(s) -> {out}/"
    assert lines[1].split() == ["gpu0.cu", "gpu0.cl", "gpu0.cpu.cl", "source.cnn", "plan.json", "manifest.json"]
    assert re.fullmatch(r"  stages: parse \d+ ms, check \d+ ms, plan \d+ ms, generate \d+ ms", lines[2])
    assert "nvcc not found" not in result.stdout          # --no-nvcc asked for no cubins
    assert result.stderr == ""

    again = cli("compile", tiny_cnn, "-o", out, "--no-nvcc")
    assert again.exit_code == 0
    assert again.stdout == f"{out}: up to date\n"

    forced = cli("compile", tiny_cnn, "-o", out, "--no-nvcc", "--force")
    assert forced.exit_code == 0
    assert forced.stdout.startswith("compiled tiny:")


def test_compile_says_when_nvcc_is_missing(tiny_cnn: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import cnnc.build
    monkeypatch.setattr(cnnc.build, "find_nvcc", lambda: None)
    result = cli("compile", tiny_cnn, "-o", tmp_path / "build")
    assert result.exit_code == 0, result.output
    assert "nvcc not found" in result.stdout
    assert not list((tmp_path / "build").glob("*.cubin"))


def test_check_prints_layers_and_shapes(tiny_cnn: Path) -> None:
    result = cli("check", tiny_cnn)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "network tiny: batch 8, 1 epochs, seed 1"
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert list(rows) == ["data", "labels", "conv1", "pool1", "fc2", "probs", "cost"]
    assert rows["data"][:2] == ["input", "1x8x8"]
    assert rows["labels"][:2] == ["input", "label(10)"]
    assert rows["conv1"][:2] == ["conv", "4x8x8"] and "relu" in rows["conv1"]
    assert rows["pool1"][:2] == ["maxpool", "4x4x4"]
    assert rows["fc2"][:2] == ["fc", "10x1x1"]
    assert rows["probs"][:2] == ["softmax", "10x1x1"]
    assert rows["cost"][:2] == ["logreg", "1x1x1"]
    assert all(r[-1] == "@gpu(0)" for name, r in rows.items() if name not in ("data", "labels"))


# --- plan ----------------------------------------------------------------------------


def test_plan_text(tiny_build_dir: Path) -> None:
    result = cli("plan", tiny_build_dir)
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert first_line(text).startswith("network tiny: batch 8 in 1 share(s), ")
    assert "1 logical device(s)" in first_line(text)
    for heading in ("device 0:", "forward:", "backward:", "update:"):
        assert heading in text
    for name in load_plan(tiny_build_dir).kernels:
        assert name in text


def test_plan_json(tiny_build_dir: Path) -> None:
    result = cli("plan", tiny_build_dir, "--json")
    assert result.exit_code == 0, result.output
    s = json.loads(result.stdout)
    assert s["network"] == "tiny" and s["batch"] == 8
    assert s["parameters"] == sum(math.prod(shape) for shape in WEIGHTS.values())
    [dev] = s["devices"]
    assert dev["logical"] == 0
    assert {row["phase"] for row in dev["program"]} == {"forward", "backward", "update", "check"}
    assert [l["name"] for l in s["layers"]] == ["conv1", "pool1", "fc2", "probs", "cost"]
    assert all(l["devices"] == [0] and l["passes"] == 1 for l in s["layers"])
    assert s["transfers"] == [] and set(map(str, s["peak_memory_bytes"])) == {"0"}
    listed = {row["kernel"] for row in dev["program"] if row["op"] == "launch"}
    assert listed == set(load_plan(tiny_build_dir).kernels)
    assert dev["flops_per_step"] > 0


# --- run --------------------------------------------------------------------------------


def test_run_reference_backend(tiny_build_dir: Path, tmp_path: Path) -> None:
    save = tmp_path / "train"
    result = cli("run", tiny_build_dir, "--backend", "reference", "--epochs", "1", "--save-dir", save, "-q")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert result.stdout.startswith("training tiny on reference")
    assert f"metrics: {save / 'metrics.jsonl'}" in result.stdout
    assert sorted(p.name for p in save.iterdir()) == [f"checkpoint-{DIGITS_TRAIN // 8:08d}.npz", "metrics.jsonl",
                                                      "weights.npz"]

    [record] = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert set(record) == METRIC_KEYS
    assert record["epoch"] == 1
    assert record["step"] == DIGITS_TRAIN // 8
    assert record["backend"] == "reference"
    assert 0.0 <= record["test_error"] <= 1.0
    assert record["test_error"] < 0.9                   # one epoch learns something
    assert math.isfinite(record["train_loss"]) and math.isfinite(record["test_loss"])
    assert record["images_per_s"] > 0

    with np.load(save / "weights.npz") as w:      # the parameters, and what cnnc predict needs of the data
        assert {k: w[k].shape for k in w.files} == {**WEIGHTS, "classes": (10,), "mean": (1, 8, 8)}
        assert all(np.isfinite(w[k]).all() for k in WEIGHTS)
        assert list(w["classes"]) == [str(d) for d in range(10)]


def test_run_test_freq_adds_evaluations(tiny_build_dir: Path, tmp_path: Path) -> None:
    save = tmp_path / "train"
    result = cli("run", tiny_build_dir, "--backend", "reference", "--save-dir", save, "--test-freq", "60", "-q")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [60, 120, DIGITS_TRAIN // 8]
    assert all(set(r) == METRIC_KEYS and r["epoch"] == 1 for r in records)


# --- user errors ---------------------------------------------------------------------------


def test_compile_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.cnn"
    err = assert_user_error(cli("compile", missing, "-o", tmp_path / "out"))
    assert first_line(err) == f"{missing}: error: no such file"
    assert not (tmp_path / "out").exists()


def test_compile_syntax_error(tiny_cnn: Path, tmp_path: Path) -> None:
    text = tiny_cnn.read_text()
    bad = "conv1 = conv(data, filters=4 size=3, padding=1) relu"
    tiny_cnn.write_text(replace_once(text, "conv1 = conv(data, filters=4, size=3, padding=1) relu", bad))
    line = text[:text.index("conv1 =")].count("\n") + 1
    col = bad.index("size") + 1
    err = assert_user_error(cli("compile", tiny_cnn, "-o", tmp_path / "out"))
    assert first_line(err).startswith(f"{tiny_cnn}:{line}:{col}: error:")
    assert bad in err                                     # the source line is quoted


def test_compile_check_error(tiny_cnn: Path, tmp_path: Path) -> None:
    text = tiny_cnn.read_text()
    tiny_cnn.write_text(replace_once(text, "fc(pool1,", "fc(pool9,"))
    line = text[:text.index("fc2 =")].count("\n") + 1
    err = assert_user_error(cli("compile", tiny_cnn, "-o", tmp_path / "out"))
    assert re.match(rf"{re.escape(str(tiny_cnn))}:{line}:\d+: error: .*pool9", first_line(err))


def test_compile_bad_arch(tiny_cnn: Path, tmp_path: Path) -> None:
    err = assert_user_error(cli("compile", tiny_cnn, "-o", tmp_path / "out", "--arch", "sm_80,sm_50"))
    assert first_line(err).startswith("--arch: error:") and "sm_50" in first_line(err)


def test_compile_output_below_a_file(tiny_cnn: Path, tmp_path: Path) -> None:
    err = assert_user_error(cli("compile", tiny_cnn, "-o", tiny_cnn / "build", "--no-nvcc"))
    assert "error:" in first_line(err)
    assert tiny_cnn.read_text().startswith("# tiny test network")


def test_run_missing_build_dir(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    err = assert_user_error(cli("run", missing, "--backend", "reference"))
    assert first_line(err) == f"{missing}: error: no such build directory"
    assert "cnnc compile" in err


def test_run_dir_without_plan(tmp_path: Path) -> None:
    err = assert_user_error(cli("run", tmp_path, "--backend", "reference"))
    assert first_line(err) == f"{tmp_path}: error: not a build directory: plan.json is missing"


def test_run_damaged_plan(tmp_path: Path) -> None:
    (tmp_path / "plan.json").write_text('{"network": "tiny", ')
    err = assert_user_error(cli("plan", tmp_path))
    assert first_line(err).startswith(f"{tmp_path / 'plan.json'}: error: plan.json is damaged")
    err = assert_user_error(cli("run", tmp_path, "--backend", "reference"))
    assert "plan.json is damaged" in first_line(err)


def test_run_unknown_backend(tiny_build_dir: Path) -> None:
    err = assert_user_error(cli("run", tiny_build_dir, "--backend", "nosuch"))
    assert "Error: Invalid value for '--backend': 'nosuch'" in err


@pytest.mark.parametrize("gpus", ["a,b", "-1", ","])
def test_run_bad_gpus(gpus: str, tiny_build_dir: Path) -> None:
    err = assert_user_error(cli("run", tiny_build_dir, "--backend", "reference", f"--gpus={gpus}"))
    assert "Error: Invalid value for '--gpus'" in err


def test_run_missing_data(tiny_build_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing.npz"
    save = tmp_path / "train"
    err = assert_user_error(cli("run", tiny_build_dir, "--backend", "reference", "--data", missing,
                                "--save-dir", save))
    assert first_line(err) == (f"error: no such data source: {missing} "
                               "(expected 'digits', a .npz file, a CIFAR-10 batch folder "
                               "or a folder of image class folders)")
    assert not save.exists()


def test_run_data_of_the_wrong_shape(tiny_build_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "colour.npz"
    rng = np.random.default_rng(0)
    np.savez(data, train_x=rng.random((16, 3, 4, 4), dtype=np.float32), train_y=np.arange(16) % 10,
             test_x=rng.random((8, 3, 4, 4), dtype=np.float32), test_y=np.arange(8) % 10)
    save = tmp_path / "train"
    result = cli("run", tiny_build_dir, "--backend", "reference", "--data", data, "--save-dir", save, "-q")
    err = assert_user_error(result)
    assert first_line(err) == "error: colour: images are 3x4x4 but the network 'tiny' takes 1x8x8"
    assert "training" not in result.stdout               # rejected before training is announced
    assert not save.exists()


def test_version() -> None:
    result = cli("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"cnnc, version {cnnc.__version__}"


# --- real processes: exit statuses and stderr as a shell sees them ---------------------------


def test_process_compile(tiny_cnn: Path, tmp_path: Path) -> None:
    out = tmp_path / "build"
    proc = sh("compile", tiny_cnn.name, "-o", "build", "--no-nvcc", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.startswith("compiled tiny:")
    assert (out / "plan.json").is_file()


def test_process_user_errors(tiny_cnn: Path, tmp_path: Path) -> None:
    tiny_cnn.write_text(replace_once(tiny_cnn.read_text(), "filters=4,", "filters=4"))
    proc = sh("compile", tiny_cnn.name, "-o", "build", cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert re.match(r"tiny\.cnn:\d+:\d+: error: ", proc.stderr)
    assert proc.stdout == ""

    proc = sh("run", "nowhere", "--backend", "reference", cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert first_line(proc.stderr) == "nowhere: error: no such build directory"


def test_run_multi_device_plan_defaults_to_device_0(tmp_path: Path) -> None:
    src = tmp_path / "two.cnn"
    src.write_text("network two\ninput data: 1x8x8\ninput labels: label(10)\ntrain { batch = 8 }\n"
                   "@gpu(0,1) c1 = conv(data, filters=4, size=3, padding=1) relu\n"
                   "@gpu(1) f2 = fc(c1, outputs=10)\nprobs = softmax(f2)\ncost = logreg(labels, probs)\n")
    build = tmp_path / "b"
    assert cli("compile", src, "-o", build, "--no-nvcc").exit_code == 0
    result = cli("run", build, "--backend", "reference", "--epochs", "1", "-q", "--save-dir", tmp_path / "r")
    assert result.exit_code == 0, result.output
    assert "note: 2 logical devices share device 0" in result.stderr
    err = assert_user_error(cli("run", build, "--backend", "reference", "--gpus", "0"))
    assert "the plan uses logical device 1 but --gpus lists only 1 device(s)" in first_line(err)


def test_export_writes_parameters_and_data_metadata_that_init_accepts(tiny_build_dir: Path, tmp_path: Path) -> None:
    save = tmp_path / "train"
    assert cli("run", tiny_build_dir, "--backend", "reference", "--epochs", "1", "--save-dir", save,
               "-q").exit_code == 0
    out = tmp_path / "exported.npz"
    result = cli("export", save, "-o", out)
    assert result.exit_code == 0, result.output
    assert result.output == f"wrote 4 arrays to {out}: {', '.join(sorted(WEIGHTS))}\n"
    with np.load(out) as exported, np.load(save / "weights.npz") as saved:
        assert sorted(exported.files) == sorted(saved.files) == sorted([*WEIGHTS, "classes", "mean"])
        for k in exported.files:
            assert np.array_equal(exported[k], saved[k])
    again = tmp_path / "again"
    result = cli("run", tiny_build_dir, "--backend", "reference", "--epochs", "1", "--save-dir", again,
                 "--init", out, "-q")
    assert result.exit_code == 0, result.output
