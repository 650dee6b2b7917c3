"""The parser: .cnn text to syntax tree, newline rules, and syntax-error messages.

Syntax errors are golden-tested: each test compares the whole formatted
diagnostic (header, source line, caret, hint) as a user would see it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cnnc.diagnostics import CompileError, Span
from cnnc.frontend import ast
from cnnc.frontend.parser import parse, parse_file

from helpers import rewrite

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

PROGRAM = """\
# A representative program.
network tiny   # the name

input data: 3x32x32
input labels: label(10)

train { batch = 64; epochs = 3
        lr = dexp(base=0.01, tgt_factor=100, steps=3) }

@gpu(0, 1)
conv1 = conv(data, filters=8, size=5,
             stride=1, padding=2,   # wrapped
             init_w=1e-4) relu
pool1 = maxpool(conv1, size=3, stride=2)
fc2 = fc(pool1, outputs=10) tanh[1.7159, -0.5] {
  lr = 0.002
  weight_decay = 0.004; momentum = 0.9
}
probs = softmax(fc2)
cost = logreg(labels, probs)
"""


@pytest.fixture(scope="module")
def program() -> ast.Program:
    return parse(PROGRAM, "p.cnn")


def _layers(p: ast.Program) -> dict[str, ast.LayerDecl]:
    return {s.name: s for s in p.statements if isinstance(s, ast.LayerDecl)}


def _kwargs(d: ast.LayerDecl) -> dict[str, object]:
    """Keyword arguments of a layer as plain Python values (numbers only)."""
    return {a.name: a.value.value for a in d.args if a.name is not None}


def _positional(d: ast.LayerDecl) -> list[str]:
    return [a.value.name for a in d.args if a.name is None]


def _syntax_error(source: str) -> str:
    with pytest.raises(CompileError) as info:
        parse(source, "t.cnn")
    return info.value.format()


# -- the syntax tree ----------------------------------------------------------

def test_program_header(program):
    assert program.name == "tiny"
    assert program.file == "p.cnn"
    assert program.source == PROGRAM
    assert program.span == Span(2, 9, 2, 13)
    kinds = [type(s).__name__ for s in program.statements]
    assert kinds == ["ImageInput", "LabelInput", "TrainBlock"] + ["LayerDecl"] * 5


def test_inputs(program):
    data, labels = program.statements[:2]
    assert data == ast.ImageInput("data", (3, 32, 32), Span(4, 1, 4, 20))
    assert labels.name == "labels"
    assert labels.classes.value == 10 and labels.classes.is_int
    assert labels.classes.span == Span(5, 21, 5, 23)
    assert labels.span == Span(5, 1, 5, 24)


def test_train_block(program):
    train = program.statements[2]
    assert isinstance(train, ast.TrainBlock)
    assert [s.name for s in train.settings] == ["batch", "epochs", "lr"]
    assert train.settings[0].value.value == 64
    lr = train.settings[2].value
    assert isinstance(lr, ast.Call) and lr.func == "dexp"
    assert [(a.name, a.value.value) for a in lr.args] == [("base", 0.01), ("tgt_factor", 100), ("steps", 3)]
    assert train.span == Span(7, 1, 8, 56)
    assert train.settings[1].span == Span(7, 21, 7, 31)


def test_layer_names_kinds_and_inputs(program):
    layers = _layers(program)
    assert [(d.name, d.kind) for d in layers.values()] == [
        ("conv1", "conv"), ("pool1", "maxpool"), ("fc2", "fc"), ("probs", "softmax"), ("cost", "logreg")]
    assert _positional(layers["conv1"]) == ["data"]
    assert _positional(layers["cost"]) == ["labels", "probs"]
    assert layers["probs"].args[0] == ast.Arg(None, ast.NameRef("fc2", Span(19, 17, 19, 20)), Span(19, 17, 19, 20))


def test_wrapped_arguments(program):
    conv1 = _layers(program)["conv1"]
    assert _kwargs(conv1) == {"filters": 8, "size": 5, "stride": 1, "padding": 2, "init_w": 1e-4}
    init_w = conv1.args[-1]
    assert init_w.span == Span(13, 14, 13, 25)
    assert init_w.value.is_int is False


def test_neurons(program):
    layers = _layers(program)
    assert layers["conv1"].neuron == ast.NeuronSpec("relu", (), Span(13, 27, 13, 31))
    assert layers["fc2"].neuron.name == "tanh"
    assert layers["fc2"].neuron.params == (1.7159, -0.5)
    assert layers["fc2"].neuron.span == Span(15, 29, 15, 47)
    assert layers["pool1"].neuron is None


def test_placement(program):
    layers = _layers(program)
    pl = layers["conv1"].placement
    assert pl.target == "gpu"
    assert [(n.value, n.span) for n in pl.devices] == [(0, Span(10, 6, 10, 7)), (1, Span(10, 9, 10, 10))]
    assert pl.span == Span(10, 1, 10, 11)      # ends at ')', not at the next line
    assert all(layers[n].placement is None for n in ("pool1", "fc2", "probs", "cost"))


def test_layer_spans(program):
    conv1 = _layers(program)["conv1"]
    assert conv1.span == Span(10, 1, 13, 31)      # from the placement to the neuron
    assert conv1.name_span == Span(11, 1, 11, 6)
    assert conv1.kind_span == Span(11, 9, 11, 13)
    fc2 = _layers(program)["fc2"]
    assert fc2.span == Span(15, 1, 18, 2)         # through the closing brace


def test_per_layer_settings(program):
    layers = _layers(program)
    fc2 = layers["fc2"]
    assert [(s.name, s.value.value) for s in fc2.settings] == [
        ("lr", 0.002), ("weight_decay", 0.004), ("momentum", 0.9)]
    assert fc2.settings[2].span == Span(17, 25, 17, 39)
    assert layers["conv1"].settings == ()


def test_number_literals():
    p = parse("network n\nx = k(a=1, b=1.0, c=-2, d=1e-3, e=.5, f=+3, g=2E2)\n")
    args = {a.name: a.value for a in p.statements[0].args}
    assert {k: (v.value, v.is_int) for k, v in args.items()} == {
        "a": (1, True), "b": (1.0, False), "c": (-2, True), "d": (0.001, False),
        "e": (0.5, False), "f": (3, True), "g": (200.0, False)}
    assert isinstance(args["a"].value, int) and isinstance(args["b"].value, float)


def test_value_forms():
    p = parse('network n\nx = k(a, n=name, s="text", l=[1, [2, 3], b], c=f(1, k=2), e=[])\n')
    args = {a.name: a.value for a in p.statements[0].args}
    assert p.statements[0].args[0].value == ast.NameRef("a", Span(2, 7, 2, 8))
    assert args["n"] == ast.NameRef("name", Span(2, 12, 2, 16))
    assert args["s"] == ast.String("text", Span(2, 20, 2, 26))
    lst = args["l"]
    assert isinstance(lst, ast.ListValue) and len(lst.items) == 3
    assert isinstance(lst.items[1], ast.ListValue) and [i.value for i in lst.items[1].items] == [2, 3]
    assert lst.items[2] == ast.NameRef("b", Span(2, 42, 2, 43))
    call = args["c"]
    assert call.func == "f" and [(a.name, a.value.value) for a in call.args] == [(None, 1), ("k", 2)]
    assert args["e"].items == ()


def test_example_parses():
    p = parse_file(EXAMPLES / "digits.cnn")
    assert p.name == "digits"
    assert p.file == str(EXAMPLES / "digits.cnn")
    assert [d.name for d in p.statements if isinstance(d, ast.LayerDecl)] == [
        "conv1", "conv2", "pool2", "fc3", "probs", "cost"]


# -- newlines, ';' and comments -----------------------------------------------

def _shape(p: ast.Program) -> list:
    """What a program says, without spans: enough to compare two spellings."""
    out = []
    for s in p.statements:
        if isinstance(s, ast.LayerDecl):
            out.append((s.name, s.kind, _positional(s), _kwargs(s), s.neuron and (s.neuron.name, s.neuron.params),
                        [(x.name, x.value.value) for x in s.settings],
                        s.placement and [n.value for n in s.placement.devices]))
        elif isinstance(s, ast.TrainBlock):
            out.append(("train", [(x.name, x.value.value) for x in s.settings]))
        else:
            out.append((s.name,))
    return out


ONE_PER_LINE = """\
network n
input data: 1x8x8
train {
  batch = 32
  epochs = 2
}
@gpu(0)
c = conv(data, filters=4, size=3) relu {
  lr = 0.1
  momentum = 0.5
}
f = fc(c, outputs=2)
"""

SPELLINGS = {
    "semicolons": "network n; input data: 1x8x8; train { batch = 32; epochs = 2 }\n"
                  "@gpu(0) c = conv(data, filters=4, size=3) relu { lr = 0.1; momentum = 0.5 }; f = fc(c, outputs=2)",
    "wrapped": "network n\ninput data: 1x8x8\ntrain {batch = 32; epochs = 2}\n@gpu(\n  0\n)\n"
               "c = conv(\n  data,\n  filters=4,\n  size=3,\n) relu {lr = 0.1\nmomentum = 0.5}\n"
               "f = fc(c,\n       outputs=2)\n",
    "comments everywhere": "# head\n\nnetwork n # name\n# between\ninput data: 1x8x8 # dims\n"
                           "train { # open\n  batch = 32 # one\n  # alone\n  epochs = 2\n} # close\n"
                           "@gpu(0) # placement\n\n# gap\nc = conv(data, # first\n  filters=4, # second\n"
                           "  size=3) relu { # block\n  lr = 0.1; momentum = 0.5 # two\n}\n"
                           "f = fc(c, outputs=2) # no newline at the end",
    "runs of separators": "\n\n;network n;;\n\n input data: 1x8x8 ;\n; train { ;batch = 32;; \n\n epochs = 2; }\n"
                          "@gpu(0)\n\n\nc = conv(data, filters=4, size=3) relu {\n\n lr = 0.1 ;\n momentum = 0.5\n\n}\n"
                          ";;f = fc(c, outputs=2)\n\n;\n",
    "crlf": rewrite(ONE_PER_LINE, {"\n": "\r\n"}, once=False),
    "tabs": rewrite(ONE_PER_LINE, {"  ": "\t"}, once=False),
}


@pytest.mark.parametrize("name", SPELLINGS)
def test_spellings_parse_alike(name):
    assert _shape(parse(SPELLINGS[name])) == _shape(parse(ONE_PER_LINE))


def test_reference_spelling():
    assert _shape(parse(ONE_PER_LINE)) == [
        ("data",),
        ("train", [("batch", 32), ("epochs", 2)]),
        ("c", "conv", ["data"], {"filters": 4, "size": 3}, ("relu", ()), [("lr", 0.1), ("momentum", 0.5)], [0]),
        ("f", "fc", ["c"], {"outputs": 2}, None, [], None)]


def test_empty_blocks_and_argument_lists():
    p = parse("network n\ntrain {}\ntrain {\n\n}\nx = k() {}\ny = k(\n)\n")
    train1, train2, x, y = p.statements
    assert train1.settings == () and train2.settings == ()
    assert x.args == () and x.settings == () and y.args == ()


def test_neuron_params_may_wrap():
    p = parse("network n\nx = k(a) tanh[\n  1.5,\n  2\n]\n")
    assert p.statements[0].neuron.params == (1.5, 2)


def test_comment_only_lines_do_not_split_a_statement():
    p = parse("network n\n@gpu(1)\n# the layer below runs on device 1\nx = k(a)\n")
    assert [n.value for n in p.statements[0].placement.devices] == [1]


def test_missing_file(tmp_path):
    with pytest.raises(CompileError) as info:
        parse_file(tmp_path / "nope.cnn")
    assert info.value.format() == f"{tmp_path / 'nope.cnn'}: error: no such file"


# -- golden syntax errors -----------------------------------------------------

H = "network n\ninput data: 1x8x8\n"

GOLDEN = {
    "missing comma between arguments": (H + "c = conv(data filters=4, size=3)\n", """\
