"""The training loop behind `cnnc run`: batches in, metrics out.

Evaluates on the test split after every epoch (and every `test_freq` steps
when asked), appends one JSON object per evaluation to metrics.jsonl, and
saves the parameters as weights.npz after every epoch, both written so that
a crash never leaves a half-written file.  A step whose loss or parameters
become NaN or infinite stops training with TrainingDiverged, before anything
non-finite is saved.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from cnnc.backends.base import Backend
from cnnc.executor import Executor
from cnnc.plan.schedule import Plan
from cnnc.train.data import DataError, Dataset, batches_per_epoch, eval_batches, fit_images, train_batches
from cnnc.train.health import TrainingDiverged, finite_arrays, json_record, locate_divergence
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
    for split, labels in (("train", ds.train_y), ("test", ds.test_y)):
        if labels.size and (labels.min() < 0 or (plan.classes and labels.max() >= plan.classes)):
            bad = labels.min() if labels.min() < 0 else labels.max()
            raise DataError(f"{ds.name}: the {split} split has label {bad}, but the network's labels are "
                            f"0..{plan.classes - 1}")
    if plan.classes and ds.classes > plan.classes:
        raise DataError(f"{ds.name}: {ds.classes} classes but the network's labels have {plan.classes}")
    if ds.n_train < plan.batch:
        raise DataError(f"{ds.name}: the train split has {ds.n_train} cases, fewer than one batch "
                        f"of {plan.batch}")
    if ds.n_test == 0:
        raise DataError(f"{ds.name}: the test split is empty; training could not be evaluated")


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
    step, saved = 0, 0                   # saved: the last epoch whose parameters are on disk
    for epoch in range(1, epochs + 1):
        loss_sum, seen, t0 = 0.0, 0, time.perf_counter()
        bar = progress(total=steps, desc=f"epoch {epoch}/{epochs}") if progress else None
        state, first_step = ex.snapshot(), step          # what a replay after a divergence starts from
        for x, by in epoch_batches(plan, ds, epoch):
            loss, correct = ex.train_step(x, by, step / total)
            step += 1
            if not np.isfinite(loss).all() or ex.parameters_flagged():
                if bar:
                    bar.close()
                raise _diverged(ex, ds, epoch, state, first_step, step, total, loss, save_dir, saved)
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
        params = ex.parameters()
        if not finite_arrays(params):       # only a plan without the parameter check gets here
            raise _diverged(ex, ds, epoch, state, first_step, step, total, loss, save_dir, saved)
        save_weights(save_dir / WEIGHTS_FILE, params)      # after every epoch, atomically
        saved = epoch
    return history


def epoch_batches(plan: Plan, ds: Dataset, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The epoch's training minibatches, cropped: the same every time they are asked for,
    which is what lets a divergence be replayed."""
    crops = np.random.default_rng([plan.seed, epoch, 1])
    return ((fit_images(bx, plan.image_shape, crops), by)
            for bx, by in train_batches(ds, plan.batch, epoch, plan.seed))


def _diverged(ex: Executor, ds: Dataset, epoch: int, state: dict, first_step: int, step: int, total: int,
              loss: np.ndarray, save_dir: Path, saved: int) -> TrainingDiverged:
    """The error for a divergence at (1-based) `step`, naming the first layer that went
    non-finite, found by replaying the epoch from its starting `state`."""
    total_loss = float(loss.astype(np.float64).sum())
    reason = f"the loss is {total_loss}" if not math.isfinite(total_loss) else \
        "a parameter is not finite after the update"
    where = locate_divergence(ex, state, first_step, step - 1, total, epoch_batches(ex.plan, ds, epoch))
    found = f"first non-finite value: {where}" if where else "the replayed step produced no non-finite value"
    path = save_dir / WEIGHTS_FILE
    kept = f"{path} holds epoch {saved}" if saved else f"{path} was not written"
    return TrainingDiverged(f"training diverged at step {step} (epoch {epoch}): {reason}; {found}; {kept}")


def _record(ex, ds, plan, epoch, step, train_loss, rate, backend, metrics: Path) -> Evaluation:
    test_loss, test_error = evaluate(ex, ds.test_x, ds.test_y, plan.batch)
    ev = Evaluation(epoch, step, train_loss, test_error, test_loss, rate, backend.name)
    with open(metrics, "a") as f:          # one whole line per write: a crash loses at most this line
        f.write(json.dumps(json_record(ev.to_json()), allow_nan=False) + "\n")
    return ev
