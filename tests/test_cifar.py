"""CIFAR-10's python batch format as a data source, on tiny batches written in that format."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cnnc.cli import main
from cnnc.train.data import DataError, fit_images, load_cifar10, load_dataset


def write_batches(folder: Path, n_train=(40, 30), n_test=20, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i + 1}" for i in range(len(n_train))] + ["test_batch"]
    for name, n in zip(names, list(n_train) + [n_test]):
        d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"labels": [int(v) for v in rng.integers(0, 10, n)], b"batch_label": name.encode()}
        with open(folder / name, "wb") as f:
            pickle.dump(d, f)
    return folder


def test_load_python_batches(tmp_path):
    ds = load_cifar10(write_batches(tmp_path / "c"))
    assert ds.train_x.shape == (70, 3, 32, 32) and ds.test_x.shape == (20, 3, 32, 32)
    assert ds.classes == 10 and ds.train_y.dtype == np.int32
    assert abs(float(ds.train_x.mean())) < 1e-5           # centred on the training mean
    assert load_dataset(str(tmp_path / "c")).n_train == 70


def test_bad_folders_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="needs data_batch_1"):
        load_cifar10(tmp_path)
    folder = write_batches(tmp_path / "c")
    (folder / "data_batch_2").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_2: not a CIFAR-10 python batch"):
        load_cifar10(folder)


def test_pickles_cannot_run_code(tmp_path):
    folder = write_batches(tmp_path / "c")

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(DataError, match="unexpected object builtins.print"):
        load_cifar10(folder)


def test_crops_random_for_training_centre_for_testing():
    x = np.arange(2 * 3 * 32 * 32, dtype=np.float32).reshape(2, 3, 32, 32)
    centre = fit_images(x, (3, 24, 24), None)
    assert centre.shape == (2, 3, 24, 24) and (centre[0, 0, 0, 0] == x[0, 0, 4, 4])
    a = fit_images(x, (3, 24, 24), np.random.default_rng(1))
    b = fit_images(x, (3, 24, 24), np.random.default_rng(1))
    assert a.shape == (2, 3, 24, 24) and (a == b).all()


def test_run_trains_on_a_cifar_folder(tmp_path):
    folder = write_batches(tmp_path / "c")
    net = tmp_path / "tiny.cnn"
    net.write_text("network tiny\ninput data: 3x24x24\ninput labels: label(10)\ntrain { batch = 10 }\n"
                   "c1 = conv(data, filters=4, size=5, stride=2) relu\np1 = maxpool(c1, size=2)\n"
                   "f2 = fc(p1, outputs=10)\nprobs = softmax(f2)\ncost = logreg(labels, probs)\n")
    runner = CliRunner()
    assert runner.invoke(main, ["compile", str(net), "-o", str(tmp_path / "b"), "--no-nvcc"]).exit_code == 0
    result = runner.invoke(main, ["run", str(tmp_path / "b"), "--backend", "reference", "--epochs", "1", "-q",
                                  "--data", str(folder), "--save-dir", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "70 train / 20 test images" in result.output
