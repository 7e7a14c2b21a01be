"""The CUDA path: ring registered as pinned memory, one async copy per batch, event release.

Skipped without a GPU; the CPU tests hold the same batches to the same oracle.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_batch_equals

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cuda_batches_match_oracle_with_widening_on_device(start_daemon, oracle):
    daemon = start_daemon(workers=2)
    b, t, n = 4, 256, 30
    want = oracle(batch_size=b, seq_len=t, n=n)
    with daemon.feed(b, t, device="cuda:0") as feed:
        for k in range(n):
            x, y = next(feed)
            assert x.device.type == "cuda" and y.device.type == "cuda"
            assert_batch_equals((x, y), want[k], f"batch {k}")


def test_cuda_tensors_are_never_overwritten_by_later_copies(start_daemon, oracle):
    daemon = start_daemon(workers=2, slots=2)
    b, t, n = 2, 128, 40
    want = oracle(batch_size=b, seq_len=t, n=n)
    with daemon.feed(b, t, device="cuda:0", prefetch=1) as feed:
        kept = [next(feed) for _ in range(n)]
        torch.cuda.synchronize()
    for k, batch in enumerate(kept):
        assert_batch_equals(batch, want[k], f"kept batch {k}")


def test_cuda_batches_are_usable_on_the_callers_stream(start_daemon, oracle):
    daemon = start_daemon(workers=2)
    b, t, n = 2, 128, 10
    want = oracle(batch_size=b, seq_len=t, n=n)
    side = torch.cuda.Stream()
    with daemon.feed(b, t, device="cuda:0") as feed, torch.cuda.stream(side):
        sums = [(x.long() + y).sum() for x, y in (next(feed) for _ in range(n))]
    torch.cuda.synchronize()
    for k in range(n):
        w = torch.from_numpy(want[k])
        assert sums[k].item() == int(w[:-1].sum() + w[1:].sum())


def test_bestfit_rows_on_cuda_match_cpu(start_daemon):
    daemon = start_daemon(workers=2)
    with daemon.feed(2, 64, device="cuda:0", packing="bestfit") as gpu, \
            daemon.feed(2, 64, device="cpu", packing="bestfit", rank=0) as cpu:
        for _ in range(10):
            (gx, gy), (cx, cy) = next(gpu), next(cpu)
            assert torch.equal(gx.cpu(), cx) and torch.equal(gy.cpu(), cy)


def test_index_less_cuda_device_resolves_and_delivers_on_that_device(start_daemon, oracle):
    daemon = start_daemon(workers=1)
    b, t, n = 2, 64, 5
    want = oracle(batch_size=b, seq_len=t, n=n)
    with daemon.feed(b, t, device="cuda") as feed:  # the design document's own example
        assert feed.device.index is not None
        for k in range(n):
            x, y = next(feed)
            assert x.device == feed.device
            assert_batch_equals((x, y), want[k], f"batch {k}")
