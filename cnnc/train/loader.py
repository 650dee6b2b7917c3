"""The one loader of training minibatches, for every data source and backend.

Batch `i` of epoch `e` is a function of (seed, e, i) alone: the cases come from the
epoch's shuffle and the crops and flips from a generator keyed by all three, so a run
resumed at any step sees exactly the batches an uninterrupted run would have, and a
divergence can be replayed.  Batches are prepared ahead in a thread, into a bounded
queue, so that loading overlaps the device's work.
"""
from __future__ import annotations

import queue
import threading
from typing import Iterator

import numpy as np

from cnnc.plan.schedule import Plan
from cnnc.train.data import Dataset, add_color_noise, batches_per_epoch, color_components, epoch_order, fit_images

AHEAD = 3                   # batches prepared ahead of the one being trained on
_DONE = object()


class Loader:
    """`used`: the minibatch positions to read (the cases of one rank's devices); the others
    stay zero, and the crops are drawn for the whole batch, so every case is as in a full load.
    `color_noise`: the std of AlexNet's colour noise along the training pixels' principal
    components (0: none), drawn per batch from its own generator keyed by (seed, epoch, step),
    so turning it on leaves the crops and flips as they were."""

    def __init__(self, plan: Plan, ds: Dataset, ahead: int = AHEAD, used: np.ndarray | None = None,
                 color_noise: float = 0.0):
        self.plan, self.ds, self.ahead = plan, ds, ahead
        self.used = None if used is None or used.all() else used
        self.color_noise = color_noise
        self.components = color_components(ds.train_x) if color_noise else None
        self.per_epoch = batches_per_epoch(ds, plan.batch)
        self._orders: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's shuffle of the training cases (what a checkpoint records as the data order)."""
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(self.ds, epoch, self.plan.seed)}
        return self._orders[epoch]

    def batch(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Minibatch `index` (from 0) of `epoch` (from 1), cropped to the network's input."""
        b = self.plan.batch
        cases = self.order(epoch)[index * b:(index + 1) * b]
        crops = np.random.default_rng([self.plan.seed, epoch, 1, index])
        if self.used is None:
            x = np.ascontiguousarray(self.ds.train_x[cases], dtype=np.float32)
            y = np.ascontiguousarray(self.ds.train_y[cases], dtype=np.int32)
        else:
            x = np.zeros((len(cases),) + tuple(self.ds.image_shape), np.float32)
            y = np.zeros(len(cases), np.int32)
            x[self.used] = self.ds.train_x[cases[self.used]]
            y[self.used] = self.ds.train_y[cases[self.used]]
        x = fit_images(x, self.plan.image_shape, crops)
        if self.components is not None:
            x = np.array(x, np.float32)         # fit_images may hand back x itself
            add_color_noise(x, self.components, self.color_noise,
                            np.random.default_rng([self.plan.seed, epoch, 2, index]))
        return x, y

    def epoch(self, epoch: int, start: int = 0, stop: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Batches `start` .. `stop` - 1 of `epoch`, prepared ahead in a thread; closing the
        iterator (or dropping it) stops the thread."""
        stop = self.per_epoch if stop is None else stop
        ready: queue.Queue = queue.Queue(maxsize=self.ahead)
        cancelled = threading.Event()

        def prepare() -> None:
            try:
                for i in range(start, stop):
                    item = self.batch(epoch, i)
                    while not cancelled.is_set():
                        try:
                            ready.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            pass
                    if cancelled.is_set():
                        return
                item = _DONE
            except BaseException as e:          # handed to the consumer, raised there
                item = e
            while not cancelled.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return
                except queue.Full:
                    pass

        worker = threading.Thread(target=prepare, name=f"cnnc-loader-epoch-{epoch}", daemon=True)
        worker.start()
        try:
            while True:
                item = ready.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancelled.set()
            worker.join()
