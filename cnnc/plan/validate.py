"""Checks that a plan is consistent before any backend touches it.

A plan read back from plan.json is trusted by the executor and the
backends: a buffer smaller than a kernel's launch reads or writes past its
allocation (a native crash or, worse, a silently wrong run), an unknown
buffer or kernel fails deep inside a step.  `validate` finds such faults up
front and names the first one; it only reads the plan.
"""
from __future__ import annotations

import math
from collections import defaultdict
from numbers import Real
from typing import Any

from cnnc.ir import Schedule
from cnnc.ops import OPS, SCALAR_DTYPES, SCALARS_ARG
from cnnc.plan.memory import lifetimes
from cnnc.plan.schedule import Plan

DIALECT_NAMES = ("cuda", "opencl")
# launch geometry only the kernels that have such a shape carry (the CPU-shaped OpenCL kernels)
OPTIONAL_DIALECTS = ("opencl-cpu",)
OP_KINDS = ("launch", "copy", "upload", "scalars", "record", "wait")
STREAMS = ("compute", "copy-in")
COUNTERS = ("seed", "step")          # the executor's named integer scalars


class PlanError(ValueError):
    """A plan that is inconsistent with itself; the message says where."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v)


def validate(plan: Plan) -> None:
    """Raise PlanError naming the first inconsistency of `plan`: wrong types, unknown buffers,
    kernels or ops, buffers too small for a launch, copy and upload ranges outside their
    buffers or the minibatch, empty launch grids, waits for events never recorded, step scalars
    read before their device's program writes them."""
    _check(_is_int(plan.batch) and plan.batch >= 1, f"batch {plan.batch!r} is not a positive integer")
    _check(isinstance(plan.image_shape, tuple) and len(plan.image_shape) == 3
           and all(_is_int(d) and d >= 1 for d in plan.image_shape), f"image_shape {plan.image_shape!r} is not CxHxW")
    _check(isinstance(plan.inputs, dict) and all(v in ("image", "labels") for v in plan.inputs.values()),
           "inputs must map names to 'image' or 'labels'")
    storage: dict[str, tuple] = {}         # storage -> the device and dtype of its buffers
    for b in plan.buffers.values():
        where = f"buffer {b.id!r}"
        _check(isinstance(b.id, str) and isinstance(b.storage, str) and isinstance(b.layer, str),
               f"{where}: id, storage and layer must be strings")
        _check(_is_int(b.size) and b.size >= 1, f"{where}: size {b.size!r} is not a positive integer")
        _check(_is_int(b.device) and b.device >= 0, f"{where}: device {b.device!r} is not a device number")
        _check(b.dtype in ("f32", "i32"), f"{where}: unknown dtype {b.dtype!r}")
        _check(storage.setdefault(b.storage, (b.device, b.dtype)) == (b.device, b.dtype),
               f"{where}: shares storage {b.storage!r} with a buffer of another device or dtype")
    for k in plan.kernels.values():
        _check_kernel(k)
    for p in plan.parameters:
        where = f"parameter {p.layer}.{p.name}"
        _check(all(_is_int(d) and d >= 1 for d in p.shape), f"{where}: shape {p.shape!r} is not positive")
        _check(isinstance(p.init, dict) and len(p.init) == 1 and set(p.init) <= {"normal", "const"}
               and _is_number(next(iter(p.init.values()))), f"{where}: init {p.init!r} is not a number")
        for ids in (p.buffers, p.grads, p.incs):
            for bid in ids:
                _check(_buffer(plan, bid, where, math.prod(p.shape)).size == math.prod(p.shape),
                       f"{where}: buffer {bid!r} does not hold its {math.prod(p.shape)} values")
    _check_step_scalars(plan)
    _check(isinstance(plan.programs, dict) and set(plan.programs) == {"train", "test"},
           "programs must be 'train' and 'test'")
    for name, program in plan.programs.items():
        _check_program(plan, name, program)
    _check_sharing(plan)
    _check(isinstance(plan.costs, list) and len(plan.costs) >= 1, "the plan has no cost layer")
    for cost in plan.costs:
        _check(isinstance(cost, dict) and isinstance(cost.get("outputs"), list),
               f"cost {cost!r} has no outputs")
        for out in cost["outputs"]:
            _check(isinstance(out, dict), f"cost output {out!r} is not an object")
            cases = _cases(plan, out.get("cases"), f"cost {cost.get('layer')!r}")
            for key in ("loss", "correct"):
                _buffer(plan, out.get(key), f"cost {cost.get('layer')!r}", cases)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise PlanError(message)


def _buffer(plan: Plan, bid: Any, where: str, at_least: int = 1, device: int | None = None):
    _check(isinstance(bid, str) and bid in plan.buffers, f"{where}: unknown buffer {bid!r}")
    b = plan.buffers[bid]
    _check(b.size >= at_least, f"{where}: buffer {bid!r} holds {b.size} elements but {at_least} are needed")
    _check(device is None or b.device == device,
           f"{where}: buffer {bid!r} is on device {b.device}, not on device {device}")
    return b


