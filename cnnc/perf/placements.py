"""Placements of one network on N devices, written as .cnn text: what `cnnc scale` compares and
`cnnc place` searches.

A pure function of the parsed program and its checked network: the layers, arguments, neurons
and settings are the source's; only `@gpu(...)`, the batch, the exchange scheme, the pipeline
settings and (for slices) the layer names, inputs and filter or output counts change.  With
`scale_batch` (the default) the batch is the source's times the devices, so each device keeps
the source's work per step, as Krizhevsky's "One weird trick" measures; `batch` sets it outright.

- data: every layer on all N devices (N replicas).
- model: every conv (one group) and fc layer cut by its filters or outputs into N slices, slice i
  on device i reading all slices of its inputs (a multi-input conv or fc sums them, so it still
  sees every channel); a per-channel layer (pool, normalisation, neuron, dropout, pass) follows
  its input's slices.  A cross-channel normalisation then sees only its slice's channels, as in
  the two-tower AlexNet of 2012: a placement for timing, not the same function.  Layers that
  need one input (softmax, costs, `local`, grouped convs, an fc feeding a softmax) run whole on
  device 0, joining slices with a multi-input fc/conv or a `concat`.
- hybrid: the layers before the first fc (in topological order) replicated on all N; the
  first fc, every layer after it and every layer reading one of them (the top) sliced across
  the first K devices as in `model`, replicated on them, or whole on device 0, with one of
  the three exchange schemes ("One weird trick": convolutions data parallel, fc layers
  model parallel).
- pipeline: N stages of consecutive layers (topological order), cut to balance the layers'
  costs, 4N micro-batches by default, in 1F1B order.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from cnnc.check.kinds import KINDS
from cnnc.diagnostics import Span
from cnnc.frontend import ast
from cnnc.ir import Network

STRATEGIES = ("data", "model", "hybrid", "pipeline")
EXCHANGES = ("round_robin", "all_gather", "scatter")
PIPELINE_SCHEDULES = ("one_f_one_b", "gpipe")
SLICED_BY = {"conv": "filters", "fc": "outputs"}        # the argument a model-parallel cut divides
PER_CHANNEL = {"maxpool", "avgpool", "cmrnorm", "rnorm", "cnorm", "neuron", "dropout", "dropout2", "pass"}


class Skipped(Exception):
    """A placement this network or device count cannot have; the message says why."""


@dataclass(frozen=True)
class Placement:
    strategy: str
    devices: int
    batch: int
    text: str
    exchange: str | None = None


@dataclass
class _Stmt:
    """One layer statement being laid out."""
    name: str
    decl: ast.LayerDecl
    inputs: list[str]
    gpus: tuple[int, ...]
    args: dict[str, ast.Value] = field(default_factory=dict)       # keyword arguments replaced
    settings: dict[str, ast.Value] = field(default_factory=dict)   # per-layer settings added or replaced


# ------------------------------------------------------------------ rendering .cnn text

def _fmt_value(v) -> str:
    if isinstance(v, ast.Number):
        return str(int(v.value)) if v.is_int else repr(float(v.value))
    if isinstance(v, ast.NameRef):
        return v.name
    if isinstance(v, ast.String):
        return f'"{v.value}"'                   # the language's strings have no escapes
    if isinstance(v, ast.ListValue):
        return "[" + ", ".join(_fmt_value(i) for i in v.items) + "]"
    if isinstance(v, ast.Call):
        return f"{v.func}(" + ", ".join(_fmt_arg(a) for a in v.args) + ")"
    raise TypeError(v)


def _fmt_arg(a: ast.Arg) -> str:
    return _fmt_value(a.value) if a.name is None else f"{a.name}={_fmt_value(a.value)}"


def _number(n: int) -> ast.Number:
    return ast.Number(float(n), True, _NOWHERE)


def _name(n: str) -> ast.NameRef:
    return ast.NameRef(n, _NOWHERE)


def _fmt_stmt(s: _Stmt) -> str:
    d = s.decl
    keyword = [a for a in d.args if a.name is not None]
    args = list(s.inputs) + [f"{a.name}={_fmt_value(s.args.get(a.name, a.value))}" for a in keyword]
    args += [f"{k}={_fmt_value(v)}" for k, v in s.args.items() if all(a.name != k for a in keyword)]
    line = f"@gpu({','.join(map(str, s.gpus))}) {s.name} = {d.kind}({', '.join(args)})"
    if d.neuron is not None:
        line += " " + d.neuron.name
        if d.neuron.params:
            line += "[" + ", ".join(repr(float(p)) for p in d.neuron.params) + "]"
    settings = {st.name: st.value for st in d.settings}
    settings.update(s.settings)
    if settings:
        line += " { " + "; ".join(f"{k} = {_fmt_value(v)}" for k, v in settings.items()) + " }"
    return line


def _render(program: ast.Program, stmts: list[_Stmt], train: dict[str, ast.Value], header: str) -> str:
    out = [f"# {line}" if line else "#" for line in header.splitlines()]
    out.append(f"network {program.name}")
    out.append("")
    for st in program.statements:
        if isinstance(st, ast.ImageInput):
            out.append(f"input {st.name}: {'x'.join(map(str, st.dims))}")
        elif isinstance(st, ast.LabelInput):
            out.append(f"input {st.name}: label({_fmt_value(st.classes)})")
    settings: dict[str, ast.Value] = {}
    for st in program.statements:
        if isinstance(st, ast.TrainBlock):
            settings.update({s.name: s.value for s in st.settings})
    settings.update(train)
    out.append("")
    out.append("train {")
    out.extend(f"  {k} = {_fmt_value(v)}" for k, v in settings.items())
    out.append("}")
    out.append("")
    out.extend(_fmt_stmt(s) for s in stmts)
    return "\n".join(out) + "\n"


_NOWHERE = Span(0, 0, 0, 0)           # generated text has no source position


# ------------------------------------------------------------------ the strategies

def _decls(program: ast.Program) -> dict[str, ast.LayerDecl]:
    return {st.name: st for st in program.statements if isinstance(st, ast.LayerDecl)}


def _train(net: Network, batch: int, **extra) -> dict[str, ast.Value]:
    values = {"batch": _number(batch)}
    for k, v in extra.items():
        values[k] = _number(v) if isinstance(v, int) else _name(v)
    return values


def _scaled_batch(net: Network, devices: int, scale_batch: bool, batch: int | None = None) -> int:
    """The placement's batch: `batch` where given, else the source's, times the devices when
    `scale_batch`."""
    if batch is not None:
        return batch
    return net.batch * devices if scale_batch else net.batch


def _needs_one_input(net: Network, name: str) -> bool:
    """Consumers that read one whole input: a softmax or a cost."""
    return any(c.kind == "softmax" or KINDS[c.kind].is_cost for c in net.consumers(name))


def _fresh(taken: set[str], wish: str) -> str:
    name = wish
    while name in taken:
        name += "_"
    taken.add(name)
    return name


def _shares(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def _slice_region(net: Network, decls: dict[str, ast.LayerDecl], region: list[str], devices: tuple[int, ...],
                  taken: set[str]) -> tuple[list[_Stmt], dict]:
    """Lay out the layers of `region` (topological order) model-parallel over `devices`.
    Returns the statements and, per layer, the names of its slices (one name: not sliced)."""
    slices: dict[str, list[str]] = {}
    stmts: list[_Stmt] = []
    k = len(devices)
    for name in region:
        layer = net.node(name)
        decl = decls[name]
        ins = [slices.get(i, [i]) for i in layer.inputs]
        sliced_input = any(len(s) > 1 for s in ins)
        by = SLICED_BY.get(layer.kind)
        if k > 1 and by and layer.args.get("groups", 1) == 1 and not _needs_one_input(net, name):
            counts = _shares(layer.args[by], k)
            if min(counts) < 1:
                raise Skipped(f"{name} has {layer.args[by]} {by}, fewer than the {k} devices to slice it over")
            names = [_fresh(taken, f"{name}_{i}") for i in range(k)]
            flat = [n for s in ins for n in s]
            for i, n in enumerate(names):
                stmts.append(_Stmt(n, decl, flat, (devices[i],), {by: _number(counts[i])}))
            slices[name] = names
        elif layer.kind in PER_CHANNEL and sliced_input:
            names = [_fresh(taken, f"{name}_{i}") for i in range(k)]
            for i, n in enumerate(names):
                stmts.append(_Stmt(n, decl, [ins[0][i]], (devices[i],)))
            slices[name] = names
        else:
            flat: list[str] = []
            multi = KINDS[layer.kind].max_inputs is None and layer.kind in SLICED_BY
            for s in ins:
                if len(s) > 1 and not multi:
                    joined = _fresh(taken, f"{name}_in")
                    stmts.append(_Stmt(joined, _concat_decl(), s, (devices[0],)))
                    flat.append(joined)
                else:
                    flat.extend(s)
            stmts.append(_Stmt(name, decl, flat, (devices[0],)))
            slices[name] = [name]
    return stmts, slices


def _concat_decl() -> ast.LayerDecl:
    return ast.LayerDecl("", "concat", (), None, (), None, _NOWHERE, _NOWHERE, _NOWHERE)


def data_parallel(program: ast.Program, net: Network, devices: int, scale_batch: bool = True,
                  batch: int | None = None) -> Placement:
    batch = _scaled_batch(net, devices, scale_batch, batch)
    if batch % devices:
        raise Skipped(f"batch {batch} does not split into {devices} equal shares")
    decls = _decls(program)
    gpus = tuple(range(devices))
    stmts = [_Stmt(l.name, decls[l.name], list(l.inputs), gpus) for l in net.layers]
    text = _render(program, stmts, _train(net, batch),
                   f"{net.name}: data parallel on {devices} device(s), batch {batch}")
    return Placement("data", devices, batch, text)


def model_parallel(program: ast.Program, net: Network, devices: int, scale_batch: bool = True,
                   batch: int | None = None) -> Placement:
    batch = _scaled_batch(net, devices, scale_batch, batch)
    decls = _decls(program)
    taken = {n.name for n in net.inputs + net.layers}
    stmts, _ = _slice_region(net, decls, [l.name for l in net.layers], tuple(range(devices)), taken)
    text = _render(program, stmts, _train(net, batch),
                   f"{net.name}: model parallel on {devices} device(s) (conv and fc layers sliced), batch {batch}")
    return Placement("model", devices, batch, text)


def high_layers(net: Network, cut: int | None = None) -> list[str]:
    """The layers of a hybrid's model-parallel top: from position `cut` of the topological order
    on (default: the first fc layer), and every layer that reads one of them."""
    if cut is None:
        cut = next((i for i, l in enumerate(net.layers) if l.kind == "fc"), None)
        if cut is None:
            raise Skipped("no fc layer to slice: hybrid is data parallel here")
    high: set[str] = set()
    for i, l in enumerate(net.layers):
        if i >= cut or any(x in high for x in l.inputs):
            high.add(l.name)
    return [l.name for l in net.layers if l.name in high]


def hybrid(program: ast.Program, net: Network, devices: int, exchange: str = "round_robin",
           scale_batch: bool = True, high_devices: int | None = None, update_period: int = 0,
           cut: int | None = None, replicate_top: bool = False, batch: int | None = None) -> Placement:
    """Low layers replicated on all devices, the top (`high_layers`) sliced across the first
    `high_devices` (default all; 1: the whole top on device 0), or with `replicate_top`
    replicated on them (data parallel with fewer replicas)."""
    if exchange not in EXCHANGES:
        raise ValueError(exchange)
    batch = _scaled_batch(net, devices, scale_batch, batch)
    high_devices = devices if high_devices is None else high_devices
    if devices < 2:
        raise Skipped("a hybrid needs 2 or more devices")
    if batch % devices:
        raise Skipped(f"batch {batch} does not split into {devices} equal shares")
    if exchange == "scatter" and batch % (devices * devices):
        raise Skipped(f"scatter needs a batch that is a multiple of {devices}² = {devices * devices}, not {batch}")
    top = high_layers(net, cut)
    if len(top) == len(net.layers):
        raise Skipped("every layer is in the model-parallel top: nothing to replicate")
    decls = _decls(program)
    taken = {n.name for n in net.inputs + net.layers}
    gpus = tuple(range(devices))
    low = [_Stmt(l.name, decls[l.name], list(l.inputs), gpus) for l in net.layers if l.name not in top]
    if high_devices > 1 and devices % high_devices:
        raise Skipped(f"{high_devices} top devices do not divide the {devices} replicas below them")
    if replicate_top:
        high = [_Stmt(n, decls[n], list(net.node(n).inputs), tuple(range(high_devices))) for n in top]
    else:
        high, _ = _slice_region(net, decls, top, tuple(range(high_devices)), taken)
    if update_period:
        for s in high:
            if s.decl.kind in SLICED_BY:
                s.settings["update_period"] = _number(update_period)
    text = _render(program, low + high, _train(net, batch, exchange=exchange),
                   f"{net.name}: hybrid on {devices} device(s), batch {batch}: {len(low)} layers replicated, "
                   f"{len(top)} from {top[0]} on {'replicated on' if replicate_top else 'across'} "
                   f"{high_devices} device(s), exchange {exchange}"
                   + (f", update every {update_period} pass(es)" if update_period else ""))
    return Placement("hybrid", devices, batch, text, exchange)


def balanced_cuts(costs: list[float], stages: int) -> list[int]:
    """Where each of `stages` contiguous stages starts, minimising the costliest stage (the
    linear-partition dynamic programme; ties go to the earliest cut)."""
    n = len(costs)
    if stages > n:
        raise Skipped(f"{stages} pipeline stages need {stages} layers, the network has {n}")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    start = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for j in range(s, n + 1):
            for i in range(s - 1, j):
                v = max(best[s - 1][i], prefix[j] - prefix[i])
                if v < best[s][j]:
                    best[s][j], start[s][j] = v, i
    cuts, j = [], n
    for s in range(stages, 0, -1):
        cuts.append(start[s][j])
        j = start[s][j]
    return cuts[::-1]


def pipeline(program: ast.Program, net: Network, devices: int, microbatches: int | None = None,
             schedule: str = "one_f_one_b", scale_batch: bool = True, layer_costs: dict[str, float] | None = None,
             cuts: list[int] | None = None, batch: int | None = None) -> Placement:
    """Stage s (consecutive layers) on device s; `cuts` gives each stage's first layer (default:
    balanced by `layer_costs`, one per layer without them); costs ride with the stage before."""
    batch = _scaled_batch(net, devices, scale_batch, batch)
    microbatches = microbatches or 4 * devices
    if devices < 2:
        raise Skipped("a pipeline needs 2 or more devices")
    if batch % microbatches:
        raise Skipped(f"batch {batch} does not split into {microbatches} micro-batches")
    body = [l for l in net.layers if not KINDS[l.kind].is_cost]
    if cuts is None:
        costs = [(layer_costs or {}).get(l.name, 1.0) for l in body]
        cuts = balanced_cuts(costs, devices)
    if len(cuts) != devices or cuts[0] != 0 or any(b <= a for a, b in zip(cuts, cuts[1:])) or cuts[-1] >= len(body):
        raise Skipped(f"{devices} pipeline stages need {devices} layers, the network has {len(body)}")
    stage_of = {}
    for s, (a, b) in enumerate(zip(cuts, cuts[1:] + [len(body)])):
        for l in body[a:b]:
            stage_of[l.name] = s
    decls = _decls(program)
    stmts = []
    for l in net.layers:
        s = stage_of.get(l.name, max((stage_of.get(i, 0) for i in l.inputs), default=0))
        stage_of[l.name] = s
        stmts.append(_Stmt(l.name, decls[l.name], list(l.inputs), (s,)))
    text = _render(program, stmts, _train(net, batch, microbatches=microbatches, pipeline=schedule),
                   f"{net.name}: pipeline of {devices} stages, batch {batch} in {microbatches} micro-batches, "
                   f"{schedule}; stages start at " + ", ".join(body[c].name for c in cuts))
    return Placement("pipeline", devices, batch, text)


def variants(strategy: str) -> list[str | None]:
    """The variants `cnnc scale` compares for a strategy: a hybrid's exchange schemes."""
    if strategy not in STRATEGIES:
        raise ValueError(strategy)
    return list(EXCHANGES) if strategy == "hybrid" else [None]


def make_placement(program: ast.Program, net: Network, strategy: str, devices: int, variant: str | None = None,
                   scale_batch: bool = True, layer_costs: dict[str, float] | None = None) -> Placement:
    """One strategy's placement (hybrid: with exchange scheme `variant`); raises Skipped when
    this network or device count cannot have it."""
    if strategy == "data":
        return data_parallel(program, net, devices, scale_batch)
    if strategy == "model":
        return model_parallel(program, net, devices, scale_batch)
    if strategy == "pipeline":
        return pipeline(program, net, devices, scale_batch=scale_batch, layer_costs=layer_costs)
    if strategy == "hybrid":
        return hybrid(program, net, devices, variant or "round_robin", scale_batch)
    raise ValueError(strategy)
