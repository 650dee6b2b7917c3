"""Import cuda-convnet2 configurations: a layer-definition file plus a
layer-parameter file → the text of an equivalent .cnn network.

cuda-convnet2 describes a network in two INI files: ``layers-*.cfg`` (one
section per layer: type, inputs, shapes, placement) and ``layer-params-*.cfg``
(learning rates and other settings that may change during training).  This
module reads both with its own line-tracking INI reader (so every diagnostic
names ``file:line``), applies cuda-convnet2's semantics — the ones of its
``layer.py`` and its C++ runtime — and writes readable DSL:

* sections become layers in file order; ``gpu=`` lists are inherited from a
  layer's first input; ``@gpu(...)`` is written only where the .cnn rule
  (inherit from the first input that is a layer) would place it differently;
* per-input lists (``filters=192,192``, ``epsW=a,b``...) expand a single value
  to every input, as cuda-convnet2's ``verify_num_params`` does;
* ``neuron=`` on a conv, local or fc layer is fused into it; on any other layer
  it becomes a separate ``NAME_neuron = neuron(NAME)`` layer, exactly the
  layer cuda-convnet2 itself inserts (``detach_neuron_layers``);
* ``updatePeriod`` counts passes of the whole net in cuda-convnet2 (a layer
  with R replicas is active every R/min(R) passes, its period is raised to at
  least that, and 0 means "as often as possible"); cnnc's ``update_period``
  counts the layer's own passes, so the value is converted;
* the data provider's facts (image shapes, number of classes, minibatch) are
  not in the files: image shapes and the minibatch come from the caller, the
  number of classes is the size of the softmax feeding the cost layer.

Keys cuda-convnet2 ignores, or that only tune its kernels (``sumWidth``),
become warnings; unknown types, missing required keys and violated
constraints become located errors.  Constraints that only cuda-convnet2's
kernels impose (filters a multiple of 16, ...) are warnings: cnnc runs those
networks, cuda-convnet2 would not.
"""
from __future__ import annotations

import difflib
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from cnnc.diagnostics import CompileError, Diagnostic, Span, did_you_mean, source_lines
from cnnc.frontend.parser import read_source
from cnnc.ir import Schedule

DEFAULT_MINI = 128

# -------------------------------------------------------------------- INI files


@dataclass(frozen=True)
class Entry:
    """One ``key=value`` line.  Keys are case-insensitive, as in Python's ConfigParser."""

    key: str            # lower-cased
    name: str           # as written
    value: str
    line: int
    column: int         # where the value starts (1-based)
    key_column: int
    file: str

    @property
    def span(self) -> Span:
        first = self.value.split("\n", 1)[0]
        return Span(self.line, self.column, self.line, self.column + max(1, len(first)))

    @property
    def key_span(self) -> Span:
        return Span(self.line, self.key_column, self.line, self.key_column + len(self.name))


@dataclass
class Section:
    name: str
    line: int
    file: str
    entries: dict[str, Entry] = field(default_factory=dict)
    header_width: int = 1

    @property
    def span(self) -> Span:
        return Span(self.line, 1, self.line, 1 + self.header_width)


@dataclass
class CfgFile:
    file: str
    text: str
    sections: dict[str, Section]
    defaults: dict[str, Entry]


_SECTION_RE = re.compile(r"\[(?P<name>[^]]+)\]")
_OPTION_RE = re.compile(r"(?P<key>[^:=\s][^:=]*?)\s*(?P<sep>[:=])\s*(?P<value>.*)$")


def read_cfg(text: str, file: str, warn: Callable[[Diagnostic], None] | None = None) -> CfgFile:
    """Read an INI file the way cuda-convnet2's ConfigParser does, keeping line numbers.

    Comments are lines starting with '#' or ';' (and ' ;' starts a trailing
    comment); lines starting with blanks continue the previous value; option
    names are case-insensitive; ``[DEFAULT]`` supplies values to every
    section.  A repeated section is merged into the first and a repeated key
    replaces the earlier value, as ConfigParser does, with a warning.
    """
    warn = warn or (lambda d: None)
    sections: dict[str, Section] = {}
    defaults: dict[str, Entry] = {}
    current: Section | None = None
    target: dict[str, Entry] | None = None
    last: Entry | None = None
    for number, raw in enumerate(source_lines(text), 1):
        line = raw.rstrip("\r")
        if line.strip() == "" or line[0] in "#;":
            continue
        if line.split(None, 1)[0].lower() == "rem" and line[0] in "rR":
            continue
        if line[0].isspace() and last is not None:
            extra = line.strip()
            if extra:
                last = Entry(last.key, last.name, last.value + "\n" + extra, last.line, last.column,
                             last.key_column, file)
                target[last.key] = last
            continue
        m = _SECTION_RE.match(line)
        if m:
            name = m.group("name")
            last = None
            if name == "DEFAULT":
                current, target = None, defaults
                continue
            if name in sections:
                first = sections[name]
                warn(Diagnostic(f"section [{name}] appears again; its keys are merged into the first one, "
                                f"as cuda-convnet2 does", file, Span(number, 1, number, m.end() + 1),
                                f"the first [{name}] is on line {first.line}", "warning"))
                current = first
            else:
                current = sections[name] = Section(name, number, file, header_width=m.end())
            target = current.entries
            continue
        m = _OPTION_RE.match(line)
        if not m:
            raise CompileError(Diagnostic("expected '[section]' or 'key=value'", file,
                                          Span(number, 1, number, len(line) + 1)), text)
        if target is None:
            raise CompileError(Diagnostic("'key=value' before the first [section]", file,
                                          Span(number, 1, number, len(line) + 1),
                                          "every layer starts with its name in brackets, e.g. [conv1]"), text)
        value = m.group("value")
        if m.group("sep") in "=:" and ";" in value:
            pos = value.find(";")
            if pos > 0 and value[pos - 1].isspace():
                value = value[:pos]
        value = value.strip()
        if value == '""':
            value = ""
        key_name = m.group("key").rstrip()
        key = key_name.lower()
        column = m.start("value") + 1
        if key in target:
            prev = target[key]
            where = f"[{current.name}]" if current is not None else "[DEFAULT]"
            warn(Diagnostic(f"'{key_name}' is given twice in {where}; the later value is used, as cuda-convnet2 "
                            f"does", file, Span(number, 1, number, 1 + len(key_name)),
                            f"the earlier one is on line {prev.line}", "warning"))
        last = Entry(key, key_name, value, number, column, m.start("key") + 1, file)
        target[key] = last
    return CfgFile(file, text, sections, defaults)


# -------------------------------------------------------------------- cuda-convnet2's vocabulary

# Every layer type cuda-convnet2's layer.py registers, and what cnnc makes of it.
SUPPORTED = {
    "data": None, "conv": "conv", "local": "local", "fc": "fc", "pool": None, "cmrnorm": "cmrnorm",
    "rnorm": "rnorm", "cnorm": "cnorm", "neuron": "neuron", "softmax": "softmax", "dropout": "dropout",
    "dropout2": "dropout2", "eltsum": "eltsum", "eltmax": "eltmax", "concat": "concat", "pass": "pass",
    "cost.logreg": "logreg", "cost.ce": "crossent", "cost.sum2": "sum2",
}
UNSUPPORTED = {
    "sfc": "split fully-connected", "sum": "sum", "cmpool": "cross-map pooling", "nailbed": "bed-of-nails",
    "blur": "Gaussian blur", "href": "horizontal reflection", "resize": "resize", "rgb2yuv": "RGB to YUV",
    "rgb2lab": "RGB to L*a*b*", "rscale": "random scale", "crop": "crop",
    "cost.bce": "binomial cross-entropy cost", "cost.dce": "detection cross-entropy cost",
}
WEIGHTED = ("conv", "local", "fc")
NORMS = ("cmrnorm", "rnorm", "cnorm")
COSTS = ("cost.logreg", "cost.ce", "cost.sum2")
LABEL_COSTS = ("cost.logreg", "cost.ce")
FUSED_NEURON_KINDS = ("conv", "local", "fc")       # kinds that take a neuron suffix in the .cnn

# cuda-convnet2's neuron types: name -> number of parameters; None: cnnc has no such neuron
NEURON_PARAMS = {"ident": 0, "logistic": 0, "abs": 0, "relu": 0, "softrelu": 0, "square": 0, "sqrt": 0,
                 "log": 1, "tanh": 2, "brelu": 1, "linear": 2, "nrelu": None, "drelu": None}
