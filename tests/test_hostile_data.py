"""Data, parameter files and plans a run cannot use are one-line errors (exit 2) before
any training: hostile values, lying headers, and plans bigger than the device."""
from __future__ import annotations

import io
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cnnc.backends.base import Backend, BackendError, DeviceMemory
from cnnc.cli import main
from cnnc.executor import check_memory
from cnnc.plan.schedule import Buffer

from helpers import replace_once


def run(build: Path, tmp_path: Path, *args) -> tuple[int, str]:
    """`cnnc run` on the reference backend; the exit status and the last line it printed."""
    result = CliRunner().invoke(main, ["run", str(build), "--backend", "reference", "-q",
                                       "--save-dir", str(tmp_path / "train"), *map(str, args)])
    assert "Traceback" not in result.output
    return result.exit_code, result.output.strip().splitlines()[-1]


def digits_like(n_train: int = 16, n_test: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return dict(train_x=rng.random((n_train, 1, 8, 8), np.float32), train_y=np.arange(n_train) % 10,
                test_x=rng.random((n_test, 1, 8, 8), np.float32), test_y=np.arange(n_test) % 10)


def npz(tmp_path: Path, name: str = "data.npz", **changes) -> Path:
    arrays = digits_like()
    arrays.update(changes)
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def test_a_clean_file_trains(tiny_build_dir: Path, tmp_path: Path) -> None:
    code, last = run(tiny_build_dir, tmp_path, "--data", npz(tmp_path))
    assert code == 0, last


def _with(key: str, index: tuple, value) -> dict:
    arrays = digits_like()
    arrays[key] = arrays[key].copy()
    arrays[key][index] = value
    return {key: arrays[key]}


@pytest.mark.parametrize("changes, message", [
    (_with("train_x", (3, 0, 1, 1), np.nan), "train_x contains NaN or infinite values"),
    (_with("test_x", (0, 0, 0, 0), np.inf), "test_x contains NaN or infinite values"),
    (_with("train_x", (1, 0, 0, 0), 3e7),
     "to 3e+07, outside [-1e+06, 1e+06] (the limit for data without a pixel_range)"),
    (dict(_with("test_x", (1, 0, 0, 0), 1.5), pixel_range=np.array([0.0, 1.0])),
     "to 1.5, outside [0, 1] (its pixel_range)"),
    (dict(pixel_range=np.array([1.0, 0.0])), "pixel_range must be two finite float32 numbers [low, high]"),
    (_with("test_y", (2,), -1), "test_y has negative labels (the smallest is -1)"),
    (_with("test_y", (2,), 12), "the test split has label 12, but the network's labels are 0..9"),
    (_with("train_y", (0,), 10), "the train split has label 10, but the network's labels are 0..9"),
    (dict(train_y=(np.arange(16) % 10).astype(np.float32)), "train_y must hold integer class labels, got dtype float32"),
    (dict(test_y=np.arange(8) % 10 + 0.5), "test_y must hold integer class labels, got dtype float64"),
    (dict(test_x=np.zeros((0, 1, 8, 8), np.float32), test_y=np.zeros(0, np.int64)), "the test split is empty"),
    (dict(train_x=np.zeros((0, 1, 8, 8), np.float32), train_y=np.zeros(0, np.int64)), "the train split is empty"),
    (dict(train_x=np.zeros((5, 1, 8, 8), np.float32), train_y=np.arange(5)),
     "the train split has 5 cases, fewer than one batch of 8"),
])
def test_hostile_npz_is_refused_before_training(tiny_build_dir: Path, tmp_path: Path, changes: dict,
                                                message: str) -> None:
    code, last = run(tiny_build_dir, tmp_path, "--data", npz(tmp_path, **changes))
    assert code == 2
    assert last.startswith("error: ") and message in last
    assert not (tmp_path / "train" / "metrics.jsonl").exists()


def lying_npz(path: Path, key: str, shape: tuple, arrays: dict | None = None) -> Path:
    """An .npz whose `key` member declares `shape` but holds 64 bytes of data."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w") as zf:
        for name, value in (arrays or {}).items():
            buf = io.BytesIO()
            np.save(buf, value)
            zf.writestr(f"{name}.npy", buf.getvalue())
        zf.writestr(f"{key}.npy", header.getvalue() + bytes(64))
    return path


def test_an_absurd_npy_header_in_data_is_refused(tiny_build_dir: Path, tmp_path: Path) -> None:
    rest = {k: v for k, v in digits_like().items() if k != "train_x"}
    path = lying_npz(tmp_path / "lying.npz", "train_x", (10**12, 1, 8, 8), rest)
    code, last = run(tiny_build_dir, tmp_path, "--data", path)
    assert code == 2
    assert last == (f"error: {path}: array 'train_x' declares shape (1000000000000, 1, 8, 8) of float32 "
                    f"(256000000000000 bytes) but holds 64 bytes")


def test_a_single_npy_named_npz_is_refused(tiny_build_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "one.npz"
    with open(path, "wb") as f:
        np.save(f, np.zeros((4, 1, 8, 8), np.float32))
    code, last = run(tiny_build_dir, tmp_path, "--data", path)
    assert code == 2
    assert last == f"error: {path}: a single .npy array, not an .npz archive of named arrays"


def test_init_from_an_npy_is_refused(tiny_build_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "w.npy"
    np.save(path, np.zeros(3, np.float32))
    code, last = run(tiny_build_dir, tmp_path, "--init", path)
    assert code == 2
    assert last.startswith(f"error: {path}: a single .npy array, not an .npz archive of named arrays; "
                           f"a parameter file is an .npz")


def test_init_with_an_absurd_header_is_refused(tiny_build_dir: Path, tmp_path: Path) -> None:
    path = lying_npz(tmp_path / "w.npz", "fc2.weights", (2**40, 2**20))
    code, last = run(tiny_build_dir, tmp_path, "--init", path)
    assert code == 2
    assert "array 'fc2.weights' declares shape (1099511627776, 1048576) of float32" in last
    assert "but holds 64 bytes" in last


# --- CIFAR-10 pickles --------------------------------------------------------------------------

def cifar_folder(tmp_path: Path, train: bytes | None = None, test: bytes | None = None) -> Path:
    folder = tmp_path / "cifar"
    folder.mkdir()

    def batch(n: int, labels) -> bytes:
        data = np.random.default_rng(n).integers(0, 256, (n, 3072), dtype=np.uint8)
        return pickle.dumps({b"data": data, b"labels": list(labels)}, protocol=4)

    (folder / "data_batch_1").write_bytes(train if train is not None else batch(16, [i % 10 for i in range(16)]))
    (folder / "test_batch").write_bytes(test if test is not None else batch(8, [i % 10 for i in range(8)]))
    return folder


def cifar_build(tmp_path: Path, tiny_source: str) -> Path:
    from cnnc.build import compile_file

    src = tmp_path / "c.cnn"
    src.write_text(replace_once(tiny_source, "1x8x8", "3x32x32"))
    compile_file(src, tmp_path / "build", use_nvcc=False)
    return tmp_path / "build"


class _Call:
    """Pickles as a call of `fn` with `args`, the way a hostile file would be written."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _bytes8_bomb() -> bytes:
    """A pickle declaring a 1 PiB bytes object, holding two bytes."""
    return b"\x80\x04\x8e" + struct.pack("<Q", 2**50) + b"xx."


def _skeleton_bomb() -> bytes:
    from numpy._core.multiarray import _reconstruct
    return pickle.dumps({b"data": _Call(_reconstruct, np.ndarray, (10**13,), b"b"), b"labels": [0]}, protocol=4)


@pytest.mark.parametrize("test_batch, message", [
    (_bytes8_bomb(), "expected 1125899906842624 bytes in a bytes8, but only 3 remain"),
    (_skeleton_bomb(), "array skeleton of shape (10000000000000,)"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [3, -1]}, protocol=4),
     "CIFAR-10 labels must be 0..9, found -1..3"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [3.0, 1.0]}, protocol=4),
     "'labels' must be integers, got dtype float64"),
    (pickle.dumps({b"data": np.full((2, 3072), np.nan, np.float32), b"labels": [3, 1]}, protocol=4),
     "'data' must hold bytes (uint8 pixels 0..255), got dtype float32"),
    (pickle.dumps({b"data": np.zeros((0, 3072), np.uint8), b"labels": []}, protocol=4),
     "the batch holds no images"),
])
def test_hostile_cifar_batches_are_refused(tmp_path: Path, tiny_source: str, test_batch: bytes,
                                           message: str) -> None:
    build = cifar_build(tmp_path, tiny_source)
    folder = cifar_folder(tmp_path, test=test_batch)
    code, last = run(build, tmp_path, "--data", folder)
    assert code == 2
    assert last.startswith(f"error: {folder / 'test_batch'}: ") and message in last


