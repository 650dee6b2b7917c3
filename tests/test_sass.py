"""SASS analysis (cnnc/codegen/sass.py): parsing, loops and mix on small hand-written listings,
and on real builds: no kernel touches local memory, fp32 kernels issue no MMA, tf32/bf16 ones do."""
from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from cnnc.codegen import sass
from cnnc.codegen.nvcc import find_nvcc
from cnnc.codegen.sass import (Loop, analyse_function, analyse_sass, classify, find_loops, find_tool, main_loop,
                               parse_sass)
from cnnc.ops import OPS
from cnnc.plan.summary import format_sass

EXAMPLES_DIR = Path(__file__).parent.parent / "examples"


def listing(*functions: tuple[str, str]) -> str:
    """cuobjdump-style text: each body line is 'ADDR INSTRUCTION', ADDR in hex without 0x."""
    out = ["", "\tcode for sm_90", "\t.target\tsm_90", ""]
    for name, body in functions:
        out += [f"\t\tFunction : {name}", '\t.headerflags\t@"EF_CUDA_SM90"']
        for line in body.strip().splitlines():
            addr, ins = line.split(None, 1)
            out.append(f"        /*{int(addr, 16):04x}*/                   {ins:<50} /* 0x000fe20000000800 */")
            out.append(f"{'':93}/* 0x000fca0000000f00 */")
        out += ["\t\t..........", ""]
    return "\n".join(out)


# a loop from 0x20 to 0x60 (two FFMA, two LDS), entered after a setup block; a trap after EXIT
ONE_LOOP = """
0000 S2R R0, SR_TID.X ;
0010 IMAD.MOV.U32 R2, RZ, RZ, RZ ;
0020 LDS R4, [R0] ;
0030 LDS R5, [R0+0x40] ;
0040 FFMA R2, R4, R5, R2 ;
0050 FFMA R3, R4, R5, R3 ;
0060 @P0 BRA 0x20 ;
0070 STG.E desc[UR4][R6.64], R2 ;
0080 EXIT ;
0090 BRA 0x90;
00a0 NOP;
"""

# an outer loop 0x10..0xb0 holding a tile-copy loop 0x20..0x40 (no math) and unrolled math
COPY_THEN_MATH = """
0000 MOV R1, c[0x0][0x28] ;
0010 LDG.E R8, desc[UR4][R2.64] ;
0020 STS [R9], R8 ;
0030 IADD3 R9, R9, 0x4, RZ ;
0040 @!P1 BRA 0x20 ;
0050 BAR.SYNC.DEFER_BLOCKING 0x0 ;
0060 LDS.128 R4, [R0] ;
0070 FFMA R10, R4, R5, R10 ;
0080 FFMA R11, R6, R7, R11 ;
0090 FFMA R12, R4, R7, R12 ;
00a0 BAR.SYNC.DEFER_BLOCKING 0x0 ;
00b0 @!P0 BRA 0x10 ;
00c0 EXIT ;
"""

# an outer loop 0x00..0x90 whose math all sits in an inner loop 0x20..0x60
MATH_INNER = """
0000 IADD3 R1, R1, 0x1, RZ ;
0010 LDG.E R8, desc[UR4][R2.64] ;
0020 LDS R4, [R0] ;
0030 FFMA R10, R4, R8, R10 ;
0040 FFMA R11, R4, R8, R11 ;
0050 ISETP.GE.AND P1, PT, R9, 0x10, PT ;
0060 @!P1 BRA 0x20 ;
0070 STG.E desc[UR4][R6.64], R10 ;
0080 ISETP.NE.AND P0, PT, R1, 0x8, PT ;
0090 @P0 BRA 0x0 ;
00a0 EXIT ;
"""


def test_classify_groups_opcodes_by_their_base():
    assert [classify(op) for op in ("FFMA", "FFMA.FTZ", "HMMA.16816.F32.TF32", "HGMMA.64x128x8.F32.TF32",
                                    "IMMA.16832.S8.S8", "HFMA2.MMA", "LDS.U.128", "LDSM.16.M88.4", "STS.64",
                                    "LDG.E.CONSTANT", "STG.E", "LDL", "STL.64", "LDGSTS.E.BYPASS.128",
                                    "BAR.SYNC.DEFER_BLOCKING", "UIADD3", "IMAD.WIDE", "BSSY", "EXIT", "MUFU.EX2")] \
        == ["ffma", "ffma", "mma", "mma", "mma", "other", "lds", "lds", "sts", "ldg", "stg", "ldl", "stl",
            "ldgsts", "bar", "int", "int", "branch", "branch", "other"]