UNFUSABLE_NEURONS = ("abs", "square")              # their gradient needs the input: never fused

_WITH_INPUT = {"type", "inputs", "gpu", "neuron"}
_WEIGHT_INIT = {"initw", "initb", "initwfunc", "initbfunc", "weightsource"}
_LOCAL = _WITH_INPUT | _WEIGHT_INIT | {"channels", "filters", "padding", "stride", "filtersize", "groups",
                                      "initcfunc", "modulesx"}
LAYER_KEYS: dict[str, set[str]] = {
    "data": {"type", "dataidx", "start", "end"},
    "conv": _LOCAL | {"sumwidth", "sharedbiases"},
    "local": set(_LOCAL),
    "fc": _WITH_INPUT | _WEIGHT_INIT | {"outputs"},
    "pool": _WITH_INPUT | {"channels", "sizex", "start", "stride", "outputsx", "pool"},
    **{t: _WITH_INPUT | {"channels", "size", "blocked"} for t in NORMS},
    **{t: set(_WITH_INPUT) for t in ("neuron", "softmax", "dropout", "dropout2", "eltsum", "eltmax",
                                     "concat", "pass")},
    **{t: {"type", "inputs", "gpu", "children"} for t in COSTS},
}
_WEIGHT_PARAMS = {"epsw", "epsb", "momw", "momb", "wc", "wball", "updateperiod", "supereps", "supermom"}
PARAM_KEYS: dict[str, set[str]] = {
    "conv": _WEIGHT_PARAMS | {"wcnormmax", "wcnormmin"},
    "local": set(_WEIGHT_PARAMS), "fc": set(_WEIGHT_PARAMS),
    "dropout": {"enable", "keep"}, "dropout2": {"enable", "keep"},
    **{t: {"scale", "pow", "mindiv"} for t in NORMS},
    "eltsum": {"coeffs"},
    "cost.logreg": {"coeff", "topk"}, "cost.ce": {"coeff"}, "cost.sum2": {"coeff"},
}
# layers cuda-convnet2 refuses to build without a section in the parameter file
REQUIRES_PARAMS = set(WEIGHTED) | set(NORMS) | {"dropout", "dropout2", "eltsum"} | set(COSTS)
_ALL_LAYER_KEYS = set().union(*LAYER_KEYS.values())
_ALL_PARAM_KEYS = set().union(*PARAM_KEYS.values())
_TUNING_KEYS = {
    "sumwidth": "only tunes cuda-convnet2's weight-gradient kernel; cnnc ignores it",
    "partialsum": "is a cuda-convnet (version 1) kernel setting that cuda-convnet2 and cnnc ignore",
}

_RESERVED = {"network", "input", "label", "train"}     # keywords of the .cnn language
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# learning-rate schedules: name -> (key, type) in the order cuda-convnet2 writes them
_SCHEDULES = {
    "const": (("base", float),),
    "linear": (("base", float), ("tgtfactor", float)),
    "exp": (("base", float), ("tgtfactor", float)),
    "dexp": (("base", float), ("tgtfactor", float), ("numsteps", int)),
}
_SCHEDULE_RE = re.compile(r"^\s*(\w+)\s*(?:\[(.*)\])?\s*$", re.S)


