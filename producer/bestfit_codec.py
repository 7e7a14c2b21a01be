"""The best-fit position's compact buffer: its pieces as one short string, and back.

A best-fit position (position/) names the documents its buffer holds. A piece is
document `b - z` of unit `v` from token `s` on, where `b` is its born (the document's
index in the rank's document stream; a tail keeps its document's) and `z` the born of
document 0 of `v`; `s > 0` marks a tail (a BOS, then document tokens `s..`). The
buffer is one string, the integers

    P, V, K,                          # pieces, units holding them, tails
    n - b0, b1 - b0, ..., bP-1 - bP-2 # born of each piece: its age, then differences
    u - v0, n - z0, v1 - v0, z1 - z0, # units holding pieces, ascending, with z: back
      ...                             #   from (u, n), then differences
    i0, s0, i1, s1, ...               # the tails: index in the buffer, first token

(`(u, n)`: the position's read unit and documents read) as zigzag LEB128 varints in
unpadded URL-safe base64. A piece belongs to the last listed unit with `z <= b`.
Every listed unit holds a piece. The integers are ages and gaps, mostly under 128
(one byte each): after 1000 windows of 32 x 2049 with 1000 pieces, documents of
FineWeb-Edu's length mix, 1.4 KB of JSON in units of 1000 documents, 2.6 KB in units
of 16; the worst case, every piece a deep tail of its own unit, ~11 bytes a piece.
Encoding runs once per window in numpy (~50 us for 1000 pieces).

Failure behaviour: `decode` raises StateMismatchError, naming what is wrong, for any
string `encode` could not have written or whose pieces contradict the read position.
"""

from __future__ import annotations

import base64
from bisect import bisect_right
from itertools import pairwise
from typing import Any, NamedTuple

import numpy as np

from tokenfeed.common.config import MAX_POSITION
from tokenfeed.common.errors import StateMismatchError

_SEVEN = np.uint64(7)


class Piece(NamedTuple):
    """A buffered document: `doc` of the rank's unit `unit`, from token `start` on (a
    tail when > 0: its BOS, then tokens start..), read as the `born`-th document."""

    unit: int
    doc: int
    start: int
    born: int


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < MAX_POSITION


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and -MAX_POSITION < v < MAX_POSITION


def encode(refs: np.ndarray, unit: int, docs_read: int) -> str:
    """The compact buffer of the pieces `refs` ((unit, doc, start, born) rows, int64, in
    buffer order) of a position reading at `unit` with `docs_read` documents read."""
    rows = np.array(refs, dtype=np.int64).reshape(-1, 4)
    rows[:, 1] = rows[:, 3] - rows[:, 1]  # doc -> z, the born of the unit's document 0
    return encode_rows(rows, unit, docs_read)


def encode_rows(rows: np.ndarray, unit: int, docs_read: int, low: int | None = None) -> str:
    """`encode` of the pieces as rows (unit, z, start, born, ...), z = born - doc: the
    packer's reference table (bestfit_refs.py) as it stands (`low`: their least unit,
    when the caller has it)."""
    n = len(rows)
    if not n:
        return ""
    u, z, s, born = rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3]
    # The units holding pieces, ascending, and each one's z: a unit's pieces all share
    # it (documents are read in order), so any of them gives it, and a scatter over the
    # units from the least to the read unit replaces a sort (np.unique) of the pieces.
    # z >= 0, so -1 marks the units in the span that hold none.
    low = int(np.minimum.reduce(u)) if low is None else low
    z_of = np.full(max(unit, int(np.maximum.reduce(u))) - low + 1, -1, dtype=np.int64)
    z_of[u - low] = z
    held_at = np.flatnonzero(z_of >= 0)
    zs = z_of[held_at]
    tails = np.flatnonzero(s)
    v, k = len(held_at), 3 + n + 2 * len(held_at)
    out = np.empty(k + 2 * len(tails), dtype=np.int64)
    out[:4] = n, v, len(tails), docs_read - int(born[0])  # born: the first's age, then steps
    np.subtract(born[1:], born[:-1], out=out[4 : 3 + n])
    out[3 + n : 5 + n] = unit - low - int(held_at[0]), docs_read - int(zs[0])  # back from
    if v > 1:                                                               # (unit, docs_read)
        np.subtract(held_at[1:], held_at[:-1], out=out[5 + n : k : 2])
        np.subtract(zs[1:], zs[:-1], out=out[6 + n : k : 2])
    out[k::2] = tails
    out[k + 1 :: 2] = s[tails]
    return _varints_to_text(out)


