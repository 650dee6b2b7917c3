"""Check stage: syntax tree → IR.

Resolves names (with "did you mean" hints), orders layers topologically
(rejecting cycles), fills defaults from the layer-kind table and the
``train {}`` block, validates placement (the replication rules between
layers are in :mod:`cnnc.check.placement`), and infers every shape.  Every
problem becomes a located :class:`~cnnc.diagnostics.CompileError`.
"""
from __future__ import annotations

from typing import Any

from cnnc.check.kinds import KINDS, REQUIRED, LayerKind, Param, ShapeError
from cnnc.check.placement import replication
from cnnc.check.settings import GLOBAL_SETTINGS, LAYER_SETTINGS, layer_train, read_settings
from cnnc.diagnostics import CompileError, Diagnostic, Span, did_you_mean, source_lines
from cnnc.frontend import ast
from cnnc.ir import MAX_BUFFER_ELEMENTS, MAX_DEVICE, MAX_ELEMENTS, Input, Layer, Network, Shape
from cnnc.neurons import NEURONS, make_neuron


class _Checker:
    def __init__(self, program: ast.Program):
        self.p = program
        self.lines = source_lines(program.source)

    def fail(self, message: str, span: Span | None, hint: str | None = None):
        raise CompileError(Diagnostic(message, self.p.file, span, hint), self.p.source)

    # -- statements -------------------------------------------------------
    def run(self) -> Network:
        inputs: dict[str, Input] = {}
        decls: dict[str, ast.LayerDecl] = {}
        train: ast.TrainBlock | None = None
        first_seen: dict[str, Span] = {}
        for st in self.p.statements:
            if isinstance(st, ast.TrainBlock):
                if train is not None:
                    self.fail("duplicate train block", st.span, f"the first one is on line {train.span.line}")
                train = st
                continue
            name = st.name
            name_span = st.name_span if isinstance(st, ast.LayerDecl) else st.span
            if name in first_seen:
                self.fail(f"duplicate name '{name}'", name_span,
                          f"'{name}' is first defined on line {first_seen[name].line}")
            first_seen[name] = name_span
            if isinstance(st, ast.ImageInput):
                inputs[name] = self.image_input(st)
            elif isinstance(st, ast.LabelInput):
                inputs[name] = self.label_input(st)
            else:
                decls[name] = st
        if not inputs:
            self.fail("the network declares no input", self.p.span, "add e.g. 'input data: 3x32x32'")
        glob = read_settings(train.settings if train else (), GLOBAL_SETTINGS | LAYER_SETTINGS, self.fail)
        batch = glob.get("batch", 128)
        order = self.topological_order(decls, inputs)
        for i in inputs.values():
            self.check_elements(i.name, batch, i.shape, i.span)
        layers: dict[str, Layer] = {}
        for name in order:
            layers[name] = self.layer(decls[name], inputs, layers, glob, batch, index=len(layers))
            self.check_elements(name, batch // len(layers[name].gpus), layers[name].shape, decls[name].name_span)
        if not any(KINDS[l.kind].is_cost for l in layers.values()):
            self.fail("the network has no cost layer, so there is nothing to train", self.p.span,
                      "end it with e.g. 'cost = logreg(labels, probs)'")
        net = Network(self.p.name, self.p.file, self.p.source, tuple(inputs.values()),
                      tuple(layers[n] for n in order), batch, glob.get("epochs", 10), glob.get("seed", 0),
                      {k: v for k, v in glob.items()})
        replication(net)
        return net

    def check_elements(self, name: str, cases: int, shape: Shape, span: Span | None) -> None:
        """A layer's or input's output buffer must be indexable by the kernels: one case in 32 bits,
        the whole buffer in 64."""
        if shape.size > MAX_ELEMENTS:
            self.fail(f"'{name}' needs {shape.size} elements per case ({shape}); kernels index within a case "
                      f"with 32 bits (at most 2^31-1)", span, "make the layer smaller")
        n = cases * shape.size
        if n > MAX_BUFFER_ELEMENTS:
            self.fail(f"'{name}' needs {n} elements ({cases} cases of {shape}); a buffer holds at most 2^61-1, "
                      f"whose bytes a 64-bit offset reaches", span, "make the batch or the layer smaller")

    def image_input(self, st: ast.ImageInput) -> Input:
        if len(st.dims) != 3 or min(st.dims) < 1:
            self.fail(f"image input '{st.name}' needs channels x height x width, e.g. 3x32x32", st.span)
        if max(st.dims) > MAX_ELEMENTS:
            self.fail(f"image input '{st.name}': each dimension must be at most {MAX_ELEMENTS}", st.span)
        return Input(st.name, "image", Shape(*st.dims), 0, st.span)

    def label_input(self, st: ast.LabelInput) -> Input:
        n = st.classes
        if not n.is_int or n.value < 2:
            self.fail("label(...) needs the number of classes, an integer of at least 2", n.span)
        if n.value > MAX_ELEMENTS:
            self.fail(f"label(...) takes at most {MAX_ELEMENTS} classes", n.span)
        return Input(st.name, "labels", Shape(1), int(n.value), st.span)

    # -- graph ------------------------------------------------------------
    def input_refs(self, d: ast.LayerDecl) -> list[ast.NameRef]:
        refs = []
        seen_kw = False
        for a in d.args:
            if a.name is not None:
                seen_kw = True
                continue
            if seen_kw:
                self.fail("inputs must come before keyword arguments", a.span)
            if not isinstance(a.value, ast.NameRef):
                self.fail(f"'{d.name}': inputs are layer names; give parameters as name=value", a.span)
            refs.append(a.value)
        return refs

    def topological_order(self, decls: dict[str, ast.LayerDecl], inputs: dict[str, Input]) -> list[str]:
        known = list(inputs) + list(decls)
        for d in decls.values():
            for ref in self.input_refs(d):
                if ref.name not in inputs and ref.name not in decls:
                    self.fail(f"undefined name '{ref.name}'", ref.span, did_you_mean(ref.name, known))
        order: list[str] = []
        done: set[str] = set(inputs)
        for root in decls:
            if root in done:
                continue
            # Depth-first with an explicit stack, so a chain of any length fits: the
            # path holds the layers being visited, each with its inputs still to visit.
            path = [root]
            on_path = {root}
            pending = [iter(self.input_refs(decls[root]))]
            while path:
                ref = next(pending[-1], None)
                if ref is None:
                    name = path.pop()
                    pending.pop()
                    on_path.discard(name)
                    done.add(name)
                    order.append(name)
                elif ref.name in on_path:
                    cycle = path[path.index(ref.name):] + [ref.name]
                    shown = " -> ".join(cycle if len(cycle) <= 9 else cycle[:4] + ["..."] + cycle[-4:])
                    length = f" ({len(cycle) - 1} layers)" if len(cycle) > 9 else ""
                    self.fail(f"cycle in the layer graph: {shown}{length}", decls[ref.name].name_span,
                              "a layer cannot depend on its own output")
                elif ref.name not in done:
                    path.append(ref.name)
                    on_path.add(ref.name)
                    pending.append(iter(self.input_refs(decls[ref.name])))
        return order

    # -- one layer --------------------------------------------------------
    def layer(self, d: ast.LayerDecl, inputs: dict[str, Input], done: dict[str, Layer],
              glob: dict[str, Any], batch: int, index: int = 0) -> Layer:
        kind = KINDS.get(d.kind)
        if kind is None:
            self.fail(f"unknown layer kind '{d.kind}'", d.kind_span,
                      did_you_mean(d.kind, KINDS) or f"layer kinds: {', '.join(sorted(KINDS))}")
        refs = self.input_refs(d)
        if kind.max_inputs is None:
            if len(refs) < kind.min_inputs:
                n = kind.min_inputs
                self.fail(f"{d.kind} takes at least {n} input{'s' if n != 1 else ''}, got {len(refs)}",
                          d.kind_span)
        elif not kind.min_inputs <= len(refs) <= kind.max_inputs:
            want = str(kind.min_inputs) if kind.min_inputs == kind.max_inputs else \
                f"{kind.min_inputs} to {kind.max_inputs}"
            self.fail(f"{d.kind} takes {want} input{'s' if want != '1' else ''}, got {len(refs)}", d.kind_span)
        args = self.arguments(d, kind)
        srcs = [inputs.get(r.name) or done[r.name] for r in refs]
        self.check_input_kinds(d, kind, refs, srcs)
        in_shapes = tuple(s.shape for s in srcs)
        if kind.input_kinds == "labels+probs":
            self.check_probabilities(d, refs, srcs, args)
        try:
            shape = kind.infer(args, in_shapes, tuple(r.name for r in refs))
        except ShapeError as e:
            if e.input is not None:
                span = refs[e.input].span
            else:
                span = next((a.span for a in d.args if a.name == e.arg), d.kind_span)
            self.fail(f"{d.name}: {e}", span, e.hint)
        if kind.random:
            args["layer_id"] = index        # keys the layer's random numbers; stable for a given network
        neuron = self.neuron(d, kind)
        gpus = self.placement(d, srcs, batch)
        train = None
        layer_settings = read_settings(d.settings, LAYER_SETTINGS, self.fail)
        if not kind.has_weights and layer_settings:
            s = next(s for s in d.settings if s.name in layer_settings)
            self.fail(f"'{s.name}' applies to layers with weights; {d.name} ({d.kind}) has none", s.span)
        if kind.has_weights:
            for k in ("init_w", "init_b"):
                if args.get(k) is not None:
                    layer_settings[k] = args.pop(k)
                args.pop(k, None)
            train = layer_train(glob, layer_settings)
        line = self.lines[d.kind_span.line - 1].strip() if d.kind_span.line <= len(self.lines) else ""
        return Layer(d.name, d.kind, tuple(r.name for r in refs), args, neuron, gpus, shape, in_shapes,
                     train, d.span, line)

    def arguments(self, d: ast.LayerDecl, kind: LayerKind) -> dict[str, Any]:
        args: dict[str, Any] = {}
        given: set[str] = set()
        for a in d.args:
            if a.name is None:
                continue
            p = kind.param(a.name)
            if p is None:
                names = [q.name for q in kind.params]
                self.fail(f"{d.kind} has no argument '{a.name}'", a.span,
                          did_you_mean(a.name, names) or
                          (f"{d.kind} takes: {', '.join(names)}" if names else f"{d.kind} takes no arguments"))
            if a.name in given:
                self.fail(f"argument '{a.name}' given twice", a.span)
            given.add(a.name)
            value = self.convert(a.value, p.type, p.min, f"{a.name}", p)
            if not (p.omit_default and value == p.default):
                args[a.name] = value
        for p in kind.params:
            if p.name not in given:
                if p.default is REQUIRED:
                    self.fail(f"{d.kind} needs the argument '{p.name}'", d.kind_span,
                              f"e.g. {d.kind}(..., {p.name}=...)" if not p.doc else f"{p.name}: {p.doc}")
                if not p.omit_default:
                    args[p.name] = p.default
        return args

    def convert(self, v: ast.Value, typ: str, minimum: float | None, what: str, param: Param | None = None) -> Any:
        if typ == "floats":
            items = v.items if isinstance(v, ast.ListValue) else None
            bad = v if items is None else next((i for i in items if not isinstance(i, ast.Number)), None)
            if bad is not None:
                self.fail(f"{what} must be a list of numbers, e.g. [1, -1]", bad.span)
            return [self.convert(item, "float", minimum, what, param) for item in items]
        if typ == "bool":
            if isinstance(v, ast.NameRef) and v.name in ("true", "false"):
                return v.name == "true"
            if isinstance(v, ast.Number) and v.value in (0, 1):
                return bool(v.value)
            self.fail(f"{what} must be true or false", v.span)
        if not isinstance(v, ast.Number):
            self.fail(f"{what} must be a number", v.span)
        if typ == "int" and not v.is_int:
            self.fail(f"{what} must be an integer", v.span)
        if typ == "int" and abs(v.value) > MAX_ELEMENTS:
            self.fail(f"{what} must be at most {MAX_ELEMENTS}", v.span, "kernels take sizes and counts as 32-bit integers")
        if minimum is not None and param is not None and param.open_min and v.value <= minimum:
            self.fail(f"{what} must be greater than {minimum:g}", v.span)
        if minimum is not None and v.value < minimum:
            self.fail(f"{what} must be at least {minimum:g}", v.span)
        if param is not None and param.max is not None and v.value > param.max:
            self.fail(f"{what} must be at most {param.max:g}", v.span)
        return int(v.value) if typ == "int" else float(v.value)

    def check_input_kinds(self, d, kind, refs, srcs):
        for i, (ref, src) in enumerate(zip(refs, srcs)):
            is_labels = isinstance(src, Input) and src.kind == "labels"
            wants_labels = kind.input_kinds == "labels+probs" and i == 0
            if is_labels and not wants_labels:
                self.fail(f"{d.kind} cannot take the label input '{ref.name}'", ref.span)
            if wants_labels and not is_labels:
                self.fail(f"the first input of {d.kind} must be a label input, '{ref.name}' is not", ref.span,
                          f"write {d.kind}(labels, probs)")
            if isinstance(src, Layer) and KINDS[src.kind].is_cost:
                self.fail(f"{d.kind} cannot take '{ref.name}': it is a cost, which has no output", ref.span)

    def check_probabilities(self, d, refs, srcs, args):
        """A classification cost's (labels, probs): a softmax with one probability per class."""
        labels, probs = srcs
        if not isinstance(probs, Layer) or probs.kind != "softmax":
            self.fail(f"{d.kind} needs probabilities: '{refs[1].name}' is not a softmax layer", refs[1].span,
                      f"insert probs = softmax({refs[1].name})")
        if probs.shape.size != labels.classes:
            self.fail(f"'{refs[1].name}' has {probs.shape.size} values per case but '{refs[0].name}' has "
                      f"{labels.classes} classes", refs[1].span)
        if "top_k" in args and args["top_k"] > labels.classes:
            self.fail(f"top_k={args['top_k']} exceeds the {labels.classes} classes",
                      next(a.span for a in d.args if a.name == "top_k"))

    def neuron(self, d: ast.LayerDecl, kind: LayerKind):
        spec = d.neuron
        if spec is None:
            if kind.neuron_layer:
                inputs = ", ".join(r.name for r in self.input_refs(d))
                self.fail(f"a {d.kind} layer needs a neuron after its inputs", d.kind_span,
                          f"e.g. {d.name} = {d.kind}({inputs}) relu")
            return make_neuron("ident")
        if not kind.takes_neuron and not kind.neuron_layer:
            self.fail(f"{d.kind} layers take no neuron", spec.span)
        nk = NEURONS.get(spec.name)
        if nk is None:
            self.fail(f"unknown neuron '{spec.name}'", spec.span,
                      did_you_mean(spec.name, NEURONS) or f"neurons: {', '.join(sorted(NEURONS))}")
        if nk.needs_input and not kind.neuron_layer:
            self.fail(f"the {spec.name} neuron cannot be fused into {d.kind}: its gradient needs the input",
                      spec.span)
        if len(spec.params) > len(nk.params):
            n = len(nk.params)
            takes = "no parameters" if n == 0 else f"{n} parameter{'s' if n > 1 else ''}"
            self.fail(f"{spec.name} takes {takes}, got {len(spec.params)}", spec.span,
                      f"write {spec.name}[{','.join(nk.params)}]" if nk.params else f"write {spec.name}")
        if spec.name == "tanh" and spec.params and spec.params[0] == 0:
            self.fail("tanh[a,b] needs a != 0", spec.span)
        return make_neuron(spec.name, spec.params)

    def placement(self, d: ast.LayerDecl, srcs: list, batch: int) -> tuple[int, ...]:
        pl = d.placement
        if pl is None:
            # Inherit from the first input that is a layer: a cost layer's first
            # input is the label input, which has no placement of its own.
            first = next((s for s in srcs if isinstance(s, Layer)), None)
            return first.gpus if first is not None else (0,)
        if pl.target != "gpu":
            self.fail(f"unknown placement '@{pl.target}'", pl.span, "write @gpu(0) or @gpu(0,1,...)")
        if not pl.devices:
            self.fail("@gpu() needs at least one device", pl.span)
        seen = set()
        for n in pl.devices:
            if not n.is_int or n.value < 0:
                self.fail("device ids are non-negative integers", n.span)
            if n.value > MAX_DEVICE:
                self.fail(f"device ids go up to {MAX_DEVICE}", n.span)
            if n.value in seen:
                self.fail(f"device {n.value} is listed twice: replicas need distinct devices", n.span)
            seen.add(n.value)
        gpus = tuple(int(n.value) for n in pl.devices)
        if batch % len(gpus):
            self.fail(f"{len(gpus)} replicas cannot split the batch of {batch} cases evenly", pl.span,
                      "make the batch a multiple of the number of devices")
        return gpus


def check(program: ast.Program) -> Network:
    """Turn a parsed program into a checked Network, or raise a located CompileError."""
    return _Checker(program).run()
