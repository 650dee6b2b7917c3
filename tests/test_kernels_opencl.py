"""Every generated kernel, run through OpenCL (PoCL on the CPU), equals the reference op.

All cases are rendered into one OpenCL program (one build), then each kernel is
launched on random data and compared with cnnc.backends.reference_ops.
"""
from __future__ import annotations

import numpy as np
import pytest

from cnnc.backends.base import Backend
from cnnc.backends.reference_ops import REFERENCE_OPS
from cnnc.check.kinds import conv_out, pool_out
from cnnc.codegen.dialect import OPENCL
from cnnc.codegen.render import render_source
from cnnc.neurons import NEURONS, make_neuron
from cnnc.ops import OPS, Role
from cnnc.plan.schedule import Buffer, Kernel

FUSABLE = [n for n, k in NEURONS.items() if not k.needs_input]


def conv(N, C, H, W, K, R, stride, pad):
    return dict(N=N, C=C, H=H, W=W, K=K, R=R, S=R, P=conv_out(H, R, stride, pad), Q=conv_out(W, R, stride, pad),
                stride=stride, pad=pad)


def pool(N, C, H, W, size, stride, start, mode):
    return dict(N=N, C=C, H=H, W=W, P=pool_out(H, size, stride, start), Q=pool_out(W, size, stride, start),
                size=size, stride=stride, start=start, mode=mode)


def cases():
    rng = np.random.default_rng(7)
    out = []
    convs = [conv(2, 3, 8, 8, 4, 3, 1, 1), conv(3, 5, 9, 7, 6, 3, 2, 1), conv(2, 2, 11, 11, 5, 5, 3, 2),
             conv(4, 20, 9, 9, 70, 3, 1, 1), conv(1, 3, 6, 6, 8, 1, 1, 0), conv(2, 4, 7, 7, 3, 4, 2, 0)]
    for i, p in enumerate(convs):
        neuron = make_neuron(FUSABLE[i % len(FUSABLE)], (1.5, 0.7) if FUSABLE[i % len(FUSABLE)] == "tanh" else ())
        out.append(("conv_fwd", dict(p, neuron=neuron.to_json())))
        out.append(("conv_bwd_data", dict(p, accumulate=bool(i % 2))))
        out.append(("conv_bwd_filter", dict(p, accumulate=not i % 2)))
    for i, (N, I, O) in enumerate([(4, 10, 7), (5, 130, 67), (33, 17, 100), (2, 300, 3)]):
        p = dict(N=N, I=I, O=O)
        out.append(("fc_fwd", dict(p, neuron=make_neuron(FUSABLE[(i + 3) % len(FUSABLE)]).to_json())))
        out.append(("fc_bwd_data", dict(p, accumulate=bool(i % 2))))
        out.append(("fc_bwd_filter", dict(p, accumulate=not i % 2)))
    for name in FUSABLE:
        out.append(("neuron_bwd", dict(n=int(rng.integers(50, 300)), neuron=make_neuron(name).to_json())))
    for i, p in enumerate([pool(2, 3, 8, 8, 2, 2, 0, "max"), pool(2, 3, 9, 9, 3, 2, 0, "max"),
                           pool(1, 2, 7, 7, 3, 2, 1, "avg"), pool(2, 2, 9, 9, 3, 2, 0, "avg"),
                           pool(1, 2, 5, 5, 1, 3, 0, "max"), pool(2, 4, 10, 10, 3, 3, 1, "avg")]):
        out.append(("pool_fwd", p))
        out.append(("pool_bwd", dict(p, accumulate=bool(i % 2))))
    out += [("bias_grad", dict(N=3, K=5, inner=49)), ("bias_grad", dict(N=70, K=4, inner=1, accumulate=True)),
            ("bias_grad", dict(N=2, K=3, inner=1000))]
    for i, (N, C) in enumerate([(5, 10), (37, 3), (4, 1000)]):
        out.append(("softmax_fwd", dict(N=N, C=C)))
        out.append(("softmax_bwd", dict(N=N, C=C, accumulate=bool(i % 2))))
        out.append(("logreg_fwd", dict(N=N, C=C, top_k=1 + i)))
        out.append(("logreg_bwd", dict(N=N, C=C, coeff=1.0 + i, accumulate=bool(i % 2))))
        out.append(("softmax_logreg_bwd", dict(N=N, C=C, coeff=0.5 + i, accumulate=not i % 2)))
    out.append(("sgd_update", dict(n=1000)))
    out.append(("sgd_update", dict(n=7)))
    return [Kernel(f"case{i}_{op}", op, p, "", 0, f"test case {i}") for i, (op, p) in enumerate(out)]


