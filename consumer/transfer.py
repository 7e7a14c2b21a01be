"""Slot -> (inputs, targets) tensors on the device, never aliasing the ring.

CPU: one pass copies the slot into two tensors (int32 inputs, int64 targets); the
slot can be released as soon as `copy` returns. The tensors come from a small pool
and are reused only once nothing else holds them or a view of them (Python
references and the storage's use count both back to the pool's own), so a batch the
caller still holds is never overwritten, and memory does not creep: fresh 0.75 MB
tensors per batch let glibc's growing mmap threshold move them into the heap, where
the trainer's RSS grew 1-7 MiB over 200 batches (`benchmarks/latency.py`).

CUDA: the whole ring is registered as pinned memory (`cudaHostRegister`), so one
`non_blocking` copy per batch moves the raw slot to a fresh device buffer on a
side stream; widening to int32/int64 happens on the GPU on that stream. An event
recorded after the last kernel tells when the slot's bytes are no longer needed;
the caller's stream waits on that event before it touches the tensors.
Registration pins the ring's pages, which the kernel counts against the memlock limit
(`ulimit -l`; containers often default to 64 KiB or 8 MiB). A limit below the ring's
size (unless the process may lock memory without limit, as root can), or a refused
registration, falls back to a plain copy from the unpinned ring, which returns once
the bytes left it (one warning per process; raise the limit to get the one-copy path).

Layouts: `concat` slots hold B*T+1 tokens (inputs = w[:-1], targets = w[1:]);
`bestfit` slots hold B rows of T+1 tokens (inputs = row[:-1], targets = row[1:]).
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import threading
from typing import Any

import numpy as np
import torch

from tokenfeed.common.ring import Ring

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]


POOL_PAIRS = 8  # (inputs, targets) pairs kept for reuse; more in use: fresh ones


# torch's own count of a storage's users (views, numpy arrays, autograd's saved tensors);
# without it nothing is reused.
_storage_use_count: Any = getattr(torch._C, "_storage_Use_Count", None)


def _uses(t: torch.Tensor) -> tuple[int, int]:
    """(Python references, storage users) of a tensor, as seen from inside this call."""
    return sys.getrefcount(t), int(_storage_use_count(t.untyped_storage()._cdata))


class BatchPool:
    """Output tensors reused once the caller let go of them (and of every view)."""

    def __init__(self, batch_size: int, seq_len: int) -> None:
        self.shape = (batch_size, seq_len)
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.idle: tuple[int, int] | None = None
        if _storage_use_count is not None:  # calibrate: what an unused pooled tensor shows
            probe = [(torch.empty(1), torch.empty(1))]
            self.idle = self._counts(probe[0])[0]

    @staticmethod
    def _counts(pair: tuple[torch.Tensor, torch.Tensor]) -> list[tuple[int, int]]:
        return [_uses(t) for t in pair]

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.idle is not None:
            for i, pair in enumerate(self.pairs):
                if all(c == self.idle for c in self._counts(pair)):
                    self.pairs.append(self.pairs.pop(i))  # most recently used last
                    return pair[0], pair[1]  # a new tuple: whoever holds it is counted
        pair = (torch.empty(self.shape, dtype=torch.int32),
                torch.empty(self.shape, dtype=torch.int64))
        if self.idle is not None and len(self.pairs) < POOL_PAIRS:
            self.pairs.append(pair)
        return pair[0], pair[1]


class CpuTransfer:
    def __init__(self, ring: Ring, batch_size: int, seq_len: int, packing: str) -> None:
        self.ring, self.B, self.T, self.packing = ring, batch_size, seq_len, packing
        self.pool = BatchPool(batch_size, seq_len)

    def copy(self, slot: int) -> tuple[Batch, Any]:
        src = self.ring.slots[slot]
        x, y = self.pool.take()
        if self.packing == "bestfit":
            rows = src.reshape(self.B, self.T + 1)
            np.copyto(x.numpy(), rows[:, :-1], casting="unsafe")
            np.copyto(y.numpy(), rows[:, 1:], casting="unsafe")
        else:
            np.copyto(x.numpy().reshape(-1), src[:-1], casting="unsafe")
            np.copyto(y.numpy().reshape(-1), src[1:], casting="unsafe")
        return (x, y), None

    @staticmethod
    def done(token: Any) -> bool:
        return True

    def bind_thread(self) -> None:
        pass

    def close(self) -> None:
        pass


_warned = threading.Event()  # the pinning fallback warns once per process


def memlock_shortfall(size_bytes: int, limits: tuple[int, int] | None = None,
                      euid: int | None = None) -> str | None:
    """Why the memlock limit forbids pinning `size_bytes` (None: it allows it)."""
    soft, _ = limits if limits is not None else resource.getrlimit(resource.RLIMIT_MEMLOCK)
    root = (os.geteuid() if euid is None else euid) == 0  # CAP_IPC_LOCK: no limit applies
    if soft == resource.RLIM_INFINITY or root or soft >= size_bytes:
        return None
    return (f"the memlock limit (ulimit -l) is {soft >> 10} KiB, below the "
            f"{-(-size_bytes >> 20)} MiB ring")


def warn_unpinned(reason: str) -> None:
    if _warned.is_set():
        return
    _warned.set()
    log.warning(
        "tokenfeed: the ring is not pinned (%s); batches are copied to the GPU from pageable "
        "memory (slower, the copy blocks the link thread). Raise the training process's "
        "memlock limit (`ulimit -l unlimited`, LimitMEMLOCK=infinity in systemd, "
        "--ulimit memlock=-1 in docker) to get the one-copy path", reason)


class CudaTransfer:
    def __init__(
        self, ring: Ring, batch_size: int, seq_len: int, packing: str, device: torch.device
    ) -> None:
        self.ring, self.B, self.T, self.packing, self.device = (
            ring, batch_size, seq_len, packing, device
        )
        self.unsigned16 = ring.layout.itemsize == 2
        self._base = int(np.frombuffer(ring.segment.mm, dtype=np.uint8).ctypes.data)
        self._size = ring.segment.size
        self._registered = False
        # Register and create the stream on the feed's device, not the caller's current one
        # (else every rank opens a context on GPU 0).
        with torch.cuda.device(device):
            shortfall = memlock_shortfall(self._size)
            if shortfall is None:
                err = int(torch.cuda.cudart().cudaHostRegister(self._base, self._size, 0))
                self._registered = err == 0
                if err != 0:
                    shortfall = f"cudaHostRegister refused it with cudaError {err}"
            if shortfall is not None:
                warn_unpinned(shortfall)
            try:
                signed = np.int16 if self.unsigned16 else np.int32  # same bits as the ring
                self.host = torch.from_numpy(ring.slots.view(signed))
                self.stream = torch.cuda.Stream(device)
            except BaseException:
                self.close()
                raise

    def copy(self, slot: int) -> tuple[Batch, torch.cuda.Event]:
        with torch.cuda.stream(self.stream):
            raw = torch.empty(self.host.shape[1], dtype=self.host.dtype, device=self.device)
            # Unpinned: a blocking copy, so the slot is no longer read when it returns.
            raw.copy_(self.host[slot], non_blocking=self._registered)
            wide = raw.to(torch.int64)
            if self.unsigned16:
                wide &= 0xFFFF
            if self.packing == "bestfit":
                rows = wide.view(self.B, self.T + 1)
                x, y = rows[:, :-1].to(torch.int32), rows[:, 1:].contiguous()
            else:
                x, y = wide[:-1].view(self.B, self.T).to(torch.int32), wide[1:].view(self.B, self.T)
            event = torch.cuda.Event()
            event.record(self.stream)
        return (x, y), event

    @staticmethod
    def done(event: torch.cuda.Event) -> bool:
        return bool(event.query())

    def bind_thread(self) -> None:
        """Make the feed's device current in the link thread, which issues the copies."""
        torch.cuda.set_device(self.device)

    def close(self) -> None:
        """Wait for copies in flight, then unpin; idempotent."""
        if hasattr(self, "stream"):
            self.stream.synchronize()
        if hasattr(self, "host"):
            del self.host
        if not self._registered:
            return
        with torch.cuda.device(self.device):
            torch.cuda.cudart().cudaHostUnregister(self._base)
        self._registered = False


def make_transfer(
    ring: Ring, batch_size: int, seq_len: int, packing: str, device: torch.device
) -> CpuTransfer | CudaTransfer:
    if device.type == "cuda":
        return CudaTransfer(ring, batch_size, seq_len, packing, device)
    return CpuTransfer(ring, batch_size, seq_len, packing)
