"""`tokenfeed explain`: the documents of a stream's next batches, from a saved feed state.

    tokenfeed explain --data DIR --state STATE.json [--rank R] --batches N [--json] [--text]
    tokenfeed explain --data DIR --state STATE.json [--rank R] --skip N    # the state N later

The sources are named as for `serve` (`--data`, `--mix FILE` or `--source NAME=PATH`)
and must be the data and tokenizer the state was saved on; producer/provenance.py does
the work. What the run dropped is dropped here too: `--exclude PATH` (the run's
exclusion file: required when the state records a list), the filters the state records
(`--filter`, or a `filter =` of `--mix`, if given, must be those), and `--on-error` as
the run served (skip: a row group that fails to read delivers nothing). Output: a short
table by default; `--json`, one line per batch, `{"batch": k, "rows": [[segment, ...],
...]}` (k counts from the state, skipped batches included), after a first line
`{"explain": {"exclude", "filters", "on_error", "skipped_row_groups"}}` where a list, a
filter or `--on-error skip` applies (the table: a line `dropped: ...`); `--text` adds
each segment's decoded text. With `--skip N` and no `--batches`, the feed state N
batches on is printed as JSON: a job restarts from it with `load_state_dict()`, as it
would with `skip_batches=N`.

Failure behaviour: an unreadable state file, a rank out of range, a state of other data
or tokenizer: one line on stderr naming the fix (cli.py's UserInputError handling).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenfeed.common.errors import ConfigError, StateMismatchError
from tokenfeed.producer.config import (
    DEFAULT_TEXT_COLUMN,
    DEFAULT_TOKENIZER,
    DEFAULT_VAL_FILES,
    ON_ERROR,
    ONE_SOURCE,
    TOKENIZER_BACKENDS,
    SourceConfig,
    data_path,
    load_mix_file,
    parse_source,
)

if TYPE_CHECKING:  # pyarrow: imported when explain runs, not with every command's parser
    from tokenfeed.producer.dataset import Dataset
    from tokenfeed.producer.exclude import Exclusion
    from tokenfeed.producer.filters import Filter
    from tokenfeed.producer.provenance import Applied

TABLE_SEGMENTS = 4  # segments the table shows of a row; the rest are counted


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "explain", help="which documents a saved feed state's next batches are made of "
        "(offline: no daemon)",
        description="From a feed state (state_dict(), or gather_states() with --rank), list "
        "the documents (source, file, row group, row, token range) of the next batches, "
        "reading and tokenizing only the row groups they need. Pass the data and tokenizer "
        "the state was saved on.")
    p.add_argument("--data", help="folder of *.parquet shards, or a URL (as for serve)")
    p.add_argument("--mix", metavar="FILE", help="a mixture's sources, as for serve --mix")
    p.add_argument("--source", action="append", default=[], metavar="NAME=PATH",
                   help="a mixture's source, as for serve --source (repeat it)")
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER,
                   help="the tokenizer the state was saved with (default %(default)s)")
    p.add_argument("--bos", help="BOS special token, as for serve")
    p.add_argument("--tokenizer-backend", default="auto", choices=TOKENIZER_BACKENDS,
                   help="auto: quicktok where installed and equal to tiktoken on the first "
                   "documents read, else tiktoken (the ids are tiktoken's either way)")
    p.add_argument("--text-column", default=DEFAULT_TEXT_COLUMN,
                   help="Parquet column holding the text (default %(default)s)")
    p.add_argument("--val-files", type=int, default=DEFAULT_VAL_FILES,
                   help="last N files form the val split, as for serve (default %(default)s)")
    p.add_argument("--state", required=True, metavar="STATE.json",
                   help="a feed state: state_dict()'s JSON, or gather_states()'s (with --rank)")
    p.add_argument("--rank", type=int, help="the rank to explain, in a gathered job state")
    p.add_argument("--world-size", type=int, help="explain rank --rank of a job of this many "
                   "ranks resuming the gathered state elastically (default: the job's own)")
    p.add_argument("--batches", type=int, help="how many batches to explain")
    p.add_argument("--skip", type=int, metavar="N",
                   help="start N batches after the state; without --batches, print the state "
                   "there (JSON) to restart a job from")
    p.add_argument("--exclude", action="append", default=[], metavar="FILE",
                   help="the exclusion file the run used (TokenFeed(exclude=) or serve "
                   "--exclude; both: repeat the flag); required when the state records a list")
    p.add_argument("--filter", metavar="EXPR",
                   help="--data's filter, as for serve; it must be the one the state records "
                   "(unset: explain applies the filters the state records)")
    p.add_argument("--on-error", default="fail", choices=ON_ERROR,
                   help="as the run served: skip makes a row group that fails to read deliver "
                   "nothing; fail (default) stops with its file and row group")
    p.add_argument("--json", action="store_true",
                   help='one line per batch: {"batch": k, "rows": [[segment, ...], ...]}')
    p.add_argument("--text", action="store_true", help="each segment's decoded text too")


def _datasets(args: argparse.Namespace
              ) -> tuple[dict[str, Dataset], dict[str, float] | None, dict[str, Filter]]:
    """The sources by name, a mixture's weights, and the filters given by source."""
    from tokenfeed.producer.dataset import scan_dataset
    from tokenfeed.producer.filters import Filter

    given = [bool(args.data), bool(args.mix), bool(args.source)]
    if sum(given) != 1:
        raise ConfigError("pass the data the state was saved on: --data DIR, or a mixture's "
                          "sources with --mix FILE or --source NAME=PATH (one of them)")
    if args.filter is not None and not args.data:
        raise ConfigError("--filter filters --data; a mixture's sources each take theirs in "
                          "the --mix file (filter = \"...\"), or leave it out: explain "
                          "applies the filters the state records")
    weights: dict[str, float] | None = None
    if args.data:
        sources: tuple[SourceConfig, ...] = (
            SourceConfig(ONE_SOURCE, data_path(args.data), filter=args.filter),)
    elif args.mix:
        sources, pairs = load_mix_file(Path(args.mix))
        weights = dict(pairs)
    else:
        sources = tuple(parse_source(v) for v in args.source)
    datasets = {s.name: scan_dataset(s.data, text_column=s.text_column or args.text_column,
                                     val_files=args.val_files)
                for s in sorted(sources, key=lambda s: s.name)}
    return datasets, weights, {s.name: Filter.parse(s.filter) for s in sources
                               if s.filter is not None}


