"""The layer graph: types and inputs, data layers' roles, keys nobody reads, unused layers, classes."""
from __future__ import annotations

from cnnc.diagnostics import did_you_mean
from cnnc.frontend.ccn2.importer import CfgLayer, Importer
from cnnc.frontend.ccn2.ini import Section
from cnnc.frontend.ccn2.placement import check_consumers
from cnnc.frontend.ccn2.vocabulary import (ALL_LAYER_KEYS, ALL_PARAM_KEYS, COSTS, LABEL_COSTS, LAYER_KEYS, NORMS,
                                           PARAM_KEYS, SUPPORTED, TUNING_KEYS, UNSUPPORTED, camel,
                                           did_you_mean_word)


def structure(imp: Importer, sec: Section) -> None:
    name = sec.name
    if imp.entry(sec, "type") is None:
        swapped = not any("type" in x.entries for x in imp.lf.sections.values()) and \
            any(k in ALL_PARAM_KEYS for k in sec.entries)
        imp.fail(f"layer '{name}' has no type", sec,
                 f"{imp.lf.file} looks like a layer-parameter file: give the layer-definition file first"
                 if swapped else "add e.g. type=conv")
    te = imp.entry(sec, "type")
    typ = te.value.strip()
    if typ in UNSUPPORTED:
        imp.fail(f"cnnc does not support cuda-convnet2's {UNSUPPORTED[typ]} layers (type={typ})", te)
    if typ not in SUPPORTED:
        known = list(SUPPORTED) + list(UNSUPPORTED)
        imp.fail(f"unknown layer type '{typ}'", te,
                 did_you_mean(typ, known) or f"cuda-convnet2's types: {', '.join(sorted(SUPPORTED))}")
    l = CfgLayer(name, typ, sec)
    what = f"layer '{name}' (type={typ})"
    if typ == "data":
        imp.get_int(sec, "dataidx", what, minimum=0)
        imp.layers[name] = l
        return
    ie = imp.raw(sec, "inputs", what)
    l.inputs = [x.strip() for x in ie.value.split(",")]
    defined = list(imp.layers)
    for inp in l.inputs:
        if inp not in imp.layers:
            later = imp.lf.sections.get(inp)
            if later is not None:
                hint = f"'{inp}' is defined on line {later.line}: cuda-convnet2 needs a layer's inputs " \
                       f"defined above it"
            elif inp == "":
                hint = "remove the empty entry from the list"
            else:
                hint = did_you_mean(inp, defined)
            imp.fail(f"{what}: input layer '{inp}' is not defined", ie, hint)
    n_in = len(l.inputs)
    want = {"softmax": 1, "neuron": 1, "pool": 1, "dropout": 1, "dropout2": 1, "cost.sum2": 1,
            "cost.logreg": 2, "cost.ce": 2, **{t: 1 for t in NORMS}}.get(typ)
    if want is not None and n_in != want:
        imp.fail(f"{what} takes {want} input{'s' if want > 1 else ''}, got {n_in}", ie)
    if typ == "eltmax" and n_in < 2:
        imp.fail(f"{what} needs at least 2 inputs, got {n_in}", ie)
    if typ == "local" and n_in > 1:
        imp.fail(f"{what} has {n_in} inputs; cnnc's local layers take one", ie,
                 "a conv layer may sum several inputs; a local layer cannot in cnnc")
    first = imp.layers[l.inputs[0]]
    ge = imp.entry(sec, "gpu")
    if ge is not None:
        items = [x.strip() for x in ge.value.split(",")]
        gpus = tuple(imp._convert(ge, x, int, "a comma-separated list of device ids", 0) for x in items)
        if len(set(gpus)) != len(gpus):
            imp.fail(f"{what}: all replicas must run on different GPUs ({ge.value})", ge)
        l.gpus, l.gpu_entry = gpus, ge
    elif first.gpus is not None:
        l.gpus, l.gpu_entry = first.gpus, first.gpu_entry
    else:
        l.gpus = None        # decided once the whole graph is known
    imp.layers[name] = l


