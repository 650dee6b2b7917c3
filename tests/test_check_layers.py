"""The checker's rows for the layer kinds beyond conv / pool / fc / softmax / logreg:
their arguments, defaults and shapes, and a golden diagnostic for each mistake they catch."""
from __future__ import annotations

import pytest

from cnnc.check import check
from cnnc.diagnostics import CompileError
from cnnc.frontend.parser import parse
from cnnc.ir import Shape
from cnnc.plan.lowering import parameter_shapes

from helpers import replace_once

H = "network n\ninput data: 3x32x32\ninput labels: label(10)\n"
HEAD = "f = fc(c, outputs=10)\nprobs = softmax(f)\ncost = logreg(labels, probs)\n"
C = "c = conv(data, filters=4, size=3)\n"


def net(body: str, output: str = "c"):
    return check(parse(H + body + replace_once(HEAD, "fc(c", f"fc({output}"), "t.cnn"))


# -- shapes, arguments, parameters ---------------------------------------------

def test_plain_conv_keeps_its_plain_record():
    c = net(C).node("c")
    assert c.args == {"filters": 4, "size": 3, "stride": 1, "padding": 0}
    assert parameter_shapes(c) == {"weights": (4, 3, 3, 3), "biases": (4,)}
    explicit = net("c = conv(data, filters=4, size=3, groups=1, shared_biases=true)\n").node("c")
    assert explicit.args == c.args


def test_grouped_conv_with_unshared_biases():
    n = net("a = conv(data, filters=8, size=3, padding=1)\n"
            "c = conv(a, filters=6, size=5, stride=2, groups=2, shared_biases=false) relu\n")
    c = n.node("c")
    assert c.shape == Shape(6, 15, 15)          # 1 + ceil((32 - 5) / 2): the last window overhangs
    assert c.args == {"filters": 6, "size": 5, "stride": 2, "padding": 0, "groups": 2, "shared_biases": False}
    assert parameter_shapes(c) == {"weights": (6, 4, 5, 5), "biases": (6, 15, 15)}


def test_conv_and_fc_with_several_inputs():
    n = check(parse(replace_once(H, "3x32x32", "3x9x9") + "a = conv(data, filters=5, size=2)\n"
                    "c = conv(a, data, filters=4, size=3, stride=2)\n"
                    "f = fc(c, a, outputs=10)\nprobs = softmax(f)\ncost = logreg(labels, probs)\n", "t.cnn"))
    c, f = n.node("c"), n.node("f")
    assert c.shape == Shape(4, 4, 4) and c.in_shapes == (Shape(5, 8, 8), Shape(3, 9, 9))
    assert parameter_shapes(c) == {"weights.0": (4, 5, 3, 3), "weights.1": (4, 3, 3, 3), "biases": (4,)}
    assert parameter_shapes(f) == {"weights.0": (64, 10), "weights.1": (320, 10), "biases": (10,)}


def test_local_layer():
    c = net("c = local(data, filters=4, size=5, stride=3, padding=1, init_w=0.04) tanh\n").node("c")
    assert c.shape == Shape(4, 11, 11) and c.neuron.name == "tanh"
    assert c.train.init_w == 0.04 and "init_w" not in c.args
    assert parameter_shapes(c) == {"weights": (121, 4, 3, 5, 5), "biases": (4, 11, 11)}


def test_normalisations_default_as_cuda_convnet2():
    n = net(C + "n1 = cmrnorm(c, size=5)\nn2 = rnorm(n1, size=3, scale=0.01, pow=0.5, min_div=2)\n"
            "n3 = cnorm(n2, size=7)\nn4 = cmrnorm(n3, size=2, blocked=true)\n", "n4")
    assert n.node("n1").args == {"size": 5, "scale": 0.0001, "pow": 0.75, "min_div": 1.0}
    assert n.node("n2").args == {"size": 3, "scale": 0.01, "pow": 0.5, "min_div": 2.0}
    assert n.node("n4").args["blocked"] is True
    assert all(n.node(k).shape == Shape(4, 30, 30) for k in ("n1", "n2", "n3", "n4"))


