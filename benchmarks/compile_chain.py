"""Benchmark compile time on a long chain: N fully connected layers, sources only (no nvcc).

    python benchmarks/compile_chain.py [--layers 10000] [--sizes 1000 2000 4000]

Prints the seconds each compile took (and each stage's share) and layers per
second; with --sizes, one line per size, which shows how compile time grows
(it should grow about linearly).  Compile-time targets are tracked here, not in
unit tests.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from cnnc.build import compile_network


def chain_source(layers: int) -> str:
    """A classifier whose body is a chain of `layers` fc layers of 16 units."""
    lines = ["network chain", "input data: 1x4x4", "input labels: label(10)", "train { batch = 8 }",
             "l0 = fc(data, outputs=16) relu"]
    lines += [f"l{i} = fc(l{i - 1}, outputs=16) relu" for i in range(1, layers)]
    lines += [f"out = fc(l{layers - 1}, outputs=10)", "probs = softmax(out)", "cost = logreg(labels, probs)"]
    return "\n".join(lines) + "\n"


def time_compile(layers: int) -> tuple[float, dict[str, float], int]:
    """Seconds for a whole compile (stages, writing the build directory), per-stage seconds, kernels."""
    source = chain_source(layers)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = compile_network(source, "chain.cnn", Path(tmp) / "build", use_nvcc=False, force=True)
        seconds = time.perf_counter() - start
    return seconds, result.stages, len(result.plan.kernels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=10_000, help="chain length [default: 10000]")
    ap.add_argument("--sizes", type=int, nargs="*", help="several chain lengths instead of --layers")
    args = ap.parse_args()
    for layers in args.sizes or [args.layers]:
        seconds, stages, kernels = time_compile(layers)
        shares = ", ".join(f"{name} {s:.1f} s" for name, s in stages.items())
        print(f"{layers} layers, {kernels} kernels: {seconds:.1f} s, {layers / seconds:.0f} layers/s ({shares})")


if __name__ == "__main__":
    main()
