"""Plan stage: checked Network → :class:`~cnnc.plan.schedule.Plan`.

For each layer the planner chooses the kernels (one op each, see
:mod:`cnnc.ops`), names the buffers they read and write, and orders the
launches into forward, backward and update phases per logical device.

Backward sums gradient contributions deterministically: the first consumer
of a layer's output (in reverse topological order) writes the gradient, the
later ones add into it.  A softmax feeding only a logreg cost is
differentiated together with it (probs - onehot), which is exact and stable.
"""
from __future__ import annotations

from cnnc.check.kinds import KINDS
from cnnc.diagnostics import CompileError, Diagnostic
from cnnc.ir import Layer, Network
from cnnc.plan.schedule import Buffer, DeviceProgram, Kernel, Launch, Parameter, Plan


class _Builder:
    def __init__(self, net: Network):
        self.net = net
        self.buffers: dict[str, Buffer] = {}
        self.kernels: dict[str, Kernel] = {}
        self.params: list[Parameter] = []
        self.device = self.single_device()
        self.program = DeviceProgram(self.device)
        self.grad_writes: dict[str, int] = {}

    def single_device(self) -> int:
        devices = {l.gpus for l in self.net.layers}
        if len(devices) > 1 or any(len(g) > 1 for g in devices):
            layer = next(l for l in self.net.layers if l.gpus != self.net.layers[0].gpus or len(l.gpus) > 1)
            raise CompileError(Diagnostic(
                f"{layer.name} is placed on @gpu{layer.gpus}, but this version of cnnc plans networks that run "
                f"on a single device", self.net.file, layer.span,
                "place every layer on the same single device, e.g. @gpu(0)"), self.net.source)
        return next(iter(devices))[0]

    # -- buffers and kernels ------------------------------------------------
    def buffer(self, id: str, size: int, role: str, layer: str, dtype: str = "f32") -> str:
        if id not in self.buffers:
            self.buffers[id] = Buffer(id, self.device, size, dtype, role, layer)
        return id

    def kernel(self, name: str, op: str, params: dict, layer: Layer | None, summary: str) -> str:
        line = layer.span.line if layer is not None and layer.span else 0
        k = Kernel(name, op, params, layer.name if layer else "", line, summary)
        old = self.kernels.setdefault(name, k)
        assert old.params == params, f"kernel name clash: {name}"
        return name

    def out(self, name: str) -> str:
        return f"{name}.out"

    def grad(self, name: str) -> str:
        node = self.net.node(name)
        return self.buffer(f"{name}.grad", self.net.batch * node.shape.size, "gradient", name)

    def add_grad(self, name: str) -> bool:
        """Register one more gradient contribution to `name`; True if it must accumulate."""
        n = self.grad_writes.get(name, 0)
        self.grad_writes[name] = n + 1
        return n > 0

    def parameter(self, layer: Layer, which: str, shape: tuple[int, ...], init: dict) -> Parameter:
        size = 1
        for d in shape:
            size *= d
        base = f"{layer.name}.{which}"
        p = Parameter(layer.name, which, self.buffer(base, size, which, layer.name),
                      self.buffer(f"{base}.grad", size, "weight_grad", layer.name),
                      self.buffer(f"{base}.inc", size, "momentum", layer.name),
                      shape, init, len(self.params))
        self.params.append(p)
        return p

    # -- which layers need gradients ------------------------------------------
    def trainable_upstream(self) -> set[str]:
        """Layers that have weights, or have a layer with weights upstream."""
        out: set[str] = set()
        for l in self.net.layers:
            if KINDS[l.kind].has_weights or any(i in out for i in l.inputs):
                out.add(l.name)
        return out

    # -- the plan ---------------------------------------------------------------
    def build(self) -> Plan:
        net, B = self.net, self.net.batch
        data = {}
        for inp in net.inputs:
            if inp.kind == "labels":
                data[inp.name] = self.buffer(self.out(inp.name), B, "labels", inp.name, "i32")
            else:
                data[inp.name] = self.buffer(self.out(inp.name), B * inp.shape.size, "input", inp.name)
        for l in net.layers:
            if not KINDS[l.kind].is_cost:
                self.buffer(self.out(l.name), B * l.shape.size, "activation", l.name)
        costs = []
        for l in net.layers:
            getattr(self, f"forward_{l.kind}", self.forward_pool)(l, costs)
        needs = self.trainable_upstream()
        for l in reversed(net.layers):
            self.backward(l, needs)
        image = next(i for i in net.inputs if i.kind == "image")
        labels = next((i for i in net.inputs if i.kind == "labels"), None)
        return Plan(net.name, B, net.epochs, net.seed, [self.program], self.buffers, self.kernels, self.params,
                    data, costs, (image.shape.channels, image.shape.height, image.shape.width),
                    labels.classes if labels else 0)

    def launch(self, phase: str, kernel: str, *args: str, **scalars) -> None:
        getattr(self.program, phase).append(Launch(kernel, tuple(args), scalars))

    # -- forward ------------------------------------------------------------
    def conv_params(self, l: Layer) -> dict:
        x = l.in_shapes[0]
        return dict(N=self.net.batch, C=x.channels, H=x.height, W=x.width, K=l.shape.channels,
                    R=l.args["size"], S=l.args["size"], P=l.shape.height, Q=l.shape.width,
                    stride=l.args["stride"], pad=l.args["padding"])

    def forward_conv(self, l: Layer, costs) -> None:
        p = self.conv_params(l)
        w = self.parameter(l, "weights", (p["K"], p["C"], p["R"], p["S"]), {"normal": l.train.init_w})
        b = self.parameter(l, "biases", (p["K"],), {"const": l.train.init_b})
        tag = f"n{p['N']}_c{p['C']}_k{p['K']}_{p['R']}x{p['S']}"
        k = self.kernel(f"{l.name}_fwd_{tag}", "conv_fwd", dict(p, neuron=l.neuron.to_json()), l,
                        f"forward of {l.name}: {p['K']} filters {p['R']}x{p['S']} over {p['C']}x{p['H']}x{p['W']},"
                        f" stride {p['stride']}, padding {p['pad']}, {l.neuron}")
        self.launch("forward", k, self.out(l.inputs[0]), w.buffer, b.buffer, self.out(l.name))

    def forward_fc(self, l: Layer, costs) -> None:
        n_in, n_out = l.in_shapes[0].size, l.shape.size
        w = self.parameter(l, "weights", (n_in, n_out), {"normal": l.train.init_w})
        b = self.parameter(l, "biases", (n_out,), {"const": l.train.init_b})
        p = dict(N=self.net.batch, I=n_in, O=n_out)
        k = self.kernel(f"{l.name}_fwd_n{p['N']}_i{n_in}_o{n_out}", "fc_fwd", dict(p, neuron=l.neuron.to_json()), l,
                        f"forward of {l.name}: {n_in} inputs to {n_out} outputs, {l.neuron}")
        self.launch("forward", k, self.out(l.inputs[0]), w.buffer, b.buffer, self.out(l.name))

    def pool_params(self, l: Layer) -> dict:
        x = l.in_shapes[0]
        return dict(N=self.net.batch, C=x.channels, H=x.height, W=x.width, P=l.shape.height, Q=l.shape.width,
                    size=l.args["size"], stride=l.args["stride"], start=l.args["start"],
                    mode="max" if l.kind == "maxpool" else "avg")

    def forward_pool(self, l: Layer, costs) -> None:
        p = self.pool_params(l)
        k = self.kernel(f"{l.name}_fwd_{p['mode']}_{p['size']}x{p['size']}s{p['stride']}", "pool_fwd", p, l,
                        f"forward of {l.name}: {p['mode']} pooling {p['size']}x{p['size']}, stride {p['stride']}")
        self.launch("forward", k, self.out(l.inputs[0]), self.out(l.name))

    def forward_softmax(self, l: Layer, costs) -> None:
        p = dict(N=self.net.batch, C=l.shape.size)
        k = self.kernel(f"{l.name}_softmax_fwd_n{p['N']}_c{p['C']}", "softmax_fwd", p, l,
                        f"forward of {l.name}: softmax over {p['C']} values")
        self.launch("forward", k, self.out(l.inputs[0]), self.out(l.name))

    def forward_logreg(self, l: Layer, costs) -> None:
        probs = self.net.node(l.inputs[1])
        p = dict(N=self.net.batch, C=probs.shape.size, top_k=l.args["top_k"])
        loss = self.buffer(f"{l.name}.loss", self.net.batch, "cost", l.name)
        correct = self.buffer(f"{l.name}.correct", self.net.batch, "cost", l.name)
        k = self.kernel(f"{l.name}_logreg_fwd_n{p['N']}_c{p['C']}", "logreg_fwd", p, l,
                        f"cost {l.name}: -log p(label) and top-{p['top_k']} correctness per case")
        self.launch("forward", k, self.out(l.inputs[0]), self.out(l.inputs[1]), loss, correct)
        costs.append({"layer": l.name, "loss": loss, "correct": correct, "coeff": l.args["coeff"],
                      "top_k": l.args["top_k"]})

    # -- backward -----------------------------------------------------------
    def backward(self, l: Layer, needs: set[str]) -> None:
        kind = KINDS[l.kind]
        if kind.is_cost:
            self.backward_logreg(l, needs)
            return
        if l.name not in needs or l.name not in self.grad_writes:
            return          # nothing trainable upstream, or the output reaches no cost
        if l.kind == "softmax" and self.fused_with_cost(l):
            return          # its gradient was taken together with the cost
        dy = self.grad(l.name)
        if not l.neuron.is_identity:
            n = self.net.batch * l.shape.size
            k = self.kernel(f"{l.name}_{l.neuron.name}_bwd_n{n}", "neuron_bwd", dict(n=n, neuron=l.neuron.to_json()),
                            l, f"backward of {l.name}'s {l.neuron} neuron, in place on its gradient")
            self.launch("backward", k, self.out(l.name), dy)
        src = l.inputs[0]
        wants_dx = src in needs
        getattr(self, f"backward_{l.kind}", self.backward_pool)(l, dy, src, wants_dx)

    def fused_with_cost(self, softmax: Layer) -> bool:
        consumers = self.net.consumers(softmax.name)
        return len(consumers) == 1 and consumers[0].kind == "logreg" and consumers[0].inputs[1] == softmax.name

    def backward_logreg(self, l: Layer, needs: set[str]) -> None:
        probs = self.net.node(l.inputs[1])
        p = dict(N=self.net.batch, C=probs.shape.size, coeff=l.args["coeff"])
        if self.fused_with_cost(probs):
            target = probs.inputs[0]
            if target not in needs:
                return
            acc = self.add_grad(target)
            k = self.kernel(f"{l.name}_softmax_logreg_bwd_n{p['N']}_c{p['C']}" + ("_acc" if acc else ""),
                            "softmax_logreg_bwd", dict(p, accumulate=acc), l,
                            f"gradient of cost {l.name} through softmax {probs.name}: coeff * (probs - onehot)")
            self.launch("backward", k, self.out(l.inputs[0]), self.out(probs.name), self.grad(target))
            return
        if probs.name not in needs:
            return
        acc = self.add_grad(probs.name)
        k = self.kernel(f"{l.name}_logreg_bwd_n{p['N']}_c{p['C']}" + ("_acc" if acc else ""), "logreg_bwd",
                        dict(p, accumulate=acc), l, f"gradient of cost {l.name} with respect to {probs.name}")
        self.launch("backward", k, self.out(l.inputs[0]), self.out(probs.name), self.grad(probs.name))

    def weight_grads(self, l: Layer, dy: str, op: str, p: dict, tag: str, inner: int) -> None:
        w, b = (q for q in self.params if q.layer == l.name)
        k = self.kernel(f"{l.name}_bias_grad_k{b.shape[0]}",
                        "bias_grad", dict(N=self.net.batch, K=b.shape[0], inner=inner), l,
                        f"gradient of {l.name}'s biases: sum over cases" + (" and pixels" if inner > 1 else ""))
        self.launch("backward", k, dy, b.grad)
        k = self.kernel(f"{l.name}_bwd_filter_{tag}", op, p, l, f"gradient of {l.name}'s weights")
        self.launch("backward", k, self.out(l.inputs[0]), dy, w.grad)
        self.updates(l, w, b)

    def updates(self, l: Layer, w: Parameter, b: Parameter) -> None:
        t = l.train
        for q, lr, mom, wd in ((w, t.lr, t.momentum, t.weight_decay), (b, t.lr_bias, t.momentum_bias, 0.0)):
            n = self.buffers[q.buffer].size
            k = self.kernel(f"sgd_update_n{n}", "sgd_update", dict(n=n), None, f"momentum SGD step on {n} values")
            self.launch("update", k, q.buffer, q.grad, q.inc, lr=lr.to_json(), momentum=mom, weight_decay=wd,
                        inv_cases=1.0 / self.net.batch)

    def backward_conv(self, l: Layer, dy: str, src: str, wants_dx: bool) -> None:
        p = self.conv_params(l)
        tag = f"n{p['N']}_c{p['C']}_k{p['K']}_{p['R']}x{p['S']}"
        self.weight_grads(l, dy, "conv_bwd_filter", p, tag, p["P"] * p["Q"])
        if wants_dx:
            w = next(q for q in self.params if q.layer == l.name and q.name == "weights")
            acc = self.add_grad(src)
            k = self.kernel(f"{l.name}_bwd_data_{tag}" + ("_acc" if acc else ""), "conv_bwd_data",
                            dict(p, accumulate=acc), l, f"gradient of {l.name} with respect to its input {src}")
            self.launch("backward", k, w.buffer, dy, self.grad(src))

    def backward_fc(self, l: Layer, dy: str, src: str, wants_dx: bool) -> None:
        p = dict(N=self.net.batch, I=l.in_shapes[0].size, O=l.shape.size)
        tag = f"n{p['N']}_i{p['I']}_o{p['O']}"
        self.weight_grads(l, dy, "fc_bwd_filter", p, tag, 1)
        if wants_dx:
            w = next(q for q in self.params if q.layer == l.name and q.name == "weights")
            acc = self.add_grad(src)
            k = self.kernel(f"{l.name}_bwd_data_{tag}" + ("_acc" if acc else ""), "fc_bwd_data",
                            dict(p, accumulate=acc), l, f"gradient of {l.name} with respect to its input {src}")
            self.launch("backward", k, w.buffer, dy, self.grad(src))

    def backward_pool(self, l: Layer, dy: str, src: str, wants_dx: bool) -> None:
        if not wants_dx:
            return
        acc = self.add_grad(src)
        p = dict(self.pool_params(l), accumulate=acc)
        k = self.kernel(f"{l.name}_bwd_{p['mode']}_{p['size']}x{p['size']}s{p['stride']}" + ("_acc" if acc else ""),
                        "pool_bwd", p, l, f"gradient of {l.name} with respect to its input {src}")
        self.launch("backward", k, self.out(src), self.out(l.name), dy, self.grad(src))

    def backward_softmax(self, l: Layer, dy: str, src: str, wants_dx: bool) -> None:
        if not wants_dx:
            return
        acc = self.add_grad(src)
        p = dict(N=self.net.batch, C=l.shape.size, accumulate=acc)
        k = self.kernel(f"{l.name}_softmax_bwd_n{p['N']}_c{p['C']}" + ("_acc" if acc else ""), "softmax_bwd", p, l,
                        f"gradient of softmax {l.name} with respect to {src}")
        self.launch("backward", k, self.out(l.name), dy, self.grad(src))


def plan(net: Network) -> Plan:
    """Schedule a checked network's kernels, buffers and parameter updates."""
    return _Builder(net).build()
