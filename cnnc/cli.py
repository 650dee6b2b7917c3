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
        except (DataError, BackendError, WeightsError, BuildError) as e:
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
        with build_lock(kwargs["build_dir"]):
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
@_ccn2_options
@_guard
def compile(source: Path, out_dir: Path, archs, no_nvcc: bool, force: bool, params: Path | None,
            input_shapes, mini: int | None, classes: int | None) -> None:
    """Compile SOURCE into a build directory.

    SOURCE is a .cnn file, or a cuda-convnet2 layer-definition file (.cfg)
    given with --params, which is imported first (as by cnnc import); the
    build directory keeps the imported network as source.cnn.
    """
    from cnnc.build import compile_file, compile_network, write_atomic

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
                                     use_nvcc=not no_nvcc, force=force)
        except CompileError as e:
            raise imported.relocate(e) from None
        if not cnn.is_file():
            write_atomic(cnn, imported.text)
    else:
        if input_shapes or mini is not None or classes is not None:
            raise click.UsageError("--input-shape, --mini and --classes apply to cuda-convnet2 .cfg files "
                                   "(with --params)")
        result = compile_file(source, out_dir, archs=_archs(archs), use_nvcc=not no_nvcc, force=force)
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
        click.echo("  nvcc not found: wrote .cu sources without cubins (the cuda backend JIT-compiles them)")
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


@main.command()
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the plan as one JSON object.")
@_guard
def plan(build_dir: Path, as_json: bool) -> None:
    """Show the schedule of a build directory: per device, its kernels in order."""
    from cnnc.build import open_build
    from cnnc.plan.summary import summarize, format_summary

    p, manifest = open_build(build_dir)
    s = summarize(p, manifest)
    click.echo(json.dumps(s, indent=1) if as_json else format_summary(s))


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
              help="'digits' (ships with scikit-learn) or a .npz with train_x, train_y, test_x, test_y.")
@click.option("--save-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where metrics.jsonl and weights.npz go [default: BUILD_DIR/train].")
@click.option("--test-freq", type=click.IntRange(min=0), default=0,
              help="Also evaluate every N steps (0: after each epoch only).")
@click.option("--init", "init", type=click.Path(path_type=Path), default=None,
              help="Start from these parameters (.npz as written by cnnc run / cnnc export).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@_guard
@_holding_build
def run(build_dir: Path, gpus: list[int], backend: str, epochs: int | None, data: str,
        save_dir: Path | None, test_freq: int, init: Path | None, quiet: bool) -> None:
    """Train the network compiled into BUILD_DIR."""
    from tqdm import tqdm

    from cnnc.backends import default_backend, make_backend
    from cnnc.build import open_build
    from cnnc.train.data import load_dataset
    from cnnc.train.loop import check_data, train

    from cnnc.train.weights import weights_for

    p, _ = open_build(build_dir)
    start = weights_for(p, init) if init else None
    ds = load_dataset(data)
    check_data(p, ds)                   # before a backend is set up or training is announced
    name = default_backend() if backend == "auto" else backend
    gpus = _default_gpus(p, gpus)
    be = make_backend(name, p, build_dir, gpus)
    save_dir = save_dir or build_dir / "train"
    epochs = epochs or p.epochs
    click.echo(f"training {p.network} on {be.describe()}: {len(ds.train_y)} train / {len(ds.test_y)} test "
               f"images, batch {p.batch}, {epochs} epochs")
    # disable=None: no bar when stderr is not a terminal (logs, CI)
    progress = None if quiet else (lambda **kw: tqdm(leave=False, dynamic_ncols=True, disable=None, **kw))
    history = train(p, be, ds, epochs, save_dir, test_freq, progress, start)
    for ev in history:
        click.echo(f"epoch {ev.epoch:3d}  step {ev.step:6d}  train loss {ev.train_loss:.4f}  "
                   f"test error {ev.test_error * 100:5.2f}%  {ev.images_per_s:8.0f} img/s")
    click.echo(f"metrics: {save_dir / 'metrics.jsonl'}  weights: {save_dir / 'weights.npz'}")


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
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@_guard
@_holding_build
def bench(build_dir: Path, backend: str, gpus: list[int], batch: int | None, steps: int, against: str | None,
          as_json: bool) -> None:
    """Time training steps of BUILD_DIR: per layer forward/backward ms and GFLOP/s, images/s."""
    import dataclasses

    from cnnc.backends import default_backend
    from cnnc.bench import bench as run_bench, format_bench
    from cnnc.build import open_build

    name = default_backend() if backend == "auto" else backend
    result = run_bench(build_dir, name, _default_gpus(open_build(build_dir)[0], gpus), batch, steps, against=against)
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


if __name__ == "__main__":
    main()
