"""Two consumers on one stream, one paused past the consumer timeout: never a torn batch.

The paused consumer is a real process stopped with SIGSTOP (a frozen cgroup, a paused
VM); while it sleeps the daemon drops it and refills its slots for the sibling. When
it wakes, the ring's seqlock makes it discard whatever it was reading: with
`reconnect_s` it re-attaches at the batch after the last one it returned and goes on
exactly as the oracle says.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import assert_batch_equals, consumer_script, window_digest, worker_pids

B, T = 2, 64
CONSUMER = consumer_script(B, T, 0.02, reconnect_s=60, prefetch=2)


def wait_until(check, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.slow  # the fast tier keeps the module's other tests
def test_paused_sibling_is_dropped_and_resumes_exactly_never_torn(start_daemon, oracle):
    n_paused, n_sibling = 60, 120
    want = oracle(batch_size=B, seq_len=T, n=max(n_paused, n_sibling))
    daemon = start_daemon("--consumer-timeout-s", "2", workers=1, slots=4)
    (worker,) = worker_pids(daemon)
    os.kill(worker, signal.SIGSTOP)  # nothing is filled until both consumers are attached
    paused = subprocess.Popen(
        [sys.executable, "-c", CONSUMER, str(daemon.run_dir), str(n_paused)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(paused.stdout), daemon=True)
    reader.start()
    sibling = daemon.feed(B, T, prefetch=2)
    got: list[tuple] = []
    try:
        wait_until(lambda: [s["consumers"] for s in daemon.status()["streams"]] == [1],
                   "the first consumer to attach")
        first = threading.Thread(target=lambda: got.append(next(sibling)), daemon=True)
        first.start()
        wait_until(lambda: [s["consumers"] for s in daemon.status()["streams"]] == [2],
                   "both consumers on one stream")
        os.kill(worker, signal.SIGCONT)
        first.join(timeout=30)
        wait_until(lambda: len(lines) >= 5, "the paused consumer's first batches")
        paused.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        for _ in range(n_sibling - 1):  # the sibling goes on once the paused one is dropped
            got.append(next(sibling))
        assert time.monotonic() - stopped_at < 20, "the sibling stalled behind a paused peer"
        paused.send_signal(signal.SIGCONT)
        paused.wait(timeout=60)
        reader.join(timeout=10)
    finally:
        sibling.close()
        if paused.poll() is None:
            paused.send_signal(signal.SIGCONT)
            paused.kill()
            paused.wait()
    err = paused.stderr.read()
    assert paused.returncode == 0, err
    assert "re-attach" in err or "dropped" in err, err  # it was dropped, and came back
    for k, batch in enumerate(got):
        assert_batch_equals(batch, want[k], f"sibling batch {k}")
    assert [line.split()[0] for line in lines] == [str(i) for i in range(n_paused)]
    for line in lines:
        i, digest = line.split()
        assert digest == window_digest(want[int(i)], B, T), f"paused consumer's batch {i} differs"
