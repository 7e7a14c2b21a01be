"""Shared pieces of the benchmarks: a daemon process owned in `finally`, corpora, /proc readers.

Not a benchmark itself. Every daemon started here gets a short run dir under /tmp (Unix
socket paths are limited to 107 bytes), is stopped with SIGTERM (SIGKILL after a
deadline) and, once stopped, any `tokenfeed-<daemon id>-*` segment it left in /dev/shm is
reported and removed, so a benchmark never leaves shared memory behind.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from tokenfeed.common.control import request
from tokenfeed.common.errors import DaemonUnavailableError
from tokenfeed.common.shm import SHM_DIR, segment_name
from tokenfeed.tools import corpus
from tokenfeed.tools.progress import Progress

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
STARTED_IDS: list[str] = []  # daemon ids this process started, for `leftover_segments`


class DaemonProcess:
    """`python -m tokenfeed.producer serve` on its own run dir; use as a context manager."""

    def __init__(
        self, data: Path, *, workers: int, slots: int, tokenizer: str, extra: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.run_dir = Path(tempfile.mkdtemp(prefix="tfb-", dir="/tmp"))
        self.log_path = self.run_dir.parent / f"{self.run_dir.name}.log"
        self.cmd = [
            sys.executable, "-m", "tokenfeed.producer", "serve", "--data", str(data),
            "--run-dir", str(self.run_dir), "--tokenizer", tokenizer,
            "--workers", str(workers), "--slots", str(slots), "--log-level", "WARNING",
            *extra,
        ]
        self.env = env  # None: this process's (e.g. PYTHONPATH of another commit's tree)
        self.proc: subprocess.Popen[bytes] | None = None
        self.daemon_id = ""

    def __enter__(self) -> DaemonProcess:
        try:
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                             env=self.env)
            self.daemon_id = str(self._wait_ready()["daemon_id"])
            STARTED_IDS.append(self.daemon_id)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _wait_ready(self) -> dict[str, Any]:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited at start:\n{self.log()}")
            try:
                return request(self.run_dir, "status", timeout_s=1.0)
            except DaemonUnavailableError:
                time.sleep(0.05)
        raise RuntimeError(f"daemon did not answer within {START_TIMEOUT_S:.0f} s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def status(self) -> dict[str, Any]:
        return request(self.run_dir, "status", timeout_s=2.0)

    def wait_depth(self, want: int, timeout_s: float = 60.0) -> int:
        """Wait until stream 0 holds `want` filled slots; returns the depth seen last."""
        deadline = time.monotonic() + timeout_s
        depth = -1
        while time.monotonic() < deadline:
            streams = self.status()["streams"]
            depth = int(streams[0]["depth"]) if streams else -1
            if depth >= want:
                return depth
            time.sleep(0.02)
        return depth

    def stop(self) -> None:
        """SIGTERM, wait, SIGKILL past the deadline; then remove what a kill left behind."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                print(f"warning: daemon pid {self.proc.pid} ignored SIGTERM; killing it",
                      file=sys.stderr)
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.returncode not in (0, None):
            print(f"warning: daemon exited with code {self.proc.returncode}:\n{self.log()[-2000:]}",
                  file=sys.stderr)
        if self.daemon_id:
            left = sorted(SHM_DIR.glob(segment_name(self.daemon_id, "") + "*"))
            if left:
                print(f"warning: daemon left {len(left)} segments in {SHM_DIR}; removing",
                      file=sys.stderr)
            for path in left:
                path.unlink(missing_ok=True)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.log_path.unlink(missing_ok=True)


