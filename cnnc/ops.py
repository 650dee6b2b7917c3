"""The kernel operations: the op half of the registry, read by every stage after checking.

Every launch in a plan names one of these ops, a dict of compile-time
parameters (shapes, strides, the fused neuron, ...) and its arguments in the
order listed here.  The generated CUDA/OpenCL kernels take their arguments in
exactly this order, and the reference backend implements each op in numpy
with the same meaning, which is what lets one executor drive every backend.
Each record also holds what follows from its params alone: the template
family, the elements each argument reaches (plan validation, tests), the
launch extent (codegen's geometry), FLOPs and bytes (`cnnc plan`, `cnnc
bench`).  The layer kinds that lower to these ops are cnnc/check/kinds.py.

Layouts (all float32 unless noted, row-major, batch outermost so that a
replica's share of a minibatch is one contiguous slice):

* images:        [N, C, H, W]
* conv weights:  [K, C, R, S]  (filters, channels, rows, columns)
* fc activations [N, I]; fc weights [I, O]
* labels:        int32 [N]
* grouped conv weights: [K, C/groups, R, S]; filter k sees the channels of its
  group g = k // (K/groups), i.e. channels g*C/groups .. (g+1)*C/groups - 1
* local weights: [P*Q, K, C, R, S]  (one filter bank per output position p*Q+q)
* unshared biases: [K, P, Q]
* cost targets:  f32 [N, C] (one-hot or soft labels of crossent)

Gradients with respect to weights are *sums* over the cases of the batch; the
update divides by the number of cases.  Ops with an
``accumulate`` parameter add into their output instead of overwriting it;
the planner uses that when a layer's output feeds several consumers, and
for weight gradients summed over several passes (hybrid parallelism).

Runtime scalars come in two kinds: ``SCALAR`` arguments are 32-bit floats
(the optimiser's learning rate, momentum, ...); ``INT_SCALAR`` arguments are
32-bit integers (the dropout RNG's seed and step), read as unsigned.  They are
not passed by value: each logical device holds one int32 buffer of *step
scalars*, written once per program run, and an op with runtime scalars takes
that buffer as one more argument, ``scalars``, after its buffers (`kernel_args`),
reading scalar i of its ``step_scalars`` from slot ``slots[i]``, fixed at plan
time in the kernel's params (optional: absent means slots 0, 1, ...).  So a
launch's arguments are the same every step.  A float entry holds the float's
bit pattern, an integer entry its low 32 bits (`scalar_bits`, `scalar_value`).
The reference ops themselves take the values, as numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Callable

import numpy as np

from cnnc import precision


class Role(str, Enum):
    IN = "in"
    OUT = "out"
    INOUT = "inout"
    SCALAR = "scalar"
    INT_SCALAR = "int_scalar"


# Params an op may leave out, and the value they then have.  A plain layer's kernels leave
# them out, so that its params (and the kernels generated from them) stay the plain ones.
# Every op with a GEMM (`OpSpec.gemm`) takes `precision`, what its operands are rounded to when
# staged (cnnc/precision.py); fp32, the default, rounds nothing.
PARAM_DEFAULTS = {"groups": 1, "shared_biases": True, "accumulate": False, "bias": True, "split": 1,
                  "precision": precision.DEFAULT}


def param(p: dict, name: str):
    """An op param, or its default when the launch leaves it out."""
    return p.get(name, PARAM_DEFAULTS[name])


@dataclass(frozen=True)
class OpSpec:
    """One kernel operation: argument names and roles, the params it needs, and the facts every
    stage reads from its params: the template family that generates it, how many elements each
    buffer argument reaches, its launch extent (the GEMM it is, or the elements its grid covers)
    and its arithmetic."""

    name: str
    args: tuple[tuple[str, Role], ...]
    params: tuple[str, ...]
    doc: str
    optional: tuple[str, ...] = ()      # further params that may be left out (see doc for their defaults)
    family: str = ""                    # templates/<family>.j2 generates its kernels
    sizes: Callable[[dict], dict[str, int]] | None = None    # elements each buffer argument reaches
    # GEMM families: M, N, K, which index is contiguous per operand, and `batch` independent GEMMs
    gemm: Callable[[dict], dict] | None = None
    # other families: the elements the launch covers, one thread each (one work-group each for
    # the reduce family)
    elements: Callable[[dict], int] | None = None
    flops: Callable[[dict], int] | None = None                # floating-point operations, multiply-add = 2
    windows: tuple[str, ...] = ()       # buffer arguments that reach a part of a larger buffer

    @property
    def arg_names(self) -> tuple[str, ...]:
        return tuple(a for a, _ in self.args)

    @property
    def buffers(self) -> tuple[str, ...]:
        return tuple(a for a, role in self.args if role not in SCALAR_DTYPES)

    @property
    def step_scalars(self) -> tuple[tuple[str, Role], ...]:
        """The runtime scalar arguments, in argument order: what a launch reads from its
        device's step-scalar buffer."""
        return tuple((a, role) for a, role in self.args if role in SCALAR_DTYPES)

    @property
    def kernel_args(self) -> tuple[str, ...]:
        """The arguments of the generated kernels and of every launch: the buffers, then the
        step-scalar buffer if the op has runtime scalars."""
        return self.buffers + ((SCALARS_ARG,) if self.step_scalars else ())

    def slots(self, p: dict) -> list[int]:
        """Where in the step-scalar buffer each of `step_scalars` is, by the kernel's params."""
        return list(p.get("slots", range(len(self.step_scalars))))

    def bytes_moved(self, p: dict) -> int:
        """Bytes the launch must read and write at least once: the elements its buffer arguments
        reach (4 bytes each; read-and-written buffers twice; a window up to its end)."""
        sizes = self.sizes(p)
        roles = dict(self.args)
        return 4 * sum(sizes.get(a, 0) * (2 if roles[a] is Role.INOUT else 1) for a in self.buffers)


