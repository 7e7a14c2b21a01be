"""Elastic resume: a job saved by W ranks continues on W' ranks, compared with the oracle
(rule 8) bit for bit; over the epoch every token is delivered once across old and new
ranks; a resumed elastic job checkpoints and resumes again; bad job states are refused."""

from __future__ import annotations

import collections
import json
import random

import numpy as np
import pytest
from conftest import BOS_ID, ENCODING
from oracle import (
    Positions,
    bestfit_windows,
    elastic_documents,
    elastic_items,
    mix_documents,
    old_mixture_items,
    old_rank_items,
    row_group_sequence,
    split_files,
)
from test_mixture import WEIGHTS

from tokenfeed.common.errors import StateMismatchError

B, T = 2, 64  # small windows: the split (~17k tokens) spans many, epochs come fast
BESTFIT = {"packing": "bestfit", "buffer_docs": 8}  # max age 64 documents


def window_of(batch, packing: str) -> np.ndarray:
    x, y = (t.numpy() for t in batch)
    if packing == "concat":
        return np.concatenate([x.ravel(), y[-1:, -1]])
    return np.concatenate([x, y[:, -1:]], axis=1).ravel()


def run_old_job(daemon, world: int, k: int, **kw) -> tuple[list[dict], list[np.ndarray]]:
    states, windows = [], []
    for rank in range(world):
        with daemon.feed(B, T, rank=rank, world_size=world, **kw) as feed:
            for _ in range(k):
                windows.append(window_of(next(feed), kw.get("packing", "concat")))
            states.append(json.loads(json.dumps(feed.state_dict())))
    return states, windows


def expected(pos: Positions, old_world: int, k: int, new_world: int, packing: str,
             n: int) -> list[list[np.ndarray]]:
    """Each new rank's first n windows, by the oracle."""
    extra = {"buffer_docs": 8, "max_age_docs": 64} if packing == "bestfit" else {}
    old = [old_rank_items(pos, rank=r, world_size=old_world, packing=packing, batch_size=B,
                          seq_len=T, delivered=k, **extra) for r in range(old_world)]
    out = []
    for r in range(new_world):
        items, stride_from = elastic_items(pos, [o[0] for o in old], [o[1] for o in old],
                                           r, new_world)
        docs = elastic_documents(pos, items, r, new_world, stride_from)
        if packing == "concat":
            flat: list[int] = []
            while len(flat) < n * (B * T + 1):
                flat.extend(next(docs))
            out.append([np.array(flat[i * (B * T + 1):(i + 1) * (B * T + 1)])
                        for i in range(n)])
        else:
            out.append(bestfit_windows(docs, bos_id=BOS_ID, batch_size=B, seq_len=T,
                                       num_batches=n, buffer_docs=8, min_tail=32,
                                       max_age_docs=64)[0])
    return out


@pytest.fixture(scope="module")
def positions(corpus):
    import tiktoken

    enc = tiktoken.get_encoding(ENCODING)
    return {seed: Positions(corpus, enc=enc, bos_id=BOS_ID, shuffle_seed=seed)
            for seed in (None, 3)}


@pytest.mark.parametrize("old_world, new_world, packing, seed", [
    pytest.param(4, 3, "concat", None, marks=pytest.mark.slow), (4, 3, "concat", 3),
    pytest.param(2, 5, "concat", None, marks=pytest.mark.slow),
    pytest.param(4, 3, "bestfit", None, marks=pytest.mark.slow), (2, 5, "bestfit", 3),
])
@pytest.mark.slow
def test_elastic_resume_matches_the_oracle(start_daemon, positions, corpus, encoding, old_world,
                                           new_world, packing, seed):
    k, n = 10, 12
    kw = {**(BESTFIT if packing == "bestfit" else {}), "shuffle_seed": seed}
    states, old_windows = run_old_job(start_daemon(workers=2), old_world, k, **kw)
    random.Random(0).shuffle(states)  # any order
    want = expected(positions[seed], old_world, k, new_world, packing, n)
    last_epoch = max(s["cursor"]["epoch"] for s in states)  # E*: an old rank may be in 1
    fresh = start_daemon(workers=2)
    delivered = collections.Counter(t for w in old_windows for t in w.tolist())
    for rank in range(new_world):
        with fresh.feed(B, T, rank=rank, world_size=new_world, **kw) as feed:
            feed.load_state_dict(states)
            for i in range(n):
                window = window_of(next(feed), packing)
                np.testing.assert_array_equal(window, want[rank][i],
                                              err_msg=f"new rank {rank} batch {i}")
                cursor = feed.state_dict()["cursor"]
                if packing == "concat" and cursor["epoch"] > last_epoch:  # past E*: its part
                    delivered.update(window[:len(window) - cursor["offset"]].tolist())
                    break
                delivered.update(window.tolist())
            else:
                if packing == "concat":  # on to the end of epoch E*: every token once
                    drain_epoch(feed, delivered, last_epoch)
    if packing == "concat":
        one = epoch_tokens(corpus, encoding)
        assert delivered == collections.Counter({t: c * (last_epoch + 1) for t, c in one.items()})


def epoch_tokens(corpus, encoding) -> collections.Counter:
    tokens: collections.Counter = collections.Counter()
    for path, index in row_group_sequence(split_files(corpus, "train")):
        from oracle import read_texts

        for text in read_texts(path, index)[0]:
            tokens.update([BOS_ID, *encoding.encode_ordinary(text)])
    return tokens


