"""Elastic resume of a mixture with a declared recipe: a job of 2 ranks saved mid-recipe
continues on 3 ranks. Every delivered document is traced to its source (test_schedule's
Tracer, independent of the mixer): a repeated source gives each document exactly k
times across both jobs, a budget still stops its source, a schedule goes on from the
old ranks' mean tokens, and a new rank's own state resumes bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from itertools import pairwise

import numpy as np
import pytest
from conftest import BOS_ID
from test_schedule import PREFIX, RAMP, Tracer, corpus, mix_file, read_to_the_end  # noqa: F401

from tokenfeed.common.errors import StateMismatchError

B, T = 2, 64  # small windows: the old job stops inside the small source's second pass
WINDOW = B * T + 1
OLD_WORLD, NEW_WORLD = 2, 3


def windows(batches) -> list[np.ndarray]:
    return [np.append(x.numpy().ravel(), y.numpy().ravel()[-1]) for x, y in batches]


def old_job(daemon, k: int, **kw) -> tuple[list[dict], list[np.ndarray]]:
    """Every old rank's first k windows and its state after them."""
    states, streams = [], []
    for rank in range(OLD_WORLD):
        with daemon.feed(B, T, rank=rank, world_size=OLD_WORLD, **kw) as feed:
            streams.append(np.concatenate(windows([next(feed) for _ in range(k)])))
            states.append(json.loads(json.dumps(feed.state_dict())))
    return states, streams


def traced(tracer: Tracer, stream: np.ndarray) -> list[tuple[str, int, int, bool]]:
    """(source, document, tokens, starts it) of each piece of a stream. A new rank's
    items may begin inside a document an old rank cut (its rest, without a BOS): such a
    piece is found by its tokens among the sources' documents, and does not count as a
    delivery of the document (its head, with the BOS, was delivered before)."""
    out: list[tuple[str, int, int, bool]] = []
    starts = [0, *np.flatnonzero(stream == BOS_ID).tolist(), len(stream)]
    for lo, hi in pairwise(starts):
        piece = tuple(stream[lo:hi].tolist())
        if not piece:
            continue
        if piece[0] == BOS_ID:
            last = hi == len(stream)
            if len(piece) < PREFIX and last:
                name, i = next(v for k, v in tracer.owner.items() if k[:len(piece)] == piece)
            else:
                name, i = tracer.owner[piece[:PREFIX]]
            full = tracer.docs[name][i]
            size = min(len(piece), len(full))
            assert full[:size] == piece[:size] and (last or len(piece) >= len(full))
            out.append((name, i, size, True))
            piece = piece[size:]  # a rest that follows this document without a BOS
        if piece:
            out.append((*rest_of(tracer, piece), len(piece), False))
    return out


def rest_of(tracer: Tracer, piece: tuple[int, ...]) -> tuple[str, int]:
    """The source whose documents `piece` (no BOS) is a part of, and the document (-1:
    several of that source's hold it, as small's repeated words do)."""
    needle = np.array(piece, dtype=np.int64).tobytes()
    found = [(name, i) for name, docs in tracer.docs.items() for i, d in enumerate(docs)
             if (at := np.array(d, dtype=np.int64).tobytes().find(needle)) > 0 and at % 8 == 0]
    assert len({name for name, _ in found}) == 1, (piece[:8], found)
    return found[0][0], found[0][1] if len(found) == 1 else -1


def test_a_repeated_source_gives_every_document_k_times_across_an_elastic_resume(
        start_daemon, corpus, tmp_path):  # noqa: F811
    mix = mix_file(tmp_path / "mix.toml", corpus, "repeat = 1\n", names=("small", "code"))
    mix.write_text(mix.read_text().replace('small"\n', 'small"\nrepeat = 3\n', 1))
    daemon = start_daemon("--mix", str(mix), data=None, sources={})
    states, old = old_job(daemon, 7)  # 903 tokens a rank: inside small's second pass
    assert all(s["cursor"]["mix"]["given"]["small"][1] > 12 for s in states)
    assert all(s["cursor"]["mix"]["given"]["small"][1] < 24 for s in states)
    new = []
    for rank in range(NEW_WORLD):
        with daemon.feed(B, T, rank=rank, world_size=NEW_WORLD) as feed:
            feed.load_state_dict(states)
            new.append(np.concatenate(windows(read_to_the_end(feed, 2000))))
    tracer = Tracer(corpus, ["code", "small"])
    docs = [d for stream in old + new for d in traced(tracer, stream)]
    small = Counter(i for name, i, _, whole in docs if name == "small" and whole)
    assert small == Counter({i: 3 for i in range(24)}), small
    code = Counter(i for name, i, _, whole in docs if name == "code" and whole)
    assert max(code.values()) == 1, "a code document was delivered twice"
    # no token lost either: only each new rank's last window, never filled, is missing
    want = 3 * sum(map(len, tracer.docs["small"])) + sum(map(len, tracer.docs["code"]))
    got = sum(map(len, old + new))
    assert want - NEW_WORLD * WINDOW < got <= want, (want, got)


