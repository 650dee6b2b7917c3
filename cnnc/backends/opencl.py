"""The OpenCL backend (pyopencl): runs the generated .cl on any OpenCL device.

With pip's PoCL (pocl-binary-distribution) every machine has one, the CPU,
which is how the generated kernels are executed and tested without a GPU.
Each stream (compute, copy-in) of each logical device has its own in-order
queue, and the plan's events, as markers and barriers, order the queues where
one needs another's results; several logical devices may share one OpenCL
device.
"""
from __future__ import annotations

import os
import warnings
from functools import lru_cache
from typing import Sequence

import numpy as np

from cnnc.backends.base import DTYPES, Backend, BackendError, DeviceMemory, available_host_memory
from cnnc.codegen.dialect import OPENCL_CPU_NAME
from cnnc.plan.schedule import Buffer, Kernel


_PROBE = "__kernel void cnnc_probe(__global float* a) { a[get_global_id(0)] = exp(a[get_global_id(0)]); }"


def _builds(device) -> bool:
    """Can this device compile OpenCL C?  (pip's PoCL 3.0 cannot on CPUs newer than its
    LLVM 14 knows, e.g. Zen 5: 'unknown target CPU generic'; Debian's PoCL 3.1 can.)"""
    import pyopencl as cl

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cl.Program(cl.Context([device]), _PROBE).build()
        return True
    except cl.Error:
        return False


@lru_cache(maxsize=1)
def _pick_device():
    """The OpenCL device to run on: CNNC_OPENCL_DEVICE if set, else the first GPU, else the
    first other device that can build kernels."""
    import pyopencl as cl

    try:
        platforms = cl.get_platforms()
    except cl.Error:
        platforms = []
    if not platforms:
        raise BackendError("no OpenCL platform found (install pocl-binary-distribution, or Debian's "
                           "pocl-opencl-icd)")
    wanted = os.environ.get("CNNC_OPENCL_DEVICE")     # "platform substring[:device index]"
    if wanted:
        name, _, index = wanted.partition(":")
        if not (index or "0").isdigit():
            raise BackendError(f"CNNC_OPENCL_DEVICE={wanted!r}: after ':' comes a device index, e.g. "
                               f"{name}:0")
        for p in platforms:
            if name.lower() in p.name.lower() or name.lower() in p.version.lower():
                devices = p.get_devices()
                if int(index or 0) >= len(devices):
                    raise BackendError(f"CNNC_OPENCL_DEVICE={wanted!r}: platform {p.name!r} has "
                                       f"{len(devices)} device(s), numbered from 0")
                return devices[int(index or 0)]
        raise BackendError(f"CNNC_OPENCL_DEVICE={wanted!r} matches no OpenCL platform "
                           f"({', '.join(p.name for p in platforms)})")
    devices = [d for p in platforms for d in p.get_devices()]
    devices.sort(key=lambda d: 0 if d.type & cl.device_type.GPU else 1)
    for d in devices:
        if _builds(d):
            return d
    raise BackendError("no OpenCL device can build kernels: "
                       + "; ".join(f"{d.name.strip()} ({d.platform.version.strip()})" for d in devices)
                       + ". On CPUs newer than pip's PoCL knows, install Debian's pocl-opencl-icd")


def _physical_devices():
    """The OpenCL devices `--gpus` ids index: the chosen device, or its sub-devices when
    CNNC_OPENCL_SUBDEVICES=N asks to split it into N equal parts (a CPU's cores, say),
    which lets one machine run a multi-device plan on really separate devices."""
    import pyopencl as cl

    device = _pick_device()
    parts = os.environ.get("CNNC_OPENCL_SUBDEVICES")
    if not parts:
        return [device]
    try:
        n = int(parts)
        units = device.max_compute_units // n
        subs = device.create_sub_devices([cl.device_partition_property.EQUALLY, units, 0])
    except (ValueError, ZeroDivisionError, cl.Error) as e:
        raise BackendError(f"CNNC_OPENCL_SUBDEVICES={parts!r}: cannot split {device.name.strip()} "
                           f"({device.max_compute_units} compute units) into equal parts: {e}") from None
    return list(subs)[:n]


TARGETS = ("auto", "cpu", "gpu")


def device_vector_width(device) -> int:
    """Floats per vector the device prefers (CL_DEVICE_PREFERRED_VECTOR_WIDTH_FLOAT)."""
    return device.preferred_vector_width_float


