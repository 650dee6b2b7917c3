"""Chrome trace-event JSON (Perfetto, chrome://tracing) of a simulated step: one process per
logical device, one thread per stream, one complete ("X") event per op, times in microseconds."""
from __future__ import annotations

from cnnc.perf.simulate import STREAMS, Simulation


def _tid(stream: str) -> int:
    return STREAMS.index(stream) if stream in STREAMS else len(STREAMS)


def to_trace(sim: Simulation, label: str = "cnnc simulate") -> dict:
    events = []
    for dev in sorted({s.device for s in sim.spans}):
        events.append({"name": "process_name", "ph": "M", "pid": dev, "tid": 0,
                       "args": {"name": f"device {dev} ({label})"}})
        for stream in sorted({s.stream for s in sim.spans if s.device == dev}, key=_tid):
            events.append({"name": "thread_name", "ph": "M", "pid": dev, "tid": _tid(stream),
                           "args": {"name": stream}})
    critical = set(sim.critical_path)
    for i, s in enumerate(sim.spans):
        events.append({"name": s.name, "cat": s.category, "ph": "X", "ts": s.start * 1e6,
                       "dur": (s.end - s.start) * 1e6, "pid": s.device, "tid": _tid(s.stream),
                       "args": {"phase": s.phase, "op": s.index, "critical": i in critical}})
    return {"traceEvents": events, "displayTimeUnit": "ms"}
