"""Memory planning: buffers that are never live at the same time share storage.

A buffer's lifetime is the span of its device's program between the first and
the last op that touches it, in the training and in the test program.  Two
buffers of one device may share one allocation when their lifetimes are
disjoint in both programs.  Parameters, their gradients and momentum, cost
outputs (read by the host after a program) and buffers that another device
or a copy stream touches keep storage of their own.
"""
from __future__ import annotations

from collections import defaultdict

from cnnc.plan.schedule import Buffer, Op, Plan

REUSABLE = {"activation", "gradient", "mirror", "staging", "scratch", "input", "labels"}


def _touches(op: Op) -> tuple[str, ...]:
    if op.kind == "launch":
        return op.args
    if op.kind == "copy":
        return (op.src, op.dst)
    if op.kind == "upload":
        return (op.dst,)
    return ()


def lifetimes(plan: Plan, program: str) -> tuple[dict[str, tuple[int, int]], set[str]]:
    """(first, last) position of each buffer in its own device's program, and the buffers
    that another device's program or a copy stream touches (those cannot be reused safely:
    their ops may run alongside the compute stream's)."""
    spans: dict[str, tuple[int, int]] = {}
    foreign: set[str] = set()
    for dev, ops in plan.programs[program].items():
        for i, op in enumerate(ops):
            for b in _touches(op):
                if plan.buffers[b].device != dev or op.stream != "compute":
                    foreign.add(b)          # read by another device, or by a stream running alongside
                    continue
                first, _ = spans.get(b, (i, i))
                spans[b] = (first, i)
    return spans, foreign


def _overlap(a: tuple[int, int] | None, b: tuple[int, int] | None) -> bool:
    return a is not None and b is not None and a[0] <= b[1] and b[0] <= a[1]


def assign_storage(plan: Plan) -> dict[str, str]:
    """Buffer id -> storage id (itself when it keeps its own allocation); also stored in plan.buffers."""
    train, foreign_train = lifetimes(plan, "train")
    test, foreign_test = lifetimes(plan, "test")
    foreign = foreign_train | foreign_test
    storage = {b: b for b in plan.buffers}
    candidates = defaultdict(list)
    for b in plan.buffers.values():
        if b.role in REUSABLE and b.id not in foreign and (b.id in train or b.id in test):
            candidates[(b.device, b.dtype)].append(b)
    for group in candidates.values():
        group.sort(key=lambda b: (train.get(b.id, test.get(b.id, (0, 0)))[0], -b.size))
        pools: list[tuple[str, list[Buffer]]] = []
        for b in group:
            fits = [(name, members) for name, members in pools
                    if not any(_overlap(train.get(b.id), train.get(m.id)) or _overlap(test.get(b.id), test.get(m.id))
                               for m in members)]
            if fits:
                # best fit: the pool whose largest member is closest to this size, growing it least
                name, members = min(fits, key=lambda f: (max(0, b.size - max(m.size for m in f[1])),
                                                         abs(max(m.size for m in f[1]) - b.size)))
                members.append(b)
                storage[b.id] = name
            else:
                pools.append((b.id, [b]))
    for b in plan.buffers.values():
        plan.buffers[b.id] = Buffer(b.id, b.device, b.size, b.dtype, b.role, b.layer, storage[b.id])
    return storage


def storage_bytes(plan: Plan) -> dict[int, int]:
    """Bytes each device allocates once buffers share storage."""
    size: dict[str, int] = defaultdict(int)
    device: dict[str, int] = {}
    for b in plan.buffers.values():
        size[b.storage] = max(size[b.storage], b.nbytes)
        device[b.storage] = b.device
    out: dict[int, int] = defaultdict(int)
    for s, n in size.items():
        out[device[s]] += n
    return dict(out)
