"""One build run as 1, 2 and 4 MPI ranks: bitwise-equal training, rank 0 writing, and
a rank that stops or dies ending the job instead of hanging it."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from cnnc.build import compile_network

CNNC = Path(sys.executable).parent / "cnnc"
MPIEXEC = Path(sys.executable).parent / "mpiexec"
if not MPIEXEC.exists() and shutil.which("mpiexec"):
    MPIEXEC = Path(shutil.which("mpiexec"))


def _mpi_missing() -> str:
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py is not installed (pip install 'cnnc[mpi]')"
    return "" if MPIEXEC.exists() else "no mpiexec next to the interpreter or on PATH"


pytestmark = pytest.mark.skipif(bool(_mpi_missing()), reason=_mpi_missing() or "mpi available")

# four logical devices: data-parallel convolutions, then a model-parallel tail, so a step has
# activation copies, gradient copies and the replicated-weight exchange across ranks
PLACED = """
network ranks4
input data: 1x8x8
input labels: label(10)
train { batch = 16; epochs = 1; seed = 3; lr = 0.05; momentum = 0.9; weight_decay = 0.0005; init_w = 0.1 }
@gpu(0,1,2,3) conv1 = conv(data, filters=6, size=3, padding=1) relu
@gpu(0,1,2,3) pool1 = maxpool(conv1, size=2, stride=2)
@gpu(1) fc2 = fc(pool1, outputs=12) tanh
@gpu(2) fc3 = fc(fc2, outputs=10)
@gpu(3) probs = softmax(fc3)
@gpu(3) cost = logreg(labels, probs)
"""
SINGLE = PLACED.replace("@gpu(0,1,2,3) ", "").replace("@gpu(1) ", "").replace("@gpu(2) ", "") \
    .replace("@gpu(3) ", "")
GPUS = ("--gpus", "0,0,0,0")


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("mpi")
    out = {}
    for name, source in (("placed", PLACED), ("single", SINGLE)):
        compile_network(source, f"{name}.cnn", tmp / name, use_nvcc=False)
        out[name] = tmp / name
    return out


def cnnc_run(build: Path, save: Path, backend: str, ranks: int, *extra: str,
             steps: int = 3) -> subprocess.CompletedProcess:
    """`cnnc run` for `steps` steps, under `mpiexec -n ranks` unless ranks is 1."""
    launch = [str(MPIEXEC), "-n", str(ranks)] if ranks > 1 else []
    return subprocess.run([*launch, str(CNNC), "run", str(build), "--backend", backend, "--steps", str(steps),
                           "--no-test", "-q", "--save-dir", str(save), *extra],
                          capture_output=True, text=True, timeout=120)


def weights(save: Path) -> dict[str, np.ndarray]:
    with np.load(save / "weights.npz") as z:
        return {k: z[k] for k in z.files if k.endswith(("weights", "biases"))}


def assert_bitwise_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b) and a
    for name in a:
        assert a[name].tobytes() == b[name].tobytes(), name


def test_reference_ranks_train_bitwise_alike(builds, tmp_path: Path) -> None:
    runs = {}
    for ranks in (1, 2, 4):
        r = cnnc_run(builds["placed"], tmp_path / f"r{ranks}", "reference", ranks, *GPUS)
        assert r.returncode == 0, r.stderr
        runs[ranks] = weights(tmp_path / f"r{ranks}")
        first = r.stdout.splitlines()[0]
        assert first.startswith("training ranks4 ") and first.endswith(f", {ranks} ranks") == (ranks > 1), first
        records = [json.loads(line) for line in (tmp_path / f"r{ranks}" / "metrics.jsonl").read_text().splitlines()]
        assert records and all(rec["ranks"] == ranks for rec in records)
    assert_bitwise_equal(runs[1], runs[2])
    assert_bitwise_equal(runs[1], runs[4])
    single = cnnc_run(builds["single"], tmp_path / "single", "reference", 1)
    assert single.returncode == 0, single.stderr
    for name, value in weights(tmp_path / "single").items():
        np.testing.assert_allclose(runs[4][name], value, rtol=1e-5, atol=1e-5, err_msg=name)


def test_resuming_with_another_rank_count_is_bitwise(builds, tmp_path: Path) -> None:
    """A checkpoint holds whole parameters and the loader is keyed by seed, epoch and step,
    so a run cut on 2 ranks and resumed on 4 ends as one process running throughout."""
    whole = cnnc_run(builds["placed"], tmp_path / "whole", "reference", 1, *GPUS, steps=6)
    cut = cnnc_run(builds["placed"], tmp_path / "cut", "reference", 2, *GPUS, steps=3)
    assert whole.returncode == 0 and cut.returncode == 0, whole.stderr + cut.stderr
    resumed = subprocess.run([str(MPIEXEC), "-n", "4", str(CNNC), "run", str(builds["placed"]), "--backend",
                              "reference", *GPUS, "--steps", "6", "--no-test", "-q", "--resume", str(tmp_path / "cut")],
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert_bitwise_equal(weights(tmp_path / "whole"), weights(tmp_path / "cut"))


def test_opencl_two_ranks_train_as_one(builds, tmp_path: Path) -> None:
    one = cnnc_run(builds["placed"], tmp_path / "o1", "opencl", 1, *GPUS)
    two = cnnc_run(builds["placed"], tmp_path / "o2", "opencl", 2, *GPUS)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    assert_bitwise_equal(weights(tmp_path / "o1"), weights(tmp_path / "o2"))


def test_ranks_must_divide_the_logical_devices(builds, tmp_path: Path) -> None:
    r = cnnc_run(builds["placed"], tmp_path / "s", "reference", 3, *GPUS)
    assert r.returncode == 2
    assert "error: 3 ranks cannot share the plan's 4 logical devices: the number of ranks must divide it" \
        in r.stderr.splitlines()
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "s").exists()


def _rank_pid(mark: str, rank: int) -> int | None:
    """The process of `rank` in the job whose environment carries `mark`."""
    want = {f"CNNC_TEST_JOB={mark}".encode(), f"PMI_RANK={rank}".encode()}
    for proc in Path("/proc").iterdir():
        try:
            env = set((proc / "environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if want <= env:
            return int(proc.name)
    return None


def _start_then_signal(build: Path, save: Path, sig: int, timeout: float) -> tuple[subprocess.CompletedProcess,
                                                                                   int, float]:
    """Train as 2 ranks, and once step 1 is on record, send `sig` to rank 1."""
    mark = uuid.uuid4().hex
    job = subprocess.Popen([str(MPIEXEC), "-n", "2", str(CNNC), "run", str(build), "--backend", "reference",
                            *GPUS, "--epochs", "50", "--no-test", "--test-freq", "1", "-q", "--save-dir", str(save),
                            "--comm-timeout", str(timeout)],
                           env=dict(os.environ, CNNC_TEST_JOB=mark), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (save / "metrics.jsonl").is_file() and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        pid = _rank_pid(mark, 1)
        assert pid is not None and job.poll() is None, "rank 1 is not running"
        os.kill(pid, sig)
        signalled = time.monotonic()
        out, err = job.communicate(timeout=timeout + 30)
        return subprocess.CompletedProcess(job.args, job.returncode, out, err), pid, time.monotonic() - signalled
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks through /proc")
def test_a_stopped_rank_ends_the_job_naming_it(builds, tmp_path: Path) -> None:
    r, _, took = _start_then_signal(builds["placed"], tmp_path / "s", signal.SIGSTOP, timeout=3)
    assert r.returncode == 2, r.stderr
    assert took < 3 + 20
    line = next(l for l in r.stderr.splitlines() if l.startswith("error: "))
    assert line.startswith("error: rank 0: no answer from rank 1 within 3 s while waiting for "), line
    assert "(logical device " in line                       # the copy it was waiting on


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks through /proc")
def test_a_killed_rank_ends_the_job(builds, tmp_path: Path) -> None:
    """MPICH's launcher ends the job as soon as a rank dies, naming the process."""
    r, pid, took = _start_then_signal(builds["placed"], tmp_path / "k", signal.SIGKILL, timeout=30)
    assert r.returncode != 0
    assert took < 30
    assert f"PID {pid} " in r.stdout + r.stderr


def test_divergence_under_mpi_stops_every_rank(tmp_path: Path) -> None:
    build = tmp_path / "diverging"
    compile_network(PLACED.replace("lr = 0.05", "lr = 1e9"), "diverging.cnn", build, use_nvcc=False)
    r = cnnc_run(build, tmp_path / "s", "reference", 2, *GPUS)
    assert r.returncode == 3, r.stderr
    assert "error: training diverged at step 2 (epoch 1): the loss is inf; run it as one process to find the " \
           "first non-finite value" in r.stderr
    assert "Traceback" not in r.stderr
