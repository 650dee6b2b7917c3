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

Gradients with respect to weights are *sums* over the cases of the batch; the
update divides by the number of cases (DESIGN §4).  Ops with an
``accumulate`` parameter add into their output instead of overwriting it;
the planner uses that when a layer's output feeds several consumers.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Role(str, Enum):
    IN = "in"
    OUT = "out"
    INOUT = "inout"
    SCALAR = "scalar"


@dataclass(frozen=True)
class OpSpec:
    """One kernel operation: argument names and roles, and the params it needs."""

    name: str
    args: tuple[tuple[str, Role], ...]
    params: tuple[str, ...]
    doc: str

    @property
    def arg_names(self) -> tuple[str, ...]:
        return tuple(a for a, _ in self.args)


I, O, IO, S = Role.IN, Role.OUT, Role.INOUT, Role.SCALAR

_CONV = ("N", "C", "H", "W", "K", "R", "S", "P", "Q", "stride", "pad")

OPS: dict[str, OpSpec] = {
    op.name: op
    for op in [
        OpSpec("conv_fwd", (("x", I), ("w", I), ("b", I), ("y", O)), _CONV + ("neuron",),
               "y[n,k,p,q] = neuron(b[k] + sum_{c,r,s} w[k,c,r,s] * x[n,c,p*stride-pad+r,q*stride-pad+s]), "
               "x read as 0 outside the image"),
        OpSpec("conv_bwd_data", (("w", I), ("dy", I), ("dx", O)), _CONV + ("accumulate",),
               "dx[n,c,h,w] (+)= sum over (k,r,s,p,q) with h = p*stride-pad+r, w = q*stride-pad+s of "
               "w[k,c,r,s] * dy[n,k,p,q]"),
        OpSpec("conv_bwd_filter", (("x", I), ("dy", I), ("dw", O)), _CONV,
               "dw[k,c,r,s] = sum_{n,p,q} dy[n,k,p,q] * x[n,c,p*stride-pad+r,q*stride-pad+s]"),
        OpSpec("bias_grad", (("dy", I), ("db", O)), ("N", "K", "inner"),
               "db[k] = sum_{n<N, i<inner} dy[(n*K + k)*inner + i]"),
        OpSpec("fc_fwd", (("x", I), ("w", I), ("b", I), ("y", O)), ("N", "I", "O", "neuron"),
               "y[n,o] = neuron(b[o] + sum_i x[n,i] * w[i,o])"),
        OpSpec("fc_bwd_data", (("w", I), ("dy", I), ("dx", O)), ("N", "I", "O", "accumulate"),
               "dx[n,i] (+)= sum_o dy[n,o] * w[i,o]"),
        OpSpec("fc_bwd_filter", (("x", I), ("dy", I), ("dw", O)), ("N", "I", "O"),
               "dw[i,o] = sum_n x[n,i] * dy[n,o]"),
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
               "loss[n] = -log(probs[n,label]); correct[n] = 1 if fewer than top_k classes have a "
               "larger probability than the label's, else 0"),
        OpSpec("logreg_bwd", (("labels", I), ("probs", I), ("dprobs", O)), ("N", "C", "coeff", "accumulate"),
               "dprobs[n,c] (+)= -coeff / probs[n,c] if c == label[n] else 0"),
        OpSpec("softmax_logreg_bwd", (("labels", I), ("probs", I), ("dx", O)), ("N", "C", "coeff", "accumulate"),
               "gradient of coeff * -log(softmax(x)[label]) w.r.t. x: dx (+)= coeff * (probs - onehot(label))"),
        OpSpec("sgd_update",
               (("w", IO), ("dw", I), ("inc", IO), ("lr", S), ("momentum", S), ("weight_decay", S),
                ("inv_cases", S)),
               ("n",),
               "inc = momentum*inc - lr*(dw*inv_cases + weight_decay*w); w += inc"),
    ]
}


def op(name: str) -> OpSpec:
    return OPS[name]
