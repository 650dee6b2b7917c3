"""The race detector (cnnc.race): streams advance in a seeded random order the events permit,
and every access is checked against them.  A race-free plan gives the in-order results bit
for bit; a plan with one wait removed is stopped at the access that wait protected."""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cnnc.backends import make_backend
from cnnc.build import compile_network
from cnnc.build_dir import sha256_file
from cnnc.cli import main
from cnnc.executor import Executor
from cnnc.plan.schedule import Plan
from cnnc.race import RaceChecker, RaceError, parse_stream_order

from test_parallel import PIPE, PLACEMENTS, batches, pipelined, source


def compiled(src: str, tmp: Path) -> Plan:
    return compile_network(src, "par.cnn", tmp, use_nvcc=False).plan


def steps(plan: Plan, backend, count: int = 2):
    """Losses of `count` training steps, then the test program's, and the parameters."""
    ex = Executor(plan, backend)
    data = batches(count + 1)
    losses = [ex.train_step(x, y, i / count)[0] for i, (x, y) in enumerate(data[:count])]
    losses.append(ex.evaluate(*data[-1])[0])
    return np.concatenate(losses), ex.parameters()


def with_train_ops(plan: Plan, device: int, ops: list) -> Plan:
    return dataclasses.replace(plan, programs=dict(plan.programs, train={**plan.programs["train"], device: ops}))


def without_wait(plan: Plan, device: int, reader: str) -> tuple[Plan, int, str]:
    """The plan with one wait of `device`'s train program removed: the wait before the first
    `reader` launch for the op that writes that launch's first argument on another stream.
    Returns the plan, the launch's index in the shortened program and that buffer."""
    ops = plan.programs["train"][device]
    launch = next(i for i, op in enumerate(ops) if op.kind == "launch" and plan.kernels[op.kernel].op == reader)
    buffer = ops[launch].args[0]
    marked = {op.event: program[i - 1] for program in plan.programs["train"].values()
              for i, op in enumerate(program) if op.kind == "record"}
    i = launch - 1
    while ops[i].kind == "wait" and marked[ops[i].event].dst != buffer:
        i -= 1
    assert ops[i].kind == "wait", f"no wait orders {buffer} before the {reader} launch"
    return with_train_ops(plan, device, ops[:i] + ops[i + 1:]), launch - 1, buffer


@pytest.mark.parametrize("name", ["data-4-reversed", "hybrid-4-to-2", "1f1b-data-parallel-stages"])
def test_random_order_gives_the_in_order_results_bit_for_bit(name, tmp_path):
    src = pipelined(*PIPE[name]) if name in PIPE else source(PLACEMENTS[name])
    plan = compiled(src, tmp_path)
    in_order = steps(plan, make_backend("reference", plan, tmp_path, [0, 1, 2, 3]))
    for seed in range(3):
        losses, parameters = steps(plan, RaceChecker(plan, seed))
        assert losses.tobytes() == in_order[0].tobytes()
        assert all(parameters[k].tobytes() == v.tobytes() for k, v in in_order[1].items())


def test_random_orders_differ_from_the_in_order_walk(tmp_path):
    """The queues really interleave otherwise: with two devices, the copy-in streams run ahead."""
    plan = compiled(source(PLACEMENTS["data-2"]), tmp_path)
    runs = []
    for order in (None, 0, 1):
        seen = []
        backend = make_backend("reference", plan, tmp_path, [0, 1]) if order is None else RaceChecker(plan, order)
        ex = Executor(plan, backend)
        ex.load_batch(*batches(1)[0])
        ex.run("train", 0.0, lambda device, op, seconds: seen.append(id(op)))
        runs.append(seen)
    assert len({tuple(r) for r in runs}) == 3
    assert sorted(runs[1]) == sorted(runs[0])           # the same ops, in another order


@pytest.mark.parametrize("reader", ["conv_fwd", "replica_sum"])
def test_a_dropped_wait_is_reported_with_both_accesses(reader, tmp_path):
    """Device 1's compute stream reads its share of the minibatch (uploaded on copy-in), or a
    gradient chunk copied in for the reduce-scatter, without waiting: whichever runs first,
    the read is reported with the write it needed, on the right device, stream and buffer."""
    plan, launch, buffer = without_wait(compiled(source(PLACEMENTS["data-2"]), tmp_path), 1, reader)
    for seed in range(4):
        with pytest.raises(RaceError) as e:
            steps(plan, RaceChecker(plan, seed))
        access, other = e.value.access, e.value.other
        assert (access.device, access.stream[1], access.index, access.buffer, access.verb) == \
            (1, "compute", launch, buffer, "reads")
        assert (other.device, other.stream[1], other.buffer) == (1, "copy-in", buffer)
        assert other.verb in ("writes", "starts the lifetime of") and other.index < launch
        assert str(e.value).startswith(f"race: device 1, stream compute, train op {launch} (launch ")
        assert "a record/wait pair is missing" in str(e.value)


def test_the_in_order_walk_hides_the_dropped_wait(tmp_path):
    """Why the detector exists: the reference backend in order runs the broken plan happily."""
    plan, _, _ = without_wait(compiled(source(PLACEMENTS["data-2"]), tmp_path), 1, "conv_fwd")
    losses, _ = steps(plan, make_backend("reference", plan, tmp_path, [0, 1]))
    assert np.isfinite(losses).all()


