"""Shared fixtures: a tiny network that fits the digits data set, and a build of it."""

from __future__ import annotations

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
