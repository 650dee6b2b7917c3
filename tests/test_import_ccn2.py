"""Importing cuda-convnet2 configurations (cnnc/frontend/ccn2/, `cnnc import`,
`cnnc compile LAYERS.cfg --params PARAMS.cfg`).

The fixtures in tests/ccn2/ are cuda-convnet2's own ImageNet and CIFAR files
(unmodified) plus model-parallel and hybrid equivalents written from the
documented semantics.  Each imports to a golden .cnn file; its plan is checked
against what cuda-convnet2 runs for it: replicas per layer, passes per
minibatch, update periods, and which device copies which layer's activations.

Regenerate the golden .cnn files after an intended change with
    CNNC_UPDATE_GOLDEN=1 pytest tests/test_import_ccn2.py
and review the diff like any other code change.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from cnnc.build import compile_network, load_plan
from cnnc.check import check
from cnnc.cli import main
from cnnc.diagnostics import CompileError
from cnnc.frontend.ccn2 import fmt_number, import_files, import_text, parse_shape, read_cfg
from cnnc.frontend.parser import parse
from cnnc.ir import Schedule
from cnnc.plan.summary import summarize

from helpers import check_golden, rewrite, replace_once

HERE = Path(__file__).parent / "ccn2"

# name -> (image shape, --mini): the command lines of cuda-convnet2's documentation
CONFIGS = {
    "imagenet-1gpu": ("3x224x224", 128),
    "imagenet-2gpu-data": ("3x224x224", 256),
    "cifar10-11pct": ("3x24x24", 128),
    "imagenet-2gpu-model": ("3x224x224", 128),
    "imagenet-4gpu-data-model": ("3x224x224", 512),
}


def cfg_pair(name: str) -> tuple[Path, Path]:
    return HERE / f"layers-{name}.cfg", HERE / f"layer-params-{name}.cfg"


def import_config(name: str):
    shape, mini = CONFIGS[name]
    layers, params = cfg_pair(name)
    return import_files(layers, params, {"data": parse_shape(shape)[1]}, mini)


def cli(*args) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


# -- the shipped configurations: golden .cnn text -----------------------------------------

@pytest.mark.parametrize("name", CONFIGS)
def test_golden_dsl(name):
    got = import_config(name).text
    golden = HERE / f"{name}.cnn"
    check_golden(got, golden)


@pytest.mark.parametrize("name", CONFIGS)
def test_emitted_dsl_checks_with_cuda_convnet2_shapes(name):
    """The emitted text is a valid network, and cnnc infers the shapes cuda-convnet2 computes."""
    imported = import_config(name)
    net = check(parse(imported.text, f"{name}.cnn"))
    assert [l.name for l in net.layers] == [l.name for l in imported.layers]
    for layer, want in zip(net.layers, imported.layers):
        assert (layer.shape.channels, layer.shape.height, layer.shape.width) == want.shape, layer.name
        assert layer.gpus == want.gpus, layer.name
        assert layer.kind == want.kind


def test_alexnet_shapes_follow_cuda_convnet2_rounding():
    shapes = {l.name: l.shape for l in import_config("imagenet-1gpu").layers}
    assert shapes["conv1"] == (64, 55, 55)          # 1 + ceil((224 - 11) / 4)
    assert shapes["pool1"] == (64, 27, 27)          # 1 + ceil((55 - 3) / 2)
    assert shapes["conv2"] == (192, 27, 27)
    assert shapes["pool2"] == (192, 13, 13)
    assert shapes["pool3"] == (256, 6, 6)
    assert shapes["fc1000"] == (1000, 1, 1)
    cifar = {l.name: l.shape for l in import_config("cifar10-11pct").layers}
    assert cifar["pool1"] == (64, 12, 12)            # outputsX=0: computed, 1 + ceil((24 - 3) / 2)
    assert cifar["local4"] == (32, 6, 6)


def test_imagenet_warnings_name_every_ignored_key():
    imported = import_config("imagenet-1gpu")
    lines = [d.format().split("\n")[0] for d in imported.warnings]
    layers = str(HERE / "layers-imagenet-1gpu.cfg")
    assert lines == [f"{layers}:{n}:1: warning: 'sumWidth' only tunes cuda-convnet2's weight-gradient kernel; "
                     f"cnnc ignores it" for n in (18, 47, 74, 89, 102)]
    assert all(d.severity == "warning" for d in imported.warnings)


def test_labels_classes_come_from_the_softmax_input():
    imported = import_config("imagenet-1gpu")
    assert imported.inputs == {"data": "input data: 3x224x224", "labvec": "input labvec: label(1000)"}
    assert "input labels: label(10)" in import_config("cifar10-11pct").text


# -- the plan cuda-convnet2 would run ----------------------------------------------------

def _alexnet(devices, passes=1, period=1):
    rows = []
    for name, kind in [("conv1", "conv"), ("rnorm1", "cmrnorm"), ("pool1", "maxpool"), ("pool1_neuron", "neuron"),
                       ("conv2", "conv"), ("rnorm2", "cmrnorm"), ("pool2", "maxpool"), ("conv3", "conv"),
                       ("conv4", "conv"), ("conv5", "conv"), ("pool3", "maxpool"), ("pool3_neuron", "neuron")]:
        rows.append((name, kind, devices, passes, period if kind == "conv" else 0))
    return rows


def _alexnet_head(devices):
    return [(n, k, devices, 1, 1 if k == "fc" else 0) for n, k in [
        ("fc4096a", "fc"), ("dropout1", "dropout2"), ("fc4096b", "fc"), ("dropout2", "dropout2"),
        ("fc1000", "fc"), ("probs", "softmax"), ("logprob", "logreg")]]


def _towers():
    rows = []
    for a, b in [("conv1", "conv"), ("rnorm1", "cmrnorm"), ("pool1", "maxpool"), ("conv2", "conv"),
                 ("rnorm2", "cmrnorm"), ("pool2", "maxpool"), ("conv3", "conv"), ("conv4", "conv"),
                 ("conv5", "conv")]:
        rows += [(f"{a}a", b, (0,), 1, int(b == "conv")), (f"{a}b", b, (1,), 1, int(b == "conv"))]
    for t, d in (("a", 0), ("b", 1)):
        rows += [(f"pool3{t}", "maxpool", (d,), 1, 0), (f"pool3{t}_neuron", "neuron", (d,), 1, 0)]
    rows += [("fc2048a", "fc", (0,), 1, 1), ("fc2048b", "fc", (1,), 1, 1),
             ("dropout1a", "dropout2", (0,), 1, 0), ("dropout1b", "dropout2", (1,), 1, 0),
             ("fc2048ba", "fc", (0,), 1, 1), ("fc2048bb", "fc", (1,), 1, 1),
             ("dropout2a", "dropout2", (0,), 1, 0), ("dropout2b", "dropout2", (1,), 1, 0),
             ("fc1000", "fc", (0,), 1, 1), ("probs", "softmax", (0,), 1, 0), ("logprob", "logreg", (0,), 1, 0)]
    return rows


def _hybrid():
    # conv part: 4 replicas, once per minibatch; fc slices: one GPU each, 4 passes, an update every pass
    rows = _alexnet((0, 1, 2, 3))
    s = "abcd"
    rows += [(f"fc1024{x}", "fc", (i,), 4, 1) for i, x in enumerate(s)]
    rows += [(f"dropout1{x}", "dropout2", (i,), 4, 0) for i, x in enumerate(s)]
    rows += [(f"hidden1{x}", "concat", (i,), 4, 0) for i, x in enumerate(s)]
    rows += [(f"fc1024b{x}", "fc", (i,), 4, 1) for i, x in enumerate(s)]
    rows += [(f"dropout2{x}", "dropout2", (i,), 4, 0) for i, x in enumerate(s)]
    rows += [("hidden2", "concat", (0,), 4, 0), ("fc1000", "fc", (0,), 4, 1), ("probs", "softmax", (0,), 4, 0),
             ("logprob", "logreg", (0,), 4, 0)]
    return rows


def _cifar():
    return [(n, k, (0,), 1, 1 if k in ("conv", "local", "fc") else 0) for n, k in [
        ("conv1", "conv"), ("pool1", "maxpool"), ("rnorm1", "cmrnorm"), ("conv2", "conv"), ("rnorm2", "cmrnorm"),
        ("pool2", "maxpool"), ("local3", "local"), ("local4", "local"), ("fc10", "fc"), ("probs", "softmax"),
        ("logprob", "logreg")]]


def _hybrid_copies():
    """Forward copies of the 4-GPU hybrid, as cuda-convnet2 connects replicas: every fc slice reads all
    four conv replicas; every hidden1 joins the four dropout1 slices; hidden2 (GPU 0) the four dropout2."""
    s = "abcd"
    copies = set()
    for d in range(4):
        copies |= {(d, "pool3_neuron", e) for e in range(4) if e != d}
        copies |= {(d, f"dropout1{s[e]}", e) for e in range(4) if e != d}
    copies |= {(0, f"dropout2{s[e]}", e) for e in range(1, 4)}
    return copies


# name -> (layer rows (name, kind, devices, passes, update period), shares, forward copies
#          (to device, layer, from device), device pairs moving activations, pairs exchanging gradients)
PLANS = {
    "imagenet-1gpu": (_alexnet((0,)) + _alexnet_head((0,)), 1, set(), set(), set()),
    "imagenet-2gpu-data": (_alexnet((0, 1)) + _alexnet_head((0, 1)), 2, set(), set(), {(0, 1), (1, 0)}),
    "cifar10-11pct": (_cifar(), 1, set(), set(), set()),
    "imagenet-2gpu-model": (_towers(), 1,
                            {(0, "pool2b", 1), (1, "pool2a", 0), (0, "pool3b_neuron", 1), (1, "pool3a_neuron", 0),
                             (0, "dropout1b", 1), (1, "dropout1a", 0), (0, "dropout2b", 1)},
                            {(0, 1), (1, 0)}, set()),
    "imagenet-4gpu-data-model": (_hybrid(), 4, _hybrid_copies(),
                                 {(a, b) for a in range(4) for b in range(4) if a != b},
                                 {(a, b) for a in range(4) for b in range(4) if a != b}),
}


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            imported = import_config(name)
            out = tmp_path_factory.mktemp(name)
            try:
                result = compile_network(imported.text, f"{name}.cnn", out, use_nvcc=False)
            except CompileError as e:
                raise imported.relocate(e) from None
            cache[name] = (imported, result.plan)
        return cache[name]
    return get


def _copies(plan, phase):
    out = set()
    for dev, ops in plan.programs["train"].items():
        for op in ops:
            if op.kind == "copy" and op.phase == phase:
                src = plan.buffers[op.src]
                if src.device != dev:
                    out.add((dev, src.layer, src.device))
    return out


@pytest.mark.parametrize("name", CONFIGS)
def test_plan_matches_cuda_convnet2(name, plans):
    imported, plan = plans(name)
    rows, shares, copies, moving, exchanging = PLANS[name]
    s = summarize(plan)
    got = [(l["name"], l["kind"], tuple(l["devices"]), l["passes"], l["update_period"]) for l in s["layers"]]
    assert got == rows
    # the importer's own account of cuda-convnet2's semantics says the same
    assert [(l.name, l.kind, l.gpus, l.passes, l.update_period) for l in imported.layers] == rows
    assert s["shares"] == shares
    assert s["batch"] == CONFIGS[name][1]
    assert _copies(plan, "forward") == copies
    # gradients of copied activations go back where they came from
    assert _copies(plan, "backward") == {(src, layer, dst) for dst, layer, src in copies}
    assert {(t["from"], t["to"]) for t in s["transfers"] if t["activation_bytes"]} == moving
    assert {(t["from"], t["to"]) for t in s["transfers"] if t["collective_bytes"]} == exchanging


def test_compile_pair_from_the_command_line(tmp_path):
    layers, params = cfg_pair("cifar10-11pct")
    out = tmp_path / "build"
    result = cli("compile", layers, "--params", params, "--input-shape", "data=3x24x24", "-o", out, "--no-nvcc")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == \
        f"compiled cifar10_11pct: 11 layers, {len(load_plan(out).kernels)} kernels, 1 device(s) -> {out}/"
    assert (out / "source.cnn").read_text() == (HERE / "cifar10-11pct.cnn").read_text()
    assert "warning: 'sumWidth'" in result.stderr
    again = cli("compile", layers, "--params", params, "--input-shape", "data=3x24x24", "-o", out, "--no-nvcc")
    assert again.exit_code == 0 and again.stdout == f"{out}: up to date\n"


# -- the command line --------------------------------------------------------------------

def test_import_writes_the_golden_file(tmp_path):
    layers, params = cfg_pair("imagenet-2gpu-data")
    out = tmp_path / "net.cnn"
    result = cli("import", layers, params, "--input-shape", "data=3x224x224", "--mini", "256", "-o", out)
    assert result.exit_code == 0, result.output
    assert out.read_text() == (HERE / "imagenet-2gpu-data.cnn").read_text()
    assert result.stdout == f"imported imagenet_2gpu_data: 19 layers, replicas per layer: 2 -> {out}\n"
    assert result.stderr.count("warning:") == 5


def test_import_to_stdout_and_unnamed_shape():
    layers, params = cfg_pair("cifar10-11pct")
    result = cli("import", layers, params, "--input-shape", "3x24x24")
    assert result.exit_code == 0, result.output
    assert "input data: 3x24x24\n" in result.stdout
    assert result.stdout.startswith("# Imported from cuda-convnet2's layers-cifar10-11pct.cfg")


def test_missing_input_shape_names_the_layer_and_the_option():
    layers, params = cfg_pair("imagenet-1gpu")
    result = cli("import", layers, params)
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert result.stderr.splitlines()[0] == (
        f"{layers}:1:1: error: data layer 'data' needs an image shape: cuda-convnet2 takes it from its data "
        f"provider, and the .cfg files do not give it")
    assert result.stderr.splitlines()[-1] == "  hint: pass --input-shape data=CxHxW, e.g. --input-shape data=3x224x224"


def test_compile_missing_input_shape_is_the_same_error(tmp_path):
    layers, params = cfg_pair("imagenet-1gpu")
    result = cli("compile", layers, "--params", params, "-o", tmp_path / "b", "--no-nvcc")
    assert result.exit_code == 2
    assert "needs an image shape" in result.stderr
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("args,message", [
    (["--input-shape", "dat=3x224x224"], "--input-shape: error: "),
    (["--input-shape", "labvec=1x1x1"], "--input-shape: error: data layer 'labvec' holds labels, not images"),
])
def test_bad_input_shape_names(args, message):
    layers, params = cfg_pair("imagenet-1gpu")
    result = cli("import", layers, params, *args)
    assert result.exit_code == 2
    assert result.stderr.startswith(message)


def test_malformed_input_shape_is_a_usage_error():
    layers, params = cfg_pair("imagenet-1gpu")
    result = cli("import", layers, params, "--input-shape", "data=3x224")
    assert result.exit_code == 2
    assert "expected NAME=CxHxW" in result.output


def test_classes_override_must_agree_with_the_softmax():
    layers, params = cfg_pair("cifar10-11pct")
    ok = cli("import", layers, params, "--input-shape", "data=3x24x24", "--classes", "10")
    assert ok.exit_code == 0
    assert "input labels: label(10)    # classes: --classes" in ok.stdout
    bad = cli("import", layers, params, "--input-shape", "data=3x24x24", "--classes", "100")
    assert bad.exit_code == 2
    assert bad.stderr.splitlines()[0] == (
        f"{layers}:102:8: error: softmax input 'probs' of 'logprob' produces 10 values, but --classes is 100")


def test_mini_sets_the_batch():
    layers, params = cfg_pair("cifar10-11pct")
    result = cli("import", layers, params, "--input-shape", "data=3x24x24", "--mini", "64")
    assert "  batch = 64\n" in result.stdout


def test_compile_needs_params_for_a_cfg_and_rejects_ccn2_options_for_cnn(tmp_path, tiny_cnn):
    layers, _ = cfg_pair("cifar10-11pct")
    result = cli("compile", layers, "-o", tmp_path / "b")
    assert result.exit_code == 2 and "--params" in result.output
    result = cli("compile", tiny_cnn, "-o", tmp_path / "b", "--input-shape", "data=1x8x8")
    assert result.exit_code == 2 and "apply to cuda-convnet2 .cfg files" in result.output


def test_swapped_files_get_a_hint():
    layers, params = cfg_pair("cifar10-11pct")
    result = cli("import", params, layers, "--input-shape", "data=3x24x24")
    assert result.exit_code == 2
    assert result.stderr.splitlines()[0] == f"{params}:13:1: error: layer 'conv1' has no type"
    assert result.stderr.splitlines()[-1] == \
        f"  hint: {params} looks like a layer-parameter file: give the layer-definition file first"


def test_missing_file(tmp_path):
    _, params = cfg_pair("cifar10-11pct")
    result = cli("import", tmp_path / "nope.cfg", params)
    assert result.exit_code == 2
    assert result.stderr == f"{tmp_path / 'nope.cfg'}: error: no such file\n"


def test_checker_errors_point_at_the_cfg_section(tmp_path):
    layers = tmp_path / "l.cfg"
    layers.write_text(LAYERS_HEAD + "[conv1]\ntype=conv\ninputs=data\nchannels=3\nfilters=16\npadding=3\n"
                      "filterSize=3\ninitW=0.01\ngpu=0\n" + LAYERS_TAIL.format(x="conv1", gpu=0))
    params = tmp_path / "p.cfg"
    params.write_text(PARAMS_WEIGHTS.format(n="conv1") + PARAMS_WEIGHTS.format(n="fc") + "[cost]\ncoeff=1\n")
    result = cli("compile", layers, "--params", params, "--input-shape", "data=3x8x8", "-o", tmp_path / "b",
                 "--no-nvcc")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"{layers}:9:1: error: conv1: padding 3 must be smaller than the filter size 3",
        "    9 | [conv1]",
        "      | ^~~~~~~",
        "  hint: imported as: conv1 = conv(data, filters=16, size=3, padding=3, init_w=0.01)",
    ]


# -- semantics, on small hand-written files -----------------------------------------------

LAYERS_HEAD = "[data]\ntype=data\ndataIdx=0\n\n[labels]\ntype=data\ndataIdx=1\n\n"
LAYERS_TAIL = "\n[fc]\ntype=fc\ninputs={x}\noutputs=10\ngpu={gpu}\n\n[probs]\ntype=softmax\ninputs=fc\n\n" \
              "[cost]\ntype=cost.logreg\ninputs=labels,probs\ngpu={gpu}\n"
PARAMS_WEIGHTS = "[{n}]\nepsW=0.01\nepsB=0.02\nmomW=0.9\nmomB=0.9\n"
CONV = "[conv1]\ntype=conv\ninputs=data\nchannels=3\nfilters=16\nfilterSize=3\ninitW=0.01\ngpu={gpu}\n"


def imp(body: str, params: str = "", shape=(3, 8, 8), tail_input: str | None = None, gpu: str = "0",
        with_tail: bool = True, **kw):
    """Import LAYERS_HEAD + body (+ an fc/softmax/logreg head on `tail_input`), with weight
    parameters for every conv/local/fc section that `params` does not mention."""
    text = LAYERS_HEAD + body
    if with_tail:
        last = tail_input or [s for s in read_cfg(text, "l.cfg").sections][-1]
        text += LAYERS_TAIL.format(x=last, gpu=gpu)
    cfg = read_cfg(text, "l.cfg")
    p = params
    given = read_cfg(params, "p.cfg").sections
    for name, sec in cfg.sections.items():
        t = sec.entries["type"].value if "type" in sec.entries else ""
        if t in ("conv", "local", "fc") and name not in given:
            p += "\n" + PARAMS_WEIGHTS.format(n=name)
        if t in ("cmrnorm", "rnorm", "cnorm") and name not in given:
            p += f"\n[{name}]\nscale=0.001\npow=0.75\n"
        if t in ("dropout", "dropout2", "eltsum") and name not in given:
            p += f"\n[{name}]\n"
        if t.startswith("cost.") and name not in given:
            p += f"\n[{name}]\ncoeff=1\n"
    return import_text(text, "l.cfg", p, "p.cfg", {"data": shape}, **kw)


def layer_line(imported, name: str) -> str:
    return next(l for l in imported.text.splitlines() if f" {name} = " in f" {l}")


def error(body: str, params: str = "", **kw) -> str:
    with pytest.raises(CompileError) as info:
        imp(body, params, **kw)
    return info.value.format()


def first_error_line(body: str, params: str = "", **kw) -> str:
    return error(body, params, **kw).splitlines()[0]


# INI reading

def test_ini_comments_continuations_case_and_defaults():
    text = ("# comment\n; also a comment\n[DEFAULT]\ngpu=0\n\n[a]\nType = conv\nINPUTS: x,\n   y\n"
            "epsW=dexp[base=0.01;tgtFactor=250;numSteps=4]\nrem not a key\nmomW=0.9 ; a comment\n"
            "epsB=dexp[base=0.01;tgtFactor=250;numSteps=4] ; kept: only the first ';' can start a comment\n")
    cfg = read_cfg(text, "f.cfg")
    a = cfg.sections["a"]
    assert a.entries["type"].value == "conv" and a.entries["type"].name == "Type"
    assert a.entries["inputs"].value == "x,\ny" and a.entries["inputs"].line == 8
    assert a.entries["epsw"].value == "dexp[base=0.01;tgtFactor=250;numSteps=4]"
    assert a.entries["momw"].value == "0.9"
    assert a.entries["epsb"].value.endswith("; kept: only the first ';' can start a comment")
    assert cfg.defaults["gpu"].value == "0"
    assert a.entries["type"].column == 8


def test_ini_repeats_warn_and_merge():
    warnings = []
    cfg = read_cfg("[a]\nx=1\nx=2\n[b]\n[a]\ny=3\n", "f.cfg", warnings.append)
    assert cfg.sections["a"].entries["x"].value == "2" and cfg.sections["a"].entries["y"].value == "3"
    assert [w.format().splitlines()[0] for w in warnings] == [
        "f.cfg:3:1: warning: 'x' is given twice in [a]; the later value is used, as cuda-convnet2 does",
        "f.cfg:5:1: warning: section [a] appears again; its keys are merged into the first one, "
        "as cuda-convnet2 does",
    ]


@pytest.mark.parametrize("text,message", [
    ("x=1\n[a]\n", "f.cfg:1:1: error: 'key=value' before the first [section]"),
    ("[a]\njust words\n", "f.cfg:2:1: error: expected '[section]' or 'key=value'"),
])
def test_ini_syntax_errors(text, message):
    with pytest.raises(CompileError) as info:
        read_cfg(text, "f.cfg")
    assert info.value.format().splitlines()[0] == message


def test_keys_are_case_insensitive_and_default_section_applies():
    imported = imp("[DEFAULT]\ngpu=0\n\n[conv1]\nTYPE=conv\ninputs=data\nChannels=3\nFILTERS=16\nfiltersize=3\n"
                   "initw=0.01\n", "[conv1]\nEPSW=0.01\nepsb=0.02\nMomW=0.9\nmomb=0.9\n")
    assert layer_line(imported, "conv1") == "conv1 = conv(data, filters=16, size=3, init_w=0.01)"


# learning-rate schedules and training parameters

@pytest.mark.parametrize("text,schedule", [
    ("0.001", Schedule("const", 0.001)),
    ("const[base=0.001]", Schedule("const", 0.001)),
    ("linear[base=0.01;tgtFactor=10]", Schedule("linear", 0.01, 10.0)),
    ("exp[base=0.01;tgtFactor=100]", Schedule("exp", 0.01, 100.0)),
    ("dexp[base=0.01;tgtFactor=250;numSteps=4]", Schedule("dexp", 0.01, 250.0, 4)),
    ("DEXP[ numSteps=4; base=0.01;tgtfactor=250]", Schedule("dexp", 0.01, 250.0, 4)),
])
def test_schedules(text, schedule):
    imported = imp(CONV.format(gpu=0), f"[conv1]\nepsW={text}\nepsB=0.5\nmomW=0.9\nmomB=0.9\n")
    net = check(parse(imported.text))
    assert net.layers[0].train.lr == schedule
    assert net.layers[0].train.lr_bias == Schedule("const", 0.5)


@pytest.mark.parametrize("text,message", [
    ("dexpp[base=0.01]", "'epsW': unknown learning-rate schedule 'dexpp'"),
    ("dexp[base=0.01;tgtFactor=250]", "'epsW': dexp needs numSteps"),
    ("exp[base=0.01;tgt=2]", "'epsW': exp has no parameter 'tgt'"),
    ("exp[base=x;tgtFactor=2]", "'epsW': base must be a number, not 'x'"),
    ("dexp[base=0.01;tgtFactor=250;numSteps=2.5]", "'epsW': numSteps must be an integer, not '2.5'"),
    ("exp[base=0.01;tgtFactor=0.5]",
     "'epsW': tgtFactor=0.5; cnnc's schedules need a tgtFactor of at least 1"),
    ("-1", "'epsW': a learning rate must be a finite number of at least 0, not -1"),
])
def test_schedule_errors(text, message):
    msg = first_error_line(CONV.format(gpu=0), f"[conv1]\nepsW={text}\nepsB=0.5\nmomW=0.9\nmomB=0.9\n")
    assert msg == f"p.cfg:2:6: error: {message}"


def test_train_defaults_are_the_most_common_values_and_layers_keep_the_rest():
    body = CONV.format(gpu=0) + "\n[conv2]\ntype=conv\ninputs=conv1\nchannels=16\nfilters=16\nfilterSize=3\n" \
                                "initW=0.01\n"
    params = ("[conv1]\nepsW=0.1\nepsB=0.2\nmomW=0.9\nmomB=0.5\nwc=0.004\n"
              "[conv2]\nepsW=0.1\nepsB=0.2\nmomW=0.9\nmomB=0.5\nwc=0.004\n"
              "[fc]\nepsW=0.3\nepsB=0.3\nmomW=0.8\nmomB=0.8\nwc=0\nupdatePeriod=1\n")   # 1 = 0 in one pass
    imported = imp(body, params)
    text = imported.text
    assert "train {\n  batch = 128\n  lr = 0.1\n  lr_bias = 0.2\n  momentum = 0.9\n  momentum_bias = 0.5\n" \
           "  weight_decay = 0.004\n}\n" in text
    # fc: lr 0.3 (lr_bias must then be given: the train {} one is 0.2), momentum 0.8 (likewise its bias)
    assert layer_line(imported, "fc") == ("fc = fc(conv2, outputs=10, init_w=0.01) { lr = 0.3; lr_bias = 0.3; "
                                          "momentum = 0.8; momentum_bias = 0.8; weight_decay = 0 }")
    net = check(parse(text))
    fc = net.layers[2].train
    assert (fc.lr.base, fc.lr_bias.base, fc.momentum, fc.momentum_bias, fc.weight_decay) == \
        (0.3, 0.3, 0.8, 0.8, 0.0)
    c1 = net.layers[0].train
    assert (c1.lr.base, c1.lr_bias.base, c1.momentum, c1.momentum_bias, c1.weight_decay) == (0.1, 0.2, 0.9, 0.5, 0.004)
    # wball: a per-layer setting where it is not 0
    with_ball = imp(body, replace_once(params, "[conv2]\n", "[conv2]\nwball=0.5\n"))
    assert layer_line(with_ball, "conv2").endswith("{ wball = 0.5 }")
    assert check(parse(with_ball.text)).layers[1].train.wball == 0.5


@pytest.mark.parametrize("params,message", [
    ("[conv1]\nepsB=0.02\nmomW=0.9\nmomB=0.9\n",
     "p.cfg:1:1: error: layer 'conv1' (type=conv) is missing the required key 'epsW'"),
    ("[conv1]\nepsW=0.01\nepsB=0.02,0.03\nmomW=0.9\nmomB=0.9\n",
     "p.cfg:3:6: error: 'epsB' lists 2 schedules; a layer has one bias vector, so one schedule"),
    ("[conv1]\nepsW=0.01\nepsB=0.02\nmomW=0.9\nmomB=0.9\nwcNormMax=0.5\n",
     "p.cfg:6:11: error: layer 'conv1' (type=conv): weight-norm constraints (wcNormMax) is not supported by cnnc"),
    ("[conv1]\nepsW=0.01\nepsB=0.02\nmomW=0.9\nmomB=0.9\nwc=-1\n",
     "p.cfg:6:4: error: 'wc' must be at least 0, not -1"),
    ("[conv1]\nepsW=0.01\nepsB=0.02\nmomW=0.9\nmomB=0.9\nupdatePeriod=2\n",
     "p.cfg:6:14: error: updatePeriod=2 must divide the 1 backward pass per minibatch"),
])
def test_weight_parameter_errors(params, message):
    assert first_error_line(CONV.format(gpu=0), params) == message


def test_missing_parameter_section_is_an_error():
    text = LAYERS_HEAD + CONV.format(gpu=0) + LAYERS_TAIL.format(x="conv1", gpu=0)
    with pytest.raises(CompileError) as info:
        import_text(text, "l.cfg", PARAMS_WEIGHTS.format(n="fc") + "[cost]\ncoeff=1\n", "p.cfg", {"data": (3, 8, 8)})
    assert info.value.format().splitlines() == [
        "l.cfg:9:1: error: layer 'conv1' (type=conv) needs a section [conv1] in p.cfg",
        "    9 | [conv1]",
        "      | ^~~~~~~",
        "  hint: add [conv1] with epsW, epsB, momW and momB",
    ]


def test_update_period_counts_passes_of_the_whole_net():
    """cuda-convnet2: a layer with R replicas is active every R/min(R) passes and updates every
    max(updatePeriod, R/min(R)) passes; 0 means as often as possible.  cnnc counts own passes."""
    body = CONV.format(gpu="0,1,2,3")
    for period, conv, fc in [(0, 1, 1), (1, 1, 1), (2, 1, 2), (4, 1, 4)]:
        params = (f"[conv1]\nepsW=0.01\nepsB=0.02\nmomW=0.9\nmomB=0.9\nupdatePeriod={period}\n"
                  f"[fc]\nepsW=0.01\nepsB=0.02\nmomW=0.9\nmomB=0.9\nupdatePeriod={period}\n")
        imported = imp(body, params, gpu="0")
        got = {l.name: (l.passes, l.update_period) for l in imported.layers}
        assert got["conv1"] == (1, conv) and got["fc"] == (4, fc), period
        net = check(parse(imported.text))
        assert {l.name: (l.train.update_period or 4 if l.name == "fc" else l.train.update_period or 1)
                for l in net.layers if l.train} == {"conv1": conv, "fc": fc}
    # in cnnc's default (update_period = 0) the fc would update once per minibatch, so 0 is written out
    params = "[conv1]\nepsW=0.01\nepsB=0.02\nmomW=0.9\nmomB=0.9\n[fc]\nepsW=0.01\nepsB=0.02\nmomW=0.9\nmomB=0.9\n"
    imported = imp(body, params, gpu="0")
    assert layer_line(imported, "fc").endswith("{ update_period = 1 }")
    assert "update_period" not in layer_line(imported, "conv1")
    msg = first_error_line(body, "[fc]\nepsW=0.01\nepsB=0.02\nmomW=0.9\nmomB=0.9\nupdatePeriod=3\n", gpu="0")
    assert msg == "p.cfg:6:14: error: updatePeriod=3 must divide the 4 backward passes per minibatch"
    msg = first_error_line(CONV.format(gpu="0,1") + "\n[c2]\ntype=conv\ninputs=conv1\nchannels=16\nfilters=16\n"
                           "filterSize=3\ninitW=0.01\ngpu=0,1,2,3\n", "", gpu="0")
    assert "has 4 replicas, which does not divide the 2 replicas of its input 'conv1'" in msg


# neurons

def test_neurons_fuse_into_weight_layers_and_detach_elsewhere():
    body = replace_once(CONV.format(gpu=0), "gpu=0", "gpu=0\nneuron=tanh[1.7,0.66]") + \
        "\n[pool1]\ntype=pool\npool=avg\ninputs=conv1\nsizeX=2\nstride=2\nchannels=16\nneuron=relu\n" \
        "\n[n]\ntype=neuron\ninputs=pool1\nneuron=abs\n"
    imported = imp(body)
    lines = imported.text.splitlines()
    start = lines.index("conv1 = conv(data, filters=16, size=3, init_w=0.01) tanh[1.7, 0.66]")
    assert lines[start:start + 4] == [
        "conv1 = conv(data, filters=16, size=3, init_w=0.01) tanh[1.7, 0.66]",
        "pool1 = avgpool(conv1, size=2, stride=2)",
        "pool1_neuron = neuron(pool1) relu",
        "n = neuron(pool1_neuron) abs",
    ]
    check(parse(imported.text))


def test_unfusable_neuron_on_a_conv_gets_its_own_layer():
    imported = imp(replace_once(CONV.format(gpu=0), "gpu=0", "gpu=0\nneuron=square"))
    assert "conv1_neuron = neuron(conv1) square" in imported.text
    assert "fc = fc(conv1_neuron," in imported.text


@pytest.mark.parametrize("neuron,message", [
    ("nrelu", "cnnc has no nrelu neuron"),
    ("tanh[1.7]", "the tanh neuron takes 2 parameters, got 1"),
    ("relu[1]", "the relu neuron takes 0 parameters, got 1"),
    ("rleu", "unknown neuron 'rleu'"),
])
def test_neuron_errors(neuron, message):
    msg = first_error_line(replace_once(CONV.format(gpu=0), "gpu=0", f"gpu=0\nneuron={neuron}"))
    assert msg == f"l.cfg:17:8: error: layer 'conv1' (type=conv): {message}"


# per-input lists and multi-input layers

def test_per_input_lists_expand_and_must_agree_where_cnnc_has_one_value():
    body = CONV.format(gpu=0) + "\n[c2]\ntype=conv\ninputs=data\nchannels=3\nfilters=16\nfilterSize=3\ninitW=0.01\n" \
        "\n[sum]\ntype=conv\ninputs=conv1,c2\nchannels=16\nfilters=32,32\npadding=1\nfilterSize=3,3\ninitW=0.02\n"
    params = "[sum]\nepsW=0.01,0.01\nepsB=0.02\nmomW=0.9\nmomB=0.9\nwc=0,0\n"
    imported = imp(body, params)
    assert layer_line(imported, "sum") == "sum = conv(conv1, c2, filters=32, size=3, padding=1, init_w=0.02)"
    check(parse(imported.text))
    bad = replace_once(body, "filterSize=3,3", "filterSize=3,5")
    assert first_error_line(bad, params) == "l.cfg:28:8: error: layer 'sum' (type=conv): all inputs must " \
                                            "produce equally-sized output, got 32x6x6, 32x4x4"
    assert first_error_line(replace_once(body, "filters=32,32", "filters=32,32,32"), params) == \
        "l.cfg:30:9: error: 'filters' lists 3 values but layer 'sum' (type=conv) has 2 inputs"
    assert first_error_line(body, replace_once(params, "epsW=0.01,0.01", "epsW=0.01,0.02")) == \
        "p.cfg:2:6: error: 'epsW' differs between the inputs of layer 'sum' (type=conv) (0.01,0.02); cnnc " \
        "gives a layer one value for all its inputs"


def test_channels_must_match_the_input():
    assert first_error_line(replace_once(CONV.format(gpu=0), "channels=3", "channels=4")) == \
        "l.cfg:12:10: error: layer 'conv1' (type=conv): channels=4, but 'data' produces 3 channels (3x8x8)"


# placement

def test_gpu_lists_are_inherited_and_written_only_where_the_cnn_rule_differs():
    body = ("[conv1]\ntype=conv\ninputs=data\nchannels=3\nfilters=16\nfilterSize=3\ninitW=0.01\ngpu=1\n"
            "\n[c2]\ntype=conv\ninputs=conv1\nchannels=16\nfilters=16\nfilterSize=3\ninitW=0.01\n"
            "\n[c3]\ntype=conv\ninputs=conv1\nchannels=16\nfilters=16\nfilterSize=3\ninitW=0.01\ngpu=0\n"
            "\n[both]\ntype=concat\ninputs=c2,c3\n")
    imported = imp(body, gpu="1")
    assert [(l.name, l.gpus) for l in imported.layers][:4] == [("conv1", (1,)), ("c2", (1,)), ("c3", (0,)),
                                                              ("both", (1,))]
    assert layer_line(imported, "conv1").startswith("@gpu(1) conv1 = conv(")
    assert layer_line(imported, "c2").startswith("c2 = ")
    assert layer_line(imported, "c3").startswith("@gpu(0) c3 = ")
    assert layer_line(imported, "both") == "both = concat(c2, c3)"
    assert layer_line(imported, "cost") == "cost = logreg(labels, probs)"


def test_layer_without_gpu_under_a_data_layer_warns():
    imported = imp(replace_once(CONV.format(gpu=0), "gpu=0\n", ""))
    assert imported.warnings[0].format().splitlines()[0] == (
        "l.cfg:9:1: warning: layer 'conv1' (type=conv) has no gpu= and its first input 'data' is a data layer, "
        "so cuda-convnet2 would not place it; using gpu=0")


@pytest.mark.parametrize("body,tail,message", [
    (CONV.format(gpu="0,0"), "conv1",
     "l.cfg:16:5: error: layer 'conv1' (type=conv): all replicas must run on different GPUs (0,0)"),
    # a layer's replica count must divide its inputs' (s inherits conv1's two GPUs; c2 has one)
    (CONV.format(gpu="0,1") + "\n[c2]\ntype=conv\ninputs=data\nchannels=3\nfilters=16\nfilterSize=3\n"
     "initW=0.01\ngpu=0\n\n[s]\ntype=eltsum\ninputs=conv1,c2\n", "s",
     "l.cfg:16:5: error: layer 's' (type=eltsum) has 2 replicas, which does not divide the 1 replicas of its "
     "input 'c2'"),
    # a layer's inputs must have one replica count
    (CONV.format(gpu="0,1") + "\n[c2]\ntype=conv\ninputs=data\nchannels=3\nfilters=16\nfilterSize=3\n"
     "initW=0.01\ngpu=0\n\n[s]\ntype=eltsum\ninputs=conv1,c2\ngpu=0\n", "s",
     "l.cfg:29:8: error: the inputs of layer 's' (type=eltsum) have different numbers of replicas "
     "(conv1: 2, c2: 1)"),
    # a layer's consumers must have one replica count
    (CONV.format(gpu="0,1") + "\n[c2]\ntype=conv\ninputs=data\nchannels=3\nfilters=16\nfilterSize=3\n"
     "initW=0.01\ngpu=0\n\n[s]\ntype=eltsum\ninputs=conv1\ngpu=0\n\n[t]\ntype=eltsum\ninputs=s,c2\n", "t",
     "l.cfg:25:5: error: the layers that take 'data' as input have different numbers of replicas "
     "(conv1: 2, c2: 1)"),
])
def test_replica_rules(body, tail, message):
    assert first_error_line(body, tail_input=tail) == message


def test_mini_must_split_among_replicas():
    assert first_error_line(CONV.format(gpu="0,1,2"), gpu="0,1,2", mini=128) == (
        "l.cfg:16:5: error: --mini 128 cannot be split evenly among the 3 replicas of 'conv1'")


def test_three_replica_levels_warn_that_cnnc_plans_two():
    body = CONV.format(gpu="0,1,2,3") + "\n[c2]\ntype=conv\ninputs=conv1\nchannels=16\nfilters=16\n" \
                                        "filterSize=3\ninitW=0.01\ngpu=0,1\n"
    imported = imp(body, gpu="0")
    assert imported.replica_levels == (4, 2, 1)
    assert imported.warnings[-1].format().splitlines()[0] == (
        "l.cfg:25:5: warning: this network uses 3 replica counts (4, 2, 1); cnnc plans two levels per network, "
        "so compiling it fails at 'c2'")


# layer types and their keys

def test_pool_keys_and_rounding():
    body = CONV.format(gpu=0) + "\n[p]\ntype=pool\npool=max\ninputs=conv1\nstart=1\nsizeX=3\nstride=2\n" \
                                "outputsX=2\nchannels=16\n"
    imported = imp(body)
    assert layer_line(imported, "p") == "p = maxpool(conv1, size=3, stride=2, start=1, outputs=2)"
    assert [l.shape for l in imported.layers if l.name == "p"] == [(16, 2, 2)]
    check(parse(imported.text))
    pool = rewrite(body, {"outputsX=2\n": "", "start=1\n": ""})
    assert [l.shape for l in imp(pool).layers if l.name == "p"] == [(16, 3, 3)]     # 1 + ceil((6 - 3) / 2)
    assert first_error_line(replace_once(pool, "stride=2", "stride=4")) == \
        "l.cfg:23:8: error: 'stride' must be at most 3, not 4"
    assert first_error_line(replace_once(pool, "pool=max", "pool=maxabs")) == \
        "l.cfg:20:6: error: layer 'p' (type=pool): pool=maxabs is not supported by cnnc"


def test_norm_layers_take_scale_and_pow_from_the_params_file():
    body = CONV.format(gpu=0) + "\n[r]\ntype=cmrnorm\ninputs=conv1\nchannels=16\nsize=5\n" \
        "\n[r2]\ntype=rnorm\ninputs=r\nchannels=16\nsize=3\n\n[r3]\ntype=cnorm\ninputs=r2\nchannels=16\nsize=3\n"
    params = "[r]\nscale=0.0001\npow=0.75\nminDiv=2\n[r2]\nscale=0.001\npow=0.5\n[r3]\nscale=0.001\npow=0.5\n"
    imported = imp(body, params)
    assert layer_line(imported, "r") == "r = cmrnorm(conv1, size=5, scale=0.0001, pow=0.75, min_div=2)"
    assert layer_line(imported, "r2") == "r2 = rnorm(r, size=3, scale=0.001, pow=0.5)"
    assert layer_line(imported, "r3") == "r3 = cnorm(r2, size=3, scale=0.001, pow=0.5)"
    check(parse(imported.text))
    assert first_error_line(body, replace_once(params, "pow=0.75\n", "")) == \
        "p.cfg:1:1: error: layer 'r' (type=cmrnorm) is missing the required key 'pow'"
    assert first_error_line(replace_once(body, "size=5", "size=1"), params) == \
        "l.cfg:22:6: error: 'size' must be at least 2, not 1"


def test_dropout_eltsum_concat_pass_and_costs():
    body = (CONV.format(gpu=0) + "\n[c2]\ntype=conv\ninputs=data\nchannels=3\nfilters=16\nfilterSize=3\n"
            "initW=0.01\n\n[d1]\ntype=dropout\ninputs=conv1\n\n[d2]\ntype=dropout2\ninputs=c2\n"
            "\n[off]\ntype=dropout\ninputs=d1\n\n[diff]\ntype=eltsum\ninputs=off,d2\n"
            "\n[mx]\ntype=eltmax\ninputs=diff,d2\n\n[cat]\ntype=concat\ninputs=mx,diff\n\n[one]\ntype=pass\n"
            "inputs=cat\n\n[two]\ntype=pass\ninputs=one,one\n")
    params = "[d1]\nkeep=0.8\n[d2]\n[off]\nenable=false\n[diff]\ncoeffs=1,-1\n"
    imported = imp(body, params)
    assert layer_line(imported, "d1") == "d1 = dropout(conv1, keep=0.8)"
    assert layer_line(imported, "d2") == "d2 = dropout2(c2)"
    assert layer_line(imported, "off") == "off = pass(d1)    # dropout with enable=false passes its input through"
    assert layer_line(imported, "diff") == "diff = eltsum(off, d2, coeffs=[1, -1])"
    assert layer_line(imported, "mx") == "mx = eltmax(diff, d2)"
    assert layer_line(imported, "cat") == "cat = concat(mx, diff)"
    assert layer_line(imported, "one") == "one = pass(cat)"
    assert layer_line(imported, "two") == "two = concat(one, one)    # type=pass"
    assert [l.shape for l in imported.layers if l.name == "two"] == [(64, 6, 6)]
    check(parse(imported.text))
    assert first_error_line(body, replace_once(params, "coeffs=1,-1", "coeffs=1,-1,2")) == \
        "p.cfg:7:8: error: layer 'diff' (type=eltsum): 'coeffs' lists 3 values for 2 inputs"


def test_other_costs():
    body = CONV.format(gpu=0) + "\n[fc]\ntype=fc\ninputs=conv1\noutputs=10\n\n[probs]\ntype=softmax\ninputs=fc\n" \
        "\n[ce]\ntype=cost.ce\ninputs=labels,probs\n\n[sq]\ntype=cost.sum2\ninputs=fc\n"
    imported = imp(body, "[ce]\ncoeff=1\n[sq]\ncoeff=0.5\n", with_tail=False)
    assert layer_line(imported, "ce") == "ce = crossent(labels, probs)"
    assert layer_line(imported, "sq") == "sq = sum2(fc, coeff=0.5)"
    assert imported.inputs["labels"] == "input labels: label(10)"


@pytest.mark.parametrize("body,message", [
    ("[x]\ntype=convv\ninputs=data\n", "l.cfg:10:6: error: unknown layer type 'convv'"),
    ("[x]\ntype=sfc\ninputs=data\n",
     "l.cfg:10:6: error: cnnc does not support cuda-convnet2's split fully-connected layers (type=sfc)"),
    ("[x]\ninputs=data\n", "l.cfg:9:1: error: layer 'x' has no type"),
    ("[x]\ntype=softmax\ninputs=dat\n", "l.cfg:11:8: error: layer 'x' (type=softmax): input layer 'dat' is not "
                                        "defined"),
    ("[x]\ntype=softmax\ninputs=fc\n", "l.cfg:11:8: error: layer 'x' (type=softmax): input layer 'fc' is not "
                                       "defined"),
    ("[x]\ntype=softmax\ninputs=data,data\n", "l.cfg:11:8: error: layer 'x' (type=softmax) takes 1 input, got 2"),
    ("[x]\ntype=conv\ninputs=data\nchannels=3\nfilters=16\ninitW=0.01\ngpu=0\n",
     "l.cfg:9:1: error: layer 'x' (type=conv) is missing the required key 'filterSize'"),
])
def test_layer_definition_errors(body, message):
    assert first_error_line(body, tail_input="x" if "type=conv" in body else "data") == message


def test_input_defined_later_hint():
    text = error("[x]\ntype=softmax\ninputs=fc\n", tail_input="data")
    assert text.splitlines()[-1] == "  hint: 'fc' is defined on line 13: cuda-convnet2 needs a layer's inputs " \
                                    "defined above it"


def test_unused_layer_and_reversed_cost_inputs():
    assert first_error_line(CONV.format(gpu=0) + "\n[lost]\ntype=softmax\ninputs=conv1\n", tail_input="conv1") == \
        "l.cfg:18:1: error: layer 'lost' (type=softmax) is unused"
    text = LAYERS_HEAD + CONV.format(gpu=0) + replace_once(LAYERS_TAIL.format(x="conv1", gpu=0),
                                                                   "labels,probs", "probs,labels")
    with pytest.raises(CompileError) as info:
        import_text(text, "l.cfg", "", "p.cfg", {"data": (3, 8, 8)})
    assert info.value.format().splitlines()[0] == "l.cfg:30:8: error: layer 'cost' (type=cost.logreg): the first " \
        "input must be the labels (a data layer); 'probs' is a softmax layer"


def test_ignored_and_misplaced_keys_warn():
    body = replace_once(CONV.format(gpu=0), "gpu=0", "gpu=0\npartialSum=1\nepsW=0.1\nfiltrs=3")
    params = "[conv1]\nepsW=0.01\nepsB=0.02\nmomW=0.9\nmomB=0.9\nchannels=3\nmomentum=1\n[nothere]\nx=1\n"
    imported = imp(body, params)
    assert [w.format().splitlines()[0] for w in imported.warnings] == [
        "l.cfg:17:1: warning: 'partialSum' is a cuda-convnet (version 1) kernel setting that cuda-convnet2 "
        "and cnnc ignore",
        "l.cfg:18:1: warning: 'epsW' belongs in the layer-parameter file (p.cfg); cuda-convnet2 ignores it here",
        "l.cfg:19:1: warning: 'filtrs' is not a key of conv layers; cuda-convnet2 ignores it",
        "p.cfg:6:1: warning: 'channels' belongs in the layer-definition file (l.cfg); cuda-convnet2 ignores "
        "it here",
        "p.cfg:7:1: warning: 'momentum' is not a parameter of conv layers; cuda-convnet2 ignores it",
        "p.cfg:8:1: warning: [nothere] names no layer of l.cfg; cuda-convnet2 ignores it",
    ]
    assert imported.warnings[2].hint == "did you mean 'filters'?"


def test_kernel_only_constraints_of_cuda_convnet2_are_warnings():
    imported = imp(replace_once(CONV.format(gpu=0), "filters=16", "filters=10"))
    assert imported.warnings[0].format().splitlines()[0] == (
        "l.cfg:13:9: warning: layer 'conv1' (type=conv): cuda-convnet2 needs filters to be a multiple of 16 (10); "
        "cnnc does not")


def test_unsupported_features_are_errors():
    assert first_error_line(replace_once(CONV.format(gpu=0), "gpu=0", "gpu=0\nweightSource=fc")) == \
        "l.cfg:17:14: error: layer 'conv1' (type=conv): weight sharing (weightSource) is not supported by cnnc"
    assert first_error_line(replace_once(CONV.format(gpu=0), "gpu=0", "gpu=0\nmodulesX=3")) == \
        "l.cfg:17:10: error: layer 'conv1' (type=conv): modulesX=3 (a fixed output size) is not supported by cnnc"
    text = replace_once(LAYERS_HEAD, "dataIdx=0", "dataIdx=0\nstart=3") + CONV.format(gpu=0) + \
        LAYERS_TAIL.format(x="conv1", gpu=0)
    with pytest.raises(CompileError) as info:
        import_text(text, "l.cfg", "", "p.cfg", {"data": (3, 8, 8)})
    assert info.value.format().splitlines()[0] == \
        "l.cfg:4:7: error: data layer 'data' takes a slice of its data array (start=3); cnnc feeds whole arrays"


def test_names_that_are_not_cnnc_names_are_renamed():
    body = replace_once(CONV.format(gpu=0), "[conv1]", "[conv1.a]") + "\n[train]\ntype=neuron\ninputs=conv1.a\n" \
                                                                  "neuron=relu\n"
    imported = imp(body, PARAMS_WEIGHTS.format(n="conv1.a"))
    assert "conv1_a = conv(data," in imported.text
    assert "train_ = neuron(conv1_a) relu" in imported.text
    assert [w.message for w in imported.warnings] == [
        "layer 'conv1.a' is called 'conv1_a' in the .cnn file: 'conv1.a' is not a cnnc name",
        "layer 'train' is called 'train_' in the .cnn file: 'train' is a keyword of the language",
    ]
    check(parse(imported.text))


def test_grouped_and_unshared_conv():
    body = rewrite(CONV.format(gpu=0), {"channels=3": "channels=16", "inputs=data": "inputs=c0",
                                        "filters=16": "filters=16\ngroups=2\nsharedBiases=0"})
    body = "[c0]\ntype=conv\ninputs=data\nchannels=3\nfilters=16\nfilterSize=1\ninitW=0.01\ngpu=0\n\n" + body
    imported = imp(body)
    # cuda-convnet2's filters counts per group; cnnc's counts the output channels
    assert layer_line(imported, "conv1") == \
        "conv1 = conv(c0, filters=32, size=3, groups=2, shared_biases=false, init_w=0.01)"
    check(parse(imported.text))


def test_numbers_print_shortest():
    assert [fmt_number(v) for v in (1.0, -7.0, 0.0005, 1e-05, 250.0, 0.66, 3)] == \
        ["1", "-7", "0.0005", "1e-5", "250", "0.66", "3"]


def test_relocate_points_checker_errors_at_the_section():
    imported = imp(replace_once(CONV.format(gpu=0), "filterSize=3", "filterSize=3\npadding=3"))
    with pytest.raises(CompileError) as info:
        check(parse(imported.text, "x.cnn"))
    moved = imported.relocate(info.value)
    assert moved.diagnostics[0].file == "l.cfg" and moved.diagnostics[0].span.line == 9


def test_readme_examples_run(tmp_path):
    """The README's import and compile commands work on the shipped files they name."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Importing cuda-convnet2 configurations", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    commands = [line.split() for line in block.splitlines() if line.strip()]
    assert [c[:2] for c in commands] == [["cnnc", "import"], ["cnnc", "compile"]]
    for args in commands:
        args = [str(HERE / a) if a.endswith(".cfg") else str(tmp_path / a) if a.endswith((".cnn", "alexnet-2gpu"))
                else a for a in args[1:]]
        if args[0] == "compile":
            args.append("--no-nvcc")
        result = cli(*args)
        assert result.exit_code == 0, result.output
    assert (tmp_path / "alexnet-2gpu.cnn").read_text() == (HERE / "imagenet-2gpu-data.cnn").read_text()
    assert (tmp_path / "build" / "alexnet-2gpu" / "source.cnn").read_text() == \
        (HERE / "imagenet-2gpu-data.cnn").read_text()
