"""`cnnc predict`: the most probable classes of image files under trained parameters.

Each image is prepared as an image folder's test split is: decoded with its shorter side
resized to the size the network was trained at (the stored mean image's, else the network's
input) and centre-cropped to it, scaled to [0, 1], the stored mean subtracted, then
centre-cropped to the network's input.  The test program runs on batches of these, and the
probabilities are read from the softmax that the first cost reads, right after that cost has run.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnc.backends.base import Backend
from cnnc.executor import Executor, NoProbabilities
from cnnc.plan.schedule import Plan
from cnnc.train.data import DataError, eval_batches, fit_images
from cnnc.train.images import decode, scale
from cnnc.train.weights import WeightsError, read_weights, weights_for


@dataclass(frozen=True)
class Labels:
    """What the parameter file says about the data it was trained on, where it says it."""

    classes: tuple[str, ...] | None        # class names, by label
    mean: np.ndarray | None                # [C, H, W] mean training image, subtracted from each input


def read_labels(path: Path, plan: Plan) -> Labels:
    """The optional `classes` and `mean` arrays stored with the parameters, checked against the network."""
    values = read_weights(path, metadata=True)
    classes = values.get("classes")
    if classes is not None:
        if classes.ndim != 1 or classes.dtype.kind not in "US":
            raise WeightsError(f"{path}: 'classes' must be a 1-d array of class names")
        if plan.classes and len(classes) != plan.classes:
            raise WeightsError(f"{path}: {len(classes)} class names, but the network '{plan.network}' "
                               f"has {plan.classes} classes")
        classes = tuple(str(c) for c in classes)
    mean = values.get("mean")
    if mean is not None:
        c, h, w = plan.image_shape
        if mean.ndim == 4 and mean.shape[0] == 1:
            mean = mean[0]
        if mean.ndim != 3 or mean.shape[0] != c or mean.shape[1] < h or mean.shape[2] < w:
            raise WeightsError(f"{path}: 'mean' has shape {mean.shape}; the network takes {c}x{h}x{w} images")
        if mean.dtype.kind != "f" or not np.isfinite(mean).all():
            raise WeightsError(f"{path}: array 'mean' is not finite floating-point data")
        mean = mean.astype(np.float32)
    return Labels(classes, mean)


def prepare(paths: list[Path], plan: Plan, labels: Labels) -> np.ndarray:
    """The images as the network's test input [n, C, H, W], decoded as image folders are."""
    c, h, w = plan.image_shape
    if c not in (1, 3):
        raise DataError(f"the network '{plan.network}' takes {c}-channel images; image files give "
                        f"1 (grey) or 3 (colour) channels")
    mean = labels.mean if labels.mean is not None else np.zeros((c, h, w), np.float32)
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path}: no such image file")
    pixels = np.stack([decode(path, max(mean.shape[1:]), c) for path in paths])
    return fit_images(scale(fit_images(pixels, mean.shape, None), mean), plan.image_shape, None)


def probabilities(plan: Plan, backend: Backend, parameters: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Class probabilities [n, classes] of the images x, from the test program."""
    ex = Executor(plan, backend, parameters)
    labels = np.zeros(len(x), np.int32)
    try:
        return np.concatenate([ex.probabilities(bx)[:real].copy()
                               for bx, _, real in eval_batches(x, labels, plan.batch)])
    except NoProbabilities as e:
        raise DataError(str(e)) from None


def predict(plan: Plan, backend: Backend, weights: Path, images: list[Path], top: int) -> list[list[tuple[str, float]]]:
    """Per image, its `top` most probable classes as (name or index, probability), best first."""
    parameters = weights_for(plan, weights)
    labels = read_labels(weights, plan)
    probs = probabilities(plan, backend, parameters, prepare(images, plan, labels))
    names = labels.classes or tuple(str(i) for i in range(plan.classes))
    top = min(top, plan.classes)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :top]
    return [[(names[k], float(p[k])) for k in row] for p, row in zip(probs, order)]