def cpu_target(device, has_cpu_kernels: bool, width: int) -> bool:
    """Run the CPU-shaped kernels (gpu<k>.cpu.cl) on `device`?  CNNC_OPENCL_TARGET=cpu|gpu
    forces the choice, auto (the default) takes them on CPU devices when the build has them.
    A width the device does not prefer is refused: the register blocks were written for it."""
    import pyopencl as cl

    target = os.environ.get("CNNC_OPENCL_TARGET", "auto").lower() or "auto"
    if target not in TARGETS:
        raise BackendError(f"CNNC_OPENCL_TARGET={target!r}: choose {', '.join(TARGETS)}")
    use = target == "cpu" or (target == "auto" and bool(device.type & cl.device_type.CPU) and has_cpu_kernels)
    if use and not has_cpu_kernels:
        raise BackendError("CNNC_OPENCL_TARGET=cpu, but this build has no CPU kernels (gpu<k>.cpu.cl); "
                           "recompile with cnnc compile")
    preferred = device_vector_width(device)
    if use and width > preferred:
        raise BackendError(f"this build's CPU kernels use vectors of {width} floats, but "
                           f"{device.name.strip()} prefers {preferred}; recompile with cnnc compile "
                           f"--cpu-width {preferred}, or run with CNNC_OPENCL_TARGET=gpu")
    return use


def preferred_cpu_width(widths: Sequence[int]) -> int | None:
    """The widest of `widths` the first OpenCL CPU device prefers (None: no such device), the
    default of cnnc compile --cpu-width."""
    try:
        import pyopencl as cl
    except ImportError:
        return None
    devices = []
    try:
        for p in cl.get_platforms():
            try:
                devices += p.get_devices(cl.device_type.CPU)
            except cl.Error:                # a platform without CPU devices
                pass
    except cl.Error:                        # no OpenCL platform at all
        return None
    if not devices:
        return None
    preferred = devices[0].preferred_vector_width_float
    return max((w for w in widths if w <= preferred), default=min(widths))


