"""Generated source: golden files for a tiny net, and properties every kernel must have.

Regenerate the golden files after an intended change with
    CNNC_UPDATE_GOLDEN=1 pytest tests/test_codegen.py
and review the diff like any other code change.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from cnnc.build import compile_file

from helpers import check_golden

HERE = Path(__file__).parent
GOLDEN = HERE / "golden"
EXAMPLES = sorted((HERE.parent / "examples").glob("*.cnn"))


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    # compile from the golden folder so the file name in headers is stable
    cwd = os.getcwd()
    os.chdir(GOLDEN)
    try:
        compile_file("tiny.cnn", out, use_nvcc=False)
    finally:
        os.chdir(cwd)
    return out


@pytest.mark.parametrize("ext", ["cu", "cl"])
def test_golden_source(tiny_build, ext):
    got = (tiny_build / f"gpu0.{ext}").read_text()
    golden = GOLDEN / f"tiny.gpu0.{ext}"
    check_golden(got, golden, f"generated gpu0.{ext} differs from {golden}; see the module docstring")


def test_every_kernel_names_its_dsl_line(tiny_build):
    text = (tiny_build / "gpu0.cu").read_text()
    kernels = re.findall(r'extern "C" __global__ void __launch_bounds__\(\d+\) (\w+)\(', text)
    assert len(kernels) >= 10
    source = (GOLDEN / "tiny.cnn").read_text().splitlines()
    for name in kernels:
        if name.startswith(("sgd_update", "nonfinite")):
            continue          # shared by all layers
        block = text[text.index(f"// {name}\n"):text.index(f") {name}(")]
        m = re.search(r"// tiny\.cnn:(\d+): (.*)", block)
        assert m, f"{name} has no source-line comment"
        assert source[int(m.group(1)) - 1].strip() == m.group(2)


def test_dialects_differ_only_in_spelling(tiny_build):
    cu = (tiny_build / "gpu0.cu").read_text()
    cl = (tiny_build / "gpu0.cl").read_text()
    assert "__global__" in cu and "__kernel" not in cu and "barrier(" not in cu
    assert "__kernel" in cl and "__syncthreads" not in cl and "__shared__" not in cl
    assert re.findall(r"// (\w+)\n// ", cu) == re.findall(r"// (\w+)\n// ", cl)


def test_shapes_are_compile_time_constants(tiny_build):
    cu = (tiny_build / "gpu0.cu").read_text()
    # kernels take only pointers, never sizes, and runtime scalars only through the step-scalar buffer
    for sig in re.findall(r"\) (\w+)\(([^)]*)\)", cu):
        for param in sig[1].split(","):
            assert "*" in param, param
