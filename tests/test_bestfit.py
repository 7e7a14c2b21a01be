"""Best-fit packing: BestFitPacker against the oracle's rule, then the daemon end to end.

Unit tests use synthetic documents whose tokens are a global counter after a BOS
(token 0), so every row can be decomposed into the document pieces it holds.
End-to-end tests run real daemons with the default buffer (1000 pieces): the
~30-document train split is read ~30 times over before the first batch.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import BOS_ID, drain_all_ranks
from oracle import bestfit_windows, reference_bestfit_windows

from tokenfeed.common.config import StreamSpec
from tokenfeed.common.errors import StateMismatchError
from tokenfeed.producer import bestfit_codec
from tokenfeed.producer.bestfit import (
    DEFAULT_BUFFER_DOCS,
    DEFAULT_MAX_AGE_DOCS,
    DEFAULT_MIN_TAIL,
    BestFitPacker,
)
from tokenfeed.producer.bestfit_codec import Piece
from tokenfeed.producer.packer import make_packer
from tokenfeed.producer.position import BestFitPosition, Position
from tokenfeed.producer.supply import skipped_units

BOS = 0
Unit = tuple[np.ndarray, np.ndarray]  # (tokens uint32, doc_starts int64)


def make_docs(n: int, seed: int = 0, max_len: int = 90) -> list[list[int]]:
    """n documents of 1..max_len tokens: BOS, then the next ids of a global counter."""
    rng = np.random.default_rng(seed)
    docs, first = [], 1
    for _ in range(n):
        length = int(rng.integers(1, max_len + 1))
        docs.append([BOS, *range(first, first + length - 1)])
        first += length - 1
    return docs


def make_units(docs: list[list[int]], seed: int = 0) -> list[Unit]:
    """The documents split into units of 0..5 documents (empty units included)."""
    rng = np.random.default_rng(seed + 1)
    units, i = [], 0
    while i < len(docs):
        group = docs[i : i + int(rng.integers(0, 6))]
        i += len(group)
        tokens = np.array([t for d in group for t in d], dtype=np.uint32)
        starts = np.cumsum([0] + [len(d) for d in group[:-1]]) if group else []
        units.append((tokens, np.asarray(starts, dtype=np.int64)))
    return units


Drained = list[tuple[np.ndarray, BestFitPosition]]


def through_json(position: BestFitPosition, buffer_docs: int) -> BestFitPosition:
    """`position` as a consumer saves it and hands it back: JSON, then parsed."""
    parsed = BestFitPosition.parse(json.loads(json.dumps(position.to_json())), buffer_docs)
    assert parsed == position
    assert parsed.pieces == position.pieces
    assert parsed.first_unit == position.first_unit
    return parsed


def drain(packer: BestFitPacker, units: list[Unit], *, lazily: bool) -> Drained:
    """Every window the packer can cut from units[packer.next_unit:], with its position
    (saved as JSON and parsed back, as a resume reads it).

    lazily: push one unit, fill what is ready, repeat. Otherwise push all, then fill.
    """
    out: Drained = []

    def fill_ready() -> None:
        while packer.ready():
            window = np.empty(packer.window_tokens, dtype=np.uint32)
            out.append((window, through_json(packer.fill(window), packer.buffer_docs)))

    for u in range(packer.next_unit, len(units)):
        packer.push(u, *units[u])
        if lazily:
            fill_ready()
    fill_ready()
    return out


NO_AGE = 10**9  # max_age_docs that never triggers: best fit alone

# (batch_size, seq_len, buffer_docs, min_tail, max_age_docs): rows shorter and longer than
# documents, a buffer of one, tails always / sometimes / never (nanochat's rule) kept, the
# age rule off, at its default (8 buffers), tight (1-2 buffers) and 0 (first in, first out).
Config = tuple[int, int, int, "int | None", int]
CONFIGS: list[Config] = [
    (2, 32, 8, 4, NO_AGE), (3, 63, 16, 1, 20), (1, 200, 5, None, 40), (4, 17, 1, 8, 0),
    (2, 40, 30, 40, 45), (2, 32, 8, 4, 8), (2, 24, 12, 1, 96), (3, 31, 10, 2, 0),
]
# Where the age rule changes the windows: not with the rule off, a buffer of one (the only
# piece is both the oldest and the best fit) or rows of 201 (any document fits whole).
AGED = [c for c in CONFIGS if c[4] < NO_AGE and c[2] > 1 and c[1] < 200]


@functools.cache
def reference(b: int, t: int, buffer_docs: int, min_tail: int | None, max_age_docs: int
              ) -> tuple[list[Any], int]:
    return bestfit_windows(make_docs(400), bos_id=BOS, batch_size=b, seq_len=t,
                           num_batches=10**9, buffer_docs=buffer_docs, min_tail=min_tail,
                           max_age_docs=max_age_docs)


def packed(b: int, t: int, buffer_docs: int, min_tail: int | None, max_age_docs: int,
           start: BestFitPosition | None = None, *, lazily: bool = False
           ) -> tuple[BestFitPacker, Drained]:
    packer = BestFitPacker(b, t, start, buffer_docs=buffer_docs, min_tail=min_tail,
                           max_age_docs=max_age_docs)
    return packer, drain(packer, make_units(make_docs(400)), lazily=lazily)


# -- windows -----------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS)
def test_windows_match_the_oracle(config: Config) -> None:
    want, _ = reference(*config)
    _, got = packed(*config)
    assert len(want) > 5
    assert [w.tolist() for w, _ in got] == [w.tolist() for w in want]


@pytest.mark.parametrize("config", CONFIGS)
def test_tokens_cropped_match_the_oracle(config: Config) -> None:
    _, want_cropped = reference(*config)
    packer, got = packed(*config)
    assert packer.stats()["tokens_cropped"] == want_cropped
    assert packer.stats()["tokens_packed"] == len(got) * packer.window_tokens


@pytest.mark.parametrize("config", AGED)
def test_age_rule_places_old_pieces_out_of_best_fit_order(config: Config) -> None:
    packer, got = packed(*config)
    without, _ = reference(*config[:4], NO_AGE)
    assert packer.stats()["tokens_by_age"] > 0
    assert [w.tolist() for w, _ in got] != [w.tolist() for w in without][: len(got)]


@pytest.mark.parametrize("config", CONFIGS)
def test_every_row_starts_with_bos(config: Config) -> None:
    b, t = config[:2]
    _, got = packed(*config)
    for k, (window, _) in enumerate(got):
        assert (window.reshape(b, t + 1)[:, 0] == BOS).all(), f"window {k}"


@pytest.mark.parametrize("config", CONFIGS)
def test_rows_are_full_of_document_pieces(config: Config) -> None:
    """Each row is T+1 tokens of pieces: a BOS, then consecutive tokens of one document."""
    b, t = config[:2]
    doc_of = {tok: i for i, d in enumerate(make_docs(400)) for tok in d[1:]}
    _, got = packed(*config)
    for k, (window, _) in enumerate(got):
        for row in window.reshape(b, t + 1).tolist():
            assert len(row) == t + 1
            assert row[0] == BOS
            pieces, piece = [], []
            for tok in row[1:]:  # split at the BOSes
                if tok == BOS:
                    pieces.append(piece)
                    piece = []
                else:
                    piece.append(tok)
            pieces.append(piece)
            for p in pieces:
                if p:
                    assert p == list(range(p[0], p[0] + len(p))), f"window {k}"
                    assert doc_of[p[0]] == doc_of[p[-1]], f"window {k}: spans documents"


def test_a_cropped_tail_re_enters_the_buffer_with_a_bos() -> None:
    # one 10-token document, rows of 4: BOS 1 2 3 | BOS 4 5 6 | BOS 7 8 9
    tokens = np.array([BOS, *range(1, 10)], dtype=np.uint32)
    packer = BestFitPacker(3, 3, buffer_docs=1, min_tail=1)
    packer.push(0, tokens, np.array([0]))
    packer.push(1, np.array([BOS, 10], dtype=np.uint32), np.array([0]))
    out = np.empty(12, dtype=np.uint32)
    packer.fill(out)
    assert out.tolist() == [BOS, 1, 2, 3, BOS, 4, 5, 6, BOS, 7, 8, 9]
    assert packer.stats()["tokens_cropped"] == 0


def test_a_piece_past_max_age_goes_next_and_its_tail_keeps_its_age() -> None:
    # document 0 (10 tokens) never fits rows of 4 while 2-token documents do; at age 3 > 2
    # it is placed next: cropped to the room left, then its tail (born 0) row after row.
    shorts = [t for i in range(1, 9) for t in (BOS, 100 + i)]
    tokens = np.array([BOS, *range(1, 10), *shorts], dtype=np.uint32)
    starts = np.array([0, *range(10, 26, 2)])
    packer = BestFitPacker(3, 3, buffer_docs=2, min_tail=1, max_age_docs=2)
    packer.push(0, tokens, starts)
    out = np.empty(12, dtype=np.uint32)
    position = packer.fill(out)
    assert out.tolist() == [BOS, 101, BOS, 1, BOS, 2, 3, 4, BOS, 5, 6, 7]
    assert (position.unit, position.doc, position.docs_read) == (0, 3, 3)
    assert position.pieces == (Piece(0, 2, 0, 2), Piece(0, 0, 8, 0))  # the second a tail
    assert packer.stats()["tokens_by_age"] == 10
    best_fit = BestFitPacker(3, 3, buffer_docs=2, min_tail=1, max_age_docs=NO_AGE)
    best_fit.push(0, tokens, starts)
    best_fit.fill(out)
    assert out.tolist() == [BOS, 101, BOS, 102, BOS, 103, BOS, 104, BOS, 105, BOS, 106]


def test_nanochat_rule_discards_every_cropped_tail() -> None:
    tokens = np.array([BOS, *range(1, 10), BOS, 10, BOS, 11], dtype=np.uint32)
    packer = BestFitPacker(2, 3, buffer_docs=1, min_tail=None)
    packer.push(0, tokens, np.array([0, 10, 12]))
    out = np.empty(8, dtype=np.uint32)
    packer.fill(out)
    assert out.tolist() == [BOS, 1, 2, 3, BOS, 10, BOS, 11]
    assert packer.stats()["tokens_cropped"] == 6


def test_fill_writes_into_a_uint16_buffer() -> None:
    packer = BestFitPacker(1, 3, buffer_docs=1)
    packer.push(0, np.array([BOS, 7, 8, 9, BOS], dtype=np.uint32), np.array([0, 4]))
    out = np.zeros(4, dtype=np.uint16)
    packer.fill(out)
    assert out.tolist() == [BOS, 7, 8, 9]


# -- readiness ---------------------------------------------------------------------


def test_not_ready_until_every_placement_can_refill_the_buffer() -> None:
    # buffer of 2, rows of 4: row 0 places doc 0 whole; row 1 must first refill
    packer = BestFitPacker(2, 3, buffer_docs=2, min_tail=1)
    packer.push(0, np.array([BOS, 1, 2, 3, BOS, 4, 5, 6, 7], dtype=np.uint32), np.array([0, 4]))
    assert not packer.ready()
    packer.push(1, np.array([BOS, 8, 9, 10], dtype=np.uint32), np.array([0]))
    assert packer.ready()
    out = np.empty(8, dtype=np.uint32)
    packer.fill(out)
    assert out.tolist() == [BOS, 1, 2, 3, BOS, 8, 9, 10]


def test_buffered_tokens_count_only_documents_outside_the_buffer() -> None:
    packer = BestFitPacker(1, 3, buffer_docs=2, min_tail=1)
    packer.push(0, np.array([BOS, 1, 2, 3, BOS, 5, BOS, 7, 8, 9, 10], dtype=np.uint32),
                np.array([0, 4, 6]))
    assert packer.buffered_tokens == 11
    packer.fill(np.empty(4, dtype=np.uint32))  # docs 0 and 1 enter, doc 0 fills the row
    assert packer.buffered_tokens == 5  # doc 1 waits in the buffer, doc 2 is unread


def test_lacking_tokens_outweigh_buffered_tokens_while_starved() -> None:
    """A long document can outweigh a window yet supply a single refill: ask for more."""
    packer = BestFitPacker(2, 3, buffer_docs=1, min_tail=None)
    packer.push(0, np.array([BOS, 1, BOS, *range(2, 100)], dtype=np.uint32), np.array([0, 2]))
    assert (packer.buffered_tokens, packer.lacking_tokens) == (101, 0)
    assert not packer.ready()
    assert packer.buffered_tokens == 0
    assert packer.lacking_tokens > 0
    assert packer.buffered_tokens - packer.lacking_tokens < 0  # what a stream reads ahead on
    packer.push(1, np.array([BOS, 100], dtype=np.uint32), np.array([0]))
    assert packer.lacking_tokens == 0  # a push answers the estimate


# -- positions and resume ----------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS)
def test_positions_do_not_depend_on_push_timing(config: Config) -> None:
    _, eager = packed(*config, lazily=False)
    _, lazy = packed(*config, lazily=True)
    assert [p for _, p in eager] == [p for _, p in lazy]
    assert [w.tolist() for w, _ in eager] == [w.tolist() for w, _ in lazy]


@pytest.mark.parametrize("config", [  # the first four (every feature) fast, the rest slow
    *CONFIGS[:4], *(pytest.param(c, marks=pytest.mark.slow) for c in CONFIGS[4:])])
@pytest.mark.slow
def test_resume_from_every_third_position_reproduces_the_rest(
    config: Config,
) -> None:
    _, full = packed(*config)
    for k in range(0, len(full), 3):
        position = full[k][1]
        _, resumed = packed(*config, start=position, lazily=True)
        rest = full[k + 1 :]
        assert [w.tolist() for w, _ in resumed] == [w.tolist() for w, _ in rest], (
            f"resume after window {k}"
        )
        assert [p for _, p in resumed] == [p for _, p in rest]


@functools.cache
def long_run(max_age_docs: int) -> tuple[list[Unit], list[int], Drained]:
    """5000 documents of 1..300 tokens, rows of 65, 16 pieces: most pieces outgrow a row,
    and without the age rule the longest stay in the buffer for good. Returns the units,
    the unit of each document and every window with its position."""
    units = make_units(make_docs(5000, seed=5, max_len=300), seed=5)
    unit_of_doc = [u for u, (_, starts) in enumerate(units) for _ in range(len(starts))]
    packer = BestFitPacker(4, 64, buffer_docs=16, min_tail=4, max_age_docs=max_age_docs)
    return units, unit_of_doc, drain(packer, units, lazily=True)


def oldest_reference(position: BestFitPosition) -> tuple[int, int]:
    """(age in documents, lag in units) of the position's oldest buffered piece."""
    pieces = position.pieces
    return (position.docs_read - min(p.born for p in pieces),
            position.unit - min(p.unit for p in pieces))


