"""The registry: one record per kernel op (cnnc/ops.py) and per layer kind (cnnc/check/kinds.py),
complete for every op and kind, read alike by the planner, the generator, `cnnc plan`,
`cnnc bench` and the PyTorch twin of `cnnc bench --against torch`."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cnnc.backends.reference_ops import REFERENCE_OPS
from cnnc.check import check
from cnnc.check.kinds import KINDS, TORCH_TWINS
from cnnc.cli import main
from cnnc.codegen.dialect import CUDA, DIALECTS, OPENCL
from cnnc.codegen.render import render_kernel
from cnnc.frontend.parser import parse
from cnnc.ir import Network
from cnnc.ops import OPS, TRAINING_OPS, Role
from cnnc.plan import lowering
from cnnc.plan.planner import plan as make_plan
from cnnc.resources import resource_dir

from helpers import stable_seed

ROOT = Path(__file__).parent.parent

# every layer kind at least once, with the arguments that change its kernels: groups, unshared
# biases, several inputs, overhanging conv windows, clipped pools with a start and a window past
# the image (mq's last), blocked cmrnorm, eltsum's coefficients, every cost
EVERY_KIND = """network every_kind

input data: 3x9x9
input labels: label(5)

train {
  batch = 4
  wball = 2
}

@gpu(0)
c1 = conv(data, filters=6, size=3, stride=2, padding=1, groups=3, shared_biases=false) tanh
cm = cmrnorm(c1, size=3, blocked=true)
c3 = conv(c1, cm, filters=4, size=3, padding=1) relu
lc = local(c1, filters=2, size=3, stride=2) logistic
mp = maxpool(c1, size=2, stride=2)
mq = maxpool(c1, size=1, stride=3)
ap = avgpool(c1, size=2, stride=3, start=1)
rn = rnorm(c1, size=3)
cn = cnorm(c1, size=2)
ab = neuron(rn) abs
d1 = dropout(cn, keep=0.8)
d2 = dropout2(ab, keep=0.6)
es = eltsum(cm, d1, d2, coeffs=[1, -0.5, 2])
em = eltmax(es, cm)
ps = pass(em)
ct = concat(ps, c3)
f1 = fc(ct, lc, mp, mq, outputs=5)
sm = softmax(f1)
cost1 = logreg(labels, sm)
cost2 = crossent(labels, sm, coeff=0.5)
cost3 = sum2(ap, coeff=0.01)
"""

# a softmax feeding crossent alone, which is then differentiated through it in one step
FUSED_CROSSENT = """network fused
input data: 1x2x2
input labels: label(3)
train { batch = 2 }
@gpu(0)
f = fc(data, outputs=3)
s = softmax(f)
c = crossent(labels, s)
"""


def _net(source: str, file: str = "net.cnn") -> Network:
    return check(parse(source, file))


@pytest.fixture(scope="module")
def kernels() -> list:
    """The kernels of networks that between them run every op: EVERY_KIND, a fused logreg and a
    fused crossent, and a data-parallel network (the gradient reduce-scatter)."""
    sources = [(EVERY_KIND, "every.cnn"), (FUSED_CROSSENT, "fused.cnn"),
               ((ROOT / "examples" / "digits.cnn").read_text(), "digits.cnn"),
               ((ROOT / "tests" / "nets" / "alexnet-2gpu-data-small.cnn").read_text(), "data.cnn")]
    out = []
    for source, file in sources:
        out += list(make_plan(_net(source, file)).kernels.values())
    return out


def test_every_op_has_a_reference_a_template_an_extent_and_flops():
    for name, spec in OPS.items():
        assert REFERENCE_OPS.get(name) is not None, f"{name} has no reference implementation"
        assert (resource_dir("templates") / f"{spec.family}.j2").is_file(), f"{name}: no template {spec.family}"
        assert spec.sizes and spec.flops, f"{name} lacks an element-count or FLOP rule"
        assert (spec.gemm is None) != (spec.elements is None), f"{name} needs exactly one launch extent rule"


def test_the_rules_hold_for_every_op_as_planned(kernels):
    """Each rule gives non-negative integers for real launches, and every buffer argument has a
    size: the plan validator and the launch geometry rely on both."""
    seen = set()
    for k in kernels:
        spec = OPS[k.op]
        seen.add(k.op)
        sizes = spec.sizes(k.params)
        assert set(spec.buffers) <= set(sizes), f"{k.op}: no size for {set(spec.buffers) - set(sizes)}"
        assert all(isinstance(sizes[a], int) and sizes[a] >= 1 for a in spec.buffers), (k.op, sizes)
        flops = spec.flops(k.params)
        assert isinstance(flops, int) and flops >= 0, (k.op, flops)
        assert spec.bytes_moved(k.params) >= 4 * sum(sizes[a] for a in spec.buffers)
        if spec.gemm:
            g = spec.gemm(k.params)
            assert all(isinstance(g[d], int) and g[d] >= 1 for d in ("M", "N", "K")), (k.op, g)
        else:
            assert spec.elements(k.params) >= 1, k.op
    assert seen == set(OPS), f"no test network runs {set(OPS) - seen}"


def test_every_kind_lowers_only_to_its_own_ops(kernels):
    """Each kind names the ops it lowers to; together with the training ops they are all ops,
    and the planner emits nothing else for a layer of that kind."""
    assert set(TRAINING_OPS).union(*(k.ops for k in KINDS.values())) == set(OPS)
    kinds = {}
    for source, file in [(EVERY_KIND, "every.cnn"), (FUSED_CROSSENT, "fused.cnn")]:
        kinds.update({l.name: l.kind for l in _net(source, file).layers})
    for k in kernels:
        if k.layer in kinds and k.op not in TRAINING_OPS:
            assert k.op in KINDS[kinds[k.layer]].ops, f"{k.name}: {k.op} is not an op of {kinds[k.layer]}"


def test_every_kind_has_ops_and_a_torch_twin():
    import cnnc.bench_torch  # noqa: F401  (registers the twins)

    for name, kind in KINDS.items():
        assert kind.ops and set(kind.ops) <= set(OPS), name
    assert set(TORCH_TWINS) == set(KINDS)


def test_split_k_slices_are_whole_k_steps_of_every_target():
    """Split-K is decided in the plan, for every target: its slices must not straddle any
    dialect's K step."""
    for d in DIALECTS.values():
        assert lowering.SPLIT_ALIGN % d.gemm_block[2] == 0, d.name


