"""Theoretical occupancy: how many warps of a kernel one SM can hold at once.

From the kernel's threads per block, registers per thread and static shared
memory per block (ptxas reports the last two), and the per-SM limits of the
architecture (CUDA programming guide, compute capability tables).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SMLimits:
    registers: int = 65536          # 32-bit registers per SM
    max_threads: int = 2048
    max_blocks: int = 32
    shared_bytes: int = 167936      # usable shared memory per SM
    register_unit: int = 256        # registers are allocated per warp in units of this many
    shared_unit: int = 128          # shared memory allocation granularity
    reserved_shared: int = 1024     # per block, reserved by the system (sm_80 and newer)


LIMITS = {
    "sm_75": SMLimits(max_threads=1024, max_blocks=16, shared_bytes=65536, reserved_shared=0),
    "sm_80": SMLimits(shared_bytes=167936),
    "sm_86": SMLimits(max_threads=1536, max_blocks=16, shared_bytes=102400),
    "sm_89": SMLimits(max_threads=1536, max_blocks=24, shared_bytes=102400),
    "sm_90": SMLimits(shared_bytes=233472),
}


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def occupancy(arch: str, threads: int, registers: int, shared_bytes: int, limits: SMLimits | None = None) -> dict:
    """Active blocks and warps per SM, the fraction of the SM's warp slots used, and the limiter;
    `limits` replaces the architecture's (a machine model's SM, say)."""
    lim = limits or LIMITS.get(arch, LIMITS["sm_80"])
    warps = -(-threads // 32)
    max_warps = lim.max_threads // 32
    by = {"warps": max_warps // warps, "blocks": lim.max_blocks}
    if registers:
        per_warp = _round_up(registers * 32, lim.register_unit)
        by["registers"] = (lim.registers // per_warp) // warps
    smem = _round_up(shared_bytes, lim.shared_unit) + lim.reserved_shared if shared_bytes else 0
    if smem:
        by["shared memory"] = lim.shared_bytes // smem
    blocks = min(by.values())
    limiter = min(by, key=lambda k: (by[k], k != "warps"))
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * warps,
            "occupancy": round(blocks * warps / max_warps, 3), "limited_by": limiter}
