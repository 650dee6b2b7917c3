"""The checker: shape inference, layer order, placement, training settings, and
the located errors for everything a network can get wrong.

Errors are golden-tested: each test compares the whole formatted diagnostic.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cnnc.check import check
from cnnc.check.kinds import conv_out, pool_out
from cnnc.diagnostics import CompileError
from cnnc.frontend.parser import parse, parse_file
from cnnc.ir import Input, LayerTrain, Network, Schedule, Shape

from helpers import replace_once

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# Three header lines, so a network's own layers start on line 4.
H = "network n\ninput data: 3x32x32\ninput labels: label(10)\n"
# A classifier head on top of a layer named `c`.
HEAD = "f = fc(c, outputs=10)\nprobs = softmax(f)\ncost = logreg(labels, probs)\n"


def compile_(source: str) -> Network:
    return check(parse(source, "t.cnn"))


def net(body: str, head: str = HEAD, header: str = H) -> Network:
    return compile_(header + body + head)


def error_text(source: str) -> str:
    with pytest.raises(CompileError) as info:
        compile_(source)
    return info.value.format()


def shape_of(body: str, name: str = "c", dims: str = "3x32x32") -> Shape:
    return net(body, header=replace_once(H, "3x32x32", dims)).shape_of(name)


# -- shapes -------------------------------------------------------------------

@pytest.mark.parametrize("size,filt,stride,pad,out", [
    (224, 11, 4, 0, 55),       # AlexNet's first layer
    (32, 5, 1, 2, 32),         # "same" padding
    (32, 5, 1, 0, 28),
    (32, 5, 2, 0, 15),         # 27/2 rounds up: the last window overhangs by one column
    (7, 3, 3, 0, 3),           # 4/3 rounds up
    (8, 8, 1, 0, 1),
    (5, 3, 2, 1, 3),
])
def test_conv_out(size, filt, stride, pad, out):
    assert conv_out(size, filt, stride, pad) == out


@pytest.mark.parametrize("size,window,stride,start,out", [
    (55, 3, 2, 0, 27),
    (8, 3, 2, 0, 4),           # 5/2 rounds up: the last window is clipped to the image
    (32, 2, 2, 0, 16),
    (8, 3, 3, 0, 3),
    (8, 3, 2, 1, 3),
    (3, 3, 1, 0, 1),
])
def test_pool_out(size, window, stride, start, out):
    assert pool_out(size, window, stride, start) == out


def test_conv_shapes():
    assert shape_of("c = conv(data, filters=96, size=11, stride=4)\n", dims="3x224x224") == Shape(96, 55, 55)
    assert shape_of("c = conv(data, filters=8, size=5, stride=2)\n") == Shape(8, 15, 15)
    assert shape_of("c = conv(data, filters=16, size=3, padding=1)\n") == Shape(16, 32, 32)
    assert shape_of("c = conv(data, filters=4, size=5, stride=3, padding=1)\n", dims="1x20x12") == Shape(4, 7, 4)


def test_conv_layer_record():
    n = net("c = conv(data, filters=8, size=5, stride=2) relu\n")
    c = n.node("c")
    assert c.kind == "conv" and c.inputs == ("data",)
    assert c.args == {"filters": 8, "size": 5, "stride": 2, "padding": 0}
    assert c.in_shapes == (Shape(3, 32, 32),)
    assert c.neuron.name == "relu"
    assert c.source_line == "c = conv(data, filters=8, size=5, stride=2) relu"
    assert c.span.line == 4


@pytest.mark.parametrize("kind", ["maxpool", "avgpool"])
def test_pool_shapes(kind):
    assert shape_of(f"c = {kind}(data, size=3, stride=2)\n", dims="64x55x55") == Shape(64, 27, 27)
    assert shape_of(f"c = {kind}(data, size=3, stride=2)\n", dims="2x8x8") == Shape(2, 4, 4)
    assert shape_of(f"c = {kind}(data, size=3, stride=2, start=1)\n", dims="2x8x8") == Shape(2, 3, 3)
    assert shape_of(f"c = {kind}(data, size=3, stride=2, outputs=2)\n", dims="2x8x8") == Shape(2, 2, 2)
    assert shape_of(f"c = {kind}(data, size=3, stride=1)\n", dims="2x6x9") == Shape(2, 4, 7)
    # stride above size: the 4th window would start at row 9 of 9, outside the image, so there are 3
    assert shape_of(f"c = {kind}(data, size=2, stride=3)\n", dims="1x9x9") == Shape(1, 3, 3)
    assert shape_of(f"c = {kind}(data, size=2, stride=3)\n", dims="1x10x10") == Shape(1, 4, 4)


def test_pool_stride_defaults_to_size():
    n = net("c = maxpool(data, size=2)\n")
    assert n.shape_of("c") == Shape(3, 16, 16)
    assert n.node("c").args == {"size": 2, "stride": 2, "start": 0, "outputs": 0}
    assert shape_of("c = avgpool(data, size=3)\n", dims="1x8x8") == Shape(1, 3, 3)


def test_fc_softmax_and_cost_shapes():
    n = net("c = conv(data, filters=4, size=3)\n")
    assert n.shape_of("f") == Shape(10)
    assert n.node("f").in_shapes == (Shape(4, 30, 30),)
    assert n.shape_of("probs") == Shape(10)
    assert n.shape_of("cost") == Shape(1)
    assert n.node("cost").in_shapes == (Shape(1), Shape(10))
    assert n.node("cost").args == {"coeff": 1.0, "top_k": 1}


def test_softmax_flattens_its_input():
    n = compile_("network n\ninput data: 2x3x4\ninput labels: label(24)\n"
                 "probs = softmax(data)\ncost = logreg(labels, probs)\n")
    assert n.shape_of("probs") == Shape(24)
    assert n.node("probs").in_shapes == (Shape(2, 3, 4),)


def test_inputs():
    n = net("c = conv(data, filters=4, size=3)\n")
    data, labels = n.inputs
    assert (data.name, data.kind, data.shape, data.classes) == ("data", "image", Shape(3, 32, 32), 0)
    assert (labels.name, labels.kind, labels.shape, labels.classes) == ("labels", "labels", Shape(1), 10)


def test_digits_example():
    n = check(parse_file(EXAMPLES / "digits.cnn"))
    assert [(l.name, str(l.shape)) for l in n.layers] == [
        ("conv1", "16x8x8"), ("conv2", "32x8x8"), ("pool2", "32x4x4"), ("fc3", "10x1x1"),
        ("probs", "10x1x1"), ("cost", "1x1x1")]
    assert (n.batch, n.epochs, n.seed) == (32, 12, 1)
    assert n.node("fc3").train.init_w == 0.01      # the layer's argument beats train { init_w }
    assert n.node("conv1").train.init_w == 0.1


# -- order and placement ------------------------------------------------------

def test_topological_order_with_forward_references():
    n = compile_(H + """\
