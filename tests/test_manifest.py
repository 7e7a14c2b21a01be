"""The manifest (producer/manifest.py): the same plan as the footers, learned with one read.

Whatever way a daemon learns the shards (every footer, `tokenfeed index`'s manifest, one
next to the data, its own copy in --cache-dir), the plan and the fingerprint a saved
state is checked against are the same; a shard changed since the manifest was written
is read again, so a state saved before the change is still refused.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import assert_batch_equals
from test_dataset import write_corpus, write_shard

from tokenfeed.common.errors import ConfigError, DataError
from tokenfeed.producer import manifest as manifest_module
from tokenfeed.producer.cli import main
from tokenfeed.producer.config import DaemonConfig, SourceConfig
from tokenfeed.producer.dataset import Dataset, changed_shards, scan_dataset
from tokenfeed.producer.manifest import (
    MANIFEST_NAME,
    build_manifest,
    cached_manifest_path,
    load_manifest,
    save_manifest,
)


def plan_of(d: Dataset) -> tuple[object, ...]:
    return (d.fingerprint, d.names, d.splits["train"], d.splits["val"])


@pytest.fixture
def footer_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The shard names whose footers are read (a spy: reads still happen)."""
    seen: list[str] = []
    real = manifest_module.read_footer

    def spy(shard: manifest_module.Shard, text_column: str) -> manifest_module.ShardEntry:
        seen.append(shard.name)
        return real(shard, text_column)

    monkeypatch.setattr(manifest_module, "read_footer", spy)
    return seen


def test_a_manifest_gives_the_plan_the_footers_give(tmp_path: Path, footer_reads: list[str]):
    root = write_corpus(tmp_path / "data", {f"s{i:02d}.parquet": 1 + i % 3 for i in range(12)})
    from_footers = scan_dataset(root)
    out = tmp_path / "elsewhere" / "m.json.gz"
    assert main(["index", str(root), "--out", str(out)]) == 0
    footer_reads.clear()
    from_manifest = scan_dataset(root, manifest=out)
    assert footer_reads == []
    assert plan_of(from_manifest) == plan_of(from_footers)


def test_a_manifest_next_to_the_data_is_used_without_being_named(
        tmp_path: Path, footer_reads: list[str]):
    root = write_corpus(tmp_path / "data", {"a.parquet": 2, "b.parquet": 1, "c.parquet": 3})
    assert main(["index", str(root)]) == 0
    assert (root / MANIFEST_NAME).is_file()
    footer_reads.clear()
    assert plan_of(scan_dataset(root)) == plan_of(scan_dataset(root, manifest=root / MANIFEST_NAME))
    assert footer_reads == []


