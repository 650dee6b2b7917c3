"""The reference ops checked against finite differences and hand-made examples.

Every backward op is compared, in float64, with central differences of the
loss L = sum(dy * forward(x)) for a fixed random dy.  The forward ops are
compared with direct loop implementations of the formulas in cnnc.ops.
"""
from __future__ import annotations

import inspect

import numpy as np
import pytest

from cnnc.backends.reference_ops import REFERENCE_OPS
from cnnc.neurons import NEURONS
from cnnc.ops import OPS, Role

from helpers import run_reference as run

H_STEP = 1e-6
RTOL = 1e-5
ATOL = 1e-7


# ----------------------------------------------------------------- helpers

def fd_grad(f, x, dy, h=H_STEP):
    """Central-difference gradient of sum(dy * f()) w.r.t. x; f reads x, which is perturbed in place."""
    g = np.zeros_like(x)
    xf, gf = x.reshape(-1), g.reshape(-1)
    for i in range(xf.size):
        old = xf[i]
        xf[i] = old + h
        plus = np.sum(dy * f())
        xf[i] = old - h
        minus = np.sum(dy * f())
        xf[i] = old
        gf[i] = (plus - minus) / (2 * h)
    return g


def assert_grad(analytic, numeric):
    np.testing.assert_allclose(analytic, numeric, rtol=RTOL, atol=ATOL)


