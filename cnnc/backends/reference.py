"""The reference backend: every op in numpy, on the host.

Buffers are numpy arrays and a launch calls the op's numpy implementation in
:mod:`cnnc.backends.reference_ops` with the kernel's parameters (its runtime
scalars read from the step-scalar buffer, as the kernels read them), so the very
same plan that drives the GPU kernels runs here too.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from cnnc.backends.base import DTYPES, Backend, DeviceMemory, available_host_memory
from cnnc.backends.reference_ops import run_launch
from cnnc.plan.schedule import Buffer, Kernel


class ReferenceBackend(Backend):
    name = "reference"

    def memory(self, device: int) -> DeviceMemory | None:
        """Every logical device lives in host memory, so all share what is available."""
        available = available_host_memory()
        return None if available is None else DeviceMemory("host", "host memory", available, available)

    def alloc(self, buffer: Buffer, device: int) -> np.ndarray:
        return np.zeros(buffer.size, DTYPES[buffer.dtype])

    def view(self, handle: np.ndarray, buffer: Buffer) -> np.ndarray:
        return handle[:buffer.size]

    def upload(self, handle: np.ndarray, array: np.ndarray, stream: str = "compute", offset: int = 0) -> None:
        values = np.asarray(array, handle.dtype).reshape(-1)
        handle[offset:offset + values.size] = values

    def download(self, handle: np.ndarray, buffer: Buffer) -> np.ndarray:
        return handle.copy()

    def launch(self, kernel: Kernel, device: int, args: Sequence, stream: str = "compute") -> None:
        # overflow and NaN are the training loop's to notice and report, as on the devices
        with np.errstate(all="ignore"):
            run_launch(kernel.op, kernel.params, args)

    def copy(self, src, src_device, src_offset, dst, dst_device, dst_offset, count, stream="copy-in") -> None:
        dst[dst_offset:dst_offset + count] = src[src_offset:src_offset + count]

    def describe(self) -> str:
        return "reference (numpy on the host)"
