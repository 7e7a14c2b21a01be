"""Multi-GPU details on a real GPU (skipped without one; tests/test_topology.py holds
the same logic on CPU): the unpinned fallback delivers the oracle's batches with one
warning; under NCCL, gather_states and a DCP save/load of TokenFeedStateful run on the
feed's device in a rank that never called torch.cuda.set_device."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import assert_batch_equals

from tokenfeed.consumer import transfer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_an_unpinnable_ring_falls_back_to_pageable_copies_with_one_warning(
        start_daemon, oracle, monkeypatch, caplog):
    monkeypatch.setattr(transfer, "memlock_shortfall", lambda size: "a test's memlock limit")
    monkeypatch.setattr(transfer, "_warned", type(transfer._warned)())
    daemon = start_daemon(workers=1)
    want = oracle(batch_size=2, seq_len=128, n=12)
    state = None
    with caplog.at_level(logging.WARNING, logger=transfer.__name__):
        for first in (0, 6):  # two feeds, two rings: still one warning
            with daemon.feed(2, 128, device="cuda:0") as feed:
                if state is not None:
                    feed.load_state_dict(state)
                for k in range(first, first + 6):
                    assert_batch_equals(next(feed), want[k], f"batch {k}")
                state = feed.state_dict()
    warnings = [r.getMessage() for r in caplog.records if "not pinned" in r.getMessage()]
    assert len(warnings) == 1 and "a test's memlock limit" in warnings[0]


NCCL_RANK = textwrap.dedent("""
    import sys, torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
    from tokenfeed.consumer import TokenFeed, gather_states
    from tokenfeed.integrations import TokenFeedStateful
    run_dir, store, ckpt = sys.argv[1:4]
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=0, world_size=1)
    feed = TokenFeed(2, 64, run_dir=run_dir, device="cuda")   # LOCAL_RANK=0, no set_device
    assert feed.device == torch.device("cuda", 0), feed.device
    next(feed)
    assert gather_states(feed) == [feed.state_dict()]
    dcp.save({"dataloader": TokenFeedStateful(feed)}, checkpoint_id=ckpt)
    fresh = TokenFeed(2, 64, run_dir=run_dir, device="cuda")
    dcp.load({"dataloader": TokenFeedStateful(fresh)}, checkpoint_id=ckpt)
    x, _ = next(fresh)
    y, _ = next(feed)
    assert torch.equal(x, y)
    feed.close(); fresh.close()
    dist.destroy_process_group()
    print("ok")
""")


def test_gather_states_and_dcp_under_nccl_run_on_the_feeds_device(start_daemon, tmp_path):
    daemon = start_daemon(workers=1)
    env = {**os.environ, "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", NCCL_RANK, str(daemon.run_dir), str(tmp_path / "store"),
         str(tmp_path / "ckpt")], capture_output=True, text=True, timeout=180, env=env)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr
