"""Steps, checkpoints and exact resume, as a user of `cnnc run` meets them: a run cut
anywhere (a step count, Ctrl-C, SIGTERM, kill -9) and resumed ends where an
uninterrupted run ends, and a damaged or foreign checkpoint is refused in one line."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cnnc.backends import make_backend
from cnnc.build import open_build
from cnnc.build_dir import build_lock
from cnnc.executor import Executor
from cnnc.train.checkpoint import checkpoints, latest_checkpoint
from cnnc.train.data import load_npz
from cnnc.train.loop import train
from checkpoint_runs import (NET, STEPS_PER_EPOCH, assert_bitwise, cnnc, compiled, records, run, weights,
                             write_data)
from helpers import GROWING, replace_once

CNNC = [sys.executable, "-m", "cnnc.cli"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("data"))


def interrupted_run(build: Path, data: Path, save_dir: Path, backend: str, at_step: int) -> None:
    """Train in this process and press Ctrl-C during step `at_step` (counting from 1): the loop
    finishes the step, writes a checkpoint and only then lets KeyboardInterrupt through."""
    plan, manifest = open_build(build)
    done = [0]

    class Bar:
        def update(self, n):
            done[0] += n
            if done[0] == at_step:
                signal.raise_signal(signal.SIGINT)

        def set_postfix(self, **kw):
            pass

        def close(self):
            pass

    be = make_backend(backend, plan, build, [0])
    with pytest.raises(KeyboardInterrupt):
        train(plan, be, load_npz(data), plan.epochs, save_dir, progress=lambda **kw: Bar(),
              build_hash=manifest["inputs_hash"])
    assert checkpoints(save_dir)[-1][0] == at_step


@pytest.mark.parametrize("backend", ["reference", "opencl"])
@pytest.mark.parametrize("cut", [STEPS_PER_EPOCH, 4, 9], ids=["epoch-end", "mid-epoch-1", "mid-epoch-2"])
def test_interrupted_and_resumed_equals_uninterrupted_bitwise(tmp_path, data, backend, cut):
    build = compiled(tmp_path)
    run(build, data, "--save-dir", tmp_path / "whole", backend=backend)
    interrupted_run(build, data, tmp_path / "cut", backend, cut)
    _, err = run(build, data, "--resume", tmp_path / "cut", backend=backend)
    assert err == ""
    assert_bitwise(weights(tmp_path / "whole"), weights(tmp_path / "cut"))
    whole, resumed = latest_checkpoint(tmp_path / "whole"), latest_checkpoint(tmp_path / "cut")
    assert whole.step == resumed.step == 2 * STEPS_PER_EPOCH
    assert_bitwise(whole.momenta, resumed.momenta)
    assert records(tmp_path / "cut") == records(tmp_path / "whole")


def test_steps_cut_and_resumed_with_more_steps(tmp_path, data):
    """--steps N stops after N steps with a checkpoint there; resuming with a larger --steps
    continues it (under a constant learning rate, the same as running that many at once)."""
    build = compiled(tmp_path, replace_once(NET, "lr = dexp(base=0.05, tgt_factor=10, steps=3)", "lr = 0.05"))
    run(build, data, "--steps", 9, "--save-dir", tmp_path / "whole")
    out, _ = run(build, data, "--steps", 4, "--save-dir", tmp_path / "cut")
    assert "step      4" in out
    assert [s for s, _ in checkpoints(tmp_path / "cut")] == [4]
    run(build, data, "--resume", tmp_path / "cut", "--steps", 9)
    assert_bitwise(weights(tmp_path / "whole"), weights(tmp_path / "cut"))
    assert latest_checkpoint(tmp_path / "cut").step == 9


def test_the_schedule_spans_the_steps_of_the_run(tmp_path, data):
    """With --steps 4 the learning rate decays over 4 steps, not over the network's epochs."""
    build = compiled(tmp_path)
    run(build, data, "--steps", 4, "--save-dir", tmp_path / "run")
    plan, _ = open_build(build)
    ex = Executor(plan, make_backend("reference", plan, build, [0]))
    from cnnc.train.loader import Loader
    loader = Loader(plan, load_npz(data))
    for step in range(4):
        ex.train_step(*loader.batch(1, step), step / 4)
    assert_bitwise(ex.parameters(), weights(tmp_path / "run"))
    ck = latest_checkpoint(tmp_path / "run")
    assert (ck.step, ck.total_steps, ck.epoch, ck.position) == (4, 4, 1, 4)
    assert_bitwise(ex.momenta(), ck.momenta)


