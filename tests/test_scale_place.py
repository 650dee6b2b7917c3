"""Placements written as .cnn text (cnnc/perf/placements.py), the scaling study (`cnnc scale`)
and the placement search (`cnnc place`): generated placements check and compile, impossible ones
are skipped with a reason, and the branch-and-bound search finds the brute-force optimum."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner, Result

from cnnc.build import compile_network
from cnnc.check import check
from cnnc.cli import main
from cnnc.frontend.parser import parse
from cnnc.perf.machine import catalogue, load_machine
from cnnc.perf.place import Candidate, Evaluator, brute_force, search
from cnnc.perf.placements import (EXCHANGES, Skipped, balanced_cuts, data_parallel, hybrid, make_placement,
                                  model_parallel, pipeline)
from cnnc.perf.scale import evaluate

# six layers: small enough for the brute force, large enough for every strategy
SMALL = """\
network small
input data: 3x32x32
input labels: label(100)
train {
  batch = 64
  lr = 0.01
}
conv1 = conv(data, filters=32, size=5, stride=2, padding=2) relu
pool1 = maxpool(conv1, size=2)
fc2 = fc(pool1, outputs=2048) relu
fc3 = fc(fc2, outputs=100)
probs = softmax(fc3)
cost = logreg(labels, probs)
"""

# AlexNet in miniature: two convs with norms and pools, then two fc layers
MINI = """\
network mini
input data: 3x64x64
input labels: label(100)
train {
  batch = 64
}
conv1 = conv(data, filters=64, size=5, stride=2, padding=2) relu
pool1 = maxpool(conv1, size=3, stride=2)
rnorm1 = cmrnorm(pool1, size=5)
conv2 = conv(rnorm1, filters=128, size=3, padding=1) relu
pool2 = maxpool(conv2, size=3, stride=2)
fc3 = fc(pool2, outputs=2048) relu
drop3 = dropout2(fc3, keep=0.5)
fc4 = fc(drop3, outputs=100)
probs = softmax(fc4)
cost = logreg(labels, probs)
"""


def _net(text: str):
    program = parse(text, "net.cnn")
    return program, check(program)


def _layers(text: str) -> dict:
    return {l.name: l for l in check(parse(text, "placed.cnn")).layers}


def cli(*args) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_user_error(r: Result) -> str:
    assert r.exit_code == 2, (r.exit_code, r.output)
    assert isinstance(r.exception, SystemExit), r.exception
    assert "Traceback" not in r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


# ---------------------------------------------------------------- the generator


@pytest.mark.parametrize("strategy,variant", [("data", None), ("model", None), ("pipeline", None)]
                         + [("hybrid", ex) for ex in EXCHANGES])
def test_every_strategy_checks_and_compiles(tmp_path, strategy, variant):
    program, net = _net(MINI)
    p = make_placement(program, net, strategy, 4, variant)
    assert p.batch == 4 * net.batch
    result = compile_network(p.text, "placed.cnn", tmp_path / "build", use_nvcc=False)
    assert len(result.plan.devices) == 4
    assert result.plan.batch == 4 * net.batch


def test_data_parallel_replicates_every_layer():
    program, net = _net(MINI)
    layers = _layers(data_parallel(program, net, 4).text)
    assert set(layers) == {l.name for l in net.layers}
    assert all(l.gpus == (0, 1, 2, 3) for l in layers.values())


def test_model_parallel_slices_filters_and_outputs_unevenly():
    program, net = _net(SMALL.replace("filters=32", "filters=10"))
    layers = _layers(model_parallel(program, net, 4).text)
    convs = [l for l in layers.values() if l.kind == "conv"]
    assert sorted(l.args["filters"] for l in convs) == [2, 2, 3, 3]
    assert sorted(l.gpus for l in convs) == [(0,), (1,), (2,), (3,)]
    fc2 = [l for l in layers.values() if l.name.startswith("fc2")]
    assert sum(l.args["outputs"] for l in fc2) == 2048
    assert all(len(l.inputs) == 4 for l in fc2)             # every slice reads every slice below
    assert layers["fc3"].args["outputs"] == 100 and len(layers["fc3"].inputs) == 4   # feeds the softmax: whole


def test_hybrid_replicates_convs_and_slices_fc():
    program, net = _net(MINI)
    layers = _layers(hybrid(program, net, 4, "round_robin").text)
    for name in ("conv1", "pool1", "rnorm1", "conv2", "pool2"):
        assert layers[name].gpus == (0, 1, 2, 3)
    fc3 = sorted((l for l in layers.values() if l.name.startswith("fc3")), key=lambda l: l.gpus)
    assert [l.gpus for l in fc3] == [(0,), (1,), (2,), (3,)]
    assert [l.args["outputs"] for l in fc3] == [512] * 4
    drops = [l for l in layers.values() if l.kind == "dropout2"]
    assert sorted(l.gpus for l in drops) == [(0,), (1,), (2,), (3,)]    # per-channel layers follow their slice


def test_pipeline_stages_are_consecutive_and_balanced():
    program, net = _net(MINI)
    costs = {"conv1": 5.0, "conv2": 5.0}
    p = pipeline(program, net, 2, layer_costs=costs)
    layers = _layers(p.text)
    order = [layers[l.name].gpus for l in net.layers]
    assert order == sorted(order)                           # each device's layers in one run
    assert layers["conv1"].gpus == (0,) and layers["conv2"].gpus == (1,)
    assert "microbatches = 8" in p.text and "pipeline = one_f_one_b" in p.text


def test_balanced_cuts_minimise_the_costliest_stage():
    costs = [4, 1, 1, 1, 1, 4, 2]
    cuts = balanced_cuts(costs, 3)
    bounds = cuts + [len(costs)]
    worst = max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))
    assert worst == 6 and cuts[0] == 0 and len(cuts) == 3


@pytest.mark.parametrize("make,reason", [
    (lambda p, n: pipeline(p, n, 8), "8 pipeline stages need 8 layers"),
    (lambda p, n: hybrid(p, n, 4, "scatter", batch=72), "multiple of 4² = 16"),
    (lambda p, n: data_parallel(p, n, 3, scale_batch=False), "does not split into 3"),
    (lambda p, n: model_parallel(p, n, 200), "fewer than the 200 devices"),
])
def test_impossible_placements_are_skipped_with_a_reason(make, reason):
    program, net = _net(SMALL)
    with pytest.raises(Skipped, match=reason):
        make(program, net)


def test_hybrid_without_fc_is_skipped():
    program, net = _net(SMALL.replace("fc2 = fc(pool1, outputs=2048) relu\nfc3 = fc(fc2, outputs=100)",
                                      "fc3 = conv(pool1, filters=100, size=9)"))
    with pytest.raises(Skipped, match="no fc layer"):
        hybrid(program, net, 2)


# ---------------------------------------------------------------- cnnc scale


def test_scale_json_has_a_row_per_strategy_and_count(tmp_path):
    src = tmp_path / "small.cnn"
    src.write_text(SMALL)
    r = cli("scale", src, "--machine", "k20", "--device-counts", "1,2,8", "--strategies", "hybrid,pipeline",
            "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    rows = out["rows"]
    assert [(x["strategy"], x["exchange"], x["gpus"]) for x in rows] == (
        [("hybrid", ex, n) for ex in EXCHANGES for n in (1, 2, 8)]
        + [("pipeline", None, n) for n in (1, 2, 8)])
    by = {(x["strategy"], x["exchange"], x["gpus"]): x for x in rows}
    assert by[("pipeline", None, 8)]["skipped"] and by[("pipeline", None, 8)]["speedup"] is None
    for x in rows:
        if x["gpus"] == 1:
            assert x["speedup"] == pytest.approx(1.0)
        if not x["skipped"]:
            assert x["batch"] == 64 * x["gpus"]
            assert x["step_ms"] > 0 and x["speedup"] == pytest.approx(x["images_per_s"] / rows[0]["images_per_s"])
            assert len(x["memory_mib_per_device"]) == x["gpus"]
            assert (x["bytes_moved"] > 0) == (x["gpus"] > 1)
    h2 = by[("hybrid", "all_gather", 2)]
    assert h2["bytes_moved"] >= 4 * 64 * 9 * 9 * 32      # the other replica's pool1 output reaches each fc2 slice


def test_scale_table_and_plot(tmp_path):
    src = tmp_path / "small.cnn"
    src.write_text(SMALL)
    png = tmp_path / "scaling.png"
    r = cli("scale", src, "--machine", "k20", "--device-counts", "1,2", "--strategies", "model", "--plot", png)
    assert r.exit_code == 0, r.output
    assert "model" in r.stdout and "speedup" in r.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args,message", [
    (["missing.cnn", "--machine", "k20"], "no such .cnn file"),
    (["{src}", "--machine", "k99"], "unknown machine 'k99'"),
    (["{src}", "--machine", "k20", "--device-counts", "1,two"], "--device-counts"),
    (["{src}", "--machine", "k20", "--device-counts", "0,2"], "--device-counts"),
    (["{src}", "--machine", "k20", "--strategies", "data,zigzag"], "unknown strategy zigzag"),
])
def test_scale_errors_are_one_line(tmp_path, args, message):
    src = tmp_path / "small.cnn"
    src.write_text(SMALL)
    r = cli("scale", *[a.format(src=src) for a in args])
    assert message in assert_user_error(r)


# ---------------------------------------------------------------- cnnc place


def test_search_equals_brute_force_on_six_layers_and_four_devices():
    program, _ = _net(SMALL)
    m = load_machine("k20")
    ev = Evaluator(m, 4)
    found = search(program, m, 4, evaluator=ev)
    every = brute_force(program, m, 4, evaluator=ev)
    assert found.ranking[0].name == every.ranking[0].name
    assert found.ranking[0].step_s == min(c.step_s for c in every.ranking)
    assert found.evaluated < every.evaluated == every.candidates       # the bound pruned some
    assert all(c.bound_s <= c.step_s for c in every.ranking)


def test_place_finds_a_hybrid_faster_than_data_parallel():
    program, net = _net(MINI)
    m = load_machine("k20")
    ev = Evaluator(m, 4)
    best = search(program, m, 4, evaluator=ev).ranking[0]
    assert best.name.startswith("hybrid: below fc3 replicated on 4")
    data = Candidate("data", data_parallel(program, net, 4).text, batch=4 * net.batch)
    assert best.step_s < ev.step(data)


def _small_k20(tmp_path, mib: float):
    """A machine file with a K20 of `mib` MiB of memory."""
    entry = dict(catalogue()["machines"]["k20"], memory_gib=mib / 1024)
    f = tmp_path / "machines.json"
    f.write_text(json.dumps({"machines": {"k20small": entry}}))
    return f


def test_place_keeps_to_each_devices_memory(tmp_path):
    program, _ = _net(SMALL)
    m = load_machine("k20small", _small_k20(tmp_path, 40))
    result = search(program, m, 4)
    assert "data parallel on 4" in result.too_big           # fc2's weights whole on every device: 90 MiB
    assert result.ranking and all(c.peak_memory_bytes <= 40 * 2**20 for c in result.ranking)


def test_place_says_when_nothing_fits(tmp_path):
    src = tmp_path / "small.cnn"
    src.write_text(SMALL)
    out = tmp_path / "placed.cnn"
    r = cli("place", src, "--machine", "k20small", "--machine-file", _small_k20(tmp_path, 4), "--devices", "2",
            "-o", out)
    assert "no placement of small on 2 x k20small fits" in assert_user_error(r)
    assert not out.exists()


def test_place_predicts_what_the_compiled_placement_simulates(tmp_path):
    """The search plans in memory and derives launch geometry without rendering sources; the
    compiled build must simulate to the same step."""
    program, _ = _net(SMALL)
    m = load_machine("k20")
    ranking = search(program, m, 2).ranking
    assert len({c.name.split()[0] for c in ranking[:3]}) > 1         # more than one strategy compared
    for c in ranking[:3]:
        compiled = evaluate(c.text, "placed.cnn", m, 2, tmp_path)
        assert compiled.step_s == pytest.approx(c.step_s, rel=1e-9), c.name


def test_place_writes_an_annotated_placement(tmp_path):
    src = tmp_path / "small.cnn"
    src.write_text(SMALL)
    out = tmp_path / "placed.cnn"
    r = cli("place", src, "--machine", "k20", "--devices", "2", "-o", out)
    assert r.exit_code == 0, r.output
    text = out.read_text()
    assert text.startswith("# Placed by cnnc place for 2 x k20: ")
    assert "Predicted" in text and "Runners-up:" in text
    layers = check(parse(text, str(out))).layers
    assert {d for l in layers for d in l.gpus} <= {0, 1}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []     # no scratch left


@pytest.mark.parametrize("args,message", [
    (["{src}", "--machine", "k20", "--devices", "2", "-o", "{src}"], "overwrite the input"),
    (["{src}", "--machine", "k20", "--devices", "0", "-o", "{out}"], "--devices"),
    (["missing.cnn", "--machine", "k20", "--devices", "2", "-o", "{out}"], "no such .cnn file"),
    (["{src}", "--machine", "nope", "--devices", "2", "-o", "{out}"], "unknown machine"),
])
def test_place_errors_are_one_line_and_write_nothing(tmp_path, args, message):
    src = tmp_path / "small.cnn"
    src.write_text(SMALL)
    out = tmp_path / "placed.cnn"
    r = cli("place", *[a.format(src=src, out=out) for a in args])
    assert message in assert_user_error(r)
    assert not out.exists()
    assert src.read_text() == SMALL
