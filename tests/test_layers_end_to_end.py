"""Every layer kind of the language, end to end: compiled, trained on OpenCL and on the
reference backend, differentiated, and placed on several devices.

Two networks between them use every kind: EVERY (each kind at least once, a softmax
feeding two costs, dropout and dropout2) and SUMMED (conv and fc layers with several
inputs, grouped convolution with unshared biases, a locally connected layer, crossent
differentiated through its softmax).  Their neurons are smooth, so finite differences
of the loss check the reference's gradients; a variant with the abs neuron runs the
backend and placement comparisons.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cnnc.backends import make_backend
from cnnc.backends.reference_ops import dropout_keep_mask
from cnnc.build import compile_network
from cnnc.executor import Executor, initial_parameters
from test_parallel import assert_same_training

from helpers import replace_once, stable_seed

TRAIN = ("train {{ batch = {batch}{extra}; lr = {lr}; momentum = {momentum}; weight_decay = {decay}; seed = 3; "
         "init_w = 0.2 }}\n")

EVERY = """\
network every
input data: 4x8x8
input labels: label(5)
""" + TRAIN + """\
c1 = conv(data, filters=6, size=3, padding=1) tanh
c2 = conv(data, filters=6, size=3, padding=1, groups=2, shared_biases=false) logistic
both = conv(c1, c2, filters=4, size=3, padding=1, groups=2) tanh
n1 = cmrnorm(both, size=3, scale=0.5, pow=0.75, min_div=2)
n2 = rnorm(both, size=3, scale=0.3)
n3 = cnorm(both, size=3, scale=0.3)
s = eltsum(n1, n2, n3, coeffs=[1, -0.5, 0.7])
m = eltmax(n1, n2)
cat = concat(s, m)
sq = neuron(cat) square
loc = local(sq, filters=3, size=3, stride=2, padding=1) tanh
p = avgpool(loc, size=2)
pp = pass(p)
f1 = fc(pp, outputs=7) logistic
d1 = dropout(f1, keep=0.6)
f2 = fc(pp, outputs=7) tanh
d2 = dropout2(f2, keep=0.8)
f3 = fc(d1, d2, outputs=5)
probs = softmax(f3)
cost = logreg(labels, probs)
ce = crossent(labels, probs, coeff=0.5)
reg = sum2(f1, coeff=0.01)
"""

SUMMED = """\
network summed
input data: 3x9x9
input labels: label(4)
""" + TRAIN + """\
a = conv(data, filters=6, size=2) tanh
both = conv(a, data, filters=6, size=3, stride=2, groups=3, shared_biases=false) logistic
loc = local(both, filters=3, size=2) tanh
mx = maxpool(a, size=3, stride=3)
drop = dropout(mx, keep=0.7)
f = fc(loc, both, drop, outputs=4) tanh[1.5, 0.8]
probs = softmax(f)
cost = crossent(labels, probs)
"""

NETS = {"every": EVERY, "summed": SUMMED, "every-abs": replace_once(EVERY, "square", "abs")}
CLASSES = {"every": 5, "summed": 4, "every-abs": 5}


def source(name: str, lr: float = 0.05, momentum: float = 0.9, decay: float = 0.001, batch: int = 6,
           extra: str = "", edits=()) -> str:
    text = NETS[name].format(lr=lr, momentum=momentum, decay=decay, batch=batch, extra=extra)
    for old, new in edits:
        text = replace_once(text, old, new)
    return text


def batches(plan, steps: int, classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((plan.batch, *plan.image_shape)).astype(np.float32),
             rng.integers(0, classes, plan.batch).astype(np.int32)) for _ in range(steps)]


def train(text: str, backend: str, tmp: Path, classes: int, steps: int = 3):
    """Logical devices all on physical device 0: one OpenCL device, or the host."""
    out = tmp / f"b{stable_seed(text, backend)}"
    plan = compile_network(text, "net.cnn", out, use_nvcc=False).plan
    ex = Executor(plan, make_backend(backend, plan, out, [0] * 4))
    losses = [ex.train_step(x, y, i / steps)[0] for i, (x, y) in enumerate(batches(plan, steps, classes))]
    return np.concatenate(losses), ex.parameters(), ex.replica_parameters(), plan


def objective(ex: Executor, plan) -> float:
    """The mean over cases of sum over costs of coeff * loss: what the gradients descend."""
    total = 0.0
    for c in plan.costs:
        loss = np.concatenate([ex.read(o["loss"]) for o in c["outputs"]]).astype(np.float64)
        total += c["coeff"] * loss.mean()
    return total


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """Three single-device training steps on the reference backend, per (network, batch)."""
    tmp = tmp_path_factory.mktemp("single")
    runs = {}

    def get(name: str, batch: int = 6):
        if (name, batch) not in runs:
            runs[name, batch] = train(source(name, batch=batch), "reference", tmp, CLASSES[name])
        return runs[name, batch]
    return get


# ------------------------------------------------------------ (a) OpenCL = reference

@pytest.mark.parametrize("name", list(NETS))
def test_opencl_training_steps_match_reference(name, single, tmp_path):
    ref_losses, ref_params, _, plan = single(name)
    losses, params, _, _ = train(source(name), "opencl", tmp_path, CLASSES[name])
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4, atol=1e-6)
    for k in ref_params:
        np.testing.assert_allclose(params[k], ref_params[k], rtol=1e-4, atol=1e-6, err_msg=k)
    start = initial_parameters(plan)
    assert all(not np.array_equal(start[k], v) for k, v in ref_params.items()), "a parameter did not train"


def test_every_kind_is_used():
    from cnnc.check import check
    from cnnc.check.kinds import KINDS
    from cnnc.frontend.parser import parse
    used = {l.kind for name in ("every", "summed") for l in check(parse(source(name), "net.cnn")).layers}
    assert used == set(KINDS)


def _cuda_usable() -> bool:
    from cnnc.backends.cuda import cuda_usable
    return cuda_usable()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_usable(), reason="needs PyCUDA and an NVIDIA GPU")
@pytest.mark.parametrize("name", list(NETS))
def test_cuda_training_steps_match_reference(name, single, tmp_path):
    ref_losses, ref_params, _, _ = single(name)
    losses, params, _, _ = train(source(name), "cuda", tmp_path, CLASSES[name])
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4, atol=1e-6)
    for k in ref_params:
        np.testing.assert_allclose(params[k], ref_params[k], rtol=1e-4, atol=1e-6, err_msg=k)


# ------------------------------------------------------------ (b) reference = finite differences

@pytest.mark.parametrize("name", ["every", "summed"])
def test_reference_gradients_are_the_loss_gradient(name, tmp_path):
    """With lr=1, momentum 0 and no decay one step changes each parameter by -dL/dw, L the mean
    objective; compare with central differences of L computed by the same training program
    (so dropout draws the same masks)."""
    plan = compile_network(source(name, lr=1.0, momentum=0.0, decay=0.0), "net.cnn", tmp_path, use_nvcc=False).plan
    [(x, y)] = batches(plan, 1, CLASSES[name], seed=11)
    start = initial_parameters(plan)

    def loss(params):
        ex = Executor(plan, make_backend("reference", plan, tmp_path, [0]), params)
        ex.train_step(x, y, 0.0)
        return objective(ex, plan)

    ex = Executor(plan, make_backend("reference", plan, tmp_path, [0]), start)
    ex.train_step(x, y, 0.0)
    after = ex.parameters()
    rng = np.random.default_rng(0)
    h = 2e-3
    for pname in start:
        step = (start[pname] - after[pname]).reshape(-1)
        # the coordinates with the largest gradients, and a random one
        picks = list(np.argsort(-np.abs(step))[:2]) + list(rng.choice(step.size, 1))
        for i in picks:
            plus = {k: v.copy() for k, v in start.items()}
            minus = {k: v.copy() for k, v in start.items()}
            plus[pname].reshape(-1)[i] += h
            minus[pname].reshape(-1)[i] -= h
            numeric = (loss(plus) - loss(minus)) / (2 * h)
            assert float(step[i]) == pytest.approx(numeric, rel=1e-2, abs=3e-4), (pname, int(i))


# ------------------------------------------------------------ (c) placements = single device

# name -> (network, batch, extra train settings, placement edits)
PLACEMENTS = {
    "every-data-2": ("every", 6, "", [("c1 =", "@gpu(0,1) c1 ="), ("c2 =", "@gpu(0,1) c2 =")]),
    "every-data-4-reversed": ("every", 12, "", [("c1 =", "@gpu(3,2,1,0) c1 ="), ("c2 =", "@gpu(3,2,1,0) c2 =")]),
    "every-hybrid-2-to-1": ("every", 6, "", [("c1 =", "@gpu(0,1) c1 ="), ("c2 =", "@gpu(0,1) c2 ="),
                                             ("f1 =", "@gpu(1) f1 ="), ("f2 =", "@gpu(1) f2 =")]),
    "every-model": ("every", 6, "", [("n2 =", "@gpu(1) n2 ="), ("loc =", "@gpu(2) loc ="),
                                     ("f2 =", "@gpu(1) f2 ="), ("d1 =", "@gpu(3) d1 =")]),
    "every-pipeline-gpipe": ("every", 6, "; microbatches = 2", [("loc =", "@gpu(1) loc ="),
                                                              ("reg = sum2(f1", "@gpu(1) reg = sum2(f1")]),
    "every-pipeline-1f1b": ("every", 6, "; microbatches = 3; pipeline = one_f_one_b",
                            [("loc =", "@gpu(1) loc ="), ("reg = sum2(f1", "@gpu(1) reg = sum2(f1")]),
    "summed-data-2": ("summed", 6, "", [("a =", "@gpu(0,1) a =")]),
    "summed-pipeline": ("summed", 6, "; microbatches = 2", [("loc =", "@gpu(1) loc ="), ("mx =", "@gpu(1) mx =")]),
    "summed-hybrid-3-to-1-scatter": ("summed", 9, "; exchange = scatter",
                                     [("a =", "@gpu(0,1,2) a ="), ("both =", "@gpu(0) both ="),
                                      ("mx =", "@gpu(0) mx =")]),
    "summed-hybrid-2-to-1-all-gather": ("summed", 6, "; exchange = all_gather",
                                        [("a =", "@gpu(0,1) a ="), ("both =", "@gpu(1) both ="),
                                         ("mx =", "@gpu(1) mx =")]),
}


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_placement_equals_single_device_on_reference(placement, single, tmp_path):
    """Dropout masks are keyed by minibatch case, so they match too."""
    name, batch, extra, edits = PLACEMENTS[placement]
    got = train(source(name, batch=batch, extra=extra, edits=edits), "reference", tmp_path, CLASSES[name])
    assert_same_training(single(name, batch), got)


def test_hybrid_placement_equals_single_device_on_opencl(single, tmp_path):
    _, batch, extra, edits = PLACEMENTS["every-hybrid-2-to-1"]
    got = train(source("every-abs", edits=edits), "opencl", tmp_path, CLASSES["every"])
    assert_same_training(single("every-abs"), got)


# ------------------------------------------------------------ (d) dropout at test time

DROP = """\
network drop
input data: 6x1x1
input labels: label(5)
train {{ batch = 8; seed = 9; init_w = 1.0 }}
f = fc(data, outputs=5, init_b=0.3)
d = {kind}(f, keep={keep})
probs = softmax(d)
cost = logreg(labels, probs)
"""


@pytest.mark.parametrize("backend", ["reference", "opencl"])
@pytest.mark.parametrize("kind, keep", [("dropout", 0.5), ("dropout2", 0.3)])
def test_dropout_passes_values_through_at_test_time(kind, keep, backend, tmp_path):
    plan = compile_network(DROP.format(kind=kind, keep=keep), "drop.cnn", tmp_path, use_nvcc=False).plan
    rng = np.random.default_rng(4)
    x = rng.standard_normal((8, 6, 1, 1)).astype(np.float32)
    y = rng.integers(0, 5, 8).astype(np.int32)
    params = initial_parameters(plan)
    f = x.reshape(8, 6).astype(np.float64) @ params["f.weights"] + params["f.biases"]

    def expected_loss(values):
        e = np.exp(values - values.max(1, keepdims=True))
        return -np.log((e / e.sum(1, keepdims=True))[np.arange(8), y])

    ex = Executor(plan, make_backend(backend, plan, tmp_path, [0]))
    test_loss, _ = ex.evaluate(x, y)
    np.testing.assert_allclose(test_loss, expected_loss(f * (keep if kind == "dropout2" else 1.0)), rtol=1e-5,
                               atol=1e-6)
    # in training, the mask of (seed, step 0, layer 1 = d's index, case, feature)
    train_loss, _ = ex.train_step(x, y, 0.0)
    kept = dropout_keep_mask(dict(N=8, D=5, keep=keep, layer_id=1, case_offset=0), seed=9, step=0)
    scale = 1 / keep if kind == "dropout" else 1.0
    np.testing.assert_allclose(train_loss, expected_loss(f * kept * scale), rtol=1e-5, atol=1e-6)
    assert not np.allclose(train_loss, test_loss)
