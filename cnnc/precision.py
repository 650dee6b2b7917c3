"""GEMM precisions: how the operands of a conv / fc / local GEMM are rounded before they meet.

A layer's ``precision`` (``train {}`` default, per-layer override) chooses what the operands
of its GEMMs keep: ``fp32`` all 23 mantissa bits (no rounding: the default), ``tf32`` 10 (the
operands of NVIDIA tensor cores' TF32 mode, PyTorch's default for convolutions), ``bf16`` 7.
Buffers and accumulation stay float32 on every backend; only the operands are rounded, where
they are staged, so every backend computes the same products and a placement still equals a
single device.

The rounding is defined here once, in numpy, and once for the devices in
runtime/cnnc_precision.h, bit for bit the same (tests/test_precision.py):

* tf32 is PTX ``cvt.rna.tf32.f32``: round to nearest, ties away from zero, to 10 explicit
  mantissa bits (the 13 low bits become zero).  TF32 has float32's exponent range, so
  denormals round like any other value and a magnitude that rounds past the largest float
  becomes infinite; infinities stay.
* bf16 is PTX ``cvt.rn.bf16.f32``: round to nearest, ties to even, to 7 explicit mantissa bits
  (the 16 low bits become zero), overflowing to infinity likewise.
* A NaN stays a NaN, made quiet: its sign and high payload bits are kept, the quiet bit set.
"""
from __future__ import annotations

import numpy as np

PRECISIONS = ("fp32", "tf32", "bf16")
DEFAULT = "fp32"

# low mantissa bits each precision drops (float32 has 23 explicit mantissa bits)
DROPPED_BITS = {"fp32": 0, "tf32": 13, "bf16": 16}
# the unit roundoff of an operand: half the spacing of its values relative to their magnitude
UNIT_ROUNDOFF = {name: 2.0 ** -(24 - dropped) for name, dropped in DROPPED_BITS.items()}

_EXPONENT = np.uint32(0x7F800000)
_MAGNITUDE = np.uint32(0x7FFFFFFF)
_QUIET = np.uint32(0x00400000)


def _keep_mask(precision: str) -> np.uint32:
    return np.uint32((0xFFFFFFFF << DROPPED_BITS[precision]) & 0xFFFFFFFF)


def _round(x, precision: str, tie_away: bool) -> np.ndarray:
    bits = np.asarray(x, dtype=np.float32).view(np.uint32)
    dropped = DROPPED_BITS[precision]
    half = np.uint32(1 << (dropped - 1))
    with np.errstate(over="ignore"):
        if tie_away:        # half an ulp added to the magnitude: ties carry away from zero
            rounded = bits + half
        else:               # half an ulp less one, plus the kept lowest bit: ties go to even
            rounded = bits + (half - np.uint32(1)) + ((bits >> np.uint32(dropped)) & np.uint32(1))
    mask = _keep_mask(precision)
    nan = (bits & _MAGNITUDE) > _EXPONENT
    return np.where(nan, (bits | _QUIET) & mask, rounded & mask).astype(np.uint32).view(np.float32)


def round_tf32(x) -> np.ndarray:
    """float32 values rounded as ``cvt.rna.tf32.f32`` rounds them (see the module doc)."""
    return _round(x, "tf32", tie_away=True)


def round_bf16(x) -> np.ndarray:
    """float32 values rounded as ``cvt.rn.bf16.f32`` rounds them, kept as float32."""
    return _round(x, "bf16", tie_away=False)


ROUNDING = {"tf32": round_tf32, "bf16": round_bf16}


def round_operand(a: np.ndarray, precision: str) -> np.ndarray:
    """A GEMM operand as a kernel of this precision stages it: unchanged for fp32, else its
    float32 values rounded (and given back in `a`'s dtype, so float64 tests keep theirs)."""
    if precision == DEFAULT:
        return a
    a = np.asarray(a)
    return ROUNDING[precision](a.astype(np.float32)).astype(a.dtype)


def stage_expr(precision: str, value: str) -> str:
    """The C expression a kernel stages operand `value` with: the value itself for fp32 (so fp32
    kernels are the plain ones), else a call of runtime/cnnc_precision.h's rounding."""
    return value if precision == DEFAULT else f"cnnc_round_{precision}({value})"


def kernel_suffix(precision: str) -> str:
    """What a kernel name adds for its precision: nothing for fp32, so its kernels keep their
    names, else e.g. "_tf32", so kernels of different precisions never share a name."""
    return "" if precision == DEFAULT else f"_{precision}"
