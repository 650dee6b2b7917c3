"""The compiler driver: parse → check → plan → generate → nvcc, as named stages.

Writes a build directory:

    gpu<k>.cu, gpu<k>.cl      one translation unit per logical device and dialect
    gpu<k>.sm_XX.cubin        when nvcc is available, per requested architecture
    gpu<k>.ptx                with them, PTX of the lowest architecture: the CUDA driver compiles it
                              for GPUs no cubin fits (sm_86 runs the sm_80 cubin, sm_120 this)
    source.cnn                the source it was compiled from (cnnc bench recompiles it)
    plan.json                 the schedule the runtime executes
    manifest.json             shapes, parameters, sizes, kernel resources, hashes

Every file is written to a temporary name and renamed into place, manifest
last, so an interrupted build never looks complete.  A rebuild whose inputs
(source, options, compiler version, templates) hash the same as the existing
manifest's, and whose files still match the manifest's sha256, regenerates
nothing.  A directory is compiled into only when it is empty or already a
build (see cnnc/build_dir.py), and only while this process holds its lock.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from cnnc import __version__
from cnnc.build_dir import (ARTEFACT_RE, MANIFEST_FORMAT, MARKER, BuildError, build_lock, claim, clean_scratch,
                            read_manifest, scratch_prefix, sha256_file, verify_files)
from cnnc.check import check
from cnnc.codegen.dialect import DIALECTS, OPENCL_CPU_NAME, Dialect, opencl_cpu
from cnnc.codegen.occupancy import occupancy
from cnnc.codegen.nvcc import NvccError, compile_cubins, find_nvcc, validate_arch
from cnnc.codegen.render import cpu_kernel, render_source
from cnnc.codegen.sass import SassUnavailable, sass_reports, tools_found
from cnnc.diagnostics import CompileError, Diagnostic
from cnnc.frontend.parser import parse, read_source
from cnnc.ir import Network
from cnnc.plan.planner import plan as make_plan
from cnnc.plan.schedule import PLAN_FORMAT, Plan
from cnnc.plan.validate import PlanError, validate
from cnnc.resources import resource_dir

DEFAULT_ARCHS = ("sm_80", "sm_90")
DEFAULT_CPU_WIDTH = 16           # AVX-512; cnnc compile defaults to the local CPU device's width
_UMASK = os.umask(0)
os.umask(_UMASK)


@dataclass
class BuildResult:
    out_dir: Path
    network: Network | None
    plan: Plan
    files: list[Path] = field(default_factory=list)
    up_to_date: bool = False
    nvcc: str | None = None
    stages: dict[str, float] = field(default_factory=dict)


def write_atomic(path: Path, data: str | bytes, durable: bool = False) -> None:
    """Write a file so that readers see either the old or the new contents, never half.

    `durable` also survives a machine crash (what a checkpoint needs): the data is fsynced
    before the rename, and the folder after it, so the path holds the old file or the new
    one, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)          # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def _inputs_hash(source: str, archs: Sequence[str], use_nvcc: bool, cpu_width: int) -> str:
    h = hashlib.sha256()
    h.update(f"cnnc {__version__}\n{sorted(archs)}\n{use_nvcc}\n{cpu_width}\n".encode())
    h.update(source.encode())
    for folder in ("grammar", "templates", "runtime"):
        for f in sorted(resource_dir(folder).iterdir()):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    for f in sorted(Path(__file__).parent.rglob("*.py")):      # the compiler itself
        h.update(f.read_bytes())
    return h.hexdigest()


def _up_to_date(out_dir: Path, digest: str) -> bool:
    """Built from the same inputs, and every file still what that build wrote."""
    if not (out_dir / "manifest.json").is_file():
        return False
    try:
        m = read_manifest(out_dir)
        verify_files(out_dir, m)
    except (BuildError, OSError):
        return False
    return m.get("inputs_hash") == digest


def compile_network(source: str, file: str, out_dir: Path, archs: Sequence[str] = DEFAULT_ARCHS,
                    use_nvcc: bool = True, force: bool = False,
                    on_stage: Callable[[str], None] | None = None, batch: int | None = None,
                    cpu_width: int = DEFAULT_CPU_WIDTH) -> BuildResult:
    """Compile .cnn source text into `out_dir`; raises CompileError on bad input.  `cpu_width`
    is the vector width (floats) of the CPU-shaped OpenCL kernels in gpu<k>.cpu.cl."""
    for a in archs:
        try:
            validate_arch(a)
        except ValueError as e:
            raise CompileError(Diagnostic(str(e), "--arch")) from None
    nvcc = find_nvcc() if use_nvcc else None
    try:
        cpu = opencl_cpu(cpu_width)
    except ValueError as e:
        raise CompileError(Diagnostic(str(e), "--cpu-width")) from None
    sass = nvcc is not None and tools_found()      # installing cuobjdump later rebuilds
    digest = _inputs_hash(source + f"\n#batch={batch}\n#sass={sass}", archs, nvcc is not None, cpu_width)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CompileError(Diagnostic("the output path exists and is not a directory", str(out_dir)))
    with ExitStack() as held:
        locked = out_dir.is_dir()
        if locked:
            claim(out_dir)
            held.enter_context(build_lock(out_dir))
            if not force and _up_to_date(out_dir, digest):
                try:
                    plan = Plan.from_json(json.loads((out_dir / "plan.json").read_text()))
                    validate(plan)
                except (OSError, ValueError, KeyError, TypeError, AttributeError):
                    pass                            # a damaged plan.json: rebuild it
                else:
                    return BuildResult(out_dir, None, plan, up_to_date=True, nvcc=nvcc)
        return _build(source, file, out_dir, archs, nvcc, digest, on_stage, batch, held, locked, cpu)


