"""exclude=PATH / serve --exclude PATH: listed documents are never delivered again.

The reference is built here, offline, from tests/oracle.py's rules: the rank's documents
with their identity (file, row group, file row), the listed ones removed, packed by the
reference packers; the daemon must deliver exactly that, bit for bit.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import BOS_ID, ENCODING, wait_until
from conftest import assert_batch_equals as assert_concat_equals
from oracle import Positions, bestfit_windows, rank_row_groups, split_files

from tokenfeed.common.errors import ConfigError, StateMismatchError

B, T = 2, 64
L = B * T + 1
BUFFER_DOCS, MIN_TAIL = 8, 32  # best fit: a buffer that turns over within an epoch
BESTFIT = {"packing": "bestfit", "buffer_docs": BUFFER_DOCS, "min_tail": MIN_TAIL}

Doc = tuple[str, int, int]  # (file name, row group, file row)


def labelled_documents(corpus: Path, encoding: Any, shuffle_seed: int | None = None
                       ) -> Iterator[tuple[Doc, list[int]]]:
    """Rank 0 of 1's documents (oracle rules 1-4), each with its identity."""
    files = split_files(corpus, "train")
    for epoch, ordinal, path, index in rank_row_groups(files, rank=0, world_size=1,
                                                       shuffle_seed=shuffle_seed):
        values = pq.ParquetFile(path).read_row_group(index, columns=["text"]).column(0)
        values = values.to_pylist()
        order = (np.arange(len(values)) if shuffle_seed is None else
                 np.random.default_rng([shuffle_seed, epoch, ordinal]).permutation(len(values)))
        for row in order:
            if isinstance(values[row], str):
                yield (path.name, index, int(row)), [BOS_ID, *encoding.encode_ordinary(values[row])]


def epoch_documents(corpus: Path) -> list[Doc]:
    files = split_files(corpus, "train")
    out = []
    for path in files:
        pf = pq.ParquetFile(path)
        for g in range(pf.num_row_groups):
            values = pf.read_row_group(g, columns=["text"]).column(0).to_pylist()
            out += [(path.name, g, r) for r, v in enumerate(values) if isinstance(v, str)]
    return out


def chosen(corpus: Path, every: int = 5, first: int = 1) -> list[Doc]:
    return epoch_documents(corpus)[first::every]


def write_list(path: Path, docs: list[Doc], form: str = "json") -> Path:
    lines = ["# documents after the spike"]
    for i, (file, g, r) in enumerate(docs):
        if form == "json":  # segments as `explain --json` prints them, extra keys and all
            lines.append(json.dumps({"source": "data", "file": file, "row_group": g, "row": r,
                                     "start": 0, "end": 9}))
            if i % 4 == 0:
                lines.append(json.dumps({"pad": 3}))
        else:
            lines.append(f"{file},{g},{r}")
    path.write_text("\n".join(lines) + "\n")
    return path


def concat_windows(docs: Iterator[list[int]], n: int) -> list[np.ndarray]:
    windows, pending = [], []
    while len(windows) < n:
        while len(pending) < L:
            pending.extend(next(docs))
        windows.append(np.array(pending[:L], dtype=np.int64))
        pending = pending[L:]
    return windows


def kept(corpus: Path, encoding: Any, excluded: set[Doc], *, from_token: int = 0,
         from_doc: int = 0, seen: list[Doc] | None = None) -> Iterator[list[int]]:
    """The rank's documents without the excluded ones, except those that begin before
    token `from_token` or are among the first `from_doc` (where a list began)."""
    token = 0
    for i, (doc, tokens) in enumerate(labelled_documents(corpus, encoding)):
        if doc not in excluded or token < from_token or i < from_doc:
            if seen is not None:
                seen.append(doc)
            yield tokens
        token += len(tokens)


def bestfit(docs: Iterator[list[int]], n: int) -> list[np.ndarray]:
    windows, _ = bestfit_windows(docs, bos_id=BOS_ID, batch_size=B, seq_len=T, num_batches=n,
                                 buffer_docs=BUFFER_DOCS, min_tail=MIN_TAIL,
                                 max_age_docs=8 * BUFFER_DOCS)
    return windows


