"""Machine models: what a GPU (or this machine's OpenCL CPU device) and the links between devices
can do, read from machines.json beside this module and from files users add with --machine-file."""
from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

from cnnc.perf import PerfError

MACHINES_FILE = Path(__file__).with_name("machines.json")


class MachineError(PerfError):
    """An unknown machine or link, or a machine file that cannot be used."""


@dataclass(frozen=True)
class Link:
    name: str
    bandwidth_gbs: float           # one direction, peak
    latency_us: float              # per transfer
    efficiency: float = 0.8        # fraction of the peak a transfer reaches
    description: str = ""
    source: str = ""

    def seconds(self, nbytes: int) -> float:
        return self.latency_us * 1e-6 + nbytes / (self.bandwidth_gbs * 1e9 * self.efficiency)


@dataclass(frozen=True)
class Machine:
    name: str
    dialect: str                   # which generated source runs on it: "cuda" | "opencl"
    sms: int                       # streaming multiprocessors (compute units of an OpenCL device)
    peak_fp32_tflops: float        # SIMT FP32, multiply-add = 2
    memory_bandwidth_gbs: float
    launch_overhead_us: float
    peer_link: Link                # between two devices of one node
    host_link: Link                # host memory to a device (minibatch uploads)
    arch: str = ""                 # the GPU's own nvcc architecture
    kernel_arch: str = ""          # whose ptxas register and shared-memory counts stand in for it
    memory_gib: float = 0
    l2_mib: float = 0
    shared_kib_per_sm: float = 48
    registers_per_sm: int = 65536
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32
    tf32_tensor_tflops: float | None = None
    bf16_tensor_tflops: float | None = None
    compute_efficiency: float = 0.6
    memory_efficiency: float = 0.8
    occupancy_saturation: float = 0.25    # the occupancy from which latency is hidden
    description: str = ""
    source: str = ""

    @property
    def peak_flops(self) -> float:
        return self.peak_fp32_tflops * 1e12

    @property
    def bandwidth(self) -> float:
        """Bytes per second to and from device memory, peak."""
        return self.memory_bandwidth_gbs * 1e9

    @property
    def ridge_intensity(self) -> float:
        """FLOP per byte above which a kernel is compute-bound."""
        return self.peak_flops / self.bandwidth


def _read(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except ValueError as e:
        raise MachineError(f"{path}: not JSON ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k, {}), dict) for k in ("machines", "links")):
        raise MachineError(f"{path}: expected an object with \"machines\" and \"links\" objects")
    return data


def catalogue(machine_file: Path | None = None) -> dict:
    """The shipped machines and links, with a user's file's entries added or replacing them."""
    data = _read(MACHINES_FILE)
    if machine_file is not None:
        extra = _read(machine_file)
        for key in ("machines", "links"):
            data.setdefault(key, {}).update(extra.get(key, {}))
    return data


# figures the model divides by
_DIVISORS = {"sms", "peak_fp32_tflops", "memory_bandwidth_gbs", "bandwidth_gbs", "efficiency",
             "compute_efficiency", "memory_efficiency", "max_threads_per_sm", "max_blocks_per_sm"}


def _build(cls, name: str, entry: dict, what: str, **resolved):
    """A Link or Machine from a catalogue entry: unknown keys are ignored (descriptions, notes),
    required ones must be there, and numbers must be numbers."""
    values = {f.name: entry[f.name] for f in fields(cls) if f.name in entry}
    values.update(resolved, name=name)
    missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in values]
    if missing:
        raise MachineError(f"{what} '{name}' lacks {', '.join(missing)}")
    for f in fields(cls):
        v = values.get(f.name)
        numeric = f.type.split(" |")[0] in ("int", "float")
        if numeric and v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
            raise MachineError(f"{what} '{name}': {f.name} must be a non-negative number, not {v!r}")
        if f.name in _DIVISORS and v is not None and v == 0:
            raise MachineError(f"{what} '{name}': {f.name} must be above 0")
    return cls(**values)


def link(name: str, data: dict) -> Link:
    entry = data["links"].get(name)
    if not isinstance(entry, dict):
        raise MachineError(f"unknown link '{name}'; known: {', '.join(sorted(data['links']))}")
    return _build(Link, name, entry, "link")


def load_machine(name: str, machine_file: Path | None = None, calibration: dict | None = None) -> Machine:
    """Machine `name` from the catalogue.  `cpu` is this machine's OpenCL device, its figures
    from `calibration` (see cnnc.perf.calibrate)."""
    data = catalogue(machine_file)
    entry = data["machines"].get(name)
    if entry is None and name == "cpu" and calibration is not None:
        entry = cpu_entry(calibration)
    if not isinstance(entry, dict):
        raise MachineError(f"unknown machine '{name}'; known: {', '.join(sorted(set(data['machines']) | {'cpu'}))}")
    links = {}
    for role in ("peer_link", "host_link"):
        ref = entry.get(role)
        if not isinstance(ref, (str, dict)):
            raise MachineError(f"machine '{name}' lacks {role} (a link's name)")
        links[role] = link(ref, data) if isinstance(ref, str) else _build(Link, f"{name}.{role}", ref, "link")
    return _build(Machine, name, entry, "machine", **links)


def cpu_entry(calibration: dict) -> dict:
    """The machine entry of a calibrated OpenCL CPU device: one work-group per compute unit at a
    time, and copies between its sub-devices and from the host go through its own memory."""
    memory = {"bandwidth_gbs": calibration["bandwidth_gbs"], "latency_us": calibration["launch_overhead_us"],
              "efficiency": 1.0, "description": "copy within host memory, as calibrated"}
    return {"description": f"{calibration['device']} (OpenCL, calibrated)", "source": "cnnc calibrate",
            "dialect": "opencl", "sms": calibration["compute_units"],
            "peak_fp32_tflops": calibration["peak_gflops"] / 1e3,
            "memory_bandwidth_gbs": calibration["bandwidth_gbs"],
            "launch_overhead_us": calibration["launch_overhead_us"],
            "max_blocks_per_sm": 1, "l2_mib": calibration.get("cache_mib", 1),
            "compute_efficiency": 0.5, "occupancy_saturation": 0,
            "memory_efficiency": min(calibration.get("indexed_bandwidth_gbs", calibration["bandwidth_gbs"])
                                     / calibration["bandwidth_gbs"], 1.0),
            "peer_link": memory, "host_link": memory}
