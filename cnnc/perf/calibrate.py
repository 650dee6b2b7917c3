"""`cnnc calibrate`: measure this machine's OpenCL device (the `cpu` machine model) with four
short microbenchmarks, and keep the result in the user's cache directory, one file per device.

Peak FLOP/s comes from a kernel of independent vector multiply-adds, bandwidth from a copy of a
buffer far larger than the caches, launch overhead from empty kernels, each waited for.  A
kernel that reads a neighbourhood of channels through NCHW index arithmetic, as pooling and
normalisation kernels do, gives the bandwidth such kernels reach (counting each buffer once,
as the roofline does): its ratio to the copy's is the model's memory efficiency.  Each figure
is the best of a few repetitions, after a warm-up, so that the whole run stays within seconds.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Callable

from cnnc.perf import PerfError
from cnnc.perf.machine import Machine, catalogue, load_machine

_FMA_STEPS = 4096
_FMA_SOURCE = """
__kernel void fma_peak(__global float* out, const float a, const float b) {
    float8 x0 = (float8)(get_global_id(0)), x1 = x0 + 1.0f, x2 = x0 + 2.0f, x3 = x0 + 3.0f;
    float8 x4 = x0 + 4.0f, x5 = x0 + 5.0f, x6 = x0 + 6.0f, x7 = x0 + 7.0f;
    for (int i = 0; i < %d; ++i) {
        x0 = fma(x0, a, b); x1 = fma(x1, a, b); x2 = fma(x2, a, b); x3 = fma(x3, a, b);
        x4 = fma(x4, a, b); x5 = fma(x5, a, b); x6 = fma(x6, a, b); x7 = fma(x7, a, b);
    }
    float8 s = x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7;
    out[get_global_id(0)] = s.s0 + s.s1 + s.s2 + s.s3 + s.s4 + s.s5 + s.s6 + s.s7;
}
__kernel void copy(__global const float4* restrict src, __global float4* restrict dst) {
    dst[get_global_id(0)] = src[get_global_id(0)];
}
__kernel void empty(__global float* out) { }
__kernel void indexed(__global const float* restrict src, __global float* restrict dst, const int c, const int hw) {
    const int i = get_global_id(0), n = i / (c * hw), ch = i / hw %% c, p = i %% hw;
    float s = 0.0f;
    for (int k = -1; k <= 1; ++k)
        s += src[(n * c + clamp(ch + k, 0, c - 1)) * hw + p];
    dst[i] = s;
}
""" % _FMA_STEPS
_FLOPS_PER_ITEM = _FMA_STEPS * 8 * 8 * 2          # steps x accumulators x lanes x (multiply + add)
_COPY_BYTES = 128 * 2**20


class CalibrationError(PerfError):
    """No OpenCL device to calibrate, or one that cannot run the microbenchmarks."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cnnc"


def device_key(description: str, compute_units: int) -> str:
    """The cache file's key: this host, the device's name and its compute units."""
    text = f"{platform.node()}|{description}|{compute_units}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _device():
    from cnnc.backends.base import BackendError
    from cnnc.backends.opencl import _pick_device

    try:
        return _pick_device()
    except BackendError as e:
        raise CalibrationError(str(e)) from None


def _describe(device) -> tuple[str, int]:
    return f"{device.name.strip()} ({device.platform.name.strip()})", device.max_compute_units


def cache_path(description: str, compute_units: int) -> Path:
    return cache_dir() / f"calibration-{device_key(description, compute_units)}.json"


def _best(run: Callable[[], None], repeats: int) -> float:
    run()                                             # warm-up: the first launch compiles
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(device=None) -> dict:
    """Run the microbenchmarks on the OpenCL device cnnc runs on (a few seconds)."""
    import numpy as np
    import pyopencl as cl

    device = device or _device()
    description, units = _describe(device)
    ctx = cl.Context([device])
    queue = cl.CommandQueue(ctx)
    try:
        prog = cl.Program(ctx, _FMA_SOURCE).build()
    except cl.Error as e:
        raise CalibrationError(f"{description} cannot build the calibration kernels: {e}") from None
    items = units * 1024
    out = cl.Buffer(ctx, cl.mem_flags.WRITE_ONLY, 4 * items)
    fma = prog.fma_peak

    def run_fma():
        fma(queue, (items,), None, out, np.float32(0.999), np.float32(0.001))
        queue.finish()

    n4 = _COPY_BYTES // 16
    src = cl.Buffer(ctx, cl.mem_flags.READ_ONLY, _COPY_BYTES)
    dst = cl.Buffer(ctx, cl.mem_flags.WRITE_ONLY, _COPY_BYTES)
    cl.enqueue_fill_buffer(queue, src, np.float32(1), 0, _COPY_BYTES)
    copy = prog.copy

    def run_copy():
        copy(queue, (n4,), None, src, dst)
        queue.finish()

    indexed, channels, pixels = prog.indexed, 64, 32 * 32

    def run_indexed():
        indexed(queue, (n4 * 4,), None, src, dst, np.int32(channels), np.int32(pixels))
        queue.finish()

    empty, launches = prog.empty, 200

    def run_empty():                # each waited for, as an op the next one depends on is
        for _ in range(launches):
            empty(queue, (1,), None, out)
            queue.finish()

    return {"device": description, "compute_units": units,
            "peak_gflops": items * _FLOPS_PER_ITEM / _best(run_fma, 3) / 1e9,
            "bandwidth_gbs": 2 * _COPY_BYTES / _best(run_copy, 5) / 1e9,
            "indexed_bandwidth_gbs": 2 * _COPY_BYTES / _best(run_indexed, 3) / 1e9,
            "launch_overhead_us": _best(run_empty, 3) / launches * 1e6,
            "cache_mib": device.global_mem_cache_size / 2**20,
            "calibrated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def save(calibration: dict) -> Path:
    path = cache_path(calibration["device"], calibration["compute_units"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(calibration, indent=1))
    os.replace(tmp, path)
    return path


def cached(device=None) -> dict | None:
    """The cached calibration of the OpenCL device cnnc runs on, if there is a usable one."""
    description, units = _describe(device or _device())
    try:
        data = json.loads(cache_path(description, units).read_text())
    except (OSError, ValueError):
        return None
    needed = ("device", "compute_units", "peak_gflops", "bandwidth_gbs", "launch_overhead_us")
    ok = isinstance(data, dict) and all(isinstance(data.get(k), (int, float, str)) for k in needed)
    return data if ok else None


def machine(name: str, machine_file: Path | None = None, on_calibrate: Callable[[], None] | None = None) -> Machine:
    """The named machine model; `cpu` (unless a machine file defines it) from the cached
    calibration, calibrating first when there is none."""
    calibration = None
    if name == "cpu" and "cpu" not in catalogue(machine_file)["machines"]:
        calibration = cached()
        if calibration is None:
            if on_calibrate:
                on_calibrate()
            calibration = measure()
            save(calibration)
    return load_machine(name, machine_file, calibration)
