"""Lowering: which kernels implement one replica of a layer, forward and backward.

The planner decides *where* and *when* (devices, passes, copies, exchanges);
this module decides *what runs*: for each layer kind, the ops of cnnc/ops.py
with their compile-time parameters, and the parameters (weights) the kind
owns.  Adding a layer kind is a row in cnnc/check/kinds.py plus a row here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from cnnc.ir import Layer
from cnnc.neurons import Neuron


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
    emit: Callable[..., None] = print   # emit(kernel_name, op, params, args, writes, summary)
    training: bool = True               # False in the test program (dropout passes values through)
    share: int = 0                      # which share of the minibatch: cases share*cases ..
    alloc: Callable[..., str] = print   # alloc(what, size, dtype="f32") -> a buffer of this replica

    def launch(self, tag: str, op: str, params: dict, args: tuple[str, ...], writes: tuple[str, ...],
               summary: str) -> None:
        self.emit(f"{self.layer.name}_{tag}", op, params, args, writes, summary)


# ---------------------------------------------------------------- parameters

def parameter_shapes(l: Layer) -> dict[str, tuple[int, ...]]:
    """Name -> shape of each trainable tensor of a layer (weights per input, then biases)."""
    if l.kind == "conv":
        size = l.args["size"]
        shapes = [(l.shape.channels, x.channels, size, size) for x in l.in_shapes]
        biases = (l.shape.channels,)
    elif l.kind == "fc":
        shapes = [(x.size, l.shape.size) for x in l.in_shapes]
        biases = (l.shape.size,)
    else:
        return {}
    names = ["weights"] if len(shapes) == 1 else [f"weights.{i}" for i in range(len(shapes))]
    return {**dict(zip(names, shapes)), "biases": biases}


def weight_names(l: Layer) -> list[str]:
    return [n for n in parameter_shapes(l) if n.startswith("weights")]


# ---------------------------------------------------------------- shapes of ops

def conv_params(l: Layer, i: int, cases: int) -> dict:
    x = l.in_shapes[i]
    return dict(N=cases, C=x.channels, H=x.height, W=x.width, K=l.shape.channels, R=l.args["size"],
                S=l.args["size"], P=l.shape.height, Q=l.shape.width, stride=l.args["stride"], pad=l.args["padding"])


def fc_params(l: Layer, i: int, cases: int) -> dict:
    return dict(N=cases, I=l.in_shapes[i].size, O=l.shape.size)


def pool_params(l: Layer, cases: int) -> dict:
    x = l.in_shapes[0]
    return dict(N=cases, C=x.channels, H=x.height, W=x.width, P=l.shape.height, Q=l.shape.width,
                size=l.args["size"], stride=l.args["stride"], start=l.args["start"],
                mode="max" if l.kind == "maxpool" else "avg")


def _gemm_shape_tag(op_params: dict, kind: str) -> str:
    q = op_params
    if kind == "conv":
        return f"n{q['N']}_c{q['C']}_k{q['K']}_{q['R']}x{q['S']}"
    return f"n{q['N']}_i{q['I']}_o{q['O']}"


# ---------------------------------------------------------------- forward

def forward_weighted(site: Site) -> None:
    """conv / fc: y = neuron(b + sum over inputs of W_i * x_i), one launch per input.

    The first launch adds the bias, later ones add into y; only the last applies
    the neuron, so a layer with several inputs sums them exactly as one would."""
    l = site.layer
    kind = l.kind
    make = conv_params if kind == "conv" else fc_params
    names = weight_names(l)
    last = len(l.inputs) - 1
    for i, (x, wname) in enumerate(zip(site.inputs, names)):
        q = make(l, i, site.cases)
        neuron = l.neuron if i == last else Neuron()
        params = dict(q, neuron=neuron.to_json())
        suffix = ""
        if last:
            params.update(accumulate=i > 0, bias=i == 0)
            suffix = f"_in{i}"
        tag = f"fwd_{_gemm_shape_tag(q, kind)}{suffix}"
        if kind == "conv":
            summary = (f"forward of {l.name}: {q['K']} filters {q['R']}x{q['S']} over {q['C']}x{q['H']}x{q['W']}, "
                       f"stride {q['stride']}, padding {q['pad']}, {neuron}")
        else:
            summary = f"forward of {l.name}: {q['I']} inputs to {q['O']} outputs, {neuron}"
        if last:
            summary += f" (input {i + 1} of {last + 1}{', adds the bias' if i == 0 else ', adds into the output'})"
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


def forward_logreg(site: Site, loss: str, correct: str) -> None:
    l = site.layer
    q = dict(N=site.cases, C=l.in_shapes[1].size, top_k=l.args["top_k"])
    site.launch(f"logreg_fwd_n{q['N']}_c{q['C']}", "logreg_fwd", q, (site.inputs[0], site.inputs[1], loss, correct),
                (loss, correct), f"cost {l.name}: -log p(label) and top-{q['top_k']} correctness per case")


# ---------------------------------------------------------------- backward

def neuron_backward(site: Site, dy: str) -> None:
    """Turn the gradient of a fused neuron's output into that of its input, in place."""
    l = site.layer
    if l.neuron.is_identity:
        return
    n = site.cases * l.shape.size
    site.launch(f"{l.neuron.name}_bwd_n{n}", "neuron_bwd", dict(n=n, neuron=l.neuron.to_json()),
                (site.output, dy), (dy,), f"backward of {l.name}'s {l.neuron} neuron, in place on its gradient")


