"""The same network in PyTorch, for `cnnc bench --against torch`.

Built from the checked IR (not from the plan), timed on the same data as the
cnnc run: whole training steps, plus per-layer forward and backward times
from module hooks.  PyTorch is optional; without it this says so clearly.
"""
from __future__ import annotations

import time
import warnings
from collections import defaultdict

import numpy as np

from cnnc.backends.base import BackendError
from cnnc.check import check
from cnnc.frontend.parser import parse
from cnnc.ir import Layer


def _torch():
    try:
        import torch
    except ImportError:
        raise BackendError("--against torch needs PyTorch: pip install torch") from None
    return torch


def _activation(torch, layer: Layer):
    n = layer.neuron
    table = {"ident": lambda x: x, "relu": torch.relu, "logistic": torch.sigmoid,
             "tanh": lambda x: n.a * torch.tanh(n.b * x), "abs": torch.abs, "square": lambda x: x * x,
             "softrelu": torch.nn.functional.softplus, "linear": lambda x: n.a * x + n.b,
             "brelu": lambda x: torch.clamp(x, 0, n.a), "sqrt": torch.sqrt, "log": lambda x: torch.log(n.a + x)}
    return table[n.name]


def build_model(torch, net):
    """An nn.Module computing the network's first cost, layer by layer (one submodule each)."""
    nn = torch.nn

    class Layerwise(nn.Module):
        def __init__(self):
            super().__init__()
            self.parts = nn.ModuleDict()
            for l in net.layers:
                self.parts[l.name] = self.part(l)

        def part(self, l: Layer):
            a = l.args
            if l.kind == "conv":
                convs = nn.ModuleList(nn.Conv2d(s.channels, l.shape.channels, a["size"], a["stride"], a["padding"],
                                                groups=a.get("groups", 1), bias=(i == 0))
                                      for i, s in enumerate(l.in_shapes))
                return convs
            if l.kind == "fc":
                return nn.ModuleList(nn.Linear(s.size, l.shape.size, bias=(i == 0)) for i, s in enumerate(l.in_shapes))
            if l.kind in ("maxpool", "avgpool"):
                cls = nn.MaxPool2d if l.kind == "maxpool" else nn.AvgPool2d
                return cls(a["size"], a["stride"], ceil_mode=True)
            if l.kind in ("dropout", "dropout2"):
                return nn.Dropout(1 - a["keep"])
            if l.kind == "cmrnorm":
                return nn.LocalResponseNorm(a["size"], a["scale"], a["pow"], a.get("min_div", 1.0))
            if l.kind in ("softmax", "logreg", "neuron", "pass", "eltsum", "concat"):
                return nn.Identity()
            raise BackendError(f"--against torch does not model {l.kind} layers ({l.name})")

        def forward(self, x, y):
            values = {i.name: (x if i.kind == "image" else y) for i in net.inputs}
            for l in net.layers:
                part = self.parts[l.name]
                ins = [values[i] for i in l.inputs]
                if l.kind in ("conv", "fc"):
                    flat = [v.flatten(1) for v in ins] if l.kind == "fc" else ins
                    out = sum(m(v) for m, v in zip(part, flat))
                    values[l.name] = _activation(torch, l)(out)
                elif l.kind == "softmax":
                    values[l.name] = torch.log_softmax(ins[0].flatten(1), dim=1)    # log-probabilities
                elif l.kind == "logreg":
                    return torch.nn.functional.nll_loss(ins[1], ins[0].long(), reduction="sum")
                elif l.kind == "neuron":
                    values[l.name] = _activation(torch, l)(ins[0])
                elif l.kind == "eltsum":
                    values[l.name] = sum(ins)
                elif l.kind == "concat":
                    values[l.name] = torch.cat(ins, dim=1)
                else:
                    values[l.name] = part(ins[0])
            raise BackendError("--against torch needs a logreg cost")

    return Layerwise()


def torch_step_ms(source: str, batch: int, x: np.ndarray, y: np.ndarray, steps: int, warmup: int) -> dict:
    torch = _torch()
    net = check(parse(source, "source.cnn"))
    model = build_model(torch, net)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)

    def step():
        opt.zero_grad()
        model(tx, ty).backward()
        opt.step()

    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    step_ms = (time.perf_counter() - t0) / steps * 1e3
    times: dict[str, dict[str, float]] = defaultdict(lambda: {"forward_ms": 0.0, "backward_ms": 0.0})
    starts: dict[tuple[str, str], float] = {}
    handles = []
    for name, part in model.parts.items():
        for module in (part if isinstance(part, torch.nn.ModuleList) else [part]):   # one per input
            handles.append(module.register_forward_pre_hook(
                lambda m, i, n=name: starts.__setitem__((n, "f"), time.perf_counter())))
            handles.append(module.register_forward_hook(
                lambda m, i, o, n=name: times[n].__setitem__(
                    "forward_ms", times[n]["forward_ms"] + (time.perf_counter() - starts[(n, "f")]) * 1e3)))
            handles.append(module.register_full_backward_pre_hook(
                lambda m, g, n=name: starts.__setitem__((n, "b"), time.perf_counter())))
            handles.append(module.register_full_backward_hook(
                lambda m, gi, go, n=name: times[n].__setitem__(
                    "backward_ms", times[n]["backward_ms"] + (time.perf_counter() - starts[(n, "b")]) * 1e3)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # hooks on the first layer see no input gradient: expected
        step()
    for h in handles:
        h.remove()
    return {"version": torch.__version__, "device": "cpu", "step_ms": step_ms,
            "layers": {k: dict(v) for k, v in times.items()}}
