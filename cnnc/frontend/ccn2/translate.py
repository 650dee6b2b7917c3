"""Per-type translation: a cfg layer's keys to a .cnn call, with cuda-convnet2's semantics."""
from __future__ import annotations

import math
import re
from typing import Any

from cnnc.check.kinds import conv_out, pool_out
from cnnc.diagnostics import did_you_mean
from cnnc.frontend.ccn2.formatting import fmt_number
from cnnc.frontend.ccn2.importer import CfgLayer, Importer
from cnnc.frontend.ccn2.ini import Entry, Section
from cnnc.frontend.ccn2.vocabulary import (COSTS, FUSED_NEURON_KINDS, LABEL_COSTS, NEURON_PARAMS, NORMS,
                                           SCHEDULE_RE, SCHEDULES, SUPPORTED, UNFUSABLE_NEURONS, WEIGHTED, camel)
from cnnc.ir import Schedule


def layer_shape(imp: Importer, l: CfgLayer) -> None:
    """Translate a layer's definition: its .cnn kind, arguments and output shape, and its neuron."""
    sec, typ = l.sec, l.type
    what = f"layer '{l.name}' (type={typ})"
    ins = [imp.layers[i] for i in l.inputs]
    for inp in ins:
        if inp.role == "labels" and not (typ in LABEL_COSTS and inp is ins[0]):
            imp.fail(f"{what} cannot take the labels in '{inp.name}' as input", imp.entry(sec, "inputs"))
    l.kind = SUPPORTED[typ]
    DEFINITIONS[typ](imp, l, ins, what)
    neuron = imp.entry(sec, "neuron") if typ not in COSTS and typ != "neuron" else None
    if neuron is not None:
        spec = parse_neuron(imp, neuron, what)
        if spec == "ident":
            return
        base = spec.split("[")[0]
        if typ in FUSED_NEURON_KINDS and base not in UNFUSABLE_NEURONS:
            l.neuron = spec
        else:
            l.detached_neuron = spec


def fc(imp: Importer, l: CfgLayer, ins: list[CfgLayer], what: str) -> None:
    sec = l.sec
    outputs = imp.get_int(sec, "outputs", what, minimum=1)
    init_w = imp.single(imp.get_list(sec, "initw", what, len(ins), float, "numbers", default=0.01),
                        sec, "initw", what, "cnnc draws all of a layer's weights with one init_w")
    weight_extras(imp, l, what)
    init_b = imp.get_float(sec, "initb", what, default=0.0)
    l.args = [*l.inputs, f"outputs={outputs}", f"init_w={fmt_number(init_w)}"]
    if init_b:
        l.args.append(f"init_b={fmt_number(init_b)}")
    l.shape = (outputs, 1, 1)


def norm(imp: Importer, l: CfgLayer, ins: list[CfgLayer], what: str) -> None:
    sec, typ = l.sec, l.type
    x = ins[0]
    check_channels(imp, l, x, what)
    c, h, w = x.shape
    if typ == "cmrnorm":
        size = imp.get_int(sec, "size", what, minimum=2, maximum=c)
        if c % 16:
            imp.warn(f"{what}: cuda-convnet2 needs a multiple of 16 channels for cross-map "
                     f"normalisation, '{x.name}' has {c}; cnnc does not", imp.entry(sec, "channels") or sec)
    else:
        size = imp.get_int(sec, "size", what, minimum=1, maximum=min(h, w))
        if c > 3 and c % 4:
            imp.warn(f"{what}: cuda-convnet2 needs at most 3 or a multiple of 4 channels here, "
                     f"'{x.name}' has {c}; cnnc does not", imp.entry(sec, "channels") or sec)
    l.args = [l.inputs[0], f"size={size}"]      # scale, pow, min_div come from the parameter file
    if imp.get_bool(sec, "blocked", what, default=False):
        if typ != "cmrnorm":
            imp.fail(f"{what}: blocked windows exist only for cmrnorm layers", imp.entry(sec, "blocked"))
        l.extra.append("blocked=true")
    l.shape = x.shape


def neuron(imp: Importer, l: CfgLayer, ins: list[CfgLayer], what: str) -> None:
    entry = imp.entry(l.sec, "neuron")
    if entry is None:
        imp.fail(f"{what} is missing the required key 'neuron'", l.sec, "e.g. neuron=relu")
    l.args = [l.inputs[0]]
    l.neuron = parse_neuron(imp, entry, what)
    l.shape = ins[0].shape


