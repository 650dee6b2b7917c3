"""The parallel examples: their plans have the intended structure, and small versions of each
(tests/nets, same layers and placement) train like their single-device form (within 1e-5,
replicas bit for bit)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from cnnc.build import compile_file, compile_network
from cnnc.executor import Executor
from cnnc.plan.summary import summarize

from helpers import replace_once, stable_seed
from test_parallel import backend_for

ROOT = Path(__file__).parent.parent
NETS = Path(__file__).parent / "nets"
SMALL = sorted(NETS.glob("*-small.cnn"))


def single_device(text: str) -> str:
    """The same network with every placement and every parallelism setting removed."""
    text = re.sub(r"@gpu\([^)]*\)\s*", "", text)
    return re.sub(r";?\s*(microbatches|pipeline|exchange)\s*=\s*\w+", "", text)


def train(text: str, backend: str, steps: int, tmp: Path):
    out = tmp / f"b{stable_seed(text, backend)}"
    plan = compile_network(text, "net.cnn", out, use_nvcc=False).plan
    n = max(plan.devices) + 1
    ex = Executor(plan, backend_for(backend, plan, out, [0] * n if backend == "opencl" else range(n)))
    rng = np.random.default_rng(7)
    losses = []
    for i in range(steps):
        x = rng.standard_normal((plan.batch, *plan.image_shape)).astype(np.float32)
        y = rng.integers(0, plan.classes, plan.batch).astype(np.int32)
        losses.append(ex.train_step(x, y, i / steps)[0])
    return np.concatenate(losses), ex.parameters(), ex.replica_parameters()


def assert_same(a, b):
    np.testing.assert_allclose(b[0], a[0], rtol=1e-5, atol=1e-6)
    for name, value in a[1].items():
        scale = float(np.abs(value).max()) or 1.0
        np.testing.assert_allclose(b[1][name], value, rtol=1e-5, atol=1e-6 * scale, err_msg=name)
    for name, replicas in b[2].items():
        for r in replicas[1:]:
            assert (r == replicas[0]).all(), name


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("net", SMALL, ids=lambda p: p.stem)
def test_small_example_equals_single_device_on_reference(net, steps, tmp_path):
    text = net.read_text()
    assert_same(train(single_device(text), "reference", steps, tmp_path), train(text, "reference", steps, tmp_path))


@pytest.mark.parametrize("net", SMALL + ["all_gather", "scatter"], ids=lambda n: getattr(n, "stem", n))
def test_small_example_is_race_free_and_unchanged_in_random_stream_order(net, tmp_path):
    """Each stream its own queue, run in a random order the events permit, every access checked
    (backend "race"): the same bits as the in-order run.  Strings: the hybrid example's other
    exchange schemes."""
    text = other_scheme(net) if isinstance(net, str) else net.read_text()
    a, b = train(text, "reference", 2, tmp_path), train(text, "race", 2, tmp_path)
    assert a[0].tobytes() == b[0].tobytes()
    assert all(a[1][k].tobytes() == v.tobytes() for k, v in b[1].items())


def other_scheme(scheme: str) -> str:
    return replace_once((NETS / "alexnet-4gpu-hybrid-small.cnn").read_text(), "seed = 3 }",
                        f"seed = 3; exchange = {scheme} }}")


@pytest.mark.parametrize("scheme", ["all_gather", "scatter"])
def test_small_hybrid_other_exchange_schemes(scheme, tmp_path):
    text = other_scheme(scheme)
    assert_same(train(single_device(text), "reference", 2, tmp_path), train(text, "reference", 2, tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("net", SMALL, ids=lambda p: p.stem)
def test_small_example_equals_single_device_on_opencl(net, tmp_path):
    text = net.read_text()
    assert_same(train(single_device(text), "reference", 2, tmp_path), train(text, "opencl", 2, tmp_path))


def layers_of(example: str, tmp: Path) -> tuple[dict, dict]:
    s = summarize(compile_file(ROOT / "examples" / example, tmp, use_nvcc=False).plan)
    return {l["name"]: l for l in s["layers"]}, {(t["from"], t["to"]): t for t in s["transfers"]}


def test_alexnet_2gpu_data_plan(tmp_path):
    layers, transfers = layers_of("alexnet-2gpu-data.cnn", tmp_path)
    assert all(l["devices"] == [0, 1] and l["passes"] == 1 for l in layers.values())
    assert transfers[(1, 0)]["activation_bytes"] == 0 and transfers[(1, 0)]["collective_bytes"] > 0


def test_alexnet_2gpu_model_plan(tmp_path):
    layers, transfers = layers_of("alexnet-2gpu-model.cnn", tmp_path)
    assert layers["conv1a"]["devices"] == [0] and layers["conv1b"]["devices"] == [1]
    assert layers["conv3b"]["devices"] == [1] and layers["fc8"]["devices"] == [0]
    assert transfers[(0, 1)]["activation_bytes"] > 0 and transfers[(1, 0)]["activation_bytes"] > 0
    assert transfers[(0, 1)]["collective_bytes"] == 0          # no replicated weights


def test_alexnet_4gpu_hybrid_plan(tmp_path):
    layers, transfers = layers_of("alexnet-4gpu-hybrid.cnn", tmp_path)
    assert layers["conv1"]["devices"] == [0, 1, 2, 3] and layers["conv1"]["passes"] == 1
    for fc in ("fc6a", "fc6b", "fc6c", "fc6d", "fc7a", "fc8"):
        assert layers[fc]["passes"] == 4 and layers[fc]["update_period"] == 1, fc
    assert layers["fc6c"]["devices"] == [2]
    assert all(transfers[(a, b)]["activation_bytes"] > 0 for a in range(4) for b in range(4) if a != b)


def test_pipeline_4stage_plan(tmp_path):
    plan = compile_file(ROOT / "examples" / "pipeline-4stage.cnn", tmp_path, use_nvcc=False).plan
    assert plan.shares == 8 and sorted(plan.devices) == [0, 1, 2, 3]
    layers = {l.layer: l for l in plan.layers}
    assert layers["conv1"].devices == (0,) and layers["fc6"].devices == (3,) and layers["fc6"].passes == 8
