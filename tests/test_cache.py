"""The token cache: cold, warm, shared by two daemons, damaged, bounded: always oracle-exact."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import assert_batch_equals, wait_until
from test_bestfit import assert_rows_equal, bestfit_oracle  # noqa: F401 (fixture)
from test_shuffle import SEED, shuffled_oracle  # noqa: F401 (fixture)

from tokenfeed.common.ring import token_dtype
from tokenfeed.producer.cache import CacheError, FileTokens, TokenCache
from tokenfeed.producer.packer import ConcatPacker

B, T = 4, 256
EPOCHS_3 = 52  # ~17 batches an epoch of the train split: epochs 1 and 2 come from the cache


def cache_args(path: Path, *extra: str) -> tuple[str, ...]:
    return ("--cache-dir", str(path), "--task-kib", "4", *extra)


def entries(path: Path) -> list[Path]:
    return sorted(path.glob("*.tok"))


def fill(start_daemon, cache: Path, batches: int = 20) -> dict[str, Any]:
    """A daemon that reads `batches` batches into `cache`, then stops (flushing its writes);
    its tokenizer facts (`feed.tokenizer`, `feed.vocab_size`)."""
    daemon = start_daemon(*cache_args(cache), workers=2)
    with daemon.feed(B, T) as feed:
        for _ in range(batches):
            next(feed)
        facts = {**feed.tokenizer, "vocab_size": feed.vocab_size}
    assert daemon.stop() == 0
    return facts


def first_entries(cache: Path, corpus: Path, facts: dict[str, Any], n: int) -> list[Path]:
    """The entries of the first n row groups of the train split, in the order rank 0 of an
    unshuffled stream reads them: the first units of its first epoch."""
    from oracle import row_group_sequence, split_files

    keys = TokenCache(cache, 1 << 30, facts["identity"],
                      token_dtype(facts["vocab_size"]).itemsize, "text")
    try:
        out = []
        for path, row_group in row_group_sequence(split_files(corpus, "train"))[:n]:
            st = os.stat(path)
            out.append(keys.path(str(path), f"{st.st_size}:{st.st_mtime_ns}", row_group))
        return out
    finally:
        keys.close()


def test_later_epochs_come_from_the_cache_exactly(start_daemon, oracle, tmp_path):
    want = oracle(batch_size=B, seq_len=T, n=EPOCHS_3)
    daemon = start_daemon(*cache_args(tmp_path / "cache"), workers=2)
    with daemon.feed(B, T) as feed:
        for k in range(EPOCHS_3):
            assert_batch_equals(next(feed), want[k], f"batch {k}")
        status = daemon.status()
    (stream,) = status["streams"]
    assert status["cache"]["writes"] >= 12  # every train row group, once
    assert stream["units_cached"] > 0 and status["cache"]["hits"] == stream["units_cached"]
    assert status["cache"]["corrupt"] == 0


def test_shuffled_epochs_read_the_same_entries_in_their_own_order(start_daemon, tmp_path,
                                                                  shuffled_oracle):  # noqa: F811
    want = shuffled_oracle(batch_size=B, seq_len=T, n=EPOCHS_3)
    daemon = start_daemon(*cache_args(tmp_path / "cache"), workers=2)
    with daemon.feed(B, T, shuffle_seed=SEED) as feed:
        for k in range(EPOCHS_3):
            assert_batch_equals(next(feed), want[k], f"batch {k}")
        assert daemon.status()["streams"][0]["units_cached"] > 0


def test_bestfit_from_the_cache_is_exact(start_daemon, tmp_path, bestfit_oracle):  # noqa: F811
    want = bestfit_oracle(batch_size=B, seq_len=128, n=60, shuffle_seed=7)
    daemon = start_daemon(*cache_args(tmp_path / "cache"), workers=2)
    with daemon.feed(B, 128, packing="bestfit", shuffle_seed=7) as feed:
        for k in range(60):
            assert_rows_equal(next(feed), want[k], f"batch {k}")
        assert daemon.status()["streams"][0]["units_cached"] > 0


@pytest.mark.slow
def test_a_second_daemon_serves_from_the_first_ones_cache(start_daemon, oracle, tmp_path):
    cache = tmp_path / "cache"
    want = oracle(batch_size=B, seq_len=T, n=20)
    fill(start_daemon, cache)
    second = start_daemon(*cache_args(cache), workers=1)
    with second.feed(B, T) as feed:
        for k in range(20):
            assert_batch_equals(next(feed), want[k], f"batch {k}")
        (stream,) = second.status()["streams"]
    assert stream["units_cached"] >= 5 and stream["tasks_done"] == 0


def test_damaged_entries_are_detected_and_rebuilt(start_daemon, oracle, corpus, tmp_path):
    cache = tmp_path / "cache"
    want = oracle(batch_size=B, seq_len=T, n=20)
    facts = fill(start_daemon, cache)
    # The first two units of the stream: read first by the next daemon, whatever the names.
    torn, garbage = first_entries(cache, corpus, facts, 2)
    assert torn.exists() and garbage.exists(), f"no entries of the first units in {cache}"
    sizes = {torn: torn.stat().st_size, garbage: garbage.stat().st_size}
    with open(torn, "r+b") as f:
        f.truncate(sizes[torn] // 2)
    with open(garbage, "r+b") as f:
        f.seek(sizes[garbage] // 2)
        f.write(b"\x5a" * 64)
    second = start_daemon(*cache_args(cache), workers=2)
    with second.feed(B, T) as feed:
        for k in range(20):
            assert_batch_equals(next(feed), want[k], f"batch {k}")
        status = second.status()
    assert status["cache"]["corrupt"] == 2
    assert second.stop() == 0  # flushes the rewrites
    for path, size in sizes.items():
        assert path.stat().st_size == size, f"{path.name} was not rebuilt"


def test_a_unit_after_a_miss_is_still_taken_from_the_cache(start_daemon, oracle, corpus,
                                                          tmp_path):
    """The workers tokenize only what the cache lacks: the unit after a missed one is looked
    up too, not handed to a worker in the same scheduling pass (where a damaged entry of it
    would also have been left in place, unseen, rather than rebuilt)."""
    cache = tmp_path / "cache"
    want = oracle(batch_size=B, seq_len=T, n=20)
    facts = fill(start_daemon, cache)  # 20 batches: the whole first epoch is cached
    (missing,) = first_entries(cache, corpus, facts, 1)
    missing.unlink()
    second = start_daemon(*cache_args(cache), workers=2)
    with second.feed(B, T) as feed:
        for k in range(20):
            assert_batch_equals(next(feed), want[k], f"batch {k}")
        status = second.status()
    (stream,) = status["streams"]
    tokenized = stream["units_done"] - stream["units_cached"]
    assert tokenized == 1, (stream, status["cache"])  # the one unit the cache lacked
    assert status["cache"]["misses"] == 1 and status["cache"]["corrupt"] == 0, status["cache"]


@pytest.mark.slow
def test_two_daemons_filling_one_cache_at_once_never_read_a_partial_entry(start_daemon, oracle,
                                                                         tmp_path):
    cache = tmp_path / "cache"
    want = oracle(batch_size=B, seq_len=T, n=EPOCHS_3)
    daemons = [start_daemon(*cache_args(cache), workers=1) for _ in range(2)]
    errors: list[BaseException] = []

    def drain(daemon) -> None:
        try:
            with daemon.feed(B, T) as feed:
                for k in range(EPOCHS_3):
                    assert_batch_equals(next(feed), want[k], f"batch {k}")
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=drain, args=(d,)) for d in daemons]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors[0]
    for d in daemons:
        assert d.status()["cache"]["corrupt"] == 0


def test_the_cache_stays_within_its_bound(start_daemon, tmp_path):
    cache = tmp_path / "cache"
    bound = 12_000  # bytes: about two row groups of the test corpus
    daemon = start_daemon(*cache_args(cache, "--cache-gib", str(bound / (1 << 30))), workers=2)
    with daemon.feed(B, T) as feed:
        for _ in range(EPOCHS_3):
            next(feed)
    assert daemon.stop() == 0
    sizes = [p.stat().st_size for p in entries(cache)]
    assert sizes and sum(sizes) <= max(bound, max(sizes))


@pytest.mark.parametrize("action", ["info", "clear"])
@pytest.mark.slow
def test_cache_command_reports_and_clears(start_daemon, tmp_path, action):
    cache = tmp_path / "cache"
    daemon = start_daemon(*cache_args(cache), workers=1)
    with daemon.feed(B, T) as feed:
        for _ in range(20):
            next(feed)
    assert daemon.stop() == 0
    n = len(entries(cache))
    out = subprocess.run([sys.executable, "-m", "tokenfeed.producer", "cache", action,
                          "--cache-dir", str(cache)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert str(n) in out.stdout
    assert len(entries(cache)) == (0 if action == "clear" else n)


def test_the_directory_stays_within_its_bound_and_skips_an_entry_larger_than_it(tmp_path):
    entry_bytes = 48 + 8 + 4 * 1000  # header, one row length, 1000 uint32 tokens
    cache = TokenCache(tmp_path, 3 * entry_bytes + 100, "test-tokenizer", 4, "text")
    try:
        for row_group in range(10):
            cache.put("a.parquet", "1:1", row_group, np.arange(1000, dtype=np.uint32),
                      np.array([1000]))
            cache.flush()
            total = sum(p.stat().st_size for p in entries(tmp_path))
            assert total <= cache.max_bytes, (row_group, total)
        assert cache.get("a.parquet", "1:1", 9) is not None  # the newest is kept
        cache.put("a.parquet", "1:1", 10, np.arange(4000, dtype=np.uint32), np.array([4000]))
        cache.flush()  # larger than the whole bound: not cached
        assert cache.get("a.parquet", "1:1", 10) is None
        assert sum(p.stat().st_size for p in entries(tmp_path)) <= cache.max_bytes
    finally:
        cache.close()


def one_entry_cache(path: Path) -> TokenCache:
    cache = TokenCache(path, 1 << 30, "test-tokenizer", 4, "text")
    cache.put("a.parquet", "1:1", 0, np.arange(1000, dtype=np.uint32), np.array([600, 400]))
    cache.flush()
    return cache


def test_an_unchanged_entry_is_checksummed_once_per_daemon(tmp_path, monkeypatch):
    cache = one_entry_cache(tmp_path)
    try:
        calls: list[int] = []
        real = zlib.adler32

        def counted(*args: object) -> int:
            calls.append(1)
            return real(*args)  # type: ignore[arg-type]

        monkeypatch.setattr(zlib, "adler32", counted)
        for _ in range(3):
            rows = cache.get("a.parquet", "1:1", 0)
            assert rows is not None
            np.testing.assert_array_equal(rows.tokens, np.arange(1000))
            np.testing.assert_array_equal(rows.row_tokens, [600, 400])
        assert len(calls) == 2  # rows, then tokens: at the first read only
    finally:
        cache.close()


def test_an_entry_changed_in_place_after_a_read_is_checked_again(tmp_path):
    cache = one_entry_cache(tmp_path)
    try:
        assert cache.get("a.parquet", "1:1", 0) is not None
        (entry,) = entries(tmp_path)
        read_at_ns = entry.stat().st_mtime_ns  # the read set it

        def damage() -> bool:  # again until the file system's timestamp tick moves the mtime
            with open(entry, "r+b") as f:
                f.seek(entry.stat().st_size - 64)
                f.write(b"\x5a" * 64)  # same size, same inode
            return entry.stat().st_mtime_ns != read_at_ns

        wait_until(damage, 10, "a write that moves the entry's modification time")
        assert cache.get("a.parquet", "1:1", 0) is None
        assert cache.corrupt == 1 and not entries(tmp_path)
    finally:
        cache.close()


def test_a_verified_entry_is_read_in_place_into_windows_exactly(tmp_path):
    cache = one_entry_cache(tmp_path)
    try:
        first = cache.get("a.parquet", "1:1", 0, in_file=True)  # unverified: read and checked
        assert first is not None and isinstance(first.tokens, np.ndarray)
        rows = cache.get("a.parquet", "1:1", 0, in_file=True)
        assert rows is not None and isinstance(rows.tokens, FileTokens)
        assert len(rows.tokens) == 1000 and rows.tokens.nbytes == 4000
        np.testing.assert_array_equal(rows.row_tokens, [600, 400])
        # a concat packer cuts the same windows from the file as from the array
        from_file, from_array = ConcatPacker(300), ConcatPacker(300)
        from_file.push(0, rows.tokens, np.array([0, 600]))
        from_array.push(0, np.arange(1000, dtype=np.uint32), np.array([0, 600]))
        for _ in range(3):
            a, b = np.empty(300, dtype=np.uint32), np.empty(300, dtype=np.uint32)
            assert from_file.fill(a) == from_array.fill(b)
            np.testing.assert_array_equal(a, b)
        wide = np.empty(50, dtype=np.int64)  # another dtype: read, then converted
        rows.tokens.read_into(wide, 950)
        np.testing.assert_array_equal(wide, np.arange(950, 1000))
    finally:
        cache.close()


def test_an_entry_truncated_in_place_under_a_reader_is_a_clear_error(tmp_path):
    cache = one_entry_cache(tmp_path)
    try:
        assert cache.get("a.parquet", "1:1", 0) is not None  # verified
        rows = cache.get("a.parquet", "1:1", 0, in_file=True)
        assert rows is not None and isinstance(rows.tokens, FileTokens)
        (entry,) = entries(tmp_path)
        os.truncate(entry, entry.stat().st_size - 400)  # the last 100 tokens gone
        out = np.empty(200, dtype=np.uint32)
        rows.tokens.read_into(out, 0)  # still there
        np.testing.assert_array_equal(out, np.arange(200))
        with pytest.raises(CacheError, match=r"shorter than when it was opened.*--cache-dir"):
            rows.tokens.read_into(out, 800)
    finally:
        cache.close()