def _check_kernel(k) -> None:
    where = f"kernel {k.name!r}"
    _check(isinstance(k.op, str) and k.op in OPS, f"{where}: unknown op {k.op!r}")
    _check(isinstance(k.params, dict), f"{where}: params must be an object")
    _check(isinstance(k.launch, dict), f"{where}: launch must be an object")
    for dialect, geo in k.launch.items():
        _check(dialect in DIALECT_NAMES + OPTIONAL_DIALECTS and isinstance(geo, dict), f"{where}: unknown launch dialect {dialect!r}")
        for key in ("grid", "block"):
            dims = geo.get(key)
            _check(isinstance(dims, list) and len(dims) == 3 and all(_is_int(d) and 1 <= d < 2**31 for d in dims),
                   f"{where}: {dialect} {key} {dims!r} is not three positive 32-bit integers")
        _check(dialect != "cuda" or math.prod(geo["block"]) <= 1024,
               f"{where}: cuda block {geo['block']} has more than 1024 threads")


def _sizes(k) -> dict[str, int]:
    """Elements each buffer argument of kernel `k` needs, by the op registry's rule; raises
    PlanError on params of the wrong type."""
    try:
        sizes = OPS[k.op].sizes(k.params)
    except (KeyError, TypeError):
        raise PlanError(f"kernel {k.name!r}: params {k.params!r} do not describe a {k.op} launch") from None
    _check(all(_is_int(v) and v >= 0 for v in sizes.values()),
           f"kernel {k.name!r}: params give negative or fractional sizes")
    return sizes


def _cases(plan: Plan, cases: Any, where: str) -> int:
    """Check (first case, count) ranges lie within the minibatch; return the cases they cover."""
    _check(isinstance(cases, (list, tuple)) and len(cases) >= 1, f"{where}: no cases")
    total = 0
    for c in cases:
        _check(isinstance(c, (list, tuple)) and len(c) == 2 and all(_is_int(v) for v in c)
               and c[0] >= 0 and c[1] >= 1 and c[0] + c[1] <= plan.batch,
               f"{where}: cases {list(c) if isinstance(c, (list, tuple)) else c!r} are not within the "
               f"minibatch of {plan.batch}")
        total += c[1]
    return total


def _check_program(plan: Plan, name: str, program: Any) -> None:
    _check(isinstance(program, dict), f"program {name!r} must map devices to ops")
    recorded = {op.event for ops in program.values() for op in ops if op.kind == "record" and isinstance(op.event, str)}
    for dev, ops in program.items():
        _check(_is_int(dev) and dev >= 0, f"program {name!r}: device {dev!r} is not a device number")
        scalars_written: set[str] = set()
        for i, op in enumerate(ops):
            where = f"{name} program, device {dev}, op {i} ({op.kind})"
            _check(op.kind in OP_KINDS, f"{where}: unknown op kind")
            _check(op.stream in STREAMS, f"{where}: unknown stream {op.stream!r}")
            if op.kind == "launch":
                _check_launch(plan, op, dev, where, scalars_written)
            elif op.kind == "scalars":
                b = _buffer(plan, op.dst, where, len(plan.scalars), dev)
                _check(b.role == "scalars" and b.dtype == "i32" and b.size == len(plan.scalars),
                       f"{where}: buffer {op.dst!r} is not an i32 step-scalar buffer of the table's "
                       f"{len(plan.scalars)} entries")
                _check(op.stream == "compute", f"{where}: step scalars are written on the compute stream, "
                                               f"where the launches that read them run")
                scalars_written.add(op.dst)
            elif op.kind == "copy":
                _check(all(_is_int(v) for v in (op.src_offset, op.dst_offset, op.count))
                       and op.src_offset >= 0 and op.dst_offset >= 0 and op.count >= 1,
                       f"{where}: offsets and count must be non-negative integers, count at least 1")
                _buffer(plan, op.src, where, op.src_offset + op.count)
                _buffer(plan, op.dst, where, op.dst_offset + op.count, dev)
            elif op.kind == "upload":
                kind = plan.inputs.get(op.input) if isinstance(op.input, str) else None
                _check(kind is not None, f"{where}: unknown input {op.input!r}")
                needed = _cases(plan, op.cases, where) * (1 if kind == "labels" else math.prod(plan.image_shape))
                b = _buffer(plan, op.dst, where, needed, dev)
                _check(b.size == needed, f"{where}: buffer {op.dst!r} holds {b.size} elements, not the "
                                         f"{needed} of its cases")
                _check(b.dtype == ("i32" if kind == "labels" else "f32"),
                       f"{where}: buffer {op.dst!r} has dtype {b.dtype} for {kind}")
            else:
                _check(isinstance(op.event, str) and op.event != "", f"{where}: no event")
                _check(op.kind == "record" or op.event in recorded,
                       f"{where}: waits for event {op.event!r} that nothing records")