def test_the_cifar_unpickler_stays_restricted(tmp_path: Path, tiny_source: str) -> None:
    import os

    marker = tmp_path / "ran"
    build = cifar_build(tmp_path, tiny_source)
    folder = cifar_folder(tmp_path, train=pickle.dumps(_Call(os.mkdir, str(marker)), protocol=4))
    code, last = run(build, tmp_path, "--data", folder)
    assert code == 2 and "unexpected object" in last
    assert not marker.exists()


# --- plans bigger than the device ------------------------------------------------------------

def test_a_plan_bigger_than_host_memory_fails_before_allocating(tmp_path: Path) -> None:
    """40 fc layers of 2e9 weights each: about 900 GiB with gradients and momenta."""
    lines = ["network huge", "input data: 1x100x100", "input labels: label(10)", "train {", "  batch = 4", "}"]
    prev = "data"
    for i in range(1, 41):
        lines.append(f"fc{i} = fc({prev}, outputs={200000 if i % 2 else 10000})")
        prev = f"fc{i}"
    lines += [f"out = fc({prev}, outputs=10)", "probs = softmax(out)", "cost = logreg(labels, probs)"]
    (tmp_path / "huge.cnn").write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(main, ["compile", str(tmp_path / "huge.cnn"), "-o", str(tmp_path / "b"), "--no-nvcc"])
    assert result.exit_code == 0, result.output
    rng = np.random.default_rng(0)
    data = tmp_path / "big.npz"
    np.savez(data, train_x=rng.random((8, 1, 100, 100), np.float32), train_y=np.arange(8),
             test_x=rng.random((4, 1, 100, 100), np.float32), test_y=np.arange(4))
    code, last = run(tmp_path / "b", tmp_path, "--data", data)
    assert code == 2
    assert last.startswith("error: logical device 0 (host memory): the plan needs 894.2 GiB, the device has ")
    # on OpenCL too, and before the kernels are built (the backend builds them on first use)
    code, last = run(tmp_path / "b", tmp_path, "--data", data, "--backend", "opencl")
    assert code == 2
    assert last.startswith("error: logical device 0 (") and "): the plan needs 894.2 GiB, the device has " in last