def fmt_number(v: float | int) -> str:
    """A number as the .cnn file shows it: integers without a point, floats in their shortest form."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if not math.isfinite(v):            # only in messages: the .cnn language has no such numbers
        return repr(float(v))
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    text = repr(float(v))
    if "e" in text:
        mant, exp = text.split("e")
        if "." in mant:
            mant = mant.rstrip("0").rstrip(".")
        text = f"{mant}e{int(exp)}"
    return text


def fmt_schedule(s: Schedule) -> str:
    if s.kind == "const":
        return fmt_number(s.base)
    args = f"base={fmt_number(s.base)}, tgt_factor={fmt_number(s.tgt_factor)}"
    if s.kind == "dexp":
        args += f", steps={s.steps}"
    return f"{s.kind}({args})"


# -------------------------------------------------------------------- the result


@dataclass
class ImportedLayer:
    """One layer of the emitted network, with what cuda-convnet2 would run."""

    name: str                   # in the .cnn
    source: str                 # the cfg section it comes from
    kind: str
    gpus: tuple[int, ...]
    passes: int                 # passes per minibatch (max replicas / own replicas)
    update_period: int          # own passes accumulated per update; 0 for layers without weights
    line: int                   # line in the .cnn text
    shape: tuple[int, int, int]  # per case, channels x height x width, as cuda-convnet2 computes it


@dataclass
class Imported:
    name: str
    text: str
    layers_file: str
    params_file: str
    sources: dict[str, str]                   # file -> its text, for formatting diagnostics
    warnings: list[Diagnostic]
    layers: list[ImportedLayer]
    inputs: dict[str, str]                    # input name -> its declaration in the .cnn
    origins: dict[int, tuple[str, int]]       # .cnn line -> (cfg file, line)
    replica_levels: tuple[int, ...]           # the distinct replica counts, largest first

    def format_warnings(self) -> str:
        return "\n".join(d.format(self.sources.get(d.file)) for d in self.warnings)

    def relocate(self, err: CompileError) -> CompileError:
        """Point the diagnostics of a failed compile of ``text`` at the cfg lines they come from."""
        dsl_lines = source_lines(self.text)
        out = []
        for d in err.diagnostics:
            if d.span is None or d.span.line not in self.origins:
                out.append(d)
                continue
            file, line = self.origins[d.span.line]
            src_lines = source_lines(self.sources[file])
            width = len(src_lines[line - 1]) if 0 < line <= len(src_lines) else 1
            shown = dsl_lines[d.span.line - 1].strip() if d.span.line <= len(dsl_lines) else ""
            hint = f"imported as: {shown}"
            if d.hint:
                hint = f"{d.hint}\n  {hint}"
            out.append(Diagnostic(d.message, file, Span(line, 1, line, 1 + max(1, width)), hint, d.severity))
        files = {d.file for d in out}
        source = self.sources[self.layers_file] if files == {self.layers_file} else \
            (self.sources.get(next(iter(files))) if len(files) == 1 else None)
        return CompileError(out, source)


# -------------------------------------------------------------------- the importer


@dataclass
class _Layer:
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


class _Importer:
    def __init__(self, layers: CfgFile, params: CfgFile, shapes: dict[str, tuple[int, int, int]],
                 mini: int, classes: int | None, name: str | None, command: str):
        self.lf, self.pf = layers, params
        self.shapes = dict(shapes)
        self.mini = mini
        self.classes = classes
        self.net_name = name
        self.command = command
        self.warnings: list[Diagnostic] = []
        self.layers: dict[str, _Layer] = {}

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

    # -- the whole import ---------------------------------------------------
    def run(self) -> Imported:
        # the order of cuda-convnet2's checks: each layer as it is parsed, then the
        # relations between layers, then the parameter file
        for sec in self.lf.sections.values():
            self.structure(sec)
        self.check_placement()
        self.assign_roles()
        for l in self.layers.values():
            self.check_keys(l)
            if not l.is_data:
                self.layer_shape(l)
        self.check_usage()
        self.label_classes()
        for l in self.layers.values():
            self.layer_params(l)
        self.check_params_file()
        levels = self.replication()
        self.name_layers()
        return self.emit(levels)

    # -- pass 1: types, inputs, placement ---------------------------------------
    def structure(self, sec: Section) -> None:
        name = sec.name
        if self.entry(sec, "type") is None:
            swapped = not any("type" in x.entries for x in self.lf.sections.values()) and \
                any(k in _ALL_PARAM_KEYS for k in sec.entries)
            self.fail(f"layer '{name}' has no type", sec,
                      f"{self.lf.file} looks like a layer-parameter file: give the layer-definition file first"
                      if swapped else "add e.g. type=conv")
        te = self.entry(sec, "type")
        typ = te.value.strip()
        if typ in UNSUPPORTED:
            self.fail(f"cnnc does not support cuda-convnet2's {UNSUPPORTED[typ]} layers (type={typ})", te)
        if typ not in SUPPORTED:
            known = list(SUPPORTED) + list(UNSUPPORTED)
            self.fail(f"unknown layer type '{typ}'", te,
                      did_you_mean(typ, known) or f"cuda-convnet2's types: {', '.join(sorted(SUPPORTED))}")
        l = _Layer(name, typ, sec)
        what = f"layer '{name}' (type={typ})"
        if typ == "data":
            self.get_int(sec, "dataidx", what, minimum=0)
            self.layers[name] = l
            return
        ie = self.raw(sec, "inputs", what)
        l.inputs = [x.strip() for x in ie.value.split(",")]
        defined = list(self.layers)
        for inp in l.inputs:
            if inp not in self.layers:
                later = self.lf.sections.get(inp)
                if later is not None:
                    hint = f"'{inp}' is defined on line {later.line}: cuda-convnet2 needs a layer's inputs " \
                           f"defined above it"
                elif inp == "":
                    hint = "remove the empty entry from the list"
                else:
                    hint = did_you_mean(inp, defined)
                self.fail(f"{what}: input layer '{inp}' is not defined", ie, hint)
        n_in = len(l.inputs)
        want = {"softmax": 1, "neuron": 1, "pool": 1, "dropout": 1, "dropout2": 1, "cost.sum2": 1,
                "cost.logreg": 2, "cost.ce": 2, **{t: 1 for t in NORMS}}.get(typ)
        if want is not None and n_in != want:
            self.fail(f"{what} takes {want} input{'s' if want > 1 else ''}, got {n_in}", ie)
        if typ == "eltmax" and n_in < 2:
            self.fail(f"{what} needs at least 2 inputs, got {n_in}", ie)
        if typ == "local" and n_in > 1:
            self.fail(f"{what} has {n_in} inputs; cnnc's local layers take one", ie,
                      "a conv layer may sum several inputs; a local layer cannot in cnnc")
        first = self.layers[l.inputs[0]]
        ge = self.entry(sec, "gpu")
        if ge is not None:
            items = [x.strip() for x in ge.value.split(",")]
            gpus = tuple(self._convert(ge, x, int, "a comma-separated list of device ids", 0) for x in items)
            if len(set(gpus)) != len(gpus):
                self.fail(f"{what}: all replicas must run on different GPUs ({ge.value})", ge)
            l.gpus, l.gpu_entry = gpus, ge
        elif first.gpus is not None:
            l.gpus, l.gpu_entry = first.gpus, first.gpu_entry
        else:
            l.gpus = None        # decided once the whole graph is known
        self.layers[name] = l

    def check_placement(self) -> None:
        """Placement defaults and the replica rules between a layer and its inputs."""
        for l in self.layers.values():
            if l.is_data:
                continue
            what = f"layer '{l.name}' (type={l.type})"
            if l.gpus is None and not self.layers[l.inputs[0]].is_data:
                l.gpus, l.gpu_entry = self.layers[l.inputs[0]].gpus, self.layers[l.inputs[0]].gpu_entry
            if l.gpus is None:
                # cuda-convnet2 inherits the placement of the first input, and a data layer has
                # none, so it never instantiates such a layer; cnnc's rule applies instead.
                layer_in = next((self.layers[i] for i in l.inputs if not self.layers[i].is_data), None)
                l.gpus = layer_in.gpus if layer_in is not None else (0,)
                self.warn(f"{what} has no gpu= and its first input '{l.inputs[0]}' is a data layer, so "
                          f"cuda-convnet2 would not place it; using gpu={','.join(map(str, l.gpus))}",
                          l.sec, f"add gpu={','.join(map(str, l.gpus))} to [{l.name}]")
            l.replicas = len(l.gpus)
            ins = [self.layers[i] for i in l.inputs]
            for inp in ins:
                if inp.is_data:
                    inp.replicas = l.replicas
                if inp.replicas % l.replicas:
                    self.fail(f"{what} has {l.replicas} replicas, which does not divide the {inp.replicas} "
                              f"replicas of its input '{inp.name}'", l.gpu_entry or l.sec,
                              "a layer's replica count must divide its inputs'")
            if len({i.replicas for i in ins}) > 1:
                self.fail(f"the inputs of {what} have different numbers of replicas ("
                          + ", ".join(f"{i.name}: {i.replicas}" for i in ins) + ")",
                          self.entry(l.sec, "inputs"))
            if l.type == "pass":
                if l.replicas != ins[0].replicas:
                    self.fail(f"{what}: a pass-through layer needs as many replicas as its inputs "
                              f"({ins[0].replicas}), not {l.replicas}", l.gpu_entry or l.sec)
                for other in self.layers.values():
                    if other is l or other.type != "pass" or other.gpus is None:
                        continue
                    common = set(other.inputs) & set(l.inputs)
                    if common and set(other.gpus) & set(l.gpus) and \
                            list(self.layers).index(other.name) < list(self.layers).index(l.name):
                        self.fail(f"{what} conflicts with pass-through layer '{other.name}': both take "
                                  f"'{sorted(common)[0]}' and run on an overlapping set of GPUs",
                                  l.gpu_entry or l.sec)
            if l.type in LABEL_COSTS:
                labels, probs = ins
                if not labels.is_data:
                    self.fail(f"{what}: the first input must be the labels (a data layer); '{labels.name}' is a "
                              f"{labels.type} layer", self.entry(l.sec, "inputs"),
                              "cuda-convnet2 writes inputs=labels,probs")
                if probs.type != "softmax":
                    self.fail(f"{what}: the second input must be a softmax layer; '{probs.name}' is a "
                              f"{probs.type} layer", self.entry(l.sec, "inputs"))

    def check_usage(self) -> None:
        """Unused layers and the replica rule between a layer and its consumers."""
        for l in self.layers.values():
            consumers = [c for c in self.layers.values() if l.name in c.inputs]
            if not consumers and not l.type.startswith("cost."):
                self.fail(f"layer '{l.name}' (type={l.type}) is unused", l.sec,
                          "every layer but a cost must feed another layer")
            counts = {c.replicas for c in consumers}
            if len(counts) > 1:
                self.fail(f"the layers that take '{l.name}' as input have different numbers of replicas ("
                          + ", ".join(f"{c.name}: {c.replicas}" for c in consumers) + ")",
                          consumers[-1].gpu_entry or consumers[-1].sec,
                          "cuda-convnet2 needs all next layers of a layer to have equal numbers of replicas")
            if l.type.startswith("cost.") and consumers:
                self.fail(f"cost layer '{l.name}' is the input of '{consumers[0].name}'",
                          self.entry(consumers[0].sec, "inputs"), "a cost layer ends the network")

    def assign_roles(self) -> None:
        """A data layer that a logreg or cross-entropy cost takes first holds labels; the rest images."""
        for l in self.layers.values():
            if not l.is_data:
                continue
            uses = [(c, c.inputs.index(l.name)) for c in self.layers.values() if l.name in c.inputs]
            as_labels = [c for c, i in uses if c.type in LABEL_COSTS and i == 0]
            other = [c for c, i in uses if not (c.type in LABEL_COSTS and i == 0)]
            if as_labels and other:
                self.fail(f"data layer '{l.name}' holds the labels of '{as_labels[0].name}' and is also an input "
                          f"of '{other[0].name}'", self.entry(other[0].sec, "inputs"),
                          "cnnc feeds labels only to cost layers")
            l.role = "labels" if as_labels else "image"
        images = [l for l in self.layers.values() if l.is_data and l.role == "image"]
        for key in list(self.shapes):
            if key is None:
                if len(images) != 1:
                    self.fail_cli("--input-shape", "a shape without NAME= needs exactly one image data layer; "
                                  f"{self.lf.file} has {len(images)}", "write --input-shape NAME=CxHxW")
                self.shapes[images[0].name] = self.shapes.pop(None)
        for key in self.shapes:
            l = self.layers.get(key)
            if l is None or not l.is_data:
                data = [x.name for x in self.layers.values() if x.is_data]
                self.fail_cli("--input-shape", f"{self.lf.file} has no data layer named '{key}'",
                              did_you_mean(key, data) or f"its data layers: {', '.join(data)}")
            if l.role == "labels":
                self.fail_cli("--input-shape", f"data layer '{key}' holds labels, not images",
                              "the number of classes comes from the cost layer's softmax, or from --classes")
        for l in images:
            if l.name not in self.shapes:
                consumer = next(c for c in self.layers.values() if l.name in c.inputs)
                ce = self.entry(consumer.sec, "channels")
                c = ce.value.split(",")[consumer.inputs.index(l.name) if "," in ce.value else 0].strip() \
                    if ce is not None else "C"
                self.fail(f"data layer '{l.name}' needs an image shape: cuda-convnet2 takes it from its data "
                          f"provider, and the .cfg files do not give it", l.sec,
                          f"pass --input-shape {l.name}=CxHxW, e.g. --input-shape {l.name}={c}x224x224")
            l.shape = self.shapes[l.name]
        for l in self.layers.values():
            if l.is_data:
                self.data_range(l)
                if l.role == "labels":
                    l.shape = (1, 1, 1)

    def data_range(self, l: _Layer) -> None:
        what = f"data layer '{l.name}'"
        start = self.get_int(l.sec, "start", what, default=0)
        if start != 0:
            self.fail(f"{what} takes a slice of its data array (start={start}); cnnc feeds whole arrays",
                      self.entry(l.sec, "start"))
        if self.entry(l.sec, "end") is not None and l.role == "image":
            end = self.get_int(l.sec, "end", what)
            c, h, w = self.shapes[l.name]
            if end != c * h * w:
                self.fail(f"{what} ends at {end}, but its images have {c}x{h}x{w} = {c * h * w} values; cnnc "
                          f"feeds whole arrays", self.entry(l.sec, "end"))
        idx = self.get_int(l.sec, "dataidx", what)
        usual = 0 if l.role == "image" else 1
        if idx != usual:
            self.warn(f"{what} has dataIdx={idx}; cnnc feeds images and labels by role (cuda-convnet2's "
                      f"image and CIFAR providers put {l.role} at index {usual})", self.entry(l.sec, "dataidx"))

    # -- keys nobody reads ------------------------------------------------------
    def check_keys(self, l: _Layer) -> None:
        known = LAYER_KEYS[l.type]
        for key in l.sec.entries:
            e = l.sec.entries[key]
            if key in known and key not in _TUNING_KEYS:
                continue
            if key in _TUNING_KEYS:
                self.warn(f"'{e.name}' {_TUNING_KEYS[key]}", e, span=e.key_span)
            elif key == "neuron" and (l.is_data or l.type in COSTS):
                self.warn(f"'{e.name}' is ignored on {'data' if l.is_data else 'cost'} layers, by cuda-convnet2 "
                          f"and cnnc", e, span=e.key_span)
            elif key in _ALL_PARAM_KEYS and key not in _ALL_LAYER_KEYS:
                self.warn(f"'{e.name}' belongs in the layer-parameter file ({self.pf.file}); cuda-convnet2 "
                          f"ignores it here", e, span=e.key_span)
            elif key == "gpu" and l.is_data:
                self.warn(f"'{e.name}' is ignored on data layers: they go wherever their consumers are", e,
                          span=e.key_span)
            else:
                guess = did_you_mean_word(key, known)
                self.warn(f"'{e.name}' is not a key of {l.type} layers; cuda-convnet2 ignores it", e,
                          f"did you mean '{camel(guess)}'?" if guess else None, span=e.key_span)

    # -- pass 2: shapes and layer-definition keys ----------------------------------
    def layer_shape(self, l: _Layer) -> None:
        sec, typ = l.sec, l.type
        what = f"layer '{l.name}' (type={typ})"
        ins = [self.layers[i] for i in l.inputs]
        for inp in ins:
            if inp.role == "labels" and not (typ in LABEL_COSTS and inp is ins[0]):
                self.fail(f"{what} cannot take the labels in '{inp.name}' as input", self.entry(sec, "inputs"))
        l.kind = SUPPORTED[typ]
        neuron = self.entry(sec, "neuron") if typ not in COSTS else None
        if typ in ("conv", "local"):
            self.conv_like(l, ins, what)
        elif typ == "fc":
            outputs = self.get_int(sec, "outputs", what, minimum=1)
            init_w = self.single(self.get_list(sec, "initw", what, len(ins), float, "numbers", default=0.01),
                                 sec, "initw", what, "cnnc draws all of a layer's weights with one init_w")
            self.weight_extras(l, what)
            init_b = self.get_float(sec, "initb", what, default=0.0)
            l.args = [*l.inputs, f"outputs={outputs}", f"init_w={fmt_number(init_w)}"]
            if init_b:
                l.args.append(f"init_b={fmt_number(init_b)}")
            l.shape = (outputs, 1, 1)
        elif typ == "pool":
            self.pool(l, ins[0], what)
        elif typ in NORMS:
            x = ins[0]
            self.check_channels(l, x, what)
            c, h, w = x.shape
            if typ == "cmrnorm":
                size = self.get_int(sec, "size", what, minimum=2, maximum=c)
                if c % 16:
                    self.warn(f"{what}: cuda-convnet2 needs a multiple of 16 channels for cross-map "
                              f"normalisation, '{x.name}' has {c}; cnnc does not", self.entry(sec, "channels") or sec)
            else:
                size = self.get_int(sec, "size", what, minimum=1, maximum=min(h, w))
                if c > 3 and c % 4:
                    self.warn(f"{what}: cuda-convnet2 needs at most 3 or a multiple of 4 channels here, "
                              f"'{x.name}' has {c}; cnnc does not", self.entry(sec, "channels") or sec)
            l.args = [l.inputs[0], f"size={size}"]      # scale, pow, min_div come from the parameter file
            if self.get_bool(sec, "blocked", what, default=False):
                if typ != "cmrnorm":
                    self.fail(f"{what}: blocked windows exist only for cmrnorm layers", self.entry(sec, "blocked"))
                l.extra.append("blocked=true")
            l.shape = x.shape
        elif typ == "neuron":
            if neuron is None:
                self.fail(f"{what} is missing the required key 'neuron'", sec, "e.g. neuron=relu")
            l.args = [l.inputs[0]]
            l.neuron = self.parse_neuron(neuron, what)
            l.shape = ins[0].shape
            neuron = None
        elif typ == "softmax":
            l.args = [l.inputs[0]]
            l.shape = (ins[0].size, 1, 1)
        elif typ in ("dropout", "dropout2"):
            l.args = [l.inputs[0]]
            l.shape = ins[0].shape
        elif typ in ("eltsum", "eltmax"):
            sizes = [i.size for i in ins]
            if len(set(sizes)) > 1:
                self.fail(f"{what}: all inputs must have the same size, got "
                          + ", ".join(f"{i.name}: {i.size}" for i in ins), self.entry(sec, "inputs"))
            l.args = list(l.inputs)
            l.shape = ins[0].shape
        elif typ in ("concat", "pass"):
            # cuda-convnet2's pass layer is a concatenation that shares its inputs' memory
            # instead of copying; in cnnc one input is `pass`, several are `concat`.
            l.kind = "pass" if len(ins) == 1 else "concat"
            if l.kind != SUPPORTED[typ]:
                l.comment = f"type={typ}"
            l.args = list(l.inputs)
            if len({i.shape[1:] for i in ins}) == 1:
                l.shape = (sum(i.shape[0] for i in ins), *ins[0].shape[1:])
            else:
                self.fail(f"{what} joins inputs of different image sizes ("
                          + ", ".join(f"{i.name}: {'x'.join(map(str, i.shape))}" for i in ins)
                          + "); cnnc concatenates the channels of images of one size", self.entry(sec, "inputs"))
        elif typ in LABEL_COSTS:
            l.args = list(l.inputs)
            l.shape = (1, 1, 1)
        elif typ == "cost.sum2":
            l.args = [l.inputs[0]]
            l.shape = (1, 1, 1)
        if typ in COSTS:
            children = self.get_str(sec, "children", what, default="")
            if children:
                self.fail(f"{what}: aggregated costs (children=) are not supported by cnnc",
                          self.entry(sec, "children"))
        if neuron is not None:
            spec = self.parse_neuron(neuron, what)
            if spec == "ident":
                return
            base = spec.split("[")[0]
            if typ in FUSED_NEURON_KINDS and base not in UNFUSABLE_NEURONS:
                l.neuron = spec
            else:
                l.detached_neuron = spec

    def check_channels(self, l: _Layer, x: _Layer, what: str, given: int | None = None,
                       entry: Entry | None = None) -> None:
        """The `channels` a layer declares must be what its input produces.

        cuda-convnet2 sees every activation as a flat vector and reads it as
        square images of `channels` channels; cnnc keeps shapes, so the count
        must match, and a vector (an fc output) cannot be viewed as images."""
        if given is None:
            given = self.get_int(l.sec, "channels", what, minimum=1)
            entry = self.entry(l.sec, "channels")
        c, h, w = x.shape
        if given == c:
            return
        single = entry is not None and "," not in entry.value
        if (h, w) == (1, 1) and c > given and c % given == 0:
            self.fail(f"{what}: channels={given} asks to view the {c} values of '{x.name}' as images; cnnc "
                      f"keeps '{x.name}' a vector of {c} values", entry,
                      f"write channels={c} (1x1 images)" if single else None)
        self.fail(f"{what}: channels={given}, but '{x.name}' produces {c} channels ({c}x{h}x{w})", entry,
                  f"write channels={c}" if single else None)

    def conv_like(self, l: _Layer, ins: list[_Layer], what: str) -> None:
        sec, n = l.sec, len(ins)
        channels = self.get_list(sec, "channels", what, n, minimum=1)
        padding = self.get_list(sec, "padding", what, n, default=0, minimum=0)
        stride = self.get_list(sec, "stride", what, n, default=1, minimum=1)
        size = self.get_list(sec, "filtersize", what, n, minimum=1)
        filters = self.get_list(sec, "filters", what, n, minimum=1)
        groups = self.get_list(sec, "groups", what, n, default=1, minimum=1)
        init_w = self.get_list(sec, "initw", what, n, float, "numbers")
        modules = self.get_int(sec, "modulesx", what, default=0, minimum=0)
        if modules:
            self.fail(f"{what}: modulesX={modules} (a fixed output size) is not supported by cnnc",
                      self.entry(sec, "modulesx"), "remove it: the output size then covers the whole image")
        if self.get_str(sec, "initcfunc", what, default=""):
            self.fail(f"{what}: initCFunc is not supported by cnnc", self.entry(sec, "initcfunc"))
        self.weight_extras(l, what)
        outs = []
        for i, x in enumerate(ins):
            ce = self.entry(sec, "channels")
            self.check_channels(l, x, what, channels[i], ce)
            if channels[i] % groups[i]:
                self.fail(f"{what}: channels={channels[i]} is not divisible by groups={groups[i]}",
                          self.entry(sec, "groups"))
            _, h, w = x.shape
            oh = 1 + math.ceil((2 * padding[i] + h - size[i]) / stride[i])
            ow = 1 + math.ceil((2 * padding[i] + w - size[i]) / stride[i])
            if oh < 1 or ow < 1 or size[i] > h + 2 * padding[i] or size[i] > w + 2 * padding[i]:
                self.fail(f"{what}: a {size[i]}x{size[i]} filter does not fit the {h}x{w} input '{x.name}' "
                          f"with padding {padding[i]}", self.entry(sec, "filtersize"))
            outs.append((filters[i] * groups[i], oh, ow))
            if filters[i] % 16:
                self.warn(f"{what}: cuda-convnet2 needs filters to be a multiple of 16 ({filters[i]}); cnnc does "
                          f"not", self.entry(sec, "filters"))
            if channels[i] > 3 and channels[i] % 4:
                self.warn(f"{what}: cuda-convnet2 needs at most 3 or a multiple of 4 channels ({channels[i]}); "
                          f"cnnc does not", ce)
        if len(set(outs)) > 1:
            self.fail(f"{what}: all inputs must produce equally-sized output, got "
                      + ", ".join("x".join(map(str, o)) for o in outs), self.entry(sec, "inputs"))
        why = "cnnc's conv takes one value for all inputs" if l.type == "conv" else "cnnc's local takes one input"
        s = self.single(size, sec, "filtersize", what, why)
        st = self.single(stride, sec, "stride", what, why)
        p = self.single(padding, sec, "padding", what, why)
        g = self.single(groups, sec, "groups", what, why)
        f = self.single(filters, sec, "filters", what, why)
        iw = self.single(init_w, sec, "initw", what, "cnnc draws all of a layer's weights with one init_w")
        init_b = self.get_float(sec, "initb", what, default=0.0)
        args = [*l.inputs, f"filters={f * g}", f"size={s}"]
        if st != 1:
            args.append(f"stride={st}")
        if p:
            args.append(f"padding={p}")
        if l.type == "conv":
            if g != 1:
                args.append(f"groups={g}")
            if not self.get_bool(sec, "sharedbiases", what, default=True):
                args.append("shared_biases=false")
        elif g != 1:
            self.fail(f"{what}: groups={g}; cnnc's local layers have no groups", self.entry(sec, "groups"))
        args.append(f"init_w={fmt_number(iw)}")
        if init_b:
            args.append(f"init_b={fmt_number(init_b)}")
        l.args = args
        l.shape = outs[0]

    def weight_extras(self, l: _Layer, what: str) -> None:
        sec = l.sec
        for key, label in (("initwfunc", "initWFunc"), ("initbfunc", "initBFunc")):
            if self.get_str(sec, key, what, default=""):
                self.fail(f"{what}: initialising parameters with a Python function ({label}) is not supported "
                          f"by cnnc", self.entry(sec, key),
                          f"remove {label}: " + ("weights then start N(0, initW^2)" if key == "initwfunc"
                                                 else "biases then start at initB"))
        ws = self.entry(sec, "weightsource")
        if ws is not None and any(x.strip() for x in ws.value.split(",")):
            self.fail(f"{what}: weight sharing (weightSource) is not supported by cnnc", ws)

    def pool(self, l: _Layer, x: _Layer, what: str) -> None:
        sec = l.sec
        self.check_channels(l, x, what)
        c, h, w = x.shape
        kind = self.get_str(sec, "pool", what)
        if kind not in ("max", "avg", "maxabs"):
            self.fail(f"{what}: pool must be max or avg, not {kind!r}", self.entry(sec, "pool"),
                      did_you_mean(kind, ("max", "avg")))
        if kind == "maxabs":
            self.fail(f"{what}: pool=maxabs is not supported by cnnc", self.entry(sec, "pool"))
        size = self.get_int(sec, "sizex", what, minimum=1, maximum=min(h, w))
        start = self.get_int(sec, "start", what, default=0)
        stride = self.get_int(sec, "stride", what, minimum=1, maximum=size)
        outputs = self.get_int(sec, "outputsx", what, default=0, minimum=0)
        if start < 0:
            self.fail(f"{what}: start={start} makes windows begin outside the image, which cnnc does not support",
                      self.entry(sec, "start"))
        if size > h - start or size > w - start:
            self.fail(f"{what}: a {size}x{size} window does not fit the {h}x{w} input from start {start}",
                      self.entry(sec, "sizex"))
        if self.grad_below(x) and c % 16:
            self.warn(f"{what}: cuda-convnet2 needs a multiple of 16 channels to pool under trained layers, "
                      f"'{x.name}' has {c}; cnnc does not", self.entry(sec, "channels") or sec)
        oh = outputs or 1 + math.ceil((h - start - size) / stride)
        ow = outputs or 1 + math.ceil((w - start - size) / stride)
        l.kind = "maxpool" if kind == "max" else "avgpool"
        l.args = [l.inputs[0], f"size={size}", f"stride={stride}"]
        if start:
            l.args.append(f"start={start}")
        if outputs:
            l.args.append(f"outputs={outputs}")
        l.shape = (c, oh, ow)

    def grad_below(self, l: _Layer) -> bool:
        if l.type in WEIGHTED:
            return True
        return any(self.grad_below(self.layers[i]) for i in l.inputs)

    def parse_neuron(self, e: Entry, what: str) -> str:
        text = e.value.strip()
        m = re.fullmatch(r"(\w+)\s*(?:\[([^\]]*)\])?", text)
        if not m:
            self.fail(f"{what}: cannot read the neuron {text!r}", e, "write e.g. relu or tanh[1.7,0.66]")
        name, params = m.group(1), m.group(2)
        if name not in NEURON_PARAMS:
            self.fail(f"{what}: unknown neuron '{name}'", e,
                      did_you_mean(name, NEURON_PARAMS) or f"neurons: {', '.join(sorted(NEURON_PARAMS))}")
        count = NEURON_PARAMS[name]
        if count is None:
            self.fail(f"{what}: cnnc has no {name} neuron", e)
        vals = []
        if params is not None:
            for p in params.split(","):
                try:
                    vals.append(float(p.strip()))
                except ValueError:
                    self.fail(f"{what}: neuron parameters are numbers, not {p.strip()!r}", e)
        if len(vals) != count:
            self.fail(f"{what}: the {name} neuron takes {count} parameter{'s' if count != 1 else ''}, "
                      f"got {len(vals)}", e,
                      {0: f"write neuron={name}", 1: f"write e.g. neuron={name}[1]",
                       2: f"write e.g. neuron={name}[1,1]"}[count])
        return name + (f"[{', '.join(fmt_number(v) for v in vals)}]" if vals else "")

    # -- classes ------------------------------------------------------------------
    def label_classes(self) -> None:
        for l in self.layers.values():
            if not (l.is_data and l.role == "labels"):
                continue
            costs = [c for c in self.layers.values() if c.type in LABEL_COSTS and c.inputs[0] == l.name]
            sizes = {}
            for c in costs:
                sizes.setdefault(self.layers[c.inputs[1]].size, c)
            if len(sizes) > 1:
                (s1, c1), (s2, c2) = list(sizes.items())[:2]
                self.fail(f"the costs on labels '{l.name}' disagree on the number of classes: '{c1.name}' has "
                          f"{s1}, '{c2.name}' has {s2}", self.entry(c2.sec, "inputs"))
            (size, cost), = sizes.items()
            probs = self.layers[cost.inputs[1]]
            if self.classes is not None and self.classes != size:
                self.fail(f"softmax input '{probs.name}' of '{cost.name}' produces {size} values, but --classes "
                          f"is {self.classes}", self.entry(cost.sec, "inputs"),
                          "the softmax must produce one value per class of the data set")
            if size < 2:
                self.fail(f"'{probs.name}' produces {size} value; a classifier needs at least 2 classes",
                          self.entry(cost.sec, "inputs"))
            l.shape = (1, 1, 1)
            src = self.layers[probs.inputs[0]].name
            l.comment = "classes: --classes" if self.classes is not None else \
                f"classes: the size of softmax '{probs.name}' over '{src}'"
            l.args = [str(size)]

    # -- the parameter file --------------------------------------------------------
    def layer_params(self, l: _Layer) -> None:
        typ = l.type
        if typ not in REQUIRES_PARAMS:
            return
        sec = self.pf.sections.get(l.name)
        what = f"layer '{l.name}' (type={typ})"
        if sec is None:
            needs = {"weights": "epsW, epsB, momW and momB", "norm": "scale and pow", "cost": "coeff"}
            group = "weights" if typ in WEIGHTED else "norm" if typ in NORMS else "cost" if typ in COSTS else ""
            hint = f"add [{l.name}] with {needs[group]}" if group else \
                f"add [{l.name}] (it may be empty)"
            self.fail(f"{what} needs a section [{l.name}] in {self.pf.file}", l.sec, hint)
        if typ in WEIGHTED:
            self.weight_params(l, sec, what)
        elif typ in NORMS:
            scale = self.get_float(sec, "scale", what)
            pw = self.get_float(sec, "pow", what)
            min_div = self.get_float(sec, "mindiv", what, default=1.0)
            l.args += [f"scale={fmt_number(scale)}", f"pow={fmt_number(pw)}"]
            if min_div != 1.0:
                l.args.append(f"min_div={fmt_number(min_div)}")
        elif typ in ("dropout", "dropout2"):
            enable = self.get_bool(sec, "enable", what, default=True)
            keep = self.get_float(sec, "keep", what, default=0.5)
            if not enable:
                l.kind = "pass"
                l.comment = f"{typ} with enable=false passes its input through"
            else:
                if not 0 < keep <= 1:
                    self.fail(f"{what}: keep must lie in (0, 1], not {fmt_number(keep)}", self.entry(sec, "keep"))
                if keep != 0.5:
                    l.args.append(f"keep={fmt_number(keep)}")
        elif typ == "eltsum":
            e = self.entry(sec, "coeffs")
            coeffs = [1.0] * len(l.inputs)
            if e is not None:
                if len(e.value.split(",")) != len(l.inputs):
                    self.fail(f"{what}: 'coeffs' lists {len(e.value.split(','))} values for {len(l.inputs)} "
                              f"inputs", e, "give one coefficient per input")
                coeffs = self.get_list(sec, "coeffs", what, len(l.inputs), float, "numbers")
            if len(l.inputs) == 1:
                if coeffs[0] != 1:
                    self.fail(f"{what}: a one-input eltsum that scales by {fmt_number(coeffs[0])} has no cnnc "
                              f"equivalent", e, "give the layer two or more inputs")
                l.kind, l.comment = "pass", "eltsum of one input"
            elif any(c != 1 for c in coeffs):
                l.args.append(f"coeffs=[{', '.join(fmt_number(c) for c in coeffs)}]")
        elif typ in COSTS:
            coeff = self.get_float(sec, "coeff", what)
            if coeff != 1:
                l.args.append(f"coeff={fmt_number(coeff)}")
            if typ == "cost.logreg":
                top_k = self.get_int(sec, "topk", what, default=1, minimum=1)
                classes = self.layers[l.inputs[1]].size
                if top_k > classes:
                    self.fail(f"{what}: topk={top_k} exceeds the {classes} classes", self.entry(sec, "topk"))
                if top_k != 1:
                    l.args.append(f"top_k={top_k}")

    def weight_params(self, l: _Layer, sec: Section, what: str) -> None:
        n = len(l.inputs)
        one = "cnnc gives a layer one value for all its inputs"
        eps_w = self.single(self.schedules(sec, "epsw", what, n), sec, "epsw", what, one)
        eps_b = self.schedules(sec, "epsb", what, 1)[0]
        mom_w = self.single(self.get_list(sec, "momw", what, n, float, "numbers", minimum=0), sec, "momw", what, one)
        mom_b = self.get_float(sec, "momb", what, minimum=0)
        wc = self.single(self.get_list(sec, "wc", what, n, float, "numbers", default=0.0, minimum=0),
                         sec, "wc", what, one)
        wball = self.single(self.get_list(sec, "wball", what, n, float, "numbers", default=0.0, minimum=0),
                            sec, "wball", what, one)
        unsupported = []
        if l.type == "conv":
            unsupported += [("wcnormmax", "weight-norm constraints (wcNormMax)", True),
                            ("wcnormmin", "weight-norm constraints (wcNormMin)", True)]
        unsupported += [("supereps", "superEps", False), ("supermom", "superMom", False)]
        for key, label, is_list in unsupported:
            vals = self.get_list(sec, key, what, n, float, "numbers", default=0.0) if is_list else \
                [self.get_float(sec, key, what, default=0.0)]
            if any(vals):
                self.fail(f"{what}: {label} is not supported by cnnc", self.entry(sec, key),
                          "set it to 0 or remove it")
        period = self.get_int(sec, "updateperiod", what, default=0, minimum=0)
        l.train = {"lr": eps_w, "lr_bias": eps_b, "momentum": mom_w, "momentum_bias": mom_b,
                   "weight_decay": wc, "wball": wball, "update_period_cfg": period}

    def schedules(self, sec: Section, key: str, what: str, n: int) -> list[Schedule]:
        e = self.raw(sec, key, what)
        parts = [p.strip() for p in e.value.split(",")]
        if key == "epsb" and len(parts) != 1:
            self.fail(f"'{e.name}' lists {len(parts)} schedules; a layer has one bias vector, so one schedule", e)
        if len(parts) != n and len(parts) != 1:
            self.fail(f"'{e.name}' lists {len(parts)} schedules but {what} has {n} input{'s' if n > 1 else ''}",
                      e, "give one schedule for every input, or one for all of them")
        out = [self.schedule(e, p) for p in parts]
        return out * n if len(out) == 1 else out

    def schedule(self, e: Entry, text: str) -> Schedule:
        example = "a number, or const[base=X], linear[base=X;tgtFactor=Y], exp[base=X;tgtFactor=Y] or " \
                  "dexp[base=X;tgtFactor=Y;numSteps=N]"
        try:
            v = float(text)
        except ValueError:
            pass
        else:
            if not math.isfinite(v) or v < 0:
                self.fail(f"'{e.name}': a learning rate must be a finite number of at least 0, not {text}", e)
            return Schedule("const", v)
        m = _SCHEDULE_RE.match(text)
        if not m or m.group(1).lower() not in _SCHEDULES:
            got = m.group(1) if m else text
            self.fail(f"'{e.name}': unknown learning-rate schedule {got!r}", e,
                      (did_you_mean(got.lower(), _SCHEDULES) or "") + ("; " if did_you_mean(got.lower(), _SCHEDULES)
                                                                       else "") + f"write {example}")
        kind = m.group(1).lower()
        spec = _SCHEDULES[kind]
        vals: dict[str, Any] = {}
        body = m.group(2)
        for item in ([] if body is None or not body.strip() else body.split(";")):
            if "=" not in item:
                self.fail(f"'{e.name}': expected key=value inside {kind}[...], got {item.strip()!r}", e,
                          f"write {example}")
            k, v = (s.strip() for s in item.split("=", 1))
            names = {n for n, _ in spec}
            if k.lower() not in names:
                self.fail(f"'{e.name}': {kind} has no parameter '{k}'", e,
                          f"{kind} takes " + ", ".join(camel(n) for n, _ in spec))
            if k.lower() in vals:
                self.fail(f"'{e.name}': '{k}' is given twice in {kind}[...]", e)
            typ = dict(spec)[k.lower()]
            try:
                vals[k.lower()] = typ(v)
            except ValueError:
                self.fail(f"'{e.name}': {k} must be {'an integer' if typ is int else 'a number'}, not {v!r}", e)
        missing = [camel(n) for n, _ in spec if n not in vals]
        if missing:
            self.fail(f"'{e.name}': {kind} needs {', '.join(missing)}", e,
                      f"write e.g. {kind}[" + ";".join(f"{camel(n)}=..." for n, _ in spec) + "]")
        base = vals["base"]
        if not math.isfinite(base) or base < 0:
            self.fail(f"'{e.name}': base must be a finite number of at least 0", e)
        tgt = vals.get("tgtfactor", 1.0)
        if not math.isfinite(tgt) or tgt < 1:
            self.fail(f"'{e.name}': tgtFactor={fmt_number(tgt)}; cnnc's schedules need a tgtFactor of at least 1",
                      e, "the rate goes from base down to base/tgtFactor")
        steps = vals.get("numsteps", 1)
        if steps < 1:
            self.fail(f"'{e.name}': numSteps must be at least 1", e)
        return Schedule(kind, float(base), float(tgt), int(steps))

    def check_params_file(self) -> None:
        for sec in self.pf.sections.values():
            l = self.layers.get(sec.name)
            if l is None:
                self.warn(f"[{sec.name}] names no layer of {self.lf.file}; cuda-convnet2 ignores it", sec,
                          did_you_mean(sec.name, self.layers))
                continue
            known = PARAM_KEYS.get(l.type, set())
            for key, e in sec.entries.items():
                if key in known:
                    continue
                if key in _ALL_LAYER_KEYS and key not in _ALL_PARAM_KEYS:
                    self.warn(f"'{e.name}' belongs in the layer-definition file ({self.lf.file}); cuda-convnet2 "
                              f"ignores it here", e, span=e.key_span)
                elif not known:
                    self.warn(f"{l.type} layers take no parameters; cuda-convnet2 ignores '{e.name}'", e,
                              span=e.key_span)
                else:
                    guess = did_you_mean_word(key, known)
                    self.warn(f"'{e.name}' is not a parameter of {l.type} layers; cuda-convnet2 ignores it", e,
                              f"did you mean '{camel(guess)}'?" if guess else None, span=e.key_span)

    # -- replicas, passes, update periods ------------------------------------------
    def replication(self) -> tuple[int, ...]:
        layers = list(self.layers.values())
        counts = [l.replicas for l in layers if l.replicas]
        r_max, r_min = max(counts), min(counts)
        for l in layers:
            if l.replicas and (r_max % l.replicas or l.replicas % r_min):
                self.fail(f"layer '{l.name}' has {l.replicas} replicas; with {r_max} and {r_min} elsewhere the "
                          f"passes per minibatch are not whole", l.gpu_entry or l.sec,
                          "replica counts must divide each other")
        total = r_max // r_min
        if self.mini % r_max:
            top = next(l for l in layers if l.replicas == r_max and not l.is_data)
            self.fail(f"--mini {self.mini} cannot be split evenly among the {r_max} replicas of '{top.name}'",
                      top.gpu_entry or top.sec,
                      f"use a multiple of {r_max}, e.g. --mini {r_max * max(1, self.mini // r_max)}")
        for l in layers:
            if l.is_data:
                continue
            active = l.replicas // r_min          # passes between two forward passes of this layer
            l.passes = r_max // l.replicas
            if l.train is None:
                continue
            cfg = l.train.pop("update_period_cfg")
            effective = max(cfg, active)
            pe = self.entry(self.pf.sections[l.name], "updateperiod")
            if effective % active:
                self.fail(f"updatePeriod={cfg}: '{l.name}' runs once every {active} passes, so its update period "
                          f"must be a multiple of {active}", pe)
            if total % effective:
                self.fail(f"updatePeriod={cfg} must divide the {total} backward pass{'es' if total > 1 else ''} "
                          f"per minibatch", pe)
            l.period_own = effective // active
            l.train["update_period"] = l.period_own if cfg or l.period_own != l.passes else 0
        levels = tuple(sorted(set(counts), reverse=True))
        if len(levels) > 2:
            middle = next(l for l in layers if l.replicas not in (r_max, r_min))
            self.warn(f"this network uses {len(levels)} replica counts ({', '.join(map(str, levels))}); cnnc plans "
                      f"two levels per network, so compiling it fails at '{middle.name}'",
                      middle.gpu_entry or middle.sec,
                      f"give '{middle.name}' {r_max} or {r_min} GPUs")
        return levels

    # -- names in the .cnn ----------------------------------------------------------
    def name_layers(self) -> None:
        taken: set[str] = set()

        def fresh(wish: str) -> str:
            name, i = wish, 1
            while name in taken:
                name = f"{wish}_{i}"
                i += 1
            taken.add(name)
            return name

        for l in self.layers.values():
            dsl = re.sub(r"[^A-Za-z0-9_]", "_", l.name)
            if not _NAME_RE.fullmatch(dsl):
                dsl = "_" + dsl
            if dsl in _RESERVED:
                dsl += "_"
            l.dsl = fresh(dsl)
            if l.dsl != l.name:
                why = f"'{l.name}' is a keyword of the language" if l.name in _RESERVED else \
                    f"'{l.name}' is not a cnnc name" if l.dsl.rstrip("_0123456789") != l.name else \
                    f"another layer's name became '{l.name}'"
                self.warn(f"layer '{l.name}' is called '{l.dsl}' in the .cnn file: {why}", l.sec)
        for l in self.layers.values():
            if l.detached_neuron is not None:
                l.detached = fresh(f"{l.dsl}_neuron")

    def ref(self, name: str) -> str:
        """How a consumer refers to layer `name`: through its detached neuron layer, if any."""
        l = self.layers[name]
        return l.detached or l.dsl

    # -- writing the .cnn ----------------------------------------------------------
    def emit(self, levels: tuple[int, ...]) -> Imported:
        name = self.net_name or default_network_name(self.lf.file)
        lines: list[str] = []
        origins: dict[int, tuple[str, int]] = {}
        out_layers: list[ImportedLayer] = []

        def add(text: str, origin: tuple[str, int] | None = None) -> int:
            lines.append(text)
            if origin is not None:
                origins[len(lines)] = origin
            return len(lines)

        add(f"# Imported from cuda-convnet2's {Path(self.lf.file).name} (layer definitions)")
        add(f"# and {Path(self.pf.file).name} (layer parameters) by")
        add(f"#   {self.command}")
        add("")
        add(f"network {name}")
        add("")
        inputs = {}
        for l in self.layers.values():
            if not l.is_data:
                continue
            decl = f"input {l.dsl}: " + ("x".join(map(str, l.shape)) if l.role == "image" else f"label({l.args[0]})")
            inputs[l.dsl] = decl
            add(decl + (f"    # {l.comment}" if l.comment else ""), (self.lf.file, l.sec.line))
        weighted = [l for l in self.layers.values() if l.train is not None]
        glob = self.train_defaults(weighted)
        add("")
        add("train {")
        add(f"  batch = {self.mini}")
        for key in ("lr", "lr_bias", "momentum", "momentum_bias", "weight_decay", "update_period"):
            if key in glob:
                add(f"  {key} = {self.fmt_setting(key, glob[key])}")
        add("}")
        add("")
        placed: dict[str, tuple[int, ...]] = {}      # .cnn name -> devices the .cnn rule gives
        for l in self.layers.values():
            if l.is_data:
                continue
            args = [self.ref(a) for a in l.args[:len(l.inputs)]] + l.args[len(l.inputs):] + l.extra
            layer_inputs = [self.ref(i) for i in l.inputs if not self.layers[i].is_data]
            inherited = placed[layer_inputs[0]] if layer_inputs else (0,)
            at = "" if inherited == l.gpus else f"@gpu({','.join(map(str, l.gpus))}) "
            placed[l.dsl] = l.gpus
            text = f"{at}{l.dsl} = {l.kind}({', '.join(args)})"
            if l.neuron:
                text += f" {l.neuron}"
            if l.train is not None:
                local = self.local_settings(glob, l.train, l.passes)
                if local:
                    text += " { " + "; ".join(f"{k} = {self.fmt_setting(k, v)}" for k, v in local.items()) + " }"
            if l.comment:
                text += f"    # {l.comment}"
            line = add(text, (self.lf.file, l.sec.line))
            out_layers.append(ImportedLayer(l.dsl, l.name, l.kind, l.gpus, l.passes, l.period_own, line, l.shape))
            if l.detached:
                line = add(f"{l.detached} = neuron({l.dsl}) {l.detached_neuron}", (self.lf.file, l.sec.line))
                placed[l.detached] = l.gpus
                out_layers.append(ImportedLayer(l.detached, l.name, "neuron", l.gpus, l.passes, 0, line, l.shape))
        text = "\n".join(lines) + "\n"
        sources = {self.lf.file: self.lf.text, self.pf.file: self.pf.text}
        return Imported(name, text, self.lf.file, self.pf.file, sources, self.warnings, out_layers, inputs, origins,
                        levels)

    @staticmethod
    def fmt_setting(key: str, v: Any) -> str:
        if isinstance(v, Schedule):
            return fmt_schedule(v)
        return fmt_number(v)

    @staticmethod
    def train_defaults(weighted: list[_Layer]) -> dict[str, Any]:
        """The train {} block: for each setting, the value most weight layers use (the first on a tie)."""
        if not weighted:
            return {}

        def common(key):
            counts = Counter(l.train[key] for l in weighted)
            best = max(counts.values())
            return next(l.train[key] for l in weighted if counts[l.train[key]] == best)

        glob = {"lr": common("lr")}
        if common("lr_bias") != glob["lr"]:
            glob["lr_bias"] = common("lr_bias")
        glob["momentum"] = common("momentum")
        if common("momentum_bias") != glob["momentum"]:
            glob["momentum_bias"] = common("momentum_bias")
        glob["weight_decay"] = common("weight_decay")
        if common("update_period"):
            glob["update_period"] = common("update_period")
        return glob

    @staticmethod
    def local_settings(glob: dict[str, Any], want: dict[str, Any], passes: int) -> dict[str, Any]:
        """The fewest per-layer settings that, over `glob`, give the layer the values `want`
        under the .cnn rules (lr_bias defaults to the layer's lr, momentum_bias to its momentum,
        update_period 0 means once per minibatch, i.e. every `passes` passes)."""
        builtin = {"lr": Schedule("const", 0.01), "momentum": 0.9, "weight_decay": 0.0, "update_period": 0,
                   "wball": 0.0}
        local: dict[str, Any] = {}

        def effective(key):
            if key in local:
                return local[key]
            if key in glob:
                return glob[key]
            if key == "lr_bias":
                return effective("lr")
            if key == "momentum_bias":
                return effective("momentum")
            return builtin[key]

        def same(key, a, b):
            return (a or passes) == (b or passes) if key == "update_period" else a == b

        for key in ("lr", "lr_bias", "momentum", "momentum_bias", "weight_decay", "update_period", "wball"):
            if not same(key, effective(key), want[key]):
                local[key] = want[key]
        return local


_CAMEL = {k.lower(): k for k in (
    "dataIdx", "filterSize", "initW", "initB", "initWFunc", "initBFunc", "initCFunc", "weightSource", "modulesX",
    "sumWidth", "sharedBiases", "sizeX", "outputsX", "epsW", "epsB", "momW", "momB", "updatePeriod", "superEps",
    "superMom", "wcNormMax", "wcNormMin", "minDiv", "topk", "tgtFactor", "numSteps", "partialSum")}


def camel(key: str) -> str:
    """A lower-cased key as cuda-convnet2's documentation spells it."""
    return _CAMEL.get(key, key)


