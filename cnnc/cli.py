"""The `cnnc` command line: compile, check, plan, run.

User mistakes (a bad .cnn file, a missing build directory, unusable data)
print a one-line diagnostic (plus source context) and exit with status 2;
they never show a Python traceback.  Exit statuses:

    0    done
    1    an internal error: a bug in cnnc (the only case with a traceback)
    2    bad input, or a build refused (damaged, foreign, locked), or no usable device
    3    training diverged (a loss or a parameter became NaN or infinite)
    130  interrupted (Ctrl-C); 143 terminated (SIGTERM)
"""
from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
from pathlib import Path

import click

from cnnc import __version__
from cnnc.backends.base import BackendError
from cnnc.build_dir import BuildError, build_lock
from cnnc.diagnostics import CompileError
from cnnc.distributed import DEFAULT_TIMEOUT, STEP_TIMEOUTS, CommError, abort_on_failure, launched_rank
from cnnc.perf import PerfError
from cnnc.perf.trace import TRACE_STEPS, TRACE_WARMUP, StepRecorder, ranks_trace
from cnnc.train.data import DataError
from cnnc.train.health import TrainingDiverged
from cnnc.train.weights import WeightsError

USER_ERROR = 2
DIVERGED = 3
INTERRUPTED = 130                 # 128 + SIGINT, as shells report it
TERMINATED = 143                  # 128 + SIGTERM


class _Terminated(Exception):
    """SIGTERM, raised where the process is, so that locks are released and scratch files removed
    on the way out, as for Ctrl-C."""


def _on_sigterm(signum, frame) -> None:
    raise _Terminated()


def _fail(message: str) -> None:
    click.echo(message, err=True)
    sys.exit(USER_ERROR)


def _guard(fn):
    """Turn the project's own error types into a clean message and exit status 2
    (3 when training diverged)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CompileError as e:
            _fail(e.format())
        except TrainingDiverged as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(DIVERGED)
        except (DataError, BackendError, WeightsError, BuildError, PerfError, CommError) as e:
            _fail(f"error: {e}")
        except OSError as e:            # e.g. -o below a regular file, a full disk
            where = f"{e.filename}: " if e.filename else ""
            _fail(f"{where}error: {e.strerror or e}")
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(INTERRUPTED)
        except _Terminated:
            click.echo("terminated", err=True)
            sys.exit(TERMINATED)
    return wrapper


def _holding_build(fn):
    """Hold the command's BUILD_DIR for as long as it runs: a compile or another run of the
    same build fails at once instead of changing files under it."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        # the ranks of one MPI job share the build: rank 0 holds it for all of them
        with build_lock(kwargs["build_dir"]) if launched_rank() == 0 else contextlib.nullcontext():
            return fn(*args, **kwargs)
    return wrapper


def _archs(value: tuple[str, ...]) -> tuple[str, ...]:
    """Split comma-separated --arch values; one that names nothing (--arch '') is passed on
    as it is, so that it is rejected rather than leaving no architecture to build."""
    out = []
    for v in value:
        out.extend([a.strip() for a in v.split(",") if a.strip()] or [v.strip()])
    return tuple(out)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cnnc")
def main() -> None:
    """cnnc: compile convolutional networks to CUDA/OpenCL programs and train them."""
    if threading.current_thread() is threading.main_thread():      # only there can Python take signals
        signal.signal(signal.SIGTERM, _on_sigterm)


def _input_shapes(ctx, param, values: tuple[str, ...]) -> dict:
    from cnnc.frontend.ccn2 import parse_shape

    shapes: dict = {}
    for v in values:
        try:
            name, dims = parse_shape(v)
        except ValueError as e:
            raise click.BadParameter(str(e))
        if name in shapes:
            raise click.BadParameter(f"{name or 'the image shape'} is given twice")
        shapes[name] = dims
    return shapes


def _ccn2_options(fn):
    """The facts a cuda-convnet2 configuration leaves to its data provider and command line."""
    fn = click.option("--classes", type=click.IntRange(min=2), default=None,
                      help="Classes of the labels data layer [default: the size of the softmax feeding "
                           "the cost layer].")(fn)
    fn = click.option("--mini", type=click.IntRange(min=1), default=None,
                      help="Minibatch size, as cuda-convnet2's --mini  [default: 128].")(fn)
    fn = click.option("--input-shape", "input_shapes", multiple=True, callback=_input_shapes,
                      metavar="NAME=CxHxW",
                      help="Shape of an image data layer, e.g. data=3x224x224 (repeatable).")(fn)
    return fn