def test_a_budget_counts_on_from_the_old_ranks_mean_across_an_elastic_resume(
        start_daemon, corpus, tmp_path):  # noqa: F811
    budget = 3_000
    mix = mix_file(tmp_path / "mix.toml", corpus, "")
    mix.write_text(mix.read_text().replace('code"\n', f'code"\nmax_tokens = {budget}\n'))
    daemon = start_daemon("--mix", str(mix), data=None, sources={})
    states, old = old_job(daemon, 8)  # ~1,000 tokens a rank: about half of code's budget
    given = [s["cursor"]["mix"]["given"]["code"][0] for s in states]
    assert min(given) > 0 and max(given) < budget
    tracer = Tracer(corpus, ["code", "web"])
    old_code = [sum(n for name, _, n, _ in traced(tracer, s) if name == "code") for s in old]
    # the count at the exact position is what was delivered (a cut document: its part)
    assert given == old_code, (given, old_code)
    start = sum(given) // OLD_WORLD  # where each new rank counts on from: the mean
    longest = max(map(len, tracer.docs["code"]))
    for rank in range(NEW_WORLD):
        with daemon.feed(B, T, rank=rank, world_size=NEW_WORLD) as feed:
            feed.load_state_dict(states)
            stream = np.concatenate(windows([next(feed) for _ in range(60)]))
            status = next(s for s in daemon.status()["streams"]
                          if s["rank"] == rank and s["world_size"] == NEW_WORLD)
            end = feed.state_dict()["cursor"]["mix"]
        assert end["limits"] == {"code": {"max_tokens": budget}}
        assert status["mix"]["code"]["done"] and not status["mix"]["web"]["done"]
        new_code = sum(n for name, _, n, _ in traced(tracer, stream) if name == "code")
        assert end["given"]["code"][0] - new_code == start, (end["given"], new_code, start)
        assert budget <= end["given"]["code"][0] < budget + longest, end["given"]


@pytest.mark.parametrize("packing", ["concat", "bestfit"])
@pytest.mark.slow
def test_a_schedule_goes_on_from_the_old_ranks_mean_and_a_new_rank_resumes_exactly(
        start_daemon, corpus, tmp_path, packing):  # noqa: F811
    kw = {"packing": "bestfit", "buffer_docs": 8} if packing == "bestfit" else {}
    ramp = RAMP.replace("130_000", "6_000").replace("30_000", "1_000")
    mix = mix_file(tmp_path / "mix.toml", corpus, ramp)
    daemon = start_daemon("--mix", str(mix), data=None, sources={})
    states, _ = old_job(daemon, 10, **kw)  # ~1,300 tokens a rank: inside the ramp
    mixed = [sum(g[0] for g in s["cursor"]["mix"]["given"].values()) for s in states]
    assert all(1_000 < x < 6_000 for x in mixed), mixed
    for rank in range(NEW_WORLD):
        with daemon.feed(B, T, rank=rank, world_size=NEW_WORLD, **kw) as feed:
            feed.load_state_dict(states)
            batches = [next(feed) for _ in range(6)]
            mid = json.loads(json.dumps(feed.state_dict()))
            batches += [next(feed) for _ in range(10)]
        cursor = mid["cursor"]["mix"]
        assert cursor["curve"]["tokens"] == [0, 1000, 6000]
        assert len(cursor["layouts"]) == 2 and len(cursor["weights"]) == 1
        # the new rank started on the schedule where the old ranks were on average: its
        # count at the exact position is that mean plus the 6 windows it delivered (best
        # fit: at least the mean, its rows crop tokens)
        mean = sum(sum(s["cursor"]["mix"]["given"][n][0] for s in states) // OLD_WORLD
                   for n in ("code", "web"))
        given = sum(g[0] for g in cursor["given"].values())
        if packing == "concat":
            assert given == mean + 6 * WINDOW
        else:
            assert mean < given <= mean + 6 * WINDOW + B * 6 * T, (given, mean)
        with daemon.feed(B, T, rank=rank, world_size=NEW_WORLD, **kw) as feed:
            feed.load_state_dict(mid)  # the new layout's own state, at its world size
            for i in range(6, 16):
                x, y = next(feed)
                np.testing.assert_array_equal(x.numpy(), batches[i][0].numpy(),
                                              err_msg=f"rank {rank} batch {i}")
                np.testing.assert_array_equal(y.numpy(), batches[i][1].numpy())


