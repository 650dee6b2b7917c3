"""Compiler diagnostics: located, formatted like a C compiler's, never a traceback.

Every error a user can cause (a typo in a .cnn file, a shape that does not fit,
a build directory that is missing) is raised as a :class:`CompileError`
carrying one or more :class:`Diagnostic`; the CLI prints them and exits 2.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable, Sequence


def source_lines(text: str) -> list[str]:
    """The lines of a source text numbered as the parser numbers them.

    Only '\\n' ends a line: str.splitlines also splits at \\v, \\f, \\x1c-\\x1e,
    \\x85, U+2028 and U+2029, so one of those in a comment would shift every
    later line number.  A '\\r' before the '\\n' belongs to the line ending.
    """
    lines = text.split("\n")
    if lines[-1] == "":               # a final newline ends the last line, it starts none
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


@dataclass(frozen=True)
class Span:
    """A region of a source file; lines and columns count from 1."""

    line: int
    column: int
    end_line: int
    end_column: int

    @staticmethod
    def point(line: int, column: int, width: int = 1) -> "Span":
        return Span(line, column, line, column + width)


_SHOWN = 150
"""Source characters a diagnostic shows of one line; longer lines are cut around the caret."""


@dataclass(frozen=True)
class Diagnostic:
    message: str
    file: str = "<input>"
    span: Span | None = None
    hint: str | None = None
    severity: str = "error"

    def format(self, source: str | None = None) -> str:
        """`file:line:col: error: msg`, the source line, a caret under the span, a hint."""
        if self.span is None:
            head = f"{self.file}: {self.severity}: {self.message}"
            return head + (f"\n  hint: {self.hint}" if self.hint else "")
        s = self.span
        out = [f"{self.file}:{s.line}:{s.column}: {self.severity}: {self.message}"]
        lines = source_lines(source) if source is not None else []
        if 0 < s.line <= len(lines):
            text = lines[s.line - 1].rstrip("\n").replace("\t", " ")
            end = s.end_column if s.end_line == s.line else len(text) + 1
            width = max(1, min(end, len(text) + 1) - s.column)
            caret = s.column - 1
            if len(text) > _SHOWN:         # a very long line: the part around the caret, marked with '...'
                start = max(0, min(caret - _SHOWN // 3, len(text) - _SHOWN))
                text = ("..." if start else "") + text[start:start + _SHOWN] + \
                    ("..." if start + _SHOWN < len(text) else "")
                caret += (3 if start else 0) - start
                width = max(1, min(width, _SHOWN + 3 - caret))
            gutter = f"{s.line:5d} | "
            out.append(gutter + text)
            out.append(" " * 5 + " | " + " " * caret + "^" + "~" * (width - 1))
        if self.hint:
            out.append(f"  hint: {self.hint}")
        return "\n".join(out)


class CompileError(Exception):
    """One or more diagnostics, plus the source text they point into."""

    def __init__(self, diagnostics: Sequence[Diagnostic] | Diagnostic, source: str | None = None):
        if isinstance(diagnostics, Diagnostic):
            diagnostics = [diagnostics]
        self.diagnostics = list(diagnostics)
        self.source = source
        super().__init__(self.diagnostics[0].message if self.diagnostics else "compile error")

    def format(self) -> str:
        return "\n".join(d.format(self.source) for d in self.diagnostics)

    def __str__(self) -> str:
        return self.format()


def did_you_mean(word: str, candidates: Iterable[str]) -> str | None:
    """A 'did you mean' hint when a close spelling exists."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None