def softmax(imp: Importer, l: CfgLayer, ins: list[CfgLayer], what: str) -> None:
    l.args = [l.inputs[0]]
    l.shape = (ins[0].size, 1, 1)


def same_shape(imp: Importer, l: CfgLayer, ins: list[CfgLayer], what: str) -> None:
    """One input, passed on in its shape (dropout; its keep rate is in the parameter file)."""
    l.args = [l.inputs[0]]
    l.shape = ins[0].shape


def elementwise(imp: Importer, l: CfgLayer, ins: list[CfgLayer], what: str) -> None:
    sizes = [i.size for i in ins]
    if len(set(sizes)) > 1:
        imp.fail(f"{what}: all inputs must have the same size, got "
                 + ", ".join(f"{i.name}: {i.size}" for i in ins), imp.entry(l.sec, "inputs"))
    l.args = list(l.inputs)
    l.shape = ins[0].shape


def join(imp: Importer, l: CfgLayer, ins: list[CfgLayer], what: str) -> None:
    """cuda-convnet2's pass layer is a concatenation that shares its inputs' memory
    instead of copying; in cnnc one input is `pass`, several are `concat`."""
    l.kind = "pass" if len(ins) == 1 else "concat"
    if l.kind != SUPPORTED[l.type]:
        l.comment = f"type={l.type}"
    l.args = list(l.inputs)
    if len({i.shape[1:] for i in ins}) == 1:
        l.shape = (sum(i.shape[0] for i in ins), *ins[0].shape[1:])
    else:
        imp.fail(f"{what} joins inputs of different image sizes ("
                 + ", ".join(f"{i.name}: {'x'.join(map(str, i.shape))}" for i in ins)
                 + "); cnnc concatenates the channels of images of one size", imp.entry(l.sec, "inputs"))


def cost(imp: Importer, l: CfgLayer, ins: list[CfgLayer], what: str) -> None:
    """A classification cost takes (labels, probs), cost.sum2 its one input; none aggregates others."""
    l.args = list(l.inputs) if l.type in LABEL_COSTS else [l.inputs[0]]
    l.shape = (1, 1, 1)
    if imp.get_str(l.sec, "children", what, default=""):
        imp.fail(f"{what}: aggregated costs (children=) are not supported by cnnc",
                 imp.entry(l.sec, "children"))


def check_channels(imp: Importer, l: CfgLayer, x: CfgLayer, what: str, given: int | None = None,
                   entry: Entry | None = None) -> None:
    """The `channels` a layer declares must be what its input produces.

    cuda-convnet2 sees every activation as a flat vector and reads it as
    square images of `channels` channels; cnnc keeps shapes, so the count
    must match, and a vector (an fc output) cannot be viewed as images."""
    if given is None:
        given = imp.get_int(l.sec, "channels", what, minimum=1)
        entry = imp.entry(l.sec, "channels")
    c, h, w = x.shape
    if given == c:
        return
    single = entry is not None and "," not in entry.value
    if (h, w) == (1, 1) and c > given and c % given == 0:
        imp.fail(f"{what}: channels={given} asks to view the {c} values of '{x.name}' as images; cnnc "
                 f"keeps '{x.name}' a vector of {c} values", entry,
                 f"write channels={c} (1x1 images)" if single else None)
    imp.fail(f"{what}: channels={given}, but '{x.name}' produces {c} channels ({c}x{h}x{w})", entry,
             f"write channels={c}" if single else None)


