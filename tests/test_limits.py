"""Limits: deep and long networks, sizes that cannot run, sources that cannot be read.

Each case is what a user would type; the answer is a compile, or exit status 2
with a one-line or located message, never a traceback (RecursionError,
OverflowError, a read that never ends).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from cnnc.cli import main
from cnnc.frontend.parser import MAX_NESTING
from helpers import replace_once

HEAD = "network chain\ninput data: 1x4x4\ninput labels: label(10)\ntrain { batch = 8 }\n"
TAIL = "probs = softmax(out)\ncost = logreg(labels, probs)\n"


def cli(*args: str | Path, env: dict | None = None) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def user_error(result: Result) -> str:
    """Exit status 2, a message, no traceback; returns stderr."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert result.stderr.strip()
    return result.stderr


def chain(n: int) -> list[str]:
    """An fc chain of n layers then the classifier, in source order."""
    lines = ["l0 = fc(data, outputs=16) relu"] + [f"l{i} = fc(l{i - 1}, outputs=16) relu" for i in range(1, n)]
    return lines + [f"out = fc(l{n - 1}, outputs=10)"]


def write(tmp_path: Path, text: str, name: str = "net.cnn") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- deep networks are not recursion ----------------------------------------------------

def test_long_chain_written_last_layer_first_compiles(tmp_path):
    path = write(tmp_path, HEAD + "\n".join(reversed(chain(1500))) + "\n" + TAIL)
    result = cli("compile", path, "-o", tmp_path / "build", "--no-nvcc")
    assert result.exit_code == 0, result.output
    plan = json.loads((tmp_path / "build" / "plan.json").read_text())
    assert [l["layer"] for l in plan["layers"]][:3] == ["l0", "l1", "l2"]


def test_long_cycle_is_reported_shortened(tmp_path):
    lines = chain(3000)
    lines[0] = "l0 = fc(l2999, outputs=16) relu"
    path = write(tmp_path, HEAD + "\n".join(lines) + "\n" + TAIL)
    err = user_error(cli("check", path))
    assert err.startswith(f"{path}:5:1: error: cycle in the layer graph: l0 -> l2999 -> l2998 -> l2997 -> ... -> "
                          "l3 -> l2 -> l1 -> l0 (3000 layers)\n")


@pytest.mark.parametrize("opener, closer", [("[", "]"), ("f(", ")")])
def test_100000_nested_brackets_are_a_located_error(tmp_path, opener, closer):
    value = opener * 100_000 + "1" + closer * 100_000
    path = write(tmp_path, HEAD + f"out = fc(data, outputs=10, init_w={value})\n" + TAIL)
    err = user_error(cli("check", path))
    column = len("out = fc(data, outputs=10, init_w=") + len(opener) * MAX_NESTING    # at the bracket
    assert err.startswith(f"{path}:5:{column}: error: brackets nested more than {MAX_NESTING} deep\n")
    shown, caret = err.splitlines()[1:3]          # the line is cut around the caret, which still points at it
    assert len(shown) < 200 and shown.startswith("    5 | ...") and shown.endswith("...")
    assert shown[caret.index("^")] == opener[-1]


def test_nesting_up_to_the_limit_reaches_the_checker(tmp_path):
    depth = MAX_NESTING - 1                      # fc( is the first level
    path = write(tmp_path, HEAD + f"out = fc(data, outputs=10, init_w={'[' * depth}1{']' * depth})\n" + TAIL)
    err = user_error(cli("check", path))
    assert "error: init_w must be a number" in err.splitlines()[0]


# -- sizes that cannot run ---------------------------------------------------------------

def net(batch: str = "8", placement: str = "", filters: str = "4", outputs: str = "10", classes: str = "10") -> str:
    return (f"network big\ninput data: 1x8x8\ninput labels: label({classes})\ntrain {{ batch = {batch} }}\n"
            f"{placement}\nconv1 = conv(data, filters={filters}, size=3, padding=1) relu\n"
            f"out = fc(conv1, outputs={outputs})\n" + TAIL)


@pytest.mark.parametrize("text, line, column, message", [
    (net(batch="100000000000000000000"), 4, 17, "batch must be at most 2147483647"),
    (net(placement="@gpu(100000000000000000000)"), 5, 6, "device ids go up to 255"),
    (net(placement="@gpu(256)"), 5, 6, "device ids go up to 255"),
    (net(outputs="1000000000000"), 7, 25, "outputs must be at most 2147483647"),
    (net(classes="100000000000000000000"), 3, 21, "label(...) takes at most 2147483647 classes"),
    (net(filters="33554432"), 6, 1, "'conv1' needs 2147483648 elements per case (33554432x8x8); kernels index "
                                    "within a case with 32 bits (at most 2^31-1)"),
    (net(batch="2147483647", filters="33554431"), 6, 1,
     "'conv1' needs 4611685878840950848 elements (2147483647 cases of 33554431x8x8); a buffer holds at most "
     "2^61-1, whose bytes a 64-bit offset reaches"),
])
def test_sizes_that_cannot_run_are_located_errors(tmp_path, text, line, column, message):
    path = write(tmp_path, text)
    err = user_error(cli("check", path))
    assert err.startswith(f"{path}:{line}:{column}: error: {message}\n")


