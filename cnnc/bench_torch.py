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
from cnnc.check.kinds import KINDS, TORCH_TWINS, torch_twin
from cnnc.frontend.parser import parse
from cnnc.ir import Layer
from cnnc.precision import DEFAULT as DEFAULT_PRECISION


def require_torch():
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


# ---------------------------------------------------------------- the twins, one per layer kind
# A twin is twin(torch, layer) -> an nn.Module whose forward(*inputs) computes the layer's
# output as [N, C, H, W] (a cost: its value summed over the cases), with cuda-convnet2's
# semantics written out: the last conv window may overhang the padded image, pool and
# normalisation windows are clipped to the image.

def _module(torch, forward, **parts):
    """An nn.Module holding `parts` (modules and parameters) and computing forward(self, *inputs)."""
    nn = torch.nn

    class Twin(nn.Module):
        def __init__(self):
            super().__init__()
            for name, part in parts.items():
                setattr(self, name, part)

        def forward(self, *inputs):
            return forward(self, *inputs)

    return Twin()


def _image(torch, x, shape):
    return x.reshape(x.shape[0], shape.channels, shape.height, shape.width)


def _overhang(torch, x, size: int, stride: int, pad: int, out_h: int, out_w: int, fill: float = 0.0):
    """x padded by `pad` on the top and left and, on the bottom and right, by `pad` plus whatever
    the last windows overhang."""
    h, w = x.shape[2:]
    extra_h = max(0, (out_h - 1) * stride + size - (h + 2 * pad))
    extra_w = max(0, (out_w - 1) * stride + size - (w + 2 * pad))
    return torch.nn.functional.pad(x, (pad, pad + extra_w, pad, pad + extra_h), value=fill)


def _biases(torch, l: Layer, shared: bool):
    out = l.shape
    return torch.nn.Parameter(torch.zeros(out.channels if shared else (out.channels, out.height, out.width)))


@torch_twin("conv")
def _conv(torch, l: Layer):
    a, out, kind = l.args, l.shape, KINDS["conv"]
    groups, shared = kind.value(a, "groups"), kind.value(a, "shared_biases")
    convs = torch.nn.ModuleList(torch.nn.Conv2d(x.channels, out.channels, a["size"], a["stride"],
                                                groups=groups, bias=False) for x in l.in_shapes)
    neuron = _activation(torch, l)

    def forward(self, *ins):
        z = sum(conv(_overhang(torch, _image(torch, x, s), a["size"], a["stride"], a["padding"], out.height,
                               out.width)) for conv, x, s in zip(self.convs, ins, l.in_shapes))
        return neuron(z + (self.b[:, None, None] if shared else self.b))

    return _module(torch, forward, convs=convs, b=_biases(torch, l, shared))


@torch_twin("local")
def _local(torch, l: Layer):
    a, out, x_shape = l.args, l.shape, l.in_shapes[0]
    size = a["size"]
    w = torch.nn.Parameter(torch.randn(out.height * out.width, out.channels, x_shape.channels * size * size) * 0.01)
    neuron = _activation(torch, l)

    def forward(self, x):
        xp = _overhang(torch, _image(torch, x, x_shape), size, a["stride"], a["padding"], out.height, out.width)
        cols = torch.nn.functional.unfold(xp, size, stride=a["stride"])       # [N, C*R*S, P*Q]
        y = torch.einsum("pkc,ncp->nkp", self.w, cols).reshape(x.shape[0], *self.b.shape)
        return neuron(y + self.b)

    return _module(torch, forward, w=w, b=_biases(torch, l, shared=False))


@torch_twin("fc")
def _fc(torch, l: Layer):
    linears = torch.nn.ModuleList(torch.nn.Linear(x.size, l.shape.size, bias=i == 0)
                                  for i, x in enumerate(l.in_shapes))
    neuron = _activation(torch, l)

    def forward(self, *ins):
        return neuron(sum(f(x.flatten(1)) for f, x in zip(self.linears, ins)))

    return _module(torch, forward, linears=linears)


@torch_twin("maxpool", "avgpool")
def _pool(torch, l: Layer):
    """Windows start+p*stride .. +size, clipped to the image: a max over the pixels inside, or
    their sum divided by how many there are (every window starts inside the image)."""
    F = torch.nn.functional
    a, x_shape, out = l.args, l.in_shapes[0], l.shape
    size, stride, start = a["size"], a["stride"], a["start"]

    def pooled(pool, v, fill):
        v = _overhang(torch, v[:, :, start:, start:], size, stride, 0, out.height, out.width, fill)
        return pool(v, size, stride)[:, :, :out.height, :out.width]

    def window_sum(v, size, stride):
        return F.avg_pool2d(v, size, stride, divisor_override=1)

    def forward(self, x):
        x = _image(torch, x, x_shape)
        if l.kind == "maxpool":
            return pooled(F.max_pool2d, x, float("-inf"))
        return pooled(window_sum, x, 0.0) / pooled(window_sum, torch.ones_like(x[:1, :1]), 0.0)

    return _module(torch, forward)