def conv_like(imp: Importer, l: CfgLayer, ins: list[CfgLayer], what: str) -> None:
    sec, n = l.sec, len(ins)
    channels = imp.get_list(sec, "channels", what, n, minimum=1)
    padding = imp.get_list(sec, "padding", what, n, default=0, minimum=0)
    stride = imp.get_list(sec, "stride", what, n, default=1, minimum=1)
    size = imp.get_list(sec, "filtersize", what, n, minimum=1)
    filters = imp.get_list(sec, "filters", what, n, minimum=1)
    groups = imp.get_list(sec, "groups", what, n, default=1, minimum=1)
    init_w = imp.get_list(sec, "initw", what, n, float, "numbers")
    modules = imp.get_int(sec, "modulesx", what, default=0, minimum=0)
    if modules:
        imp.fail(f"{what}: modulesX={modules} (a fixed output size) is not supported by cnnc",
                 imp.entry(sec, "modulesx"), "remove it: the output size then covers the whole image")
    if imp.get_str(sec, "initcfunc", what, default=""):
        imp.fail(f"{what}: initCFunc is not supported by cnnc", imp.entry(sec, "initcfunc"))
    weight_extras(imp, l, what)
    outs = []
    for i, x in enumerate(ins):
        ce = imp.entry(sec, "channels")
        check_channels(imp, l, x, what, channels[i], ce)
        if channels[i] % groups[i]:
            imp.fail(f"{what}: channels={channels[i]} is not divisible by groups={groups[i]}",
                     imp.entry(sec, "groups"))
        _, h, w = x.shape
        oh = conv_out(h, size[i], stride[i], padding[i])
        ow = conv_out(w, size[i], stride[i], padding[i])
        if oh < 1 or ow < 1 or size[i] > h + 2 * padding[i] or size[i] > w + 2 * padding[i]:
            imp.fail(f"{what}: a {size[i]}x{size[i]} filter does not fit the {h}x{w} input '{x.name}' "
                     f"with padding {padding[i]}", imp.entry(sec, "filtersize"))
        outs.append((filters[i] * groups[i], oh, ow))
        if filters[i] % 16:
            imp.warn(f"{what}: cuda-convnet2 needs filters to be a multiple of 16 ({filters[i]}); cnnc does "
                     f"not", imp.entry(sec, "filters"))
        if channels[i] > 3 and channels[i] % 4:
            imp.warn(f"{what}: cuda-convnet2 needs at most 3 or a multiple of 4 channels ({channels[i]}); "
                     f"cnnc does not", ce)
    if len(set(outs)) > 1:
        imp.fail(f"{what}: all inputs must produce equally-sized output, got "
                 + ", ".join("x".join(map(str, o)) for o in outs), imp.entry(sec, "inputs"))
    why = "cnnc's conv takes one value for all inputs" if l.type == "conv" else "cnnc's local takes one input"
    s = imp.single(size, sec, "filtersize", what, why)
    st = imp.single(stride, sec, "stride", what, why)
    p = imp.single(padding, sec, "padding", what, why)
    g = imp.single(groups, sec, "groups", what, why)
    f = imp.single(filters, sec, "filters", what, why)
    iw = imp.single(init_w, sec, "initw", what, "cnnc draws all of a layer's weights with one init_w")
    init_b = imp.get_float(sec, "initb", what, default=0.0)
    args = [*l.inputs, f"filters={f * g}", f"size={s}"]
    if st != 1:
        args.append(f"stride={st}")
    if p:
        args.append(f"padding={p}")
    if l.type == "conv":
        if g != 1:
            args.append(f"groups={g}")
        if not imp.get_bool(sec, "sharedbiases", what, default=True):
            args.append("shared_biases=false")
    elif g != 1:
        imp.fail(f"{what}: groups={g}; cnnc's local layers have no groups", imp.entry(sec, "groups"))
    args.append(f"init_w={fmt_number(iw)}")
    if init_b:
        args.append(f"init_b={fmt_number(init_b)}")
    l.args = args
    l.shape = outs[0]


def weight_extras(imp: Importer, l: CfgLayer, what: str) -> None:
    sec = l.sec
    for key, label in (("initwfunc", "initWFunc"), ("initbfunc", "initBFunc")):
        if imp.get_str(sec, key, what, default=""):
            imp.fail(f"{what}: initialising parameters with a Python function ({label}) is not supported "
                     f"by cnnc", imp.entry(sec, key),
                     f"remove {label}: " + ("weights then start N(0, initW^2)" if key == "initwfunc"
                                             else "biases then start at initB"))
    ws = imp.entry(sec, "weightsource")
    if ws is not None and any(x.strip() for x in ws.value.split(",")):
        imp.fail(f"{what}: weight sharing (weightSource) is not supported by cnnc", ws)


