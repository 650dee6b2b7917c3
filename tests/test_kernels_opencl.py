"""Every generated kernel, run through OpenCL (PoCL on the CPU), equals the reference op.

All cases are rendered into one OpenCL program (one build), then each kernel is
launched on random data and compared with cnnc.backends.reference_ops.  Each case
runs twice: with OpenCL's tiles, and with the CUDA target's tiles (block tiles,
thread tiles, work-group sizes), which is how the CUDA tiling is executed on a
machine without an NVIDIA GPU.
"""
from __future__ import annotations

import numpy as np
import pytest

from cnnc.backends.reference_ops import REFERENCE_OPS
from cnnc.check.kinds import conv_out, pool_out
from cnnc.codegen.dialect import CUDA, DIALECTS, OPENCL, with_tiles_of
from cnnc.codegen.render import render_source
from cnnc.neurons import NEURONS, make_neuron
from cnnc.ops import OPS, SCALAR_DTYPES, SCALARS_ARG, Role, scalar_bits
from cnnc.plan.schedule import Buffer, Kernel

from helpers import stable_seed

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
    out.append(("max_norm", dict(units=12, length=27, unit_stride=27, elem_stride=1, wball=5.0)))    # conv
    out.append(("max_norm", dict(units=10, length=40, unit_stride=1, elem_stride=10, wball=6.0)))    # fc
    out.append(("replica_sum", dict(R=3, n=50, offset=7)))
    out.append(("replica_sum", dict(R=2, n=1000, offset=0, accumulate=True)))
    # split-K weight gradients: partial sums per slice of the (case, row, column) reduction
    out.append(("conv_bwd_filter", dict(conv(4, 5, 9, 9, 6, 3, 1, 1), split=3, split_k=112)))
    out.append(("conv_bwd_filter", dict(conv(3, 3, 11, 11, 70, 5, 2, 2), split=4, split_k=48)))
    out.append(("sgd_update", dict(n=1000)))
    out.append(("sgd_update", dict(n=7)))
    out += layer_op_cases()
    return [Kernel(f"case{i}_{op}", op, p, "", 0, f"test case {i}") for i, (op, p) in enumerate(out)]


def norm(N, C, H, W, size, **kw):
    return dict(N=N, C=C, H=H, W=W, size=size, scale=kw.pop("scale", 0.7), pow=kw.pop("pow", 0.75),
                min_div=kw.pop("min_div", 1.0), **kw)


