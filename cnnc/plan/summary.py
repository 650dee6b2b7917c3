"""A readable account of a plan: what `cnnc plan` prints (and `--json` emits).

Per layer: kind, devices (replicas), passes per minibatch, update period.
Per logical device: its training program in order (kernels with the DSL line
they implement, launch geometry and, when nvcc ran, registers, shared memory
and spills; copies; events), memory by role, arithmetic per step.  Per step:
bytes moved between each pair of devices, split into activation/gradient
traffic and the gradient collectives.  `format_sass` adds, per layer, what each kernel's main
loop executes, from the SASS analysis cnnc compile records (cnnc/codegen/sass.py).
"""
from __future__ import annotations

from collections import defaultdict

from cnnc.ops import OPS
from cnnc.plan.memory import storage_bytes
from cnnc.plan.schedule import Kernel, Op, Plan


def kernel_flops(k: Kernel) -> int:
    """Floating-point operations of one launch (multiply-add = 2), as the op registry counts them."""
    return OPS[k.op].flops(k.params)


def _describe(op: Op, plan: Plan, resources: dict, rooflines: dict | None = None) -> dict:
    row = {"op": op.kind, "phase": op.phase, "pass": op.pass_, "stream": op.stream}
    if op.kind == "launch":
        k = plan.kernels[op.kernel]
        row.update(kernel=k.name, kernel_op=k.op, layer=k.layer, line=k.line, args=list(op.args),
                   flops=kernel_flops(k), bytes_accessed=OPS[k.op].bytes_moved(k.params), launch=k.launch,
                   resources=resources.get(k.name, {}))
        if rooflines is not None:
            row["roofline"] = rooflines[k.name]
    elif op.kind == "copy":
        row.update(src=op.src, dst=op.dst, bytes=4 * op.count, src_device=plan.buffers[op.src].device)
    elif op.kind == "upload":
        row.update(input=op.input, cases=[list(c) for c in op.cases], dst=op.dst, bytes=plan.buffers[op.dst].nbytes)
    elif op.kind == "scalars":
        row.update(dst=op.dst, bytes=plan.buffers[op.dst].nbytes)
    else:
        row.update(event=op.event)
    return row


def summarize(plan: Plan, manifest: dict | None = None, rooflines: dict | None = None) -> dict:
    """The plan's account; with `rooflines` (kernel name -> roofline object, from the
    performance analysis) every launch carries its kernel's."""
    resources = {name: k.get("resources", {}) for name, k in (manifest or {}).get("kernels", {}).items()}
    sass = {name: k.get("sass", "n/a") for name, k in (manifest or {}).get("kernels", {}).items()}
    devices = []
    moved: dict[tuple[int, int], int] = defaultdict(int)
    collective: dict[tuple[int, int], int] = defaultdict(int)
    allocated = storage_bytes(plan)
    for dev, ops in plan.programs["train"].items():
        rows = [_describe(op, plan, resources, rooflines) for op in ops]
        for row in rows:
            if row["op"] == "launch":
                row["sass"] = sass.get(row["kernel"], "n/a")
        for op, row in zip(ops, rows):
            if op.kind == "copy" and row["src_device"] != dev:
                table = collective if op.phase == "exchange" else moved
                table[(row["src_device"], dev)] += row["bytes"]
        memory = defaultdict(int)
        for b in plan.buffers.values():
            if b.device == dev:
                memory[b.role] += b.nbytes
        devices.append({"logical": dev, "program": rows, "memory_bytes": dict(memory),
                        "buffers_bytes": sum(memory.values()), "peak_memory_bytes": allocated.get(dev, 0),
                        "flops_per_step": sum(r.get("flops", 0) for r in rows)})
    n_params = sum(plan.buffers[p.buffers[0]].size for p in plan.parameters)
    pairs = sorted(set(moved) | set(collective))
    return {
        "network": plan.network, "batch": plan.batch, "shares": plan.shares, "parameters": n_params,
        "layers": [{"name": l.layer, "kind": l.kind, "devices": list(l.devices), "passes": l.passes,
                    "update_period": l.update_period} for l in plan.layers],
        "devices": devices,
        "transfers": [{"from": a, "to": b, "activation_bytes": moved.get((a, b), 0),
                       "collective_bytes": collective.get((a, b), 0)} for a, b in pairs],
        "peak_memory_bytes": {d["logical"]: d["peak_memory_bytes"] for d in devices},
    }