def _exclusion(paths: list[str], datasets: dict[str, Dataset]) -> Exclusion | None:
    """The run's exclusion list: every --exclude file's documents, checked against the
    data as the daemon checks them (None: no --exclude)."""
    if not paths:
        return None
    from tokenfeed.common.exclude import read_exclude_file
    from tokenfeed.producer.exclude import NONE, resolve

    listed = NONE
    for path in paths:
        listed = listed | resolve(read_exclude_file(path), datasets, path)
    return listed


def _dropped(applied: Applied) -> str:
    """The table's line on what was dropped as the run dropped it."""
    parts = []
    if applied.exclude is not None:
        parts.append(f"exclusion list sha256 {applied.exclude.sha256} "
                     f"({applied.excluded_documents} documents)")
    for name, text in sorted((applied.filters or {}).items()):
        parts.append(f"filter of {name}: {text}")
    if applied.on_error != "fail":
        skipped = ", ".join(f"{s}:{f}#{g}" for s, f, g in applied.skipped_row_groups)
        parts.append(f"--on-error {applied.on_error}: row groups skipped: {skipped or 'none'}")
    return "dropped: " + "; ".join(parts)


def _load_state(path: str) -> Any:
    try:
        return json.loads(Path(path).expanduser().read_text())
    except OSError as e:
        raise StateMismatchError(f"--state {path}: {e.strerror or e}; pass the JSON file of "
                                 "a saved feed state") from None
    except ValueError as e:
        raise StateMismatchError(f"--state {path} is not JSON ({e}); pass the JSON file of "
                                 "feed.state_dict() or gather_states(feed)") from None


def run(args: argparse.Namespace) -> int:
    from tokenfeed.producer.provenance import explain, select_state
    from tokenfeed.producer.tokenizer import load_tokenizer

    skip = args.skip or 0
    if args.batches is None and not skip:
        raise ConfigError("pass --batches N (the batches to explain) or --skip N (the state "
                          "N batches on)")
    state = select_state(_load_state(args.state), args.rank, args.world_size)
    datasets, weights, filters = _datasets(args)
    exclusion = _exclusion(args.exclude, datasets)
    tokenizer = load_tokenizer(args.tokenizer, args.bos)
    got = explain(datasets, tokenizer, state, batches=args.batches or 0, skip=skip,
                  weights=weights, backend=args.tokenizer_backend, exclusion=exclusion,
                  filters=filters, on_error=args.on_error)
    if args.batches is None:
        print(json.dumps(got.state))
        return 0
    if got.applied:
        print(json.dumps({"explain": got.applied.to_json()}) if args.json
              else _dropped(got.applied))
    decode = tokenizer.encoding.decode
    for i, rows in enumerate(got.batches):
        k = skip + i
        if args.json:
            print(json.dumps({"batch": k, "rows": [
                [{**s.to_json(), **({"text": decode(got.tokens(s).tolist())}
                                    if args.text else {})} for s in row] for row in rows]}))
            continue
        print(f"batch {k}")
        for r, row in enumerate(rows):
            shown = "  ".join(f"{s.source}:{s.file}#{s.row_group}:{s.row}[{s.start}:{s.end}]"
                              for s in row[:TABLE_SEGMENTS])
            more = f"  +{len(row) - TABLE_SEGMENTS} more" if len(row) > TABLE_SEGMENTS else ""
            print(f"  row {r:>3}  {len(row)} segments  {shown}{more}")
            if args.text:
                for s in row:
                    print(f"    --- {s.source} {s.file} row group {s.row_group} row {s.row} "
                          f"tokens {s.start}:{s.end}")
                    print("    " + decode(got.tokens(s).tolist()).replace("\n", "\n    "))
    return 0
