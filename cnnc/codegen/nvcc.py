"""Driver for nvcc: turns generated CUDA source into per-architecture cubins.

Kernels are compiled ahead of time, so the build has to tell the user exactly
what went wrong (with a command they can rerun by hand) and has to record what
each kernel costs in registers, spills and shared memory, because those
numbers decide occupancy and are what a reviewer looks at first when a
generated kernel is slow.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

__all__ = [
    "KernelResources",
    "NvccError",
    "NvccResult",
    "MIN_SM",
    "compile_cubins",
    "find_nvcc",
    "parse_ptxas_report",
    "ptx_arch",
    "validate_arch",
]

# nvcc 13 dropped everything older than Turing.
MIN_SM = 75

# Flags every build gets. Fast math is deliberately absent: generated kernels
# must agree with the NumPy reference, and --use_fast_math changes division,
# sqrt, exp and denormal handling.
_BASE_FLAGS: tuple[str, ...] = ("-cubin", "-O3", "-std=c++17", "-Xptxas", "-v")
_PTX_FLAGS: tuple[str, ...] = ("-ptx", "-O3", "-std=c++17")
_FAST_MATH_FLAGS = frozenset({"--use_fast_math", "-use_fast_math"})
_ARCH_RE = re.compile(r"sm_(\d+)([af]?)")


def find_nvcc() -> str | None:
    """Locate nvcc on PATH, then under $CUDA_HOME or $CUDA_PATH."""
    found = shutil.which("nvcc")
    if found:
        return found
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if not root:
            continue
        candidate = Path(root) / "bin" / "nvcc"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def validate_arch(arch: str) -> str:
    """Reject targets nvcc 13 cannot build before spending time on a compile."""
    m = _ARCH_RE.fullmatch(arch) if isinstance(arch, str) else None
    if m is None:
        raise ValueError(
            f"invalid CUDA architecture {arch!r}: expected 'sm_' followed by "
            f"digits, e.g. 'sm_80'"
        )
    if int(m.group(1)) < MIN_SM:
        raise ValueError(
            f"unsupported CUDA architecture {arch!r}: nvcc 13 targets "
            f"sm_{MIN_SM} and newer"
        )
    return arch


def ptx_arch(archs: Sequence[str]) -> str:
    """The virtual architecture of the PTX a build ships: that of its lowest --arch, without
    an a/f suffix, so that the driver can compile it for any later GPU (sm_86, sm_120, ...)
    for which no cubin fits."""
    return "compute_" + str(min(int(_ARCH_RE.fullmatch(validate_arch(a)).group(1)) for a in archs))


@dataclass(frozen=True)
class KernelResources:
    """What ptxas reports for one kernel on one architecture.

    Spill and stack sizes are in bytes. ``const_bytes`` is the kernel's own
    constant-bank usage (parameters) and is None when ptxas does not report it,
    as nvcc 13 does not for sm_90 and newer.
    """

    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    stack_bytes: int
    const_bytes: int | None = None
    barriers: int | None = None

    @property
    def spills(self) -> bool:
        """True when ptxas had to move registers to local memory."""
        return self.spill_stores > 0 or self.spill_loads > 0

    def to_json(self) -> dict[str, int | None]:
        """Plain dict for build manifests and reports."""
        return asdict(self)


@dataclass
class NvccResult:
    """Outcome of compiling one source file for several architectures."""

    outputs: dict[str, Path]
    resources: dict[str, dict[str, KernelResources]]
    # The command of the first architecture; the others differ only in
    # -arch and -o, and are all kept in ``commands``.
    command: list[str]
    commands: dict[str, list[str]] = field(default_factory=dict)
    # nvcc/ptxas stderr per architecture (the -v report plus any warnings).
    logs: dict[str, str] = field(default_factory=dict)
    # <stem>.ptx for the lowest architecture, when asked for (its command is in ``commands``)
    ptx: Path | None = None


class NvccError(Exception):
    """A failed nvcc run, summarised on one line with a command to rerun it."""

    def __init__(self, source: Path | str, arch: str, log: str, repro: str,
                 reason: str | None = None) -> None:
        self.source = str(source)
        self.arch = arch
        self.log = log
        self.repro = repro
        self.reason = reason if reason is not None else _first_error_line(log)
        super().__init__(self.source, arch, self.reason)

    def __reduce__(self):
        # Keep the error picklable (e.g. across a process pool).
        return (type(self), (self.source, self.arch, self.log, self.repro,
                             self.reason))

    def __str__(self) -> str:
        lines = [f"nvcc failed for {self.source} ({self.arch}): {self.reason}"]
        if self.repro:
            lines.append(f"reproduce with: {self.repro}")
        log = self.log.strip()
        if log:
            lines.append(log)
        return "\n".join(lines)


def _first_error_line(log: str) -> str:
    """Pick the line a user needs first: the first error, else the first line."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for ln in lines:
        low = ln.lower()
        if re.search(r"\berror\b", low) or "fatal" in low:
            return ln
    return lines[0] if lines else "no diagnostic output"


