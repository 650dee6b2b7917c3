"""Checkpoints: everything a training run needs to continue exactly where it stopped.

A checkpoint is one .npz in the save directory, `checkpoint-<step>.npz`, holding the
parameters and momenta (by export name, so another placement of the same network can
read it), the step, the epoch's data order and the position in it, the state of every
random stream (the seed; crops and dropout are keyed by seed, epoch and step), the
data's mean and class names where the data has them, the build's hash and a sha256 of
all of it.  It is written to a temporary file, flushed to disk and renamed into place,
so a process killed during a save leaves the previous checkpoint as it was.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnc.build import write_atomic
from cnnc.plan.schedule import Plan
from cnnc.train.arrays import ArchiveError, read_npz
from cnnc.train.weights import WeightsError

FORMAT = 1
NAME_RE = re.compile(r"checkpoint-(\d{8,})\.npz")
_PARAM, _MOMENTUM = "param:", "momentum:"


class CheckpointError(WeightsError):
    """A checkpoint that cannot be used (damaged, or from another network), in one line."""


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:08d}.npz"


def network_fingerprint(plan: Plan) -> str:
    """What must agree for a checkpoint to be resumed by a build: the network's name, batch,
    seed, input and parameters.  Placement is left out, so another placement of the same
    network resumes it (equal within float tolerance, not bitwise)."""
    facts = [plan.network, plan.batch, plan.seed, list(plan.image_shape), plan.classes,
             [[p.export_name, list(p.shape)] for p in plan.parameters]]
    return hashlib.sha256(json.dumps(facts).encode()).hexdigest()


@dataclass
class Checkpoint:
    step: int                                 # training steps done
    total_steps: int                          # the learning-rate schedule's total
    epochs: int | None                        # the run's --epochs and --steps, for a resume without them
    steps: int | None
    parameters: dict[str, np.ndarray]
    momenta: dict[str, np.ndarray]
    order: np.ndarray                         # the shuffle of the epoch the next step belongs to
    epoch: int                                # that epoch (from 1) and the steps of it done
    position: int
    epoch_loss: float = 0.0                   # the epoch's summed loss and cases so far, for its mean
    epoch_cases: int = 0
    epoch_costs: dict = field(default_factory=dict)     # with several costs: each one's summed loss so far
    color_noise: float = 0.0                  # the std of the training batches' colour noise
    network: str = ""
    fingerprint: str = ""
    build_hash: str = ""
    seed: int = 0
    data: dict = field(default_factory=dict)  # name, train cases, batches per epoch, class names
    mean: np.ndarray | None = None

    def meta(self) -> dict:
        return {"format": FORMAT, "step": self.step, "total_steps": self.total_steps, "epochs": self.epochs,
                "steps": self.steps, "epoch": self.epoch, "position": self.position,
                "epoch_loss": self.epoch_loss, "epoch_cases": self.epoch_cases,
                "epoch_costs": self.epoch_costs, "color_noise": self.color_noise, "network": self.network,
                "fingerprint": self.fingerprint, "build_hash": self.build_hash,
                "rng": {"seed": self.seed, "keyed_by": ["seed", "epoch", "step"]}, "data": self.data}


def _arrays(ck: Checkpoint) -> dict[str, np.ndarray]:
    out = {f"{_PARAM}{k}": np.asarray(v, np.float32) for k, v in ck.parameters.items()}
    out.update({f"{_MOMENTUM}{k}": np.asarray(v, np.float32) for k, v in ck.momenta.items()})
    out["data_order"] = np.asarray(ck.order, np.int64)
    if ck.mean is not None:
        out["data_mean"] = np.asarray(ck.mean, np.float32)
    return out


def _digest(arrays: dict[str, np.ndarray], meta: dict) -> str:
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"\0{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def checkpoints(save_dir: Path) -> list[tuple[int, Path]]:
    """The (step, path) of every checkpoint in `save_dir`, oldest first."""
    if not save_dir.is_dir():
        return []
    found = [(int(m[1]), f) for f in save_dir.iterdir() if (m := NAME_RE.fullmatch(f.name))]
    return sorted(found)


def save_checkpoint(save_dir: Path, ck: Checkpoint, keep: int) -> Path:
    """Write `ck` durably, then delete all but the newest `keep` checkpoints."""
    arrays, meta = _arrays(ck), ck.meta()
    meta["sha256"] = _digest(arrays, meta)
    buf = io.BytesIO()
    np.savez(buf, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
    path = save_dir / checkpoint_name(ck.step)
    write_atomic(path, buf.getvalue(), durable=True)
    for _, old in checkpoints(save_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path) -> Checkpoint:
    """Read and verify one checkpoint file; anything wrong is a CheckpointError."""
    def damaged(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: damaged checkpoint ({why}); delete it to resume from an earlier one")

    try:
        arrays = read_npz(path)
    except ArchiveError as e:
        raise damaged(str(e)) from None
    try:
        meta = json.loads(arrays.pop("meta").tobytes())
        if not isinstance(meta, dict):
            raise ValueError
    except (KeyError, ValueError):
        raise damaged("no readable metadata") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')!r}, this cnnc reads {FORMAT}")
    digest = meta.pop("sha256", None)
    if digest != _digest(arrays, meta):
        raise damaged("its checksum does not match its contents")
    try:
        return Checkpoint(
            step=int(meta["step"]), total_steps=int(meta["total_steps"]), epochs=meta["epochs"],
            steps=meta["steps"], epoch=int(meta["epoch"]), position=int(meta["position"]),
            epoch_loss=float(meta["epoch_loss"]), epoch_cases=int(meta["epoch_cases"]),
            epoch_costs={str(k): float(v) for k, v in meta.get("epoch_costs", {}).items()},
            color_noise=float(meta.get("color_noise", 0.0)),
            parameters={k[len(_PARAM):]: v for k, v in arrays.items() if k.startswith(_PARAM)},
            momenta={k[len(_MOMENTUM):]: v for k, v in arrays.items() if k.startswith(_MOMENTUM)},
            order=arrays["data_order"], mean=arrays.get("data_mean"), network=meta["network"],
            fingerprint=meta["fingerprint"], build_hash=meta["build_hash"], seed=int(meta["rng"]["seed"]),
            data=meta["data"])
    except (KeyError, TypeError, ValueError) as e:
        raise damaged(f"missing or malformed {e}") from None


def latest_checkpoint(save_dir: Path) -> Checkpoint:
    """The newest checkpoint of a save directory, verified."""
    found = checkpoints(save_dir)
    if not found:
        what = "no such directory" if not save_dir.is_dir() else "no checkpoint-*.npz in it"
        raise CheckpointError(f"{save_dir}: nothing to resume ({what})")
    return load_checkpoint(found[-1][1])


def check_resumable(ck: Checkpoint, plan: Plan, build_hash: str, where: Path) -> str | None:
    """Refuse a checkpoint of another network; returns a note when it comes from another
    build (another placement) of the same network."""
    if ck.fingerprint != network_fingerprint(plan):
        raise CheckpointError(f"{where}: checkpoint of network '{ck.network}' (build {ck.build_hash[:12]}) "
                              f"does not fit this build of '{plan.network}' (build {build_hash[:12]}): "
                              f"other parameters, batch, seed or input")
    shapes = {p.export_name: tuple(p.shape) for p in plan.parameters}
    if any({k: v.shape for k, v in arrays.items()} != shapes for arrays in (ck.parameters, ck.momenta)):
        raise CheckpointError(f"{where}: damaged checkpoint (its parameters are not the network's)")
    if ck.build_hash != build_hash:
        return (f"note: {where} was written by another build of '{plan.network}' "
                f"({ck.build_hash[:12]}, this is {build_hash[:12]}); resuming, equal within float tolerance")
    return None