def assert_batch_equals(batch: tuple[Any, Any], window: np.ndarray, where: str) -> None:
    """A concat window (B*T+1 tokens) or a best-fit one (B rows of T+1)."""
    if len(window) == L:
        assert_concat_equals(batch, window, where)
        return
    rows = window.reshape(B, T + 1)
    np.testing.assert_array_equal(batch[0].numpy(), rows[:, :-1], err_msg=where)
    np.testing.assert_array_equal(batch[1].numpy(), rows[:, 1:], err_msg=where)


def take(feed: Any, n: int) -> list[tuple[Any, Any]]:
    return [next(feed) for _ in range(n)]


def saved(feed: Any) -> dict[str, Any]:
    return json.loads(json.dumps(feed.state_dict()))


def epoch_batches(corpus: Path, encoding: Any, excluded: set[Doc]) -> int:
    one_epoch = islice(labelled_documents(corpus, encoding), len(epoch_documents(corpus)))
    tokens = sum(len(t) for doc, t in one_epoch if doc not in excluded)
    return tokens // L + 2  # a little past the epoch


@pytest.mark.parametrize("packing", ["concat", "bestfit"])
def test_listed_documents_are_never_delivered_and_the_rest_exactly_once(
        start_daemon, corpus, encoding, tmp_path, packing):
    excluded = set(chosen(corpus))
    path = write_list(tmp_path / "exclude.jsonl", sorted(excluded))
    n = epoch_batches(corpus, encoding, excluded)
    seen: list[Doc] = []
    docs = kept(corpus, encoding, excluded, seen=seen)
    want = concat_windows(docs, n) if packing == "concat" else bestfit(docs, n)
    # the reference itself: over the first epoch, every unlisted document once, no listed one
    first_epoch = seen[:len(epoch_documents(corpus)) - len(excluded)]
    assert sorted(first_epoch) == sorted(set(epoch_documents(corpus)) - excluded)
    daemon = start_daemon()
    options = BESTFIT if packing == "bestfit" else {}
    with daemon.feed(B, T, exclude=path, **options) as feed:
        for k, batch in enumerate(take(feed, n)):
            assert_batch_equals(batch, want[k], f"batch {k}")
        mark = feed.state_dict()["cursor"]["exclude"]
    assert len(mark["sha256"]) == 64 and (mark["unit"], mark["keep"]) == (0, 0)
    stream = daemon.status()["streams"]
    assert stream and stream[0]["excluded_documents"] >= len(excluded)


@pytest.mark.parametrize("packing", ["concat", "bestfit"])
def test_a_state_saved_under_a_list_resumes_exactly_under_it(
        start_daemon, corpus, encoding, tmp_path, packing):
    excluded = set(chosen(corpus, every=3))
    path = write_list(tmp_path / "exclude.csv", sorted(excluded), form="csv")
    docs = kept(corpus, encoding, excluded)
    want = concat_windows(docs, 40) if packing == "concat" else bestfit(docs, 40)
    daemon = start_daemon()
    options = BESTFIT if packing == "bestfit" else {}
    for k in (3, 17):
        with daemon.feed(B, T, exclude=path, **options) as feed:
            take(feed, k)
            state = saved(feed)
        with daemon.feed(B, T, exclude=path, **options) as feed:
            feed.load_state_dict(state)
            for i, batch in enumerate(take(feed, 40 - k)):
                assert_batch_equals(batch, want[k + i], f"resumed at {k}, batch {k + i}")


