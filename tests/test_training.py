"""The demo: examples/digits.cnn trains on the OpenCL backend to at most 5% test error."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cnnc.backends import make_backend
from cnnc.build import compile_file
from cnnc.train.data import load_digits
from cnnc.train.loop import train

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
def test_digits_demo_reaches_five_percent_on_opencl(tmp_path):
    plan = compile_file(ROOT / "examples" / "digits.cnn", tmp_path / "build", use_nvcc=False).plan
    backend = make_backend("opencl", plan, tmp_path / "build", [0])
    history = train(plan, backend, load_digits(), plan.epochs, tmp_path / "run")
    assert history[-1].test_error <= 0.05, [round(h.test_error, 4) for h in history]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == plan.epochs
    first = json.loads(lines[0])
    assert {"epoch", "step", "train_loss", "test_error", "images_per_s", "backend"} <= set(first)
    assert first["backend"] == "opencl"
    assert json.loads(lines[-1])["train_loss"] < first["train_loss"]


def test_same_seed_same_weights_bitwise(tmp_path):
    """Determinism: no atomics, fixed reduction order → identical weights run to run."""
    plan = compile_file(ROOT / "examples" / "digits.cnn", tmp_path / "build", use_nvcc=False).plan
    ds = load_digits()
    small = type(ds)(ds.name, ds.train_x[:96], ds.train_y[:96], ds.test_x[:32], ds.test_y[:32], ds.classes)
    weights = []
    for run in range(2):
        backend = make_backend("opencl", plan, tmp_path / "build", [0])
        train(plan, backend, small, 1, tmp_path / f"run{run}")
        import numpy as np
        weights.append(dict(np.load(tmp_path / f"run{run}" / "weights.npz")))
    for k in weights[0]:
        assert (weights[0][k] == weights[1][k]).all(), k
