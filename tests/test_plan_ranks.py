"""`cnnc plan --ranks` and `cnnc simulate --ranks/--network`: which logical devices each MPI
rank owns, the bytes per step that cross ranks, and copies between ranks over the network."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from cnnc.build import compile_network, load_plan
from cnnc.cli import main
from cnnc.perf.machine import Link, load_machine
from cnnc.perf.simulate import Span, plan_cost, simulate
from cnnc.perf.trace import ranks_trace, to_trace
from cnnc.plan.schedule import Buffer, Op

from helpers import RANKS4



@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ranks") / "placed"
    compile_network(RANKS4, "placed.cnn", out, use_nvcc=False)
    return out


def cli(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result: Result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def _copy_bytes(build: Path, blocks: list[list[int]]) -> dict[tuple[int, int, bool], int]:
    """Bytes of every copy of the training program between two ranks, counted from the plan's
    ops: (from rank, to rank, is gradient exchange) -> bytes."""
    plan = load_plan(build)
    rank = {d: r for r, block in enumerate(blocks) for d in block}
    out: dict = {}
    for dev, ops in plan.programs["train"].items():
        for op in ops:
            if op.kind == "copy" and rank[plan.buffers[op.src].device] != rank[dev]:
                key = (rank[plan.buffers[op.src].device], rank[dev], op.phase == "exchange")
                out[key] = out.get(key, 0) + 4 * op.count
    return out


@pytest.mark.parametrize("ranks, blocks", [(2, [[0, 1], [2, 3]]), (4, [[0], [1], [2], [3]])])
def test_plan_ranks_shows_ownership_and_bytes_between_ranks(build: Path, ranks: int, blocks) -> None:
    r = cli("plan", build, "--ranks", ranks, "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)["ranks"]
    assert s["count"] == ranks and s["devices"] == blocks
    expected = _copy_bytes(build, blocks)
    got = {}
    for t in s["transfers"]:
        assert t["from"] != t["to"]
        got[(t["from"], t["to"], False)] = t["activation_bytes"]
        got[(t["from"], t["to"], True)] = t["collective_bytes"]
    assert {k: v for k, v in got.items() if v} == expected
    assert expected[(0, 1, False)] and expected[(1, 0, True)]

    text = cli("plan", build, "--ranks", ranks)
    assert text.exit_code == 0, text.output
    assert f"as {ranks} MPI rank(s):" in text.stdout
    for rank, devices in enumerate(blocks):
        assert f"  rank {rank}: logical device(s) {', '.join(map(str, devices))}" in text.stdout
    t = s["transfers"][0]
    assert (f"  rank {t['from']} -> {t['to']}: {t['activation_bytes']:,} B activations/gradients, "
            f"{t['collective_bytes']:,} B gradient exchange") in text.stdout


def test_one_rank_sends_nothing_and_no_ranks_leaves_the_plan_alone(build: Path) -> None:
    one = json.loads(cli("plan", build, "--ranks", 1, "--json").stdout)["ranks"]
    assert one == {"count": 1, "devices": [[0, 1, 2, 3]], "transfers": []}
    assert "ranks" not in json.loads(cli("plan", build, "--json").stdout)
    assert "MPI rank" not in cli("plan", build).stdout


@pytest.mark.parametrize("command", ["plan", "simulate"])
def test_bad_rank_counts_are_one_line(build: Path, command: str) -> None:
    machine = ("--machine", "h100") if command == "simulate" else ()
    assert one_line_error(cli(command, build, *machine, "--ranks", 3)) == \
        "error: 3 ranks cannot share the plan's 4 logical devices: the number of ranks must divide it"
    assert one_line_error(cli(command, build, *machine, "--ranks", 0)) == "error: --ranks must be at least 1, got 0"


def test_network_needs_ranks_and_a_known_link(build: Path) -> None:
    assert one_line_error(cli("simulate", build, "--machine", "h100", "--network", "ethernet-100g")) == \
        "error: --network is the link between the nodes of --ranks: give --ranks R too"
    assert one_line_error(cli("simulate", build, "--machine", "h100", "--ranks", 2, "--network", "tin-can")) \
        .startswith("error: unknown link 'tin-can'; known: ")


def _simulated(build: Path, *args) -> dict:
    r = cli("simulate", build, "--machine", "h100", "--json", *args)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_copies_between_ranks_cross_the_network(build: Path) -> None:
    alone = _simulated(build)
    fast = _simulated(build, "--ranks", 2)
    slow = _simulated(build, "--ranks", 2, "--network", "ethernet-100g")
    assert "ranks" not in alone
    assert (fast["ranks"], fast["network_link"], fast["devices"]) == (2, "infiniband-ndr", 2)
    assert slow["network_link"] == "ethernet-100g"
    assert alone["step_ms"] < fast["step_ms"] < slow["step_ms"]
    names = [p["name"] for p in slow["critical_path"]]
    assert any(n.endswith("(rank 0 -> 1)") or n.endswith("(rank 1 -> 0)") for n in names), names
    text = cli("simulate", build, "--machine", "h100", "--ranks", 4, "--network", "ethernet-100g").stdout
    assert text.startswith("ranks4 on 1 x h100 per node, 4 ranks over ethernet-100g, batch 16: predicted ")


def test_a_message_costs_two_host_hops_and_the_network_and_holds_the_ports() -> None:
    """Two ranks' copies into one rank queue on its network port; within a rank, the peer link."""
    class TinyPlan:
        buffers = {f"b{d}": Buffer(f"b{d}", d, 1 << 20, "f32", "activation", "") for d in range(3)}

    machine = load_machine("h100")
    network = Link("net", bandwidth_gbs=1.0, latency_us=10.0, efficiency=1.0)
    copy = {d: Op("copy", stream="copy-in", src=f"b{d}", dst="b2", count=1 << 18) for d in range(2)}
    cost = plan_cost(TinyPlan(), machine, {0: (0, 0), 1: (1, 0), 2: (2, 0)}, {}, rank={0: 0, 1: 1, 2: 2},
                     network=network)
    act = cost(2, copy[0])
    assert act.seconds == pytest.approx(2 * machine.host_link.seconds(1 << 20) + 10e-6 + (1 << 20) / 1e9)
    assert set(act.resources) == {("network out", 0), ("network in", 2)}
    programs = {2: [copy[0], Op("copy", stream="compute", src="b1", dst="b2", count=1 << 18)]}
    sim = simulate(programs, cost)
    first, second = sorted(sim.spans, key=lambda s: s.start)
    assert second.start == pytest.approx(first.end)       # one port in: the second message waits
    same_rank = plan_cost(TinyPlan(), machine, {0: (0, 0), 1: (0, 1), 2: (0, 2)}, {}, rank={0: 0, 1: 0, 2: 0},
                          network=network)(2, copy[0])
    assert same_rank.seconds == pytest.approx(machine.peer_link.seconds(1 << 20))


