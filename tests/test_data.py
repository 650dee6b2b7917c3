"""Data sources and batching: determinism, coverage and error messages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cnnc.train.data import (
    DataError,
    Dataset,
    batches_per_epoch,
    eval_batches,
    load_dataset,
    load_digits,
    load_npz,
    train_batches,
)


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_digits()


def _tiny(n_train: int = 10, n_test: int = 7) -> Dataset:
    """Images whose first pixel is the case index, so batches can be traced."""
    def images(n: int, offset: int) -> np.ndarray:
        x = np.zeros((n, 1, 2, 2), dtype=np.float32)
        x[:, 0, 0, 0] = np.arange(n) + offset
        return x
    return Dataset(name="tiny", train_x=images(n_train, 0),
                   train_y=(np.arange(n_train) % 3).astype(np.int32),
                   test_x=images(n_test, 1000),
                   test_y=(np.arange(n_test) % 3).astype(np.int32), classes=3)


# --- digits ----------------------------------------------------------------


def test_digits_shapes_and_types(digits: Dataset) -> None:
    assert digits.name == "digits" and digits.classes == 10
    assert digits.image_shape == (1, 8, 8)
    assert digits.n_train + digits.n_test == 1797
    for x, y in ((digits.train_x, digits.train_y), (digits.test_x, digits.test_y)):
        assert x.dtype == np.float32 and x.ndim == 4 and x.flags.c_contiguous
        assert y.dtype == np.int32 and len(y) == len(x)
        assert y.min() >= 0 and y.max() < 10


def test_digits_split_stable_and_stratified(digits: Dataset) -> None:
    again = load_digits()
    np.testing.assert_array_equal(digits.train_x, again.train_x)
    np.testing.assert_array_equal(digits.test_y, again.test_y)
    assert abs(digits.n_test - 360) <= 5
    assert set(np.unique(digits.train_y)) == set(range(10))
    assert set(np.unique(digits.test_y)) == set(range(10))
    # Each class gives about a fifth of its images to test.
    counts = np.bincount(np.concatenate([digits.train_y, digits.test_y]))
    test_counts = np.bincount(digits.test_y, minlength=10)
    assert np.all(np.abs(test_counts - 0.2 * counts) <= 0.5)
    other = load_digits(split_seed=1)
    assert not np.array_equal(digits.test_x, other.test_x)


def test_digits_centred_on_train_mean(digits: Dataset) -> None:
    np.testing.assert_allclose(digits.train_x.mean(axis=0), 0.0, atol=1e-5)
    assert abs(float(digits.test_x.mean())) < 0.05
    # Scaled from 0..16 to 0..1 before centring: each pixel spans at most 1.
    span = digits.train_x.max(axis=0) - digits.train_x.min(axis=0)
    assert float(span.max()) <= 1.0 + 1e-6


def test_load_dataset_default_is_digits() -> None:
    assert load_dataset(None).name == "digits"
    assert load_dataset("digits").n_test == load_digits().n_test


# --- batching --------------------------------------------------------------


def test_train_batches_deterministic_per_epoch(digits: Dataset) -> None:
    a = list(train_batches(digits, 32, epoch=0, seed=7))
    b = list(train_batches(digits, 32, epoch=0, seed=7))
    c = list(train_batches(digits, 32, epoch=1, seed=7))
    assert len(a) == batches_per_epoch(digits, 32) == digits.n_train // 32
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(a[0][0], c[0][0])
    x, y = a[0]
    assert x.shape == (32, 1, 8, 8) and x.dtype == np.float32
    assert x.flags.c_contiguous and y.dtype == np.int32 and y.shape == (32,)


def test_train_batches_each_case_at_most_once() -> None:
    ds = _tiny(n_train=10)
    for epoch in range(3):
        batches = list(train_batches(ds, 3, epoch=epoch, seed=0))
        assert len(batches) == 3  # the one left over is dropped
        ids = np.concatenate([x[:, 0, 0, 0] for x, _ in batches]).astype(int)
        assert len(ids) == 9 and len(set(ids)) == 9
        labels = np.concatenate([y for _, y in batches])
        np.testing.assert_array_equal(labels, ids % 3)  # labels follow images


def test_train_batch_too_large() -> None:
    with pytest.raises(DataError, match="larger than the training set"):
        train_batches(_tiny(n_train=4), 5, epoch=0, seed=0)
    with pytest.raises(DataError, match="positive"):
        train_batches(_tiny(), 0, epoch=0, seed=0)


@pytest.mark.parametrize("batch", [1, 3, 7, 10])
def test_eval_batches_cover_everything_once(batch: int) -> None:
    ds = _tiny(n_test=7)
    seen: list[int] = []
    out = list(eval_batches(ds.test_x, ds.test_y, batch))
    assert len(out) == -(-7 // batch)
    for i, (x, y, real) in enumerate(out):
        assert x.shape == (batch, 1, 2, 2) and y.shape == (batch,)
        assert x.dtype == np.float32 and y.dtype == np.int32
        expected_real = min(batch, 7 - i * batch)
        assert real == expected_real
        assert np.all(x[real:] == 0) and np.all(y[real:] == 0)
        seen.extend(x[:real, 0, 0, 0].astype(int).tolist())
        np.testing.assert_array_equal(y[:real], ds.test_y[i * batch:i * batch + real])
    assert seen == list(range(1000, 1007))


# --- npz -------------------------------------------------------------------


def test_npz_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    train_x = rng.normal(size=(12, 5, 6)).astype(np.float64)  # no channel axis
    test_x = rng.normal(size=(4, 5, 6))
    path = tmp_path / "mine.npz"
    np.savez(path, train_x=train_x, train_y=np.arange(12) % 4,
             test_x=test_x, test_y=np.array([0, 1, 2, 3]))
    ds = load_npz(path)
    assert ds.name == "mine" and ds.classes == 4
    assert ds.image_shape == (1, 5, 6)
    assert ds.train_x.dtype == np.float32 and ds.train_y.dtype == np.int32
    np.testing.assert_allclose(ds.train_x[:, 0], train_x, rtol=1e-6)
    assert load_dataset(str(path)).n_test == 4

    explicit = tmp_path / "explicit.npz"
    np.savez(explicit, train_x=train_x[:, None], train_y=np.zeros(12, np.int64),
             test_x=test_x[:, None], test_y=np.zeros(4, np.int64),
             classes=np.array(10))
    assert load_npz(explicit).classes == 10


def test_npz_missing_file(tmp_path: Path) -> None:
    gone = tmp_path / "gone.npz"
    with pytest.raises(DataError) as info:
        load_npz(gone)
    assert str(gone) in str(info.value) and "no such file" in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="no such data source"):
        load_dataset(str(gone))


def test_npz_missing_key(tmp_path: Path) -> None:
    path = tmp_path / "partial.npz"
    np.savez(path, train_x=np.zeros((3, 2, 2)), train_y=np.zeros(3, np.int32),
             test_x=np.zeros((1, 2, 2)))
    with pytest.raises(DataError) as info:
        load_npz(path)
    msg = str(info.value)
    assert str(path) in msg and "test_y" in msg and "\n" not in msg


@pytest.mark.parametrize("arrays, problem", [
    (dict(train_x=np.zeros((3, 4)), train_y=np.zeros(3, int),
          test_x=np.zeros((1, 2, 2)), test_y=np.zeros(1, int)), "train_x must be"),
    (dict(train_x=np.zeros((3, 2, 2)), train_y=np.zeros(2, int),
          test_x=np.zeros((1, 2, 2)), test_y=np.zeros(1, int)), "3 images but"),
    (dict(train_x=np.zeros((3, 2, 2)), train_y=np.array([0.5, 1, 2]),
          test_x=np.zeros((1, 2, 2)), test_y=np.zeros(1, int)), "integer class"),
])
def test_npz_bad_contents(tmp_path: Path, arrays: dict, problem: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=problem):
        load_npz(path)


def test_npz_not_an_archive(tmp_path: Path) -> None:
    path = tmp_path / "junk.npz"
    path.write_bytes(b"not a zip file at all")
    with pytest.raises(DataError, match="junk.npz"):
        load_npz(path)