def test_neuron_layers_take_any_neuron():
    n = net(C + "a = neuron(c) abs\nb = neuron(a) square\nr = neuron(b) tanh[1.7, 0.66]\n", "r")
    assert [n.node(k).neuron.name for k in "abr"] == ["abs", "square", "tanh"]
    assert n.node("r").neuron.a == 1.7 and n.node("r").shape == Shape(4, 30, 30)


def test_dropout_keeps_a_stable_layer_id():
    n = net(C + "d = dropout(c)\ne = dropout2(d, keep=0.8)\n", "e")
    layers = [l.name for l in n.layers]
    assert n.node("d").args == {"keep": 0.5, "layer_id": layers.index("d")}
    assert n.node("e").args == {"keep": 0.8, "layer_id": layers.index("e")}


def test_elementwise_concat_and_pass():
    n = net(C + "b = conv(data, filters=4, size=3) relu\ns = eltsum(c, b)\nw = eltsum(c, b, s, coeffs=[1, -1, 0.5])\n"
            "m = eltmax(c, b, w)\nk = concat(c, m, c)\np = pass(k)\n", "p")
    assert n.node("s").args == {"coeffs": [1.0, 1.0]} and n.node("w").args == {"coeffs": [1.0, -1.0, 0.5]}
    assert n.node("m").shape == Shape(4, 30, 30)
    assert n.node("k").shape == Shape(12, 30, 30) and n.node("p").shape == Shape(12, 30, 30)


def test_several_costs():
    n = check(parse(H + C + HEAD + "ce = crossent(labels, probs, coeff=0.5)\nreg = sum2(f)\n", "t.cnn"))
    assert [l.kind for l in n.layers if l.kind in ("logreg", "crossent", "sum2")] == ["logreg", "crossent", "sum2"]
    assert n.node("ce").args == {"coeff": 0.5} and n.node("reg").args == {"coeff": 1.0}
    assert n.node("reg").shape == Shape(1) and n.node("reg").gpus == (0,)


# -- golden errors ------------------------------------------------------------------

