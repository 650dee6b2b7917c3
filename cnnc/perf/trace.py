"""Chrome trace-event JSON (Perfetto, chrome://tracing) of a simulated step or of measured steps
of a real run: one process per logical device, one thread per stream, one complete ("X") event
per op, times in microseconds."""
from __future__ import annotations

import time

from cnnc.perf.simulate import STREAMS, Simulation, Span, op_label


def _tid(stream: str) -> int:
    return STREAMS.index(stream) if stream in STREAMS else len(STREAMS)


def to_trace(sim: Simulation, label: str = "cnnc simulate") -> dict:
    events = []
    for dev in sorted({s.device for s in sim.spans}):
        events.append({"name": "process_name", "ph": "M", "pid": dev, "tid": 0,
                       "args": {"name": f"device {dev} ({label})"}})
        threads = {_tid(s.stream): s.stream if s.stream in STREAMS else "messages to other ranks"
                   for s in sim.spans if s.device == dev}
        for tid, name in sorted(threads.items()):
            events.append({"name": "thread_name", "ph": "M", "pid": dev, "tid": tid, "args": {"name": name}})
    critical = set(sim.critical_path)
    for i, s in enumerate(sim.spans):
        events.append({"name": s.name, "cat": s.category, "ph": "X", "ts": s.start * 1e6,
                       "dur": (s.end - s.start) * 1e6, "pid": s.device, "tid": _tid(s.stream),
                       "args": {"phase": s.phase, "op": s.index, "critical": i in critical}})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def ranks_trace(spans: list[list[Span]], label: str = "measured") -> dict:
    """One trace of a run under MPI: one process per rank (`pid` the rank), one thread per
    (logical device, stream) of that rank.  Each rank's clock starts with its own first
    recorded step; the ranks start a step within a message's time of each other."""
    events = []
    for rank, mine in enumerate(spans):
        events.append({"name": "process_name", "ph": "M", "pid": rank, "tid": 0,
                       "args": {"name": f"rank {rank} ({label})"}})
        threads = {(s.device, s.stream) for s in mine}
        tid = {q: i for i, q in enumerate(sorted(threads, key=lambda q: (q[0], _tid(q[1]))))}
        for (device, stream), t in tid.items():
            events.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": t,
                           "args": {"name": f"device {device} {stream}"}})
        for s in mine:
            events.append({"name": s.name, "cat": s.category, "ph": "X", "ts": s.start * 1e6,
                           "dur": (s.end - s.start) * 1e6, "pid": rank, "tid": tid[(s.device, s.stream)],
                           "args": {"phase": s.phase, "op": s.index, "device": s.device}})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


TRACE_WARMUP = 2                          # steps run untimed first: they compile kernels
TRACE_STEPS = 3                           # steps `cnnc run --trace` records


class StepRecorder:
    """Times every op of `steps` training steps of a real run, after `warmup` steps, as spans
    on one clock that starts with the first recorded step.

    The executor synchronises the backend around each timed op, so the measured ops run one after
    another: a trace shows each op's own time, not the overlap of streams a free run has."""

    def __init__(self, plan, steps: int = TRACE_STEPS, warmup: int = TRACE_WARMUP, program: str = "train"):
        self.steps, self.warmup = steps, warmup
        self.position = {id(op): i for ops in plan.programs[program].values() for i, op in enumerate(ops)}
        self.spans: list[Span] = []
        self.origin: float | None = None
        self.started = 0                  # steps of this run so far, recorded or not

    def next_step(self):
        """The executor's per-op timer for the run's next step, or None when that step is not
        recorded (warm-up, or past the recorded ones)."""
        step, self.started = self.started, self.started + 1
        if not self.warmup <= step < self.warmup + self.steps:
            return None
        if self.origin is None:
            self.origin = time.perf_counter()

        def timer(device: int, op, seconds: float) -> None:
            if op.kind in ("record", "wait"):
                return
            end = time.perf_counter() - self.origin
            name, category = op_label(op)
            self.spans.append(Span(device, op.stream, self.position[id(op)], name, category,
                                   end - seconds, end, phase=op.phase))
        return timer

    def trace(self, label: str = "measured") -> dict:
        end = max((s.end for s in self.spans), default=0.0)
        return to_trace(Simulation(self.spans, end), label)
