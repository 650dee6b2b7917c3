"""scripts/gpu-check.sh where there is no GPU: it says so in one line and exits 2, and writes
that to its summary file, before it installs anything.  Its GPU checks run under pytest -m gpu."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu-check.sh"


def run_script(tmp_path: Path, *args: str, nvidia_smi: str | None = None) -> subprocess.CompletedProcess:
    """The script with --no-install, the test's Python as python3, and optionally a stand-in
    nvidia-smi (a shell script body) ahead of any real one on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    tools = {"python3": f'exec "{sys.executable}" "$@"'}
    if nvidia_smi is not None:
        tools["nvidia-smi"] = nvidia_smi
    for name, body in tools.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120)


def test_the_script_is_valid_bash():
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_failing_driver_means_no_gpu(tmp_path):
    done = run_script(tmp_path, "--no-install", "--out", "summary.txt",
                      nvidia_smi="echo \"NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\"; "
                                 "exit 9")
    assert done.returncode == 2
    message = "no usable NVIDIA GPU: nvidia-smi fails: NVIDIA-SMI has failed because it couldn't communicate"
    assert done.stderr.startswith(f"gpu-check: {message}")
    assert len(done.stderr.splitlines()) == 1
    assert (tmp_path / "summary.txt").read_text().startswith(message)


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi")
def test_no_nvidia_smi_means_no_gpu(tmp_path):
    done = run_script(tmp_path, "--no-install")
    assert done.returncode == 2
    assert done.stderr == "gpu-check: no usable NVIDIA GPU: nvidia-smi is not on PATH (no NVIDIA driver)\n"
    assert (tmp_path / "gpu-check-summary.txt").is_file()


def test_a_gpu_that_pycuda_cannot_use_means_no_gpu(tmp_path):
    from cnnc.backends.cuda import cuda_usable

    if cuda_usable():
        pytest.skip("PyCUDA can use a GPU here: the script would run its checks")
    done = run_script(tmp_path, "--no-install", nvidia_smi="echo 'GPU 0: NVIDIA H100 80GB HBM3'")
    assert done.returncode == 2
    assert done.stderr.startswith("gpu-check: no usable NVIDIA GPU: PyCUDA cannot use a GPU")


@pytest.mark.parametrize("args, error", [
    (["--colour"], "gpu-check: unknown option --colour (see --help)\n"),
    (["--out"], "gpu-check: --out needs a value\n"),
    (["--wheelhouse", "no-such-dir"], "gpu-check: --wheelhouse no-such-dir: no such directory\n"),
    (["--wheelhouse", ".", "--no-install"],
     "gpu-check: --wheelhouse says where to install from: leave out --no-install\n"),
])
def test_bad_usage_is_one_line_and_status_2(tmp_path, args, error):
    done = run_script(tmp_path, *args)
    assert (done.returncode, done.stderr) == (2, error)


def test_help_names_every_option(tmp_path):
    done = run_script(tmp_path, "--help")
    assert done.returncode == 0
    for option in ("--wheelhouse DIR", "--no-install", "--out FILE", "--venv DIR"):
        assert option in done.stdout
    assert not done.stdout.startswith("#")
