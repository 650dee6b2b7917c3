"""Image folders as a data source: one sub-folder per class of JPEG and PNG files.

Decoding a large tree is slow, so the decoded images are kept in a cache: one
uint8 .npy per tree, size and colour mode, memory-mapped when read, and named
by a hash of every file's path, size and modification time, so that a changed
file makes a new cache instead of serving stale pixels.  Each cache is written
under a temporary name and renamed into place, so concurrent runs either find
a whole cache or build their own, never a half-written one.

Training reads images through `ScaledImages`, which scales and centres only the
rows asked for, so a tree larger than memory can still be trained on.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnc.train.data import DataError, Dataset

__all__ = ["IMAGE_SUFFIXES", "ScaledImages", "default_cache_dir", "load_image_folders"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_MODES = {1: "L", 3: "RGB"}
_CACHE_FORMAT = 1                 # bump when decoding changes what a cache holds
_BLOCK = 1024                     # images decoded per round of the worker pool


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/cnnc, else ~/.cache/cnnc."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cnnc"


@dataclass(frozen=True)
class _Image:
    path: Path
    label: int


class ScaledImages:
    """uint8 images shown as float32 pixels scaled to [0, 1] minus a per-pixel mean.

    Indexes like the float32 array it stands for, converting only the rows asked
    for, which keeps a memory-mapped cache on disk."""

    def __init__(self, pixels: np.ndarray, rows: np.ndarray, mean: np.ndarray):
        self._pixels, self._rows, self._mean = pixels, rows, mean

    ndim = 4
    dtype = np.dtype(np.float32)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self._rows), *self._pixels.shape[1:])

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, key):
        first, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        if first is Ellipsis or first is None:          # the key does not start with rows
            return self[:][key]
        rows = self._rows[first]
        x = scale(self._pixels[rows], self._mean)
        return x[(slice(None),) * np.ndim(rows) + rest] if rest else x

    def __array__(self, dtype=None, copy=None):
        x = self[:]
        return x if dtype is None else x.astype(dtype)


def scale(pixels: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Bytes to the float32 pixels training sees, the same arithmetic for every row."""
    return pixels.astype(np.float32) / np.float32(255.0) - mean


# --- the tree --------------------------------------------------------------