class _Device(Backend):
    """A backend that only reports memory: 1 GiB per physical device, 256 MiB per buffer."""

    def __init__(self, physical: dict[int, int]):
        self.physical = physical

    def memory(self, device: int) -> DeviceMemory:
        return DeviceMemory(self.physical[device], f"card {self.physical[device]}", 2**30, 2**28)

    alloc = upload = download = launch = copy = None


def _storages(*sizes_by_device: tuple[int, int]) -> list[Buffer]:
    return [Buffer(f"s{i}", device, nbytes // 4, "f32", "weights", f"layer{i}")
            for i, (device, nbytes) in enumerate(sizes_by_device)]


def test_logical_devices_on_one_physical_device_share_its_memory() -> None:
    storages = _storages(*[(device, 200 * 2**20) for device in (0, 0, 0, 1, 1, 1)])
    check_memory(_Device({0: 0, 1: 1}), storages)           # 600 MiB on each card: fits
    with pytest.raises(BackendError) as info:
        check_memory(_Device({0: 0, 1: 0}), storages)       # --gpus 0,0: 1200 MiB on one 1 GiB card
    assert str(info.value) == "logical devices 0, 1 (card 0): the plan needs 1.2 GiB, the device has 1.0 GiB"


def test_one_buffer_beyond_the_largest_allocation_is_refused() -> None:
    with pytest.raises(BackendError) as info:
        check_memory(_Device({0: 3}), _storages((0, 300 * 2**20)))
    assert str(info.value) == ("logical device 0 (card 3): a buffer of layer0 needs 300.0 MiB, "
                               "the device allocates at most 256.0 MiB at once")


def test_opencl_reports_its_device_limits(tiny_build_dir: Path) -> None:
    from cnnc.backends import make_backend
    from cnnc.build import load_plan

    try:
        backend = make_backend("opencl", load_plan(tiny_build_dir), tiny_build_dir, [0])
    except BackendError as e:
        pytest.skip(f"no usable OpenCL device: {e}")
    memory = backend.memory(0)
    device = backend._devices[0]
    assert 0 < memory.total <= device.global_mem_size      # a CPU device: at most what the host has left
    assert memory.largest == min(device.max_mem_alloc_size, memory.total)
    with pytest.raises(BackendError, match=r"^logical device 0 \(.+\): a buffer of big needs .* at most"):
        check_memory(backend, [Buffer("s", 0, memory.largest // 4 + 1, "f32", "weights", "big")])
