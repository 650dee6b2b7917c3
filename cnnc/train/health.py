"""Numerical health of a training run: noticing divergence, naming where it began, and
keeping non-finite numbers out of what is written to disk.

The check per step is cheap: the host already holds the step's loss, and the training
program ends with one flag per device that the parameter check sets (see
`Executor.parameters_flagged`).  Only after a failure is anything scanned: the epoch is
replayed from the snapshot taken at its start (training is deterministic per backend)
and the failing step runs with every launch's outputs read back after it.
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np

from cnnc.executor import Executor
from cnnc.ops import OPS, Role
from cnnc.plan.schedule import Op


class TrainingDiverged(Exception):
    """A loss or a parameter became NaN or infinite; the message says where, in one line."""


class _Found(Exception):
    def __init__(self, where: str):
        self.where = where


def finite_arrays(values: dict[str, np.ndarray]) -> bool:
    return all(np.isfinite(v).all() for v in values.values())


def json_record(record: dict) -> dict:
    """A metrics record that is valid JSON: NaN and infinities become null, and their keys
    are listed under "nonfinite"."""
    bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
    if not bad:
        return record
    return {**{k: None if k in bad else v for k, v in record.items()}, "nonfinite": bad}


def _describe(ex: Executor, op: Op, buffer_id: str) -> str:
    """`layer 'fc3' (backward, gradient of its input)`: who wrote a buffer, and what it is."""
    kernel, buffer = ex.plan.kernels[op.kernel], ex.plan.buffers[buffer_id]
    layer = kernel.layer or buffer.layer
    for q in ex.plan.parameters:
        if buffer_id in q.grads:
            what = f"{'exchange' if op.phase == 'exchange' else 'backward'}, gradient of its {q.name}"
            break
        if buffer_id in q.buffers or buffer_id in q.incs:
            what = f"update, {'momentum of ' if buffer_id in q.incs else ''}its {q.name}"
            break
    else:
        if op.phase == "forward":
            what = "forward, loss" if buffer.role == "cost" else "forward output"
        else:
            what = f"backward, gradient of its {'output' if buffer.layer == layer else 'input'}"
    return f"layer '{layer}' ({what})"


def first_nonfinite(ex: Executor, x: np.ndarray, y: np.ndarray, progress: float) -> str | None:
    """Run one training step with every launch's float outputs checked as soon as it has run;
    describes the first holding a NaN or an infinity, or None when none does."""
    def check(device: int, op: Op, seconds: float) -> None:
        if op.kind != "launch":
            return
        roles = dict(OPS[ex.plan.kernels[op.kernel].op].args)
        for name, buffer_id in ex.buffer_args(op).items():
            if roles[name] is not Role.IN and ex.plan.buffers[buffer_id].dtype == "f32" \
                    and not np.isfinite(ex.read(buffer_id)).all():
                raise _Found(_describe(ex, op, buffer_id))

    try:
        ex.train_step(x, y, progress, timer=check)
    except _Found as found:
        return found.where
    return None


def locate_divergence(ex: Executor, state: dict[str, np.ndarray], first_step: int, failing_step: int,
                      total: int, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> str | None:
    """Restore the epoch's starting `state` (taken before step `first_step`, counting from 0),
    replay the epoch's `batches` up to the failing one, and run that with every launch checked."""
    ex.restore(state)
    ex.counters["step"] = first_step
    for step, (x, y) in enumerate(batches, start=first_step):
        if step == failing_step:
            return first_nonfinite(ex, x, y, step / total)
        ex.train_step(x, y, step / total)
    return None