def _class_folders(tree: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(tree) if e.is_dir() and not e.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    """The class folder's JPEG and PNG files by name; anything else is not an image and is skipped."""
    files = sorted(e.name for e in os.scandir(folder)
                   if e.is_file() and not e.name.startswith(".") and e.name.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise DataError(f"{folder}: the class folder holds no .jpg, .jpeg or .png files")
    return [folder / f for f in files]


def _list_tree(tree: Path, names: list[str]) -> list[_Image]:
    return [_Image(p, label) for label, name in enumerate(names) for p in _image_files(tree / name)]


def _held_out(image: _Image, root: Path) -> int:
    """A rank of an image within its class that is the same in every process and on every
    machine (crc32 of its path below the root, where hash() is salted per process)."""
    return zlib.crc32(image.path.relative_to(root).as_posix().encode())


def _split(images: list[_Image], fraction: float, root: Path) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, test rows) of `images`: per class, round(fraction * count) images (half
    rounds up) go to the test split."""
    test = []
    for label in sorted({im.label for im in images}):
        members = sorted((i for i, im in enumerate(images) if im.label == label),
                         key=lambda i: (_held_out(images[i], root), images[i].path.name))
        test += members[:int(np.floor(fraction * len(members) + 0.5))]
    is_test = np.zeros(len(images), bool)
    is_test[test] = True
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def _layout(root: Path, test_split: float | None) -> tuple[list[str], list[_Image], np.ndarray, np.ndarray]:
    """(class names, every image, train rows, test rows) of `root`: train/ and val/ trees,
    or class folders split by `test_split`.  The images' order does not depend on the
    split, so neither does their cache."""
    train_tree, val_tree = root / "train", root / "val"
    if train_tree.is_dir() and val_tree.is_dir():
        if test_split is not None:
            raise DataError(f"{root}: has train/ and val/ sub-folders; --test-split applies to a folder "
                            f"of class folders")
        names = _class_folders(train_tree)
        val_names = _class_folders(val_tree)
        if val_names != names:
            extra = sorted(set(val_names) - set(names))
            missing = sorted(set(names) - set(val_names))
            what = f"val/ has classes not in train/: {', '.join(extra)}" if extra else \
                f"val/ lacks the classes {', '.join(missing)}"
            raise DataError(f"{root}: {what}")
        train, test = _list_tree(train_tree, names), _list_tree(val_tree, names)
        rows = np.arange(len(train) + len(test))
        return names, train + test, rows[:len(train)], rows[len(train):]
    tree = train_tree if train_tree.is_dir() else root
    names = _class_folders(tree)
    if not names:
        raise DataError(f"{root}: no class folders (expected one sub-folder of JPEG/PNG images per class, "
                        f"or train/ and val/ trees of them)")
    if test_split is None:
        raise DataError(f"{root}: no val/ folder to test on; give --test-split F to hold out a fraction "
                        f"of each class")
    images = _list_tree(tree, names)
    return (names, images, *_split(images, test_split, root))


# --- decoding --------------------------------------------------------------


def _pillow():
    try:
        from PIL import Image
    except ImportError:                 # pragma: no cover - Pillow is a dependency
        raise DataError("image folders need Pillow (pip install Pillow)") from None
    return Image


def decode(path: Path, size: int, channels: int) -> np.ndarray:
    """One file as uint8 [channels, size, size]: the shorter side resized to `size`,
    then the centre size x size; grey, palette and CMYK images converted."""
    Image = _pillow()
    try:
        with Image.open(path, formats=("JPEG", "PNG")) as im:
            limit = Image.MAX_IMAGE_PIXELS
            if limit and im.width * im.height > limit:
                raise DataError(f"{path}: refused as a possible decompression bomb ({im.width}x{im.height} = "
                                f"{im.width * im.height} pixels, Pillow's limit is {limit})")
            im.draft(_MODES[channels], (size, size))        # JPEG: decode at a reduced scale >= size
            im = _to_mode(im, _MODES[channels])
            w, h = im.size
            factor = size / min(w, h)
            w, h = max(size, round(w * factor)), max(size, round(h * factor))
            im = im.resize((w, h), Image.Resampling.BICUBIC)
            left, top = (w - size) // 2, (h - size) // 2
            im = im.crop((left, top, left + size, top + size))
            pixels = np.asarray(im, dtype=np.uint8)
    except DataError:
        raise
    except Image.DecompressionBombError as e:
        raise DataError(f"{path}: refused as a possible decompression bomb ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        raise DataError(f"{path}: not a readable JPEG or PNG image ({e})") from None
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


def _to_mode(im, mode: str):
    """16-bit grey scaled to 8 bits (Pillow's own conversion clips it); everything else by Pillow."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L"):
        Image = _pillow()
        wide = np.asarray(im, dtype=np.float64) / 257.0
        im = Image.fromarray(np.clip(np.rint(wide), 0, 255).astype(np.uint8), "L")
    return im if im.mode == mode else im.convert(mode)


def _decode_all(images: list[_Image], size: int, channels: int, out: np.ndarray, workers: int) -> None:
    """Decode into `out` in worker threads (Pillow releases the GIL while decoding); the
    first bad file in list order is the one reported."""
    def one(i: int) -> None:
        out[i] = decode(images[i].path, size, channels)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", _pillow().DecompressionBombWarning)   # refused by decode instead
        with ThreadPoolExecutor(max_workers=workers) as pool:
            try:
                for start in range(0, len(images), _BLOCK):
                    for _ in pool.map(one, range(start, min(start + _BLOCK, len(images)))):
                        pass
            except BaseException:           # a bad file or Ctrl-C: decode nothing more
                pool.shutdown(wait=True, cancel_futures=True)
                raise


# --- the cache -------------------------------------------------------------


def _cache_key(images: list[_Image], size: int, channels: int) -> str:
    """What the cache's pixels depend on: every file (its absolute path, size and
    modification time, in order), the size and mode, and the decoder's version."""
    import PIL

    h = hashlib.sha256(f"cnnc images {_CACHE_FORMAT} {PIL.__version__} {size} {channels}\n".encode())
    for im in images:
        st = im.path.stat()
        h.update(f"{os.path.abspath(im.path)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def _open_cached(path: Path, dtype, shape: tuple[int, ...]) -> np.ndarray | None:
    """The array at `path` memory-mapped, or None when absent or not what it should be."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return None
    return arr if arr.dtype == dtype and arr.shape == shape else None


def _publish(path: Path, write) -> None:
    """`write(scratch)` a file beside `path`, then fsync it and rename it into place: a
    reader sees the whole file or none, and a failure leaves no scratch file behind."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".images-", suffix=".tmp")
        os.close(fd)
    except OSError as e:
        raise DataError(f"{path.parent}: cannot write the image cache here ({e.strerror or e}); "
                        f"give another with --cache-dir") from None
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _cached_pixels(images: list[_Image], size: int, channels: int, cache_dir: Path,
                   workers: int) -> tuple[np.ndarray, Path]:
    """(every image as uint8 [n, channels, size, size], memory-mapped; the cache's path)."""
    shape = (len(images), channels, size, size)
    path = cache_dir / f"images-{_cache_key(images, size, channels)}-{channels}x{size}x{size}.npy"
    pixels = _open_cached(path, np.uint8, shape)
    if pixels is None:
        def decode_into(tmp: str) -> None:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
            _decode_all(images, size, channels, out, workers)
            out.flush()
        _publish(path, decode_into)
        pixels = np.load(path, mmap_mode="r", allow_pickle=False)
    return pixels, path


def _cached_mean(pixels: np.ndarray, rows: np.ndarray, cache: Path) -> np.ndarray:
    """The training rows' mean, kept beside their cache: computing it reads every training image."""
    split = hashlib.sha256(rows.astype(np.int64).tobytes()).hexdigest()[:16]
    path = cache.with_name(f"mean-{cache.stem.removeprefix('images-')}-{split}.npy")
    mean = _open_cached(path, np.float32, pixels.shape[1:])
    if mean is not None:
        return np.array(mean)
    mean = _mean(pixels, rows)

    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, mean)
    _publish(path, save)
    return mean


# --- the data set ----------------------------------------------------------


def load_image_folders(root: str | os.PathLike[str], size: int, channels: int, classes: int = 0,
                       test_split: float | None = None, cache_dir: str | os.PathLike[str] | None = None,
                       workers: int | None = None) -> Dataset:
    """The images under `root` as `size` x `size` squares of `channels` (1: grey, 3: RGB),
    labelled by their class folders in sorted order.

    `classes` (the network's, 0 for any) is checked as soon as the folders are listed,
    before anything is decoded.  Pixels are scaled to [0, 1] and centred on the
    training split's per-pixel mean, as the other sources are."""
    root = Path(root)
    if channels not in _MODES:
        raise DataError(f"{root}: image folders give 1 (grey) or 3 (RGB) channels, but the network "
                        f"takes {channels}")
    if size < 1:
        raise DataError(f"image size must be positive, got {size}")
    if test_split is not None and not 0.0 < test_split < 1.0:
        raise DataError(f"--test-split must be between 0 and 1, got {test_split}")
    names, images, train, test = _layout(root, test_split)
    if classes and len(names) != classes:
        raise DataError(f"{root}: {len(names)} class folders, but the network's labels have {classes} "
                        f"classes (label({classes}))")
    for split, rows in (("train", train), ("test", test)):
        if not len(rows):
            raise DataError(f"{root}: the {split} split is empty")
    workers = workers or min(8, os.cpu_count() or 1)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    pixels, cached = _cached_pixels(images, size, channels, cache, workers)
    mean = _cached_mean(pixels, train, cached)
    labels = np.array([im.label for im in images], dtype=np.int32)
    return Dataset(root.name or str(root), ScaledImages(pixels, train, mean), labels[train],
                   ScaledImages(pixels, test, mean), labels[test], len(names),
                   class_names=tuple(names), mean=mean)


def _mean(pixels: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The per-pixel mean of `rows` on the [0, 1] scale, summed in blocks in float64."""
    total = np.zeros(pixels.shape[1:], np.float64)
    for start in range(0, len(rows), _BLOCK * 8):
        total += pixels[rows[start:start + _BLOCK * 8]].sum(axis=0, dtype=np.float64)
    return (total / (255.0 * len(rows))).astype(np.float32)
