"""The numpy reference ops checked against PyTorch, forward and backward, op by op.

The reference is every kernel test's oracle; this file is the reference's own.  cuda-convnet2's
semantics are written out here on the PyTorch side, with padding and masks, not taken from the
reference: the last conv window may overhang the padded image (it reads zeros), pool windows
are clipped to the image (an average divides by the clipped pixel count), normalisation windows
are clipped at the edges with scale/size (cross-map) or scale/size^2 (same-map).  Gradients come
from torch.autograd and are compared with the reference's backward ops, in float64.
"""
from __future__ import annotations

import numpy as np
import pytest

from cnnc.check.kinds import KINDS
from cnnc.neurons import NEURONS

from helpers import run_reference as run, stable_seed

torch = pytest.importorskip("torch")
F = torch.nn.functional

RTOL, ATOL = 1e-9, 1e-11


# ----------------------------------------------------------------- helpers

def rng_for(*case) -> np.random.Generator:
    return np.random.default_rng(stable_seed(*case))


def leaf(a: np.ndarray):
    return torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=True)


def grads(y, dy: np.ndarray, *inputs) -> list[np.ndarray]:
    """d sum(dy * y) / d input, for each input."""
    return [g.numpy() for g in torch.autograd.grad(y, inputs, torch.tensor(dy))]


def close(got, want, what: str = "", rtol: float = RTOL) -> None:
    want = want.detach().numpy() if hasattr(want, "detach") else np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=ATOL, err_msg=what)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def conv_out(extent: int, size: int, stride: int, pad: int) -> int:
    """cuda-convnet2's output count: the last window may overhang the padded image."""
    return 1 + ceil_div(2 * pad + extent - size, stride)


def overhang_pad(x, size: int, stride: int, pad: int, P: int, Q: int):
    """x padded with `pad` zeros on every side plus the zeros the last windows overhang."""
    H, W = x.shape[2:]
    extra_h = max(0, (P - 1) * stride + size - (H + 2 * pad))
    extra_w = max(0, (Q - 1) * stride + size - (W + 2 * pad))
    return F.pad(x, (pad, pad + extra_w, pad, pad + extra_h))


# ---------------------------------------------------------------- neurons

# name -> (a, b, input range, kinks to keep away from), and each neuron written in PyTorch
NEURON_CASES = {
    "ident": (1.0, 0.0, (-3, 3), ()),
    "relu": (1.0, 0.0, (-3, 3), (0,)),
    "logistic": (1.0, 0.0, (-5, 5), ()),
    "tanh": (1.7159, 0.6667, (-3, 3), ()),
    "brelu": (1.5, 0.0, (-1, 3), (0, 1.5)),
    "softrelu": (1.0, 0.0, (-5, 25), (20,)),
    "linear": (2.5, -0.5, (-3, 3), ()),
    "sqrt": (1.0, 0.0, (0.2, 3), ()),
    "log": (0.5, 0.0, (0.2, 3), ()),
    "abs": (1.0, 0.0, (-3, 3), (0,)),
    "square": (1.0, 0.0, (-3, 3), ()),
}

TORCH_NEURONS = {
    "ident": lambda x, a, b: x,
    "relu": lambda x, a, b: torch.relu(x),
    "logistic": lambda x, a, b: torch.sigmoid(x),
    "tanh": lambda x, a, b: a * torch.tanh(b * x),
    "brelu": lambda x, a, b: torch.clamp(x, 0, a),
    "softrelu": lambda x, a, b: F.softplus(x),
    "linear": lambda x, a, b: a * x + b,
    "sqrt": lambda x, a, b: torch.sqrt(x),
    "log": lambda x, a, b: torch.log(a + x),
    "abs": lambda x, a, b: torch.abs(x),
    "square": lambda x, a, b: x * x,
}


def neuron_json(name: str) -> dict:
    a, b = NEURON_CASES[name][:2]
    return {"name": name, "a": a, "b": b}


def torch_neuron(name: str, x):
    a, b = NEURON_CASES[name][:2]
    return TORCH_NEURONS[name](x, a, b)


def neuron_input(name: str, shape) -> np.ndarray:
    lo, hi, kinks = *NEURON_CASES[name][2], NEURON_CASES[name][3]
    x = rng_for("neuron", name).uniform(lo, hi, shape)
    for k in kinks:
        near = np.abs(x - k) < 0.05
        x[near] = k + 0.1
    return x


def test_every_neuron_and_layer_kind_has_a_torch_twin():
    assert set(NEURON_CASES) == set(TORCH_NEURONS) == set(NEURONS)
    assert set(KIND_TESTS) == set(KINDS)