def layer_op_cases():
    """Cases of the cuda-convnet2 layer ops beyond conv/fc/pool/softmax."""
    out = []
    for i, name in enumerate(NEURONS):
        neuron = make_neuron(name, (1.5, 0.7) if name in ("tanh", "linear") else (1.3,) if name == "brelu" else ())
        out.append(("neuron_fwd", dict(n=97 + 13 * i, neuron=neuron.to_json())))
        out.append(("neuron_bwd_input", dict(n=130 - 7 * i, neuron=neuron.to_json(), accumulate=bool(i % 2))))
    for i, n in enumerate([1, 100, 1000]):
        out.append(("eltsum_fwd", dict(n=n, coeff=0.5 - i, accumulate=bool(i % 2))))
        out.append(("eltsum_bwd", dict(n=n, coeff=1.5 + i, accumulate=not i % 2)))
        out.append(("eltmax_fwd", dict(n=n, index=i, first=i == 0)))
        out.append(("eltmax_bwd", dict(n=n, index=i, accumulate=bool(i % 2))))
    for i, (N, D, D_out, offset) in enumerate([(3, 10, 25, 0), (4, 49, 147, 98), (1, 7, 7, 0), (70, 5, 11, 3)]):
        out.append(("concat_fwd", dict(N=N, D=D, D_out=D_out, offset=offset)))
        out.append(("concat_bwd", dict(N=N, D=D, D_out=D_out, offset=offset, accumulate=bool(i % 2))))
    for i, (N, C) in enumerate([(5, 10), (37, 3), (4, 1000)]):
        out.append(("crossent_fwd", dict(N=N, C=C)))
        out.append(("crossent_bwd", dict(N=N, C=C, coeff=1.0 + i, accumulate=bool(i % 2))))
        out.append(("softmax_crossent_bwd", dict(N=N, C=C, coeff=0.5 + i, accumulate=not i % 2)))
    for i, (N, D) in enumerate([(5, 10), (67, 3), (2, 2000)]):
        out.append(("sum2_fwd", dict(N=N, D=D)))
        out.append(("sum2_bwd", dict(N=N, D=D, coeff=0.3 + i, accumulate=bool(i % 2))))
    for i, p in enumerate([norm(2, 16, 5, 5, 5), norm(3, 7, 3, 4, 4, scale=0.01, pow=0.5),
                           norm(1, 20, 2, 2, 9, blocked=True), norm(2, 5, 3, 3, 2, min_div=2.0)]):
        out.append(("cmrnorm_fwd", p))
        out.append(("cmrnorm_bwd", dict(p, accumulate=bool(i % 2))))
    for i, p in enumerate([norm(2, 3, 8, 8, 5), norm(1, 2, 7, 9, 4, scale=0.05), norm(3, 1, 5, 5, 1),
                           norm(1, 2, 11, 11, 9, pow=0.6)]):
        out.append(("rnorm_fwd", p))
        out.append(("rnorm_bwd", dict(p, accumulate=bool(i % 2))))
        out.append(("cnorm_meandiff", {key: p[key] for key in ("N", "C", "H", "W", "size")}))
        out.append(("cnorm_fwd", p))
        out.append(("cnorm_bwd_prep", p))
        out.append(("cnorm_bwd", dict(p, accumulate=not i % 2)))
    for i, (N, D, keep, variant) in enumerate([(4, 50, 0.5, "dropout"), (33, 17, 0.8, "dropout"),
                                               (8, 100, 0.5, "dropout2"), (2, 1000, 0.1, "dropout2")]):
        p = dict(N=N, D=D, keep=keep, layer_id=3 + i, case_offset=16 * i, variant=variant)
        out.append(("dropout_fwd", p))
        out.append(("dropout_fwd", dict(p, train=False)))
        out.append(("dropout_bwd", dict(n=N * D, accumulate=bool(i % 2))))
    locals_ = [conv(2, 3, 8, 8, 4, 3, 1, 1), conv(3, 5, 9, 7, 6, 3, 2, 1), conv(5, 2, 6, 6, 16, 5, 1, 0),
               conv(2, 4, 7, 7, 3, 4, 2, 0)]
    for i, p in enumerate(locals_):
        out.append(("local_fwd", dict(p, neuron=make_neuron(FUSABLE[(i + 1) % len(FUSABLE)]).to_json())))
        out.append(("local_bwd_data", dict(p, accumulate=bool(i % 2))))
        out.append(("local_bwd_filter", dict(p, accumulate=not i % 2)))
        out.append(("bias_grad_unshared", dict(N=p["N"], K=p["K"], inner=p["P"] * p["Q"], accumulate=bool(i % 2))))
    grouped = [dict(conv(2, 4, 8, 8, 6, 3, 1, 1), groups=2), dict(conv(3, 6, 9, 7, 9, 3, 2, 1), groups=3),
               dict(conv(2, 8, 6, 6, 8, 1, 1, 0), groups=4, shared_biases=False),
               dict(conv(2, 3, 7, 7, 4, 3, 2, 0), shared_biases=False),
               dict(conv(2, 4, 9, 9, 40, 3, 1, 1), groups=2)]
    for i, p in enumerate(grouped):
        out.append(("conv_fwd", dict(p, neuron=make_neuron(FUSABLE[(i + 2) % len(FUSABLE)]).to_json())))
        out.append(("conv_bwd_data", dict(p, accumulate=bool(i % 2))))
        out.append(("conv_bwd_filter", dict(p, accumulate=not i % 2)))
    return out + summed_input_cases()