cost = logreg(labels, probs)
probs = softmax(f)
f = fc(p, outputs=10)
c = conv(data, filters=4, size=3)
p = maxpool(c, size=2)
side = fc(c, outputs=3)
""")
    order = [l.name for l in n.layers]
    assert order == ["c", "p", "f", "probs", "cost", "side"]
    for i, layer in enumerate(n.layers):
        assert all(src in [x.name for x in n.inputs] or src in order[:i] for src in layer.inputs)
    assert [l.name for l in n.consumers("c")] == ["p", "side"]


def test_placement_defaults_to_device_zero():
    n = net("c = conv(data, filters=4, size=3)\n")
    assert {l.gpus for l in n.layers} == {(0,)}


def test_placement_is_inherited_from_the_first_input():
    n = net("@gpu(1)\nc = conv(data, filters=4, size=3)\np = maxpool(c, size=2)\n",
            head="@gpu(2)\nf = fc(p, outputs=10)\nprobs = softmax(f)\ncost = logreg(labels, probs)\n")
    assert {l.name: l.gpus for l in n.layers} == {"c": (1,), "p": (1,), "f": (2,), "probs": (2,), "cost": (2,)}


def test_cost_layer_follows_its_probabilities_not_the_label_input():
    n = net("@gpu(3)\nc = conv(data, filters=4, size=3)\n")
    assert {l.gpus for l in n.layers} == {(3,)}


def test_replicas_are_inherited():
    n = net("@gpu(0, 1)\nc = conv(data, filters=4, size=3)\n")
    assert n.node("f").gpus == (0, 1)
    assert n.node("cost").gpus == (0, 1)


# -- training settings --------------------------------------------------------

DEFAULT_TRAIN = LayerTrain(lr=Schedule("const", 0.01), lr_bias=Schedule("const", 0.01), momentum=0.9,
                           momentum_bias=0.9, weight_decay=0.0, init_w=0.01, init_b=0.0, update_period=0)


def test_defaults_without_a_train_block():
    n = net("c = conv(data, filters=4, size=3)\n")
    assert (n.batch, n.epochs, n.seed) == (128, 10, 0)
    assert n.node("c").train == DEFAULT_TRAIN
    assert n.node("f").train == DEFAULT_TRAIN
    assert n.node("probs").train is None and n.node("cost").train is None


def test_train_block_and_per_layer_overrides():
    n = compile_(H + """\
