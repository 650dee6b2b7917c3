"""Shared fixtures: a tiny network that fits the digits data set, and a build of it; nvcc builds
shared by every test (and every xdist worker) that reads cubins."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# A cut-down examples/digits.cnn: 1x8x8 images, one small conv, a pool, an fc
# to the ten classes. Small enough that a reference-backend epoch takes about
# a second, and shaped for the built-in digits data.
TINY_SOURCE = """\
# tiny test network for the 8x8 digits
network tiny

input data: 1x8x8
input labels: label(10)

train {
  batch = 8
  epochs = 1
  seed = 1
  lr = 0.05
  momentum = 0.9
}

conv1 = conv(data, filters=4, size=3, padding=1) relu
pool1 = maxpool(conv1, size=2, stride=2)
fc2 = fc(pool1, outputs=10, init_w=0.01)
probs = softmax(fc2)
cost = logreg(labels, probs)
"""


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def tiny_source() -> str:
    return TINY_SOURCE


@pytest.fixture
def tiny_cnn(tmp_path: Path) -> Path:
    """A fresh copy of the tiny network's source in this test's own folder."""
    path = tmp_path / "tiny.cnn"
    path.write_text(TINY_SOURCE)
    return path


@pytest.fixture(scope="session")
def tiny_build_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A build directory of the tiny network, sources only (no nvcc).

    Shared by many tests: treat it as read-only.
    """
    from cnnc.build import compile_file

    root = tmp_path_factory.mktemp("tiny_build_dir")
    src = root / "tiny.cnn"
    src.write_text(TINY_SOURCE)
    out = root / "build"
    compile_file(src, out, use_nvcc=False)
    return out


@pytest.fixture(scope="session")
def nvcc_build(tmp_path_factory: pytest.TempPathFactory):
    """`nvcc_build(name, source)` -> (plan, manifest, build dir): the network compiled with nvcc
    for sm_80 and sm_90 once per test session.

    Under pytest-xdist the workers share one directory per network (the base temporary folder's
    parent is common to them): whoever comes second waits on a file lock and finds the build up
    to date, so the minutes of nvcc are spent once, however many tests and workers read it."""
    from cnnc.build import compile_network

    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "nvcc-builds"
    shared.mkdir(exist_ok=True)

    def build(name: str, source: str):
        with open(shared / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            result = compile_network(source, f"{name}.cnn", shared / name, archs=("sm_80", "sm_90"))
        return result.plan, json.loads((result.out_dir / "manifest.json").read_text()), result.out_dir
    return build
