"""Shared-memory ring layout: one segment per stream, `slot_count` slots of tokens.

Layout (little-endian, offsets in bytes):

    0                       header (HEADER, 64 bytes)
    64                      slot table: slot_count x SLOT_META (seq, n_tokens)
    data_offset             slot 0 tokens, then slot 1 at data_offset + slot_stride, ...

`data_offset` and `slot_stride` are multiples of 4096 so every slot starts on a
page: `cudaHostRegister` pins whole pages and DMA engines like aligned sources.

A slot's `seq` is a seqlock: the daemon sets it to WRITING_SEQ, writes the tokens,
then writes the batch's `seq` (monotonic per stream, from 0) and sends
`ready(slot, seq)`. The consumer checks the seq before its copy and again once the
copy has completed (on CUDA: its event), before handing the batch out: any other
value means the slot was rewritten under it, which happens only to a consumer the
daemon dropped, so it discards the copy and raises `DetachedError`.
A ring the consumer cannot open (another /dev/shm, or another uid: segments are
0600) is a `NotSharedError` that says which.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np

from tokenfeed.common.errors import NotSharedError, ProtocolError
from tokenfeed.common.shm import SHM_DIR, Segment

MAGIC = b"TOKFEED1"
LAYOUT_VERSION = 1
PAGE_BYTES = 4096
EMPTY_SEQ = 2**64 - 1  # seq value of a slot that was never written
WRITING_SEQ = 2**64 - 2  # seq value while the daemon rewrites a slot (a seqlock)

# magic(8s) | layout_version(I) | itemsize(I) | slot_count(I) | pad(I)
# | slot_tokens(Q) | data_offset(Q) | slot_stride(Q) | reserved(16x)
HEADER = struct.Struct("<8sIIIIQQQ16x")
# seq(Q): batch sequence number written last | n_tokens(Q): tokens valid in the slot
SLOT_META = struct.Struct("<QQ")
assert HEADER.size == 64


def token_dtype(n_vocab: int) -> np.dtype:
    """uint16 when every token id fits (GPT-2's 50257), else uint32 (cl100k's 100277)."""
    return np.dtype(np.uint16) if n_vocab <= 2**16 else np.dtype(np.uint32)


def token_dtype_of_size(itemsize: int) -> np.dtype:
    """The token dtype stored with `itemsize` bytes (2: uint16, 4: uint32)."""
    return np.dtype({2: np.uint16, 4: np.uint32}[itemsize])


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class RingLayout:
    slot_count: int
    slot_tokens: int
    itemsize: int

    @property
    def dtype(self) -> np.dtype:
        return token_dtype_of_size(self.itemsize)

    @property
    def data_offset(self) -> int:
        return _round_up(HEADER.size + self.slot_count * SLOT_META.size, PAGE_BYTES)

    @property
    def slot_stride(self) -> int:
        return _round_up(self.slot_tokens * self.itemsize, PAGE_BYTES)

    @property
    def size_bytes(self) -> int:
        return self.data_offset + self.slot_count * self.slot_stride


def _attach_shared(name: str) -> Segment:
    """Map a ring the daemon created; say what this process does not share with it, if so."""
    path = SHM_DIR / name
    try:
        return Segment.attach(name)
    except FileNotFoundError:
        raise NotSharedError(
            f"the daemon's ring {path} does not exist in this process's {SHM_DIR}: the trainer "
            f"does not share {SHM_DIR} with the daemon (another container or IPC namespace). "
            "Run both with one /dev/shm (docker run --ipc=host, Kubernetes hostIPC or a "
            "hostPath /dev/shm): see deploy/"
        ) from None
    except PermissionError:
        try:
            owner = f"uid {os.stat(path).st_uid}"
        except OSError:
            owner = "another user"
        raise NotSharedError(
            f"the daemon's ring {path} belongs to {owner} (mode 0600) and this process runs as "
            f"uid {os.geteuid()}: the trainer does not share the daemon's uid. Run the daemon "
            "as the training job's user (one daemon per user and node): see deploy/"
        ) from None


class Ring:
    """Typed views over a ring segment; the daemon writes, consumers read."""

    def __init__(self, segment: Segment, layout: RingLayout) -> None:
        self.segment = segment
        self.layout = layout
        buf = segment.mm
        self._meta = np.frombuffer(
            buf, dtype=np.uint64, count=2 * layout.slot_count, offset=HEADER.size
        ).reshape(layout.slot_count, 2)
        self.slots = np.ndarray(
            (layout.slot_count, layout.slot_tokens),
            dtype=layout.dtype,
            buffer=buf,
            offset=layout.data_offset,
            strides=(layout.slot_stride, layout.itemsize),
        )

    @classmethod
    def create(cls, name: str, layout: RingLayout) -> Ring:
        segment = Segment.create(name, layout.size_bytes)
        HEADER.pack_into(
            segment.mm, 0, MAGIC, LAYOUT_VERSION, layout.itemsize, layout.slot_count, 0,
            layout.slot_tokens, layout.data_offset, layout.slot_stride,
        )
        ring = cls(segment, layout)
        ring._meta[:, 0] = EMPTY_SEQ
        return ring

    @classmethod
    def attach(cls, name: str) -> Ring:
        segment = _attach_shared(name)
        try:
            if segment.size < HEADER.size:
                raise ProtocolError(f"segment {name} ({segment.size} bytes) is not a ring")
            magic, version, itemsize, slot_count, _, slot_tokens, data_offset, stride = (
                HEADER.unpack_from(segment.mm, 0)
            )
            if magic != MAGIC or version != LAYOUT_VERSION:
                raise ProtocolError(
                    f"segment {name} has magic {magic!r} layout v{version}; this client reads "
                    f"{MAGIC!r} v{LAYOUT_VERSION}: upgrade the daemon and the client together"
                )
            if itemsize not in (2, 4):
                raise ProtocolError(f"segment {name} has token size {itemsize}, not 2 or 4")
            layout = RingLayout(slot_count=slot_count, slot_tokens=slot_tokens, itemsize=itemsize)
            if (layout.data_offset, layout.slot_stride) != (data_offset, stride) or (
                layout.size_bytes > segment.size
            ):
                raise ProtocolError(f"segment {name} has an inconsistent header")
        except BaseException:
            segment.close()
            raise
        return cls(segment, layout)

    def invalidate(self, slot: int) -> None:
        """Mark slot as being rewritten; call before its first token changes."""
        self._meta[slot, 0] = WRITING_SEQ

    def publish(self, slot: int, seq: int, n_tokens: int) -> None:
        """Mark slot as holding batch `seq`; call after its tokens are written."""
        self._meta[slot, 1] = n_tokens
        self._meta[slot, 0] = seq

    def seq_of(self, slot: int) -> int:
        return int(self._meta[slot, 0])

    def slot_address(self, slot: int) -> int:
        """Absolute address of a slot's first token (for pinning and raw copies)."""
        return int(self.slots[slot].ctypes.data)

    def close(self) -> None:
        del self._meta, self.slots
        self.segment.close()
