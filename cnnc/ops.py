"""The kernel operations: the contract between the planner, the templates and the backends.

Every launch in a plan names one of these ops, a dict of compile-time
parameters (shapes, strides, the fused neuron, ...) and its arguments in the
order listed here.  The generated CUDA/OpenCL kernels take their arguments in
exactly this order, and the reference backend implements each op in numpy
with the same meaning, which is what lets one executor drive every backend.

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
update divides by the number of cases (DESIGN §4).  Ops with an
``accumulate`` parameter add into their output instead of overwriting it;
the planner uses that when a layer's output feeds several consumers, and
for weight gradients summed over several passes (hybrid parallelism).

Runtime scalars come in two kinds: ``SCALAR`` arguments are 32-bit floats
(the optimiser's learning rate, momentum, ...); ``INT_SCALAR`` arguments are
32-bit integers (the dropout RNG's seed and step), declared ``const int`` in
the kernel and read as unsigned: a backend passes them as ``numpy.int32`` (or
``numpy.uint32``), the reference backend accepts any integer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum


class Role(str, Enum):
    IN = "in"
    OUT = "out"
    INOUT = "inout"
    SCALAR = "scalar"
    INT_SCALAR = "int_scalar"


@dataclass(frozen=True)
class OpSpec:
    """One kernel operation: argument names and roles, and the params it needs."""

    name: str
    args: tuple[tuple[str, Role], ...]
    params: tuple[str, ...]
    doc: str
    optional: tuple[str, ...] = ()      # further params that may be left out (see doc for their defaults)

    @property
    def arg_names(self) -> tuple[str, ...]:
        return tuple(a for a, _ in self.args)


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

OPS: dict[str, OpSpec] = {
    op.name: op
    for op in [
        OpSpec("conv_fwd", (("x", I), ("w", I), ("b", I), ("y", O)), _CONV + ("neuron",) + _GROUPS,
               "y[n,k,p,q] = neuron(bias + sum_{c,r,s} w[k,c,r,s] * x[n,g*C/groups+c,p*stride-pad+r,q*stride-pad+s]), "
               "c < C/groups, g = k // (K/groups), x read as 0 outside the image; bias = b[k] "
               "(shared_biases, the default) or b[k,p,q] (shared_biases=False).  groups defaults to 1.  " + _SUMMED,
               optional=_SUMMED_PARAMS),
        OpSpec("conv_bwd_data", (("w", I), ("dy", I), ("dx", O)), _CONV + ("accumulate",) + _GROUPS,
               "dx[n,c,h,w] (+)= sum over (k in c's group, r, s, p, q) with h = p*stride-pad+r, "
               "w = q*stride-pad+s of w[k,c mod C/groups,r,s] * dy[n,k,p,q]"),
        OpSpec("conv_bwd_filter", (("x", I), ("dy", I), ("dw", O)), _CONV + ("accumulate",) + _GROUPS,
               "dw[k,c,r,s] (+)= sum_{n,p,q} dy[n,k,p,q] * x[n,g*C/groups+c,p*stride-pad+r,q*stride-pad+s], "
               "g = k // (K/groups).  With split > 1 (ungrouped only) dw is a workspace of `split` partial "
               "sums, slice z summing the flattened (n,p,q) indices z*split_k .. (z+1)*split_k - 1",
               optional=("split", "split_k")),
        OpSpec("bias_grad", (("dy", I), ("db", O)), ("N", "K", "inner", "accumulate"),
               "db[k] (+)= sum_{n<N, i<inner} dy[(n*K + k)*inner + i]"),
        OpSpec("fc_fwd", (("x", I), ("w", I), ("b", I), ("y", O)), ("N", "I", "O", "neuron"),
               "y[n,o] = neuron(b[o] + sum_i x[n,i] * w[i,o]).  " + _SUMMED, optional=_SUMMED_PARAMS),
        OpSpec("fc_bwd_data", (("w", I), ("dy", I), ("dx", O)), ("N", "I", "O", "accumulate"),
               "dx[n,i] (+)= sum_o dy[n,o] * w[i,o]"),
        OpSpec("fc_bwd_filter", (("x", I), ("dy", I), ("dw", O)), ("N", "I", "O", "accumulate"),
               "dw[i,o] (+)= sum_n x[n,i] * dy[n,o]"),
        OpSpec("neuron_bwd", (("y", I), ("g", IO)), ("n", "neuron"),
               "g[i] *= neuron'(y[i]), the derivative written in terms of the neuron's output"),
        OpSpec("pool_fwd", (("x", I), ("y", O)),
               ("N", "C", "H", "W", "P", "Q", "size", "stride", "start", "mode"),
               "y[n,c,p,q] = max or mean of x over rows start+p*stride .. +size (clipped to the image), "
               "same for columns; mean divides by the clipped window's pixel count"),
        OpSpec("pool_bwd", (("x", I), ("y", I), ("dy", I), ("dx", O)),
               ("N", "C", "H", "W", "P", "Q", "size", "stride", "start", "mode", "accumulate"),
               "max: each window's gradient goes to the first (row-major) pixel equal to its max; "
               "avg: spread evenly over the clipped window"),
        OpSpec("softmax_fwd", (("x", I), ("y", O)), ("N", "C"),
               "y[n,:] = exp(x[n,:] - max x[n,:]) / sum"),
        OpSpec("softmax_bwd", (("y", I), ("dy", I), ("dx", O)), ("N", "C", "accumulate"),
               "dx[n,c] (+)= y[n,c] * (dy[n,c] - sum_j dy[n,j] * y[n,j])"),
        OpSpec("logreg_fwd", (("labels", I), ("probs", I), ("loss", O), ("correct", O)), ("N", "C", "top_k"),
               "loss[n] = -log(probs[n,label]); correct[n] = 1 if the label's probability is finite and "
               "fewer than top_k classes have a larger (or a NaN) probability, else 0"),
        OpSpec("logreg_bwd", (("labels", I), ("probs", I), ("dprobs", O)), ("N", "C", "coeff", "accumulate"),
               "dprobs[n,c] (+)= -coeff / probs[n,c] if c == label[n] else 0"),
        OpSpec("softmax_logreg_bwd", (("labels", I), ("probs", I), ("dx", O)), ("N", "C", "coeff", "accumulate"),
               "gradient of coeff * -log(softmax(x)[label]) w.r.t. x: dx (+)= coeff * (probs - onehot(label))"),
        # ---- standalone neurons (for neurons whose derivative needs the input)
        OpSpec("neuron_fwd", (("x", I), ("y", O)), ("n", "neuron"),
               "y[i] = neuron(x[i])"),
        OpSpec("neuron_bwd_input", (("x", I), ("dy", I), ("dx", O)), ("n", "neuron", "accumulate"),
               "dx[i] (+)= dy[i] * neuron'(x[i]), the derivative written in terms of the neuron's input"),
        # ---- element-wise sum / max, concatenation
        OpSpec("eltsum_fwd", (("x", I), ("y", O)), ("n", "coeff", "accumulate"),
               "y[i] (+)= coeff * x[i]; an eltsum layer is one launch per input, the first without "
               "accumulate, the others with it"),
        OpSpec("eltsum_bwd", (("dy", I), ("dx", O)), ("n", "coeff", "accumulate"),
               "dx[i] (+)= coeff * dy[i], one launch per input with that input's coefficient"),
        OpSpec("eltmax_fwd", (("x", I), ("y", IO), ("arg", IO)), ("n", "index", "first"),
               "one launch per input, in input order: first: y = x, arg = index; otherwise where "
               "x[i] > y[i]: y[i] = x[i], arg[i] = index.  arg (f32, small integers) records the first "
               "input holding the maximum"),
        OpSpec("eltmax_bwd", (("arg", I), ("dy", I), ("dx", O)), ("n", "index", "accumulate"),
               "dx[i] (+)= dy[i] if arg[i] == index else 0: the gradient goes to the first input "
               "holding the maximum"),
        OpSpec("concat_fwd", (("x", I), ("y", O)), ("N", "D", "D_out", "offset"),
               "y[n, offset + i] = x[n, i] for i < D, y viewed as [N, D_out]; concatenating NCHW "
               "inputs along channels is offset = channel offset * H*W, D = C_i*H*W"),
        OpSpec("concat_bwd", (("dy", I), ("dx", O)), ("N", "D", "D_out", "offset", "accumulate"),
               "dx[n, i] (+)= dy[n, offset + i]: the reverse slice copy"),
        # ---- costs
        OpSpec("onehot", (("labels", I), ("targets", O)), ("N", "C"),
               "targets[n,c] = 1 if c == labels[n] else 0: int labels as the f32 [N, C] targets crossent wants"),
        OpSpec("crossent_fwd", (("targets", I), ("probs", I), ("loss", O), ("correct", O)), ("N", "C"),
               "targets [N, C] f32 (one-hot or soft labels, cuda-convnet2's CrossEntCostLayer): "
               "loss[n] = -sum_c targets[n,c] * log(probs[n,c]) (terms with targets 0 skipped); "
               "correct[n] = 1/m if one of the m classes whose probability equals the case's maximum "
               "has a positive target and all the case's probabilities are finite, else 0"),
        OpSpec("crossent_bwd", (("targets", I), ("probs", I), ("dprobs", O)), ("N", "C", "coeff", "accumulate"),
               "dprobs[n,c] (+)= -coeff * targets[n,c] / probs[n,c]"),
        OpSpec("softmax_crossent_bwd", (("targets", I), ("probs", I), ("dx", O)),
               ("N", "C", "coeff", "accumulate"),
               "gradient of coeff * crossent(softmax(x)) w.r.t. x: "
               "dx[n,c] (+)= coeff * (probs[n,c] * sum_j targets[n,j] - targets[n,c])"),
        OpSpec("sum2_fwd", (("x", I), ("loss", O)), ("N", "D"),
               "loss[n] = sum_i x[n,i]^2 (cuda-convnet2's SumOfSquaresCostLayer; the objective is "
               "coeff * loss)"),
        OpSpec("sum2_bwd", (("x", I), ("dx", O)), ("N", "D", "coeff", "accumulate"),
               "dx (+)= 2 * coeff * x, the gradient of coeff * sum x^2"),
        # ---- response normalisation (NCHW); all keep denoms for the backward
        OpSpec("cmrnorm_fwd", (("x", I), ("y", O), ("denoms", O)), _NORM + ("blocked",),
               "cross-map: denoms[n,c,h,w] = min_div + scale/size * sum_{c' in win(c)} x[n,c',h,w]^2, "
               "y = x * denoms^-pow; win(c) = c - size//2 .. c - size//2 + size - 1 clipped to the "
               "channels, or with blocked=True the block of `size` channels holding c (clipped)"),
        OpSpec("cmrnorm_bwd", (("x", I), ("dy", I), ("denoms", I), ("dx", O)),
               _NORM + ("blocked", "accumulate"),
               "exact gradient of cmrnorm_fwd: dx[c] (+)= dy[c] * denoms[c]^-pow - 2*pow*scale/size * "
               "x[c] * sum_{c': c in win(c')} dy[c'] * x[c'] * denoms[c']^(-pow-1)"),
        OpSpec("rnorm_fwd", (("x", I), ("y", O), ("denoms", O)), _NORM,
               "same-map: denoms[n,c,h,w] = min_div + scale/size^2 * sum over the size x size window "
               "of rows h - size//2 .. +size-1 and columns likewise, clipped to the image, of x^2; "
               "y = x * denoms^-pow"),
        OpSpec("rnorm_bwd", (("x", I), ("dy", I), ("denoms", I), ("dx", O)), _NORM + ("accumulate",),
               "exact gradient of rnorm_fwd: dx[p] (+)= dy[p] * denoms[p]^-pow - 2*pow*scale/size^2 * "
               "x[p] * sum_{p': p in win(p')} dy[p'] * x[p'] * denoms[p']^(-pow-1)"),
        OpSpec("cnorm_meandiff", (("x", I), ("md", O)), _IMG + ("size",),
               "first half of contrast normalisation: md = x - mean of x over the clipped rnorm "
               "window (divided by the clipped window's pixel count)"),
        OpSpec("cnorm_fwd", (("x", I), ("md", I), ("y", O), ("denoms", O)), _NORM,
               "contrast normalisation (cuda-convnet2's ContrastNormLayer), after cnorm_meandiff: "
               "denoms = min_div + scale/size^2 * sum over the rnorm window of md^2; "
               "y = x * denoms^-pow (x, not md, is scaled, as in cuda-convnet2)"),
        OpSpec("cnorm_bwd_prep", (("x", I), ("dy", I), ("denoms", I), ("md", IO)), _NORM,
               "first half of cnorm's exact backward, in place over the forward's md: "
               "md[r] = -2*pow*scale/size^2 * md[r] * sum_{p: r in win(p)} dy[p]*x[p]*denoms[p]^(-pow-1)"),
        OpSpec("cnorm_bwd", (("dy", I), ("denoms", I), ("md", I), ("dx", O)), _NORM + ("accumulate",),
               "second half, with md = cnorm_bwd_prep's output t: dx[q] (+)= dy[q]*denoms[q]^-pow + t[q] "
               "- sum_{r: q in win(r)} t[r] / |win(r)|, the exact gradient including the mean's "
               "dependence on x (cuda-convnet2 drops that last term)"),
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
               optional=("case_ranges",)),
        OpSpec("dropout_bwd", (("mask", I), ("dy", I), ("dx", O)), ("n", "accumulate"),
               "dx (+)= dy * mask"),
        # ---- locally connected (unshared weights) layers and unshared biases
        OpSpec("local_fwd", (("x", I), ("w", I), ("b", I), ("y", O)), _CONV + ("neuron",),
               "y[n,k,p,q] = neuron(b[k,p,q] + sum_{c,r,s} w[p*Q+q,k,c,r,s] * "
               "x[n,c,p*stride-pad+r,q*stride-pad+s]), x read as 0 outside the image"),
        OpSpec("local_bwd_data", (("w", I), ("dy", I), ("dx", O)), _CONV + ("accumulate",),
               "dx[n,c,h,w] (+)= sum over (k,r,s,p,q) with h = p*stride-pad+r, w = q*stride-pad+s of "
               "w[p*Q+q,k,c,r,s] * dy[n,k,p,q]"),
        OpSpec("local_bwd_filter", (("x", I), ("dy", I), ("dw", O)), _CONV + ("accumulate",),
               "dw[p*Q+q,k,c,r,s] (+)= sum_n dy[n,k,p,q] * x[n,c,p*stride-pad+r,q*stride-pad+s]"),
        OpSpec("bias_grad_unshared", (("dy", I), ("db", O)), ("N", "K", "inner", "accumulate"),
               "db[k*inner + i] (+)= sum_{n<N} dy[(n*K + k)*inner + i]: unshared (per position) biases "
               "of conv (shared_biases=False) and local layers, inner = P*Q"),
        OpSpec("replica_sum", (("stage", I), ("g", IO)), ("R", "n", "offset", "accumulate"),
               "g[offset + i] (+)= sum over r = 0..R-1, in that order, of stage[r*n + i]: one chunk of the "
               "reduce-scatter that sums replicated weights' gradients, or the R partial sums of a "
               "split-K weight gradient"),
        OpSpec("max_norm", (("w", IO),), ("units", "length", "unit_stride", "elem_stride", "wball"),
               "for each unit u: v = w[u*unit_stride + e*elem_stride] for e < length; if |v| > wball, "
               "v *= wball / |v| (cuda-convnet2's wball: a ball constraint on each filter / output unit)"),
        OpSpec("sgd_update",
               (("w", IO), ("dw", I), ("inc", IO), ("lr", S), ("momentum", S), ("weight_decay", S),
                ("inv_cases", S)),
               ("n",),
               "inc = momentum*inc - lr*(dw*inv_cases + weight_decay*w); w += inc"),
        OpSpec("nonfinite", (("x", I), ("flag", IO)), ("n",),
               "flag[0] = 1 if any x[i], i < n, is NaN or infinite; otherwise flag is left as it is, so "
               "launches over several buffers OR into one flag (int32, zero until something is found)"),
    ]
}

# buffer arguments that hold int32 rather than float32
INT_BUFFERS = frozenset({"labels", "flag"})


def dropout_threshold(keep: float) -> int:
    """Dropout keeps a value iff (philox word >> 8) < this, i.e. iff u = (word >> 8) / 2^24 < keep,
    decided in exact integers so every backend draws bit-identical masks."""
    return min(int(math.ceil(keep * (1 << 24))), 1 << 24)


def op(name: str) -> OpSpec:
    return OPS[name]
