"""cnnc bench --inference: forward-only steps, timed as evaluation runs them."""
from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from cnnc.cli import main

ROOT = Path(__file__).parent.parent


def test_bench_inference_times_forward_only_steps(tmp_path):
    runner = CliRunner()
    assert runner.invoke(main, ["compile", str(ROOT / "examples" / "digits.cnn"), "-o", str(tmp_path),
                                "--no-nvcc"]).exit_code == 0
    result = runner.invoke(main, ["bench", str(tmp_path), "--backend", "reference", "--steps", "1",
                                  "--inference"])
    assert result.exit_code == 0, result.output
    first = result.output.splitlines()[0]
    assert "inference (forward only)" in first and "ms per step" in first and "images/s" in first
    assert "fwd ms" in result.output and "bwd ms" not in result.output
    result = runner.invoke(main, ["bench", str(tmp_path), "--backend", "reference", "--steps", "1",
                                  "--inference", "--json"])
    data = json.loads(result.output)
    assert data["inference"] is True and data["images_per_s"] > 0 and data["step_ms"] > 0
    assert [l["layer"] for l in data["layers"]][:2] == ["conv1", "conv2"]
    assert all(l["forward_ms"] > 0 and l["backward_ms"] == 0 and l["backward_flops"] == 0 for l in data["layers"])
    assert not {"backward", "exchange", "update"} & set(data["other_ms"]), data["other_ms"]


def test_bench_inference_refuses_against_torch(tmp_path):
    runner = CliRunner()
    runner.invoke(main, ["compile", str(ROOT / "examples" / "digits.cnn"), "-o", str(tmp_path), "--no-nvcc"])
    result = runner.invoke(main, ["bench", str(tmp_path), "--inference", "--against", "torch"])
    assert result.exit_code == 2
    assert "--against torch times training steps; leave out --inference" in result.output