def summed_input_cases():
    """conv_fwd / fc_fwd as a layer with several inputs runs them: the first launch adds the
    bias, later ones add into y, the neuron applies to the whole sum; plus one-hot targets and
    dropout over cases that come in pieces."""
    out = []
    ident, tanh = make_neuron("ident").to_json(), make_neuron("tanh", (1.5, 0.7)).to_json()
    convs = [conv(2, 3, 8, 8, 4, 3, 1, 1), dict(conv(3, 4, 9, 7, 6, 3, 2, 1), groups=2, shared_biases=False),
             dict(conv(2, 3, 7, 7, 5, 3, 2, 0), shared_biases=False), dict(conv(2, 6, 6, 6, 6, 1, 1, 0), groups=3)]
    for i, p in enumerate(convs):
        out.append(("conv_fwd", dict(p, neuron=ident, accumulate=False, bias=True)))
        out.append(("conv_fwd", dict(p, neuron=tanh, accumulate=True, bias=False)))
        out.append(("conv_fwd", dict(p, neuron=make_neuron(FUSABLE[i % len(FUSABLE)]).to_json(),
                                     accumulate=bool(i % 2), bias=not i % 2)))
    for i, (N, I, O) in enumerate([(4, 10, 7), (33, 17, 100)]):
        p = dict(N=N, I=I, O=O)
        out.append(("fc_fwd", dict(p, neuron=ident, accumulate=False, bias=True)))
        out.append(("fc_fwd", dict(p, neuron=tanh, accumulate=True, bias=False)))
        out.append(("fc_fwd", dict(p, neuron=make_neuron("logistic").to_json(), accumulate=True, bias=True)))
    out += [("onehot", dict(N=5, C=10)), ("onehot", dict(N=33, C=3)), ("onehot", dict(N=2, C=1000))]
    for ranges in ([[0, 3], [8, 3]], [[12, 2], [4, 2], [20, 2]]):
        N = sum(c for _, c in ranges)
        out.append(("dropout_fwd", dict(N=N, D=40, keep=0.5, layer_id=2, case_ranges=ranges, variant="dropout")))
    return out


def buffer_size(op: str, name: str, p: dict) -> int:
    """Element count of an op argument, from the op registry; an argument that reaches a window
    of a larger buffer gets room after the window, which the kernel must leave alone."""
    spec = OPS[op]
    return spec.sizes(p)[name] + (5 if name in spec.windows else 0)


def inputs_for(k: Kernel, rng) -> dict[str, np.ndarray | float]:
    """Random, valid inputs for every argument (outputs too, to catch accumulate bugs)."""
    p, vals = k.params, {}
    for name, role in OPS[k.op].args:
        if role is Role.SCALAR:
            vals[name] = {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.001, "inv_cases": 1 / 32}[name]
            continue
        if role is Role.INT_SCALAR:
            vals[name] = np.int32({"seed": 1234567, "step": 41}[name])
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
    layer_inputs(k, rng, vals)
    return vals


def layer_inputs(k: Kernel, rng, vals: dict) -> None:
    """Make the inputs of the layer ops valid: domains, one-hot targets, forward results."""
    p = k.params
    if k.op in ("neuron_fwd", "neuron_bwd_input"):
        from cnnc.neurons import Neuron
        nr = Neuron.from_json(p["neuron"])
        x = rng.uniform(0.1, 2.0, p["n"]) * rng.choice([-1, 1], p["n"])
        if nr.name in ("sqrt", "log"):
            x = np.abs(x)
        vals["x"] = x.astype(np.float32)
    if k.op == "eltmax_bwd":
        vals["arg"] = rng.integers(0, 3, p["n"]).astype(np.float32)
    if "targets" in vals:                   # one-hot rows, and a few soft ones
        t = np.zeros((p["N"], p["C"]), np.float32)
        t[np.arange(p["N"]), rng.integers(0, p["C"], p["N"])] = 1
        t[::3] = rng.dirichlet(np.ones(p["C"]), len(t[::3]))
        vals["targets"] = t.reshape(-1)
    if k.op in ("crossent_fwd",) and p["C"] > 3:   # a tie at the maximum
        probs = vals["probs"].reshape(p["N"], p["C"])
        probs[0, 1] = probs[0].max()
        vals["targets"].reshape(p["N"], p["C"])[0] = np.eye(p["C"], dtype=np.float32)[1]
    norm_keys = {key: p[key] for key in ("N", "C", "H", "W", "size", "scale", "pow", "min_div", "blocked")
                 if key in p}
    if k.op == "cmrnorm_bwd":
        REFERENCE_OPS["cmrnorm_fwd"](norm_keys, vals["x"], np.zeros_like(vals["x"]), vals["denoms"])
    if k.op == "rnorm_bwd":
        REFERENCE_OPS["rnorm_fwd"](norm_keys, vals["x"], np.zeros_like(vals["x"]), vals["denoms"])
    if k.op in ("cnorm_fwd", "cnorm_bwd_prep", "cnorm_bwd"):
        md = np.zeros_like(vals["denoms"])
        REFERENCE_OPS["cnorm_meandiff"](norm_keys, vals.get("x", rng.standard_normal(md.size).astype(np.float32)), md)
        if k.op != "cnorm_bwd":
            vals["md"] = md
        den = np.zeros_like(md)
        REFERENCE_OPS["cnorm_fwd"](norm_keys, vals.get("x", md), md, np.zeros_like(md), den)
        if k.op != "cnorm_fwd":
            vals["denoms"] = den