def ceil_div(a, b):
    return -(-a // b)


def conv_params(N, C, H, W, K, R, S, stride, pad, neuron="ident"):
    P = 1 + ceil_div(2 * pad + H - R, stride)
    Q = 1 + ceil_div(2 * pad + W - S, stride)
    return dict(N=N, C=C, H=H, W=W, K=K, R=R, S=S, P=P, Q=Q, stride=stride, pad=pad,
                neuron={"name": neuron, "a": 1.0, "b": 0.0}, accumulate=False)


def pool_params(N, C, H, W, size, stride, start, mode):
    P = ceil_div(H - start - size, stride) + 1
    Q = ceil_div(W - start - size, stride) + 1
    return dict(N=N, C=C, H=H, W=W, P=P, Q=Q, size=size, stride=stride, start=start,
                mode=mode, accumulate=False)


def fc_params(N, I, O, neuron="ident", a=1.0, b=0.0):
    return dict(N=N, I=I, O=O, neuron={"name": neuron, "a": a, "b": b}, accumulate=False)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# (N, C, H, W, K, R, S, stride, pad)
CONV_SHAPES = [
    (2, 3, 5, 5, 4, 3, 3, 1, 1),     # "same" convolution
    (1, 2, 6, 6, 3, 3, 3, 2, 0),     # last window overhangs the image (ceil rounding)
    (2, 3, 6, 7, 2, 3, 3, 2, 1),     # padding and overhang, odd width
    (1, 2, 5, 6, 3, 2, 3, 3, 1),     # non-square filter, stride 3
    (3, 1, 4, 3, 2, 1, 1, 1, 0),     # 1x1 filter
    (1, 1, 3, 3, 1, 5, 5, 1, 2),     # filter larger than the image
]


def conv_inputs(rng, shape):
    p = conv_params(*shape)
    x = rng.standard_normal((p["N"], p["C"], p["H"], p["W"]))
    w = rng.standard_normal((p["K"], p["C"], p["R"], p["S"]))
    b = rng.standard_normal(p["K"])
    dy = rng.standard_normal((p["N"], p["K"], p["P"], p["Q"]))
    return p, x, w, b, dy


def conv_y(p, x, w, b):
    return run("conv_fwd", p, x=x, w=w, b=b, y=np.zeros((p["N"], p["K"], p["P"], p["Q"])))["y"]


# -------------------------------------------------------------- the table

def test_every_op_has_a_reference_with_matching_arity():
    assert set(REFERENCE_OPS) == set(OPS)
    for name, fn in REFERENCE_OPS.items():
        assert len(inspect.signature(fn).parameters) == 1 + len(OPS[name].args), name


# ------------------------------------------------------------ convolution

@pytest.mark.parametrize("shape", CONV_SHAPES)
def test_conv_fwd_matches_direct_formula(rng, shape):
    p, x, w, b, _ = conv_inputs(rng, shape)
    expect = np.zeros((p["N"], p["K"], p["P"], p["Q"])) + b[None, :, None, None]
    for pp in range(p["P"]):
        for qq in range(p["Q"]):
            for r in range(p["R"]):
                for s in range(p["S"]):
                    h = pp * p["stride"] - p["pad"] + r
                    v = qq * p["stride"] - p["pad"] + s
                    if 0 <= h < p["H"] and 0 <= v < p["W"]:
                        expect[:, :, pp, qq] += x[:, :, h, v] @ w[:, :, r, s].T
    np.testing.assert_allclose(conv_y(p, x, w, b), expect, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", CONV_SHAPES)
def test_conv_bwd_data(rng, shape):
    p, x, w, b, dy = conv_inputs(rng, shape)
    dx = run("conv_bwd_data", p, w=w, dy=dy, dx=np.zeros_like(x))["dx"]
    assert_grad(dx, fd_grad(lambda: conv_y(p, x, w, b), x, dy))


@pytest.mark.parametrize("shape", CONV_SHAPES)
def test_conv_bwd_filter(rng, shape):
    p, x, w, b, dy = conv_inputs(rng, shape)
    dw = run("conv_bwd_filter", p, x=x, dy=dy, dw=np.zeros_like(w))["dw"]
    assert_grad(dw, fd_grad(lambda: conv_y(p, x, w, b), w, dy))


@pytest.mark.parametrize("shape", CONV_SHAPES)
def test_conv_bias_grad(rng, shape):
    p, x, w, b, dy = conv_inputs(rng, shape)
    bp = dict(N=p["N"], K=p["K"], inner=p["P"] * p["Q"])
    db = run("bias_grad", bp, dy=dy, db=np.zeros_like(b))["db"]
    assert_grad(db, fd_grad(lambda: conv_y(p, x, w, b), b, dy))


def test_conv_with_fused_neuron_chains_through_neuron_bwd(rng):
    p, x, w, b, dy = conv_inputs(rng, CONV_SHAPES[2])
    p["neuron"] = {"name": "tanh", "a": 1.3, "b": 0.7}
    y = conv_y(p, x, w, b)
    g = run("neuron_bwd", dict(n=y.size, neuron=p["neuron"]), y=y, g=dy)["g"]
    dx = run("conv_bwd_data", p, w=w, dy=g, dx=np.zeros_like(x))["dx"]
    dw = run("conv_bwd_filter", p, x=x, dy=g, dw=np.zeros_like(w))["dw"]
    assert_grad(dx, fd_grad(lambda: conv_y(p, x, w, b), x, dy))
    assert_grad(dw, fd_grad(lambda: conv_y(p, x, w, b), w, dy))


def test_conv_preserves_float32(rng):
    p, x, w, b, _ = conv_inputs(rng, CONV_SHAPES[0])
    y32 = np.zeros(p["N"] * p["K"] * p["P"] * p["Q"], dtype=np.float32)
    REFERENCE_OPS["conv_fwd"](p, x.astype(np.float32).ravel(), w.astype(np.float32).ravel(),
                              b.astype(np.float32).ravel(), y32)
    np.testing.assert_allclose(y32, conv_y(p, x, w, b).ravel(), rtol=1e-4, atol=1e-4)


# -------------------------------------------------------- fully connected

FC_SHAPES = [(1, 1, 1), (3, 5, 4), (4, 7, 2), (2, 3, 9)]


def fc_y(p, x, w, b):
    return run("fc_fwd", p, x=x, w=w, b=b, y=np.zeros((p["N"], p["O"])))["y"]


@pytest.mark.parametrize("N,I,O", FC_SHAPES)
def test_fc_grads(rng, N, I, O):
    p = fc_params(N, I, O)
    x, w = rng.standard_normal((N, I)), rng.standard_normal((I, O))
    b, dy = rng.standard_normal(O), rng.standard_normal((N, O))
    np.testing.assert_allclose(fc_y(p, x, w, b), x @ w + b, rtol=1e-12, atol=1e-12)
    dx = run("fc_bwd_data", p, w=w, dy=dy, dx=np.zeros_like(x))["dx"]
    dw = run("fc_bwd_filter", p, x=x, dy=dy, dw=np.zeros_like(w))["dw"]
    db = run("bias_grad", dict(N=N, K=O, inner=1), dy=dy, db=np.zeros_like(b))["db"]
    assert_grad(dx, fd_grad(lambda: fc_y(p, x, w, b), x, dy))
    assert_grad(dw, fd_grad(lambda: fc_y(p, x, w, b), w, dy))
    assert_grad(db, fd_grad(lambda: fc_y(p, x, w, b), b, dy))


# ---------------------------------------------------------------- neurons

# (a, b) and the input range for the kinds that need something particular.
NEURON_SETUP = {
    "tanh": ((1.7159, 0.6667), (-3.0, 3.0)),
    "brelu": ((1.5, 0.0), (-1.0, 3.0)),
    "linear": ((2.5, -0.5), (-3.0, 3.0)),
    "sqrt": ((1.0, 0.0), (0.2, 3.0)),
    "log": ((0.5, 0.0), (0.2, 3.0)),
}
DIFFERENTIABLE = sorted(n for n, k in NEURONS.items() if not k.needs_input)


def neuron_input(rng, shape, lo, hi, kinks):
    """Uniform values in [lo, hi] kept at least 0.05 away from every kink."""
    x = rng.uniform(lo, hi, shape)
    for _ in range(100):
        bad = np.zeros(shape, dtype=bool)
        for k in kinks:
            bad |= np.abs(x - k) < 0.05
        if not bad.any():
            return x
        x[bad] = rng.uniform(lo, hi, bad.sum())
    raise AssertionError("could not sample away from the kinks")


@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_neuron_bwd(rng, name):
    (a, b), (lo, hi) = NEURON_SETUP.get(name, ((1.0, 0.0), (-3.0, 3.0)))
    N, I = 3, 5
    p = fc_params(N, I, I, name, a, b)
    x = neuron_input(rng, (N, I), lo, hi, kinks=(0.0, a))
    w, bias, dy = np.eye(I), np.zeros(I), rng.standard_normal((N, I))
    y = fc_y(p, x, w, bias)
    np.testing.assert_allclose(y, NEURONS[name].forward_np(x, a, b), rtol=1e-12)
    g = run("neuron_bwd", dict(n=N * I, neuron=p["neuron"]), y=y, g=dy)["g"]
    assert_grad(g, fd_grad(lambda: fc_y(p, x, w, bias), x, dy))


# ---------------------------------------------------------------- pooling

# (N, C, H, W, size, stride, start)
POOL_SHAPES = [
    (2, 3, 5, 5, 2, 2, 0),     # last window overhangs (ceil rounding)
    (1, 2, 7, 6, 3, 2, 0),     # overlapping windows, overhang in columns only
    (2, 2, 6, 7, 3, 3, -1),    # negative start: first window clipped too
    (1, 3, 5, 4, 3, 1, 0),     # stride 1, heavy overlap
    (1, 1, 4, 4, 1, 1, 0),     # identity pooling
]


def pool_y(p, x):
    return run("pool_fwd", p, x=x, y=np.zeros((p["N"], p["C"], p["P"], p["Q"])))["y"]


def pool_direct(p, x):
    y = np.zeros((p["N"], p["C"], p["P"], p["Q"]))
    for pp in range(p["P"]):
        for qq in range(p["Q"]):
            r0, c0 = p["start"] + pp * p["stride"], p["start"] + qq * p["stride"]
            win = x[:, :, max(r0, 0):min(r0 + p["size"], p["H"]),
                    max(c0, 0):min(c0 + p["size"], p["W"])]
            y[:, :, pp, qq] = win.max(axis=(2, 3)) if p["mode"] == "max" else win.mean(axis=(2, 3))
    return y


def distinct_values(rng, shape):
    """Values 0.1 apart in random order, so every window has a unique, stable max."""
    return (rng.permutation(int(np.prod(shape))).reshape(shape) - 10.0) * 0.1


@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("shape", POOL_SHAPES)
def test_pool_fwd_matches_direct_formula(rng, shape, mode):
    p = pool_params(*shape, mode)
    x = rng.standard_normal((p["N"], p["C"], p["H"], p["W"]))
    np.testing.assert_allclose(pool_y(p, x), pool_direct(p, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("shape", POOL_SHAPES)
def test_pool_bwd(rng, shape, mode):
    p = pool_params(*shape, mode)
    x = distinct_values(rng, (p["N"], p["C"], p["H"], p["W"]))
    dy = rng.standard_normal((p["N"], p["C"], p["P"], p["Q"]))
    y = pool_y(p, x)
    dx = run("pool_bwd", p, x=x, y=y, dy=dy, dx=np.zeros_like(x))["dx"]
    assert_grad(dx, fd_grad(lambda: pool_y(p, x), x, dy))


def test_pool_fwd_hand_made():
    x = np.arange(16.0).reshape(1, 1, 4, 4)
    pm = pool_params(1, 1, 4, 4, 3, 2, 0, "max")
    pa = pool_params(1, 1, 4, 4, 3, 2, 0, "avg")
    assert (pm["P"], pm["Q"]) == (2, 2)
    np.testing.assert_array_equal(pool_y(pm, x)[0, 0], [[10.0, 11.0], [14.0, 15.0]])
    # windows: rows/cols 0..2 and 2..3 (clipped); mean over the clipped pixels
    np.testing.assert_allclose(pool_y(pa, x)[0, 0], [[5.0, 6.5], [11.0, 12.5]])


def test_pool_bwd_hand_made():
    x = np.arange(16.0).reshape(1, 1, 4, 4)
    dy = np.array([[[[1.0, 2.0], [3.0, 4.0]]]])
    pa = pool_params(1, 1, 4, 4, 3, 2, 0, "avg")
    dx = run("pool_bwd", pa, x=x, y=pool_y(pa, x), dy=dy, dx=np.zeros_like(x))["dx"][0, 0]
    counts = np.array([[9, 6], [6, 4]])
    expect = np.zeros((4, 4))
    for i, (rs, cs) in enumerate([(slice(0, 3), slice(0, 3)), (slice(0, 3), slice(2, 4)),
                                  (slice(2, 4), slice(0, 3)), (slice(2, 4), slice(2, 4))]):
        expect[rs, cs] += dy.ravel()[i] / counts.ravel()[i]
    np.testing.assert_allclose(dx, expect)


def test_pool_max_bwd_ties_go_to_first_pixel():
    x = np.array([[0.0, 5.0, 5.0], [5.0, 1.0, 5.0], [2.0, 3.0, 5.0]]).reshape(1, 1, 3, 3)
    p = pool_params(1, 1, 3, 3, 2, 1, 0, "max")
    dy = np.array([1.0, 10.0, 100.0, 1000.0]).reshape(1, 1, 2, 2)
    dx = run("pool_bwd", p, x=x, y=pool_y(p, x), dy=dy, dx=np.zeros_like(x))["dx"][0, 0]
    expect = np.zeros((3, 3))
    expect[0, 1] += 1.0 + 10.0      # windows (0,0) and (0,1) both pick (0,1)
    expect[1, 0] += 100.0           # window (1,0): (1,0) precedes (2,*)
    expect[1, 2] += 1000.0          # window (1,1): (1,2) precedes (2,2)
    np.testing.assert_array_equal(dx, expect)


# ------------------------------------------------------ softmax and logreg

SOFTMAX_SHAPES = [(1, 1), (3, 5), (4, 10), (2, 7)]


def softmax_y(p, x):
    return run("softmax_fwd", p, x=x, y=np.zeros_like(x))["y"]


def labels_for(rng, N, C):
    return rng.integers(0, C, N).astype(np.int32)


def test_softmax_fwd_is_stable():
    x = np.array([[1000.0, 1000.0, 999.0], [-1000.0, -1001.0, -1000.0]])
    y = softmax_y(dict(N=2, C=3), x)
    e = np.exp([0.0, 0.0, -1.0])
    np.testing.assert_allclose(y, [e / e.sum(), e[[0, 2, 1]] / e.sum()])


@pytest.mark.parametrize("N,C", SOFTMAX_SHAPES)
def test_softmax_bwd(rng, N, C):
    p = dict(N=N, C=C, accumulate=False)
    x, dy = rng.standard_normal((N, C)), rng.standard_normal((N, C))
    dx = run("softmax_bwd", p, y=softmax_y(p, x), dy=dy, dx=np.zeros_like(x))["dx"]
    assert_grad(dx, fd_grad(lambda: softmax_y(p, x), x, dy))


def logreg_loss(p, labels, probs):
    out = run("logreg_fwd", p, labels=labels, probs=probs,
              loss=np.zeros(p["N"]), correct=np.zeros(p["N"]))
    return out["loss"]


@pytest.mark.parametrize("N,C", SOFTMAX_SHAPES)
def test_logreg_bwd(rng, N, C):
    p = dict(N=N, C=C, top_k=1, coeff=0.7, accumulate=False)
    labels, probs = labels_for(rng, N, C), rng.uniform(0.1, 1.0, (N, C))
    g = run("logreg_bwd", p, labels=labels, probs=probs, dprobs=np.zeros_like(probs))["dprobs"]
    coeff = np.full(N, p["coeff"])
    assert_grad(g, fd_grad(lambda: logreg_loss(p, labels, probs), probs, coeff))


@pytest.mark.parametrize("N,C", SOFTMAX_SHAPES)
def test_softmax_logreg_bwd(rng, N, C):
    p = dict(N=N, C=C, top_k=1, coeff=1.3, accumulate=False)
    labels, x = labels_for(rng, N, C), rng.standard_normal((N, C))
    probs = softmax_y(p, x)
    dx = run("softmax_logreg_bwd", p, labels=labels, probs=probs, dx=np.zeros_like(x))["dx"]
    coeff = np.full(N, p["coeff"])
    assert_grad(dx, fd_grad(lambda: logreg_loss(p, labels, softmax_y(p, x)), x, coeff))
    # and it equals logreg_bwd followed by softmax_bwd
    g = run("logreg_bwd", p, labels=labels, probs=probs, dprobs=np.zeros_like(x))["dprobs"]
    chained = run("softmax_bwd", p, y=probs, dy=g, dx=np.zeros_like(x))["dx"]
    np.testing.assert_allclose(dx, chained, rtol=1e-10, atol=1e-12)


def test_logreg_fwd_top_k():
    probs = np.array([
        [0.1, 0.2, 0.3, 0.4],     # label 3 is the largest
        [0.1, 0.2, 0.3, 0.4],     # label 1: two classes beat it
        [0.25, 0.25, 0.25, 0.25], # label 2: all tied, nothing strictly larger
        [0.4, 0.3, 0.2, 0.1],     # label 3: three classes beat it
    ])
    labels = np.array([3, 1, 2, 3], dtype=np.int32)
    expect_correct = {1: [1, 0, 1, 0], 2: [1, 0, 1, 0], 3: [1, 1, 1, 0], 4: [1, 1, 1, 1]}
    for k, expect in expect_correct.items():
        out = run("logreg_fwd", dict(N=4, C=4, top_k=k), labels=labels, probs=probs,
                  loss=np.zeros(4), correct=np.full(4, 7.0))
        np.testing.assert_array_equal(out["correct"], expect)
        np.testing.assert_allclose(out["loss"], -np.log([0.4, 0.2, 0.25, 0.1]))


# -------------------------------------------------------------------- sgd

def test_sgd_update_two_steps():
    w = np.array([1.0, -2.0, 0.5])
    inc = np.array([0.1, 0.0, -0.2])
    dw1, dw2 = np.array([4.0, 2.0, -6.0]), np.array([-2.0, 8.0, 0.0])
    lr, mom, wd, inv = 0.1, 0.9, 0.01, 0.5
    state = {"w": w.copy(), "inc": inc.copy()}
    for dw in (dw1, dw2):
        state = run("sgd_update", dict(n=3), w=state["w"], dw=dw, inc=state["inc"],
                    lr=lr, momentum=mom, weight_decay=wd, inv_cases=inv)
    # step 1 by hand
    inc1 = np.array([0.9 * 0.1 - 0.1 * (2.0 + 0.01), 0.0 - 0.1 * (1.0 - 0.02),
                     0.9 * -0.2 - 0.1 * (-3.0 + 0.005)])
    w1 = w + inc1
    # step 2 by hand
    inc2 = 0.9 * inc1 - 0.1 * (dw2 * 0.5 + 0.01 * w1)
    np.testing.assert_allclose(state["inc"], inc2, rtol=1e-14)
    np.testing.assert_allclose(state["w"], w1 + inc2, rtol=1e-14)


# ------------------------------------------------------------- accumulate

def accumulate_case(name, rng):
    """Params and arrays (output zeroed) for one op that has an accumulate parameter."""
    if name in LAYER_ACCUMULATE_CASES:
        return LAYER_ACCUMULATE_CASES[name](rng)
    if name == "conv_bwd_data":
        p, x, w, _, dy = conv_inputs(rng, CONV_SHAPES[2])
        return p, dict(w=w, dy=dy, dx=np.zeros_like(x))
    if name == "fc_bwd_data":
        p = fc_params(3, 4, 5)
        return p, dict(w=rng.standard_normal((4, 5)), dy=rng.standard_normal((3, 5)),
                       dx=np.zeros((3, 4)))
    if name == "conv_bwd_filter":
        p, x, w, _, dy = conv_inputs(rng, CONV_SHAPES[2])
        return p, dict(x=x, dy=dy, dw=np.zeros_like(w))
    if name == "fc_bwd_filter":
        p = fc_params(3, 4, 5)
        return p, dict(x=rng.standard_normal((3, 4)), dy=rng.standard_normal((3, 5)), dw=np.zeros((4, 5)))
    if name == "replica_sum":
        p = dict(R=3, n=5, offset=0)
        return p, dict(stage=rng.standard_normal(15), g=np.zeros(5))
    if name == "bias_grad":
        p = dict(N=3, K=4, inner=5)
        return p, dict(dy=rng.standard_normal((3, 4, 5)), db=np.zeros(4))
    if name == "pool_bwd":
        p = pool_params(*POOL_SHAPES[2], "max")
        x = distinct_values(rng, (p["N"], p["C"], p["H"], p["W"]))
        return p, dict(x=x, y=pool_y(p, x), dy=rng.standard_normal((p["N"], p["C"], p["P"], p["Q"])),
                       dx=np.zeros_like(x))
    p = dict(N=3, C=4, coeff=0.8, accumulate=False)
    probs = softmax_y(p, rng.standard_normal((3, 4)))
    if name == "softmax_bwd":
        return p, dict(y=probs, dy=rng.standard_normal((3, 4)), dx=np.zeros((3, 4)))
    if name == "logreg_bwd":
        return p, dict(labels=labels_for(rng, 3, 4), probs=probs, dprobs=np.zeros((3, 4)))
    if name == "softmax_logreg_bwd":
        return p, dict(labels=labels_for(rng, 3, 4), probs=probs, dx=np.zeros((3, 4)))
    raise AssertionError(f"no accumulate test case for {name}")


@pytest.mark.parametrize("name", sorted(n for n, s in OPS.items() if "accumulate" in s.params))
def test_accumulate_adds_to_existing_contents(rng, name):
    p, arrays = accumulate_case(name, rng)
    (out,) = [a for a, role in OPS[name].args if role is Role.OUT] or \
        [a for a, role in OPS[name].args if role is Role.INOUT]
    fresh = run(name, p, **arrays)[out]
    before = rng.standard_normal(arrays[out].shape)
    overwritten = run(name, dict(p, accumulate=False), **dict(arrays, **{out: before}))[out]
    added = run(name, dict(p, accumulate=True), **dict(arrays, **{out: before}))[out]
    absent = {k: v for k, v in p.items() if k != "accumulate"}
    defaulted = run(name, absent, **dict(arrays, **{out: before}))[out]
    np.testing.assert_array_equal(overwritten, fresh)
    np.testing.assert_array_equal(defaulted, fresh)
    np.testing.assert_allclose(added, before + fresh, rtol=1e-14, atol=1e-14)


# ====================================================================== layer ops
# The cuda-convnet2 layer ops beyond conv/fc/pool/softmax: every backward against central
# differences of its forward, every forward against a direct loop over its formula.

def norm_params(N, C, H, W, size, scale=0.8, pow=0.75, min_div=1.0, blocked=False):
    return dict(N=N, C=C, H=H, W=W, size=size, scale=scale, pow=pow, min_div=min_div, blocked=blocked,
                accumulate=False)


def window(o, size, n, blocked=False):
    """cuda-convnet2's window of output o: start -size/2 + o (or o's block), clipped to 0..n-1."""
    lo = (o // size) * size if blocked else o - size // 2
    return range(max(lo, 0), min(lo + size, n))


# --------------------------------------------------------- standalone neurons

NEURON_PARAMS = {"tanh": (1.7, 0.6), "linear": (2.0, -0.5), "brelu": (1.5, 0.0), "log": (1.2, 0.0)}


@pytest.mark.parametrize("name", sorted(NEURONS))
def test_neuron_bwd_input(rng, name):
    a, b = NEURON_PARAMS.get(name, (1.0, 0.0))
    p = dict(n=40, neuron={"name": name, "a": a, "b": b}, accumulate=False)
    x = rng.uniform(0.1, 1.4, 40) * rng.choice([-1, 1], 40)
    if name in ("sqrt", "log"):
        x = np.abs(x)
    dy = rng.standard_normal(40)
    fwd = lambda: run("neuron_fwd", p, x=x, y=np.zeros(40))["y"]
    np.testing.assert_allclose(fwd(), NEURONS[name].forward_np(x, a, b), rtol=1e-14)
    dx = run("neuron_bwd_input", p, x=x, dy=dy, dx=np.zeros(40))["dx"]
    assert_grad(dx, fd_grad(fwd, x, dy))


@pytest.mark.parametrize("name", sorted(n for n, k in NEURONS.items() if not k.needs_input))
def test_neuron_grad_through_input_equals_grad_through_output(rng, name):
    a, b = NEURON_PARAMS.get(name, (1.0, 0.0))
    x = rng.uniform(0.1, 1.4, 30) * rng.choice([-1, 1], 30)
    if name in ("sqrt", "log"):
        x = np.abs(x)
    k = NEURONS[name]
    np.testing.assert_allclose(k.grad_x_np(x, a, b), k.grad_np(k.forward_np(x, a, b), a, b), rtol=1e-9, atol=1e-12)


# ------------------------------------------------------- eltsum, eltmax, concat

def eltsum_y(coeffs, xs):
    y = np.zeros_like(xs[0])
    for i, (c, x) in enumerate(zip(coeffs, xs)):
        y = run("eltsum_fwd", dict(n=x.size, coeff=c, accumulate=i > 0), x=x, y=y)["y"]
    return y


def test_eltsum(rng):
    coeffs = [0.5, -1.25, 2.0]
    xs = [rng.standard_normal((3, 4)) for _ in coeffs]
    dy = rng.standard_normal((3, 4))
    np.testing.assert_allclose(eltsum_y(coeffs, xs), sum(c * x for c, x in zip(coeffs, xs)), rtol=1e-14)
    for c, x in zip(coeffs, xs):
        dx = run("eltsum_bwd", dict(n=12, coeff=c, accumulate=False), dy=dy, dx=np.zeros((3, 4)))["dx"]
        assert_grad(dx, fd_grad(lambda: eltsum_y(coeffs, xs), x, dy))


def eltmax_y(xs):
    y, arg = np.zeros_like(xs[0]), np.zeros_like(xs[0])
    for i, x in enumerate(xs):
        out = run("eltmax_fwd", dict(n=x.size, index=i, first=i == 0), x=x, y=y, arg=arg)
        y, arg = out["y"], out["arg"]
    return y, arg


def test_eltmax(rng):
    xs = list(distinct_values(rng, (3, 2, 5)))
    y, arg = eltmax_y(xs)
    np.testing.assert_array_equal(y, np.max(xs, axis=0))
    np.testing.assert_array_equal(arg, np.argmax(xs, axis=0))
    dy = rng.standard_normal(y.shape)
    for i, x in enumerate(xs):
        dx = run("eltmax_bwd", dict(n=x.size, index=i, accumulate=False), arg=arg, dy=dy, dx=np.zeros_like(x))["dx"]
        assert_grad(dx, fd_grad(lambda: eltmax_y(xs)[0], x, dy))


def test_eltmax_ties_go_to_the_first_input():
    xs = [np.array([1.0, 5.0, 2.0]), np.array([1.0, 5.0, 3.0]), np.array([0.0, 5.0, 3.0])]
    y, arg = eltmax_y(xs)
    np.testing.assert_array_equal(y, [1.0, 5.0, 3.0])
    np.testing.assert_array_equal(arg, [0, 0, 1])
    grads = [run("eltmax_bwd", dict(n=3, index=i), arg=arg, dy=np.ones(3), dx=np.zeros(3))["dx"] for i in range(3)]
    np.testing.assert_array_equal(grads, [[1, 1, 0], [0, 0, 1], [0, 0, 0]])


def concat_y(parts, D_out):
    y, offset = np.zeros((parts[0].shape[0], D_out)), 0
    for x in parts:
        y = run("concat_fwd", dict(N=x.shape[0], D=x.shape[1], D_out=D_out, offset=offset), x=x, y=y)["y"]
        offset += x.shape[1]
    return y


def test_concat_along_channels(rng):
    # NCHW inputs with 2 and 3 channels of 4x5: the channel concatenation is a per-case slice copy
    a, b = rng.standard_normal((3, 2, 4, 5)), rng.standard_normal((3, 3, 4, 5))
    parts = [a.reshape(3, -1), b.reshape(3, -1)]
    y = concat_y(parts, 100)
    np.testing.assert_array_equal(y.reshape(3, 5, 4, 5), np.concatenate([a, b], axis=1))
    dy = rng.standard_normal((3, 100))
    for x, offset in zip(parts, (0, 40)):
        p = dict(N=3, D=x.shape[1], D_out=100, offset=offset, accumulate=False)
        dx = run("concat_bwd", p, dy=dy, dx=np.zeros_like(x))["dx"]
        assert_grad(dx, fd_grad(lambda: concat_y(parts, 100), x, dy))


# ------------------------------------------------------------------ costs

def soft_targets(rng, N, C):
    t = np.zeros((N, C))
    t[np.arange(N), rng.integers(0, C, N)] = 1
    t[::2] = rng.dirichlet(np.ones(C), len(t[::2]))
    return t


def crossent_loss(p, targets, probs):
    return run("crossent_fwd", p, targets=targets, probs=probs, loss=np.zeros(p["N"]),
               correct=np.zeros(p["N"]))["loss"]


@pytest.mark.parametrize("N,C", SOFTMAX_SHAPES)
def test_crossent_bwd(rng, N, C):
    p = dict(N=N, C=C, coeff=0.7, accumulate=False)
    targets, probs = soft_targets(rng, N, C), rng.uniform(0.1, 1.0, (N, C))
    np.testing.assert_allclose(crossent_loss(p, targets, probs), -(targets * np.log(probs)).sum(1), rtol=1e-13)
    g = run("crossent_bwd", p, targets=targets, probs=probs, dprobs=np.zeros_like(probs))["dprobs"]
    assert_grad(g, fd_grad(lambda: crossent_loss(p, targets, probs), probs, np.full(N, p["coeff"])))


@pytest.mark.parametrize("N,C", SOFTMAX_SHAPES)
def test_softmax_crossent_bwd(rng, N, C):
    p = dict(N=N, C=C, coeff=1.3, accumulate=False)
    targets, x = soft_targets(rng, N, C), rng.standard_normal((N, C))
    targets[0] *= 1.5                       # not normalised: the gradient must still be exact
    probs = softmax_y(p, x)
    dx = run("softmax_crossent_bwd", p, targets=targets, probs=probs, dx=np.zeros_like(x))["dx"]
    assert_grad(dx, fd_grad(lambda: crossent_loss(p, targets, softmax_y(p, x)), x, np.full(N, p["coeff"])))
    g = run("crossent_bwd", p, targets=targets, probs=probs, dprobs=np.zeros_like(x))["dprobs"]
    chained = run("softmax_bwd", p, y=probs, dy=g, dx=np.zeros_like(x))["dx"]
    np.testing.assert_allclose(dx, chained, rtol=1e-10, atol=1e-12)


def test_crossent_fwd_correct_counts_ties_like_cuda_convnet2():
    probs = np.array([[0.1, 0.5, 0.4], [0.4, 0.4, 0.2], [0.4, 0.4, 0.2], [0.2, 0.3, 0.5]])
    targets = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1], [1, 0, 0]], dtype=float)
    out = run("crossent_fwd", dict(N=4, C=3), targets=targets, probs=probs, loss=np.zeros(4), correct=np.zeros(4))
    np.testing.assert_array_equal(out["correct"], [1.0, 0.5, 0.0, 0.0])
    np.testing.assert_allclose(out["loss"], -np.log([0.5, 0.4, 0.2, 0.2]))


def test_sum2(rng):
    p = dict(N=3, D=7, coeff=0.35, accumulate=False)
    x, coeff = rng.standard_normal((3, 7)), np.full(3, p["coeff"])
    loss = lambda: run("sum2_fwd", p, x=x, loss=np.zeros(3))["loss"]
    np.testing.assert_allclose(loss(), (x * x).sum(1), rtol=1e-14)
    dx = run("sum2_bwd", p, x=x, dx=np.zeros_like(x))["dx"]
    assert_grad(dx, fd_grad(loss, x, coeff))
    np.testing.assert_allclose(dx, 2 * p["coeff"] * x, rtol=1e-14)   # cuda-convnet2: -2*coeff*x (ascent)


# ---------------------------------------------------- response normalisation

# (N, C, H, W, size, blocked)
CMRNORM_SHAPES = [(2, 7, 2, 3, 5, False), (1, 6, 2, 2, 4, False), (1, 5, 1, 2, 9, False),
                  (2, 8, 2, 2, 3, True), (1, 7, 1, 3, 4, True), (1, 3, 2, 2, 1, False)]
# (N, C, H, W, size)
RNORM_SHAPES = [(1, 2, 5, 5, 3), (2, 1, 4, 6, 4), (1, 1, 6, 5, 5), (1, 2, 3, 3, 9), (1, 1, 4, 4, 1)]


def cmrnorm_direct(p, x):
    N, C, H, W = x.shape
    a = p["scale"] / p["size"]
    den = np.zeros_like(x)
    for c in range(C):
        den[:, c] = p["min_div"] + a * sum(x[:, j] ** 2 for j in window(c, p["size"], C, p["blocked"]))
    return x * den ** -p["pow"], den


def spatial_direct(p, v):
    """Sum of v over each pixel's clipped size x size window, and the windows' pixel counts."""
    N, C, H, W = v.shape
    out, counts = np.zeros_like(v), np.zeros((H, W))
    for h in range(H):
        for w in range(W):
            rows, cols = window(h, p["size"], H), window(w, p["size"], W)
            out[:, :, h, w] = v[:, :, rows.start:rows.stop, cols.start:cols.stop].sum(axis=(2, 3))
            counts[h, w] = len(rows) * len(cols)
    return out, counts


def norm_fwd(op, p, x):
    return run(op, p, x=x, y=np.zeros_like(x), denoms=np.zeros_like(x))


@pytest.mark.parametrize("shape", CMRNORM_SHAPES)
def test_cmrnorm(rng, shape):
    *dims, size, blocked = shape
    p = norm_params(*dims, size, scale=1.7, pow=0.75, min_div=2.0, blocked=blocked)
    x, dy = rng.standard_normal(dims), rng.standard_normal(dims)
    out = norm_fwd("cmrnorm_fwd", p, x)
    want_y, want_den = cmrnorm_direct(p, x)
    np.testing.assert_allclose(out["y"], want_y, rtol=1e-13)
    np.testing.assert_allclose(out["denoms"], want_den, rtol=1e-13)
    dx = run("cmrnorm_bwd", p, x=x, dy=dy, denoms=out["denoms"], dx=np.zeros_like(x))["dx"]
    assert_grad(dx, fd_grad(lambda: norm_fwd("cmrnorm_fwd", p, x)["y"], x, dy))


def test_cmrnorm_window_matches_cuda_convnet2():
    # channel c's window starts at c - size/2 (C integer division): size 4 -> c-2 .. c+1
    p = norm_params(1, 6, 1, 1, 4, scale=4.0, pow=1.0, min_div=1.0)
    x = np.zeros((1, 6, 1, 1))
    x[0, 5, 0, 0] = 1.0                          # only channel 5 is non-zero
    den = norm_fwd("cmrnorm_fwd", p, x)["denoms"].ravel()
    # addScale = scale/size = 1: windows of channels 4 (2..5) and 5 (3..5, clipped) hold channel 5
    np.testing.assert_array_equal(den, [1, 1, 1, 1, 2, 2])


@pytest.mark.parametrize("shape", RNORM_SHAPES)
def test_rnorm(rng, shape):
    *dims, size = shape
    p = norm_params(*dims, size, scale=2.3, pow=0.6, min_div=1.5)
    x, dy = rng.standard_normal(dims), rng.standard_normal(dims)
    out = norm_fwd("rnorm_fwd", p, x)
    den = p["min_div"] + p["scale"] / size ** 2 * spatial_direct(p, x * x)[0]
    np.testing.assert_allclose(out["denoms"], den, rtol=1e-13)
    np.testing.assert_allclose(out["y"], x * den ** -p["pow"], rtol=1e-13)
    dx = run("rnorm_bwd", p, x=x, dy=dy, denoms=out["denoms"], dx=np.zeros_like(x))["dx"]
    assert_grad(dx, fd_grad(lambda: norm_fwd("rnorm_fwd", p, x)["y"], x, dy))


def cnorm_y(p, x):
    md = run("cnorm_meandiff", p, x=x, md=np.zeros_like(x))["md"]
    return run("cnorm_fwd", p, x=x, md=md, y=np.zeros_like(x), denoms=np.zeros_like(x))


def cnorm_dx(p, x, dy):
    md = run("cnorm_meandiff", p, x=x, md=np.zeros_like(x))["md"]
    den = run("cnorm_fwd", p, x=x, md=md, y=np.zeros_like(x), denoms=np.zeros_like(x))["denoms"]
    t = run("cnorm_bwd_prep", p, x=x, dy=dy, denoms=den, md=md)["md"]
    return run("cnorm_bwd", p, dy=dy, denoms=den, md=t, dx=np.zeros_like(x))["dx"]


@pytest.mark.parametrize("shape", RNORM_SHAPES)
def test_cnorm(rng, shape):
    *dims, size = shape
    p = norm_params(*dims, size, scale=3.1, pow=0.75, min_div=1.0)
    x, dy = rng.standard_normal(dims), rng.standard_normal(dims)
    sums, counts = spatial_direct(p, x)
    md = x - sums / counts
    den = p["min_div"] + p["scale"] / size ** 2 * spatial_direct(p, md * md)[0]
    out = cnorm_y(p, x)
    np.testing.assert_allclose(out["denoms"], den, rtol=1e-13)
    np.testing.assert_allclose(out["y"], x * den ** -p["pow"], rtol=1e-13)   # x, not md, is scaled
    assert_grad(cnorm_dx(p, x, dy), fd_grad(lambda: cnorm_y(p, x)["y"], x, dy))


# ----------------------------------------------------------------- dropout

def dropout_params(N, D, keep, **kw):
    return dict(dict(N=N, D=D, keep=keep, layer_id=2, case_offset=0, variant="dropout", train=True), **kw)


def dropout_run(p, x, seed=11, step=5):
    return run("dropout_fwd", p, x=x, y=np.zeros_like(x), mask=np.zeros_like(x), seed=seed, step=step)


def test_philox_known_answers():
    from cnnc.backends.reference_ops import philox4x32_10
    vectors = [((0, 0, 0, 0), (0, 0), (0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8)),
               ((0xffffffff,) * 4, (0xffffffff,) * 2, (0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd)),
               ((0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), (0xa4093822, 0x299f31d0),
                (0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1))]
    for ctr, key, want in vectors:
        assert tuple(int(v) for v in philox4x32_10(*ctr, *key)) == want


def test_dropout_mask_does_not_depend_on_the_batch_split(rng):
    x = rng.standard_normal((8, 30))
    whole = dropout_run(dropout_params(8, 30, 0.6), x)["mask"]
    halves = [dropout_run(dropout_params(4, 30, 0.6, case_offset=o), x[o:o + 4])["mask"] for o in (0, 4)]
    np.testing.assert_array_equal(whole, np.concatenate(halves))
    # ... but does depend on seed, step and layer
    for change in (dict(seed=12), dict(step=6)):
        assert not np.array_equal(whole, dropout_run(dropout_params(8, 30, 0.6), x, **change)["mask"])
    assert not np.array_equal(whole, dropout_run(dropout_params(8, 30, 0.6, layer_id=3), x)["mask"])


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9])
def test_dropout_keeps_the_right_fraction(keep):
    x = np.ones((200, 100))
    m = dropout_run(dropout_params(200, 100, keep), x)["mask"]
    kept = (m != 0).mean()
    assert abs(kept - keep) < 4 * np.sqrt(keep * (1 - keep) / x.size)
    np.testing.assert_allclose(m[m != 0], 1 / keep)          # inverted dropout


