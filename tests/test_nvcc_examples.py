"""Every example's generated CUDA compiles with nvcc for sm_80 and sm_90, with no spills."""
from __future__ import annotations

from pathlib import Path

import pytest

from cnnc.codegen.nvcc import find_nvcc

pytestmark = [pytest.mark.nvcc,
              pytest.mark.skipif(find_nvcc() is None, reason="nvcc is not on PATH")]

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.cnn"))


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.stem for e in EXAMPLES])
def test_example_compiles_without_spills(example, nvcc_build):
    plan, manifest, out = nvcc_build(example.stem, example.read_text())
    for dev in plan.devices:
        for arch in ("sm_80", "sm_90"):
            assert (out / f"gpu{dev}.{arch}.cubin").stat().st_size > 0
    assert manifest["kernels"], "no kernels recorded"
    for name, k in manifest["kernels"].items():
        assert set(k["resources"]) == {"sm_80", "sm_90"}, name
        for arch, r in k["resources"].items():
            assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"{name} spills on {arch}: {r}"
            assert r["registers"] <= 255 and 0 < r["occupancy"] <= 1
