"""What is equal bit for bit, beyond the replicas of one run (test_parallel checks those):
a placement that splits no sum trains exactly like the single-device network, and one plan
gives the same bits however its logical devices map onto physical ones.  The other
placements (data, hybrid, pipelines) add a layer's per-share sums in another order than one
sum over the batch, so they equal the single-device step only within rounding."""
from __future__ import annotations

import numpy as np
import pytest

from helpers import split_opencl_device
from test_parallel import PLACEMENTS, source, train


def assert_bitwise(a, b):
    (la, pa, _, _), (lb, pb, _, _) = a, b
    assert la.tobytes() == lb.tobytes(), "losses differ"
    for name in pa:
        assert pa[name].tobytes() == pb[name].tobytes(), name


@pytest.mark.parametrize("backend", ["reference", "opencl", "race"])
def test_model_parallel_equals_single_device_bitwise(backend, tmp_path):
    """Every layer on one device, activations and gradients copied: no sum changes order."""
    single = train(source({}), backend, 3, tmp_path)
    assert_bitwise(single, train(source(PLACEMENTS["model"]), backend, 3, tmp_path))


def test_data_parallel_is_not_bitwise_but_within_rounding(tmp_path):
    """The counterpart: data parallelism sums each share's gradient, then the shares."""
    single = train(source({}), "reference", 3, tmp_path)
    data = train(source(PLACEMENTS["data-2"]), "reference", 3, tmp_path)
    assert any(single[1][k].tobytes() != data[1][k].tobytes() for k in single[1])
    for k in single[1]:
        np.testing.assert_allclose(data[1][k], single[1][k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_one_plan_on_one_or_two_opencl_devices_is_bitwise_equal(tmp_path, monkeypatch):
    """--gpus 0,0 (both logical devices on one device) and --gpus 0,1 (two sub-devices)."""
    shared = train(source(PLACEMENTS["data-2"]), "opencl", 3, tmp_path / "one", gpus=(0, 0))
    split_opencl_device(monkeypatch)
    split = train(source(PLACEMENTS["data-2"]), "opencl", 3, tmp_path / "two", gpus=(0, 1))
    assert_bitwise(shared, split)
