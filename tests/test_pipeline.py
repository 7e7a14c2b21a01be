"""The daemon delivers exactly the reference oracle's batches: real processes, shm, sockets."""

from __future__ import annotations

import pytest
from conftest import assert_batch_equals, drain_all_ranks, drain_round_robin


@pytest.mark.parametrize(("world_size", "workers"), [
    # each value of either axis once in the fast tier; the rest of the 3 x 3 grid is slow
    *[(w, n) if (w, n) in {(1, 1), (3, 2), (8, 3)} else pytest.param(w, n, marks=pytest.mark.slow)
      for w in (1, 3, 8) for n in (1, 2, 3)],
])
def test_all_ranks_concurrently_match_oracle(start_daemon, oracle, world_size, workers):
    daemon = start_daemon(workers=workers)
    b, t, n = 2, 64, 40
    got = drain_all_ranks(daemon, b, t, world_size, n)
    for r in range(world_size):
        want = oracle(rank=r, world_size=world_size, batch_size=b, seq_len=t, n=n)
        for k in range(n):
            assert_batch_equals(got[r][k], want[k], f"rank {r} batch {k}")


def test_stream_crossing_epoch_boundary_matches_oracle(start_daemon, oracle):
    daemon = start_daemon(workers=2)
    b, t = 4, 256
    n = 60  # ~61k tokens: the train split holds ~17k, so this runs through epochs 0 to 3
    want = oracle(batch_size=b, seq_len=t, n=n)
    with daemon.feed(b, t) as feed:
        epochs = []
        for k in range(n):
            assert_batch_equals(next(feed), want[k], f"batch {k}")
            epochs.append(feed.epoch)
    assert epochs[0] == 0 and epochs[-1] >= 1
    assert epochs == sorted(epochs)


def test_val_split_matches_oracle(start_daemon, oracle):
    daemon = start_daemon(workers=2)
    want = oracle(split="val", batch_size=2, seq_len=128, n=30)
    with daemon.feed(2, 128, split="val") as feed:
        for k in range(30):
            assert_batch_equals(next(feed), want[k], f"val batch {k}")




def test_returned_tensors_are_never_overwritten(start_daemon, oracle):
    daemon = start_daemon(workers=2, slots=2)
    b, t, n = 2, 64, 30
    want = oracle(batch_size=b, seq_len=t, n=n)
    with daemon.feed(b, t, prefetch=1) as feed:
        kept = [next(feed) for _ in range(n)]  # ring of 2 slots is rewritten many times
    for k, batch in enumerate(kept):
        assert_batch_equals(batch, want[k], f"kept batch {k}")


def test_consumers_sharing_a_stream_each_get_every_batch(start_daemon, oracle):
    daemon = start_daemon(workers=2)
    b, t, n = 2, 64, 25
    want = oracle(batch_size=b, seq_len=t, n=n)
    first, second = daemon.feed(b, t), daemon.feed(b, t)
    try:
        got = drain_round_robin([first, second], n)
    finally:
        first.close()
        second.close()
    for replica in got:
        for k in range(n):
            assert_batch_equals(replica[k], want[k], f"batch {k}")


def test_state_dict_is_position_after_last_returned_batch(start_daemon, oracle):
    daemon = start_daemon(workers=2)
    b, t, n = 2, 64, 30
    want = oracle(batch_size=b, seq_len=t, n=n)
    with daemon.feed(b, t, prefetch=4) as feed:
        for _ in range(12):
            next(feed)
        state = feed.state_dict()
    with daemon.feed(b, t) as resumed:
        resumed.load_state_dict(state)
        for k in range(12, n):
            assert_batch_equals(next(resumed), want[k], f"resumed batch {k}")


def test_tokenizer_directory_with_16_bit_vocabulary_matches_oracle(start_daemon, corpus, tmp_path,
                                                                   encoding):
    """A vocabulary that fits 16 bits gets a uint16 ring; tokens still come out exact."""
    import tiktoken
    from oracle import reference_windows

    from tokenfeed.producer.tokenizer import save_tokenizer_dir

    small = tiktoken.Encoding(
        name="cl100k_first_50k",
        pat_str=encoding._pat_str,
        mergeable_ranks={k: v for k, v in encoding._mergeable_ranks.items() if v < 50_000},
        special_tokens={"<|bos|>": 50_000},
    )
    save_tokenizer_dir(small, tmp_path / "tok", bos="<|bos|>")
    daemon = start_daemon("--tokenizer", str(tmp_path / "tok"), workers=2)
    b, t, n = 2, 128, 20
    want = reference_windows(corpus, enc=small, bos_id=50_000, batch_size=b, seq_len=t,
                             num_batches=n)
    with daemon.feed(b, t) as feed:
        for k in range(n):
            assert_batch_equals(next(feed), want[k], f"batch {k}")
        assert [s["token_bytes"] for s in daemon.status()["streams"]] == [2]
