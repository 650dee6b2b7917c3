"""The model against measurements: per layer and per step, predicted time beside `cnnc bench`'s,
and the relative errors the model's accuracy is judged by (benchmarks/validate_model.py)."""
from __future__ import annotations

import statistics

TIMED_PHASES = ("forward", "backward")     # the phases `cnnc bench` times per layer


def predicted_layer_ms(plan, rooflines: dict[str, dict], program: str = "train") -> dict[str, float]:
    """Per layer, the predicted milliseconds of its forward and backward launches on every device,
    each launch on its own: what `cnnc bench` measures per layer (the backend synchronised
    around every op)."""
    out: dict[str, float] = {}
    for ops in plan.programs[program].values():
        for op in ops:
            if op.kind != "launch" or op.phase not in TIMED_PHASES:
                continue
            layer = plan.kernels[op.kernel].layer
            if layer:
                out[layer] = out.get(layer, 0.0) + rooflines[op.kernel]["time_us"] / 1e3
    return out


def relative_error(predicted: float, measured: float) -> float:
    """(predicted - measured) / measured: +0.2 predicts 20% too slow, -0.2 20% too fast."""
    return (predicted - measured) / measured


def compare_layers(predicted: dict[str, float], measured: dict[str, float]) -> list[dict]:
    """One row per layer both sides have, in the measured order."""
    return [{"layer": name, "predicted_ms": predicted[name], "measured_ms": ms,
             "error": relative_error(predicted[name], ms)}
            for name, ms in measured.items() if name in predicted and ms > 0]


def median_abs_error(rows: list[dict]) -> float | None:
    """The median over rows of |relative error|, the per-layer accuracy figure."""
    return statistics.median(abs(r["error"]) for r in rows) if rows else None
