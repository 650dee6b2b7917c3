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

H_STEP = 1e-6
RTOL = 1e-5
ATOL = 1e-7


# ----------------------------------------------------------------- helpers

def run(name, params, **arrays):
    """Call a reference op on flat copies of the arrays; return its outputs reshaped."""
    args, flat = [], {}
    for arg, role in OPS[name].args:
        if role is Role.SCALAR:
            args.append(float(arrays[arg]))
            continue
        a = np.asarray(arrays[arg])
        flat[arg] = a.reshape(-1).copy()
        args.append(flat[arg])
    REFERENCE_OPS[name](params, *args)
    return {arg: flat[arg].reshape(np.shape(arrays[arg]))
            for arg, role in OPS[name].args if role in (Role.OUT, Role.INOUT)}


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
    (out,) = [a for a, role in OPS[name].args if role is Role.OUT]
    fresh = run(name, p, **arrays)[out]
    before = rng.standard_normal(arrays[out].shape)
    overwritten = run(name, dict(p, accumulate=False), **dict(arrays, **{out: before}))[out]
    added = run(name, dict(p, accumulate=True), **dict(arrays, **{out: before}))[out]
    absent = {k: v for k, v in p.items() if k != "accumulate"}
    defaulted = run(name, absent, **dict(arrays, **{out: before}))[out]
    np.testing.assert_array_equal(overwritten, fresh)
    np.testing.assert_array_equal(defaulted, fresh)
    np.testing.assert_allclose(added, before + fresh, rtol=1e-14, atol=1e-14)
