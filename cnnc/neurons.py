"""Neurons (activation functions) as data: one row per kind.

Each neuron is written once as a C expression (rendered into CUDA and OpenCL
kernels) and once as a numpy function (the reference backend).  Backward is
expressed through the neuron's *output* ``y``, so a fused ``conv ... relu``
keeps only its output and the backward pass needs no extra buffer.  Neurons
whose derivative cannot be recovered from the output (``abs``, ``square``)
are marked ``needs_input``; the compiler refuses to fuse them.  Every row
also carries its derivative in terms of the *input* x (``grad_x_c`` and
``grad_x_np``), which a standalone neuron layer (ops ``neuron_fwd`` and
``neuron_bwd_input``) uses, so any neuron can run unfused.

Parameters follow cuda-convnet2: ``tanh[a,b]`` is a*tanh(b*x),
``brelu[a]`` is min(max(x,0),a), ``linear[a,b]`` is a*x+b, ``log[a]`` is
log(a+x).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class NeuronKind:
    name: str
    params: tuple[str, ...]
    defaults: tuple[float, ...]
    forward_c: str          # in terms of x, a, b (floats)
    grad_c: str             # d y / d x in terms of y, a, b
    forward_np: Callable
    grad_np: Callable       # (y, a, b) -> dy/dx
    needs_input: bool = False
    grad_x_c: str = ""      # d y / d x in terms of x, a, b
    grad_x_np: Callable | None = None   # (x, a, b) -> dy/dx


def _np_tanh(x, a, b):
    return a * np.tanh(b * x)


NEURONS: dict[str, NeuronKind] = {
    n.name: n
    for n in [
        NeuronKind("ident", (), (), "x", "1.0f",
                   lambda x, a, b: x, lambda y, a, b: np.ones_like(y),
                   grad_x_c="1.0f", grad_x_np=lambda x, a, b: np.ones_like(x)),
        NeuronKind("relu", (), (), "fmax(x, 0.0f)", "(y > 0.0f ? 1.0f : 0.0f)",
                   lambda x, a, b: np.maximum(x, 0), lambda y, a, b: (y > 0).astype(y.dtype),
                   grad_x_c="(x > 0.0f ? 1.0f : 0.0f)",
                   grad_x_np=lambda x, a, b: (x > 0).astype(x.dtype)),
        NeuronKind("logistic", (), (), "1.0f / (1.0f + exp(-x))", "y * (1.0f - y)",
                   lambda x, a, b: 1 / (1 + np.exp(-x)), lambda y, a, b: y * (1 - y),
                   grad_x_c="1.0f / (1.0f + exp(-x)) * (1.0f - 1.0f / (1.0f + exp(-x)))",
                   grad_x_np=lambda x, a, b: 1 / (1 + np.exp(-x)) * (1 - 1 / (1 + np.exp(-x)))),
        NeuronKind("tanh", ("a", "b"), (1.0, 1.0), "a * tanh(b * x)", "b * (a - y * y / a)",
                   _np_tanh, lambda y, a, b: b * (a - y * y / a),
                   grad_x_c="a * b * (1.0f - tanh(b * x) * tanh(b * x))",
                   grad_x_np=lambda x, a, b: a * b * (1 - np.tanh(b * x) ** 2)),
        NeuronKind("brelu", ("a",), (1.0,), "fmin(fmax(x, 0.0f), a)",
                   "(y > 0.0f && y < a ? 1.0f : 0.0f)",
                   lambda x, a, b: np.minimum(np.maximum(x, 0), a),
                   lambda y, a, b: ((y > 0) & (y < a)).astype(y.dtype),
                   grad_x_c="(x > 0.0f && x < a ? 1.0f : 0.0f)",
                   grad_x_np=lambda x, a, b: ((x > 0) & (x < a)).astype(x.dtype)),
        NeuronKind("softrelu", (), (), "(x > 20.0f ? x : log(1.0f + exp(x)))", "(1.0f - exp(-y))",
                   lambda x, a, b: np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, 20)))),
                   lambda y, a, b: 1 - np.exp(-y),
                   grad_x_c="1.0f / (1.0f + exp(-x))",
                   grad_x_np=lambda x, a, b: 1 / (1 + np.exp(-x))),
        NeuronKind("linear", ("a", "b"), (1.0, 0.0), "a * x + b", "a",
                   lambda x, a, b: a * x + b, lambda y, a, b: np.full_like(y, a),
                   grad_x_c="a", grad_x_np=lambda x, a, b: np.full_like(x, a)),
        NeuronKind("sqrt", (), (), "sqrt(x)", "0.5f / y",
                   lambda x, a, b: np.sqrt(x), lambda y, a, b: 0.5 / y,
                   grad_x_c="0.5f / sqrt(x)", grad_x_np=lambda x, a, b: 0.5 / np.sqrt(x)),
        NeuronKind("log", ("a",), (1.0,), "log(a + x)", "exp(-y)",
                   lambda x, a, b: np.log(a + x), lambda y, a, b: np.exp(-y),
                   grad_x_c="1.0f / (a + x)", grad_x_np=lambda x, a, b: 1 / (a + x)),
        NeuronKind("abs", (), (), "fabs(x)", "", lambda x, a, b: np.abs(x), None, needs_input=True,
                   grad_x_c="(x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f))",
                   grad_x_np=lambda x, a, b: np.sign(x)),
        NeuronKind("square", (), (), "x * x", "", lambda x, a, b: x * x, None, needs_input=True,
                   grad_x_c="2.0f * x", grad_x_np=lambda x, a, b: 2 * x),
    ]
}


@dataclass(frozen=True)
class Neuron:
    """A neuron as applied to one layer: its kind and its two parameters."""

    name: str = "ident"
    a: float = 1.0
    b: float = 0.0

    @property
    def kind(self) -> NeuronKind:
        return NEURONS[self.name]

    @property
    def is_identity(self) -> bool:
        return self.name == "ident"

    def to_json(self) -> dict:
        return {"name": self.name, "a": self.a, "b": self.b}

    @staticmethod
    def from_json(d: dict | None) -> "Neuron":
        if not d:
            return Neuron()
        defaults = make_neuron(d["name"])
        return Neuron(d["name"], float(d.get("a", defaults.a)), float(d.get("b", defaults.b)))

    def __str__(self) -> str:
        k = self.kind
        if not k.params:
            return self.name
        vals = (self.a, self.b)[: len(k.params)]
        return f"{self.name}[{','.join(f'{v:g}' for v in vals)}]"

    def forward(self, x: np.ndarray) -> np.ndarray:
        return self.kind.forward_np(x, np.float32(self.a), np.float32(self.b)).astype(np.float32)

    def grad(self, y: np.ndarray) -> np.ndarray:
        return self.kind.grad_np(y, np.float32(self.a), np.float32(self.b)).astype(np.float32)


def make_neuron(name: str, values: tuple[float, ...] = ()) -> Neuron:
    """Build a neuron from its name and positional parameters, filling defaults."""
    kind = NEURONS[name]
    vals = list(kind.defaults)
    for i, v in enumerate(values):
        vals[i] = float(v)
    a = vals[0] if len(vals) > 0 else 1.0
    b = vals[1] if len(vals) > 1 else 0.0
    return Neuron(name, a, b)
