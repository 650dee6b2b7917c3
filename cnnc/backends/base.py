"""The backend interface: the few primitives the executor needs from a device.

A backend owns device memory and compiled kernels; it knows nothing about
layers or training.  The executor (cnnc.executor) drives every backend the
same way, which is what makes the reference backend a usable oracle.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Hashable, Sequence

import numpy as np

from cnnc.plan.schedule import Buffer, Kernel

DTYPES = {"f32": np.float32, "i32": np.int32}


class BackendError(Exception):
    """A backend cannot start or run (no device, a failed kernel build, ...)."""


def available_host_memory() -> int | None:
    """Bytes the host can still give without swapping (Linux's MemAvailable), else its
    physical memory; None where neither is known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


@dataclass(frozen=True)
class DeviceMemory:
    """How much memory a device offers a plan: `total` for all its allocations together
    (shared by every logical device on it, which `key` identifies), `largest` for one."""

    key: Hashable
    name: str
    total: int
    largest: int


class Backend(ABC):
    name: str = "?"
    # the order the executor issues ops in, for a backend that models concurrent streams
    # itself (cnnc.race); None: the executor's usual order
    stream_order = None

    def memory(self, device: int) -> DeviceMemory | None:
        """The memory of the device logical device `device` runs on; None: no known limit."""
        return None

    @abstractmethod
    def alloc(self, buffer: Buffer, device: int) -> Any:
        """Zero-filled device memory for `buffer` on logical device `device`."""

    def view(self, handle: Any, buffer: Buffer) -> Any:
        """The handle through which `buffer` uses an allocation that may be larger (shared storage)."""
        return handle

    @abstractmethod
    def upload(self, handle: Any, array: np.ndarray, stream: str = "compute", offset: int = 0) -> None:
        """Copy a host array (of the buffer's dtype) into device memory from element `offset` on
        (the whole buffer unless a copy from another rank fills one range of it)."""

    @abstractmethod
    def download(self, handle: Any, buffer: Buffer) -> np.ndarray:
        """Copy device memory back into a new host array: its values after everything issued so
        far on its device (the backend orders this itself; callers need no `synchronize`)."""

    @abstractmethod
    def launch(self, kernel: Kernel, device: int, args: Sequence[Any], stream: str = "compute") -> None:
        """Run a kernel; `args` are handles and floats in the op's argument order."""

    @abstractmethod
    def copy(self, src: Any, src_device: int, src_offset: int, dst: Any, dst_device: int, dst_offset: int,
             count: int, stream: str = "copy-in") -> None:
        """Copy `count` elements between buffers, possibly on different devices (ordered on dst's device)."""

    def record(self, event: str, device: int, stream: str = "compute") -> None:
        """Mark `event` on a stream of `device` after everything issued there so far
        (no-op for synchronous backends)."""

    def wait(self, event: str, device: int, stream: str = "compute") -> None:
        """Make later work on a stream of `device` wait for `event` (no-op for synchronous backends)."""

    def begin_run(self) -> None:
        """A run of a program begins: none of its ops may overtake an op issued before it on
        another stream or device (the plan orders ops within one run only).  No-op for
        backends whose earlier work is finished or ordered by then."""

    def synchronize(self) -> None:
        """Wait until every launched kernel has finished."""

    def describe(self) -> str:
        return self.name