def _check_launch(plan: Plan, op, dev: int, where: str, scalars_written: set[str]) -> None:
    _check(isinstance(op.kernel, str) and op.kernel in plan.kernels, f"{where}: unknown kernel {op.kernel!r}")
    k = plan.kernels[op.kernel]
    where = f"{where} of {op.kernel}"
    for dialect in DIALECT_NAMES:
        _check(dialect in k.launch, f"{where}: the kernel has no {dialect} launch geometry")
    spec = OPS[k.op]
    buffer_args = spec.buffers
    _check(isinstance(op.args, tuple) and len(op.args) == len(spec.kernel_args),
           f"{where}: {len(op.args)} buffer arguments, {k.op} takes {len(spec.kernel_args)}")
    sizes = _sizes(k)
    for arg, bid in zip(buffer_args, op.args):
        b = _buffer(plan, bid, f"{where}, argument {arg}", sizes.get(arg, 1), dev)
        _check(arg not in sizes or arg in spec.windows or b.size == sizes[arg],
               f"{where}, argument {arg}: buffer {bid!r} holds {b.size} elements but the kernel's params "
               f"describe {sizes[arg] if arg in sizes else ''}")
    if not spec.step_scalars:
        return
    table = op.args[-1]
    b = _buffer(plan, table, f"{where}, argument {SCALARS_ARG}", 1, dev)
    _check(b.role == "scalars", f"{where}: argument {SCALARS_ARG} is buffer {table!r}, not a step-scalar buffer")
    _check(table in scalars_written, f"{where}: reads step scalars from {table!r} before any scalars op of "
                                     f"this program writes them (each program must begin with one)")
    _check(op.stream == "compute", f"{where}: reads step scalars on the {op.stream} stream; only the compute "
                                   f"stream, which writes them, is ordered after their writing")
    slots = k.params.get("slots", spec.slots({}))
    _check(isinstance(slots, list) and len(slots) == len(spec.step_scalars)
           and all(_is_int(s) and 0 <= s < len(plan.scalars) for s in slots),
           f"{where}: slots {slots!r} are not {len(spec.step_scalars)} entries of the step-scalar table")
    for (arg, role), slot in zip(spec.step_scalars, slots):
        _check(plan.scalars[slot].dtype == SCALAR_DTYPES[role],
               f"{where}: scalar {arg} reads step scalar {slot}, of type {plan.scalars[slot].dtype}, "
               f"not {SCALAR_DTYPES[role]}")


def _check_step_scalars(plan: Plan) -> None:
    """Each entry of the step-scalar table gives a value of its type at every run."""
    _check(isinstance(plan.scalars, list), "scalars must be a list")
    for slot, s in enumerate(plan.scalars):
        where, v = f"step scalar {slot}", s.source
        if s.dtype == "f32":
            _check(_is_number(v) or isinstance(v, dict) and _is_schedule(v),
                   f"{where}: {v!r} is not a finite number or a schedule")
        else:
            _check(s.dtype == "i32", f"{where}: unknown dtype {s.dtype!r}")
            _check(_is_int(v) and -2**31 <= v < 2**32 or v in COUNTERS,
                   f"{where}: {v!r} is not a 32-bit integer or one of {', '.join(COUNTERS)}")


def _is_schedule(d: dict) -> bool:
    """A learning-rate schedule that evaluates to finite numbers over the whole run."""
    try:
        s = Schedule.from_json(d)
        return all(_is_number(s.at(t)) for t in (0.0, 0.5, 1.0))
    except (ValueError, KeyError, TypeError, ArithmeticError):
        return False


def _check_sharing(plan: Plan) -> None:
    """Buffers that share one allocation must never be live at once, as the memory planner
    arranges: a stream or device alongside could otherwise overwrite what a kernel still reads."""
    members: dict[str, list[str]] = defaultdict(list)
    for b in plan.buffers.values():
        members[b.storage].append(b.id)
    shared = {s: ids for s, ids in members.items() if len(ids) > 1}
    if not shared:
        return
    for program in plan.programs:
        spans, foreign = lifetimes(plan, program)
        for storage, ids in shared.items():
            alone = [b for b in ids if b in foreign]
            _check(not alone, f"buffer {alone[0] if alone else ''!r} shares storage {storage!r} but another "
                              f"device or stream uses it")
            live = sorted((spans[b][0], spans[b][1], b) for b in ids if b in spans)
            end, last = -1, ""
            for first, stop, b in live:
                _check(first > end, f"buffers {last!r} and {b!r} share storage {storage!r} while both are live "
                                    f"in the {program} program")
                if stop > end:
                    end, last = stop, b
