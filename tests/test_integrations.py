"""tokenfeed.integrations in one process: TokenFeedDataset under torch's DataLoader and
torchdata's StatefulDataLoader, TokenFeedStateful through torch.distributed.checkpoint,
compared with the oracle. The multi-rank DCP runs (save at 2 ranks, load at 2, 3 and
1) are in tests/test_dcp.py."""

from __future__ import annotations

import pytest
import torch.distributed.checkpoint as dcp
from conftest import assert_batch_equals
from torch.utils.data import DataLoader

from tokenfeed.common.errors import ConfigError, StateMismatchError
from tokenfeed.integrations import TokenFeedDataset, TokenFeedStateful
from tokenfeed.integrations.dcp import KEY

B, T = 2, 64


def test_dataloader_yields_the_oracles_batches(start_daemon, oracle):
    daemon = start_daemon(workers=1)
    want = oracle(batch_size=B, seq_len=T, n=5)
    ds = TokenFeedDataset(B, T, run_dir=daemon.run_dir, device="cpu")
    try:
        it = iter(DataLoader(ds, batch_size=None))
        for i, window in enumerate(want):
            assert_batch_equals(tuple(next(it)), window, f"batch {i}")
        # a second pass over the DataLoader continues the stream, it does not restart it
        assert_batch_equals(tuple(next(iter(DataLoader(ds, batch_size=None)))),
                            oracle(batch_size=B, seq_len=T, n=6)[5])
    finally:
        ds.close()


def test_stateful_dataloader_resumes_exactly_from_its_own_state_dict(start_daemon, oracle):
    from torchdata.stateful_dataloader import StatefulDataLoader

    daemon = start_daemon(workers=1)
    want = oracle(batch_size=B, seq_len=T, n=7)
    first = TokenFeedDataset(B, T, run_dir=daemon.run_dir, device="cpu")
    second = TokenFeedDataset(B, T, run_dir=daemon.run_dir, device="cpu")
    try:
        loader = StatefulDataLoader(first, batch_size=None)
        it = iter(loader)
        for i in range(3):
            assert_batch_equals(tuple(next(it)), want[i], f"batch {i}")
        saved = loader.state_dict()
        assert_batch_equals(tuple(next(it)), want[3])  # read on past the save
        resumed = StatefulDataLoader(second, batch_size=None)
        resumed.load_state_dict(saved)
        resumed_it = iter(resumed)
        for i in range(3, 7):
            assert_batch_equals(tuple(next(resumed_it)), want[i], f"resumed batch {i}")
        # the same loader, reloaded after it read: a fresh feed at the state
        loader.load_state_dict(saved)
        assert_batch_equals(tuple(next(iter(loader))), want[3], "reloaded")
    finally:
        first.close()
        second.close()


@pytest.mark.slow
def test_dataloader_workers_are_refused_naming_the_fix(start_daemon):
    daemon = start_daemon(workers=1)
    ds = TokenFeedDataset(B, T, run_dir=daemon.run_dir, device="cpu")
    try:
        with pytest.raises(ConfigError, match=r"num_workers=0"):  # raised in the worker
            next(iter(DataLoader(ds, batch_size=None, num_workers=1)))
    finally:
        ds.close()


def test_dcp_round_trip_on_one_rank_continues_exactly(start_daemon, oracle, tmp_path):
    daemon = start_daemon(workers=1)
    want = oracle(batch_size=B, seq_len=T, n=6)
    with daemon.feed(B, T) as feed:
        for i in range(4):
            assert_batch_equals(next(feed), want[i])
        dcp.save({"dataloader": TokenFeedStateful(feed)}, checkpoint_id=tmp_path / "ckpt")
    with daemon.feed(B, T) as fresh:
        dcp.load({"dataloader": TokenFeedStateful(fresh)}, checkpoint_id=tmp_path / "ckpt")
        for i in range(4, 6):
            assert_batch_equals(next(fresh), want[i], f"resumed batch {i}")


def test_a_checkpoint_entry_that_is_not_a_job_state_is_refused(start_daemon):
    daemon = start_daemon(workers=1)
    with daemon.feed(B, T) as feed:
        stateful = TokenFeedStateful(feed)
        assert list(stateful.state_dict()) == [KEY]
        with pytest.raises(StateMismatchError, match="not saved from a TokenFeedStateful"):
            stateful.load_state_dict({"dp_rank_0": b"..."})
        with pytest.raises(StateMismatchError, match="not JSON"):
            stateful.load_state_dict({KEY: "{"})
