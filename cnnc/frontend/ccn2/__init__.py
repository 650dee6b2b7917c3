"""Import cuda-convnet2 configurations: a layer-definition file plus a
layer-parameter file → the text of an equivalent .cnn network.

cuda-convnet2 describes a network in two INI files: ``layers-*.cfg`` (one
section per layer: type, inputs, shapes, placement) and ``layer-params-*.cfg``
(learning rates and other settings that may change during training).  This
package reads both with its own line-tracking INI reader (so every diagnostic
names ``file:line``), applies cuda-convnet2's semantics — the ones of its
``layer.py`` and its C++ runtime — and writes readable DSL:

* sections become layers in file order; ``gpu=`` lists are inherited from a
  layer's first input; ``@gpu(...)`` is written only where the .cnn rule
  (inherit from the first input that is a layer) would place it differently;
* per-input lists (``filters=192,192``, ``epsW=a,b``...) expand a single value
  to every input, as cuda-convnet2's ``verify_num_params`` does;
* ``neuron=`` on a conv, local or fc layer is fused into it; on any other layer
  it becomes a separate ``NAME_neuron = neuron(NAME)`` layer, exactly the
  layer cuda-convnet2 itself inserts (``detach_neuron_layers``);
* ``updatePeriod`` counts passes of the whole net in cuda-convnet2 (a layer
  with R replicas is active every R/min(R) passes, its period is raised to at
  least that, and 0 means "as often as possible"); cnnc's ``update_period``
  counts the layer's own passes, so the value is converted;
* the data provider's facts (image shapes, number of classes, minibatch) are
  not in the files: image shapes and the minibatch come from the caller, the
  number of classes is the size of the softmax feeding the cost layer.

Keys cuda-convnet2 ignores, or that only tune its kernels (``sumWidth``),
become warnings; unknown types, missing required keys and violated
constraints become located errors.  Constraints that only cuda-convnet2's
kernels impose (filters a multiple of 16, ...) are warnings: cnnc runs those
networks, cuda-convnet2 would not.

The modules: ``ini`` reads the files; ``vocabulary`` knows cuda-convnet2's
types and keys; ``importer`` holds one import's state, with typed, located
access to keys; ``graph`` resolves inputs and the roles of data layers;
``translate`` turns each type's keys into a .cnn call (one function per type,
chosen by table); ``placement`` applies the checker's replica rules and
converts update periods; ``emit`` names the layers and writes the .cnn.
Output sizes, neurons and setting defaults come from the checker's tables.
"""
from __future__ import annotations

import re
from pathlib import Path

from cnnc.diagnostics import CompileError, Diagnostic
from cnnc.frontend.ccn2.emit import Imported, ImportedLayer, emit, name_layers
from cnnc.frontend.ccn2.formatting import fmt_number
from cnnc.frontend.ccn2.graph import (assign_roles, check_keys, check_params_file, check_usage, label_classes,
                                      structure)
from cnnc.frontend.ccn2.importer import Importer
from cnnc.frontend.ccn2.ini import read_cfg
from cnnc.frontend.ccn2.placement import check_placement, replication
from cnnc.frontend.ccn2.translate import layer_params, layer_shape
from cnnc.frontend.ccn2.vocabulary import NAME_RE, RESERVED
from cnnc.frontend.parser import read_source

__all__ = ["DEFAULT_MINI", "Imported", "ImportedLayer", "fmt_number", "import_files", "import_text", "parse_shape",
           "read_cfg"]

DEFAULT_MINI = 128


def _translate(imp: Importer) -> Imported:
    """The passes in the order of cuda-convnet2's checks: each layer as it is parsed, then the
    relations between layers, then the parameter file."""
    for sec in imp.lf.sections.values():
        structure(imp, sec)
    check_placement(imp)
    assign_roles(imp)
    for l in imp.layers.values():
        check_keys(imp, l)
        if not l.is_data:
            layer_shape(imp, l)
    check_usage(imp)
    label_classes(imp)
    for l in imp.layers.values():
        layer_params(imp, l)
    check_params_file(imp)
    levels = replication(imp)
    name_layers(imp)
    return emit(imp, levels)


def parse_shape(text: str) -> tuple[str | None, tuple[int, int, int]]:
    """``NAME=CxHxW`` (or just ``CxHxW``) → (NAME or None, (C, H, W)); ValueError with a message."""
    name, _, dims = text.rpartition("=")
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*[xX]\s*(\d+)\s*", dims)
    if not m or (name == "" and "=" in text):
        raise ValueError(f"expected NAME=CxHxW such as data=3x224x224, got {text!r}")
    c, h, w = (int(g) for g in m.groups())
    if min(c, h, w) < 1:
        raise ValueError(f"image dimensions must be positive, got {text!r}")
    return (name.strip() or None), (c, h, w)


def _read(path: Path) -> str:
    """A .cfg file's text, under the limits every source has (a regular file of at most 16 MiB)."""
    if path.is_dir():
        raise CompileError(Diagnostic("is a directory, not a .cfg file", str(path)))
    return read_source(path)


def import_text(layers_text: str, layers_file: str, params_text: str, params_file: str,
                input_shapes: dict[str | None, tuple[int, int, int]] | None = None, mini: int = DEFAULT_MINI,
                classes: int | None = None, name: str | None = None, command: str | None = None) -> Imported:
    """Translate a layer-definition / layer-parameter pair to .cnn text; raises CompileError."""
    warnings: list[Diagnostic] = []
    lf = read_cfg(layers_text, layers_file, warnings.append)
    pf = read_cfg(params_text, params_file, warnings.append)
    if not lf.sections:
        raise CompileError(Diagnostic("the layer-definition file defines no layers", layers_file))
    shapes = dict(input_shapes or {})
    if command is None:
        parts = ["cnnc import", Path(layers_file).name, Path(params_file).name]
        parts += [f"--input-shape {k + '=' if k else ''}{'x'.join(map(str, v))}" for k, v in shapes.items()]
        parts.append(f"--mini {mini}")
        if classes is not None:
            parts.append(f"--classes {classes}")
        if name is not None:
            parts.append(f"--name {name}")
        command = " ".join(parts)
    if mini < 1:
        raise CompileError(Diagnostic(f"the minibatch must have at least 1 case, not {mini}", "--mini"))
    if name is not None and (not NAME_RE.fullmatch(name) or name in RESERVED):
        raise CompileError(Diagnostic(f"{name!r} is not a network name", "--name",
                                      hint="use letters, digits and '_', not starting with a digit"))
    imp = Importer(lf, pf, shapes, mini, classes, name, command)
    imp.warnings = warnings
    return _translate(imp)


def import_files(layers: str | Path, params: str | Path,
                 input_shapes: dict[str | None, tuple[int, int, int]] | None = None, mini: int = DEFAULT_MINI,
                 classes: int | None = None, name: str | None = None) -> Imported:
    """Read and translate a cuda-convnet2 layers.cfg / layer-params.cfg pair."""
    layers, params = Path(layers), Path(params)
    return import_text(_read(layers), str(layers), _read(params), str(params), input_shapes, mini, classes, name)
