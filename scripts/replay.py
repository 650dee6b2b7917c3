"""Process replay: did a change alter the generated code?

    python scripts/replay.py [--base REV] [--keep DIR] [FILE.cnn ...]

Compiles every example and test network (sources only, no nvcc) twice: with
the working tree and with the compiler as it was at REV (default: HEAD,
checked out into a temporary git worktree), then compares gpu<k>.cu,
gpu<k>.cl and plan.json file by file.  A refactor should print "identical";
an intended change prints a unified diff per file, to be read and explained.
Exit status 0 when identical, 1 when anything differs.
"""
from __future__ import annotations

import argparse
import difflib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMPARED = ("*.cu", "*.cl", "plan.json")

# Run in a fresh interpreter whose import path starts at the compiler's tree, so the
# base revision compiles with its own code and templates.
_COMPILE = """
import sys
from pathlib import Path
from cnnc.build import compile_file
out = Path(sys.argv[1])
for src in sys.argv[2:]:
    compile_file(src, out / Path(src).stem, use_nvcc=False, force=True)
"""


def networks() -> list[Path]:
    return sorted((ROOT / "examples").glob("*.cnn")) + sorted((ROOT / "tests" / "nets").glob("*.cnn"))


def compile_with(tree: Path, sources: list[Path], out: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(tree))
    subprocess.run([sys.executable, "-c", _COMPILE, str(out), *map(str, sources)], cwd=tree, check=True, env=env)


def differences(before: Path, after: Path, sources: list[Path]) -> list[str]:
    out = []
    for src in sources:
        a_dir, b_dir = before / src.stem, after / src.stem
        names = sorted({p.name for pattern in COMPARED for d in (a_dir, b_dir) for p in d.glob(pattern)})
        for name in names:
            a = (a_dir / name).read_text().splitlines(keepends=True) if (a_dir / name).exists() else []
            b = (b_dir / name).read_text().splitlines(keepends=True) if (b_dir / name).exists() else []
            if a != b:
                out.append("".join(difflib.unified_diff(a, b, f"base/{src.stem}/{name}", f"now/{src.stem}/{name}")))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="HEAD", help="the revision to compare with [default: HEAD]")
    ap.add_argument("--keep", type=Path, help="keep both builds in this folder (base/ and now/)")
    ap.add_argument("sources", nargs="*", type=Path, help="networks [default: examples/ and tests/nets/]")
    args = ap.parse_args()
    sources = [s.resolve() for s in args.sources] or networks()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        base_tree = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base_tree), args.base], cwd=ROOT, check=True)
        try:
            compile_with(base_tree, sources, work / "base")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=ROOT, check=True)
        compile_with(ROOT, sources, work / "now")
        diffs = differences(work / "base", work / "now", sources)
    for d in diffs:
        sys.stdout.write(d)
    print(f"{len(sources)} networks: " + (f"{len(diffs)} files differ from {args.base}" if diffs
                                          else f"identical to {args.base}"))
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
