"""Runtime scalars (learning rate, momentum, ..., the dropout RNG's seed and step) live in one
step-scalar buffer per device, written once per run, so that every launch's arguments are the
same at every step: the table the planner builds, the op that writes it, and the kernels'
reading of it on the reference and OpenCL backends."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from cnnc.backends import make_backend
from cnnc.backends.reference_ops import run_launch
from cnnc.build import compile_network
from cnnc.codegen.dialect import OPENCL
from cnnc.codegen.render import render_source
from cnnc.executor import Executor
from cnnc.ir import Schedule
from cnnc.ops import OPS, SCALAR_DTYPES, scalar_bits
from cnnc.plan.schedule import Buffer, Kernel, Plan
from cnnc.plan.validate import PlanError, validate

NET = """
network steps
input data: 3x8x8
input labels: label(4)
train { batch = 8; lr = linear(0.05, 10); lr_bias = 0.1; momentum = 0.9; weight_decay = 0.001; seed = 5; init_w = 0.1 }
@gpu(0,1)
conv1 = conv(data, filters=6, size=3, padding=1) relu
@gpu(0)
pool1 = maxpool(conv1, size=2, stride=2)
fc2 = fc(pool1, outputs=10) tanh
drop = dropout(fc2, keep=0.5)
fc3 = fc(drop, outputs=4)
probs = softmax(fc3)
cost = logreg(labels, probs)
"""


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    out = tmp_path_factory.mktemp("steps")
    return out, compile_network(NET, "steps.cnn", out, use_nvcc=False).plan


def batch(step: int):
    rng = np.random.default_rng(step)
    return rng.standard_normal((8, 3, 8, 8)).astype(np.float32), rng.integers(0, 4, 8).astype(np.int32)


def scalar_launches(plan: Plan, program: str = "train"):
    """(device, position, op) of every launch of `program` whose op has runtime scalars."""
    return [(dev, i, op) for dev, ops in plan.programs[program].items() for i, op in enumerate(ops)
            if op.kind == "launch" and OPS[plan.kernels[op.kernel].op].step_scalars]


def test_the_table_holds_each_scalar_once(build):
    _, plan = build
    keys = [(json.dumps(s.source, sort_keys=True), s.dtype) for s in plan.scalars]
    assert len(set(keys)) == len(keys)
    # seed and step; lr, momentum, weight decay, 1/cases of the weights; lr and decay 0 of the biases
    assert len(plan.scalars) == 8
    assert {s.source for s in plan.scalars if s.dtype == "i32"} == {"seed", "step"}
    reads = [(op.kernel, s) for _, _, op in scalar_launches(plan)
             for s in OPS[plan.kernels[op.kernel].op].slots(plan.kernels[op.kernel].params)]
    assert len(reads) > 3 * len(plan.scalars)        # many launches share each entry
    # the weight updates of the three layers read one set of slots, the bias updates another
    updates = {tuple(OPS["sgd_update"].slots(plan.kernels[op.kernel].params))
               for _, _, op in scalar_launches(plan) if plan.kernels[op.kernel].op == "sgd_update"}
    assert len(updates) == 2


def test_each_device_writes_its_buffer_first_on_the_compute_stream(build):
    _, plan = build
    for program in ("train", "test"):
        for dev, i, op in scalar_launches(plan, program):
            ops = plan.programs[program][dev]
            assert ops[0].kind == "scalars" and ops[0].stream == "compute" and ops[0].dst == op.args[-1]
            assert op.stream == "compute" and i > 0
            assert plan.buffers[op.args[-1]].device == dev
    assert sorted(b.id for b in plan.buffers.values() if b.role == "scalars") == ["scalars@0", "scalars@1"]


def test_the_table_survives_plan_json(build):
    _, plan = build
    back = Plan.from_json(json.loads(json.dumps(plan.to_json())))
    assert back.scalars == plan.scalars
    assert back.programs == plan.programs


def test_a_scheduled_rate_changes_the_buffer_not_the_launch_arguments(build):
    out, plan = build
    ex = Executor(plan, make_backend("reference", plan, out, [0, 1]))
    seen: list[dict] = []
    launch_args = ex._launch_args

    def record(op):
        args = launch_args(op)
        seen[-1][id(op)] = args
        return args

    ex._launch_args = record
    lr = next(i for i, s in enumerate(plan.scalars) if isinstance(s.source, dict))
    step = next(i for i, s in enumerate(plan.scalars) if s.source == "step")
    tables = []
    for n, progress in enumerate((0.0, 0.5)):
        seen.append({})
        ex.train_step(*batch(n), progress)
        tables.append(ex.read("scalars@1").copy())
        want = scalar_bits(Schedule.from_json(plan.scalars[lr].source).at(progress), "f32")
        assert tables[-1][lr] == want and ex.read("scalars@0")[lr] == want
        assert tables[-1][step] == n
    assert tables[0][lr] != tables[1][lr]
    assert seen[0].keys() == seen[1].keys() and len(seen[0]) >= len(scalar_launches(plan))
    for key, first in seen[0].items():
        assert len(first) == len(seen[1][key]) and all(a is b for a, b in zip(first, seen[1][key]))


def _without(plan: Plan, program: str, dev: int, drop) -> Plan:
    """The plan with device `dev`'s ops of `program` rewritten by `drop(ops)`."""
    programs = {name: dict(prog) for name, prog in plan.programs.items()}
    programs[program][dev] = drop(list(programs[program][dev]))
    return dataclasses.replace(plan, programs=programs)


