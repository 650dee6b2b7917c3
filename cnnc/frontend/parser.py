"""Parse stage: .cnn text → :class:`~cnnc.frontend.ast.Program`.

The grammar lives in ``grammar/cnn.lark``; a Lark Transformer maps each rule to
a frozen AST node carrying its source span, and Lark's parse errors become
located diagnostics with a caret.
"""
from __future__ import annotations

import os
import stat
from functools import lru_cache
from pathlib import Path

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken, VisitError
from lark.lexer import PatternStr

from cnnc.diagnostics import CompileError, Diagnostic, Span, source_lines
from cnnc.frontend import ast
from cnnc.resources import resource_dir

_FRIENDLY = {
    "NAME": "a name",
    "SIGNED_NUMBER": "a number",
    "DIMS": "image dimensions such as 3x32x32",
    "STRING": "a string",
    "_NL": "end of line",
    "$END": "end of file",
}

_TOKEN_KIND = {"NAME": "name", "SIGNED_NUMBER": "number", "DIMS": "dimensions", "STRING": "string"}


MAX_NESTING = 64
"""Brackets may nest this deep: the syntax tree is converted recursively, so deeper
nesting would exhaust Python's stack; no real network needs more than a few levels."""


class _TooDeep(Exception):
    """Raised by the post-lexer at the bracket that opens one level too many."""

    def __init__(self, token: Token):
        super().__init__(str(token))
        self.token = token


class _OutOfRange(Exception):
    """Raised by the transformer at a number that no 32-bit float can hold."""

    def __init__(self, text: str, span: Span):
        super().__init__(text)
        self.text, self.span = text, span


class _Separators:
    """';' ends a statement like a newline does; newlines inside ( ) and [ ] end
    nothing, so argument lists may wrap; runs of separators count as one."""

    always_accept = ("_NL", "SEMICOLON")

    def process(self, stream):
        depth = 0
        pending = None
        for tok in stream:
            if tok.type == "SEMICOLON":
                tok = Token.new_borrow_pos("_NL", ";", tok)
            if tok.type in ("LPAR", "LSQB"):
                depth += 1
                if depth > MAX_NESTING:
                    raise _TooDeep(tok)
            elif tok.type in ("RPAR", "RSQB"):
                depth = max(0, depth - 1)
            if tok.type == "_NL":
                if depth > 0 and str(tok) == ";":
                    yield tok       # ';' cannot end a statement inside ( ) or [ ]: let the parser reject it
                elif depth == 0 and pending is None:
                    pending = tok
                continue
            if pending is not None:
                yield pending
                pending = None
            yield tok
        if pending is not None:
            yield pending


@lru_cache(maxsize=1)
def _lark() -> Lark:
    grammar = (resource_dir("grammar") / "cnn.lark").read_text()
    return Lark(grammar, parser="lalr", lexer="basic", propagate_positions=True, postlex=_Separators(),
                maybe_placeholders=True)


def _span(obj) -> Span:
    return Span(obj.line, obj.column, obj.end_line, obj.end_column)


@v_args(meta=True)
class _ToAst(Transformer):
    """One method per grammar rule; each returns an AST node with its span."""

    def start(self, meta, children):
        network, *statements = children
        return network, tuple(statements)

    def network(self, meta, children):
        return children[0]

    def image_input(self, meta, children):
        name, dims = children
        return ast.ImageInput(str(name), tuple(int(d) for d in str(dims).split("x")), _span(meta))

    def label_input(self, meta, children):
        name, classes = children
        return ast.LabelInput(str(name), classes, _span(meta))

    def train_block(self, meta, children):
        return ast.TrainBlock(tuple(c for c in children if c is not None), _span(meta))

    def layer_decl(self, meta, children):
        placement, name, kind, *rest = children
        args = tuple(c for c in rest if isinstance(c, ast.Arg))
        neuron = next((c for c in rest if isinstance(c, ast.NeuronSpec)), None)
        settings = tuple(c for c in rest if isinstance(c, ast.Setting))
        return ast.LayerDecl(str(name), str(kind), args, neuron, settings, placement, _span(meta),
                             _span(name), _span(kind))

    def placement(self, meta, children):
        target, *devices = children
        return ast.Placement(str(target), tuple(d for d in devices if d is not None), _span(meta))

    def pos_arg(self, meta, children):
        return ast.Arg(None, children[0], _span(meta))

    def kw_arg(self, meta, children):
        name, value = children
        return ast.Arg(str(name), value, _span(meta))

    def neuron(self, meta, children):
        name, *params = children
        return ast.NeuronSpec(str(name), tuple(p.value for p in params if p is not None), _span(meta))

    def setting(self, meta, children):
        name, value = children
        return ast.Setting(str(name), value, _span(meta))

    def number(self, meta, children):
        text = str(children[0])
        is_int = not any(c in text for c in ".eE")
        value = int(text) if is_int else float(text)
        if not abs(value) <= ast.FLOAT32_MAX:
            raise _OutOfRange(text, _span(meta))
        return ast.Number(value, is_int, _span(meta))

    def name_value(self, meta, children):
        return ast.NameRef(str(children[0]), _span(meta))

    def string_value(self, meta, children):
        return ast.String(str(children[0])[1:-1], _span(meta))

    def list_value(self, meta, children):
        return ast.ListValue(tuple(c for c in children if c is not None), _span(meta))

    def call_value(self, meta, children):
        func, *args = children
        return ast.Call(str(func), tuple(a for a in args if a is not None), _span(meta))


