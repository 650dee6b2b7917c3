"""Numpy implementations of every op in :mod:`cnnc.ops`.

This module is the oracle: each generated CUDA/OpenCL kernel is tested
against the function here with the same name, and the reference backend runs
whole plans with it.  It is therefore written to be small and obviously
correct rather than fast (vectorised numpy, no hand tuning).

Every function has the signature ``fn(params, *args)`` with ``args`` in the
order of ``OPS[name].args``: buffers are flat 1-D arrays (outputs are written
in place through reshaped views), scalars are numbers.  `run_launch` calls one
with a launch's arguments instead, reading the scalars from the step-scalar
buffer as the kernels do.  The functions
preserve the dtype of their arrays, so tests can run them in float64.  Each
registers itself with ``@reference`` in the op registry (``cnnc.ops.REFERENCES``).
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from cnnc.neurons import Neuron
from cnnc.ops import (OPS, REFERENCES, SCALAR_DTYPES, SCALARS_ARG, dropout_threshold, norm_add_scale, param,
                      reference, scalar_value)
from cnnc.precision import round_operand


# ----------------------------------------------------------------- helpers

def _in(a: np.ndarray, shape) -> np.ndarray:
    """View (or copy) a flat input buffer with the given shape."""
    return np.asarray(a).reshape(shape)


def _out(a: np.ndarray, shape) -> np.ndarray:
    """View a flat output buffer with the given shape; writes reach the buffer."""
    if not a.flags.c_contiguous:
        raise ValueError("output buffers must be contiguous")
    return a.reshape(shape)


def _store(out: np.ndarray, value, params: dict) -> None:
    """Write value into out, or add it when params['accumulate'] is true."""
    if params.get("accumulate", False):
        out += value
    else:
        out[...] = value


def _neuron_fwd(params: dict, x: np.ndarray) -> np.ndarray:
    """Apply the layer's neuron to x, keeping x's dtype."""
    n = Neuron.from_json(params.get("neuron"))
    t = x.dtype.type
    return n.kind.forward_np(x, t(n.a), t(n.b))


def _neuron_grad(params: dict, y: np.ndarray) -> np.ndarray:
    """Derivative of the layer's neuron written through its output y."""
    n = Neuron.from_json(params.get("neuron"))
    t = y.dtype.type
    return n.kind.grad_np(y, t(n.a), t(n.b))


def _pads(first: int, n_out: int, size: int, stride: int, extent: int) -> tuple[int, int]:
    """Low and high padding so windows first+o*stride .. +size-1 fit in the array."""
    lo = max(0, -first)
    hi = max(0, first + (n_out - 1) * stride + size - extent)
    return lo, hi


def _windows(x4, first, P, Q, R, S, stride, fill=0.0):
    """Windows of x4 [N,C,H,W] as a view [N,C,P,Q,R,S]; pixels outside read as fill."""
    _, _, H, W = x4.shape
    lh, hh = _pads(first, P, R, stride, H)
    lw, hw = _pads(first, Q, S, stride, W)
    xp = np.pad(x4, ((0, 0), (0, 0), (lh, hh), (lw, hw)), constant_values=fill)
    v = sliding_window_view(xp, (R, S), axis=(2, 3))
    oh, ow = first + lh, first + lw
    return v[:, :, oh:oh + (P - 1) * stride + 1:stride, ow:ow + (Q - 1) * stride + 1:stride]


def _unwindows(cols, H, W, first, stride):
    """Adjoint of _windows: sum cols [N,C,P,Q,R,S] back onto an [N,C,H,W] image."""
    N, C, P, Q, R, S = cols.shape
    lh, hh = _pads(first, P, R, stride, H)
    lw, hw = _pads(first, Q, S, stride, W)
    xp = np.zeros((N, C, H + lh + hh, W + lw + hw), dtype=cols.dtype)
    oh, ow = first + lh, first + lw
    for r in range(R):
        for s in range(S):
            xp[:, :, oh + r:oh + r + (P - 1) * stride + 1:stride,
               ow + s:ow + s + (Q - 1) * stride + 1:stride] += cols[..., r, s]
    return xp[:, :, lh:lh + H, lw:lw + W]


