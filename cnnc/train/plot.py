"""`cnnc plot`: a training run's loss and error per step, drawn from its metrics.jsonl.

Every record that holds a value for a series becomes a point of it; a value written as
null (NaN or infinite when it was measured) leaves a gap rather than ending the plot,
so a run that diverged still shows how it got there.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from cnnc.train.data import DataError

METRICS_FILE = "metrics.jsonl"

# (panel title, [(record key, legend label)]): what is drawn, where the records have it
PANELS = (
    ("loss", (("train_loss", "train"), ("test_loss", "test"))),
    ("error", (("train_error", "train"), ("test_error", "test"))),
)
COLOURS = {"train": "C0", "test": "C1"}        # one colour per split in every panel


def read_metrics(save_dir: Path) -> list[dict]:
    """The records of SAVE_DIR/metrics.jsonl (or of that file given itself), or a DataError."""
    path = Path(save_dir)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise DataError(f"{path}: no such metrics file (cnnc run writes SAVE_DIR/{METRICS_FILE})")
    records = []
    lines = path.read_text(errors="replace").split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):       # no newline yet: a run writing it now, or killed while it wrote
                break
            raise DataError(f"{path}:{number}: not a JSON record ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise DataError(f"{path}:{number}: a metrics record is a JSON object with an integer 'step'")
        records.append(record)
    if not records:
        raise DataError(f"{path}: no records yet; nothing to plot")
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key`: NaN where the record holds null or a non-number, so the line
    breaks there; empty when no record has the key."""
    if not any(key in r for r in records):
        return [], []
    steps, values = [], []
    for r in records:
        if key in r:
            v = r[key]
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            steps.append(r["step"])
            values.append(float(v) if ok else math.nan)
    return steps, values


def plot(save_dir: Path, out: Path) -> int:
    """Draw the run's curves into `out` (the format follows its suffix, PNG by default);
    returns how many records were drawn."""
    try:
        import matplotlib
    except ImportError:
        raise DataError("cnnc plot needs matplotlib: pip install 'cnnc[plot]'") from None
    matplotlib.use("Agg")                 # files only: no display needed
    import matplotlib.pyplot as plt

    records = read_metrics(save_dir)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(11, 4))
    try:
        for ax, (title, keys) in zip(axes, PANELS):
            for key, label in keys:
                steps, values = series(records, key)
                if steps:
                    ax.plot(steps, values, marker="o", markersize=3, label=label, color=COLOURS[label])
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend()
        fig.tight_layout()
        kind = out.suffix[1:].lower() or "png"
        if kind not in fig.canvas.get_supported_filetypes():
            raise DataError(f"{out}: cannot draw a .{kind} file; use .png, .svg or .pdf")
        fig.savefig(out, format=kind)
    finally:
        plt.close(fig)
    return len(records)
