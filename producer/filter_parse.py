"""The filter language: `int_score >= 3 and language == 'en'` as text -> a small tree.

A source may keep only the documents whose row satisfies a filter. The text is parsed
here by a tokenizer and a recursive-descent parser (never `eval`, never Python's own
parser), into a small tree that only these node types can make:

    expr     := or
    or       := and ("or" and)*
    and      := not ("and" not)*
    not      := "not" not | test
    test     := value (("==" | "!=" | "<" | "<=" | ">" | ">=") value
                       | "is" ["not"] "null"
                       | ["not"] "in" "[" literal ("," literal)* [","] "]")?
    value    := "(" expr ")" | column | literal
    column   := NAME | `any name in backquotes`
    literal  := number | 'string' | "string" | true | false

A comparison names at least one column; a bare column is a boolean column. `normal`
gives the normalized text (every node parenthesized, strings single-quoted): the state
records it, and the token cache keys a filtered source's entries by it. This module
knows nothing of the data: filters.py checks a tree against a schema and compiles it
to `pyarrow.compute` (so the config is parsed without importing pyarrow).

Failure behaviour: text outside the grammar (not a string, longer than
MAX_FILTER_CHARS, empty, nested deeper than MAX_DEPTH, an unknown character, a call,
arithmetic) is a FilterError (a ConfigError) quoting the text and pointing at the
offending character.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tokenfeed.common.errors import ConfigError

MAX_FILTER_CHARS = 4096  # a filter is a line of a config file, not a program
MAX_DEPTH = 64  # nesting of parentheses and `not`: deeper is a mistake, not a filter
COMPARISONS = ("==", "!=", "<=", ">=", "<", ">")
KEYWORDS = frozenset({"and", "or", "not", "in", "is", "null", "true", "false"})

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<number>[+-]?(?:\d[\d_]*(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<string>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
  | (?P<quoted>`[^`]+`)
  | (?P<name>[A-Za-z_][A-Za-z0-9_.]*)
  | (?P<op>==|!=|<=|>=|<|>|\(|\)|\[|\]|,)
""", re.VERBOSE)


class FilterError(ConfigError):
    """A filter outside the grammar, or one that does not fit the data's columns."""


# -- the tree -----------------------------------------------------------------

@dataclass(frozen=True)
class Column:
    name: str


@dataclass(frozen=True)
class Literal:
    value: bool | int | float | str


@dataclass(frozen=True)
class Compare:
    op: str
    left: Column | Literal
    right: Column | Literal


@dataclass(frozen=True)
class IsNull:
    column: Column
    negated: bool


@dataclass(frozen=True)
class In:
    column: Column
    values: tuple[Literal, ...]
    negated: bool


@dataclass(frozen=True)
class Not:
    item: Node


@dataclass(frozen=True)
class BoolOp:
    op: str  # "and" | "or"
    items: tuple[Node, ...]


Node = Column | Compare | IsNull | In | Not | BoolOp

# -- tokens and parser --------------------------------------------------------

@dataclass(frozen=True)
class _Tok:
    kind: str  # number, string, name, keyword, op, end
    text: str
    at: int


def _tokens(text: str) -> list[_Tok]:
    out: list[_Tok] = []
    at = 0
    while at < len(text):
        m = _TOKEN.match(text, at)
        if m is None:
            raise _error(text, at, f"unexpected character {text[at]!r}")
        kind = m.lastgroup or ""
        if kind == "name" and m.group() in KEYWORDS:
            kind = "keyword"
        if kind == "number" and out and out[-1].kind in ("number", "name", "quoted", "string") \
                and m.group()[0] in "+-":
            raise _error(text, at, "arithmetic is not part of a filter")
        if kind != "space":
            out.append(_Tok(kind, m.group(), at))
        at = m.end()
    out.append(_Tok("end", "", len(text)))
    return out


