"""Filters on metadata columns: a parsed filter checked against a schema, compiled to C++.

A `Filter` is the tree of filter_parse.py (the language and its parser) with its
normalized `text` and the `columns` it reads. Here it meets the data: `check(schema)`
at attach, and `expression` / `mask` at read time. The tree compiles to one
`pyarrow.compute` expression, which a worker evaluates over a whole row group in C++
(`mask`). SQL's rule for nulls holds: a comparison with a null is null, and a row whose
filter is null or false is dropped (`x is null` tests for one).

`Filter.text` is the normalized form (every node parenthesized, strings single-quoted):
the state records it, and the token cache keys a filtered source's entries by it.

Failure behaviour: text outside the grammar is a FilterError (a ConfigError) quoting
the text and pointing at the offending character (filter_parse.py); `check(schema)`
raises a FilterError naming a missing column (and the columns there are) or a
comparison of a column with a value of another type (naming the column and its type).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from tokenfeed.producer.filter_parse import (
    BoolOp,
    Column,
    Compare,
    FilterError,
    In,
    IsNull,
    Literal,
    Node,
    Not,
    column_text,
    columns_of,
    literal_text,
    normalized,
    parse_tree,
)

__all__ = ["Filter", "FilterError", "parse_filter"]


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
        tree = parse_tree(text)
        return cls(normalized(tree), tuple(dict.fromkeys(columns_of(tree))), tree)

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
                    f"it, e.g. {column_text(node)} == ...")
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
                raise mismatch(column.name, f"{_literal_kind(value)} {literal_text(value)}")
        elif isinstance(node, In):
            for value in node.values:
                if _kind(types[node.column.name]) != _literal_kind(value):
                    raise mismatch(node.column.name,
                                   f"{_literal_kind(value)} {literal_text(value)}")
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