def rank_summary(s: dict, blocks: list[list[int]]) -> dict:
    """The plan run as `len(blocks)` MPI ranks, rank r owning logical devices blocks[r]: per
    pair of ranks the bytes per step that cross the network, summed from the per-device-pair
    `transfers` (copies between two devices of one rank stay on that node)."""
    rank_of = {d: r for r, devices in enumerate(blocks) for d in devices}
    pairs: dict[tuple[int, int], list[int]] = defaultdict(lambda: [0, 0])
    for t in s["transfers"]:
        a, b = rank_of[t["from"]], rank_of[t["to"]]
        if a != b:
            pairs[(a, b)][0] += t["activation_bytes"]
            pairs[(a, b)][1] += t["collective_bytes"]
    return {"count": len(blocks), "devices": [list(d) for d in blocks],
            "transfers": [{"from": a, "to": b, "activation_bytes": n[0], "collective_bytes": n[1]}
                          for (a, b), n in sorted(pairs.items())]}


def format_ranks(r: dict) -> str:
    out = [f"as {r['count']} MPI rank(s):"]
    for rank, devices in enumerate(r["devices"]):
        out.append(f"  rank {rank}: logical device(s) {', '.join(map(str, devices))}")
    out.append("bytes between ranks per step (host-staged MPI messages):")
    out += _transfer_lines(r["transfers"], "rank", "none (no copy crosses a rank)")
    return "\n".join(out)


def _transfer_lines(transfers: list[dict], end: str, none: str) -> list[str]:
    """One line per pair of `end`s (devices or ranks) with the bytes moved between them."""
    return [f"  {end} {t['from']} -> {t['to']}: {t['activation_bytes']:,} B activations/gradients, "
            f"{t['collective_bytes']:,} B gradient exchange" for t in transfers] or [f"  {none}"]


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _op_line(r: dict) -> str:
    if r["op"] == "launch":
        geo = r["launch"].get("cuda", {})
        grid = "x".join(map(str, geo.get("grid", [])[:2])) if geo else "?"
        block = geo.get("block", ["?"])[0] if geo else "?"
        res = r["resources"].get("sm_80") or next(iter(r["resources"].values()), None)
        regs = ""
        if res:
            regs = f"{res['registers']:3d} regs {res['shared_bytes']:6d} B smem"
            if "occupancy" in res:
                regs += f" occupancy {res['occupancy'] * 100:3.0f}%"
            if res.get("spill_stores"):
                regs += f" SPILLS {res['spill_stores']} B"
        line = f"line {r['line']}" if r["line"] else ""
        return f"{r['kernel']:<46} {line:<8} grid {grid:<9} x{block:<4} {regs}"
    if r["op"] == "copy":
        return f"copy {r['src']} (device {r['src_device']}) -> {r['dst']}, {r['bytes']:,} B  [{r['stream']}]"
    if r["op"] == "upload":
        cases = ", ".join(f"{a}..{a + n - 1}" for a, n in r["cases"])
        return f"upload {r['input']} cases {cases} -> {r['dst']}, {r['bytes']:,} B"
    if r["op"] == "scalars":
        return f"step scalars -> {r['dst']}, {r['bytes']:,} B"
    return f"{r['op']} {r['event']}"