def did_you_mean_word(word: str, candidates: Iterable[str]) -> str | None:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return close[0] if close else None


def default_network_name(layers_file: str) -> str:
    stem = Path(layers_file).stem
    for prefix in ("layers-", "layers_", "layer-def-", "layers"):
        if stem.startswith(prefix) and len(stem) > len(prefix):
            stem = stem[len(prefix):]
            break
    name = re.sub(r"[^A-Za-z0-9_]", "_", stem) or "net"
    if not _NAME_RE.fullmatch(name):
        name = "net_" + name
    if name in _RESERVED:
        name += "_"
    return name


def parse_shape(text: str) -> tuple[str | None, tuple[int, int, int]]:
    """``NAME=CxHxW`` (or just ``CxHxW``) → (NAME or None, (C, H, W)); ValueError with a message."""
    name, _, dims = text.rpartition("=")
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*[xX]\s*(\d+)\s*", dims)
    if not m or (name == "" and "=" in text):
        raise ValueError(f"expected NAME=CxHxW such as data=3x224x224, got {text!r}")
    c, h, w = (int(g) for g in m.groups())
    if min(c, h, w) < 1:
        raise ValueError(f"image dimensions must be positive, got {text!r}")
    return (name.strip() or None), (c, h, w)


def _read(path: Path) -> str:
    """A .cfg file's text, under the limits every source has (a regular file of at most 16 MiB)."""
    if path.is_dir():
        raise CompileError(Diagnostic("is a directory, not a .cfg file", str(path)))
    return read_source(path)


