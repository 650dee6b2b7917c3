"""The PyTorch twin (cnnc/bench_torch.py) trains as cnnc does: after one training step from the
same parameters on the same minibatch, every parameter of every network in tests/nets agrees.

cnnc runs the network's own placement on the reference backend, in float32; the twin runs in
float64 with cnnc's dropout masks (Philox, keyed by seed, step, layer and case) and takes one
step of cnnc's update rule, inc = momentum*inc - lr*(g/N + weight_decay*W), from inc = 0.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cnnc.backends import make_backend
from cnnc.backends.reference_ops import dropout_keep_mask
from cnnc.bench import random_batch
from cnnc.build import load_plan
from cnnc.check import check
from cnnc.cli import main
from cnnc.executor import Executor, initial_parameters
from cnnc.frontend.parser import parse_file
from cnnc.plan import lowering

torch = pytest.importorskip("torch")

NETS = sorted((Path(__file__).parent / "nets").glob("*.cnn"))


def twin_tensors(model, layer) -> dict[str, object]:
    """The twin's parameter tensors of a layer, by cnnc's export name."""
    part = model.parts[layer.name]
    weights = [f"{layer.name}.{n}" for n in lowering.weight_names(layer)]
    if layer.kind == "conv":
        return {**{n: c.weight for n, c in zip(weights, part.convs)}, f"{layer.name}.biases": part.b}
    if layer.kind == "local":
        return {weights[0]: part.w, f"{layer.name}.biases": part.b}
    if layer.kind == "fc":
        return {**{n: f.weight for n, f in zip(weights, part.linears)}, f"{layer.name}.biases": part.linears[0].bias}
    return {}


def layout(layer, name: str, value: np.ndarray, shape) -> np.ndarray:
    """A cnnc parameter in the twin's layout (fc weights are [inputs, outputs], torch's the transpose)."""
    if layer.kind == "fc" and ".weights" in name:
        return value.T
    return value.reshape(shape)


@pytest.mark.parametrize("source", NETS, ids=[p.stem for p in NETS])
def test_twin_equals_cnnc_after_one_step(source, tmp_path):
    build = tmp_path / "build"
    result = CliRunner().invoke(main, ["compile", str(source), "-o", str(build), "--no-nvcc"])
    assert result.exit_code == 0, result.output
    plan = load_plan(build)
    net = check(parse_file(source))
    start = initial_parameters(plan)
    x, y = random_batch(plan, seed=7)

    ex = Executor(plan, make_backend("reference", plan, build, [0] * (max(plan.devices) + 1)), start)
    ex.train_step(x, y, 0.0)
    after = ex.parameters()

    import cnnc.bench_torch as bench_torch
    model = bench_torch.build_model(torch, net).double().train()
    tensors = {name: (l, t) for l in net.layers for name, t in twin_tensors(model, l).items()}
    assert set(tensors) == set(start), "every cnnc parameter has a twin tensor"
    with torch.no_grad():
        for name, (l, t) in tensors.items():
            t.copy_(torch.from_numpy(layout(l, name, start[name], t.shape).astype(np.float64)))
    for l in net.layers:
        if l.kind in ("dropout", "dropout2"):
            mask = dropout_keep_mask(dict(N=plan.batch, D=l.shape.size, keep=l.args["keep"],
                                          layer_id=l.args["layer_id"]), plan.seed, 0)
            model.parts[l.name].keep_mask = torch.from_numpy(mask)
    model(torch.from_numpy(x.astype(np.float64)), torch.from_numpy(y)).backward()

    checked = 0
    for name, (l, t) in tensors.items():
        settings = l.train
        assert settings.wball == 0 and settings.update_period in (0, 1), "one plain update per step"
        biases = name.endswith(".biases")
        lr = (settings.lr_bias if biases else settings.lr).at(0.0)
        decay = 0.0 if biases else settings.weight_decay
        w0 = t.detach().numpy()
        want = w0 - lr * (t.grad.numpy() / plan.batch + decay * w0)
        got = layout(l, name, after[name].astype(np.float64), t.shape)
        step_cnnc, step_twin = got - w0, want - w0
        assert np.abs(step_twin).max() > 0, f"{name}: the twin's step moved nothing"
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=name)
        np.testing.assert_allclose(step_cnnc, step_twin, rtol=0,
                                   atol=1e-3 * np.abs(step_twin).max(), err_msg=f"{name}: the step")
        checked += 1
    assert checked == len(plan.parameters)