# --- ptxas -v report -------------------------------------------------------

_ENTRY_RE = re.compile(r"Compiling entry function '([^']+)'")
_PROPS_RE = re.compile(r"Function properties for (\S+)")
_USED_RE = re.compile(r"\bUsed (\d+) registers\b")
_BARRIERS_RE = re.compile(r"\bused (\d+) barriers\b")
_SMEM_RE = re.compile(r"\b(\d+) bytes smem\b")
_CMEM_RE = re.compile(r"\b(\d+) bytes cmem\[\d+\]")
_CUMULATIVE_STACK_RE = re.compile(r"\b(\d+) bytes cumulative stack size\b")
_FRAME_RE = re.compile(r"\b(\d+) bytes stack frame\b")
_SPILL_STORES_RE = re.compile(r"\b(\d+) bytes spill stores\b")
_SPILL_LOADS_RE = re.compile(r"\b(\d+) bytes spill loads\b")


def _int(rx: re.Pattern[str], text: str) -> int | None:
    m = rx.search(text)
    return int(m.group(1)) if m else None


def parse_ptxas_report(log: str) -> dict[str, KernelResources]:
    """Read the per-kernel resources out of ``ptxas -v`` output.

    Only entry functions are returned; device functions get a "Function
    properties" block too but never a "Compiling entry function" line. The
    report's line order and the fields on the "Used" line differ between CUDA
    releases, so each field is matched on its own and missing ones are zero.
    """
    entries: list[str] = []
    used: dict[str, str] = {}
    props: dict[str, str] = {}
    current_entry: str | None = None
    props_for: str | None = None
    for raw in log.splitlines():
        line = raw.strip()
        if m := _ENTRY_RE.search(line):
            current_entry = m.group(1)
            if current_entry not in entries:
                entries.append(current_entry)
            props_for = None
        elif m := _PROPS_RE.search(line):
            props_for = m.group(1)
        elif props_for is not None and _FRAME_RE.search(line):
            props[props_for] = line
            props_for = None
        elif _USED_RE.search(line) and current_entry is not None:
            used[current_entry] = line
            props_for = None

    result: dict[str, KernelResources] = {}
    for name in entries:
        u = used.get(name, "")
        p = props.get(name, "")
        cmem = [int(v) for v in _CMEM_RE.findall(u)]
        stack = _int(_CUMULATIVE_STACK_RE, u)
        if stack is None:
            stack = _int(_FRAME_RE, p) or 0
        result[name] = KernelResources(
            registers=_int(_USED_RE, u) or 0,
            spill_stores=_int(_SPILL_STORES_RE, p) or 0,
            spill_loads=_int(_SPILL_LOADS_RE, p) or 0,
            shared_bytes=_int(_SMEM_RE, u) or 0,
            stack_bytes=stack,
            const_bytes=sum(cmem) if cmem else None,
            barriers=_int(_BARRIERS_RE, u),
        )
    return result


# --- compilation -----------------------------------------------------------


@dataclass
class _ArchRun:
    arch: str
    output: Path
    command: list[str]
    log: str
    error: NvccError | None