@pytest.mark.parametrize("name", list(NEURON_CASES))
def test_neuron(name):
    x = neuron_input(name, (4, 7))
    n = x.size
    xt = leaf(x)
    yt = torch_neuron(name, xt)
    y = run("neuron_fwd", dict(n=n, neuron=neuron_json(name)), x=x, y=np.zeros_like(x))["y"]
    close(y, yt, f"{name} forward")
    dy = rng_for("neuron dy", name).standard_normal(x.shape)
    (want,) = grads(yt, dy, xt)
    # softrelu is x above 20, whose slope is 1; the reference's is the logistic's, 1 - e^-x there
    rtol = 1e-8 if name == "softrelu" else RTOL
    got = run("neuron_bwd_input", dict(n=n, neuron=neuron_json(name)), x=x, dy=dy, dx=np.zeros_like(x))["dx"]
    close(got, want, f"{name} gradient through the input", rtol)
    if not NEURONS[name].needs_input:                 # fused neurons: the gradient through the output
        got = run("neuron_bwd", dict(n=n, neuron=neuron_json(name)), y=y, g=dy)["g"]
        close(got, want, f"{name} gradient through the output", rtol)


# ------------------------------------------------------- conv, local, fc

CONV_CASES = {
    # name: N, [C per input], H, W, K, size, stride, pad, groups, shared_biases, neuron
    "plain-odd": (2, [3], 7, 7, 4, 3, 1, 0, 1, True, "ident"),
    "stride2-pad-overhang": (2, [3], 8, 8, 5, 3, 2, 1, 1, True, "relu"),
    "stride3-overhang-by-2": (1, [2], 10, 10, 3, 4, 3, 2, 1, True, "tanh"),
    "not-square": (3, [2], 5, 6, 3, 5, 2, 0, 1, True, "logistic"),
    "groups-unshared": (2, [4], 9, 9, 6, 3, 2, 1, 2, False, "softrelu"),
    "groups-3": (1, [6], 6, 5, 9, 2, 1, 0, 3, True, "linear"),
    "window-beyond-image": (2, [2], 3, 3, 2, 5, 1, 1, 1, True, "brelu"),
    "two-inputs": (2, [2, 3], 6, 6, 4, 3, 2, 1, 1, True, "tanh"),
    "three-inputs-unshared": (1, [1, 2, 3], 5, 5, 2, 2, 2, 0, 1, False, "relu"),
}