def import_text(layers_text: str, layers_file: str, params_text: str, params_file: str,
                input_shapes: dict[str | None, tuple[int, int, int]] | None = None, mini: int = DEFAULT_MINI,
                classes: int | None = None, name: str | None = None, command: str | None = None) -> Imported:
    """Translate a layer-definition / layer-parameter pair to .cnn text; raises CompileError."""
    warnings: list[Diagnostic] = []
    lf = read_cfg(layers_text, layers_file, warnings.append)
    pf = read_cfg(params_text, params_file, warnings.append)
    if not lf.sections:
        raise CompileError(Diagnostic("the layer-definition file defines no layers", layers_file))
    shapes = dict(input_shapes or {})
    if command is None:
        parts = ["cnnc import", Path(layers_file).name, Path(params_file).name]
        parts += [f"--input-shape {k + '=' if k else ''}{'x'.join(map(str, v))}" for k, v in shapes.items()]
        parts.append(f"--mini {mini}")
        if classes is not None:
            parts.append(f"--classes {classes}")
        if name is not None:
            parts.append(f"--name {name}")
        command = " ".join(parts)
    if mini < 1:
        raise CompileError(Diagnostic(f"the minibatch must have at least 1 case, not {mini}", "--mini"))
    if name is not None and (not _NAME_RE.fullmatch(name) or name in _RESERVED):
        raise CompileError(Diagnostic(f"{name!r} is not a network name", "--name",
                                      hint="use letters, digits and '_', not starting with a digit"))
    imp = _Importer(lf, pf, shapes, mini, classes, name, command)
    imp.warnings = warnings
    return imp.run()


def import_files(layers: str | Path, params: str | Path,
                 input_shapes: dict[str | None, tuple[int, int, int]] | None = None, mini: int = DEFAULT_MINI,
                 classes: int | None = None, name: str | None = None) -> Imported:
    """Read and translate a cuda-convnet2 layers.cfg / layer-params.cfg pair."""
    layers, params = Path(layers), Path(params)
    return import_text(_read(layers), str(layers), _read(params), str(params), input_shapes, mini, classes, name)
