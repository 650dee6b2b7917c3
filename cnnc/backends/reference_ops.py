"""Numpy implementations of every op in :mod:`cnnc.ops`.

This module is the oracle: each generated CUDA/OpenCL kernel is tested
against the function here with the same name, and the reference backend runs
whole plans with it.  It is therefore written to be small and obviously
correct rather than fast (vectorised numpy, no hand tuning).

Every function has the signature ``fn(params, *args)`` with ``args`` in the
order of ``OPS[name].args``: buffers are flat 1-D arrays (outputs are written
in place through reshaped views), scalars are Python floats.  The functions
preserve the dtype of their arrays, so tests can run them in float64.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from cnnc.neurons import Neuron


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
    """The x, w and y shapes of a convolution."""
    return ((p["N"], p["C"], p["H"], p["W"]), (p["K"], p["C"], p["R"], p["S"]),
            (p["N"], p["K"], p["P"], p["Q"]))


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


def _rows(labels, N: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pair (n, label[n]) selecting each case's label entry."""
    return np.arange(N), np.asarray(labels).reshape(N).astype(np.intp)


# --------------------------------------------------------------------- ops

def conv_fwd(p, x, w, b, y):
    """y = neuron(b + conv(x, w)), reading zeros outside the image."""
    _, ws, ys = _conv_shapes(p)
    acc = np.tensordot(_conv_cols(p, x), _in(w, ws), axes=([1, 4, 5], [1, 2, 3]))
    acc = acc.transpose(0, 3, 1, 2) + _in(b, (1, p["K"], 1, 1))
    _store(_out(y, ys), _neuron_fwd(p, acc), p)


def conv_bwd_data(p, w, dy, dx):
    """dx (+)= the transpose convolution of dy with w."""
    xs, ws, ys = _conv_shapes(p)
    cols = np.tensordot(_in(dy, ys), _in(w, ws), axes=([1], [0])).transpose(0, 3, 1, 2, 4, 5)
    _store(_out(dx, xs), _unwindows(cols, p["H"], p["W"], -p["pad"], p["stride"]), p)


def conv_bwd_filter(p, x, dy, dw):
    """dw = sum over cases and positions of dy times the input window."""
    _, ws, ys = _conv_shapes(p)
    g = np.tensordot(_in(dy, ys), _conv_cols(p, x), axes=([0, 2, 3], [0, 2, 3]))
    _store(_out(dw, ws), g, p)


def bias_grad(p, dy, db):
    """db[k] = sum of dy viewed as [N, K, inner] over axes 0 and 2."""
    _store(_out(db, (p["K"],)), _in(dy, (p["N"], p["K"], p["inner"])).sum(axis=(0, 2)), p)


def fc_fwd(p, x, w, b, y):
    """y = neuron(x @ w + b)."""
    acc = _in(x, (p["N"], p["I"])) @ _in(w, (p["I"], p["O"])) + _in(b, (1, p["O"]))
    _store(_out(y, (p["N"], p["O"])), _neuron_fwd(p, acc), p)


def fc_bwd_data(p, w, dy, dx):
    """dx (+)= dy @ w.T."""
    g = _in(dy, (p["N"], p["O"])) @ _in(w, (p["I"], p["O"])).T
    _store(_out(dx, (p["N"], p["I"])), g, p)


def fc_bwd_filter(p, x, dy, dw):
    """dw = x.T @ dy."""
    g = _in(x, (p["N"], p["I"])).T @ _in(dy, (p["N"], p["O"]))
    _store(_out(dw, (p["I"], p["O"])), g, p)


def neuron_bwd(p, y, g):
    """g *= neuron'(y), the derivative expressed through the output."""
    gv = _out(g, (p["n"],))
    gv *= _neuron_grad(p, _in(y, (p["n"],)))


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


def softmax_fwd(p, x, y):
    """Row-wise softmax with the row max subtracted first."""
    xv = _in(x, (p["N"], p["C"]))
    e = np.exp(xv - xv.max(axis=1, keepdims=True))
    _store(_out(y, (p["N"], p["C"])), e / e.sum(axis=1, keepdims=True), p)


def softmax_bwd(p, y, dy, dx):
    """dx (+)= y * (dy - sum_j dy_j y_j)."""
    yv, dyv = _in(y, (p["N"], p["C"])), _in(dy, (p["N"], p["C"]))
    _store(_out(dx, (p["N"], p["C"])), yv * (dyv - (dyv * yv).sum(axis=1, keepdims=True)), p)


def logreg_fwd(p, labels, probs, loss, correct):
    """loss = -log(probs[label]); correct = fewer than top_k classes beat the label."""
    pv = _in(probs, (p["N"], p["C"]))
    picked = pv[_rows(labels, p["N"])]
    beaten = (pv > picked[:, None]).sum(axis=1)
    _store(_out(loss, (p["N"],)), -np.log(picked), p)
    _store(_out(correct, (p["N"],)), beaten < p["top_k"], p)


def logreg_bwd(p, labels, probs, dprobs):
    """dprobs (+)= -coeff / probs at each case's label, 0 elsewhere."""
    pv = _in(probs, (p["N"], p["C"]))
    idx = _rows(labels, p["N"])
    g = np.zeros_like(pv)
    g[idx] = -p["coeff"] / pv[idx]
    _store(_out(dprobs, (p["N"], p["C"])), g, p)


def softmax_logreg_bwd(p, labels, probs, dx):
    """dx (+)= coeff * (probs - onehot(label))."""
    g = np.array(_in(probs, (p["N"], p["C"])), copy=True)
    g[_rows(labels, p["N"])] -= 1
    _store(_out(dx, (p["N"], p["C"])), p["coeff"] * g, p)


def sgd_update(p, w, dw, inc, lr, momentum, weight_decay, inv_cases):
    """inc = momentum*inc - lr*(dw*inv_cases + weight_decay*w); w += inc."""
    n = p["n"]
    wv, iv = _out(w, (n,)), _out(inc, (n,))
    iv[...] = momentum * iv - lr * (_in(dw, (n,)) * inv_cases + weight_decay * wv)
    wv += iv


REFERENCE_OPS: dict[str, Callable] = {
    f.__name__: f
    for f in [
        conv_fwd, conv_bwd_data, conv_bwd_filter, bias_grad,
        fc_fwd, fc_bwd_data, fc_bwd_filter, neuron_bwd,
        pool_fwd, pool_bwd, softmax_fwd, softmax_bwd,
        logreg_fwd, logreg_bwd, softmax_logreg_bwd, sgd_update,
    ]
}
