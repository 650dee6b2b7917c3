"""A scaling study: each placement strategy of a network at each device count, compiled (without
nvcc) and simulated on a machine model; what `cnnc scale` prints.

Speedup is throughput (images per second) over the one-device build's.  By default the batch
grows with the devices (each device keeps the source's batch of work, weak scaling, as "One
weird trick" measures); with `scale_batch=False` the batch stays the source's (strong scaling),
and speedup is then the ratio of step times.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from cnnc.check import check
from cnnc.diagnostics import CompileError
from cnnc.frontend import ast
from cnnc.perf.machine import Link, Machine
from cnnc.perf.placements import STRATEGIES, Placement, Skipped, data_parallel, make_placement, variants
from cnnc.perf.roofline import layer_times_us, plan_rooflines
from cnnc.perf.simulate import simulate_plan
from cnnc.plan.memory import storage_bytes
from cnnc.plan.summary import summarize


@dataclass(frozen=True)
class Evaluation:
    """A placement's predicted step on a machine, and what it holds and moves."""
    step_s: float
    batch: int
    peak_memory_bytes: dict[int, int]       # logical device -> bytes allocated
    bytes_moved: int                        # between devices, per step
    layer_us: dict[str, float]              # per source layer: its kernels' predicted time

    @property
    def images_per_s(self) -> float:
        return self.batch / self.step_s if self.step_s else 0.0


def evaluate(placement_text: str, file: str, machine: Machine, devices: int, workdir: Path,
             peer_link: Link | None = None) -> Evaluation:
    """Compile `placement_text` (no nvcc) into a fresh folder of `workdir` and simulate one
    training step with one logical device per physical one."""
    from cnnc.build import compile_network        # the driver, imported late: it pulls in every stage

    out = Path(tempfile.mkdtemp(dir=workdir, prefix="build-"))
    result = compile_network(placement_text, file, out, use_nvcc=False)
    plan = result.plan
    rooflines = plan_rooflines(plan, machine, {})
    sim = simulate_plan(plan, machine, rooflines, devices, peer_link)
    summary = summarize(plan)
    layer_us = layer_times_us(plan, rooflines)
    moved = sum(t["activation_bytes"] + t["collective_bytes"] for t in summary["transfers"])
    return Evaluation(sim.step_s, plan.batch, dict(storage_bytes(plan)), moved, layer_us)


def _row(strategy: str, exchange: str | None, gpus: int) -> dict:
    return {"strategy": strategy, "exchange": exchange, "gpus": gpus, "batch": None, "step_ms": None,
            "images_per_s": None, "speedup": None, "memory_mib_per_device": None, "peak_memory_mib": None,
            "fits": None, "bytes_moved": None, "skipped": None}


def study(program: ast.Program, machine: Machine, counts: list[int], strategies: list[str] = list(STRATEGIES),
          scale_batch: bool = True, peer_link: Link | None = None, workdir: Path | None = None) -> list[dict]:
    """One row per strategy (hybrid: per exchange scheme) and device count; a placement this
    network or count cannot have is a row with `skipped` saying why."""
    net = check(program)
    with tempfile.TemporaryDirectory(prefix="cnnc-scale-", dir=workdir) as tmp:
        tmpdir = Path(tmp)
        one = data_parallel(program, net, 1, scale_batch=False)        # the source with every layer on device 0
        base = evaluate(one.text, program.file, machine, 1, tmpdir, peer_link)
        rows = []
        for strategy in strategies:
            for variant in variants(strategy):
                for n in counts:
                    row = _row(strategy, variant, n)
                    try:
                        if n == 1:
                            ev, batch = base, net.batch
                        else:
                            p: Placement = make_placement(program, net, strategy, n, variant, scale_batch,
                                                          base.layer_us)
                            ev = evaluate(p.text, f"{net.name}-{strategy}-{n}.cnn", machine, n, tmpdir, peer_link)
                            batch = p.batch
                    except Skipped as e:
                        row["skipped"] = str(e)
                    except CompileError as e:
                        row["skipped"] = e.diagnostics[0].message if getattr(e, "diagnostics", None) else str(e)
                    else:
                        peak = max(ev.peak_memory_bytes.values(), default=0)
                        row.update(batch=batch, step_ms=ev.step_s * 1e3, images_per_s=ev.images_per_s,
                                   speedup=ev.images_per_s / base.images_per_s,
                                   memory_mib_per_device=[ev.peak_memory_bytes[d] / 2**20
                                                          for d in sorted(ev.peak_memory_bytes)],
                                   peak_memory_mib=peak / 2**20,
                                   fits=peak <= machine.memory_gib * 2**30 if machine.memory_gib else True,
                                   bytes_moved=ev.bytes_moved, skipped=None)
                    rows.append(row)
    return rows


def label(row: dict) -> str:
    return row["strategy"] + (f" ({row['exchange']})" if row.get("exchange") else "")


def format_table(rows: list[dict], machine: Machine) -> str:
    out = [f"on {machine.name}: speedup is images/s over one device's",
           f"  {'strategy':<24} {'gpus':>4} {'batch':>6} {'speedup':>8} {'step ms':>9} {'MiB/device':>11} "
           f"{'MB moved':>9}"]
    for r in rows:
        name = label(r)
        if r.get("skipped"):
            out.append(f"  {name:<24} {r['gpus']:>4}  skipped: {r['skipped']}")
            continue
        fits = "" if r["fits"] else "  (exceeds device memory)"
        out.append(f"  {name:<24} {r['gpus']:>4} {r['batch']:>6} {r['speedup']:>7.2f}x {r['step_ms']:>9.1f} "
                   f"{r['peak_memory_mib']:>11.0f} {r['bytes_moved'] / 1e6:>9.1f}{fits}")
    return "\n".join(out)


def plot(rows: list[dict], out: Path, title: str) -> None:
    """Speedup against devices, one line per strategy, with the linear ideal."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    counts = sorted({r["gpus"] for r in rows})
    ax.plot(counts, counts, color="grey", linestyle=":", label="linear")
    for name in dict.fromkeys(label(r) for r in rows):
        pts = [(r["gpus"], r["speedup"]) for r in rows if label(r) == name and not r.get("skipped")]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
    ax.set_xlabel("devices")
    ax.set_ylabel("speedup (images/s over one device)")
    ax.set_xticks(counts)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
