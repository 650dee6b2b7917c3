"""Run stage: one executor walks a plan on any backend.

It allocates the plan's buffers, initialises the parameters on the host
(so every backend starts from the same numbers), and runs the forward,
backward and update phases of each logical device in order.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from cnnc.backends.base import Backend
from cnnc.ir import Schedule
from cnnc.ops import OPS, Role
from cnnc.plan.schedule import Launch, Plan


def initial_parameters(plan: Plan) -> dict[str, np.ndarray]:
    """Weights ~ N(0, init_w²), biases constant, drawn from (seed, parameter index)."""
    out = {}
    for p in plan.parameters:
        if "normal" in p.init:
            rng = np.random.default_rng([plan.seed, p.index])
            out[p.buffer] = (rng.standard_normal(p.shape) * p.init["normal"]).astype(np.float32)
        else:
            out[p.buffer] = np.full(p.shape, p.init["const"], np.float32)
    return out


class Executor:
    def __init__(self, plan: Plan, backend: Backend, parameters: dict[str, np.ndarray] | None = None):
        self.plan = plan
        self.backend = backend
        self.handles = {b.id: backend.alloc(b, b.device) for b in plan.buffers.values()}
        self.set_parameters(parameters if parameters is not None else initial_parameters(plan))

    # -- parameters ---------------------------------------------------------------
    def set_parameters(self, values: dict[str, np.ndarray]) -> None:
        for p in self.plan.parameters:
            if p.buffer in values:
                self.backend.upload(self.handles[p.buffer], np.asarray(values[p.buffer], np.float32).reshape(-1))

    def parameters(self) -> dict[str, np.ndarray]:
        """Current parameter values by buffer id (`<layer>.weights`, `<layer>.biases`)."""
        return {p.buffer: self.read(p.buffer).reshape(p.shape) for p in self.plan.parameters}

    def read(self, buffer_id: str) -> np.ndarray:
        return self.backend.download(self.handles[buffer_id], self.plan.buffers[buffer_id])

    # -- running ------------------------------------------------------------------
    def _args(self, launch: Launch, progress: float) -> list[Any]:
        kernel = self.plan.kernels[launch.kernel]
        args, buffers = [], iter(launch.args)
        for name, role in OPS[kernel.op].args:
            if role is Role.SCALAR:
                v = launch.scalars[name]
                args.append(Schedule.from_json(v).at(progress) if isinstance(v, dict) else float(v))
            else:
                args.append(self.handles[next(buffers)])
        return args

    def run_phase(self, phase: str, progress: float = 0.0) -> None:
        for dev in self.plan.devices:
            for launch in getattr(dev, phase):
                kernel = self.plan.kernels[launch.kernel]
                self.backend.launch(kernel, dev.logical, self._args(launch, progress))

    def load_batch(self, x: np.ndarray, y: np.ndarray) -> None:
        for name, buf in self.plan.data.items():
            arr = y if self.plan.buffers[buf].dtype == "i32" else x
            self.backend.upload(self.handles[buf], np.ascontiguousarray(arr).reshape(-1))

    def cost_outputs(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-case loss and correctness of the first cost layer."""
        c = self.plan.costs[0]
        return self.read(c["loss"]), self.read(c["correct"])

    def train_step(self, x: np.ndarray, y: np.ndarray, progress: float) -> tuple[np.ndarray, np.ndarray]:
        """Forward, backward and update on one minibatch; returns per-case loss and correctness."""
        self.load_batch(x, y)
        self.run_phase("forward", progress)
        self.run_phase("backward", progress)
        self.run_phase("update", progress)
        return self.cost_outputs()

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.load_batch(x, y)
        self.run_phase("forward")
        return self.cost_outputs()
