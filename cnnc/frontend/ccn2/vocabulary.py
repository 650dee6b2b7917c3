"""cuda-convnet2's vocabulary: its layer types and keys, and what cnnc makes of them."""
from __future__ import annotations

import difflib
import re
from typing import Iterable

from cnnc.check.kinds import KINDS
from cnnc.neurons import NEURONS

# Every layer type cuda-convnet2's layer.py registers, and what cnnc makes of it.
SUPPORTED = {
    "data": None, "conv": "conv", "local": "local", "fc": "fc", "pool": None, "cmrnorm": "cmrnorm",
    "rnorm": "rnorm", "cnorm": "cnorm", "neuron": "neuron", "softmax": "softmax", "dropout": "dropout",
    "dropout2": "dropout2", "eltsum": "eltsum", "eltmax": "eltmax", "concat": "concat", "pass": "pass",
    "cost.logreg": "logreg", "cost.ce": "crossent", "cost.sum2": "sum2",
}
UNSUPPORTED = {
    "sfc": "split fully-connected", "sum": "sum", "cmpool": "cross-map pooling", "nailbed": "bed-of-nails",
    "blur": "Gaussian blur", "href": "horizontal reflection", "resize": "resize", "rgb2yuv": "RGB to YUV",
    "rgb2lab": "RGB to L*a*b*", "rscale": "random scale", "crop": "crop",
    "cost.bce": "binomial cross-entropy cost", "cost.dce": "detection cross-entropy cost",
}
WEIGHTED = ("conv", "local", "fc")
NORMS = ("cmrnorm", "rnorm", "cnorm")
COSTS = ("cost.logreg", "cost.ce", "cost.sum2")
LABEL_COSTS = ("cost.logreg", "cost.ce")
# types whose .cnn kind fuses a neuron written after the call
FUSED_NEURON_KINDS = tuple(t for t, kind in SUPPORTED.items() if kind in KINDS and KINDS[kind].takes_neuron)


# cuda-convnet2's neuron types: name -> number of parameters; None: cnnc has no such neuron.
# cnnc's neurons are cuda-convnet2's, with the same parameters, less these two.
NEURON_PARAMS = {**{name: len(n.params) for name, n in NEURONS.items()}, "nrelu": None, "drelu": None}
UNFUSABLE_NEURONS = tuple(name for name, n in NEURONS.items() if n.needs_input)   # never fused

_WITH_INPUT = {"type", "inputs", "gpu", "neuron"}
_WEIGHT_INIT = {"initw", "initb", "initwfunc", "initbfunc", "weightsource"}
_LOCAL = _WITH_INPUT | _WEIGHT_INIT | {"channels", "filters", "padding", "stride", "filtersize", "groups",
                                      "initcfunc", "modulesx"}
LAYER_KEYS: dict[str, set[str]] = {
    "data": {"type", "dataidx", "start", "end"},
    "conv": _LOCAL | {"sumwidth", "sharedbiases"},
    "local": set(_LOCAL),
    "fc": _WITH_INPUT | _WEIGHT_INIT | {"outputs"},
    "pool": _WITH_INPUT | {"channels", "sizex", "start", "stride", "outputsx", "pool"},
    **{t: _WITH_INPUT | {"channels", "size", "blocked"} for t in NORMS},
    **{t: set(_WITH_INPUT) for t in ("neuron", "softmax", "dropout", "dropout2", "eltsum", "eltmax",
                                     "concat", "pass")},
    **{t: {"type", "inputs", "gpu", "children"} for t in COSTS},
}
_WEIGHT_PARAMS = {"epsw", "epsb", "momw", "momb", "wc", "wball", "updateperiod", "supereps", "supermom"}
PARAM_KEYS: dict[str, set[str]] = {
    "conv": _WEIGHT_PARAMS | {"wcnormmax", "wcnormmin"},
    "local": set(_WEIGHT_PARAMS), "fc": set(_WEIGHT_PARAMS),
    "dropout": {"enable", "keep"}, "dropout2": {"enable", "keep"},
    **{t: {"scale", "pow", "mindiv"} for t in NORMS},
    "eltsum": {"coeffs"},
    "cost.logreg": {"coeff", "topk"}, "cost.ce": {"coeff"}, "cost.sum2": {"coeff"},
}
ALL_LAYER_KEYS = set().union(*LAYER_KEYS.values())
ALL_PARAM_KEYS = set().union(*PARAM_KEYS.values())
TUNING_KEYS = {
    "sumwidth": "only tunes cuda-convnet2's weight-gradient kernel; cnnc ignores it",
    "partialsum": "is a cuda-convnet (version 1) kernel setting that cuda-convnet2 and cnnc ignore",
}

RESERVED = {"network", "input", "label", "train"}     # keywords of the .cnn language
NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# learning-rate schedules: name -> (key, type) in the order cuda-convnet2 writes them
SCHEDULES = {
    "const": (("base", float),),
    "linear": (("base", float), ("tgtfactor", float)),
    "exp": (("base", float), ("tgtfactor", float)),
    "dexp": (("base", float), ("tgtfactor", float), ("numsteps", int)),
}
SCHEDULE_RE = re.compile(r"^\s*(\w+)\s*(?:\[(.*)\])?\s*$", re.S)


_CAMEL = {k.lower(): k for k in (
    "dataIdx", "filterSize", "initW", "initB", "initWFunc", "initBFunc", "initCFunc", "weightSource", "modulesX",
    "sumWidth", "sharedBiases", "sizeX", "outputsX", "epsW", "epsB", "momW", "momB", "updatePeriod", "superEps",
    "superMom", "wcNormMax", "wcNormMin", "minDiv", "topk", "tgtFactor", "numSteps", "partialSum")}


def camel(key: str) -> str:
    """A lower-cased key as cuda-convnet2's documentation spells it."""
    return _CAMEL.get(key, key)


def did_you_mean_word(word: str, candidates: Iterable[str]) -> str | None:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return close[0] if close else None
