"""`tokenfeed download` against a local HTTP server that fails on purpose."""

from __future__ import annotations

import io
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tokenfeed.producer.cli import build_parser
from tokenfeed.tools import commands
from tokenfeed.tools.download import PRESETS, DownloadConfig, download, shard_indices
from tokenfeed.tools.progress import Progress, format_amount

# What the server does for one request of a file; the script of each file is consumed
# in order, then every request gets "ok".
OK, ERROR_500, DROP, SHORT, SHORT_NO_LENGTH, NOT_FOUND, SLOW = (
    "ok", "500", "drop", "short", "short-no-length", "404", "slow")
SLOW_CHUNK_BYTES, SLOW_CHUNK_S = 512, 0.05


class ShardServer:
    """Serves `files` on 127.0.0.1 with scripted faults; counts the requests per file."""

    def __init__(self, files: dict[str, bytes], faults: dict[str, list[str]]) -> None:
        self.files = files
        self.faults = {name: list(script) for name, script in faults.items()}
        self.requests: Counter[str] = Counter()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                name = self.path.rsplit("/", 1)[-1]
                with server._lock:
                    server.requests[name] += 1
                    script = server.faults.get(name, [])
                    action = script.pop(0) if script else OK
                body = server.files.get(name)
                if body is None or action == NOT_FOUND:
                    self.send_error(404)
                    return
                if action == ERROR_500:
                    self.send_error(500)
                    return
                if action == DROP:  # no status line at all
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.send_response(200)
                if action != SHORT_NO_LENGTH:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if action == SLOW:
                    try:
                        for start in range(0, len(body), SLOW_CHUNK_BYTES):
                            self.wfile.write(body[start : start + SLOW_CHUNK_BYTES])
                            self.wfile.flush()
                            time.sleep(SLOW_CHUNK_S)
                    except OSError:  # the client went away
                        self.close_connection = True
                    return
                if action in (SHORT, SHORT_NO_LENGTH):
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = False  # joined by server_close: nothing outlives a test
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/data"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="shard-server")
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def shards(corpus: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(corpus.glob("*.parquet"))}


@pytest.fixture
def serve() -> Iterator[object]:
    servers: list[ShardServer] = []

    def start(files: dict[str, bytes], faults: dict[str, list[str]] | None = None) -> ShardServer:
        servers.append(ShardServer(files, faults or {}))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def config(server: ShardServer, out: Path, n: int, **kwargs: object) -> DownloadConfig:
    return DownloadConfig(base_url=server.url, indices=tuple(range(n)), out_dir=out,
                          backoff_s=0.01, timeout_s=10, **kwargs)  # type: ignore[arg-type]


def assert_identical(out: Path, shards: dict[str, bytes]) -> None:
    assert sorted(p.name for p in out.iterdir()) == sorted(shards)  # no .tmp left
    for name, body in shards.items():
        assert (out / name).read_bytes() == body, name


def test_faults_are_retried_until_every_file_equals_the_source(
    serve, shards: dict[str, bytes], tmp_path: Path
) -> None:
    names = sorted(shards)
    faults = {names[0]: [ERROR_500, ERROR_500], names[1]: [DROP], names[2]: [SHORT],
              names[3]: [SHORT_NO_LENGTH, DROP, ERROR_500]}
    server = serve(shards, faults)
    summary = download(config(server, tmp_path / "out", len(names), workers=3))
    assert sorted(summary.fetched) == names and summary.failed == []
    assert summary.retries == 7
    assert server.requests == Counter({names[0]: 3, names[1]: 2, names[2]: 2, names[3]: 4,
                                       names[4]: 1})
    assert_identical(tmp_path / "out", shards)


def test_progress_counts_the_bytes_kept_out_of_an_estimated_total(
    serve, shards: dict[str, bytes], tmp_path: Path
) -> None:
    names = sorted(shards)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / names[0]).write_bytes(shards[names[0]])  # complete: not counted
    server = serve(shards, {names[1]: [SHORT], names[2]: [SHORT_NO_LENGTH]})
    out = io.StringIO()
    progress = Progress("download", total=0, unit="B", stream=out, interval_s=0)
    download(config(server, tmp_path / "out", len(names), workers=1), progress)
    progress.close()
    # the halves of the cut bodies were taken back; the total is the files fetched
    fetched = sum(len(shards[n]) for n in names[1:])
    assert progress.done == fetched and progress.total == fetched
    lines = out.getvalue().splitlines()
    assert "ETA" in lines[0] and "\r" not in out.getvalue()  # estimated from the mean length
    assert lines[-1].startswith(f"download: {format_amount(fetched, 'B')} / ")
    assert "(100%)" in lines[-1] and "ETA" not in lines[-1]


def test_a_rerun_fetches_nothing(serve, shards: dict[str, bytes], tmp_path: Path) -> None:
    server = serve(shards)
    download(config(server, tmp_path / "out", len(shards)))
    before = sum(server.requests.values())
    summary = download(config(server, tmp_path / "out", len(shards)))
    assert sum(server.requests.values()) == before
    assert summary.fetched == [] and len(summary.skipped) == len(shards)


