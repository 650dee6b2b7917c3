"""cnnc bench: per-layer timings and throughput from the CLI (numbers are not asserted)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cnnc.cli import main

ROOT = Path(__file__).parent.parent


def test_bench_reports_every_layer(tmp_path):
    runner = CliRunner()
    assert runner.invoke(main, ["compile", str(ROOT / "examples" / "digits.cnn"), "-o", str(tmp_path),
                                "--no-nvcc"]).exit_code == 0
    result = runner.invoke(main, ["bench", str(tmp_path), "--backend", "reference", "--steps", "1"])
    assert result.exit_code == 0, result.output
    for layer in ("conv1", "conv2", "pool2", "fc3"):
        assert f"  {layer} " in result.output
    assert "images/s" in result.output.splitlines()[0]
    result = runner.invoke(main, ["bench", str(tmp_path), "--backend", "reference", "--steps", "1",
                                  "--batch", "8", "--json"])
    data = json.loads(result.output)
    assert data["batch"] == 8 and data["images_per_s"] > 0
    assert [l["layer"] for l in data["layers"]][:2] == ["conv1", "conv2"]
    assert all(l["forward_flops"] > 0 for l in data["layers"] if l["layer"].startswith(("conv", "fc")))


def test_bench_against_torch(tmp_path):
    runner = CliRunner()
    runner.invoke(main, ["compile", str(ROOT / "examples" / "digits.cnn"), "-o", str(tmp_path), "--no-nvcc"])
    result = runner.invoke(main, ["bench", str(tmp_path), "--backend", "reference", "--steps", "1",
                                  "--against", "torch"])
    if importlib.util.find_spec("torch") is None:
        assert result.exit_code == 2 and "needs PyTorch" in result.output
    else:
        assert result.exit_code == 0, result.output
        assert "PyTorch" in result.output.splitlines()[-1]


class _TorchWithoutCuda:
    """Just enough of a CPU-only PyTorch for the device choice."""
    __version__ = "2.x+cpu"

    class cuda:
        @staticmethod
        def is_available():
            return False


class _TorchWithCuda(_TorchWithoutCuda):
    class cuda:
        @staticmethod
        def is_available():
            return True


def test_torch_is_timed_on_the_same_kind_of_device():
    from cnnc.backends.base import BackendError
    from cnnc.bench_torch import torch_device
    assert torch_device(_TorchWithCuda, "opencl", 1) == "cpu"          # PoCL runs on the host CPU
    assert torch_device(_TorchWithCuda, "reference", 0) == "cpu"
    assert torch_device(_TorchWithCuda, "cuda", 1) == "cuda:1"         # the GPU of logical device 0
    with pytest.raises(BackendError, match="PyTorch built with CUDA"):
        torch_device(_TorchWithoutCuda, "cuda", 0)                     # never quietly against the CPU
