"""Memory planning: buffers share storage only when their lifetimes are disjoint."""
from __future__ import annotations

from pathlib import Path

import pytest

from cnnc.build import compile_file, compile_network
from cnnc.plan.memory import lifetimes, storage_bytes

ROOT = Path(__file__).parent.parent
DEEP = """
network deep
input data: 1x12x12
input labels: label(5)
train { batch = 4 }
c1 = conv(data, filters=8, size=3, padding=1) relu
c2 = conv(c1, filters=8, size=3, padding=1) relu
c3 = conv(c2, filters=8, size=3, padding=1) relu
p3 = avgpool(c3, size=2)
f4 = fc(p3, outputs=5)
probs = softmax(f4)
cost = logreg(labels, probs)
"""


def check_disjoint(plan):
    spans = {name: lifetimes(plan, name)[0] for name in ("train", "test")}
    by_storage = {}
    for b in plan.buffers.values():
        by_storage.setdefault(b.storage, []).append(b)
    for members in by_storage.values():
        assert len({m.device for m in members}) == 1 and len({m.dtype for m in members}) == 1
        for i, a in enumerate(members):
            for b in members[i + 1:]:
                for program in spans.values():
                    sa, sb = program.get(a.id), program.get(b.id)
                    assert not (sa and sb and sa[0] <= sb[1] and sb[0] <= sa[1]), (a.id, b.id)


def test_gradients_of_early_layers_reuse_storage(tmp_path):
    plan = compile_network(DEEP, "deep.cnn", tmp_path, use_nvcc=False).plan
    check_disjoint(plan)
    shared = [b for b in plan.buffers.values() if b.storage != b.id]
    assert shared, "nothing was reused"
    total = sum(b.nbytes for b in plan.buffers.values())
    assert storage_bytes(plan)[0] < total
    for b in plan.buffers.values():      # parameters and what the host reads keep their own storage
        if b.role in ("weights", "biases", "momentum", "weight_grad", "cost"):
            assert b.storage == b.id


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.cnn")), ids=lambda p: p.stem)
def test_examples_lifetimes_disjoint(example, tmp_path):
    check_disjoint(compile_file(example, tmp_path, use_nvcc=False).plan)