train {
  batch = 64; epochs = 3; seed = 7
  lr = 0.1; lr_bias = 0.2; momentum = 0.5; weight_decay = 0.001; init_w = 0.05
}
c = conv(data, filters=4, size=3) {
  lr = exp(0.01, 100)
  momentum_bias = 0
  init_b = 1
  update_period = 1
}
f = fc(c, outputs=10, init_w=0.001, init_b=-0.5)
probs = softmax(f)
cost = logreg(labels, probs)
""")
    assert (n.batch, n.epochs, n.seed) == (64, 3, 7)
    assert n.settings["lr"] == Schedule("const", 0.1)
    assert n.node("c").train == LayerTrain(
        lr=Schedule("exp", 0.01, 100.0), lr_bias=Schedule("const", 0.2), momentum=0.5, momentum_bias=0.0,
        weight_decay=0.001, init_w=0.05, init_b=1.0, update_period=1)
    assert n.node("f").train == LayerTrain(
        lr=Schedule("const", 0.1), lr_bias=Schedule("const", 0.2), momentum=0.5, momentum_bias=0.5,
        weight_decay=0.001, init_w=0.001, init_b=-0.5, update_period=0)
    # init_w/init_b become training settings, not kernel arguments
    assert n.node("f").args == {"outputs": 10}


def test_lr_bias_follows_a_per_layer_lr():
    n = net("c = conv(data, filters=4, size=3) { lr = linear(0.3, 3) }\n")
    assert n.node("c").train.lr == n.node("c").train.lr_bias == Schedule("linear", 0.3, 3.0)


@pytest.mark.parametrize("text,schedule", [
    ("0.1", Schedule("const", 0.1)),
    ("2", Schedule("const", 2.0)),
    ("const(0.1)", Schedule("const", 0.1)),
    ("const(base=0.1)", Schedule("const", 0.1)),
    ("linear(0.1, 10)", Schedule("linear", 0.1, 10.0)),
    ("exp(base=0.1, tgt_factor=100)", Schedule("exp", 0.1, 100.0)),
    ("dexp(0.1, 100, 3)", Schedule("dexp", 0.1, 100.0, 3)),
    ("dexp(steps=4, base=0.02, tgt_factor=250)", Schedule("dexp", 0.02, 250.0, 4)),
    ("dexp(0.02,\n     tgt_factor=250,\n     steps=4)", Schedule("dexp", 0.02, 250.0, 4)),
])
def test_schedules_parse(text, schedule):
    n = net("c = conv(data, filters=4, size=3)\n", header=H + f"train {{ lr = {text} }}\n")
    assert n.node("c").train.lr == schedule
    assert isinstance(n.node("c").train.lr.steps, int)


def test_schedule_values():
    const = Schedule("const", 0.1)
    assert const.at(0) == const.at(0.5) == const.at(1) == 0.1
    linear = Schedule("linear", 0.1, 10)
    assert [linear.at(p) for p in (0, 0.5, 1)] == pytest.approx([0.1, 0.055, 0.01])
    exp = Schedule("exp", 0.1, 100)
    assert [exp.at(p) for p in (0, 0.5, 1)] == pytest.approx([0.1, 0.01, 0.001])


def test_dexp_steps():
    s = Schedule("dexp", 0.1, 100, 3)      # 0.1 * 100^(-i/2): 0.1, 0.01, 0.001
    assert [s.at(p) for p in (0, 0.33, 0.34, 0.66, 0.67, 0.99, 1)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001, 0.001])
    s = Schedule("dexp", 0.02, 250, 4)     # 0.02 * 250^(-i/3)
    steps = [s.at(i / 4 + 0.01) for i in range(4)]
    assert steps == pytest.approx([0.02 * 250 ** (-i / 3) for i in range(4)])
    assert steps[-1] == pytest.approx(0.02 / 250)
    assert Schedule("dexp", 0.1, 100, 1).at(0.9) == 0.1


def test_schedule_progress_is_clamped():
    for s in (Schedule("linear", 0.1, 10), Schedule("exp", 0.1, 100), Schedule("dexp", 0.1, 100, 3)):
        assert s.at(-1) == s.at(0) and s.at(2) == s.at(1)


# -- golden errors ------------------------------------------------------------

C = "c = conv(data, filters=4, size=3)\n"

GOLDEN = {
    "unknown layer kind": (H + "c = convv(data, filters=4, size=3)\n" + HEAD, """\