def decode(text: str, unit: int, doc: int, docs_read: int, buffer_docs: int) -> tuple[Piece, ...]:
    """The pieces of a compact buffer, checked against the read position (unit, doc)."""
    values = _text_to_varints(text) if text else [0, 0, 0]
    n, n_units, n_tails = [*values, -1, -1, -1][:3]
    if (not 0 <= n <= buffer_docs or (n == 0) != (not text)
            or not 0 <= n_units <= n or not 0 <= n_tails <= n
            or len(values) != 3 + n + 2 * n_units + 2 * n_tails
            or (n > 0) != (n_units > 0) or not all(map(_is_int, values))):
        raise StateMismatchError(
            f"bestfit position's buffer must hold 1 to {buffer_docs} pieces (or be empty), as "
            f"many borns, a unit pair for at least one of them and a pair per tail; it reads "
            f"{len(values)} values, counts {values[:3]}"
        )
    ages = values[3 : 3 + n]
    unit_list = values[3 + n : 3 + n + 2 * n_units]
    tail_list = values[3 + n + 2 * n_units :]
    borns = [docs_read - ages[0]] if ages else []
    for delta in ages[1:]:
        borns.append(borns[-1] + delta)
    # Units: the first pair counts back from (unit, docs_read), the rest count forward.
    units: list[int] = []
    zs: list[int] = []
    for i in range(0, len(unit_list), 2):
        du, dz = unit_list[i], unit_list[i + 1]
        if i == 0:
            units.append(unit - du)
            zs.append(docs_read - dz)
        elif du < 1 or dz < 1:
            raise StateMismatchError(
                f"bestfit position's buffer units must ascend with the born of their first "
                f"document; got steps ({du}, {dz}) at pair {i // 2}"
            )
        else:
            units.append(units[-1] + du)
            zs.append(zs[-1] + dz)
    starts = dict(zip(tail_list[0::2], tail_list[1::2], strict=True))
    if (tail_list[0::2] != sorted(starts) or not all(0 <= i < len(borns) for i in starts)
            or not all(s >= 1 for s in starts.values())):
        raise StateMismatchError(
            f"bestfit position's buffer tails {tail_list} must be ascending piece indices "
            f"below {len(borns)}, each with a start token >= 1"
        )
    if not all(0 <= b < docs_read for b in borns) or not all(_is_count(v) for v in units + zs):
        raise StateMismatchError(
            f"bestfit position's buffer names borns or units outside [0, docs_read="
            f"{docs_read}) and [0, unit={unit}]"
        )
    pieces: list[Piece] = []
    held = set()
    for i, born in enumerate(borns):
        k = bisect_right(zs, born) - 1
        if k < 0:
            raise StateMismatchError(
                f"bestfit position's buffer piece {i} (born {born}) comes before the first "
                f"document of every listed unit"
            )
        held.add(k)
        pieces.append(Piece(units[k], born - zs[k], starts.get(i, 0), born))
    if len(held) != len(units):
        raise StateMismatchError(
            f"bestfit position's buffer lists {len(units)} units, of which only {len(held)} "
            f"hold a piece"
        )
    _check_order(pieces, unit, doc, docs_read)
    return tuple(pieces)


def _check_order(pieces: list[Piece], unit: int, doc: int, docs_read: int) -> None:
    """Pieces come before the read position, once each, born growing with (unit, doc)."""
    first_born: dict[int, int] = {unit: docs_read - doc}  # a unit's document 0: its born
    for i, p in enumerate(pieces):
        if (p.unit, p.doc) >= (unit, doc) or p.born >= docs_read:
            raise StateMismatchError(
                f"bestfit position's buffer piece {i} = {tuple(p)} is inconsistent: the "
                f"document must come before the next one to read ({unit}, {doc}) and born "
                f"before docs_read ({docs_read})"
            )
        if first_born.setdefault(p.unit, p.born - p.doc) != p.born - p.doc:
            raise StateMismatchError(
                f"bestfit position's buffer piece {i} = {tuple(p)} puts document 0 of unit "
                f"{p.unit} at born {p.born - p.doc}, not {first_born[p.unit]} as the read "
                f"position or another piece of that unit does: documents are read in order"
            )
    ordered = sorted((p.unit, p.doc, p.born) for p in pieces)
    for (u0, d0, b0), (u1, d1, b1) in pairwise(ordered):
        if (u0, d0) == (u1, d1) or b0 >= b1:
            raise StateMismatchError(
                f"bestfit position's buffer names documents ({u0}, {d0}) born {b0} and "
                f"({u1}, {d1}) born {b1}: each document may appear once, and born must grow "
                f"with (unit, doc)"
            )


def _varints_to_text(values: np.ndarray) -> str:
    """Zigzag LEB128 varints of int64 values, as unpadded URL-safe base64."""
    zz = ((values << 1) ^ (values >> 63)).view(np.uint64)
    big = np.flatnonzero(zz >> _SEVEN)
    flat = zz.astype(np.uint8).tobytes()  # each value's low byte: all of one under 128
    if len(big):
        # Values are ages and gaps, one byte each but for a few (~15 of ~1,000 a window,
        # nearly all of two bytes): those few are encoded in Python and spliced in.
        parts: list[bytes] = []
        at = 0
        for i, value in zip(big.tolist(), zz[big].tolist(), strict=True):
            if value < 0x4000:
                more = bytes((value & 0x7F | 0x80, value >> 7))
            else:
                grown = bytearray()
                while value >= 0x80:
                    grown.append(value & 0x7F | 0x80)
                    value >>= 7
                grown.append(value)
                more = bytes(grown)
            parts += (flat[at:i], more)
            at = i + 1
        parts.append(flat[at:])
        flat = b"".join(parts)
    return base64.urlsafe_b64encode(flat).rstrip(b"=").decode()


def _text_to_varints(text: str) -> list[int]:
    """The inverse of _varints_to_text; StateMismatchError unless `text` is its output."""
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError):
        data = None
    values: list[int] = []
    if data is not None:
        value = shift = 0
        for byte in data:
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                values.append((value >> 1) ^ -(value & 1))
                value = shift = 0
            elif shift > 63:
                break
    if data is None or _varints_to_text(np.array(values, dtype=np.int64)) != text:
        raise StateMismatchError(
            f"bestfit position's buffer {text[:40]!r}... is not the compact form this "
            "version writes (URL-safe base64 of zigzag varints); the state is damaged"
        )
    return values