def conv_case(name: str):
    N, Cs, H, W, K, size, stride, pad, G, shared, neuron = CONV_CASES[name]
    P, Q = conv_out(H, size, stride, pad), conv_out(W, size, stride, pad)
    rng = rng_for("conv", name)
    xs = [rng.standard_normal((N, C, H, W)) for C in Cs]
    ws = [0.3 * rng.standard_normal((K, C // G, size, size)) for C in Cs]
    b = rng.standard_normal((K,) if shared else (K, P, Q))
    dy = rng.standard_normal((N, K, P, Q))
    params = [dict(N=N, C=C, H=H, W=W, K=K, R=size, S=size, P=P, Q=Q, stride=stride, pad=pad, groups=G,
                   shared_biases=shared, neuron=neuron_json(neuron if i == len(Cs) - 1 else "ident"),
                   accumulate=i > 0, bias=i == 0)
              for i, C in enumerate(Cs)]
    return params, xs, ws, b, dy, neuron


@pytest.mark.parametrize("name", list(CONV_CASES))
def test_conv(name):
    params, xs, ws, b, dy, neuron = conv_case(name)
    p0 = params[0]
    size, stride, pad, P, Q = p0["R"], p0["stride"], p0["pad"], p0["P"], p0["Q"]
    xt, wt, bt = [leaf(x) for x in xs], [leaf(w) for w in ws], leaf(b)
    z = sum(F.conv2d(overhang_pad(x, size, stride, pad, P, Q), w, stride=stride, groups=p0["groups"])
            for x, w in zip(xt, wt))
    assert z.shape == (p0["N"], p0["K"], P, Q)
    yt = torch_neuron(neuron, z + (bt[:, None, None] if b.ndim == 1 else bt))

    y = np.zeros(z.shape)
    for p, x, w in zip(params, xs, ws):
        y = run("conv_fwd", p, x=x, w=w, b=b, y=y)["y"]
    close(y, yt, "forward")

    want = grads(yt, dy, *xt, *wt, bt)
    g = run("neuron_bwd", dict(n=dy.size, neuron=params[-1]["neuron"]), y=y, g=dy)["g"]
    for i, (p, x, w) in enumerate(zip(params, xs, ws)):
        q = dict(p, accumulate=False)
        close(run("conv_bwd_data", q, w=w, dy=g, dx=np.zeros_like(x))["dx"], want[i], f"dx of input {i}")
        close(run("conv_bwd_filter", q, x=x, dy=g, dw=np.zeros_like(w))["dw"], want[len(xs) + i], f"dw {i}")
    bias_op = "bias_grad" if b.ndim == 1 else "bias_grad_unshared"
    db = run(bias_op, dict(N=p0["N"], K=p0["K"], inner=P * Q, accumulate=False), dy=g, db=np.zeros_like(b))["db"]
    close(db, want[-1], "db")


def test_conv_filter_gradient_split_k_partials_sum_to_the_gradient():
    params, (x,), (w,), b, dy, _ = conv_case("stride2-pad-overhang")
    p = params[0]
    xt, wt = leaf(x), leaf(w)
    z = F.conv2d(overhang_pad(xt, p["R"], p["stride"], p["pad"], p["P"], p["Q"]), wt, stride=p["stride"])
    (want,) = grads(z, dy, wt)
    rows = p["N"] * p["P"] * p["Q"]
    split = 3
    partials = run("conv_bwd_filter", dict(p, split=split, split_k=ceil_div(rows, split), accumulate=False),
                   x=x, dy=dy, dw=np.zeros((split,) + w.shape))["dw"]
    close(partials.sum(axis=0), want)


LOCAL_CASES = {
    # name: N, C, H, W, K, size, stride, pad, neuron
    "plain": (2, 2, 5, 5, 3, 3, 1, 0, "ident"),
    "stride2-pad-overhang": (2, 3, 6, 7, 2, 3, 2, 1, "tanh"),
    "window-beyond-image": (1, 2, 3, 3, 2, 4, 2, 1, "relu"),
}


@pytest.mark.parametrize("name", list(LOCAL_CASES))
def test_local(name):
    N, C, H, W, K, size, stride, pad, neuron = LOCAL_CASES[name]
    P, Q = conv_out(H, size, stride, pad), conv_out(W, size, stride, pad)
    rng = rng_for("local", name)
    x = rng.standard_normal((N, C, H, W))
    w = 0.3 * rng.standard_normal((P, Q, K, C, size, size))
    b = rng.standard_normal((K, P, Q))
    dy = rng.standard_normal((N, K, P, Q))
    p = dict(N=N, C=C, H=H, W=W, K=K, R=size, S=size, P=P, Q=Q, stride=stride, pad=pad,
             neuron=neuron_json(neuron), accumulate=False)
    xt, wt, bt = leaf(x), leaf(w), leaf(b)
    cols = F.unfold(overhang_pad(xt, size, stride, pad, P, Q), size, stride=stride)   # [N, C*size*size, P*Q]
    assert cols.shape[2] == P * Q
    z = torch.einsum("njl,lkj->nkl", cols, wt.reshape(P * Q, K, C * size * size)).reshape(N, K, P, Q)
    yt = torch_neuron(neuron, z + bt)
    y = run("local_fwd", p, x=x, w=w, b=b, y=np.zeros((N, K, P, Q)))["y"]
    close(y, yt, "forward")
    want_dx, want_dw, want_db = grads(yt, dy, xt, wt, bt)
    g = run("neuron_bwd", dict(n=dy.size, neuron=p["neuron"]), y=y, g=dy)["g"]
    close(run("local_bwd_data", p, w=w, dy=g, dx=np.zeros_like(x))["dx"], want_dx, "dx")
    close(run("local_bwd_filter", p, x=x, dy=g, dw=np.zeros_like(w))["dw"], want_dw, "dw")
    db = run("bias_grad_unshared", dict(N=N, K=K, inner=P * Q, accumulate=False), dy=g, db=np.zeros_like(b))["db"]
    close(db, want_db, "db")


FC_CASES = {
    # name: N, [inputs' sizes], outputs, neuron
    "one-input": (3, [7], 5, "tanh"),
    "two-inputs": (2, [4, 9], 3, "relu"),
    "three-inputs": (4, [1, 5, 2], 6, "logistic"),
}


@pytest.mark.parametrize("name", list(FC_CASES))
def test_fc(name):
    N, Is, O, neuron = FC_CASES[name]
    rng = rng_for("fc", name)
    xs = [rng.standard_normal((N, I)) for I in Is]
    ws = [0.5 * rng.standard_normal((I, O)) for I in Is]
    b = rng.standard_normal(O)
    dy = rng.standard_normal((N, O))
    params = [dict(N=N, I=I, O=O, neuron=neuron_json(neuron if i == len(Is) - 1 else "ident"),
                   accumulate=i > 0, bias=i == 0) for i, I in enumerate(Is)]
    xt, wt, bt = [leaf(x) for x in xs], [leaf(w) for w in ws], leaf(b)
    yt = torch_neuron(neuron, sum(F.linear(x, w.T) for x, w in zip(xt, wt)) + bt)
    y = np.zeros((N, O))
    for p, x, w in zip(params, xs, ws):
        y = run("fc_fwd", p, x=x, w=w, b=b, y=y)["y"]
    close(y, yt, "forward")
    want = grads(yt, dy, *xt, *wt, bt)
    g = run("neuron_bwd", dict(n=dy.size, neuron=params[-1]["neuron"]), y=y, g=dy)["g"]
    for i, (p, x, w) in enumerate(zip(params, xs, ws)):
        q = dict(p, accumulate=False)
        close(run("fc_bwd_data", q, w=w, dy=g, dx=np.zeros_like(x))["dx"], want[i], f"dx {i}")
        close(run("fc_bwd_filter", q, x=x, dy=g, dw=np.zeros_like(w))["dw"], want[len(xs) + i], f"dw {i}")
    close(run("bias_grad", dict(N=N, K=O, inner=1, accumulate=False), dy=g, db=np.zeros(O))["db"], want[-1], "db")


# ---------------------------------------------------------------- pooling

POOL_CASES = {
    # name: N, C, H, W, size, stride, start, outputs (0: all that fit)
    "fits": (2, 3, 8, 8, 2, 2, 0, 0),
    "clipped-last-window": (2, 2, 7, 7, 3, 2, 0, 0),
    "overlapping-clipped": (1, 3, 9, 6, 3, 2, 0, 0),
    "start-and-clip": (2, 2, 8, 8, 3, 3, 1, 0),
    "stride-above-size": (1, 2, 10, 10, 2, 3, 0, 0),
    "fewer-outputs": (2, 2, 9, 9, 3, 2, 0, 2),
}


def pool_case(name: str, mode: str):
    N, C, H, W, size, stride, start, outputs = POOL_CASES[name]
    P = 1 + ceil_div(H - start - size, stride)
    Q = 1 + ceil_div(W - start - size, stride)
    if outputs:
        P = Q = outputs
    p = dict(N=N, C=C, H=H, W=W, P=P, Q=Q, size=size, stride=stride, start=start, mode=mode, accumulate=False)
    rng = rng_for("pool", name, mode)
    return p, rng.standard_normal((N, C, H, W)), rng.standard_normal((N, C, P, Q))


def torch_pool(p: dict, x):
    """Windows start at start + o*stride and are clipped to the image: padded with -inf for max;
    for avg, the sum over zero padding divided by the count of image pixels in the window."""
    size, stride, start, P, Q = p["size"], p["stride"], p["start"], p["P"], p["Q"]
    extra_h = max(0, start + (P - 1) * stride + size - p["H"])
    extra_w = max(0, start + (Q - 1) * stride + size - p["W"])

    def windows_summed(v, fill):
        padded = F.pad(v, (0, extra_w, 0, extra_h), value=fill)[:, :, start:, start:]
        if fill == -np.inf:
            return F.max_pool2d(padded, size, stride)[:, :, :P, :Q]
        return F.avg_pool2d(padded, size, stride, divisor_override=1)[:, :, :P, :Q]

    if p["mode"] == "max":
        return windows_summed(x, -np.inf)
    counts = windows_summed(torch.ones((1, 1, p["H"], p["W"]), dtype=x.dtype), 0.0)
    assert (counts > 0).all()
    return windows_summed(x, 0.0) / counts


@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("name", POOL_CASES)
def test_pool(name, mode):
    p, x, dy = pool_case(name, mode)
    xt = leaf(x)
    yt = torch_pool(p, xt)
    assert yt.shape == (p["N"], p["C"], p["P"], p["Q"])
    y = run("pool_fwd", p, x=x, y=np.zeros(dy.shape))["y"]
    close(y, yt, "forward")
    (want,) = grads(yt, dy, xt)
    close(run("pool_bwd", p, x=x, y=y, dy=dy, dx=np.zeros_like(x))["dx"], want, "backward")


def test_avg_pool_divides_by_the_clipped_pixel_count():
    """A 3x3 window from row 2 of a 4-row image holds 2 rows: its mean divides by 2*3, not 9."""
    p, _, _ = pool_case("clipped-last-window", "avg")
    p = dict(p, N=1, C=1, H=4, W=4, P=2, Q=2, size=3, stride=2)
    x = np.ones((1, 1, 4, 4))
    close(run("pool_fwd", p, x=x, y=np.zeros((1, 1, 2, 2)))["y"], torch_pool(p, torch.tensor(x)))
    close(run("pool_fwd", p, x=x, y=np.zeros((1, 1, 2, 2)))["y"], np.ones((1, 1, 2, 2)))


# ---------------------------------------------------- response normalisation

def channel_window_sum(v, size: int, blocked: bool):
    """Sum over each channel's window: `size` channels from c - size//2, or c's block of `size`;
    channels outside the image count as zeros, so the window is clipped."""
    N, C, H, W = v.shape
    if blocked:
        blocks = ceil_div(C, size)
        padded = F.pad(v, (0, 0, 0, 0, 0, blocks * size - C))
        return padded.reshape(N, blocks, size, H, W).sum(2).repeat_interleave(size, dim=1)[:, :C]
    lo = size // 2
    padded = F.pad(v, (0, 0, 0, 0, lo, size - 1 - lo))
    return sum(padded[:, i:i + C] for i in range(size))


def spatial_window_sum(v, size: int):
    """Sum over each pixel's size x size window from (h - size//2, w - size//2), clipped."""
    H, W = v.shape[2:]
    lo = size // 2
    padded = F.pad(v, (lo, size - 1 - lo, lo, size - 1 - lo))
    return sum(padded[:, :, i:i + H, j:j + W] for i in range(size) for j in range(size))


NORM_CASES = {
    # name: kind, N, C, H, W, size, scale, pow, min_div, blocked
    "cmrnorm-odd": ("cmrnorm", 2, 7, 3, 3, 5, 0.3, 0.75, 1.0, False),
    "cmrnorm-even": ("cmrnorm", 2, 6, 2, 3, 4, 0.5, 0.6, 2.0, False),
    "cmrnorm-size-above-channels": ("cmrnorm", 1, 3, 3, 2, 5, 0.4, 0.75, 1.0, False),
    "cmrnorm-blocked": ("cmrnorm", 2, 7, 3, 3, 3, 0.3, 0.75, 1.0, True),
    "rnorm-odd": ("rnorm", 2, 2, 6, 5, 3, 0.8, 0.75, 1.0, False),
    "rnorm-even-beyond-image": ("rnorm", 1, 3, 3, 4, 6, 1.5, 0.5, 2.0, False),
    "cnorm-odd": ("cnorm", 2, 2, 6, 5, 3, 0.8, 0.75, 1.0, False),
    "cnorm-even": ("cnorm", 2, 2, 5, 5, 4, 2.0, 0.6, 1.5, False),
}


def torch_norm(kind: str, x, size, scale, pow_, min_div, blocked):
    if kind == "cmrnorm":
        den = min_div + scale / size * channel_window_sum(x * x, size, blocked)
    elif kind == "rnorm":
        den = min_div + scale / size ** 2 * spatial_window_sum(x * x, size)
    else:
        counts = spatial_window_sum(torch.ones_like(x), size)
        md = x - spatial_window_sum(x, size) / counts
        den = min_div + scale / size ** 2 * spatial_window_sum(md * md, size)
    return x * den ** -pow_


@pytest.mark.parametrize("name", list(NORM_CASES))
def test_norm(name):
    kind, N, C, H, W, size, scale, pow_, min_div, blocked = NORM_CASES[name]
    p = dict(N=N, C=C, H=H, W=W, size=size, scale=scale, pow=pow_, min_div=min_div, accumulate=False)
    if blocked:
        p["blocked"] = True
    rng = rng_for("norm", name)
    x, dy = rng.standard_normal((N, C, H, W)), rng.standard_normal((N, C, H, W))
    xt = leaf(x)
    yt = torch_norm(kind, xt, size, scale, pow_, min_div, blocked)
    (want,) = grads(yt, dy, xt)
    zeros = np.zeros_like(x)
    if kind == "cnorm":
        md = run("cnorm_meandiff", p, x=x, md=zeros)["md"]
        out = run("cnorm_fwd", p, x=x, md=md, y=zeros, denoms=zeros)
        prepared = run("cnorm_bwd_prep", p, x=x, dy=dy, denoms=out["denoms"], md=md)["md"]
        dx = run("cnorm_bwd", p, dy=dy, denoms=out["denoms"], md=prepared, dx=zeros)["dx"]
    else:
        out = run(f"{kind}_fwd", p, x=x, y=zeros, denoms=zeros)
        dx = run(f"{kind}_bwd", p, x=x, dy=dy, denoms=out["denoms"], dx=zeros)["dx"]
    close(out["y"], yt, "forward")
    close(dx, want, "backward")


def test_cmrnorm_is_pytorchs_local_response_norm():
    """PyTorch's own LRN centres the window and divides alpha by size as cuda-convnet2 does."""
    kind, N, C, H, W, size, scale, pow_, min_div, _ = NORM_CASES["cmrnorm-even"]
    p = dict(N=N, C=C, H=H, W=W, size=size, scale=scale, pow=pow_, min_div=min_div)
    x = rng_for("lrn").standard_normal((N, C, H, W))
    y = run("cmrnorm_fwd", p, x=x, y=np.zeros_like(x), denoms=np.zeros_like(x))["y"]
    close(y, F.local_response_norm(torch.tensor(x), size, alpha=scale, beta=pow_, k=min_div))


# ------------------------------------------------- dropout, eltwise, concat

@pytest.mark.parametrize("variant", ["dropout", "dropout2"])
def test_dropout_given_its_mask(variant):
    """The mask is random; what follows from it is not: its two values, y = x * mask in
    training, the test-time scaling, and the gradient through the mask."""
    N, D, keep = 4, 30, 0.7
    rng = rng_for("dropout", variant)
    x, dy = rng.standard_normal((N, D)), rng.standard_normal((N, D))
    p = dict(N=N, D=D, keep=keep, layer_id=3, case_offset=0, variant=variant, train=True)
    out = run("dropout_fwd", p, x=x, y=np.zeros_like(x), mask=np.zeros_like(x), seed=11, step=2)
    mask = out["mask"]
    kept = 1 / keep if variant == "dropout" else 1.0
    assert set(np.unique(mask)) == {0.0, kept}
    xt = leaf(x)
    yt = xt * torch.tensor(mask)
    close(out["y"], yt, "training forward")
    (want,) = grads(yt, dy, xt)
    close(run("dropout_bwd", dict(n=x.size, accumulate=False), mask=mask, dy=dy, dx=np.zeros_like(x))["dx"], want)
    test = run("dropout_fwd", dict(p, train=False), x=x, y=np.zeros_like(x), mask=np.zeros_like(x), seed=11, step=2)
    close(test["y"], torch.tensor(x) * (1.0 if variant == "dropout" else keep), "test forward")


@pytest.mark.parametrize("coeffs", [[1.0], [1.0, -1.0], [0.5, 2.0, -1.5]], ids=["pass", "two", "three"])
def test_eltsum_coeffs(coeffs):
    """eltsum with its coeffs; with one input and coeff 1 it is `pass`."""
    rng = rng_for("eltsum", coeffs)
    xs = [rng.standard_normal((3, 2, 3, 3)) for _ in coeffs]
    dy = rng.standard_normal(xs[0].shape)
    xt = [leaf(x) for x in xs]
    yt = sum(c * x for c, x in zip(coeffs, xt))
    y = np.zeros_like(xs[0])
    for i, (c, x) in enumerate(zip(coeffs, xs)):
        y = run("eltsum_fwd", dict(n=x.size, coeff=c, accumulate=i > 0), x=x, y=y)["y"]
    close(y, yt, "forward")
    for i, (c, want) in enumerate(zip(coeffs, grads(yt, dy, *xt))):
        close(run("eltsum_bwd", dict(n=dy.size, coeff=c, accumulate=False), dy=dy, dx=np.zeros_like(dy))["dx"],
              want, f"input {i}")


def test_eltmax_gradient_goes_to_the_first_input_holding_the_max():
    rng = rng_for("eltmax")
    xs = [np.round(rng.standard_normal((2, 3, 4, 4)), 1) for _ in range(3)]
    xs[1][0] = xs[0][0]                    # ties between inputs 0 and 1 in case 0
    xs[2][1, 0] = xs[1][1, 0]              # and between 1 and 2 in case 1
    dy = rng.standard_normal(xs[0].shape)
    xt = [leaf(x) for x in xs]
    stacked = torch.stack(xt)
    top = stacked.max(dim=0).values.detach()
    holds = stacked.detach() == top
    first = holds & (torch.cumsum(holds.int(), dim=0) == 1)        # explicitly the first input holding it
    assert (holds.sum(0) > 1).any(), "the data has no ties to test"
    yt = (stacked * first).sum(0)
    y, arg = np.zeros_like(xs[0]), np.zeros_like(xs[0])
    for i, x in enumerate(xs):
        out = run("eltmax_fwd", dict(n=x.size, index=i, first=i == 0), x=x, y=y, arg=arg)
        y, arg = out["y"], out["arg"]
    close(y, yt, "forward")
    for i, want in enumerate(grads(yt, dy, *xt)):
        got = run("eltmax_bwd", dict(n=dy.size, index=i, accumulate=False), arg=arg, dy=dy, dx=np.zeros_like(dy))
        close(got["dx"], want, f"input {i}")


def test_concat():
    rng = rng_for("concat")
    xs = [rng.standard_normal((3, C, 2, 3)) for C in (2, 1, 4)]
    xt = [leaf(x) for x in xs]
    yt = torch.cat(xt, dim=1)
    N, D_out = 3, yt[0].numel()
    dy = rng.standard_normal(yt.shape)
    y, offset, ps = np.zeros(yt.shape), 0, []
    for x in xs:
        ps.append(dict(N=N, D=x[0].size, D_out=D_out, offset=offset, accumulate=False))
        y = run("concat_fwd", ps[-1], x=x, y=y)["y"]
        offset += x[0].size
    close(y, yt, "forward")
    for i, (p, x, want) in enumerate(zip(ps, xs, grads(yt, dy, *xt))):
        close(run("concat_bwd", p, dy=dy, dx=np.zeros_like(x))["dx"], want, f"input {i}")


# ------------------------------------------------------------- softmax, costs

def cost_case(name: str, N: int = 5, C: int = 7):
    rng = rng_for("cost", name)
    return rng.standard_normal((N, C)), rng.integers(0, C, N).astype(np.int32), rng.standard_normal((N, C))


def test_softmax():
    x, _, dy = cost_case("softmax")
    N, C = x.shape
    xt = leaf(x)
    yt = F.softmax(xt, dim=1)
    y = run("softmax_fwd", dict(N=N, C=C), x=x, y=np.zeros_like(x))["y"]
    close(y, yt, "forward")
    (want,) = grads(yt, dy, xt)
    close(run("softmax_bwd", dict(N=N, C=C, accumulate=False), y=y, dy=dy, dx=np.zeros_like(x))["dx"], want)


@pytest.mark.parametrize("top_k", [1, 3])
def test_logreg(top_k):
    x, labels, _ = cost_case("logreg")
    N, C = x.shape
    coeff = 0.7
    probs = F.softmax(torch.tensor(x), dim=1).numpy()
    pt = leaf(probs)
    loss_t = -torch.log(pt[torch.arange(N), torch.tensor(labels, dtype=torch.long)])
    out = run("logreg_fwd", dict(N=N, C=C, top_k=top_k), labels=labels, probs=probs,
              loss=np.zeros(N), correct=np.zeros(N))
    close(out["loss"], loss_t, "loss")
    in_top_k = (torch.topk(torch.tensor(probs), top_k, dim=1).indices == torch.tensor(labels)[:, None]).any(1)
    np.testing.assert_array_equal(out["correct"], in_top_k.double().numpy())
    (want,) = grads(coeff * loss_t, np.ones(N), pt)
    got = run("logreg_bwd", dict(N=N, C=C, coeff=coeff, accumulate=False), labels=labels, probs=probs,
              dprobs=np.zeros_like(probs))["dprobs"]
    close(got, want, "gradient to the probabilities")


def test_softmax_logreg_fused_gradient():
    x, labels, _ = cost_case("softmax-logreg")
    N, C = x.shape
    coeff = 1.3
    xt = leaf(x)
    loss = coeff * F.cross_entropy(xt, torch.tensor(labels, dtype=torch.long), reduction="sum")
    (want,) = grads(loss, np.array(1.0), xt)
    probs = F.softmax(torch.tensor(x), dim=1).numpy()
    got = run("softmax_logreg_bwd", dict(N=N, C=C, coeff=coeff, accumulate=False), labels=labels, probs=probs,
              dx=np.zeros_like(x))["dx"]
    close(got, want)


def test_crossent():
    x, labels, _ = cost_case("crossent")
    N, C = x.shape
    coeff = 0.9
    targets = run("onehot", dict(N=N, C=C), labels=labels, targets=np.zeros((N, C)))["targets"]
    close(targets, F.one_hot(torch.tensor(labels, dtype=torch.long), C).double(), "one-hot targets")
    probs = F.softmax(torch.tensor(x), dim=1).numpy()
    pt = leaf(probs)
    loss_t = -(torch.tensor(targets) * torch.log(pt)).sum(1)
    out = run("crossent_fwd", dict(N=N, C=C), targets=targets, probs=probs, loss=np.zeros(N), correct=np.zeros(N))
    close(out["loss"], loss_t, "loss")
    np.testing.assert_array_equal(out["correct"], (probs.argmax(1) == labels).astype(np.float64))
    (want,) = grads(coeff * loss_t, np.ones(N), pt)
    got = run("crossent_bwd", dict(N=N, C=C, coeff=coeff, accumulate=False), targets=targets, probs=probs,
              dprobs=np.zeros_like(probs))["dprobs"]
    close(got, want, "gradient to the probabilities")
    xt = leaf(x)
    fused = coeff * -(torch.tensor(targets) * F.log_softmax(xt, dim=1)).sum()
    (want,) = grads(fused, np.array(1.0), xt)
    got = run("softmax_crossent_bwd", dict(N=N, C=C, coeff=coeff, accumulate=False), targets=targets,
              probs=probs, dx=np.zeros_like(x))["dx"]
    close(got, want, "fused gradient through the softmax")


def test_sum2():
    x, _, _ = cost_case("sum2", 4, 9)
    N, D = x.shape
    coeff = 0.4
    xt = leaf(x)
    loss_t = (xt * xt).sum(1)
    close(run("sum2_fwd", dict(N=N, D=D), x=x, loss=np.zeros(N))["loss"], loss_t, "loss")
    (want,) = grads(coeff * loss_t, np.ones(N), xt)
    close(run("sum2_bwd", dict(N=N, D=D, coeff=coeff, accumulate=False), x=x, dx=np.zeros_like(x))["dx"], want)


# ------------------------------------------------------ weight update rules

def test_sgd_update_is_pytorchs_sgd_with_momentum_and_weight_decay():
    """cuda-convnet2's inc = m*inc - lr*(g/N + wd*w) is PyTorch's SGD on the gradient g/N."""
    rng = rng_for("sgd")
    w0 = rng.standard_normal(6)
    lr, momentum, decay, cases = 0.1, 0.9, 0.01, 8
    wt = leaf(w0)
    opt = torch.optim.SGD([wt], lr=lr, momentum=momentum, weight_decay=decay)
    state = dict(w=w0.copy(), inc=np.zeros(6))
    for step in range(3):
        g = rng.standard_normal(6)
        wt.grad = torch.tensor(g / cases)
        opt.step()
        state = run("sgd_update", dict(n=6), w=state["w"], dw=g, inc=state["inc"], lr=lr, momentum=momentum,
                    weight_decay=decay, inv_cases=1 / cases)
        np.testing.assert_allclose(state["w"], wt.detach().numpy(), rtol=1e-12, atol=1e-14, err_msg=f"step {step}")


def test_max_norm_is_pytorchs_renorm():
    """wball: each output unit's incoming weights (a column of fc's [I, O]) scaled to norm wball if longer."""
    w = rng_for("wball").standard_normal((5, 4)) * np.array([0.1, 1.0, 0.2, 3.0])
    wball = 1.0
    got = run("max_norm", dict(units=4, length=5, unit_stride=1, elem_stride=4, wball=wball), w=w)["w"]
    want = torch.renorm(torch.tensor(w), p=2, dim=1, maxnorm=wball)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)      # renorm divides by norm + 1e-7
    assert (np.linalg.norm(w, axis=0) > wball).any() and (np.linalg.norm(w, axis=0) < wball).any()


# Which tests hold each layer kind to PyTorch (checked against the checker's list of kinds above).
KIND_TESTS = {
    "conv": test_conv, "local": test_local, "fc": test_fc, "maxpool": test_pool, "avgpool": test_pool,
    "cmrnorm": test_norm, "rnorm": test_norm, "cnorm": test_norm, "neuron": test_neuron,
    "dropout": test_dropout_given_its_mask, "dropout2": test_dropout_given_its_mask,
    "eltsum": test_eltsum_coeffs, "pass": test_eltsum_coeffs, "eltmax": test_eltmax_gradient_goes_to_the_first_input_holding_the_max,
    "concat": test_concat, "softmax": test_softmax, "logreg": test_logreg, "crossent": test_crossent,
    "sum2": test_sum2,
}
