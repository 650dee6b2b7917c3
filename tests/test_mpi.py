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

from helpers import RANKS4

CNNC = Path(sys.executable).parent / "cnnc"
MPIEXEC = Path(sys.executable).parent / "mpiexec"
if not MPIEXEC.exists() and shutil.which("mpiexec"):
    MPIEXEC = Path(shutil.which("mpiexec"))


def _mpi_missing() -> str:
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py is not installed (pip install 'cnnc[mpi]')"
    return "" if MPIEXEC.exists() else "no mpiexec next to the interpreter or on PATH"


pytestmark = pytest.mark.skipif(bool(_mpi_missing()), reason=_mpi_missing() or "mpi available")

SINGLE = RANKS4.replace("@gpu(0,1,2,3) ", "").replace("@gpu(1) ", "").replace("@gpu(2) ", "") \
    .replace("@gpu(3) ", "")
GPUS = ("--gpus", "0,0,0,0")


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("mpi")
    out = {}
    for name, source in (("placed", RANKS4), ("single", SINGLE)):
        compile_network(source, f"{name}.cnn", tmp / name, use_nvcc=False)
        out[name] = tmp / name
    return out


def cnnc_run(build: Path, save: Path, backend: str, ranks: int, *extra: str,
             steps: int = 3, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`cnnc run` for `steps` steps, under `mpiexec -n ranks` unless ranks is 1."""
    launch = [str(MPIEXEC), "-n", str(ranks)] if ranks > 1 else []
    return subprocess.run([*launch, str(CNNC), "run", str(build), "--backend", backend, "--steps", str(steps),
                           "--no-test", "-q", "--save-dir", str(save), *extra],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, **(env or {})))


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
        # on 4 ranks every message of more than 64 floats travels in chunks
        chunked = {"CNNC_MPI_CHUNK_BYTES": "256"} if ranks == 4 else None
        r = cnnc_run(builds["placed"], tmp_path / f"r{ranks}", "reference", ranks, *GPUS, env=chunked)
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


def test_trace_under_mpi_has_one_timeline_per_rank(builds, tmp_path: Path) -> None:
    """Rank 0 writes one trace: each rank a process (pid), each of its devices' streams a thread."""
    r = cnnc_run(builds["placed"], tmp_path / "t", "reference", 2, *GPUS, "--trace", str(tmp_path / "t.json"),
                 steps=3)
    assert r.returncode == 0, r.stderr
    events = json.loads((tmp_path / "t.json").read_text())["traceEvents"]
    devices = {(e["pid"], e["args"]["device"]) for e in events if e["ph"] == "X"}
    assert devices == {(0, 0), (0, 1), (1, 2), (1, 3)}
    threads = {e["pid"]: set() for e in events}
    for e in events:
        if e["name"] == "thread_name":
            threads[e["pid"]].add(e["args"]["name"].split()[1])
    assert threads == {0: {"0", "1"}, 1: {"2", "3"}}


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
    # what rank 0 was waiting on: a copy, or, when rank 1 sent the step's messages early (they
    # leave as soon as their source is final) and stopped after them, the step's health check
    waited_for = line.split(" while waiting for ", 1)[1]
    assert "(logical device " in waited_for or waited_for == "the other ranks' parameter checks", line


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks through /proc")
def test_a_killed_rank_ends_the_job(builds, tmp_path: Path) -> None:
    """MPICH's launcher ends the job as soon as a rank dies, naming the process."""
    r, pid, took = _start_then_signal(builds["placed"], tmp_path / "k", signal.SIGKILL, timeout=30)
    assert r.returncode != 0
    assert took < 30
    assert f"PID {pid} " in r.stdout + r.stderr


def test_divergence_under_mpi_stops_every_rank(tmp_path: Path) -> None:
    build = tmp_path / "diverging"
    compile_network(RANKS4.replace("lr = 0.05", "lr = 1e9"), "diverging.cnn", build, use_nvcc=False)
    r = cnnc_run(build, tmp_path / "s", "reference", 2, *GPUS)
    assert r.returncode == 3, r.stderr
    assert "error: training diverged at step 2 (epoch 1): the loss is inf; run it as one process to find the " \
           "first non-finite value" in r.stderr
    assert "Traceback" not in r.stderr


# -- overlap: proven by the order of events on each rank, in one process -------------------

DATA_PARALLEL = """
network dp2
input data: 1x8x8
input labels: label(10)
train { batch = 8; epochs = 1; seed = 3; lr = 0.05; momentum = 0.9; weight_decay = 0.0005; init_w = 0.1 }
@gpu(0,1) conv1 = conv(data, filters=4, size=3, padding=1) relu
@gpu(0,1) conv2 = conv(conv1, filters=4, size=3, padding=1) relu
@gpu(0,1) fc3 = fc(conv2, outputs=10)
@gpu(0,1) probs = softmax(fc3)
@gpu(0,1) cost = logreg(labels, probs)
"""


class _Arrival:
    def __init__(self, queue, values, peer, tag, log):
        self.queue, self.values, self.peer, self.tag, self.log = queue, values, peer, tag, log

    def chunks(self):
        at = 0
        while at < self.values.size:
            chunk = self.queue.get(timeout=30)
            self.values[at:at + chunk.size] = chunk
            yield at, self.values[at:at + chunk.size]
            at += chunk.size
        self.log.append(("received", self.tag))


class RecordingTransport:
    """Two ranks as two threads: messages through queues (per sender, receiver and tag, so in
    order as MPI keeps them), and each rank's sends and completed receives in its log."""

    def __init__(self, rank: int, size: int, queues: dict, log: list, chunk: int = 100):
        self.rank, self.size, self.queues, self.log, self.chunk = rank, size, queues, log, chunk

    def _queue(self, key):
        import queue
        return self.queues.setdefault(key, queue.Queue())

    def send_array(self, values, peer, tag):
        self.log.append(("send", tag))
        for at in range(0, values.size, self.chunk):
            self._queue((self.rank, peer, tag)).put(values[at:at + self.chunk].copy())

    def receive_array(self, values, peer, tag, what):
        return _Arrival(self._queue((peer, self.rank, tag)), values, peer, tag, self.log)

    def allgather(self, value, what):
        for peer in range(self.size):
            if peer != self.rank:
                self._queue((self.rank, peer, "all")).put(value)
        return [value if p == self.rank else self._queue((p, self.rank, "all")).get(timeout=30)
                for p in range(self.size)]


def _train_as_two_threads(plan, x, y):
    """One training step of `plan` as two ranks in two threads; each rank's log of sends,
    completed receives and kernel launches, and its parameters after the step."""
    import threading
    from cnnc.backends.reference import ReferenceBackend
    from cnnc.executor import Executor

    queues, logs, params, errors = {}, [[], []], [None, None], []

    class Recording(ReferenceBackend):
        def __init__(self, log):
            super().__init__()
            self.log = log

        def launch(self, kernel, device, args, stream="compute"):
            self.log.append(("launch", kernel.name))
            super().launch(kernel, device, args, stream)

    def rank(r):
        try:
            ex = Executor(plan, Recording(logs[r]), transport=RecordingTransport(r, 2, queues, logs[r]))
            ex.train_step(x, y, 0.0)
            params[r] = ex.parameters()
        except Exception as e:       # surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return logs, params


def test_a_layers_gradient_leaves_before_the_layers_below_compute(tmp_path: Path) -> None:
    """Rank 1 sends its share of fc3's weight gradient to rank 0 before it launches conv2's
    backward; rank 0 writes it into its device only after launching its own conv2 backward
    (when the exchange needs it): the message is in flight while the layer below computes."""
    import json as _json
    from cnnc.distributed import cross_rank_copies
    from cnnc.executor import Executor
    from cnnc.backends.reference import ReferenceBackend
    from cnnc.plan.schedule import Plan

    compile_network(DATA_PARALLEL, "dp.cnn", tmp_path / "dp", use_nvcc=False)
    plan = Plan.from_json(_json.loads((tmp_path / "dp" / "plan.json").read_text()))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((plan.batch, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, plan.batch).astype(np.int32)
    logs, params = _train_as_two_threads(plan, x, y)

    train = plan.programs["train"]
    fc3_grad = [c.tag for c in cross_rank_copies(plan, "train", {0: 0, 1: 1})
                if c.source == 1 and train[c.device][c.index].src == "fc3.weights.grad.r1"
                and train[c.device][c.index].dst == "fc3.weights.grad.stage@0"]
    assert fc3_grad
    conv2_backward = {plan.kernels[op.kernel].name for op in train[0]
                      if op.kind == "launch" and op.phase == "backward" and plan.kernels[op.kernel].layer == "conv2"}
    assert conv2_backward

    def first(log, event):
        return next(i for i, e in enumerate(log) if e == event)

    def first_launch(log, names):
        return next(i for i, e in enumerate(log) if e[0] == "launch" and e[1] in names)

    for tag in fc3_grad:
        assert first(logs[1], ("send", tag)) < first_launch(logs[1], conv2_backward)
        assert first(logs[0], ("received", tag)) > first_launch(logs[0], conv2_backward)
    one = Executor(plan, ReferenceBackend())
    one.train_step(x, y, 0.0)
    assert_bitwise_equal(one.parameters(), params[0])
    assert_bitwise_equal(one.parameters(), params[1])
