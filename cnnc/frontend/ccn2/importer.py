"""The state of one import: the two files, the layers read so far, and typed, located access to keys."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from cnnc.diagnostics import CompileError, Diagnostic, Span
from cnnc.frontend.ccn2.formatting import fmt_number
from cnnc.frontend.ccn2.ini import CfgFile, Entry, Section
from cnnc.frontend.ccn2.vocabulary import camel


@dataclass
class CfgLayer:
    """One section of the layer-definition file, filled in pass by pass."""

    name: str
    type: str
    sec: Section
    inputs: list[str] = field(default_factory=list)
    gpus: tuple[int, ...] | None = None
    gpu_entry: Entry | None = None
    replicas: int = 0
    shape: tuple[int, int, int] | None = None
    role: str = ""                          # data layers: "image" | "labels"
    dsl: str = ""                           # name in the .cnn
    kind: str = ""
    args: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)     # arguments written after the parameter-file ones
    neuron: str | None = None               # written after the call
    detached: str | None = None             # "NAME_neuron" layer carrying a neuron
    detached_neuron: str | None = None
    train: dict[str, Any] | None = None
    period_own: int = 0
    passes: int = 1
    comment: str = ""

    @property
    def is_data(self) -> bool:
        return self.type == "data"

    @property
    def size(self) -> int:
        c, h, w = self.shape
        return c * h * w


class Importer:
    """One import in progress: the files, the layers read so far, the warnings, and typed
    access to keys that reports every problem at its line (with [DEFAULT] as fallback)."""

    def __init__(self, layers: CfgFile, params: CfgFile, shapes: dict[str, tuple[int, int, int]],
                 mini: int, classes: int | None, name: str | None, command: str):
        self.lf, self.pf = layers, params
        self.shapes = dict(shapes)
        self.mini = mini
        self.classes = classes
        self.net_name = name
        self.command = command
        self.warnings: list[Diagnostic] = []
        self.layers: dict[str, CfgLayer] = {}

    # -- diagnostics -------------------------------------------------------
    def _source(self, file: str) -> str | None:
        return {self.lf.file: self.lf.text, self.pf.file: self.pf.text}.get(file)

    def fail(self, message: str, at: Entry | Section | None = None, hint: str | None = None,
             span: Span | None = None) -> None:
        file = at.file if at is not None else self.lf.file
        if span is None and at is not None:
            span = at.span
        raise CompileError(Diagnostic(message, file, span, hint), self._source(file))

    def fail_cli(self, option: str, message: str, hint: str | None = None) -> None:
        """An error in a command-line value: reported against the option, as --arch errors are."""
        raise CompileError(Diagnostic(message, option, None, hint))

    def warn(self, message: str, at: Entry | Section, hint: str | None = None, span: Span | None = None) -> None:
        self.warnings.append(Diagnostic(message, at.file, span or at.span, hint, "warning"))

    # -- typed access to a section, with [DEFAULT] as fallback --------------
    def entry(self, sec: Section, key: str, cfg: CfgFile | None = None) -> Entry | None:
        cfg = cfg or (self.lf if sec.file == self.lf.file else self.pf)
        return sec.entries.get(key) or cfg.defaults.get(key)

    def raw(self, sec: Section | None, key: str, what: str, required: bool = True) -> Entry | None:
        e = self.entry(sec, key) if sec is not None else None
        if e is None and required:
            self.fail(f"{what} is missing the required key '{camel(key)}'", sec)
        return e

    def _convert(self, e: Entry, text: str, conv: Callable, typestr: str, minimum=None, maximum=None):
        try:
            v = conv(text)
        except ValueError:
            self.fail(f"'{e.name}' must be {typestr}, not {text!r}", e)
        if isinstance(v, float) and not math.isfinite(v):
            self.fail(f"'{e.name}' must be a finite number, not {text!r}", e)
        if minimum is not None and v < minimum:
            self.fail(f"'{e.name}' must be at least {fmt_number(minimum)}, not {text}", e)
        if maximum is not None and v > maximum:
            self.fail(f"'{e.name}' must be at most {fmt_number(maximum)}, not {text}", e)
        return v

    def get_int(self, sec, key, what, default=None, minimum=None, maximum=None) -> int:
        e = self.raw(sec, key, what, default is None)
        if e is None:
            return default
        return self._convert(e, e.value.strip(), int, "an integer", minimum, maximum)

    def get_float(self, sec, key, what, default=None, minimum=None) -> float:
        e = self.raw(sec, key, what, default is None)
        if e is None:
            return default
        return self._convert(e, e.value.strip(), float, "a number", minimum)

    def get_bool(self, sec, key, what, default=None) -> bool:
        e = self.raw(sec, key, what, default is None)
        if e is None:
            return default
        v = e.value.strip().lower()
        if v in ("1", "yes", "true", "on"):
            return True
        if v in ("0", "no", "false", "off"):
            return False
        self.fail(f"'{e.name}' must be true or false (also 1/0, yes/no, on/off), not {e.value!r}", e)

    def get_str(self, sec, key, what, default=None) -> str:
        e = self.raw(sec, key, what, default is None)
        return default if e is None else e.value.strip()

    def get_list(self, sec, key, what, n: int, conv=int, typestr="integers", default=None,
                 minimum=None) -> list:
        """A per-input list: one value (used for every input) or exactly one per input."""
        e = self.raw(sec, key, what, default is None)
        if e is None:
            return [default] * n
        items = [x.strip() for x in e.value.split(",")]
        if len(items) != n and len(items) != 1:
            self.fail(f"'{e.name}' lists {len(items)} values but {what} has {n} input{'s' if n > 1 else ''}",
                      e, "give one value for every input, or one value for all of them")
        vals = [self._convert(e, x, conv, f"a comma-separated list of {typestr}", minimum) for x in items]
        return vals * n if len(vals) == 1 else vals

    def single(self, vals: list, sec: Section, key: str, what: str, why: str):
        """cnnc gives some per-input settings one value per layer: the list must repeat one value."""
        if len(set(vals)) > 1:
            e = self.entry(sec, key)
            self.fail(f"'{e.name}' differs between the inputs of {what} ({e.value}); {why}", e,
                      f"use one value, e.g. {e.name}={e.value.split(',')[0].strip()}")
        return vals[0]