# the type of each runtime scalar role's entry in the step-scalar table
SCALAR_DTYPES = {Role.SCALAR: "f32", Role.INT_SCALAR: "i32"}
SCALARS_ARG = "scalars"             # the kernel argument through which runtime scalars arrive


def scalar_bits(value, dtype: str) -> np.int32:
    """A step-scalar table entry: a float's bit pattern, an integer's low 32 bits."""
    if dtype == "f32":
        return np.float32(value).view(np.int32)
    return np.uint32(int(value) & 0xFFFFFFFF).view(np.int32)


def scalar_value(bits: np.int32, dtype: str):
    """The value an entry holds (`scalar_bits` undone), as the kernels read it."""
    return np.int32(bits).view(np.float32) if dtype == "f32" else np.int32(bits)


I, O, IO, S, INT = Role.IN, Role.OUT, Role.INOUT, Role.SCALAR, Role.INT_SCALAR

_CONV = ("N", "C", "H", "W", "K", "R", "S", "P", "Q", "stride", "pad")
# optional conv params; absent means groups=1, shared_biases=True (the plain convolution)
_GROUPS = ("groups", "shared_biases")
_IMG = ("N", "C", "H", "W")
# optional params of conv_fwd / fc_fwd for layers with several inputs, one launch per input
_SUMMED_PARAMS = ("accumulate", "bias")
_SUMMED = ("With accumulate=True the sum is added to y's old value before the neuron, "
           "y = neuron(y_old + ...), and with bias=False no bias is added: a layer with several inputs "
           "runs one launch per input, the first with the bias, later ones accumulating, and only the "
           "last with the neuron.  Both absent: accumulate=False, bias=True")
# response normalisation: `scale` is the cuda-convnet2 layer parameter; the op divides it by
# size (cmrnorm) or size*size (rnorm, cnorm) itself, as cuda-convnet2's layer.py does
_NORM = _IMG + ("size", "scale", "pow", "min_div")


# ---------------------------------------------------------------- per-op facts, from the params
# Element counts follow the layouts above; the planner sizes every buffer to exactly these,
# except an op's `windows`, which reach a part of a larger buffer.

def _image(p: dict) -> int:
    return p["N"] * p["C"] * p["H"] * p["W"]


