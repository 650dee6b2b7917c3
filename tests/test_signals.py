"""Ctrl-C and SIGTERM during `cnnc run`: a short message, the conventional exit status,
the build's lock released, nothing half-written in the save directory."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY_SOURCE

CNNC = [sys.executable, "-m", "cnnc.cli"]


def _started_run(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    src = tmp_path / "tiny.cnn"
    src.write_text(TINY_SOURCE)
    build = tmp_path / "build"
    subprocess.run(CNNC + ["compile", str(src), "-o", str(build), "--no-nvcc"], check=True, capture_output=True)
    proc = subprocess.Popen(CNNC + ["run", str(build), "--backend", "reference", "--epochs", "1000", "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("training tiny")       # training has begun
    deadline = time.monotonic() + 60
    while not (build / "train" / "weights.npz").exists():            # and one epoch is saved
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    return proc, build


@pytest.mark.parametrize("sig, status, message", [(signal.SIGINT, 130, "interrupted"),
                                                  (signal.SIGTERM, 143, "terminated")])
def test_signal_during_run(tmp_path: Path, sig, status, message):
    proc, build = _started_run(tmp_path)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == status
    assert err.strip() == message
    assert not (build / ".cnnc-lock").exists()
    for line in (build / "train" / "metrics.jsonl").read_text().splitlines():
        json.loads(line)
    import numpy as np
    with np.load(build / "train" / "weights.npz") as w:
        assert "conv1.weights" in w.files
    assert not [f for f in os.listdir(build / "train") if f.startswith(".")]     # no temporary files left


def test_kill_during_compile_leaves_the_old_build_or_the_new_one(tmp_path: Path, repo_root: Path):
    """kill -9 at several moments of a compile over an existing build: what is left is always a
    whole build (its files match its manifest), and the next compile cleans the scratch folders."""
    from cnnc.build import open_build

    tiny = tmp_path / "tiny.cnn"
    tiny.write_text(TINY_SOURCE)
    build = tmp_path / "build"
    compile_ = CNNC + ["compile", "-o", str(build), "--no-nvcc", "--force"]
    vgg16 = str(repo_root / "examples" / "vgg16.cnn")
    start = time.monotonic()                        # how long a whole compile takes on this machine now
    subprocess.run(CNNC + ["compile", "-o", str(tmp_path / "timed"), "--no-nvcc", vgg16], check=True,
                   capture_output=True)
    whole = time.monotonic() - start
    subprocess.run(compile_ + [str(tiny)], check=True, capture_output=True)
    networks = set()
    for delay in (whole * f for f in (0.3, 0.5, 0.7, 0.8, 0.9, 0.95)):
        proc = subprocess.Popen(compile_ + [vgg16],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.kill()
        proc.wait(timeout=60)
        plan, manifest = open_build(build)          # raises if the files and the manifest disagree
        networks.add(plan.network)
    assert networks <= {"tiny", "vgg16"}
    subprocess.run(compile_ + [str(tiny)], check=True, capture_output=True)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".build.build-")] == []
