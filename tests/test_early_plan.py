"""Serving before every footer is read: a one-source daemon starts on its first files'
row groups while the rest of its footers arrive (dataset.scan_dataset's early plan).

Over S3 behind a proxy that holds the footers of every shard after the first
EARLY_SHARDS until the test lets them go, the daemon must serve a fresh stream in file
order the oracle's batches, hold a shuffled attach until the plan is whole (then serve
it the oracle's shuffled batches), give the first stream's state the fingerprint of the
whole data, and read on past the first files exactly. Orders, never times: the
benchmark (benchmarks/startup.py) measures those.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from conftest import BOS_ID, assert_batch_equals, wait_until
from oracle import reference_windows
from s3proxy import FaultProxy
from test_object_storage import s3, upload  # noqa: F401  (s3: the moto fixture)

from tokenfeed.common.errors import DaemonGoneError
from tokenfeed.producer.dataset import EARLY_SHARDS, Dataset, scan_dataset
from tokenfeed.producer.manifest import build_manifest, save_manifest
from tokenfeed.producer.reader import SourceReader
from tokenfeed.producer.storage import list_shards
from tokenfeed.tools.corpus import sample_documents, write_shards

B, T = 4, 128
SHARDS = EARLY_SHARDS + 6  # the last one is the val split


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("many")
    paragraphs = [p for d in sample_documents(120_000) for p in d.split("\n\n") if p.strip()]
    write_shards(paragraphs, out, num_files=SHARDS, rows_per_group=3)
    return out


def shard_index(path: str) -> int:
    """The shard's place in name order, from its object path (-1: not a shard)."""
    name = path.rsplit("/", 1)[-1]
    return int("".join(c for c in name if c.isdigit()) or -1) if name.endswith(".parquet") else -1


@pytest.fixture
def late_footers(s3: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:  # noqa: F811
    """Replies to reads of the shards after the first EARLY_SHARDS held until `held` is set."""
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"], held=threading.Event(),
                    hold=lambda method, path: method == "GET"
                    and shard_index(path) >= EARLY_SHARDS) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        yield proxy


def test_a_scan_hands_out_the_first_files_plan_early_and_it_begins_the_whole_one(many_shards):
    early: list[Dataset] = []
    whole = scan_dataset(many_shards, early=early.append)
    assert len(early) == 1 and whole.complete and whole.fingerprint
    first = early[0]
    assert not first.complete and first.fingerprint == ""
    assert len(first.splits["train"].files) == EARLY_SHARDS
    known = first.splits["train"].row_groups
    assert whole.splits["train"].row_groups[:len(known)] == known
    assert len(whole.splits["train"]) > len(known)

    # a manifest answers in one request: nothing is early
    save_manifest(build_manifest(many_shards, "text"), many_shards.parent / "m.json.gz")
    early.clear()
    assert scan_dataset(many_shards, manifest=many_shards.parent / "m.json.gz",
                        early=early.append).fingerprint == whole.fingerprint
    assert early == []


@pytest.mark.parametrize("rank,world_size", [(0, 1), (2, 3)])
def test_a_reader_of_the_early_plan_reads_a_unit_only_once_the_next_is_known(
        many_shards, rank, world_size):
    early: list[Dataset] = []
    whole = scan_dataset(many_shards, early=early.append)
    plan = early[0].splits["train"]
    reader = SourceReader(0, 0, plan, "text", rank=rank, world_size=world_size,
                          shuffle_seed=None)
    units = []
    while not reader.waits_for_plan:
        units.append(reader.next_task().unit)
    last = units[-1]  # its successor is known (a position there names its row group)...
    assert rank + (last + 1) * world_size < len(plan) <= rank + (last + 2) * world_size
    assert sorted(set(units)) == list(range(last + 1))  # ...and so is every unit before
    reader.on_whole_plan(whole.splits["train"])
    assert not reader.waits_for_plan
    task = reader.next_task()
    ref = whole.splits["train"].row_groups[rank + task.unit * world_size]
    assert task.unit == last + 1 and (task.path, task.row_group) == (ref.path, ref.row_group)


def test_a_fresh_stream_is_served_from_the_first_footers_and_others_wait_for_all(
        many_shards, encoding, s3, late_footers, start_daemon):  # noqa: F811
    url = upload(s3, many_shards, "early")
    assert [shard_index(s.path) for s in list_shards(many_shards)] == list(range(SHARDS))
    daemon = start_daemon(data=url)
    assert daemon.status()["plan_complete"] is False  # serving, the rest still held

    def oracle(n: int, **kwargs: Any) -> list[Any]:
        return reference_windows(many_shards, enc=encoding, bos_id=BOS_ID, batch_size=B,
                                 seq_len=T, num_batches=n, **kwargs)

    def tokens(files: list[Path]) -> int:
        return sum(len(encoding.encode_ordinary(t)) + 1
                   for p in files for t in pq.read_table(p)["text"].to_pylist())

    files = sorted(many_shards.glob("*.parquet"))
    first = 4  # batches within the first files (a unit is read once the next is known)
    assert first * B * T < tokens(files[:EARLY_SHARDS - 2])
    want = oracle(-(-tokens(files[:EARLY_SHARDS + 2]) // (B * T)))  # on past them
    feed = daemon.feed(B, T)
    for k in range(first):
        assert_batch_equals(next(feed), want[k], f"batch {k} before the whole plan")
    assert daemon.status()["plan_complete"] is False

    with ThreadPoolExecutor(2) as pool:
        state = pool.submit(feed.state_dict)  # its fingerprint covers every shard: waits
        shuffled = daemon.feed(B, T, shuffle_seed=3)  # a shuffle needs every row group
        first_shuffled = pool.submit(next, shuffled)
        wait_until(lambda: "waits for the rest of the footers" in daemon.log())
        assert not state.done() and not first_shuffled.done()
        late_footers.held.set()
        saved = state.result(timeout=60)
        got = first_shuffled.result(timeout=60)
    whole = scan_dataset(url)  # through the same proxy, now answering at once
    assert saved["fingerprint"] == whole.fingerprint
    assert_batch_equals(got, oracle(1, shuffle_seed=3)[0], "the held shuffled attach")
    shuffled.close()
    for k in range(first, len(want)):  # on through the rest of the plan
        assert_batch_equals(next(feed), want[k], f"batch {k}")
    feed.close()
    assert daemon.status()["plan_complete"] is True


def test_a_bad_shard_found_after_serving_stops_the_daemon_naming_it(
        many_shards, tmp_path, s3, late_footers, start_daemon):  # noqa: F811
    data = tmp_path / "bad"
    data.mkdir()
    files = sorted(many_shards.glob("*.parquet"))
    for p in files:
        (data / p.name).write_bytes(p.read_bytes())
    bad = files[EARLY_SHARDS + 2].name  # among the footers read after serving began
    pq.write_table(pq.read_table(files[0], columns=["text"]).rename_columns(["body"]), data / bad)
    daemon = start_daemon(data=upload(s3, data, "bad"))
    feed = daemon.feed(B, T)
    next(feed)  # served from the first files
    late_footers.held.set()
    with pytest.raises(DaemonGoneError, match=f"{bad}.*text"):
        for _ in range(10_000):
            next(feed)
    feed.close()
    assert daemon.proc.wait(timeout=60) != 0
    assert bad in daemon.log() and "Traceback" not in daemon.log() and daemon.segments() == []
