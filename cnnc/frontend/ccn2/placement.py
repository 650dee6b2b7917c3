"""Placement: gpu= lists, replica counts, passes and update periods.

The replica rules between layers are cnnc's own (:mod:`cnnc.check.placement`),
applied here to the cfg's layers so that their errors point into the .cfg and
speak cuda-convnet2's terms.  cuda-convnet2 is stricter in one place: data
layers follow their consumers, so all layers that take one must agree too.
"""
from __future__ import annotations

from cnnc.check.placement import indivisible_input, off_level, unequal
from cnnc.frontend.ccn2.importer import CfgLayer, Importer
from cnnc.frontend.ccn2.vocabulary import LABEL_COSTS


def check_placement(imp: Importer) -> None:
    """Placement defaults and the replica rules between a layer and its inputs."""
    for l in imp.layers.values():
        if l.is_data:
            continue
        what = f"layer '{l.name}' (type={l.type})"
        if l.gpus is None and not imp.layers[l.inputs[0]].is_data:
            l.gpus, l.gpu_entry = imp.layers[l.inputs[0]].gpus, imp.layers[l.inputs[0]].gpu_entry
        if l.gpus is None:
            # cuda-convnet2 inherits the placement of the first input, and a data layer has
            # none, so it never instantiates such a layer; cnnc's rule applies instead.
            layer_in = next((imp.layers[i] for i in l.inputs if not imp.layers[i].is_data), None)
            l.gpus = layer_in.gpus if layer_in is not None else (0,)
            imp.warn(f"{what} has no gpu= and its first input '{l.inputs[0]}' is a data layer, so "
                     f"cuda-convnet2 would not place it; using gpu={','.join(map(str, l.gpus))}",
                     l.sec, f"add gpu={','.join(map(str, l.gpus))} to [{l.name}]")
        l.replicas = len(l.gpus)
        ins = [imp.layers[i] for i in l.inputs]
        for inp in ins:
            if inp.is_data:
                inp.replicas = l.replicas
        counts = [(i.name, i.replicas) for i in ins]
        bad = indivisible_input(l.replicas, counts)
        if bad is not None:
            imp.fail(f"{what} has {l.replicas} replicas, which does not divide the {bad[1]} "
                     f"replicas of its input '{bad[0]}'", l.gpu_entry or l.sec,
                     "a layer's replica count must divide its inputs'")
        if unequal(counts):
            imp.fail(f"the inputs of {what} have different numbers of replicas ("
                     + ", ".join(f"{name}: {n}" for name, n in counts) + ")",
                     imp.entry(l.sec, "inputs"))
        if l.type == "pass":
            if l.replicas != ins[0].replicas:
                imp.fail(f"{what}: a pass-through layer needs as many replicas as its inputs "
                         f"({ins[0].replicas}), not {l.replicas}", l.gpu_entry or l.sec)
            for other in imp.layers.values():
                if other is l or other.type != "pass" or other.gpus is None:
                    continue
                common = set(other.inputs) & set(l.inputs)
                if common and set(other.gpus) & set(l.gpus) and \
                        list(imp.layers).index(other.name) < list(imp.layers).index(l.name):
                    imp.fail(f"{what} conflicts with pass-through layer '{other.name}': both take "
                             f"'{sorted(common)[0]}' and run on an overlapping set of GPUs",
                             l.gpu_entry or l.sec)
        if l.type in LABEL_COSTS:
            labels, probs = ins
            if not labels.is_data:
                imp.fail(f"{what}: the first input must be the labels (a data layer); '{labels.name}' is a "
                         f"{labels.type} layer", imp.entry(l.sec, "inputs"),
                         "cuda-convnet2 writes inputs=labels,probs")
            if probs.type != "softmax":
                imp.fail(f"{what}: the second input must be a softmax layer; '{probs.name}' is a "
                         f"{probs.type} layer", imp.entry(l.sec, "inputs"))


def check_consumers(imp: Importer, l: CfgLayer, consumers: list[CfgLayer]) -> None:
    """All layers that take `l` as input need one replica count."""
    counts = [(c.name, c.replicas) for c in consumers]
    if unequal(counts):
        imp.fail(f"the layers that take '{l.name}' as input have different numbers of replicas ("
                 + ", ".join(f"{name}: {n}" for name, n in counts) + ")",
                 consumers[-1].gpu_entry or consumers[-1].sec,
                 "cuda-convnet2 needs all next layers of a layer to have equal numbers of replicas")


def replication(imp: Importer) -> tuple[int, ...]:
    """Passes per minibatch and update periods per layer (cuda-convnet2 counts an update period
    in passes of the whole net, cnnc in the layer's own passes); the distinct replica counts."""
    layers = list(imp.layers.values())
    counts = [l.replicas for l in layers if l.replicas]
    r_max, r_min = max(counts), min(counts)
    for l in layers:
        if l.replicas and (r_max % l.replicas or l.replicas % r_min):
            imp.fail(f"layer '{l.name}' has {l.replicas} replicas; with {r_max} and {r_min} elsewhere the "
                     f"passes per minibatch are not whole", l.gpu_entry or l.sec,
                     "replica counts must divide each other")
    total = r_max // r_min
    if imp.mini % r_max:
        top = next(l for l in layers if l.replicas == r_max and not l.is_data)
        imp.fail(f"--mini {imp.mini} cannot be split evenly among the {r_max} replicas of '{top.name}'",
                 top.gpu_entry or top.sec,
                 f"use a multiple of {r_max}, e.g. --mini {r_max * max(1, imp.mini // r_max)}")
    for l in layers:
        if l.is_data:
            continue
        active = l.replicas // r_min          # passes between two forward passes of this layer
        l.passes = r_max // l.replicas
        if l.train is None:
            continue
        cfg = l.train.pop("update_period_cfg")
        effective = max(cfg, active)
        pe = imp.entry(imp.pf.sections[l.name], "updateperiod")
        if effective % active:
            imp.fail(f"updatePeriod={cfg}: '{l.name}' runs once every {active} passes, so its update period "
                     f"must be a multiple of {active}", pe)
        if total % effective:
            imp.fail(f"updatePeriod={cfg} must divide the {total} backward pass{'es' if total > 1 else ''} "
                     f"per minibatch", pe)
        l.period_own = effective // active
        l.train["update_period"] = l.period_own if cfg or l.period_own != l.passes else 0
    levels = tuple(sorted(set(counts), reverse=True))
    middle_name = off_level([(l.name, l.replicas) for l in layers if l.replicas])
    if middle_name is not None:
        middle = imp.layers[middle_name]
        imp.warn(f"this network uses {len(levels)} replica counts ({', '.join(map(str, levels))}); cnnc plans "
                 f"two levels per network, so compiling it fails at '{middle.name}'",
                 middle.gpu_entry or middle.sec,
                 f"give '{middle.name}' {r_max} or {r_min} GPUs")
    return levels
