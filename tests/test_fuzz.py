"""Mangled networks get a located diagnostic, never a traceback.

About 300 mutations of the example networks (lines deleted, duplicated,
swapped; numbers made 0, -1, huge, 1e400 or nan; stray bytes and unicode;
truncation; names swapped; brackets nested deep), each checked and compiled
without nvcc in-process.  A mutation may compile, or fail with a CompileError
whose message starts ``file:line:col: error:``; anything else fails the test
and prints the mutated source.  The mutations are drawn from a fixed seed,
so a failure reproduces exactly.
"""
from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from cnnc.build import compile_network
from cnnc.check import check
from cnnc.diagnostics import CompileError
from cnnc.frontend.parser import parse

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(ROOT.glob("examples/*.cnn")) + sorted(ROOT.glob("tests/nets/*.cnn"))
SEED = 20260806
COUNT = 300

_NUMBER = re.compile(r"(?<![A-Za-z_0-9.])-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?![A-Za-z_0-9])")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BAD_NUMBERS = ["0", "-1", "0.0", "-0", "1e400", "-1e400", "nan", "inf", "1e39", "100000000000000000000",
                "2147483648", "2147483647", "4294967296", "999999", "1e-400", "3.5", "00", "1e", "0x10"]
_STRAY = ["\x00", "\x01", "\x7f", "\t", "\r", "\f", "\v", "\u2028", "\u2029", "\u202e", "\ufeff", "\u00e9", "\U0001F600",
          "(", ")", "[", "]", "{", "}", ",", ";", "=", "@", "#", '"', "x", "3x3", "\\", "*/", "??/", "\n"]


def _lines_op(rng: random.Random, text: str) -> str:
    lines = text.split("\n")
    i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
    op = rng.choice(("delete", "duplicate", "swap"))
    if op == "delete":
        del lines[i]
    elif op == "duplicate":
        lines.insert(j, lines[i])
    else:
        lines[i], lines[j] = lines[j], lines[i]
    return "\n".join(lines)


def _number_op(rng: random.Random, text: str) -> str:
    found = list(_NUMBER.finditer(text))
    if not found:
        return text
    m = rng.choice(found)
    return text[:m.start()] + rng.choice(_BAD_NUMBERS) + text[m.end():]


def _plausible_number_op(rng: random.Random, text: str) -> str:
    """A number swapped for another that parses: the mutant gets past the parser to the checker,
    the planner and the code generator."""
    found = list(_NUMBER.finditer(text))
    if not found:
        return text
    m = rng.choice(found)
    new = rng.choice(("1", "2", "3", "5", "7", "13", "16", "100", "1000", "65536", "0.5", "1e-9", "1e30"))
    return text[:m.start()] + new + text[m.end():]


def _stray_op(rng: random.Random, text: str) -> str:
    at = rng.randrange(len(text) + 1)
    junk = "".join(rng.choice(_STRAY) for _ in range(rng.randint(1, 3)))
    if rng.random() < 0.3:
        junk = "".join(chr(rng.randrange(1, 0x3000)) for _ in range(rng.randint(1, 4)))
    return text[:at] + junk + text[at:]


def _truncate_op(rng: random.Random, text: str) -> str:
    return text[:rng.randrange(len(text))]


def _name_op(rng: random.Random, text: str) -> str:
    found = list(_NAME.finditer(text))
    m = rng.choice(found)
    other = rng.choice(found).group() if rng.random() < 0.8 else "zz" + m.group()
    return text[:m.start()] + other + text[m.end():]


def _nest_op(rng: random.Random, text: str) -> str:
    found = list(_NUMBER.finditer(text))
    if not found:
        return text
    m = rng.choice(found)
    depth = rng.choice((2, 30, 70, 5000))
    opener, closer = rng.choice((("[", "]"), ("f(", ")"), ("(", ")")))
    return text[:m.start()] + opener * depth + m.group() + closer * depth + text[m.end():]


_MUTATIONS = (_lines_op, _lines_op, _number_op, _number_op, _plausible_number_op, _plausible_number_op,
              _plausible_number_op, _stray_op, _stray_op, _truncate_op, _name_op, _name_op, _nest_op)


def _mutants() -> list[tuple[str, str]]:
    rng = random.Random(SEED)
    texts = [(p.relative_to(ROOT).as_posix(), p.read_text()) for p in SOURCES]
    out = []
    for _ in range(COUNT):
        name, text = rng.choice(texts)
        for _ in range(rng.choice((1, 1, 1, 1, 2, 3))):
            text = rng.choice(_MUTATIONS)(rng, text)
        out.append((name, text))
    return out


MUTANTS = _mutants()
_LOCATED = re.compile(r"[^\n]+:\d+:\d+: error: ")


def test_the_examples_are_there():
    assert len(SOURCES) >= 8


@pytest.mark.parametrize("index", range(COUNT))
def test_mutated_network_gets_a_clean_outcome(index, tmp_path):
    name, text = MUTANTS[index]
    try:
        check(parse(text, name))
        compile_network(text, name, tmp_path / "build", use_nvcc=False)
    except CompileError as e:
        message = e.format()
        assert _LOCATED.match(message), f"unlocated diagnostic for the source below:\n{message}\n---\n{text!r}"
    except Exception as e:              # noqa: BLE001 - any other exception is the bug being looked for
        pytest.fail(f"{e.__class__.__name__}: {e}\nfor the mutated {name}:\n---\n{text!r}")
