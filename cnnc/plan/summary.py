"""A readable account of a plan: what `cnnc plan` prints.

Per logical device: the kernels of each phase in order with the DSL line they
implement, their launch geometry and (when nvcc ran) registers, shared memory
and spills; memory by role; arithmetic per training step.
"""
from __future__ import annotations

from collections import defaultdict

from cnnc.plan.schedule import Kernel, Plan


def kernel_flops(k: Kernel) -> int:
    """Floating-point operations of one launch (multiply-add = 2)."""
    p = k.params
    if k.op.startswith("conv_"):
        return 2 * p["N"] * p["K"] * p["P"] * p["Q"] * p["C"] * p["R"] * p["S"]
    if k.op.startswith("fc_"):
        return 2 * p["N"] * p["I"] * p["O"]
    if k.op == "pool_fwd" or k.op == "pool_bwd":
        return p["N"] * p["C"] * p["P"] * p["Q"] * p["size"] * p["size"]
    if k.op == "bias_grad":
        return p["N"] * p["K"] * p["inner"]
    if k.op in ("neuron_bwd",):
        return p["n"]
    if k.op == "sgd_update":
        return 6 * p["n"]
    return 4 * p.get("N", 0) * p.get("C", 1)


def summarize(plan: Plan, manifest: dict | None = None) -> dict:
    resources = {name: k.get("resources", {}) for name, k in (manifest or {}).get("kernels", {}).items()}
    devices = []
    for dev in plan.devices:
        phases = {}
        flops = 0
        for phase in ("forward", "backward", "update"):
            rows = []
            for launch in getattr(dev, phase):
                k = plan.kernels[launch.kernel]
                f = kernel_flops(k)
                flops += f
                rows.append({"kernel": k.name, "op": k.op, "layer": k.layer, "line": k.line,
                             "args": list(launch.args), "flops": f, "launch": k.launch,
                             "resources": resources.get(k.name, {})})
            phases[phase] = rows
        memory = defaultdict(int)
        for b in plan.buffers.values():
            if b.device == dev.logical:
                memory[b.role] += b.nbytes
        devices.append({"logical": dev.logical, "phases": phases, "memory_bytes": dict(memory),
                        "peak_memory_bytes": sum(memory.values()), "flops_per_step": flops})
    n_params = sum(plan.buffers[p.buffer].size for p in plan.parameters)
    return {"network": plan.network, "batch": plan.batch, "parameters": n_params,
            "devices": devices, "copies": [], "collectives": []}


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def format_summary(s: dict) -> str:
    out = [f"network {s['network']}: batch {s['batch']}, {s['parameters']:,} parameters, "
           f"{len(s['devices'])} logical device(s)"]
    for d in s["devices"]:
        out.append(f"\ndevice {d['logical']}: {d['flops_per_step'] / 1e9:.3f} GFLOP per step, "
                   f"{_mib(d['peak_memory_bytes'])} of buffers "
                   f"({', '.join(f'{r} {_mib(n)}' for r, n in sorted(d['memory_bytes'].items()))})")
        for phase, rows in d["phases"].items():
            out.append(f"  {phase}:")
            for r in rows:
                geo = r["launch"].get("cuda", {})
                grid = "x".join(map(str, geo.get("grid", [])[:2])) if geo else "?"
                block = geo.get("block", ["?"])[0] if geo else "?"
                res = r["resources"].get("sm_80") or next(iter(r["resources"].values()), None)
                regs = f"{res['registers']:3d} regs {res['shared_bytes']:6d} B smem" \
                       + (f" SPILLS {res['spill_stores']} B" if res.get("spill_stores") else "") if res else ""
                line = f"line {r['line']}" if r["line"] else ""
                out.append(f"    {r['kernel']:<44} {line:<8} grid {grid:<9} x{block:<4} {regs}")
    out.append("\nbytes moved between devices per step: none (single device)")
    return "\n".join(out)
