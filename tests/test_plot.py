"""cnnc plot: a run's metrics.jsonl drawn as a PNG, null values included."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cnnc.cli import main

pytest.importorskip("matplotlib")
Image = pytest.importorskip("PIL.Image")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TRAIN_COLOUR, TEST_COLOUR = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)     # matplotlib's C0 and C1


def write_metrics(save_dir: Path, records: list[dict]) -> None:
    save_dir.mkdir(parents=True, exist_ok=True)
    (save_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def record(step: int, train_loss, test_loss, test_error) -> dict:
    r = {"epoch": 1, "step": step, "train_loss": train_loss, "test_error": test_error, "test_loss": test_loss,
         "images_per_s": 100.0, "backend": "reference"}
    bad = [k for k, v in r.items() if v is None]
    return dict(r, nonfinite=bad) if bad else r


def pixels_of(image: np.ndarray, colour) -> int:
    return int(np.all(np.abs(image[..., :3].astype(int) - colour) <= 8, axis=-1).sum())


def test_plot_draws_train_and_test_curves_with_nulls(tmp_path):
    """A diverged record (train loss null, listed under "nonfinite") leaves a gap, not an error."""
    save = tmp_path / "run"
    write_metrics(save, [record(10, 2.3, 2.2, 0.8), record(20, 1.5, 1.2, 0.4), record(30, None, 0.9, 0.3),
                         record(40, 0.5, 0.6, 0.2)])
    out = tmp_path / "curves.png"
    result = CliRunner().invoke(main, ["plot", str(save), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output == f"plotted 4 records -> {out}\n"
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    image = np.asarray(Image.open(out).convert("RGB"))
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert pixels_of(image, TRAIN_COLOUR) > 50 and pixels_of(image, TEST_COLOUR) > 50


def test_plot_of_a_record_with_only_nulls_still_draws(tmp_path):
    save = tmp_path / "run"
    write_metrics(save, [record(1, None, None, None)])
    out = tmp_path / "curves.png"
    result = CliRunner().invoke(main, ["plot", str(save), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.parametrize("case, message", [
    ("missing", "{save}/metrics.jsonl: no such metrics file (cnnc run writes SAVE_DIR/metrics.jsonl)"),
    ("empty", "{save}/metrics.jsonl: no records yet; nothing to plot"),
    ("garbage", "{save}/metrics.jsonl:2: not a JSON record (Expecting value)"),
    ("torn-only", "{save}/metrics.jsonl: no records yet; nothing to plot"),
    ("no-step", "{save}/metrics.jsonl:1: a metrics record is a JSON object with an integer 'step'"),
])
def test_unusable_metrics_are_one_line_errors(tmp_path, case, message):
    save = tmp_path / "run"
    save.mkdir()
    if case == "empty":
        (save / "metrics.jsonl").write_text("")
    elif case == "garbage":
        (save / "metrics.jsonl").write_text(json.dumps(record(1, 1.0, 1.0, 0.5)) + "\n[1, oops]\n")
    elif case == "torn-only":
        (save / "metrics.jsonl").write_text('{"epoch": 1, "st')
    elif case == "no-step":
        (save / "metrics.jsonl").write_text('{"epoch": 1}\n')
    out = tmp_path / "curves.png"
    result = CliRunner().invoke(main, ["plot", str(save), "-o", str(out)])
    assert result.exit_code == 2
    assert result.output == "error: " + message.format(save=save) + "\n"
    assert not out.exists()


def test_a_half_written_last_line_is_left_out(tmp_path):
    """A run killed while appending a record leaves a line without its newline."""
    save = tmp_path / "run"
    write_metrics(save, [record(10, 2.3, 2.2, 0.8), record(20, 1.5, 1.2, 0.4)])
    with open(save / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 1, "step": 30, "train_lo')
    result = CliRunner().invoke(main, ["plot", str(save), "-o", str(tmp_path / "curves.png")])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("plotted 2 records")


def test_unknown_image_format_is_refused(tmp_path):
    save = tmp_path / "run"
    write_metrics(save, [record(1, 1.0, 1.0, 0.5)])
    result = CliRunner().invoke(main, ["plot", str(save), "-o", str(tmp_path / "curves.xyz")])
    assert result.exit_code == 2
    assert result.output == f"error: {tmp_path / 'curves.xyz'}: cannot draw a .xyz file; use .png, .svg or .pdf\n"