# whose tiles the OpenCL kernels are rendered with: OpenCL's own, and the CUDA target's
TILES_OF = {name: with_tiles_of(OPENCL, target) for name, target in DIALECTS.items()}


def test_cuda_tiles_launch_as_the_cuda_kernels():
    """OpenCL with CUDA's tiles launches every case with the grid and block of the CUDA
    rendering, so the tiling the kernel tests run is the one CUDA builds ship; and it differs
    from OpenCL's own, so the second run of the cases is not a repeat of the first."""
    kernels = cases()
    _, cuda = render_source(kernels, CUDA, "test", "", "CUDA")
    _, cuda_tiles = render_source(kernels, TILES_OF["cuda"], "test", "", "OpenCL, CUDA's tiles")
    _, opencl = render_source(kernels, OPENCL, "test", "", "OpenCL")
    assert cuda_tiles == cuda
    assert sum(cuda[k.name] != opencl[k.name] for k in kernels) > len(kernels) // 2


@pytest.fixture(scope="module", params=sorted(TILES_OF), ids=lambda target: f"{target}-tiles")
def device(request):
    from cnnc.backends.opencl import OpenCLBackend
    kernels = cases()
    source, launches = render_source(kernels, TILES_OF[request.param], "test", "",
                                     f"kernel equivalence cases, {request.param} tiles")
    for k in kernels:
        k.launch["opencl"] = launches[k.name]
    return OpenCLBackend({0: source}, [0]), {k.name: k for k in kernels}


@pytest.mark.parametrize("name", [k.name for k in cases()])
def test_kernel_matches_reference(device, name):
    backend, kernels = device
    check_kernel(backend, kernels[name])


def check_kernel(backend, k: Kernel) -> None:
    """Launch kernel `k` on `backend` (any backend: the CUDA tests run these cases too) on random
    inputs and compare every output with the reference op."""
    rng = np.random.default_rng(stable_seed(k.name))
    vals = inputs_for(k, rng)
    ref = {n: (v.copy() if isinstance(v, np.ndarray) else v) for n, v in vals.items()}
    REFERENCE_OPS[k.op](k.params, *[ref[n] for n in OPS[k.op].arg_names])
    handles = {}
    for n, role in OPS[k.op].args:
        if role in (Role.SCALAR, Role.INT_SCALAR):
            continue
        v = vals[n]
        buf = Buffer(n, 0, v.size, "i32" if v.dtype == np.int32 else "f32", "test", "")
        handles[n] = (buf, backend.alloc(buf, 0))
        backend.upload(handles[n][1], v)
    spec = OPS[k.op]
    if spec.step_scalars:               # the runtime scalars, at the kernel's slots of a step-scalar buffer
        table = np.zeros(max(spec.slots(k.params)) + 1, np.int32)
        for (n, role), slot in zip(spec.step_scalars, spec.slots(k.params)):
            table[slot] = scalar_bits(vals[n], SCALAR_DTYPES[role])
        buf = Buffer(SCALARS_ARG, 0, table.size, "i32", "scalars", "")
        handles[SCALARS_ARG] = (buf, backend.alloc(buf, 0))
        backend.upload(handles[SCALARS_ARG][1], table)
    backend.launch(k, 0, [handles[n][1] for n in spec.kernel_args])
    backend.synchronize()
    for n, role in OPS[k.op].args:
        if role in (Role.OUT, Role.INOUT):
            got = backend.download(handles[n][1], handles[n][0])
            want = ref[n]
            scale = float(np.abs(want).max()) if want.size else 1.0
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * max(scale, 1.0),
                                       err_msg=f"{k.op} {k.params} output {n}")
