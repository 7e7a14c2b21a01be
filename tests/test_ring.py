"""Ring layout and segments over real POSIX shared memory (common/ring.py, common/shm.py).

Every test uses its own daemon id, so the suite can run in parallel, and removes
its segments in a fixture's `finally`, so nothing is left in /dev/shm.
"""

from __future__ import annotations

import os
import stat
import uuid
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from tokenfeed.common.errors import ProtocolError
from tokenfeed.common.ring import (
    EMPTY_SEQ,
    HEADER,
    LAYOUT_VERSION,
    MAGIC,
    PAGE_BYTES,
    SLOT_META,
    Ring,
    RingLayout,
    token_dtype,
)
from tokenfeed.common.shm import SHM_DIR, Segment, segment_name, unlink_daemon_segments


@pytest.fixture
def daemon_id() -> Iterator[str]:
    """A daemon id no other test uses; its segments are removed at teardown."""
    did = f"test-{uuid.uuid4().hex}"
    try:
        yield did
    finally:
        unlink_daemon_segments(did)


@pytest.fixture
def make_ring(daemon_id: str) -> Iterator[Callable[..., Ring]]:
    """Create rings under this test's daemon id; close and unlink them at teardown."""
    rings: list[Ring] = []

    def make(
        what: str = "s0", *, slot_count: int = 3, slot_tokens: int = 1000, itemsize: int = 2
    ) -> Ring:
        layout = RingLayout(slot_count=slot_count, slot_tokens=slot_tokens, itemsize=itemsize)
        ring = Ring.create(segment_name(daemon_id, what), layout)
        rings.append(ring)
        return ring

    try:
        yield make
    finally:
        for ring in rings:
            ring.segment.unlink()
            ring.close()


# -- token_dtype ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_vocab", "dtype"),
    [(50257, np.uint16), (65536, np.uint16), (65537, np.uint32), (100277, np.uint32)],
)
def test_token_dtype_is_the_smallest_unsigned_type_holding_every_id(
    n_vocab: int, dtype: type
) -> None:
    assert token_dtype(n_vocab) == np.dtype(dtype)
    assert n_vocab - 1 <= np.iinfo(token_dtype(n_vocab)).max


# -- layout ----------------------------------------------------------------------


@pytest.mark.parametrize("slot_count", [1, 4, 255, 256, 300])
@pytest.mark.parametrize(("slot_tokens", "itemsize"), [(1, 2), (2048, 2), (8 * 1024 + 1, 4)])
def test_layout_offsets_are_page_aligned(slot_count: int, slot_tokens: int, itemsize: int) -> None:
    layout = RingLayout(slot_count=slot_count, slot_tokens=slot_tokens, itemsize=itemsize)
    assert layout.data_offset % PAGE_BYTES == 0
    assert layout.slot_stride % PAGE_BYTES == 0
    assert layout.data_offset >= HEADER.size + slot_count * SLOT_META.size
    assert layout.data_offset < HEADER.size + slot_count * SLOT_META.size + PAGE_BYTES
    assert layout.slot_stride >= slot_tokens * itemsize
    assert layout.slot_stride < slot_tokens * itemsize + PAGE_BYTES


def test_layout_size_is_data_offset_plus_one_stride_per_slot() -> None:
    # 64 + 300*16 = 4864 -> 8192; 1025 tokens * 4 bytes = 4100 -> 8192 per slot.
    layout = RingLayout(slot_count=300, slot_tokens=1025, itemsize=4)
    assert (layout.data_offset, layout.slot_stride) == (8192, 8192)
    assert layout.size_bytes == 8192 + 300 * 8192


def test_layout_dtype_follows_itemsize() -> None:
    assert RingLayout(slot_count=1, slot_tokens=1, itemsize=2).dtype == np.dtype(np.uint16)
    assert RingLayout(slot_count=1, slot_tokens=1, itemsize=4).dtype == np.dtype(np.uint32)


# -- create / attach -------------------------------------------------------------


def test_created_ring_segment_has_the_layout_size(make_ring: Callable[..., Ring]) -> None:
    ring = make_ring(slot_count=5, slot_tokens=3000, itemsize=4)
    assert ring.segment.size == ring.layout.size_bytes
    assert os.stat(ring.segment.path).st_size == ring.layout.size_bytes


def test_fresh_ring_slots_read_empty_seq(make_ring: Callable[..., Ring]) -> None:
    ring = make_ring(slot_count=4)
    assert [ring.seq_of(slot) for slot in range(4)] == [EMPTY_SEQ] * 4


def test_attached_ring_reads_empty_seq_in_fresh_slots(make_ring: Callable[..., Ring]) -> None:
    ring = make_ring(slot_count=4)
    other = Ring.attach(ring.segment.name)
    try:
        assert [other.seq_of(slot) for slot in range(4)] == [EMPTY_SEQ] * 4
    finally:
        other.close()


def test_attached_ring_has_the_creators_layout(make_ring: Callable[..., Ring]) -> None:
    ring = make_ring(slot_count=6, slot_tokens=5000, itemsize=4)
    other = Ring.attach(ring.segment.name)
    try:
        assert other.layout == ring.layout
        assert other.segment.owner is False
    finally:
        other.close()


