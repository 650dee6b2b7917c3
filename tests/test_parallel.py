"""The equivalence property: a training step under any placement equals the
single-device step, on the reference backend and on OpenCL with logical devices."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cnnc.backends import make_backend
from cnnc.backends.reference_ops import REFERENCE_OPS as OPS
from cnnc.build import compile_network
from cnnc.diagnostics import CompileError
from cnnc.executor import Executor, initial_parameters
from cnnc.plan.summary import summarize
from cnnc.race import RaceChecker

from helpers import replace_once, split_opencl_device, stable_seed

NET = """
network par
input data: 3x8x8
input labels: label(4)
train {{ batch = 8; lr = 0.05; momentum = 0.9; weight_decay = 0.001; seed = 5; init_w = 0.1 }}
{conv1}conv1 = conv(data, filters=6, size=3, padding=1) relu
{pool1}pool1 = maxpool(conv1, size=2, stride=2)
{fc2}fc2 = fc(pool1, outputs=10) tanh {{ update_period = {period} }}
{fc3}fc3 = fc(fc2, outputs=4) {{ update_period = {period} }}
{probs}probs = softmax(fc3)
cost = logreg(labels, probs)
"""

PLACEMENTS = {
    "single": {},
    "data-2": {"conv1": "@gpu(0,1)"},
    "data-4-reversed": {"conv1": "@gpu(3,2,1,0)"},
    "model": {"conv1": "@gpu(0)", "pool1": "@gpu(1)", "fc2": "@gpu(0)", "fc3": "@gpu(2)", "probs": "@gpu(1)"},
    "hybrid-4-to-1": {"conv1": "@gpu(0,1,2,3)", "fc2": "@gpu(0)"},
    "hybrid-4-to-1-moved": {"conv1": "@gpu(0,1,2,3)", "fc2": "@gpu(1)", "fc3": "@gpu(2)"},
    "hybrid-4-to-2": {"conv1": "@gpu(0,1,2,3)", "fc2": "@gpu(1,0)"},
    "same-device-replicas": {"conv1": "@gpu(0,1)", "fc2": "@gpu(1)"},
}


# backend "race": the reference backend with each stream its own queue, run in this seed's random
# order of those the plan's events permit, every access checked against the events (cnnc.race)
RACE_SEED = 1


def backend_for(name: str, plan, out: Path, gpus):
    return RaceChecker(plan, RACE_SEED) if name == "race" else make_backend(name, plan, out, list(gpus))


def source(placement: dict, period: int = 0) -> str:
    fields = {k: "" for k in ("conv1", "pool1", "fc2", "fc3", "probs")}
    fields.update({k: v + " " for k, v in placement.items()})
    return NET.format(period=period, **fields)


def batches(steps: int):
    rng = np.random.default_rng(0)
    return [(rng.standard_normal((8, 3, 8, 8)).astype(np.float32), rng.integers(0, 4, 8).astype(np.int32))
            for _ in range(steps)]


def train(src: str, backend: str, steps: int, tmp: Path, gpus=None):
    out = tmp / f"b{stable_seed(src, backend)}"
    plan = compile_network(src, "par.cnn", out, use_nvcc=False).plan
    if gpus is None:                 # the OpenCL device (PoCL) is one device: logical devices share it
        gpus = [0] * 4 if backend == "opencl" else [0, 1, 2, 3]
    ex = Executor(plan, backend_for(backend, plan, out, gpus))
    losses = [ex.train_step(x, y, i / steps)[0] for i, (x, y) in enumerate(batches(steps))]
    return np.concatenate(losses), ex.parameters(), ex.replica_parameters(), plan


def assert_same_training(a, b):
    (la, pa, _, _), (lb, pb, rb, _) = a, b
    np.testing.assert_allclose(lb, la, rtol=1e-5, atol=1e-6)
    for name in pa:
        scale = float(np.abs(pa[name]).max())
        np.testing.assert_allclose(pb[name], pa[name], rtol=1e-5, atol=1e-6 * scale, err_msg=name)
    for name, replicas in rb.items():          # replicas stay identical, bit for bit
        for r in replicas[1:]:
            assert (r == replicas[0]).all(), name


@pytest.fixture(scope="module")
def single_reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    return {steps: train(source({}), "reference", steps, tmp) for steps in (1, 3)}


@pytest.mark.parametrize("backend", ["reference", "race"])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("name", [n for n in PLACEMENTS if n != "single"])
def test_placement_equals_single_device_on_reference(name, steps, backend, single_reference, tmp_path):
    assert_same_training(single_reference[steps], train(source(PLACEMENTS[name]), backend, steps, tmp_path))


@pytest.mark.parametrize("name", ["data-2", "model", "hybrid-4-to-1", "hybrid-4-to-2"])
def test_placement_equals_single_device_on_opencl(name, single_reference, tmp_path):
    assert_same_training(single_reference[3], train(source(PLACEMENTS[name]), "opencl", 3, tmp_path))


def test_logical_devices_on_one_physical_device(single_reference, tmp_path):
    """--gpus 0,0,0,0: four logical devices share one device, same numbers."""
    got = train(source(PLACEMENTS["hybrid-4-to-1"]), "reference", 3, tmp_path, gpus=(0, 0, 0, 0))
    assert_same_training(single_reference[3], got)


def test_accumulating_two_of_four_passes_matches_by_hand(tmp_path):
    """update_period = 2 on a 4-pass fc: two updates per minibatch, each from half the cases."""
    check_against_hand_computation(tmp_path, period=2)


def test_update_every_pass_matches_by_hand(tmp_path):
    """update_period = 1: the fc layers update after every pass, the conv once per minibatch."""
    check_against_hand_computation(tmp_path, period=1)


def check_against_hand_computation(tmp_path: Path, period: int):
    src = source(PLACEMENTS["hybrid-4-to-1"], period=period)
    [(x, y)] = batches(1)
    _, got, _, plan = train(src, "reference", 1, tmp_path)
    w = {k: v.astype(np.float64).reshape(-1) for k, v in initial_parameters(plan).items()}
    inc = {k: np.zeros_like(v) for k, v in w.items()}
    B, b = 8, 2

    def sgd(name, g, cases, decay):
        inc[name] = 0.9 * inc[name] - 0.05 * (g / cases + decay * w[name])
        w[name] = w[name] + inc[name]

    conv = dict(N=B, C=3, H=8, W=8, K=6, R=3, S=3, P=8, Q=8, stride=1, pad=1, neuron={"name": "relu"})
    pool = dict(N=B, C=6, H=8, W=8, P=4, Q=4, size=2, stride=2, start=0, mode="max")
    fc2 = dict(N=b, I=96, O=10, neuron={"name": "tanh", "a": 1.0, "b": 1.0})
    fc3 = dict(N=b, I=10, O=4, neuron={"name": "ident"})
    c1, p1 = np.zeros(B * 6 * 64), np.zeros(B * 96)
    OPS["conv_fwd"](conv, x.reshape(-1).astype(np.float64), w["conv1.weights"], w["conv1.biases"], c1)
    OPS["pool_fwd"](pool, c1, p1)
    dp1 = np.zeros_like(p1)
    grads = {k: np.zeros_like(v) for k, v in w.items() if k.startswith("fc")}
    for s in range(4):                       # the fc part, one share per pass
        xs, ys = p1[s * b * 96:(s + 1) * b * 96], y[s * b:(s + 1) * b]
        h2, h3, pr = np.zeros(b * 10), np.zeros(b * 4), np.zeros(b * 4)
        OPS["fc_fwd"](fc2, xs, w["fc2.weights"], w["fc2.biases"], h2)
        OPS["fc_fwd"](fc3, h2, w["fc3.weights"], w["fc3.biases"], h3)
        OPS["softmax_fwd"](dict(N=b, C=4), h3, pr)
        d3, d2 = np.zeros(b * 4), np.zeros(b * 10)
        OPS["softmax_logreg_bwd"](dict(N=b, C=4, coeff=1.0), ys, pr, d3)
        for layer, inp, d, q in (("fc3", h2, d3, fc3), ("fc2", xs, None, fc2)):
            if layer == "fc2":
                OPS["neuron_bwd"](dict(n=b * 10, neuron=fc2["neuron"]), h2, d2)
                d = d2
            gw, gb = np.zeros(q["I"] * q["O"]), np.zeros(q["O"])
            OPS["fc_bwd_filter"](q, inp, d, gw)
            OPS["bias_grad"](dict(N=b, K=q["O"], inner=1), d, gb)
            if layer == "fc3":
                OPS["fc_bwd_data"](q, w["fc3.weights"], d, d2)
            else:
                OPS["fc_bwd_data"](q, w["fc2.weights"], d, dp1[s * b * 96:(s + 1) * b * 96])
            grads[f"{layer}.weights"] += gw
            grads[f"{layer}.biases"] += gb
        if (s + 1) % period == 0:
            for name, g in grads.items():
                sgd(name, g, b * period, 0.001 if name.endswith("weights") else 0.0)
                g[:] = 0
    dc1 = np.zeros_like(c1)
    OPS["pool_bwd"](pool, c1, p1, dp1, dc1)
    OPS["neuron_bwd"](dict(n=c1.size, neuron=conv["neuron"]), c1, dc1)
    gw, gb = np.zeros_like(w["conv1.weights"]), np.zeros(6)
    OPS["conv_bwd_filter"](conv, x.reshape(-1).astype(np.float64), dc1, gw)
    OPS["bias_grad"](dict(N=B, K=6, inner=64), dc1, gb)
    sgd("conv1.weights", gw, B, 0.001)
    sgd("conv1.biases", gb, B, 0.0)
    for name, v in w.items():
        np.testing.assert_allclose(got[name].reshape(-1), v, rtol=1e-4, atol=1e-6, err_msg=name)
    # and it really differs from accumulating the whole minibatch
    _, whole, _, _ = train(source(PLACEMENTS["hybrid-4-to-1"]), "reference", 1, tmp_path)
    assert not np.allclose(whole["fc2.weights"], got["fc2.weights"], rtol=1e-6, atol=0)


def test_hybrid_plan_reports_passes_and_transfers(tmp_path):
    plan = compile_network(source(PLACEMENTS["hybrid-4-to-1"], period=1), "par.cnn", tmp_path,
                           use_nvcc=False).plan
    s = summarize(plan)
    layers = {l["name"]: l for l in s["layers"]}
    assert layers["conv1"]["devices"] == [0, 1, 2, 3] and layers["conv1"]["passes"] == 1
    assert layers["fc2"]["devices"] == [0] and layers["fc2"]["passes"] == 4 and layers["fc2"]["update_period"] == 1
    moved = {(t["from"], t["to"]): t for t in s["transfers"]}
    share = 2 * 96 * 4                       # one share of pool1's output, in bytes
    for src in (1, 2, 3):
        assert moved[(src, 0)]["activation_bytes"] == share               # pool1 share to the fc
        assert moved[(0, src)]["activation_bytes"] == share               # its gradient back
        assert moved[(src, 0)]["collective_bytes"] > 0                    # conv1 gradient exchange


@pytest.mark.parametrize("placement, message", [
    ({"conv1": "@gpu(0,1)", "fc2": "@gpu(0,1,2,3)"},
     "fc2 has 4 replicas but its input pool1 has 2: a layer's replica count must divide its inputs'"),
    ({"conv1": "@gpu(0,1,2,3)", "fc2": "@gpu(0,1)", "fc3": "@gpu(0)"},
     "fc2 has 2 replicas; cnnc plans two levels of replication per network (here 4 and 1)"),
])
def test_placement_restrictions_are_located_errors(placement, message, tmp_path):
    with pytest.raises(CompileError) as e:
        compile_network(source(placement), "par.cnn", tmp_path, use_nvcc=False)
    d = e.value.diagnostics[0]
    assert message in d.message and d.span is not None


def test_update_period_must_divide_passes(tmp_path):
    with pytest.raises(CompileError, match="update_period = 3 does not divide the 4 pass"):
        compile_network(source(PLACEMENTS["hybrid-4-to-1"], period=3), "par.cnn", tmp_path, use_nvcc=False)


# ---------------------------------------------------------------- pipelining

PIPE = {
    "gpipe-4-stages": ("microbatches = 4", {"conv1": "@gpu(0)", "fc2": "@gpu(1)", "fc3": "@gpu(2)",
                                            "probs": "@gpu(3)"}),
    "1f1b-4-stages": ("microbatches = 4; pipeline = one_f_one_b",
                      {"conv1": "@gpu(0)", "fc2": "@gpu(1)", "fc3": "@gpu(2)", "probs": "@gpu(3)"}),
    "1f1b-data-parallel-stages": ("microbatches = 2; pipeline = one_f_one_b",
                                  {"conv1": "@gpu(0,1)", "fc2": "@gpu(2,3)"}),
}


def pipelined(settings: str, placement: dict) -> str:
    return replace_once(source(placement), "init_w = 0.1 }", f"init_w = 0.1; {settings} }}")


@pytest.mark.parametrize("backend", ["reference", "race"])
@pytest.mark.parametrize("name", list(PIPE))
def test_pipeline_equals_single_device_on_reference(name, backend, single_reference, tmp_path):
    assert_same_training(single_reference[3], train(pipelined(*PIPE[name]), backend, 3, tmp_path))


def test_pipeline_equals_single_device_on_opencl(single_reference, tmp_path):
    assert_same_training(single_reference[3], train(pipelined(*PIPE["1f1b-4-stages"]), "opencl", 3, tmp_path))


def program_order(plan, device):
    return [(op.phase[0].upper(), op.pass_) for op in plan.programs["train"][device]
            if op.kind == "launch" and op.phase in ("forward", "backward")]


def collapse(seq):
    out = []
    for item in seq:
        if not out or out[-1] != item:
            out.append(item)
    return out


def test_pipeline_orders(tmp_path):
    gpipe = compile_network(pipelined(*PIPE["gpipe-4-stages"]), "p.cnn", tmp_path / "g", use_nvcc=False).plan
    assert collapse(program_order(gpipe, 0)) == [("F", m) for m in range(4)] + [("B", m) for m in range(4)]
    ofob = compile_network(pipelined(*PIPE["1f1b-4-stages"]), "p.cnn", tmp_path / "o", use_nvcc=False).plan
    # the first stage warms up with three forwards, the last alternates from the start
    assert collapse(program_order(ofob, 0)) == [("F", 0), ("F", 1), ("F", 2), ("F", 3), ("B", 0), ("B", 1),
                                                ("B", 2), ("B", 3)]
    assert collapse(program_order(ofob, 2))[:4] == [("F", 0), ("F", 1), ("B", 0), ("F", 2)]
    assert collapse(program_order(ofob, 3))[:4] == [("F", 0), ("B", 0), ("F", 1), ("B", 1)]
    # 1F1B keeps fewer micro-batches of activations: stage k of K keeps K - k, GPipe all four
    acts = lambda plan, layer: sum(b.nbytes for b in plan.buffers.values()
                                   if b.layer == layer and b.role == "activation")
    assert acts(ofob, "probs") * 4 == acts(gpipe, "probs")
    assert acts(ofob, "fc3") * 2 == acts(gpipe, "fc3")


@pytest.mark.parametrize("settings, placement, message", [
    ("microbatches = 2", {"conv1": "@gpu(0,1)", "fc2": "@gpu(0)"},
     "with microbatches = 2 every layer needs the same number of devices"),
    ("microbatches = 2", {"conv1": "@gpu(0)", "fc2": "@gpu(1)", "fc3": "@gpu(0)"},
     "fc3 returns to @gpu(0) after other devices"),
])
def test_pipeline_restrictions(settings, placement, message, tmp_path):
    with pytest.raises(CompileError) as e:
        compile_network(pipelined(settings, placement), "p.cnn", tmp_path, use_nvcc=False)
    assert message in e.value.diagnostics[0].message and e.value.diagnostics[0].span is not None


# ---------------------------------------------------------------- exchange schemes

@pytest.mark.parametrize("backend", ["reference", "race"])
@pytest.mark.parametrize("scheme", ["all_gather", "round_robin", "scatter"])
def test_exchange_schemes_equal_single_device(scheme, backend, tmp_path):
    """Krizhevsky's three ways to feed the fc part of a hybrid net; with the whole minibatch
    accumulated per update, all equal the single-device step."""
    def src(placement):
        text = replace_once(source(placement), "batch = 8", "batch = 16")
        return replace_once(text, "init_w = 0.1 }", f"init_w = 0.1; exchange = {scheme} }}")

    def train16(text, backend):
        out = tmp_path / f"b{stable_seed(text)}"
        plan = compile_network(text, "par.cnn", out, use_nvcc=False).plan
        ex = Executor(plan, backend_for(backend, plan, out, [0, 0, 0, 0]))
        rng = np.random.default_rng(1)
        losses = []
        for i in range(2):
            x = rng.standard_normal((16, 3, 8, 8)).astype(np.float32)
            y = rng.integers(0, 4, 16).astype(np.int32)
            losses.append(ex.train_step(x, y, i / 2)[0])
        return np.concatenate(losses), ex.parameters(), ex.replica_parameters(), plan

    single = train16(src({}), "reference")
    for placement in ({"conv1": "@gpu(0,1,2,3)", "fc2": "@gpu(1)"}, {"conv1": "@gpu(0,1,2,3)", "fc2": "@gpu(0,1)"}):
        hybrid = train16(src(placement), backend)
        assert_same_training(single, hybrid)
        layers = {l.layer: l for l in hybrid[3].layers}
        assert layers["fc2"].passes == (1 if scheme == "all_gather" else 4 // len(layers["fc2"].devices))


def test_scatter_needs_divisible_shares(tmp_path):
    text = replace_once(source({"conv1": "@gpu(0,1,2,3)", "fc2": "@gpu(0)"}), "init_w = 0.1 }",
                        "init_w = 0.1; exchange = scatter }")
    with pytest.raises(CompileError, match="exchange = scatter sends 1/4 of each replica's 2 cases"):
        compile_network(text, "par.cnn", tmp_path, use_nvcc=False)


def test_data_parallel_on_two_opencl_sub_devices(single_reference, tmp_path, monkeypatch):
    """Split the CPU into two OpenCL devices: the replicas really run on different devices."""
    split_opencl_device(monkeypatch)
    got = train(source(PLACEMENTS["data-2"]), "opencl", 3, tmp_path, gpus=(0, 1))
    assert_same_training(single_reference[3], got)


def test_round_robin_copies_run_beside_compute(tmp_path):
    """The copy of the next share is on the copy-in stream and waits only for the replica that
    produced it, not for this device's compute of the current pass."""
    plan = compile_network(source(PLACEMENTS["hybrid-4-to-1"]), "par.cnn", tmp_path, use_nvcc=False).plan
    ops = plan.programs["train"][0]
    recorded_on = {}
    for dev, program in plan.programs["train"].items():
        for op in program:
            if op.kind == "record":
                recorded_on[op.event] = (dev, op.stream)
    copies = [i for i, op in enumerate(ops) if op.kind == "copy" and op.phase == "forward" and op.pass_ >= 1]
    assert copies and all(ops[i].stream == "copy-in" for i in copies)
    for i in copies:
        j = i - 1
        while j >= 0 and ops[j].kind == "wait" and ops[j].stream == "copy-in":
            assert recorded_on[ops[j].event][0] != 0, "a copy waits for this device's own compute"
            j -= 1


def test_wball_keeps_units_in_the_ball_and_placements_agree(tmp_path):
    """wball renormalises after each update; data-parallel replicas do it identically."""
    def with_wball(placement):
        return replace_once(source(placement), "conv1 = conv(data, filters=6, size=3, padding=1) relu",
                            "conv1 = conv(data, filters=6, size=3, padding=1) relu { wball = 0.35 }")
    single = train(with_wball({}), "reference", 3, tmp_path)
    norms = np.sqrt((single[1]["conv1.weights"].reshape(6, -1) ** 2).sum(axis=1))
    assert norms.max() <= 0.35 * (1 + 1e-6)
    assert np.isclose(norms.max(), 0.35, rtol=1e-5), "no unit reached the ball: wball was never active"
    data_parallel = train(with_wball(PLACEMENTS["data-2"]), "reference", 3, tmp_path)
    assert {l.layer: l.devices for l in data_parallel[3].layers}["conv1"] == (0, 1)
    assert_same_training(single, data_parallel)
    assert_same_training(single, train(with_wball(PLACEMENTS["data-2"]), "opencl", 3, tmp_path))