@pytest.mark.parametrize("packing", ["concat", "bestfit"])
@pytest.mark.slow
def test_a_list_begins_exactly_where_a_state_saved_without_one_resumes(
        start_daemon, corpus, encoding, tmp_path, packing):
    """After a loss spike: resume the checkpoint before it, excluding from there on."""
    excluded = set(chosen(corpus, every=2))
    path = write_list(tmp_path / "spike.jsonl", sorted(excluded))
    daemon = start_daemon()
    options = BESTFIT if packing == "bestfit" else {}
    k, n = 5, 45
    with daemon.feed(B, T, **options) as feed:
        take(feed, k)
        state = saved(feed)
    if packing == "concat":  # every document that begins after the position is subject
        want = concat_windows(kept(corpus, encoding, excluded, from_token=k * L), n + 1)
    else:  # every document not yet read into the buffer is subject
        read = documents_read(corpus, encoding, k)
        want = bestfit(kept(corpus, encoding, excluded, from_doc=read), n + 1)
    pack = concat_windows if packing == "concat" else bestfit
    # the test can tell: the list matters from the position on, and not before it
    assert not np.array_equal(want[n - 1], pack(kept(corpus, encoding, set()), n)[n - 1])
    assert not np.array_equal(want[k], pack(kept(corpus, encoding, excluded), k + 1)[k])
    with daemon.feed(B, T, exclude=path, **options) as feed:
        feed.load_state_dict(state)
        for i, batch in enumerate(take(feed, n - k)):
            assert_batch_equals(batch, want[k + i], f"batch {k + i}")
        later = saved(feed)
    with daemon.feed(B, T, exclude=path, **options) as feed:  # and that state resumes too
        feed.load_state_dict(later)
        assert_batch_equals(next(feed), want[n], f"batch {n}, resumed")


def _sha(state: dict[str, Any]) -> str:
    return str(state["cursor"]["exclude"]["sha256"])


def documents_read(corpus: Path, encoding: Any, k: int) -> int:
    """The documents best fit has read once it has cut its first `k` windows."""
    read = 0

    def docs() -> Iterator[list[int]]:
        nonlocal read
        for _, tokens in labelled_documents(corpus, encoding):
            read += 1
            yield tokens

    bestfit(docs(), k)
    return read


def test_a_state_refuses_to_resume_under_another_list_naming_both_hashes(
        start_daemon, corpus, tmp_path):
    first = write_list(tmp_path / "a.jsonl", chosen(corpus, every=4))
    other = write_list(tmp_path / "b.jsonl", chosen(corpus, every=6))
    daemon = start_daemon()
    with daemon.feed(B, T, exclude=first) as feed:
        take(feed, 3)
        state = saved(feed)
    with daemon.feed(B, T, exclude=other) as feed:
        take(feed, 1)
        now = _sha(saved(feed))
    assert now != _sha(state)
    with daemon.feed(B, T, exclude=other) as feed:
        feed.load_state_dict(state)
        with pytest.raises(StateMismatchError) as e:
            next(feed)
    assert _sha(state) in str(e.value) and now in str(e.value)
    assert "exclusion file kept next to that checkpoint" in str(e.value)
    with daemon.feed(B, T) as feed:  # no list at all: refused as well
        feed.load_state_dict(state)
        with pytest.raises(StateMismatchError, match=f"{_sha(state)}.*excludes nothing"):
            next(feed)


def test_the_token_cache_never_serves_a_unit_under_another_list(
        start_daemon, corpus, encoding, tmp_path):
    """Cached units are whole; rows are dropped as they are served."""
    excluded = set(chosen(corpus, every=3))
    path = write_list(tmp_path / "exclude.jsonl", sorted(excluded))
    daemon = start_daemon("--cache-dir", str(tmp_path / "cache"))
    n = epoch_batches(corpus, encoding, set())
    row_groups = sum(pq.ParquetFile(f).num_row_groups for f in split_files(corpus, "train"))
    with daemon.feed(B, T) as feed:
        take(feed, n)  # an epoch without the list: the cache holds every row group whole
    wait_until(lambda: daemon.status()["cache"]["writes"] >= row_groups, what="cache writes")
    want = concat_windows(kept(corpus, encoding, excluded), 30)
    with daemon.feed(B, T, exclude=path) as feed:
        for k, batch in enumerate(take(feed, 30)):
            assert_batch_equals(batch, want[k], f"batch {k} under the list")
    assert daemon.status()["cache"]["hits"] >= row_groups
    plain = concat_windows(kept(corpus, encoding, set()), 30)
    with daemon.feed(B, T) as feed:
        for k, batch in enumerate(take(feed, 30)):
            assert_batch_equals(batch, plain[k], f"batch {k} without it")


