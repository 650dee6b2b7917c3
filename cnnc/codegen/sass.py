"""What the compiled kernels really execute: an instruction mix of each kernel's SASS.

ptxas's report (registers, shared memory, spill bytes) says what a kernel holds, not what it
runs.  Whether a GEMM's inner loop is mostly FFMA or mostly address arithmetic and shared loads,
whether a kernel touches local memory (spills or a stack array indexed at run time), whether a
tensor-core kernel really issues MMA instructions: only the machine code says.  This module reads
`cuobjdump -sass` text, finds each kernel's main loop and counts what is in it.

Parsing is a pure function of the SASS text (`analyse_sass`); running cuobjdump is separate
(`disassemble`), and is optional: without it a build records "n/a".
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

__all__ = ["CATEGORIES", "Instruction", "Loop", "SassUnavailable", "analyse_function", "analyse_sass",
           "classify", "disassemble", "find_loops", "find_tool", "main_loop", "parse_sass", "sass_reports",
           "tools_found"]

# The mix's categories, in display order.
CATEGORIES = ("ffma", "mma", "lds", "sts", "ldg", "stg", "ldl", "stl", "ldgsts", "bar", "int", "branch", "other")

# By base opcode (the mnemonic before its first '.').  HFMA2.MMA is a register move on the
# tensor pipe, not a matrix multiply: its base is HFMA2, so it lands in "other".
_BY_BASE = {
    "FFMA": "ffma",
    "LDS": "lds", "LDSM": "lds",
    "STS": "sts",
    "LDG": "ldg",
    "STG": "stg",
    "LDL": "ldl",
    "STL": "stl",
    "LDGSTS": "ldgsts",
    "BAR": "bar",
    **dict.fromkeys(("BRA", "BRX", "JMP", "JMX", "CALL", "RET", "EXIT", "BSSY", "BSYNC", "BREAK", "BMOV",
                     "WARPSYNC", "YIELD", "KILL"), "branch"),
}
_INTEGER = frozenset(("IADD3", "IADD", "IADD32I", "IMAD", "IMUL", "LEA", "LOP3", "LOP", "SHF", "SHL", "SHR",
                      "ISETP", "IMNMX", "VIMNMX", "IABS", "SEL", "MOV", "PRMT", "ISCADD", "BFE", "BFI", "FLO",
                      "POPC", "BREV", "IDP", "IMUL32I", "MOV32I", "VIADD"))
# Matrix-multiply-accumulate opcodes: HMMA (fp16/bf16/tf32), IMMA, DMMA, BMMA, and the
# warpgroup forms of sm_90 (HGMMA, IGMMA, ...).
_MMA_RE = re.compile(r"[A-Z]*MMA")

_FUNCTION_RE = re.compile(r"^\s*Function\s*:\s*(\S+)")
_INSTRUCTION_RE = re.compile(r"/\*([0-9a-fA-F]+)\*/\s+(@!?U?P[0-9T]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_TARGET_RE = re.compile(r"(0x[0-9a-fA-F]+)\s*$")


@dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str                 # with its modifiers, e.g. LDS.U.128
    operands: str
    predicate: str | None = None

    @property
    def base(self) -> str:
        return self.opcode.split(".", 1)[0]

    @property
    def category(self) -> str:
        return classify(self.opcode)


@dataclass(frozen=True)
class Loop:
    """Instructions from `start` to the backward branch at `end` (addresses, both included)."""
    start: int
    end: int

    def __contains__(self, address: int) -> bool:
        return self.start <= address <= self.end

    def encloses(self, other: "Loop") -> bool:
        return self.start <= other.start and other.end <= self.end and self != other


def classify(opcode: str) -> str:
    """The mix category of one opcode (with or without modifiers)."""
    base = opcode.split(".", 1)[0]
    if base in _BY_BASE:
        return _BY_BASE[base]
    if _MMA_RE.fullmatch(base):
        return "mma"
    if base in _INTEGER or (base.startswith("U") and base[1:] in _INTEGER):     # uniform datapath: UIADD3, ULEA
        return "int"
    return "other"


def parse_sass(text: str) -> dict[str, list[Instruction]]:
    """Each function's instructions, in address order, from `cuobjdump -sass` text (several
    architectures' sections may follow one another: a later function of the same name wins).
    NOP padding is left out: it never runs."""
    functions: dict[str, list[Instruction]] = {}
    current: list[Instruction] | None = None
    for line in text.splitlines():
        if m := _FUNCTION_RE.match(line):
            current = functions[m.group(1)] = []
            continue
        if current is None:
            continue
        m = _INSTRUCTION_RE.search(line)
        if m is None or m.group(3) == "NOP":
            continue
        pred = m.group(2).strip() if m.group(2) else None
        current.append(Instruction(int(m.group(1), 16), m.group(3), m.group(4).strip(), pred))
    return functions


def find_loops(instructions: list[Instruction]) -> list[Loop]:
    """Every loop, as the span from a branch target to the last backward branch reaching it.

    A backward `BRA` (to an address before its own) closes a loop; several back edges to one
    target (a `continue`) make one loop.  A branch to itself is the trap after EXIT, not a loop.
    """
    last_edge: dict[int, int] = {}
    for ins in instructions:
        if ins.base != "BRA":
            continue
        m = _TARGET_RE.search(ins.operands)
        if m is None:
            continue
        target = int(m.group(1), 16)
        if target < ins.address:
            last_edge[target] = max(last_edge.get(target, 0), ins.address)
    return sorted((Loop(t, e) for t, e in last_edge.items()), key=lambda lp: (lp.start, -lp.end))


def _inside(instructions: list[Instruction], loop: Loop) -> list[Instruction]:
    return [i for i in instructions if i.address in loop]


def _math(instructions: list[Instruction]) -> int:
    return sum(i.category in ("ffma", "mma") for i in instructions)


def main_loop(instructions: list[Instruction]) -> Loop | None:
    """The loop where the kernel spends its arithmetic: the innermost loop holding at least
    half of the FFMA/MMA instructions that the most arithmetic-heavy loop holds.

    Outer loops contain their inner loops' instructions, so the largest loop by count would be
    the outermost one; the hot loop of a GEMM is the innermost one that still does the bulk of
    the math (an inner loop that only copies a tile into shared memory is not it).  A kernel
    without FFMA/MMA in any loop (pooling, elementwise) gets its largest loop.
    """
    loops = find_loops(instructions)
    if not loops:
        return None
    bodies = {lp: _inside(instructions, lp) for lp in loops}
    heaviest = max(_math(b) for b in bodies.values())
    if heaviest == 0:
        return max(loops, key=lambda lp: (len(bodies[lp]), -lp.start))
    hot = [lp for lp in loops if 2 * _math(bodies[lp]) >= heaviest]
    return min(hot, key=lambda lp: (len(bodies[lp]), -_math(bodies[lp]), lp.start))


def _mix(instructions: list[Instruction]) -> dict[str, int]:
    counts = dict.fromkeys(CATEGORIES, 0)
    for i in instructions:
        counts[i.category] += 1
    return counts


def analyse_function(instructions: list[Instruction]) -> dict:
    """One kernel's record: its size, its local-memory accesses (any LDL/STL is a spill or a
    stack array), its MMA instructions anywhere, and its main loop's size, mix, FMA and MMA shares and shared loads per
    FFMA/MMA instruction (None where the loop does no such math)."""
    whole = _mix(instructions)
    record = {"instructions": len(instructions), "ldl": whole["ldl"], "stl": whole["stl"], "mma": whole["mma"],
              "main_loop": None}
    loop = main_loop(instructions)
    if loop is not None:
        body = _inside(instructions, loop)
        mix = _mix(body)
        math = mix["ffma"] + mix["mma"]
        record["main_loop"] = {
            "start": loop.start, "end": loop.end, "instructions": len(body), "mix": mix,
            "fma_share": round(mix["ffma"] / len(body), 4), "mma_share": round(mix["mma"] / len(body), 4),
            "lds_per_fma": round(mix["lds"] / math, 4) if math else None,
        }
    return record


def analyse_sass(text: str) -> dict[str, dict]:
    """Function name -> `analyse_function` record, for every function in the SASS text."""
    return {name: analyse_function(ins) for name, ins in parse_sass(text).items()}


# --- running cuobjdump --------------------------------------------------------------------------

class SassUnavailable(Exception):
    """cuobjdump (or the nvdisasm it runs) is missing, or failed on a cubin."""


def find_tool(name: str) -> str | None:
    """A CUDA binary utility: on PATH, in $CUDA_HOME/bin or $CUDA_PATH/bin, or inside the
    nvidia-cuda-* wheel that ships it (nvidia/<package>/bin, e.g. nvidia/cu13/bin)."""
    found = shutil.which(name)
    if found:
        return found
    roots = [Path(os.environ[v]) / "bin" for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec else []:
        roots.extend(sorted(Path(location).glob("*/bin")))
    for root in roots:
        candidate = root / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def tools_found() -> bool:
    """Whether `disassemble` can run: cuobjdump and the nvdisasm it needs are both there."""
    return find_tool("cuobjdump") is not None and find_tool("nvdisasm") is not None


def disassemble(cubin: Path, timeout_s: float = 300.0) -> str:
    """`cuobjdump -sass` of one cubin.  cuobjdump runs nvdisasm, which need not be on PATH
    (both come as wheels), so it is told where that one is."""
    cuobjdump, nvdisasm = find_tool("cuobjdump"), find_tool("nvdisasm")
    if cuobjdump is None or nvdisasm is None:
        missing = " and ".join(n for n, p in (("cuobjdump", cuobjdump), ("nvdisasm", nvdisasm)) if p is None)
        raise SassUnavailable(f"{missing} not found (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
    env = dict(os.environ, NVDISASM_PATH=str(Path(nvdisasm).parent))
    env["PATH"] = str(Path(nvdisasm).parent) + os.pathsep + env.get("PATH", "")
    try:
        proc = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, errors="replace",
                              env=env, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SassUnavailable(f"cuobjdump failed on {cubin}: {e}") from None
    if proc.returncode != 0:
        raise SassUnavailable(f"cuobjdump failed on {cubin}: {(proc.stderr.strip() or 'no output').splitlines()[0]}")
    return proc.stdout


def sass_reports(cubins: Mapping[str, Path]) -> dict[str, dict[str, dict]]:
    """Kernel name -> arch -> `analyse_function` record, for cubins given by architecture
    (disassembled concurrently); raises SassUnavailable."""
    with ThreadPoolExecutor(max_workers=max(1, min(len(cubins), os.cpu_count() or 1))) as pool:
        texts = dict(zip(cubins, pool.map(disassemble, cubins.values())))
    reports: dict[str, dict[str, dict]] = {}
    for arch, text in texts.items():
        for name, record in analyse_sass(text).items():
            reports.setdefault(name, {})[arch] = record
    return reports
