"""Memory planning: buffers share storage only when their lifetimes are disjoint."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cnnc.build import compile_file, compile_network
from cnnc.plan.memory import storage_bytes

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


def buffers_named(op, buffers) -> set[str]:
    """Every buffer an op names in any of its fields, whatever its kind: written here from the
    op's fields, not from the planner's own notion of which ops touch memory."""
    named = set()
    for f in dataclasses.fields(op):
        value = getattr(op, f.name)
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, str) and item in buffers:
                named.add(item)
    return named


def live_spans(plan, program: str):
    """{buffer: (first, last)} op index in its own device's program where that device's compute
    stream touches it, and the buffers that any other device or stream touches (those run
    alongside the compute stream, so program order says nothing about when they are live)."""
    spans: dict[str, tuple[int, int]] = {}
    concurrent: set[str] = set()
    for device, ops in plan.programs[program].items():
        for index, op in enumerate(ops):
            for name in buffers_named(op, plan.buffers):
                if plan.buffers[name].device != device or op.stream != "compute":
                    concurrent.add(name)
                else:
                    spans[name] = (spans.get(name, (index, index))[0], index)
    return spans, concurrent


def check_disjoint(plan) -> int:
    """Assert that buffers sharing storage are on one device, of one dtype, touched only by
    their device's compute stream, and never live at once in any program; return how many
    pairs share storage, so callers can tell a vacuous pass."""
    programs = {name: live_spans(plan, name) for name in plan.programs}
    by_storage = {}
    for b in plan.buffers.values():
        by_storage.setdefault(b.storage, []).append(b)
    pairs = 0
    for members in by_storage.values():
        if len(members) == 1:
            continue
        assert len({m.device for m in members}) == 1 and len({m.dtype for m in members}) == 1
        for spans, concurrent in programs.values():
            assert not concurrent & {m.id for m in members}, f"shared storage touched by a concurrent op: {members}"
        for i, a in enumerate(members):
            for b in members[i + 1:]:
                pairs += 1
                for spans, _ in programs.values():
                    sa, sb = spans.get(a.id), spans.get(b.id)
                    assert not (sa and sb and sa[0] <= sb[1] and sb[0] <= sa[1]), (a.id, sa, b.id, sb)
    return pairs


def test_gradients_of_early_layers_reuse_storage(tmp_path):
    plan = compile_network(DEEP, "deep.cnn", tmp_path, use_nvcc=False).plan
    assert check_disjoint(plan) > 0
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


def test_overlapping_lifetimes_in_one_storage_are_caught(tmp_path):
    """The check itself fails when two buffers live at the same time share storage."""
    plan = compile_network(DEEP, "deep.cnn", tmp_path, use_nvcc=False).plan
    spans, _ = live_spans(plan, "train")
    c1, c2 = (next(b for b in plan.buffers.values() if b.layer == layer and b.role == "activation")
              for layer in ("c1", "c2"))
    assert spans[c1.id][0] <= spans[c2.id][1] and spans[c2.id][0] <= spans[c1.id][1]   # c2 reads c1
    buffers = dict(plan.buffers)
    buffers[c2.id] = dataclasses.replace(c2, storage=c1.storage)
    with pytest.raises(AssertionError):
        check_disjoint(dataclasses.replace(plan, buffers=buffers))
