"""Theoretical occupancy from threads, registers and shared memory per block."""
from cnnc.codegen.occupancy import occupancy


def test_full_occupancy_when_nothing_limits():
    assert occupancy("sm_80", 256, 32, 0) == {"blocks_per_sm": 8, "warps_per_sm": 64, "occupancy": 1.0,
                                               "limited_by": "warps"}


def test_registers_limit():
    r = occupancy("sm_80", 256, 64, 0)      # 64 regs x 32 threads = 2048 per warp: 32 warps fit
    assert r["warps_per_sm"] == 32 and r["limited_by"] == "registers"


def test_shared_memory_limit_differs_by_arch():
    a = occupancy("sm_80", 64, 16, 48 * 1024)
    h = occupancy("sm_90", 64, 16, 48 * 1024)
    assert a["limited_by"] == h["limited_by"] == "shared memory"
    assert a["blocks_per_sm"] == 3 and h["blocks_per_sm"] == 4
