"""Writing the .cnn text, and the result of an import."""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnc.check.settings import LAYER_SETTINGS
from cnnc.diagnostics import CompileError, Diagnostic, Span, source_lines
from cnnc.frontend.ccn2.formatting import fmt_number, fmt_schedule
from cnnc.frontend.ccn2.importer import CfgLayer, Importer
from cnnc.frontend.ccn2.vocabulary import NAME_RE, RESERVED
from cnnc.ir import Schedule


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


def name_layers(imp: Importer) -> None:
    taken: set[str] = set()

    def fresh(wish: str) -> str:
        name, i = wish, 1
        while name in taken:
            name = f"{wish}_{i}"
            i += 1
        taken.add(name)
        return name

    for l in imp.layers.values():
        dsl = re.sub(r"[^A-Za-z0-9_]", "_", l.name)
        if not NAME_RE.fullmatch(dsl):
            dsl = "_" + dsl
        if dsl in RESERVED:
            dsl += "_"
        l.dsl = fresh(dsl)
        if l.dsl != l.name:
            why = f"'{l.name}' is a keyword of the language" if l.name in RESERVED else \
                f"'{l.name}' is not a cnnc name" if l.dsl.rstrip("_0123456789") != l.name else \
                f"another layer's name became '{l.name}'"
            imp.warn(f"layer '{l.name}' is called '{l.dsl}' in the .cnn file: {why}", l.sec)
    for l in imp.layers.values():
        if l.detached_neuron is not None:
            l.detached = fresh(f"{l.dsl}_neuron")


def ref(imp: Importer, name: str) -> str:
    """How a consumer refers to layer `name`: through its detached neuron layer, if any."""
    l = imp.layers[name]
    return l.detached or l.dsl


def emit(imp: Importer, levels: tuple[int, ...]) -> Imported:
    name = imp.net_name or default_network_name(imp.lf.file)
    lines: list[str] = []
    origins: dict[int, tuple[str, int]] = {}
    out_layers: list[ImportedLayer] = []

    def add(text: str, origin: tuple[str, int] | None = None) -> int:
        lines.append(text)
        if origin is not None:
            origins[len(lines)] = origin
        return len(lines)

    add(f"# Imported from cuda-convnet2's {Path(imp.lf.file).name} (layer definitions)")
    add(f"# and {Path(imp.pf.file).name} (layer parameters) by")
    add(f"#   {imp.command}")
    add("")
    add(f"network {name}")
    add("")
    inputs = {}
    for l in imp.layers.values():
        if not l.is_data:
            continue
        decl = f"input {l.dsl}: " + ("x".join(map(str, l.shape)) if l.role == "image" else f"label({l.args[0]})")
        inputs[l.dsl] = decl
        add(decl + (f"    # {l.comment}" if l.comment else ""), (imp.lf.file, l.sec.line))
    weighted = [l for l in imp.layers.values() if l.train is not None]
    glob = train_defaults(weighted)
    add("")
    add("train {")
    add(f"  batch = {imp.mini}")
    for key in ("lr", "lr_bias", "momentum", "momentum_bias", "weight_decay", "update_period"):
        if key in glob:
            add(f"  {key} = {fmt_setting(key, glob[key])}")
    add("}")
    add("")
    placed: dict[str, tuple[int, ...]] = {}      # .cnn name -> devices the .cnn rule gives
    for l in imp.layers.values():
        if l.is_data:
            continue
        args = [ref(imp, a) for a in l.args[:len(l.inputs)]] + l.args[len(l.inputs):] + l.extra
        layer_inputs = [ref(imp, i) for i in l.inputs if not imp.layers[i].is_data]
        inherited = placed[layer_inputs[0]] if layer_inputs else (0,)
        at = "" if inherited == l.gpus else f"@gpu({','.join(map(str, l.gpus))}) "
        placed[l.dsl] = l.gpus
        text = f"{at}{l.dsl} = {l.kind}({', '.join(args)})"
        if l.neuron:
            text += f" {l.neuron}"
        if l.train is not None:
            local = local_settings(glob, l.train, l.passes)
            if local:
                text += " { " + "; ".join(f"{k} = {fmt_setting(k, v)}" for k, v in local.items()) + " }"
        if l.comment:
            text += f"    # {l.comment}"
        line = add(text, (imp.lf.file, l.sec.line))
        out_layers.append(ImportedLayer(l.dsl, l.name, l.kind, l.gpus, l.passes, l.period_own, line, l.shape))
        if l.detached:
            line = add(f"{l.detached} = neuron({l.dsl}) {l.detached_neuron}", (imp.lf.file, l.sec.line))
            placed[l.detached] = l.gpus
            out_layers.append(ImportedLayer(l.detached, l.name, "neuron", l.gpus, l.passes, 0, line, l.shape))
    text = "\n".join(lines) + "\n"
    sources = {imp.lf.file: imp.lf.text, imp.pf.file: imp.pf.text}
    return Imported(name, text, imp.lf.file, imp.pf.file, sources, imp.warnings, out_layers, inputs, origins,
                    levels)


def fmt_setting(key: str, v: Any) -> str:
    if isinstance(v, Schedule):
        return fmt_schedule(v)
    return fmt_number(v)


def train_defaults(weighted: list[CfgLayer]) -> dict[str, Any]:
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


def local_settings(glob: dict[str, Any], want: dict[str, Any], passes: int) -> dict[str, Any]:
    """The fewest per-layer settings that, over `glob`, give the layer the values `want`
    under the .cnn rules (lr_bias defaults to the layer's lr, momentum_bias to its momentum,
    update_period 0 means once per minibatch, i.e. every `passes` passes)."""
    builtin = {key: LAYER_SETTINGS[key][2] for key in ("lr", "momentum", "weight_decay", "update_period", "wball")}
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


def default_network_name(layers_file: str) -> str:
    stem = Path(layers_file).stem
    for prefix in ("layers-", "layers_", "layer-def-", "layers"):
        if stem.startswith(prefix) and len(stem) > len(prefix):
            stem = stem[len(prefix):]
            break
    name = re.sub(r"[^A-Za-z0-9_]", "_", stem) or "net"
    if not NAME_RE.fullmatch(name):
        name = "net_" + name
    if name in RESERVED:
        name += "_"
    return name
