"""Generate stage: plan kernels → CUDA and OpenCL source text.

Each kernel family has one Jinja2 template (templates/<family>.j2) rendered
once per dialect; shapes, strides and tile sizes are inlined as constants.
This module also decides launch geometry, which is why it returns, for each
kernel, the grid and block a backend must launch it with.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

import jinja2

from cnnc.codegen.dialect import OPENCL_CPU_NAME, Dialect
from cnnc.diagnostics import CompileError, Diagnostic, Span, source_lines
from cnnc.frontend.ast import FLOAT32_MAX
from cnnc.neurons import Neuron
from cnnc.ops import (INT_BUFFERS, OPS, SCALAR_DTYPES, SCALARS_ARG, Role, dropout_threshold, norm_add_scale,
                      param)
from cnnc.plan.schedule import Kernel
from cnnc.precision import stage_expr
from cnnc.resources import resource_dir

# C identifiers: what a kernel name must be, since it is spliced into code
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# What user text may not carry into a comment: control and format characters (a
# line break ends a // comment; bidirectional overrides make the code read other
# than it compiles), surrogates (which cannot be written as UTF-8), backslashes
# (one ending a line continues the comment onto the next), the '?' of '??' (the
# trigraph ??/ is a backslash in OpenCL C) and the '/' of '*/' (which ends a
# block comment).
_UNSAFE_IN_COMMENT = re.compile(r"[\x00-\x1f\x7f-\x9f\xad\u061c\u200b-\u200f\u2028-\u202e\u2060-\u206f"
                                r"\ufeff\ufff9-\ufffb\ud800-\udfff\U000e0000-\U000e007f\\]|\?(?=\?)|(?<=\*)/")


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def comment_text(text: object) -> str:
    """User text (a file name, a source line, a layer name) made safe to echo inside a
    C comment: it stays on its line and can only ever be read as a comment."""
    return _UNSAFE_IN_COMMENT.sub(_escape, str(text))


@lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(resource_dir("templates"))),
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["comment"] = comment_text
    return env


@lru_cache(maxsize=1)
def _mma_env() -> jinja2.Environment:
    """The environment of tensor-core kernels: the family templates (conv.j2, fc.j2, local.j2)
    as they are, their parent gemm.j2 replaced by mma_gemm.j2, so the gathers and epilogues
    those templates fill in are written once for both kinds of GEMM."""
    files = jinja2.FileSystemLoader(str(resource_dir("templates")))

    def parent(name: str):
        return files.get_source(env, "mma_gemm.j2") if name == "gemm.j2" else None

    env = _env().overlay(loader=jinja2.ChoiceLoader([jinja2.FunctionLoader(parent), files]))
    return env


class ConstantRangeError(ValueError):
    """A kernel constant derived from the user's numbers (2·coeff, wball²) that no 32-bit
    float can hold: the literal would be infinite."""


def lit(v: float) -> str:
    """A C float literal."""
    if not abs(float(v)) <= FLOAT32_MAX:
        raise ConstantRangeError(v)
    text = repr(float(v))
    return text + "f" if ("." in text or "e" in text or "inf" in text) else text + ".0f"


def power(base: str, exponent: float, d: Dialect) -> str:
    """C for base**exponent, a compile-time constant exponent: the exponents normalisation
    layers use (cuda-convnet2's pow = 0.75, and 0.5) become square roots, which are exact to
    the last bit and far cheaper than a general pow."""
    quarter = exponent * 4
    if quarter == int(quarter) and -12 <= quarter <= 12 and quarter != 0:
        n = abs(int(quarter))
        whole, rest = divmod(n, 4)
        sqrt = d.math("sqrt")
        factors = [base] * whole + ([f"{sqrt}({base})"] if rest >= 2 else []) + \
            ([f"{sqrt}({sqrt}({base}))"] if rest % 2 else [])
        product = " * ".join(factors)
        return f"(1.0f / ({product}))" if exponent < 0 else f"({product})"
    return f"{d.math('pow')}({base}, {lit(exponent)})"


def neuron_expr(neuron: Neuron, template: str, var: str, param_var: str, d: Dialect) -> str:
    """Instantiate a neuron's C expression: parameters become literals, the variable is renamed
    and the functions it calls, all C math functions, take the dialect's names."""
    expr = re.sub(r"\ba\b", lit(neuron.a), template)
    expr = re.sub(r"\bb\b", lit(neuron.b), expr)
    expr = re.sub(r"\b([a-z]\w*)\(", lambda m: d.math(m.group(1)) + "(", expr)
    return re.sub(rf"\b{param_var}\b", var, expr)


def summed_pre(p: dict, old: str, bias: str) -> str:
    """The pre-neuron value of one input's launch of a conv / fc layer whose inputs are summed:
    (old output if accumulating) + v + (bias if adding it)."""
    terms = ([old] if p.get("accumulate", False) else []) + ["v"] + ([bias] if p.get("bias", True) else [])
    return " + ".join(terms)


def global_case(p: dict, var: str) -> str:
    """The minibatch index of local case `var` of a dropout launch: case_offset + var, or
    from the pieces in case_ranges (a chain of conditionals, one per piece)."""
    def plus(k: int) -> str:
        return var if k == 0 else f"{var} + {k}" if k > 0 else f"{var} - {-k}"

    ranges = p.get("case_ranges")
    if not ranges:
        return plus(p.get("case_offset", 0))
    starts = [sum(count for _, count in ranges[:i]) for i in range(len(ranges))]
    expr = plus(ranges[-1][0] - starts[-1])
    for (first, count), start in reversed(list(zip(ranges[:-1], starts[:-1]))):
        expr = f"({var} < {start + count} ? {plus(first - start)} : {expr})"
    return expr


# --- launch geometry ---------------------------------------------------------------

@dataclass(frozen=True)
class Tiles:
    BM: int
    BN: int
    BK: int
    TM: int
    TN: int

    @property
    def NT_M(self) -> int:
        return self.BM // self.TM

    @property
    def NT_N(self) -> int:
        return self.BN // self.TN

    @property
    def threads(self) -> int:
        return self.NT_M * self.NT_N


def choose_tiles(M: int, N: int, K: int, d: Dialect) -> Tiles:
    """Shrink the dialect's default block tile to the problem, keeping the thread tile."""
    BM, BN, BK = d.gemm_block
    TM, TN = d.gemm_thread
    while BM > TM and BM // 2 >= M:
        BM //= 2
    while BN > TN and BN // 2 >= N:
        BN //= 2
    while BK > 4 and BK // 2 >= K:
        BK //= 2
    return Tiles(BM, BN, BK, TM, TN)


# --- tensor cores --------------------------------------------------------------------
# A GEMM-family kernel whose layer asks for precision tf32 or bf16 runs on tensor cores
# (templates/mma_gemm.j2): warps multiply 16x8 tiles with mma.sync, whose operand and
# accumulator fragments are spread over the lanes as PTX lays them out.  OpenCL runs the same
# kernel with those fragment operations emulated, so PoCL tests the tiling, staging and
# fragment layout that CUDA builds ship.

# the mma.sync shape of each precision: (instruction, k of one mma)
MMA_SHAPES = {"tf32": ("mma.sync.m16n8k8.tf32", 8), "bf16": ("mma.sync.m16n8k16.bf16", 16)}
# a shorter reduction stays on the SIMT kernel (rounded operands): a block tile would run
# fewer than four K slices, too few to hide the staging of the first
MMA_MIN_K = 64
# block tiles (BM, BN) and warps along M and N, largest first; each warp holds a 16x8 multiple
_MMA_BLOCKS = ((128, 128, 2, 4), (128, 64, 2, 2), (64, 64, 2, 2), (32, 32, 1, 2))
# work-groups to aim for: 4 per SM of the A100 (108 SMs), the part of sm_80, the lowest default
# --arch (the H100 of sm_90 has 132); the arch list does not reach rendering, so it is fixed here
MMA_MIN_BLOCKS = 4 * 108


@dataclass(frozen=True)
class MmaTiles:
    """A tensor-core kernel's tiling: a BM x BN block tile staged BK deep in `stages` shared
    buffers, WM x WN warps of (MI*16) x (NI*8) each.  Shared rows hold BK floats plus `pad`,
    so the lanes of a fragment load (8 rows x 4 columns) hit 32 distinct banks."""
    BM: int
    BN: int
    BK: int
    WM: int
    WN: int
    stages: int
    precision: str
    pad: int = 4

    @property
    def MI(self) -> int:
        return self.BM // self.WM // 16

    @property
    def NI(self) -> int:
        return self.BN // self.WN // 8

    @property
    def KS(self) -> int:
        return MMA_SHAPES[self.precision][1]

    @property
    def threads(self) -> int:
        return self.WM * self.WN * 32

    @property
    def a_elems(self) -> list[tuple[int, int]]:
        """(row, k) offsets from (groupID, threadID_in_group) of a lane's A elements, in register
        order (two per register for bf16, low half first).  bf16's k are permuted, 2t+h -> t+4h
        in each half of the 16, in A and B alike: the dot product is unchanged and a lane's loads
        stay on distinct banks."""
        if self.precision == "tf32":
            return [(8 * (e % 2), 4 * (e // 2)) for e in range(4)]
        return [(8 * (e // 2 % 2), 4 * (e % 2) + 8 * (e // 4)) for e in range(8)]

    @property
    def b_elems(self) -> list[tuple[int, int]]:
        """(column, k) offsets of a lane's B elements, in register order, as a_elems."""
        if self.precision == "tf32":
            return [(0, 4 * e) for e in range(2)]
        return [(0, 4 * (e % 2) + 8 * (e // 2)) for e in range(4)]

    @property
    def per_register(self) -> int:
        return 1 if self.precision == "tf32" else 2


def mma_math(k: Kernel) -> tuple[str, str] | None:
    """("mma..." or "simt", why) for a GEMM-family kernel of a reduced precision; None for fp32
    (and for other ops), whose kernels are the SIMT ones, unchanged."""
    spec = OPS[k.op]
    precision = param(k.params, "precision") if spec.gemm else None
    if precision not in MMA_SHAPES:
        return None
    K = spec.gemm(k.params)["K"]
    if K < MMA_MIN_K:
        return "simt", f"K={K} < {MMA_MIN_K}: SIMT with {precision}-rounded operands"
    return MMA_SHAPES[precision][0], f"tensor cores, {precision} operands, fp32 accumulation"


def choose_mma_tiles(M: int, N: int, batch: int, precision: str) -> MmaTiles:
    """The largest block tile that still gives MMA_MIN_BLOCKS work-groups, else the smallest
    (the most work-groups a small GEMM can have)."""
    for BM, BN, WM, WN in _MMA_BLOCKS:
        if -(-M // BM) * -(-N // BN) * batch >= MMA_MIN_BLOCKS:
            break
    return MmaTiles(BM, BN, 16, WM, WN, 2, precision)


def geometry(k: Kernel, d: Dialect) -> tuple[dict, object]:
    """(launch = {"grid": [...], "block": [...]}, tiles-or-threads object for the template)."""
    spec = OPS[k.op]
    math = mma_math(k)
    if math and d.vector_width:         # a CPU's OpenCL: the emulated fragments would only cost
        math = ("simt", f"CPU target: SIMT with {param(k.params, 'precision')}-rounded operands")
    if math and math[0] != "simt":
        g = spec.gemm(k.params)
        t = choose_mma_tiles(g["M"], g["N"], g.get("batch", 1), param(k.params, "precision"))
        grid = [-(-g["N"] // t.BN), -(-g["M"] // t.BM), g.get("batch", 1)]
        return {"grid": grid, "block": [t.threads, 1, 1], "math": math[0]}, t
    if spec.gemm:
        g = spec.gemm(k.params)
        t = choose_tiles(g["M"], g["N"], g["K"], d)
        grid = [-(-g["N"] // t.BN), -(-g["M"] // t.BM), g.get("batch", 1)]
        launch = {"grid": grid, "block": [t.threads, 1, 1]}
        if math:                        # a reduced precision on the SIMT kernel: say why
            launch.update(math="simt", math_reason=math[1])
        return launch, t
    if spec.family == "reduce":
        n = d.reduce_threads
        return {"grid": [spec.elements(k.params), 1, 1], "block": [n, 1, 1]}, _Threads(n)
    n = d.threads_1d
    return {"grid": [-(-spec.elements(k.params) // n), 1, 1], "block": [n, 1, 1]}, _Threads(n)


@dataclass(frozen=True)
class _Threads:
    threads: int


# --- index width ---------------------------------------------------------------------------

# the largest value of C's 32-bit int: a kernel reaching past it indexes in 64 bits
INT_MAX = 2**31 - 1


def position_reach(k: Kernel, launch: dict, t) -> int:
    """An upper bound on the positions kernel `k`'s launch walks, which round the last tile or
    work-group up past the last element: a work-item's index, or a GEMM's row, column and
    reduction index, each on its own."""
    if isinstance(t, (Tiles, MmaTiles)):
        return max(launch["grid"][1] * t.BM, launch["grid"][0] * t.BN, OPS[k.op].gemm(k.params)["K"] + t.BK)
    if isinstance(t, (CpuTiles, CpuLoops)):
        return launch["grid"][0] * t.chunk
    return math.prod(launch["grid"]) * math.prod(launch["block"])


def index_reach(k: Kernel, launch: dict, t) -> int:
    """An upper bound on the indices and offsets kernel `k` forms: its positions, or the elements
    of its largest buffer (the op record's sizes; offsets are formed only inside the buffers)."""
    return max(position_reach(k, launch, t), *OPS[k.op].sizes(k.params).values())


def index_type(k: Kernel, d: Dialect, launch: dict, t, wide: bool = False) -> str:
    """The C type of kernel `k`'s indices and offsets: `int`, unless what it reaches exceeds
    2^31-1 (or `wide` forces it, to test that path on small shapes); then the dialect's 64-bit
    integer, which only such kernels pay for."""
    return d.int64 if wide or index_reach(k, launch, t) > INT_MAX else "int"


def position_type(k: Kernel, d: Dialect, launch: dict, t) -> str:
    """The C type of a GEMM's row, column and reduction indices: `int` unless they pass 2^31-1,
    even where offsets need 64 bits (`index_type`), so the divisions that split them into case,
    channel and pixel stay 32-bit; the templates widen them where they scale a stride."""
    return d.int64 if position_reach(k, launch, t) > INT_MAX else "int"


# --- the CPU target ----------------------------------------------------------------------
# On a CPU, PoCL runs a work-group as a loop over its work-items on one thread and keeps values
# that live across a barrier in memory; its vectoriser gives up on reduction loops.  So the CPU
# kernels are work-groups of one work-item, without barriers, whose register block is written
# out in OpenCL vector types: the vectors run over the outputs whose weights are contiguous in a
# packed panel, and each input value is broadcast to them.

# the vector registers a CPU of each width has (AVX-512: 32; AVX2 and SSE: 16)
_CPU_REGISTERS = {16: 32, 8: 16, 4: 16}
# bytes of work-group memory a packed weight panel may take: well within what CPU devices offer
_CPU_PANEL_BYTES = 256 * 1024
# work-groups to aim for, so that every core has several to balance
_CPU_WORK_GROUPS = 32


@dataclass(frozen=True)
class CpuTiles:
    """A CPU kernel's blocking: `vectors` vectors of `width` outputs (lanes) times up to
    `columns` broadcast columns held in registers, `chunk` units (conv: output rows, fc: cases)
    per work-group, and the reduction walked as `outer` steps of `unroll` (compile-time) indices."""
    width: int
    vectors: int
    columns: int
    chunk: int
    outer: int
    unroll: int

    @property
    def lanes(self) -> int:
        return self.width * self.vectors


def _cpu_gemm(op: str, p: dict, g: dict) -> tuple[int, int, int, int]:
    """(lanes, units, columns per unit, reduction unroll) of a CPU kernel.  A convolution is
    vectorised over the GEMM's M (filters; channels for bwd_data) and walks output rows of
    pixels (bwd_filter: pairs of channel and filter row, summing over output rows); an fc op is vectorised over the GEMM's N and walks its M, one column each.  The
    GEMM itself is the op registry's.  A local op is one GEMM per site (_cpu_gemm_of), vectorised
    over its M and walking its N."""
    if op == "conv_fwd":
        return g["M"], p["N"] * p["P"], p["Q"], p["S"]
    if op == "conv_bwd_data":
        return g["M"], p["N"] * p["H"], p["W"], p["S"]
    if op == "conv_bwd_filter":     # units: (channel, filter row) pairs, columns: filter columns
        return g["M"], p["C"] // param(p, "groups") * p["R"], p["S"], 1
    if op in _CPU_LOCAL_OPS:
        return g["M"], g["N"], g["N"], 1
    return g["N"], g["M"], g["M"], next(u for u in (4, 2, 1) if g["K"] % u == 0)


# the locally connected layers' ops: a small GEMM per site, in templates/cpu_local.j2
_CPU_LOCAL_OPS = ("local_fwd", "local_bwd_data", "local_bwd_filter")
# The ops with a CPU kernel
_CPU_OPS = frozenset({"conv_fwd", "conv_bwd_data", "conv_bwd_filter", "fc_fwd", "fc_bwd_data", "fc_bwd_filter",
                      *_CPU_LOCAL_OPS})
# the ops with a CPU template of their own; the others' is cpu_gemm.j2
_CPU_TEMPLATES = {"conv_bwd_filter": "cpu_conv_bwd_filter.j2", **{op: "cpu_local.j2" for op in _CPU_LOCAL_OPS}}


def _cpu_gemm_of(k: Kernel) -> dict:
    """The GEMM a CPU kernel blocks: the op registry's, or for local_bwd_data, a gather on the
    GPU, one per input pixel (batch): M = channels, N = cases, K = (filter, tap) pairs, of which
    the pairs whose window covers the pixel count."""
    if k.op == "local_bwd_data":
        p = k.params
        return dict(M=p["C"], N=p["N"], K=p["K"] * p["R"] * p["S"], batch=p["H"] * p["W"])
    return OPS[k.op].gemm(k.params)


def _cpu_local_bytes(k: Kernel, t: CpuTiles) -> int:
    """Work-group memory a CPU kernel takes: the packed weight panel (local_fwd, local_bwd_data:
    and each step's source offset), or for a conv weight gradient one row of packed dy and the
    sums of its (channel, filter row) pairs."""
    if k.op == "conv_bwd_filter":
        return (k.params["Q"] + t.chunk * k.params["S"]) * t.lanes * 4
    if k.op in ("local_fwd", "local_bwd_data"):        # offsets: 64-bit at most
        return (t.lanes + 2) * _cpu_gemm_of(k)["K"] * 4
    return t.lanes * _cpu_gemm_of(k)["K"] * 4


@dataclass(frozen=True)
class CpuLoops:
    """A loop-shaped CPU kernel's blocking (pooling, normalisation): `chunk` of its `units` per
    work-group, a unit being an image plane, or for cmrnorm `width` pixels of one case's
    channel planes (vectorised over them)."""
    width: int
    units: int
    chunk: int


# the ops whose CPU kernel walks planes or pixel vectors rather than a GEMM, and its template
_CPU_LOOP_TEMPLATES = {"pool_fwd": "cpu_pool.j2", "pool_bwd": "cpu_pool.j2",
                       **{op: "cpu_norm.j2" for op in ("cmrnorm_fwd", "cmrnorm_bwd", "rnorm_fwd", "rnorm_bwd",
                                                       "cnorm_meandiff", "cnorm_fwd", "cnorm_bwd_prep", "cnorm_bwd")}}


def _cpu_loops(k: Kernel, width: int) -> CpuLoops:
    p = k.params
    if k.op.startswith("cmrnorm"):
        units = p["N"] * -(-(p["H"] * p["W"]) // width)
    else:
        units = p["N"] * p["C"]
    return CpuLoops(width, units, -(-units // _CPU_WORK_GROUPS))


def _cpu_loop_local_bytes(k: Kernel, width: int) -> int:
    """Work-group memory a loop-shaped CPU kernel takes: an accumulating pooling gradient's
    sums over one plane (one that overwrites dx sums in dx), a cross-map normalisation
    gradient's per-channel terms of one unit, or a same-map one's per-pixel terms of a plane."""
    if k.op == "pool_bwd" and k.params.get("accumulate"):
        return k.params["H"] * k.params["W"] * 4
    if k.op == "cmrnorm_bwd":
        return k.params["C"] * (width + 1) * 4
    if k.op in ("rnorm_fwd", "rnorm_bwd", "cnorm_fwd", "cnorm_bwd_prep", "cnorm_bwd"):
        return k.params["H"] * k.params["W"] * 4
    return 0


def cpu_kernel(k: Kernel, width: int) -> bool:
    """Does kernel `k` get a CPU-shaped kernel at this vector width?  The conv, fc, local, pooling
    and normalisation ops do when what they keep fits in work-group memory; every other
    kernel runs its GPU-shaped OpenCL kernel on the CPU too."""
    if k.op in _CPU_LOOP_TEMPLATES:
        return _cpu_loop_local_bytes(k, width) <= _CPU_PANEL_BYTES
    if k.op not in _CPU_OPS:
        return False
    return _cpu_local_bytes(k, _cpu_tiles(k, width)) <= _CPU_PANEL_BYTES


def _cpu_tiles(k: Kernel, width: int) -> CpuTiles:
    g = _cpu_gemm_of(k)
    lanes, units, columns, unroll = _cpu_gemm(k.op, k.params, g)
    registers = _CPU_REGISTERS[width]
    vectors = 2 if lanes > width and registers >= 32 else 1
    # accumulators and the weight vectors within the registers, and at most 8 columns: PoCL
    # keeps a loaded input value live across taps, and wider blocks measured slower (spills)
    most = max(1, min(columns, (registers - vectors - 2) // vectors, 8))
    block = -(-columns // -(-columns // most))          # segments of a row as equal as they can be
    lane_blocks = -(-lanes // (width * vectors))
    groups = max(1, -(-_CPU_WORK_GROUPS // (lane_blocks * g.get("batch", 1))))
    return CpuTiles(width, vectors, block, -(-units // groups), g["K"] // unroll, unroll)


def plan_cpu_width(kernels) -> int:
    """The vector width a plan's CPU kernels were generated for (0: it has none)."""
    return max((k.launch[OPENCL_CPU_NAME]["width"] for k in kernels if OPENCL_CPU_NAME in k.launch), default=0)


def cpu_geometry(k: Kernel, width: int) -> tuple[dict, CpuTiles | CpuLoops]:
    """A CPU kernel's launch: grid (chunks of units, lane blocks, groups), one work-item each."""
    if k.op in _CPU_LOOP_TEMPLATES:
        loops = _cpu_loops(k, width)
        return {"grid": [-(-loops.units // loops.chunk), 1, 1], "block": [1, 1, 1], "width": width}, loops
    t = _cpu_tiles(k, width)
    g = _cpu_gemm_of(k)
    lanes, units, _, _ = _cpu_gemm(k.op, k.params, g)
    grid = [-(-units // t.chunk), -(-lanes // t.lanes), g.get("batch", 1)]
    return {"grid": grid, "block": [1, 1, 1], "width": width}, t


# --- rendering -----------------------------------------------------------------------

def signature(op: str, d: Dialect) -> str:
    """The kernel's parameters: its buffers, then the step-scalar buffer its runtime scalars are in."""
    roles = dict(OPS[op].args)
    parts = []
    for name in OPS[op].kernel_args:
        if name == SCALARS_ARG:
            parts.append(f"{d.int_ptr(const=True)}{name}")
        elif name in INT_BUFFERS:
            parts.append(f"{d.int_ptr(const=roles[name] is Role.IN)}{name}")
        else:
            parts.append(f"{d.ptr(const=roles[name] is Role.IN)}{name}")
    return ", ".join(parts)


def read_step_scalars(k: Kernel, d: Dialect) -> str:
    """Declarations of kernel `k`'s runtime scalars, each read from its slot of the step-scalar
    buffer (slots are plan-time constants, so a launch's arguments never change)."""
    spec = OPS[k.op]
    reads = []
    for (name, role), slot in zip(spec.step_scalars, spec.slots(k.params)):
        if SCALAR_DTYPES[role] == "f32":
            reads.append(f"const float {name} = {d.int_as_float}({SCALARS_ARG}[{slot}]);")
        else:
            reads.append(f"const int {name} = {SCALARS_ARG}[{slot}];")
    return "\n    ".join(reads)


def _split_k_note(g: dict) -> list[str]:
    if g.get("split", 1) == 1:
        return []
    return [f"split-K: grid z = {g['split']} slices of {g['split_k']} of the reduction, each writing its own partial sum"]


def render_kernel(k: Kernel, d: Dialect, file: str = "", source_line: str = "",
                  wide_index: bool = False) -> tuple[str, dict]:
    """The source of one kernel in one dialect, and its launch geometry; `wide_index` gives it
    64-bit indices and offsets whatever its size (`index_type`)."""
    if not _IDENTIFIER.fullmatch(k.name):      # layer names are identifiers, and so are the planner's tags
        raise ValueError(f"kernel name {k.name!r} is not a C identifier")
    cpu = bool(d.vector_width) and cpu_kernel(k, d.vector_width)
    launch, t = cpu_geometry(k, d.vector_width) if cpu else geometry(k, d)
    if max(launch["grid"]) > INT_MAX:      # 64-bit indices reach further than a launch's grid
        raise CompileError(Diagnostic(f"layer '{k.layer}' needs {max(launch['grid'])} work-groups in one launch "
                                      f"of its kernel {k.name}, more than 2^31-1", file,
                                      Span.point(k.line, 1) if k.line else None, "make the batch or the layer smaller"))
    notes = []
    spec = OPS[k.op]
    if cpu and isinstance(t, CpuLoops):
        g = {}
        unit = f"float{t.width} vectors of a case's pixels" if k.op.startswith("cmrnorm") else "image planes"
        notes.append(f"CPU: {unit}, {t.chunk} per work-item")
    elif cpu:
        g = _cpu_gemm_of(k)
        units = {"conv_bwd_filter": "(channel, filter row) pairs", "local_bwd_filter": "filter taps"}.get(
            k.op, "output rows" if k.op.startswith("conv") else "cases" if k.op in _CPU_LOCAL_OPS else "columns")
        notes.append(f"CPU: GEMM M={g['M']} N={g['N']} K={g['K']}; {t.vectors} x float{t.width} outputs x "
                     f"{t.columns} broadcast columns in registers, {t.chunk} {units} per work-item")
        notes += _split_k_note(g)
    elif spec.gemm and isinstance(t, MmaTiles):
        g = spec.gemm(k.params)
        notes.append(f"GEMM M={g['M']} N={g['N']} K={g['K']}; {mma_math(k)[1]}: block tile {t.BM}x{t.BN}x{t.BK} "
                     f"in {t.stages} stages, {t.WM}x{t.WN} warps of {t.MI * 16}x{t.NI * 8}, {t.threads} threads")
        notes += _split_k_note(g)
    elif spec.gemm:
        g = spec.gemm(k.params)
        notes.append(f"GEMM M={g['M']} N={g['N']} K={g['K']}; block tile {t.BM}x{t.BN}x{t.BK}, "
                     f"{t.TM}x{t.TN} per thread, {t.threads} threads")
        if "math_reason" in launch:
            notes.append(f"not on tensor cores: {launch['math_reason']}")
        if g.get("split", 1) > 1:
            notes += _split_k_note(g)
        elif "batch" in g:
            what = "group" if k.op.startswith("conv") else "output position"
            notes.append(f"{g['batch']} independent GEMMs, one per {what} (grid z)")
    else:
        g = {}
    index = index_type(k, d, launch, t, wide_index)
    if index != "int":
        reach = index_reach(k, launch, t)
        notes.append(f"64-bit indices: it reaches {reach} elements" + ("" if reach > INT_MAX else " (forced)"))
    neuron = Neuron.from_json(k.params.get("neuron"))
    ctx = dict(
        k=k, p=_Params(k.params), d=d, t=t, g=_Params(g), signature=signature(k.op, d), notes=notes,
        # as_index(v): v converted to the index type (or to `type`) before it meets a product
        index_type=index, as_index=lambda v, type=index: str(v) if type == "int" else f"({type}){v}",
        position_type=position_type(k, d, launch, t),
        file=file, source_line=source_line, lit=lit,
        neuron_fwd=lambda var: neuron_expr(neuron, neuron.kind.forward_c, var, "x", d),
        neuron_grad=lambda var: neuron_expr(neuron, neuron.kind.grad_c, var, "y", d),
        neuron_grad_x=lambda var: neuron_expr(neuron, neuron.kind.grad_x_c, var, "x", d),
        power=lambda base, exponent: power(base, exponent, d), norm_add_scale=norm_add_scale, param=param,
        runtime_text=lambda name: (resource_dir("runtime") / name).read_text(),
        threshold=dropout_threshold(k.params["keep"]) if "keep" in k.params else None,
        summed=k.params.get("accumulate", False) or not k.params.get("bias", True),
        summed_pre=lambda old, bias: summed_pre(k.params, old, bias),
        global_case=lambda var: global_case(k.params, var),
        step_scalars=read_step_scalars(k, d),
        # stage(v): a GEMM operand as the kernel's precision stages it (v itself for fp32)
        stage=lambda value: stage_expr(param(k.params, "precision"), value),
    )
    try:
        template = (_CPU_LOOP_TEMPLATES.get(k.op) or _CPU_TEMPLATES.get(k.op, "cpu_gemm.j2")) if cpu \
            else f"{spec.family}.j2"
        env = _mma_env() if isinstance(t, MmaTiles) else _env()
        text = env.get_template(template).render(**ctx)
    except ConstantRangeError as e:
        raise CompileError(Diagnostic(f"layer '{k.layer}' needs the constant {e.args[0]:g} in its kernel "
                                      f"{k.name}, more than a 32-bit float holds", file,
                                      Span.point(k.line, 1) if k.line else None)) from None
    return text, launch


class _Params(dict):
    """Attribute access for template readability: p.K instead of p['K']."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def render_source(kernels: list[Kernel], d: Dialect, file: str, source: str, title: str,
                  wide_index: bool = False) -> tuple[str, dict]:
    """A whole translation unit (prelude + kernels) and each kernel's launch geometry; `wide_index`
    gives every kernel 64-bit indices and offsets (tests run that code on small shapes)."""
    lines = source_lines(source)
    prelude = (resource_dir("runtime") / d.prelude).read_text()
    chunks = [f"// {comment_text(title)}\n// Generated by cnnc from {comment_text(file)}; "
              f"every kernel below names the line it implements.\n", prelude]
    launches = {}
    for k in kernels:
        line = lines[k.line - 1].strip() if 0 < k.line <= len(lines) else ""
        text, launch = render_kernel(k, d, file, line, wide_index)
        chunks.append(text)
        launches[k.name] = launch
    return "\n".join(chunks), launches