def test_cuda_math_names_come_from_the_dialect(kernels):
    by_op = {k.op: k for k in kernels}
    for op, name in [("softmax_fwd", "exp"), ("pool_fwd", "fmax"), ("fc_fwd", "fma"), ("cmrnorm_fwd", "sqrt")]:
        code = lambda d: "\n".join(l for l in render_kernel(by_op[op], d)[0].splitlines()  # noqa: E731
                                   if not l.lstrip().startswith("//"))
        assert re.search(rf"\b{name}f\(", code(CUDA)), (op, name)
        assert re.search(rf"\b{name}\(", code(OPENCL)) and not re.search(rf"\b{name}f\(", code(OPENCL)), (op, name)
    conv = next(k for k in kernels if k.op == "conv_fwd" and "tanh" in json.dumps(k.params.get("neuron")))
    assert "tanhf(" in render_kernel(conv, CUDA)[0] and "tanhf(" not in render_kernel(conv, OPENCL)[0]


def test_cnnc_plan_and_bench_print_the_registry_flops(tmp_path):
    runner = CliRunner()
    build = tmp_path / "b"
    result = runner.invoke(main, ["compile", str(ROOT / "examples" / "digits.cnn"), "-o", str(build), "--no-nvcc"])
    assert result.exit_code == 0, result.output
    plan = make_plan(_net((ROOT / "examples" / "digits.cnn").read_text(), "digits.cnn"))
    result = runner.invoke(main, ["plan", str(build), "--json"])
    assert result.exit_code == 0, result.output
    rows = [r for d in json.loads(result.output)["devices"] for r in d["program"] if r["op"] == "launch"]
    assert rows
    for r in rows:
        k = plan.kernels[r["kernel"]]
        assert r["flops"] == OPS[k.op].flops(k.params), r["kernel"]
        assert r["bytes_accessed"] == OPS[k.op].bytes_moved(k.params) > 0, r["kernel"]
    result = runner.invoke(main, ["bench", str(build), "--backend", "reference", "--steps", "1", "--json"])
    assert result.exit_code == 0, result.output
    forward = {}
    for r in rows:
        if r["phase"] == "forward" and r["layer"]:
            forward[r["layer"]] = forward.get(r["layer"], 0) + r["flops"]
    layers = json.loads(result.output)["layers"]
    assert layers and all(l["forward_flops"] == forward[l["layer"]] for l in layers)