def test_validation_refuses_launches_that_read_unwritten_scalars(build):
    _, plan = build
    validate(plan)
    missing = _without(plan, "train", 0, lambda ops: [op for op in ops if op.kind != "scalars"])
    with pytest.raises(PlanError, match=r"reads step scalars from 'scalars@0' before any scalars op"):
        validate(missing)
    late = _without(plan, "train", 1, lambda ops: ops[1:] + ops[:1])
    with pytest.raises(PlanError, match="before any scalars op"):
        validate(late)
    _, i, op = scalar_launches(plan)[0]
    aside = _without(plan, "train", 0, lambda ops: ops[:i] + [dataclasses.replace(op, stream="copy-in")] + ops[i + 1:])
    with pytest.raises(PlanError, match="on the copy-in stream"):
        validate(aside)


def test_validation_checks_slots_against_the_table(build):
    _, plan = build
    k = next(k for k in plan.kernels.values() if k.op == "sgd_update")
    seed = next(i for i, s in enumerate(plan.scalars) if s.source == "seed")
    for slots, message in (([0, 1, 2], "are not 4 entries"), ([0, 1, 2, len(plan.scalars)], "are not 4 entries"),
                           ([seed, 2, 3, 4], "of type i32, not f32")):
        kernels = dict(plan.kernels, **{k.name: dataclasses.replace(k, params=dict(k.params, slots=slots))})
        with pytest.raises(PlanError, match=message):
            validate(dataclasses.replace(plan, kernels=kernels))


KERNELS = [Kernel("update_at_odd_slots", "sgd_update", dict(n=300, slots=[5, 2, 0, 3]), "", 0, ""),
           Kernel("dropout_at_odd_slots", "dropout_fwd",
                  dict(N=6, D=50, keep=0.6, layer_id=3, case_offset=2, slots=[4, 1]), "", 0, "")]


@pytest.mark.parametrize("k", KERNELS, ids=lambda k: k.name)
def test_reference_and_opencl_read_the_same_slots(k):
    """A table of decoys with the kernel's scalars at its slots: both backends must find them."""
    from cnnc.backends.opencl import OpenCLBackend

    source, launches = render_source([k], OPENCL, "test", "", "step scalars")
    k.launch["opencl"] = launches[k.name]
    spec = OPS[k.op]
    rng = np.random.default_rng(7)
    table = rng.integers(-2**31, 2**31, 6).astype(np.int32)
    values = {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.001, "inv_cases": 1 / 32, "seed": 123457, "step": 41}
    for (name, role), slot in zip(spec.step_scalars, spec.slots(k.params)):
        table[slot] = scalar_bits(values[name], SCALAR_DTYPES[role])
    sizes = spec.sizes(k.params)
    arrays = {a: rng.standard_normal(sizes[a]).astype(np.float32) for a in spec.buffers}
    arrays["scalars"] = table
    ref = {a: v.copy() for a, v in arrays.items()}
    run_launch(k.op, k.params, [ref[a] for a in spec.kernel_args])

    backend = OpenCLBackend({0: source}, [0])
    handles = {}
    for a, v in arrays.items():
        buf = Buffer(a, 0, v.size, "i32" if v.dtype == np.int32 else "f32", "test", "")
        handles[a] = (buf, backend.alloc(buf, 0))
        backend.upload(handles[a][1], v)
    backend.launch(k, 0, [handles[a][1] for a in spec.kernel_args])
    for a in spec.buffers:
        got = backend.download(*reversed(handles[a]))
        np.testing.assert_allclose(got, ref[a], rtol=1e-5, atol=1e-6, err_msg=a)
        assert not np.array_equal(ref[a], arrays[a]) or a in ("x", "dw"), f"{a} was not written"
    if k.op == "dropout_fwd":          # the mask is decided in integers: the same bits
        assert np.array_equal(backend.download(*reversed(handles["mask"])), ref["mask"])


def test_reference_and_opencl_train_alike(build):
    out, plan = build
    runs = {}
    for backend, gpus in (("reference", [0, 1]), ("opencl", [0, 0])):
        ex = Executor(plan, make_backend(backend, plan, out, gpus))
        for n in range(2):
            ex.train_step(*batch(n), n / 2)
        runs[backend] = ex.parameters()
    for name, value in runs["reference"].items():
        np.testing.assert_allclose(runs["opencl"][name], value, rtol=1e-4, atol=1e-6, err_msg=name)
