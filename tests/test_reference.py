"""docs/reference.md documents every CLI flag and every `TokenFeed` argument, with the
defaults the code uses: the parser and the signature are read here, no daemon needed.

A command's flags are the rows of the table under its heading (`## tokenfeed serve`,
`### tokenfeed stop`, ...), written `| `--flag` | default | what |`; a default cell is
`str(default)` in backticks, or `—` for a flag that is unset unless given (None, False
or an empty list). `TokenFeed`'s arguments are the rows under `## TokenFeed` with
`repr(default)` in backticks, `required`, or `from the preset` for the packing keywords.
"""

from __future__ import annotations

import argparse
import inspect
import re
from pathlib import Path

import pytest

from tokenfeed.consumer import TokenFeed
from tokenfeed.consumer.feed import PRESET
from tokenfeed.producer.cli import build_parser

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "reference.md"
ROW = re.compile(r"^\| `([^`]+)` \| ([^|]+?) \|", re.MULTILINE)


def section(heading: str) -> str:
    """The text under `heading` up to the next heading of any level."""
    text = REFERENCE.read_text()
    start = text.find(f"\n{heading}\n")
    assert start >= 0, f"docs/reference.md has no heading {heading!r}"
    end = text.find("\n#", start + len(heading) + 2)
    return text[start:end if end >= 0 else len(text)]


def rows(heading: str) -> dict[str, str]:
    return {name: default.strip() for name, default in ROW.findall(section(heading))}


def commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def cli_default(action: argparse.Action) -> str:
    if action.default in (None, False, []):
        return "—"
    return f"`{action.default}`"


@pytest.mark.parametrize("command", sorted(commands()))
def test_every_flag_of_a_command_is_documented_with_its_default(command: str) -> None:
    heading = "## `tokenfeed serve`" if command == "serve" else f"### `tokenfeed {command}`"
    documented = rows(heading)
    parser = commands()[command]
    actions = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    names = {(a.option_strings[0] if a.option_strings else a.dest): a for a in actions}
    missing = sorted(set(names) - set(documented))
    assert not missing, f"docs/reference.md, {heading}: document {missing}"
    unknown = sorted(set(documented) - set(names))
    assert not unknown, f"docs/reference.md, {heading}: no such flag {unknown}"
    for name, action in names.items():
        assert documented[name] == cli_default(action), (
            f"docs/reference.md, {heading}: {name} defaults to {cli_default(action)} in the "
            f"code, the page says {documented[name]}")


def test_every_tokenfeed_argument_is_documented_with_its_default() -> None:
    documented = rows("## `TokenFeed`")
    params = [p for p in inspect.signature(TokenFeed.__init__).parameters.values()
              if p.name != "self"]
    missing = [p.name for p in params if p.name not in documented]
    assert not missing, f"docs/reference.md, TokenFeed: document {missing}"
    for p in params:
        if p.default is inspect.Parameter.empty:
            expected = "required"
        elif p.default is PRESET:
            expected = "from the preset"
        else:
            expected = f"`{p.default!r}`"
        assert documented[p.name] == expected, (
            f"docs/reference.md, TokenFeed: {p.name} defaults to {expected} in the code, "
            f"the page says {documented[p.name]}")


def test_the_serve_table_is_read_whole() -> None:
    # The parser of this test is itself checked: a table it could not read would pass.
    assert len(rows("## `tokenfeed serve`")) == len(commands()["serve"]._actions) - 1 >= 20