def test_resume_on_another_placement_is_equal_within_tolerance(tmp_path, data):
    build = compiled(tmp_path)
    other = compiled(tmp_path, replace_once(NET, "@gpu(0)", "@gpu(0,1)"), "other")
    run(build, data, "--save-dir", tmp_path / "whole")
    interrupted_run(build, data, tmp_path / "cut", "reference", 4)
    _, err = run(other, data, "--resume", tmp_path / "cut")
    assert err.startswith("note: ") and "another build of 'ck'" in err
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "cut")
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_keep_prunes_old_checkpoints(tmp_path, data):
    build = compiled(tmp_path)
    run(build, data, "--steps", 7, "--save-freq", 2, "--keep", 2, "--save-dir", tmp_path / "run")
    assert [s for s, _ in checkpoints(tmp_path / "run")] == [6, 7]        # every 2 steps, and the end


def test_default_save_freq_is_once_an_epoch(tmp_path, data):
    build = compiled(tmp_path)
    run(build, data, "--save-dir", tmp_path / "run", "--keep", 5)
    assert [s for s, _ in checkpoints(tmp_path / "run")] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]


def test_no_test_writes_no_test_results(tmp_path, data):
    build = compiled(tmp_path)
    run(build, data, "--steps", 3, "--no-test", "--save-dir", tmp_path / "run")
    (record,) = records(tmp_path / "run")
    assert record["step"] == 3 and "test_error" not in record and "test_loss" not in record


def test_test_only(tmp_path, data):
    build = compiled(tmp_path)
    run(build, data, "--steps", 3, "--save-dir", tmp_path / "run")
    (record,) = records(tmp_path / "run")
    for start in (["--resume", tmp_path / "run"], ["--init", tmp_path / "run" / "weights.npz"]):
        out, _ = run(build, data, "--test-only", *start)
        assert out.startswith(f"test error {record['test_error'] * 100:5.2f}%  test loss {record['test_loss']:.4f}")
    assert len(records(tmp_path / "run")) == 1                 # nothing written
    _, err = run(build, data, "--test-only", expect=2)
    assert "--test-only evaluates saved parameters: give --init or --resume" in err


def test_resume_drops_metrics_past_the_checkpoint(tmp_path, data):
    build = compiled(tmp_path)
    run(build, data, "--save-dir", tmp_path / "whole")
    interrupted_run(build, data, tmp_path / "cut", "reference", 8)
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:      # as if killed after evaluating step 10
        f.write(json.dumps({"epoch": 2, "step": 10, "train_loss": 9.0}) + "\n")
    run(build, data, "--resume", tmp_path / "cut")
    assert records(tmp_path / "cut") == records(tmp_path / "whole")


def _one_line_error(err: str, *parts: str) -> None:
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    for p in parts:
        assert p in err, err


