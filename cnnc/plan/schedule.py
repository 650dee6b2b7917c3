"""The plan: what each logical device runs, in order, on which buffers.

This is the backend-neutral contract between the planner and the executor;
it round-trips through ``build/plan.json`` so a build directory alone is
enough to run.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Buffer:
    id: str
    device: int
    size: int                  # elements
    dtype: str                 # "f32" | "i32"
    role: str                  # input | labels | activation | gradient | weights | weight_grad | momentum | cost
    layer: str

    @property
    def nbytes(self) -> int:
        return self.size * 4


@dataclass(frozen=True)
class Kernel:
    """One specialised kernel; `launch` holds per-dialect geometry added by codegen."""

    name: str
    op: str
    params: dict[str, Any]
    layer: str
    line: int
    summary: str
    launch: dict[str, dict[str, list[int]]] = field(default_factory=dict)


@dataclass(frozen=True)
class Launch:
    """A kernel launch: buffer ids in op-argument order, plus runtime scalars.

    A scalar is a number, or a schedule dict (``{"kind": "dexp", ...}``) the
    executor evaluates at the current training progress.
    """

    kernel: str
    args: tuple[str, ...]
    scalars: dict[str, Any] = field(default_factory=dict)
    stream: str = "compute"


@dataclass(frozen=True)
class Parameter:
    """A trainable tensor with its gradient and momentum buffers and how to initialise it."""

    layer: str
    name: str                  # "weights" | "biases"
    buffer: str
    grad: str
    inc: str
    shape: tuple[int, ...]
    init: dict[str, Any]       # {"normal": std} | {"const": value}
    index: int                 # position in the network's parameter list (RNG key)


@dataclass
class DeviceProgram:
    logical: int
    forward: list[Launch] = field(default_factory=list)
    backward: list[Launch] = field(default_factory=list)
    update: list[Launch] = field(default_factory=list)


@dataclass
class Plan:
    network: str
    batch: int
    epochs: int
    seed: int
    devices: list[DeviceProgram]
    buffers: dict[str, Buffer]
    kernels: dict[str, Kernel]
    parameters: list[Parameter]
    data: dict[str, str]                 # input name -> buffer id
    costs: list[dict[str, Any]]          # {"layer", "loss", "correct", "coeff", "top_k"}
    image_shape: tuple[int, int, int] = (1, 1, 1)
    classes: int = 0

    def to_json(self) -> dict:
        return {
            "format": 1,
            "network": self.network,
            "batch": self.batch,
            "epochs": self.epochs,
            "seed": self.seed,
            "image_shape": list(self.image_shape),
            "classes": self.classes,
            "data": self.data,
            "costs": self.costs,
            "buffers": [asdict(b) for b in self.buffers.values()],
            "kernels": [asdict(k) for k in self.kernels.values()],
            "parameters": [dict(asdict(p), shape=list(p.shape)) for p in self.parameters],
            "devices": [
                {"logical": d.logical,
                 **{phase: [dict(asdict(l), args=list(l.args)) for l in getattr(d, phase)]
                    for phase in ("forward", "backward", "update")}}
                for d in self.devices
            ],
        }

    @staticmethod
    def from_json(j: dict) -> "Plan":
        def launches(items):
            return [Launch(l["kernel"], tuple(l["args"]), l.get("scalars", {}), l.get("stream", "compute"))
                    for l in items]
        return Plan(
            network=j["network"], batch=j["batch"], epochs=j["epochs"], seed=j["seed"],
            devices=[DeviceProgram(d["logical"], launches(d["forward"]), launches(d["backward"]),
                                   launches(d["update"])) for d in j["devices"]],
            buffers={b["id"]: Buffer(**b) for b in j["buffers"]},
            kernels={k["name"]: Kernel(**k) for k in j["kernels"]},
            parameters=[Parameter(**dict(p, shape=tuple(p["shape"]))) for p in j["parameters"]],
            data=j["data"], costs=j["costs"], image_shape=tuple(j["image_shape"]), classes=j["classes"],
        )
