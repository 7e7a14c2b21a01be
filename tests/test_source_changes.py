"""Sources added or removed on resume: with `allow_source_changes=True` every kept source
continues exactly (over an epoch, no document of it lost or repeated, by document id),
an added one starts at its beginning; without it the resume is refused, naming the
change."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import BOS_ID

from tokenfeed.common.errors import StateMismatchError
from tokenfeed.tools.corpus import write_shards

B, T = 2, 64
BEFORE = 6  # batches taken before the state is saved
ID = re.compile(r"\[([a-z])(\d{4})\]")


def documents(name: str, n: int) -> list[str]:
    """`n` documents of 20 to 140 words, each opening with its id `[<name><index>]`."""
    return [f"[{name}{i:04d}] " + " ".join(f"{name}{i}w{j}" for j in range(20 + (i * 37) % 121))
            for i in range(n)]


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, int]]:
    """Sources a, b, c: 3 files of 2 row groups each, the last file val; (path, train docs)."""
    root = tmp_path_factory.mktemp("three")
    out = {}
    for name, n in (("a", 36), ("b", 48), ("c", 30)):
        write_shards(documents(name, n), root / name, num_files=3, rows_per_group=-(-n // 6))
        out[name] = (root / name, n - n // 3)  # the last third of the documents are val
    return out


def window(batch: tuple[Any, Any]) -> np.ndarray:
    x, y = batch
    return np.concatenate([x.numpy().ravel(), y.numpy()[-1, -1:]])


def bestfit_rows(batch: tuple[Any, Any]) -> np.ndarray:
    """A best-fit batch as its B rows of T + 1 tokens, one after the other."""
    x, y = batch
    return np.concatenate([x.numpy(), y.numpy()[:, -1:]], axis=1).ravel()


def ids(windows: list[np.ndarray], encoding: Any) -> list[str]:
    """The id of every document whose start (its BOS) the concat windows deliver, in order."""
    stream = np.concatenate(windows).tolist()
    starts = [i for i, t in enumerate(stream) if t == BOS_ID]
    out = []
    for lo, hi in zip(starts, [*starts[1:], len(stream)], strict=True):
        found = ID.match(encoding.decode(stream[lo + 1:hi]))
        if found:  # the last document may be cut before its id is complete
            out.append(found.group(1) + found.group(2))
    return out


def first_epoch_exact(seen: list[str], name: str, n: int) -> None:
    """The first `n` documents of source `name` delivered are each of its `n` exactly once."""
    mine = [i for i in seen if i[0] == name][:n]
    assert len(mine) == n, f"source {name}: only {len(mine)} of {n} documents delivered"
    assert sorted(mine) == [f"{name}{i:04d}" for i in range(n)], \
        f"source {name}: a document repeated or lost within its first epoch"


def resume(daemon: Any, state: dict[str, Any], kept: dict[str, int], encoding: Any,
           before: list[np.ndarray]) -> list[str]:
    """Resume `state` (allowing source changes) until every kept source has delivered a
    whole epoch; the ids delivered before and after."""
    with daemon.feed(B, T, allow_source_changes=True) as feed:
        feed.load_state_dict(state)
        windows = list(before)
        for _ in range(50):
            windows += [window(b) for b in feed.take(8)]
            seen = ids(windows, encoding)
            if all(sum(i[0] == n for i in seen) > count for n, count in kept.items()):
                return seen
    raise AssertionError(f"the kept sources did not finish an epoch: {seen[-20:]}")


def save(daemon: Any) -> tuple[dict[str, Any], list[np.ndarray]]:
    with daemon.feed(B, T) as feed:
        before = [window(next(feed)) for _ in range(BEFORE)]
        return feed.state_dict(), before


def test_resume_with_a_source_added(start_daemon: Any, three: dict[str, tuple[Path, int]],
                                    encoding: Any) -> None:
    two = start_daemon(sources={n: three[n][0] for n in ("a", "b")})
    state, before = save(two)
    more = start_daemon(sources={n: p for n, (p, _) in three.items()})
    with more.feed(B, T) as feed:
        feed.load_state_dict(state)
        with pytest.raises(StateMismatchError, match=r"added c\).*allow_source_changes=True"):
            next(feed)
    seen = resume(more, state, {"a": three["a"][1], "b": three["b"][1]}, encoding, before)
    for name in ("a", "b"):
        first_epoch_exact(seen, name, three[name][1])
    added = [i for i in seen if i[0] == "c"]
    assert added and added == [f"c{i:04d}" for i in range(len(added))][:len(added)], \
        "the added source does not start at its beginning"
    assert "added c" in more.log()


def test_resume_with_a_source_removed(start_daemon: Any, three: dict[str, tuple[Path, int]],
                                      encoding: Any, caplog: pytest.LogCaptureFixture) -> None:
    full = start_daemon(sources={n: p for n, (p, _) in three.items()})
    state, before = save(full)
    assert any(i[0] == "c" for i in ids(before, encoding))  # c was being read
    fewer = start_daemon(sources={n: three[n][0] for n in ("a", "b")})
    with fewer.feed(B, T) as feed:
        feed.load_state_dict(state)
        with pytest.raises(StateMismatchError, match=r"reads source 'c', which this daemon "
                           r"does not serve.*allow_source_changes=True"):
            next(feed)
    with caplog.at_level(logging.WARNING, logger="tokenfeed.consumer.state"):
        seen = resume(fewer, state, {"a": three["a"][1], "b": three["b"][1]}, encoding,
                      before)
    for name in ("a", "b"):
        first_epoch_exact(seen, name, three[name][1])
    assert "removed c" in fewer.log()  # the daemon's log, and the trainer's
    assert "sources changed: added none, removed c" in caplog.text


def head_tokens(encoding: Any, n: int) -> list[int]:
    """`n` tokens that are each a whole lowercase word at the start of a text (cl100k)."""
    out = []
    for t in range(2000, 60000):
        try:
            text = encoding.decode_single_token_bytes(t).decode()
        except UnicodeDecodeError:
            continue
        if re.fullmatch(r"[a-z]{5,9}", text) and encoding.encode_ordinary(text + " x")[0] == t:
            out.append(t)
            if len(out) == n:
                return out
    raise AssertionError("not enough single-token words")


def test_bestfit_resume_with_a_source_removed(start_daemon: Any, encoding: Any,
                                              tmp_path: Path) -> None:
    """Best fit buffers pieces of every source; the removed one's are dropped, the kept
    ones' delivered. A document's first token after its BOS is a word naming it (the
    rest are x's), so each document's head is counted once, wherever it is cropped.
    Best fit reorders documents within a bound (every document is delivered within
    max(max_age_docs + 1, buffer_docs) documents read, bestfit.py), so the check stays
    inside the kept sources' first epoch: no head twice, none missing below that bound."""
    counts = {"a": 180, "b": 180, "c": 90}
    buffer_docs = 4
    bound = 8 * buffer_docs + 1  # the default max_age_docs is 8 buffers
    words = iter(head_tokens(encoding, sum(counts.values())))
    name_of: dict[int, tuple[str, int]] = {}
    paths = {}
    for name, n in counts.items():
        docs = []
        for i in range(n):
            token = next(words)
            name_of[token] = (name, i)
            docs.append(encoding.decode([token]) + " x" * (15 + (i * 37) % 121))
        write_shards(docs, tmp_path / name, num_files=3, rows_per_group=-(-n // 6))
        paths[name] = tmp_path / name
    full = start_daemon(sources=paths)
    with full.feed(B, T, packing="bestfit", buffer_docs=buffer_docs) as feed:
        rows = [bestfit_rows(next(feed)) for _ in range(BEFORE)]
        state = feed.state_dict()
    pieces = state["cursor"]["mix"]["pieces"]
    assert 2 in pieces[::4], "the saved buffer should hold a piece of c, to be dropped"
    fewer = start_daemon(sources={n: paths[n] for n in ("a", "b")})

    def heads(windows: list[np.ndarray]) -> list[tuple[str, int]]:
        out = []
        for row in np.concatenate(windows).reshape(-1, T + 1):
            starts = np.flatnonzero(row == BOS_ID)
            out += [name_of[int(row[i + 1])] for i in starts
                    if i + 1 < len(row) and int(row[i + 1]) in name_of]
        return out

    with fewer.feed(B, T, packing="bestfit", buffer_docs=buffer_docs,
                    allow_source_changes=True) as feed:
        feed.load_state_dict(state)
        for _ in range(50):
            rows += [bestfit_rows(b) for b in feed.take(8)]
            seen = heads(rows)
            if all(sum(s == n for s, _ in seen) >= 80 for n in ("a", "b")):
                break
    for name in ("a", "b"):
        mine = [i for s, i in seen if s == name]
        assert len(mine) == len(set(mine)), f"source {name}: a document delivered twice"
        assert max(mine) < counts[name] - counts[name] // 3, "past the first epoch"
        missing = set(range(max(mine) - bound)) - set(mine)
        assert not missing, f"source {name}: documents {sorted(missing)} never delivered"
