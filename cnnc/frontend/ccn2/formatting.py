"""Values as the .cnn text writes them (also in messages, so that both read alike)."""
from __future__ import annotations

import math

from cnnc.ir import Schedule


def fmt_number(v: float | int) -> str:
    """A number as the .cnn file shows it: integers without a point, floats in their shortest form."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if not math.isfinite(v):            # only in messages: the .cnn language has no such numbers
        return repr(float(v))
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    text = repr(float(v))
    if "e" in text:
        mant, exp = text.split("e")
        if "." in mant:
            mant = mant.rstrip("0").rstrip(".")
        text = f"{mant}e{int(exp)}"
    return text


def fmt_schedule(s: Schedule) -> str:
    if s.kind == "const":
        return fmt_number(s.base)
    args = f"base={fmt_number(s.base)}, tgt_factor={fmt_number(s.tgt_factor)}"
    if s.kind == "dexp":
        args += f", steps={s.steps}"
    return f"{s.kind}({args})"