@pytest.mark.parametrize("max_age_docs", [0, 16, 64, 300])
@pytest.mark.slow
def test_age_rule_bounds_how_far_the_oldest_reference_trails(max_age_docs: int) -> None:
    # No piece outlives max_age_docs + 1 documents read (buffer_docs when larger: the
    # buffer itself spans that many), so resume re-reads only the units they span.
    _, unit_of_doc, run = long_run(max_age_docs)
    bound = max(max_age_docs + 1, 16)
    ages = []
    for k, (_, position) in enumerate(run):
        age, _ = oldest_reference(position)
        ages.append(age)
        assert age <= bound, f"window {k}"
        first_unit = unit_of_doc[max(position.docs_read - bound, 0)]
        assert min(p.unit for p in position.pieces) >= first_unit
        assert position.first_unit >= first_unit
    assert len(run) > 1500
    assert max(ages) == bound  # the bound is tight


def test_without_the_age_rule_the_oldest_reference_trails_by_the_whole_run() -> None:
    units, _, run = long_run(NO_AGE)
    age, lag = max(oldest_reference(position) for _, position in run)
    assert age > 3000 and lag > len(units) // 3


@pytest.mark.parametrize("max_age_docs", [16, pytest.param(64, marks=pytest.mark.slow)])
@pytest.mark.slow
def test_resume_late_in_a_long_run_reproduces_the_rest_from_near_the_read_unit(
    max_age_docs: int,
) -> None:
    units, unit_of_doc, full = long_run(max_age_docs)
    bound = max(max_age_docs + 1, 16)
    for k in range(len(full) // 2, len(full), 97):
        position = full[k][1]
        packer = BestFitPacker(4, 64, position, buffer_docs=16, min_tail=4,
                               max_age_docs=max_age_docs)
        assert packer.next_unit >= unit_of_doc[max(position.docs_read - bound, 0)]
        resumed = drain(packer, units, lazily=True)
        rest = full[k + 1 :]
        assert [w.tolist() for w, _ in resumed] == [w.tolist() for w, _ in rest], (
            f"resume after window {k}"
        )
        assert [p for _, p in resumed] == [p for _, p in rest]


def test_oldest_piece_index_stays_bounded_when_the_rule_never_triggers() -> None:
    # The oldest piece then stays for good and entries of pieces placed since never
    # surface from the heap: it must be rebuilt, or it grows with the run.
    units = make_units(make_docs(3000, seed=5, max_len=300), seed=5)
    packer = BestFitPacker(4, 64, buffer_docs=16, min_tail=4, max_age_docs=NO_AGE)
    drain(packer, units, lazily=True)
    assert packer.position.docs_read > 2900
    assert len(packer._ages) <= 4 * 16 + 1


def encoded(unit: int, doc: int, docs_read: int, pieces: list[Piece]) -> dict[str, Any]:
    """A position's JSON whose buffer is `pieces`, as the packer writes it."""
    refs = np.array([tuple(p) for p in pieces], dtype=np.int64).reshape(-1, 4)
    buffer = bestfit_codec.encode(refs, unit, docs_read)
    return {"unit": unit, "doc": doc, "docs_read": docs_read, "buffer": buffer}


def test_resume_starts_at_the_earliest_unit_the_position_names() -> None:
    pieces = [Piece(7, 2, 0, 30), Piece(4, 0, 5, 10), Piece(9, 0, 0, 40)]
    position = BestFitPosition.parse(encoded(9, 1, 41, pieces), 4)
    assert position.pieces == tuple(pieces)
    assert position.first_unit == 4
    packer = BestFitPacker(2, 8, position, buffer_docs=4)
    assert packer.next_unit == 4
    assert packer.position.pieces == position.pieces
    assert packer.position == position
    assert packer.position.first_unit == 4
    assert BestFitPacker(2, 8, packer.position, buffer_docs=4).position == packer.position


def test_units_the_packer_does_not_need_may_be_pushed_empty_on_resume() -> None:
    config = (2, 32, 8, 4, NO_AGE)
    _, full = packed(*config)
    units = make_units(make_docs(400))
    empty = (np.zeros(0, dtype=np.uint32), np.zeros(0, dtype=np.int64))
    k = len(full) // 2
    packer = BestFitPacker(2, 32, full[k][1], buffer_docs=8, min_tail=4, max_age_docs=NO_AGE)
    skip = skipped_units(full[k][1])
    assert packer.next_unit == full[k][1].first_unit
    skipped = 0
    for u in range(packer.next_unit, len(units)):
        needed = u not in skip
        skipped += not needed
        packer.push(u, *(units[u] if needed else empty))
    got = []
    while packer.ready():
        window = np.empty(packer.window_tokens, dtype=np.uint32)
        packer.fill(window)
        got.append(window.tolist())
    assert skipped > 10
    assert got == [w.tolist() for w, _ in full[k + 1 :]]


def test_position_equality_ignores_the_cursor_fields_the_stream_adds() -> None:
    spec = StreamSpec(batch_size=2, seq_len=8, packing="bestfit")
    position = encoded(3, 1, 9, [Piece(1, 0, 0, 4)])
    cursor = {**position, "epoch": 0, "row_group": 3}
    assert Position.parse(cursor, spec, ()) == Position.parse(position, spec, ())
    assert BestFitPosition.parse(cursor, 2) == BestFitPosition.parse(position, 2)
    # ... but not the fields that say where it continues
    for other in (encoded(3, 1, 9, [Piece(1, 0, 1, 4)]), encoded(3, 1, 9, []),
                  {**position, "doc": 2, "docs_read": 10}):
        assert BestFitPosition.parse(other, 2) != BestFitPosition.parse(position, 2)


def test_position_of_a_full_buffer_is_under_64_kb_of_json() -> None:
    # a long run: unit numbers in the millions, billions of documents read, long
    # documents cropped deep inside (every piece the last of its own unit of 100k)
    pieces = [Piece(2_000_000 + i, 99_999, 1_000_000 + i, 5_000_099_999 + 100_000 * i)
              for i in range(1000)]
    position = BestFitPosition.parse(encoded(3_000_000, 0, 5_100_009_000, pieces), 1000)
    assert position.pieces == tuple(pieces)
    packer = BestFitPacker(32, 2048, position)
    assert packer.position.pieces == tuple(pieces)
    assert len(json.dumps(packer.position.to_json())) < 64 * 1024


def lognormal_units(docs_per_unit: int, n_docs: int = 80_000) -> Iterator[Unit]:
    """Documents of FineWeb-Edu's length mix (lognormal, median 600 tokens, sigma 1)."""
    rng = np.random.default_rng(11)
    lengths = np.maximum(2, rng.lognormal(np.log(600), 1.0, n_docs).astype(np.int64))
    for i in range(0, n_docs, docs_per_unit):
        group = lengths[i : i + docs_per_unit]
        tokens = np.ones(int(group.sum()), dtype=np.uint32)
        starts = np.cumsum(group) - group
        tokens[starts] = BOS
        yield tokens, starts.astype(np.int64)


@pytest.mark.parametrize("docs_per_unit", [
    1024, pytest.param(16, marks=pytest.mark.slow), pytest.param(3, marks=pytest.mark.slow)])
def test_position_after_1000_windows_of_nanochat_shape_is_under_8_kb_of_json(
    docs_per_unit: int,
) -> None:
    # nanochat's shape (B=32, T=2048, 1000 buffered documents); FineWeb-Edu's row groups
    # hold ~1024 documents, the test corpus's 2 to 3 (a unit per piece or two, the worst).
    packer = BestFitPacker(32, 2048)
    out = np.empty(packer.window_tokens, dtype=np.uint32)
    windows = 0
    for u, unit in enumerate(lognormal_units(docs_per_unit)):
        packer.push(u, *unit)
        while windows < 1000 and packer.ready():
            packer.fill(out)
            windows += 1
        if windows == 1000:
            break
    assert windows == 1000
    assert len(packer.position.pieces) >= 999
    assert len(json.dumps(packer.position.to_json())) < 8 * 1024
    # one line, indented or not
    assert len(json.dumps(packer.position.to_json(), indent=4)) < 8 * 1024


@pytest.mark.parametrize("config", CONFIGS)
def test_compact_position_names_every_buffered_piece_in_order(config: Config) -> None:
    b, t, buffer_docs, min_tail, max_age_docs = config
    packer = BestFitPacker(b, t, buffer_docs=buffer_docs, min_tail=min_tail,
                           max_age_docs=max_age_docs)
    out = np.empty(packer.window_tokens, dtype=np.uint32)
    checked = 0
    for u, unit in enumerate(make_units(make_docs(400))):
        packer.push(u, *unit)
        while packer.ready():
            position = packer.fill(out)
            # (unit, doc, start, born) of each piece, in the order they entered; a tail
            # exactly when its start is past 0
            pieces = [Piece(p[3], p[4], p[1], p[5]) for p in packer._pieces.values()]
            assert position.pieces == tuple(pieces)
            assert [p[2] for p in packer._pieces.values()] == [int(p.start > 0) for p in pieces]
            parsed = BestFitPosition.parse(position.to_json(), buffer_docs)
            assert parsed.pieces == tuple(pieces)
            again = BestFitPacker(b, t, parsed, buffer_docs=buffer_docs, min_tail=min_tail,
                                  max_age_docs=max_age_docs)
            assert again.position == position
            assert again.position.to_json() == position.to_json()
            checked += 1
    assert checked > 20


def test_position_in_the_earlier_five_integer_form_is_refused_clearly() -> None:
    config = CONFIGS[0]
    _, full = packed(*config)
    k = len(full) // 2
    position = full[k][1]
    # (unit, doc, start, tail, born) a piece: the list form no longer read
    flat = [v for p in position.pieces for v in (p.unit, p.doc, p.start, int(p.start > 0),
                                                  p.born)]
    assert flat
    old = {"unit": position.unit, "doc": position.doc, "docs_read": position.docs_read,
           "buffer": flat}
    with pytest.raises(StateMismatchError, match=r"a string 'buffer'.*buffer of type list"):
        BestFitPosition.parse(old, config[2])
    spec = StreamSpec(batch_size=config[0], seq_len=config[1], packing="bestfit",
                      buffer_docs=config[2])
    with pytest.raises(StateMismatchError, match="pass the feed state unchanged"):
        Position.parse(old, spec, ())


def compact(unit: int, doc: int, docs_read: int, values: list[int]) -> dict[str, Any]:
    from tokenfeed.producer.bestfit_codec import _varints_to_text

    return {"unit": unit, "doc": doc, "docs_read": docs_read,
            "buffer": _varints_to_text(np.array(values, dtype=np.int64))}


def test_compact_helper_writes_what_the_packer_reads() -> None:
    # one piece: age 1, unit 0 (back 1 from unit 1) whose document 0 has born 1 back of 2
    position = BestFitPosition.parse(compact(1, 0, 2, [1, 1, 0, 1, 1, 2]), 2)
    assert position.pieces == (Piece(0, 1, 0, 1),)
    assert BestFitPacker(2, 8, position, buffer_docs=2).position == position


@pytest.mark.parametrize(
    "position",
    [
        {"unit": 1, "doc": 0, "docs_read": 2, "buffer": "!!"},  # not base64
        {"unit": 1, "doc": 0, "docs_read": 2, "buffer": "AQ="},  # not canonical base64
        compact(1, 0, 2, [1, 1, 0, 1, 1]),  # a value short
        compact(1, 0, 2, [0, 0, 0]),  # an empty buffer is ""
        compact(1, 0, 2, [1, 1, 0, 1, 1, 2, 0]),  # a value over
        compact(1, 0, 2, [1, 0, 0, 1]),  # a piece without a unit
        compact(1, 0, 2, [3, 1, 0, 1, 1, 1, 1, 2]),  # more pieces than the buffer (2)
        compact(1, 0, 2, [1, 1, 0, 3, 1, 2]),  # born before docs_read... age 3 > 2
        compact(1, 0, 2, [1, 1, 0, 0, 1, 2]),  # age 0: born == docs_read
        compact(1, 0, 2, [1, 1, 0, 1, 1, 0]),  # the unit begins after the piece
        compact(2, 0, 4, [2, 2, 0, 2, 1, 1, 3, 0, 1]),  # steps (0, 1): units must ascend
        compact(3, 0, 5, [2, 2, 0, 2, 1, 2, 3, 1, 1]),  # first unit holds no piece
        compact(1, 0, 2, [1, 1, 1, 1, 1, 2, 0, 0]),  # a tail starting at token 0
        compact(1, 0, 2, [1, 1, 1, 1, 1, 2, 1, 3]),  # a tail of piece 1 of 1
        compact(1, 1, 3, [1, 1, 0, 2, 0, 2]),  # read unit's document 0 at born 1, not 2
        compact(1, 0, 2, [1, 1, 0, 1, 2, 2]),  # unit -1
    ],
)
def test_malformed_compact_position_raises_state_mismatch(position: dict[str, Any]) -> None:
    with pytest.raises(StateMismatchError):
        BestFitPosition.parse(position, 2)


@pytest.mark.parametrize(
    "position",
    [
        {"unit": -1, "doc": 0, "buffer": ""},
        {"unit": 1, "doc": 0, "docs_read": 2, "buffer": [0, 0, 0, 0, 0]},  # the list form
        {"unit": 1, "doc": 0, "docs_read": 2, "buffer": 5},  # not a string
        encoded(1, 0, 2, [Piece(1, 0, 0, 0)]),  # not read yet
        encoded(1, 0, 2, [Piece(0, 0, 0, 0), Piece(0, 0, 3, 0)]),  # one doc twice
        encoded(2, 0, 9, [Piece(0, 0, 0, 5), Piece(1, 0, 0, 4)]),  # born does not grow
        encoded(1, 0, 2, [Piece(0, 0, 0, 2)]),  # born >= docs_read
        {"unit": 1, "doc": 0,  # no docs_read, buffer not empty
         "buffer": encoded(1, 0, 2, [Piece(0, 0, 0, 0)])["buffer"]},
        encoded(4, 0, 9, [Piece(0, 0, 0, 1), Piece(0, 1, 0, 2),
                          Piece(0, 2, 0, 3)]),  # more pieces than the buffer
        {"unit": 1, "doc": "0", "buffer": ""},
        {"unit": 1, "doc": 0, "docs_read": -1, "buffer": ""},
    ],
)
def test_malformed_position_raises_state_mismatch(position: dict[str, Any]) -> None:
    with pytest.raises(StateMismatchError):
        BestFitPosition.parse(position, 2)


def test_packer_refuses_a_position_with_more_pieces_than_its_buffer() -> None:
    position = BestFitPosition.parse(
        encoded(4, 0, 9, [Piece(0, 0, 0, 1), Piece(0, 1, 0, 2), Piece(0, 2, 0, 3)]), 3)
    assert len(position.pieces) == 3
    assert BestFitPacker(2, 8, position, buffer_docs=3).position == position
    with pytest.raises(StateMismatchError, match="buffer_docs=2"):
        BestFitPacker(2, 8, position, buffer_docs=2)


def test_position_naming_a_missing_document_raises_on_push() -> None:
    position = BestFitPosition.parse(encoded(1, 0, 6, [Piece(0, 5, 0, 5)]), 2)
    packer = BestFitPacker(2, 8, position, buffer_docs=2)
    with pytest.raises(StateMismatchError, match="document 5"):
        packer.push(0, np.array([BOS, 1], dtype=np.uint32), np.array([0]))


def test_unit_arrays_are_dropped_once_all_their_documents_are_in_the_buffer() -> None:
    import weakref

    units = make_units(make_docs(200), seed=3)
    packer = BestFitPacker(2, 32, buffer_docs=8, min_tail=4)
    refs = []
    for u, (tokens, starts) in enumerate(units):
        refs.append(weakref.ref(tokens))
        packer.push(u, tokens, starts)
        while packer.ready():
            packer.fill(np.empty(packer.window_tokens, dtype=np.uint32))
    del units, tokens, starts
    alive = [u for u, r in enumerate(refs) if r() is not None]
    assert len(refs) > 50
    assert all(u >= packer.position.unit for u in alive), alive  # unread documents only


def test_make_packer_builds_bestfit_for_a_bestfit_spec() -> None:
    spec = StreamSpec(batch_size=2, seq_len=16, packing="bestfit")
    packer = make_packer(spec, Position.start(spec).packed)
    assert isinstance(packer, BestFitPacker)
    assert packer.window_tokens == spec.window_tokens
    assert packer.position.to_json() == {"unit": 0, "doc": 0, "docs_read": 0, "buffer": ""}
    assert packer.max_age_docs == 8 * spec.buffer_docs


# -- the daemon end to end ---------------------------------------------------------


class CachedEncoding:
    """The oracle re-reads the corpus ~30 times to fill its buffer: tokenize each text once."""

    def __init__(self, enc: Any) -> None:
        self.enc = enc
        self.cache: dict[str, list[int]] = {}

    def encode_ordinary(self, text: str) -> list[int]:
        if text not in self.cache:
            self.cache[text] = self.enc.encode_ordinary(text)
        return self.cache[text]


@pytest.fixture(scope="module")
def bestfit_oracle(corpus: Path, encoding: Any) -> Callable[..., list[np.ndarray]]:
    enc = CachedEncoding(encoding)

    @functools.cache
    def windows(rank: int, world_size: int, b: int, t: int, n: int, seed: int | None
                ) -> list[np.ndarray]:
        return reference_bestfit_windows(
            corpus, enc=enc, bos_id=BOS_ID, rank=rank, world_size=world_size, batch_size=b,
            seq_len=t, num_batches=n, buffer_docs=DEFAULT_BUFFER_DOCS,
            min_tail=DEFAULT_MIN_TAIL, max_age_docs=DEFAULT_MAX_AGE_DOCS, shuffle_seed=seed,
        )

    def get(*, rank: int = 0, world_size: int = 1, batch_size: int, seq_len: int, n: int,
            shuffle_seed: int | None = None) -> list[np.ndarray]:
        return windows(rank, world_size, batch_size, seq_len, n, shuffle_seed)

    return get


def assert_rows_equal(batch: tuple[Any, Any], window: np.ndarray, where: str) -> None:
    x, y = batch
    b, t = x.shape
    rows = window.reshape(b, t + 1)
    assert str(x.dtype) == "torch.int32" and str(y.dtype) == "torch.int64"
    np.testing.assert_array_equal(x.numpy(), rows[:, :-1], err_msg=where)
    np.testing.assert_array_equal(y.numpy(), rows[:, 1:], err_msg=where)


@pytest.mark.parametrize(("world_size", "workers"), [
    (1, 1), pytest.param(1, 3, marks=pytest.mark.slow), pytest.param(2, 1, marks=pytest.mark.slow),
    (2, 3)])
def test_bestfit_batches_match_oracle(start_daemon, bestfit_oracle, world_size, workers):
    daemon = start_daemon(workers=workers)
    b, t, n = 2, 64, 25
    got = drain_all_ranks(daemon, b, t, world_size, n, packing="bestfit")
    for r in range(world_size):
        want = bestfit_oracle(rank=r, world_size=world_size, batch_size=b, seq_len=t, n=n)
        for k in range(n):
            assert_rows_equal(got[r][k], want[k], f"rank {r} batch {k}")


def test_bestfit_status_reports_tokens_packed_and_cropped(start_daemon):
    daemon = start_daemon(workers=2)
    with daemon.feed(2, 64, packing="bestfit") as feed:
        for _ in range(5):
            next(feed)
        (stream,) = daemon.status()["streams"]
    assert stream["tokens_packed"] == stream["batches"] * 2 * 65
    assert 0 <= stream["tokens_cropped"] < stream["tokens_packed"]


@pytest.mark.parametrize(("shuffle_seed", "workers"), [  # a shuffled one: test_state_fixtures
    (None, 1), pytest.param(7, 3, marks=pytest.mark.slow)])
@pytest.mark.slow
def test_bestfit_resume_on_a_new_daemon_continues_bit_identically(
    start_daemon, bestfit_oracle, shuffle_seed, workers
):
    b, t, first, n = 4, 128, 6, 40
    want = bestfit_oracle(batch_size=b, seq_len=t, n=n, shuffle_seed=shuffle_seed)
    daemon = start_daemon(workers=workers)
    with daemon.feed(b, t, packing="bestfit", shuffle_seed=shuffle_seed, prefetch=4) as feed:
        for k in range(first):
            assert_rows_equal(next(feed), want[k], f"batch {k}")
        state = json.loads(json.dumps(feed.state_dict()))
    daemon.stop()
    again = start_daemon(workers=workers)
    with again.feed(b, t, packing="bestfit", shuffle_seed=shuffle_seed) as resumed:
        resumed.load_state_dict(state)
        epochs = [resumed.epoch]
        for k in range(first, n):
            assert_rows_equal(next(resumed), want[k], f"resumed batch {k}")
            epochs.append(resumed.epoch)
    assert epochs[-1] > epochs[0], f"no epoch boundary crossed after the resume: {epochs}"