GOLDEN = {
    "eltsum shapes": (H + C + "b = conv(data, filters=4, size=5)\ns = eltsum(c, b)\n" + replace_once(HEAD, "fc(c", "fc(s"), """\
t.cnn:6:15: error: s: 'b' is 4x28x28 but 'c' is 4x30x30: element-wise layers need inputs of one shape
    6 | s = eltsum(c, b)
      |               ^"""),
    "coeffs count": (H + C + "s = eltsum(c, c, coeffs=[1, 2, 3])\n" + replace_once(HEAD, "fc(c", "fc(s"), """\
t.cnn:5:18: error: s: coeffs has 3 values for 2 inputs
    5 | s = eltsum(c, c, coeffs=[1, 2, 3])
      |                  ^~~~~~~~~~~~~~~~
  hint: give one coefficient per input"""),
    "coeffs not list": (H + C + "s = eltsum(c, c, coeffs=2)\n" + replace_once(HEAD, "fc(c", "fc(s"), """\
t.cnn:5:25: error: coeffs must be a list of numbers, e.g. [1, -1]
    5 | s = eltsum(c, c, coeffs=2)
      |                         ^"""),
    "coeffs item": (H + C + "s = eltsum(c, c, coeffs=[1, x])\n" + replace_once(HEAD, "fc(c", "fc(s"), """\
t.cnn:5:29: error: coeffs must be a list of numbers, e.g. [1, -1]
    5 | s = eltsum(c, c, coeffs=[1, x])
      |                             ^"""),
    "eltsum one input": (H + C + "s = eltsum(c)\n" + replace_once(HEAD, "fc(c", "fc(s"), """\
t.cnn:5:5: error: eltsum takes at least 2 inputs, got 1
    5 | s = eltsum(c)
      |     ^~~~~~"""),
    "eltmax shapes": (H + C + "b = maxpool(c, size=2)\ns = eltmax(c, b)\n" + replace_once(HEAD, "fc(c", "fc(s"), """\
t.cnn:6:15: error: s: 'b' is 4x15x15 but 'c' is 4x30x30: element-wise layers need inputs of one shape
    6 | s = eltmax(c, b)
      |               ^"""),
    "concat sizes": (H + C + "s = concat(c, data)\n" + replace_once(HEAD, "fc(c", "fc(s"), """\
t.cnn:5:15: error: s: 'data' is 32x32 per channel but 'c' is 30x30: concat joins the channels of images of one size
    5 | s = concat(c, data)
      |               ^~~~"""),
    "conv outputs": (H + C + "s = conv(c, data, filters=4, size=3)\n" + replace_once(HEAD, "fc(c", "fc(s"), """\
t.cnn:5:13: error: s: 'data' gives 30x30 outputs but 'c' gives 28x28: the inputs of one layer are summed, so their outputs must have one size
    5 | s = conv(c, data, filters=4, size=3)
      |             ^~~~"""),
    "groups channels": (H + "c = conv(data, filters=4, size=3, groups=2)\n" + HEAD, """\
t.cnn:4:35: error: c: groups=2 does not divide the 3 channels of 'data'
    4 | c = conv(data, filters=4, size=3, groups=2)
      |                                   ^~~~~~~~"""),
    "groups filters": (H + C + "s = conv(c, filters=6, size=3, groups=4)\n" + replace_once(HEAD, "fc(c", "fc(s"), """\
t.cnn:5:32: error: s: filters=6 is not a multiple of groups=4
    5 | s = conv(c, filters=6, size=3, groups=4)
      |                                ^~~~~~~~
  hint: each group has the same number of filters"""),
    "shared_biases value": (H + "c = conv(data, filters=4, size=3, shared_biases=maybe)\n" + HEAD, """\
t.cnn:4:49: error: shared_biases must be true or false
    4 | c = conv(data, filters=4, size=3, shared_biases=maybe)
      |                                                 ^~~~~"""),
    "local filter": (H + "c = local(data, filters=4, size=40)\n" + HEAD, """\
t.cnn:4:28: error: c: a 40x40 filter does not fit the 32x32 input with padding 0
    4 | c = local(data, filters=4, size=40)
      |                            ^~~~~~~
  hint: use a smaller size or more padding"""),
    "local two inputs": (H + C + "s = local(c, c, filters=4, size=3)\n" + replace_once(HEAD, "fc(c", "fc(s"), """\
t.cnn:5:5: error: local takes 1 input, got 2
    5 | s = local(c, c, filters=4, size=3)
      |     ^~~~~"""),
    "keep above 1": (H + C + "d = dropout(c, keep=1.5)\n" + replace_once(HEAD, "fc(c", "fc(d"), """\
t.cnn:5:21: error: keep must be at most 1
    5 | d = dropout(c, keep=1.5)
      |                     ^~~"""),
    "keep zero": (H + C + "d = dropout2(c, keep=0)\n" + replace_once(HEAD, "fc(c", "fc(d"), """\
t.cnn:5:22: error: keep must be greater than 0
    5 | d = dropout2(c, keep=0)
      |                      ^"""),
    "min_div zero": (H + C + "n = cmrnorm(c, size=3, min_div=0)\n" + replace_once(HEAD, "fc(c", "fc(n"), """\
t.cnn:5:32: error: min_div must be greater than 0
    5 | n = cmrnorm(c, size=3, min_div=0)
      |                                ^"""),
    "norm size missing": (H + C + "n = rnorm(c)\n" + replace_once(HEAD, "fc(c", "fc(n"), """\
t.cnn:5:5: error: rnorm needs the argument 'size'
    5 | n = rnorm(c)
      |     ^~~~~
  hint: size: window size: channels (cmrnorm) or rows and columns"""),
    "blocked on rnorm": (H + C + "n = rnorm(c, size=3, blocked=true)\n" + replace_once(HEAD, "fc(c", "fc(n"), """\
t.cnn:5:22: error: rnorm has no argument 'blocked'
    5 | n = rnorm(c, size=3, blocked=true)
      |                      ^~~~~~~~~~~~
  hint: rnorm takes: size, scale, pow, min_div"""),
    "neuron layer without neuron": (H + C + "n = neuron(c)\n" + replace_once(HEAD, "fc(c", "fc(n"), """\
t.cnn:5:5: error: a neuron layer needs a neuron after its inputs
    5 | n = neuron(c)
      |     ^~~~~~
  hint: e.g. n = neuron(c) relu"""),
    "neuron on dropout": (H + C + "d = dropout(c) relu\n" + replace_once(HEAD, "fc(c", "fc(d"), """\
t.cnn:5:16: error: dropout layers take no neuron
    5 | d = dropout(c) relu
      |                ^~~~"""),
    "unknown neuron in neuron layer": (H + C + "n = neuron(c) sqaure\n" + replace_once(HEAD, "fc(c", "fc(n"), """\
t.cnn:5:15: error: unknown neuron 'sqaure'
    5 | n = neuron(c) sqaure
      |               ^~~~~~
  hint: did you mean 'square'?"""),
    "cost as input": (H + C + HEAD + "g = fc(cost, outputs=3)\n", """\
t.cnn:8:8: error: fc cannot take 'cost': it is a cost, which has no output
    8 | g = fc(cost, outputs=3)
      |        ^~~~"""),
    "crossent classes": (H + C + "f = fc(c, outputs=7)\nprobs = softmax(f)\ncost = crossent(labels, probs)\n", """\
t.cnn:7:25: error: 'probs' has 7 values per case but 'labels' has 10 classes
    7 | cost = crossent(labels, probs)
      |                         ^~~~~"""),
    "crossent not softmax": (H + C + "f = fc(c, outputs=10)\ncost = crossent(labels, f)\n", """\
t.cnn:6:25: error: crossent needs probabilities: 'f' is not a softmax layer
    6 | cost = crossent(labels, f)
      |                         ^
  hint: insert probs = softmax(f)"""),
    "crossent top_k": (H + C + "f = fc(c, outputs=10)\nprobs = softmax(f)\ncost = crossent(labels, probs, top_k=5)\n", """\
t.cnn:7:32: error: crossent has no argument 'top_k'
    7 | cost = crossent(labels, probs, top_k=5)
      |                                ^~~~~~~
  hint: crossent takes: coeff"""),
    "sum2 labels": (H + C + HEAD + "s = sum2(labels)\n", """\
t.cnn:8:10: error: sum2 cannot take the label input 'labels'
    8 | s = sum2(labels)
      |          ^~~~~~"""),
    "sum2 two inputs": (H + C + HEAD + "s = sum2(c, f)\n", """\
t.cnn:8:5: error: sum2 takes 1 input, got 2
    8 | s = sum2(c, f)
      |     ^~~~"""),
    "pass with args": (H + C + "s = pass(c, size=2)\n" + replace_once(HEAD, "fc(c", "fc(s"), """\
t.cnn:5:13: error: pass has no argument 'size'
    5 | s = pass(c, size=2)
      |             ^~~~~~
  hint: pass takes no arguments"""),
    "kind typo": (H + C + "s = dropuot(c)\n" + replace_once(HEAD, "fc(c", "fc(s"), """\
t.cnn:5:5: error: unknown layer kind 'dropuot'
    5 | s = dropuot(c)
      |     ^~~~~~~
  hint: did you mean 'dropout'?"""),
}


@pytest.mark.parametrize("case", GOLDEN)
def test_golden_error(case):
    source, expected = GOLDEN[case]
    with pytest.raises(CompileError) as info:
        check(parse(source, "t.cnn"))
    assert info.value.format() == expected
