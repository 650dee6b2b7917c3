"""The nvcc driver against the real compiler: cubins, ptxas report, errors."""

from __future__ import annotations

import json
import pickle
import subprocess
from pathlib import Path

import pytest

from cnnc.codegen.nvcc import (
    KernelResources,
    NvccError,
    compile_cubins,
    find_nvcc,
    parse_ptxas_report,
    ptx_arch,
    validate_arch,
)

pytestmark = [
    pytest.mark.nvcc,
    pytest.mark.skipif(find_nvcc() is None, reason="nvcc not found on PATH, "
                       "$CUDA_HOME/bin or $CUDA_PATH/bin"),
]

SMEM_KERNEL = r"""
extern "C" __global__ void reverse256(const float* __restrict__ x,
                                      float* __restrict__ y, int n) {
    __shared__ float buf[256];
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    buf[threadIdx.x] = i < n ? x[i] : 0.0f;
    __syncthreads();
    if (i < n) y[i] = buf[255 - threadIdx.x] * 2.0f;
}

extern "C" __global__ void add_one(const float* x, float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i] + 1.0f;
}
"""

BROKEN_KERNEL = r"""
extern "C" __global__ void broken(float* y) {
    y[0] = 1.0f
}
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    """Compile once for both archs; nvcc costs about a second per arch."""
    root = tmp_path_factory.mktemp("nvcc")
    src = root / "kernels.cu"
    src.write_text(SMEM_KERNEL)
    out = root / "out"
    return out, compile_cubins(src, out, archs=("sm_80", "sm_90"))


def test_cubins_written(built) -> None:
    out, result = built
    assert set(result.outputs) == {"sm_80", "sm_90"}
    for arch, path in result.outputs.items():
        assert path == out.resolve() / f"kernels.{arch}.cubin"
        assert path.is_file() and path.stat().st_size > 0
    # No temporaries left behind by the atomic rename.
    assert sorted(p.name for p in out.iterdir()) == [
        "kernels.sm_80.cubin", "kernels.sm_90.cubin"]
    assert "nvcc" in Path(result.command[0]).name
    assert "-arch=sm_80" in result.command
    assert not any("fast_math" in f for f in result.command)


def test_resources_parsed(built) -> None:
    _, result = built
    assert set(result.resources) == {"reverse256", "add_one"}
    for arch in ("sm_80", "sm_90"):
        smem = result.resources["reverse256"][arch]
        assert smem.registers > 0
        assert smem.shared_bytes == 1024
        assert smem.spill_stores == 0 and smem.spill_loads == 0
        assert not smem.spills
        plain = result.resources["add_one"][arch]
        assert plain.registers > 0 and plain.shared_bytes == 0
    assert result.resources["reverse256"]["sm_80"].to_json()["shared_bytes"] == 1024


def test_syntax_error_raises(tmp_path: Path) -> None:
    src = tmp_path / "broken.cu"
    src.write_text(BROKEN_KERNEL)
    with pytest.raises(NvccError) as info:
        compile_cubins(src, tmp_path / "out", archs=("sm_80",))
    err = info.value
    first = str(err).splitlines()[0]
    assert first.startswith("nvcc failed")
    assert "broken.cu" in first and "(sm_80)" in first and "error" in first
    assert "nvcc" in err.repro and "-arch=sm_80" in err.repro
    assert "error" in err.log
    assert not list((tmp_path / "out").iterdir())
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err)


@pytest.mark.parametrize("arch", ["sm_70", "compute_80", "80", "sm_", "sm80"])
def test_invalid_arch(tmp_path: Path, arch: str) -> None:
    src = tmp_path / "k.cu"
    src.write_text(SMEM_KERNEL)
    with pytest.raises(ValueError, match="architecture"):
        compile_cubins(src, tmp_path, archs=(arch,))
    with pytest.raises(ValueError):
        validate_arch(arch)


def test_fast_math_rejected(tmp_path: Path) -> None:
    src = tmp_path / "k.cu"
    src.write_text(SMEM_KERNEL)
    with pytest.raises(ValueError, match="fast_math"):
        compile_cubins(src, tmp_path, archs=("sm_80",),
                       extra_flags=["--use_fast_math"])


def test_parse_report_variants() -> None:
    """Older releases omit barriers/smem fields and device functions get a
    properties block of their own; neither may confuse the parser."""
    log = """\
ptxas info    : 0 bytes gmem, 400 bytes cmem[3]
ptxas info    : Compiling entry function 'k1' for 'sm_80'
ptxas info    : Function properties for k1
    48 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, 2048 bytes smem, 364 bytes cmem[0], 8 bytes cmem[2]
ptxas info    : Function properties for _Z6helperf
    16 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function 'k2' for 'sm_80'
ptxas info    : Function properties for k2
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 12 registers, used 0 barriers
"""
    res = parse_ptxas_report(log)
    assert set(res) == {"k1", "k2"}
    assert res["k1"] == KernelResources(
        registers=255, spill_stores=8, spill_loads=12, shared_bytes=2048,
        stack_bytes=48, const_bytes=372, barriers=None)
    assert res["k2"].registers == 12 and res["k2"].const_bytes is None


def test_ptx_arch_is_the_lowest_without_suffix() -> None:
    assert ptx_arch(["sm_90", "sm_80"]) == "compute_80"
    assert ptx_arch(["sm_100f", "sm_90a"]) == "compute_90"
    with pytest.raises(ValueError):
        ptx_arch(["sm_70"])


def test_ptx_of_the_lowest_arch_compiles_for_a_later_gpu(tmp_path: Path) -> None:
    """The PTX a build ships is what the driver JIT-compiles on GPUs without a fitting cubin;
    ptxas compiling it for sm_120 stands in for that driver (no GPU needed)."""
    src = tmp_path / "kernels.cu"
    src.write_text(SMEM_KERNEL)
    out = tmp_path / "out"
    result = compile_cubins(src, out, archs=("sm_90", "sm_80"), ptx=True)
    assert result.ptx == out.resolve() / "kernels.ptx"
    assert set(result.outputs) == {"sm_90", "sm_80"}           # the PTX is no cubin
    assert "-arch=compute_80" in result.commands["compute_80"] and "-ptx" in result.commands["compute_80"]
    text = result.ptx.read_text()
    assert ".target sm_80" in text
    assert ".entry reverse256" in text and ".entry add_one" in text
    assert sorted(p.name for p in out.iterdir()) == ["kernels.ptx", "kernels.sm_80.cubin", "kernels.sm_90.cubin"]
    ptxas = Path(find_nvcc()).with_name("ptxas")
    if ptxas.is_file():
        done = subprocess.run([str(ptxas), "-arch=sm_120", "-o", str(tmp_path / "jit.cubin"), str(result.ptx)],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


def test_a_build_ships_the_ptx_of_every_device(tmp_path: Path) -> None:
    from cnnc.build import compile_network

    source = (Path(__file__).parent.parent / "examples" / "digits.cnn").read_text()
    result = compile_network(source, "digits.cnn", tmp_path / "build", archs=("sm_90", "sm_80"))
    manifest = json.loads((tmp_path / "build" / "manifest.json").read_text())
    for dev in result.plan.devices:
        ptx = tmp_path / "build" / f"gpu{dev}.ptx"
        assert ptx.name in manifest["files"] and ptx.name in manifest["sha256"]
        text = ptx.read_text()
        assert ".target sm_80" in text
        launched = {op.kernel for program in result.plan.programs.values() for op in program.get(dev, [])
                    if op.kind == "launch"}
        assert launched and all(f".entry {name}(" in text for name in launched)
