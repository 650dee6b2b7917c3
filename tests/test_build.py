"""The compiler driver: what a build directory holds, incremental rebuilds,
atomicity, load_plan's errors, and the packaged wheel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from cnnc.build import compile_file, load_plan
from cnnc.build_dir import MARKER
from cnnc.codegen.nvcc import find_nvcc
from cnnc.diagnostics import CompileError
from cnnc.plan.schedule import Plan

from helpers import replace_once

HAVE_NVCC = find_nvcc() is not None
needs_nvcc = pytest.mark.skipif(not HAVE_NVCC, reason="nvcc not found")

SOURCES = {"gpu0.cu", "gpu0.cl", "gpu0.cpu.cl", "source.cnn", "plan.json", "manifest.json"}
CUBINS = {"gpu0.sm_80.cubin", "gpu0.sm_90.cubin", "gpu0.ptx"}     # nvcc's outputs, PTX included

BROKEN = {
    # a missing comma: rejected by the parser
    "syntax": ("conv1 = conv(data, filters=4, size=3, padding=1) relu",
               "conv1 = conv(data, filters=4 size=3, padding=1) relu"),
    # a reference to a layer that does not exist: rejected by the checker
    "undefined": ("fc2 = fc(pool1,", "fc2 = fc(pool9,"),
}


def snapshot(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every entry of a folder with inode, mtime and contents: a rewrite
    (temp file + rename) changes the inode even within one clock tick."""
    out = {}
    for f in sorted(folder.iterdir()):
        st = f.stat()
        out[f.name] = (st.st_ino, st.st_mtime_ns, f.read_bytes())
    return out


def hidden(folder: Path) -> list[str]:
    """Leftovers (temporary files, scratch folders); the build directory's marker belongs there."""
    return [f.name for f in folder.iterdir() if f.name.startswith(".") and f.name != MARKER]


@pytest.fixture(scope="module")
def nvcc_build(tmp_path_factory: pytest.TempPathFactory, tiny_source: str):
    """One build with nvcc for both default architectures (about 2 s)."""
    if not HAVE_NVCC:
        pytest.skip("nvcc not found")
    root = tmp_path_factory.mktemp("nvcc_build")
    src = root / "tiny.cnn"
    src.write_text(tiny_source)
    out = root / "build"
    return src, out, compile_file(src, out)


# --- what a build writes -----------------------------------------------------


def test_build_without_nvcc(tiny_cnn: Path, tmp_path: Path) -> None:
    stages: list[str] = []
    out = tmp_path / "build"
    result = compile_file(tiny_cnn, out, use_nvcc=False, on_stage=stages.append)
    assert not result.up_to_date
    assert result.nvcc is None
    assert {p.name for p in result.files} == SOURCES
    assert {p.name for p in out.iterdir()} == SOURCES | {MARKER}
    assert stages == ["parse", "check", "plan", "generate"]
    assert set(result.stages) == set(stages)
    assert [l.name for l in result.network.layers] == ["conv1", "pool1", "fc2", "probs", "cost"]

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["network"] == "tiny"
    assert manifest["nvcc"] is None and manifest["archs"] == []
    assert set(manifest["files"]) == SOURCES - {"manifest.json"}
    assert set(manifest["kernels"]) == set(result.plan.kernels)
    assert all(k["resources"] == {} for k in manifest["kernels"].values())
    # every kernel got launch geometry for both dialects
    assert all(set(k["launch"]) >= {"cuda", "opencl"} for k in manifest["kernels"].values())
    assert hidden(out) == []


def test_plan_json_round_trips(tiny_build_dir: Path) -> None:
    raw = json.loads((tiny_build_dir / "plan.json").read_text())
    plan = Plan.from_json(raw)
    assert plan.to_json() == raw
    assert Plan.from_json(plan.to_json()).to_json() == raw
    loaded = load_plan(tiny_build_dir)
    assert loaded.to_json() == raw
    assert (loaded.network, loaded.batch, loaded.image_shape, loaded.classes) == ("tiny", 8, (1, 8, 8), 10)
    assert [f"{p.layer}.{p.name}" for p in loaded.parameters] == [
        "conv1.weights", "conv1.biases", "fc2.weights", "fc2.biases"]


def test_generated_sources_name_every_kernel(tiny_build_dir: Path) -> None:
    plan = load_plan(tiny_build_dir)
    cu = (tiny_build_dir / "gpu0.cu").read_text()
    cl = (tiny_build_dir / "gpu0.cl").read_text()
    for name in plan.kernels:
        assert name in cu and name in cl


@needs_nvcc
def test_build_with_nvcc(nvcc_build) -> None:
    src, out, result = nvcc_build
    assert result.nvcc == find_nvcc()
    assert {p.name for p in out.iterdir()} == SOURCES | CUBINS | {MARKER}
    assert {p.name for p in result.files} == SOURCES | CUBINS
    assert all((out / c).stat().st_size > 0 for c in CUBINS)
    assert any(s.startswith("nvcc") for s in result.stages)
    assert hidden(out) == []

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["archs"] == ["sm_80", "sm_90"]
    assert set(manifest["files"]) == (SOURCES | CUBINS) - {"manifest.json"}
    assert set(manifest["kernels"]) == set(result.plan.kernels)
    for name, k in manifest["kernels"].items():
        assert set(k["resources"]) == {"sm_80", "sm_90"}, name
        for arch, r in k["resources"].items():
            assert r["registers"] > 0, (name, arch)
            assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (name, arch, r)