@pytest.mark.parametrize("itemsize", [2, 4])
def test_attached_ring_sees_published_tokens_and_seq(
    make_ring: Callable[..., Ring], itemsize: int
) -> None:
    ring = make_ring(slot_count=3, slot_tokens=1000, itemsize=itemsize)
    high = np.iinfo(ring.layout.dtype).max
    tokens = np.arange(high - 699, high + 1, dtype=ring.layout.dtype)  # ids up to the max
    ring.slots[1, :700] = tokens
    ring.publish(1, seq=41, n_tokens=700)

    other = Ring.attach(ring.segment.name)
    try:
        np.testing.assert_array_equal(other.slots[1, :700], tokens)
        assert other.seq_of(1) == 41
        assert other.seq_of(0) == EMPTY_SEQ
        assert other.seq_of(2) == EMPTY_SEQ
    finally:
        other.close()


def test_creator_sees_tokens_and_seq_published_through_an_attached_mapping(
    make_ring: Callable[..., Ring],
) -> None:
    ring = make_ring(slot_count=2, slot_tokens=10)
    other = Ring.attach(ring.segment.name)
    try:
        other.slots[0, :3] = [7, 8, 9]
        other.publish(0, seq=0, n_tokens=3)
    finally:
        other.close()
    assert ring.slots[0, :3].tolist() == [7, 8, 9]
    assert ring.seq_of(0) == 0


def test_slot_addresses_are_page_aligned_and_one_stride_apart(
    make_ring: Callable[..., Ring],
) -> None:
    ring = make_ring(slot_count=3, slot_tokens=3000)
    addresses = [ring.slot_address(slot) for slot in range(3)]
    assert all(a % PAGE_BYTES == 0 for a in addresses)
    assert addresses[1] - addresses[0] == ring.layout.slot_stride
    assert addresses[2] - addresses[1] == ring.layout.slot_stride


def test_attach_rejects_a_segment_with_wrong_magic(daemon_id: str) -> None:
    name = segment_name(daemon_id, "alien")
    segment = Segment.create(name, PAGE_BYTES)  # zero-filled: magic reads b"\0" * 8
    try:
        with pytest.raises(ProtocolError, match="upgrade the daemon and the client together"):
            Ring.attach(name)
    finally:
        segment.unlink()
        segment.close()


def test_attach_rejects_a_header_whose_offsets_disagree_with_its_layout(
    make_ring: Callable[..., Ring],
) -> None:
    ring = make_ring(slot_count=2, slot_tokens=10)
    # Same magic and version, but a slot_stride no layout of this shape would have.
    fields = list(HEADER.unpack_from(ring.segment.mm, 0))
    fields[7] = ring.layout.slot_stride + PAGE_BYTES
    HEADER.pack_into(ring.segment.mm, 0, *fields)
    with pytest.raises(ProtocolError, match="inconsistent header"):
        Ring.attach(ring.segment.name)


def test_attach_rejects_a_segment_shorter_than_the_header(daemon_id: str) -> None:
    name = segment_name(daemon_id, "short")
    segment = Segment.create(name, HEADER.size // 4)
    try:
        with pytest.raises(ProtocolError):
            Ring.attach(name)
    finally:
        segment.unlink()
        segment.close()


def test_attach_rejects_a_segment_smaller_than_its_header_layout(daemon_id: str) -> None:
    name = segment_name(daemon_id, "small")
    layout = RingLayout(slot_count=4, slot_tokens=100, itemsize=2)  # needs 5 pages
    segment = Segment.create(name, PAGE_BYTES)
    try:
        HEADER.pack_into(
            segment.mm,
            0,
            MAGIC,
            LAYOUT_VERSION,
            layout.itemsize,
            layout.slot_count,
            0,
            layout.slot_tokens,
            layout.data_offset,
            layout.slot_stride,
        )
        with pytest.raises(ProtocolError):
            Ring.attach(name)
    finally:
        segment.unlink()
        segment.close()


# -- segments --------------------------------------------------------------------


def test_segment_file_is_private_to_its_user(daemon_id: str) -> None:
    segment = Segment.create(segment_name(daemon_id, "mode"), 4096)
    try:
        st = os.stat(SHM_DIR / segment.name)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == os.getuid()
    finally:
        segment.unlink()
        segment.close()


def test_segment_create_of_an_existing_name_raises_file_exists(daemon_id: str) -> None:
    name = segment_name(daemon_id, "twice")
    segment = Segment.create(name, 4096)
    try:
        with pytest.raises(FileExistsError):
            Segment.create(name, 4096)
        assert (SHM_DIR / name).exists()  # the failed create did not remove the first one
    finally:
        segment.unlink()
        segment.close()


def test_segment_attach_of_a_missing_name_raises_file_not_found(daemon_id: str) -> None:
    with pytest.raises(FileNotFoundError):
        Segment.attach(segment_name(daemon_id, "missing"))


def test_segment_unlink_twice_is_harmless(daemon_id: str) -> None:
    segment = Segment.create(segment_name(daemon_id, "gone"), 4096)
    segment.unlink()
    segment.unlink()
    segment.close()
    assert not segment.path.exists()


def test_unlink_daemon_segments_removes_only_that_daemons_segments(daemon_id: str) -> None:
    other_id = f"test-{uuid.uuid4().hex}"
    mine = [Segment.create(segment_name(daemon_id, what), 4096) for what in ("s0", "w1-0")]
    theirs = Segment.create(segment_name(other_id, "s0"), 4096)
    try:
        for segment in [*mine, theirs]:
            segment.close()
        removed = unlink_daemon_segments(daemon_id)
        assert sorted(removed) == sorted(s.name for s in mine)
        assert not any(s.path.exists() for s in mine)
        assert theirs.path.exists()
    finally:
        theirs.unlink()


def test_unlink_daemon_segments_of_an_unknown_id_removes_nothing(daemon_id: str) -> None:
    assert unlink_daemon_segments(daemon_id) == []