def test_a_truncated_file_at_the_final_name_is_fetched_again(
    serve, shards: dict[str, bytes], tmp_path: Path
) -> None:
    server = serve(shards)
    name = sorted(shards)[1]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / name).write_bytes(shards[name][:100])  # copied by hand, cut short
    (tmp_path / "out" / f"{name}.tmp").write_bytes(b"stale")  # a killed run's
    summary = download(config(server, tmp_path / "out", len(shards)))
    assert sorted(summary.fetched) == sorted(shards)
    assert_identical(tmp_path / "out", shards)


def test_a_file_that_keeps_failing_is_reported_and_leaves_no_tmp(
    serve, shards: dict[str, bytes], tmp_path: Path
) -> None:
    names = sorted(shards)
    server = serve(shards, {names[2]: [SHORT] * 10})
    summary = download(config(server, tmp_path / "out", len(names), attempts=3))
    assert [url for url, _ in summary.failed] == [f"{server.url}/{names[2]}"]
    assert "truncated body" in summary.failed[0][1]
    assert server.requests[names[2]] == 3
    assert_identical(tmp_path / "out", {n: b for n, b in shards.items() if n != names[2]})


def test_not_found_is_not_retried(serve, shards: dict[str, bytes], tmp_path: Path) -> None:
    server = serve(shards)
    summary = download(config(server, tmp_path / "out", len(shards) + 1))
    missing = f"shard_{len(shards):05d}.parquet"
    assert summary.failed == [(f"{server.url}/{missing}", "HTTP 404 Not Found (not retried)")]
    assert server.requests[missing] == 1


def test_cli_downloads_with_faults_exits_0_then_a_rerun_fetches_nothing(
    serve, shards: dict[str, bytes], tmp_path: Path
) -> None:
    names = sorted(shards)
    server = serve(shards, {names[0]: [DROP, ERROR_500], names[4]: [SHORT]})
    cmd = [sys.executable, "-m", "tokenfeed.producer", "download", "--base-url", server.url,
           "--num-shards", str(len(names)), "--workers", "3", "--out", str(tmp_path / "out"),
           "--backoff-s", "0.01"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert f"{len(names)} fetched" in first.stdout and "3 retries" in first.stdout
    assert "download 5 files:" in first.stderr  # the final progress line
    assert_identical(tmp_path / "out", shards)
    before = sum(server.requests.values())
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert "0 fetched" in second.stdout and f"{len(names)} already complete" in second.stdout
    assert sum(server.requests.values()) == before


def test_cli_exits_1_naming_the_file_that_could_not_be_fetched(
    serve, shards: dict[str, bytes], tmp_path: Path
) -> None:
    server = serve(shards, {sorted(shards)[1]: [ERROR_500] * 5})
    result = subprocess.run(
        [sys.executable, "-m", "tokenfeed.producer", "download", "--base-url", server.url,
         "--num-shards", "3", "--out", str(tmp_path / "out"), "--attempts", "2",
         "--backoff-s", "0.01"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert f"could not fetch {server.url}/{sorted(shards)[1]}: HTTP 500" in result.stderr
    assert "2 fetched" in result.stdout and "1 failed" in result.stdout


def test_every_preset_is_a_cli_choice_and_the_flags_default_to_the_config(
    tmp_path: Path,
) -> None:
    for name, preset in PRESETS.items():
        args = build_parser().parse_args(
            ["download", "--dataset", name, "--num-shards", "3", "--out", str(tmp_path)])
        assert commands.download_config(args) == DownloadConfig(
            base_url=preset.base_url, indices=(0, 1, 2, preset.last_shard), out_dir=tmp_path)


def test_presets_add_nanochats_val_shard() -> None:
    assert shard_indices(3, "climbmix-400b") == (0, 1, 2, 6542)
    assert shard_indices(3, "fineweb-edu-100b") == (0, 1, 2, 1822)
    assert shard_indices(5000, "fineweb-edu-100b")[-2:] == (1821, 1822)
    assert shard_indices(3, None) == (0, 1, 2)


def test_ctrl_c_stops_the_download_exits_130_and_leaves_no_tmp(
    serve, shards: dict[str, bytes], tmp_path: Path
) -> None:
    server = serve(shards, {name: [SLOW] for name in shards})
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenfeed.producer", "download", "--base-url", server.url,
         "--num-shards", str(len(shards)), "--workers", "2", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # A background job's children inherit SIGINT ignored (and then Python keeps it so).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 30
        while not list(out.glob("*.tmp")):  # a download is under way
            assert time.monotonic() < deadline and proc.poll() is None, "no download started"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert list(out.glob("*.tmp")) == []
    assert all((out / p.name).read_bytes() == shards[p.name] for p in out.iterdir())