t.cnn:4:5: error: unknown layer kind 'convv'
    4 | c = convv(data, filters=4, size=3)
      |     ^~~~~
  hint: did you mean 'conv'?"""),
    "unknown layer kind without a close match": (H + "c = banana(data)\n" + HEAD, """\
t.cnn:4:5: error: unknown layer kind 'banana'
    4 | c = banana(data)
      |     ^~~~~~
  hint: layer kinds: avgpool, cmrnorm, cnorm, concat, conv, crossent, dropout, dropout2, eltmax, eltsum, fc, local, logreg, maxpool, neuron, pass, rnorm, softmax, sum2"""),
    "unknown argument": (H + "c = conv(data, filters=4, size=3, strid=2)\n" + HEAD, """\
t.cnn:4:35: error: conv has no argument 'strid'
    4 | c = conv(data, filters=4, size=3, strid=2)
      |                                   ^~~~~~~
  hint: did you mean 'stride'?"""),
    "unknown argument without a close match": (H + "c = maxpool(data, size=2, init_w=0.1)\n" + HEAD, """\
t.cnn:4:27: error: maxpool has no argument 'init_w'
    4 | c = maxpool(data, size=2, init_w=0.1)
      |                           ^~~~~~~~~~
  hint: maxpool takes: size, stride, start, outputs"""),
    "missing required argument": (H + "c = conv(data, filters=4)\n" + HEAD, """\
t.cnn:4:5: error: conv needs the argument 'size'
    4 | c = conv(data, filters=4)
      |     ^~~~
  hint: size: filter rows and columns"""),
    "argument given twice": (H + "c = conv(data, filters=4, size=3, filters=8)\n" + HEAD, """\
t.cnn:4:35: error: argument 'filters' given twice
    4 | c = conv(data, filters=4, size=3, filters=8)
      |                                   ^~~~~~~~~"""),
    "undefined input": (H + "c = conv(dta, filters=4, size=3)\n" + HEAD, """\