def _window_sum(torch, l: Layer, v):
    """Sum of v [N, C, H, W] over each value's normalisation window: `size` channels from
    c - size//2 (cmrnorm; blocked: the block of `size` channels holding c) or size x size
    pixels from (h - size//2, w - size//2), clipped."""
    F = torch.nn.functional
    size, (n, c, h, w) = l.args["size"], v.shape
    if l.kind == "cmrnorm" and KINDS["cmrnorm"].value(l.args, "blocked"):
        blocks = -(-c // size)
        summed = F.pad(v, (0, 0, 0, 0, 0, blocks * size - c)).reshape(n, blocks, size, h, w).sum(2)
        return summed.repeat_interleave(size, dim=1)[:, :c]
    lo, hi = size // 2, size - 1 - size // 2
    if l.kind == "cmrnorm":
        padded = F.pad(v, (0, 0, 0, 0, lo, hi))
        return sum(padded[:, i:i + c] for i in range(size))
    return F.avg_pool2d(F.pad(v, (lo, hi, lo, hi)), size, 1, divisor_override=1)


@torch_twin("cmrnorm", "rnorm", "cnorm")
def _norm(torch, l: Layer):
    """y = x * (min_div + add_scale * window sum of x^2, or for cnorm of (x - window mean)^2)^-pow,
    add_scale = scale/size across maps and scale/size^2 over pixels."""
    a, x_shape = l.args, l.in_shapes[0]
    add_scale = a["scale"] / (a["size"] if l.kind == "cmrnorm" else a["size"] ** 2)

    def forward(self, x):
        x = _image(torch, x, x_shape)
        v = x
        if l.kind == "cnorm":
            counts = _window_sum(torch, l, torch.ones_like(x[:1, :1]))
            v = x - _window_sum(torch, l, x) / counts
        return x * (a["min_div"] + add_scale * _window_sum(torch, l, v * v)) ** -a["pow"]

    return _module(torch, forward)


@torch_twin("neuron")
def _neuron(torch, l: Layer):
    neuron = _activation(torch, l)
    return _module(torch, lambda self, x: neuron(x))


@torch_twin("dropout", "dropout2")
def _dropout(torch, l: Layer):
    """dropout scales kept values by 1/keep in training; dropout2 keeps them as they are and
    scales by keep at test time.  A `keep_mask` set on the module ([N, D] booleans) replaces
    PyTorch's random mask in training, so that the twin can follow cnnc's masks exactly."""
    keep = l.args["keep"]

    def forward(self, x):
        if self.training and self.keep_mask is not None:
            kept = self.keep_mask.reshape(x.shape).to(x.dtype)
            return x * kept / keep if l.kind == "dropout" else x * kept
        if l.kind == "dropout":
            return torch.nn.functional.dropout(x, 1 - keep, self.training)
        return torch.nn.functional.dropout(x, 1 - keep, True) * keep if self.training else x * keep

    return _module(torch, forward, keep_mask=None)


@torch_twin("eltsum", "pass")
def _eltsum(torch, l: Layer):
    coeffs = l.args.get("coeffs") or [1.0] * len(l.inputs)
    return _module(torch, lambda self, *ins: sum(c * x for c, x in zip(coeffs, ins)))


@torch_twin("eltmax")
def _eltmax(torch, l: Layer):
    def forward(self, *ins):
        y = ins[0]
        for x in ins[1:]:
            y = torch.maximum(y, x)
        return y

    return _module(torch, forward)


@torch_twin("concat")
def _concat(torch, l: Layer):
    return _module(torch, lambda self, *ins: torch.cat([_image(torch, x, s) for x, s in zip(ins, l.in_shapes)], 1))


@torch_twin("softmax")
def _softmax(torch, l: Layer):
    return _module(torch, lambda self, x: torch.softmax(x.flatten(1), dim=1))


@torch_twin("logreg", "crossent")
def _probability_cost(torch, l: Layer):
    """-log p(label) summed over the cases (crossent against one-hot labels is the same value)."""
    return _module(torch, lambda self, labels, probs: -torch.log(
        probs.flatten(1).gather(1, labels.long()[:, None])).sum())


@torch_twin("sum2")
def _sum2(torch, l: Layer):
    return _module(torch, lambda self, x: (x * x).sum())


def build_model(torch, net):
    """An nn.Module computing the network's objective, the sum of coeff * cost over its costs,
    with one submodule per layer (its twin)."""
    nn = torch.nn

    class Layerwise(nn.Module):
        def __init__(self):
            super().__init__()
            self.parts = nn.ModuleDict()
            for l in net.layers:
                if l.kind not in TORCH_TWINS:
                    raise BackendError(f"--against torch does not model {l.kind} layers ({l.name})")
                self.parts[l.name] = TORCH_TWINS[l.kind](torch, l)

        def outputs(self, x, y) -> dict:
            """Every layer's output (a cost's: its value), by name."""
            values = {i.name: (x if i.kind == "image" else y) for i in net.inputs}
            for l in net.layers:
                out = self.parts[l.name](*(values[i] for i in l.inputs))
                values[l.name] = out if KINDS[l.kind].is_cost else _image(torch, out, l.shape)
            return values

        def forward(self, x, y):
            values = self.outputs(x, y)
            return sum(l.args["coeff"] * values[l.name] for l in net.layers if KINDS[l.kind].is_cost)

    return Layerwise()


def torch_device(torch, backend: str, gpu: int) -> str:
    """The device PyTorch runs on to be compared fairly with a cnnc backend: the same CUDA GPU
    (with cuDNN) as the cuda backend's first logical device, else the host's CPU, which the
    opencl (PoCL) and reference backends also run on.  A CUDA comparison that this PyTorch
    cannot make is refused rather than quietly made against the CPU."""
    if backend != "cuda":
        return "cpu"
    if not torch.cuda.is_available():
        raise BackendError(f"--against torch on the cuda backend needs a PyTorch built with CUDA "
                           f"(this is PyTorch {torch.__version__}, CPU only)")
    return f"cuda:{gpu}"


def match_precision(torch, net, device: str) -> tuple[str, object]:
    """Set PyTorch's math to the network's GEMM precision where PyTorch can match it, and say what
    it uses: (description for the report, context manager to run forward passes in).  Its flags
    are global, so a network whose layers differ gets its train {} default throughout.  On CUDA,
    tf32 is cuBLAS's and cuDNN's TF32 mode and fp32 turns that mode off (cuDNN's default is on);
    bf16 is autocast, which also stores conv and linear outputs in bf16 where cnnc keeps float32.
    On a CPU PyTorch has no TF32, so its side of the comparison is then fp32."""
    import contextlib

    own = {l.train.precision for l in net.layers if l.train}
    default = net.settings.get("precision", DEFAULT_PRECISION)
    wanted = next(iter(own)) if len(own) == 1 else default
    mixed = " (the layers' precisions differ: PyTorch's flags are global, so the train {} default)" \
        if len(own) > 1 else ""
    if not device.startswith("cuda"):
        if wanted == DEFAULT_PRECISION:
            return f"fp32{mixed}", contextlib.nullcontext()
        return (f"fp32 (the network's {wanted}: PyTorch has no {wanted} GEMMs to match on a CPU){mixed}",
                contextlib.nullcontext())
    torch.backends.cuda.matmul.allow_tf32 = wanted == "tf32"
    torch.backends.cudnn.allow_tf32 = wanted == "tf32"
    if wanted == "bf16":
        return (f"bf16 (autocast: conv and linear outputs are stored in bf16, cnnc keeps float32){mixed}",
                torch.autocast(device_type="cuda", dtype=torch.bfloat16))
    return f"{wanted}{mixed}", contextlib.nullcontext()


def torch_step_ms(source: str, batch: int, x: np.ndarray, y: np.ndarray, steps: int, warmup: int,
                  device: str = "cpu") -> dict:
    torch = require_torch()
    net = check(parse(source, "source.cnn"))
    model = build_model(torch, net).to(device)
    precision, math = match_precision(torch, net, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    tx, ty = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
    on_gpu = device.startswith("cuda")
    if on_gpu:
        torch.backends.cudnn.benchmark = True        # let cuDNN pick its fastest algorithms

    def settle():
        """GPU work is asynchronous: a host clock measures it only after it has finished."""
        if on_gpu:
            torch.cuda.synchronize(device)

    def clock() -> float:
        settle()
        return time.perf_counter()

    def step():
        opt.zero_grad()
        with math:
            loss = model(tx, ty)
        loss.float().backward()
        opt.step()

    for _ in range(warmup):
        step()
    t0 = clock()
    for _ in range(steps):
        step()
    step_ms = (clock() - t0) / steps * 1e3
    times: dict[str, dict[str, float]] = defaultdict(lambda: {"forward_ms": 0.0, "backward_ms": 0.0})
    starts: dict[tuple[str, str], float] = {}
    handles = []
    for name, part in model.parts.items():
        handles.append(part.register_forward_pre_hook(
            lambda m, i, n=name: starts.__setitem__((n, "f"), clock())))
        handles.append(part.register_forward_hook(
            lambda m, i, o, n=name: times[n].__setitem__(
                "forward_ms", times[n]["forward_ms"] + (clock() - starts[(n, "f")]) * 1e3)))
        handles.append(part.register_full_backward_pre_hook(
            lambda m, g, n=name: starts.__setitem__((n, "b"), clock())))
        handles.append(part.register_full_backward_hook(
            lambda m, gi, go, n=name: times[n].__setitem__(
                "backward_ms", times[n]["backward_ms"] + (clock() - starts[(n, "b")]) * 1e3)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # hooks on the first layer see no input gradient: expected
        step()
    for h in handles:
        h.remove()
    name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    return {"version": torch.__version__, "device": f"{device} ({name})" if on_gpu else "cpu", "step_ms": step_ms,
            "layers": {k: dict(v) for k, v in times.items()}, "precision": precision}
