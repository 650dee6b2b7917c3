"""The training loop behind `cnnc run`: batches in, metrics out.

Evaluates on the test split after every epoch, at the end (and every
`test_freq` steps when asked), appends one JSON object per evaluation to
metrics.jsonl, saves the parameters as weights.npz after every epoch and
writes checkpoints (see checkpoint.py), all written so that a crash never
leaves a half-written file.  A step whose loss or parameters
become NaN or infinite stops training with TrainingDiverged, before anything
non-finite is saved.
"""
from __future__ import annotations

import json
import math
import signal
import threading
import time
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from cnnc.backends.base import Backend
from cnnc.distributed import Transport
from cnnc.executor import Executor, NoProbabilities
from cnnc.plan.schedule import Plan
from cnnc.build import write_atomic
from cnnc.train.checkpoint import Checkpoint, network_fingerprint, save_checkpoint
from cnnc.train.data import DataError, Dataset, eval_batches, fit_images, views
from cnnc.train.health import TrainingDiverged, finite_arrays, json_record, locate_divergence
from cnnc.train.loader import Loader
from cnnc.train.weights import WEIGHTS_FILE, data_metadata, save_weights


@dataclass
class Evaluation:
    epoch: int
    step: int
    train_loss: float
    test_error: float | None            # None: not evaluated (--no-test)
    test_loss: float | None
    images_per_s: float
    backend: str
    ranks: int = 1                      # MPI processes the run is spread over
    costs: dict[str, float] | None = None       # with several cost layers: each one's mean training loss
    coeffs: dict[str, float] | None = None      # and its coeff in the descended sum

    def to_json(self) -> dict:
        tested = {"test_error": self.test_error, "test_loss": self.test_loss} if self.test_error is not None else {}
        costs = {"costs": {k: v if math.isfinite(v) else None for k, v in self.costs.items()},
                 "coeffs": self.coeffs} if self.costs else {}
        return {"epoch": self.epoch, "step": self.step, "train_loss": self.train_loss, **costs, **tested,
                "images_per_s": self.images_per_s, "backend": self.backend, "ranks": self.ranks}


def cost_summary(costs: dict[str, float], coeffs: dict[str, float]) -> str:
    """Every cost's mean loss with its coeff, as cuda-convnet2 prints them: `cost 0.4100 (x1), aux 0.1000 (x0.3)`."""
    return ", ".join(f"{name} {value:.4f} (x{coeffs[name]:g})" for name, value in costs.items())


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


def evaluate(ex: Executor, x: np.ndarray, y: np.ndarray, batch: int, multiview: bool = False) -> tuple[float, float]:
    """(mean loss, error rate) over every case of (x, y), on centre crops where the images are larger
    (with `multiview`, on cuda-convnet2's 10 views instead: see `evaluate_views`)."""
    if multiview and tuple(x.shape[1:]) != tuple(ex.plan.image_shape):
        return evaluate_views(ex, x, y, batch)
    losses, wrong, n = 0.0, 0.0, 0
    for bx, by, real in eval_batches(fit_images(x, ex.plan.image_shape, None), y, batch):
        loss, correct = ex.evaluate(bx, by)
        losses += float(loss[:real].astype(np.float64).sum())
        wrong += float(real - correct[:real].sum())
        n += real
    return losses / n, wrong / n


def evaluate_views(ex: Executor, x: np.ndarray, y: np.ndarray, batch: int) -> tuple[float, float]:
    """(mean loss, error rate) of the first cost from the softmax averaged over the 4 corner crops,
    the centre crop and their mirror images: the loss is -log of the label's averaged
    probability, a case is wrong when its label is not among the `top_k` most probable classes."""
    if ex.transport is not None:
        raise DataError("--multiview-test runs in one process, not under mpiexec")
    top_k = int(ex.plan.costs[0].get("top_k", 1))
    losses, wrong, n = 0.0, 0.0, 0
    for bx, by, real in eval_batches(np.asarray(x, np.float32), y, batch):
        crops = views(bx, ex.plan.image_shape)
        try:
            probs = sum(ex.probabilities(v).astype(np.float64) for v in crops)[:real] / len(crops)
        except NoProbabilities as e:
            raise DataError(f"--multiview-test: {e}") from None
        label_prob = probs[np.arange(real), by[:real]]
        losses += float(-np.log(np.maximum(label_prob, np.finfo(np.float32).tiny)).sum())
        wrong += float((np.sum(probs > label_prob[:, None], axis=1) >= top_k).sum())
        n += real
    return losses / n, wrong / n


