"""The backend interface: the few primitives the executor needs from a device.

A backend owns device memory and compiled kernels; it knows nothing about
layers or training.  The executor (cnnc.executor) drives every backend the
same way, which is what makes the reference backend a usable oracle.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Sequence

import numpy as np

from cnnc.plan.schedule import Buffer, Kernel

DTYPES = {"f32": np.float32, "i32": np.int32}


class BackendError(Exception):
    """A backend cannot start or run (no device, a failed kernel build, ...)."""


class Backend(ABC):
    name: str = "?"

    @abstractmethod
    def alloc(self, buffer: Buffer, device: int) -> Any:
        """Zero-filled device memory for `buffer` on logical device `device`."""

    def view(self, handle: Any, buffer: Buffer) -> Any:
        """The handle through which `buffer` uses an allocation that may be larger (shared storage)."""
        return handle

    @abstractmethod
    def upload(self, handle: Any, array: np.ndarray, stream: str = "compute") -> None:
        """Copy a host array (of the buffer's size and dtype) into device memory."""

    @abstractmethod
    def download(self, handle: Any, buffer: Buffer) -> np.ndarray:
        """Copy device memory back into a new host array."""

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

    def synchronize(self) -> None:
        """Wait until every launched kernel has finished."""

    def describe(self) -> str:
        return self.name