def _error(text: str, at: int, what: str) -> FilterError:
    return FilterError(
        f"filter {text!r}: {what} at character {at + 1}:\n    {text}\n    {' ' * at}^\n"
        "a filter compares columns with values: int_score >= 3 and language == 'en', "
        "lang in ['en', 'de'], score is not null (docs/reference.md: Filters)")


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = _tokens(text)
        self.i = 0
        self.depth = 0

    @property
    def tok(self) -> _Tok:
        return self.toks[self.i]

    def fail(self, what: str) -> FilterError:
        tok = self.tok
        got = "the end" if tok.kind == "end" else repr(tok.text)
        return _error(self.text, tok.at, f"{what}, got {got}")

    def accept(self, kind: str, text: str | None = None) -> _Tok | None:
        tok = self.tok
        if tok.kind == kind and (text is None or tok.text == text):
            self.i += 1
            return tok
        return None

    def expect(self, kind: str, text: str, what: str) -> None:
        if self.accept(kind, text) is None:
            raise self.fail(what)

    def parse(self) -> Node:
        node = self.expr()
        if self.tok.kind != "end":
            raise self.fail("expected 'and', 'or' or the end of the filter")
        return node

    def expr(self) -> Node:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.fail(f"nested deeper than {MAX_DEPTH}")
        try:
            return self.bool_op("or", self.and_)
        finally:
            self.depth -= 1

    def and_(self) -> Node:
        return self.bool_op("and", self.not_)

    def bool_op(self, op: str, item: Any) -> Node:
        items = [item()]
        while self.accept("keyword", op):
            items.append(item())
        return items[0] if len(items) == 1 else BoolOp(op, tuple(items))

    def not_(self) -> Node:
        if self.accept("keyword", "not"):
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise self.fail(f"nested deeper than {MAX_DEPTH}")
            try:
                return Not(self.not_())
            finally:
                self.depth -= 1
        return self.test()

    def test(self) -> Node:
        start = self.tok
        left = self.value()
        if self.tok.kind == "op" and self.tok.text in COMPARISONS:
            op = self.toks[self.i].text
            self.i += 1
            right = self.value()
            if isinstance(left, Literal | Column) and isinstance(right, Literal | Column):
                if isinstance(left, Literal) and isinstance(right, Literal):
                    raise _error(self.text, start.at, "a comparison must name a column")
                return Compare(op, left, right)
            raise _error(self.text, start.at, "only a column or a value may be compared "
                                              "(parenthesize a condition with and/or)")
        if self.accept("keyword", "is"):
            negated = self.accept("keyword", "not") is not None
            self.expect("keyword", "null", "expected 'null' after 'is'")
            return IsNull(self._column(left, start, "is null"), negated)
        negated = False
        if self.tok.kind == "keyword" and self.tok.text == "not" \
                and self.toks[self.i + 1].text == "in":
            self.i += 1
            negated = True
        if self.accept("keyword", "in"):
            column = self._column(left, start, "in")
            return In(column, self.list_(), negated)
        if isinstance(left, Literal):
            raise _error(self.text, start.at, "a value alone is not a condition; compare a "
                                              "column with it")
        return left

    def _column(self, node: Node | Literal, start: _Tok, what: str) -> Column:
        if not isinstance(node, Column):
            raise _error(self.text, start.at, f"'{what}' tests a column")
        return node

    def list_(self) -> tuple[Literal, ...]:
        self.expect("op", "[", "expected '[' after 'in'")
        values = [self.literal()]
        while self.accept("op", ","):
            if self.tok.kind == "op" and self.tok.text == "]":
                break
            values.append(self.literal())
        self.expect("op", "]", "expected ',' or ']' in the list")
        return tuple(values)

    def value(self) -> Node | Literal:
        if self.accept("op", "("):
            node = self.expr()
            self.expect("op", ")", "expected ')'")
            return node
        tok = self.tok
        if tok.kind in ("name", "quoted"):
            self.i += 1
            if self.tok.kind == "op" and self.tok.text in ("(", "["):
                raise self.fail("calls and indexing are not part of a filter")
            return Column(tok.text.strip("`") if tok.kind == "quoted" else tok.text)
        if tok.kind in ("number", "string") or (
                tok.kind == "keyword" and tok.text in ("true", "false")):
            return self.literal()
        if tok.kind == "keyword" and tok.text == "null":
            raise self.fail("compare with null as 'column is null' or 'column is not null'")
        raise self.fail("expected a column, a value or '('")

    def literal(self) -> Literal:
        tok = self.tok
        self.i += 1
        if tok.kind == "number":
            digits = tok.text.replace("_", "")
            if re.fullmatch(r"[+-]?\d+", digits):
                return Literal(int(digits))
            return Literal(float(digits))
        if tok.kind == "string":
            return Literal(re.sub(r"\\(.)", r"\1", tok.text[1:-1]))
        if tok.kind == "keyword" and tok.text in ("true", "false"):
            return Literal(tok.text == "true")
        self.i -= 1
        raise self.fail("expected a number, a 'string', true or false")


# -- the normalized text and the columns read ---------------------------------

def literal_text(v: Literal) -> str:
    if isinstance(v.value, bool):
        return "true" if v.value else "false"
    if isinstance(v.value, str):
        return "'" + v.value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return repr(v.value)


def column_text(c: Column) -> str:
    return c.name if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", c.name) and \
        c.name not in KEYWORDS else f"`{c.name}`"


def normalized(node: Node | Literal) -> str:
    if isinstance(node, Column):
        return column_text(node)
    if isinstance(node, Literal):
        return literal_text(node)
    if isinstance(node, Compare):
        return f"{normalized(node.left)} {node.op} {normalized(node.right)}"
    if isinstance(node, IsNull):
        return f"{column_text(node.column)} is {'not ' if node.negated else ''}null"
    if isinstance(node, In):
        return (f"{column_text(node.column)} {'not ' if node.negated else ''}in "
                f"[{', '.join(literal_text(v) for v in node.values)}]")
    if isinstance(node, Not):
        return f"not ({normalized(node.item)})"
    return f" {node.op} ".join(f"({normalized(i)})" for i in node.items)


def columns_of(node: Node | Literal) -> list[str]:
    if isinstance(node, Column):
        return [node.name]
    if isinstance(node, Literal):
        return []
    if isinstance(node, Compare):
        return [*columns_of(node.left), *columns_of(node.right)]
    if isinstance(node, IsNull | In):
        return [node.column.name]
    if isinstance(node, Not):
        return columns_of(node.item)
    return [c for i in node.items for c in columns_of(i)]


def parse_tree(text: Any) -> Node:
    """The tree of a filter's text (FilterError: not a filter)."""
    if not isinstance(text, str):
        raise FilterError(f"filter {text!r} must be a string, e.g. \"int_score >= 3\"")
    if len(text) > MAX_FILTER_CHARS:
        raise FilterError(f"filter of {len(text)} characters is longer than "
                          f"{MAX_FILTER_CHARS}; a filter is one condition line")
    if not text.strip():
        raise FilterError("filter is empty; leave it out to keep every document")
    return _Parser(text).parse()