def check_usage(imp: Importer) -> None:
    """Unused layers and the replica rule between a layer and its consumers."""
    for l in imp.layers.values():
        consumers = [c for c in imp.layers.values() if l.name in c.inputs]
        if not consumers and not l.type.startswith("cost."):
            imp.fail(f"layer '{l.name}' (type={l.type}) is unused", l.sec,
                     "every layer but a cost must feed another layer")
        check_consumers(imp, l, consumers)
        if l.type.startswith("cost.") and consumers:
            imp.fail(f"cost layer '{l.name}' is the input of '{consumers[0].name}'",
                     imp.entry(consumers[0].sec, "inputs"), "a cost layer ends the network")


def assign_roles(imp: Importer) -> None:
    """A data layer that a logreg or cross-entropy cost takes first holds labels; the rest images."""
    for l in imp.layers.values():
        if not l.is_data:
            continue
        uses = [(c, c.inputs.index(l.name)) for c in imp.layers.values() if l.name in c.inputs]
        as_labels = [c for c, i in uses if c.type in LABEL_COSTS and i == 0]
        other = [c for c, i in uses if not (c.type in LABEL_COSTS and i == 0)]
        if as_labels and other:
            imp.fail(f"data layer '{l.name}' holds the labels of '{as_labels[0].name}' and is also an input "
                     f"of '{other[0].name}'", imp.entry(other[0].sec, "inputs"),
                     "cnnc feeds labels only to cost layers")
        l.role = "labels" if as_labels else "image"
    images = [l for l in imp.layers.values() if l.is_data and l.role == "image"]
    for key in list(imp.shapes):
        if key is None:
            if len(images) != 1:
                imp.fail_cli("--input-shape", "a shape without NAME= needs exactly one image data layer; "
                             f"{imp.lf.file} has {len(images)}", "write --input-shape NAME=CxHxW")
            imp.shapes[images[0].name] = imp.shapes.pop(None)
    for key in imp.shapes:
        l = imp.layers.get(key)
        if l is None or not l.is_data:
            data = [x.name for x in imp.layers.values() if x.is_data]
            imp.fail_cli("--input-shape", f"{imp.lf.file} has no data layer named '{key}'",
                         did_you_mean(key, data) or f"its data layers: {', '.join(data)}")
        if l.role == "labels":
            imp.fail_cli("--input-shape", f"data layer '{key}' holds labels, not images",
                         "the number of classes comes from the cost layer's softmax, or from --classes")
    for l in images:
        if l.name not in imp.shapes:
            consumer = next(c for c in imp.layers.values() if l.name in c.inputs)
            ce = imp.entry(consumer.sec, "channels")
            c = ce.value.split(",")[consumer.inputs.index(l.name) if "," in ce.value else 0].strip() \
                if ce is not None else "C"
            imp.fail(f"data layer '{l.name}' needs an image shape: cuda-convnet2 takes it from its data "
                     f"provider, and the .cfg files do not give it", l.sec,
                     f"pass --input-shape {l.name}=CxHxW, e.g. --input-shape {l.name}={c}x224x224")
        l.shape = imp.shapes[l.name]
    for l in imp.layers.values():
        if l.is_data:
            data_range(imp, l)
            if l.role == "labels":
                l.shape = (1, 1, 1)


def data_range(imp: Importer, l: CfgLayer) -> None:
    what = f"data layer '{l.name}'"
    start = imp.get_int(l.sec, "start", what, default=0)
    if start != 0:
        imp.fail(f"{what} takes a slice of its data array (start={start}); cnnc feeds whole arrays",
                 imp.entry(l.sec, "start"))
    if imp.entry(l.sec, "end") is not None and l.role == "image":
        end = imp.get_int(l.sec, "end", what)
        c, h, w = imp.shapes[l.name]
        if end != c * h * w:
            imp.fail(f"{what} ends at {end}, but its images have {c}x{h}x{w} = {c * h * w} values; cnnc "
                     f"feeds whole arrays", imp.entry(l.sec, "end"))
    idx = imp.get_int(l.sec, "dataidx", what)
    usual = 0 if l.role == "image" else 1
    if idx != usual:
        imp.warn(f"{what} has dataIdx={idx}; cnnc feeds images and labels by role (cuda-convnet2's "
                 f"image and CIFAR providers put {l.role} at index {usual})", imp.entry(l.sec, "dataidx"))