def _build(source: str, file: str, out_dir: Path, archs: Sequence[str], nvcc: str | None, digest: str,
           on_stage: Callable[[str], None] | None, batch: int | None, held: ExitStack,
           locked: bool, cpu: Dialect) -> BuildResult:
    """Run every stage and move the result into `out_dir`; unless `locked` already, the
    directory is created and locked (in `held`) only once the source passed the front end."""
    stages: dict[str, float] = {}

    def stage(name: str, fn, *args):
        if on_stage:
            on_stage(name)
        t0 = time.perf_counter()
        value = fn(*args)
        stages[name] = time.perf_counter() - t0
        return value

    program = stage("parse", parse, source, file)
    network = stage("check", check, program)
    if batch is not None:                      # e.g. cnnc bench --batch: same network, other batch size
        network = dataclasses.replace(network, batch=batch)
    plan = stage("plan", make_plan, network)
    sources = stage("generate", _generate, plan, network, cpu)

    if not locked:
        if not out_dir.exists():
            held.callback(_remove_if_unbuilt, out_dir)      # runs once the lock is released
        out_dir.mkdir(parents=True, exist_ok=True)
        claim(out_dir)
        held.enter_context(build_lock(out_dir))
    clean_scratch(out_dir)

    # Everything is built in a scratch folder beside out_dir and only moved in once
    # it all succeeded, manifest last: a failed or interrupted build leaves out_dir as it was.
    scratch = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=scratch_prefix(out_dir)))
    keep_scratch = False
    try:
        produced: list[str] = []
        for name, text in {**sources, "source.cnn": network.source}.items():
            write_atomic(scratch / name, text)
            produced.append(name)
        resources: dict = {}
        sass: dict = {}                         # kernel -> arch -> instruction mix (cnnc.codegen.sass)
        if nvcc:
            for dev in plan.devices:
                cu = scratch / f"gpu{dev}.cu"
                try:
                    result = stage(f"nvcc gpu{dev}", lambda: compile_cubins(cu, scratch, list(archs), f"gpu{dev}",
                                                                            ptx=True))
                except NvccError as e:
                    keep_scratch = True
                    raise CompileError(Diagnostic(
                        str(e).splitlines()[0], str(out_dir / cu.name),
                        hint=f"the generated source is kept in {cu}; reproduce with: {e.repro}")) from None
                produced.extend(p.name for p in [*result.outputs.values(), result.ptx])
                for kname, per_arch in result.resources.items():
                    threads = plan.kernels[kname].launch["cuda"]["block"][0]
                    resources[kname] = {a: dict(r.to_json(), **occupancy(a, threads, r.registers, r.shared_bytes))
                                        for a, r in per_arch.items()}
                try:
                    sass.update(stage(f"sass gpu{dev}", sass_reports, result.outputs))
                except SassUnavailable:
                    pass                            # the manifest says "n/a"
        write_atomic(scratch / "plan.json", json.dumps(plan.to_json(), indent=1))
        produced.append("plan.json")
        hashes = {name: sha256_file(scratch / name) for name in produced}
        manifest = _manifest(network, plan, file, digest, archs, nvcc, resources, hashes, sass)
        write_atomic(scratch / "manifest.json", json.dumps(manifest, indent=1))
        (out_dir / "manifest.json").unlink(missing_ok=True)   # the old build stops looking complete
        for name in produced:
            os.replace(scratch / name, out_dir / name)
        _remove_stale(out_dir, produced)
        os.replace(scratch / "manifest.json", out_dir / "manifest.json")
    finally:
        if not keep_scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    written = [out_dir / n for n in produced + ["manifest.json"]]
    return BuildResult(out_dir, network, plan, written, False, nvcc, stages)


def _remove_if_unbuilt(out_dir: Path) -> None:
    """A compile that created `out_dir` and then failed (nvcc, a full disk) leaves no directory."""
    if not (out_dir / "manifest.json").exists():
        (out_dir / MARKER).unlink(missing_ok=True)
        try:
            out_dir.rmdir()
        except OSError:
            pass                            # not empty: someone else's files arrived meanwhile


def _remove_stale(out_dir: Path, written: list[str]) -> None:
    """Delete sources and cubins an earlier build left that this one did not write.

    The cuda backend picks a cubin by file name, so an old one for an
    architecture no longer requested (or from before --no-nvcc) would run
    kernels of a previous network.
    """
    keep = set(written)
    for f in out_dir.iterdir():
        if f.name not in keep and ARTEFACT_RE.fullmatch(f.name) and f.is_file():
            f.unlink(missing_ok=True)


