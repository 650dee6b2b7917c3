"""scripts/replay.py compares generated files of two compiler versions; its comparison is tested
here on two builds of one network, one of them edited."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from cnnc.build import compile_file

ROOT = Path(__file__).resolve().parent.parent


def _replay():
    spec = importlib.util.spec_from_file_location("replay", ROOT / "scripts" / "replay.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_replay_reports_exactly_the_edited_file(tmp_path: Path, tiny_cnn: Path):
    replay = _replay()
    for side in ("base", "now"):
        compile_file(tiny_cnn, tmp_path / side / tiny_cnn.stem, use_nvcc=False)
    assert replay.differences(tmp_path / "base", tmp_path / "now", [tiny_cnn]) == []
    cl = tmp_path / "now" / tiny_cnn.stem / "gpu0.cl"
    cl.write_text(cl.read_text().replace("__kernel", "__kernel /* edited */", 1))
    (diff,) = replay.differences(tmp_path / "base", tmp_path / "now", [tiny_cnn])
    assert diff.startswith("--- base/tiny/gpu0.cl\n+++ now/tiny/gpu0.cl\n")
    assert "+__kernel /* edited */" in diff


def test_every_example_and_test_network_is_replayed():
    names = {p.name for p in _replay().networks()}
    assert {"alexnet.cnn", "vgg16.cnn", "pipeline-4stage-small.cnn"} <= names