t.cnn:3:15: error: unexpected name 'filters', expected '(', ')', ',' or '='
    3 | c = conv(data filters=4, size=3)
      |               ^~~~~~~
  hint: missing ',' before 'filters'?"""),
    "missing comma in a wrapped list": (H + "c = conv(data,\n         filters=4\n         size=3)\n", """\
t.cnn:5:10: error: unexpected name 'size', expected ')' or ','
    5 |          size=3)
      |          ^~~~
  hint: missing ',' before 'size'?"""),
    "unclosed parenthesis at end of file": (H + "c = conv(data, filters=4, size=3", """\
t.cnn:3:9: error: '(' is never closed
    3 | c = conv(data, filters=4, size=3
      |         ^
  hint: the file ends before the matching ')'"""),
    "unclosed parenthesis before the next statement": (H + "c = conv(data, filters=4\nd = fc(c, outputs=2)\n", """\
t.cnn:4:1: error: unexpected name 'd', expected ')' or ','
    4 | d = fc(c, outputs=2)
      | ^
  hint: missing ',' before 'd'? or is the '(' on line 3 never closed?"""),
    "unclosed train block": (H + "train { batch = 32\nc = fc(data, outputs=2)\n", """\
t.cnn:3:7: error: '{' is never closed
    3 | train { batch = 32
      |       ^
  hint: the file ends before the matching '}'"""),
    "unexpected character": (H + "c = conv(data, filters=$4)\n", """\
t.cnn:3:24: error: unexpected character '$'
    3 | c = conv(data, filters=$4)
      |                        ^"""),
    "two statements on one line": (H + "a = fc(data, outputs=2) b = softmax(a)\n", """\
t.cnn:3:27: error: unexpected '=', expected '[', '{' or end of line
    3 | a = fc(data, outputs=2) b = softmax(a)
      |                           ^
  hint: each statement goes on its own line, or separate statements with ';'"""),
    "two statements on one line after a neuron": (H + "a = fc(data, outputs=2) relu b = softmax(a)\n", """\
t.cnn:3:30: error: unexpected name 'b', expected '[', '{' or end of line
    3 | a = fc(data, outputs=2) relu b = softmax(a)
      |                              ^
  hint: each statement goes on its own line, or separate statements with ';'"""),
    "statement on the network line": ("network a input data: 1x8x8\n", """\
t.cnn:1:11: error: unexpected 'input', expected end of line
    1 | network a input data: 1x8x8
      |           ^~~~~
  hint: each statement goes on its own line, or separate statements with ';'"""),
    "missing network line": ("# digits\ninput data: 1x8x8\nc = fc(data, outputs=2)\n", """\
t.cnn:2:1: error: unexpected 'input', expected 'network'
    2 | input data: 1x8x8
      | ^~~~~
  hint: a .cnn file starts with 'network NAME', e.g. 'network digits'"""),
    "network without a name": ("network\ninput data: 1x8x8\n", """\
t.cnn:1:8: error: unexpected end of line, expected a name
    1 | network
      |        ^"""),
    "input without a colon": ("network n\ninput data 1x8x8\n", """\
t.cnn:2:12: error: unexpected dimensions '1x8x8', expected ':'
    2 | input data 1x8x8
      |            ^~~~~"""),
    "input with a bare number": ("network n\ninput data: 8\n", """\
t.cnn:2:13: error: unexpected number '8', expected 'label' or image dimensions such as 3x32x32
    2 | input data: 8
      |             ^"""),
    "misspelled label input": ("network n\ninput labels: labels(10)\n", """\
t.cnn:2:15: error: unexpected name 'labels', expected 'label' or image dimensions such as 3x32x32
    2 | input labels: labels(10)
      |               ^~~~~~"""),
    "train setting without '='": (H + "train {\n  batch = 32\n  lr 0.1\n}\n", """\
t.cnn:5:6: error: unexpected number '0.1', expected '='
    5 |   lr 0.1
      |      ^~~"""),
    "two train settings on one line": (H + "train { batch = 32 lr = 0.1 }\n", """\
t.cnn:3:20: error: unexpected name 'lr', expected '}' or end of line
    3 | train { batch = 32 lr = 0.1 }
      |                    ^~
  hint: separate settings with a newline or ';'"""),
    "number alone in a train block": (H + "train { 5 }\n", """\
t.cnn:3:9: error: unexpected number '5', expected '}', a name or end of line
    3 | train { 5 }
      |         ^"""),
    "stray '=' after '='": (H + "c = = conv(data, filters=4, size=3)\n", """\
t.cnn:3:5: error: unexpected '=', expected a name
    3 | c = = conv(data, filters=4, size=3)
      |     ^"""),
    "stray '=' in an argument": (H + "c = conv(data, filters==4, size=3)\n", """\
t.cnn:3:24: error: unexpected '=', expected '[', a name, a number or a string
    3 | c = conv(data, filters==4, size=3)
      |                        ^"""),
    "statement starting with '='": (H + "= conv(data)\n", """\
t.cnn:3:1: error: unexpected '=', expected '@', 'input', 'train', a name or end of file
    3 | = conv(data)
      | ^"""),
    "name as a neuron parameter": (H + "c = fc(data, outputs=2) tanh[a, 1]\n", """\
t.cnn:3:30: error: unexpected name 'a', expected a number
    3 | c = fc(data, outputs=2) tanh[a, 1]
      |                              ^"""),
    "string as a neuron parameter": (H + 'c = fc(data, outputs=2) tanh["x"]\n', """\
t.cnn:3:30: error: unexpected string '"x"', expected a number
    3 | c = fc(data, outputs=2) tanh["x"]
      |                              ^~~"""),
    "';' inside an argument list": (H + "c = fc(data, outputs=2;)\n", """\
t.cnn:3:23: error: unexpected ';', expected ')' or ','
    3 | c = fc(data, outputs=2;)
      |                       ^"""),
    "mismatched bracket": (H + "c = fc(data, outputs=2]\n", """\
t.cnn:3:23: error: unexpected ']', expected ')' or ','
    3 | c = fc(data, outputs=2]
      |                       ^"""),
    "empty file": ("", """\
t.cnn:1:1: error: the file declares no network
  hint: a .cnn file starts with 'network NAME', e.g. 'network digits'"""),
    "only comments": ("# nothing here yet\n", """\
t.cnn:1:19: error: the file declares no network
    1 | # nothing here yet
      |                   ^
  hint: a .cnn file starts with 'network NAME', e.g. 'network digits'"""),
}


@pytest.mark.parametrize("case", GOLDEN)
def test_golden_syntax_error(case):
    source, expected = GOLDEN[case]
    assert _syntax_error(source) == expected


def test_syntax_error_carries_location():
    with pytest.raises(CompileError) as info:
        parse(H + "c = conv(data filters=4)\n", "t.cnn")
    (diag,) = info.value.diagnostics
    assert diag.file == "t.cnn" and diag.severity == "error"
    assert diag.span == Span(3, 15, 3, 22)
    assert diag.hint == "missing ',' before 'filters'?"
    assert str(info.value) == info.value.format()
