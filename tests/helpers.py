"""Helpers shared by the tests: stable seeds, checked rewrites and golden files (which keep tests
from passing vacuously), and a direct call of one reference op."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np
import pytest

from cnnc.backends.reference_ops import REFERENCE_OPS
from cnnc.ops import OPS, Role


def stable_seed(*parts: object) -> int:
    """A seed (and a name) that is the same in every process: Python salts ``hash()`` of str per run."""
    return zlib.crc32(repr(parts).encode())


def rewrite(text: str, edits: dict[str, str], *, once: bool = True) -> str:
    """``text`` with each ``old`` replaced by ``new``, in order, failing when an anchor is missing.

    A replace whose anchor drifted away would leave the test running on the unedited network,
    so each anchor must occur (exactly once unless ``once=False``).
    """
    for old, new in edits.items():
        count = text.count(old)
        if count == 0 or (once and count != 1):
            expected = "once" if once else "at least once"
            raise AssertionError(f"rewrite anchor {old!r} occurs {count} times, expected {expected}")
        text = text.replace(old, new)
    return text


def replace_once(text: str, old: str, new: str) -> str:
    """``text`` with its one occurrence of ``old`` replaced by ``new``."""
    return rewrite(text, {old: new})


def check_golden(got: str, golden: Path, what: str = "") -> None:
    """Compare ``got`` with a golden file; with CNNC_UPDATE_GOLDEN set, write it and skip instead.

    Update mode skips rather than passes, so a run that rewrote goldens never reads as green.
    """
    if os.environ.get("CNNC_UPDATE_GOLDEN"):
        golden.write_text(got)
        pytest.skip(f"updated golden file {golden}; review the diff")
    assert got == golden.read_text(), what or f"output differs from golden file {golden}"


def run_reference(name: str, params: dict, **arrays) -> dict[str, np.ndarray]:
    """Call the reference op `name` on flat copies of the arrays (scalars as numbers); returns
    its outputs by argument name, reshaped like the arrays given for them."""
    args, flat = [], {}
    for arg, role in OPS[name].args:
        if role is Role.SCALAR:
            args.append(float(arrays[arg]))
        elif role is Role.INT_SCALAR:
            args.append(int(arrays[arg]))
        else:
            flat[arg] = np.asarray(arrays[arg]).reshape(-1).copy()
            args.append(flat[arg])
    REFERENCE_OPS[name](params, *args)
    return {arg: flat[arg].reshape(np.shape(arrays[arg]))
            for arg, role in OPS[name].args if role in (Role.OUT, Role.INOUT)}


# A network that diverges on schedule: fed an all-ones image, each step multiplies fc1's output by
# 1 - 2*lr*(64 + 1) = -1.6 whatever the shuffle, so the sum of squares passes the largest float in
# step 99, the second step of epoch 50, on every backend.
GROWING = """\
network grow
input data: 1x8x8
input labels: label(10)
train {
  batch = 8
  epochs = 1000
  seed = 1
  lr = 0.02
  momentum = 0
}
fc1 = fc(data, outputs=10, init_w=0.01)
cost = sum2(fc1)
"""


# four logical devices for runs across MPI ranks: data-parallel convolutions, then a
# model-parallel tail, so a step has activation copies, gradient copies and the
# replicated-weight exchange across ranks
RANKS4 = """
network ranks4
input data: 1x8x8
input labels: label(10)
train { batch = 16; epochs = 1; seed = 3; lr = 0.05; momentum = 0.9; weight_decay = 0.0005; init_w = 0.1 }
@gpu(0,1,2,3) conv1 = conv(data, filters=6, size=3, padding=1) relu
@gpu(0,1,2,3) pool1 = maxpool(conv1, size=2, stride=2)
@gpu(1) fc2 = fc(pool1, outputs=12) tanh
@gpu(2) fc3 = fc(fc2, outputs=10)
@gpu(3) probs = softmax(fc3)
@gpu(3) cost = logreg(labels, probs)
"""


def split_opencl_device(monkeypatch) -> None:
    """Split the OpenCL device into two sub-devices (CNNC_OPENCL_SUBDEVICES=2), or skip the test
    where the device cannot be partitioned."""
    monkeypatch.setenv("CNNC_OPENCL_SUBDEVICES", "2")
    from cnnc.backends.opencl import _physical_devices
    try:
        if len(_physical_devices()) < 2:
            pytest.skip("this OpenCL device cannot be split in two")
    except Exception as e:                  # the device does not support partitioning
        pytest.skip(f"this OpenCL device cannot be split: {e}")
