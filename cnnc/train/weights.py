"""Parameter files: what `cnnc run` saves, `cnnc export` writes and `cnnc run --init` reads.

One float32 array per parameter, named by layer: `<layer>.weights` and
`<layer>.biases` (`<layer>.weights.<i>` for the i-th input of a layer with
several).  Files are written atomically; anything unreadable or not matching
the network is a one-line WeightsError naming the file and the problem.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from cnnc.build import write_atomic
from cnnc.plan.schedule import Plan
from cnnc.train.arrays import ArchiveError, read_npz

WEIGHTS_FILE = "weights.npz"

# Arrays a parameter file may hold besides the parameters, describing the data they were trained
# on, for cnnc predict: `classes` (class names by label) and `mean` (the mean training image).
METADATA = ("classes", "mean")


class WeightsError(Exception):
    """A parameter file that cannot be used, in one line."""


def data_metadata(class_names, mean) -> dict[str, np.ndarray]:
    """The METADATA arrays for a data set's class names and mean image (either may be absent)."""
    out = {}
    if class_names:
        out["classes"] = np.array([str(c) for c in class_names])
    if mean is not None:
        out["mean"] = np.asarray(mean, np.float32)
    return out


def save_weights(path: Path, params: dict[str, np.ndarray], metadata: dict[str, np.ndarray] | None = None) -> None:
    """Parameters as float32, plus the METADATA arrays given (class names as text, no pickles)."""
    arrays = {k: np.asarray(v, np.float32) for k, v in params.items()}
    for k, v in (metadata or {}).items():
        assert k in METADATA, k
        arrays[k] = np.asarray(v, np.float32) if k == "mean" else np.asarray(v, str)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_atomic(path, buf.getvalue())


def read_weights(path: Path, metadata: bool = False) -> dict[str, np.ndarray]:
    """Every parameter array of a .npz parameter file (with `metadata`, also the METADATA
    arrays it holds), or a WeightsError."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_FILE
    if not path.is_file():
        raise WeightsError(f"{path}: no such parameter file")
    try:
        out = read_npz(path)
    except ArchiveError as e:
        raise WeightsError(f"{path}: {e}; a parameter file is an .npz with one array per parameter, "
                           f"as cnnc run saves and cnnc export writes") from None
    for k, v in out.items():
        if k not in METADATA and (v.dtype.kind != "f" or not np.isfinite(v).all()):
            raise WeightsError(f"{path}: array '{k}' is not finite floating-point data")
    return out if metadata else {k: v for k, v in out.items() if k not in METADATA}


def weights_for(plan: Plan, path: Path) -> dict[str, np.ndarray]:
    """Read a parameter file and check it has exactly the network's parameters and shapes."""
    values = read_weights(path)
    expected = {p.export_name: tuple(p.shape) for p in plan.parameters}
    missing = sorted(set(expected) - set(values))
    extra = sorted(set(values) - set(expected))
    if missing:
        raise WeightsError(f"{path}: no array for {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} "
                           f"(network '{plan.network}')")
    if extra:
        raise WeightsError(f"{path}: arrays {', '.join(extra[:4])} are not parameters of '{plan.network}'")
    for name, shape in expected.items():
        if values[name].shape != shape:
            raise WeightsError(f"{path}: '{name}' has shape {values[name].shape}, the network needs {shape}")
    single = {}
    for name, v in values.items():
        with np.errstate(over="ignore"):
            single[name] = v.astype(np.float32)
        if not np.isfinite(single[name]).all():
            raise WeightsError(f"{path}: array '{name}' holds values too large for float32 "
                               f"(largest magnitude {float(np.abs(v).max()):.6g})")
    return single


def export(save_dir: Path, out: Path) -> list[str]:
    """Copy a run's parameters (and its class names and mean image, where saved) to `out`;
    returns the parameter names."""
    values = read_weights(save_dir, metadata=True)
    params = {k: v for k, v in values.items() if k not in METADATA}
    save_weights(out, params, {k: v for k, v in values.items() if k in METADATA})
    return sorted(params)
