"""Lowering: which kernels implement one replica of a layer, forward and backward.

The planner decides *where* and *when* (devices, passes, copies, exchanges);
this module decides *what runs*: for each layer kind, the ops of cnnc/ops.py
with their compile-time parameters, and the parameters (weights) the kind
owns.  The kinds, their arguments and the ops they lower to are the registry's
(cnnc/check/kinds.py, cnnc/ops.py); a new kind adds its functions to FORWARD and BACKWARD.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from cnnc.check.kinds import KINDS
from cnnc.ir import Layer
from cnnc.neurons import Neuron
from cnnc.ops import OPS, param
from cnnc.precision import DEFAULT as FP32, kernel_suffix


@dataclass
class Site:
    """One replica of a layer at one pass: the buffers its kernels use on its device."""

    layer: Layer
    device: int
    cases: int                          # cases in this replica's share
    inputs: list[str]                   # each input's activations, readable on this device
    output: str
    params: dict[str, str] = field(default_factory=dict)     # parameter name -> buffer
    grads: dict[str, str] = field(default_factory=dict)      # parameter name -> gradient buffer
    emit: Callable[..., None] = print   # emit(kernel_name, op, params, args, writes, summary, **scalars)
    training: bool = True               # False in the test program (dropout passes values through)
    alloc: Callable[..., str] = print   # alloc(what, size, dtype="f32") -> a buffer of this replica
    # the minibatch cases this replica handles, as (first case, count) pieces in buffer order
    case_ranges: tuple[tuple[int, int], ...] = ()

    def launch(self, tag: str, op: str, params: dict, args: tuple[str, ...], writes: tuple[str, ...],
               summary: str, **scalars) -> None:
        """Emit one kernel launch; `scalars` are the op's runtime scalar arguments (numbers, or
        names of the executor's counters such as "seed" and "step"), which the planner puts
        in the plan's step-scalar table."""
        self.emit(f"{self.layer.name}_{tag}", op, params, args, writes, summary, **scalars)


# ---------------------------------------------------------------- parameters