def test_dropout2_and_test_mode(rng):
    x = rng.standard_normal((6, 10))
    d1 = dropout_run(dropout_params(6, 10, 0.7), x)
    d2 = dropout_run(dropout_params(6, 10, 0.7, variant="dropout2"), x)
    np.testing.assert_array_equal(d1["mask"] != 0, d2["mask"] != 0)   # same draws
    np.testing.assert_array_equal(d2["y"], x * (d2["mask"] != 0))     # dropout2 trains unscaled
    np.testing.assert_allclose(d1["y"], x * (d1["mask"] != 0) / 0.7)
    test1 = run("dropout_fwd", dropout_params(6, 10, 0.7, train=False), x=x, y=np.zeros_like(x),
                mask=np.full_like(x, 9.0), seed=1, step=1)
    np.testing.assert_array_equal(test1["y"], x)
    np.testing.assert_array_equal(test1["mask"], 9.0)                  # untouched at test time
    test2 = run("dropout_fwd", dropout_params(6, 10, 0.7, variant="dropout2", train=False), x=x,
                y=np.zeros_like(x), mask=np.zeros_like(x), seed=1, step=1)
    np.testing.assert_allclose(test2["y"], 0.7 * x)                    # dropout2 scales at test time


@pytest.mark.parametrize("variant", ["dropout", "dropout2"])
def test_dropout_bwd(rng, variant):
    p = dropout_params(5, 9, 0.5, variant=variant)
    x, dy = rng.standard_normal((5, 9)), rng.standard_normal((5, 9))
    mask = dropout_run(p, x)["mask"]
    dx = run("dropout_bwd", dict(n=45, accumulate=False), mask=mask, dy=dy, dx=np.zeros_like(x))["dx"]
    assert_grad(dx, fd_grad(lambda: dropout_run(p, x)["y"], x, dy))