def test_a_shard_changed_since_the_manifest_is_read_again_and_refuses_old_states(
        tmp_path: Path, footer_reads: list[str]):
    root = write_corpus(tmp_path / "data",
                        {"a.parquet": 2, "b.parquet": 1, "c.parquet": 3, "d.parquet": 1})
    before = scan_dataset(root)
    save_manifest(build_manifest(root, "text"), tmp_path / "m.json.gz")
    write_shard(root / "b.parquet", 4)  # more row groups: another size and mtime
    stat = (root / "b.parquet").stat()
    os.utime(root / "b.parquet", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    footer_reads.clear()
    after = scan_dataset(root, manifest=tmp_path / "m.json.gz")
    assert footer_reads == ["b.parquet"]
    assert plan_of(after) == plan_of(scan_dataset(root))
    assert len(after.splits["train"]) == len(before.splits["train"]) + 3
    assert "b.parquet" in (changed_shards(before.fingerprint, after) or [])


def test_a_new_shard_missing_from_the_manifest_is_read(tmp_path: Path, footer_reads: list[str]):
    root = write_corpus(tmp_path / "data", {"a.parquet": 2, "c.parquet": 1})
    save_manifest(build_manifest(root, "text"), root / MANIFEST_NAME)
    write_shard(root / "b.parquet", 2)
    footer_reads.clear()
    with_manifest = scan_dataset(root)
    assert footer_reads == ["b.parquet"]
    (root / MANIFEST_NAME).unlink()
    assert plan_of(with_manifest) == plan_of(scan_dataset(root))


def test_the_daemon_keeps_the_manifest_in_its_cache_dir_for_its_restarts(
        tmp_path: Path, footer_reads: list[str]):
    root = write_corpus(tmp_path / "data", {f"s{i}.parquet": 2 for i in range(6)})
    cache = tmp_path / "cache"
    first = scan_dataset(root, cache_dir=cache)
    assert sorted(footer_reads) == sorted(first.names)
    assert cached_manifest_path(cache, root, "text").is_file()
    footer_reads.clear()
    again = scan_dataset(root, cache_dir=cache)
    assert footer_reads == []
    assert plan_of(again) == plan_of(first)


def test_a_manifest_of_another_text_column_is_refused_naming_the_fix(tmp_path: Path):
    root = write_corpus(tmp_path / "data", {"a.parquet": 1})
    save_manifest(build_manifest(root, "text"), tmp_path / "m.json.gz")
    with pytest.raises(DataError, match=r"built for text column 'text'.*--text-column body"):
        scan_dataset(root, text_column="body", manifest=tmp_path / "m.json.gz")


def test_a_missing_or_damaged_manifest_is_a_clear_error(tmp_path: Path):
    root = write_corpus(tmp_path / "data", {"a.parquet": 1})
    with pytest.raises(DataError, match=r"does not exist; build it with `tokenfeed index"):
        scan_dataset(root, manifest=tmp_path / "nope.json.gz")
    (tmp_path / "bad.json.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match=r"bad\.json\.gz is not a tokenfeed manifest.*rebuild"):
        scan_dataset(root, manifest=tmp_path / "bad.json.gz")


def test_a_damaged_manifest_next_to_the_data_is_ignored(tmp_path: Path):
    root = write_corpus(tmp_path / "data", {"a.parquet": 1, "b.parquet": 2})
    want = plan_of(scan_dataset(root))
    (root / MANIFEST_NAME).write_bytes(b"\x1f\x8b damaged")
    assert plan_of(scan_dataset(root)) == want


def test_the_manifest_is_small_and_the_same_bytes_for_the_same_shards(tmp_path: Path):
    root = write_corpus(tmp_path / "data", {f"s{i:03d}.parquet": 4 for i in range(200)})
    m = build_manifest(root, "text")
    data = m.to_bytes()
    assert data == build_manifest(root, "text").to_bytes()
    assert load_manifest_roundtrip(tmp_path, m) == m
    assert len(data) < 200 * 100  # < 100 bytes a shard of 4 row groups, gzip'd


def load_manifest_roundtrip(tmp_path: Path, m: manifest_module.Manifest
                            ) -> manifest_module.Manifest:
    save_manifest(m, tmp_path / "r.json.gz")
    return load_manifest(tmp_path / "r.json.gz")


def test_the_first_bad_shard_by_name_is_reported_whatever_order_reads_finish(tmp_path: Path):
    root = write_corpus(tmp_path / "data", {f"s{i:02d}.parquet": 1 for i in range(20)})
    for name in ("s07", "s13"):
        (root / f"{name}.parquet").write_bytes(b"not parquet")
    for _ in range(3):
        with pytest.raises(DataError, match=r"s07\.parquet is not a readable Parquet file"):
            scan_dataset(root)


def test_manifest_is_for_data_not_for_a_mixture(tmp_path: Path):
    with pytest.raises(ConfigError, match="--manifest describes the shards of --data"):
        DaemonConfig(sources=(SourceConfig("web", tmp_path, "text"),), run_dir=tmp_path,
                     manifest="m.json.gz")


def test_a_daemon_started_from_a_manifest_serves_the_oracle_batches(
        start_daemon, oracle, corpus: Path, tmp_path: Path):
    out = tmp_path / "corpus-manifest.json.gz"
    assert main(["index", str(corpus), "--out", str(out)]) == 0
    want = oracle(batch_size=4, seq_len=256, n=12)
    daemon = start_daemon("--manifest", str(out), "--log-level", "DEBUG", workers=1)
    assert f"manifest {out}, 0 footers read" in daemon.log()
    with daemon.feed(4, 256) as feed:
        for k in range(12):
            assert_batch_equals(next(feed), want[k], f"batch {k}")