# ---------------------------------------------------------------- the PyTorch twins against the reference

def _reference_forward(net: Network, layer, inputs: list[np.ndarray], params: dict[str, np.ndarray]):
    """The layer's test-time forward as the planner lowers it, each launch run by the reference."""
    n = net.batch
    buffers = {f"in{i}": x.reshape(-1).copy() for i, x in enumerate(inputs)}
    buffers.update({name: a.reshape(-1).copy() for name, a in params.items()})
    buffers.update(out=np.zeros(n * layer.shape.size), loss=np.zeros(n), correct=np.zeros(n))

    def alloc(what, size, dtype="f32"):
        buffers.setdefault(what, np.zeros(size))
        return what

    def emit(name, op, op_params, args, writes, summary, **scalars):
        """Run the launch: its buffers by name, its scalars (the dropout counters, unused at
        test time) as 0."""
        named = iter(args)
        REFERENCE_OPS[op](op_params, *(0 if role in (Role.SCALAR, Role.INT_SCALAR) else buffers[next(named)]
                                       for _, role in OPS[op].args))

    site = lowering.Site(layer, 0, n, [f"in{i}" for i in range(len(inputs))], "out",
                         params={name: name for name in params}, emit=emit, training=False, alloc=alloc,
                         case_ranges=((0, n),))
    if KINDS[layer.kind].is_cost:
        lowering.COST_FORWARD[layer.kind](site, "loss", "correct")
        return buffers["loss"].sum()
    lowering.FORWARD[layer.kind](site)
    return buffers["out"].reshape(n, layer.shape.channels, layer.shape.height, layer.shape.width)


def _load_twin(torch, twin, layer, params: dict[str, np.ndarray]) -> None:
    """Copy the reference's parameters into the twin's, in the twin's layouts."""
    t = {name: torch.tensor(a) for name, a in params.items()}
    weights = [t[name] for name in lowering.weight_names(layer)]
    with torch.no_grad():
        if layer.kind == "conv":
            for conv, w in zip(twin.convs, weights):
                conv.weight.copy_(w)
            twin.b.copy_(t["biases"])
        elif layer.kind == "local":
            twin.w.copy_(weights[0].reshape(twin.w.shape))
            twin.b.copy_(t["biases"])
        elif layer.kind == "fc":
            for linear, w in zip(twin.linears, weights):
                linear.weight.copy_(w.T)
            twin.linears[0].bias.copy_(t["biases"])


@pytest.mark.parametrize("name", [l.name for l in _net(EVERY_KIND, "every.cnn").layers])
def test_torch_twin_forward_equals_the_reference(name):
    """Each twin computes its layer as the reference does, cuda-convnet2's semantics included:
    eltsum's coeffs, clipped pool windows with a start, overhanging conv windows, blocked and
    clipped normalisation windows, dropout2's test-time scaling."""
    torch = pytest.importorskip("torch")
    net = _net(EVERY_KIND, "every.cnn")
    layer = next(l for l in net.layers if l.name == name)
    rng = np.random.default_rng(stable_seed("twin", name))
    net_inputs = {i.name: i for i in net.inputs}
    inputs = []
    for src, shape in zip(layer.inputs, layer.in_shapes):
        if src in net_inputs and net_inputs[src].kind == "labels":
            inputs.append(rng.integers(0, net_inputs[src].classes, net.batch).astype(np.int32))
        elif layer.kind in ("logreg", "crossent"):
            p = rng.uniform(0.1, 1.0, (net.batch, shape.size))
            inputs.append(p / p.sum(1, keepdims=True))
        else:
            inputs.append(rng.standard_normal((net.batch, shape.channels, shape.height, shape.width)))
    params = {n: 0.3 * rng.standard_normal(s) for n, s in lowering.parameter_shapes(layer).items()}
    want = _reference_forward(net, layer, inputs, params)

    import cnnc.bench_torch  # noqa: F401  (registers the twins)
    twin = TORCH_TWINS[layer.kind](torch, layer).double().eval()
    _load_twin(torch, twin, layer, params)
    got = twin(*(torch.tensor(x) for x in inputs))
    got = got.detach().numpy()
    np.testing.assert_allclose(got.reshape(np.shape(want)), want, rtol=1e-9, atol=1e-12)