def _conv_sizes(p: dict) -> dict[str, int]:
    n, c, k, r, s, pp, q = (p[x] for x in ("N", "C", "K", "R", "S", "P", "Q"))
    weights = k * (c // param(p, "groups")) * r * s
    return dict(x=_image(p), dx=_image(p), w=weights, b=k if param(p, "shared_biases") else k * pp * q,
                y=n * k * pp * q, dy=n * k * pp * q,
                dw=weights * max(param(p, "split"), 1))     # split-K: one slice each


def _local_sizes(p: dict) -> dict[str, int]:
    n, c, k, r, s, pp, q = (p[x] for x in ("N", "C", "K", "R", "S", "P", "Q"))
    return dict(x=_image(p), dx=_image(p), w=pp * q * k * c * r * s, dw=pp * q * k * c * r * s,
                b=k * pp * q, y=n * k * pp * q, dy=n * k * pp * q)


def _fc_sizes(p: dict) -> dict[str, int]:
    return dict(x=p["N"] * p["I"], dx=p["N"] * p["I"], w=p["I"] * p["O"], dw=p["I"] * p["O"], b=p["O"],
                y=p["N"] * p["O"], dy=p["N"] * p["O"])


def _flat_sizes(p: dict) -> dict[str, int]:
    return {a: p["n"] for a in ("x", "y", "g", "dy", "dx", "arg", "mask", "w", "dw", "inc")}


def _pool_sizes(p: dict) -> dict[str, int]:
    pooled = p["N"] * p["C"] * p["P"] * p["Q"]
    return dict(x=_image(p), dx=_image(p), y=pooled, dy=pooled)


def _norm_sizes(p: dict) -> dict[str, int]:
    return {a: _image(p) for a in ("x", "y", "dy", "dx", "denoms", "md")}


def _class_sizes(p: dict) -> dict[str, int]:
    nc = p["N"] * p["C"]
    return dict(labels=p["N"], loss=p["N"], correct=p["N"], probs=nc, dprobs=nc, targets=nc, x=nc, y=nc,
                dy=nc, dx=nc)


def _max_norm_sizes(p: dict) -> dict[str, int]:
    if p["units"] < 1 or p["length"] < 1:
        return {"w": 0}
    return {"w": (p["units"] - 1) * p["unit_stride"] + (p["length"] - 1) * p["elem_stride"] + 1}


def _conv_gemm(p: dict, op: str) -> dict:
    """conv_fwd: filters x output pixels over C*R*S; bwd_data: channels x input pixels over
    K*R*S; bwd_filter: filters x C*R*S over output pixels.  A grouped convolution is one GEMM
    per group (grid z); an ungrouped weight gradient may split its reduction (split-K)."""
    G = param(p, "groups")
    C, K, RS = p["C"] // G, p["K"] // G, p["R"] * p["S"]
    out_pixels, in_pixels = p["N"] * p["P"] * p["Q"], p["N"] * p["H"] * p["W"]
    g = {"conv_fwd": dict(M=K, N=out_pixels, K=C * RS, a_fast="k", b_fast="n"),
         "conv_bwd_data": dict(M=C, N=in_pixels, K=K * RS, a_fast="k", b_fast="n"),
         "conv_bwd_filter": dict(M=K, N=C * RS, K=out_pixels, a_fast="k", b_fast="k")}[op]
    if G > 1:
        g["batch"] = G
    elif op == "conv_bwd_filter" and param(p, "split") > 1:     # grid z = slice of the reduction
        g.update(batch=p["split"], split=p["split"], split_k=p["split_k"])
    return g


def _gemm_flops(p: dict) -> int:
    """2 per multiply-add of a convolution over its groups (local layers: ungrouped)."""
    return 2 * p["N"] * p["K"] * p["P"] * p["Q"] * p["C"] * p["R"] * p["S"] // param(p, "groups")


def _per_case(p: dict) -> int:
    return p["N"]


def _per_value(p: dict) -> int:
    return p["n"]


def _per_feature(p: dict) -> int:
    return p["N"] * p["D"]


def _per_class(p: dict) -> int:
    """About four operations per value of a case's row (max, exp, sum, divide)."""
    return 4 * p["N"] * p["C"]


def _per_case_rough(p: dict) -> int:
    """A nominal count for data movement (copies, masks, one-value costs) whose cost is memory,
    not arithmetic: 4 per case."""
    return 4 * p["N"]


def _sum2_sizes(p: dict) -> dict[str, int]:
    return dict(x=p["N"] * p["D"], dx=p["N"] * p["D"], loss=p["N"])


_CONV_FACTS = dict(family="conv", sizes=_conv_sizes, flops=_gemm_flops)
_LOCAL_FACTS = dict(family="local", sizes=_local_sizes, flops=_gemm_flops)
_FC_FACTS = dict(family="fc", sizes=_fc_sizes, flops=lambda p: 2 * p["N"] * p["I"] * p["O"])


def _norm_flops(p: dict) -> int:
    """Per value, a multiply-add per value of its window (`size` channels for cmrnorm, the only
    norm op with `blocked`; size x size pixels otherwise) and about four more for the power."""
    window = p["size"] if "blocked" in p else p["size"] * p["size"]
    return _image(p) * (2 * window + 4)


_NORM_FACTS = dict(family="norm", sizes=_norm_sizes, elements=_image, flops=_norm_flops)
_VALUE_FACTS = dict(sizes=_flat_sizes, elements=_per_value, flops=_per_value)
_POOL_FACTS = dict(family="pool", sizes=_pool_sizes,
                   flops=lambda p: p["N"] * p["C"] * p["P"] * p["Q"] * p["size"] * p["size"])
_SOFTMAX_FACTS = dict(family="softmax", sizes=_class_sizes, elements=_per_case, flops=_per_class)
_COST_FACTS = dict(family="cost", sizes=_class_sizes, elements=_per_case, flops=_per_class)

OPS: dict[str, OpSpec] = {
    op.name: op
    for op in [
        OpSpec("conv_fwd", (("x", I), ("w", I), ("b", I), ("y", O)), _CONV + ("neuron",) + _GROUPS,
               "y[n,k,p,q] = neuron(bias + sum_{c,r,s} w[k,c,r,s] * x[n,g*C/groups+c,p*stride-pad+r,q*stride-pad+s]), "
               "c < C/groups, g = k // (K/groups), x read as 0 outside the image; bias = b[k] "
               "(shared_biases, the default) or b[k,p,q] (shared_biases=False).  groups defaults to 1.  " + _SUMMED,
               optional=_SUMMED_PARAMS,
               **_CONV_FACTS, gemm=lambda p: _conv_gemm(p, "conv_fwd")),
        OpSpec("conv_bwd_data", (("w", I), ("dy", I), ("dx", O)), _CONV + ("accumulate",) + _GROUPS,
               "dx[n,c,h,w] (+)= sum over (k in c's group, r, s, p, q) with h = p*stride-pad+r, "
               "w = q*stride-pad+s of w[k,c mod C/groups,r,s] * dy[n,k,p,q]",
               **_CONV_FACTS, gemm=lambda p: _conv_gemm(p, "conv_bwd_data")),
        OpSpec("conv_bwd_filter", (("x", I), ("dy", I), ("dw", O)), _CONV + ("accumulate",) + _GROUPS,
               "dw[k,c,r,s] (+)= sum_{n,p,q} dy[n,k,p,q] * x[n,g*C/groups+c,p*stride-pad+r,q*stride-pad+s], "
               "g = k // (K/groups).  With split > 1 (ungrouped only) dw is a workspace of `split` partial "
               "sums, slice z summing the flattened (n,p,q) indices z*split_k .. (z+1)*split_k - 1",
               optional=("split", "split_k"),
               **_CONV_FACTS, gemm=lambda p: _conv_gemm(p, "conv_bwd_filter")),
        OpSpec("bias_grad", (("dy", I), ("db", O)), ("N", "K", "inner", "accumulate"),
               "db[k] (+)= sum_{n<N, i<inner} dy[(n*K + k)*inner + i]",
               family="reduce", sizes=lambda p: dict(dy=p["N"] * p["K"] * p["inner"], db=p["K"]),
               elements=lambda p: p["K"], flops=lambda p: p["N"] * p["K"] * p["inner"]),
        OpSpec("fc_fwd", (("x", I), ("w", I), ("b", I), ("y", O)), ("N", "I", "O", "neuron"),
               "y[n,o] = neuron(b[o] + sum_i x[n,i] * w[i,o]).  " + _SUMMED, optional=_SUMMED_PARAMS,
               **_FC_FACTS, gemm=lambda p: dict(M=p["N"], N=p["O"], K=p["I"], a_fast="k", b_fast="n")),
        OpSpec("fc_bwd_data", (("w", I), ("dy", I), ("dx", O)), ("N", "I", "O", "accumulate"),
               "dx[n,i] (+)= sum_o dy[n,o] * w[i,o]",
               **_FC_FACTS, gemm=lambda p: dict(M=p["N"], N=p["I"], K=p["O"], a_fast="k", b_fast="k")),
        OpSpec("fc_bwd_filter", (("x", I), ("dy", I), ("dw", O)), ("N", "I", "O", "accumulate"),
               "dw[i,o] (+)= sum_n x[n,i] * dy[n,o]",
               **_FC_FACTS, gemm=lambda p: dict(M=p["I"], N=p["O"], K=p["N"], a_fast="m", b_fast="n")),
        OpSpec("neuron_bwd", (("y", I), ("g", IO)), ("n", "neuron"),
               "g[i] *= neuron'(y[i]), the derivative written in terms of the neuron's output",
               family="elementwise", **_VALUE_FACTS),
        OpSpec("pool_fwd", (("x", I), ("y", O)),
               ("N", "C", "H", "W", "P", "Q", "size", "stride", "start", "mode"),
               "y[n,c,p,q] = max or mean of x over rows start+p*stride .. +size (clipped to the image), "
               "same for columns; mean divides by the clipped window's pixel count",
               **_POOL_FACTS, elements=lambda p: p["N"] * p["C"] * p["P"] * p["Q"]),
        OpSpec("pool_bwd", (("x", I), ("y", I), ("dy", I), ("dx", O)),
               ("N", "C", "H", "W", "P", "Q", "size", "stride", "start", "mode", "accumulate"),
               "max: each window's gradient goes to the first (row-major) pixel equal to its max; "
               "avg: spread evenly over the clipped window",
               **_POOL_FACTS, elements=_image),
        OpSpec("softmax_fwd", (("x", I), ("y", O)), ("N", "C"),
               "y[n,:] = exp(x[n,:] - max x[n,:]) / sum",
               **_SOFTMAX_FACTS),
        OpSpec("softmax_bwd", (("y", I), ("dy", I), ("dx", O)), ("N", "C", "accumulate"),
               "dx[n,c] (+)= y[n,c] * (dy[n,c] - sum_j dy[n,j] * y[n,j])",
               **_SOFTMAX_FACTS),
        OpSpec("logreg_fwd", (("labels", I), ("probs", I), ("loss", O), ("correct", O)), ("N", "C", "top_k"),
               "loss[n] = -log(probs[n,label]); correct[n] = 1 if the label's probability is finite and "
               "fewer than top_k classes have a larger (or a NaN) probability, else 0",
               **_SOFTMAX_FACTS),
        OpSpec("logreg_bwd", (("labels", I), ("probs", I), ("dprobs", O)), ("N", "C", "coeff", "accumulate"),
               "dprobs[n,c] (+)= -coeff / probs[n,c] if c == label[n] else 0",
               **_SOFTMAX_FACTS),
        OpSpec("softmax_logreg_bwd", (("labels", I), ("probs", I), ("dx", O)), ("N", "C", "coeff", "accumulate"),
               "gradient of coeff * -log(softmax(x)[label]) w.r.t. x: dx (+)= coeff * (probs - onehot(label))",
               **_SOFTMAX_FACTS),
        # ---- standalone neurons (for neurons whose derivative needs the input)
        OpSpec("neuron_fwd", (("x", I), ("y", O)), ("n", "neuron"),
               "y[i] = neuron(x[i])",
               family="eltwise", **_VALUE_FACTS),
        OpSpec("neuron_bwd_input", (("x", I), ("dy", I), ("dx", O)), ("n", "neuron", "accumulate"),
               "dx[i] (+)= dy[i] * neuron'(x[i]), the derivative written in terms of the neuron's input",
               family="eltwise", **_VALUE_FACTS),
        # ---- element-wise sum / max, concatenation
        OpSpec("eltsum_fwd", (("x", I), ("y", O)), ("n", "coeff", "accumulate"),
               "y[i] (+)= coeff * x[i]; an eltsum layer is one launch per input, the first without "
               "accumulate, the others with it",
               family="eltwise", **_VALUE_FACTS),
        OpSpec("eltsum_bwd", (("dy", I), ("dx", O)), ("n", "coeff", "accumulate"),
               "dx[i] (+)= coeff * dy[i], one launch per input with that input's coefficient",
               family="eltwise", **_VALUE_FACTS),
        OpSpec("eltmax_fwd", (("x", I), ("y", IO), ("arg", IO)), ("n", "index", "first"),
               "one launch per input, in input order: first: y = x, arg = index; otherwise where "
               "x[i] > y[i]: y[i] = x[i], arg[i] = index.  arg (f32, small integers) records the first "
               "input holding the maximum",
               family="eltwise", **_VALUE_FACTS),
        OpSpec("eltmax_bwd", (("arg", I), ("dy", I), ("dx", O)), ("n", "index", "accumulate"),
               "dx[i] (+)= dy[i] if arg[i] == index else 0: the gradient goes to the first input "
               "holding the maximum",
               family="eltwise", **_VALUE_FACTS),
        OpSpec("concat_fwd", (("x", I), ("y", O)), ("N", "D", "D_out", "offset"),
               "y[n, offset + i] = x[n, i] for i < D, y viewed as [N, D_out]; concatenating NCHW "
               "inputs along channels is offset = channel offset * H*W, D = C_i*H*W",
               family="eltwise", sizes=lambda p: dict(x=p["N"] * p["D"], y=p["N"] * p["D_out"]),
               elements=_per_feature, flops=_per_case_rough),
        OpSpec("concat_bwd", (("dy", I), ("dx", O)), ("N", "D", "D_out", "offset", "accumulate"),
               "dx[n, i] (+)= dy[n, offset + i]: the reverse slice copy",
               family="eltwise", sizes=lambda p: dict(dx=p["N"] * p["D"], dy=p["N"] * p["D_out"]),
               elements=_per_feature, flops=_per_case_rough),
        # ---- costs
        OpSpec("onehot", (("labels", I), ("targets", O)), ("N", "C"),
               "targets[n,c] = 1 if c == labels[n] else 0: int labels as the f32 [N, C] targets crossent wants",
               family="cost", sizes=_class_sizes, elements=lambda p: p["N"] * p["C"], flops=_per_class),
        OpSpec("crossent_fwd", (("targets", I), ("probs", I), ("loss", O), ("correct", O)), ("N", "C"),
               "targets [N, C] f32 (one-hot or soft labels, cuda-convnet2's CrossEntCostLayer): "
               "loss[n] = -sum_c targets[n,c] * log(probs[n,c]) (terms with targets 0 skipped); "
               "correct[n] = 1/m if one of the m classes whose probability equals the case's maximum "
               "has a positive target and all the case's probabilities are finite, else 0",
               **_COST_FACTS),
        OpSpec("crossent_bwd", (("targets", I), ("probs", I), ("dprobs", O)), ("N", "C", "coeff", "accumulate"),
               "dprobs[n,c] (+)= -coeff * targets[n,c] / probs[n,c]",
               **_COST_FACTS),
        OpSpec("softmax_crossent_bwd", (("targets", I), ("probs", I), ("dx", O)),
               ("N", "C", "coeff", "accumulate"),
               "gradient of coeff * crossent(softmax(x)) w.r.t. x: "
               "dx[n,c] (+)= coeff * (probs[n,c] * sum_j targets[n,j] - targets[n,c])",
               **_COST_FACTS),
        OpSpec("sum2_fwd", (("x", I), ("loss", O)), ("N", "D"),
               "loss[n] = sum_i x[n,i]^2 (cuda-convnet2's SumOfSquaresCostLayer; the objective is "
               "coeff * loss)",
               family="cost", sizes=_sum2_sizes, elements=_per_case, flops=_per_case_rough),
        OpSpec("sum2_bwd", (("x", I), ("dx", O)), ("N", "D", "coeff", "accumulate"),
               "dx (+)= 2 * coeff * x, the gradient of coeff * sum x^2",
               family="cost", sizes=_sum2_sizes, elements=_per_feature, flops=_per_case_rough),
        # ---- response normalisation (NCHW); all keep denoms for the backward
        OpSpec("cmrnorm_fwd", (("x", I), ("y", O), ("denoms", O)), _NORM + ("blocked",),
               "cross-map: denoms[n,c,h,w] = min_div + scale/size * sum_{c' in win(c)} x[n,c',h,w]^2, "
               "y = x * denoms^-pow; win(c) = c - size//2 .. c - size//2 + size - 1 clipped to the "
               "channels, or with blocked=True the block of `size` channels holding c (clipped)",
               **_NORM_FACTS),
        OpSpec("cmrnorm_bwd", (("x", I), ("dy", I), ("denoms", I), ("dx", O)),
               _NORM + ("blocked", "accumulate"),
               "exact gradient of cmrnorm_fwd: dx[c] (+)= dy[c] * denoms[c]^-pow - 2*pow*scale/size * "
               "x[c] * sum_{c': c in win(c')} dy[c'] * x[c'] * denoms[c']^(-pow-1)",
               **_NORM_FACTS),
        OpSpec("rnorm_fwd", (("x", I), ("y", O), ("denoms", O)), _NORM,
               "same-map: denoms[n,c,h,w] = min_div + scale/size^2 * sum over the size x size window "
               "of rows h - size//2 .. +size-1 and columns likewise, clipped to the image, of x^2; "
               "y = x * denoms^-pow",
               **_NORM_FACTS),
        OpSpec("rnorm_bwd", (("x", I), ("dy", I), ("denoms", I), ("dx", O)), _NORM + ("accumulate",),
               "exact gradient of rnorm_fwd: dx[p] (+)= dy[p] * denoms[p]^-pow - 2*pow*scale/size^2 * "
               "x[p] * sum_{p': p in win(p')} dy[p'] * x[p'] * denoms[p']^(-pow-1)",
               **_NORM_FACTS),
        OpSpec("cnorm_meandiff", (("x", I), ("md", O)), _IMG + ("size",),
               "first half of contrast normalisation: md = x - mean of x over the clipped rnorm "
               "window (divided by the clipped window's pixel count)",
               **_NORM_FACTS),
        OpSpec("cnorm_fwd", (("x", I), ("md", I), ("y", O), ("denoms", O)), _NORM,
               "contrast normalisation (cuda-convnet2's ContrastNormLayer), after cnorm_meandiff: "
               "denoms = min_div + scale/size^2 * sum over the rnorm window of md^2; "
               "y = x * denoms^-pow (x, not md, is scaled, as in cuda-convnet2)",
               **_NORM_FACTS),
        OpSpec("cnorm_bwd_prep", (("x", I), ("dy", I), ("denoms", I), ("md", IO)), _NORM,
               "first half of cnorm's exact backward, in place over the forward's md: "
               "md[r] = -2*pow*scale/size^2 * md[r] * sum_{p: r in win(p)} dy[p]*x[p]*denoms[p]^(-pow-1)",
               **_NORM_FACTS),
        OpSpec("cnorm_bwd", (("dy", I), ("denoms", I), ("md", I), ("dx", O)), _NORM + ("accumulate",),
               "second half, with md = cnorm_bwd_prep's output t: dx[q] (+)= dy[q]*denoms[q]^-pow + t[q] "
               "- sum_{r: q in win(r)} t[r] / |win(r)|, the exact gradient including the mean's "
               "dependence on x (cuda-convnet2 drops that last term)",
               **_NORM_FACTS),
        # ---- dropout with a counter-based RNG
        OpSpec("dropout_fwd", (("x", I), ("y", O), ("mask", O), ("seed", INT), ("step", INT)),
               ("N", "D", "keep", "layer_id", "case_offset", "variant", "train"),
               "x, y, mask viewed as [N, D].  Training (train, the default): case n, feature i is kept "
               "iff u < keep with u = (philox4x32_10(ctr=(case_offset+n, i, step, 0), "
               "key=(seed, layer_id))[0] >> 8) / 2^24; mask = kept ? 1/keep : 0 (variant 'dropout', "
               "inverted dropout, the default) or kept ? 1 : 0 (variant 'dropout2'); y = x * mask.  "
               "Test (train=False): y = x ('dropout') or y = keep * x ('dropout2'); mask is not written.  "
               "A replica whose cases are not one contiguous run of the minibatch gives case_ranges, "
               "((first, count), ...) in buffer order, instead of case_offset: its case n is then global "
               "case first_k + n - (count_0 + ... + count_{k-1}) of the piece k holding it",
               optional=("case_ranges",),
               family="eltwise", sizes=lambda p: {a: p["N"] * p["D"] for a in ("x", "y", "mask")},
               elements=_per_feature, flops=_per_case_rough),
        OpSpec("dropout_bwd", (("mask", I), ("dy", I), ("dx", O)), ("n", "accumulate"),
               "dx (+)= dy * mask",
               family="eltwise", **_VALUE_FACTS),
        # ---- locally connected (unshared weights) layers and unshared biases
        OpSpec("local_fwd", (("x", I), ("w", I), ("b", I), ("y", O)), _CONV + ("neuron",),
               "y[n,k,p,q] = neuron(b[k,p,q] + sum_{c,r,s} w[p*Q+q,k,c,r,s] * "
               "x[n,c,p*stride-pad+r,q*stride-pad+s]), x read as 0 outside the image",
               **_LOCAL_FACTS, gemm=lambda p: dict(M=p["K"], N=p["N"], K=p["C"] * p["R"] * p["S"], a_fast="k",
                                                        b_fast="k", batch=p["P"] * p["Q"])),
        OpSpec("local_bwd_data", (("w", I), ("dy", I), ("dx", O)), _CONV + ("accumulate",),
               "dx[n,c,h,w] (+)= sum over (k,r,s,p,q) with h = p*stride-pad+r, w = q*stride-pad+s of "
               "w[p*Q+q,k,c,r,s] * dy[n,k,p,q]",
               family="local_data", sizes=_local_sizes, elements=_image, flops=_gemm_flops),
        OpSpec("local_bwd_filter", (("x", I), ("dy", I), ("dw", O)), _CONV + ("accumulate",),
               "dw[p*Q+q,k,c,r,s] (+)= sum_n dy[n,k,p,q] * x[n,c,p*stride-pad+r,q*stride-pad+s]",
               **_LOCAL_FACTS, gemm=lambda p: dict(M=p["K"], N=p["C"] * p["R"] * p["S"], K=p["N"], a_fast="m",
                                                        b_fast="n", batch=p["P"] * p["Q"])),
        OpSpec("bias_grad_unshared", (("dy", I), ("db", O)), ("N", "K", "inner", "accumulate"),
               "db[k*inner + i] (+)= sum_{n<N} dy[(n*K + k)*inner + i]: unshared (per position) biases "
               "of conv (shared_biases=False) and local layers, inner = P*Q",
               family="eltwise", sizes=lambda p: dict(dy=p["N"] * p["K"] * p["inner"], db=p["K"] * p["inner"]),
               elements=lambda p: p["K"] * p["inner"], flops=_per_case_rough),
        OpSpec("replica_sum", (("stage", I), ("g", IO)), ("R", "n", "offset", "accumulate"),
               "g[offset + i] (+)= sum over r = 0..R-1, in that order, of stage[r*n + i]: one chunk of the "
               "reduce-scatter that sums replicated weights' gradients, or the R partial sums of a "
               "split-K weight gradient",
               family="elementwise", sizes=lambda p: dict(stage=p["R"] * p["n"], g=p["offset"] + p["n"]),
               elements=_per_value, flops=lambda p: p["n"] * p["R"], windows=("g",)),
        OpSpec("max_norm", (("w", IO),), ("units", "length", "unit_stride", "elem_stride", "wball"),
               "for each unit u: v = w[u*unit_stride + e*elem_stride] for e < length; if |v| > wball, "
               "v *= wball / |v| (cuda-convnet2's wball: a ball constraint on each filter / output unit)",
               family="elementwise", sizes=_max_norm_sizes, elements=lambda p: p["units"],
               flops=lambda p: 3 * p["units"] * p["length"]),
        OpSpec("sgd_update",
               (("w", IO), ("dw", I), ("inc", IO), ("lr", S), ("momentum", S), ("weight_decay", S),
                ("inv_cases", S)),
               ("n",),
               "inc = momentum*inc - lr*(dw*inv_cases + weight_decay*w); w += inc",
               family="elementwise", sizes=_flat_sizes, elements=_per_value, flops=lambda p: 6 * p["n"]),
        OpSpec("nonfinite", (("x", I), ("flag", IO)), ("n",),
               "flag[0] = 1 if any x[i], i < n, is NaN or infinite; otherwise flag is left as it is, so "
               "launches over several buffers OR into one flag (int32, zero until something is found)",
               family="elementwise", sizes=lambda p: dict(x=p["n"], flag=1), elements=_per_value, flops=_per_value,
               windows=("flag",)),
    ]
}

# ops the planner runs for trainable parameters and numerical health, whatever the layer kinds
# (every other op belongs to the layer kinds that lower to it, cnnc/check/kinds.py)
TRAINING_OPS = ("replica_sum", "sgd_update", "max_norm", "nonfinite")

# buffer arguments that hold int32 rather than float32
INT_BUFFERS = frozenset({"labels", "flag"})


def dropout_threshold(keep: float) -> int:
    """Dropout keeps a value iff (philox word >> 8) < this, i.e. iff u = (word >> 8) / 2^24 < keep,
    decided in exact integers so every backend draws bit-identical masks."""
    return min(int(math.ceil(keep * (1 << 24))), 1 << 24)


def norm_add_scale(p: dict, cross_map: bool) -> float:
    """The factor of a normalisation's window sum: cuda-convnet2 divides the layer's scale by
    size across maps (cmrnorm) and by size^2 over a window of pixels (rnorm, cnorm)."""
    return p["scale"] / (p["size"] if cross_map else p["size"] * p["size"])


# op name -> its numpy implementation, fn(params, *args) in the order of OPS[name].args.
# cnnc/backends/reference_ops.py fills it with @reference as it is imported, so this module
# names no backend.
REFERENCES: dict[str, Callable] = {}


def reference(fn: Callable) -> Callable:
    """Register `fn` as the reference implementation of the op of the same name."""
    if fn.__name__ not in OPS:
        raise KeyError(f"{fn.__name__} is not an op")
    REFERENCES[fn.__name__] = fn
    return fn
