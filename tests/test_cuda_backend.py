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


@pytest.fixture(scope="module")
def cuda_cases(tmp_path_factory):
    """Every kernel test case rendered as CUDA into one module, and a backend that runs it."""
    from cnnc.backends.cuda import CudaBackend
    from cnnc.codegen.dialect import CUDA
    from cnnc.codegen.nvcc import find_nvcc
    from cnnc.codegen.render import render_source
    from test_kernels_opencl import cases

    if find_nvcc() is None:
        pytest.skip("the CUDA kernel cases are compiled by nvcc, which is not on PATH")
    kernels = cases()
    source, launches = render_source(kernels, CUDA, "test", "", "kernel equivalence cases")
    for k in kernels:
        k.launch["cuda"] = launches[k.name]
    build = tmp_path_factory.mktemp("cases")
    (build / "gpu0.cu").write_text(source)          # no cubin or PTX: the backend compiles the source
    return CudaBackend(build, {0: 0}), {k.name: k for k in kernels}


def test_every_kernel_case_matches_reference_on_cuda(cuda_cases):
    """The kernel test matrix (tests/test_kernels_opencl.py) on the GPU, with the CUDA target's
    own spellings and tiles; one test, since the cases share one module and the GPU is fast."""
    from test_kernels_opencl import check_kernel

    backend, kernels = cuda_cases
    failed = []
    for k in kernels.values():
        try:
            check_kernel(backend, k)
        except AssertionError as e:
            failed.append(f"{k.name}: {str(e).strip().splitlines()[0]}")
    assert not failed, "\n".join(failed)


def test_logical_devices_on_one_gpu_train_as_one_device(tmp_path):
    """--gpus 0,0: a data-parallel plan's two logical devices on one GPU train as the single-device
    network does (within rounding: the shares' gradients are summed in another order), and a
    model-parallel plan on one GPU gives the single-device bits exactly."""
    from test_bitwise import assert_bitwise
    from test_parallel import PLACEMENTS, assert_same_training, source, train

    single = train(source({}), "cuda", 3, tmp_path, gpus=(0,))
    assert_same_training(single, train(source(PLACEMENTS["data-2"]), "cuda", 3, tmp_path, gpus=(0, 0)))
    assert_bitwise(single, train(source(PLACEMENTS["model"]), "cuda", 3, tmp_path, gpus=(0, 0, 0)))


def _gpu_count() -> int:
    import pycuda.driver as drv

    drv.init()
    return drv.Device.count()


def test_two_gpus_train_bitwise_as_one(tmp_path):
    """On two GPUs: a model-parallel plan gives the single-device bits, copies crossing between
    the GPUs both ways; and one data-parallel plan gives the same bits on one GPU or on two."""
    from test_bitwise import assert_bitwise
    from test_parallel import PLACEMENTS, source, train

    if _gpu_count() < 2:
        pytest.skip("needs two GPUs")
    single = train(source({}), "cuda", 3, tmp_path, gpus=(0,))
    assert_bitwise(single, train(source(PLACEMENTS["model"]), "cuda", 3, tmp_path, gpus=(0, 1, 0)))
    data = source(PLACEMENTS["data-2"])
    assert_bitwise(train(data, "cuda", 3, tmp_path / "one", gpus=(0, 0)),
                   train(data, "cuda", 3, tmp_path / "two", gpus=(0, 1)))