@pytest.mark.slow
def test_an_elastic_resume_under_another_recipe_is_refused_naming_both(
        start_daemon, corpus, tmp_path):  # noqa: F811
    mix = mix_file(tmp_path / "mix.toml", corpus, "")
    mix.write_text(mix.read_text().replace('code"\n', 'code"\nmax_tokens = 3000\n'))
    daemon = start_daemon("--mix", str(mix), data=None, sources={})
    states, _ = old_job(daemon, 2)
    assert daemon.stop() == 0
    mix.write_text(mix.read_text().replace("max_tokens = 3000", "max_tokens = 4000"))
    other = start_daemon("--mix", str(mix), data=None, sources={})
    with other.feed(B, T, rank=0, world_size=NEW_WORLD) as feed:
        feed.load_state_dict(states)
        with pytest.raises(StateMismatchError, match=r"rank 0 of the saved job: the saved "
                           r"state's source limits \(code: max_tokens = 3000\) differ"):
            next(feed)


@pytest.mark.parametrize("how", ["mix=", "mix --set"])
@pytest.mark.slow
def test_after_a_live_change_the_new_ranks_keep_the_set_weights(
        start_daemon, corpus, tmp_path, how):  # noqa: F811
    ramp = RAMP.replace("130_000", "6_000").replace("30_000", "1_000")
    mix = mix_file(tmp_path / "mix.toml", corpus, ramp)
    daemon = start_daemon("--mix", str(mix), data=None, sources={})
    weights = {"code": 0.25, "web": 0.75}
    named = {"mix": weights} if how == "mix=" else {}  # the consumer names them, or not
    if how == "mix=":
        first, _ = old_job(daemon, 3)
        states = []
        for rank in range(OLD_WORLD):  # each old rank sets its weights, then goes on
            with daemon.feed(B, T, rank=rank, world_size=OLD_WORLD, **named) as feed:
                feed.load_state_dict(first[rank])
                for _ in range(3):
                    next(feed)
                states.append(json.loads(json.dumps(feed.state_dict())))
    else:
        feeds = [daemon.feed(B, T, rank=r, world_size=OLD_WORLD) for r in range(OLD_WORLD)]
        try:
            for f in feeds:
                for _ in range(3):
                    next(f)
            out = subprocess.run(
                [sys.executable, "-m", "tokenfeed.producer", "mix", "--set",
                 "code=0.25,web=0.75", "--run-dir", str(daemon.run_dir)],
                capture_output=True, text=True, timeout=30)
            assert out.returncode == 0, out.stderr
            for f in feeds:  # past the batches packed before the change (ring: 8 slots)
                for _ in range(20):
                    next(f)
            states = [json.loads(json.dumps(f.state_dict())) for f in feeds]
        finally:
            for f in feeds:
                f.close()
    assert all(len(s["cursor"]["mix"]["weights"]) == 2 for s in states), states
    for rank in range(NEW_WORLD):
        with daemon.feed(B, T, rank=rank, world_size=NEW_WORLD, **named) as feed:
            feed.load_state_dict(states)
            batches = [next(feed) for _ in range(8)]
            status = next(s for s in daemon.status()["streams"]
                          if s["rank"] == rank and s["world_size"] == NEW_WORLD)
            mid = json.loads(json.dumps(feed.state_dict()))
            batches += [next(feed) for _ in range(4)]
        assert {n: m["weight"] for n, m in status["mix"].items()} == weights
        assert "curve" not in mid["cursor"]["mix"]  # the schedule no longer decides
        with daemon.feed(B, T, rank=rank, world_size=NEW_WORLD, **named) as feed:
            feed.load_state_dict(mid)  # on the daemon that declares the schedule
            for i in range(8, 12):
                x, _ = next(feed)
                np.testing.assert_array_equal(x.numpy(), batches[i][0].numpy(),
                                              err_msg=f"rank {rank} batch {i}")
