"""Training data: the built-in digits set, user .npz files, and batching.

Compiled kernels run on fixed batch sizes, so training only ever sees full
batches and evaluation pads the last batch and says how many rows are real.
Every split and shuffle is derived from explicit seeds with NumPy's own
generators, so a run can be repeated exactly on another machine.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from cnnc.train.arrays import ArchiveError, read_npz

__all__ = [
    "DataError",
    "Dataset",
    "batches_per_epoch",
    "eval_batches",
    "load_dataset",
    "load_digits",
    "load_npz",
    "load_cifar10",
    "fit_images",
    "train_batches",
]

_NPZ_KEYS = ("train_x", "train_y", "test_x", "test_y")

# Pixels of an .npz without a declared `pixel_range` may be anything finite up to
# this magnitude: raw 8- and 16-bit values fit, a unit mix-up (or garbage) does not.
MAX_PIXEL = 1e6


class DataError(Exception):
    """A data source that cannot be used, described in one line."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """Images as float32 [n, C, H, W] (arrays, or for image folders views that index like
    them and read a memory-mapped cache) and integer labels as int32 [n].

    `mean` is what was subtracted from every image (float32 [C, H, W], pixels scaled to
    [0, 1]) and `class_names` names each label, so that what is saved beside the weights
    can prepare and name new images the same way; sources without them leave them empty."""

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: int
    class_names: tuple[str, ...] = ()
    mean: np.ndarray | None = None

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if x.ndim != 4:
                raise DataError(f"{self.name}: {split}_x must be [n, C, H, W], "
                                f"got shape {x.shape}")
            if y.ndim != 1 or len(y) != len(x):
                raise DataError(f"{self.name}: {split}_y must hold one label "
                                f"per image ({len(x)}), got shape {y.shape}")
        if self.train_x.shape[1:] != self.test_x.shape[1:]:
            raise DataError(f"{self.name}: train and test images differ in "
                            f"shape ({self.train_x.shape[1:]} vs "
                            f"{self.test_x.shape[1:]})")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image: what the network's input layer must match."""
        c, h, w = self.train_x.shape[1:]
        return int(c), int(h), int(w)

    @property
    def n_train(self) -> int:
        return int(self.train_x.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.test_x.shape[0])


# --- sources ---------------------------------------------------------------


