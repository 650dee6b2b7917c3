"""The checked network: the IR every later stage (plan, codegen, run) reads.

Frozen dataclasses only; built by :mod:`cnnc.check` from the syntax tree, with
every name resolved, every shape inferred and every default filled in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from cnnc import precision as precisions
from cnnc.diagnostics import Span
from cnnc.neurons import Neuron


MAX_ELEMENTS = 2**31 - 1
"""Kernels take the language's integers (a size, a count) as 32-bit ints and index within
one case in 32 bits, so no integer may exceed this, nor may one case of an activation hold
more elements."""

MAX_BUFFER_ELEMENTS = 2**61 - 1
"""The most elements a buffer may hold: kernels whose buffers exceed 2^31-1 elements index
in 64 bits (cnnc.codegen.render.index_type), and a buffer's bytes, 4 per element, must stay
within a signed 64-bit offset.  Whether it fits a device is checked when a run starts."""

MAX_DEVICE = 255
"""The largest logical device id a placement may name."""


@dataclass(frozen=True)
class Shape:
    """Per-case shape of an activation: channels x height x width."""

    channels: int
    height: int = 1
    width: int = 1

    @property
    def size(self) -> int:
        return self.channels * self.height * self.width

    def __str__(self) -> str:
        return f"{self.channels}x{self.height}x{self.width}"


@dataclass(frozen=True)
class Schedule:
    """A learning-rate schedule, as cuda-convnet2 defines them.

    progress p in [0, 1] is batches done / total batches.
    const: base.  linear: base + p*(tgt - base) with tgt = base / tgt_factor.
    exp: base * tgt_factor^(-p).  dexp: piecewise constant, `steps` values
    base * tgt_factor^(-i/(steps-1)), step i covering p in [i/steps, (i+1)/steps).
    """

    kind: str = "const"
    base: float = 0.01
    tgt_factor: float = 1.0
    steps: int = 1

    def at(self, progress: float) -> float:
        p = min(max(progress, 0.0), 1.0)
        if self.kind == "const":
            return self.base
        if self.kind == "linear":
            tgt = self.base / self.tgt_factor
            return self.base + p * (tgt - self.base)
        if self.kind == "exp":
            return self.base * self.tgt_factor ** (-p)
        if self.kind == "dexp":
            if self.steps <= 1:
                return self.base
            i = min(int(math.floor(p * self.steps)), self.steps - 1)
            return self.base * self.tgt_factor ** (-i / (self.steps - 1))
        raise ValueError(self.kind)

    def __str__(self) -> str:
        if self.kind == "const":
            return f"{self.base:g}"
        extra = f", steps={self.steps}" if self.kind == "dexp" else ""
        return f"{self.kind}(base={self.base:g}, tgt_factor={self.tgt_factor:g}{extra})"

    def to_json(self) -> dict:
        return {"kind": self.kind, "base": self.base, "tgt_factor": self.tgt_factor, "steps": self.steps}

    @staticmethod
    def from_json(d: dict) -> "Schedule":
        return Schedule(d["kind"], float(d["base"]), float(d["tgt_factor"]), int(d["steps"]))


@dataclass(frozen=True)
class LayerTrain:
    """Training parameters of one weight layer (train {} defaults, overridden per layer)."""

    lr: Schedule
    lr_bias: Schedule
    momentum: float
    momentum_bias: float
    weight_decay: float
    init_w: float
    init_b: float
    update_period: int = 0
    wball: float = 0.0          # after each update, scale down any unit's incoming weights longer than this
    precision: str = precisions.DEFAULT     # what its GEMM operands are rounded to (cnnc/precision.py)


@dataclass(frozen=True)
class Input:
    name: str
    kind: str                  # "image" | "labels"
    shape: Shape               # labels: Shape(1)
    classes: int = 0
    span: Span | None = None


@dataclass(frozen=True)
class Layer:
    name: str
    kind: str                          # key of cnnc.check.kinds.KINDS
    inputs: tuple[str, ...]
    args: dict[str, Any] = field(hash=False, compare=True)
    neuron: Neuron
    gpus: tuple[int, ...]
    shape: Shape
    in_shapes: tuple[Shape, ...]
    train: LayerTrain | None = None
    span: Span | None = None
    source_line: str = ""


@dataclass(frozen=True)
class Network:
    name: str
    file: str
    source: str
    inputs: tuple[Input, ...]
    layers: tuple[Layer, ...]          # topological order, source order where free
    batch: int
    epochs: int
    seed: int
    settings: dict[str, Any] = field(hash=False, default_factory=dict)

    @cached_property
    def _nodes(self) -> dict[str, Input | Layer]:
        """Name -> node, built once: lookups in a network of thousands of layers stay cheap."""
        return {n.name: n for n in reversed(self.inputs + self.layers)}

    @cached_property
    def _consumers(self) -> dict[str, tuple[Layer, ...]]:
        out: dict[str, list[Layer]] = {}
        for l in self.layers:
            for name in dict.fromkeys(l.inputs):
                out.setdefault(name, []).append(l)
        return {name: tuple(ls) for name, ls in out.items()}

    def node(self, name: str) -> Input | Layer:
        return self._nodes[name]

    def shape_of(self, name: str) -> Shape:
        return self.node(name).shape

    def consumers(self, name: str) -> tuple[Layer, ...]:
        return self._consumers.get(name, ())
