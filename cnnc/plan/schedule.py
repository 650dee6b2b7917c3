"""The plan: what each logical device runs, in order, on which buffers.

This is the backend-neutral contract between the planner and the executor;
it round-trips through ``build/plan.json`` so a build directory alone is
enough to run.

A plan has two programs, ``train`` (one minibatch: forward, backward,
gradient exchange, updates) and ``test`` (forward only).  Each program is a
list of ops per logical device, executed in order on that device; an op
that needs another device's result waits for an event that device records.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

PLAN_FORMAT = 3                 # 3: runtime scalars in a step-scalar buffer, not in launches


def _shallow(obj) -> dict:
    """A dataclass's fields as a dict, values shared, not copied: plans of thousands of
    layers are written in one pass, and ``dataclasses.asdict`` would deep-copy every value."""
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


@dataclass(frozen=True)
class Buffer:
    id: str
    device: int
    size: int                  # elements
    dtype: str                 # "f32" | "i32"
    role: str                  # input | labels | activation | gradient | weights | biases | weight_grad |
    #                            momentum | cost | mirror | staging | health (int flags the host reads) |
    #                            scalars (the device's step-scalar table, i32, see StepScalar)
    layer: str
    storage: str = ""          # allocation it lives in (shared with buffers whose lifetimes are disjoint)

    def __post_init__(self):
        if not self.storage:
            object.__setattr__(self, "storage", self.id)

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
class StepScalar:
    """One entry of the plan's step-scalar table: a runtime scalar some launch reads (the
    table holds each distinct one once), and where its value comes from at each run."""

    source: Any                # a number, a schedule dict (evaluated at the run's progress), or
    #                            the name of an executor counter ("seed", "step")
    dtype: str                 # "f32" | "i32"


@dataclass(frozen=True)
class Op:
    """One step of a device's program.

    kind:
      launch   run `kernel` on `args` (buffer ids in the order of the op's kernel_args: its
               runtime scalars come from the device's step-scalar buffer, the last of them)
      scalars  write this run's values of the plan's step-scalar table into `dst`, the
               device's step-scalar buffer: first in each program that reads it, on the
               compute stream, where every launch that reads it runs (so a run never rewrites
               it while an earlier run's launches may still read it)
      copy     `count` elements from `src`[src_offset:] to `dst`[dst_offset:] (dst is on this device)
      upload   the host's minibatch cases `cases` ((start, count) ranges, concatenated) of
               input `input` into `dst`
      record   mark `event` once everything before it on this device is done
      wait     do nothing more on this device until `event` is recorded
    """

    kind: str
    stream: str = "compute"
    kernel: str = ""
    args: tuple[str, ...] = ()
    src: str = ""
    dst: str = ""
    src_offset: int = 0
    dst_offset: int = 0
    count: int = 0
    input: str = ""
    cases: tuple[tuple[int, int], ...] = ()
    event: str = ""
    phase: str = ""            # forward | backward | exchange | update | check (for people and summaries)
    pass_: int = 0

    def reads(self) -> tuple[str, ...]:
        if self.kind == "copy":
            return (self.src,)
        return self.args if self.kind == "launch" else ()

    def to_json(self) -> dict:
        """The kind and every field that differs from its default."""
        out = {"kind": self.kind}
        for k, default in _OP_DEFAULTS.items():
            v = getattr(self, k)
            if v != default:
                out[k] = [list(c) for c in v] if k == "cases" else list(v) if k == "args" else v
        return out

    @staticmethod
    def from_json(d: dict) -> "Op":
        return Op(**dict(d, args=tuple(d.get("args", ())), cases=tuple(tuple(c) for c in d.get("cases", ()))))


_OP_DEFAULTS = {k: v for k, v in _shallow(Op("")).items() if k != "kind"}


@dataclass(frozen=True)
class Parameter:
    """A trainable tensor: one buffer per replica, with gradient and momentum, and its initialisation."""

    layer: str
    name: str                  # "weights" | "biases" (| "weights.<i>" for a layer's i-th input)
    buffers: tuple[str, ...]   # one per replica of the layer
    grads: tuple[str, ...]
    incs: tuple[str, ...]
    shape: tuple[int, ...]
    init: dict[str, Any]       # {"normal": std} | {"const": value}
    index: int                 # position in the network's parameter list (RNG key)

    @property
    def export_name(self) -> str:
        return f"{self.layer}.{self.name}"


@dataclass
class LayerPlacement:
    """What `cnnc plan --json` reports per layer."""

    layer: str
    kind: str
    devices: tuple[int, ...]
    passes: int
    update_period: int         # passes accumulated per update (0: no weights)


@dataclass
class Plan:
    network: str
    batch: int
    epochs: int
    seed: int
    shares: int                          # the minibatch is cut into this many equal shares
    buffers: dict[str, Buffer]
    kernels: dict[str, Kernel]
    parameters: list[Parameter]
    programs: dict[str, dict[int, list[Op]]]      # "train" | "test" -> logical device -> ops
    inputs: dict[str, str]               # input name -> "image" | "labels"
    costs: list[dict[str, Any]]          # {"layer", "coeff", "top_k", "outputs": [{"loss", "correct", "cases"}]}
    layers: list[LayerPlacement] = field(default_factory=list)
    image_shape: tuple[int, int, int] = (1, 1, 1)
    classes: int = 0
    scalars: list[StepScalar] = field(default_factory=list)     # slot -> step scalar

    @property
    def devices(self) -> list[int]:
        return sorted({b.device for b in self.buffers.values()})

    def to_json(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "network": self.network,
            "batch": self.batch,
            "epochs": self.epochs,
            "seed": self.seed,
            "shares": self.shares,
            "image_shape": list(self.image_shape),
            "classes": self.classes,
            "inputs": self.inputs,
            "costs": self.costs,
            "layers": [dict(_shallow(l), devices=list(l.devices)) for l in self.layers],
            "buffers": [_shallow(b) for b in self.buffers.values()],
            "kernels": [_shallow(k) for k in self.kernels.values()],
            "parameters": [dict(_shallow(p), buffers=list(p.buffers), grads=list(p.grads), incs=list(p.incs),
                                shape=list(p.shape)) for p in self.parameters],
            "programs": {name: {str(dev): [op.to_json() for op in ops] for dev, ops in prog.items()}
                         for name, prog in self.programs.items()},
            "scalars": [_shallow(s) for s in self.scalars],
        }

    @staticmethod
    def from_json(j: dict) -> "Plan":
        if j.get("format") != PLAN_FORMAT:
            raise ValueError("unsupported plan format")
        return Plan(
            network=j["network"], batch=j["batch"], epochs=j["epochs"], seed=j["seed"], shares=j["shares"],
            buffers={b["id"]: Buffer(**b) for b in j["buffers"]},
            kernels={k["name"]: Kernel(**k) for k in j["kernels"]},
            parameters=[Parameter(**dict(p, buffers=tuple(p["buffers"]), grads=tuple(p["grads"]),
                                         incs=tuple(p["incs"]), shape=tuple(p["shape"])))
                        for p in j["parameters"]],
            programs={name: {int(dev): [Op.from_json(o) for o in ops] for dev, ops in prog.items()}
                      for name, prog in j["programs"].items()},
            inputs=j["inputs"], costs=j["costs"],
            layers=[LayerPlacement(**dict(l, devices=tuple(l["devices"]))) for l in j.get("layers", [])],
            image_shape=tuple(j["image_shape"]), classes=j["classes"],
            scalars=[StepScalar(**s) for s in j["scalars"]],
        )