def _describe(terminal: str) -> str:
    if terminal in _FRIENDLY:
        return _FRIENDLY[terminal]
    try:
        pattern = _lark().get_terminal(terminal).pattern
    except KeyError:
        return terminal
    return f"'{pattern.value}'" if isinstance(pattern, PatternStr) else terminal.lower()


_CLOSER = {"LPAR": "RPAR", "LSQB": "RSQB", "LBRACE": "RBRACE"}   # opening bracket -> its closer
_CLOSING_TEXT = {"LPAR": ")", "LSQB": "]", "LBRACE": "}"}


def _open_brackets(text: str, before: tuple[int, int] | None = None) -> list[Token]:
    """The brackets still open before position (line, column), or at the end of the text; innermost last."""
    stack: list[Token] = []
    try:
        for tok in _lark().lex(text):
            if before is not None and (tok.line, tok.column) >= before:
                break
            if tok.type in _CLOSER:
                stack.append(tok)
            elif stack and tok.type == _CLOSER[stack[-1].type]:
                stack.pop()
    except (UnexpectedInput, _TooDeep):
        pass
    return stack


def _in_context(expected, stack: list[Token]) -> set[str]:
    """Drop the terminals that LALR state merging offers but the enclosing bracket rules out."""
    inner = stack[-1].type if stack else None
    if inner in ("LPAR", "LSQB"):        # newlines and the other closers cannot come here
        ruled_out = {"_NL", "$END", "RBRACE", "RPAR", "RSQB"} - {_CLOSER[inner]}
    elif inner == "LBRACE":              # commas only separate items inside ( ) and [ ]
        ruled_out = {"$END", "RPAR", "RSQB", "COMMA"}
    else:
        ruled_out = {"RPAR", "RSQB", "RBRACE", "COMMA"}
    if "_NL" in expected:                # the text always ends with a newline
        ruled_out.add("$END")
    kept = set(expected) - ruled_out
    return kept or set(expected)


def _expected(names) -> str:
    described = sorted({_describe(n) for n in names})
    if len(described) > 6:
        described = described[:6] + ["..."]
    if len(described) > 1 and described[-1] != "...":
        return ", ".join(described[:-1]) + " or " + described[-1]
    return ", ".join(described)


_START_HINT = "a .cnn file starts with 'network NAME', e.g. 'network digits'"