# --- incremental builds -------------------------------------------------------


def test_second_build_is_up_to_date_and_writes_nothing(tiny_cnn: Path, tmp_path: Path) -> None:
    out = tmp_path / "build"
    first = compile_file(tiny_cnn, out, use_nvcc=False)
    before = snapshot(out)
    again = compile_file(tiny_cnn, out, use_nvcc=False)
    assert again.up_to_date
    assert again.files == []
    assert again.plan.to_json() == first.plan.to_json()
    assert snapshot(out) == before


@needs_nvcc
def test_nvcc_build_is_up_to_date(nvcc_build) -> None:
    src, out, _ = nvcc_build
    before = snapshot(out)
    again = compile_file(src, out)
    assert again.up_to_date
    assert snapshot(out) == before


def test_force_rebuilds(tiny_cnn: Path, tmp_path: Path) -> None:
    out = tmp_path / "build"
    compile_file(tiny_cnn, out, use_nvcc=False)
    ino = (out / "plan.json").stat().st_ino
    result = compile_file(tiny_cnn, out, use_nvcc=False, force=True)
    assert not result.up_to_date
    assert (out / "plan.json").stat().st_ino != ino
    assert hidden(out) == []


def test_changed_source_rebuilds(tiny_cnn: Path, tmp_path: Path) -> None:
    out = tmp_path / "build"
    first = compile_file(tiny_cnn, out, use_nvcc=False)
    tiny_cnn.write_text(replace_once(tiny_cnn.read_text(), "filters=4", "filters=6"))
    second = compile_file(tiny_cnn, out, use_nvcc=False)
    assert not second.up_to_date
    assert second.network.layers[0].shape != first.network.layers[0].shape
    assert load_plan(out).to_json() == second.plan.to_json()
    shapes = {p.export_name: p.shape for p in load_plan(out).parameters}
    assert shapes["conv1.weights"] == (6, 1, 3, 3)
    assert compile_file(tiny_cnn, out, use_nvcc=False).up_to_date


def test_damaged_plan_is_rebuilt_not_trusted(tiny_cnn: Path, tmp_path: Path) -> None:
    out = tmp_path / "build"
    good = compile_file(tiny_cnn, out, use_nvcc=False).plan.to_json()
    (out / "plan.json").write_text('{"network": ')
    result = compile_file(tiny_cnn, out, use_nvcc=False)
    assert not result.up_to_date
    assert json.loads((out / "plan.json").read_text()) == good


def test_missing_output_file_triggers_rebuild(tiny_cnn: Path, tmp_path: Path) -> None:
    out = tmp_path / "build"
    compile_file(tiny_cnn, out, use_nvcc=False)
    (out / "gpu0.cl").unlink()
    result = compile_file(tiny_cnn, out, use_nvcc=False)
    assert not result.up_to_date
    assert (out / "gpu0.cl").is_file()


@needs_nvcc
def test_changed_arch_list_rebuilds_and_drops_old_cubins(nvcc_build, tmp_path: Path) -> None:
    src, built, _ = nvcc_build
    out = tmp_path / "build"
    shutil.copytree(built, out)
    result = compile_file(src, out, archs=("sm_90",))
    assert not result.up_to_date
    # an sm_80 cubin left from the earlier build would be loaded by the cuda backend
    assert {p.name for p in out.iterdir()} == SOURCES | {"gpu0.sm_90.cubin", "gpu0.ptx", MARKER}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["archs"] == ["sm_90"]
    assert all(set(k["resources"]) == {"sm_90"} for k in manifest["kernels"].values())
    assert compile_file(src, out, archs=("sm_90",)).up_to_date

    # switching nvcc off rebuilds and leaves no cubin behind either
    result = compile_file(src, out, archs=("sm_90",), use_nvcc=False)
    assert not result.up_to_date
    assert {p.name for p in out.iterdir()} == SOURCES | {MARKER}
    assert hidden(out) == []


# --- atomicity -----------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_compile_error_leaves_build_untouched(kind: str, tiny_cnn: Path, tmp_path: Path) -> None:
    out = tmp_path / "build"
    compile_file(tiny_cnn, out, use_nvcc=False)
    before = snapshot(out)
    old, new = BROKEN[kind]
    text = tiny_cnn.read_text()
    assert old in text
    tiny_cnn.write_text(replace_once(text, old, new))
    with pytest.raises(CompileError) as info:
        compile_file(tiny_cnn, out, use_nvcc=False, force=True)
    d = info.value.diagnostics[0]
    assert d.file == str(tiny_cnn)
    assert d.span is not None and d.span.line == text[:text.index(old)].count("\n") + 1
    assert snapshot(out) == before
    assert hidden(out) == []