def pool(imp: Importer, l: CfgLayer, ins: list[CfgLayer], what: str) -> None:
    sec, x = l.sec, ins[0]
    check_channels(imp, l, x, what)
    c, h, w = x.shape
    kind = imp.get_str(sec, "pool", what)
    if kind not in ("max", "avg", "maxabs"):
        imp.fail(f"{what}: pool must be max or avg, not {kind!r}", imp.entry(sec, "pool"),
                 did_you_mean(kind, ("max", "avg")))
    if kind == "maxabs":
        imp.fail(f"{what}: pool=maxabs is not supported by cnnc", imp.entry(sec, "pool"))
    size = imp.get_int(sec, "sizex", what, minimum=1, maximum=min(h, w))
    start = imp.get_int(sec, "start", what, default=0)
    stride = imp.get_int(sec, "stride", what, minimum=1, maximum=size)
    outputs = imp.get_int(sec, "outputsx", what, default=0, minimum=0)
    if start < 0:
        imp.fail(f"{what}: start={start} makes windows begin outside the image, which cnnc does not support",
                 imp.entry(sec, "start"))
    if size > h - start or size > w - start:
        imp.fail(f"{what}: a {size}x{size} window does not fit the {h}x{w} input from start {start}",
                 imp.entry(sec, "sizex"))
    if grad_below(imp, x) and c % 16:
        imp.warn(f"{what}: cuda-convnet2 needs a multiple of 16 channels to pool under trained layers, "
                 f"'{x.name}' has {c}; cnnc does not", imp.entry(sec, "channels") or sec)
    oh = outputs or pool_out(h, size, stride, start)
    ow = outputs or pool_out(w, size, stride, start)
    l.kind = "maxpool" if kind == "max" else "avgpool"
    l.args = [l.inputs[0], f"size={size}", f"stride={stride}"]
    if start:
        l.args.append(f"start={start}")
    if outputs:
        l.args.append(f"outputs={outputs}")
    l.shape = (c, oh, ow)


def grad_below(imp: Importer, l: CfgLayer) -> bool:
    if l.type in WEIGHTED:
        return True
    return any(grad_below(imp, imp.layers[i]) for i in l.inputs)


def parse_neuron(imp: Importer, e: Entry, what: str) -> str:
    text = e.value.strip()
    m = re.fullmatch(r"(\w+)\s*(?:\[([^\]]*)\])?", text)
    if not m:
        imp.fail(f"{what}: cannot read the neuron {text!r}", e, "write e.g. relu or tanh[1.7,0.66]")
    name, params = m.group(1), m.group(2)
    if name not in NEURON_PARAMS:
        imp.fail(f"{what}: unknown neuron '{name}'", e,
                 did_you_mean(name, NEURON_PARAMS) or f"neurons: {', '.join(sorted(NEURON_PARAMS))}")
    count = NEURON_PARAMS[name]
    if count is None:
        imp.fail(f"{what}: cnnc has no {name} neuron", e)
    vals = []
    if params is not None:
        for p in params.split(","):
            try:
                vals.append(float(p.strip()))
            except ValueError:
                imp.fail(f"{what}: neuron parameters are numbers, not {p.strip()!r}", e)
    if len(vals) != count:
        imp.fail(f"{what}: the {name} neuron takes {count} parameter{'s' if count != 1 else ''}, "
                 f"got {len(vals)}", e,
                 {0: f"write neuron={name}", 1: f"write e.g. neuron={name}[1]",
                   2: f"write e.g. neuron={name}[1,1]"}[count])
    return name + (f"[{', '.join(fmt_number(v) for v in vals)}]" if vals else "")


def layer_params(imp: Importer, l: CfgLayer) -> None:
    """Translate a layer's section of the parameter file, which cuda-convnet2 requires for some types."""
    typ = l.type
    if typ not in PARAMETERS:
        return
    sec = imp.pf.sections.get(l.name)
    what = f"layer '{l.name}' (type={typ})"
    if sec is None:
        needs = {"weights": "epsW, epsB, momW and momB", "norm": "scale and pow", "cost": "coeff"}
        group = "weights" if typ in WEIGHTED else "norm" if typ in NORMS else "cost" if typ in COSTS else ""
        hint = f"add [{l.name}] with {needs[group]}" if group else \
            f"add [{l.name}] (it may be empty)"
        imp.fail(f"{what} needs a section [{l.name}] in {imp.pf.file}", l.sec, hint)
    PARAMETERS[typ](imp, l, sec, what)


def norm_params(imp: Importer, l: CfgLayer, sec: Section, what: str) -> None:
    scale = imp.get_float(sec, "scale", what)
    pw = imp.get_float(sec, "pow", what)
    min_div = imp.get_float(sec, "mindiv", what, default=1.0)
    l.args += [f"scale={fmt_number(scale)}", f"pow={fmt_number(pw)}"]
    if min_div != 1.0:
        l.args.append(f"min_div={fmt_number(min_div)}")


