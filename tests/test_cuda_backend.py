"""The CUDA backend (PyCUDA) on a real GPU: runs only where one is usable."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cnnc.backends.cuda import cuda_usable

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not cuda_usable(), reason="needs PyCUDA and an NVIDIA GPU")]

ROOT = Path(__file__).parent.parent


def test_cuda_training_steps_match_reference(tmp_path):
    from cnnc.backends import make_backend
    from cnnc.build import compile_file
    from cnnc.executor import Executor
    from cnnc.train.data import load_digits

    plan = compile_file(ROOT / "examples" / "digits.cnn", tmp_path).plan
    ds = load_digits()
    x, y = ds.train_x[:plan.batch], ds.train_y[:plan.batch]
    results = {}
    for name in ("reference", "cuda"):
        ex = Executor(plan, make_backend(name, plan, tmp_path, [0]))
        for step in range(3):
            ex.train_step(x, y, step / 3)
        results[name] = ex.parameters()
    for k, v in results["reference"].items():
        np.testing.assert_allclose(results["cuda"][k], v, rtol=1e-4, atol=1e-6, err_msg=k)
