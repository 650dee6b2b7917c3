"""`cnnc bench`: how fast a compiled network trains (or, with --inference, only runs its
forward pass), per layer and per step.

Whole-step throughput is timed with the backend running freely; per-layer
numbers come from one more step in which every op is timed on its own (the
backend is synchronised around each), so they add up to a little more than
the free-running step.  An inference step runs the test program, the forward pass
as evaluation runs it (dropout at its test-time scaling, no backward, no updates).
With `--against torch` the same network is built in PyTorch (when it is installed)
and timed on the same data, side by side, on the same kind of device: the same GPU
(cuDNN) against the cuda backend, the host CPU against the others.
"""
from __future__ import annotations

import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnc.backends import make_backend
from cnnc.build import DEFAULT_CPU_WIDTH, compile_network, load_plan
from cnnc.codegen.render import plan_cpu_width
from cnnc.diagnostics import CompileError, Diagnostic
from cnnc.executor import Executor
from cnnc.plan.schedule import Plan
from cnnc.plan.summary import kernel_flops


@dataclass
class LayerTiming:
    layer: str
    forward_ms: float = 0.0
    backward_ms: float = 0.0
    forward_flops: int = 0
    backward_flops: int = 0

    def gflops(self, phase: str) -> float:
        ms = getattr(self, f"{phase}_ms")
        return getattr(self, f"{phase}_flops") / (ms * 1e6) if ms > 0 else 0.0


@dataclass
class BenchResult:
    network: str
    backend: str
    batch: int
    step_ms: float
    images_per_s: float
    layers: list[LayerTiming] = field(default_factory=list)
    other_ms: dict[str, float] = field(default_factory=dict)     # copies, exchange, updates
    torch: dict | None = None
    inference: bool = False             # forward-only (test program) steps instead of training steps


def _rebuilt(build_dir: Path, batch: int, scratch: Path) -> Plan:
    source_file = build_dir / "source.cnn"
    if not source_file.is_file():
        raise CompileError(Diagnostic("source.cnn is missing, so --batch cannot recompile; run cnnc compile again",
                                      str(build_dir)))
    width = plan_cpu_width(load_plan(build_dir).kernels.values()) or DEFAULT_CPU_WIDTH     # the build's own
    return compile_network(source_file.read_text(), str(source_file), scratch, use_nvcc=False, batch=batch,
                           cpu_width=width).plan


def random_batch(plan: Plan, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((plan.batch, *plan.image_shape)).astype(np.float32)
    y = rng.integers(0, max(plan.classes, 1), plan.batch).astype(np.int32)
    return x, y


def bench(build_dir: Path, backend_name: str, gpus: list[int], batch: int | None = None, steps: int = 5,
          warmup: int = 2, against: str | None = None, inference: bool = False) -> BenchResult:
    build_dir = Path(build_dir)
    with tempfile.TemporaryDirectory(prefix="cnnc-bench-") as tmp:
        plan = load_plan(build_dir) if batch is None else _rebuilt(build_dir, batch, Path(tmp))
        if against == "torch":              # refused before the long cnnc run, not after it
            from cnnc.bench_torch import require_torch, torch_device
            torch_on = torch_device(require_torch(), backend_name, gpus[min(plan.devices)])
        where = build_dir if batch is None else Path(tmp)
        backend = make_backend(backend_name, plan, where, gpus)
        ex = Executor(plan, backend)
        x, y = random_batch(plan)
        program = "test" if inference else "train"

        def one_step():
            return ex.evaluate(x, y) if inference else ex.train_step(x, y, 0.0)

        for i in range(warmup):                 # first launches compile kernels (PoCL, CUDA JIT)
            one_step()
        backend.synchronize()
        t0 = time.perf_counter()
        for i in range(steps):
            one_step()
        backend.synchronize()
        step = (time.perf_counter() - t0) / steps
        layers: dict[str, LayerTiming] = {}
        other: dict[str, float] = defaultdict(float)

        def timer(device, op, seconds):
            if op.kind == "launch" and op.phase in ("forward", "backward") and plan.kernels[op.kernel].layer:
                k = plan.kernels[op.kernel]
                t = layers.setdefault(k.layer, LayerTiming(k.layer))
                setattr(t, f"{op.phase}_ms", getattr(t, f"{op.phase}_ms") + seconds * 1e3)
                setattr(t, f"{op.phase}_flops", getattr(t, f"{op.phase}_flops") + kernel_flops(k))
            else:
                other[op.kind if op.kind != "launch" else op.phase] += seconds * 1e3

        ex.load_batch(x, y)
        ex.run(program, 0.0, timer)
        order = [l.layer for l in plan.layers if l.layer in layers]
        result = BenchResult(plan.network, backend.describe(), plan.batch, step * 1e3, plan.batch / step,
                             [layers[n] for n in order], dict(other), inference=inference)
        if against == "torch":
            from cnnc.bench_torch import torch_step_ms
            source = (build_dir / "source.cnn").read_text()
            result.torch = torch_step_ms(source, plan.batch, x, y, steps, warmup, torch_on)
    return result


def format_bench(r: BenchResult) -> str:
    what = ", inference (forward only)" if r.inference else ""
    out = [f"{r.network} on {r.backend}, batch {r.batch}{what}: {r.step_ms:.2f} ms per step, "
           f"{r.images_per_s:,.0f} images/s"]
    torch = r.torch or {}
    head = f"  {'layer':<14} {'fwd ms':>9} {'GFLOP/s':>8}" + ("" if r.inference else f" {'bwd ms':>9} {'GFLOP/s':>8}")
    if torch:
        head += f"   {'torch fwd ms':>12} {'torch bwd ms':>12}"
    out.append(head)
    for t in r.layers:
        line = f"  {t.layer:<14} {t.forward_ms:9.3f} {t.gflops('forward'):8.2f}"
        if not r.inference:
            line += f" {t.backward_ms:9.3f} {t.gflops('backward'):8.2f}"
        if torch:
            tl = torch.get("layers", {}).get(t.layer)
            line += f"   {tl['forward_ms']:12.3f} {tl['backward_ms']:12.3f}" if tl else f"   {'-':>12} {'-':>12}"
        out.append(line)
    if r.other_ms:
        out.append("  other: " + ", ".join(f"{k} {v:.3f} ms" for k, v in sorted(r.other_ms.items())))
    if torch:
        out.append(f"PyTorch {torch['version']} on {torch['device']}: {torch['step_ms']:.2f} ms per step, "
                   f"{r.batch / torch['step_ms'] * 1e3:,.0f} images/s "
                   f"(cnnc is {torch['step_ms'] / r.step_ms:.2f}x its speed), precision {torch['precision']}")
    return "\n".join(out)
