"""cuda-convnet2's INI files, read with line numbers so that every diagnostic names ``file:line``."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from cnnc.diagnostics import CompileError, Diagnostic, Span, source_lines


@dataclass(frozen=True)
class Entry:
    """One ``key=value`` line.  Keys are case-insensitive, as in Python's ConfigParser."""

    key: str            # lower-cased
    name: str           # as written
    value: str
    line: int
    column: int         # where the value starts (1-based)
    key_column: int
    file: str

    @property
    def span(self) -> Span:
        first = self.value.split("\n", 1)[0]
        return Span(self.line, self.column, self.line, self.column + max(1, len(first)))

    @property
    def key_span(self) -> Span:
        return Span(self.line, self.key_column, self.line, self.key_column + len(self.name))


@dataclass
class Section:
    name: str
    line: int
    file: str
    entries: dict[str, Entry] = field(default_factory=dict)
    header_width: int = 1

    @property
    def span(self) -> Span:
        return Span(self.line, 1, self.line, 1 + self.header_width)


@dataclass
class CfgFile:
    file: str
    text: str
    sections: dict[str, Section]
    defaults: dict[str, Entry]


_SECTION_RE = re.compile(r"\[(?P<name>[^]]+)\]")
_OPTION_RE = re.compile(r"(?P<key>[^:=\s][^:=]*?)\s*(?P<sep>[:=])\s*(?P<value>.*)$")


def read_cfg(text: str, file: str, warn: Callable[[Diagnostic], None] | None = None) -> CfgFile:
    """Read an INI file the way cuda-convnet2's ConfigParser does, keeping line numbers.

    Comments are lines starting with '#' or ';' (and ' ;' starts a trailing
    comment); lines starting with blanks continue the previous value; option
    names are case-insensitive; ``[DEFAULT]`` supplies values to every
    section.  A repeated section is merged into the first and a repeated key
    replaces the earlier value, as ConfigParser does, with a warning.
    """
    warn = warn or (lambda d: None)
    sections: dict[str, Section] = {}
    defaults: dict[str, Entry] = {}
    current: Section | None = None
    target: dict[str, Entry] | None = None
    last: Entry | None = None
    for number, raw in enumerate(source_lines(text), 1):
        line = raw.rstrip("\r")
        if line.strip() == "" or line[0] in "#;":
            continue
        if line.split(None, 1)[0].lower() == "rem" and line[0] in "rR":
            continue
        if line[0].isspace() and last is not None:
            extra = line.strip()
            if extra:
                last = Entry(last.key, last.name, last.value + "\n" + extra, last.line, last.column,
                             last.key_column, file)
                target[last.key] = last
            continue
        m = _SECTION_RE.match(line)
        if m:
            name = m.group("name")
            last = None
            if name == "DEFAULT":
                current, target = None, defaults
                continue
            if name in sections:
                first = sections[name]
                warn(Diagnostic(f"section [{name}] appears again; its keys are merged into the first one, "
                                f"as cuda-convnet2 does", file, Span(number, 1, number, m.end() + 1),
                                f"the first [{name}] is on line {first.line}", "warning"))
                current = first
            else:
                current = sections[name] = Section(name, number, file, header_width=m.end())
            target = current.entries
            continue
        m = _OPTION_RE.match(line)
        if not m:
            raise CompileError(Diagnostic("expected '[section]' or 'key=value'", file,
                                          Span(number, 1, number, len(line) + 1)), text)
        if target is None:
            raise CompileError(Diagnostic("'key=value' before the first [section]", file,
                                          Span(number, 1, number, len(line) + 1),
                                          "every layer starts with its name in brackets, e.g. [conv1]"), text)
        value = m.group("value")
        if m.group("sep") in "=:" and ";" in value:
            pos = value.find(";")
            if pos > 0 and value[pos - 1].isspace():
                value = value[:pos]
        value = value.strip()
        if value == '""':
            value = ""
        key_name = m.group("key").rstrip()
        key = key_name.lower()
        column = m.start("value") + 1
        if key in target:
            prev = target[key]
            where = f"[{current.name}]" if current is not None else "[DEFAULT]"
            warn(Diagnostic(f"'{key_name}' is given twice in {where}; the later value is used, as cuda-convnet2 "
                            f"does", file, Span(number, 1, number, 1 + len(key_name)),
                            f"the earlier one is on line {prev.line}", "warning"))
        last = Entry(key, key_name, value, number, column, m.start("key") + 1, file)
        target[key] = last
    return CfgFile(file, text, sections, defaults)
