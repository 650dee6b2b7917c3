"""The training loop behind `cnnc run`: batches in, metrics out.

Evaluates on the test split after every epoch (and every `test_freq` steps
when asked), appends one JSON object per evaluation to metrics.jsonl, and
saves the parameters as weights.npz after every epoch, both written so that
a crash never leaves a half-written file.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from cnnc.backends.base import Backend
from cnnc.executor import Executor
from cnnc.plan.schedule import Plan
from cnnc.train.data import DataError, Dataset, batches_per_epoch, eval_batches, fit_images, train_batches
from cnnc.train.weights import WEIGHTS_FILE, save_weights


@dataclass
class Evaluation:
    epoch: int
    step: int
    train_loss: float
    test_error: float
    test_loss: float
    images_per_s: float
    backend: str

    def to_json(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "train_loss": self.train_loss,
                "test_error": self.test_error, "test_loss": self.test_loss,
                "images_per_s": self.images_per_s, "backend": self.backend}


def check_data(plan: Plan, ds: Dataset) -> None:
    """The data must have the image shape the network was compiled for, or be larger
    in height and width with the same channels (then it is cropped to it)."""
    c, h, w = ds.image_shape
    nc, nh, nw = plan.image_shape
    if c != nc or h < nh or w < nw:
        want = "x".join(map(str, plan.image_shape))
        got = "x".join(map(str, ds.image_shape))
        raise DataError(f"{ds.name}: images are {got} but the network '{plan.network}' takes {want}")
    if plan.classes and ds.classes > plan.classes:
        raise DataError(f"{ds.name}: {ds.classes} classes but the network's labels have {plan.classes}")


def evaluate(ex: Executor, x: np.ndarray, y: np.ndarray, batch: int) -> tuple[float, float]:
    """(mean loss, error rate) over every case of (x, y), on centre crops where the images are larger."""
    losses, wrong, n = 0.0, 0.0, 0
    for bx, by, real in eval_batches(fit_images(x, ex.plan.image_shape, None), y, batch):
        loss, correct = ex.evaluate(bx, by)
        losses += float(loss[:real].astype(np.float64).sum())
        wrong += float(real - correct[:real].sum())
        n += real
    return losses / n, wrong / n


def train(plan: Plan, backend: Backend, ds: Dataset, epochs: int, save_dir: Path,
          test_freq: int = 0, progress: Callable | None = None,
          parameters: dict[str, np.ndarray] | None = None) -> list[Evaluation]:
    """Train for `epochs` epochs; returns every evaluation (also in save_dir/metrics.jsonl)."""
    check_data(plan, ds)
    ex = Executor(plan, backend, parameters)
    save_dir.mkdir(parents=True, exist_ok=True)
    metrics = save_dir / "metrics.jsonl"
    steps = batches_per_epoch(ds, plan.batch)
    total = steps * epochs
    history: list[Evaluation] = []
    step = 0
    for epoch in range(1, epochs + 1):
        loss_sum, seen, t0 = 0.0, 0, time.perf_counter()
        bar = progress(total=steps, desc=f"epoch {epoch}/{epochs}") if progress else None
        crops = np.random.default_rng([plan.seed, epoch, 1])
        for bx, by in train_batches(ds, plan.batch, epoch, plan.seed):
            loss, correct = ex.train_step(fit_images(bx, plan.image_shape, crops), by, step / total)
            step += 1
            loss_sum += float(loss.astype(np.float64).sum())
            seen += len(by)
            rate = seen / max(time.perf_counter() - t0, 1e-9)
            if bar:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", err=f"{1 - float(correct.mean()):.3f}",
                                img_s=f"{rate:.0f}")
            if test_freq and step % test_freq == 0 and step % steps:
                history.append(_record(ex, ds, plan, epoch, step, loss_sum / seen, rate, backend, metrics))
        if bar:
            bar.close()
        rate = seen / max(time.perf_counter() - t0, 1e-9)
        history.append(_record(ex, ds, plan, epoch, step, loss_sum / max(seen, 1), rate, backend, metrics))
        save_weights(save_dir / WEIGHTS_FILE, ex.parameters())      # after every epoch, atomically
    return history


def _record(ex, ds, plan, epoch, step, train_loss, rate, backend, metrics: Path) -> Evaluation:
    test_loss, test_error = evaluate(ex, ds.test_x, ds.test_y, plan.batch)
    ev = Evaluation(epoch, step, train_loss, test_error, test_loss, rate, backend.name)
    with open(metrics, "a") as f:          # one whole line per write: a crash loses at most this line
        f.write(json.dumps(ev.to_json()) + "\n")
    return ev
