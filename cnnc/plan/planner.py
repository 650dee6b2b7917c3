"""Plan stage: checked Network → :class:`~cnnc.plan.schedule.Plan`.

Parallelism follows cuda-convnet2:

* A layer placed on R devices has R replicas.  The minibatch is cut into
  S = max(R) equal *shares*; replica j of a layer with R replicas handles
  shares j*P .. j*P+P-1, one per *pass*, where P = S / R.
* Layers with the most replicas ("high") run once per minibatch; layers
  with fewer ("low", R = S/P) run P passes, one share each (the
  round-robin exchange, cuda-convnet2's scheme).  With P = 1 every layer is
  low and there is one pass.
* Inputs that live on another device are copied in (a *mirror*); gradient
  contributions computed on another device are copied back and summed on
  the producer's device, in a fixed order.
* Replicated weights sum their gradients with a sharded reduce-scatter and
  all-gather (each replica owns 1/R of the parameter), so every replica
  applies the same update; `update_period` passes are accumulated per update.

The planner first builds one global order of ops (each tagged with its
device), then splits it into per-device programs, inserting record/wait
events wherever an op depends on another device's earlier op.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass

from cnnc.check.kinds import KINDS
from cnnc.check.placement import replication
from cnnc.plan import lowering
from cnnc.plan.memory import assign_storage
from cnnc.diagnostics import CompileError, Diagnostic
from cnnc.ir import MAX_BUFFER_ELEMENTS, Input, Layer, Network
from cnnc.ops import OPS, SCALAR_DTYPES
from cnnc.plan.schedule import Buffer, Kernel, LayerPlacement, Op, Parameter, Plan, StepScalar


@dataclass
class _Step:
    """One op of the global order."""

    device: int
    op: Op
    writes: tuple[str, ...]


class _Planner:
    def __init__(self, net: Network):
        self.net = net
        self.buffers: dict[str, Buffer] = {}
        self.kernels: dict[str, Kernel] = {}
        self.params: list[Parameter] = []
        self.params_of: dict[str, list[Parameter]] = defaultdict(list)     # layer name -> its parameters
        self.steps: list[_Step] = []
        self.grad_writes: dict[tuple[str, int], int] = defaultdict(int)
        self.mirrors: set[tuple[str, int]] = set()
        self.phase = "forward"
        self.pass_ = 0
        self.step_scalars: list[StepScalar] = []        # the plan's step-scalar table, by slot
        self.slot_of: dict[tuple, int] = {}
        self.scalar_buffers: dict[int, str] = {}        # device -> its step-scalar buffer, if it reads one
        self.analyse_replicas()

    # -- replicas, shares, passes ---------------------------------------------
    def analyse_replicas(self) -> None:
        """Take the shares, passes and stages of the replication the checker validated."""
        self.rep = rep = replication(self.net)
        self.M, self.S, self.P, self.G = rep.microbatches, rep.shares, rep.passes, rep.gather
        self.b = rep.share_cases
        self.hybrid, self.scheme, self.high = rep.hybrid, rep.scheme, rep.high
        self.multi_device = len({d for l in self.net.layers for d in l.gpus}) > 1
        layers = {l.name: l for l in self.net.layers}
        self.stages = [[layers[name] for name in stage] for stage in rep.stages]

    def passes(self, l: Layer) -> int:
        return self.rep.layer_passes(l)

    def period(self, l: Layer) -> int:
        return (l.train.update_period if l.train and l.train.update_period else self.passes(l))

    def share(self, l: Layer, j: int, p: int) -> int:
        return j * self.passes(l) + p

    def holder(self, l: Layer, s: int) -> tuple[int, int]:
        """(replica, device) of layer l that processes share s."""
        j = s // self.passes(l)
        return j, l.gpus[j]

    def pieces(self, l: Layer, j: int, p: int) -> list[tuple[int, int, int]]:
        """The cases replica j of l handles in pass p, as (share, offset in share, count) pieces.

        High layers and plain data/model parallelism: one whole share.  Low layers of a
        hybrid network, by exchange scheme (Krizhevsky 2014, §4): round_robin, one whole
        share per pass; all_gather, all of the replica's shares in one pass; scatter, a
        1/S slice of every share in each pass."""
        if l.name in self.high or not self.hybrid or self.scheme == "round_robin":
            return [(self.share(l, j, p), 0, self.b)]
        if self.scheme == "all_gather":
            return [(j * self.G + q, 0, self.b) for q in range(self.G)]
        n = self.b // self.S
        return [(r, (j * self.P + p) * n, n) for r in range(self.S)]

    def cases(self, l: Layer) -> int:
        return sum(c for _, _, c in self.pieces(l, 0, 0))

    def piece_tag(self, pieces: list[tuple[int, int, int]]) -> str:
        if len(pieces) == 1 and pieces[0][1:] == (0, self.b):
            return f".s{pieces[0][0]}" if self.S > 1 else ""
        if all(o == 0 for _, o, _ in pieces):
            return f".s{pieces[0][0]}to{pieces[-1][0]}"
        return f".slice{pieces[0][1]}"

    def case_ranges(self, pieces) -> tuple[tuple[int, int], ...]:
        return tuple((s * self.b + o, c) for s, o, c in pieces)

    def same_level(self, a: Layer, b: Layer) -> bool:
        return (a.name in self.high) == (b.name in self.high)

    def slots(self, l: Layer) -> int:
        """How many micro-batches' activations a layer keeps: all of them for GPipe; for 1F1B
        at most the number of stages from this one to the last (micro-batches in flight)."""
        if self.M == 1:
            return 1
        if self.net.settings.get("pipeline", "gpipe") == "one_f_one_b":
            k = next(i for i, st in enumerate(self.stages) if l in st)
            return min(self.M, len(self.stages) - k)
        return self.M

    def slot(self, l: Layer) -> str:
        n = self.slots(l)
        return f".m{self.pass_ % n}" if n > 1 else ""

    # -- buffers ---------------------------------------------------------------
    def buffer(self, id: str, device: int, size: int, role: str, layer: str, dtype: str = "f32") -> str:
        old = self.buffers.get(id)
        if old is None:
            if size > MAX_BUFFER_ELEMENTS:  # weights, scratch: the checker has bounded the activations
                span = self.net.node(layer).span if layer else None
                raise CompileError(Diagnostic(f"'{layer or id}' needs a buffer of {size} elements ({id}); a buffer "
                                              f"holds at most 2^61-1, whose bytes a 64-bit offset reaches",
                                              self.net.file, span,
                                              "make the layer smaller"), self.net.source)
            self.buffers[id] = Buffer(id, device, size, dtype, role, layer)
        else:
            assert old.device == device and old.size == size, f"buffer clash: {id}"
        return id

    def own(self, l: Layer, what: str, j: int) -> str:
        return f"{l.name}.{what}" if len(l.gpus) == 1 else f"{l.name}.{what}.r{j}"

    def tag(self, s: int | None, d: int | None) -> str:
        return (f".s{s}" if s is not None and self.S > 1 else "") + \
               (f"@{d}" if d is not None and self.multi_device else "")

    def out(self, l: Layer, j: int) -> str:
        return self.buffer(self.own(l, "out", j) + self.slot(l), l.gpus[j], self.cases(l) * l.shape.size,
                           "activation", l.name)

    def grad(self, l: Layer, j: int) -> str:
        return self.buffer(self.own(l, "grad", j) + self.slot(l), l.gpus[j], self.cases(l) * l.shape.size,
                           "gradient", l.name)

    # -- emitting ops ----------------------------------------------------------
    def emit(self, device: int, op: Op, writes: tuple[str, ...]) -> None:
        self.steps.append(_Step(device, op, writes))

    def kernel(self, name: str, op: str, params: dict, layer: Layer | None, summary: str) -> str:
        line = layer.span.line if layer is not None and layer.span else 0
        k = Kernel(name, op, params, layer.name if layer else "", line, summary)
        old = self.kernels.setdefault(name, k)
        assert old.params == params, f"kernel name clash: {name}"
        return name

    def launch(self, device: int, kernel: str, args: tuple[str, ...], writes: tuple[str, ...]) -> None:
        self.emit(device, Op("launch", kernel=kernel, args=args, phase=self.phase, pass_=self.pass_), writes)

    # -- runtime scalars ---------------------------------------------------------
    def with_slots(self, name: str, op: str, params: dict, scalars: dict) -> tuple[str, dict]:
        """The kernel (name, params) that reads an op's runtime scalars at their slots of the
        step-scalar table.  Slots other than 0, 1, ... go into the params and the name, so
        launches that share a kernel read the same slots on every device."""
        spec = OPS[op]
        slots = [self.scalar_slot(scalars[a], SCALAR_DTYPES[role]) for a, role in spec.step_scalars]
        if slots == spec.slots({}):
            return name, params
        return f"{name}_s{'_'.join(map(str, slots))}", dict(params, slots=slots)

    def scalar_slot(self, source, dtype: str) -> int:
        """The table slot of a runtime scalar (a number, a schedule dict or a counter name):
        one per distinct value source and type, so launches with the same optimiser settings
        share theirs."""
        key = (dtype, json.dumps(source, sort_keys=True) if isinstance(source, (dict, str))
               else float(source) if dtype == "f32" else int(source))
        if key not in self.slot_of:
            self.slot_of[key] = len(self.step_scalars)
            self.step_scalars.append(StepScalar(source, dtype))
        return self.slot_of[key]

    def scalars_buffer(self, device: int) -> str:
        """The id of the device's step-scalar buffer (allocated once the table is complete)."""
        return self.scalar_buffers.setdefault(device, f"scalars{self.tag(None, device)}")

    def write_step_scalars(self, program: dict[int, list[Op]]) -> None:
        """Begin each device's program that reads its step-scalar buffer with the op that writes it."""
        for dev, ops in program.items():
            buf = self.scalar_buffers.get(dev)
            if any(op.kind == "launch" and buf in op.args for op in ops):
                ops.insert(0, Op("scalars", dst=buf, phase="forward"))

    def copy(self, src: str, dst: str, count: int, src_offset: int = 0, dst_offset: int = 0) -> None:
        device = self.buffers[dst].device
        self.emit(device, Op("copy", stream="copy-in", src=src, dst=dst, count=count, src_offset=src_offset,
                             dst_offset=dst_offset, phase=self.phase, pass_=self.pass_), (dst,))

    # -- activations: where share s of a node is readable on device d ------------
    def activation(self, name: str, consumer: Layer, j: int, p: int, d: int) -> str:
        """A buffer on device d holding `name`'s output for the cases replica j of `consumer`
        handles in pass p: its own buffer, or a mirror filled by copies (or uploads, for inputs)."""
        node = self.net.node(name)
        pieces = self.pieces(consumer, j, p)
        per_case = node.shape.size
        if isinstance(node, Input):
            dtype, role = ("i32", "labels") if node.kind == "labels" else ("f32", "input")
            buf = self.buffer(f"{name}.out{self.piece_tag(pieces)}{self.tag(None, d)}", d,
                              sum(c for _, _, c in pieces) * per_case, role, name, dtype)
            if (buf, -1) not in self.mirrors:          # one buffer per set of cases: uploaded once per minibatch
                self.mirrors.add((buf, -1))
                self.emit(d, Op("upload", stream="copy-in", input=name, cases=self.case_ranges(pieces), dst=buf,
                                phase=self.phase, pass_=self.pass_), (buf,))
            return buf
        if self.same_level(node, consumer):             # replica j of the one reads replica j of the other
            src, home = self.out(node, j), node.gpus[j]
            if home == d:
                return src
            once = name in self.high or self.P == 1
            tag = self.piece_tag(pieces) if once else self.slot(node)
            mirror = self.buffer(f"{name}.out{tag}@{d}", d, self.cases(node) * per_case, "mirror", name)
            key = (mirror, -1 if once else self.pass_)
            if key not in self.mirrors:
                self.mirrors.add(key)
                self.copy(src, mirror, self.cases(node) * per_case)
            return mirror
        if len(pieces) == 1 and pieces[0][1:] == (0, self.b):     # a whole share of a high layer
            jn, home = self.holder(node, pieces[0][0])
            if home == d:
                return self.out(node, jn)
        mirror = self.buffer(f"{name}.out{self.piece_tag(pieces)}@{d}", d, sum(c for _, _, c in pieces) * per_case,
                             "mirror", name)
        if (mirror, -1) not in self.mirrors:
            self.mirrors.add((mirror, -1))
            at = 0
            for s, o, c in pieces:
                jn, _ = self.holder(node, s)
                self.copy(self.out(node, jn), mirror, c * per_case, src_offset=o * per_case, dst_offset=at)
                at += c * per_case
        return mirror

    def contribution(self, name: str, consumer: Layer, j: int, p: int, d: int):
        """Where replica j of `consumer` (on device d, pass p) writes its gradient for `name`.

        Returns (buffer, accumulate, finish); `finish()` must be called after the
        consumer's kernel to move a contribution made elsewhere home, adding it to
        what earlier consumers contributed, in a fixed order."""
        node = self.net.node(name)
        pieces = self.pieces(consumer, j, p)
        per_case = node.shape.size
        if self.same_level(node, consumer) or (len(pieces) == 1 and pieces[0][1:] == (0, self.b)):
            jn = j if self.same_level(node, consumer) else self.holder(node, pieces[0][0])[0]
            target, home = self.grad(node, jn), node.gpus[jn]
            key = self.grad_key(node, target)
            if home == d:
                acc = self.written(node, target)
                self.grad_writes[key] += 1
                return target, acc, lambda: None
            size = self.cases(node) * per_case
            temp = self.buffer(f"{name}.grad{self.piece_tag(pieces)}{self.slot(node)}{self.tag(None, d)}", d, size,
                               "staging", name)

            def finish():
                if not self.written(node, target):
                    self.copy(temp, target, size)
                else:
                    inbox = self.buffer(f"{name}.grad.in{self.slot(node)}{self.tag(None, home)}", home, size,
                                        "staging", name)
                    self.copy(temp, inbox, size)
                    k = self.kernel(f"add_n{size}", "eltsum_fwd", dict(n=size, coeff=1.0, accumulate=True), None,
                                    f"add a gradient contribution of {size} values")
                    self.launch(home, k, (inbox, target), (target,))
                self.grad_writes[key] += 1
            return temp, False, finish
        # several pieces of a high layer's shares (all_gather / scatter exchange)
        temp = self.buffer(f"{name}.grad{self.piece_tag(pieces)}{self.tag(None, d)}", d,
                           sum(c for _, _, c in pieces) * per_case, "staging", name)

        def finish_pieces():
            at = 0
            for s, o, c in pieces:
                jn, home = self.holder(node, s)
                target, n = self.grad(node, jn), c * per_case
                if not self.written(node, target, o):
                    self.copy(temp, target, n, src_offset=at, dst_offset=o * per_case)
                else:                       # target[o..] = target[o..] + piece, in that order
                    stage = self.buffer(f"{name}.grad.in{n}{self.tag(None, home)}", home, 2 * n, "staging", name)
                    self.copy(target, stage, n, src_offset=o * per_case)
                    self.copy(temp, stage, n, src_offset=at, dst_offset=n)
                    k = self.kernel(f"replica_sum_r2_n{n}_at{o * per_case}", "replica_sum",
                                    dict(R=2, n=n, offset=o * per_case), None, f"add a gradient piece of {n} values")
                    self.launch(home, k, (stage, target), (target,))
                self.regions.setdefault(target, set()).add(o)
                at += n
        return temp, False, finish_pieces

    def written(self, node: Layer, target: str, region: int | None = None) -> bool:
        """Has anything been written to this gradient buffer (or to this region of it) yet?"""
        regions = self.regions.get(target, set())
        whole = self.grad_writes[self.grad_key(node, target)] > 0
        return whole or (region in regions if region is not None else bool(regions))

    def grad_key(self, node: Layer, target: str) -> tuple[str, int]:
        """Counts contributions to a gradient buffer: per pass for layers that run every pass,
        once per minibatch for those that run once."""
        return target, -1 if node.name in self.high else self.pass_

    # -- the plan ----------------------------------------------------------------
    def build(self) -> Plan:
        for l in self.net.layers:
            if KINDS[l.kind].has_weights:
                self.declare_parameters(l)
        train = self.schedule(training=True)
        self.parameter_checks()              # appends to the training program just scheduled
        test = self.schedule(training=False)
        return self.assemble(train, test)

    def schedule(self, training: bool) -> list[_Step]:
        """The global order of one program: the training step, or the forward-only test pass."""
        self.steps, self.mirrors, self.grad_writes = [], set(), defaultdict(int)
        self.regions: dict[str, set[int]] = {}
        self.training = training
        needs = self.trainable_upstream()
        if self.M > 1:
            return self.pipeline_schedule(training, needs)
        high = [l for l in self.net.layers if l.name in self.high]
        low = [l for l in self.net.layers if l.name not in self.high]
        self.phase, self.pass_ = "forward", 0
        for l in high:
            for j, d in enumerate(l.gpus):
                self.forward(l, j, 0, d)
        for p in range(self.P):
            self.pass_ = p
            self.phase = "forward"
            for l in low:
                for j, d in enumerate(l.gpus):
                    self.forward(l, j, p, d)
            if not training:
                continue
            self.phase = "backward"
            for l in reversed(low):
                for j, d in enumerate(l.gpus):
                    self.backward(l, j, p, d, needs)
            for l in low:
                if l.train and (p + 1) % self.period(l) == 0:
                    self.update(l, p)
        if training:
            self.pass_ = self.P - 1          # the layers that run once go on after the last pass
            self.phase = "backward"
            for l in reversed(high):
                for j, d in enumerate(l.gpus):
                    self.backward(l, j, 0, d, needs)
            for l in high:
                if l.train:
                    self.update(l, self.P - 1)
        return self.steps

    def pipeline_schedule(self, training: bool, needs: set[str]) -> list[_Step]:
        """Micro-batches flowing through the stages, in GPipe order (all forwards, then all
        backwards) or 1F1B order (after a warm-up, one forward and one backward in turn).

        Each stage's sequence is fixed by the order; the global order interleaves the
        stages as early as their inputs allow, so the per-device programs overlap."""
        K, M = len(self.stages), self.M
        order = self.net.settings.get("pipeline", "gpipe")
        sequences = []
        for k in range(K):
            if not training:
                seq = [("F", m) for m in range(M)]
            elif order == "one_f_one_b":
                warm = min(M, K - k - 1)
                seq = [("F", m) for m in range(warm)]
                for m in range(M - warm):
                    seq += [("F", warm + m), ("B", m)]
                seq += [("B", m) for m in range(M - warm, M)]
            else:
                seq = [("F", m) for m in range(M)] + [("B", m) for m in range(M)]
            sequences.append(seq)
        done: set[tuple[str, int, int]] = set()
        position = [0] * K
        while any(position[k] < len(sequences[k]) for k in range(K)):
            progressed = False
            for k in range(K):
                if position[k] == len(sequences[k]):
                    continue
                what, m = sequences[k][position[k]]
                ready = (("F", k - 1, m) in done or k == 0) if what == "F" else \
                    (("F", k, m) in done and (k == K - 1 or ("B", k + 1, m) in done))
                if not ready:
                    continue
                self.pass_ = m
                if what == "F":
                    self.phase = "forward"
                    for l in self.stages[k]:
                        for j, d in enumerate(l.gpus):
                            self.forward(l, j, m, d)
                else:
                    self.phase = "backward"
                    for l in reversed(self.stages[k]):
                        for j, d in enumerate(l.gpus):
                            self.backward(l, j, m, d, needs)
                done.add((what, k, m))
                position[k] += 1
                progressed = True
            assert progressed, "pipeline schedule deadlocked"
        if training:
            self.pass_ = M - 1
            for l in self.net.layers:
                if l.train:
                    self.update(l, M - 1)
        return self.steps

    def trainable_upstream(self) -> set[str]:
        """Layers that have weights, or have a layer with weights upstream: they need gradients."""
        out: set[str] = set()
        for l in self.net.layers:
            if KINDS[l.kind].has_weights or any(i in out for i in l.inputs):
                out.add(l.name)
        return out

    # -- parameters ------------------------------------------------------------------
    def declare_parameters(self, l: Layer) -> None:
        for what, shape in lowering.parameter_shapes(l).items():
            size = 1
            for n in shape:
                size *= n
            init = {"const": l.train.init_b} if what == "biases" else {"normal": l.train.init_w}
            bufs, grads, incs = [], [], []
            for j, d in enumerate(l.gpus):
                bufs.append(self.buffer(self.own(l, what, j), d, size, "biases" if what == "biases" else "weights",
                                        l.name))
                grads.append(self.buffer(self.own(l, what + ".grad", j), d, size, "weight_grad", l.name))
                incs.append(self.buffer(self.own(l, what + ".inc", j), d, size, "momentum", l.name))
            self.params.append(Parameter(l.name, what, tuple(bufs), tuple(grads), tuple(incs), shape, init,
                                         len(self.params)))
            self.params_of[l.name].append(self.params[-1])

    def site(self, l: Layer, j: int, d: int, p: int) -> lowering.Site:
        """Replica j of l on device d in pass p: its buffers and a way to launch kernels."""
        mine = self.params_of[l.name]

        def emit(name, op, params, args, writes, summary, **scalars):
            if scalars:
                name, params = self.with_slots(name, op, params, scalars)
                args = args + (self.scalars_buffer(d),)
            self.launch(d, self.kernel(name, op, params, l, summary), args, writes)
        def alloc(what: str, size: int, dtype: str = "f32") -> str:
            return self.buffer(self.own(l, what, j) + self.slot(l), d, size, "scratch", l.name, dtype)
        out = self.out(l, j) if not KINDS[l.kind].is_cost else ""
        return lowering.Site(l, d, self.cases(l), [self.activation(i, l, j, p, d) for i in l.inputs], out,
                             {q.name: q.buffers[j] for q in mine}, {q.name: q.grads[j] for q in mine}, emit,
                             self.training, alloc, self.case_ranges(self.pieces(l, j, p)))

    # -- forward ---------------------------------------------------------------------
    def forward(self, l: Layer, j: int, p: int, d: int) -> None:
        site = self.site(l, j, d, p)
        if KINDS[l.kind].is_cost:
            loss, correct = self.cost_outputs(l, j, p)
            lowering.COST_FORWARD[l.kind](site, loss, correct)
        else:
            lowering.FORWARD[l.kind](site)

    def cost_outputs(self, l: Layer, j: int, p: int) -> tuple[str, str]:
        tag, d, n = self.piece_tag(self.pieces(l, j, p)), l.gpus[j], self.cases(l)
        return (self.buffer(f"{l.name}.loss{tag}", d, n, "cost", l.name),
                self.buffer(f"{l.name}.correct{tag}", d, n, "cost", l.name))

    # -- backward --------------------------------------------------------------------
    def backward(self, l: Layer, j: int, p: int, d: int, needs: set[str]) -> None:
        if KINDS[l.kind].is_cost:
            self.backward_cost(l, j, p, d, needs)
            return
        if l.name not in needs:
            return
        dy = self.grad(l, j)
        if not self.written(l, dy):
            return          # its output reaches no cost
        if l.kind == "softmax" and self.fused_with_cost(l):
            return          # differentiated together with the cost
        site = self.site(l, j, d, p)
        lowering.neuron_backward(site, dy)
        if KINDS[l.kind].has_weights:
            lowering.weight_gradients(site, dy, accumulate=p % self.period(l) != 0)
        targets, finishes = self.gradient_targets(l.inputs, l, j, p, d, needs)
        lowering.BACKWARD[l.kind](site, dy, targets)
        for finish in finishes:
            finish()

    def gradient_targets(self, names, consumer: Layer, j: int, p: int, d: int, needs: set[str]):
        """For each input: (buffer, accumulate) where the consumer writes its gradient, or None
        when that input needs none; and the finish() calls that move contributions home."""
        targets, finishes = [], []
        for name in names:
            if name in needs:
                dx, acc, finish = self.contribution(name, consumer, j, p, d)
                targets.append((dx, acc))
                finishes.append(finish)
            else:
                targets.append(None)
        return targets, finishes

    def fused_with_cost(self, softmax: Layer) -> bool:
        """A softmax whose only consumer is a cost that can be differentiated through it."""
        consumers = self.net.consumers(softmax.name)
        return (len(consumers) == 1 and consumers[0].kind in lowering.FUSES_SOFTMAX
                and consumers[0].inputs[lowering.FUSES_SOFTMAX[consumers[0].kind]] == softmax.name)

    def backward_cost(self, l: Layer, j: int, p: int, d: int, needs: set[str]) -> None:
        site = self.site(l, j, d, p)
        fused = None
        if l.kind in lowering.FUSES_SOFTMAX:
            probs = self.net.node(l.inputs[lowering.FUSES_SOFTMAX[l.kind]])
            if isinstance(probs, Layer) and probs.kind == "softmax" and self.fused_with_cost(probs):
                fused = probs
        names = [fused.inputs[0] if fused is not None and name == fused.name else name for name in l.inputs]
        targets, finishes = self.gradient_targets(names, l, j, p, d, needs)
        if any(targets):
            lowering.COST_BACKWARD[l.kind](site, targets, fused.name if fused is not None else None)
        for finish in finishes:
            finish()

    # -- exchange and update -----------------------------------------------------------
    def update(self, l: Layer, p: int) -> None:
        t = l.train
        cases = self.cases(l) * len(l.gpus) * self.period(l)
        for q in self.params_of[l.name]:
            if q.name == "biases":
                lr, mom, wd = t.lr_bias, t.momentum_bias, 0.0
            else:
                lr, mom, wd = t.lr, t.momentum, t.weight_decay
            self.phase = "exchange"
            self.allreduce(l, q)
            self.phase = "update"
            n = self.buffers[q.buffers[0]].size
            name, params = self.with_slots(f"sgd_update_n{n}", "sgd_update", dict(n=n), dict(
                lr=lr.to_json(), momentum=mom, weight_decay=wd, inv_cases=1.0 / cases))
            k = self.kernel(name, "sgd_update", params, None, f"momentum SGD step on {n} values")
            for j, d in enumerate(l.gpus):
                self.launch(d, k, (q.buffers[j], q.grads[j], q.incs[j], self.scalars_buffer(d)),
                            (q.buffers[j], q.incs[j]))
            if t.wball > 0 and q.name != "biases":
                layout = lowering.unit_layout(l, q.shape)
                k = self.kernel(f"{l.name}_{q.name.replace('.', '_')}_max_norm_u{layout['units']}", "max_norm",
                                dict(layout, wball=t.wball), l,
                                f"wball: scale {l.name}'s {layout['units']} units down to norm {t.wball:g}")
                for j, d in enumerate(l.gpus):
                    self.launch(d, k, (q.buffers[j],), (q.buffers[j],))

    def parameter_checks(self) -> None:
        """After the updates, every parameter buffer ORs "holds a NaN or an infinity" into its
        device's one-int flag, which the host reads with the loss: a divergence check per
        step that moves four bytes per device."""
        self.phase, self.pass_ = "check", 0
        for q in self.params:
            for buf in q.buffers:
                d, n = self.buffers[buf].device, self.buffers[buf].size
                flag = self.buffer(f"nonfinite.flag{self.tag(None, d)}", d, 1, "health", "", "i32")
                k = self.kernel(f"nonfinite_n{n}", "nonfinite", dict(n=n), None,
                                f"flag a NaN or an infinity among {n} parameter values")
                self.launch(d, k, (buf, flag), (flag,))

    def allreduce(self, l: Layer, q: Parameter) -> None:
        """Sum the replicas' gradients: reduce-scatter (replica c owns chunk c), then all-gather.

        Each chunk is summed in replica order on its owner, so the result is the
        same bit for bit on every replica."""
        R = len(l.gpus)
        if R == 1:
            return
        n = self.buffers[q.grads[0]].size
        bounds = [n * c // R for c in range(R + 1)]
        for c in range(R):
            lo, hi = bounds[c], bounds[c + 1]
            if hi == lo:
                continue
            owner = l.gpus[c]
            stage = self.buffer(f"{q.export_name}.grad.stage{self.tag(None, owner)}", owner, R * (hi - lo),
                                "staging", l.name)
            for j in range(R):
                self.copy(q.grads[j], stage, hi - lo, src_offset=lo, dst_offset=j * (hi - lo))
            k = self.kernel(f"replica_sum_r{R}_n{hi - lo}_at{lo}", "replica_sum", dict(R=R, n=hi - lo, offset=lo), None,
                            f"sum {R} replicas' gradient chunks of {hi - lo} values, in replica order")
            self.launch(owner, k, (stage, q.grads[c]), (q.grads[c],))
            for j in range(R):
                if j != c:
                    self.copy(q.grads[c], q.grads[j], hi - lo, src_offset=lo, dst_offset=lo)

    # -- programs ------------------------------------------------------------------------
    def assemble(self, train_steps: list[_Step], test_steps: list[_Step]) -> Plan:
        net = self.net
        train = split_by_device(train_steps)
        test = split_by_device(test_steps)
        for d, buf in sorted(self.scalar_buffers.items()):
            self.buffer(buf, d, len(self.step_scalars), "scalars", "", "i32")
        self.write_step_scalars(train)
        self.write_step_scalars(test)
        costs = []
        for l in net.layers:
            if KINDS[l.kind].is_cost:
                outputs = []
                for j in range(len(l.gpus)):
                    for p in range(self.passes(l)):
                        loss, correct = self.cost_outputs(l, j, p)
                        outputs.append({"loss": loss, "correct": correct,
                                        "cases": [list(c) for c in self.case_ranges(self.pieces(l, j, p))]})
                costs.append({"layer": l.name, "coeff": l.args.get("coeff", 1.0), "top_k": l.args.get("top_k", 1),
                              "outputs": outputs})
        image = next(i for i in net.inputs if i.kind == "image")
        labels = next((i for i in net.inputs if i.kind == "labels"), None)
        placements = [LayerPlacement(l.name, l.kind, l.gpus, self.passes(l),
                                     self.period(l) if l.train else 0) for l in net.layers]
        plan = Plan(net.name, net.batch, net.epochs, net.seed, self.S, self.buffers, self.kernels, self.params,
                    {"train": train, "test": test}, {i.name: i.kind for i in net.inputs}, costs, placements,
                    (image.shape.channels, image.shape.height, image.shape.width),
                    labels.classes if labels else 0, self.step_scalars)
        assign_storage(plan)
        return plan


def split_by_device(steps: list[_Step]) -> dict[int, list[Op]]:
    """Per-device programs from a global order, with events wherever an op depends on one
    that runs on another device or on another stream of the same device.

    An op depends on the last writer of each buffer it reads or writes (read
    after write, write after write) and on every reader since that write
    (write after read).  Ops of one (device, stream) run in order; across streams
    the earlier op's stream records an event right after it and the later op's
    stream waits for it, so copy-in streams can run ahead of compute."""
    programs: dict[int, list[Op]] = defaultdict(list)
    last_write: dict[str, tuple[int, int]] = {}
    readers: dict[str, list[tuple[int, int]]] = defaultdict(list)
    events: dict[tuple[int, int], str] = {}        # (device, index in its program) -> event
    waited: dict[tuple[int, str], set[str]] = defaultdict(set)
    for step in steps:
        dev = step.device
        deps = []
        for buf in step.op.reads():
            if buf in last_write:
                deps.append(last_write[buf])
        for buf in step.writes:
            if buf in last_write:
                deps.append(last_write[buf])
            deps.extend(readers.get(buf, []))
        for (ddev, idx) in deps:
            if ddev == dev and programs[ddev][idx].stream == step.op.stream:
                continue
            key = (ddev, idx)
            if key not in events:
                events[key] = f"e{len(events)}"
            ev = events[key]
            if ev not in waited[(dev, step.op.stream)]:
                waited[(dev, step.op.stream)].add(ev)
                programs[dev].append(Op("wait", event=ev, stream=step.op.stream, phase=step.op.phase,
                                        pass_=step.op.pass_))
        programs[dev].append(step.op)
        here = (dev, len(programs[dev]) - 1)
        for buf in step.op.reads():
            readers[buf].append(here)
        for buf in step.writes:
            last_write[buf] = here
            readers[buf] = []
    # insert the record ops after the ops they mark (from the back, so indices stay valid)
    by_device: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for (dev, idx), ev in events.items():
        by_device[dev].append((idx, ev))
    for dev, marks in by_device.items():
        for idx, ev in sorted(marks, reverse=True):
            op = programs[dev][idx]
            programs[dev].insert(idx + 1, Op("record", event=ev, stream=op.stream, phase=op.phase, pass_=op.pass_))
    return dict(sorted(programs.items()))


def plan(net: Network) -> Plan:
    """Schedule a checked network's kernels, copies, exchanges and updates per device."""
    return _Planner(net).build()
