"""The performance model against this machine: predicted per-layer and whole-step times of the
calibrated `cpu` machine beside `cnnc bench`'s measurements on the OpenCL backend.

    python benchmarks/validate_model.py [--steps 3] [--json] [--only NAME]

For each network (digits, CIFAR-10 at batch 16, the small parallel test networks), compiles it,
benches it (per-layer forward + backward, each op timed on its own; the free-running step) and
simulates it with `--machine cpu` (calibrating first when no calibration is cached), then prints
per layer predicted against measured, the median absolute relative error over the layers and the
whole step's error.  The two-device networks run a second time on two OpenCL sub-devices
(CNNC_OPENCL_SUBDEVICES=2), predicted as two devices of half the calibrated machine each.
Targets: median per-layer error within 35%, whole step within 25%.  Timings are noisy: other
processes on the machine skew them, so this is a report, not a test.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NETWORKS = (                                 # (name, source, batch: None keeps the network's own)
    ("digits", "examples/digits.cnn", None),
    ("cifar10", "examples/cifar10.cnn", 16),
    ("alexnet-2gpu-data-small", "tests/nets/alexnet-2gpu-data-small.cnn", None),
    ("alexnet-2gpu-model-small", "tests/nets/alexnet-2gpu-model-small.cnn", None),
    ("alexnet-4gpu-hybrid-small", "tests/nets/alexnet-4gpu-hybrid-small.cnn", None),
    ("pipeline-4stage-small", "tests/nets/pipeline-4stage-small.cnn", None),
)
PER_LAYER_TARGET, STEP_TARGET = 0.35, 0.25


def half_machine(machine, parts: int):
    """One of `parts` equal sub-devices of a calibrated CPU: its share of the compute units and of
    the peak FLOP/s (memory bandwidth stays shared, so each keeps all of it when alone)."""
    return dataclasses.replace(machine, name=f"{machine.name}/{parts}", sms=max(machine.sms // parts, 1),
                               peak_fp32_tflops=machine.peak_fp32_tflops / parts)


def validate(name: str, source: Path, batch: int | None, subdevices: int, steps: int, machine) -> dict:
    from cnnc.bench import bench
    from cnnc.build import compile_network, open_build
    from cnnc.perf.roofline import plan_rooflines
    from cnnc.perf.simulate import simulate_plan
    from cnnc.perf.validate import compare_layers, median_abs_error, predicted_layer_ms, relative_error

    with tempfile.TemporaryDirectory(prefix="cnnc-validate-") as tmp:
        compile_network(source.read_text(), str(source), Path(tmp), use_nvcc=False, batch=batch)
        plan, manifest = open_build(tmp)
        logical = sorted(plan.programs["train"])
        physical = subdevices or 1
        gpus = [d % physical for d in range(max(logical) + 1)]
        measured = bench(Path(tmp), "opencl", gpus, steps=steps, warmup=2)
        model = half_machine(machine, physical) if physical > 1 else machine
        rooflines = plan_rooflines(plan, model, manifest)
        sim = simulate_plan(plan, model, rooflines, physical)
    rows = compare_layers(predicted_layer_ms(plan, rooflines),
                          {t.layer: t.forward_ms + t.backward_ms for t in measured.layers})
    return {"network": name, "batch": plan.batch, "devices": physical, "logical_devices": len(logical),
            "layers": rows, "median_layer_error": median_abs_error(rows),
            "predicted_step_ms": sim.step_s * 1e3, "measured_step_ms": measured.step_ms,
            "step_error": relative_error(sim.step_s * 1e3, measured.step_ms)}


def format_result(r: dict) -> str:
    out = [f"{r['network']}, batch {r['batch']}, {r['logical_devices']} logical on {r['devices']} OpenCL "
           f"device(s): step predicted {r['predicted_step_ms']:.2f} ms, measured {r['measured_step_ms']:.2f} ms "
           f"({r['step_error']:+.0%}); median |layer error| {r['median_layer_error']:.0%}",
           f"  {'layer':<16} {'predicted ms':>12} {'measured ms':>12} {'error':>7}"]
    for row in r["layers"]:
        out.append(f"  {row['layer']:<16} {row['predicted_ms']:12.3f} {row['measured_ms']:12.3f} {row['error']:+7.0%}")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per network (after 2 warm-up steps)")
    ap.add_argument("--only", action="append", metavar="NAME", help="only these networks (repeatable)")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON object")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from cnnc.perf.calibrate import machine

    cpu = machine("cpu", on_calibrate=lambda: print("calibrating the cpu machine ...", file=sys.stderr))
    runs = []

    def record(result: dict) -> None:
        runs.append(result)
        if not args.json:
            print(format_result(result), flush=True)

    for name, source, batch in NETWORKS:
        if args.only and name not in args.only:
            continue
        record(validate(name, ROOT / source, batch, 0, args.steps, cpu))
        if runs[-1]["logical_devices"] > 1:
            os.environ["CNNC_OPENCL_SUBDEVICES"] = "2"
            try:
                record(validate(name, ROOT / source, batch, 2, args.steps, cpu))
            finally:
                del os.environ["CNNC_OPENCL_SUBDEVICES"]
    layer_errors = [abs(row["error"]) for r in runs for row in r["layers"]]
    summary = {"median_layer_error": statistics.median(layer_errors) if layer_errors else None,
               "median_step_error": statistics.median(abs(r["step_error"]) for r in runs) if runs else None,
               "targets": {"median_layer_error": PER_LAYER_TARGET, "step_error": STEP_TARGET}}
    if args.json:
        print(json.dumps({"calibration": cpu.description, "runs": runs, "summary": summary}, indent=1))
    else:
        print(f"over all networks: median |layer error| {summary['median_layer_error']:.0%} "
              f"(target {PER_LAYER_TARGET:.0%}), median |step error| {summary['median_step_error']:.0%} "
              f"(target {STEP_TARGET:.0%})")


if __name__ == "__main__":
    main()