def test_serve_exclude_applies_to_every_stream_of_the_daemon(
        start_daemon, corpus, encoding, tmp_path):
    excluded = set(chosen(corpus, every=4, first=2))
    path = write_list(tmp_path / "daemon.csv", sorted(excluded), form="csv")
    daemon = start_daemon("--exclude", str(path))
    assert daemon.status()["exclude"]["documents"] == len(excluded)
    want = concat_windows(kept(corpus, encoding, excluded), 30)
    with daemon.feed(B, T) as feed:
        for k, batch in enumerate(take(feed, 30)):
            assert_batch_equals(batch, want[k], f"batch {k}")
        state = saved(feed)
    assert _sha(state) == daemon.status()["exclude"]["sha256"]
    with daemon.feed(B, T) as feed:  # its states resume on it exactly
        feed.load_state_dict(state)
        assert_batch_equals(next(feed), concat_windows(kept(corpus, encoding, excluded),
                                                       31)[30], "resumed")


def test_the_daemons_list_and_the_feeds_add_up(start_daemon, corpus, encoding, tmp_path):
    served = set(chosen(corpus, every=5, first=0))
    sent = set(chosen(corpus, every=7, first=3))
    daemon = start_daemon("--exclude", str(write_list(tmp_path / "d.csv", sorted(served),
                                                      form="csv")))
    path = write_list(tmp_path / "f.jsonl", sorted(sent))
    want = concat_windows(kept(corpus, encoding, served | sent), 30)
    with daemon.feed(B, T, exclude=path) as feed:
        for k, batch in enumerate(take(feed, 30)):
            assert_batch_equals(batch, want[k], f"batch {k}")
        union = _sha(saved(feed))
    both = write_list(tmp_path / "both.jsonl", sorted(served | sent))
    with daemon.feed(B, T, exclude=both) as feed:  # the union, sent whole: the same list
        next(feed)
        assert _sha(saved(feed)) == union


@pytest.mark.parametrize("line,fix", [
    ("shard_a.parquet,0", "3 or 4"),
    ('{"file": "x.parquet", "row": 1}', "no row_group"),
    ("x.parquet,zero,1", "'zero' is not an integer"),
    ("{not json", "not JSON"),
])
@pytest.mark.slow
def test_a_malformed_line_fails_at_construction_naming_it(start_daemon, tmp_path, line, fix):
    path = tmp_path / "bad.txt"
    path.write_text(f"# a comment\n\n{line}\n")
    daemon = start_daemon()
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))} line 3: .*{re.escape(fix)}"):
        daemon.feed(B, T, exclude=path)


@pytest.mark.parametrize("entry,fix", [
    ("elsewhere.parquet,0,0", "is not a shard of source 'data'"),
    ("{first},7,0", "has 3 row groups, so row_group 7 does not exist"),
    ("{first},0,100000", "so row 100000 does not exist"),
    ("/not/the/root/{first},0,0", "is not a shard of source 'data'"),
])
@pytest.mark.slow
def test_an_entry_the_daemon_does_not_serve_fails_at_attach_naming_the_line(
        start_daemon, corpus, tmp_path, entry, fix):
    first = split_files(corpus, "train")[0].name
    path = tmp_path / "bad.csv"
    path.write_text(f"{first},0,0\n{entry.format(first=first)}\n")
    daemon = start_daemon()
    with daemon.feed(B, T, exclude=path) as feed, pytest.raises(
            ConfigError, match=rf"{re.escape(str(path))} line 2: .*{re.escape(fix)}"):
        next(feed)


def test_an_absolute_path_under_the_root_names_the_same_document(start_daemon, corpus, tmp_path):
    docs = chosen(corpus, every=7)
    by_name = write_list(tmp_path / "names.csv", docs, form="csv")
    by_path = tmp_path / "paths.csv"
    by_path.write_text("".join(f"{corpus / f},{g},{r}\n" for f, g, r in docs))
    daemon = start_daemon()
    shas = []
    for path in (by_name, by_path):
        with daemon.feed(B, T, exclude=path) as feed:
            next(feed)
            shas.append(_sha(saved(feed)))
    assert shas[0] == shas[1]