def test_ranks_trace_has_one_process_per_rank() -> None:
    spans = [[Span(0, "compute", 3, "conv1_fwd", "compute", 0.0, 1e-3), Span(1, "copy-in", 5, "copy", "communication",
                                                                             1e-3, 2e-3)],
             [Span(2, "compute", 3, "conv1_fwd", "compute", 0.0, 2e-3)]]
    events = ranks_trace(spans)["traceEvents"]
    ops = [e for e in events if e["ph"] == "X"]
    assert [(e["pid"], e["args"]["device"], e["ts"], e["dur"]) for e in ops] == \
        [(0, 0, 0.0, 1000.0), (0, 1, 1000.0, 1000.0), (1, 2, 0.0, 2000.0)]
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert names == {(0, 0): "device 0 compute", (0, 1): "device 1 copy-in", (1, 0): "device 2 compute"}
    assert [e["args"]["name"] for e in events if e["name"] == "process_name"] == \
        ["rank 0 (measured)", "rank 1 (measured)"]


DATA_PARALLEL = """
network dp2
input data: 1x8x8
input labels: label(10)
train { batch = 8; epochs = 1; seed = 3; lr = 0.05; momentum = 0.9; init_w = 0.1 }
@gpu(0,1) conv1 = conv(data, filters=4, size=3, padding=1) relu
@gpu(0,1) conv2 = conv(conv1, filters=4, size=3, padding=1) relu
@gpu(0,1) fc3 = fc(conv2, outputs=10)
@gpu(0,1) probs = softmax(fc3)
@gpu(0,1) cost = logreg(labels, probs)
"""


def test_simulated_messages_leave_when_their_source_is_final(tmp_path: Path) -> None:
    """As the executor sends them: fc3's gradient share leaves rank 1 while conv2's backward
    still runs there, and the copy op on rank 0 then only writes device memory."""
    from cnnc.perf.roofline import plan_rooflines
    from cnnc.perf.simulate import simulate_plan

    compile_network(DATA_PARALLEL, "dp.cnn", tmp_path / "dp", use_nvcc=False)
    plan = load_plan(tmp_path / "dp")
    machine = load_machine("h100")
    network = Link("fast", bandwidth_gbs=400.0, latency_us=0.1)
    sim = simulate_plan(plan, machine, plan_rooflines(plan, machine), 1, ranks=[[0], [1]], network=network)
    send = next(s for s in sim.spans if s.name == "send fc3.weights.grad.r1 -> fc3.weights.grad.stage@0 "
                                                   "(rank 1 -> 0)")
    assert send.device == 1 and plan.programs["train"][0][send.index].dst == "fc3.weights.grad.stage@0"
    conv2 = [s for s in sim.spans if s.device == 1 and s.name.startswith("conv2_") and s.phase == "backward"]
    assert conv2 and send.start < max(s.end for s in conv2)
    landed = next(s for s in sim.spans if s.device == 0 and s.index == send.index)
    assert landed.start >= send.end
    assert landed.end - landed.start == pytest.approx(machine.host_link.seconds(4 * 1280))
    trace = to_trace(sim)["traceEvents"]
    assert {"name": "messages to other ranks"} in [e["args"] for e in trace if e["name"] == "thread_name"]
