"""Build integrity: a build is used only as it was written, only by one process at a time, and
`cnnc compile -o DIR` never writes into a directory that is not a build.

Each test damages a build the way a clumsy user or a killed process would, then runs the command
a user would run and checks its one-line message and exit status 2.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from cnnc.build_dir import LOCK, MARKER, build_lock
from cnnc.cli import main
from helpers import replace_once

TWO_DEVICES = """\
network two
input data: 1x8x8
input labels: label(10)
train { batch = 8 }
@gpu(0,1) c1 = conv(data, filters=4, size=3, padding=1) relu
@gpu(1) f2 = fc(c1, outputs=10)
probs = softmax(f2)
cost = logreg(labels, probs)
"""

# holds a build's lock until its standard input closes
HOLDER = ("import sys\nfrom cnnc.build_dir import build_lock\nwith build_lock(sys.argv[1]):\n"
          "    print('held', flush=True)\n    sys.stdin.read()\n")


def cli(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def user_error(result: Result) -> str:
    """The first line of stderr of a command that failed cleanly with status 2."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return result.stderr.splitlines()[0]


def compiled(source: Path, out: Path) -> Path:
    result = cli("compile", source, "-o", out, "--no-nvcc")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def build(tiny_cnn: Path, tmp_path: Path) -> Path:
    return compiled(tiny_cnn, tmp_path / "build")


@pytest.fixture
def two(tmp_path: Path) -> Path:
    src = tmp_path / "two.cnn"
    src.write_text(TWO_DEVICES)
    return compiled(src, tmp_path / "two")


def recompile_hint(tiny_cnn: Path, build: Path) -> str:
    return f"recompile with: cnnc compile {tiny_cnn} -o {build}"


# --- run, bench and plan use a build only as it was written ------------------------------------

USES = {"run": ("--backend", "reference", "--epochs", "1", "-q"), "bench": ("--backend", "reference"), "plan": ()}