def test_a_read_of_what_nothing_writes_is_reported(tmp_path):
    plan = compiled(source(PLACEMENTS["data-2"]), tmp_path)
    ops = plan.programs["train"][1]
    pool = next(i for i, op in enumerate(ops) if op.kind == "launch" and plan.kernels[op.kernel].op == "pool_fwd")
    plan = with_train_ops(plan, 1, ops[:pool] + ops[pool + 1:])
    with pytest.raises(RaceError, match=r"reads pool1\.out\.r1, which no op of the train program writes"):
        steps(plan, RaceChecker(plan, 0))


def test_runs_are_ordered_by_the_fence_between_them(tmp_path, monkeypatch):
    """The plan orders ops within one run; the backend's begin_run fence orders the runs, with no
    synchronize between them.  Without the fence, the next run's upload would overwrite the
    minibatch the last one may still read."""
    plan = compiled(source({}), tmp_path)
    checker = RaceChecker(plan, 0)
    ex = Executor(plan, checker)
    ex.load_batch(*batches(1)[0])
    ex.run("train")
    ex.run("train")
    monkeypatch.setattr(checker, "begin_run", lambda: None)
    with pytest.raises(RaceError, match=r"\(no fence or synchronize between the two runs\)") as e:
        ex.run("train")
    assert e.value.access.program == e.value.other.program == "train"
    assert e.value.access.run == e.value.other.run + 1


def test_buffers_are_nan_when_their_lifetime_starts_but_parameters_persist(tmp_path):
    """In the second step, fc2's output still holds the first step's values in memory, yet the
    launch that writes it sees NaN there; its weights keep their values."""
    plan = compiled(source({}), tmp_path)
    checker = RaceChecker(plan, 0)
    seen = []
    launch = checker.launch

    def spy(kernel, device, args, stream="compute"):
        if kernel.layer == "fc2" and kernel.op == "fc_fwd":
            x, w, b, y = args
            seen.append((np.isnan(y).all(), np.isfinite(w).all() and np.isfinite(b).all()))
        launch(kernel, device, args, stream)

    checker.launch = spy
    steps(plan, checker)
    assert seen == [(True, True)] * 3            # two training steps and the test step


@pytest.mark.parametrize("text, seed", [("in-order", None), ("random", 0), ("random:17", 17)])
def test_parse_stream_order(text, seed):
    assert parse_stream_order(text) == seed


@pytest.mark.parametrize("text", ["", "random:", "random:-1", "random:1.5", "in-order:2", "Random", "shuffled"])
def test_parse_stream_order_refuses(text):
    with pytest.raises(ValueError, match="expected in-order, random or random:SEED"):
        parse_stream_order(text)


# ---------------------------------------------------------------- cnnc run --stream-order

@pytest.fixture
def build(tiny_build_dir, tmp_path) -> Path:
    """A copy of the tiny build, which a run writes its lock and save directory into."""
    shutil.copytree(tiny_build_dir, tmp_path / "build")
    return tmp_path / "build"


def run(build: Path, *args: str):
    return CliRunner().invoke(main, ["run", str(build), "--steps", "2", "--no-test", "-q",
                                     "--save-dir", str(build / "runs"), *args])


def test_cli_random_order_trains(build):
    result = run(build, "--backend", "reference", "--stream-order", "random:5")
    assert result.exit_code == 0, result.output
    assert "streams in random order (seed 5), race-checked" in result.stdout.splitlines()[0]


@pytest.mark.parametrize("args, message", [
    (["--stream-order", "random"], "error: --stream-order random runs on the reference backend only "
                                   "(--backend auto was given): add --backend reference"),
    (["--backend", "opencl", "--stream-order", "random:1"], "error: --stream-order random runs on the "
                                                            "reference backend only (--backend opencl was given)"),
])
def test_cli_refuses_random_order_on_other_backends(args, message, build):
    result = run(build, *args)
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert result.stderr.splitlines() == [result.stderr.strip()] and result.stderr.startswith(message)


def test_cli_refuses_a_malformed_stream_order(build):
    result = run(build, "--backend", "reference", "--stream-order", "random:x")
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert "Invalid value for '--stream-order': expected in-order, random or random:SEED" in result.stderr


def test_cli_stops_a_racy_plan_in_one_line(build):
    """A plan.json whose compute stream no longer waits for the minibatch upload."""
    plan = json.loads((build / "plan.json").read_text())
    ops = plan["programs"]["train"]["0"]
    del ops[next(i for i, op in enumerate(ops) if op["kind"] == "wait" and op.get("stream", "compute") == "compute")]
    (build / "plan.json").write_text(json.dumps(plan))
    manifest = json.loads((build / "manifest.json").read_text())
    manifest["sha256"]["plan.json"] = sha256_file(build / "plan.json")
    (build / "manifest.json").write_text(json.dumps(manifest))
    assert run(build, "--backend", "reference").exit_code == 0          # in order, nothing shows
    result = run(build, "--backend", "reference", "--stream-order", "random")
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    assert result.stderr.startswith("error: race: device 0, stream compute, train op ")
    assert re.search(r"device 0, stream copy-in, train op \d+ \(upload data\.out\) writes data\.out", result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1
