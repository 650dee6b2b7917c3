"""What a user writes reaches generated code only as comment text, and line numbers
in generated code are the ones the diagnostics use."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from cnnc.cli import main
from cnnc.codegen.dialect import CUDA
from cnnc.codegen.render import comment_text, render_kernel
from cnnc.plan.schedule import Kernel

from helpers import replace_once, rewrite


def cnnc(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def header_lines(text: str) -> list[tuple[int, str]]:
    """(line number, echoed source line) of every kernel header."""
    return [(int(m.group(1)), m.group(2)) for m in re.finditer(r"^// .*\.cnn:(\d+): (.*)$", text, re.M)]


def test_a_newline_in_the_file_name_stays_in_its_comment(tiny_source: str, tmp_path: Path) -> None:
    src = tmp_path / "net\n#define exp(x) (1.0f)\n.cnn"
    src.write_text(tiny_source)
    code, out = cnnc("compile", src, "-o", tmp_path / "build", "--no-nvcc")
    assert code == 0, out
    for ext in ("cu", "cl"):
        text = (tmp_path / "build" / f"gpu0.{ext}").read_text()
        assert not [line for line in text.split("\n") if line.lstrip().startswith("#define exp")]
        assert "net\\x0a#define exp(x) (1.0f)\\x0a.cnn" in text


def test_a_line_separator_in_a_comment_keeps_later_line_numbers(tiny_source: str, tmp_path: Path) -> None:
    source = replace_once(tiny_source, "# tiny test network", "# tiny\u2028test\u2029network\x0c\x1c")
    src = tmp_path / "tiny.cnn"
    src.write_text(source)
    code, out = cnnc("compile", src, "-o", tmp_path / "build", "--no-nvcc")
    assert code == 0, out
    lines = source.split("\n")
    for ext in ("cu", "cl"):
        headers = header_lines((tmp_path / "build" / f"gpu0.{ext}").read_text())
        assert headers
        for number, echoed in headers:
            assert lines[number - 1].strip() == echoed


def test_a_diagnostic_after_a_line_separator_shows_its_own_line(tiny_source: str, tmp_path: Path) -> None:
    source = rewrite(tiny_source, {"# tiny test network": "# tiny\u2028test network",
                                   "outputs=10, init_w=0.01": "outputs=0, init_w=0.01"})
    src = tmp_path / "tiny.cnn"
    src.write_text(source)
    code, out = cnnc("check", src)
    assert code == 2
    number = next(i for i, line in enumerate(source.split("\n"), 1) if "outputs=0" in line)
    assert f"tiny.cnn:{number}:" in out
    assert f"{number:5d} | fc2 = fc(pool1, outputs=0, init_w=0.01)" in out


def test_cuda_math_spelling_leaves_echoed_text_alone(tiny_source: str, tmp_path: Path) -> None:
    src = tmp_path / "tiny.cnn"
    src.write_text(replace_once(tiny_source, "probs = softmax(fc2)", "probs = softmax(fc2)   # exp(x) / sum exp"))
    code, out = cnnc("compile", src, "-o", tmp_path / "build", "--no-nvcc")
    assert code == 0, out
    text = (tmp_path / "build" / "gpu0.cu").read_text()
    assert "# exp(x) / sum exp" in text and "expf(x) / sum" not in text
    assert "expf(" in text                       # the code itself still uses the float functions


@pytest.mark.parametrize("text, escaped", [
    ("a\nb\rc\td\x00e", "a\\x0ab\\x0dc\\x09d\\x00e"),              # C0 controls
    ("del\x7f next\x85 ", "del\\x7f next\\x85 "),                   # DEL and C1 controls
    ("one\u2028two\u2029three", "one\\u2028two\\u2029three"),       # Unicode line and paragraph separators
    ("abc\u202edef\u2066", "abc\\u202edef\\u2066"),                  # bidirectional overrides and isolates
    ("bad \udcff name", "bad \\udcff name"),                         # a surrogate from an undecodable file name
    ("ends with \\", "ends with \\x5c"),                             # a line continuation
    ("trigraph ??/", "trigraph \\x3f?/"),                            # ??/ is a backslash in OpenCL C
    ("closes */ block", "closes *\\x2f block"),
    ("conv1 = conv(data, size=3) é 日本", "conv1 = conv(data, size=3) é 日本"),   # printable text is kept
])
def test_comment_text_escapes_each_class(text: str, escaped: str) -> None:
    assert comment_text(text) == escaped


def test_kernel_names_must_be_identifiers() -> None:
    kernel = Kernel("fc2_fwd;\n#define x", "sgd_update", {"n": 4}, "fc2", 1, "update")
    with pytest.raises(ValueError, match="not a C identifier"):
        render_kernel(kernel, CUDA)
