"""Training settings: the keys of ``train {}`` and of per-layer ``{ }`` blocks.

Per-layer keys override the network-wide defaults.  Learning rates are
schedules: a number (constant) or const(base), linear(base, tgt_factor),
exp(base, tgt_factor), dexp(base, tgt_factor, steps) as in cuda-convnet2.
``precision`` (fp32 | tf32 | bf16) is what a weight layer's GEMM operands are rounded to
(cnnc/precision.py); weight layers are exactly the layers with GEMMs, so on any other layer it
is refused like every per-layer setting.
"""
from __future__ import annotations

from typing import Any, Callable

from cnnc import precision
from cnnc.diagnostics import did_you_mean
from cnnc.frontend import ast
from cnnc.ir import MAX_ELEMENTS, LayerTrain, Schedule

# key -> (type, minimum, default)
GLOBAL_SETTINGS: dict[str, tuple[str, float | None, Any]] = {
    "batch": ("int", 1, 128),
    "epochs": ("int", 1, 10),
    "seed": ("int", 0, 0),
    "microbatches": ("int", 1, 1),            # pipelining: micro-batches per minibatch
    "pipeline": ("choice", None, "gpipe"),    # order of micro-batches: gpipe | one_f_one_b
    "exchange": ("choice", None, "round_robin"),   # hybrid exchange: all_gather | round_robin | scatter
}
CHOICES = {
    "pipeline": ("gpipe", "one_f_one_b"),
    "exchange": ("all_gather", "round_robin", "scatter"),
    "precision": precision.PRECISIONS,
}
LAYER_SETTINGS: dict[str, tuple[str, float | None, Any]] = {
    "lr": ("schedule", 0, Schedule("const", 0.01)),
    "lr_bias": ("schedule", 0, None),          # None: same as lr
    "momentum": ("float", 0, 0.9),
    "momentum_bias": ("float", 0, None),       # None: same as momentum
    "weight_decay": ("float", 0, 0.0),
    "init_w": ("float", 0, 0.01),
    "init_b": ("float", None, 0.0),
    "update_period": ("int", 0, 0),
    "wball": ("float", 0, 0.0),               # max L2 norm of each unit's incoming weights (0: none)
    "precision": ("choice", None, precision.DEFAULT),   # what the layer's GEMM operands are rounded to
}

_SCHEDULE_ARGS = {
    "const": ("base",),
    "linear": ("base", "tgt_factor"),
    "exp": ("base", "tgt_factor"),
    "dexp": ("base", "tgt_factor", "steps"),
}


def _number(v: ast.Value, typ: str, minimum, what: str, fail: Callable):
    if not isinstance(v, ast.Number):
        fail(f"{what} must be a number", v.span)
    if typ == "int" and not v.is_int:
        fail(f"{what} must be an integer", v.span)
    if typ == "int" and abs(v.value) > MAX_ELEMENTS:
        fail(f"{what} must be at most {MAX_ELEMENTS}", v.span)
    if minimum is not None and v.value < minimum:
        fail(f"{what} must be at least {minimum:g}", v.span)
    return int(v.value) if typ == "int" else float(v.value)


def _choice(v: ast.Value, what: str, choices: tuple[str, ...], fail: Callable) -> str:
    if not isinstance(v, ast.NameRef) or v.name not in choices:
        got = v.name if isinstance(v, ast.NameRef) else None
        fail(f"{what} must be one of {', '.join(choices)}", v.span,
             did_you_mean(got, choices) if got else None)
    return v.name


def _schedule(v: ast.Value, what: str, fail: Callable) -> Schedule:
    if isinstance(v, ast.Number):
        return Schedule("const", _number(v, "float", 0, what, fail))
    if not isinstance(v, ast.Call):
        fail(f"{what} must be a number or a schedule such as dexp(base=0.01, tgt_factor=250, steps=4)", v.span)
    names = _SCHEDULE_ARGS.get(v.func)
    if names is None:
        fail(f"unknown schedule '{v.func}'", v.span,
             did_you_mean(v.func, _SCHEDULE_ARGS) or "schedules: const, linear, exp, dexp")
    vals: dict[str, Any] = {}
    for i, a in enumerate(v.args):
        key = a.name if a.name is not None else (names[i] if i < len(names) else None)
        if key not in names:
            fail(f"{v.func}() takes {', '.join(names)}", a.span)
        if key in vals:
            fail(f"'{key}' given twice", a.span)
        minimum = 1 if key in ("tgt_factor", "steps") else 0
        vals[key] = _number(a.value, "int" if key == "steps" else "float", minimum, key, fail)
    missing = [n for n in names if n not in vals]
    if missing:
        fail(f"{v.func}() needs {', '.join(missing)}", v.span)
    return Schedule(v.func, vals["base"], vals.get("tgt_factor", 1.0), vals.get("steps", 1))


def read_settings(settings: tuple[ast.Setting, ...], allowed: dict, fail: Callable) -> dict[str, Any]:
    """Validate a block of `key = value` settings against the allowed keys."""
    out: dict[str, Any] = {}
    for s in settings:
        spec = allowed.get(s.name)
        if spec is None:
            fail(f"unknown setting '{s.name}'", s.span,
                 did_you_mean(s.name, allowed) or f"settings: {', '.join(sorted(allowed))}")
        if s.name in out:
            fail(f"setting '{s.name}' given twice", s.span)
        typ, minimum, _ = spec
        if typ == "schedule":
            out[s.name] = _schedule(s.value, s.name, fail)
        elif typ == "choice":
            out[s.name] = _choice(s.value, s.name, CHOICES[s.name], fail)
        else:
            out[s.name] = _number(s.value, typ, minimum, s.name, fail)
    return out


def layer_train(glob: dict[str, Any], local: dict[str, Any]) -> LayerTrain:
    """A weight layer's training parameters: its own settings over the train {} defaults."""
    def get(key):
        if key in local:
            return local[key]
        if key in glob:
            return glob[key]
        return LAYER_SETTINGS[key][2]

    lr = get("lr")
    lr_bias = get("lr_bias") or lr
    momentum = get("momentum")
    momentum_bias = get("momentum_bias")
    return LayerTrain(lr=lr, lr_bias=lr_bias, momentum=momentum,
                      momentum_bias=momentum if momentum_bias is None else momentum_bias,
                      weight_decay=get("weight_decay"), init_w=get("init_w"), init_b=get("init_b"),
                      update_period=get("update_period"), wball=get("wball"), precision=get("precision"))
