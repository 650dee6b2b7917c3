"""Placement rules: how a network's layers may be spread over devices.

A layer placed on R devices has R replicas.  The minibatch is cut into
S = max(R) * microbatches equal shares; a layer with fewer replicas runs
several passes, one share each, and so does every layer of a pipeline.
Whether a placement can be run this way depends on the network alone, so the
checker enforces these rules (and ``cnnc check`` reports them); the planner
schedules the :class:`Replication` they describe.  The replica rules are
written as small functions over replica counts so that the cuda-convnet2
importer applies the same rules to its .cfg layers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

Counts = Sequence[tuple[str, int]]     # (layer name, replica count) pairs, in order

from cnnc.diagnostics import CompileError, Diagnostic
from cnnc.ir import Layer, Network


def unequal(counts: Counts) -> bool:
    """The layers that share an input, or a layer's inputs, must have one replica count."""
    return len({n for _, n in counts}) > 1


def indivisible_input(replicas: int, inputs: Counts) -> tuple[str, int] | None:
    """The first input whose replica count a layer's own count does not divide, if any."""
    return next(((name, n) for name, n in inputs if n % replicas), None)


def off_level(counts: Counts) -> str | None:
    """The first layer outside the two replication levels (most and fewest replicas) a network may use."""
    levels = (min(n for _, n in counts), max(n for _, n in counts)) if counts else ()
    return next((name for name, n in counts if n not in levels), None)


@dataclass(frozen=True)
class Replication:
    """Shares and passes of a network whose placement obeys the rules."""

    microbatches: int           # M: pipelined micro-batches per minibatch
    shares: int                 # S: the minibatch is cut into S equal shares
    passes: int                 # P: passes a low layer runs per minibatch
    gather: int                 # G: shares a low replica gathers into one pass (all-gather exchange)
    share_cases: int            # b: cases in one share
    hybrid: bool                # layers with fewer replicas run several passes
    scheme: str                 # how low layers receive the shares of high ones
    high: frozenset[str]        # layers with the most replicas in a hybrid network: one pass
    stages: tuple[tuple[str, ...], ...]     # a pipeline's stages, in order; empty without pipelining

    def layer_passes(self, layer: Layer) -> int:
        return 1 if layer.name in self.high else self.passes


def replication(net: Network) -> Replication:
    """The replication of a network, or a located CompileError naming the layer that breaks a rule."""
    def fail(layer: Layer, message: str, hint: str | None = None):
        raise CompileError(Diagnostic(message, net.file, layer.span, hint), net.source)

    layers = {l.name: l for l in net.layers}
    for l in net.layers:
        ins = [(i, len(layers[i].gpus)) for i in l.inputs if i in layers]
        if unequal(ins):
            fail(l, f"the inputs of {l.name} have different replica counts ("
                 + ", ".join(f"{name}: {n}" for name, n in ins) + ")",
                 "give the inputs of a layer the same number of devices")
        bad = indivisible_input(len(l.gpus), ins)
        if bad is not None:
            fail(l, f"{l.name} has {len(l.gpus)} replicas but its input {bad[0]} has {bad[1]}: "
                 f"a layer's replica count must divide its inputs'")
        consumers = [(c.name, len(c.gpus)) for c in net.consumers(l.name)]
        if unequal(consumers):
            fail(l, f"the consumers of {l.name} have different replica counts ("
                 + ", ".join(f"{name}: {n}" for name, n in consumers) + ")")
    counts = [(l.name, len(l.gpus)) for l in net.layers]
    most, fewest = max(n for _, n in counts), min(n for _, n in counts)
    m = int(net.settings.get("microbatches", 1))
    if m > 1 and most != fewest:
        l = next(l for l in net.layers if len(l.gpus) != most)
        fail(l, f"with microbatches = {m} every layer needs the same number of devices; "
             f"{l.name} has {len(l.gpus)}, others {most}",
             "pipelining and hybrid parallelism do not mix in one network")
    shares = most * m
    middle = off_level(counts)
    if middle is not None:
        fail(layers[middle], f"{middle} has {len(layers[middle].gpus)} replicas; cnnc plans two levels of "
             f"replication per network (here {most} and {fewest})", f"use {most} or {fewest} devices for {middle}")
    passes = most // fewest * m
    if net.batch % shares:
        fail(net.layers[0], f"the batch of {net.batch} cases cannot be split into {shares} equal shares",
             f"make the batch a multiple of {shares}")
    share_cases = net.batch // shares
    hybrid = m == 1 and passes > 1
    gather = 1
    scheme = net.settings.get("exchange", "round_robin") if hybrid else "round_robin"
    if scheme == "all_gather":
        gather, passes = passes, 1
    if scheme == "scatter" and share_cases % shares:
        fail(net.layers[0], f"exchange = scatter sends 1/{shares} of each replica's {share_cases} cases to every "
             f"pass, so the batch must be a multiple of {shares * shares}")
    high = frozenset(l.name for l in net.layers if hybrid and len(l.gpus) == shares)
    stages: list[list[Layer]] = []
    for l in net.layers if m > 1 else ():
        if stages and stages[-1][0].gpus == l.gpus:
            stages[-1].append(l)
        elif any(st[0].gpus == l.gpus for st in stages):
            fail(l, f"{l.name} returns to @gpu({','.join(map(str, l.gpus))}) after other devices: "
                 f"a pipelined network must be a chain of stages, one per device set",
                 "place consecutive layers on the same devices")
        else:
            stages.append([l])
    rep = Replication(m, shares, passes, gather, share_cases, hybrid, scheme, high,
                      tuple(tuple(l.name for l in st) for st in stages))
    for l in net.layers:
        period = l.train.update_period if l.train else 0
        if m > 1 and period not in (0, m):
            fail(l, f"update_period = {period}: a pipelined network updates once per minibatch",
                 f"remove update_period, or set it to {m}")
        if period and rep.layer_passes(l) % period:
            fail(l, f"update_period = {period} does not divide the {rep.layer_passes(l)} pass(es) "
                 f"{l.name} runs per minibatch")
    return rep