def weight_gradients(site: Site, dy: str, accumulate: bool) -> None:
    """Gradients of a conv / fc layer's weights (per input) and biases, summed over its cases;
    `accumulate` adds them to the gradients of earlier passes of the same update period."""
    l = site.layer
    acc = "_acc" if accumulate else ""
    inner = l.shape.height * l.shape.width
    k = l.shape.channels if l.kind == "conv" else l.shape.size
    site.launch(f"bias_grad_k{k}_n{site.cases}{acc}", "bias_grad",
                dict(N=site.cases, K=k, inner=inner, accumulate=accumulate), (dy, site.grads["biases"]),
                (site.grads["biases"],),
                f"gradient of {l.name}'s biases: sum over cases" + (" and pixels" if inner > 1 else ""))
    make = conv_params if l.kind == "conv" else fc_params
    for i, (x, wname) in enumerate(zip(site.inputs, weight_names(l))):
        q = make(l, i, site.cases)
        suffix = f"_in{i}" if len(l.inputs) > 1 else ""
        site.launch(f"bwd_filter_{_gemm_shape_tag(q, l.kind)}{suffix}{acc}", f"{l.kind}_bwd_filter",
                    dict(q, accumulate=accumulate), (x, dy, site.grads[wname]), (site.grads[wname],),
                    f"gradient of {l.name}'s weights" + (f" for input {l.inputs[i]}" if suffix else ""))


def backward_weighted(site: Site, dy: str, dxs: list[tuple[str, bool] | None]) -> None:
    l = site.layer
    make = conv_params if l.kind == "conv" else fc_params
    for i, (target, wname) in enumerate(zip(dxs, weight_names(l))):
        if target is None:
            continue
        dx, acc = target
        q = make(l, i, site.cases)
        suffix = (f"_in{i}" if len(l.inputs) > 1 else "") + ("_acc" if acc else "")
        site.launch(f"bwd_data_{_gemm_shape_tag(q, l.kind)}{suffix}", f"{l.kind}_bwd_data", dict(q, accumulate=acc),
                    (site.params[wname], dy, dx), (dx,),
                    f"gradient of {l.name} with respect to its input {l.inputs[i]}")


def backward_pool(site: Site, dy: str, dxs: list[tuple[str, bool] | None]) -> None:
    if dxs[0] is None:
        return
    dx, acc = dxs[0]
    q = dict(pool_params(site.layer, site.cases), accumulate=acc)
    site.launch(f"bwd_{q['mode']}_{q['size']}x{q['size']}s{q['stride']}_n{q['N']}{'_acc' if acc else ''}",
                "pool_bwd", q, (site.inputs[0], site.output, dy, dx), (dx,),
                f"gradient of {site.layer.name} with respect to its input {site.layer.inputs[0]}")


def backward_softmax(site: Site, dy: str, dxs: list[tuple[str, bool] | None]) -> None:
    if dxs[0] is None:
        return
    dx, acc = dxs[0]
    q = dict(N=site.cases, C=site.layer.shape.size, accumulate=acc)
    site.launch(f"softmax_bwd_n{q['N']}_c{q['C']}{'_acc' if acc else ''}", "softmax_bwd", q,
                (site.output, dy, dx), (dx,),
                f"gradient of softmax {site.layer.name} with respect to {site.layer.inputs[0]}")


def backward_logreg(site: Site, dxs: list[tuple[str, bool] | None], through_softmax: str | None) -> None:
    """The cost's gradient: with respect to the probabilities, or, when `through_softmax`
    names the softmax feeding it, directly with respect to that softmax's input."""
    l = site.layer
    if dxs[1] is None:
        return
    dx, accumulate = dxs[1]
    q = dict(N=site.cases, C=l.in_shapes[1].size, coeff=l.args["coeff"], accumulate=accumulate)
    acc = "_acc" if accumulate else ""
    labels, probs = site.inputs
    if through_softmax:
        site.launch(f"softmax_logreg_bwd_n{q['N']}_c{q['C']}{acc}", "softmax_logreg_bwd", q, (labels, probs, dx),
                    (dx,), f"gradient of cost {l.name} through softmax {through_softmax}: coeff * (probs - onehot)")
    else:
        site.launch(f"logreg_bwd_n{q['N']}_c{q['C']}{acc}", "logreg_bwd", q, (labels, probs, dx), (dx,),
                    f"gradient of cost {l.name} with respect to {l.inputs[1]}")


# costs: forward(site, loss, correct); backward(site, dxs, fused softmax name or None)
COST_FORWARD = {"logreg": forward_logreg}
COST_BACKWARD = {"logreg": backward_logreg}
# costs that may be differentiated through the softmax feeding them: kind -> index of that input
FUSES_SOFTMAX = {"logreg": 1}

FORWARD = {"conv": forward_weighted, "fc": forward_weighted, "maxpool": forward_pool, "avgpool": forward_pool,
           "softmax": forward_softmax}
BACKWARD = {"conv": backward_weighted, "fc": backward_weighted, "maxpool": backward_pool, "avgpool": backward_pool,
            "softmax": backward_softmax}