def test_parse_splits_functions_keeps_predicates_and_drops_nops():
    fns = parse_sass(listing(("first", ONE_LOOP), ("second", "0000 EXIT ;\n0010 NOP;")))
    assert list(fns) == ["first", "second"]
    first = fns["first"]
    assert len(first) == 10 and first[-1].address == 0x90
    branch = first[6]
    assert (branch.address, branch.opcode, branch.predicate, branch.operands) == (0x60, "BRA", "@P0", "0x20")
    assert [i.opcode for i in fns["second"]] == ["EXIT"]


def test_a_backward_branch_closes_a_loop_and_the_trap_does_not():
    instructions = parse_sass(listing(("k", ONE_LOOP)))["k"]
    assert find_loops(instructions) == [Loop(0x20, 0x60)]
    assert main_loop(instructions) == Loop(0x20, 0x60)


def test_back_edges_to_one_target_make_one_loop():
    body = "0000 MOV R0, RZ ;\n0010 FFMA R1, R1, R1, R1 ;\n0020 @P1 BRA 0x10 ;\n0030 FADD R1, R1, R1 ;\n" \
           "0040 @P0 BRA 0x10 ;\n0050 @P2 BRA 0x60 ;\n0060 EXIT ;"
    assert find_loops(parse_sass(listing(("k", body)))["k"]) == [Loop(0x10, 0x40)]


def test_main_loop_is_the_outer_one_when_the_inner_only_copies():
    instructions = parse_sass(listing(("k", COPY_THEN_MATH)))["k"]
    assert find_loops(instructions) == [Loop(0x10, 0xb0), Loop(0x20, 0x40)]
    assert main_loop(instructions) == Loop(0x10, 0xb0)


def test_main_loop_is_the_inner_one_when_it_holds_the_math():
    instructions = parse_sass(listing(("k", MATH_INNER)))["k"]
    assert find_loops(instructions) == [Loop(0x0, 0x90), Loop(0x20, 0x60)]
    assert main_loop(instructions) == Loop(0x20, 0x60)


def test_without_math_the_largest_loop_is_the_main_one():
    body = "0000 LDG.E R1, desc[UR4][R2.64] ;\n0010 @P0 BRA 0x0 ;\n0020 LDG.E R1, desc[UR4][R2.64] ;\n" \
           "0030 FMNMX R4, R4, R1, !PT ;\n0040 IADD3 R2, R2, 0x4, RZ ;\n0050 @P1 BRA 0x20 ;\n0060 EXIT ;"
    assert main_loop(parse_sass(listing(("pool", body)))["pool"]) == Loop(0x20, 0x50)


def test_record_counts_the_main_loop_mix_and_local_memory():
    body = COPY_THEN_MATH.replace("0000 MOV R1, c[0x0][0x28] ;", "0000 STL [R1], R3 ;") \
                         .replace("00c0 EXIT ;", "00c0 LDL R3, [R1] ;\n00d0 EXIT ;")
    record = analyse_sass(listing(("gemm", body)))["gemm"]
    assert record["instructions"] == 14 and (record["ldl"], record["stl"]) == (1, 1)
    loop = record["main_loop"]
    assert (loop["start"], loop["end"], loop["instructions"]) == (0x10, 0xb0, 11)
    assert {k: v for k, v in loop["mix"].items() if v} == {"ldg": 1, "sts": 1, "int": 1, "branch": 2, "bar": 2,
                                                          "lds": 1, "ffma": 3}
    assert loop["fma_share"] == round(3 / 11, 4) and loop["mma_share"] == 0
    assert loop["lds_per_fma"] == round(1 / 3, 4)


def test_a_kernel_without_loops_has_no_main_loop():
    record = analyse_function(parse_sass(listing(("copy", "0000 LDG.E R1, desc[UR4][R2.64] ;\n"
                                                          "0010 STG.E desc[UR4][R4.64], R1 ;\n0020 EXIT ;")))["copy"])
    assert record == {"instructions": 3, "ldl": 0, "stl": 0, "mma": 0, "main_loop": None}


