"""Folders of JPEG and PNG images by class as a data source: layout, decoding, the cache,
hostile files, and `cnnc run --data DIR` end to end, on tiny trees written here with Pillow."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from PIL import Image

from cnnc.cli import main
from cnnc.train import images
from cnnc.train.data import DataError, load_dataset
from cnnc.train.images import load_image_folders

TINY_RGB = """\
network tinyrgb
input data: 3x8x8
input labels: label(2)
train { batch = 4; epochs = 1; seed = 1; lr = 0.05 }
conv1 = conv(data, filters=4, size=3, padding=1) relu
fc2 = fc(conv1, outputs=2)
probs = softmax(fc2)
cost = logreg(labels, probs)
"""


def write_image(path: Path, seed: int, size=(20, 12), mode="RGB") -> Path:
    """A random image of `size` (width, height) in `mode`, as JPEG or PNG by the file's suffix."""
    rng = np.random.default_rng(seed)
    w, h = size
    channels = {"RGB": 3, "CMYK": 4}.get(mode)
    pixels = rng.integers(0, 256, (h, w) if channels is None else (h, w, channels), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(pixels, mode if mode in ("L", "RGB", "CMYK") else "L")
    (img if img.mode == mode else img.convert(mode)).save(path)
    return path


def write_tree(root: Path, classes=("cat", "dog"), per_class=5, seed=0) -> Path:
    """One folder per class; JPEG and PNG files alternate and vary in size and colour mode."""
    modes = ("RGB", "L", "RGB", "CMYK", "P")
    for c, name in enumerate(classes):
        for i in range(per_class):
            mode = modes[i % len(modes)]
            suffix = ".jpg" if mode == "CMYK" or (mode != "P" and i % 2) else ".png"
            write_image(root / name / f"{i:03d}{suffix}", seed * 1000 + c * 100 + i, (16 + 3 * i, 10 + i), mode)
    return root


def train_val_tree(root: Path, **kw) -> Path:
    write_tree(root / "train", **kw)
    write_tree(root / "val", per_class=3, seed=9)
    return root


def load(root: Path, cache: Path, size=8, channels=3, classes=2, test_split=None):
    return load_image_folders(root, size, channels, classes, test_split, cache)


def cli(*args) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result: Result) -> str:
    """Exit status 2, one line on stderr, no traceback: the line."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def rgb_build(tmp_path: Path) -> Path:
    from cnnc.build import compile_file

    src = tmp_path / "tinyrgb.cnn"
    src.write_text(TINY_RGB)
    compile_file(src, tmp_path / "build", use_nvcc=False)
    return tmp_path / "build"


# --- layout and decoding ------------------------------------------------------


def test_train_and_val_trees(tmp_path):
    ds = load(train_val_tree(tmp_path / "pets"), tmp_path / "cache")
    assert ds.class_names == ("cat", "dog") and ds.classes == 2
    assert ds.train_x.shape == (10, 3, 8, 8) and ds.test_x.shape == (6, 3, 8, 8)
    assert ds.train_y.tolist() == [0] * 5 + [1] * 5 and ds.test_y.tolist() == [0] * 3 + [1] * 3
    train = np.asarray(ds.train_x)
    assert train.dtype == np.float32 and abs(float(train.mean())) < 1e-6     # centred on the training mean
    assert ds.mean.shape == (3, 8, 8)
    # pixels are bytes / 255 minus that mean, row by row as for the whole array
    for key in (np.array([7, 2]), 3, slice(2, 9, 3), (slice(None), slice(None), slice(1, 3), slice(2, 5)),
                (Ellipsis, 4), (np.array([1, 0]), 2)):
        np.testing.assert_array_equal(ds.train_x[key], train[key])
    assert float(train.min()) >= -1.0 and float(train.max()) <= 1.0


def test_shorter_side_resized_then_centre_cropped(tmp_path):
    ramp = (np.arange(30) * 8).astype(np.uint8)
    Image.fromarray(np.tile(ramp, (10, 1)), "L").save(tmp_path / "wide.png")       # 30 wide, 10 high
    Image.fromarray(np.tile(ramp[:, None], (1, 10)), "L").save(tmp_path / "tall.png")
    wide = images.decode(tmp_path / "wide.png", 10, 1)
    assert wide.shape == (1, 10, 10) and wide[0, 0].tolist() == ramp[10:20].tolist()
    tall = images.decode(tmp_path / "tall.png", 10, 1)
    assert tall[0, :, 0].tolist() == ramp[10:20].tolist()
    half = images.decode(tmp_path / "wide.png", 5, 3)                        # 30x10 resized to 15x5, then cropped
    assert half.shape == (3, 5, 5) and (np.diff(half[0, 2].astype(int)) > 0).all()


def test_grey_cmyk_and_palette_become_the_networks_channels(tmp_path):
    for mode, suffix in (("L", ".png"), ("CMYK", ".jpg"), ("P", ".png"), ("RGB", ".jpg")):
        path = write_image(tmp_path / f"{mode}{suffix}", 3, (12, 12), mode)
        assert images.decode(path, 8, 3).shape == (3, 8, 8)
        assert images.decode(path, 8, 1).shape == (1, 8, 8)
    grey = images.decode(tmp_path / "L.png", 8, 3)
    assert (grey[0] == grey[1]).all() and (grey[1] == grey[2]).all()
    wide = tmp_path / "wide.png"                                             # 16-bit grey is scaled, not clipped
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(wide)
    assert images.decode(wide, 8, 1).min() == 255


def solid_tree(root: Path, per_class: dict[str, range]) -> Path:
    """Each image one grey level, its number, so that a decoded image tells which file it was."""
    for name, numbers in per_class.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for n in numbers:
            Image.new("L", (9, 9), n).save(root / name / f"{n:03d}.png")
    return root


def numbers(ds, split: str) -> list[int]:
    x = getattr(ds, f"{split}_x")
    return sorted(np.rint((np.asarray(x)[:, 0, 0, 0] + ds.mean[0, 0, 0]) * 255).astype(int).tolist())


def test_test_split_is_per_class_and_stable(tmp_path):
    root = solid_tree(tmp_path / "flat", {"a": range(0, 10), "b": range(100, 110)})
    split = load(root, tmp_path / "cache", channels=1, test_split=0.25)
    assert split.n_test == 6 and split.test_y.tolist() == [0] * 3 + [1] * 3     # round(2.5) = 3 per class
    assert numbers(split, "test") == [4, 6, 7, 100, 101, 108]                  # the same in every process
    assert numbers(split, "train") == [n for n in [*range(10), *range(100, 110)] if n not in (4, 6, 7, 100, 101, 108)]
    solid_tree(root, {"a": range(10, 16)})                                      # six more in class a
    assert load(root, tmp_path / "cache", channels=1, test_split=0.25).n_test == 7     # round(4) + 3


def test_a_flat_tree_needs_a_test_split(tmp_path):
    with pytest.raises(DataError, match=r"no val/ folder to test on; give --test-split F"):
        load(write_tree(tmp_path / "flat"), tmp_path / "cache")
    with pytest.raises(DataError, match="--test-split applies to a folder of class folders"):
        load(train_val_tree(tmp_path / "tv"), tmp_path / "cache", test_split=0.5)


def test_non_image_files_are_skipped(tmp_path):
    root = train_val_tree(tmp_path / "pets")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"\0\1")
    (root / "train" / "labels.csv").write_text("a,b")
    assert load(root, tmp_path / "cache").n_train == 10


# --- the cache ------------------------------------------------------------------


def test_second_load_hits_the_cache_and_a_changed_file_misses_it(tmp_path, monkeypatch):
    root, cache = train_val_tree(tmp_path / "pets"), tmp_path / "cache"
    first = np.asarray(load(root, cache).train_x)
    assert len(list(cache.glob("images-*.npy"))) == 1 and not list(cache.glob(".images-*"))

    assert len(list(cache.glob("mean-*.npy"))) == 1

    def no_reading(*args):
        raise AssertionError("read images although cached")
    with monkeypatch.context() as m:
        m.setattr(images, "decode", no_reading)
        m.setattr(images, "_mean", no_reading)
        np.testing.assert_array_equal(np.asarray(load(root, cache).train_x), first)

    changed = root / "train" / "dog" / "000.png"
    write_image(changed, 12345, (16, 10))
    os.utime(changed, ns=(1, 1))                          # even a file back-dated is seen as changed
    second = np.asarray(load(root, cache).train_x)
    assert len(list(cache.glob("images-*.npy"))) == 2
    assert not np.array_equal(second[5], first[5])


def test_concurrent_runs_share_one_cache(tmp_path):
    root, cache = train_val_tree(tmp_path / "pets", per_class=40), tmp_path / "cache"
    script = ("import sys, numpy as np; from cnnc.train.images import load_image_folders as load; "
              "ds = load(sys.argv[1], 8, 3, 2, None, sys.argv[2]); "
              "np.save(sys.argv[3], np.asarray(ds.train_x))")
    runs = [subprocess.Popen([sys.executable, "-c", script, root, cache, tmp_path / f"{i}.npy"],
                             stderr=subprocess.PIPE, text=True) for i in range(3)]
    for run in runs:
        assert run.wait(timeout=120) == 0, run.stderr.read()
    arrays = [np.load(tmp_path / f"{i}.npy") for i in range(3)]
    assert all(np.array_equal(a, arrays[0]) for a in arrays) and arrays[0].shape == (80, 3, 8, 8)
    assert len(list(cache.glob("images-*.npy"))) == 1 and not list(cache.glob(".images-*"))
    np.testing.assert_array_equal(np.asarray(load(root, cache).train_x), arrays[0])


def test_a_damaged_cache_is_rebuilt(tmp_path):
    root, cache = train_val_tree(tmp_path / "pets"), tmp_path / "cache"
    first = np.asarray(load(root, cache).train_x)
    (npy,) = cache.glob("images-*.npy")
    npy.write_bytes(npy.read_bytes()[:100])
    np.testing.assert_array_equal(np.asarray(load(root, cache).train_x), first)


def test_the_default_cache_is_the_users(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    load_dataset(train_val_tree(tmp_path / "pets"), (3, 8, 8), 2)
    assert len(list((tmp_path / "xdg" / "cnnc").glob("images-*-3x8x8.npy"))) == 1


# --- hostile files ----------------------------------------------------------------


@pytest.mark.parametrize("damage", ["garbage", "truncated-png", "truncated-jpeg", "gif-named-jpg"])
def test_unreadable_images_name_the_file(tmp_path, damage):
    root = train_val_tree(tmp_path / "pets")
    bad = root / "train" / "dog" / ("002.png" if damage == "truncated-png" else "001.jpg")
    if damage == "garbage":
        bad.write_bytes(os.urandom(300))
    elif damage == "gif-named-jpg":
        Image.new("L", (8, 8)).save(bad, format="GIF")
    else:
        bad.write_bytes(bad.read_bytes()[:len(bad.read_bytes()) // 2])
    with pytest.raises(DataError) as info:
        load(root, tmp_path / "cache")
    msg = str(info.value)
    assert msg.startswith(f"{bad}: ") and "\n" not in msg and "not a readable JPEG or PNG image" in msg
    assert not list((tmp_path / "cache").glob(".images-*"))          # no scratch file left behind


@pytest.mark.parametrize("pixels", [400, 500])      # beyond twice Pillow's limit (its error), and just past it
def test_decompression_bombs_are_errors(tmp_path, monkeypatch, pixels):
    root = train_val_tree(tmp_path / "pets")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pixels)
    bomb = write_image(root / "val" / "cat" / "000.png", 5, (30, 30))          # 900 pixels
    with pytest.raises(DataError, match=rf"^{bomb}: refused as a possible decompression bomb \("):
        load(root, tmp_path / "cache")


def test_run_refuses_a_decompression_bomb_in_one_line(rgb_build, tmp_path, monkeypatch):
    root = train_val_tree(tmp_path / "pets")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)                      # Pillow would only warn at 900
    bomb = write_image(root / "val" / "cat" / "000.png", 5, (30, 30))
    with warnings.catch_warnings(record=True) as shown:                      # what a terminal would print
        warnings.simplefilter("always")
        line = one_line_error(cli("run", rgb_build, "--backend", "reference", "--data", root,
                                  "--cache-dir", tmp_path / "cache"))
    assert not [w for w in shown if issubclass(w.category, Image.DecompressionBombWarning)]
    assert line == (f"error: {bomb}: refused as a possible decompression bomb (30x30 = 900 pixels, "
                    f"Pillow's limit is 500)")


def test_an_empty_class_folder_is_an_error(tmp_path):
    root = train_val_tree(tmp_path / "pets")
    (root / "train" / "emu").mkdir()
    (root / "val" / "emu").mkdir()
    (root / "train" / "emu" / "readme.txt").write_text("to do")
    with pytest.raises(DataError, match=rf"^{root / 'train' / 'emu'}: the class folder holds no .jpg"):
        load(root, tmp_path / "cache", classes=3)


def test_val_must_have_the_train_classes(tmp_path):
    root = train_val_tree(tmp_path / "pets")
    write_image(root / "val" / "emu" / "0.png", 1)
    with pytest.raises(DataError, match="val/ has classes not in train/: emu"):
        load(root, tmp_path / "cache")


def test_class_count_is_checked_before_decoding(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "decode", None)          # decoding anything would fail differently
    with pytest.raises(DataError, match=r"2 class folders, but the network's labels have 10 classes \(label\(10\)\)"):
        load(train_val_tree(tmp_path / "pets"), tmp_path / "cache", classes=10)


# --- the command line ----------------------------------------------------------------


def test_run_trains_on_an_image_folder(rgb_build, tmp_path):
    root = train_val_tree(tmp_path / "pets", per_class=4)            # 8 images: two steps of 4
    save = tmp_path / "save"
    result = cli("run", rgb_build, "--backend", "reference", "--data", root, "--cache-dir", tmp_path / "cache",
                 "--save-dir", save, "-q")
    assert result.exit_code == 0, result.output
    assert "8 train / 6 test images" in result.output
    (record,) = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert record["step"] == 2 and record["test_error"] is not None
    assert len(list((tmp_path / "cache").glob("images-*-3x8x8.npy"))) == 1


def test_run_resizes_then_crops_to_the_network(rgb_build, tmp_path):
    root = write_tree(tmp_path / "pets", per_class=6)
    result = cli("run", rgb_build, "--backend", "reference", "--data", root, "--cache-dir", tmp_path / "cache",
                 "--resize", 10, "--test-split", 0.3, "--save-dir", tmp_path / "save", "-q")
    assert result.exit_code == 0, result.output
    assert "8 train / 4 test images" in result.output
    assert len(list((tmp_path / "cache").glob("images-*-3x10x10.npy"))) == 1


def test_run_refuses_a_class_count_that_differs(rgb_build, tmp_path):
    root = train_val_tree(tmp_path / "pets")
    write_image(root / "train" / "emu" / "0.png", 1)
    write_image(root / "val" / "emu" / "0.png", 2)
    line = one_line_error(cli("run", rgb_build, "--backend", "reference", "--data", root,
                              "--cache-dir", tmp_path / "cache"))
    assert line == f"error: {root}: 3 class folders, but the network's labels have 2 classes (label(2))"


def test_run_names_a_corrupt_image(rgb_build, tmp_path):
    root = train_val_tree(tmp_path / "pets")
    bad = root / "val" / "dog" / "001.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really")
    line = one_line_error(cli("run", rgb_build, "--backend", "reference", "--data", root,
                              "--cache-dir", tmp_path / "cache"))
    assert line.startswith(f"error: {bad}: not a readable JPEG or PNG image (")


def test_image_options_need_an_image_folder(rgb_build, tmp_path):
    line = one_line_error(cli("run", rgb_build, "--backend", "reference", "--resize", 10))
    assert line == "error: --resize, --test-split and --cache-dir apply to folders of images, not to digits"
    result = cli("run", rgb_build, "--data", tmp_path, "--test-split", 1.5)
    assert result.exit_code == 2 and "Invalid value for '--test-split'" in result.output


def test_every_source_records_its_mean_and_class_names():
    digits = load_dataset("digits")
    assert digits.class_names == tuple("0123456789") and digits.mean.shape == (1, 8, 8)
    np.testing.assert_allclose(np.asarray(digits.train_x).mean(axis=0), 0, atol=1e-6)


def test_a_folder_with_cifar_batches_is_cifar(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "test_batch").write_bytes(b"")
    with pytest.raises(DataError, match="a CIFAR-10 folder needs data_batch_1"):
        load_dataset(tmp_path / "c", (3, 8, 8), 2)
