"""Filters on metadata columns: `int_score >= 3 and language == 'en'`, parsed and checked.

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

A comparison names at least one column; a bare column is a boolean column. The tree
compiles to one `pyarrow.compute` expression, which a worker evaluates over a whole row
group in C++ (`mask`). SQL's rule for nulls holds: a comparison with a null is null, and
a row whose filter is null or false is dropped (`x is null` tests for one).

`Filter.text` is the normalized form (every node parenthesized, strings single-quoted):
the state records it, and the token cache keys a filtered source's entries by it.

Failure behaviour: text outside the grammar is a FilterError (a ConfigError) quoting
the text and pointing at the offending character; `check(schema)` raises a FilterError
naming a missing column (and the columns there are) or a comparison of a column with a
value of another type (naming the column and its type).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

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


# -- checking and compiling ---------------------------------------------------

def _kind(t: pa.DataType) -> str | None:
    """The kind of value a column of type `t` compares with (None: filters cannot)."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_boolean(t):
        return "boolean"
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "number"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or (
            hasattr(pa.types, "is_string_view") and pa.types.is_string_view(t)):
        return "string"
    return None


def _literal_kind(v: Literal) -> str:
    return ("boolean" if isinstance(v.value, bool) else "string" if isinstance(v.value, str)
            else "number")


def _show(v: Literal) -> str:
    if isinstance(v.value, bool):
        return "true" if v.value else "false"
    if isinstance(v.value, str):
        return "'" + v.value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return repr(v.value)


def _name(c: Column) -> str:
    return c.name if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", c.name) and \
        c.name not in KEYWORDS else f"`{c.name}`"


def _normal(node: Node | Literal) -> str:
    if isinstance(node, Column):
        return _name(node)
    if isinstance(node, Literal):
        return _show(node)
    if isinstance(node, Compare):
        return f"{_normal(node.left)} {node.op} {_normal(node.right)}"
    if isinstance(node, IsNull):
        return f"{_name(node.column)} is {'not ' if node.negated else ''}null"
    if isinstance(node, In):
        return (f"{_name(node.column)} {'not ' if node.negated else ''}in "
                f"[{', '.join(_show(v) for v in node.values)}]")
    if isinstance(node, Not):
        return f"not ({_normal(node.item)})"
    return f" {node.op} ".join(f"({_normal(i)})" for i in node.items)


def _columns(node: Node | Literal) -> list[str]:
    if isinstance(node, Column):
        return [node.name]
    if isinstance(node, Literal):
        return []
    if isinstance(node, Compare):
        return [*_columns(node.left), *_columns(node.right)]
    if isinstance(node, IsNull | In):
        return [node.column.name]
    if isinstance(node, Not):
        return _columns(node.item)
    return [c for i in node.items for c in _columns(i)]


def _compile(node: Node | Literal) -> Any:
    if isinstance(node, Column):
        return pc.field(node.name)
    if isinstance(node, Literal):
        return pc.scalar(node.value)
    if isinstance(node, Compare):
        left, right = _compile(node.left), _compile(node.right)
        return {"==": left == right, "!=": left != right, "<": left < right,
                "<=": left <= right, ">": left > right, ">=": left >= right}[node.op]
    if isinstance(node, IsNull):
        test = pc.field(node.column.name).is_null()
        return ~test if node.negated else test
    if isinstance(node, In):
        values = [v.value for v in node.values]
        test = pc.field(node.column.name).isin(values)
        # `isin` says false for a null; SQL's `null not in [...]` is null: dropped too
        return (~test & pc.field(node.column.name).is_valid()) if node.negated else test
    if isinstance(node, Not):
        return ~_compile(node.item)
    out = _compile(node.items[0])
    for item in node.items[1:]:
        out = (out & _compile(item)) if node.op == "and" else (out | _compile(item))
    return out