def test_weights_too_large_to_index_are_a_located_error(tmp_path):
    path = write(tmp_path, net(batch="1", filters="33554431", outputs="2147483647", classes="2147483647"))
    err = user_error(cli("compile", path, "-o", tmp_path / "build", "--no-nvcc"))
    assert err.startswith(f"{path}:7:1: error: 'out' needs a buffer of 4611685878840950848 elements (out.weights); "
                          "a buffer holds at most 2^61-1, whose bytes a 64-bit offset reaches\n")
    assert not (tmp_path / "build" / "plan.json").exists()


def test_a_launch_of_more_than_2_31_work_groups_is_a_located_error(tmp_path):
    """Buffers past 2^31-1 elements compile (their kernels index in 64 bits), but a launch's
    grid still counts its work-groups in 32 bits."""
    path = write(tmp_path, net(batch="2147483647"))
    err = user_error(cli("compile", path, "-o", tmp_path / "build", "--no-nvcc"))
    assert err.startswith(f"{path}:6:1: error: layer 'conv1' needs 8589934588 work-groups in one launch of its "
                          "kernel conv1_relu_bwd_n549755813632, more than 2^31-1\n")


# -- sources that cannot be read -----------------------------------------------------------

@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
@pytest.mark.parametrize("command", [("check",), ("import", "/dev/zero", "--input-shape", "data=3x8x8")])
def test_a_device_is_not_read(command):
    assert user_error(cli(command[0], "/dev/zero", *command[1:])) == "/dev/zero: error: not a regular file\n"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_is_not_waited_on(tmp_path):
    fifo = tmp_path / "net.cnn"
    os.mkfifo(fifo)
    assert user_error(cli("check", fifo)) == f"{fifo}: error: not a regular file\n"


def test_a_source_over_16_mib_is_refused(tmp_path):
    path = write(tmp_path, "network big\n" + "#" * (16 * 2**20) + "\n")
    assert user_error(cli("compile", path, "-o", tmp_path / "build")) == \
        f"{path}: error: the file is larger than 16 MiB\n"


def test_a_nul_byte_is_a_located_error(tmp_path):
    path = write(tmp_path, "network n\n# a comment \0 hiding text\n")
    assert user_error(cli("check", path)).startswith(f"{path}:2:13: error: NUL byte in the source\n")


# -- options and settings that name nothing usable ------------------------------------------

def test_an_empty_arch_is_refused(tmp_path, tiny_cnn):
    err = user_error(cli("compile", tiny_cnn, "-o", tmp_path / "build", "--no-nvcc", "--arch", ""))
    assert err == "--arch: error: invalid CUDA architecture '': expected 'sm_' followed by digits, e.g. 'sm_80'\n"


@pytest.mark.parametrize("value, message", [
    ("Portable:abc", "after ':' comes a device index, e.g. Portable:0"),
    ("Portable:99", "has 1 device(s), numbered from 0"),
])
def test_a_bad_opencl_device_index_is_one_line(tiny_build_dir, value, message):
    pytest.importorskip("pyopencl")
    from cnnc.backends import opencl

    opencl._pick_device.cache_clear()              # the choice is made once per process
    try:
        err = user_error(cli("run", tiny_build_dir, "--backend", "opencl", "--save-dir", tiny_build_dir / "none",
                             "-q", env={"CNNC_OPENCL_DEVICE": value}))
    finally:
        opencl._pick_device.cache_clear()
    if "matches no OpenCL platform" in err:
        pytest.skip("no PoCL platform here")
    assert err.startswith(f"error: CNNC_OPENCL_DEVICE={value!r}") and message in err
    assert len(err.strip().splitlines()) == 1


def test_an_infinite_tgt_factor_in_an_imported_config(tmp_path, repo_root):
    layers = repo_root / "tests/ccn2/layers-cifar10-11pct.cfg"
    text = (repo_root / "tests/ccn2/layer-params-cifar10-11pct.cfg").read_text()
    text = replace_once(text, "[conv1]\nepsW=0.001", "[conv1]\nepsW=exp[base=0.001;tgtFactor=1e400]")
    params = write(tmp_path, text, "params.cfg")
    err = user_error(cli("import", layers, params, "--input-shape", "data=3x24x24"))
    assert err.startswith(f"{params}:14:6: error: 'epsW': tgtFactor=inf; cnnc's schedules need a "
                          "tgtFactor of at least 1\n")
