"""A fixed validation set: `TokenFeed(split="val", max_batches=N)` yields the same N
batches every round on each rank, the ranks' batches never overlap, rounds after the
first tokenize nothing, and validation never changes the train stream."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from conftest import BOS_ID, assert_batch_equals
from oracle import reference_bestfit_windows, reference_windows

from tokenfeed.common.config import StreamSpec, round_batches
from tokenfeed.common.errors import ConfigError, StateMismatchError
from tokenfeed.tools.corpus import sample_documents, write_shards

B, T = 2, 64
WORLD = 2
VAL_BATCHES = 20
TRAIN_STEPS = 5  # train batches before, between and after the val rounds
ROUNDS = 3


@pytest.fixture(scope="module")
def val_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 files x 4 row groups; the last 2 files are the val split (~10k tokens: two ranks'
    20 batches of 129 tokens fit in its first epoch, so no document repeats in a round)."""
    out = tmp_path_factory.mktemp("valcorpus")
    docs = sample_documents(240_000)
    write_shards(docs, out, num_files=6, rows_per_group=-(-len(docs) // 24))
    return out


def digest(batch: tuple[Any, Any]) -> str:
    x, y = batch
    return hashlib.sha1(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()


def val_stream(daemon: Any, rank: int) -> dict[str, Any]:
    """The rank's newest val stream (the last round's goes at the daemon's next beat)."""
    streams = [s for s in daemon.status()["streams"]
               if s["split"] == "val" and s["rank"] == rank]
    return max(streams, key=lambda s: s["stream"])


@pytest.mark.parametrize("store", ["memory", "cache-dir"])
def test_val_rounds_repeat_exactly_and_leave_train_unchanged(
        start_daemon: Any, val_corpus: Path, encoding: Any, tmp_path: Path, store: str) -> None:
    args = ["--val-files", "2"]
    if store == "cache-dir":
        args += ["--cache-dir", str(tmp_path / "cache")]
    daemon = start_daemon(*args, data=val_corpus)
    ref = {(split, r): reference_windows(
        val_corpus, enc=encoding, bos_id=BOS_ID, split=split, rank=r, world_size=WORLD,
        batch_size=B, seq_len=T, val_files=2,
        num_batches=VAL_BATCHES if split == "val" else TRAIN_STEPS * (ROUNDS + 1))
        for split in ("train", "val") for r in range(WORLD)}
    train = [daemon.feed(B, T, rank=r, world_size=WORLD) for r in range(WORLD)]
    val = [daemon.feed(B, T, rank=r, world_size=WORLD, split="val", max_batches=VAL_BATCHES)
           for r in range(WORLD)]
    train_got: list[list[Any]] = [[] for _ in range(WORLD)]
    rounds: list[list[list[str]]] = []
    kept: tuple[int, int] | None = None
    try:
        for round_no in range(ROUNDS + 1):
            for r in range(WORLD):
                train_got[r] += [next(train[r]) for _ in range(TRAIN_STEPS)]
            if round_no == ROUNDS:
                break
            got: list[list[str]] = []
            for r in range(WORLD):
                it = iter(val[r])  # a new round, as an eval loop's `for` starts one
                batches = [next(it) for _ in range(VAL_BATCHES)]
                for i, batch in enumerate(batches):
                    assert_batch_equals(batch, ref[("val", r)][i],
                                        f"round {round_no} rank {r} val batch {i}")
                stream = val_stream(daemon, r)  # read before the round ends: then it goes
                assert stream["batches"] == VAL_BATCHES
                assert stream["tasks_inflight"] == 0
                if round_no == 0:
                    assert stream["tasks_done"] > 0
                else:  # every row group from the store or cache: no worker task at all
                    assert stream["tasks_done"] == 0, stream
                    assert stream["units_cached"] == stream["units_done"] > 0, stream
                with pytest.raises(StopIteration):
                    next(it)
                with pytest.raises(StopIteration):  # stays ended until the next iter()
                    next(it)
                got.append([digest(b) for b in batches])
            rounds.append(got)
            if store == "memory":
                vs = daemon.status()["val_store"]
                assert vs["refused"] == 0 and vs["row_groups"] > 0
                if kept is not None:  # after round 1: nothing new tokenized, nothing new kept
                    assert (vs["writes"], vs["misses"]) == kept, vs
                kept = (vs["writes"], vs["misses"])
            else:
                assert daemon.status()["val_store"] is None
    finally:
        for f in train + val:
            f.close()
    assert rounds[0] == rounds[1] == rounds[2]
    assert len({d for ranks in rounds[0] for d in ranks}) == WORLD * VAL_BATCHES, \
        "a val batch is shared between ranks (or repeats within a rank)"
    for r in range(WORLD):  # train is exactly a run without validation
        assert len(train_got[r]) == TRAIN_STEPS * (ROUNDS + 1)
        for i, batch in enumerate(train_got[r]):
            assert_batch_equals(batch, ref[("train", r)][i], f"rank {r} train batch {i}")


def test_val_round_abandoned_part_way_starts_over(start_daemon: Any, val_corpus: Path,
                                                  encoding: Any) -> None:
    daemon = start_daemon("--val-files", "2", data=val_corpus)
    ref = reference_windows(val_corpus, enc=encoding, bos_id=BOS_ID, split="val",
                            batch_size=B, seq_len=T, val_files=2, num_batches=4)
    with daemon.feed(B, T, split="val", max_batches=4) as feed:
        for _, _ in zip(feed, range(2), strict=False):  # a loop that breaks after 2
            pass
        got = list(feed)  # the next `for`: the whole round, from its first batch
        assert len(got) == 4
        for i, batch in enumerate(got):
            assert_batch_equals(batch, ref[i], f"batch {i}")
        assert list(feed.take(10)) == []  # ended: take() stops with the round
        it = iter(feed)  # a round's iterator, iterated again, continues that round
        first = next(it)
        rest = list(it)
        assert len(rest) == 3
        for i, batch in enumerate([first, *rest]):
            assert_batch_equals(batch, ref[i], f"continued round, batch {i}")
        with pytest.raises(StateMismatchError, match="max_batches"):
            feed.load_state_dict(feed.state_dict())


def test_a_dataloader_over_a_val_set_is_one_round_per_pass(start_daemon: Any,
                                                            val_corpus: Path,
                                                            encoding: Any) -> None:
    """torchtitan's validator iterates its val DataLoader once per evaluation."""
    from torch.utils.data import DataLoader

    from tokenfeed.integrations import TokenFeedDataset

    daemon = start_daemon("--val-files", "2", data=val_corpus)
    ref = reference_windows(val_corpus, enc=encoding, bos_id=BOS_ID, split="val",
                            batch_size=B, seq_len=T, val_files=2, num_batches=5)
    ds = TokenFeedDataset(B, T, split="val", max_batches=5, run_dir=daemon.run_dir,
                          device="cpu")
    try:
        loader = DataLoader(ds, batch_size=None)
        for round_no in range(2):
            got = list(loader)
            assert len(got) == 5
            for i, batch in enumerate(got):
                assert_batch_equals(tuple(batch), ref[i], f"pass {round_no} batch {i}")
    finally:
        ds.close()


def test_bestfit_val_rounds_repeat_and_tokenize_once(start_daemon: Any, val_corpus: Path,
                                                     encoding: Any) -> None:
    """Best fit reads a buffer of documents ahead; a bounded stream still reads the same
    units every round (here past the val split's first epoch: its buffer is 64 documents)."""
    daemon = start_daemon("--val-files", "2", data=val_corpus)
    ref = reference_bestfit_windows(
        val_corpus, enc=encoding, bos_id=BOS_ID, split="val", batch_size=B, seq_len=T,
        num_batches=8, buffer_docs=64, min_tail=32, max_age_docs=8 * 64, val_files=2)
    with daemon.feed(B, T, split="val", packing="bestfit", buffer_docs=64,
                     max_batches=8) as feed:
        for round_no in range(2):
            it = iter(feed)
            got = [next(it) for _ in range(8)]
            for i, (x, y) in enumerate(got):
                rows = ref[i].reshape(B, T + 1)
                assert (x.numpy() == rows[:, :-1]).all() and (y.numpy() == rows[:, 1:]).all(), \
                    f"round {round_no} batch {i}"
            stream = val_stream(daemon, 0)
            assert stream["tasks_done"] > 0 if round_no == 0 else stream["tasks_done"] == 0
            with pytest.raises(StopIteration):
                next(it)


def test_val_of_one_source_of_a_mixture(start_daemon: Any, val_corpus: Path, corpus: Path,
                                        encoding: Any) -> None:
    daemon = start_daemon("--val-files", "2", sources={"code": val_corpus, "web": corpus})
    ref = reference_windows(val_corpus, enc=encoding, bos_id=BOS_ID, split="val",
                            batch_size=B, seq_len=T, val_files=2, num_batches=6)
    with daemon.feed(B, T, split="val", source="code", max_batches=6) as feed:
        for round_no in range(2):
            got = list(feed)
            assert len(got) == 6
            for i, batch in enumerate(got):
                assert_batch_equals(batch, ref[i], f"round {round_no} batch {i}")
        with pytest.raises(ConfigError, match="not both"):
            daemon.feed(B, T, split="val", source="code", mix={"code": 1.0})
    with daemon.feed(B, T, split="val", max_batches=6) as feed:  # the whole mixture
        rounds = []
        for round_no in range(2):
            it = iter(feed)
            rounds.append([digest(next(it)) for _ in range(6)])
            if round_no:
                assert val_stream(daemon, 0)["tasks_done"] == 0
            with pytest.raises(StopIteration):
                next(it)
        assert rounds[0] == rounds[1]


def test_max_batches_and_tokens_are_checked() -> None:
    with pytest.raises(ConfigError, match="split='val'"):
        StreamSpec(batch_size=B, seq_len=T, max_batches=3)
    with pytest.raises(ConfigError, match="max_batches=0"):
        StreamSpec(split="val", batch_size=B, seq_len=T, max_batches=0)
    assert "max_batches" not in StreamSpec(batch_size=B, seq_len=T).to_dict()  # old states
    spec = StreamSpec(split="val", batch_size=B, seq_len=T, max_batches=3)
    assert StreamSpec.from_dict(spec.to_dict()) == spec
    # tokens= is the whole round on all ranks, as nanochat's eval_tokens
    assert round_batches(20 * B * T * WORLD + 5, None, B, T, WORLD) == 20
    with pytest.raises(ConfigError, match="less than one batch"):
        round_batches(B * T, None, B, T, WORLD)
    with pytest.raises(ConfigError, match="not both"):
        round_batches(1000, 3, B, T, WORLD)