def dropout_params(imp: Importer, l: CfgLayer, sec: Section, what: str) -> None:
    enable = imp.get_bool(sec, "enable", what, default=True)
    keep = imp.get_float(sec, "keep", what, default=0.5)
    if not enable:
        l.kind = "pass"
        l.comment = f"{l.type} with enable=false passes its input through"
    else:
        if not 0 < keep <= 1:
            imp.fail(f"{what}: keep must lie in (0, 1], not {fmt_number(keep)}", imp.entry(sec, "keep"))
        if keep != 0.5:
            l.args.append(f"keep={fmt_number(keep)}")


def eltsum_params(imp: Importer, l: CfgLayer, sec: Section, what: str) -> None:
    e = imp.entry(sec, "coeffs")
    coeffs = [1.0] * len(l.inputs)
    if e is not None:
        if len(e.value.split(",")) != len(l.inputs):
            imp.fail(f"{what}: 'coeffs' lists {len(e.value.split(','))} values for {len(l.inputs)} "
                     f"inputs", e, "give one coefficient per input")
        coeffs = imp.get_list(sec, "coeffs", what, len(l.inputs), float, "numbers")
    if len(l.inputs) == 1:
        if coeffs[0] != 1:
            imp.fail(f"{what}: a one-input eltsum that scales by {fmt_number(coeffs[0])} has no cnnc "
                     f"equivalent", e, "give the layer two or more inputs")
        l.kind, l.comment = "pass", "eltsum of one input"
    elif any(c != 1 for c in coeffs):
        l.args.append(f"coeffs=[{', '.join(fmt_number(c) for c in coeffs)}]")


def cost_params(imp: Importer, l: CfgLayer, sec: Section, what: str) -> None:
    coeff = imp.get_float(sec, "coeff", what)
    if coeff != 1:
        l.args.append(f"coeff={fmt_number(coeff)}")
    if l.type == "cost.logreg":
        top_k = imp.get_int(sec, "topk", what, default=1, minimum=1)
        classes = imp.layers[l.inputs[1]].size
        if top_k > classes:
            imp.fail(f"{what}: topk={top_k} exceeds the {classes} classes", imp.entry(sec, "topk"))
        if top_k != 1:
            l.args.append(f"top_k={top_k}")


def weight_params(imp: Importer, l: CfgLayer, sec: Section, what: str) -> None:
    n = len(l.inputs)
    one = "cnnc gives a layer one value for all its inputs"
    eps_w = imp.single(schedules(imp, sec, "epsw", what, n), sec, "epsw", what, one)
    eps_b = schedules(imp, sec, "epsb", what, 1)[0]
    mom_w = imp.single(imp.get_list(sec, "momw", what, n, float, "numbers", minimum=0), sec, "momw", what, one)
    mom_b = imp.get_float(sec, "momb", what, minimum=0)
    wc = imp.single(imp.get_list(sec, "wc", what, n, float, "numbers", default=0.0, minimum=0),
                    sec, "wc", what, one)
    wball = imp.single(imp.get_list(sec, "wball", what, n, float, "numbers", default=0.0, minimum=0),
                       sec, "wball", what, one)
    unsupported = []
    if l.type == "conv":
        unsupported += [("wcnormmax", "weight-norm constraints (wcNormMax)", True),
                        ("wcnormmin", "weight-norm constraints (wcNormMin)", True)]
    unsupported += [("supereps", "superEps", False), ("supermom", "superMom", False)]
    for key, label, is_list in unsupported:
        vals = imp.get_list(sec, key, what, n, float, "numbers", default=0.0) if is_list else \
            [imp.get_float(sec, key, what, default=0.0)]
        if any(vals):
            imp.fail(f"{what}: {label} is not supported by cnnc", imp.entry(sec, key),
                     "set it to 0 or remove it")
    period = imp.get_int(sec, "updateperiod", what, default=0, minimum=0)
    l.train = {"lr": eps_w, "lr_bias": eps_b, "momentum": mom_w, "momentum_bias": mom_b,
               "weight_decay": wc, "wball": wball, "update_period_cfg": period}