class OpenCLBackend(Backend):
    name = "opencl"

    def __init__(self, sources: dict[int, str], logical_devices: Sequence[int],
                 physical: dict[int, int] | None = None, cpu_sources: dict[int, str] | None = None,
                 cpu_width: int = 0):
        """`sources` maps each logical device to the OpenCL C its kernels are in; `physical`
        maps each logical device to an OpenCL device (an index into the usable devices);
        `cpu_sources` are the same kernels for the CPU target, of vector width `cpu_width`."""
        try:
            import pyopencl as cl
        except ImportError as e:                      # a regular dependency, but say so clearly
            raise BackendError(f"pyopencl is not importable: {e}") from None
        self.cl = cl
        devices = _physical_devices()
        physical = physical or {d: 0 for d in logical_devices}
        bad = sorted({p for p in physical.values() if p >= len(devices)})
        if bad:
            raise BackendError(f"--gpus names OpenCL device {bad[0]}, but {len(devices)} is available; repeat an id "
                               f"to put several logical devices on one device (e.g. --gpus "
                               f"{','.join('0' for _ in physical)}), or split a CPU with "
                               f"CNNC_OPENCL_SUBDEVICES=N")
        self.used = sorted(set(physical.values()))
        self.device = devices[self.used[0]]
        self.ctx = cl.Context([devices[p] for p in self.used])
        self._devices = {d: devices[physical[d]] for d in logical_devices}
        self.queues: dict[tuple[int, str], object] = {}     # (logical device, stream) -> in-order queue
        self.device_names = [devices[p].name.strip() for p in self.used]
        self.events: dict[str, object] = {}
        self.cpu = cpu_target(self.device, bool(cpu_sources), cpu_width)
        self._launch_dialect = OPENCL_CPU_NAME if self.cpu else "opencl"
        self._sources = dict(cpu_sources if self.cpu else sources)
        self._programs: dict[str, object] = {}           # OpenCL C source -> built program
        self._kernels: dict[tuple[int, str], object] = {}

    def _program(self, device: int):
        """The device's program, built on first use: after the executor has checked that the
        plan fits the devices, so an impossible plan is refused before a long kernel build."""
        src = self._sources[device]
        if src not in self._programs:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # build logs of successful builds
                try:
                    self._programs[src] = self.cl.Program(self.ctx, src).build(options=["-cl-std=CL1.2"])
                except self.cl.RuntimeError as e:
                    raise BackendError(f"OpenCL build failed: {str(e).strip().splitlines()[0]}") from None
        return self._programs[src]

    def _kernel(self, device: int, name: str):
        key = (device, name)
        if key not in self._kernels:
            self._kernels[key] = getattr(self._program(device), name)
        return self._kernels[key]

    def memory(self, device: int) -> DeviceMemory:
        """The OpenCL device's global memory, and CL_DEVICE_MAX_MEM_ALLOC_SIZE for one buffer;
        sub-devices (CNNC_OPENCL_SUBDEVICES) share their parent's memory, and a CPU device's
        memory is the host's, of which it can only use what is still available."""
        d = root = self._devices[device]
        while root.parent_device is not None:
            root = root.parent_device
        total = d.global_mem_size
        if d.type & self.cl.device_type.CPU:
            total = min(total, available_host_memory() or total)
        return DeviceMemory(root.int_ptr, d.name.strip(), total, min(d.max_mem_alloc_size, total))

    def alloc(self, buffer: Buffer, device: int):
        cl = self.cl
        buf = cl.Buffer(self.ctx, cl.mem_flags.READ_WRITE, size=max(buffer.nbytes, 4))
        cl.enqueue_fill_buffer(self._queue(device), buf, np.zeros(1, np.float32), 0, max(buffer.nbytes, 4))
        return (buf, device)

    def _queue(self, device: int, stream: str = "compute"):
        """One in-order queue per stream of a logical device: copies run beside compute."""
        key = (device, stream)
        if key not in self.queues:
            self.queues[key] = self.cl.CommandQueue(self.ctx, device=self._devices[device])
        return self.queues[key]

    def upload(self, handle, array: np.ndarray, stream: str = "compute", offset: int = 0) -> None:
        buf, device = handle
        self.cl.enqueue_copy(self._queue(device, stream), buf, np.ascontiguousarray(array), dst_offset=4 * offset)

    def download(self, handle, buffer: Buffer) -> np.ndarray:
        buf, device = handle
        self.synchronize()
        out = np.empty(buffer.size, DTYPES[buffer.dtype])
        self.cl.enqueue_copy(self._queue(device), out, buf)
        return out

    def launch(self, kernel: Kernel, device: int, args: Sequence, stream: str = "compute") -> None:
        launch = kernel.launch.get(self._launch_dialect) or kernel.launch["opencl"]
        grid, block = launch["grid"], launch["block"]
        global_size = tuple(g * b for g, b in zip(grid, block))
        # every argument is a buffer, (cl.Buffer, device): runtime scalars are in the step-scalar buffer
        self._kernel(device, kernel.name)(self._queue(device, stream), global_size, tuple(block),
                                          *(a[0] for a in args))

    def copy(self, src, src_device, src_offset, dst, dst_device, dst_offset, count, stream="copy-in") -> None:
        if count:
            self.cl.enqueue_copy(self._queue(dst_device, stream), dst[0], src[0], byte_count=4 * count,
                                 src_offset=4 * src_offset, dst_offset=4 * dst_offset)

    def record(self, event: str, device: int, stream: str = "compute") -> None:
        self.events[event] = self.cl.enqueue_marker(self._queue(device, stream))

    def wait(self, event: str, device: int, stream: str = "compute") -> None:
        self.cl.enqueue_barrier(self._queue(device, stream), wait_for=[self.events[event]])

    def begin_run(self) -> None:
        """Every queue waits, on the device, for what every queue was given before: the plan
        orders ops within one run only, so without this a run's upload on copy-in could
        overwrite an input the previous run's compute queue has yet to read."""
        queues = list(self.queues.values())
        if len(queues) > 1:
            markers = [self.cl.enqueue_marker(q) for q in queues]
            for q in queues:
                self.cl.enqueue_barrier(q, wait_for=markers)

    def synchronize(self) -> None:
        for q in self.queues.values():
            q.finish()

    def describe(self) -> str:
        where = self.device_names[0] if len(self.used) == 1 else f"{len(self.used)} devices: " + \
            ", ".join(self.device_names)
        target = ", CPU kernels" if self.cpu else ""
        return f"opencl ({where}, {self.device.platform.name.strip()}{target})"
