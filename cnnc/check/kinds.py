"""Layer kinds as data: arguments, input counts and shape rules.

Adding a layer kind means adding one row here (plus its kernels in the
planner and templates).  Output sizes follow cuda-convnet2's rounding:
conv uses 1 + ceil((2*padding + H - size) / stride) (the last window may
overhang the padded image; it reads zeros there) and pooling
1 + ceil((H - start - size) / stride) with windows clipped to the image.
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
    type: str                      # "int" | "float" | "bool"
    default: Any = REQUIRED
    min: float | None = None
    doc: str = ""


class ShapeError(Exception):
    """A shape rule that does not hold; the checker attaches the location."""

    def __init__(self, message: str, arg: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.arg = arg
        self.hint = hint


@dataclass(frozen=True)
class LayerKind:
    name: str
    min_inputs: int
    max_inputs: int
    params: tuple[Param, ...]
    infer: Callable[[dict, tuple[Shape, ...]], Shape]
    has_weights: bool = False
    takes_neuron: bool = False
    input_kinds: str = "image"      # "image": every input an activation; "labels+probs": cost
    is_cost: bool = False
    doc: str = ""

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


def conv_out(size: int, filt: int, stride: int, pad: int) -> int:
    return 1 + math.ceil((2 * pad + size - filt) / stride)


def pool_out(size: int, window: int, stride: int, start: int) -> int:
    return 1 + math.ceil((size - start - window) / stride)


def _infer_conv(a: dict, ins: tuple[Shape, ...]) -> Shape:
    x = ins[0]
    f, s, p = a["size"], a["stride"], a["padding"]
    if p >= f:
        raise ShapeError(f"padding {p} must be smaller than the filter size {f}", "padding")
    if f > x.height + 2 * p or f > x.width + 2 * p:
        raise ShapeError(f"a {f}x{f} filter does not fit the {x.height}x{x.width} input with padding {p}",
                         "size", hint="use a smaller size or more padding")
    return Shape(a["filters"], conv_out(x.height, f, s, p), conv_out(x.width, f, s, p))


def _infer_pool(a: dict, ins: tuple[Shape, ...]) -> Shape:
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


def _infer_fc(a: dict, ins: tuple[Shape, ...]) -> Shape:
    return Shape(a["outputs"])


def _infer_softmax(a: dict, ins: tuple[Shape, ...]) -> Shape:
    return Shape(ins[0].size)


def _infer_cost(a: dict, ins: tuple[Shape, ...]) -> Shape:
    return Shape(1)


_INIT = (Param("init_w", "float", None, 0.0, "std. dev. of the normal initial weights"),
         Param("init_b", "float", None, None, "initial value of the biases"))

KINDS: dict[str, LayerKind] = {
    k.name: k
    for k in [
        LayerKind("conv", 1, 1, (
            Param("filters", "int", REQUIRED, 1),
            Param("size", "int", REQUIRED, 1, "filter rows and columns"),
            Param("stride", "int", 1, 1),
            Param("padding", "int", 0, 0, "zero padding on every side"),
        ) + _INIT, _infer_conv, has_weights=True, takes_neuron=True,
            doc="2-D convolution with shared biases"),
        LayerKind("maxpool", 1, 1, (
            Param("size", "int", REQUIRED, 1), Param("stride", "int", None, 1),
            Param("start", "int", 0, 0), Param("outputs", "int", 0, 0, "0: as many as fit"),
        ), _infer_pool, doc="max pooling"),
        LayerKind("avgpool", 1, 1, (
            Param("size", "int", REQUIRED, 1), Param("stride", "int", None, 1),
            Param("start", "int", 0, 0), Param("outputs", "int", 0, 0, "0: as many as fit"),
        ), _infer_pool, doc="average pooling over the window clipped to the image"),
        LayerKind("fc", 1, 1, (Param("outputs", "int", REQUIRED, 1),) + _INIT, _infer_fc,
                  has_weights=True, takes_neuron=True, doc="fully connected"),
        LayerKind("softmax", 1, 1, (), _infer_softmax, doc="softmax over all of the input's values"),
        LayerKind("logreg", 2, 2, (Param("coeff", "float", 1.0), Param("top_k", "int", 1, 1)),
                  _infer_cost, input_kinds="labels+probs", is_cost=True,
                  doc="multinomial logistic regression cost: inputs (labels, probs)"),
    ]
}