def test_damaged_checkpoints_are_refused(tmp_path, data):
    build = compiled(tmp_path)
    run(build, data, "--steps", 3, "--save-dir", tmp_path / "run")
    (_, path), = checkpoints(tmp_path / "run")
    whole = path.read_bytes()
    # a flipped byte inside an array, a truncated file, an empty file
    flipped = bytearray(whole)
    flipped[len(whole) // 2] ^= 0xFF
    for bad in (bytes(flipped), whole[:len(whole) // 2], b""):
        path.write_bytes(bad)
        _, err = run(build, data, "--resume", tmp_path / "run", expect=2)
        _one_line_error(err, str(path), "damaged checkpoint")
    _, err = run(build, data, "--resume", tmp_path / "nothing", expect=2)
    _one_line_error(err, "nothing to resume")


def test_checkpoint_of_another_network_is_refused(tmp_path, data):
    build = compiled(tmp_path)
    other = compiled(tmp_path, replace_once(NET, "filters=4", "filters=6"), "other")
    run(build, data, "--steps", 3, "--save-dir", tmp_path / "run")
    _, err = run(other, data, "--resume", tmp_path / "run", expect=2)
    _one_line_error(err, "does not fit this build of 'ck'")
    reseeded = compiled(tmp_path, replace_once(NET, "seed = 3", "seed = 4"), "reseeded")
    _, err = run(reseeded, data, "--resume", tmp_path / "run", expect=2)
    _one_line_error(err, "does not fit")


def test_resume_with_other_data_is_refused(tmp_path, data):
    build = compiled(tmp_path)
    run(build, data, "--steps", 3, "--save-dir", tmp_path / "run")
    other = tmp_path / "other.npz"
    with np.load(data) as f:
        np.savez(other, **{k: f[k][:40] if k.startswith("train") else f[k] for k in f.files})
    _, err = run(build, other, "--resume", tmp_path / "run", expect=2)
    _one_line_error(err, "not the data the checkpoint at step 3 was trained on")


def test_a_locked_save_dir_is_refused(tmp_path, data):
    build = compiled(tmp_path)
    save = tmp_path / "run"
    save.mkdir()
    with build_lock(save):
        _, err = run(build, data, "--steps", 2, "--save-dir", save, expect=2)
    _one_line_error(err, f"{save} is locked by pid {os.getpid()}")


def _start(build: Path, data: Path, save: Path, *args) -> subprocess.Popen:
    return subprocess.Popen(CNNC + ["run", str(build), "--backend", "reference", "--data", str(data), "-q",
                                    "--save-dir", str(save), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(proc: subprocess.Popen, ready) -> None:
    deadline = time.monotonic() + 120
    while not ready():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)


@pytest.mark.parametrize("sig, status, message", [(signal.SIGINT, 130, "interrupted"),
                                                  (signal.SIGTERM, 143, "terminated")])
def test_signal_writes_a_checkpoint_and_resume_finishes_the_run(tmp_path, data, sig, status, message):
    build = compiled(tmp_path)
    run(build, data, "--epochs", 40, "--save-dir", tmp_path / "whole")
    proc = _start(build, data, tmp_path / "cut", "--epochs", 40, "--save-freq", 1000)
    _wait_for(proc, lambda: (tmp_path / "cut" / "metrics.jsonl").exists())      # an epoch is done
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert (proc.returncode, err.strip()) == (status, message)
    step = latest_checkpoint(tmp_path / "cut").step
    assert 0 < step < 40 * STEPS_PER_EPOCH
    assert not (tmp_path / "cut" / ".cnnc-lock").exists()
    run(build, data, "--resume", tmp_path / "cut")             # the goal (40 epochs) comes from the checkpoint
    assert_bitwise(weights(tmp_path / "whole"), weights(tmp_path / "cut"))


def test_kill_during_save_leaves_the_previous_checkpoint(tmp_path, data):
    """kill -9 at several moments, among them while a checkpoint is being written: the newest
    checkpoint left is always whole, and the run resumes from it."""
    build = compiled(tmp_path)
    save = tmp_path / "run"
    moments = [lambda: len(checkpoints(save)) >= 1,
               lambda: any(f.name.startswith(".checkpoint-") for f in save.iterdir()) if save.is_dir() else False,
               lambda: len(checkpoints(save)) >= 2,
               lambda: any(f.name.startswith(".checkpoint-") for f in save.iterdir()) if save.is_dir() else False]
    for ready in moments:
        proc = _start(build, data, save, "--epochs", 1000, "--save-freq", 1, "--keep", 2,
                      *(["--resume", save] if checkpoints(save) else []))
        _wait_for(proc, ready)
        proc.kill()
        proc.wait()
        ck = latest_checkpoint(save)             # verified: whole, and its checksum matches
        assert ck.step >= 1
    out, _ = run(build, data, "--resume", save, "--steps", ck.step + 2)
    assert latest_checkpoint(save).step == ck.step + 2




@pytest.mark.parametrize("backend", ["reference", "opencl"])
def test_divergence_after_a_mid_epoch_resume_is_located(tmp_path, backend):
    """The growing network of test_numerical_health (its loss overflows in step 99 whatever
    the data order), here with 4 steps an epoch, resumed at step 97 (inside epoch 25): the
    replay that names the first non-finite value starts where the resumed run began."""
    x, y = np.ones((32, 1, 8, 8), np.float32), np.zeros(32, np.int32)
    data = tmp_path / "ones.npz"
    np.savez(data, train_x=x, train_y=y, test_x=x[:8], test_y=y[:8])
    build = compiled(tmp_path, GROWING)
    save = tmp_path / "run"
    run(build, data, "--steps", 97, "--save-dir", save, backend=backend)
    _, err = run(build, data, "--resume", save, "--epochs", 1000, backend=backend, expect=3)
    assert err == ("error: training diverged at step 99 (epoch 25): the loss is inf; first non-finite value: "
                   f"layer 'cost' (forward, loss); {save / 'weights.npz'} holds epoch 24\n")
    assert latest_checkpoint(save).step == 97            # nothing non-finite was checkpointed


def test_a_checkpoint_holds_the_data_mean_and_class_names(tmp_path, tiny_source):
    build = compiled(tmp_path, tiny_source)
    cnnc("run", build, "--backend", "reference", "-q", "--steps", 2, "--save-dir", tmp_path / "run")
    ck = latest_checkpoint(tmp_path / "run")
    from cnnc.train.data import load_digits
    digits = load_digits()
    assert ck.data["class_names"] == list(digits.class_names)
    assert np.array_equal(ck.mean, digits.mean)
    assert (ck.step, ck.epoch, ck.position, ck.seed) == (2, 1, 2, 1)
    assert np.array_equal(ck.order, np.random.default_rng([1, 1]).permutation(digits.n_train))