@pytest.mark.parametrize("command", sorted(USES))
@pytest.mark.parametrize("damage", ["edited", "truncated", "emptied"])
def test_changed_kernel_source_is_refused(command: str, damage: str, build: Path, tiny_cnn: Path) -> None:
    cl = build / "gpu0.cl"
    text = cl.read_text()
    cl.write_text({"edited": text.replace("{", "{ ", 1), "truncated": text[:len(text) // 2], "emptied": ""}[damage])
    line = user_error(cli(command, build, *USES[command]))
    assert line == (f"error: {cl} does not match its manifest (edited or from another build); "
                    + recompile_hint(tiny_cnn, build))
    assert not (build / "train").exists()


def test_files_of_two_builds_are_not_mixed(build: Path, two: Path, tiny_cnn: Path) -> None:
    shutil.copy(two / "plan.json", build / "plan.json")
    line = user_error(cli("run", build, "--backend", "reference"))
    assert line.startswith(f"error: {build / 'plan.json'} does not match its manifest")


def test_missing_source_file_is_refused(build: Path, tiny_cnn: Path) -> None:
    (build / "gpu0.cu").unlink()
    line = user_error(cli("run", build, "--backend", "reference"))
    assert line == f"error: {build / 'gpu0.cu'} is missing; " + recompile_hint(tiny_cnn, build)


def test_a_cubin_the_manifest_does_not_list_is_refused(build: Path, tiny_cnn: Path) -> None:
    stray = build / "gpu0.sm_86.cubin"              # the cuda backend would load it by name
    stray.write_bytes(b"\x7fELF")
    line = user_error(cli("bench", build, "--backend", "reference"))
    assert line == f"error: {stray} is not part of this build (from another build); " + \
        recompile_hint(tiny_cnn, build)


@pytest.mark.parametrize("manifest, why", [
    ('{"format": 2, "files": ', "is damaged (not JSON)"),
    ("[1, 2]", "is damaged (not an object)"),
    ('{"format": 2, "files": "plan.json", "sha256": {}}', "is damaged (its file list or hashes)"),
    ('{"format": 2, "files": ["plan.json"], "sha256": {"plan.json": 7}}', "is damaged (its file list or hashes)"),
    ('{"format": 2, "files": ["../plan.json"], "sha256": {"../plan.json": "' + "0" * 64 + '"}}',
     "is damaged (its file list or hashes)"),
    ('{"format": 1, "files": ["plan.json"]}', "has no file hashes (written by another cnnc version)"),
], ids=["not-json", "list", "files-not-a-list", "hash-not-a-string", "path-outside", "no-hashes"])
@pytest.mark.parametrize("command", sorted(USES))
def test_damaged_manifest_is_a_clean_error(command: str, manifest: str, why: str, build: Path) -> None:
    (build / "manifest.json").write_text(manifest)
    line = user_error(cli(command, build, *USES[command]))
    assert line.startswith(f"error: {build / 'manifest.json'} {why}; recompile with: cnnc compile ")


def test_missing_manifest_is_refused(build: Path) -> None:
    (build / "manifest.json").unlink()
    line = user_error(cli("plan", build))
    assert line == f"error: {build / 'manifest.json'} is missing; recompile with: cnnc compile NET.cnn -o {build}"


# --- compile checks contents, not only its inputs ----------------------------------------------


def test_emptied_source_is_not_up_to_date(build: Path, tiny_cnn: Path) -> None:
    good = (build / "gpu0.cl").read_text()
    (build / "gpu0.cl").write_text("")
    result = cli("compile", tiny_cnn, "-o", build, "--no-nvcc")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("compiled tiny:")
    assert (build / "gpu0.cl").read_text() == good
    assert cli("compile", tiny_cnn, "-o", build, "--no-nvcc").stdout == f"{build}: up to date\n"


def test_manifest_records_every_file_hash(build: Path) -> None:
    manifest = json.loads((build / "manifest.json").read_text())
    assert set(manifest["sha256"]) == set(manifest["files"]) == {"gpu0.cu", "gpu0.cl", "gpu0.cpu.cl", "source.cnn", "plan.json"}
    for name, digest in manifest["sha256"].items():
        assert hashlib.sha256((build / name).read_bytes()).hexdigest() == digest


# --- compile writes only into build directories ------------------------------------------------


def test_compile_into_a_directory_of_other_files_is_refused(tiny_cnn: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    (work / "gpu0.cl").write_text("my own kernel")
    shutil.copy(tiny_cnn, work / "net.cnn")
    proc = subprocess.run([sys.executable, "-m", "cnnc.cli", "compile", "net.cnn", "-o", ".", "--no-nvcc"],
                          cwd=work, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == "error: . is not empty and not a cnnc build directory; choose another -o\n"
    assert sorted(p.name for p in work.iterdir()) == ["gpu0.cl", "net.cnn", "notes.txt"]
    assert (work / "gpu0.cl").read_text() == "my own kernel"


def test_compile_into_an_empty_directory_marks_it_first(tiny_cnn: Path, tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    compiled(tiny_cnn, out)
    assert (out / MARKER).is_file()
    assert not (out / LOCK).exists()


def test_build_of_an_earlier_cnnc_is_accepted_and_marked(build: Path, tiny_cnn: Path) -> None:
    (build / MARKER).unlink()
    manifest = json.loads((build / "manifest.json").read_text())
    del manifest["sha256"]
    manifest["format"] = 1
    (build / "manifest.json").write_text(json.dumps(manifest))
    result = cli("compile", tiny_cnn, "-o", build, "--no-nvcc")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("compiled tiny:")
    assert (build / MARKER).is_file()


# --- one process at a time -----------------------------------------------------------------------


def holder(build: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(build)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_a_held_build_is_refused_at_once(build: Path, tiny_cnn: Path) -> None:
    proc = holder(build)
    try:
        expected = f"error: {build} is locked by pid {proc.pid}"
        assert user_error(cli("compile", tiny_cnn, "-o", build, "--no-nvcc", "--force")) == expected
        assert user_error(cli("run", build, "--backend", "reference", "-q")) == expected
        assert user_error(cli("bench", build, "--backend", "reference")) == expected
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    assert not (build / LOCK).exists()
    assert cli("compile", tiny_cnn, "-o", build, "--no-nvcc", "--force").exit_code == 0


def test_lock_of_a_killed_process_is_taken_over(build: Path, tiny_cnn: Path) -> None:
    proc = holder(build)
    proc.kill()
    proc.wait(timeout=60)
    assert (build / LOCK).read_text().strip() == str(proc.pid)      # left behind, naming a dead process
    result = cli("compile", tiny_cnn, "-o", build, "--no-nvcc", "--force")
    assert result.exit_code == 0, result.output
    assert not (build / LOCK).exists()


def test_lock_is_released_on_interrupt(build: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        with build_lock(build):
            raise KeyboardInterrupt
    assert not (build / LOCK).exists()
    with build_lock(build):
        assert (build / LOCK).is_file()


def test_lock_is_released_after_a_compile_error(build: Path, tiny_cnn: Path) -> None:
    tiny_cnn.write_text(replace_once(tiny_cnn.read_text(), "filters=4,", "filters=4"))
    result = cli("compile", tiny_cnn, "-o", build, "--no-nvcc", "--force")
    assert result.exit_code == 2
    assert not (build / LOCK).exists()


def test_scratch_of_a_killed_compile_is_cleaned(build: Path, tiny_cnn: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=60)
    alive = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        left = build.parent / f".build.build-{dead.pid}-k3x9q1"
        (left / "sub").mkdir(parents=True)
        (left / "sub" / "gpu0.cu").write_text("half written")
        running = build.parent / f".build.build-{alive.pid}-a8b7c6"
        running.mkdir()
        other = build.parent / f".buildings.build-{dead.pid}-k3x9q1"     # another directory's scratch
        other.mkdir()
        result = cli("compile", tiny_cnn, "-o", build, "--no-nvcc", "--force")
        assert result.exit_code == 0, result.output
        assert not left.exists()
        assert running.is_dir() and other.is_dir()
    finally:
        alive.stdin.close()
        alive.wait(timeout=60)


# --- plan validation: a plan that hashes right but does not hold together -------------------------


def _first(ops: list, kind: str, **match) -> dict:
    return next(o for o in ops if o["kind"] == kind and all(o.get(k) == v for k, v in match.items()))


def _buffer(plan: dict, buffer_id: str) -> dict:
    return next(b for b in plan["buffers"] if b["id"] == buffer_id)


def _device0(plan: dict) -> list:
    return plan["programs"]["train"]["0"]


TAMPER = {
    "buffer-too-small": (lambda p: _buffer(p, "c1.out.r0").update(size=10),
                         "buffer 'c1.out.r0' holds 10 elements but 1024 are needed"),
    "copy-out-of-range": (lambda p: _first(_device0(p), "copy", dst="c1.weights.grad.stage@0").update(
        dst_offset=1000), "buffer 'c1.weights.grad.stage@0' holds 36 elements but 1018 are needed"),
    "copy-negative-count": (lambda p: _first(_device0(p), "copy").update(count=-4),
                            "offsets and count must be non-negative integers"),
    "upload-outside-batch": (lambda p: _first(_device0(p), "upload").update(cases=[[6, 4]]),
                             "cases [6, 4] are not within the minibatch of 8"),
    "unknown-kernel": (lambda p: _first(_device0(p), "launch").update(kernel="c1_fwd_nope"),
                       "unknown kernel 'c1_fwd_nope'"),
    "unknown-buffer": (lambda p: _first(_device0(p), "launch")["args"].__setitem__(0, "nowhere"),
                       "unknown buffer 'nowhere'"),
    "unknown-op": (lambda p: p["kernels"][0].update(op="conv_fast"), "unknown op 'conv_fast'"),
    "grid-zero": (lambda p: p["kernels"][0]["launch"]["opencl"].update(grid=[0, 1, 1]),
                  "opencl grid [0, 1, 1] is not three positive 32-bit integers"),
    "negative-size": (lambda p: p["buffers"][0].update(size=-36), "size -36 is not a positive integer"),
    "size-not-a-number": (lambda p: p["buffers"][0].update(size="36"), "size '36' is not a positive integer"),
    "storage-shared-while-live": (lambda p: _buffer(p, "c1.out.r0").update(storage="data.out.s0@0"),
                                  "shares storage 'data.out.s0@0'"),
    "params-describe-less": (lambda p: next(k for k in p["kernels"] if k["op"] == "conv_fwd")["params"].update(N=2),
                             "buffer 'data.out.s0@0' holds 256 elements but the kernel's params describe 128"),
    "unknown-stream": (lambda p: _first(_device0(p), "launch").update(stream="side"), "unknown stream 'side'"),
    "wait-forever": (lambda p: _first(_device0(p), "wait").update(event="never"),
                     "waits for event 'never' that nothing records"),
}


@pytest.mark.parametrize("case", sorted(TAMPER))
def test_inconsistent_plan_is_a_clean_error(case: str, two: Path) -> None:
    tamper, message = TAMPER[case]
    plan_file = two / "plan.json"
    plan = json.loads(plan_file.read_text())
    tamper(plan)
    plan_file.write_text(json.dumps(plan))
    manifest = json.loads((two / "manifest.json").read_text())      # as if the build itself wrote it
    manifest["sha256"]["plan.json"] = hashlib.sha256(plan_file.read_bytes()).hexdigest()
    (two / "manifest.json").write_text(json.dumps(manifest))
    for command in (("plan", two), ("run", two, "--backend", "opencl", "--gpus", "0,0", "-q")):
        line = user_error(cli(*command))
        assert line.startswith(f"{plan_file}: error: plan.json is inconsistent: ")
        assert line.endswith("; recompile")
        assert message in line


def test_full_disk_leaves_no_new_directory(tiny_cnn: Path, tmp_path: Path, monkeypatch) -> None:
    import errno

    import cnnc.build

    def disk_full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(cnnc.build, "write_atomic", disk_full)
    out = tmp_path / "new"
    line = user_error(cli("compile", tiny_cnn, "-o", out, "--no-nvcc"))
    assert line.endswith("error: No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == [tiny_cnn.name]      # no directory, no scratch