def _conv_shapes(p: dict):
    """The x, w and y shapes of a convolution (w holds C/groups channels per filter)."""
    return ((p["N"], p["C"], p["H"], p["W"]), (p["K"], p["C"] // param(p, "groups"), p["R"], p["S"]),
            (p["N"], p["K"], p["P"], p["Q"]))


def _groups(p: dict):
    """(channel slice, filter slice) of each group of a grouped convolution."""
    G = param(p, "groups")
    Cg, Kg = p["C"] // G, p["K"] // G
    return [(slice(g * Cg, (g + 1) * Cg), slice(g * Kg, (g + 1) * Kg)) for g in range(G)]


def _conv_bias(p: dict, b):
    """The biases broadcast against [N, K, P, Q]: b[k] shared, or b[k, p, q] unshared."""
    if param(p, "shared_biases"):
        return _in(b, (1, p["K"], 1, 1))
    return _in(b, (1, p["K"], p["P"], p["Q"]))


def _conv_cols(p: dict, x):
    """im2col of a convolution's input: [N,C,P,Q,R,S], zeros outside the image."""
    xs, _, _ = _conv_shapes(p)
    return _windows(_in(x, xs), -p["pad"], p["P"], p["Q"], p["R"], p["S"], p["stride"])


def _pool_counts(p: dict) -> np.ndarray:
    """Number of image pixels in each clipped pooling window, as [P,Q]."""
    def along(n_out, extent):
        lo = p["start"] + np.arange(n_out) * p["stride"]
        return np.clip(np.minimum(lo + p["size"], extent) - np.maximum(lo, 0), 0, None)
    return np.outer(along(p["P"], p["H"]), along(p["Q"], p["W"]))


def _pool_windows(p: dict, x, fill):
    """Pooling windows of x as [N,C,P,Q,size,size], pixels outside read as fill."""
    x4 = _in(x, (p["N"], p["C"], p["H"], p["W"]))
    return _windows(x4, p["start"], p["P"], p["Q"], p["size"], p["size"], p["stride"], fill)


def _operands(p: dict, *operands):
    """A GEMM op's two operands as its kernels stage them: rounded to the op's precision (fp32:
    unchanged), so the products and the fp32 sums are those of every backend."""
    return tuple(round_operand(a, param(p, "precision")) for a in operands)


def _rows(labels, N: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pair (n, label[n]) selecting each case's label entry."""
    return np.arange(N), np.asarray(labels).reshape(N).astype(np.intp)


# --------------------------------------------------------------------- ops

def _store_summed(p: dict, y: np.ndarray, acc: np.ndarray, bias: np.ndarray) -> None:
    """y = neuron((y if accumulate) + acc + (bias if bias)): one input's term of a conv / fc layer
    whose inputs are summed; the neuron applies to the whole sum."""
    if p.get("bias", True):
        acc = acc + bias
    if p.get("accumulate", False):
        acc = y + acc
    y[...] = _neuron_fwd(p, acc)


@reference
def conv_fwd(p, x, w, b, y):
    """y = neuron(b + conv(x, w)), reading zeros outside the image; each group of filters sees
    only its own group of channels."""
    xs, ws, ys = _conv_shapes(p)
    x, w = _operands(p, x, w)
    x4, w4 = _in(x, xs), _in(w, ws)
    parts = []
    for cs, ks in _groups(p):
        cols = _windows(x4[:, cs], -p["pad"], p["P"], p["Q"], p["R"], p["S"], p["stride"])
        parts.append(np.tensordot(cols, w4[ks], axes=([1, 4, 5], [1, 2, 3])).transpose(0, 3, 1, 2))
    acc = np.concatenate(parts, axis=1)
    _store_summed(p, _out(y, ys), acc, _conv_bias(p, b))


@reference
def conv_bwd_data(p, w, dy, dx):
    """dx (+)= the transpose convolution of dy with w, group by group."""
    xs, ws, ys = _conv_shapes(p)
    w, dy = _operands(p, w, dy)
    dy4, w4 = _in(dy, ys), _in(w, ws)
    parts = []
    for _, ks in _groups(p):
        cols = np.tensordot(dy4[:, ks], w4[ks], axes=([1], [0])).transpose(0, 3, 1, 2, 4, 5)
        parts.append(_unwindows(cols, p["H"], p["W"], -p["pad"], p["stride"]))
    _store(_out(dx, xs), np.concatenate(parts, axis=1), p)


@reference
def conv_bwd_filter(p, x, dy, dw):
    """dw = sum over cases and positions of dy times the input window, group by group.

    With split > 1 (split-K), dw holds `split` partial sums, slice z covering the
    reduction indices (case, row, column) z*split_k .. (z+1)*split_k - 1."""
    xs, ws, ys = _conv_shapes(p)
    x, dy = _operands(p, x, dy)
    x4, dy4 = _in(x, xs), _in(dy, ys)
    if p.get("split", 1) > 1:
        cols = _windows(x4, -p["pad"], p["P"], p["Q"], p["R"], p["S"], p["stride"])   # [N, C, P, Q, R, S]
        cols = cols.transpose(0, 2, 3, 1, 4, 5).reshape(-1, p["C"] * p["R"] * p["S"])
        g = dy4.transpose(0, 2, 3, 1).reshape(-1, p["K"])
        out = _out(dw, (p["split"], p["K"], p["C"] * p["R"] * p["S"]))
        for z in range(p["split"]):
            lo, hi = z * p["split_k"], min((z + 1) * p["split_k"], len(g))
            out[z] = g[lo:hi].T @ cols[lo:hi]
        return
    parts = []
    for cs, ks in _groups(p):
        cols = _windows(x4[:, cs], -p["pad"], p["P"], p["Q"], p["R"], p["S"], p["stride"])
        parts.append(np.tensordot(dy4[:, ks], cols, axes=([0, 2, 3], [0, 2, 3])))
    _store(_out(dw, ws), np.concatenate(parts, axis=0), p)


@reference
def bias_grad(p, dy, db):
    """db[k] = sum of dy viewed as [N, K, inner] over axes 0 and 2."""
    _store(_out(db, (p["K"],)), _in(dy, (p["N"], p["K"], p["inner"])).sum(axis=(0, 2)), p)


@reference
def fc_fwd(p, x, w, b, y):
    """y = neuron(x @ w + b)."""
    x, w = _operands(p, x, w)
    acc = _in(x, (p["N"], p["I"])) @ _in(w, (p["I"], p["O"]))
    _store_summed(p, _out(y, (p["N"], p["O"])), acc, _in(b, (1, p["O"])))


@reference
def fc_bwd_data(p, w, dy, dx):
    """dx (+)= dy @ w.T."""
    w, dy = _operands(p, w, dy)
    g = _in(dy, (p["N"], p["O"])) @ _in(w, (p["I"], p["O"])).T
    _store(_out(dx, (p["N"], p["I"])), g, p)


@reference
def fc_bwd_filter(p, x, dy, dw):
    """dw = x.T @ dy."""
    x, dy = _operands(p, x, dy)
    g = _in(x, (p["N"], p["I"])).T @ _in(dy, (p["N"], p["O"]))
    _store(_out(dw, (p["I"], p["O"])), g, p)


@reference
def neuron_bwd(p, y, g):
    """g *= neuron'(y), the derivative expressed through the output."""
    gv = _out(g, (p["n"],))
    gv *= _neuron_grad(p, _in(y, (p["n"],)))


@reference
def pool_fwd(p, x, y):
    """Max or mean over clipped windows; an empty window gives 0."""
    counts = _pool_counts(p)
    if p["mode"] == "max":
        r = _pool_windows(p, x, -np.inf).max(axis=(4, 5))
        r = np.where(counts > 0, r, 0)
    else:
        win = _pool_windows(p, x, 0)
        r = win.sum(axis=(4, 5)) / np.maximum(counts, 1).astype(win.dtype)
    _store(_out(y, (p["N"], p["C"], p["P"], p["Q"])), r, p)


@reference
def pool_bwd(p, x, y, dy, dx):
    """Route dy to each window's first max pixel (max) or spread it evenly (avg)."""
    N, C, H, W, P, Q, k = (p[key] for key in ("N", "C", "H", "W", "P", "Q", "size"))
    dy4 = _in(dy, (N, C, P, Q))
    if p["mode"] == "max":
        win = _pool_windows(p, x, -np.inf).reshape(N, C, P, Q, k * k)
        hit = win == _in(y, (N, C, P, Q))[..., None]
        first = hit & (np.cumsum(hit, axis=-1) == 1)
        cols = (first * dy4[..., None]).reshape(N, C, P, Q, k, k)
    else:
        share = dy4 / np.maximum(_pool_counts(p), 1).astype(dy4.dtype)
        cols = np.broadcast_to(share[..., None, None], (N, C, P, Q, k, k))
    _store(_out(dx, (N, C, H, W)), _unwindows(cols, H, W, p["start"], p["stride"]), p)


@reference
def softmax_fwd(p, x, y):
    """Row-wise softmax with the row max subtracted first."""
    xv = _in(x, (p["N"], p["C"]))
    e = np.exp(xv - xv.max(axis=1, keepdims=True))
    _store(_out(y, (p["N"], p["C"])), e / e.sum(axis=1, keepdims=True), p)


@reference
def softmax_bwd(p, y, dy, dx):
    """dx (+)= y * (dy - sum_j dy_j y_j)."""
    yv, dyv = _in(y, (p["N"], p["C"])), _in(dy, (p["N"], p["C"]))
    _store(_out(dx, (p["N"], p["C"])), yv * (dyv - (dyv * yv).sum(axis=1, keepdims=True)), p)


@reference
def logreg_fwd(p, labels, probs, loss, correct):
    """loss = -log(probs[label]); correct = the label's probability is finite and fewer than
    top_k classes beat it, a class with a NaN probability counting as beating it."""
    pv = _in(probs, (p["N"], p["C"]))
    picked = pv[_rows(labels, p["N"])]
    beaten = (~(pv <= picked[:, None])).sum(axis=1)
    _store(_out(loss, (p["N"],)), -np.log(picked), p)
    _store(_out(correct, (p["N"],)), (beaten < p["top_k"]) & np.isfinite(picked), p)


@reference
def logreg_bwd(p, labels, probs, dprobs):
    """dprobs (+)= -coeff / probs at each case's label, 0 elsewhere."""
    pv = _in(probs, (p["N"], p["C"]))
    idx = _rows(labels, p["N"])
    g = np.zeros_like(pv)
    g[idx] = -p["coeff"] / pv[idx]
    _store(_out(dprobs, (p["N"], p["C"])), g, p)


@reference
def softmax_logreg_bwd(p, labels, probs, dx):
    """dx (+)= coeff * (probs - onehot(label))."""
    g = np.array(_in(probs, (p["N"], p["C"])), copy=True)
    g[_rows(labels, p["N"])] -= 1
    _store(_out(dx, (p["N"], p["C"])), p["coeff"] * g, p)


@reference
def nonfinite(p, x, flag):
    """flag[0] = 1 if x holds a NaN or an infinity; otherwise flag keeps its value."""
    if not np.isfinite(_in(x, (p["n"],))).all():
        flag[0] = 1


@reference
def sgd_update(p, w, dw, inc, lr, momentum, weight_decay, inv_cases):
    """inc = momentum*inc - lr*(dw*inv_cases + weight_decay*w); w += inc."""
    n = p["n"]
    wv, iv = _out(w, (n,)), _out(inc, (n,))
    iv[...] = momentum * iv - lr * (_in(dw, (n,)) * inv_cases + weight_decay * wv)
    wv += iv


# ------------------------------------------------- standalone neurons

def _neuron_grad_x(params: dict, x: np.ndarray) -> np.ndarray:
    """Derivative of the layer's neuron written through its input x."""
    n = Neuron.from_json(params.get("neuron"))
    t = x.dtype.type
    return n.kind.grad_x_np(x, t(n.a), t(n.b))


@reference
def neuron_fwd(p, x, y):
    """y = neuron(x)."""
    _store(_out(y, (p["n"],)), _neuron_fwd(p, _in(x, (p["n"],))), p)


@reference
def neuron_bwd_input(p, x, dy, dx):
    """dx (+)= dy * neuron'(x)."""
    xv = _in(x, (p["n"],))
    _store(_out(dx, (p["n"],)), _in(dy, (p["n"],)) * _neuron_grad_x(p, xv), p)


# ------------------------------------------ eltwise sum / max, concat

@reference
def eltsum_fwd(p, x, y):
    """y (+)= coeff * x."""
    xv = _in(x, (p["n"],))
    _store(_out(y, (p["n"],)), xv.dtype.type(p["coeff"]) * xv, p)


@reference
def eltsum_bwd(p, dy, dx):
    """dx (+)= coeff * dy."""
    dyv = _in(dy, (p["n"],))
    _store(_out(dx, (p["n"],)), dyv.dtype.type(p["coeff"]) * dyv, p)


@reference
def eltmax_fwd(p, x, y, arg):
    """First input: y = x, arg = index; later inputs replace y where strictly larger."""
    n = p["n"]
    xv, yv, av = _in(x, (n,)), _out(y, (n,)), _out(arg, (n,))
    if p.get("first", False):
        yv[...] = xv
        av[...] = p["index"]
    else:
        bigger = xv > yv
        yv[bigger] = xv[bigger]
        av[bigger] = p["index"]


@reference
def eltmax_bwd(p, arg, dy, dx):
    """dx (+)= dy where this input held the maximum first, else 0."""
    n = p["n"]
    dyv = _in(dy, (n,))
    _store(_out(dx, (n,)), np.where(_in(arg, (n,)) == p["index"], dyv, 0).astype(dyv.dtype), p)


@reference
def concat_fwd(p, x, y):
    """y[:, offset:offset+D] = x, y viewed as [N, D_out]."""
    o = p["offset"]
    _store(_out(y, (p["N"], p["D_out"]))[:, o:o + p["D"]], _in(x, (p["N"], p["D"])), p)


@reference
def concat_bwd(p, dy, dx):
    """dx (+)= dy[:, offset:offset+D]."""
    o = p["offset"]
    _store(_out(dx, (p["N"], p["D"])), _in(dy, (p["N"], p["D_out"]))[:, o:o + p["D"]], p)


# ------------------------------------------------------------- costs

@reference
def onehot(p, labels, targets):
    """targets[n, c] = 1 where c is case n's label, else 0."""
    t = np.zeros((p["N"], p["C"]), dtype=_out(targets, (p["N"] * p["C"],)).dtype)
    t[_rows(labels, p["N"])] = 1
    _store(_out(targets, (p["N"], p["C"])), t, {})


@reference
def crossent_fwd(p, targets, probs, loss, correct):
    """loss = -sum targets * log(probs); correct = 1/(number of maxima) if a maximal class has a
    positive target and every probability of the case is finite."""
    tv, pv = _in(targets, (p["N"], p["C"])), _in(probs, (p["N"], p["C"]))
    safe = np.where(tv != 0, pv, 1)
    _store(_out(loss, (p["N"],)), -(np.where(tv != 0, tv * np.log(safe), 0)).sum(axis=1), p)
    is_max = pv == pv.max(axis=1, keepdims=True)
    hit = (is_max & (tv > 0)).any(axis=1) & np.isfinite(pv).all(axis=1)
    _store(_out(correct, (p["N"],)), np.where(hit, 1 / np.maximum(is_max.sum(axis=1), 1), 0), p)


@reference
def crossent_bwd(p, targets, probs, dprobs):
    """dprobs (+)= -coeff * targets / probs."""
    tv, pv = _in(targets, (p["N"], p["C"])), _in(probs, (p["N"], p["C"]))
    _store(_out(dprobs, (p["N"], p["C"])), pv.dtype.type(-p["coeff"]) * tv / pv, p)


@reference
def softmax_crossent_bwd(p, targets, probs, dx):
    """dx (+)= coeff * (probs * sum(targets) - targets)."""
    tv, pv = _in(targets, (p["N"], p["C"])), _in(probs, (p["N"], p["C"]))
    g = pv * tv.sum(axis=1, keepdims=True) - tv
    _store(_out(dx, (p["N"], p["C"])), pv.dtype.type(p["coeff"]) * g, p)


@reference
def sum2_fwd(p, x, loss):
    """loss[n] = sum of squares of case n's values."""
    xv = _in(x, (p["N"], p["D"]))
    _store(_out(loss, (p["N"],)), (xv * xv).sum(axis=1), p)


@reference
def sum2_bwd(p, x, dx):
    """dx (+)= 2 * coeff * x."""
    xv = _in(x, (p["N"], p["D"]))
    _store(_out(dx, (p["N"], p["D"])), xv.dtype.type(2 * p["coeff"]) * xv, p)


# -------------------------------------------- response normalisation

def _norm_window(n: int, size: int, blocked: bool = False) -> np.ndarray:
    """0/1 matrix M[o, i] = 1 when position i lies in output o's window along an axis of n.

    The window of o starts at o - size//2 (cuda-convnet2's -size/2 + o), or at the start of
    o's block of `size` when blocked, and holds `size` positions clipped to 0 .. n-1.
    """
    m = np.zeros((n, n))
    for o in range(n):
        lo = (o // size) * size if blocked else o - size // 2
        m[o, max(lo, 0):min(lo + size, n)] = 1
    return m


def _img(p: dict) -> tuple[int, int, int, int]:
    return p["N"], p["C"], p["H"], p["W"]


def _cross_map_sum(p, v, transpose=False):
    """Sum of v [N,C,H,W] over each channel's window (or, transposed, over the channels whose
    window holds it)."""
    m = _norm_window(p["C"], p["size"], p.get("blocked", False)).astype(v.dtype)
    return np.einsum("ic,nihw->nchw" if transpose else "ci,nihw->nchw", m, v)


def _spatial_sum(p, v, transpose=False):
    """Sum of v [N,C,H,W] over each pixel's size x size window (or its transpose)."""
    mh = _norm_window(p["H"], p["size"]).astype(v.dtype)
    mw = _norm_window(p["W"], p["size"]).astype(v.dtype)
    if transpose:
        mh, mw = mh.T, mw.T
    return np.einsum("hi,ncij,wj->nchw", mh, v, mw)


def _spatial_counts(p, dtype) -> np.ndarray:
    """Pixels in each clipped window, as [H, W]."""
    return np.outer(_norm_window(p["H"], p["size"]).sum(1), _norm_window(p["W"], p["size"]).sum(1)).astype(dtype)


def _normalise(p, x4, window_sum_of_squares, cross_map, y, denoms):
    t = x4.dtype.type
    den = t(p.get("min_div", 1.0)) + t(norm_add_scale(p, cross_map)) * window_sum_of_squares
    _store(_out(denoms, x4.shape), den, {})
    _store(_out(y, x4.shape), x4 * den ** t(-p["pow"]), {})


def _norm_grad(p, x4, dy4, den, cross_map):
    """dy * den^-pow and the window sum of dy * x * den^(-pow-1) taken transposed."""
    t = x4.dtype.type
    b = dy4 * x4 * den ** t(-p["pow"] - 1)
    s = _cross_map_sum(p, b, True) if cross_map else _spatial_sum(p, b, True)
    return dy4 * den ** t(-p["pow"]), t(-2 * p["pow"] * norm_add_scale(p, cross_map)) * s


@reference
def cmrnorm_fwd(p, x, y, denoms):
    """Cross-map response normalisation."""
    x4 = _in(x, _img(p))
    _normalise(p, x4, _cross_map_sum(p, x4 * x4), True, y, denoms)


@reference
def cmrnorm_bwd(p, x, dy, denoms, dx):
    """Exact gradient of cmrnorm_fwd."""
    x4 = _in(x, _img(p))
    direct, s = _norm_grad(p, x4, _in(dy, _img(p)), _in(denoms, _img(p)), True)
    _store(_out(dx, _img(p)), direct + x4 * s, p)


@reference
def rnorm_fwd(p, x, y, denoms):
    """Same-map response normalisation over size x size windows."""
    x4 = _in(x, _img(p))
    _normalise(p, x4, _spatial_sum(p, x4 * x4), False, y, denoms)


@reference
def rnorm_bwd(p, x, dy, denoms, dx):
    """Exact gradient of rnorm_fwd."""
    x4 = _in(x, _img(p))
    direct, s = _norm_grad(p, x4, _in(dy, _img(p)), _in(denoms, _img(p)), False)
    _store(_out(dx, _img(p)), direct + x4 * s, p)


@reference
def cnorm_meandiff(p, x, md):
    """md = x - the mean of x over each pixel's clipped window."""
    x4 = _in(x, _img(p))
    _store(_out(md, _img(p)), x4 - _spatial_sum(p, x4) / _spatial_counts(p, x4.dtype), {})


@reference
def cnorm_fwd(p, x, md, y, denoms):
    """Contrast normalisation: x scaled by the local variance of md."""
    x4, md4 = _in(x, _img(p)), _in(md, _img(p))
    _normalise(p, x4, _spatial_sum(p, md4 * md4), False, y, denoms)


@reference
def cnorm_bwd_prep(p, x, dy, denoms, md):
    """md = -2*pow*scale/size^2 * md * (transposed window sum of dy * x * denoms^(-pow-1))."""
    x4 = _in(x, _img(p))
    mdv = _out(md, _img(p))
    _, s = _norm_grad(p, x4, _in(dy, _img(p)), _in(denoms, _img(p)), False)
    mdv[...] = mdv * s


@reference
def cnorm_bwd(p, dy, denoms, md, dx):
    """dx (+)= dy * denoms^-pow + t - transposed window sum of t / window size."""
    dy4, t4 = _in(dy, _img(p)), _in(md, _img(p))
    direct = dy4 * _in(denoms, _img(p)) ** dy4.dtype.type(-p["pow"])
    spread = _spatial_sum(p, t4 / _spatial_counts(p, t4.dtype), True)
    _store(_out(dx, _img(p)), direct + t4 - spread, p)


# ------------------------------------------------------------ dropout

PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_U32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox-4x32-10 (Salmon et al., SC'11), vectorised over arrays of counters.

    Counters and keys are 32-bit unsigned values (any integer arrays that broadcast);
    returns the four 32-bit output words as uint32 arrays.  The same generator is in
    runtime/cnnc_rng.h.
    """
    c = [np.asarray(v, dtype=np.uint64) & _U32 for v in np.broadcast_arrays(c0, c1, c2, c3)]
    k = [np.uint64(int(k0) & 0xFFFFFFFF), np.uint64(int(k1) & 0xFFFFFFFF)]
    m0, m1 = np.uint64(PHILOX_M[0]), np.uint64(PHILOX_M[1])
    for r in range(10):
        if r:
            k = [(k[0] + np.uint64(PHILOX_W[0])) & _U32, (k[1] + np.uint64(PHILOX_W[1])) & _U32]
        p0, p1 = m0 * c[0], m1 * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k[0], p1 & _U32, (p0 >> np.uint64(32)) ^ c[3] ^ k[1], p0 & _U32]
    return tuple(v.astype(np.uint32) for v in c)


def _global_cases(p: dict) -> np.ndarray:
    """The minibatch index of each of the N cases: case_offset + n, or from case_ranges."""
    if p.get("case_ranges"):
        index = np.concatenate([np.arange(first, first + count) for first, count in p["case_ranges"]])
        assert index.size == p["N"], "case_ranges must cover the N cases"
        return index.astype(np.uint64)
    return np.arange(p["N"], dtype=np.uint64) + np.uint64(p.get("case_offset", 0))


def dropout_keep_mask(p: dict, seed: int, step: int) -> np.ndarray:
    """[N, D] booleans: which values dropout keeps, keyed by (seed, step, layer, global case,
    feature) so a case's mask is the same whichever replica holds it."""
    n = _global_cases(p)[:, None]
    i = np.arange(p["D"], dtype=np.uint64)[None, :]
    word = philox4x32_10(n, i, int(step) & 0xFFFFFFFF, 0, seed, p.get("layer_id", 0))[0]
    return (word >> np.uint32(8)) < np.uint32(dropout_threshold(p["keep"]))


@reference
def dropout_fwd(p, x, y, mask, seed, step):
    """Inverted dropout (or dropout2) in training; the matching identity/scaling at test time."""
    xv = _in(x, (p["N"], p["D"]))
    t = xv.dtype.type
    variant = p.get("variant", "dropout")
    if not p.get("train", True):
        _store(_out(y, xv.shape), xv if variant == "dropout" else t(p["keep"]) * xv, {})
        return
    kept = t(1 / p["keep"]) if variant == "dropout" else t(1)
    m = np.where(dropout_keep_mask(p, seed, step), kept, t(0))
    _store(_out(mask, xv.shape), m, {})
    _store(_out(y, xv.shape), xv * m, {})


@reference
def dropout_bwd(p, mask, dy, dx):
    """dx (+)= dy * mask."""
    _store(_out(dx, (p["n"],)), _in(dy, (p["n"],)) * _in(mask, (p["n"],)), p)


# ------------------------------------------------- locally connected

def _local_w(p: dict, w):
    """Local weights as [P, Q, K, C, R, S]."""
    return _in(w, (p["P"], p["Q"], p["K"], p["C"], p["R"], p["S"]))


@reference
def local_fwd(p, x, w, b, y):
    """y = neuron(b + a convolution whose filters differ at every output position)."""
    x, w = _operands(p, x, w)
    acc = np.einsum("ncpqrs,pqkcrs->nkpq", _conv_cols(p, x), _local_w(p, w))
    acc = acc + _in(b, (1, p["K"], p["P"], p["Q"]))
    _store(_out(y, (p["N"], p["K"], p["P"], p["Q"])), _neuron_fwd(p, acc), p)


@reference
def local_bwd_data(p, w, dy, dx):
    """dx (+)= each position's filters applied transposed to dy, summed back onto the image."""
    dy4 = _in(dy, (p["N"], p["K"], p["P"], p["Q"]))
    cols = np.einsum("nkpq,pqkcrs->ncpqrs", dy4, _local_w(p, w))
    _store(_out(dx, (p["N"], p["C"], p["H"], p["W"])),
           _unwindows(cols, p["H"], p["W"], -p["pad"], p["stride"]), p)


@reference
def local_bwd_filter(p, x, dy, dw):
    """dw[pos] = sum over cases of dy at pos times the input window at pos."""
    x, dy = _operands(p, x, dy)
    dy4 = _in(dy, (p["N"], p["K"], p["P"], p["Q"]))
    g = np.einsum("nkpq,ncpqrs->pqkcrs", dy4, _conv_cols(p, x))
    _store(_out(dw, (p["P"], p["Q"], p["K"], p["C"], p["R"], p["S"])), g, p)


@reference
def bias_grad_unshared(p, dy, db):
    """db[k, i] = sum over cases of dy viewed as [N, K, inner]."""
    _store(_out(db, (p["K"], p["inner"])), _in(dy, (p["N"], p["K"], p["inner"])).sum(axis=0), p)


@reference
def max_norm(p, w):
    """Scale each unit's incoming weights down to L2 norm wball where they exceed it."""
    e = np.arange(p["length"]) * p["elem_stride"]
    for u in range(p["units"]):
        idx = u * p["unit_stride"] + e
        n2 = float(np.dot(w[idx], w[idx]))
        if n2 > p["wball"] ** 2:
            w[idx] *= w.dtype.type(np.sqrt(p["wball"] ** 2 / n2))


@reference
def replica_sum(p, stage, g):
    """g[offset:offset+n] (+)= the R chunks of stage added in order."""
    rows = _in(stage, (p["R"], p["n"]))
    total = rows[0].copy()
    for r in range(1, p["R"]):
        total = total + rows[r]
    _store(g[p["offset"]:p["offset"] + p["n"]], total, p)


# every op's implementation, registered above with @reference
REFERENCE_OPS = REFERENCES


def run_launch(op: str, params: dict, args) -> None:
    """Run op `op` on a launch's arguments, in the order of the generated kernel's
    (``OPS[op].kernel_args``): its runtime scalars are read from the step-scalar buffer at
    the slots the params fix, as the kernels read them."""
    spec = OPS[op]
    given = dict(zip(spec.kernel_args, args))
    slots = dict(zip((a for a, _ in spec.step_scalars), spec.slots(params)))
    REFERENCE_OPS[op](params, *(scalar_value(given[SCALARS_ARG][slots[a]], SCALAR_DTYPES[role])
                                if role in SCALAR_DTYPES else given[a] for a, role in spec.args))
