"""Sweep many stream orders over the example networks with the race checker (cnnc.race).

    python benchmarks/race_sweep.py [--seeds 50] [--only alexnet-2gpu-data ...] [--execute] [--no-fence]

For each example and seed, runs the train program and then the test program with every
(device, stream) advancing in that seed's random order, each access checked against the
plan's events.  By default nothing is computed (the plans of the large examples would take
minutes per step in numpy), so only the order is checked; --execute computes too (and fills
each buffer with NaN when its lifetime starts), which suits small networks
(--nets tests/nets/*-small.cnn).  --no-fence leaves out the fence between the two runs (the
backends' begin_run), to show what a plan would need for runs to overlap.  Prints one line per
network: seeds checked, races found (the first message of each distinct one), ops per second.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from cnnc.build import compile_file
from cnnc.executor import Executor
from cnnc.race import RaceChecker, RaceError

ROOT = Path(__file__).resolve().parent.parent


class Unfenced(RaceChecker):
    def begin_run(self) -> None:
        """No fence: a run's ops are ordered after the last run's only by their streams."""


def sweep(source: Path, seeds: range, execute: bool, fence: bool) -> tuple[int, dict[str, int], float]:
    """(ops checked, distinct race messages with how many seeds found each, seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        plan = compile_file(source, Path(tmp), use_nvcc=False).plan
    rng = np.random.default_rng(0)
    x = np.zeros((plan.batch, *plan.image_shape), np.float32)
    if execute:
        x[...] = rng.standard_normal(x.shape)
    y = rng.integers(0, max(plan.classes, 1), plan.batch).astype(np.int32)
    ops = sum(len(p) for program in plan.programs.values() for p in program.values())
    races: dict[str, int] = {}
    t0 = time.perf_counter()
    for seed in seeds:
        checker = (RaceChecker if fence else Unfenced)(plan, seed, execute=execute)
        ex = Executor(plan, checker, None if execute else {})       # {}: no parameters to draw
        ex.load_batch(x, y)
        try:
            ex.run("train")
            ex.run("test")
        except RaceError as e:
            races[str(e)] = races.get(str(e), 0) + 1
    return ops * len(seeds), races, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=50, help="seeds 0 .. N-1 per network")
    ap.add_argument("--nets", nargs="*", type=Path, help="networks to sweep (default: examples/*.cnn)")
    ap.add_argument("--only", nargs="*", help="example names (default: all)")
    ap.add_argument("--execute", action="store_true", help="compute too, not only check the order")
    ap.add_argument("--no-fence", action="store_true", help="no fence between the train and test runs")
    args = ap.parse_args()
    nets = args.nets or sorted((ROOT / "examples").glob("*.cnn"))
    found = 0
    for net in nets:
        if args.only and net.stem not in args.only:
            continue
        ops, races, seconds = sweep(net, range(args.seeds), args.execute, not args.no_fence)
        found += bool(races)
        print(f"{net.stem:<28} {args.seeds} seeds: {sum(races.values()):3d} with a race, "
              f"{ops / seconds:9.0f} ops/s checked")
        for message, seeds in sorted(races.items(), key=lambda r: -r[1]):
            print(f"    ({seeds} seeds) {message}")
    raise SystemExit(1 if found else 0)


if __name__ == "__main__":
    main()
