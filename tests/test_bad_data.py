"""Bad data after start: a row group whose pages are corrupt, and documents of 10 MB.

The corruption is written in place after the daemon started (file size, and so the
dataset fingerprint, unchanged), as a flaky disk or a half-synced copy would. With
`--on-error fail` the stream's consumers get an error naming the file and row group;
with `--on-error skip` the row group delivers nothing, which is exactly the oracle
over the same corpus with that row group's values null, and a resume stays exact.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import BOS_ID, assert_batch_equals
from oracle import reference_windows

from tokenfeed.common.errors import StreamFailedError
from tokenfeed.tools.corpus import sample_documents, write_shards

BAD_FILE, BAD_GROUP = "shard_00001.parquet", 1
B, T = 2, 128


def corrupt_row_group(path: Path, row_group: int) -> None:
    """Overwrite the first 64 bytes of the row group's text pages, keeping the file size."""
    column = pq.ParquetFile(path).metadata.row_group(row_group).column(0)
    offsets = [o for o in (column.dictionary_page_offset, column.data_page_offset) if o]
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(min(offsets))
        f.write(b"\xff" * 64)
    assert path.stat().st_size == size


def null_row_group(src: Path, dst: Path, row_group: int) -> None:
    """The same file with one row group's text values null (row groups kept as they are)."""
    pf = pq.ParquetFile(src)
    with pq.ParquetWriter(dst, pf.schema_arrow) as writer:
        for i in range(pf.num_row_groups):
            table = pf.read_row_group(i)
            if i == row_group:
                nulls = pa.nulls(table.num_rows, type=table.schema.field("text").type)
                table = table.set_column(table.schema.get_field_index("text"), "text", nulls)
            writer.write_table(table)


@pytest.fixture
def data(corpus: Path, tmp_path: Path) -> Path:
    out = tmp_path / "data"
    shutil.copytree(corpus, out)
    return out


@pytest.fixture
def skipped_oracle(corpus: Path, tmp_path: Path, encoding):
    ref = tmp_path / "reference"
    shutil.copytree(corpus, ref)
    null_row_group(corpus / BAD_FILE, ref / BAD_FILE, BAD_GROUP)
    return lambda n: reference_windows(ref, enc=encoding, bos_id=BOS_ID, batch_size=B,
                                       seq_len=T, num_batches=n)


def test_a_corrupt_row_group_fails_the_stream_naming_file_and_row_group(start_daemon, data):
    daemon = start_daemon(workers=2, data=data)
    corrupt_row_group(data / BAD_FILE, BAD_GROUP)
    with daemon.feed(B, T) as feed, pytest.raises(StreamFailedError) as failed:
        for _ in range(200):
            next(feed)
    assert f"{BAD_FILE} row group {BAD_GROUP}" in str(failed.value)
    assert "--on-error skip" in str(failed.value)
    assert daemon.status()["workers"]["alive"] == 2  # the daemon itself is fine


def test_on_error_skip_drops_the_row_group_and_resumes_exactly(start_daemon, data,
                                                               skipped_oracle):
    n, k = 120, 70  # ~65 batches an epoch: the resume meets the bad row group again
    want = skipped_oracle(n)
    daemon = start_daemon("--on-error", "skip", workers=2, data=data)
    corrupt_row_group(data / BAD_FILE, BAD_GROUP)
    with daemon.feed(B, T) as feed:
        for i in range(k):
            assert_batch_equals(next(feed), want[i], f"batch {i}")
        state = json.loads(json.dumps(feed.state_dict()))
    (stream,) = daemon.status()["streams"]
    assert stream["skipped_row_group_count"] >= 1
    assert stream["skipped_row_groups"][0].endswith(f"{BAD_FILE}#{BAD_GROUP}")
    assert daemon.stop() == 0
    again = start_daemon("--on-error", "skip", workers=3, data=data)
    with again.feed(B, T) as feed:
        feed.load_state_dict(state)
        for i in range(k, n):
            assert_batch_equals(next(feed), want[i], f"resumed batch {i}")


@pytest.mark.parametrize("huge_bytes", [  # 6 MB: its tokens already outgrow a 4 MiB staging buffer
    6_000_000, pytest.param(10_500_000, marks=pytest.mark.slow)])
def test_documents_of_ten_megabytes_go_through_exactly(start_daemon, tmp_path, encoding,
                                                       huge_bytes):
    docs = sample_documents(400_000)
    huge = "\n\n".join(docs) * (-(-huge_bytes // len("\n\n".join(docs))))
    data = tmp_path / "huge"
    write_shards([docs[0], huge, docs[1], docs[2]], data, num_files=2, rows_per_group=2)
    n = 40  # the huge document is >= 1.4M tokens: these batches are all inside it
    want = reference_windows(data, enc=encoding, bos_id=BOS_ID, batch_size=16, seq_len=2048,
                             num_batches=n)
    daemon = start_daemon(workers=2, data=data)
    with daemon.feed(16, 2048) as feed:
        for i in range(n):
            assert_batch_equals(next(feed), want[i], f"batch {i}")
