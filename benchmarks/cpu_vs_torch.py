"""The OpenCL CPU kernels against PyTorch on the same CPU, as ratios from one run.

    python benchmarks/cpu_vs_torch.py [--batch 128] [--steps 3] [--target cpu|gpu] [--local] [--json]

Compiles the CIFAR-10 example with its `local` layers written as `conv` (so that PyTorch
runs the same network; --local keeps them, and PyTorch runs its unfold twin of them), times
it with `cnnc bench --against torch` on the opencl backend with the kernels of --target
(CNNC_OPENCL_TARGET), and prints per layer the forward and backward GFLOP/s of cnnc and of
PyTorch with their ratio, and the images/s ratio.  Other
processes on the machine skew absolute numbers; the ratios come from one run, cnnc and
PyTorch timed one after the other.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def conv_twin(source: str) -> str:
    """The network with every `local(` layer written as `conv(`, same arguments."""
    twin, count = re.subn(r"=\s*local\(", "= conv(", source)
    if not count:
        raise SystemExit("the example has no local layers to rewrite; has it changed?")
    return twin


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--target", choices=["cpu", "gpu"], default="cpu",
                    help="which OpenCL kernels run: the CPU-shaped ones or the GPU-shaped ones")
    ap.add_argument("--local", action="store_true",
                    help="keep the example's local layers (PyTorch: unfold and a batched matmul) instead of conv")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    os.environ["CNNC_OPENCL_TARGET"] = args.target

    from cnnc.bench import bench
    from cnnc.build import compile_network

    with tempfile.TemporaryDirectory(prefix="cnnc-cpu-vs-torch-") as tmp:
        src = (ROOT / "examples" / "cifar10.cnn").read_text()
        if not args.local:
            src = conv_twin(src)
        compile_network(src, "cifar10.cnn" if args.local else "cifar10-conv.cnn", Path(tmp) / "build",
                        use_nvcc=False, batch=args.batch)
        r = bench(Path(tmp) / "build", "opencl", [0], None, args.steps, against="torch")
    rows = []
    for t in r.layers:
        theirs = r.torch["layers"].get(t.layer)
        if not theirs or not t.forward_flops:
            continue
        row = {"layer": t.layer, "fwd_gflops": t.gflops("forward"), "bwd_gflops": t.gflops("backward"),
               "torch_fwd_gflops": t.forward_flops / (theirs["forward_ms"] * 1e6) if theirs["forward_ms"] else 0.0,
               "torch_bwd_gflops": t.backward_flops / (theirs["backward_ms"] * 1e6) if theirs["backward_ms"] else 0.0}
        row["fwd_ratio"] = row["fwd_gflops"] / row["torch_fwd_gflops"] if row["torch_fwd_gflops"] else 0.0
        row["bwd_ratio"] = row["bwd_gflops"] / row["torch_bwd_gflops"] if row["torch_bwd_gflops"] else 0.0
        rows.append(row)
    images = {"cnnc": r.images_per_s, "torch": r.batch / r.torch["step_ms"] * 1e3}
    if args.json:
        print(json.dumps({"backend": r.backend, "target": args.target, "local": args.local, "batch": r.batch,
                          "layers": rows, "images_per_s": images, "ratio": images["cnnc"] / images["torch"]}, indent=1))
        return
    print(f"{r.backend}, {args.target} kernels, local3/local4 as {'local' if args.local else 'conv'}, "
          f"batch {r.batch}; PyTorch {r.torch['version']} (GFLOP/s; ratio = cnnc / PyTorch, one run)")
    print("| layer | fwd | torch fwd | fwd ratio | bwd | torch bwd | bwd ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['layer']} | {row['fwd_gflops']:.1f} | {row['torch_fwd_gflops']:.1f} | {row['fwd_ratio']:.2f}x "
              f"| {row['bwd_gflops']:.1f} | {row['torch_bwd_gflops']:.1f} | {row['bwd_ratio']:.2f}x |")
    print(f"| images/s | {images['cnnc']:,.0f} | {images['torch']:,.0f} | {images['cnnc'] / images['torch']:.2f}x | | | |")


if __name__ == "__main__":
    main()