def schedules(imp: Importer, sec: Section, key: str, what: str, n: int) -> list[Schedule]:
    e = imp.raw(sec, key, what)
    parts = [p.strip() for p in e.value.split(",")]
    if key == "epsb" and len(parts) != 1:
        imp.fail(f"'{e.name}' lists {len(parts)} schedules; a layer has one bias vector, so one schedule", e)
    if len(parts) != n and len(parts) != 1:
        imp.fail(f"'{e.name}' lists {len(parts)} schedules but {what} has {n} input{'s' if n > 1 else ''}",
                 e, "give one schedule for every input, or one for all of them")
    out = [schedule(imp, e, p) for p in parts]
    return out * n if len(out) == 1 else out


def schedule(imp: Importer, e: Entry, text: str) -> Schedule:
    example = "a number, or const[base=X], linear[base=X;tgtFactor=Y], exp[base=X;tgtFactor=Y] or " \
              "dexp[base=X;tgtFactor=Y;numSteps=N]"
    try:
        v = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(v) or v < 0:
            imp.fail(f"'{e.name}': a learning rate must be a finite number of at least 0, not {text}", e)
        return Schedule("const", v)
    m = SCHEDULE_RE.match(text)
    if not m or m.group(1).lower() not in SCHEDULES:
        got = m.group(1) if m else text
        imp.fail(f"'{e.name}': unknown learning-rate schedule {got!r}", e,
                 (did_you_mean(got.lower(), SCHEDULES) or "") + ("; " if did_you_mean(got.lower(), SCHEDULES)
                                                                   else "") + f"write {example}")
    kind = m.group(1).lower()
    spec = SCHEDULES[kind]
    vals: dict[str, Any] = {}
    body = m.group(2)
    for item in ([] if body is None or not body.strip() else body.split(";")):
        if "=" not in item:
            imp.fail(f"'{e.name}': expected key=value inside {kind}[...], got {item.strip()!r}", e,
                     f"write {example}")
        k, v = (s.strip() for s in item.split("=", 1))
        names = {n for n, _ in spec}
        if k.lower() not in names:
            imp.fail(f"'{e.name}': {kind} has no parameter '{k}'", e,
                     f"{kind} takes " + ", ".join(camel(n) for n, _ in spec))
        if k.lower() in vals:
            imp.fail(f"'{e.name}': '{k}' is given twice in {kind}[...]", e)
        typ = dict(spec)[k.lower()]
        try:
            vals[k.lower()] = typ(v)
        except ValueError:
            imp.fail(f"'{e.name}': {k} must be {'an integer' if typ is int else 'a number'}, not {v!r}", e)
    missing = [camel(n) for n, _ in spec if n not in vals]
    if missing:
        imp.fail(f"'{e.name}': {kind} needs {', '.join(missing)}", e,
                 f"write e.g. {kind}[" + ";".join(f"{camel(n)}=..." for n, _ in spec) + "]")
    base = vals["base"]
    if not math.isfinite(base) or base < 0:
        imp.fail(f"'{e.name}': base must be a finite number of at least 0", e)
    tgt = vals.get("tgtfactor", 1.0)
    if not math.isfinite(tgt) or tgt < 1:
        imp.fail(f"'{e.name}': tgtFactor={fmt_number(tgt)}; cnnc's schedules need a tgtFactor of at least 1",
                 e, "the rate goes from base down to base/tgtFactor")
    steps = vals.get("numsteps", 1)
    if steps < 1:
        imp.fail(f"'{e.name}': numSteps must be at least 1", e)
    return Schedule(kind, float(base), float(tgt), int(steps))


# cuda-convnet2 type -> the translation of its section in the layer-definition file
DEFINITIONS = {
    "conv": conv_like, "local": conv_like, "fc": fc, "pool": pool, **{t: norm for t in NORMS}, "neuron": neuron,
    "softmax": softmax, "dropout": same_shape, "dropout2": same_shape, "eltsum": elementwise,
    "eltmax": elementwise, "concat": join, "pass": join, **{t: cost for t in COSTS},
}
# cuda-convnet2 type -> the translation of its section in the layer-parameter file, which it
# refuses to build such a layer without
PARAMETERS = {
    **{t: weight_params for t in WEIGHTED}, **{t: norm_params for t in NORMS}, "dropout": dropout_params,
    "dropout2": dropout_params, "eltsum": eltsum_params, **{t: cost_params for t in COSTS},
}