t.cnn:4:10: error: undefined name 'dta'
    4 | c = conv(dta, filters=4, size=3)
      |          ^~~
  hint: did you mean 'data'?"""),
    "duplicate layer name": (H + C + "\nc = conv(data, filters=8, size=3)\n" + HEAD, """\
t.cnn:6:1: error: duplicate name 'c'
    6 | c = conv(data, filters=8, size=3)
      | ^
  hint: 'c' is first defined on line 4"""),
    "layer named like an input": (H + "data = conv(data, filters=4, size=3)\n" + HEAD, """\
t.cnn:4:1: error: duplicate name 'data'
    4 | data = conv(data, filters=4, size=3)
      | ^~~~
  hint: 'data' is first defined on line 2"""),
    "cycle": (H + "a = conv(b, filters=3, size=1)\nb = conv(a, filters=3, size=1)\n" + C + HEAD, """\
t.cnn:4:1: error: cycle in the layer graph: a -> b -> a
    4 | a = conv(b, filters=3, size=1)
      | ^
  hint: a layer cannot depend on its own output"""),
    "logreg classes mismatch": (H + C + "f = fc(c, outputs=7)\nprobs = softmax(f)\ncost = logreg(labels, probs)\n", """\
t.cnn:7:23: error: 'probs' has 7 values per case but 'labels' has 10 classes
    7 | cost = logreg(labels, probs)
      |                       ^~~~~"""),
    "logreg without softmax": (H + C + "f = fc(c, outputs=10)\ncost = logreg(labels, f)\n", """\
t.cnn:6:23: error: logreg needs probabilities: 'f' is not a softmax layer
    6 | cost = logreg(labels, f)
      |                       ^
  hint: insert probs = softmax(f)"""),
    "logreg inputs swapped": (H + C + "f = fc(c, outputs=10)\nprobs = softmax(f)\ncost = logreg(probs, labels)\n", """\
t.cnn:7:15: error: the first input of logreg must be a label input, 'probs' is not
    7 | cost = logreg(probs, labels)
      |               ^~~~~
  hint: write logreg(labels, probs)"""),
    "filter larger than the padded input": (H + "c = conv(data, filters=4, size=37, padding=2)\n" + HEAD, """\
t.cnn:4:27: error: c: a 37x37 filter does not fit the 32x32 input with padding 2
    4 | c = conv(data, filters=4, size=37, padding=2)
      |                           ^~~~~~~
  hint: use a smaller size or more padding"""),
    "padding not smaller than the filter": (H + "c = conv(data, filters=4, size=3, padding=3)\n" + HEAD, """\
t.cnn:4:35: error: c: padding 3 must be smaller than the filter size 3
    4 | c = conv(data, filters=4, size=3, padding=3)
      |                                   ^~~~~~~~~"""),
    "pool window larger than the input": (H + "c = maxpool(data, size=33)\n" + HEAD, """\
t.cnn:4:19: error: c: a 33x33 window does not fit the 32x32 input from start 0
    4 | c = maxpool(data, size=33)
      |                   ^~~~~~~"""),
    "pool asking for more outputs than fit": (H + "c = avgpool(data, size=2, outputs=17)\n" + HEAD, """\
t.cnn:4:27: error: c: outputs=17 is more than the 16 windows that fit
    4 | c = avgpool(data, size=2, outputs=17)
      |                           ^~~~~~~~~~"""),
    "empty @gpu list": (H + "@gpu()\n" + C + HEAD, """\
t.cnn:4:1: error: @gpu() needs at least one device
    4 | @gpu()
      | ^~~~~~"""),
    "repeated device": (H + "@gpu(0, 1, 0)\n" + C + HEAD, """\
t.cnn:4:12: error: device 0 is listed twice: replicas need distinct devices
    4 | @gpu(0, 1, 0)
      |            ^"""),
    "negative device": (H + "@gpu(-1)\n" + C + HEAD, """\