@dataclass(frozen=True)
class Filter:
    """A parsed filter: its normalized `text`, the `columns` it reads, its `tree`."""

    text: str
    columns: tuple[str, ...]
    tree: Node

    @classmethod
    def parse(cls, text: str) -> Filter:
        if not isinstance(text, str):
            raise FilterError(f"filter {text!r} must be a string, e.g. \"int_score >= 3\"")
        if len(text) > MAX_FILTER_CHARS:
            raise FilterError(f"filter of {len(text)} characters is longer than "
                              f"{MAX_FILTER_CHARS}; a filter is one condition line")
        if not text.strip():
            raise FilterError("filter is empty; leave it out to keep every document")
        tree = _Parser(text).parse()
        return cls(_normal(tree), tuple(dict.fromkeys(_columns(tree))), tree)

    @property
    def expression(self) -> pc.Expression:
        """The filter as one pyarrow.compute expression over the row group's columns."""
        return _compile(self.tree)

    def check(self, schema: pa.Schema, where: str) -> None:
        """Raise FilterError unless every column exists in `schema` and every
        comparison fits its column's type; `where` names the data in messages."""
        types = {f.name: f.type for f in schema}
        for name in self.columns:
            if name not in types:
                raise FilterError(
                    f"filter {self.text!r} of {where} names column {name!r}, which the data "
                    f"does not have (its columns: {', '.join(types)}); fix the column name "
                    "or filter another source")
            if _kind(types[name]) is None:
                raise FilterError(
                    f"filter {self.text!r} of {where}: column {name!r} has type "
                    f"{types[name]}, which filters do not compare (numbers, strings and "
                    "booleans only)")
        self._check(self.tree, types, where)

    def _check(self, node: Node, types: dict[str, pa.DataType], where: str) -> None:
        def mismatch(column: str, value: str) -> FilterError:
            return FilterError(
                f"filter {self.text!r} of {where}: column {column!r} has type "
                f"{types[column]} ({_kind(types[column])}), compared with {value}; compare "
                f"it with a {_kind(types[column])}")

        if isinstance(node, Column):
            if _kind(types[node.name]) != "boolean":
                raise FilterError(
                    f"filter {self.text!r} of {where}: column {node.name!r} has type "
                    f"{types[node.name]}, not bool, so it is not a condition alone; compare "
                    f"it, e.g. {_name(node)} == ...")
        elif isinstance(node, Compare):
            left, right = node.left, node.right
            if isinstance(left, Column) and isinstance(right, Column):
                if _kind(types[left.name]) != _kind(types[right.name]):
                    raise mismatch(left.name, f"column {right.name!r} of type "
                                   f"{types[right.name]}")
                return
            column, value = (left, right) if isinstance(left, Column) else (right, left)
            assert isinstance(column, Column) and isinstance(value, Literal)
            if _kind(types[column.name]) != _literal_kind(value):
                raise mismatch(column.name, f"{_literal_kind(value)} {_show(value)}")
        elif isinstance(node, In):
            for value in node.values:
                if _kind(types[node.column.name]) != _literal_kind(value):
                    raise mismatch(node.column.name, f"{_literal_kind(value)} {_show(value)}")
        elif isinstance(node, Not):
            self._check(node.item, types, where)
        elif isinstance(node, BoolOp):
            for item in node.items:
                self._check(item, types, where)

    def mask(self, table: pa.Table) -> pa.Array:
        """Which rows of `table` (holding the filter's columns) the filter keeps: a
        boolean array, null counted as false, computed in C++ over the whole table."""
        import pyarrow.acero as acero  # imported at first use: only filtered sources need it

        plan = acero.Declaration.from_sequence([
            acero.Declaration("table_source", acero.TableSourceNodeOptions(table)),
            acero.Declaration("project", acero.ProjectNodeOptions([self.expression], ["k"])),
        ])
        kept = plan.to_table(use_threads=False).column(0)
        return pc.fill_null(kept.combine_chunks() if kept.num_chunks else
                            pa.array([], pa.bool_()), False)


def parse_filter(text: str | None) -> Filter | None:
    """None stays None (no filter); anything else is parsed."""
    return None if text is None else Filter.parse(text)