def buffer_size(op: str, name: str, p: dict) -> int:
    """Element count of an op argument, from the op's params."""
    sizes = {
        "conv": dict(x=p.get("N", 0) * p.get("C", 0) * p.get("H", 0) * p.get("W", 0),
                     w=p.get("K", 0) * p.get("C", 0) * p.get("R", 0) * p.get("S", 0), b=p.get("K", 0),
                     y=p.get("N", 0) * p.get("K", 0) * p.get("P", 0) * p.get("Q", 0)),
    }
    if op.startswith("conv"):
        s = sizes["conv"]
        return {"x": s["x"], "dx": s["x"], "w": s["w"], "dw": s["w"], "b": s["b"], "y": s["y"], "dy": s["y"]}[name]
    if op.startswith("fc"):
        return {"x": p["N"] * p["I"], "dx": p["N"] * p["I"], "w": p["I"] * p["O"], "dw": p["I"] * p["O"],
                "b": p["O"], "y": p["N"] * p["O"], "dy": p["N"] * p["O"]}[name]
    if op.startswith("pool"):
        return {"x": p["N"] * p["C"] * p["H"] * p["W"], "dx": p["N"] * p["C"] * p["H"] * p["W"],
                "y": p["N"] * p["C"] * p["P"] * p["Q"], "dy": p["N"] * p["C"] * p["P"] * p["Q"]}[name]
    if op == "bias_grad":
        return {"dy": p["N"] * p["K"] * p["inner"], "db": p["K"]}[name]
    if op in ("neuron_bwd", "sgd_update"):
        return p["n"]
    if name in ("labels", "loss", "correct"):
        return p["N"]
    return p["N"] * p["C"]


def inputs_for(k: Kernel, rng) -> dict[str, np.ndarray | float]:
    """Random, valid inputs for every argument (outputs too, to catch accumulate bugs)."""
    p, vals = k.params, {}
    for name, role in OPS[k.op].args:
        if role is Role.SCALAR:
            vals[name] = {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.001, "inv_cases": 1 / 32}[name]
            continue
        n = buffer_size(k.op, name, p)
        if name == "labels":
            vals[name] = rng.integers(0, p["C"], n).astype(np.int32)
        elif name in ("probs",) or (k.op.startswith("softmax") and name == "y"):
            z = rng.standard_normal((p["N"], p["C"]))
            e = np.exp(z - z.max(1, keepdims=True))
            vals[name] = (e / e.sum(1, keepdims=True)).astype(np.float32).reshape(-1)
        else:
            vals[name] = rng.standard_normal(n).astype(np.float32)
    if k.op == "neuron_bwd":                 # y must be a possible output of the neuron
        from cnnc.neurons import Neuron
        nr = Neuron.from_json(p["neuron"])
        x = rng.uniform(0.1, 2.0, p["n"]) * rng.choice([-1, 1], p["n"])
        if nr.name in ("sqrt", "log"):
            x = np.abs(x)
        vals["y"] = nr.forward(x.astype(np.float32))
    if k.op == "pool_bwd":                   # y must be the pooling of x
        REFERENCE_OPS["pool_fwd"](p, vals["x"], vals["y"])
    return vals


@pytest.fixture(scope="module")
def device():
    from cnnc.backends.opencl import OpenCLBackend
    kernels = cases()
    source, launches = render_source(kernels, OPENCL, "test", "", "kernel equivalence cases")
    for k in kernels:
        k.launch["opencl"] = launches[k.name]
    return OpenCLBackend({0: source}, [0]), {k.name: k for k in kernels}


@pytest.mark.parametrize("name", [k.name for k in cases()])
def test_kernel_matches_reference(device, name):
    backend, kernels = device
    k = kernels[name]
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    vals = inputs_for(k, rng)
    ref = {n: (v.copy() if isinstance(v, np.ndarray) else v) for n, v in vals.items()}
    REFERENCE_OPS[k.op](k.params, *[ref[n] for n in OPS[k.op].arg_names])
    handles = {}
    for n, role in OPS[k.op].args:
        if role is Role.SCALAR:
            continue
        v = vals[n]
        buf = Buffer(n, 0, v.size, "i32" if v.dtype == np.int32 else "f32", "test", "")
        handles[n] = (buf, backend.alloc(buf, 0))
        backend.upload(handles[n][1], v)
    backend.launch(k, 0, [handles[n][1] if n in handles else vals[n] for n in OPS[k.op].arg_names])
    backend.synchronize()
    for n, role in OPS[k.op].args:
        if role in (Role.OUT, Role.INOUT):
            got = backend.download(handles[n][1], handles[n][0])
            want = ref[n]
            scale = float(np.abs(want).max()) if want.size else 1.0
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * max(scale, 1.0),
                                       err_msg=f"{k.op} {k.params} output {n}")
