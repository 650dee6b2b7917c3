"""The SASS instruction mix of compiled examples: what the GEMM main loops really execute.

    python benchmarks/sass_mix.py [examples/alexnet.cnn ...] [--arch sm_90] [--all-kernels] [--markdown]

Compiles each network with nvcc for sm_80 and sm_90 (needs nvcc, cuobjdump and nvdisasm) and
prints, per kernel of its conv and fc layers (every kernel with --all-kernels), the main loop's
size, FFMA and MMA shares, shared loads per FFMA/MMA instruction and the kernel's local-memory
accesses (LDL/STL), read from the manifest cnnc compile writes (cnnc/codegen/sass.py).  Without
arguments it covers every example and also reports compile seconds and any kernel that touches
local memory: the examples tests/test_sass.py leaves out for time are checked here.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from cnnc.build import compile_file
from cnnc.codegen.nvcc import find_nvcc
from cnnc.codegen.sass import tools_found
from cnnc.ops import OPS

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.cnn"))


def rows(manifest: dict, arch: str, all_kernels: bool) -> list[dict]:
    """One row per kernel (GEMM kernels only unless `all_kernels`), in manifest order."""
    out = []
    for name, k in manifest["kernels"].items():
        if not (all_kernels or OPS[k["op"]].gemm):
            continue
        rec = k["sass"][arch] if isinstance(k["sass"], dict) and arch in k["sass"] else None
        loop = rec and rec["main_loop"]
        out.append({"layer": k["layer"], "kernel": name, "op": k["op"],
                    "loop": loop["instructions"] if loop else None,
                    "ffma": loop["fma_share"] if loop else None, "mma": loop["mma_share"] if loop else None,
                    "lds_per_fma": loop["lds_per_fma"] if loop else None,
                    "local": rec["ldl"] + rec["stl"] if rec else None})
    return out


def _cell(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def table(rs: list[dict], markdown: bool) -> str:
    head = ("layer", "kernel", "op", "loop instr", "FFMA share", "MMA share", "LDS per FMA", "LDL/STL")
    body = [(r["layer"] or "(step)", r["kernel"], r["op"], _cell(r["loop"], "d"), _cell(r["ffma"], ".0%"),
             _cell(r["mma"], ".0%"), _cell(r["lds_per_fma"], ".2f"), _cell(r["local"], "d")) for r in rs]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body])
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in (head, *body))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sources", nargs="*", type=Path, help="networks to compile [default: every example]")
    ap.add_argument("--arch", default="sm_90", help="whose SASS to show (both sm_80 and sm_90 are built)")
    ap.add_argument("--all-kernels", action="store_true", help="every kernel, not only conv/fc GEMMs")
    ap.add_argument("--markdown", action="store_true", help="print tables as Markdown")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args()
    if find_nvcc() is None or not tools_found():
        print("needs nvcc, cuobjdump and nvdisasm (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)",
              file=sys.stderr)
        return 2
    local_memory = []
    report = {}
    for src in args.sources or EXAMPLES:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            result = compile_file(src, Path(tmp) / "build", archs=("sm_80", "sm_90"))
            seconds = time.perf_counter() - start
            manifest = json.loads((result.out_dir / "manifest.json").read_text())
        for name, k in manifest["kernels"].items():
            for arch, rec in (k["sass"] if isinstance(k["sass"], dict) else {}).items():
                if rec["ldl"] or rec["stl"]:
                    local_memory.append(f"{src.name}: {name} on {arch}: {rec['ldl']} LDL, {rec['stl']} STL")
        rs = rows(manifest, args.arch, args.all_kernels)
        report[src.name] = {"compile_s": round(seconds, 1), "kernels": rs}
        if not args.json:
            print(f"\n{src.name}: {len(manifest['kernels'])} kernels, compiled in {seconds:.1f} s "
                  f"({', '.join(f'{k} {v:.1f} s' for k, v in result.stages.items())}); {args.arch} SASS\n")
            print(table(rs, args.markdown))
    if args.json:
        print(json.dumps({"arch": args.arch, "networks": report, "local_memory": local_memory}, indent=1))
    else:
        print("\nkernels with local memory (LDL/STL): " + ("none" if not local_memory else ""))
        for line in local_memory:
            print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