# ------------------------------------------------------ locally connected

def local_inputs(rng, shape):
    p = conv_params(*shape)
    x = rng.standard_normal((p["N"], p["C"], p["H"], p["W"]))
    w = rng.standard_normal((p["P"] * p["Q"], p["K"], p["C"], p["R"], p["S"]))
    b = rng.standard_normal((p["K"], p["P"], p["Q"]))
    dy = rng.standard_normal((p["N"], p["K"], p["P"], p["Q"]))
    return p, x, w, b, dy


def local_y(p, x, w, b):
    return run("local_fwd", p, x=x, w=w, b=b, y=np.zeros((p["N"], p["K"], p["P"], p["Q"])))["y"]


@pytest.mark.parametrize("shape", CONV_SHAPES)
def test_local_fwd_matches_direct_formula(rng, shape):
    p, x, w, b, _ = local_inputs(rng, shape)
    expect = np.zeros((p["N"], p["K"], p["P"], p["Q"])) + b[None]
    for pp in range(p["P"]):
        for qq in range(p["Q"]):
            wpos = w[pp * p["Q"] + qq]
            for r in range(p["R"]):
                for s_ in range(p["S"]):
                    h, v = pp * p["stride"] - p["pad"] + r, qq * p["stride"] - p["pad"] + s_
                    if 0 <= h < p["H"] and 0 <= v < p["W"]:
                        expect[:, :, pp, qq] += x[:, :, h, v] @ wpos[:, :, r, s_].T
    np.testing.assert_allclose(local_y(p, x, w, b), expect, rtol=1e-12, atol=1e-12)


