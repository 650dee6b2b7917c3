"""AlexNet on K20s, predicted: the scaling study of `cnnc scale` against the measurements of
Krizhevsky's "One weird trick for parallelizing convolutional neural networks" (arXiv 1404.5997),
and what `cnnc place` chooses at 4 and 8 devices.

    python benchmarks/scaling.py [--machine k20] [--counts 1,2,4,8] [--place 4,8] [--plot FILE] [--json]

Prints the speedup table (images/s over one device, the batch growing with the devices as the
paper's does) and checks the paper's shape: near-linear to 4 devices (>= 3.3x for the best
strategy), clearly sub-linear at 8 (between 5x and 7.5x), data parallelism slower than the
hybrid at 8.  The paper reports 3.74x at 4 and 6.16x at 8 (hybrid, 128 images per device).
Takes a minute or two on two cores (each placement is compiled without nvcc and simulated).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cnnc.frontend.parser import parse_file  # noqa: E402
from cnnc.perf.machine import load_machine  # noqa: E402
from cnnc.perf.place import search  # noqa: E402
from cnnc.perf.scale import format_table, plot, study  # noqa: E402

PAPER = {1: 1.0, 2: None, 4: 3.74, 8: 6.16}      # hybrid speedups the paper reports (2: not stated here)


def best(rows: list[dict], strategy: str, gpus: int) -> float:
    return max((r["speedup"] for r in rows if r["strategy"] == strategy and r["gpus"] == gpus
                and not r["skipped"]), default=0.0)


def shape_checks(rows: list[dict]) -> list[tuple[str, bool]]:
    counts = {r["gpus"] for r in rows}
    top = {n: max(best(rows, s, n) for s in ("data", "model", "hybrid", "pipeline")) for n in counts}
    checks = []
    if 4 in counts:
        checks.append((f"near-linear at 4: best {top[4]:.2f}x >= 3.3x", top[4] >= 3.3))
    if 8 in counts:
        checks.append((f"sub-linear at 8: best {top[8]:.2f}x within 5x..7.5x", 5 <= top[8] <= 7.5))
        checks.append((f"at 8, data {best(rows, 'data', 8):.2f}x < hybrid {best(rows, 'hybrid', 8):.2f}x",
                       best(rows, "data", 8) < best(rows, "hybrid", 8)))
    return checks


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--network", default=str(ROOT / "examples" / "alexnet.cnn"))
    ap.add_argument("--machine", default="k20")
    ap.add_argument("--counts", default="1,2,4,8")
    ap.add_argument("--place", default="4,8", help="device counts to run the placement search for ('' for none)")
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    machine = load_machine(args.machine)
    program = parse_file(args.network)
    counts = [int(c) for c in args.counts.split(",")]
    rows = study(program, machine, counts)
    placed = {}
    for n in [int(c) for c in args.place.split(",") if c]:
        r = search(program, machine, n)
        placed[n] = [{"placement": c.name, "step_ms": c.step_ms, "images_per_s": c.images_per_s}
                     for c in r.ranking[:5]]
    checks = shape_checks(rows)
    if args.plot:
        plot(rows, args.plot, f"{program.name} on {machine.name} (predicted)")
    if args.json:
        print(json.dumps({"rows": rows, "place": placed, "checks": dict(checks)}, indent=1))
    else:
        print(f"{program.name}: " + format_table(rows, machine))
        print("\nspeedup by strategy (best variant), against the paper's hybrid:")
        print(f"  {'gpus':>4} " + " ".join(f"{s:>9}" for s in ("data", "model", "hybrid", "pipeline")) + "    paper")
        for n in counts:
            paper = f"{PAPER[n]:.2f}x" if PAPER.get(n) else "-"
            print(f"  {n:>4} " + " ".join(f"{best(rows, s, n):>8.2f}x" for s in ("data", "model", "hybrid", "pipeline"))
                  + f"  {paper:>7}")
        for n, ranking in placed.items():
            print(f"\ncnnc place on {n} x {machine.name}:")
            for c in ranking:
                print(f"  {c['step_ms']:9.1f} ms {c['images_per_s']:8,.0f} images/s  {c['placement']}")
        print()
        for text, ok in checks:
            print(f"  {'ok  ' if ok else 'MISS'} {text}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
