"""Memory planning: buffers that are never live at the same time share storage.

A buffer's lifetime is the span of its device's program between the first and
the last op that touches it, in the training and in the test program.  Two
buffers of one device may share one allocation when their lifetimes are
disjoint in both programs.  Parameters, their gradients and momentum, cost
outputs (read by the host after a program) and buffers that another device
or a copy stream touches keep storage of their own.
"""
from __future__ import annotations

import bisect
import heapq
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


class _Pool:
    """One shared allocation being filled: the largest member's size, the last train
    position any member uses, and the members' test lifetimes (disjoint, by start)."""

    def __init__(self, index: int, first: Buffer, train: tuple[int, int] | None, test: tuple[int, int] | None):
        self.index = index
        self.name = first.id
        self.size = first.size
        self.train_end = train[1] if train is not None else -1
        self.test_starts: list[int] = []
        self.test_ends: list[int] = []
        self.add_test(test)

    def add_test(self, span: tuple[int, int] | None) -> None:
        if span is not None:
            k = bisect.bisect_left(self.test_starts, span[0])
            self.test_starts.insert(k, span[0])
            self.test_ends.insert(k, span[1])

    def test_overlaps(self, span: tuple[int, int] | None) -> bool:
        """Whether a member's test lifetime meets span: only the latest one starting by its end can."""
        if span is None:
            return False
        k = bisect.bisect_right(self.test_starts, span[1]) - 1
        return k >= 0 and self.test_ends[k] >= span[0]


class _BySize:
    """Pools ordered by (largest member size, creation): the best fit is found by bisection."""

    def __init__(self):
        self.keys: list[tuple[int, int]] = []
        self.indices: set[int] = set()

    def __contains__(self, pool: _Pool) -> bool:
        return pool.index in self.indices

    def add(self, pool: _Pool) -> None:
        bisect.insort(self.keys, (pool.size, pool.index))
        self.indices.add(pool.index)

    def remove(self, pool: _Pool) -> None:
        del self.keys[bisect.bisect_left(self.keys, (pool.size, pool.index))]
        self.indices.discard(pool.index)

    def best_first(self, size: int):
        """Pool indices in best-fit order: the smallest pools that hold size without growing,
        then the largest of the smaller ones; equal sizes in creation order."""
        keys = self.keys
        split = bisect.bisect_left(keys, (size, -1))
        for k in range(split, len(keys)):
            yield keys[k][1]
        top = split - 1
        while top >= 0:
            low = bisect.bisect_left(keys, (keys[top][0], -1))
            for k in range(low, top + 1):
                yield keys[k][1]
            top = low - 1


def _share(group: list[Buffer], train: dict, test: dict, storage: dict[str, str]) -> None:
    """Give each buffer of one device and dtype the best-fitting pool whose members' lifetimes
    it meets in neither program, or a pool of its own.

    Buffers come in order of first use (in training, else in test), so the buffers used in
    training arrive in order of their start there: a pool is free in training exactly when
    the last train position of its members is before the buffer's start.  Pools are indexed
    by size, and those free in training are tracked as the start moves on, so each buffer
    looks at the candidates that fit best first, not at every pool.
    """
    pools: list[_Pool] = []
    every, free = _BySize(), _BySize()      # all pools; those free in training at the current start
    busy: list[tuple[int, int]] = []         # heap of (train end, pool index) for the pools not free
    for b in group:
        span_train, span_test = train.get(b.id), test.get(b.id)
        if span_train is not None:
            while busy and busy[0][0] < span_train[0]:
                free.add(pools[heapq.heappop(busy)[1]])
        candidates = free if span_train is not None else every
        chosen = next((pools[i] for i in candidates.best_first(b.size)
                       if not pools[i].test_overlaps(span_test)), None)
        if chosen is None:
            chosen = _Pool(len(pools), b, span_train, span_test)
            pools.append(chosen)
            every.add(chosen)
            if span_train is None:
                free.add(chosen)
            else:
                heapq.heappush(busy, (chosen.train_end, chosen.index))
            continue
        storage[b.id] = chosen.name
        if b.size > chosen.size:            # re-index the pool under its new size
            was_free = chosen in free
            every.remove(chosen)
            if was_free:
                free.remove(chosen)
            chosen.size = b.size
            every.add(chosen)
            if was_free:
                free.add(chosen)
        chosen.add_test(span_test)
        if span_train is not None:
            free.remove(chosen)
            chosen.train_end = span_train[1]
            heapq.heappush(busy, (chosen.train_end, chosen.index))


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
        _share(group, train, test, storage)
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