def _generate(plan: Plan, network: Network, cpu: Dialect) -> dict[str, str]:
    """Render each device's kernels in every dialect and for the CPU target, and record launch
    geometry in the plan (for the CPU target: of the kernels that have a CPU shape)."""
    sources = {}
    for dev in plan.devices:
        names: dict[str, None] = {}            # first launch order, without repeats
        for program in plan.programs.values():
            for op in program.get(dev, []):
                if op.kind == "launch":
                    names.setdefault(op.kernel)
        kernels = [plan.kernels[n] for n in names]
        for dialect in (*DIALECTS.values(), cpu):
            title = f"{network.name}: kernels of logical device {dev} ({dialect.name})"
            text, launches = render_source(kernels, dialect, network.file, network.source, title)
            for name, geo in launches.items():
                if dialect.name != OPENCL_CPU_NAME or cpu_kernel(plan.kernels[name], cpu.vector_width):
                    plan.kernels[name].launch[dialect.name] = geo
            sources[f"gpu{dev}.{dialect.extension}"] = text
    return sources


def _manifest(network: Network, plan: Plan, file: str, digest: str, archs, nvcc, resources,
              hashes: dict[str, str], sass: dict | None = None) -> dict:
    return {
        "format": MANIFEST_FORMAT,
        "cnnc_version": __version__,
        "network": network.name,
        "source": file,
        "source_sha256": hashlib.sha256(network.source.encode()).hexdigest(),
        "inputs_hash": digest,
        "archs": list(archs) if nvcc else [],
        "nvcc": nvcc,
        "batch": plan.batch,
        "inputs": [{"name": i.name, "kind": i.kind, "shape": str(i.shape), "classes": i.classes}
                   for i in network.inputs],
        "layers": [{"name": l.name, "kind": l.kind, "inputs": list(l.inputs), "shape": str(l.shape),
                    "neuron": str(l.neuron), "gpus": list(l.gpus), "line": l.span.line if l.span else 0}
                   for l in network.layers],
        "parameters": [{"name": p.export_name, "shape": list(p.shape), "replicas": list(p.buffers)}
                       for p in plan.parameters],
        "buffers_bytes": sum(b.nbytes for b in plan.buffers.values()),
        "kernels": {name: {"op": k.op, "layer": k.layer, "line": k.line, "launch": k.launch,
                           "resources": resources.get(name, {}), "sass": (sass or {}).get(name, "n/a")}
                    for name, k in plan.kernels.items()},
        "files": list(hashes),
        "sha256": hashes,
    }


def compile_file(path: str | Path, out_dir: str | Path, **kw) -> BuildResult:
    return compile_network(read_source(path), str(path), Path(out_dir), **kw)


def load_plan(build_dir: str | Path) -> Plan:
    """Read a build directory's plan, with a located error when it is missing or damaged."""
    build_dir = Path(build_dir)
    if not build_dir.is_dir():
        raise CompileError(Diagnostic("no such build directory", str(build_dir),
                                      hint="create it with: cnnc compile NET.cnn -o " + str(build_dir)))
    f = build_dir / "plan.json"
    if not f.is_file():
        raise CompileError(Diagnostic("not a build directory: plan.json is missing", str(build_dir),
                                      hint="create it with: cnnc compile NET.cnn -o " + str(build_dir)))
    try:
        data = json.loads(f.read_text())
    except (ValueError, OSError) as e:
        raise CompileError(Diagnostic(f"plan.json is damaged ({e.__class__.__name__}); recompile", str(f))) \
            from None
    if isinstance(data, dict) and data.get("format") not in (None, PLAN_FORMAT):
        raise CompileError(Diagnostic(f"plan.json has format {data.get('format')}, this cnnc reads format "
                                      f"{PLAN_FORMAT}; recompile", str(f)))
    try:
        plan = Plan.from_json(data)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CompileError(Diagnostic(f"plan.json is damaged ({e.__class__.__name__}); recompile", str(f))) \
            from None
    try:
        validate(plan)
    except PlanError as e:
        raise CompileError(Diagnostic(f"plan.json is inconsistent: {e}; recompile", str(f))) from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:      # a value of a type no field takes
        raise CompileError(Diagnostic(f"plan.json is damaged ({e.__class__.__name__}); recompile", str(f))) \
            from None
    return plan


def open_build(build_dir: str | Path) -> tuple[Plan, dict]:
    """The plan and manifest of a build directory whose files all match the manifest's hashes
    (raises BuildError otherwise); what run, bench and plan use."""
    build_dir = Path(build_dir)
    if not (build_dir / "manifest.json").is_file():
        load_plan(build_dir)                    # a missing directory or plan says so first
        raise BuildError(f"{build_dir / 'manifest.json'} is missing; recompile with: cnnc compile NET.cnn -o "
                         f"{build_dir}")
    manifest = read_manifest(build_dir)
    verify_files(build_dir, manifest)
    return load_plan(build_dir), manifest