def test_mma_share_counts_tensor_core_instructions():
    body = "0000 LDSM.16.M88.4 R4, [R0] ;\n0010 HMMA.16816.F32.TF32 R8, R4, R6, R8 ;\n" \
           "0020 HMMA.16816.F32.TF32 R12, R4, R7, R12 ;\n0030 HFMA2.MMA R2, -RZ, RZ, 0, 0 ;\n0040 @P0 BRA 0x0 ;"
    loop = analyse_sass(listing(("tc", body)))["tc"]["main_loop"]
    assert (loop["mma_share"], loop["fma_share"], loop["lds_per_fma"]) == (0.4, 0.0, 0.5)


def _executable(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_find_tool_looks_on_path_then_in_the_wheel(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    on_path = tmp_path / "bin" / "cnnc-test-tool"
    _executable(on_path)
    monkeypatch.setenv("PATH", str(on_path.parent))
    assert find_tool("cnnc-test-tool") == str(on_path)
    in_wheel = tmp_path / "site" / "nvidia" / "cnnc_test" / "bin" / "cnnc-test-tool"
    _executable(in_wheel)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert find_tool("cnnc-test-tool") == str(in_wheel)
    assert find_tool("cnnc-no-such-tool") is None


def test_missing_tools_make_sass_unavailable(monkeypatch, tmp_path):
    monkeypatch.setattr(sass, "find_tool", lambda name: None)
    with pytest.raises(sass.SassUnavailable, match="cuobjdump and nvdisasm not found"):
        sass.disassemble(tmp_path / "gpu0.sm_90.cubin")


def test_a_build_without_nvcc_records_na(tiny_build_dir):
    manifest = json.loads((tiny_build_dir / "manifest.json").read_text())
    assert manifest["kernels"] and all(k["sass"] == "n/a" for k in manifest["kernels"].values())


def _launch(kernel: str, layer: str, record, time_us: float | None = None) -> dict:
    row = {"op": "launch", "kernel": kernel, "layer": layer, "flops": 2_000_000, "sass": record}
    if time_us is not None:
        row["roofline"] = {"time_us": time_us}
    return row


def test_plan_table_shows_main_loop_shares_local_memory_and_fraction_of_peak():
    gemm = analyse_sass(listing(("gemm", COPY_THEN_MATH)))["gemm"]
    spill = analyse_sass(listing(("spill", "0000 STL [R1], R3 ;\n0010 LDL R3, [R1] ;\n0020 EXIT ;")))["spill"]
    s = {"devices": [{"program": [_launch("fc1_fwd", "fc1", {"sm_80": spill, "sm_90": gemm}, time_us=2.0),
                                  _launch("fc1_fwd", "fc1", {"sm_80": spill, "sm_90": gemm}, time_us=2.0),
                                  _launch("update", None, {"sm_80": spill, "sm_90": spill}, time_us=1.0)]}]}
    lines = format_sass(s, ("sm_90",), peak_flops=1e12).splitlines()
    assert "sm_90 SASS" in lines[0] and lines[1].split()[-1] == "peak"
    assert len(lines) == 4                                           # one row per kernel, not per launch
    assert lines[2].split() == ["fc1", "fc1_fwd", "11", "27%", "0%", "0.33", "0", "100%"]
    assert lines[3].split() == ["(step)", "update", "-", "-", "-", "-", "2", "200%"]
    assert format_sass(s, ("sm_80",)).splitlines()[2].split()[-1] == "2"       # sm_80's SASS, no peak column
    none = {"devices": [{"program": [_launch("k", "l", "n/a")]}]}
    assert format_sass(none).startswith("instruction mix: n/a")


# --- real builds ---------------------------------------------------------------------------------

_TOOLS = (pytest.mark.nvcc,
          pytest.mark.skipif(find_nvcc() is None, reason="nvcc is not on PATH"),
          pytest.mark.skipif(not sass.tools_found(),
                             reason="cuobjdump/nvdisasm not found (pip install nvidia-cuda-cuobjdump "
                                    "nvidia-cuda-nvdisasm)"))


def needs_tools(test):
    for mark in _TOOLS:
        test = mark(test)
    return test


# Compiling every example takes minutes on two cores; these three cover the conv, fc, pool,
# norm and dropout templates (benchmarks/sass_mix.py checks all of them), and a variant of
# digits covers tf32 and bf16 GEMMs.
CHECKED = ("alexnet", "cifar10", "digits", "digits-tf32-bf16")
ARCHS = ("sm_80", "sm_90")
# (network, kernel, arch) -> why that kernel may touch local memory
LOCAL_MEMORY_EXCEPTIONS: dict[tuple[str, str, str], str] = {
    ("digits-tf32-bf16", "fc3_bwd_filter_n32_i512_o10_tf32", "sm_90"):
        "the SIMT fallback (K=32 is too short for tensor cores) spills two registers (8 B) around its "
        "main loop on sm_90; outside the loop, so cold",
}


def _source(name: str) -> str:
    """An example's text; `digits-tf32-bf16` is digits with tf32 GEMMs and a bf16 conv2."""
    if name != "digits-tf32-bf16":
        return (EXAMPLES_DIR / f"{name}.cnn").read_text()
    text = (EXAMPLES_DIR / "digits.cnn").read_text()
    variant = text.replace("train {", "train {\n  precision = tf32", 1).replace(
        "conv2 = conv(conv1, filters=32, size=3, padding=1) relu",
        "conv2 = conv(conv1, filters=32, size=3, padding=1) relu { precision = bf16 }")
    assert variant.count("precision") == 2, "examples/digits.cnn changed: update this variant"
    return variant


@pytest.fixture(scope="module")
def builds(nvcc_build) -> dict[str, tuple]:
    """Each checked network compiled for sm_80 and sm_90 (shared with the other nvcc tests):
    name -> (plan, manifest, build dir)."""
    return {name: nvcc_build(name, _source(name)) for name in CHECKED}


@needs_tools
@pytest.mark.parametrize("name", CHECKED)
def test_every_kernel_is_analysed_and_none_touches_local_memory(builds, name):
    plan, manifest, _ = builds[name]
    for kernel, k in manifest["kernels"].items():
        assert isinstance(k["sass"], dict) and set(k["sass"]) == set(ARCHS), kernel
        for arch, rec in k["sass"].items():
            if (name, kernel, arch) not in LOCAL_MEMORY_EXCEPTIONS:
                assert rec["ldl"] == 0 and rec["stl"] == 0, f"{kernel} uses local memory on {arch}: {rec}"


@needs_tools
@pytest.mark.parametrize("name", CHECKED)
def test_only_tensor_core_kernels_issue_mma(builds, name):
    """A kernel codegen gives tensor cores (a tf32/bf16 GEMM long enough in K) issues MMA in its
    main loop on both architectures (both sm_80 or newer); every other kernel (fp32, and the
    SIMT fallbacks) issues none anywhere.  fp32 GEMMs with K tiles to loop over do their FFMA
    in the main loop."""
    from cnnc.codegen.render import mma_math

    plan, manifest, _ = builds[name]
    for k in plan.kernels.values():
        math = mma_math(k)
        tensor_cores = math is not None and math[0] != "simt"
        for arch, rec in manifest["kernels"][k.name]["sass"].items():
            loop = rec["main_loop"]
            if tensor_cores:
                assert loop is not None and loop["mix"]["mma"] > 0, f"{k.name} issues no MMA on {arch}"
            else:
                assert rec["mma"] == 0, f"{k.name} issues MMA on {arch} but has no tensor-core path"
            if math is None and OPS[k.op].gemm and OPS[k.op].gemm(k.params)["K"] >= 256:
                assert loop is not None and loop["mix"]["ffma"] > 0, (k.name, arch)


@needs_tools
def test_plan_shows_the_mix_of_a_build(builds):
    from click.testing import CliRunner

    from cnnc.cli import main

    plan, _, out = builds["digits"]
    text = CliRunner().invoke(main, ["plan", str(out), "--machine", "h100", "--roofline"]).output
    table = text[text.index("main loops in the sm_90 SASS"):].splitlines()
    assert table[1].split()[-1] == "peak"
    gemm_rows = [line.split() for line in table[2:] if line.split()[1] in
                 {k.name for k in plan.kernels.values() if OPS[k.op].gemm}]
    assert gemm_rows and all(row[-1].endswith("%") for row in gemm_rows)
    assert any(row[3] != "0%" for row in gemm_rows)                  # FFMA in conv2's and fc3's main loops
