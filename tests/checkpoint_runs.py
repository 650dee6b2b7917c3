"""Runs of `cnnc run` that checkpoint and resume, shared by the checkpoint and augmentation tests:
a small network with every random stream a resume must continue, its data, and readers of
what a run leaves in its save directory."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from cnnc.build import compile_network
from cnnc.cli import main

# dropout (keyed by seed and step), a decaying schedule (keyed by step / total steps) and
# 10x10 images cropped to 8x8 at random (keyed by seed, epoch and step): every random
# stream a resume must continue
NET = """\
network ck
input data: 1x8x8
input labels: label(4)
train {
  batch = 8
  epochs = 2
  seed = 3
  lr = dexp(base=0.05, tgt_factor=10, steps=3)
  momentum = 0.9
  weight_decay = 0.001
}
@gpu(0)
conv1 = conv(data, filters=4, size=3, padding=1) relu
drop1 = dropout(conv1, keep=0.8)
pool1 = maxpool(drop1, size=2, stride=2)
fc2 = fc(pool1, outputs=4, init_w=0.05)
probs = softmax(fc2)
cost = logreg(labels, probs)
"""
STEPS_PER_EPOCH = 6                 # 48 training cases, batch 8


def write_data(folder: Path) -> Path:
    """48 training and 20 test cases of 10x10 noise with 4 classes, as ck.npz in `folder`."""
    rng = np.random.default_rng(7)
    path = folder / "ck.npz"
    np.savez(path, train_x=rng.standard_normal((48, 1, 10, 10)).astype(np.float32),
             train_y=rng.integers(0, 4, 48), test_x=rng.standard_normal((20, 1, 10, 10)).astype(np.float32),
             test_y=rng.integers(0, 4, 20))
    return path


def compiled(tmp_path: Path, text: str = NET, name: str = "build") -> Path:
    out = tmp_path / name
    compile_network(text, "ck.cnn", out, use_nvcc=False)
    return out


def cnnc(*args, expect: int = 0) -> tuple[str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == expect, (result.stdout, result.stderr, result.exception)
    return result.stdout, result.stderr


def run(build: Path, data: Path, *args, backend: str = "reference", expect: int = 0) -> tuple[str, str]:
    return cnnc("run", build, "--backend", backend, "--data", data, "-q", *args, expect=expect)


def weights(save_dir: Path) -> dict[str, np.ndarray]:
    with np.load(save_dir / "weights.npz") as f:
        return {k: f[k] for k in f.files}


def records(save_dir: Path) -> list[dict]:
    """metrics.jsonl without the timing, which differs between runs."""
    lines = (save_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "images_per_s"} for line in lines]


def assert_bitwise(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k