def _stratified_split(labels: np.ndarray, test_fraction: float,
                      seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class, move round(fraction * count) images to test.

    Done with our own Generator instead of scikit-learn's splitters so the
    split cannot change when scikit-learn changes its sampling.
    """
    rng = np.random.default_rng(seed)
    test_parts = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        n_test = int(np.floor(test_fraction * len(idx) + 0.5))  # half rounds up
        test_parts.append(rng.permutation(idx)[:n_test])
    test_idx = np.sort(np.concatenate(test_parts))
    train_mask = np.ones(len(labels), dtype=bool)
    train_mask[test_idx] = False
    return np.flatnonzero(train_mask), test_idx


def load_digits(test_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 digits (1797 images, 10 classes), ships offline.

    Pixels are scaled to [0, 1] and centred with the train split's per-pixel
    mean, so the test split never influences preprocessing.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as exc:  # pragma: no cover - sklearn is a dependency
        raise DataError("the digits data set needs scikit-learn "
                        "(pip install scikit-learn)") from exc
    bunch = _sk_load_digits()
    x = np.asarray(bunch.data, dtype=np.float64) / 16.0
    y = np.asarray(bunch.target, dtype=np.int32)
    train_idx, test_idx = _stratified_split(y, test_fraction, split_seed)
    mean = x[train_idx].mean(axis=0)
    x = (x - mean).reshape(-1, 1, 8, 8).astype(np.float32)
    return Dataset(
        name="digits",
        train_x=np.ascontiguousarray(x[train_idx]),
        train_y=y[train_idx],
        test_x=np.ascontiguousarray(x[test_idx]),
        test_y=y[test_idx],
        classes=10,
        class_names=tuple(str(d) for d in range(10)),
        mean=mean.reshape(1, 8, 8).astype(np.float32),
    )


def _pixel_range(path: Path, arr: np.ndarray | None) -> tuple[float, float]:
    """The declared [low, high] of every pixel: the archive's `pixel_range`, else +-MAX_PIXEL."""
    if arr is None:
        return -MAX_PIXEL, MAX_PIXEL
    if arr.shape != (2,) or not np.issubdtype(arr.dtype, np.number) or not np.isfinite(arr).all() \
            or not arr[0] <= arr[1] or np.abs(arr).max() > np.finfo(np.float32).max:
        raise DataError(f"{path}: pixel_range must be two finite float32 numbers [low, high], "
                        f"got {arr.tolist()}")
    return float(arr[0]), float(arr[1])


def _images(path: Path, key: str, arr: np.ndarray, pixel_range: tuple[float, float]) -> np.ndarray:
    if arr.ndim == 3:
        arr = arr[:, None, :, :]
    elif arr.ndim != 4:
        raise DataError(f"{path}: {key} must be [n, C, H, W] or [n, H, W], "
                        f"got shape {arr.shape}")
    if arr.dtype.kind not in "biuf":                # complex would lose its imaginary part
        raise DataError(f"{path}: {key} must be numeric, got dtype {arr.dtype}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise DataError(f"{path}: {key} contains NaN or infinite values")
    low, high = pixel_range
    if arr.size and (arr.min() < low or arr.max() > high):
        declared = "its pixel_range" if pixel_range != (-MAX_PIXEL, MAX_PIXEL) else \
            "the limit for data without a pixel_range"
        raise DataError(f"{path}: {key} has pixels from {arr.min():.6g} to {arr.max():.6g}, outside "
                        f"[{low:.6g}, {high:.6g}] ({declared})")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _labels(path: Path, key: str, arr: np.ndarray) -> np.ndarray:
    if arr.ndim != 1:
        raise DataError(f"{path}: {key} must be 1-D, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):     # a float label may have been anything before rounding
        raise DataError(f"{path}: {key} must hold integer class labels, got dtype {arr.dtype} "
                        f"(convert whole numbers with .astype(int))")
    if arr.size and arr.min() < 0:                   # a kernel would read before its buffer
        raise DataError(f"{path}: {key} has negative labels (the smallest is {arr.min()})")
    if arr.size and arr.max() > np.iinfo(np.int32).max:
        raise DataError(f"{path}: {key} has labels beyond int32")
    return arr.astype(np.int32)


def load_npz(path: str | os.PathLike[str]) -> Dataset:
    """A user data set saved with ``np.savez(train_x=..., train_y=..., ...)``, optionally
    with ``classes`` (a scalar) and ``pixel_range`` ([low, high], which every pixel must
    lie in; without it, pixels must lie within +-MAX_PIXEL)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        raw = read_npz(path)
    except ArchiveError as e:
        raise DataError(f"{path}: {e}") from None
    missing = [k for k in _NPZ_KEYS if k not in raw]
    if missing:
        raise DataError(f"{path}: missing array(s) {', '.join(missing)} "
                        f"(expected {', '.join(_NPZ_KEYS)})")
    classes_arr = raw.get("classes")
    pixel_range = _pixel_range(path, raw.get("pixel_range"))

    train_x = _images(path, "train_x", raw["train_x"], pixel_range)
    test_x = _images(path, "test_x", raw["test_x"], pixel_range)
    train_y = _labels(path, "train_y", raw["train_y"])
    test_y = _labels(path, "test_y", raw["test_y"])
    for split, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        if len(x) != len(y):
            raise DataError(f"{path}: {split}_x has {len(x)} images but "
                            f"{split}_y has {len(y)} labels")
    for split, x in (("train", train_x), ("test", test_x)):
        if len(x) == 0:
            raise DataError(f"{path}: the {split} split is empty")
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DataError(f"{path}: train and test images differ in shape "
                        f"({train_x.shape[1:]} vs {test_x.shape[1:]})")

    seen = int(max(train_y.max(initial=0), test_y.max(initial=0))) + 1
    if classes_arr is None:
        classes = seen
    else:
        if classes_arr.ndim != 0 or not np.issubdtype(classes_arr.dtype, np.integer):
            raise DataError(f"{path}: classes must be an integer scalar")
        classes = int(classes_arr)
        if classes < seen:
            raise DataError(f"{path}: classes is {classes} but labels go up "
                            f"to {seen - 1}")
    return Dataset(name=path.stem, train_x=train_x, train_y=train_y,
                   test_x=test_x, test_y=test_y, classes=classes)


CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = "test_batch"
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class _CifarUnpickler(pickle.Unpickler):
    """CIFAR-10's python batches are pickles; allow only what they contain
    (dicts, lists, bytes and numpy arrays), never arbitrary classes."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("builtins", "bytes")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            found = super().find_class(module, name)
            return _empty_only(found) if name == "_reconstruct" else found
        raise pickle.UnpicklingError(f"unexpected object {module}.{name}")


def _empty_only(reconstruct):
    """numpy pickles an array as an empty one filled by its state (whose size must match
    the data it carries); a non-empty shape here would be allocated unchecked."""
    def checked(subtype, shape, dtype):
        if not isinstance(shape, tuple) or any(not isinstance(n, int) or n != 0 for n in shape):
            raise pickle.UnpicklingError(f"array skeleton of shape {shape!r}")
        return reconstruct(subtype, shape, dtype)
    return checked


def _unpickle_batch(path: Path) -> dict:
    """A pickle's opcodes are walked first: a length it declares beyond the file's end is
    an error here, where unpickling would allocate it before reading."""
    data = path.read_bytes()
    for _ in pickletools.genops(io.BytesIO(data)):
        pass
    d = _CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
    if not isinstance(d, dict):
        raise TypeError(f"a {type(d).__name__}, not a dict")
    return d


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        d = _unpickle_batch(path)
        raw_data = d[b"data"] if b"data" in d else d["data"]
        raw_labels = d[b"labels"] if b"labels" in d else d["labels"]
        data = np.asarray(raw_data)
        labels = np.asarray(raw_labels)
    except MemoryError:
        raise DataError(f"{path}: not enough memory to read this CIFAR-10 batch") from None
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: not a CIFAR-10 python batch ({e.__class__.__name__}: {e})") from None
    if data.dtype != np.uint8:
        raise DataError(f"{path}: 'data' must hold bytes (uint8 pixels 0..255), got dtype {data.dtype}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: 'labels' must be integers, got dtype {labels.dtype}")
    if data.ndim != 2 or data.shape[1] != 3072 or labels.ndim != 1 or len(labels) != len(data):
        raise DataError(f"{path}: expected 'data' of shape [n, 3072] and one label per row, "
                        f"got {data.shape} and labels of shape {labels.shape}")
    if len(data) == 0:
        raise DataError(f"{path}: the batch holds no images")
    if labels.min() < 0 or labels.max() > 9:
        raise DataError(f"{path}: CIFAR-10 labels must be 0..9, found {labels.min()}..{labels.max()}")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(folder: str | os.PathLike[str]) -> Dataset:
    """CIFAR-10 in its python batch format: data_batch_1..5 (training) and test_batch.

    Scaled to [0, 1] and centred on the training set's per-pixel mean, like the
    digits; batches that are absent are skipped (data_batch_1 is enough to train)."""
    folder = Path(folder)
    train = [folder / n for n in CIFAR_TRAIN if (folder / n).is_file()]
    if not train or not (folder / CIFAR_TEST).is_file():
        raise DataError(f"{folder}: a CIFAR-10 folder needs data_batch_1 (..5) and test_batch")
    xs, ys = zip(*(_cifar_batch(p) for p in train))
    tx, ty = _cifar_batch(folder / CIFAR_TEST)
    train_x = np.concatenate(xs).astype(np.float32) / 255.0
    mean = train_x.mean(axis=0, keepdims=True)
    labels = np.concatenate(ys)
    return Dataset("cifar10", np.ascontiguousarray(train_x - mean), labels.astype(np.int32),
                   np.ascontiguousarray(tx.astype(np.float32) / 255.0 - mean), ty.astype(np.int32), 10,
                   class_names=CIFAR_CLASSES, mean=mean[0])


_SOURCES = "expected 'digits', a .npz file, a CIFAR-10 batch folder or a folder of image class folders"


def load_dataset(spec: str | os.PathLike[str] | None, image_shape: tuple[int, int, int] | None = None,
                 classes: int = 0, resize: int | None = None, test_split: float | None = None,
                 cache_dir: str | os.PathLike[str] | None = None) -> Dataset:
    """Resolve a command-line data argument: 'digits' (default), a .npz, a CIFAR-10 folder
    (one holding its batch files), or any other folder as a tree of images by class.

    An image tree is decoded to `image_shape`'s channels, `resize` pixels square (default:
    the larger of its height and width) and checked against the network's `classes`;
    `test_split` and `cache_dir` apply to image trees alone."""
    path = None if spec is None or (isinstance(spec, str) and spec.strip().lower() == "digits") else Path(spec)
    if path is not None and not path.exists():
        raise DataError(f"no such data source: {spec} ({_SOURCES})")
    is_tree = path is not None and path.is_dir() and \
        not any((path / name).exists() for name in (*CIFAR_TRAIN, CIFAR_TEST))
    if not is_tree and (resize is not None or test_split is not None or cache_dir is not None):
        raise DataError(f"--resize, --test-split and --cache-dir apply to folders of images, not to "
                        f"{'digits' if path is None else spec}")
    if path is None:
        return load_digits()
    if is_tree:
        from cnnc.train.images import load_image_folders

        if image_shape is None:
            raise DataError(f"{path}: a folder of images needs the network's input shape")
        channels, height, width = image_shape
        return load_image_folders(path, resize or max(height, width), channels, classes, test_split, cache_dir)
    if path.is_dir():
        return load_cifar10(path)
    if path.suffix.lower() != ".npz":
        raise DataError(f"unsupported data source: {spec} ({_SOURCES})")
    return load_npz(path)


def fit_images(x: np.ndarray, shape: tuple[int, int, int], rng: np.random.Generator | None) -> np.ndarray:
    """Crop images to the network's input size, as cuda-convnet2 crops its inner size:
    a random crop and a random horizontal flip per image when training (rng given),
    the centre crop when evaluating (rng None)."""
    _, c, h, w = x.shape
    if (c, h, w) == tuple(shape):
        return x
    _, th, tw = shape
    if rng is None:
        top, left = (h - th) // 2, (w - tw) // 2
        return np.ascontiguousarray(x[:, :, top:top + th, left:left + tw])
    out = np.empty((len(x), c, th, tw), np.float32)
    tops = rng.integers(0, h - th + 1, len(x))
    lefts = rng.integers(0, w - tw + 1, len(x))
    flips = rng.random(len(x)) < 0.5
    for i in range(len(x)):
        crop = x[i, :, tops[i]:tops[i] + th, lefts[i]:lefts[i] + tw]
        out[i] = crop[:, :, ::-1] if flips[i] else crop
    return out


def views(x: np.ndarray, shape: tuple[int, int, int]) -> list[np.ndarray]:
    """cuda-convnet2's 10 test views of images larger than the network's input: the four
    corner crops and the centre crop, then each of them flipped horizontally."""
    _, _, h, w = x.shape
    _, th, tw = shape
    corners = [(0, 0), (0, w - tw), (h - th, 0), (h - th, w - tw), ((h - th) // 2, (w - tw) // 2)]
    crops = [np.ascontiguousarray(x[:, :, t:t + th, l:l + tw]) for t, l in corners]
    return crops + [np.ascontiguousarray(c[:, :, :, ::-1]) for c in crops]


@dataclass(frozen=True)
class ColorComponents:
    """Principal components of the training pixels' colours (AlexNet's colour noise):
    `variances[i]` is the variance along the unit vector `vectors[:, i]`."""

    variances: np.ndarray       # [C], float64, ascending
    vectors: np.ndarray         # [C, C], float64, one component per column


def color_components(x: np.ndarray, chunk: int = 1024) -> ColorComponents:
    """The eigen-decomposition of the channels' covariance over every training pixel,
    accumulated in float64 chunk by chunk (so a memory-mapped set is read once, in order,
    and the result depends on the data alone)."""
    c = x.shape[1]
    total, outer, n = np.zeros(c), np.zeros((c, c)), 0
    for start in range(0, len(x), chunk):
        pixels = np.asarray(x[start:start + chunk], np.float64).transpose(1, 0, 2, 3).reshape(c, -1)
        total += pixels.sum(axis=1)
        outer += pixels @ pixels.T
        n += pixels.shape[1]
    mean = total / n
    variances, vectors = np.linalg.eigh(outer / n - np.outer(mean, mean))
    return ColorComponents(np.clip(variances, 0.0, None), vectors)


def add_color_noise(x: np.ndarray, components: ColorComponents, std: float, rng: np.random.Generator) -> None:
    """Shift each image's colour, in place, by sum_i alpha_i * variance_i * vector_i with
    alpha_i ~ N(0, std) drawn per image (AlexNet's form, eigenvalues unsquared)."""
    alphas = rng.normal(0.0, std, (len(x), len(components.variances)))
    shift = (alphas * components.variances) @ components.vectors.T         # [n, C]
    x += shift.astype(np.float32)[:, :, None, None]


# --- batching --------------------------------------------------------------


def _check_batch(batch: int) -> None:
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise DataError(f"batch size must be a positive integer, got {batch!r}")


def batches_per_epoch(ds: Dataset, batch: int) -> int:
    """Full batches per epoch; the remainder of the shuffled set is skipped."""
    _check_batch(batch)
    return ds.n_train // batch


def train_batches(ds: Dataset, batch: int, epoch: int,
                  seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Shuffled full batches for one epoch.

    The order depends only on (seed, epoch), so resuming at a given epoch
    reproduces the same batches. Arguments are checked here, not on the
    first ``next()``, so mistakes surface where the call is made.
    """
    _check_batch(batch)
    if batch > ds.n_train:
        raise DataError(f"batch size {batch} is larger than the training set "
                        f"of {ds.name} ({ds.n_train} cases)")
    if seed < 0 or epoch < 0:
        raise DataError(f"seed and epoch must be non-negative, got seed={seed}, "
                        f"epoch={epoch}")
    return _train_iter(ds, epoch_order(ds, epoch, seed), int(batch))


def epoch_order(ds: Dataset, epoch: int, seed: int) -> np.ndarray:
    """The epoch's shuffle of the training cases: a function of (seed, epoch) alone."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(ds.n_train)


def _train_iter(ds: Dataset, order: np.ndarray,
                batch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for b in range(len(order) // batch):
        idx = order[b * batch:(b + 1) * batch]
        yield (np.ascontiguousarray(ds.train_x[idx], dtype=np.float32),
               np.ascontiguousarray(ds.train_y[idx], dtype=np.int32))


def eval_batches(x: np.ndarray, y: np.ndarray,
                 batch: int) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """In-order batches of exactly ``batch`` rows; the last is zero-padded
    and the third element tells how many rows are real."""
    _check_batch(batch)
    if len(x) != len(y):
        raise DataError(f"eval_batches: {len(x)} images but {len(y)} labels")
    return _eval_iter(x, y, int(batch))


def _eval_iter(x: np.ndarray, y: np.ndarray,
               batch: int) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    n = len(x)
    for start in range(0, n, batch):
        real = min(batch, n - start)
        xb = np.zeros((batch, *x.shape[1:]), dtype=np.float32)
        yb = np.zeros(batch, dtype=np.int32)
        xb[:real] = x[start:start + real]
        yb[:real] = y[start:start + real]
        yield xb, yb, real
