"""Augmentation and evaluation as cuda-convnet2 does them, as a user of `cnnc run` meets
them: colour noise along the training pixels' principal components (`--color-noise`),
the 10-view test (`--multiview-test`) and every cost's loss in the records of a network
with several costs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cnnc.backends import make_backend
from cnnc.build import open_build
from cnnc.predict import probabilities
from cnnc.train.checkpoint import latest_checkpoint
from cnnc.train.data import add_color_noise, color_components, load_npz
from cnnc.train.loader import Loader

from checkpoint_runs import NET, assert_bitwise, compiled, records, run, weights, write_data
from helpers import replace_once


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("data"))


CONST_LR_NET = replace_once(NET, "lr = dexp(base=0.05, tgt_factor=10, steps=3)", "lr = 0.05")
RGB_NET = replace_once(CONST_LR_NET, "input data: 1x8x8", "input data: 3x8x8")


@pytest.fixture(scope="module")
def rgb_data(tmp_path_factory) -> Path:
    """48 training and 20 test 3x10x10 images whose colours are correlated across channels."""
    rng = np.random.default_rng(11)
    mix = np.array([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.3, 0.2, 0.1]], np.float32)

    def images(n):
        return np.einsum("dc,nchw->ndhw", mix, rng.standard_normal((n, 3, 10, 10)).astype(np.float32))

    path = tmp_path_factory.mktemp("rgb") / "rgb.npz"
    np.savez(path, train_x=images(48), train_y=rng.integers(0, 4, 48), test_x=images(20),
             test_y=rng.integers(0, 4, 20))
    return path


def test_color_components_are_the_pixel_covariance_eigenpairs():
    rng = np.random.default_rng(0)
    cov = np.array([[4.0, 1.5, 0.5], [1.5, 2.0, 0.3], [0.5, 0.3, 1.0]])
    pixels = rng.multivariate_normal([0.2, -0.1, 0.4], cov, size=40 * 16 * 16)
    x = pixels.reshape(40, 16, 16, 3).transpose(0, 3, 1, 2).astype(np.float32)
    found = color_components(x, chunk=7)
    variances, vectors = np.linalg.eigh(np.cov(pixels.T, bias=True))
    assert np.allclose(found.variances, variances, rtol=1e-6)
    assert np.allclose(np.abs(found.vectors.T @ vectors), np.eye(3), atol=1e-6)


def test_color_noise_shifts_each_image_along_the_components():
    """One colour shift per image (the same at every pixel), zero on average, with variance
    (std * variance_i)^2 along component i and no correlation between components."""
    rng = np.random.default_rng(1)
    cov = np.array([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 0.5]])
    train = rng.multivariate_normal([0, 0, 0], cov, size=20 * 8 * 8).reshape(20, 8, 8, 3).transpose(0, 3, 1, 2)
    components = color_components(train.astype(np.float32))
    x = rng.standard_normal((20000, 3, 2, 2)).astype(np.float32)
    noisy = x.copy()
    std = 0.1
    add_color_noise(noisy, components, std, np.random.default_rng(2))
    shift = (noisy - x).astype(np.float64)
    assert np.allclose(shift, shift[:, :, :1, :1], atol=1e-5)
    along = shift[:, :, 0, 0] @ components.vectors              # the shifts in component coordinates
    assert np.allclose(along.mean(axis=0), 0, atol=4 * std * components.variances.max() / np.sqrt(len(x)))
    assert np.allclose(np.cov(along.T), np.diag((std * components.variances) ** 2),
                       rtol=0.05, atol=1e-2 * (std * components.variances.max()) ** 2)


def test_loader_noise_is_keyed_by_step_and_keeps_the_crops(tmp_path, rgb_data):
    plan, _ = open_build(compiled(tmp_path, RGB_NET))
    ds = load_npz(rgb_data)
    plain, noisy = Loader(plan, ds), Loader(plan, ds, color_noise=0.3)
    x0, y0 = plain.batch(1, 2)
    x1, y1 = noisy.batch(1, 2)
    assert np.array_equal(y0, y1)
    shift = x1 - x0
    assert np.abs(shift).max() > 1e-3
    assert np.allclose(shift, shift[:, :, :1, :1], atol=1e-5)        # the crop and flip are as without noise
    assert np.array_equal(noisy.batch(1, 2)[0], x1)
    assert not np.allclose(noisy.batch(1, 3)[0] - plain.batch(1, 3)[0], shift)


def test_resume_with_color_noise_is_bitwise(tmp_path, rgb_data):
    """The resumed run takes its colour noise from the checkpoint and ends where an
    uninterrupted run ends, bit for bit."""
    build = compiled(tmp_path, RGB_NET)
    run(build, rgb_data, "--steps", 9, "--color-noise", 0.5, "--save-dir", tmp_path / "whole")
    run(build, rgb_data, "--steps", 4, "--color-noise", 0.5, "--save-dir", tmp_path / "cut")
    assert latest_checkpoint(tmp_path / "cut").color_noise == 0.5
    run(build, rgb_data, "--resume", tmp_path / "cut", "--steps", 9)
    assert_bitwise(weights(tmp_path / "whole"), weights(tmp_path / "cut"))
    run(build, rgb_data, "--steps", 9, "--save-dir", tmp_path / "plain")
    assert not np.array_equal(weights(tmp_path / "plain")["fc2.weights"], weights(tmp_path / "whole")["fc2.weights"])


def test_multiview_test_averages_the_softmax_of_ten_views(tmp_path, rgb_data):
    build = compiled(tmp_path, RGB_NET)
    run(build, rgb_data, "--steps", 3, "--no-test", "--save-dir", tmp_path / "run")
    out, _ = run(build, rgb_data, "--test-only", "--init", tmp_path / "run" / "weights.npz", "--multiview-test")
    plan, _ = open_build(build)
    params = {k: v for k, v in weights(tmp_path / "run").items() if k not in ("classes", "mean")}
    ds = load_npz(rgb_data)
    x = np.asarray(ds.test_x, np.float32)
    be = make_backend("reference", plan, build, [0])
    by_hand = []
    for top, left in [(0, 0), (0, 2), (2, 0), (2, 2), (1, 1)]:
        crop = np.ascontiguousarray(x[:, :, top:top + 8, left:left + 8])
        by_hand += [probabilities(plan, be, params, crop),
                    probabilities(plan, be, params, np.ascontiguousarray(crop[..., ::-1]))]
    probs = np.mean(by_hand, axis=0)
    label_probs = probs[np.arange(len(ds.test_y)), ds.test_y]
    loss = -np.log(label_probs).mean()
    error = np.mean(probs.argmax(axis=1) != ds.test_y)
    assert out.strip().startswith(f"test error {error * 100:5.2f}%  test loss {loss:.4f}"), out
    centre, _ = run(build, rgb_data, "--test-only", "--init", tmp_path / "run" / "weights.npz")
    assert centre != out


TWO_COSTS = replace_once(CONST_LR_NET, "cost = logreg(labels, probs)",
                         "cost = logreg(labels, probs)\naux = sum2(fc2, coeff=0.3)")


def test_every_cost_is_reported_with_its_coeff(tmp_path, data):
    build = compiled(tmp_path, TWO_COSTS)
    out, _ = run(build, data, "--steps", 4, "--save-freq", 2, "--save-dir", tmp_path / "run")
    (record,) = records(tmp_path / "run")
    assert record["coeffs"] == {"cost": 1.0, "aux": 0.3}
    assert record["costs"]["cost"] == record["train_loss"]
    assert record["costs"]["aux"] > 0
    assert f"cost {record['train_loss']:.4f} (x1), aux {record['costs']['aux']:.4f} (x0.3)" in out
    # a resume mid-epoch carries every cost's partial sums on
    whole = tmp_path / "whole"
    run(build, data, "--steps", 4, "--save-dir", whole)
    cut = tmp_path / "cut"
    run(build, data, "--steps", 2, "--save-dir", cut)
    run(build, data, "--resume", cut, "--steps", 4)
    assert records(cut)[-1]["costs"] == records(whole)[-1]["costs"]


def test_one_cost_records_are_as_before(tmp_path, data):
    build = compiled(tmp_path)
    run(build, data, "--steps", 2, "--save-dir", tmp_path / "run")
    assert "costs" not in json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
