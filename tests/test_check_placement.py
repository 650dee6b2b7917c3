"""Placement rules are the checker's: `cnnc check` reports every placement error that
`cnnc compile` reports, with the same located diagnostic and exit status 2."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from cnnc.cli import main

from helpers import rewrite

NET = """network par
input data: 3x8x8
input labels: label(4)
train { batch = 8; lr = 0.05; init_w = 0.1 }
conv1 = conv(data, filters=6, size=3, padding=1) relu
pool1 = maxpool(conv1, size=2, stride=2)
fc2 = fc(pool1, outputs=10) tanh
fc3 = fc(fc2, outputs=4)
probs = softmax(fc3)
cost = logreg(labels, probs)
"""

CONV1 = "conv1 = conv("
FC2 = "fc2 = fc("
FC3 = "fc3 = fc("
TRAIN = "init_w = 0.1 }"

# (edits to NET, the diagnostic's first line)
ERRORS = {
    "indivisible": ({CONV1: "@gpu(0,1) conv1 = conv(", FC2: "@gpu(0,1,2,3) fc2 = fc("},
                    "p.cnn:7:1: error: fc2 has 4 replicas but its input pool1 has 2: a layer's replica count "
                    "must divide its inputs'"),
    "unequal-inputs": ({CONV1: "@gpu(0,1) conv1 = conv(",
                        "cost = logreg(labels, probs)\n": "cost = logreg(labels, probs)\n"
                        "@gpu(0) side = fc(data, outputs=10)\nboth = concat(fc2, side)\n"
                        "cost2 = sum2(both)\n"},
                       "p.cnn:12:1: error: the inputs of both have different replica counts (fc2: 2, side: 1)"),
    "unequal-consumers": ({CONV1: "@gpu(0,1) conv1 = conv(",
                           "cost = logreg(labels, probs)\n": "cost = logreg(labels, probs)\n"
                           "@gpu(0) side = fc(pool1, outputs=10)\ncost2 = sum2(side)\n"},
                          "p.cnn:6:1: error: the consumers of pool1 have different replica counts "
                          "(fc2: 2, side: 1)"),
    "three-levels": ({CONV1: "@gpu(0,1,2,3) conv1 = conv(", FC2: "@gpu(0,1) fc2 = fc(",
                      FC3: "@gpu(0) fc3 = fc("},
                     "p.cnn:7:1: error: fc2 has 2 replicas; cnnc plans two levels of replication per network "
                     "(here 4 and 1)"),
    "shares": ({CONV1: "@gpu(0,1) conv1 = conv(", "batch = 8": "batch = 6",
                TRAIN: "init_w = 0.1; microbatches = 2 }"},
               "p.cnn:5:1: error: the batch of 6 cases cannot be split into 4 equal shares"),
    "scatter": ({CONV1: "@gpu(0,1,2,3) conv1 = conv(", FC2: "@gpu(0) fc2 = fc(",
                 TRAIN: "init_w = 0.1; exchange = scatter }"},
                "p.cnn:5:1: error: exchange = scatter sends 1/4 of each replica's 2 cases to every pass, so the "
                "batch must be a multiple of 16"),
    "update-period": ({CONV1: "@gpu(0,1,2,3) conv1 = conv(", FC2: "@gpu(0) fc2 = fc(",
                       "tanh\n": "tanh { update_period = 3 }\n"},
                      "p.cnn:7:1: error: update_period = 3 does not divide the 4 pass(es) fc2 runs per minibatch"),
    "pipeline-hybrid": ({CONV1: "@gpu(0,1) conv1 = conv(", FC2: "@gpu(0) fc2 = fc(",
                         TRAIN: "init_w = 0.1; microbatches = 2 }"},
                        "p.cnn:7:1: error: with microbatches = 2 every layer needs the same number of devices; "
                        "fc2 has 1, others 2"),
    "pipeline-returns": ({FC2: "@gpu(1) fc2 = fc(", FC3: "@gpu(0) fc3 = fc(",
                          TRAIN: "init_w = 0.1; microbatches = 2 }"},
                         "p.cnn:8:1: error: fc3 returns to @gpu(0) after other devices: a pipelined network must "
                         "be a chain of stages, one per device set"),
    "pipeline-period": ({FC2: "@gpu(1) fc2 = fc(", "tanh\n": "tanh { update_period = 1 }\n",
                         TRAIN: "init_w = 0.1; microbatches = 2 }"},
                        "p.cnn:7:1: error: update_period = 1: a pipelined network updates once per minibatch"),
}


def cli(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def user_error(result: Result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return result.stderr


@pytest.mark.parametrize("case", list(ERRORS))
def test_check_and_compile_give_the_same_placement_diagnostic(case, tmp_path):
    edits, first_line = ERRORS[case]
    src = tmp_path / "p.cnn"
    src.write_text(rewrite(NET, edits))
    checked = user_error(cli("check", src))
    compiled = user_error(cli("compile", src, "-o", tmp_path / "build", "--no-nvcc"))
    assert checked.splitlines()[0].replace(str(src), "p.cnn") == first_line
    assert checked == compiled
    assert "^" in checked                      # located: the layer's line is shown with a caret
    assert not (tmp_path / "build").exists()


def test_the_base_network_passes_check(tmp_path):
    """Each network above differs from a valid one only by its edits."""
    src = tmp_path / "p.cnn"
    src.write_text(NET)
    result = cli("check", src)
    assert result.exit_code == 0, result.output