def _compile_one(nvcc: str, source: Path, shown: str, out_dir: Path, stem: str,
                 arch: str, extra_flags: Sequence[str],
                 timeout_s: float | None) -> _ArchRun:
    """Compile one arch (a compute_XY one: to PTX) into a temp file and rename it, so a reader
    never sees a half-written output and a failed build leaves the old one intact."""
    ptx = arch.startswith("compute_")
    final = out_dir / (f"{stem}.ptx" if ptx else f"{stem}.{arch}.cubin")
    # The recorded command names the real output, so it can be rerun as is.
    command = [nvcc, *(_PTX_FLAGS if ptx else _BASE_FLAGS), f"-arch={arch}", *extra_flags,
               "-o", str(final), str(source)]
    repro = shlex.join(command)
    # A unique name that nvcc itself creates, so the cubin gets the usual
    # umask permissions rather than mkstemp's owner-only ones.
    tmp = out_dir / f".{stem}.{arch}.{os.getpid()}.{uuid.uuid4().hex}{final.suffix}.tmp"
    run_cmd = command[:-3] + ["-o", str(tmp), str(source)]
    try:
        try:
            proc = subprocess.run(run_cmd, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True,
                                  errors="replace", timeout=timeout_s,
                                  check=False)
        except subprocess.TimeoutExpired as exc:
            log = _text(exc.stderr) + _text(exc.stdout)
            return _ArchRun(arch, final, command, log, NvccError(
                shown, arch, log, repro,
                reason=f"timed out after {timeout_s:g} s"))
        except OSError as exc:
            return _ArchRun(arch, final, command, "", NvccError(
                shown, arch, "", repro, reason=f"cannot run nvcc: {exc}"))
        # ptxas writes its report to stderr; keep stdout too in case a
        # future release moves it.
        log = proc.stderr + (("\n" + proc.stdout) if proc.stdout.strip() else "")
        if proc.returncode != 0:
            reason = None if log.strip() else f"exit status {proc.returncode}"
            return _ArchRun(arch, final, command, log,
                            NvccError(shown, arch, log, repro, reason=reason))
        if not tmp.is_file() or tmp.stat().st_size == 0:
            return _ArchRun(arch, final, command, log, NvccError(
                shown, arch, log, repro, reason=f"nvcc produced an empty {final.suffix[1:]}"))
        os.replace(tmp, final)
        return _ArchRun(arch, final, command, log, None)
    finally:
        tmp.unlink(missing_ok=True)


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    if isinstance(data, bytes):
        return data.decode("utf-8", errors="replace")
    return data


def compile_cubins(source: Path, out_dir: Path,
                   archs: Sequence[str] = ("sm_80", "sm_90"),
                   stem: str | None = None,
                   extra_flags: Sequence[str] = (),
                   *, nvcc: str | None = None,
                   timeout_s: float | None = 600.0, ptx: bool = False) -> NvccResult:
    """Build ``out_dir/<stem>.<arch>.cubin`` for every arch and collect the
    ptxas resource report per kernel; with `ptx`, also ``out_dir/<stem>.ptx``
    for the lowest arch (see `ptx_arch`).

    Archs are compiled concurrently; if several fail, the error reported is
    that of the first failing arch in ``archs`` order so the message is
    deterministic.
    """
    shown = str(source)  # as the caller named it, for messages
    source = Path(source).resolve()
    out_dir = Path(out_dir).resolve()
    if isinstance(archs, str):
        archs = (archs,)
    archs = list(dict.fromkeys(validate_arch(a) for a in archs))
    if not archs:
        raise ValueError("no CUDA architectures given")
    flags = [str(f) for f in extra_flags]
    fast = _FAST_MATH_FLAGS.intersection(flags)
    if fast:
        raise ValueError(
            f"{sorted(fast)[0]} is not allowed: generated kernels must match "
            f"the reference numerics"
        )
    stem = source.stem if stem is None else stem
    if not stem or "/" in stem or os.sep in stem or stem in (".", ".."):
        raise ValueError(f"invalid output stem {stem!r}: must be a plain file name")
    exe = nvcc or find_nvcc()
    if exe is None:
        raise NvccError(shown, archs[0], "", "",
                        reason="nvcc not found on PATH, in $CUDA_HOME/bin or "
                               "in $CUDA_PATH/bin")
    if not source.is_file():
        raise NvccError(shown, archs[0], "", "",
                        reason="source file does not exist")
    out_dir.mkdir(parents=True, exist_ok=True)

    jobs = archs + ([ptx_arch(archs)] if ptx else [])
    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        runs = list(pool.map(
            lambda a: _compile_one(exe, source, shown, out_dir, stem, a, flags,
                                   timeout_s),
            jobs))

    for run in runs:
        if run.error is not None:
            raise run.error
    ptx_run = runs.pop() if ptx else None

    resources: dict[str, dict[str, KernelResources]] = {}
    for run in runs:
        for name, res in parse_ptxas_report(run.log).items():
            resources.setdefault(name, {})[run.arch] = res
    every = runs + ([ptx_run] if ptx_run else [])
    return NvccResult(
        outputs={r.arch: r.output for r in runs},
        resources=resources,
        command=runs[0].command,
        commands={r.arch: r.command for r in every},
        logs={r.arch: r.log for r in every},
        ptx=ptx_run.output if ptx_run else None,
    )