def corpus_parser(doc: str, *, batch_size: int, seq_len: int) -> argparse.ArgumentParser:
    """The options every benchmark over a corpus shares: --data (default: the installed
    corpus), --workers (default: every core), --batch-size and --seq-len; its description
    is the first line of `doc` (the benchmark's docstring)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--data", type=Path)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--seq-len", type=int, default=seq_len)
    return p


CORPUS_CACHE_DIR = Path("/tmp")


def installed_corpus(docs_per_group: int = 1024, groups_per_file: int = 1) -> tuple[Path, bool]:
    """The installed corpus (`corpus.build_installed_corpus`) in a cache dir; (dir, was cached).

    The dir, `/tmp/tokenfeed-corpus-<key>`, is keyed by the parameters, the Python
    version, the builder's source and every source's (kind, path, size, mtime): a
    changed install or builder gives a new dir. Built once (~25 s) into a temporary dir
    and renamed, so a crash or a concurrent build never leaves a half-written corpus.
    """
    sources = corpus.installed_sources()
    described: list[list[object]] = []
    for kind, key in sources:
        if kind == "topic":
            described.append([kind, key])
            continue
        try:
            st = os.stat(key)
            described.append([kind, key, st.st_size, st.st_mtime_ns])
        except OSError:
            described.append([kind, key, None])
    digest = hashlib.sha256(json.dumps({
        "docs_per_group": docs_per_group, "groups_per_file": groups_per_file,
        "python": platform.python_version(), "sources": described,
        "builder": hashlib.sha256(Path(corpus.__file__).read_bytes()).hexdigest(),
    }).encode()).hexdigest()[:16]
    out = CORPUS_CACHE_DIR / f"tokenfeed-corpus-{digest}"
    if out.is_dir():
        return out, True
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=CORPUS_CACHE_DIR))
    try:
        progress = Progress("building the installed corpus", total=0, unit="sources",
                            stream=sys.stderr)
        try:
            corpus.build_installed_corpus(tmp, docs_per_group=docs_per_group,
                                          groups_per_file=groups_per_file, sources=sources,
                                          progress=progress)
        finally:
            progress.close()
        os.rename(tmp, out)
    except OSError:
        if not out.is_dir():  # not a concurrent build that won the rename
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, False


def corpus_shape(files: Sequence[Path], texts: Sequence[str], tokens: int) -> str:
    """Documents, MB of UTF-8 text and tokens per row group, averaged over `files`."""
    groups = sum(pq.ParquetFile(f).num_row_groups for f in files)
    text_bytes = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
    return (f"{len(texts) / groups:,.0f} documents, {text_bytes / groups / 1e6:.2f} MB, "
            f"{tokens / groups / 1e6:.2f} M tokens per row group")


def train_files(data: Path, val_files: int = 1) -> list[Path]:
    """The files the daemon's train split reads: sorted *.parquet less the last `val_files`."""
    files = sorted(data.glob("*.parquet"))
    return files[: len(files) - val_files] if val_files else files


def read_texts(files: Sequence[Path], column: str = "text") -> list[str]:
    texts: list[str] = []
    for path in files:
        values = pq.read_table(path, columns=[column]).column(0).to_pylist()
        texts.extend(v for v in values if isinstance(v, str))
    return texts


def rss_kib(pid: int | str = "self", field: str = "VmRSS") -> int:
    """A `/proc/PID/status` memory field in KiB (0 if the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int | str = "self") -> float:
    """utime + stime of a process (all its threads), in seconds; 0 if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_S


def machine_busy_s() -> float:
    """CPU seconds all cores spent busy since boot (everything but idle and iowait)."""
    first_line = Path("/proc/stat").read_text().splitlines()[0]
    fields = [int(v) for v in first_line.split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / TICKS_PER_S


def wait_quiet(max_wait_s: float = 60.0, busy_cores: float = 0.15) -> float:
    """Wait until the machine is idle (others' tests skew every figure); returns seconds waited.

    Idle: under `busy_cores` cores busy over half a second. Gives up after `max_wait_s`
    (the figures then carry the "other CPU" column that shows the contention).
    """
    start = time.monotonic()
    while time.monotonic() - start < max_wait_s:
        b0, t0 = machine_busy_s(), time.monotonic()
        time.sleep(0.5)
        if (machine_busy_s() - b0) / (time.monotonic() - t0) < busy_cores:
            break
    return time.monotonic() - start


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain left/right aligned text table: text left, numbers right."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    numeric = [all(_is_number(r[i]) for r in cells[1:]) for i in range(len(header))]

    def line(r: Sequence[str]) -> str:
        cols = zip(r, widths, numeric, strict=True)
        return "  ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in cols)

    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    out.extend(line(r) for r in cells[1:])
    return "\n".join(s.rstrip() for s in out)


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", "").rstrip("x%").replace(" ", ""))
    except ValueError:
        return False
    return True


def machine_line() -> str:
    import platform

    import tiktoken
    import torch

    return (f"machine: {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"tiktoken {tiktoken.__version__}, torch {torch.__version__}")


def leftover_segments() -> list[str]:
    """Segments in /dev/shm of the daemons this process started (others' are not counted)."""
    return sorted(p.name for d in STARTED_IDS for p in SHM_DIR.glob(segment_name(d, "") + "*"))