def evaluate_parameters(plan: Plan, backend: Backend, ds: Dataset,
                        parameters: dict[str, np.ndarray], multiview: bool = False) -> tuple[float, float]:
    """(mean loss, error rate) of the test split under `parameters`, without training."""
    check_data(plan, ds)
    return evaluate(Executor(plan, backend, parameters), ds.test_x, ds.test_y, plan.batch, multiview)


def train(plan: Plan, backend: Backend, ds: Dataset, epochs: int, save_dir: Path,
          test_freq: int = 0, progress: Callable | None = None,
          parameters: dict[str, np.ndarray] | None = None, *, steps: int | None = None,
          save_freq: int = 0, keep: int = 3, test: bool = True, resume: Checkpoint | None = None,
          build_hash: str = "", transport: Transport | None = None,
          step_timer: Callable | None = None, color_noise: float | None = None,
          multiview: bool = False) -> list[Evaluation]:
    """Train until `steps` steps or `epochs` epochs are done, whichever comes first (that
    number is the learning-rate schedule's total); returns every evaluation (also in
    save_dir/metrics.jsonl).

    A checkpoint is written every `save_freq` steps (0: at the end of every epoch), at the
    end, and when Ctrl-C or SIGTERM arrives (which then takes effect after the step); the
    newest `keep` are kept.  With `resume`, training continues from that checkpoint exactly
    as the run that wrote it would have.

    With a `transport`, every rank calls this alike; rank 0 alone writes files and shows progress.
    `step_timer()`, called before each step, gives that step's per-op timer (see Executor.run) or None.
    `color_noise`: the std of the colour noise added to training batches (None: a resumed
    checkpoint's, else none); `multiview`: evaluate on the 10 views (see `evaluate_views`)."""
    check_data(plan, ds)
    ex = Executor(plan, backend, parameters, transport)
    writes = transport is None or transport.root
    progress = progress if writes else None
    if color_noise is None:
        color_noise = resume.color_noise if resume is not None else 0.0
    loader = Loader(plan, ds, used=ex.local_cases() if transport is not None else None, color_noise=color_noise)
    several_costs = len(plan.costs) > 1
    coeffs = {c["layer"]: float(c["coeff"]) for c in plan.costs}
    cost_sums: dict[str, float] = {}                # the epoch's summed loss of every cost, with several
    per_epoch = loader.per_epoch
    total = per_epoch * epochs if steps is None else min(steps, per_epoch * epochs)
    if writes:
        save_dir.mkdir(parents=True, exist_ok=True)
    metrics = save_dir / "metrics.jsonl"
    step = 0
    if resume is not None:
        _check_data_matches(resume, loader, ds)
        ex.set_parameters(resume.parameters, resume.momenta)
        step = ex.counters["step"] = resume.step
        if writes:
            _drop_metrics_after(metrics, step)
    history: list[Evaluation] = []
    saved = min(step, total) // per_epoch           # the last epoch whose parameters are on disk

    def checkpoint(epoch: int, position: int, loss_sum: float, seen: int,
                   params: dict[str, np.ndarray] | None = None) -> None:
        """`params`: this step's parameters where the caller has already read them."""
        params, momenta = params if params is not None else ex.parameters(), ex.momenta()
        if not (finite_arrays(params) and finite_arrays(momenta)):
            raise _diverged(ex, loader, epoch, state, first_step, step, total, loss, save_dir, saved)
        costs = dict(cost_sums)
        if position == per_epoch:                   # the epoch is done: the next step starts the next one
            epoch, position, loss_sum, seen, costs = epoch + 1, 0, 0.0, 0, {}
        if writes:
            save_checkpoint(save_dir, Checkpoint(
                step=step, total_steps=total, epochs=epochs, steps=steps, parameters=params, momenta=momenta,
                order=loader.order(epoch), epoch=epoch, position=position, epoch_loss=loss_sum, epoch_cases=seen,
                epoch_costs=costs, color_noise=color_noise,
                network=plan.network, fingerprint=network_fingerprint(plan), build_hash=build_hash, seed=plan.seed,
                data=_data_facts(ds, per_epoch), mean=ds.mean), keep)

    loss = np.zeros(1, np.float32)
    with _deferred_signals() as pending:
        for epoch in range(step // per_epoch + 1, (total + per_epoch - 1) // per_epoch + 1):
            begin = (epoch - 1) * per_epoch
            position, stop = step - begin, min(per_epoch, total - begin)
            loss_sum, seen = (resume.epoch_loss, resume.epoch_cases) \
                if resume is not None and position and resume.epoch == epoch else (0.0, 0)
            cost_sums.clear()
            if several_costs:
                cost_sums.update(dict.fromkeys(coeffs, 0.0))
                if resume is not None and position and resume.epoch == epoch:
                    cost_sums.update({k: v for k, v in resume.epoch_costs.items() if k in coeffs})
            t0, seen_before = time.perf_counter(), seen
            # counts the run's steps, not the epoch's, so that its ETA is the time left to the run's end
            bar = progress(total=total, initial=step, desc=f"epoch {epoch}/{epochs}") if progress else None
            state, first_step = ex.snapshot(), step          # what a replay after a divergence starts from
            with closing(loader.epoch(epoch, position, stop)) as batches:
                for x, by in batches:
                    started = time.perf_counter()
                    loss, correct = ex.train_step(x, by, step / total, step_timer() if step_timer else None)
                    if transport is not None:
                        transport.step_took(time.perf_counter() - started)
                    step += 1
                    position += 1
                    if not np.isfinite(loss).all() or ex.parameters_flagged():
                        if bar:
                            bar.close()
                        raise _diverged(ex, loader, epoch, state, first_step, step, total, loss, save_dir, saved)
                    loss_sum += float(loss.astype(np.float64).sum())
                    if several_costs:
                        for name, values in ex.cost_losses().items():
                            cost_sums[name] += float(values.astype(np.float64).sum())
                    seen += len(by)
                    rate = (seen - seen_before) / max(time.perf_counter() - t0, 1e-9)
                    if bar:
                        bar.update(1)
                        shown = {"costs": cost_summary({k: v / seen for k, v in cost_sums.items()}, coeffs)} \
                            if several_costs else {}
                        bar.set_postfix(loss=f"{loss_sum / seen:.4f}", err=f"{1 - float(correct.mean()):.3f}",
                                        img_s=f"{rate:.0f}", **shown)
                    epoch_done, last = position == per_epoch, step == total
                    if epoch_done or last or (test_freq and step % test_freq == 0):
                        history.append(_record(ex, ds, plan, epoch, step, loss_sum / seen, rate, backend,
                                               metrics if writes else None, test, multiview,
                                               {k: v / seen for k, v in cost_sums.items()}, coeffs))
                    params = None
                    if epoch_done or last:
                        params = ex.parameters()
                        if not finite_arrays(params):       # only a plan without the parameter check gets here
                            raise _diverged(ex, loader, epoch, state, first_step, step, total, loss, save_dir,
                                            saved)
                        if writes:                               # after every epoch, atomically
                            save_weights(save_dir / WEIGHTS_FILE, params, data_metadata(ds.class_names, ds.mean))
                        saved = epoch if epoch_done else saved
                    if last or pending or (step % save_freq == 0 if save_freq else epoch_done):
                        checkpoint(epoch, position, loss_sum, seen, params)
                    if pending:
                        if bar:
                            bar.close()
                        _raise_pending(pending)
            if bar:
                bar.close()
    if transport is not None:
        transport.finish()
    return history


def _data_facts(ds: Dataset, per_epoch: int) -> dict:
    facts = {"name": ds.name, "train_cases": ds.n_train, "batches_per_epoch": per_epoch}
    if ds.class_names:
        facts["class_names"] = [str(n) for n in ds.class_names]
    return facts


def _check_data_matches(ck: Checkpoint, loader: Loader, ds: Dataset) -> None:
    """A resumed run must see the data the checkpoint was written with, in the same order."""
    facts = _data_facts(ds, loader.per_epoch)
    same = ({k: facts.get(k) for k in ("train_cases", "batches_per_epoch")}
            == {k: ck.data.get(k) for k in ("train_cases", "batches_per_epoch")}
            and np.array_equal(loader.order(ck.epoch), ck.order))
    if same and ds.mean is not None and ck.mean is not None:
        same = np.shape(ds.mean) == ck.mean.shape and np.array_equal(np.asarray(ds.mean, np.float32), ck.mean)
    if not same:
        raise DataError(f"{ds.name}: not the data the checkpoint at step {ck.step} was trained on "
                        f"({ck.data.get('name')}, {ck.data.get('train_cases')} training cases)")


def _drop_metrics_after(metrics: Path, step: int) -> None:
    """Forget evaluations of steps past the checkpoint: the resumed run makes them again."""
    if not metrics.is_file():
        return
    lines = metrics.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            record_step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            continue                        # a torn or foreign line
        if isinstance(record_step, int) and record_step <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if kept != lines:
        write_atomic(metrics, "".join(kept))


@contextmanager
def _deferred_signals() -> Iterator[list[int]]:
    """Hold Ctrl-C and SIGTERM until the current step is done (a second one acts at once):
    the loop writes a checkpoint, then `_raise_pending` delivers the signal as it would have
    been.  Signals this process ignores stay ignored; only the main thread can take them."""
    pending: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield pending
        return
    previous = {}

    def hold(signum, frame) -> None:
        if pending:
            _restore(previous)
            signal.raise_signal(signum)
        pending.append(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) not in (signal.SIG_IGN, None):
            previous[sig] = signal.signal(sig, hold)
    try:
        yield pending
    finally:
        _restore(previous)


def _restore(handlers: dict) -> None:
    for sig, handler in list(handlers.items()):
        signal.signal(sig, handler)
        del handlers[sig]


def _raise_pending(pending: list[int]) -> None:
    """Deliver the held signal again: with one already pending, `_deferred_signals` hands it
    to the handler that was there before training (KeyboardInterrupt for Ctrl-C)."""
    signal.raise_signal(pending[0])


def _diverged(ex: Executor, loader: Loader, epoch: int, state: dict, first_step: int, step: int, total: int,
              loss: np.ndarray, save_dir: Path, saved: int) -> TrainingDiverged:
    """The error for a divergence at (1-based) `step`, naming the first layer that went
    non-finite, found by replaying from `state`, taken before step `first_step` of `epoch`
    (the epoch's start, or where a resumed run began)."""
    total_loss = float(loss.astype(np.float64).sum())
    reason = f"the loss is {total_loss}" if not math.isfinite(total_loss) else \
        "a parameter is not finite after the update"
    if ex.transport is not None:        # the replay stops at the first bad launch, which one rank alone sees
        found = "run it as one process to find the first non-finite value"
    else:
        batches = loader.epoch(epoch, first_step - (epoch - 1) * loader.per_epoch)
        with closing(batches):
            where = locate_divergence(ex, state, first_step, step - 1, total, batches)
        found = f"first non-finite value: {where}" if where else "the replayed step produced no non-finite value"
    path = save_dir / WEIGHTS_FILE
    kept = f"{path} holds epoch {saved}" if saved else f"{path} was not written"
    return TrainingDiverged(f"training diverged at step {step} (epoch {epoch}): {reason}; {found}; {kept}")


def _record(ex, ds, plan, epoch, step, train_loss, rate, backend, metrics: Path | None,
            test: bool, multiview: bool = False, costs: dict[str, float] | None = None,
            coeffs: dict[str, float] | None = None) -> Evaluation:
    """Evaluate (on every rank) and append the record to `metrics` (None: another rank writes it)."""
    test_loss, test_error = evaluate(ex, ds.test_x, ds.test_y, plan.batch, multiview) if test else (None, None)
    ev = Evaluation(epoch, step, train_loss, test_error, test_loss, rate, backend.name,
                    ex.transport.size if ex.transport is not None else 1, costs or None, coeffs if costs else None)
    if metrics is None:
        return ev
    with open(metrics, "a") as f:          # one whole line per write: a crash loses at most this line
        f.write(json.dumps(json_record(ev.to_json()), allow_nan=False) + "\n")
    return ev