def check_keys(imp: Importer, l: CfgLayer) -> None:
    known = LAYER_KEYS[l.type]
    for key in l.sec.entries:
        e = l.sec.entries[key]
        if key in known and key not in TUNING_KEYS:
            continue
        if key in TUNING_KEYS:
            imp.warn(f"'{e.name}' {TUNING_KEYS[key]}", e, span=e.key_span)
        elif key == "neuron" and (l.is_data or l.type in COSTS):
            imp.warn(f"'{e.name}' is ignored on {'data' if l.is_data else 'cost'} layers, by cuda-convnet2 "
                     f"and cnnc", e, span=e.key_span)
        elif key in ALL_PARAM_KEYS and key not in ALL_LAYER_KEYS:
            imp.warn(f"'{e.name}' belongs in the layer-parameter file ({imp.pf.file}); cuda-convnet2 "
                     f"ignores it here", e, span=e.key_span)
        elif key == "gpu" and l.is_data:
            imp.warn(f"'{e.name}' is ignored on data layers: they go wherever their consumers are", e,
                     span=e.key_span)
        else:
            guess = did_you_mean_word(key, known)
            imp.warn(f"'{e.name}' is not a key of {l.type} layers; cuda-convnet2 ignores it", e,
                     f"did you mean '{camel(guess)}'?" if guess else None, span=e.key_span)


def label_classes(imp: Importer) -> None:
    for l in imp.layers.values():
        if not (l.is_data and l.role == "labels"):
            continue
        costs = [c for c in imp.layers.values() if c.type in LABEL_COSTS and c.inputs[0] == l.name]
        sizes = {}
        for c in costs:
            sizes.setdefault(imp.layers[c.inputs[1]].size, c)
        if len(sizes) > 1:
            (s1, c1), (s2, c2) = list(sizes.items())[:2]
            imp.fail(f"the costs on labels '{l.name}' disagree on the number of classes: '{c1.name}' has "
                     f"{s1}, '{c2.name}' has {s2}", imp.entry(c2.sec, "inputs"))
        (size, cost), = sizes.items()
        probs = imp.layers[cost.inputs[1]]
        if imp.classes is not None and imp.classes != size:
            imp.fail(f"softmax input '{probs.name}' of '{cost.name}' produces {size} values, but --classes "
                     f"is {imp.classes}", imp.entry(cost.sec, "inputs"),
                     "the softmax must produce one value per class of the data set")
        if size < 2:
            imp.fail(f"'{probs.name}' produces {size} value; a classifier needs at least 2 classes",
                     imp.entry(cost.sec, "inputs"))
        l.shape = (1, 1, 1)
        src = imp.layers[probs.inputs[0]].name
        l.comment = "classes: --classes" if imp.classes is not None else \
            f"classes: the size of softmax '{probs.name}' over '{src}'"
        l.args = [str(size)]


def check_params_file(imp: Importer) -> None:
    for sec in imp.pf.sections.values():
        l = imp.layers.get(sec.name)
        if l is None:
            imp.warn(f"[{sec.name}] names no layer of {imp.lf.file}; cuda-convnet2 ignores it", sec,
                     did_you_mean(sec.name, imp.layers))
            continue
        known = PARAM_KEYS.get(l.type, set())
        for key, e in sec.entries.items():
            if key in known:
                continue
            if key in ALL_LAYER_KEYS and key not in ALL_PARAM_KEYS:
                imp.warn(f"'{e.name}' belongs in the layer-definition file ({imp.lf.file}); cuda-convnet2 "
                         f"ignores it here", e, span=e.key_span)
            elif not known:
                imp.warn(f"{l.type} layers take no parameters; cuda-convnet2 ignores '{e.name}'", e,
                         span=e.key_span)
            else:
                guess = did_you_mean_word(key, known)
                imp.warn(f"'{e.name}' is not a parameter of {l.type} layers; cuda-convnet2 ignores it", e,
                         f"did you mean '{camel(guess)}'?" if guess else None, span=e.key_span)
