"""The performance model: machine files, the roofline's arithmetic against hand-computed figures,
the simulator on hand-made schedules with known critical paths, the Chrome trace format, and the
commands a user runs (`cnnc plan --roofline`, `cnnc simulate`, `cnnc calibrate`'s cache)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from cnnc.cli import main
from cnnc.perf import calibrate
from cnnc.perf.machine import Link, Machine, MachineError, load_machine
from cnnc.perf.roofline import dram_bytes, kernel_roofline, utilisation
from cnnc.perf.simulate import Activity, SimulationError, plan_cost, simulate
from cnnc.perf.trace import to_trace
from cnnc.plan.schedule import Buffer, Kernel, Op

REPO = Path(__file__).resolve().parent.parent
SHIPPED = ("k20", "k20x", "titanx", "v100", "a100", "h100", "h200")


def cli(*args, env: dict | None = None) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def assert_user_error(result: Result, message: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert result.stderr.strip().splitlines()[-1] == message


def _machine(**kw) -> Machine:
    link = Link("l", bandwidth_gbs=10, latency_us=2, efficiency=0.5)
    base = dict(name="toy", dialect="cuda", sms=4, peak_fp32_tflops=1.0, memory_bandwidth_gbs=100,
                launch_overhead_us=5, peer_link=link, host_link=link, l2_mib=0, compute_efficiency=0.5,
                memory_efficiency=0.5, occupancy_saturation=0, max_blocks_per_sm=2)
    return Machine(**dict(base, **kw))


def _fc_kernel(n=64, i=256, o=512) -> Kernel:
    from cnnc.codegen.dialect import CUDA
    from cnnc.codegen.render import geometry

    k = Kernel("fc_fwd_toy", "fc_fwd", {"N": n, "I": i, "O": o, "neuron": None}, "fc", 1, "")
    launch, _ = geometry(k, CUDA)
    return Kernel(k.name, k.op, k.params, k.layer, k.line, k.summary, {"cuda": launch})


# ---------------------------------------------------------------- machines

@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_machines_load_with_their_links(name):
    m = load_machine(name)
    assert m.peak_fp32_tflops > 0 and m.memory_bandwidth_gbs > 0 and m.sms > 0 and m.launch_overhead_us > 0
    assert m.peer_link.bandwidth_gbs > 0 and m.host_link.bandwidth_gbs > 0
    assert m.arch.startswith("sm_") and m.kernel_arch in ("sm_75", "sm_80", "sm_90")


def test_machine_file_adds_a_machine_and_reports_a_missing_field(tmp_path):
    f = tmp_path / "mine.json"
    f.write_text(json.dumps({"machines": {"mygpu": {"dialect": "cuda", "sms": 10, "peak_fp32_tflops": 2,
                                                    "memory_bandwidth_gbs": 50, "launch_overhead_us": 1,
                                                    "peer_link": "pcie4", "host_link": "pcie4"}}}))
    m = load_machine("mygpu", f)
    assert (m.sms, m.peer_link.name, m.ridge_intensity) == (10, "pcie4", 40.0)
    f.write_text(json.dumps({"machines": {"bad": {"dialect": "cuda", "sms": 10, "peer_link": "pcie4",
                                                  "host_link": "pcie4"}}}))
    with pytest.raises(MachineError, match="machine 'bad' lacks peak_fp32_tflops, memory_bandwidth_gbs, "
                                           "launch_overhead_us"):
        load_machine("bad", f)


def test_machines_file_ships_in_the_wheel():
    """hatch packages everything under cnnc/ that git tracks or leaves unignored."""
    from cnnc.perf.machine import MACHINES_FILE
    assert MACHINES_FILE.parent == REPO / "cnnc" / "perf"
    assert 'packages = ["cnnc"]' in (REPO / "pyproject.toml").read_text()


# ---------------------------------------------------------------- roofline arithmetic

def test_fc_roofline_against_hand_computation():
    k = _fc_kernel()                            # GEMM M=64 cases, N=512 outputs, K=256 inputs
    m = _machine()
    once = 4 * (64 * 256 + 256 * 512 + 512 + 64 * 512)          # x, w, b, y
    # CUDA block tile 64x64: x (A, 64x256) is read once per column of 8 tiles; w (B) by 1 row of tiles
    assert dram_bytes(k, m) == once + 4 * 7 * 64 * 256
    assert dram_bytes(k, _machine(l2_mib=8)) == once           # everything fits in half the L2
    r = kernel_roofline(k, m)
    flops = 2 * 64 * 256 * 512
    assert r["flops"] == flops and r["blocks"] == 8 and r["threads"] == 256
    # 8 blocks fill the 4 SMs x 2 slots in one wave: all of the machine
    assert r["utilisation"] == 1.0
    assert r["compute_us"] == pytest.approx(flops / (1e12 * 0.5) * 1e6)
    assert r["memory_us"] == pytest.approx(r["dram_bytes"] / (100e9 * 0.5) * 1e6)
    assert r["time_us"] == pytest.approx(5 + max(r["compute_us"], r["memory_us"]))
    assert r["intensity"] == pytest.approx(flops / r["dram_bytes"], rel=1e-4)
    assert r["intensity"] == pytest.approx(14.197, abs=1e-3)
    assert r["bound"] == "compute"                              # the ridge is at 1e12 / 100e9 = 10 FLOP/B
    assert r["attainable_gflops"] == 1000.0
    slow = kernel_roofline(k, _machine(memory_bandwidth_gbs=10))   # the ridge moves to 100 FLOP/B
    assert slow["bound"] == "memory" and slow["attainable_gflops"] == pytest.approx(141.97, abs=0.01)


def test_utilisation_over_waves_and_occupancy():
    m = _machine()                               # 4 SMs, 2 blocks each: 8 slots
    # one full wave (8 blocks at full rate) and a tail of 2 blocks on 2 of 4 SMs (half rate)
    assert utilisation(10, 1, 2, m) == pytest.approx(10 / (8 + 2 / 0.5))
    assert utilisation(1, 1, 2, m) == pytest.approx(0.25)
    # latency hidden only from a quarter of 2048 threads' 64 warps: 16; one block of 4 warps gets 1/4 of it
    sat = _machine(occupancy_saturation=0.25)
    assert utilisation(4, 4, 2, sat) == pytest.approx(4 / (4 / (1 * 4 / 16)))


# ---------------------------------------------------------------- the simulator

def _launch(name: str, stream: str = "compute") -> Op:
    return Op("launch", stream=stream, kernel=name)


def _cost(durations: dict[str, float], physical: dict[int, int] | None = None):
    def cost(dev: int, op: Op):
        category = "communication" if op.stream == "copy-in" else "compute"
        resource = ("compute" if category == "compute" else "link", (physical or {}).get(dev, dev))
        return Activity(durations[op.kernel], (resource,), category, op.kernel)
    return cost


def _path(sim) -> list[str]:
    return [sim.spans[i].name for i in sim.critical_path]


def test_wait_across_devices_puts_both_on_the_critical_path():
    programs = {0: [_launch("a"), Op("record", event="e1"), _launch("c")],
                1: [_launch("x"), Op("wait", event="e1"), _launch("b")]}
    sim = simulate(programs, _cost({"a": 1.0, "b": 2.0, "c": 0.5, "x": 0.25}))
    assert sim.step_s == 3.0
    assert _path(sim) == ["a", "b"]
    b = next(s for s in sim.spans if s.name == "b")
    assert (b.start, b.end) == (1.0, 3.0)
    times = sim.device_times()
    assert times[1] == {"compute_s": 2.25, "communication_s": 0.0, "idle_s": 0.75}
    assert times[0]["idle_s"] == 1.5


def test_wait_across_streams_overlaps_until_the_event():
    programs = {0: [_launch("copy", "copy-in"), Op("record", stream="copy-in", event="e"),
                    _launch("a"), Op("wait", event="e"), _launch("b")]}
    sim = simulate(programs, _cost({"copy": 3.0, "a": 1.0, "b": 1.0}))
    spans = {s.name: (s.start, s.end) for s in sim.spans}
    assert spans == {"copy": (0.0, 3.0), "a": (0.0, 1.0), "b": (3.0, 4.0)}
    assert _path(sim) == ["copy", "b"]
    assert sim.device_times()[0] == {"compute_s": 2.0, "communication_s": 3.0, "idle_s": 0.0}


def test_chain_through_two_devices_and_both_streams():
    """device 0 computes, device 1 copies the result in, computes, and device 0 waits for it."""
    programs = {0: [_launch("f0"), Op("record", event="done0"), Op("wait", event="done1"), _launch("g0")],
                1: [Op("wait", stream="copy-in", event="done0"), _launch("copy", "copy-in"),
                    Op("record", stream="copy-in", event="in1"), _launch("h1"),
                    Op("wait", event="in1"), _launch("f1"), Op("record", event="done1")]}
    sim = simulate(programs, _cost({"f0": 1.0, "copy": 0.5, "h1": 4.0, "f1": 1.0, "g0": 2.0}))
    assert sim.step_s == 4.0 + 1.0 + 2.0
    assert _path(sim) == ["h1", "f1", "g0"]          # h1 (0..4) outlasts f0 + copy (0..1.5)


def test_logical_devices_on_one_physical_device_take_turns():
    programs = {0: [_launch("a")], 1: [_launch("b")]}
    assert simulate(programs, _cost({"a": 1.0, "b": 2.0})).step_s == 2.0
    shared = simulate(programs, _cost({"a": 1.0, "b": 2.0}, physical={0: 0, 1: 0}))
    assert shared.step_s == 3.0 and _path(shared) == ["a", "b"]


def test_a_wait_nobody_records_is_reported():
    with pytest.raises(SimulationError, match="device 1 compute waits for never"):
        simulate({0: [_launch("a")], 1: [Op("wait", event="never"), _launch("b")]}, _cost({"a": 1, "b": 1}))


def test_plan_costs_of_copies_and_uploads():
    class _Plan:
        buffers = {"x": Buffer("x", 0, 1000, "f32", "activation", "l"),
                   "x@1": Buffer("x@1", 1, 1000, "f32", "mirror", "l")}

    m = _machine()
    cost = plan_cost(_Plan(), m, {0: 0, 1: 1}, {})
    copy = Op("copy", stream="copy-in", src="x", dst="x@1", count=1000)
    # 4000 bytes over a 10 GB/s link at half efficiency, plus 2 us
    assert cost(1, copy) == Activity(2e-6 + 4000 / 5e9, (("link", 0, 1),), "communication", "copy x -> x@1")
    up = cost(1, Op("upload", stream="copy-in", input="data", dst="x@1"))
    assert up.seconds == pytest.approx(2e-6 + 4000 / 5e9) and up.resources == (("host", 1),)
    same = plan_cost(_Plan(), m, {0: 0, 1: 0}, {})(1, copy)
    assert same.resources == (("copy", 0),)
    assert same.seconds == pytest.approx(5e-6 + 2 * 4000 / (100e9 * 0.5))
    assert cost(0, Op("record", event="e")) is None


def test_trace_follows_the_trace_event_format():
    programs = {0: [_launch("copy", "copy-in"), Op("record", stream="copy-in", event="e"), _launch("a"),
                    Op("wait", event="e"), _launch("b")], 1: [_launch("c")]}
    sim = simulate(programs, _cost({"copy": 3.0, "a": 1.0, "b": 1.0, "c": 0.5}))
    trace = json.loads(json.dumps(to_trace(sim)))
    events = trace["traceEvents"]
    complete = [e for e in events if e["ph"] == "X"]
    assert len(complete) == 4
    for e in complete:
        assert isinstance(e["name"], str) and e["cat"] in ("compute", "communication")
        assert isinstance(e["pid"], int) and isinstance(e["tid"], int)
        assert e["ts"] >= 0 and e["dur"] >= 0
    assert {(e["name"], e["ts"], e["dur"]) for e in complete} >= {("b", 3e6, 1e6), ("copy", 0.0, 3e6)}
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert names == {(0, 0): "compute", (0, 1): "copy-in", (1, 0): "compute"}
    assert {e["pid"] for e in events if e["ph"] == "M" and e["name"] == "process_name"} == {0, 1}
    for key in {(e["pid"], e["tid"]) for e in complete}:      # a stream runs one op at a time
        row = sorted((e["ts"], e["ts"] + e["dur"]) for e in complete if (e["pid"], e["tid"]) == key)
        assert all(a[1] <= b[0] for a, b in zip(row, row[1:]))


# ---------------------------------------------------------------- the commands

@pytest.fixture(scope="module")
def two_device_build(tmp_path_factory) -> Path:
    from cnnc.build import compile_file

    out = tmp_path_factory.mktemp("perf") / "build"
    compile_file(REPO / "tests" / "nets" / "alexnet-2gpu-data-small.cnn", out, use_nvcc=False)
    return out


def test_simulate_json_names_the_step_time_as_bench_does(two_device_build, tmp_path):
    trace = tmp_path / "trace.json"
    r = cli("simulate", two_device_build, "--machine", "v100", "--json", "--trace", trace)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["step_ms"] > 0 and out["images_per_s"] == pytest.approx(out["batch"] / out["step_ms"] * 1e3)
    assert [d["logical"] for d in out["per_device"]] == [0, 1]
    assert all(d["compute_ms"] > 0 and d["communication_ms"] > 0 for d in out["per_device"])
    path = out["critical_path"]
    assert path[-1]["start_ms"] + path[-1]["ms"] == pytest.approx(out["step_ms"])
    events = json.loads(trace.read_text())["traceEvents"]
    assert max(e["ts"] + e["dur"] for e in events if e["ph"] == "X") == pytest.approx(out["step_ms"] * 1e3)
    one = json.loads(cli("simulate", two_device_build, "--machine", "v100", "--json", "--devices", "1").stdout)
    assert one["devices"] == 1 and one["step_ms"] > out["step_ms"]         # two replicas share one GPU


def test_slower_link_slows_the_step(two_device_build):
    fast = json.loads(cli("simulate", two_device_build, "--machine", "v100", "--json").stdout)
    slow = json.loads(cli("simulate", two_device_build, "--machine", "v100", "--json",
                          "--link", "host-staging").stdout)
    assert slow["step_ms"] > fast["step_ms"]


def test_plan_roofline_per_layer_and_per_kernel(two_device_build):
    r = cli("plan", two_device_build, "--machine", "h100", "--roofline")
    assert r.exit_code == 0, r.output
    assert "ridge at 20.0 FLOP/B" in r.stdout and "conv1" in r.stdout
    s = json.loads(cli("plan", two_device_build, "--machine", "h100", "--roofline", "--json").stdout)
    launches = [row for d in s["devices"] for row in d["program"] if row["op"] == "launch"]
    assert launches and all({"flops", "dram_bytes", "intensity", "bound", "time_us"} <= set(row["roofline"])
                            for row in launches)
    assert {l["layer"] for l in s["roofline"]["layers"]} >= {"conv1", "fc1000", "(step)"}


def test_user_errors_are_one_line(two_device_build, tmp_path):
    assert_user_error(cli("plan", two_device_build, "--roofline"),
                      "error: --roofline needs --machine NAME (e.g. --machine h100)")
    assert_user_error(cli("simulate", two_device_build, "--machine", "k40"),
                      "error: unknown machine 'k40'; known: a100, cpu, h100, h200, k20, k20x, titanx, v100")
    assert_user_error(cli("simulate", two_device_build, "--machine", "v100", "--link", "pcie9"),
                      "error: unknown link 'pcie9'; known: ethernet-100g, host-staging, infiniband-ndr, "
                      "nvlink2, nvlink3, nvlink4, pcie2, pcie3, pcie4, pcie5")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    r = cli("simulate", two_device_build, "--machine", "v100", "--machine-file", bad)
    assert r.exit_code == 2 and r.stderr.startswith(f"error: {bad}: not JSON")
    entry = {"peer_link": "pcie3", "host_link": "pcie3", "sms": "many"}
    bad.write_text(json.dumps({"machines": {"v100": entry}}))      # replaces the shipped entry whole
    assert_user_error(cli("simulate", two_device_build, "--machine", "v100", "--machine-file", bad),
                      "error: machine 'v100' lacks dialect, peak_fp32_tflops, memory_bandwidth_gbs, "
                      "launch_overhead_us")
    entry.update(dialect="cuda", peak_fp32_tflops=1, memory_bandwidth_gbs=1, launch_overhead_us=1)
    bad.write_text(json.dumps({"machines": {"v100": entry}}))
    assert_user_error(cli("simulate", two_device_build, "--machine", "v100", "--machine-file", bad),
                      "error: machine 'v100': sms must be a non-negative number, not 'many'")
    entry.update(sms=0)
    bad.write_text(json.dumps({"machines": {"v100": entry}}))
    assert_user_error(cli("simulate", two_device_build, "--machine", "v100", "--machine-file", bad),
                      "error: machine 'v100': sms must be above 0")


FAKE = {"peak_gflops": 100.0, "bandwidth_gbs": 20.0, "launch_overhead_us": 10.0, "cache_mib": 1.0,
        "calibrated": "fake"}


def test_cpu_machine_reads_the_cached_calibration(two_device_build, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(calibrate, "measure", lambda device=None: pytest.fail("calibrated despite a cache"))
    description, units = calibrate._describe(calibrate._device())
    calibrate.save(dict(FAKE, device=description, compute_units=units))
    r = cli("plan", two_device_build, "--machine", "cpu", "--roofline", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["roofline"]["ridge_intensity"] == pytest.approx(100e9 / 20e9)


def test_cpu_machine_calibrates_first_without_a_cache(two_device_build, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    description, units = calibrate._describe(calibrate._device())
    monkeypatch.setattr(calibrate, "measure", lambda device=None: dict(FAKE, device=description, compute_units=units))
    r = cli("simulate", two_device_build, "--machine", "cpu", "--json")
    assert r.exit_code == 0, r.output
    assert "calibrating this machine's OpenCL device first" in r.stderr
    cached = list((tmp_path / "cnnc").glob("calibration-*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["peak_gflops"] == 100.0
    again = cli("simulate", two_device_build, "--machine", "cpu", "--json")
    assert "calibrating" not in again.stderr and json.loads(again.stdout)["step_ms"] == json.loads(r.stdout)["step_ms"]


def test_calibrate_saves_what_it_measured(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    description, units = calibrate._describe(calibrate._device())
    monkeypatch.setattr(calibrate, "measure", lambda device=None: dict(FAKE, device=description, compute_units=units))
    r = cli("calibrate")
    assert r.exit_code == 0, r.output
    path = calibrate.cache_path(description, units)
    assert r.stdout.strip() == (f"{description}, {units} compute units: 100.0 GFLOP/s FP32, 20.0 GB/s, "
                                f"10.0 us per launch; saved to {path}")
    assert path.parent == tmp_path / "cnnc" and calibrate.cached()["bandwidth_gbs"] == 20.0


def test_registers_from_the_manifest_limit_blocks_per_sm():
    k = _fc_kernel()                                          # 256 threads: 8 warps per block
    m = _machine(max_blocks_per_sm=32, arch="sm_35", kernel_arch="sm_75")
    assert kernel_roofline(k, m)["blocks_per_sm"] == 8       # threads alone: 2048 / 256
    # 128 registers x 32 threads per warp: 16 of the SM's 65536 / 4096 warps fit, 2 blocks
    r = kernel_roofline(k, m, {"sm_80": {"registers": 40}, "sm_75": {"registers": 128, "shared_bytes": 0}})
    assert (r["resources_from"], r["blocks_per_sm"], r["occupancy"]) == ("sm_75", 2, 0.25)
    # 8 blocks on 4 SMs x 2 slots: one full wave
    assert r["utilisation"] == 1.0