def _import_ccn2(layers: Path, params: Path, input_shapes: dict, mini: int | None, classes: int | None,
                 name: str | None):
    """Import a cuda-convnet2 pair, printing its warnings to stderr."""
    from cnnc.frontend.ccn2 import DEFAULT_MINI, import_files

    imported = import_files(layers, params, input_shapes, DEFAULT_MINI if mini is None else mini, classes, name)
    if imported.warnings:
        click.echo(imported.format_warnings(), err=True)
    return imported


@main.command("import")
@click.argument("layers", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("params", type=click.Path(dir_okay=False, path_type=Path))
@_ccn2_options
@click.option("--name", default=None, help="Network name  [default: from the layer file's name].")
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The .cnn file to write  [default: standard output].")
@_guard
def import_(layers: Path, params: Path, input_shapes, mini: int | None, classes: int | None, name: str | None,
            out: Path | None) -> None:
    """Translate a cuda-convnet2 configuration into a .cnn network.

    LAYERS is the layer-definition file (layers-*.cfg), PARAMS the
    layer-parameter file (layer-params-*.cfg).  The files carry no image size:
    give every image data layer's shape with --input-shape.
    """
    imported = _import_ccn2(layers, params, input_shapes, mini, classes, name)
    if out is None:
        click.echo(imported.text, nl=False)
        return
    from cnnc.build import write_atomic

    write_atomic(out, imported.text)
    replicas = " and ".join(map(str, imported.replica_levels))
    click.echo(f"imported {imported.name}: {len(imported.layers)} layers, replicas per layer: {replicas} -> {out}")


@main.command()
@click.argument("source", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Build directory to write.")
@click.option("--arch", "archs", multiple=True, default=("sm_80,sm_90",), show_default=True,
              help="GPU architectures for nvcc (repeatable or comma-separated).")
@click.option("--no-nvcc", is_flag=True, help="Generate sources only, even when nvcc is available.")
@click.option("--force", is_flag=True, help="Rebuild even when the build directory is up to date.")
@click.option("--params", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With a cuda-convnet2 layer-definition file as SOURCE: its layer-parameter file.")
@click.option("--cpu-width", type=click.Choice(["16", "8", "4"]), default=None,
              help="Floats per vector of the CPU OpenCL kernels (gpu<k>.cpu.cl) [default: the local OpenCL "
                   "CPU device's preferred width, 16 without one].")
@_ccn2_options
@_guard
def compile(source: Path, out_dir: Path, archs, no_nvcc: bool, force: bool, params: Path | None,
            cpu_width: str | None, input_shapes, mini: int | None, classes: int | None) -> None:
    """Compile SOURCE into a build directory.

    SOURCE is a .cnn file, or a cuda-convnet2 layer-definition file (.cfg)
    given with --params, which is imported first (as by cnnc import); the
    build directory keeps the imported network as source.cnn.
    """
    from cnnc.build import DEFAULT_CPU_WIDTH, compile_file, compile_network, write_atomic
    from cnnc.codegen.dialect import CPU_WIDTHS

    if cpu_width is None:
        from cnnc.backends.opencl import preferred_cpu_width
        width = preferred_cpu_width(CPU_WIDTHS) or DEFAULT_CPU_WIDTH
    else:
        width = int(cpu_width)
    ccn2 = params is not None or source.suffix == ".cfg"
    imported = None
    if ccn2:
        if params is None:
            raise click.UsageError(f"{source} looks like a cuda-convnet2 layer-definition file: give its "
                                   f"layer-parameter file with --params LAYER-PARAMS.cfg")
        imported = _import_ccn2(source, params, input_shapes, mini, classes, None)
        cnn = out_dir / "source.cnn"             # the build keeps the source it compiled under this name
        try:
            result = compile_network(imported.text, str(cnn), out_dir, archs=_archs(archs),
                                     use_nvcc=not no_nvcc, force=force, cpu_width=width)
        except CompileError as e:
            raise imported.relocate(e) from None
        if not cnn.is_file():
            write_atomic(cnn, imported.text)
    else:
        if input_shapes or mini is not None or classes is not None:
            raise click.UsageError("--input-shape, --mini and --classes apply to cuda-convnet2 .cfg files "
                                   "(with --params)")
        result = compile_file(source, out_dir, archs=_archs(archs), use_nvcc=not no_nvcc, force=force,
                              cpu_width=width)
    if result.up_to_date:
        click.echo(f"{out_dir}: up to date")
        return
    plan = result.plan
    timing = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in result.stages.items())
    click.echo(f"compiled {plan.network}: {len(result.network.layers)} layers, {len(plan.kernels)} kernels, "
               f"{len(plan.devices)} device(s) -> {out_dir}/")
    click.echo("  " + " ".join(p.name for p in result.files))
    click.echo(f"  stages: {timing}")
    if not result.nvcc and not no_nvcc:
        click.echo("  nvcc not found: wrote .cu sources without cubins or PTX (the cuda backend then needs nvcc "
                   "where it runs; compile where nvcc is to ship cubins and PTX)")
    if imported is not None:
        click.echo(f"  imported from {source} and {params} as {out_dir / 'source.cnn'}")


@main.command()
@click.argument("source", type=click.Path(dir_okay=False, path_type=Path))
@_guard
def check(source: Path) -> None:
    """Parse and check SOURCE; print its layers and shapes."""
    from cnnc.check import check as check_program
    from cnnc.frontend.parser import parse_file

    net = check_program(parse_file(source))
    click.echo(f"network {net.name}: batch {net.batch}, {net.epochs} epochs, seed {net.seed}")
    for i in net.inputs:
        click.echo(f"  {i.name:<12} input    {i.shape if i.kind == 'image' else f'label({i.classes})'}")
    for l in net.layers:
        extra = f" {l.neuron}" if not l.neuron.is_identity else ""
        click.echo(f"  {l.name:<12} {l.kind:<8} {str(l.shape):<10} <- {', '.join(l.inputs)}{extra}"
                   f"  @gpu({','.join(map(str, l.gpus))})")


def _machine_options(fn):
    fn = click.option("--machine-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                      help="Further machines and links (JSON, the layout of the shipped machines.json).")(fn)
    return fn


def _model_options(fn):
    """--machine (required), --machine-file and --link: the machine model a prediction runs on."""
    fn = click.option("--link", "link_name", default=None, metavar="NAME",
                      help="Link between devices (pcie3, nvlink4, host-staging, ...) [default: the machine's].")(fn)
    fn = _machine_options(fn)
    return click.option("--machine", "machine_name", required=True, metavar="NAME",
                        help="Machine model: k20, k20x, titanx, v100, a100, h100, h200, cpu, or one of "
                             "--machine-file.")(fn)


def _machine(name: str, machine_file: Path | None):
    """The machine model; `cpu` is calibrated first when it has no cached calibration."""
    from cnnc.perf.calibrate import machine

    return machine(name, machine_file, on_calibrate=lambda: click.echo(
        "note: calibrating this machine's OpenCL device first (cnnc calibrate)", err=True))


@main.command()
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the plan as one JSON object.")
@click.option("--roofline", is_flag=True, help="Per layer: FLOPs, DRAM bytes, intensity, bound and predicted "
                                               "time on --machine (with --json: a roofline object per kernel).")
@click.option("--machine", "machine_name", default=None, metavar="NAME",
              help="Machine model of --roofline: k20, k20x, titanx, v100, a100, h100, h200, cpu, or one of "
                   "--machine-file.")
@_machine_options
@click.option("--ranks", type=int, default=None, metavar="R",
              help="Also show the plan run as R MPI ranks: the logical devices each owns and the bytes "
                   "per step between ranks.")
@_guard
def plan(build_dir: Path, as_json: bool, roofline: bool, machine_name: str | None, machine_file: Path | None,
         ranks: int | None) -> None:
    """Show the schedule of a build directory: per device, its kernels in order."""
    from cnnc.build import open_build
    from cnnc.plan.summary import format_sass, summarize, format_summary

    if roofline and machine_name is None:
        _fail("error: --roofline needs --machine NAME (e.g. --machine h100)")
    p, manifest = open_build(build_dir)
    blocks = _rank_blocks(p, ranks)
    if machine_name is None:
        s = summarize(p, manifest)
        _add_ranks(s, blocks)
        click.echo(json.dumps(s, indent=1) if as_json else format_summary(s) + "\n\n" + format_sass(s)
                   + _ranks_text(s))
        return
    from cnnc.perf.roofline import format_rooflines, layer_rooflines, plan_rooflines

    m = _machine(machine_name, machine_file)
    rooflines = plan_rooflines(p, m, manifest)
    layers = layer_rooflines(p, rooflines)
    if as_json:
        s = summarize(p, manifest, rooflines)
        s["roofline"] = {"machine": m.name, "ridge_intensity": m.ridge_intensity, "layers": layers}
        _add_ranks(s, blocks)
        click.echo(json.dumps(s, indent=1))
    else:
        s = summarize(p, manifest, rooflines)
        _add_ranks(s, blocks)
        click.echo(format_rooflines(p, m, layers) + "\n\n" + format_sass(s, (m.arch, m.kernel_arch), m.peak_flops)
                   + _ranks_text(s))


def _rank_blocks(p, ranks: int | None) -> list[list[int]] | None:
    """Each rank's logical devices as `mpiexec -n R cnnc run` would share them out (a user's
    R that cannot share them is refused in one line)."""
    from cnnc.distributed import owned_devices

    if ranks is None:
        return None
    if ranks < 1:
        _fail(f"error: --ranks must be at least 1, got {ranks}")
    return [owned_devices(p.devices, r, ranks) for r in range(ranks)]


def _add_ranks(s: dict, blocks: list[list[int]] | None) -> None:
    from cnnc.plan.summary import rank_summary

    if blocks is not None:
        s["ranks"] = rank_summary(s, blocks)


def _ranks_text(s: dict) -> str:
    from cnnc.plan.summary import format_ranks

    return "\n\n" + format_ranks(s["ranks"]) if "ranks" in s else ""


@main.command()
@click.argument("build_dir", type=click.Path(path_type=Path))
@_model_options
@click.option("--devices", type=click.IntRange(min=1), default=None,
              help="Physical devices; logical device d runs on d mod N [default: one per logical device].")
@click.option("--json", "as_json", is_flag=True, help="Print the prediction as one JSON object.")
@click.option("--trace", "trace_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the simulated step as Chrome trace-event JSON (opens in Perfetto).")
@click.option("--ranks", type=int, default=None, metavar="R",
              help="Run as R MPI ranks, each on its own node (--devices then counts a node's devices): "
                   "copies between ranks go over --network.")
@click.option("--network", "network_name", default=None, metavar="LINK",
              help="Link between the nodes of --ranks (infiniband-ndr, ethernet-100g, ...) "
                   "[default: infiniband-ndr].")
@_guard
def simulate(build_dir: Path, machine_name: str, machine_file: Path | None, devices: int | None,
             link_name: str | None, as_json: bool, trace_file: Path | None, ranks: int | None,
             network_name: str | None) -> None:
    """Predict one training step of a build on a machine model: a discrete-event simulation of
    the plan's streams, events, copies and uploads."""
    from cnnc.build import open_build
    from cnnc.perf.machine import catalogue, link
    from cnnc.perf.roofline import plan_rooflines
    from cnnc.perf.simulate import DEFAULT_NETWORK, format_report, report, simulate_plan
    from cnnc.perf.trace import to_trace

    if network_name is not None and ranks is None:
        _fail("error: --network is the link between the nodes of --ranks: give --ranks R too")
    p, manifest = open_build(build_dir)
    blocks = _rank_blocks(p, ranks)
    m = _machine(machine_name, machine_file)
    peer = link(link_name, catalogue(machine_file)) if link_name else None
    network = link(network_name or DEFAULT_NETWORK, catalogue(machine_file)) if blocks else None
    n = devices or (len(blocks[0]) if blocks else max(p.programs["train"]) + 1)
    sim = simulate_plan(p, m, plan_rooflines(p, m, manifest), n, peer, ranks=blocks, network=network)
    r = report(sim, p, m, n, ranks, network)
    if trace_file is not None:
        trace_file.write_text(json.dumps(to_trace(sim, f"{m.name}, predicted")))
    click.echo(json.dumps(r, indent=1) if as_json else format_report(r))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the calibration as JSON.")
@_guard
def calibrate(as_json: bool) -> None:
    """Measure this machine's OpenCL device (peak FLOP/s, bandwidth, launch overhead) for the
    `cpu` machine model, and cache the result."""
    from cnnc.perf.calibrate import measure, save

    c = measure()
    path = save(c)
    if as_json:
        click.echo(json.dumps(dict(c, cache=str(path)), indent=1))
    else:
        click.echo(f"{c['device']}, {c['compute_units']} compute units: {c['peak_gflops']:.1f} GFLOP/s FP32, "
                   f"{c['bandwidth_gbs']:.1f} GB/s, {c['launch_overhead_us']:.1f} us per launch; saved to {path}")


def _gpus(ctx, param, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        ids = [int(v) for v in value.split(",") if v.strip() != ""]
    except ValueError:
        raise click.BadParameter(f"expected a comma-separated list of device ids, e.g. 0,1; got {value!r}")
    if not ids or min(ids) < 0:
        raise click.BadParameter(f"expected non-negative device ids, got {value!r}")
    return ids


def _stream_order(ctx, param, value: str) -> int | None:
    """--stream-order: None for in-order, else the seed of the random order."""
    from cnnc.race import parse_stream_order
    try:
        return parse_stream_order(value)
    except ValueError as e:
        raise click.BadParameter(str(e))


def _default_gpus(plan, gpus: list[int] | None) -> list[int]:
    """Without --gpus, every logical device of the plan runs on physical device 0."""
    if gpus is not None:
        return gpus
    n = max(plan.devices) + 1
    if n > 1:
        click.echo(f"note: {n} logical devices share device 0; spread them with --gpus, e.g. --gpus "
                   + ",".join(str(i) for i in range(n)), err=True)
    return [0] * n


@main.command()
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.option("--gpus", default=None, callback=_gpus,
              help="Physical device for each logical device of the plan, e.g. 3,2,1,0 "
                   "[default: every logical device on device 0].")
@click.option("--backend", type=click.Choice(["auto", "cuda", "opencl", "reference"]), default="auto",
              show_default=True, help="auto: cuda when PyCUDA and a GPU are usable, else opencl.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Override the network's epochs.")
@click.option("--data", default="digits", show_default=True,
              help="'digits' (ships with scikit-learn), a .npz with train_x, train_y, test_x, test_y, a CIFAR-10 "
                   "batch folder, or a folder of class folders of JPEG/PNG images (with train/ and val/, or "
                   "--test-split).")
@click.option("--resize", type=click.IntRange(min=1), default=None, metavar="S",
              help="Image folders: resize the shorter side to S, then crop the centre SxS "
                   "[default: the network's input size].")
@click.option("--test-split", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              metavar="F", help="Image folders without val/: hold out this fraction of each class for testing.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Image folders: where decoded images are cached [default: $XDG_CACHE_HOME/cnnc or "
                   "~/.cache/cnnc].")
@click.option("--save-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where metrics.jsonl and weights.npz go [default: BUILD_DIR/train].")
@click.option("--test-freq", type=click.IntRange(min=0), default=0,
              help="Also evaluate every N steps (0: after each epoch only).")
@click.option("--init", "init", type=click.Path(path_type=Path), default=None,
              help="Start from these parameters (.npz as written by cnnc run / cnnc export).")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Stop after N steps (or --epochs, whichever comes first); the learning-rate "
                   "schedule spans that many steps.")
@click.option("--no-test", is_flag=True, help="Do not evaluate on the test split.")
@click.option("--test-only", is_flag=True, help="Only evaluate the parameters of --init or --resume.")
@click.option("--save-freq", type=click.IntRange(min=0), default=0,
              help="Write a checkpoint every N steps (0: at the end of every epoch); also at the end "
                   "and on Ctrl-C or SIGTERM.")
@click.option("--keep", type=click.IntRange(min=1), default=3, show_default=True,
              help="Checkpoints kept in the save directory (the newest).")
@click.option("--resume", type=click.Path(file_okay=False, path_type=Path), default=None, metavar="SAVE_DIR",
              help="Continue the run saved in SAVE_DIR from its newest checkpoint, exactly.")
@click.option("--color-noise", type=click.FloatRange(min=0), default=None, metavar="STD",
              help="Shift each training image's colour along the training pixels' principal components "
                   "(AlexNet's colour noise, weights ~ N(0, STD)) [default: 0, or the resumed run's].")
@click.option("--multiview-test", is_flag=True,
              help="Evaluate on the softmax averaged over 10 views (4 corner and centre crops, each also "
                   "flipped) where the images are larger than the network's input.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option("--comm-timeout", type=click.FloatRange(min=0, min_open=True), default=None, metavar="SECONDS",
              help="Under mpiexec: how long a rank waits for another before the job stops, naming it "
                   f"[default: the larger of {DEFAULT_TIMEOUT:g} s and {STEP_TIMEOUTS} training steps].")
@click.option("--trace", "trace_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=f"Write {TRACE_STEPS} training steps, after {TRACE_WARMUP} warm-up steps, as Chrome "
                   "trace-event JSON (as cnnc simulate --trace); each op is timed on its own.")
@click.option("--stream-order", default="in-order", show_default=True, callback=_stream_order,
              metavar="in-order|random[:SEED]",
              help="random: run each stream of each device as its own queue, in a random order (seeded, "
                   "default 0) that the plan's events permit, and stop at the first pair of accesses they "
                   "leave unordered (the reference backend only).")
@abort_on_failure
@_guard
@_holding_build
def run(build_dir: Path, gpus: list[int], backend: str, epochs: int | None, data: str,
        save_dir: Path | None, test_freq: int, init: Path | None, steps: int | None, no_test: bool,
        test_only: bool, save_freq: int, keep: int, resume: Path | None, quiet: bool,
        resize: int | None, test_split: float | None, cache_dir: Path | None, comm_timeout: float | None,
        trace_file: Path | None, color_noise: float | None, multiview_test: bool,
        stream_order: int | None) -> None:
    """Train the network compiled into BUILD_DIR.

    Under `mpiexec -n R`, each of the R ranks runs a contiguous block of the plan's
    logical devices; every rank gets the same command line."""
    from tqdm import tqdm

    from cnnc.backends import default_backend, make_backend
    from cnnc.build import open_build
    from cnnc.distributed import owned_devices, transport_for_launch
    from cnnc.train.data import load_dataset
    from cnnc.train.checkpoint import check_resumable, latest_checkpoint
    from cnnc.train.loop import check_data, cost_summary, evaluate_parameters, train
    from cnnc.train.weights import weights_for

    if init and resume:
        raise click.UsageError("--init and --resume both give the starting parameters: choose one")
    if test_only and not (init or resume):
        raise click.UsageError("--test-only evaluates saved parameters: give --init or --resume")
    if resume and save_dir and save_dir.resolve() != resume.resolve():
        raise click.UsageError("--resume continues in its own save directory: leave out --save-dir")
    if trace_file and test_only:
        raise click.UsageError("--trace records training steps: leave out --test-only")
    if stream_order is not None and backend != "reference":
        raise BackendError(f"--stream-order random runs on the reference backend only (--backend {backend} "
                           f"was given): add --backend reference")
    p, manifest = open_build(build_dir)
    transport = transport_for_launch(comm_timeout)
    if stream_order is not None and transport is not None:
        raise click.UsageError("--stream-order random checks one process's streams: run it without mpiexec")
    if transport is not None:
        owned_devices(p.devices, transport.rank, transport.size)      # refuses ranks that do not divide them
    say = click.echo if transport is None or transport.root else (lambda *a, **kw: None)
    checkpoint = None
    if resume:
        checkpoint = latest_checkpoint(resume)
        note = check_resumable(checkpoint, p, manifest["inputs_hash"], resume)
        if note:
            say(note, err=True)
        start = checkpoint.parameters
    else:
        start = weights_for(p, init) if init else None
    ds = load_dataset(data, p.image_shape, p.classes, resize, test_split, cache_dir)
    check_data(p, ds)                   # before a backend is set up or training is announced
    name = default_backend() if backend == "auto" else backend
    gpus = _default_gpus(p, gpus)
    be = make_backend(name, p, build_dir, gpus)
    if stream_order is not None:        # the reference backend, its streams in a random order, checked
        from cnnc.race import RaceChecker
        be = RaceChecker(p, stream_order)
    if test_only:
        test_loss, test_error = evaluate_parameters(p, be, ds, start, multiview_test)
        say(f"test error {test_error * 100:5.2f}%  test loss {test_loss:.4f}  ({ds.n_test} images)")
        return
    save_dir = resume or save_dir or build_dir / "train"
    if checkpoint is not None:          # the resumed run's own goal, where not given anew
        if steps is None and epochs is None:
            steps = checkpoint.steps
        if epochs is None:
            epochs = checkpoint.epochs
    epochs = epochs or p.epochs
    goal = f"{epochs} epochs" + (f" or {steps} steps" if steps else "")
    ranks = f", {transport.size} ranks" if transport is not None else ""
    say(f"training {p.network} on {be.describe()}: {len(ds.train_y)} train / {len(ds.test_y)} test "
        f"images, batch {p.batch}, {goal}" + (f", from step {checkpoint.step}" if checkpoint else "") + ranks)
    # disable=None: no bar when stderr is not a terminal (logs, CI)
    progress = None if quiet else (lambda **kw: tqdm(leave=False, dynamic_ncols=True, disable=None, **kw))
    writes = transport is None or transport.root
    if writes:
        save_dir.mkdir(parents=True, exist_ok=True)
    # one run writes a save directory at a time (a save dir that is the build dir is held already)
    recorder = StepRecorder(p, TRACE_STEPS, TRACE_WARMUP) if trace_file else None
    with build_lock(save_dir) if writes and save_dir.resolve() != build_dir.resolve() else contextlib.nullcontext():
        history = train(p, be, ds, epochs, save_dir, test_freq, progress, start, steps=steps,
                        save_freq=save_freq, keep=keep, test=not no_test, resume=checkpoint,
                        build_hash=manifest["inputs_hash"], transport=transport,
                        step_timer=recorder.next_step if recorder else None, color_noise=color_noise,
                        multiview=multiview_test)
    if recorder is not None and transport is not None:      # every rank's spans, written by rank 0
        spans = transport.allgather(recorder.spans, "the other ranks' traces")
        transport.finish()
        if transport.root:
            trace_file.write_text(json.dumps(ranks_trace(spans, f"{be.describe()}, measured")))
    elif recorder is not None:
        trace_file.write_text(json.dumps(recorder.trace(f"{be.describe()}, measured")))
        recorded = min(max(recorder.started - TRACE_WARMUP, 0), TRACE_STEPS)
        say(f"trace: {trace_file} ({recorded} steps after {TRACE_WARMUP} warm-up steps)")
    for ev in history:
        tested = f"test error {ev.test_error * 100:5.2f}%  " if ev.test_error is not None else ""
        costs = f"({cost_summary(ev.costs, ev.coeffs)})  " if ev.costs else ""
        say(f"epoch {ev.epoch:3d}  step {ev.step:6d}  train loss {ev.train_loss:.4f}  {costs}"
            f"{tested}{ev.images_per_s:8.0f} img/s")
    say(f"metrics: {save_dir / 'metrics.jsonl'}  weights: {save_dir / 'weights.npz'}")


@main.command()
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(["auto", "cuda", "opencl", "reference"]), default="auto",
              show_default=True)
@click.option("--gpus", default=None, callback=_gpus,
              help="Physical device for each logical device of the plan [default: all on device 0].")
@click.option("--batch", type=click.IntRange(min=1), default=None,
              help="Recompile the network with this batch size first.")
@click.option("--steps", type=click.IntRange(min=1), default=5, show_default=True,
              help="Timed training steps (after two warm-up steps).")
@click.option("--against", type=click.Choice(["torch"]), default=None,
              help="Also build and time the same network in PyTorch, side by side.")
@click.option("--inference", is_flag=True,
              help="Time forward-only steps (the test program) instead of training steps.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@_guard
@_holding_build
def bench(build_dir: Path, backend: str, gpus: list[int], batch: int | None, steps: int, against: str | None,
          inference: bool, as_json: bool) -> None:
    """Time training steps of BUILD_DIR: per layer forward/backward ms and GFLOP/s, images/s."""
    if inference and against:
        raise click.UsageError("--against torch times training steps; leave out --inference")
    import dataclasses

    from cnnc.backends import default_backend
    from cnnc.bench import bench as run_bench, format_bench
    from cnnc.build import open_build

    name = default_backend() if backend == "auto" else backend
    result = run_bench(build_dir, name, _default_gpus(open_build(build_dir)[0], gpus), batch, steps, against=against,
                       inference=inference)
    click.echo(json.dumps(dataclasses.asdict(result), indent=1) if as_json else format_bench(result))


@main.command()
@click.argument("save_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The .npz file to write.")
@_guard
def export(save_dir: Path, out: Path) -> None:
    """Write the parameters of a training run (SAVE_DIR of cnnc run) to one .npz file."""
    from cnnc.train.weights import export as export_weights

    names = export_weights(save_dir, out)
    click.echo(f"wrote {len(names)} arrays to {out}: {', '.join(names)}")


@main.command()
@click.argument("save_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The image to write (.png; .svg and .pdf work too).")
@_guard
def plot(save_dir: Path, out: Path) -> None:
    """Draw loss and error per step, train and test, from SAVE_DIR/metrics.jsonl (needs cnnc[plot])."""
    from cnnc.train.plot import plot as draw

    records = draw(save_dir, out)
    click.echo(f"plotted {records} records -> {out}")


@main.command()
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--init", "init", type=click.Path(path_type=Path), required=True,
              help="Trained parameters (.npz as written by cnnc run / cnnc export, or a SAVE_DIR).")
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True,
              help="How many of the most probable classes to print per image.")
@click.option("--backend", type=click.Choice(["auto", "cuda", "opencl", "reference"]), default="auto",
              show_default=True)
@click.option("--gpus", default=None, callback=_gpus,
              help="Physical device for each logical device of the plan [default: all on device 0].")
@_guard
@_holding_build
def predict(build_dir: Path, images: tuple[Path, ...], init: Path, top: int, backend: str,
            gpus: list[int] | None) -> None:
    """Print the most probable classes of each image file.

    Images are scaled to [0, 1], resized and centre-cropped as the test split is, and have the
    mean training image subtracted when the parameter file stores one (`mean`); classes are
    named when it stores their names (`classes`), else printed as label numbers.
    """
    from cnnc.backends import default_backend, make_backend
    from cnnc.build import open_build
    from cnnc.predict import predict as classify

    p, _ = open_build(build_dir)
    be = make_backend(default_backend() if backend == "auto" else backend, p, build_dir, _default_gpus(p, gpus))
    for image, best in zip(images, classify(p, be, init, list(images), top)):
        click.echo(f"{image}: " + ", ".join(f"{name} {prob:.4f}" for name, prob in best))


def _device_counts(value: str) -> list[int]:
    """--device-counts as a sorted list, or a one-line error."""
    try:
        counts = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1 or len(set(counts)) != len(counts):
        _fail(f"error: --device-counts: expected distinct positive integers separated by commas (1,2,4,8), "
              f"not {value!r}")
    return sorted(counts)


def _strategies(value: str) -> list[str]:
    """--strategies as a list, or a one-line error."""
    from cnnc.perf.placements import STRATEGIES

    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown or not names:
        _fail(f"error: --strategies: unknown strategy {', '.join(unknown) or repr(value)}; "
              f"known: {', '.join(STRATEGIES)}")
    return list(dict.fromkeys(names))


def _parse_network(source: Path):
    from cnnc.frontend.parser import parse_file

    if not source.is_file():
        _fail(f"{source}: error: no such .cnn file")
    return parse_file(source)


@main.command()
@click.argument("source", type=click.Path(dir_okay=False, path_type=Path))
@_model_options
@click.option("--device-counts", "counts", default="1,2,4,8", show_default=True,
              help="Device counts to study, comma-separated.")
@click.option("--strategies", default="data,model,hybrid,pipeline", show_default=True,
              help="Placement strategies, comma-separated.")
@click.option("--fixed-batch", is_flag=True,
              help="Keep the source's batch at every count (strong scaling) [default: batch x devices].")
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Draw speedup against devices to this image file (needs matplotlib: cnnc[plot]).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with a row per strategy and count.")
@_guard
def scale(source: Path, machine_name: str, machine_file: Path | None, link_name: str | None, counts: str,
          strategies: str, fixed_batch: bool, plot_file: Path | None, as_json: bool) -> None:
    """Predict how SOURCE scales: each placement strategy at each device count, compiled (without
    nvcc) and simulated on a machine model.

    Strategies: data (every layer on all devices), model (conv and fc layers sliced across the
    devices), hybrid (layers below the first fc replicated, the fc layers sliced; once per
    exchange scheme), pipeline (balanced stages, 4 micro-batches per stage, 1F1B).  Speedup is
    images/s over the one-device build's; a strategy a count cannot have is listed as skipped.
    """
    from cnnc.perf.machine import catalogue, link
    from cnnc.perf.scale import format_table, plot, study

    device_counts, chosen = _device_counts(counts), _strategies(strategies)
    program = _parse_network(source)
    m = _machine(machine_name, machine_file)
    peer = link(link_name, catalogue(machine_file)) if link_name else None
    if plot_file is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            _fail("error: --plot needs matplotlib (pip install 'cnnc[plot]')")
    rows = study(program, m, device_counts, chosen, scale_batch=not fixed_batch, peer_link=peer)
    if plot_file is not None:
        plot(rows, plot_file, f"{program.name} on {m.name}")
    if as_json:
        click.echo(json.dumps({"network": program.name, "machine": m.name, "weak_scaling": not fixed_batch,
                               "rows": rows}, indent=1))
    else:
        click.echo(f"{program.name}: " + format_table(rows, m))
        if plot_file is not None:
            click.echo(f"plot: {plot_file}")


@main.command()
@click.argument("source", type=click.Path(dir_okay=False, path_type=Path))
@_model_options
@click.option("--devices", type=int, required=True, help="Devices to place the network on.")
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The placed .cnn file to write.")
@click.option("--fixed-batch", is_flag=True,
              help="Keep the source's batch [default: batch x devices, each device keeping the source's work].")
@click.option("--json", "as_json", is_flag=True, help="Print the ranking as JSON.")
@_guard
def place(source: Path, machine_name: str, machine_file: Path | None, link_name: str | None, devices: int,
          out: Path, fixed_batch: bool, as_json: bool) -> None:
    """Search placements of SOURCE on DEVICES devices of a machine model and write the fastest
    that fits every device's memory as a .cnn file, its predicted step and the runners-up in a
    comment at its top.  The search space is described in cnnc/perf/place.py."""
    from cnnc.build import write_atomic
    from cnnc.perf.machine import catalogue, link
    from cnnc.perf.place import annotated, search

    if devices < 1:
        _fail(f"error: --devices must be 1 or more, not {devices}")
    if out.exists() and source.exists() and out.samefile(source):
        _fail(f"{out}: error: the output would overwrite the input; choose another -o")
    program = _parse_network(source)
    m = _machine(machine_name, machine_file)
    peer = link(link_name, catalogue(machine_file)) if link_name else None
    result = search(program, m, devices, scale_batch=not fixed_batch, peer_link=peer)
    write_atomic(out, annotated(result, m))
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=1))
    else:
        best = result.ranking[0]
        click.echo(f"{program.name} on {devices} x {m.name}: best {best.name}, predicted {best.step_ms:.1f} ms per "
                   f"step, {best.images_per_s:,.0f} images/s ({result.candidates} placements, "
                   f"{len(result.too_big)} too big, {result.evaluated} simulated) -> {out}")
        for c in result.ranking[1:6]:
            click.echo(f"  runner-up: {c.name}, {c.step_ms:.1f} ms, {c.images_per_s:,.0f} images/s")


if __name__ == "__main__":
    main()
