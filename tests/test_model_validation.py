"""Measured against predicted: `cnnc run --trace` writes a real run's ops in the trace format
`cnnc simulate --trace` writes, and the arithmetic that compares the model with `cnnc bench`."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner, Result

from cnnc.build import compile_file, load_plan
from cnnc.cli import main
from cnnc.perf.simulate import op_label
from cnnc.perf.trace import TRACE_STEPS, TRACE_WARMUP
from cnnc.perf.validate import compare_layers, median_abs_error, predicted_layer_ms, relative_error
from cnnc.plan.schedule import Op


def cli(*args) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def two_device_build(tmp_path_factory, tiny_source) -> Path:
    """The tiny network with its conv on two replicas: two logical devices, copies between them."""
    root = tmp_path_factory.mktemp("trace")
    src = root / "tiny2.cnn"
    src.write_text(tiny_source.replace("conv1 = conv(", "@gpu(0,1)\nconv1 = conv("))
    compile_file(src, root / "build", use_nvcc=False)
    return root / "build"


def assert_trace_format(trace: dict) -> list[dict]:
    """The Chrome trace-event format's rules for the events cnnc writes; returns the ops."""
    assert set(trace) == {"traceEvents", "displayTimeUnit"}
    ops = []
    for ev in trace["traceEvents"]:
        assert ev["ph"] in ("M", "X") and isinstance(ev["name"], str)
        assert isinstance(ev["pid"], int) and isinstance(ev["tid"], int)
        if ev["ph"] == "M":
            assert ev["name"] in ("process_name", "thread_name") and isinstance(ev["args"]["name"], str)
        else:
            assert ev["ts"] >= 0 and ev["dur"] >= 0 and ev["cat"] in ("compute", "communication")
            ops.append(ev)
    return ops


def expected_ops(build: Path, steps: int) -> Counter:
    plan = load_plan(build)
    return Counter({(dev, op_label(op)[0]): steps for dev, ops in plan.programs["train"].items()
                    for op in ops if op.kind not in ("record", "wait")}) if steps else Counter()


def traced_ops(ops: list[dict]) -> Counter:
    return Counter((ev["pid"], ev["name"]) for ev in ops)


@pytest.mark.parametrize("backend", ["reference", "opencl"])
def test_run_trace_records_every_op_of_the_plan_per_step(two_device_build, tmp_path, backend):
    trace = tmp_path / "trace.json"
    r = cli("run", two_device_build, "--backend", backend, "--steps", TRACE_WARMUP + TRACE_STEPS + 1, "-q",
            "--no-test", "--save-dir", tmp_path / "save", "--trace", trace)
    assert r.exit_code == 0, r.output
    assert f"trace: {trace} ({TRACE_STEPS} steps after {TRACE_WARMUP} warm-up steps)" in r.output
    ops = assert_trace_format(json.loads(trace.read_text()))
    got, want = traced_ops(ops), expected_ops(two_device_build, TRACE_STEPS)
    assert got == want
    # each op is timed on its own: measured ops follow one another on the run's one clock
    spans = sorted((ev["ts"], ev["ts"] + ev["dur"]) for ev in ops)
    assert all(a_end <= b_start + 1e-3 for (_, a_end), (b_start, _) in zip(spans, spans[1:]))


def test_run_trace_of_a_run_shorter_than_the_warm_up_has_no_ops(tiny_build_dir, tmp_path):
    trace = tmp_path / "trace.json"
    r = cli("run", tiny_build_dir, "--backend", "reference", "--steps", 1, "-q", "--no-test",
            "--save-dir", tmp_path / "save", "--trace", trace)
    assert r.exit_code == 0, r.output
    assert f"({0} steps after {TRACE_WARMUP} warm-up steps)" in r.output
    assert assert_trace_format(json.loads(trace.read_text())) == []


def test_run_trace_refuses_test_only(tiny_build_dir, tmp_path):
    r = cli("run", tiny_build_dir, "--test-only", "--init", tmp_path / "w.npz", "--trace", tmp_path / "t.json")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.output.strip().splitlines()[-1] == "Error: --trace records training steps: leave out --test-only"


# ---------------------------------------------------------------- the comparison's arithmetic

def test_relative_errors_and_their_median():
    assert relative_error(1.2, 1.0) == pytest.approx(0.2)
    assert relative_error(0.5, 2.0) == pytest.approx(-0.75)
    rows = compare_layers({"a": 1.2, "b": 0.5, "c": 3.0, "only_predicted": 9.0},
                          {"c": 2.0, "a": 1.0, "b": 2.0, "zero": 0.0})
    assert [r["layer"] for r in rows] == ["c", "a", "b"]          # the measured order; no zero, no missing
    assert [r["error"] for r in rows] == pytest.approx([0.5, 0.2, -0.75])
    assert median_abs_error(rows) == pytest.approx(0.5)
    assert median_abs_error([]) is None


def test_predicted_layer_time_sums_forward_and_backward_launches_on_every_device():
    def launch(kernel, phase):
        return Op("launch", "compute", kernel=kernel, phase=phase)

    kernels = {"c_f": SimpleNamespace(layer="conv"), "c_b": SimpleNamespace(layer="conv"),
               "c_u": SimpleNamespace(layer="conv"), "f_f": SimpleNamespace(layer="fc"),
               "step": SimpleNamespace(layer="")}
    programs = {"train": {0: [launch("c_f", "forward"), launch("f_f", "forward"), launch("c_b", "backward"),
                              launch("c_u", "update"), launch("step", "forward")],
                          1: [launch("c_f", "forward"), Op("record", "compute", event="e", phase="forward")]}}
    plan = SimpleNamespace(programs=programs, kernels=kernels)
    rooflines = {"c_f": {"time_us": 100.0}, "c_b": {"time_us": 250.0}, "c_u": {"time_us": 1e6},
                 "f_f": {"time_us": 40.0}, "step": {"time_us": 1e6}}
    # conv: two forward launches (one per device) and one backward; its update is not a timed phase
    assert predicted_layer_ms(plan, rooflines) == pytest.approx({"conv": 0.45, "fc": 0.04})
