"""The roofline of one kernel on one machine: its FLOPs, the bytes it moves to and from device
memory, their ratio (arithmetic intensity), the bound the roofline sets, and a predicted time
from the launch's configuration.

DRAM bytes are tile-aware: a GEMM kernel reads its A operand (M x K) once per column of block
tiles and its B operand (K x N) once per row of them; those re-reads reach DRAM only when the
kernel's data does not fit in half the L2, otherwise the cache serves them.  The predicted time is
the launch overhead plus the longer of compute (FLOPs at the machine's FP32 peak times its
compute efficiency) and memory (DRAM bytes at its bandwidth times its memory efficiency), both
slowed by how much of the machine the launch keeps busy: SMs without a block in the last wave
stand idle, and an SM holding fewer warps than `occupancy_saturation` of its slots cannot hide
latency.  Block counts per SM come from the registers and shared memory ptxas reported for the
machine's architecture, or else for its stand-in `kernel_arch` (GPUs nvcc no longer compiles
for), or else for any architecture the build has: an approximation, checked against the
machine's own SM limits.  Without nvcc's report, only threads per block limit them.
"""
from __future__ import annotations

import math

from cnnc.codegen.dialect import DIALECTS, Dialect
from cnnc.codegen.occupancy import SMLimits, occupancy
from cnnc.codegen.render import choose_tiles
from cnnc.ops import OPS
from cnnc.perf.machine import Machine
from cnnc.plan.schedule import Kernel


def dram_bytes(k: Kernel, machine: Machine) -> int:
    """Bytes a launch moves to and from device memory: every buffer once, plus the re-reads of
    GEMM operand tiles when the kernel's data does not fit in half the L2."""
    spec = OPS[k.op]
    once = spec.bytes_moved(k.params)
    if not spec.gemm or once <= machine.l2_mib * 2**20 / 2:
        return once
    g = spec.gemm(k.params)
    t = choose_tiles(g["M"], g["N"], g["K"], _dialect(machine))
    groups = 1 if g.get("split", 1) > 1 else g.get("batch", 1)   # split-K slices share one GEMM's operands
    rereads_a = (math.ceil(g["N"] / t.BN) - 1) * g["M"] * g["K"]
    rereads_b = (math.ceil(g["M"] / t.BM) - 1) * g["K"] * g["N"]
    return once + 4 * groups * (rereads_a + rereads_b)


def _dialect(machine: Machine) -> Dialect:
    return DIALECTS.get(machine.dialect, DIALECTS["opencl"])


def _limits(machine: Machine) -> SMLimits:
    version = machine.arch.removeprefix("sm_")
    modern = version.isdigit() and int(version) >= 80          # these reserve 1 KiB of shared memory per block
    return SMLimits(registers=machine.registers_per_sm, max_threads=machine.max_threads_per_sm,
                    max_blocks=machine.max_blocks_per_sm, shared_bytes=int(machine.shared_kib_per_sm * 1024),
                    reserved_shared=1024 if modern else 0)


def residency(k: Kernel, machine: Machine, resources: dict | None = None) -> dict:
    """Blocks of this launch, threads per block, and how many blocks one SM holds at once."""
    launch = k.launch.get(machine.dialect) or next(iter(k.launch.values()), {"grid": [1], "block": [1]})
    blocks, threads = math.prod(launch["grid"]), math.prod(launch["block"])
    if machine.dialect != "cuda":               # an OpenCL CPU device runs one work-group per core at a time
        return {"blocks": blocks, "threads": threads, "blocks_per_sm": machine.max_blocks_per_sm,
                "occupancy": 1.0, "resources_from": None}
    resources = resources or {}
    arch = next((a for a in (machine.arch, machine.kernel_arch, *sorted(resources)) if a in resources), None)
    r = resources.get(arch, {})
    occ = occupancy(arch or machine.arch, threads, r.get("registers", 0), r.get("shared_bytes", 0), _limits(machine))
    return {"blocks": blocks, "threads": threads, "blocks_per_sm": max(occ["blocks_per_sm"], 1),
            "occupancy": occ["occupancy"], "resources_from": arch}


def utilisation(blocks: int, warps_per_block: float, blocks_per_sm: int, machine: Machine) -> float:
    """The fraction of the machine's throughput a launch reaches, averaged over its waves
    (each wave weighted by its share of the blocks): busy SMs over all SMs, times the resident
    warps per SM over the warps that hide latency (capped at 1)."""
    if blocks == 0:
        return 1.0
    slots = machine.sms * blocks_per_sm
    full, tail = divmod(blocks, slots)
    saturating = machine.occupancy_saturation * machine.max_threads_per_sm / 32

    def rate(in_wave: int) -> float:
        busy = min(machine.sms, in_wave) / machine.sms
        resident = math.ceil(in_wave / machine.sms) * warps_per_block
        return busy * (min(1.0, resident / saturating) if saturating else 1.0)

    time = (full * slots / rate(slots) if full else 0.0) + (tail / rate(tail) if tail else 0.0)
    return blocks / time


