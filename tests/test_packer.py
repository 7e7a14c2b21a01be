"""ConcatPacker (producer/packer.py): windows, cursors and resume, without any process.

Token ids are a global counter (unit 0 holds 0..n0-1, unit 1 continues, ...), so a
window's content says exactly which stream positions it holds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tokenfeed.common.errors import StateMismatchError
from tokenfeed.producer.packer import ConcatPacker
from tokenfeed.producer.position import ConcatPosition

Unit = tuple[np.ndarray, np.ndarray]  # (tokens uint32, doc_starts int64)


def make_units(lengths: list[int], doc_len: int = 3) -> list[Unit]:
    """Units of consecutive token ids; a new document every `doc_len` tokens of a unit."""
    units, first = [], 0
    for n in lengths:
        tokens = np.arange(first, first + n, dtype=np.uint32)
        doc_starts = np.arange(0, n, doc_len, dtype=np.int64)
        units.append((tokens, doc_starts))
        first += n
    return units


def stream_of(units: list[Unit]) -> np.ndarray:
    return np.concatenate([tokens for tokens, _ in units])


def drain(
    packer: ConcatPacker, units: list[Unit], first_unit: int, *, lazily: bool
) -> list[tuple[np.ndarray, dict[str, Any]]]:
    """Every full window the packer can cut from units[first_unit:], with its cursor.

    lazily: push one unit, fill what is ready, repeat. Otherwise push all, then fill.
    """
    out: list[tuple[np.ndarray, dict[str, Any]]] = []

    def fill_ready() -> None:
        while packer.ready():
            window = np.empty(packer.window_tokens, dtype=np.uint32)
            cursor = packer.fill(window)
            out.append((window, cursor.to_json()))

    for u in range(first_unit, len(units)):
        packer.push(u, *units[u])
        if lazily:
            fill_ready()
    fill_ready()
    return out


def global_index(units: list[Unit], cursor: dict[str, Any]) -> int:
    """Stream index of the token a cursor points at."""
    return sum(len(t) for t, _ in units[: cursor["unit"]]) + cursor["offset"]


# -- windows -----------------------------------------------------------------------


@pytest.mark.parametrize("window_tokens", [1, 4, 7, 10, 33])
def test_windows_are_the_stream_cut_into_consecutive_pieces(window_tokens: int) -> None:
    units = make_units([5, 9, 1, 12, 3, 8])
    stream = stream_of(units)
    windows = [
        w
        for w, _ in drain(
            ConcatPacker(window_tokens, ConcatPosition(0)), units, 0, lazily=False
        )
    ]
    assert len(windows) == len(stream) // window_tokens
    for k, window in enumerate(windows):
        np.testing.assert_array_equal(
            window, stream[k * window_tokens : (k + 1) * window_tokens], err_msg=f"window {k}"
        )


def test_a_window_may_span_several_units() -> None:
    units = make_units([2, 3, 1, 4])
    packer = ConcatPacker(9, ConcatPosition(0))
    ((window, cursor),) = drain(packer, units, 0, lazily=False)
    assert window.tolist() == list(range(9))
    assert (cursor["unit"], cursor["offset"]) == (3, 3)


def test_fill_writes_into_a_uint16_buffer() -> None:
    units = make_units([10])
    packer = ConcatPacker(4, ConcatPosition(0))
    packer.push(0, *units[0])
    out = np.zeros(4, dtype=np.uint16)
    packer.fill(out)
    assert out.tolist() == [0, 1, 2, 3]


# -- cursors -----------------------------------------------------------------------


@pytest.mark.parametrize("window_tokens", [1, 4, 7, 10, 33])
def test_cursor_is_the_position_of_the_next_token(window_tokens: int) -> None:
    units = make_units([5, 9, 1, 12, 3, 8])
    packer = ConcatPacker(window_tokens, ConcatPosition(0))
    for k, (_, cursor) in enumerate(drain(packer, units, 0, lazily=False)):
        assert global_index(units, cursor) == (k + 1) * window_tokens, f"window {k}"
        # never "offset == len(unit)": a unit's end is the next unit's start
        if cursor["offset"]:
            assert cursor["offset"] < len(units[cursor["unit"]][0]), f"window {k}"


def test_cursor_names_the_document_of_the_next_token() -> None:
    tokens = np.arange(10, dtype=np.uint32)
    doc_starts = np.array([0, 4, 5, 9], dtype=np.int64)
    packer = ConcatPacker(1, ConcatPosition(0))
    packer.push(0, tokens, doc_starts)
    docs = [packer.fill(np.empty(1, dtype=np.uint32)).doc for _ in range(9)]
    # next tokens 1..9 lie in documents 0,0,0,1,2,2,2,2,3
    assert docs == [0, 0, 0, 1, 2, 2, 2, 2, 3]


def test_window_ending_at_a_unit_end_points_at_the_next_unit_start() -> None:
    units = make_units([5, 5, 6])
    packer = ConcatPacker(5, ConcatPosition(0))
    cursors = [c for _, c in drain(packer, units, 0, lazily=False)]
    assert cursors == [
        {"unit": 1, "offset": 0, "doc": 0},
        {"unit": 2, "offset": 0, "doc": 0},
        {"unit": 2, "offset": 5, "doc": 1},
    ]


def test_empty_units_add_no_tokens() -> None:
    with_empty = make_units([4, 0, 0, 6, 0, 5])
    without = make_units([4, 6, 5])
    got = drain(ConcatPacker(5, ConcatPosition(0)), with_empty, 0, lazily=False)
    want = drain(ConcatPacker(5, ConcatPosition(0)), without, 0, lazily=False)
    assert [w.tolist() for w, _ in got] == [w.tolist() for w, _ in want]


def test_empty_units_do_not_shift_cursors_within_later_units() -> None:
    units = make_units([4, 0, 0, 6, 0, 5])
    cursors = [
        c for _, c in drain(ConcatPacker(5, ConcatPosition(0)), units, 0, lazily=False)
    ]
    # stream index 5 is offset 1 of unit 3, index 10 is the start of unit 4 (empty) or 5.
    assert (cursors[0]["unit"], cursors[0]["offset"]) == (3, 1)
    assert global_index(units, cursors[1]) == 10
    assert cursors[1]["offset"] == 0


def test_empty_units_pushed_after_a_window_do_not_change_its_cursor() -> None:
    units = make_units([5, 0, 0, 3])
    packer = ConcatPacker(5, ConcatPosition(0))
    packer.push(0, *units[0])
    packer.push(1, *units[1])
    packer.push(2, *units[2])
    assert packer.fill(np.empty(5, dtype=np.uint32)).to_json() == {
        "unit": 1, "offset": 0, "doc": 0}


@pytest.mark.parametrize("window_tokens", [1, 3, 5, 8, 21])
def test_cursors_do_not_depend_on_how_many_units_were_pushed(window_tokens: int) -> None:
    units = make_units([5, 0, 9, 1, 0, 12, 3, 8, 0])
    eager = drain(ConcatPacker(window_tokens, ConcatPosition(0)), units, 0, lazily=False)
    lazy = drain(ConcatPacker(window_tokens, ConcatPosition(0)), units, 0, lazily=True)
    assert [c for _, c in eager] == [c for _, c in lazy]
    assert [w.tolist() for w, _ in eager] == [w.tolist() for w, _ in lazy]


# -- resume ------------------------------------------------------------------------


@pytest.mark.parametrize("window_tokens", [1, 3, 5, 8, 21])
def test_resuming_from_any_cursor_reproduces_the_remaining_windows(window_tokens: int) -> None:
    units = make_units([5, 0, 9, 1, 0, 12, 3, 8, 0, 7])
    full = drain(ConcatPacker(window_tokens, ConcatPosition(0)), units, 0, lazily=False)
    for k, (_, cursor) in enumerate(full):
        start = ConcatPosition.parse(cursor)
        resumed = drain(ConcatPacker(window_tokens, start), units, start.unit, lazily=True)
        rest = full[k + 1 :]
        assert [w.tolist() for w, _ in resumed] == [w.tolist() for w, _ in rest], (
            f"resume after window {k} from {start}"
        )
        assert [c for _, c in resumed] == [c for _, c in rest]


def test_start_offset_drops_that_many_tokens_of_the_start_unit() -> None:
    units = make_units([4, 6, 5])
    packer = ConcatPacker(3, ConcatPosition(1, 2))
    packer.push(1, *units[1])
    packer.push(2, *units[2])
    assert packer.fill(np.empty(3, dtype=np.uint32)).to_json() == {
        "unit": 1, "offset": 5, "doc": 1}
    assert packer.buffered_tokens == 6


def test_start_offset_applies_to_the_start_unit_only() -> None:
    units = make_units([4, 6])
    packer = ConcatPacker(8, ConcatPosition(0, 2))
    packer.push(0, *units[0])
    packer.push(1, *units[1])
    out = np.empty(8, dtype=np.uint32)
    packer.fill(out)
    assert out.tolist() == list(range(2, 10))


def test_position_before_any_fill_is_the_start() -> None:
    packer = ConcatPacker(4, ConcatPosition(3, 7))
    assert packer.position.to_json() == {"unit": 3, "offset": 7, "doc": 0}
    assert packer.next_unit == 3


def test_positions_resume_alike_exactly_when_unit_and_offset_match() -> None:
    cursor = {"unit": 4, "offset": 2, "doc": 1, "epoch": 0, "row_group": 9}
    position = ConcatPosition.parse(cursor)
    assert position == ConcatPosition(4, 2)
    assert position == ConcatPosition(4, 2, doc=1)  # the document is status only
    assert position != ConcatPosition(4, 3)
    assert position != ConcatPosition(5, 2)
    assert hash(position) == hash(ConcatPosition(4, 2, doc=7))


@pytest.mark.parametrize(
    "start",
    [
        {"unit": 0},
        {"offset": 0},
        {"unit": -1, "offset": 0},
        {"unit": 0, "offset": -2},
        {"unit": "0", "offset": 0},
        {"unit": 0, "offset": 1.5},
    ],
)
def test_start_without_non_negative_integer_unit_and_offset_is_a_state_mismatch(
    start: dict[str, Any],
) -> None:
    with pytest.raises(StateMismatchError, match="'unit' and 'offset'"):
        ConcatPosition.parse(start)


# -- bookkeeping -------------------------------------------------------------------


def test_buffered_tokens_counts_pushed_tokens_not_yet_filled() -> None:
    units = make_units([3, 0, 4])
    packer = ConcatPacker(5, ConcatPosition(0))
    assert packer.buffered_tokens == 0
    packer.push(0, *units[0])
    assert packer.buffered_tokens == 3
    packer.push(1, *units[1])
    assert packer.buffered_tokens == 3
    packer.push(2, *units[2])
    assert packer.buffered_tokens == 7
    packer.fill(np.empty(5, dtype=np.uint32))
    assert packer.buffered_tokens == 2


def test_ready_only_once_a_whole_window_is_buffered() -> None:
    units = make_units([3, 1, 1])
    packer = ConcatPacker(5, ConcatPosition(0))
    assert not packer.ready()
    packer.push(0, *units[0])
    packer.push(1, *units[1])
    assert not packer.ready()  # 4 of 5
    packer.push(2, *units[2])
    assert packer.ready()  # exactly 5
    packer.fill(np.empty(5, dtype=np.uint32))
    assert not packer.ready()


def test_next_unit_advances_with_each_push_including_empty_ones() -> None:
    units = make_units([2, 0, 2])
    packer = ConcatPacker(10, ConcatPosition(0))
    for u, unit in enumerate(units):
        packer.push(u, *unit)
    assert packer.next_unit == 3