def test_compile_error_creates_no_output_dir(tiny_cnn: Path, tmp_path: Path) -> None:
    old, new = BROKEN["syntax"]
    tiny_cnn.write_text(replace_once(tiny_cnn.read_text(), old, new))
    out = tmp_path / "never"
    with pytest.raises(CompileError):
        compile_file(tiny_cnn, out, use_nvcc=False)
    assert not out.exists()


def test_bad_arch_leaves_build_untouched(tiny_cnn: Path, tmp_path: Path) -> None:
    out = tmp_path / "build"
    compile_file(tiny_cnn, out, use_nvcc=False)
    before = snapshot(out)
    for arch in ("sm_50", "compute_80", "80"):
        with pytest.raises(CompileError) as info:
            compile_file(tiny_cnn, out, archs=(arch,))
        assert arch in info.value.format()
    assert snapshot(out) == before


def test_compile_file_input_errors(tmp_path: Path, tiny_cnn: Path) -> None:
    with pytest.raises(CompileError, match="no such file"):
        compile_file(tmp_path / "absent.cnn", tmp_path / "out", use_nvcc=False)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(CompileError, match="not a directory"):
        compile_file(tiny_cnn, blocker, use_nvcc=False)
    assert blocker.read_text() == "x"


# --- load_plan ---------------------------------------------------------------------


def test_load_plan_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(CompileError) as info:
        load_plan(tmp_path / "nowhere")
    msg = info.value.format()
    assert msg.startswith(f"{tmp_path / 'nowhere'}: error: no such build directory")
    assert "cnnc compile" in msg


def test_load_plan_dir_without_plan(tmp_path: Path) -> None:
    with pytest.raises(CompileError) as info:
        load_plan(tmp_path)
    msg = info.value.format()
    assert msg.startswith(f"{tmp_path}: error: not a build directory: plan.json is missing")
    assert "cnnc compile" in msg


def _truncated(text: str) -> str:
    return text[: len(text) // 2]


def _extra_field(text: str) -> str:
    j = json.loads(text)
    j["kernels"][0]["surprise"] = 1
    return json.dumps(j)


def _wrong_type(text: str) -> str:
    j = json.loads(text)
    j["programs"] = [0]
    return json.dumps(j)


@pytest.mark.parametrize("damage", [
    _truncated, lambda t: "", lambda t: "{}", lambda t: "[]", lambda t: "null",
    _extra_field, _wrong_type, lambda t: "\udcff",
], ids=["truncated", "empty", "empty-object", "list", "null", "extra-field", "wrong-type", "not-utf8"])
def test_load_plan_damaged(damage, tiny_build_dir: Path, tmp_path: Path) -> None:
    good = (tiny_build_dir / "plan.json").read_text()
    plan_file = tmp_path / "plan.json"
    plan_file.write_bytes(damage(good).encode("utf-8", "surrogateescape"))
    with pytest.raises(CompileError) as info:
        load_plan(tmp_path)
    msg = info.value.format()
    assert msg.startswith(f"{plan_file}: error: plan.json is damaged")
    assert "recompile" in msg


# --- the wheel ---------------------------------------------------------------------


@pytest.mark.slow
def test_wheel_ships_data_and_works_installed(repo_root: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(repo_root)],
        capture_output=True, text=True, env=env, timeout=600)
    if build.returncode != 0 and "No matching distribution found for hatchling" in build.stderr:
        pytest.skip("the build backend (hatchling) cannot be downloaded")
    assert build.returncode == 0, build.stderr
    [wheel] = wheels.glob("cnnc-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for data in ("cnnc/_data/grammar/cnn.lark", "cnnc/_data/templates/gemm.j2",
                 "cnnc/_data/runtime/cnnc_cuda.h"):
        assert data in names
    assert "cnnc/cli.py" in names and "cnnc/resources.py" in names

    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True, text=True, env=env, timeout=600)
    assert install.returncode == 0, install.stderr

    # Run from a folder outside the checkout so nothing resolves to the repository.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env["PYTHONPATH"] = str(target)
    probe = subprocess.run(
        [sys.executable, "-c",
         "import cnnc, cnnc.resources as r; print(cnnc.__file__); print(r.resource_dir('templates'))"],
        capture_output=True, text=True, env=env, cwd=elsewhere, timeout=120)
    assert probe.returncode == 0, probe.stderr
    module_file, templates = (Path(line) for line in probe.stdout.split())
    assert module_file.resolve().is_relative_to(target.resolve())
    assert templates.resolve() == (target / "cnnc" / "_data" / "templates").resolve()

    out = elsewhere / "out"
    comp = subprocess.run(
        [sys.executable, "-m", "cnnc.cli", "compile", str(repo_root / "examples" / "digits.cnn"),
         "-o", str(out), "--no-nvcc"],
        capture_output=True, text=True, env=env, cwd=elsewhere, timeout=300)
    assert comp.returncode == 0, comp.stderr
    assert "Traceback" not in comp.stderr
    assert comp.stdout.startswith("compiled digits:")
    assert SOURCES <= {p.name for p in out.iterdir()}
    assert load_plan(out).network == "digits"
