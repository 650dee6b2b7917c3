"""Whole training steps: the OpenCL kernels and the numpy reference agree step for step,
and the reference's gradients are those of the loss the network defines."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cnnc.backends import make_backend
from cnnc.build import compile_network
from cnnc.executor import Executor, initial_parameters

from helpers import replace_once, rewrite

NET = """
network steps
input data: 2x9x9
input labels: label(5)
train {{ batch = 6; lr = {lr}; momentum = 0.9; weight_decay = 0.01; seed = 3; init_w = 0.2 }}
conv1 = conv(data, filters=4, size=3, padding=1, stride=2) tanh[1.7,0.66]
pool1 = maxpool(conv1, size=2, stride=1)
conv2 = conv(pool1, filters=3, size=2) relu
fc3 = fc(conv2, outputs=5, init_b=0.1)
probs = softmax(fc3)
cost = logreg(labels, probs, top_k=2)
"""


def build(tmp_path: Path, lr: float = 0.05):
    return compile_network(NET.format(lr=lr), "steps.cnn", tmp_path, use_nvcc=False).plan


def batch(seed: int):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((6, 2, 9, 9)).astype(np.float32), rng.integers(0, 5, 6).astype(np.int32)


def test_opencl_training_steps_match_reference(tmp_path):
    plan = build(tmp_path)
    runs = {}
    for name in ("reference", "opencl"):
        ex = Executor(plan, make_backend(name, plan, tmp_path, [0]))
        losses = [ex.train_step(*batch(s), progress=s / 3)[0] for s in range(3)]
        runs[name] = (losses, ex.parameters())
    (ref_losses, ref_params), (ocl_losses, ocl_params) = runs["reference"], runs["opencl"]
    np.testing.assert_allclose(ocl_losses, ref_losses, rtol=1e-4, atol=1e-6)
    for k in ref_params:
        np.testing.assert_allclose(ocl_params[k], ref_params[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert any(not np.allclose(ref_params[k], v) for k, v in initial_parameters(plan).items()), "nothing trained"


def test_reference_gradients_are_the_loss_gradient(tmp_path):
    """With lr=1, momentum 0, no decay, one step changes W by -grad/N: compare with finite differences.
    (Smooth layers only, so the differences do not straddle a kink of relu or max.)"""
    text = replace_once(NET.format(lr=1.0), "momentum = 0.9; weight_decay = 0.01", "momentum = 0; weight_decay = 0")
    text = rewrite(text, {"maxpool": "avgpool", ") relu": ") logistic"})
    plan = compile_network(text, "steps.cnn", tmp_path, use_nvcc=False).plan
    x, y = batch(11)
    start = {k: v.astype(np.float32) for k, v in initial_parameters(plan).items()}

    def mean_loss(params):
        ex = Executor(plan, make_backend("reference", plan, tmp_path, [0]), params)
        loss, _ = ex.evaluate(x, y)
        return float(loss.astype(np.float64).mean())

    ex = Executor(plan, make_backend("reference", plan, tmp_path, [0]), start)
    ex.train_step(x, y, 0.0)
    after = ex.parameters()
    rng = np.random.default_rng(0)
    for name in ("conv1.weights", "conv2.biases", "fc3.weights"):
        flat = start[name].reshape(-1)
        for i in rng.choice(flat.size, 3, replace=False):
            analytic = float(start[name].reshape(-1)[i] - after[name].reshape(-1)[i])   # = dL/dw (mean loss)
            h = 2e-3
            plus = {k: v.copy() for k, v in start.items()}
            minus = {k: v.copy() for k, v in start.items()}
            plus[name].reshape(-1)[i] += h
            minus[name].reshape(-1)[i] -= h
            numeric = (mean_loss(plus) - mean_loss(minus)) / (2 * h)
            assert analytic == pytest.approx(numeric, rel=1e-2, abs=3e-4), (name, i)


def test_opencl_runs_are_fenced_from_each_other(tmp_path):
    """Protocol: each run begins with every queue waiting, on the device, for a marker of
    every queue, so a run's upload cannot overtake the previous run's kernels."""
    plan = build(tmp_path)
    backend = make_backend("opencl", plan, tmp_path, [0])
    ex = Executor(plan, backend)
    ex.train_step(*batch(0), progress=0.0)          # both streams' queues now exist
    calls, cl = [], backend.cl

    class Recording:
        def __getattr__(self, name):
            return getattr(cl, name)

        def enqueue_marker(self, queue):
            calls.append(("marker", queue))
            return cl.enqueue_marker(queue)

        def enqueue_barrier(self, queue, wait_for=None):
            calls.append(("barrier", queue, len(wait_for or ())))
            return cl.enqueue_barrier(queue, wait_for=wait_for)

    backend.cl = Recording()
    ex.train_step(*batch(1), progress=0.5)
    queues = list(backend.queues.values())
    assert len(queues) >= 2
    fence = calls[:2 * len(queues)]
    assert [c[0] for c in fence] == ["marker"] * len(queues) + ["barrier"] * len(queues)
    assert {id(c[1]) for c in fence[len(queues):]} == {id(q) for q in queues}
    assert all(c[2] == len(queues) for c in fence[len(queues):])


@pytest.mark.parametrize("backend", ["reference", "opencl"])
def test_an_upload_at_an_offset_writes_only_its_range(backend, tmp_path):
    """What a copy from another rank's device needs: the rest of the buffer may be in use."""
    plan = build(tmp_path)
    b = make_backend(backend, plan, tmp_path, [0])
    buffer = next(buf for buf in plan.buffers.values() if buf.dtype == "f32" and buf.size >= 8)
    handle = b.view(b.alloc(buffer, buffer.device), buffer)
    before = np.arange(buffer.size, dtype=np.float32)
    b.upload(handle, before)
    b.upload(handle, np.array([-1, -2], np.float32), "copy-in", 3)
    expected = before.copy()
    expected[3:5] = [-1, -2]
    np.testing.assert_array_equal(b.download(handle, buffer), expected)