def test_local_with_tied_weights_is_a_convolution(rng):
    p, x, w, b, _ = conv_inputs(rng, CONV_SHAPES[2])
    tied = np.broadcast_to(w, (p["P"] * p["Q"],) + w.shape)
    unshared_b = np.broadcast_to(b[:, None, None], (p["K"], p["P"], p["Q"]))
    np.testing.assert_allclose(local_y(p, x, tied, unshared_b), conv_y(p, x, w, b), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", CONV_SHAPES)
def test_local_grads(rng, shape):
    p, x, w, b, dy = local_inputs(rng, shape)
    dx = run("local_bwd_data", p, w=w, dy=dy, dx=np.zeros_like(x))["dx"]
    assert_grad(dx, fd_grad(lambda: local_y(p, x, w, b), x, dy))
    dw = run("local_bwd_filter", p, x=x, dy=dy, dw=np.zeros_like(w))["dw"]
    assert_grad(dw, fd_grad(lambda: local_y(p, x, w, b), w, dy))
    bp = dict(N=p["N"], K=p["K"], inner=p["P"] * p["Q"])
    db = run("bias_grad_unshared", bp, dy=dy, db=np.zeros_like(b))["db"]
    assert_grad(db, fd_grad(lambda: local_y(p, x, w, b), b, dy))


# --------------------------------------------- grouped conv, unshared biases

# (N, C, H, W, K, R, S, stride, pad, groups)
GROUPED_SHAPES = [(2, 4, 5, 5, 6, 3, 3, 1, 1, 2), (1, 6, 6, 7, 3, 3, 3, 2, 1, 3), (2, 4, 4, 4, 8, 1, 1, 1, 0, 4)]


def grouped_inputs(rng, shape, shared_biases=True):
    *dims, groups = shape
    p = dict(conv_params(*dims), groups=groups, shared_biases=shared_biases)
    x = rng.standard_normal((p["N"], p["C"], p["H"], p["W"]))
    w = rng.standard_normal((p["K"], p["C"] // groups, p["R"], p["S"]))
    b = rng.standard_normal(p["K"] if shared_biases else (p["K"], p["P"], p["Q"]))
    dy = rng.standard_normal((p["N"], p["K"], p["P"], p["Q"]))
    return p, x, w, b, dy


@pytest.mark.parametrize("shape", GROUPED_SHAPES)
def test_grouped_conv_is_one_conv_per_group(rng, shape):
    p, x, w, b, dy = grouped_inputs(rng, shape)
    G, Cg, Kg = p["groups"], p["C"] // p["groups"], p["K"] // p["groups"]
    y = conv_y(p, x, w, b)
    for g in range(G):
        pg = dict(p, C=Cg, K=Kg, groups=1)
        part = conv_y(pg, x[:, g * Cg:(g + 1) * Cg], w[g * Kg:(g + 1) * Kg], b[g * Kg:(g + 1) * Kg])
        np.testing.assert_allclose(y[:, g * Kg:(g + 1) * Kg], part, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("shape", GROUPED_SHAPES)
def test_grouped_conv_grads(rng, shape, shared):
    p, x, w, b, dy = grouped_inputs(rng, shape, shared)
    dx = run("conv_bwd_data", p, w=w, dy=dy, dx=np.zeros_like(x))["dx"]
    assert_grad(dx, fd_grad(lambda: conv_y(p, x, w, b), x, dy))
    dw = run("conv_bwd_filter", p, x=x, dy=dy, dw=np.zeros_like(w))["dw"]
    assert_grad(dw, fd_grad(lambda: conv_y(p, x, w, b), w, dy))
    if shared:
        db = run("bias_grad", dict(N=p["N"], K=p["K"], inner=p["P"] * p["Q"]), dy=dy, db=np.zeros_like(b))["db"]
    else:
        db = run("bias_grad_unshared", dict(N=p["N"], K=p["K"], inner=p["P"] * p["Q"]), dy=dy,
                 db=np.zeros_like(b))["db"]
    assert_grad(db, fd_grad(lambda: conv_y(p, x, w, b), b, dy))


def test_absent_group_params_mean_a_plain_convolution(rng):
    p, x, w, b, _ = conv_inputs(rng, CONV_SHAPES[0])
    explicit = dict(p, groups=1, shared_biases=True)
    np.testing.assert_array_equal(conv_y(p, x, w, b), conv_y(explicit, x, w, b))


# --------------------------------------------------- accumulate test cases

def _layer_accumulate_cases():
    def elementwise(op, **arrays):
        return lambda rng: (dict(n=12, coeff=0.6, index=1, neuron={"name": "square"}, accumulate=False),
                            {k: (v(rng) if callable(v) else v) for k, v in arrays.items()})
    normal = lambda rng: rng.standard_normal(12)

    def norm_case(op, fwd):
        def make(rng):
            p = norm_params(1, 4, 3, 3, 3)
            x = rng.standard_normal((1, 4, 3, 3))
            den = norm_fwd(fwd, p, x)["denoms"]
            return p, dict(x=x, dy=rng.standard_normal(x.shape), denoms=den, dx=np.zeros_like(x))
        return make

    def cnorm_case(rng):
        p = norm_params(1, 2, 4, 4, 3)
        x = rng.standard_normal((1, 2, 4, 4))
        den = cnorm_y(p, x)["denoms"]
        return p, dict(dy=rng.standard_normal(x.shape), denoms=den, md=rng.standard_normal(x.shape),
                       dx=np.zeros_like(x))

    def local_case(op):
        def make(rng):
            p, x, w, _, dy = local_inputs(rng, CONV_SHAPES[2])
            if op == "local_bwd_data":
                return p, dict(w=w, dy=dy, dx=np.zeros_like(x))
            if op == "local_bwd_filter":
                return p, dict(x=x, dy=dy, dw=np.zeros_like(w))
            return dict(N=p["N"], K=p["K"], inner=p["P"] * p["Q"]), dict(dy=dy, db=np.zeros((p["K"], p["P"] * p["Q"])))
        return make

    def cost_case(op):
        def make(rng):
            p = dict(N=3, C=4, D=4, coeff=0.8, accumulate=False)
            probs = softmax_y(p, rng.standard_normal((3, 4)))
            if op == "sum2_bwd":
                return p, dict(x=rng.standard_normal((3, 4)), dx=np.zeros((3, 4)))
            out = "dprobs" if op == "crossent_bwd" else "dx"
            return p, {"targets": soft_targets(rng, 3, 4), "probs": probs, out: np.zeros((3, 4))}
        return make

    def concat_case(rng):
        return dict(N=3, D=4, D_out=9, offset=2), dict(dy=rng.standard_normal((3, 9)), dx=np.zeros((3, 4)))

    return {
        "neuron_bwd_input": elementwise("neuron_bwd_input", x=normal, dy=normal, dx=np.zeros(12)),
        "eltsum_fwd": elementwise("eltsum_fwd", x=normal, y=np.zeros(12)),
        "eltsum_bwd": elementwise("eltsum_bwd", dy=normal, dx=np.zeros(12)),
        "eltmax_bwd": elementwise("eltmax_bwd", arg=lambda rng: rng.integers(0, 3, 12).astype(float), dy=normal,
                                  dx=np.zeros(12)),
        "dropout_bwd": elementwise("dropout_bwd", mask=lambda rng: rng.choice([0.0, 2.0], 12), dy=normal,
                                   dx=np.zeros(12)),
        "concat_bwd": concat_case,
        "crossent_bwd": cost_case("crossent_bwd"),
        "softmax_crossent_bwd": cost_case("softmax_crossent_bwd"),
        "sum2_bwd": cost_case("sum2_bwd"),
        "cmrnorm_bwd": norm_case("cmrnorm_bwd", "cmrnorm_fwd"),
        "rnorm_bwd": norm_case("rnorm_bwd", "rnorm_fwd"),
        "cnorm_bwd": cnorm_case,
        "local_bwd_data": local_case("local_bwd_data"),
        "local_bwd_filter": local_case("local_bwd_filter"),
        "bias_grad_unshared": local_case("bias_grad_unshared"),
    }


LAYER_ACCUMULATE_CASES = _layer_accumulate_cases()


def test_split_k_partials_sum_to_the_weight_gradient(rng):
    """conv_bwd_filter with split > 1 writes partial sums; replica_sum adds them to the full gradient."""
    p, x, w, _, dy = conv_inputs(rng, CONV_SHAPES[2])
    full = np.zeros_like(w)
    REFERENCE_OPS["conv_bwd_filter"](p, x.reshape(-1), dy.reshape(-1), full.reshape(-1))
    reduction = p["N"] * p["P"] * p["Q"]
    split_k = -(-reduction // 3)
    split = -(-reduction // split_k)
    partials = np.zeros(split * w.size)
    REFERENCE_OPS["conv_bwd_filter"](dict(p, split=split, split_k=split_k), x.reshape(-1), dy.reshape(-1), partials)
    summed = np.zeros(w.size)
    REFERENCE_OPS["replica_sum"](dict(R=split, n=w.size, offset=0), partials, summed)
    np.testing.assert_allclose(summed, full.reshape(-1), rtol=1e-10, atol=1e-12)


def test_max_norm_scales_only_long_units():
    """wball: each unit's incoming weights (a row for conv, a column for fc) end with norm <= wball."""
    w = np.array([[3.0, 4.0, 0.0], [0.3, 0.4, 0.0]])      # conv layout: units are rows, norms 5 and 0.5
    REFERENCE_OPS["max_norm"](dict(units=2, length=3, unit_stride=3, elem_stride=1, wball=1.0), w.reshape(-1))
    np.testing.assert_allclose(w, [[0.6, 0.8, 0.0], [0.3, 0.4, 0.0]])
    fc = np.array([[3.0, 0.1], [4.0, 0.1]])                # fc layout [I, O]: units are columns
    REFERENCE_OPS["max_norm"](dict(units=2, length=2, unit_stride=1, elem_stride=2, wball=2.5), fc.reshape(-1))
    np.testing.assert_allclose(fc, [[1.5, 0.1], [2.0, 0.1]])