def parameter_shapes(l: Layer) -> dict[str, tuple[int, ...]]:
    """Name -> shape of each trainable tensor of a layer (weights per input, then biases).

    conv: [filters, channels / groups, size, size] per input, biases [filters] or, unshared,
    [filters, rows, columns]; local: [rows*columns, filters, channels, size, size] and
    biases [filters, rows, columns]; fc: [inputs, outputs] per input, biases [outputs]."""
    out = l.shape
    if l.kind == "conv":
        size, groups = l.args["size"], KINDS["conv"].value(l.args, "groups")
        shapes = [(out.channels, x.channels // groups, size, size) for x in l.in_shapes]
        biases = (out.channels,) if shared_biases(l) else (out.channels, out.height, out.width)
    elif l.kind == "local":
        size, x = l.args["size"], l.in_shapes[0]
        shapes = [(out.height * out.width, out.channels, x.channels, size, size)]
        biases = (out.channels, out.height, out.width)
    elif l.kind == "fc":
        shapes = [(x.size, out.size) for x in l.in_shapes]
        biases = (out.size,)
    else:
        return {}
    names = ["weights"] if len(shapes) == 1 else [f"weights.{i}" for i in range(len(shapes))]
    return {**dict(zip(names, shapes)), "biases": biases}


def unit_layout(l: Layer, shape: tuple[int, ...]) -> dict:
    """How a weight tensor's units (filters, output units) lie in memory, for wball:
    conv and local weights hold each filter's weights contiguously, fc weights [I, O]
    hold output unit o's incoming weights in column o."""
    if l.kind == "fc":
        return dict(units=shape[1], length=shape[0], unit_stride=1, elem_stride=shape[1])
    length = 1
    for n in shape[-3:]:
        length *= n
    units = 1
    for n in shape[:-3]:
        units *= n
    return dict(units=units, length=length, unit_stride=length, elem_stride=1)


def weight_names(l: Layer) -> list[str]:
    return [n for n in parameter_shapes(l) if n.startswith("weights")]


def shared_biases(l: Layer) -> bool:
    """One bias per filter or output (true), or one per filter and output position."""
    return l.kind == "fc" or (l.kind == "conv" and KINDS["conv"].value(l.args, "shared_biases"))


# ---------------------------------------------------------------- shapes of ops

def conv_params(l: Layer, i: int, cases: int) -> dict:
    """The op params of a conv (or local) layer's input i; groups and unshared biases only when
    the layer has them (its args leave out arguments at their defaults), so a plain
    convolution's kernels stay the plain ones."""
    x = l.in_shapes[i]
    q = dict(N=cases, C=x.channels, H=x.height, W=x.width, K=l.shape.channels, R=l.args["size"],
             S=l.args["size"], P=l.shape.height, Q=l.shape.width, stride=l.args["stride"], pad=l.args["padding"])
    for name in ("groups", "shared_biases"):
        if name in l.args:
            q[name] = l.args[name]
    return q


def fc_params(l: Layer, i: int, cases: int) -> dict:
    return dict(N=cases, I=l.in_shapes[i].size, O=l.shape.size)


def weighted_params(l: Layer, i: int, cases: int) -> dict:
    """The op params of a weighted layer's input i, with the layer's precision unless it is fp32
    (so fp32 kernels keep their params)."""
    q = fc_params(l, i, cases) if l.kind == "fc" else conv_params(l, i, cases)
    if l.train and l.train.precision != FP32:
        q["precision"] = l.train.precision
    return q


def gemm_params(op: str, q: dict, **more) -> dict:
    """A weighted layer's params for `op`: `precision` only where the op is a GEMM (a local
    layer's data gradient is a direct sum, computed in fp32)."""
    params = dict(q, **more)
    if not OPS[op].gemm:
        params.pop("precision", None)
    return params


def pool_params(l: Layer, cases: int) -> dict:
    x = l.in_shapes[0]
    return dict(N=cases, C=x.channels, H=x.height, W=x.width, P=l.shape.height, Q=l.shape.width,
                size=l.args["size"], stride=l.args["stride"], start=l.args["start"],
                mode="max" if l.kind == "maxpool" else "avg")


def norm_params(l: Layer, cases: int) -> dict:
    x = l.in_shapes[0]
    q = dict(N=cases, C=x.channels, H=x.height, W=x.width, size=l.args["size"], scale=l.args["scale"],
             pow=l.args["pow"], min_div=l.args["min_div"])
    if "blocked" in l.args:
        q["blocked"] = l.args["blocked"]
    return q


def _gemm_shape_tag(op_params: dict, kind: str) -> str:
    q = op_params
    if kind in ("conv", "local"):
        tag = f"n{q['N']}_c{q['C']}_k{q['K']}_{q['R']}x{q['S']}"
        if param(q, "groups") != 1:
            tag += f"_g{q['groups']}"
        return tag
    return f"n{q['N']}_i{q['I']}_o{q['O']}"


def _gemm_tag(op_params: dict, kind: str) -> str:
    """A weighted layer's kernel tag: its GEMM's shape, then its precision unless fp32, so kernels
    of different precisions have different names."""
    return _gemm_shape_tag(op_params, kind) + kernel_suffix(param(op_params, "precision"))


def _precision_note(op_params: dict) -> str:
    """What a kernel's summary adds for its precision: nothing for fp32."""
    precision = param(op_params, "precision")
    return "" if precision == FP32 else f", {precision} operands"


def _acc(accumulate: bool) -> str:
    return "_acc" if accumulate else ""


# ---------------------------------------------------------------- forward

def forward_weighted(site: Site) -> None:
    """conv / local / fc: y = neuron(b + sum over inputs of W_i * x_i), one launch per input.

    The first launch adds the bias, later ones add into y; only the last applies
    the neuron, so a layer with several inputs sums them exactly as one would."""
    l = site.layer
    kind = l.kind
    names = weight_names(l)
    last = len(l.inputs) - 1
    for i, (x, wname) in enumerate(zip(site.inputs, names)):
        q = weighted_params(l, i, site.cases)
        neuron = l.neuron if i == last else Neuron()
        params = dict(q, neuron=neuron.to_json())
        suffix = ""
        if last:
            params.update(accumulate=i > 0, bias=i == 0)
            suffix = f"_in{i}"
        tag = f"fwd_{_gemm_tag(q, kind)}{suffix}"
        if kind in ("conv", "local"):
            what = "filters" if kind == "conv" else "filters per position"
            summary = (f"forward of {l.name}: {q['K']} {what} {q['R']}x{q['S']} over {q['C']}x{q['H']}x{q['W']}, "
                       f"stride {q['stride']}, padding {q['pad']}, {neuron}")
            if param(q, "groups") != 1:
                summary += f", {q['groups']} groups"
            if not shared_biases(l) and kind == "conv":
                summary += ", unshared biases"
        else:
            summary = f"forward of {l.name}: {q['I']} inputs to {q['O']} outputs, {neuron}"
        if last:
            summary += f" (input {i + 1} of {last + 1}{', adds the bias' if i == 0 else ', adds into the output'})"
        summary += _precision_note(q)
        site.launch(tag, f"{kind}_fwd", params, (x, site.params[wname], site.params["biases"], site.output),
                    (site.output,), summary)


def forward_pool(site: Site) -> None:
    q = pool_params(site.layer, site.cases)
    site.launch(f"fwd_{q['mode']}_{q['size']}x{q['size']}s{q['stride']}_n{q['N']}", "pool_fwd", q,
                (site.inputs[0], site.output), (site.output,),
                f"forward of {site.layer.name}: {q['mode']} pooling {q['size']}x{q['size']}, stride {q['stride']}")


def forward_softmax(site: Site) -> None:
    q = dict(N=site.cases, C=site.layer.shape.size)
    site.launch(f"softmax_fwd_n{q['N']}_c{q['C']}", "softmax_fwd", q, (site.inputs[0], site.output),
                (site.output,), f"forward of {site.layer.name}: softmax over {q['C']} values")


def _norm_scratch(site: Site) -> tuple[str, str | None]:
    """The denominators (and cnorm's mean differences) a normalisation keeps for its backward."""
    n = site.cases * site.layer.shape.size
    md = site.alloc("meandiff", n) if site.layer.kind == "cnorm" else None
    return site.alloc("denoms", n), md


def forward_norm(site: Site) -> None:
    """cmrnorm / rnorm / cnorm; the denominators stay for the backward."""
    l = site.layer
    q = norm_params(l, site.cases)
    denoms, md = _norm_scratch(site)
    x, y = site.inputs[0], site.output
    shape = f"n{q['N']}_c{q['C']}_{q['size']}"
    if l.kind == "cnorm":
        site.launch(f"meandiff_{shape}", "cnorm_meandiff", {k: q[k] for k in ("N", "C", "H", "W", "size")},
                    (x, md), (md,), f"forward of {l.name}: difference from the mean of each {q['size']}x{q['size']} "
                    f"window")
        site.launch(f"fwd_{shape}", "cnorm_fwd", q, (x, md, y, denoms), (y, denoms),
                    f"forward of {l.name}: contrast normalisation over {q['size']}x{q['size']} windows")
        return
    where = f"{q['size']} channels" if l.kind == "cmrnorm" else f"{q['size']}x{q['size']} windows"
    site.launch(f"fwd_{shape}", f"{l.kind}_fwd", q, (x, y, denoms), (y, denoms),
                f"forward of {l.name}: response normalisation across {where}")


def forward_neuron(site: Site) -> None:
    l = site.layer
    n = site.cases * l.shape.size
    site.launch(f"{l.neuron.name}_fwd_n{n}", "neuron_fwd", dict(n=n, neuron=l.neuron.to_json()),
                (site.inputs[0], site.output), (site.output,), f"forward of {l.name}: the {l.neuron} neuron")


def dropout_params(site: Site) -> dict:
    """Training: the mask of each value is keyed by (seed, step, layer, minibatch case, feature),
    so it does not depend on how the batch is split.  Test: values pass through (dropout) or are
    scaled by keep (dropout2)."""
    l = site.layer
    q = dict(N=site.cases, D=l.shape.size, keep=l.args["keep"], variant=l.kind)
    if not site.training:
        return dict(q, train=False)
    q["layer_id"] = l.args["layer_id"]
    ranges = site.case_ranges
    if len(ranges) == 1:
        q["case_offset"] = ranges[0][0]
    else:
        q["case_ranges"] = [list(r) for r in ranges]
    return q


def forward_dropout(site: Site) -> None:
    l = site.layer
    q = dropout_params(site)
    mask = site.alloc("mask", site.cases * l.shape.size)
    if site.training:
        cases = (f"_cases{q['case_offset']}" if "case_offset" in q
                 else "_pieces" + "_".join(f"{a}x{b}" for a, b in q["case_ranges"]))
        tag, summary = f"fwd_n{q['N']}_d{q['D']}{cases}", (
            f"forward of {l.name} in training: keep each value with probability {q['keep']:g}")
    else:
        tag, summary = f"test_n{q['N']}_d{q['D']}", (
            f"forward of {l.name} at test time: " + ("values pass through" if l.kind == "dropout"
                                                     else f"values scaled by {q['keep']:g}"))
    site.launch(tag, "dropout_fwd", q, (site.inputs[0], site.output, mask), (site.output, mask), summary,
                seed="seed", step="step")


def forward_eltsum(site: Site) -> None:
    l = site.layer
    n = site.cases * l.shape.size
    coeffs = l.args.get("coeffs") or [1.0]
    for i, x in enumerate(site.inputs):
        q = dict(n=n, coeff=float(coeffs[i]), accumulate=i > 0)
        site.launch(f"fwd_in{i}_n{n}", "eltsum_fwd", q, (x, site.output), (site.output,),
                    f"forward of {l.name}: " + (f"{q['coeff']:g} x {l.inputs[i]}" if i == 0 else
                                               f"add {q['coeff']:g} x {l.inputs[i]}"))


def forward_pass(site: Site) -> None:
    n = site.cases * site.layer.shape.size
    site.launch(f"fwd_n{n}", "eltsum_fwd", dict(n=n, coeff=1.0, accumulate=False), (site.inputs[0], site.output),
                (site.output,), f"forward of {site.layer.name}: a copy of {site.layer.inputs[0]}")


def forward_eltmax(site: Site) -> None:
    l = site.layer
    n = site.cases * l.shape.size
    arg = site.alloc("argmax", n)
    for i, x in enumerate(site.inputs):
        site.launch(f"fwd_in{i}_n{n}", "eltmax_fwd", dict(n=n, index=i, first=i == 0), (x, site.output, arg),
                    (site.output, arg), f"forward of {l.name}: " + (f"start from {l.inputs[i]}" if i == 0 else
                                                                     f"the maximum with {l.inputs[i]}"))


def _concat_offsets(l: Layer) -> list[int]:
    offsets, at = [], 0
    for x in l.in_shapes:
        offsets.append(at)
        at += x.size
    return offsets


def forward_concat(site: Site) -> None:
    l = site.layer
    for i, (x, offset) in enumerate(zip(site.inputs, _concat_offsets(l))):
        q = dict(N=site.cases, D=l.in_shapes[i].size, D_out=l.shape.size, offset=offset)
        site.launch(f"fwd_in{i}_n{q['N']}", "concat_fwd", q, (x, site.output), (site.output,),
                    f"forward of {l.name}: the {l.in_shapes[i].channels} channels of {l.inputs[i]}")


# ---------------------------------------------------------------- costs: forward

def forward_logreg(site: Site, loss: str, correct: str) -> None:
    l = site.layer
    q = dict(N=site.cases, C=l.in_shapes[1].size, top_k=l.args["top_k"])
    site.launch(f"logreg_fwd_n{q['N']}_c{q['C']}", "logreg_fwd", q, (site.inputs[0], site.inputs[1], loss, correct),
                (loss, correct), f"cost {l.name}: -log p(label) and top-{q['top_k']} correctness per case")


def _targets(site: Site) -> str:
    l = site.layer
    return site.alloc("targets", site.cases * l.in_shapes[1].size)


def forward_crossent(site: Site, loss: str, correct: str) -> None:
    l = site.layer
    q = dict(N=site.cases, C=l.in_shapes[1].size)
    labels, probs = site.inputs
    targets = _targets(site)
    site.launch(f"onehot_n{q['N']}_c{q['C']}", "onehot", q, (labels, targets), (targets,),
                f"cost {l.name}: the labels as one-hot targets")
    site.launch(f"crossent_fwd_n{q['N']}_c{q['C']}", "crossent_fwd", q, (targets, probs, loss, correct),
                (loss, correct), f"cost {l.name}: cross-entropy and correctness per case")


def forward_sum2(site: Site, loss: str, correct: str) -> None:
    l = site.layer
    q = dict(N=site.cases, D=l.in_shapes[0].size)
    site.launch(f"sum2_fwd_n{q['N']}_d{q['D']}", "sum2_fwd", q, (site.inputs[0], loss), (loss,),
                f"cost {l.name}: sum of squares per case")


# ---------------------------------------------------------------- backward

def neuron_backward(site: Site, dy: str) -> None:
    """Turn the gradient of a fused neuron's output into that of its input, in place."""
    l = site.layer
    if l.neuron.is_identity or KINDS[l.kind].neuron_layer:
        return
    n = site.cases * l.shape.size
    site.launch(f"{l.neuron.name}_bwd_n{n}", "neuron_bwd", dict(n=n, neuron=l.neuron.to_json()),
                (site.output, dy), (dy,), f"backward of {l.name}'s {l.neuron} neuron, in place on its gradient")


def weight_gradients(site: Site, dy: str, accumulate: bool) -> None:
    """Gradients of a conv / local / fc layer's weights (per input) and biases, summed over its
    cases; `accumulate` adds them to the gradients of earlier passes of the same update period."""
    l = site.layer
    acc = _acc(accumulate)
    inner = l.shape.height * l.shape.width
    k = l.shape.channels if l.kind in ("conv", "local") else l.shape.size
    if shared_biases(l):
        site.launch(f"bias_grad_k{k}_n{site.cases}{acc}", "bias_grad",
                    dict(N=site.cases, K=k, inner=inner, accumulate=accumulate), (dy, site.grads["biases"]),
                    (site.grads["biases"],),
                    f"gradient of {l.name}'s biases: sum over cases" + (" and pixels" if inner > 1 else ""))
    else:
        site.launch(f"bias_grad_k{k}_p{inner}_n{site.cases}{acc}", "bias_grad_unshared",
                    dict(N=site.cases, K=k, inner=inner, accumulate=accumulate), (dy, site.grads["biases"]),
                    (site.grads["biases"],), f"gradient of {l.name}'s biases (one per position): sum over cases")
    for i, (x, wname) in enumerate(zip(site.inputs, weight_names(l))):
        q = weighted_params(l, i, site.cases)
        suffix = f"_in{i}" if len(l.inputs) > 1 else ""
        summary = f"gradient of {l.name}'s weights" + (f" for input {l.inputs[i]}" if suffix else "") + \
            _precision_note(q)
        split, split_k = split_k_for(l, q)
        if split > 1:
            n = q["K"] * q["C"] * q["R"] * q["S"]
            partials = site.alloc(f"{wname}.partials{suffix}", split * n)
            site.launch(f"bwd_filter_{_gemm_tag(q, l.kind)}{suffix}_split{split}", "conv_bwd_filter",
                        dict(q, split=split, split_k=split_k), (x, dy, partials), (partials,),
                        summary + f", split-K: {split} slices of {split_k} of the {q['N'] * q['P'] * q['Q']} "
                                  f"summed positions, one partial sum each")
            site.launch(f"sum_partials_{wname.replace('.', '_')}{suffix}_r{split}_n{n}{acc}", "replica_sum",
                        dict(R=split, n=n, offset=0, accumulate=accumulate), (partials, site.grads[wname]),
                        (site.grads[wname],), f"add the {split} split-K partial sums of {l.name}'s weight gradient, "
                                              f"in order")
            continue
        site.launch(f"bwd_filter_{_gemm_tag(q, l.kind)}{suffix}{acc}", f"{l.kind}_bwd_filter",
                    dict(q, accumulate=accumulate), (x, dy, site.grads[wname]), (site.grads[wname],), summary)


# Split-K for convolution weight gradients: a GEMM with few output tiles (filters x C*R*S) and a
# long reduction (cases x output pixels) would occupy only a few SMs; cutting the reduction into
# slices gives every slice its own work-groups, and the partial sums are added in a fixed order
# (no atomics), so results stay deterministic.  The split is part of the plan, shared by every
# target, so it is decided here from the GEMM's shape alone, with constants of its own rather than
# any target's tile sizes: codegen then tiles each slice as it tiles any GEMM.
SPLIT_TARGET_GROUPS = 160       # enough work-groups for every SM of a current GPU
SPLIT_MIN_SLICE = 1024          # below this many summed positions per slice, splitting does not pay
SPLIT_MAX = 64                  # at most this many slices (and partial sums to store and add)
SPLIT_TILE = 64                 # the output tile edge assumed when counting the GEMM's work-groups
SPLIT_ALIGN = 16                # slices are multiples of this many positions: whole K steps of every
                                # target's tiling (each dialect's K step divides it)


def split_k_for(l: Layer, q: dict) -> tuple[int, int]:
    """(slices, positions per slice) for a conv layer's weight gradient; (1, 0) when not worth it."""
    if l.kind != "conv" or param(q, "groups") != 1:
        return 1, 0
    reduction = q["N"] * q["P"] * q["Q"]
    tiles = -(-q["K"] // SPLIT_TILE) * -(-(q["C"] * q["R"] * q["S"]) // SPLIT_TILE)
    split = min(SPLIT_MAX, -(-SPLIT_TARGET_GROUPS // tiles), reduction // SPLIT_MIN_SLICE)
    if split < 2:
        return 1, 0
    split_k = -(-reduction // split)
    split_k = -(-split_k // SPLIT_ALIGN) * SPLIT_ALIGN
    return -(-reduction // split_k), split_k


def backward_weighted(site: Site, dy: str, dxs: list[tuple[str, bool] | None]) -> None:
    l = site.layer
    for i, (target, wname) in enumerate(zip(dxs, weight_names(l))):
        if target is None:
            continue
        dx, acc = target
        q = weighted_params(l, i, site.cases)
        suffix = (f"_in{i}" if len(l.inputs) > 1 else "") + _acc(acc)
        op = f"{l.kind}_bwd_data"
        params = gemm_params(op, q, accumulate=acc)
        site.launch(f"bwd_data_{_gemm_tag(params, l.kind)}{suffix}", op, params,
                    (site.params[wname], dy, dx), (dx,),
                    f"gradient of {l.name} with respect to its input {l.inputs[i]}" + _precision_note(params))


def backward_pool(site: Site, dy: str, dxs: list[tuple[str, bool] | None]) -> None:
    if dxs[0] is None:
        return
    dx, acc = dxs[0]
    q = dict(pool_params(site.layer, site.cases), accumulate=acc)
    site.launch(f"bwd_{q['mode']}_{q['size']}x{q['size']}s{q['stride']}_n{q['N']}{_acc(acc)}",
                "pool_bwd", q, (site.inputs[0], site.output, dy, dx), (dx,),
                f"gradient of {site.layer.name} with respect to its input {site.layer.inputs[0]}")


def backward_softmax(site: Site, dy: str, dxs: list[tuple[str, bool] | None]) -> None:
    if dxs[0] is None:
        return
    dx, acc = dxs[0]
    q = dict(N=site.cases, C=site.layer.shape.size, accumulate=acc)
    site.launch(f"softmax_bwd_n{q['N']}_c{q['C']}{_acc(acc)}", "softmax_bwd", q,
                (site.output, dy, dx), (dx,),
                f"gradient of softmax {site.layer.name} with respect to {site.layer.inputs[0]}")


def backward_norm(site: Site, dy: str, dxs: list[tuple[str, bool] | None]) -> None:
    """Exact gradients of the normalisations, from the denominators the forward kept."""
    if dxs[0] is None:
        return
    l = site.layer
    dx, acc = dxs[0]
    q = norm_params(l, site.cases)
    denoms, md = _norm_scratch(site)
    x = site.inputs[0]
    shape = f"n{q['N']}_c{q['C']}_{q['size']}"
    what = f"gradient of {l.name} with respect to its input {l.inputs[0]}"
    if l.kind == "cnorm":
        site.launch(f"bwd_prep_{shape}", "cnorm_bwd_prep", q, (x, dy, denoms, md), (md,),
                    f"{what}: the window terms, in place of the mean differences")
        site.launch(f"bwd_{shape}{_acc(acc)}", "cnorm_bwd", dict(q, accumulate=acc), (dy, denoms, md, dx), (dx,),
                    what)
        return
    site.launch(f"bwd_{shape}{_acc(acc)}", f"{l.kind}_bwd", dict(q, accumulate=acc), (x, dy, denoms, dx), (dx,),
                what)


def backward_neuron(site: Site, dy: str, dxs: list[tuple[str, bool] | None]) -> None:
    if dxs[0] is None:
        return
    l = site.layer
    dx, acc = dxs[0]
    n = site.cases * l.shape.size
    site.launch(f"{l.neuron.name}_bwd_n{n}{_acc(acc)}", "neuron_bwd_input",
                dict(n=n, neuron=l.neuron.to_json(), accumulate=acc), (site.inputs[0], dy, dx), (dx,),
                f"gradient of {l.name} ({l.neuron}) with respect to its input {l.inputs[0]}")


def backward_dropout(site: Site, dy: str, dxs: list[tuple[str, bool] | None]) -> None:
    if dxs[0] is None:
        return
    l = site.layer
    dx, acc = dxs[0]
    n = site.cases * l.shape.size
    mask = site.alloc("mask", n)
    site.launch(f"bwd_n{n}{_acc(acc)}", "dropout_bwd", dict(n=n, accumulate=acc), (mask, dy, dx), (dx,),
                f"gradient of {l.name}: the training mask applied to the gradient")


def backward_eltsum(site: Site, dy: str, dxs: list[tuple[str, bool] | None]) -> None:
    l = site.layer
    n = site.cases * l.shape.size
    coeffs = l.args.get("coeffs") or [1.0] * len(l.inputs)
    for i, target in enumerate(dxs):
        if target is None:
            continue
        dx, acc = target
        q = dict(n=n, coeff=float(coeffs[i]), accumulate=acc)
        tag = f"bwd_in{i}_n{n}{_acc(acc)}" if len(l.inputs) > 1 else f"bwd_n{n}{_acc(acc)}"
        site.launch(tag, "eltsum_bwd", q, (dy, dx), (dx,),
                    f"gradient of {l.name} with respect to its input {l.inputs[i]}")


def backward_eltmax(site: Site, dy: str, dxs: list[tuple[str, bool] | None]) -> None:
    l = site.layer
    n = site.cases * l.shape.size
    arg = site.alloc("argmax", n)
    for i, target in enumerate(dxs):
        if target is None:
            continue
        dx, acc = target
        site.launch(f"bwd_in{i}_n{n}{_acc(acc)}", "eltmax_bwd", dict(n=n, index=i, accumulate=acc), (arg, dy, dx),
                    (dx,), f"gradient of {l.name} with respect to {l.inputs[i]}, where it held the maximum")


def backward_concat(site: Site, dy: str, dxs: list[tuple[str, bool] | None]) -> None:
    l = site.layer
    for i, (target, offset) in enumerate(zip(dxs, _concat_offsets(l))):
        if target is None:
            continue
        dx, acc = target
        q = dict(N=site.cases, D=l.in_shapes[i].size, D_out=l.shape.size, offset=offset, accumulate=acc)
        site.launch(f"bwd_in{i}_n{q['N']}{_acc(acc)}", "concat_bwd", q, (dy, dx), (dx,),
                    f"gradient of {l.name} with respect to {l.inputs[i]}: its slice of channels")


# ---------------------------------------------------------------- costs: backward

def _probability_cost_backward(site: Site, dxs, through_softmax: str | None, kind: str, first: str,
                               target: str) -> None:
    """The gradient of a cost over (labels or targets, probabilities): with respect to the
    probabilities, or, when `through_softmax` names the softmax feeding it, directly with
    respect to that softmax's input (exact and numerically stable)."""
    l = site.layer
    if dxs[1] is None:
        return
    dx, accumulate = dxs[1]
    q = dict(N=site.cases, C=l.in_shapes[1].size, coeff=l.args["coeff"], accumulate=accumulate)
    op = f"softmax_{kind}_bwd" if through_softmax else f"{kind}_bwd"
    summary = (f"gradient of cost {l.name} through softmax {through_softmax}: coeff * (probs - {target})"
               if through_softmax else f"gradient of cost {l.name} with respect to {l.inputs[1]}")
    site.launch(f"{op}_n{q['N']}_c{q['C']}{_acc(accumulate)}", op, q, (first, site.inputs[1], dx), (dx,), summary)


def backward_logreg(site: Site, dxs: list[tuple[str, bool] | None], through_softmax: str | None) -> None:
    _probability_cost_backward(site, dxs, through_softmax, "logreg", site.inputs[0], "onehot")


def backward_crossent(site: Site, dxs: list[tuple[str, bool] | None], through_softmax: str | None) -> None:
    """As logreg, from the one-hot targets the forward wrote."""
    _probability_cost_backward(site, dxs, through_softmax, "crossent", _targets(site), "targets")


def backward_sum2(site: Site, dxs: list[tuple[str, bool] | None], through_softmax: str | None) -> None:
    l = site.layer
    if dxs[0] is None:
        return
    dx, accumulate = dxs[0]
    q = dict(N=site.cases, D=l.in_shapes[0].size, coeff=l.args["coeff"], accumulate=accumulate)
    site.launch(f"sum2_bwd_n{q['N']}_d{q['D']}{_acc(accumulate)}", "sum2_bwd", q, (site.inputs[0], dx), (dx,),
                f"gradient of cost {l.name}: 2 * coeff * {l.inputs[0]}")


# costs: forward(site, loss, correct); backward(site, dxs, fused softmax name or None)
COST_FORWARD = {"logreg": forward_logreg, "crossent": forward_crossent, "sum2": forward_sum2}
COST_BACKWARD = {"logreg": backward_logreg, "crossent": backward_crossent, "sum2": backward_sum2}
# costs that may be differentiated through the softmax feeding them: kind -> index of that input
FUSES_SOFTMAX = {"logreg": 1, "crossent": 1}

FORWARD = {"conv": forward_weighted, "local": forward_weighted, "fc": forward_weighted,
           "maxpool": forward_pool, "avgpool": forward_pool, "softmax": forward_softmax,
           "cmrnorm": forward_norm, "rnorm": forward_norm, "cnorm": forward_norm, "neuron": forward_neuron,
           "dropout": forward_dropout, "dropout2": forward_dropout, "eltsum": forward_eltsum,
           "eltmax": forward_eltmax, "concat": forward_concat, "pass": forward_pass}
BACKWARD = {"conv": backward_weighted, "local": backward_weighted, "fc": backward_weighted,
            "maxpool": backward_pool, "avgpool": backward_pool, "softmax": backward_softmax,
            "cmrnorm": backward_norm, "rnorm": backward_norm, "cnorm": backward_norm, "neuron": backward_neuron,
            "dropout": backward_dropout, "dropout2": backward_dropout, "eltsum": backward_eltsum,
            "eltmax": backward_eltmax, "concat": backward_concat, "pass": backward_eltsum}