def test_serve_refuses_a_bad_exclusion_file_at_start(corpus, tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("missing.parquet,0,0\n")
    run = subprocess.run(
        [sys.executable, "-m", "tokenfeed.producer", "serve", "--data", str(corpus),
         "--run-dir", str(tmp_path / "run"), "--tokenizer", ENCODING, "--exclude", str(path),
         "--tokenizer-backend", "tiktoken"], capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert f"{path} line 1: 'missing.parquet' is not a shard" in run.stderr


# -- any configuration: a listed row is read exactly as a null one -----------------

def nulled_copy(corpus: Path, out: Path, excluded: set[Doc]) -> Path:
    """The corpus with the listed rows' text made null: same names, same row groups."""
    out.mkdir()
    for path in sorted(corpus.glob("*.parquet")):
        pf = pq.ParquetFile(path)
        with pq.ParquetWriter(out / path.name, pf.schema_arrow) as writer:
            for g in range(pf.num_row_groups):
                table = pf.read_row_group(g)
                values = table.column("text").to_pylist()
                for row in range(len(values)):
                    if (path.name, g, row) in excluded:
                        values[row] = None
                column = table.schema.get_field_index("text")
                writer.write_table(table.set_column(column, "text",
                                                    pa.array(values, pa.string())))
    return out


def run_scenario(daemon: Any, scenario: str, exclude: Path | None) -> list[list[np.ndarray]]:
    """Each rank's batches of `scenario`, as arrays (`exclude`: the feeds' list)."""
    listed = {"exclude": exclude} if exclude is not None else {}
    if scenario == "shuffled 2 ranks":
        out = []
        for rank in range(2):
            with daemon.feed(B, T, rank=rank, world_size=2, shuffle_seed=7, **listed) as f:
                out.append([np.concatenate([t.numpy().ravel() for t in next(f)])
                            for _ in range(25)])
        return out
    if scenario == "mixture":
        with daemon.feed(B, T, mix={"a": 0.6, "b": 0.4}, **listed) as f:
            return [[np.concatenate([t.numpy().ravel() for t in next(f)]) for _ in range(40)]]
    raise AssertionError(f"unknown scenario {scenario!r}")


@pytest.mark.parametrize("scenario", [
    "shuffled 2 ranks", pytest.param("mixture", marks=pytest.mark.slow)])
@pytest.mark.slow
def test_a_listed_row_is_delivered_exactly_as_a_null_one_would_be(
        start_daemon, corpus, tmp_path, scenario):
    """Shuffled, elastic and mixed streams need nothing of their own: the stream under a
    list is, bit for bit, the stream of a copy of the data with those rows null."""
    excluded = set(chosen(corpus, every=3))
    nulled = nulled_copy(corpus, tmp_path / "nulled", excluded)
    if scenario == "mixture":  # the list names source a; b is the corpus as it is
        path = tmp_path / "mix.csv"
        path.write_text("".join(f"a,{f},{g},{r}\n" for f, g, r in sorted(excluded)))
        b = shutil.copytree(corpus, tmp_path / "b")  # two sources never share a folder
        listed = start_daemon(sources={"a": corpus, "b": b})
        plain = start_daemon(sources={"a": nulled, "b": b})
    else:
        path = write_list(tmp_path / "list.jsonl", sorted(excluded))
        listed, plain = start_daemon(), start_daemon(data=nulled)
    got = run_scenario(listed, scenario, path)
    want = run_scenario(plain, scenario, None)
    for rank, (g, w) in enumerate(zip(got, want, strict=True)):
        for k, (a, b) in enumerate(zip(g, w, strict=True)):
            np.testing.assert_array_equal(a, b, err_msg=f"{scenario}: rank {rank}, batch {k}")


class ListedPositions(Positions):
    """The oracle's positions of the nulled copy, weighed (rule 8) by the footers of the
    data the daemon serves: a list leaves footers as they are, so elastic chunks do too."""

    def __init__(self, nulled: Path, served: Path, **kwargs: Any) -> None:
        super().__init__(nulled, **kwargs)
        self.served = Positions(served, **kwargs)

    def weight(self, kind: int, g: int, a: int) -> int:
        return self.served.weight(kind, g, a)


@pytest.mark.parametrize("packing", ["concat", pytest.param("bestfit", marks=pytest.mark.slow)])
def test_an_elastic_resume_under_a_list_matches_the_oracle(
        start_daemon, corpus, encoding, tmp_path, packing):
    from test_elastic import BESTFIT as ELASTIC_BESTFIT
    from test_elastic import expected, run_old_job, window_of

    excluded = set(chosen(corpus, every=3))
    path = write_list(tmp_path / "list.jsonl", sorted(excluded))
    pos = ListedPositions(nulled_copy(corpus, tmp_path / "nulled", excluded), corpus,
                          enc=encoding, bos_id=BOS_ID)
    kw = {**(ELASTIC_BESTFIT if packing == "bestfit" else {}), "exclude": path}
    k, n = 6, 10
    daemon = start_daemon()
    states, _ = run_old_job(daemon, 2, k, **kw)
    want = expected(pos, 2, k, 3, packing, n)
    for rank in range(3):
        with daemon.feed(B, T, rank=rank, world_size=3, **kw) as feed:
            feed.load_state_dict(states)
            for i in range(n):
                np.testing.assert_array_equal(window_of(next(feed), packing), want[rank][i],
                                              err_msg=f"new rank {rank}, batch {i}")
    without = {k: v for k, v in kw.items() if k != "exclude"}
    with daemon.feed(B, T, rank=0, world_size=3, **without) as feed, pytest.raises(
            StateMismatchError, match="excludes nothing"):
        feed.load_state_dict(states)  # the job's list is in force: not without it
        next(feed)


# -- the file and the wire (no daemon) ------------------------------------------

def test_explain_batch_lines_segments_and_csv_read_as_the_same_entries(tmp_path):
    from tokenfeed.common.exclude import read_exclude_file

    segment = {"source": "web", "file": "s1.parquet", "row_group": 2, "row": 5, "start": 0,
               "end": 40}
    batch = {"batch": 0, "rows": [[segment, {"pad": 3}],
                                  [{**segment, "row": 6, "start": 12}]]}
    path = tmp_path / "mixed.txt"
    path.write_text("\n".join(["# from explain", json.dumps(batch), "", "web,s1.parquet,2,7",
                               "s2.parquet, 0, 1", json.dumps({"pad": 9})]) + "\n")
    got = [(e.line, e.source, e.file, e.row_group, e.row) for e in read_exclude_file(path)]
    assert got == [(2, "web", "s1.parquet", 2, 5), (2, "web", "s1.parquet", 2, 6),
                   (4, "web", "s1.parquet", 2, 7), (5, None, "s2.parquet", 0, 1)]


def test_the_wire_carries_the_entries_and_refuses_too_many(tmp_path):
    from tokenfeed.common.errors import ProtocolError
    from tokenfeed.common.exclude import MAX_ATTACH_ENTRIES, Entry, from_wire, to_wire

    entries = [Entry(i + 1, "web" if i % 2 else None, f"s{i % 3}.parquet", i % 5, i)
               for i in range(50)]
    assert sorted(from_wire(to_wire(entries, "x")), key=lambda e: e.line) == entries
    many = [Entry(1, None, "s.parquet", 0, i) for i in range(MAX_ATTACH_ENTRIES + 1)]
    with pytest.raises(ConfigError, match="serve --exclude x"):
        to_wire(many, "x")
    with pytest.raises(ProtocolError):
        from_wire([["", "s.parquet", b"\0" * 13]])  # not whole triples
    with pytest.raises(ProtocolError):
        from_wire([["", "s.parquet", b"\0" * 12 * (MAX_ATTACH_ENTRIES + 1)]])


def test_the_hash_is_of_the_normalized_list(corpus):
    from tokenfeed.common.exclude import Entry
    from tokenfeed.producer.dataset import scan_dataset
    from tokenfeed.producer.exclude import resolve

    datasets = {"data": scan_dataset(corpus)}
    docs = chosen(corpus, every=4)
    plain = [Entry(i, None, f, g, r) for i, (f, g, r) in enumerate(docs)]
    other_form = [Entry(i, "data", str(corpus / f), g, r)
                  for i, (f, g, r) in enumerate(reversed(docs + docs[:3]))]  # repeats too
    a, b = resolve(plain, datasets, "a"), resolve(other_form, datasets, "b")
    assert a.sha256 == b.sha256 and len(a) == len(docs)
    assert resolve(plain[1:], datasets, "c").sha256 != a.sha256


def test_a_list_begins_exactly_where_a_mixture_state_saved_without_one_resumes(
        start_daemon, corpus, encoding, tmp_path):
    """Per source, the documents delivered (in part or whole) before the position stay;
    the mixing rule (oracle rule 7) then runs on what remains."""
    from oracle import mix_documents

    excluded = set(chosen(corpus, every=2, first=0))
    path = tmp_path / "mix.csv"
    path.write_text("".join(f"a,{f},{g},{r}\n" for f, g, r in sorted(excluded)))
    # b: the same documents in a folder of its own (two sources never share one)
    daemon = start_daemon(sources={"a": corpus, "b": shutil.copytree(corpus, tmp_path / "b")})
    weights = {"a": 0.6, "b": 0.4}
    k, n = 7, 30
    with daemon.feed(B, T, mix=weights) as feed:
        take(feed, k)
        state = saved(feed)
    # documents of source a delivered in part or whole: its units before the exact one
    # (a unit is a row group, in order, one rank), then the exact one's documents
    per_unit = [sum(1 for d in epoch_documents(corpus) if d[:2] == (f, g))
                for f, g in dict.fromkeys(d[:2] for d in epoch_documents(corpus))]
    unit, doc, token = state["cursor"]["mix"]["exact"]["a"]
    delivered = sum(per_unit[u % len(per_unit)] for u in range(unit)) + doc + (token > 0)

    def source_a() -> Iterator[list[int]]:
        for i, (d, tokens) in enumerate(labelled_documents(corpus, encoding)):
            if i < delivered or d not in excluded:
                yield tokens

    def windows(a: Iterator[list[int]]) -> list[np.ndarray]:
        b = (t for _, t in labelled_documents(corpus, encoding))
        mixed = mix_documents({"a": a, "b": b}, [(0, weights)])
        return concat_windows((tokens for _, tokens in mixed), n + 1)

    want = windows(source_a())
    # the test can tell: the list matters from the position on, and not before it
    assert not np.array_equal(want[n - 1], windows(kept(corpus, encoding, set()))[n - 1])
    assert not np.array_equal(want[k], windows(kept(corpus, encoding, excluded))[k])
    with daemon.feed(B, T, mix=weights, exclude=path) as feed:
        feed.load_state_dict(state)
        for i, batch in enumerate(take(feed, n - k)):
            assert_batch_equals(batch, want[k + i], f"batch {k + i}")
        later = saved(feed)
    with daemon.feed(B, T, mix=weights, exclude=path) as feed:
        feed.load_state_dict(later)
        assert_batch_equals(next(feed), want[n], f"batch {n}, resumed")


def test_a_list_cannot_begin_at_an_elastic_resume(start_daemon, corpus, tmp_path):
    path = write_list(tmp_path / "list.jsonl", chosen(corpus, every=3))
    daemon = start_daemon()
    states = []
    for rank in range(2):
        with daemon.feed(B, T, rank=rank, world_size=2) as feed:
            take(feed, 3)
            states.append(saved(feed))
    with daemon.feed(B, T, rank=0, world_size=3, exclude=path) as feed:
        feed.load_state_dict(states)
        with pytest.raises(StateMismatchError, match=r"cannot begin at an elastic resume.*"
                           r"resume at the saved number of ranks"):
            next(feed)
