"""Benchmark every example network: compile, then `cnnc bench` on one backend.

    python benchmarks/examples.py --backend opencl --batch 32 [--against torch] [-o results.json]

Prints one line per network (ms per step, images/s) and, with -o, writes every
per-layer number as JSON.  Speed targets are tracked here, not in unit tests.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

from cnnc.bench import bench
from cnnc.build import compile_file

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="opencl")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--against", choices=["torch"], default=None)
    ap.add_argument("--only", nargs="*", help="example names (default: all)")
    ap.add_argument("-o", "--output", type=Path)
    args = ap.parse_args()
    results = []
    for example in sorted((ROOT / "examples").glob("*.cnn")):
        if args.only and example.stem not in args.only:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            plan = compile_file(example, tmp, use_nvcc=False).plan
            gpus = [0] * (max(plan.devices) + 1)
            r = bench(Path(tmp), args.backend, gpus, args.batch, args.steps, against=args.against)
        results.append(dataclasses.asdict(r))
        extra = f", torch {r.torch['step_ms']:.1f} ms" if r.torch else ""
        print(f"{example.stem:<24} batch {r.batch:4d}: {r.step_ms:9.1f} ms/step {r.images_per_s:9.0f} img/s{extra}")
    if args.output:
        args.output.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
