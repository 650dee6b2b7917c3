"""The syntax tree of a .cnn file: frozen dataclasses, each with its source span.

This is what the parser produces and the checker consumes; nothing here knows
about layer kinds or shapes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from cnnc.diagnostics import Span

FLOAT32_MAX = 3.4028234663852886e38
"""The largest finite 32-bit float: numbers of the language end up as 32-bit floats (kernel
constants, learning rates, initial weights), so none may be larger in magnitude."""


@dataclass(frozen=True)
class Number:
    value: float
    is_int: bool
    span: Span


@dataclass(frozen=True)
class NameRef:
    name: str
    span: Span


@dataclass(frozen=True)
class String:
    value: str
    span: Span


@dataclass(frozen=True)
class ListValue:
    items: tuple["Value", ...]
    span: Span


@dataclass(frozen=True)
class Call:
    """A function-like value, e.g. the schedule `dexp(base=0.02, tgt_factor=250, steps=4)`."""

    func: str
    args: tuple["Arg", ...]
    span: Span


Value = Union[Number, NameRef, String, ListValue, Call]


@dataclass(frozen=True)
class Arg:
    """A positional (`name` is None) or keyword argument."""

    name: str | None
    value: Value
    span: Span


@dataclass(frozen=True)
class Setting:
    name: str
    value: Value
    span: Span


@dataclass(frozen=True)
class NeuronSpec:
    name: str
    params: tuple[float, ...]
    span: Span


@dataclass(frozen=True)
class Placement:
    target: str                 # "gpu"
    devices: tuple["Number", ...]
    span: Span


@dataclass(frozen=True)
class ImageInput:
    name: str
    dims: tuple[int, ...]
    span: Span


@dataclass(frozen=True)
class LabelInput:
    name: str
    classes: "Number"
    span: Span


@dataclass(frozen=True)
class TrainBlock:
    settings: tuple[Setting, ...]
    span: Span


@dataclass(frozen=True)
class LayerDecl:
    name: str
    kind: str
    args: tuple[Arg, ...]
    neuron: NeuronSpec | None
    settings: tuple[Setting, ...]
    placement: Placement | None
    span: Span          # the whole statement
    name_span: Span
    kind_span: Span


Statement = Union[ImageInput, LabelInput, TrainBlock, LayerDecl]


@dataclass(frozen=True)
class Program:
    name: str
    statements: tuple[Statement, ...]
    file: str
    source: str
    span: Span