t.cnn:4:6: error: device ids are non-negative integers
    4 | @gpu(-1)
      |      ^~"""),
    "fractional device": (H + "@gpu(1.5)\n" + C + HEAD, """\
t.cnn:4:6: error: device ids are non-negative integers
    4 | @gpu(1.5)
      |      ^~~"""),
    "unknown placement target": (H + "@cpu(0)\n" + C + HEAD, """\
t.cnn:4:1: error: unknown placement '@cpu'
    4 | @cpu(0)
      | ^~~~~~~
  hint: write @gpu(0) or @gpu(0,1,...)"""),
    "batch not divisible by the replicas": (H + "train { batch = 100 }\n@gpu(0,1,2)  # three replicas\n" + C + HEAD,
                                            """\
t.cnn:5:1: error: 3 replicas cannot split the batch of 100 cases evenly
    5 | @gpu(0,1,2)  # three replicas
      | ^~~~~~~~~~~
  hint: make the batch a multiple of the number of devices"""),
    "neuron on a pool layer": (H + "c = maxpool(data, size=2) relu\n" + HEAD, """\
t.cnn:4:27: error: maxpool layers take no neuron
    4 | c = maxpool(data, size=2) relu
      |                           ^~~~"""),
    "unknown neuron": (H + "c = conv(data, filters=4, size=3) relux\n" + HEAD, """\
t.cnn:4:35: error: unknown neuron 'relux'
    4 | c = conv(data, filters=4, size=3) relux
      |                                   ^~~~~
  hint: did you mean 'relu'?"""),
    "neuron that cannot be fused": (H + "c = conv(data, filters=4, size=3) abs\n" + HEAD, """\
t.cnn:4:35: error: the abs neuron cannot be fused into conv: its gradient needs the input
    4 | c = conv(data, filters=4, size=3) abs
      |                                   ^~~"""),
    "neuron with too many parameters": (H + "c = conv(data, filters=4, size=3) tanh[1, 2, 3]\n" + HEAD, """\
t.cnn:4:35: error: tanh takes 2 parameters, got 3
    4 | c = conv(data, filters=4, size=3) tanh[1, 2, 3]
      |                                   ^~~~~~~~~~~~~
  hint: write tanh[a,b]"""),
    "parameter on a neuron that takes none": (H + "c = conv(data, filters=4, size=3) relu[1]\n" + HEAD, """\
t.cnn:4:35: error: relu takes no parameters, got 1
    4 | c = conv(data, filters=4, size=3) relu[1]
      |                                   ^~~~~~~
  hint: write relu"""),
    "setting on a layer without weights": (H + "c = maxpool(data, size=2) { lr = 0.1 }\n" + HEAD, """\
t.cnn:4:29: error: 'lr' applies to layers with weights; c (maxpool) has none
    4 | c = maxpool(data, size=2) { lr = 0.1 }
      |                             ^~~~~~~~"""),
    "unknown train setting": (H + "train { batch = 32; momentun = 0.9 }\n" + C + HEAD, """\
t.cnn:4:21: error: unknown setting 'momentun'
    4 | train { batch = 32; momentun = 0.9 }
      |                     ^~~~~~~~~~~~~~
  hint: did you mean 'momentum'?"""),
    "network setting in a layer block": (H + "c = conv(data, filters=4, size=3) { batch = 8 }\n" + HEAD, """\
t.cnn:4:37: error: unknown setting 'batch'
    4 | c = conv(data, filters=4, size=3) { batch = 8 }
      |                                     ^~~~~~~~~
  hint: settings: init_b, init_w, lr, lr_bias, momentum, momentum_bias, precision, update_period, wball, weight_decay"""),
    "float for an int argument": (H + "c = conv(data, filters=4.5, size=3)\n" + HEAD, """\