def kernel_roofline(k: Kernel, machine: Machine, resources: dict | None = None) -> dict:
    """The roofline object of one kernel (`cnnc plan --roofline --json`)."""
    spec = OPS[k.op]
    flops = spec.flops(k.params)
    moved = dram_bytes(k, machine)
    intensity = flops / moved if moved else math.inf
    res = residency(k, machine, resources)
    u = utilisation(res["blocks"], res["threads"] / 32, res["blocks_per_sm"], machine)
    compute_s = flops / (machine.peak_flops * machine.compute_efficiency * u)
    memory_s = moved / (machine.bandwidth * machine.memory_efficiency * u)
    row = {
        "flops": flops, "dram_bytes": moved, "min_bytes": spec.bytes_moved(k.params),
        "intensity": round(intensity, 4) if moved else None,
        "attainable_gflops": round(min(machine.peak_flops, intensity * machine.bandwidth) / 1e9, 3),
        "bound": "compute" if intensity >= machine.ridge_intensity else "memory",
        "blocks": res["blocks"], "threads": res["threads"], "blocks_per_sm": res["blocks_per_sm"],
        "occupancy": res["occupancy"], "utilisation": round(u, 4), "resources_from": res["resources_from"],
        "compute_us": compute_s * 1e6, "memory_us": memory_s * 1e6,
        "time_us": machine.launch_overhead_us + max(compute_s, memory_s) * 1e6,
    }
    if spec.gemm:
        g = spec.gemm(k.params)
        t = choose_tiles(g["M"], g["N"], g["K"], _dialect(machine))
        row["gemm"] = {"M": g["M"], "N": g["N"], "K": g["K"], "batch": g.get("batch", 1),
                       "tile": [t.BM, t.BN, t.BK]}
    return row


def plan_rooflines(plan, machine: Machine, manifest: dict | None = None) -> dict[str, dict]:
    """Every kernel's roofline object, by kernel name."""
    resources = {name: k.get("resources", {}) for name, k in (manifest or {}).get("kernels", {}).items()}
    return {name: kernel_roofline(k, machine, resources.get(name)) for name, k in plan.kernels.items()}


def layer_rooflines(plan, rooflines: dict[str, dict], program: str = "train") -> list[dict]:
    """Per layer, over every launch of one step on every device: FLOPs, DRAM bytes, intensity,
    predicted time and which bound holds most of that time."""
    rows: dict[str, dict] = {}
    for ops in plan.programs[program].values():
        for op in ops:
            if op.kind != "launch":
                continue
            k = plan.kernels[op.kernel]
            r = rooflines[op.kernel]
            name = k.layer or "(step)"          # kernels of the whole step: updates, health checks
            row = rows.setdefault(name, {"layer": name, "launches": 0, "flops": 0, "dram_bytes": 0,
                                            "time_us": 0.0, "compute_bound_us": 0.0})
            row["launches"] += 1
            row["flops"] += r["flops"]
            row["dram_bytes"] += r["dram_bytes"]
            row["time_us"] += r["time_us"]
            row["compute_bound_us"] += r["time_us"] if r["bound"] == "compute" else 0.0
    for row in rows.values():
        row["intensity"] = row["flops"] / row["dram_bytes"] if row["dram_bytes"] else None
        row["bound"] = "compute" if row.pop("compute_bound_us") * 2 >= row["time_us"] else "memory"
    return list(rows.values())


def layer_times_us(plan, rooflines: dict[str, dict], program: str = "train") -> dict[str, float]:
    """Each source layer's predicted kernel time in one step (every launch on every device),
    without the kernels of the whole step (updates, health checks)."""
    return {row["layer"]: row["time_us"] for row in layer_rooflines(plan, rooflines, program)
            if row["layer"] != "(step)"}


def format_rooflines(plan, machine: Machine, layers: list[dict]) -> str:
    out = [f"{plan.network} on {machine.name} ({machine.description or machine.name}): "
           f"FP32 peak {machine.peak_fp32_tflops:g} TFLOP/s, {machine.memory_bandwidth_gbs:g} GB/s, "
           f"ridge at {machine.ridge_intensity:.1f} FLOP/B; per layer, one training step",
           f"  {'layer':<16} {'launches':>8} {'GFLOP':>10} {'DRAM MB':>10} {'FLOP/B':>8} {'bound':<8} {'time us':>10}"]
    for r in layers:
        ai = f"{r['intensity']:.2f}" if r["intensity"] is not None else "-"
        out.append(f"  {r['layer']:<16} {r['launches']:>8} {r['flops'] / 1e9:>10.4f} {r['dram_bytes'] / 1e6:>10.3f} "
                   f"{ai:>8} {r['bound']:<8} {r['time_us']:>10.1f}")
    total = sum(r["time_us"] for r in layers)
    out.append(f"  {'total':<16} {sum(r['launches'] for r in layers):>8} "
               f"{sum(r['flops'] for r in layers) / 1e9:>10.4f} {sum(r['dram_bytes'] for r in layers) / 1e6:>10.3f} "
               f"{'':>8} {'':<8} {total:>10.1f}  (kernels only, back to back)")
    return "\n".join(out)
