"""Layer kinds as data: arguments, input counts and shape rules.

This is the layer half of the registry (cnnc/ops.py is the kernel half): each
row names the ops the kind lowers to, and its PyTorch twin registers itself
here from cnnc/bench_torch.py.  Semantics follow cuda-convnet2.
Output sizes use its rounding: conv and local use
1 + ceil((2*padding + H - size) / stride) (the last window may overhang the
padded image; it reads zeros there) and pooling 1 + ceil((H - start - size)
/ stride) with windows clipped to the image.

Shape rules receive the converted arguments, the input shapes and the input
names, and raise :class:`ShapeError` naming the argument or the input that is
wrong, so the checker can point at it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from cnnc.ir import Shape

REQUIRED = object()


@dataclass(frozen=True)
class Param:
    name: str
    type: str                      # "int" | "float" | "bool" | "floats" (a list of numbers: [1, -1])
    default: Any = REQUIRED
    min: float | None = None
    doc: str = ""
    max: float | None = None
    open_min: bool = False         # the value must be greater than `min`, not just at least `min`
    omit_default: bool = False     # kept out of the layer's args while it has its default value, so
                                   # that a layer leaving it at its default has the same record,
                                   # kernel names and plan as one that never mentions it


class ShapeError(Exception):
    """A shape rule that does not hold; the checker attaches the location.

    `arg` names the keyword argument to point at, `input` the index of the input."""

    def __init__(self, message: str, arg: str | None = None, hint: str | None = None,
                 input: int | None = None):
        super().__init__(message)
        self.arg = arg
        self.hint = hint
        self.input = input


@dataclass(frozen=True)
class LayerKind:
    name: str
    min_inputs: int
    max_inputs: int | None             # None: any number of inputs from min_inputs on
    params: tuple[Param, ...]
    infer: Callable[[dict, tuple[Shape, ...], tuple[str, ...]], Shape]
    has_weights: bool = False
    takes_neuron: bool = False         # a neuron may follow and is fused into the layer's kernel
    input_kinds: str = "image"         # "image": every input an activation; "labels+probs": cost
    is_cost: bool = False
    doc: str = ""
    neuron_layer: bool = False         # the layer *is* its neuron: it needs one, of any kind, unfused
    random: bool = False               # draws random numbers: gets a stable `layer_id` argument
    ops: tuple[str, ...] = ()          # the kernel ops (cnnc/ops.py) its forward and backward run

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def value(self, args: dict, name: str) -> Any:
        """A layer's argument, or its default where the layer's args leave it out (omit_default)."""
        return args[name] if name in args else self.param(name).default


# kind name -> its PyTorch twin, which cnnc/bench_torch.py registers with @torch_twin as it
# is imported (so that this module needs no PyTorch)
TORCH_TWINS: dict[str, Callable] = {}


def torch_twin(*kinds: str) -> Callable:
    """Register the decorated function as the PyTorch twin of these layer kinds."""
    def register(fn: Callable) -> Callable:
        for kind in kinds:
            if kind not in KINDS:
                raise KeyError(f"{kind} is not a layer kind")
            TORCH_TWINS[kind] = fn
        return fn
    return register


def conv_out(size: int, filt: int, stride: int, pad: int) -> int:
    return 1 + math.ceil((2 * pad + size - filt) / stride)


def pool_out(size: int, window: int, stride: int, start: int) -> int:
    """cuda-convnet2's count of pool windows, 1 + ceil((size - start - window) / stride), less any
    that would start past the image: with a stride above the window size the last one can, and a
    window of no pixels has no maximum or mean.  With stride <= window no window is dropped."""
    return min(1 + math.ceil((size - start - window) / stride), 1 + (size - start - 1) // stride)


# ---------------------------------------------------------------- weight layers

def _filter_output(a: dict, x: Shape) -> tuple[int, int]:
    """Output rows and columns of a conv or local filter over one input."""
    f, s, p = a["size"], a["stride"], a["padding"]
    if p >= f:
        raise ShapeError(f"padding {p} must be smaller than the filter size {f}", "padding")
    if f > x.height + 2 * p or f > x.width + 2 * p:
        raise ShapeError(f"a {f}x{f} filter does not fit the {x.height}x{x.width} input with padding {p}",
                         "size", hint="use a smaller size or more padding")
    return conv_out(x.height, f, s, p), conv_out(x.width, f, s, p)


def _infer_conv(a: dict, ins: tuple[Shape, ...], names: tuple[str, ...]) -> Shape:
    """Every input has its own filters; all use the same size, stride and padding and must
    give outputs of one size, which are summed."""
    groups = KINDS["conv"].value(a, "groups")
    if a["filters"] % groups:
        raise ShapeError(f"filters={a['filters']} is not a multiple of groups={groups}", "groups",
                         hint="each group has the same number of filters")
    out = None
    for i, x in enumerate(ins):
        if x.channels % groups:
            raise ShapeError(f"groups={groups} does not divide the {x.channels} channels of '{names[i]}'",
                             "groups")
        here = _filter_output(a, x)
        if out is not None and here != out:
            raise ShapeError(f"'{names[i]}' gives {here[0]}x{here[1]} outputs but '{names[0]}' gives "
                             f"{out[0]}x{out[1]}: the inputs of one layer are summed, so their outputs "
                             f"must have one size", input=i)
        out = here
    return Shape(a["filters"], *out)


def _infer_local(a: dict, ins: tuple[Shape, ...], names: tuple[str, ...]) -> Shape:
    return Shape(a["filters"], *_filter_output(a, ins[0]))


def _infer_fc(a: dict, ins: tuple[Shape, ...], names: tuple[str, ...]) -> Shape:
    return Shape(a["outputs"])


# ---------------------------------------------------------------- pooling

def _infer_pool(a: dict, ins: tuple[Shape, ...], names: tuple[str, ...]) -> Shape:
    x = ins[0]
    size, start = a["size"], a["start"]
    if a["stride"] is None:
        a["stride"] = size
    stride = a["stride"]
    if start < 0 or start >= min(x.height, x.width):
        raise ShapeError(f"start {start} lies outside the {x.height}x{x.width} input", "start")
    if size > x.height - start or size > x.width - start:
        raise ShapeError(f"a {size}x{size} window does not fit the {x.height}x{x.width} input "
                         f"from start {start}", "size")
    out_h, out_w = pool_out(x.height, size, stride, start), pool_out(x.width, size, stride, start)
    if a["outputs"]:
        if a["outputs"] > min(out_h, out_w):
            raise ShapeError(f"outputs={a['outputs']} is more than the {min(out_h, out_w)} windows that fit",
                             "outputs")
        out_h = out_w = a["outputs"]
    return Shape(x.channels, out_h, out_w)


# ---------------------------------------------------------------- element-wise and structural

def _same(a: dict, ins: tuple[Shape, ...], names: tuple[str, ...]) -> Shape:
    return ins[0]


def _infer_elementwise(a: dict, ins: tuple[Shape, ...], names: tuple[str, ...]) -> Shape:
    for i, x in enumerate(ins[1:], 1):
        if x != ins[0]:
            raise ShapeError(f"'{names[i]}' is {x} but '{names[0]}' is {ins[0]}: element-wise layers "
                             f"need inputs of one shape", input=i)
    if "coeffs" in a:
        if a["coeffs"] is None:
            a["coeffs"] = [1.0] * len(ins)
        if len(a["coeffs"]) != len(ins):
            raise ShapeError(f"coeffs has {len(a['coeffs'])} value{'s' if len(a['coeffs']) != 1 else ''} "
                             f"for {len(ins)} inputs", "coeffs", hint="give one coefficient per input")
    return ins[0]


def _infer_concat(a: dict, ins: tuple[Shape, ...], names: tuple[str, ...]) -> Shape:
    for i, x in enumerate(ins[1:], 1):
        if (x.height, x.width) != (ins[0].height, ins[0].width):
            raise ShapeError(f"'{names[i]}' is {x.height}x{x.width} per channel but '{names[0]}' is "
                             f"{ins[0].height}x{ins[0].width}: concat joins the channels of images of one size",
                             input=i)
    return Shape(sum(x.channels for x in ins), ins[0].height, ins[0].width)


def _infer_softmax(a: dict, ins: tuple[Shape, ...], names: tuple[str, ...]) -> Shape:
    return Shape(ins[0].size)


def _infer_cost(a: dict, ins: tuple[Shape, ...], names: tuple[str, ...]) -> Shape:
    return Shape(1)


_INIT = (Param("init_w", "float", None, 0.0, "std. dev. of the normal initial weights"),
         Param("init_b", "float", None, None, "initial value of the biases"))
_FILTER = (
    Param("filters", "int", REQUIRED, 1),
    Param("size", "int", REQUIRED, 1, "filter rows and columns"),
    Param("stride", "int", 1, 1),
    Param("padding", "int", 0, 0, "zero padding on every side"),
)
_POOL = (
    Param("size", "int", REQUIRED, 1), Param("stride", "int", None, 1),
    Param("start", "int", 0, 0), Param("outputs", "int", 0, 0, "0: as many as fit"),
)
# response normalisation, with cuda-convnet2's defaults.  Windows are clipped to the channels
# or the image, so a size larger than those is allowed (cuda-convnet2's kernels refuse it)
_NORM = (
    Param("size", "int", REQUIRED, 1, "window size: channels (cmrnorm) or rows and columns"),
    Param("scale", "float", 0.0001, 0),
    Param("pow", "float", 0.75),
    Param("min_div", "float", 1.0, 0, open_min=True),
)
_KEEP = (Param("keep", "float", 0.5, 0, "the probability of keeping a value", max=1, open_min=True),)

KINDS: dict[str, LayerKind] = {
    k.name: k
    for k in [
        LayerKind("conv", 1, None, _FILTER + (
            Param("groups", "int", 1, 1, "filters and channels split into this many independent groups",
                  omit_default=True),
            Param("shared_biases", "bool", True, doc="one bias per filter (true) or per filter and position",
                  omit_default=True),
        ) + _INIT, _infer_conv, has_weights=True, takes_neuron=True,
            doc="2-D convolution; several inputs have a filter bank each and are summed",
            ops=("conv_fwd", "conv_bwd_data", "conv_bwd_filter", "replica_sum", "bias_grad", "bias_grad_unshared",
                 "neuron_bwd")),
        LayerKind("local", 1, 1, _FILTER + _INIT, _infer_local, has_weights=True, takes_neuron=True,
                  doc="locally connected: a convolution with different filters at every position",
                  ops=("local_fwd", "local_bwd_data", "local_bwd_filter", "bias_grad_unshared", "neuron_bwd")),
        LayerKind("maxpool", 1, 1, _POOL, _infer_pool, doc="max pooling",
                  ops=("pool_fwd", "pool_bwd")),
        LayerKind("avgpool", 1, 1, _POOL, _infer_pool, doc="average pooling over the window clipped to the image",
                  ops=("pool_fwd", "pool_bwd")),
        LayerKind("fc", 1, None, (Param("outputs", "int", REQUIRED, 1),) + _INIT, _infer_fc,
                  has_weights=True, takes_neuron=True,
                  doc="fully connected; several inputs have a weight matrix each and are summed",
                  ops=("fc_fwd", "fc_bwd_data", "fc_bwd_filter", "bias_grad", "neuron_bwd")),
        LayerKind("cmrnorm", 1, 1, _NORM + (
            Param("blocked", "bool", False, doc="windows are fixed blocks of `size` channels",
                  omit_default=True),), _same,
                  doc="cross-map response normalisation",
                  ops=("cmrnorm_fwd", "cmrnorm_bwd")),
        LayerKind("rnorm", 1, 1, _NORM, _same, doc="response normalisation over size x size pixels",
                  ops=("rnorm_fwd", "rnorm_bwd")),
        LayerKind("cnorm", 1, 1, _NORM, _same,
                  doc="contrast normalisation: rnorm of the difference from the local mean",
                  ops=("cnorm_meandiff", "cnorm_fwd", "cnorm_bwd_prep", "cnorm_bwd")),
        LayerKind("neuron", 1, 1, (), _same, neuron_layer=True,
                  doc="a neuron as a layer of its own: neuron(x) abs",
                  ops=("neuron_fwd", "neuron_bwd_input")),
        LayerKind("dropout", 1, 1, _KEEP, _same, random=True,
                  doc="inverted dropout: kept values are scaled by 1/keep in training",
                  ops=("dropout_fwd", "dropout_bwd")),
        LayerKind("dropout2", 1, 1, _KEEP, _same, random=True,
                  doc="dropout that scales by keep at test time instead",
                  ops=("dropout_fwd", "dropout_bwd")),
        LayerKind("eltsum", 2, None, (Param("coeffs", "floats", None, doc="one coefficient per input, "
                                            "all 1 by default"),), _infer_elementwise,
                  doc="element-wise weighted sum",
                  ops=("eltsum_fwd", "eltsum_bwd")),
        LayerKind("eltmax", 2, None, (), _infer_elementwise, doc="element-wise maximum",
                  ops=("eltmax_fwd", "eltmax_bwd")),
        LayerKind("concat", 2, None, (), _infer_concat, doc="concatenation along the channels",
                  ops=("concat_fwd", "concat_bwd")),
        LayerKind("pass", 1, 1, (), _same, doc="identity",
                  ops=("eltsum_fwd", "eltsum_bwd")),
        LayerKind("softmax", 1, 1, (), _infer_softmax, doc="softmax over all of the input's values",
                  ops=("softmax_fwd", "softmax_bwd")),
        LayerKind("logreg", 2, 2, (Param("coeff", "float", 1.0), Param("top_k", "int", 1, 1)),
                  _infer_cost, input_kinds="labels+probs", is_cost=True,
                  doc="multinomial logistic regression cost: inputs (labels, probs)",
                  ops=("logreg_fwd", "logreg_bwd", "softmax_logreg_bwd")),
        LayerKind("crossent", 2, 2, (Param("coeff", "float", 1.0),), _infer_cost, input_kinds="labels+probs",
                  is_cost=True, doc="cross-entropy cost of probabilities (a softmax) against one-hot labels",
                  ops=("onehot", "crossent_fwd", "crossent_bwd", "softmax_crossent_bwd")),
        LayerKind("sum2", 1, 1, (Param("coeff", "float", 1.0),), _infer_cost, is_cost=True,
                  doc="sum-of-squares cost: coeff times the sum of the input's squared values",
                  ops=("sum2_fwd", "sum2_bwd")),
    ]
}