t.cnn:4:24: error: filters must be an integer
    4 | c = conv(data, filters=4.5, size=3)
      |                        ^~~"""),
    "float for an int setting": (H + "train { batch = 32.0 }\n" + C + HEAD, """\
t.cnn:4:17: error: batch must be an integer
    4 | train { batch = 32.0 }
      |                 ^~~~"""),
    "name for a number": (H + "c = conv(data, filters=4, size=3, stride=two)\n" + HEAD, """\
t.cnn:4:42: error: stride must be a number
    4 | c = conv(data, filters=4, size=3, stride=two)
      |                                          ^~~"""),
    "argument below its minimum": (H + "c = conv(data, filters=4, size=3, padding=-1)\n" + HEAD, """\
t.cnn:4:43: error: padding must be at least 0
    4 | c = conv(data, filters=4, size=3, padding=-1)
      |                                           ^~"""),
    "unknown schedule": (H + "train { lr = dexpp(0.1, 10, 3) }\n" + C + HEAD, """\
t.cnn:4:14: error: unknown schedule 'dexpp'
    4 | train { lr = dexpp(0.1, 10, 3) }
      |              ^~~~~~~~~~~~~~~~~
  hint: did you mean 'dexp'?"""),
    "schedule missing an argument": (H + "train { lr = dexp(0.1, 10) }\n" + C + HEAD, """\
t.cnn:4:14: error: dexp() needs steps
    4 | train { lr = dexp(0.1, 10) }
      |              ^~~~~~~~~~~~~"""),
    "no cost layer": (H + C + "f = fc(c, outputs=10)\nprobs = softmax(f)\n", """\
t.cnn:1:9: error: the network has no cost layer, so there is nothing to train
    1 | network n
      |         ^
  hint: end it with e.g. 'cost = logreg(labels, probs)'"""),
    "labels fed into conv": (H + "c = conv(labels, filters=4, size=3)\n" + HEAD, """\
t.cnn:4:10: error: conv cannot take the label input 'labels'
    4 | c = conv(labels, filters=4, size=3)
      |          ^~~~~~"""),
    "wrong number of inputs": (H + "c = maxpool(data, data, size=2)\n" + HEAD, """\
t.cnn:4:5: error: maxpool takes 1 input, got 2
    4 | c = maxpool(data, data, size=2)
      |     ^~~~~~~"""),
    "input after a keyword argument": (H + "c = conv(filters=4, data, size=3)\n" + HEAD, """\
t.cnn:4:21: error: inputs must come before keyword arguments
    4 | c = conv(filters=4, data, size=3)
      |                     ^~~~"""),
    "no input declared": ("network n\nc = fc(c, outputs=2)\n", """\
t.cnn:1:9: error: the network declares no input
    1 | network n
      |         ^
  hint: add e.g. 'input data: 3x32x32'"""),
    "image input with two dimensions": ("network n\ninput data: 32x32\n", """\
t.cnn:2:1: error: image input 'data' needs channels x height x width, e.g. 3x32x32
    2 | input data: 32x32
      | ^~~~~~~~~~~~~~~~~"""),
    "one class": ("network n\ninput data: 3x32x32\ninput labels: label(1)\n", """\
t.cnn:3:21: error: label(...) needs the number of classes, an integer of at least 2
    3 | input labels: label(1)
      |                     ^"""),
    "duplicate train block": (H + "train { batch = 32 }\ntrain { epochs = 2 }\n" + C + HEAD, """\
t.cnn:5:1: error: duplicate train block
    5 | train { epochs = 2 }
      | ^~~~~~~~~~~~~~~~~~~~
  hint: the first one is on line 4"""),
}


@pytest.mark.parametrize("case", GOLDEN)
def test_golden_error(case):
    source, expected = GOLDEN[case]
    assert error_text(source) == expected


def test_golden_building_blocks_are_valid():
    # the shared pieces of the golden sources check cleanly on their own
    n = net(C)
    assert isinstance(n.node("data"), Input) and n.node("cost").kind == "logreg"