def drain_epoch(feed, delivered: collections.Counter, epoch: int) -> None:
    """Count this rank's tokens up to the end of `epoch` (concat: the batch crossing it
    holds `offset` tokens of the next epoch's first unit)."""
    while True:
        window = window_of(next(feed), "concat")
        cursor = feed.state_dict()["cursor"]
        if cursor["epoch"] > epoch:
            delivered.update(window[:len(window) - cursor["offset"]].tolist())
            return
        delivered.update(window.tolist())


def test_every_token_of_the_epoch_once_through_two_elastic_resumes(start_daemon, corpus,
                                                                   encoding):
    """4 ranks -> 3 ranks -> (checkpoint, same world) 3 ranks -> 2 ranks, to the end of
    epoch 0: the tokens of all rank-runs are exactly the train split's, each once."""
    delivered: collections.Counter = collections.Counter()
    daemon = start_daemon(workers=2)
    states, windows = run_old_job(daemon, 4, 8)
    for w in windows:
        delivered.update(w.tolist())
    for step, (world, k) in enumerate([(3, 6), (3, 5)]):
        saved = []
        for rank in range(world):
            with daemon.feed(B, T, rank=rank, world_size=world) as feed:
                feed.load_state_dict(states)
                for _ in range(k):
                    w = window_of(next(feed), "concat")
                    delivered.update(w.tolist())
                saved.append(feed.state_dict())
                assert "elastic" in saved[-1]["cursor"], f"step {step}: rank {rank}"
        states = saved
    for rank in range(2):
        with daemon.feed(B, T, rank=rank, world_size=2) as feed:
            feed.load_state_dict(states)
            drain_epoch(feed, delivered, 0)
    assert delivered == epoch_tokens(corpus, encoding)


def test_same_world_size_through_the_job_list_is_bit_identical(start_daemon, oracle):
    daemon = start_daemon(workers=2)
    states, _ = run_old_job(daemon, 3, 7)
    for rank in range(3):
        want = oracle(rank=rank, world_size=3, batch_size=B, seq_len=T, n=12)
        with daemon.feed(B, T, rank=rank, world_size=3) as feed:
            feed.load_state_dict(list(reversed(states)))
            for i in range(7, 12):
                np.testing.assert_array_equal(window_of(next(feed), "concat"), want[i])


def test_bad_job_states_are_refused_naming_the_problem(start_daemon, tmp_path):
    daemon = start_daemon(workers=1)
    states, _ = run_old_job(daemon, 2, 2)
    other, _ = run_old_job(daemon, 2, 2, shuffle_seed=9)
    with daemon.feed(B, T, rank=0, world_size=3) as feed:
        with pytest.raises(StateMismatchError, match="entry 0 of the job state is rank 1"):
            feed.load_state_dict(states[1:])  # incomplete
        with pytest.raises(StateMismatchError, match=r"another stream.*shuffle_seed"):
            feed.load_state_dict([states[0], other[1]])  # two jobs
        forged = [{**s, "fingerprint": "0123456789abcdef"} for s in states]
        feed.load_state_dict(forged)  # other data: the daemon refuses it at attach
        with pytest.raises(StateMismatchError, match="data differs"):
            next(feed)


@pytest.mark.parametrize("packing", ["concat", pytest.param("bestfit", marks=pytest.mark.slow)])
def test_elastic_resume_of_a_mixture_matches_the_oracle(start_daemon, sources,
                                                        packing):
    """3 ranks mixing two sources -> 2 ranks: each source divided on its own."""
    import tiktoken

    enc = tiktoken.get_encoding(ENCODING)
    dirs = sources
    pos = {n: Positions(p, enc=enc, bos_id=BOS_ID) for n, p in dirs.items()}
    kw = {**(BESTFIT if packing == "bestfit" else {}), "mix": WEIGHTS}
    extra = {"buffer_docs": 8, "max_age_docs": 64} if packing == "bestfit" else {}
    k, n, old_world, new_world = 6, 10, 3, 2
    daemon = start_daemon(sources=dirs)
    states, _ = run_old_job(daemon, old_world, k, **kw)
    old = [old_mixture_items(pos, WEIGHTS, rank=r, world_size=old_world, packing=packing,
                             batch_size=B, seq_len=T, delivered=k, **extra)
           for r in range(old_world)]
    kinds: set[int] = set()
    for rank in range(new_world):
        streams = {}
        for name in pos:
            items, stride_from = elastic_items(pos[name], [o[0][name] for o in old],
                                               [o[1][name] for o in old], rank, new_world)
            streams[name] = elastic_documents(pos[name], items, rank, new_world, stride_from)
        docs = (doc for _, doc in mix_documents(streams, [(0, WEIGHTS)]))
        if packing == "concat":
            flat: list[int] = []
            while len(flat) < n * (B * T + 1):
                flat.extend(next(docs))
            want = [np.array(flat[i * (B * T + 1):(i + 1) * (B * T + 1)]) for i in range(n)]
        else:
            want = bestfit_windows(docs, bos_id=BOS_ID, batch_size=B, seq_len=T, num_batches=n,
                                   buffer_docs=8, min_tail=32, max_age_docs=64)[0]
        with daemon.feed(B, T, rank=rank, world_size=new_world, **kw) as feed:
            feed.load_state_dict(states)
            for i in range(n):
                np.testing.assert_array_equal(window_of(next(feed), packing), want[i],
                                              err_msg=f"new rank {rank} batch {i}")
            layouts = feed.state_dict()["cursor"]["mix"]["layouts"]
            assert set(layouts) == {"code", "web"}
            kinds.update(run[0] for layout in layouts.values() for run in layout["items"])
    assert kinds - {0}, "no partial row group was divided: the test checks too little"