def _syntax_error(err: UnexpectedInput, file: str, source: str, text: str) -> CompileError:
    if isinstance(err, UnexpectedCharacters):
        span = Span.point(err.line, err.column)
        msg = f"unexpected character {source[err.pos_in_stream]!r}"
        return CompileError(Diagnostic(msg, file, span), source)
    expected = set(getattr(err, "expected", None) or ())
    if isinstance(err, UnexpectedToken) and err.token.type != "$END":
        tok: Token = err.token
        width = max(1, len(str(tok))) if tok.type != "_NL" else 1
        span = Span.point(tok.line, tok.column, width)
        if tok.type == "_NL":
            what = "';'" if str(tok) == ";" else "end of line"
        elif tok.type in _TOKEN_KIND:
            what = f"{_TOKEN_KIND[tok.type]} {str(tok)!r}"
        else:
            what = f"{str(tok)!r}"
        if "NETWORK" in expected:
            return CompileError(Diagnostic(f"unexpected {what}, expected 'network'", file, span, _START_HINT),
                                source)
        stack = _open_brackets(text, (tok.line, tok.column))
        expected = _in_context(expected, stack)
        inner = stack[-1] if stack else None
        hint = None
        if inner is not None and inner.type in ("LPAR", "LSQB") and "COMMA" in expected \
                and tok.type in _TOKEN_KIND:
            hint = f"missing ',' before {str(tok)!r}?"
            if tok.line > inner.line and tok.column == 1:     # looks like the next statement
                hint += f" or is the '{inner}' on line {inner.line} never closed?"
        elif "_NL" in expected and tok.type in ("NAME", "EQUAL", "INPUT", "TRAIN", "AT"):
            hint = "separate settings with a newline or ';'" if inner is not None else \
                "each statement goes on its own line, or separate statements with ';'"
        return CompileError(Diagnostic(f"unexpected {what}, expected {_expected(expected)}", file, span, hint),
                            source)
    lines = source_lines(source) or [""]
    span = Span.point(len(lines), len(lines[-1]) + 1)
    if "NETWORK" in expected:
        return CompileError(Diagnostic("the file declares no network", file, span, _START_HINT), source)
    stack = _open_brackets(text)
    if stack:
        inner = stack[-1]
        return CompileError(Diagnostic(f"'{inner}' is never closed", file, Span.point(inner.line, inner.column),
                                       f"the file ends before the matching '{_CLOSING_TEXT[inner.type]}'"),
                            source)
    msg = "unexpected end of file" + (f", expected {_expected(expected)}" if expected else "")
    return CompileError(Diagnostic(msg, file, span), source)


def parse(source: str, file: str = "<input>") -> ast.Program:
    """Parse a whole .cnn source into a Program, or raise a located CompileError."""
    text = source if source.endswith("\n") else source + "\n"
    nul = source.find("\0")
    if nul >= 0:        # C tools cut text at a NUL: whatever followed would vanish from generated code
        line = source.count("\n", 0, nul) + 1
        column = nul - (source.rfind("\n", 0, nul) + 1) + 1
        raise CompileError(Diagnostic("NUL byte in the source", file, Span.point(line, column)), source)
    try:
        tree = _lark().parse(text)
        name, statements = _ToAst().transform(tree)
    except UnexpectedInput as err:
        raise _syntax_error(err, file, source, text) from None
    except _TooDeep as deep:
        span = Span.point(deep.token.line, deep.token.column)
        raise CompileError(Diagnostic(f"brackets nested more than {MAX_NESTING} deep", file, span), source) from None
    except VisitError as err:  # a bug in the transformer, never user input, unless out of range
        if isinstance(err.orig_exc, _OutOfRange):
            bad = err.orig_exc
            raise CompileError(Diagnostic(f"number {bad.text} is out of range: numbers must be finite 32-bit "
                                          f"floats, at most {ast.FLOAT32_MAX:.8g} in magnitude", file, bad.span),
                               source) from None
        raise err.orig_exc from None
    return ast.Program(str(name), statements, file, source, _span(name))


MAX_SOURCE_BYTES = 16 * 2**20
"""Sources larger than this are refused: a 10,000-layer network is well under 1 MiB."""


def read_source(path: str | Path) -> str:
    """A source file's text, or a CompileError naming the file.

    Only regular files of at most MAX_SOURCE_BYTES are read: a device or a pipe
    (/dev/zero, a FIFO) could otherwise be read forever."""
    path = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer before we can refuse it
        with os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise CompileError(Diagnostic("not a regular file", str(path)))
            data = f.read(MAX_SOURCE_BYTES + 1)
        if len(data) > MAX_SOURCE_BYTES:
            raise CompileError(Diagnostic(f"the file is larger than {MAX_SOURCE_BYTES // 2**20} MiB", str(path)))
        return data.decode()
    except FileNotFoundError:
        raise CompileError(Diagnostic("no such file", str(path))) from None
    except IsADirectoryError:
        raise CompileError(Diagnostic("not a regular file", str(path))) from None
    except (OSError, UnicodeDecodeError) as e:
        raise CompileError(Diagnostic(f"cannot read file: {e.__class__.__name__}", str(path))) from None


def parse_file(path: str | Path) -> ast.Program:
    return parse(read_source(path), str(path))
