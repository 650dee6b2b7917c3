"""The helpers that keep other tests honest: seeds, checked rewrites, golden update mode."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import check_golden, replace_once, rewrite, stable_seed

HERE = Path(__file__).parent


@pytest.mark.parametrize("hash_seed", ["1", "2"])
def test_stable_seed_is_the_same_in_every_process(hash_seed):
    code = "from helpers import stable_seed; print(stable_seed('conv', (1, 2), 'reference'))"
    env = dict(os.environ, PYTHONHASHSEED=hash_seed, PYTHONPATH=str(HERE))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(out.stdout) == stable_seed("conv", (1, 2), "reference")


def test_rewrite_fails_when_an_anchor_is_missing_or_repeated():
    assert replace_once("a = conv(x) relu", "relu", "tanh") == "a = conv(x) tanh"
    with pytest.raises(AssertionError, match="'tanh' occurs 0 times"):
        replace_once("a = conv(x) relu", "tanh", "relu")
    with pytest.raises(AssertionError, match="'x' occurs 2 times, expected once"):
        replace_once("x + x", "x", "y")
    assert rewrite("x + x", {"x": "y"}, once=False) == "y + y"
    with pytest.raises(AssertionError, match="'z' occurs 0 times, expected at least once"):
        rewrite("x + x", {"x": "y", "z": "w"}, once=False)


def test_golden_update_mode_writes_and_skips(tmp_path, monkeypatch):
    golden = tmp_path / "out.golden"
    golden.write_text("old")
    with pytest.raises(AssertionError):
        check_golden("new", golden)
    monkeypatch.setenv("CNNC_UPDATE_GOLDEN", "1")
    with pytest.raises(pytest.skip.Exception, match="updated golden file .*out.golden"):
        check_golden("new", golden)
    assert golden.read_text() == "new"