def format_summary(s: dict) -> str:
    out = [f"network {s['network']}: batch {s['batch']} in {s['shares']} share(s), "
           f"{s['parameters']:,} parameters, {len(s['devices'])} logical device(s)", "", "layers:"]
    for l in s["layers"]:
        period = f", update every {l['update_period']} pass(es)" if l["update_period"] else ""
        out.append(f"  {l['name']:<12} {l['kind']:<8} @gpu({','.join(map(str, l['devices']))}), "
                   f"{l['passes']} pass(es){period}")
    for d in s["devices"]:
        out.append(f"\ndevice {d['logical']}: {d['flops_per_step'] / 1e9:.3f} GFLOP per step, "
                   f"{_mib(d['peak_memory_bytes'])} allocated for {_mib(d['buffers_bytes'])} of buffers "
                   f"({', '.join(f'{r} {_mib(n)}' for r, n in sorted(d['memory_bytes'].items()))}); "
                   f"buffers with disjoint lifetimes share storage")
        current = None
        for r in d["program"]:
            head = (r["phase"], r["pass"])
            if head != current:
                current = head
                out.append(f"  {r['phase']} (pass {r['pass']}):" if s["shares"] > 1 else f"  {r['phase']}:")
            out.append("    " + _op_line(r))
    out.append("\nbytes moved per step:")
    out += _transfer_lines(s["transfers"], "device", "none (everything stays on its device)")
    return "\n".join(out)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.0f}%"


def format_sass(s: dict, prefer: tuple[str, ...] = (), peak_flops: float | None = None) -> str:
    """Per layer, each kernel's main loop in the SASS of the first architecture in `prefer`
    that was built (else the newest built): its size, FFMA and MMA shares, shared loads per
    FFMA/MMA, and the local-memory accesses of the whole kernel (a reviewer's first questions
    about a slow kernel).  With `peak_flops` and rooflines in `s`, also each kernel's predicted
    fraction of that peak: FLOPs / (predicted time x peak)."""
    kernels: dict[str, dict] = {}
    for d in s["devices"]:
        for r in d["program"]:
            if r["op"] == "launch":
                kernels.setdefault(r["kernel"], r)
    built = sorted({a for r in kernels.values() if isinstance(r.get("sass"), dict) for a in r["sass"]},
                   key=lambda a: (len(a), a))
    if not built:
        return "instruction mix: n/a (built without nvcc, or without cuobjdump and nvdisasm)"
    arch = next((a for a in prefer if a in built), built[-1])
    with_peak = peak_flops is not None and all("roofline" in r for r in kernels.values())
    out = [f"main loops in the {arch} SASS (FFMA, MMA: share of the loop's instructions; LDS/FMA: shared loads "
           f"per FFMA or MMA; LDL/STL: local-memory accesses in the kernel"
           + ("; peak: predicted fraction of FP32 peak)" if with_peak else ")"),
           f"  {'layer':<14} {'kernel':<46} {'loop':>5} {'FFMA':>5} {'MMA':>5} {'LDS/FMA':>7} {'LDL/STL':>7}"
           + (f" {'peak':>5}" if with_peak else "")]
    by_layer: dict[str, list[dict]] = defaultdict(list)
    for r in kernels.values():
        by_layer[r["layer"] or "(step)"].append(r)
    for layer, rows in by_layer.items():
        for r in rows:
            rec = r["sass"].get(arch) if isinstance(r.get("sass"), dict) else None
            if rec is None:
                cells = f"{'n/a':>5} {'':>5} {'':>5} {'':>7} {'':>7}"
            else:
                loop = rec["main_loop"]
                local = rec["ldl"] + rec["stl"]
                if loop is None:
                    cells = f"{'-':>5} {'-':>5} {'-':>5} {'-':>7} {local:>7}"
                else:
                    lds = "-" if loop["lds_per_fma"] is None else f"{loop['lds_per_fma']:.2f}"
                    cells = (f"{loop['instructions']:>5} {_pct(loop['fma_share']):>5} {_pct(loop['mma_share']):>5} "
                             f"{lds:>7} {local:>7}")
            if with_peak:
                t = r["roofline"]["time_us"] * 1e-6
                cells += f" {_pct(r['flops'] / (t * peak_flops) if t and r['flops'] else None):>5}"
            out.append(f"  {layer:<14} {r['kernel']:<46} {cells}")
    return "\n".join(out)
