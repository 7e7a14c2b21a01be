"""Filters on metadata columns (producer/filters.py): the parser, and what a daemon delivers.

The daemon's output is compared with an independent reference: the same predicate
written directly as pyarrow.compute calls (not through filters.py), evaluated offline
on each row group in the rank's order (tests/oracle.py's rules 1-5), the kept texts
tokenized with tiktoken and cut into windows.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import tiktoken
from conftest import BOS_ID, assert_batch_equals, wait_until
from oracle import bestfit_windows, mix_documents, rank_documents, rank_row_groups, split_files

from tokenfeed.common.errors import ConfigError, StateMismatchError
from tokenfeed.producer.bestfit import DEFAULT_BUFFER_DOCS, DEFAULT_MAX_AGE_DOCS, DEFAULT_MIN_TAIL
from tokenfeed.producer.config import DaemonConfig, load_mix_file
from tokenfeed.producer.filters import Filter, FilterError
from tokenfeed.tools.corpus import sample_documents

B, T = 2, 64
FILTER = "int_score >= 3 and language == 'en'"
LANGUAGES = ["en", "en", "fr", None, "en", "de", "en"]

# The predicates below, written as plain pyarrow.compute calls over a row group's columns.
Offline = Callable[[pa.Table], pa.Array]


def offline_filter(t: pa.Table) -> pa.Array:  # FILTER
    return pc.and_kleene(pc.greater_equal(t["int_score"], 3), pc.equal(t["language"], "en"))


def offline_other(t: pa.Table) -> pa.Array:  # "int_score < 3 or language is null"
    return pc.or_kleene(pc.less(t["int_score"], 3), pc.is_null(t["language"]))


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 files x 3 row groups of real text with `int_score` (0-5, some null) and
    `language` (some null) columns; every row group keeps some documents and drops some."""
    docs = sample_documents(120_000)
    out = tmp_path_factory.mktemp("scored")
    per_file = -(-len(docs) // 4)
    for f in range(4):
        chunk = docs[f * per_file:(f + 1) * per_file]
        first = f * per_file
        score = [None if (first + i) % 13 == 5 else (first + i) * 7 % 6 for i in range(len(chunk))]
        lang = [LANGUAGES[(first + i) % len(LANGUAGES)] for i in range(len(chunk))]
        table = pa.table({"text": pa.array(chunk, pa.string()),
                          "int_score": pa.array(score, pa.int64()),
                          "language": pa.array(lang, pa.string()),
                          "url": pa.array([f"doc{first + i}" for i in range(len(chunk))])})
        pq.write_table(table, out / f"part-{f:03d}.parquet",
                       row_group_size=-(-len(chunk) // 3))
    return out


def kept_documents(data: Path, keep: Offline | None, *, rank: int, world_size: int,
                   units: int) -> Iterator[tuple[list[str], int]]:
    """Per unit of the rank (oracle rules 1-3): the texts `keep` keeps, and rows dropped."""
    files = split_files(data, "train")
    for _, (_, _, path, index) in zip(range(units), rank_row_groups(
            files, rank=rank, world_size=world_size), strict=False):
        table = pq.ParquetFile(path).read_row_group(index)
        mask = (pc.fill_null(keep(table), False).to_pylist() if keep is not None
                else [True] * table.num_rows)
        texts = [t for t, m in zip(table["text"].to_pylist(), mask, strict=True) if m]
        yield texts, table.num_rows - len(texts)


def expected_windows(data: Path, enc: tiktoken.Encoding, keep: Offline | None, *, rank: int = 0,
                     world_size: int = 1, n: int) -> list[np.ndarray]:
    """The first `n` concat windows of the kept documents (oracle rule 5)."""
    size = B * T + 1
    stream: list[int] = []
    for texts, _ in kept_documents(data, keep, rank=rank, world_size=world_size, units=10_000):
        for text in texts:
            stream += [BOS_ID, *enc.encode_ordinary(text)]
        if len(stream) >= n * size:
            break
    return [np.array(stream[k * size:(k + 1) * size], dtype=np.int64) for k in range(n)]


def kept_token_docs(data: Path, enc: tiktoken.Encoding, keep: Offline) -> Iterator[list[int]]:
    """Infinite: the kept documents' tokens, BOS first, in rank 0 of 1's order."""
    for texts, _ in kept_documents(data, keep, rank=0, world_size=1, units=10**9):
        for text in texts:
            yield [BOS_ID, *enc.encode_ordinary(text)]


def counts_before(data: Path, keep: Offline, unit: int) -> list[int]:
    """[kept, dropped] in rank 0 of 1's units before `unit`, computed offline."""
    counts = [0, 0]
    for texts, dropped in kept_documents(data, keep, rank=0, world_size=1, units=unit):
        counts[0] += len(texts)
        counts[1] += dropped
    return counts


def take(feed: Any, n: int) -> list[tuple[Any, Any]]:
    return [next(feed) for _ in range(n)]


# -- the parser ---------------------------------------------------------------

@pytest.mark.parametrize("text, normal", [
    ("int_score >= 3 and language == 'en'", "(int_score >= 3) and (language == 'en')"),
    ('language in ["en", "de",]', "language in ['en', 'de']"),
    ("language not in ['fr'] or int_score is null",
     "(language not in ['fr']) or (int_score is null)"),
    ("not (a < 1.5e2 or b != -2)", "not ((a < 150.0) or (b != -2))"),
    ("3 <= int_score", "3 <= int_score"),
    ("`odd name` is not null and flag", "(`odd name` is not null) and (flag)"),
    ("s == 'it\\'s'", "s == 'it\\'s'"),
    ("x == true or y == 1_000", "(x == true) or (y == 1000)"),
])
def test_filters_parse_to_one_normal_form(text: str, normal: str) -> None:
    parsed = Filter.parse(text)
    assert parsed.text == normal
    assert Filter.parse(normal).text == normal  # normalizing twice changes nothing


@pytest.mark.parametrize("text, where", [
    ("score >= ", "expected a column, a value or '('"),
    ("__import__('os')", "calls and indexing are not part of a filter"),
    ("os.system('ls')", "calls and indexing are not part of a filter"),
    ("a[0] == 1", "calls and indexing are not part of a filter"),
    ("a + 1 > 2", "unexpected character '+'"),
    ("a - 1 > 2", "unexpected character '-'"),
    ("a -1 > 2", "arithmetic is not part of a filter"),
    ("a == 1; import os", "unexpected character ';'"),
    ("lambda: 1", "unexpected character ':'"),
    ("a == null", "'column is null'"),
    ("1 == 2", "a comparison must name a column"),
    ("'en'", "a value alone is not a condition"),
    ("(a == 1", "expected ')'"),
    ("a in []", "expected a number, a 'string', true or false"),
    ("a in ['x', b]", "expected a number, a 'string', true or false"),
    ("a == 1 b == 2", "expected 'and', 'or' or the end"),
    ("a is 3", "expected 'null' after 'is'"),
    ("(a == 1) == 2", "only a column or a value may be compared"),
    ("a == 'open", "unexpected character \"'\""),
    ("a == 1 and", "expected a column, a value or '('"),
    ("not" + " not" * 70 + " a", "nested deeper than 64"),
    ("{'a': 1}", "unexpected character '{'"),
    ("a == f'{x}'", "expected 'and', 'or' or the end"),
])
def test_text_outside_the_grammar_is_a_parse_error_pointing_at_it(text: str, where: str) -> None:
    with pytest.raises(FilterError, match=r"filter .*at character") as e:
        Filter.parse(text)
    assert where in str(e.value)
    assert "int_score >= 3 and language == 'en'" in str(e.value)  # the fix: an example


def test_an_empty_filter_says_to_leave_it_out() -> None:
    with pytest.raises(FilterError, match="leave it out"):
        Filter.parse("  ")


@pytest.mark.parametrize("text, offline", [
    (FILTER, offline_filter),
    ("int_score < 3 or language is null", offline_other),
    ("not (int_score >= 3)", lambda t: pc.invert(pc.greater_equal(t["int_score"], 3))),
    ("language not in ['en', 'fr']",
     lambda t: pc.and_kleene(pc.invert(pc.is_in(t["language"], pa.array(["en", "fr"]))),
                             pc.is_valid(t["language"]))),
    ("int_score != 2 and int_score > 0.5",
     lambda t: pc.and_kleene(pc.not_equal(t["int_score"], 2), pc.greater(t["int_score"], 0.5))),
])
def test_a_mask_keeps_the_rows_the_predicate_holds_for_nulls_dropped(
        text: str, offline: Offline) -> None:
    table = pa.table({"int_score": [0, 1, 2, 3, 4, 5, None, 3, 4, None],
                      "language": ["en", "fr", None, "en", "de", "en", "en", None, "en", None]})
    assert Filter.parse(text).mask(table).to_pylist() == pc.fill_null(
        offline(table), False).to_pylist()


def test_a_worker_reads_each_part_as_the_filter_keeps_it_in_file_or_seeded_order(
        tmp_path: Path) -> None:
    """A worker's rows of a filtered row group, in parts, in file order and shuffled: the
    text where the offline predicate holds (a null text stays null), None elsewhere; a
    row group the filter drops whole gives None for every row."""
    from tokenfeed.producer.worker import RowGroupReader

    n = 50
    texts = [None if i % 11 == 4 else f"document {i}" for i in range(n)]
    table = pa.table({"text": pa.array(texts, pa.string()),
                      "int_score": pa.array([None if i % 9 == 2 else i % 6 for i in range(n)],
                                            pa.int64()),
                      "language": pa.array([LANGUAGES[i % len(LANGUAGES)] for i in range(n)],
                                           pa.string())})
    path = tmp_path / "rg.parquet"
    pq.write_table(pa.concat_tables([table, table.slice(0, 10).set_column(
        1, "int_score", pa.array([0] * 10, pa.int64()))]), path, row_group_size=n)
    keep = pc.fill_null(offline_filter(table), False).to_pylist()
    want = [t if k else None for t, k in zip(texts, keep, strict=True)]
    text = Filter.parse(FILTER).text
    reader = RowGroupReader()
    for seed in (None, [7, 0, 1]):
        order = (list(range(n)) if seed is None
                 else np.random.default_rng(seed).permutation(n).tolist())
        got = [v for lo, hi in ((0, 17), (17, 18), (18, 50))
               for v in reader.values(str(path), 0, "text", (lo, hi), seed, "", text)]
        assert got == [want[i] for i in order]
    assert reader.values(str(path), 1, "text", (0, 10), None, "", text) == [None] * 10
    assert reader.values(str(path), 1, "text", (0, 10), [1, 2, 3], "", text) == [None] * 10


def test_a_missing_column_or_a_type_mismatch_names_the_column_and_its_type() -> None:
    schema = pa.schema([("text", pa.string()), ("int_score", pa.int64()),
                        ("language", pa.string()), ("when", pa.timestamp("s"))])
    with pytest.raises(FilterError, match=r"column 'langauge', which the data does not have "
                       r"\(its columns: text, int_score, language, when\)"):
        Filter.parse("langauge == 'en'").check(schema, "source data")
    with pytest.raises(FilterError, match=r"column 'language' has type string .* compared "
                       r"with number 3; compare it with a string"):
        Filter.parse("language >= 3").check(schema, "source data")
    with pytest.raises(FilterError, match=r"column 'int_score' has type int64 .* compared "
                       r"with string 'a'"):
        Filter.parse("int_score in [1, 'a']").check(schema, "source data")
    with pytest.raises(FilterError, match=r"column 'when' has type timestamp\[s\], which "
                       "filters do not compare"):
        Filter.parse("when is null").check(schema, "source data")
    with pytest.raises(FilterError, match=r"'int_score' has type int64, not bool"):
        Filter.parse("int_score").check(schema, "source data")


def test_serve_refuses_a_filter_outside_the_grammar(tmp_path: Path) -> None:
    with pytest.raises(FilterError, match="calls and indexing"):
        DaemonConfig(data_dir=tmp_path, run_dir=tmp_path / "run", filter="__import__('os')")
    with pytest.raises(ConfigError, match="a mixture's sources each take theirs"):
        DaemonConfig(sources=load_mix_file(_mix_file(tmp_path, "a >= 1"))[0],
                     run_dir=tmp_path / "run", filter="a >= 1")
    with pytest.raises(FilterError, match=r"sources.web.filter: filter 'score >= '"):
        load_mix_file(_mix_file(tmp_path, "score >= "))


def test_a_mix_file_gives_each_source_its_filter(tmp_path: Path) -> None:
    sources, _ = load_mix_file(_mix_file(tmp_path, FILTER))
    assert {s.name: s.filter for s in sources} == {"web": FILTER, "code": None}


def _mix_file(tmp_path: Path, web_filter: str) -> Path:
    path = tmp_path / "mix.toml"
    path.write_text(f'[sources.web]\npath = "{tmp_path}/web"\nweight = 0.7\n'
                    f'filter = "{web_filter}"\n[sources.code]\npath = "{tmp_path}/code"\n')
    return path


# -- what a daemon delivers ---------------------------------------------------

def test_one_rank_gets_exactly_the_documents_the_filter_keeps_in_order(
        start_daemon: Any, scored: Path, encoding: tiktoken.Encoding) -> None:
    units = sum(pq.ParquetFile(p).num_row_groups for p in split_files(scored, "train"))
    epoch_tokens = sum(len(encoding.encode_ordinary(t)) + 1 for texts, _ in kept_documents(
        scored, offline_filter, rank=0, world_size=1, units=units) for t in texts)
    n = epoch_tokens // (B * T + 1) + 3  # into the second epoch
    expected = expected_windows(scored, encoding, offline_filter, n=n)
    unfiltered = expected_windows(scored, encoding, None, n=1)
    assert not np.array_equal(expected[0], unfiltered[0])  # the filter changes the stream
    d = start_daemon("--filter", FILTER, data=scored, workers=1)
    with d.feed(B, T) as feed:
        for k, batch in enumerate(take(feed, n)):
            assert_batch_equals(batch, expected[k], f"batch {k}")
        state = feed.state_dict()
    assert state["cursor"]["filters"] == {"data": "(int_score >= 3) and (language == 'en')"}
    unit = state["cursor"]["unit"]
    assert unit >= units  # into the second epoch
    assert state["cursor"]["filtered"] == {"data": counts_before(scored, offline_filter, unit)}


def test_kept_and_dropped_counts_are_those_of_the_units_read(
        start_daemon: Any, scored: Path) -> None:
    """One worker finishes units in order: every status the daemon reports counts the
    kept and dropped documents of a prefix of the rank's units, exactly."""
    counts = [(len(texts), dropped) for texts, dropped in kept_documents(
        scored, offline_filter, rank=0, world_size=1, units=200)]
    prefixes = {tuple(np.sum(counts[:k], axis=0).tolist()) if k else (0, 0)
                for k in range(len(counts) + 1)}
    d = start_daemon("--filter", FILTER, "--metrics-port", "0", data=scored, workers=1)
    with d.feed(B, T) as feed:
        take(feed, 5)
        status = d.status()
        (stream,) = status["streams"]
        figures = stream["filters"]["data"]
        assert figures["filter"] == "(int_score >= 3) and (language == 'en')"
        assert (figures["kept"], figures["dropped"]) in prefixes
        assert figures["kept"] > 0 and figures["dropped"] > 0
        assert figures["kept"] == stream["documents"]
        assert status["sources"]["data"]["filter"] == figures["filter"]
        # the exporter serves the status published at the last heartbeat: wait for one
        # that holds the stream
        scraped = wait_until(lambda: _scrape_filter_counts(status["metrics_url"]),
                             what="filter counts in /metrics")
    assert (scraped["kept"], scraped["dropped"]) in prefixes


def _scrape_filter_counts(url: str) -> dict[str, int] | None:
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    scraped = {}
    for line in text.splitlines():
        for what in ("kept", "dropped"):
            if line.startswith(f"tokenfeed_filter_{what}_documents_total{{"):
                assert 'source="data"' in line
                scraped[what] = int(float(line.rsplit(" ", 1)[1]))
    return scraped if len(scraped) == 2 else None


def test_two_ranks_each_get_their_row_groups_filtered(
        start_daemon: Any, scored: Path, encoding: tiktoken.Encoding) -> None:
    n = 15
    d = start_daemon("--filter", FILTER, data=scored)
    feeds = [d.feed(B, T, rank=r, world_size=2) for r in range(2)]
    try:
        for rank, feed in enumerate(feeds):
            expected = expected_windows(scored, encoding, offline_filter, rank=rank,
                                        world_size=2, n=n)
            for k, batch in enumerate(take(feed, n)):
                assert_batch_equals(batch, expected[k], f"rank {rank} batch {k}")
    finally:
        for feed in feeds:
            feed.close()


def test_a_filter_on_a_missing_column_or_of_another_type_fails_the_attach(
        start_daemon: Any, scored: Path) -> None:
    d = start_daemon("--filter", "score >= 3", data=scored)
    with d.feed(B, T) as feed, pytest.raises(ConfigError, match=r"column 'score', which "
                                             r"the data does not have \(its columns: text, "
                                             r"int_score, language, url\)"):
        next(feed)
    d2 = start_daemon("--filter", "language >= 3", data=scored)
    with d2.feed(B, T) as feed, pytest.raises(
            ConfigError, match=r"column 'language' has type string \(string\), compared with "
                               r"number 3"):
        next(feed)


@pytest.mark.slow
def test_a_resume_continues_exactly_and_refuses_another_filter(
        start_daemon: Any, scored: Path, encoding: tiktoken.Encoding, tmp_path: Path) -> None:
    expected = expected_windows(scored, encoding, offline_filter, n=12)
    d = start_daemon("--filter", FILTER, data=scored)
    with d.feed(B, T) as feed:
        take(feed, 7)
        state = json.loads(json.dumps(feed.state_dict()))
    d.stop()
    same = start_daemon("--filter", "language == 'en' and int_score >= 3.0", data=scored)
    with same.feed(B, T) as feed:  # another spelling of another filter: refused
        feed.load_state_dict(state)
        with pytest.raises(StateMismatchError, match=r"source data: \"\(int_score >= 3\) and "
                           r"\(language == 'en'\)\" -> \"\(language == 'en'\) and \(int_score "
                           r">= 3.0\)\".*--allow-filter-changes"):
            next(feed)
    same.stop()
    again = start_daemon("--filter", "int_score>=3   and language=='en'", data=scored)
    with again.feed(B, T) as feed:  # the same filter, written otherwise: continues exactly
        feed.load_state_dict(state)
        for k, batch in enumerate(take(feed, 5)):
            assert_batch_equals(batch, expected[7 + k], f"resumed batch {k}")
        cursor = feed.state_dict()["cursor"]  # the counts continue from the saved ones
        assert cursor["filtered"]["data"] == counts_before(scored, offline_filter,
                                                           cursor["unit"])
    again.stop()
    plain = start_daemon(data=scored)
    with plain.feed(B, T) as feed:
        feed.load_state_dict(state)
        with pytest.raises(StateMismatchError, match=r"-> no filter"):
            next(feed)
    plain.stop()
    allowed = start_daemon("--filter", "int_score < 3 or language is null",
                           "--allow-filter-changes", data=scored)
    with allowed.feed(B, T) as feed:
        feed.load_state_dict(state)
        next(feed)
        assert feed.state_dict()["cursor"]["filters"] == {
            "data": "(int_score < 3) or (language is null)"}
    allowed.stop()
    assert "resuming a state saved under other filters" in allowed.log()


@pytest.mark.slow
def test_the_token_cache_never_serves_a_unit_filtered_another_way(
        start_daemon: Any, scored: Path, encoding: tiktoken.Encoding, tmp_path: Path) -> None:
    """Entries are keyed by the filter: a second filter over the same cache tokenizes
    its own units, and the first filter's run afterwards is served from its entries."""
    cache = str(tmp_path / "cache")
    train_units = sum(pq.ParquetFile(p).num_row_groups for p in split_files(scored, "train"))
    runs = [(FILTER, offline_filter), ("int_score < 3 or language is null", offline_other),
            (FILTER, offline_filter)]
    for i, (text, offline) in enumerate(runs):
        d = start_daemon("--cache-dir", cache, "--filter", text, data=scored)
        epoch_tokens = sum(len(encoding.encode_ordinary(t)) + 1 for texts, _ in kept_documents(
            scored, offline, rank=0, world_size=1, units=train_units) for t in texts)
        n = epoch_tokens // (B * T + 1) + 2  # into the second epoch: every unit was taken
        expected = expected_windows(scored, encoding, offline, n=n)
        with d.feed(B, T) as feed:
            for k, batch in enumerate(take(feed, n)):
                assert_batch_equals(batch, expected[k], f"filter {text!r} batch {k}")
            cursor = feed.state_dict()["cursor"]  # counted alike from tokens or the cache
            assert cursor["filtered"]["data"] == counts_before(scored, offline, cursor["unit"])
            cache_stats = d.status()["cache"]
        # run 1 finds none of run 0's entries (another key); run 2 finds all of run 0's
        assert (cache_stats["misses"] > 0) == (i < 2), f"run {i}: {cache_stats}"
        assert i < 2 or cache_stats["hits"] >= train_units, f"run {i}: {cache_stats}"
        d.stop()


@pytest.mark.slow
def test_best_fit_packs_exactly_the_kept_documents(
        start_daemon: Any, scored: Path, encoding: tiktoken.Encoding) -> None:
    n = 12
    expected, _ = bestfit_windows(
        kept_token_docs(scored, encoding, offline_filter), bos_id=BOS_ID, batch_size=B,
        seq_len=T, num_batches=n, buffer_docs=DEFAULT_BUFFER_DOCS, min_tail=DEFAULT_MIN_TAIL,
        max_age_docs=DEFAULT_MAX_AGE_DOCS)
    d = start_daemon("--filter", FILTER, data=scored)
    with d.feed(B, T, packing="bestfit") as feed:
        for k, (x, y) in enumerate(take(feed, n)):
            rows = expected[k].reshape(B, T + 1)
            np.testing.assert_array_equal(x.numpy(), rows[:, :-1], err_msg=f"batch {k}")
            np.testing.assert_array_equal(y.numpy(), rows[:, 1:], err_msg=f"batch {k}")
        cursor = feed.state_dict()["cursor"]  # before the next document to read
    assert cursor["filtered"]["data"] == counts_before(scored, offline_filter, cursor["unit"])


def test_a_mixture_filters_only_the_source_whose_table_has_a_filter(
        start_daemon: Any, scored: Path, corpus: Path, encoding: tiktoken.Encoding,
        tmp_path: Path) -> None:
    mix = tmp_path / "mix.toml"
    mix.write_text(f'[sources.web]\npath = "{scored}"\nweight = 0.6\nfilter = "{FILTER}"\n'
                   f'[sources.docs]\npath = "{corpus}"\nweight = 0.4\n')
    n, size = 20, B * T + 1
    mixed = mix_documents({
        "docs": rank_documents(corpus, enc=encoding, bos_id=BOS_ID, split="train", rank=0,
                               world_size=1),
        "web": kept_token_docs(scored, encoding, offline_filter)},
        [(0, {"docs": 0.4, "web": 0.6})])
    stream: list[int] = []
    while len(stream) < n * size:
        stream += next(mixed)[1]
    d = start_daemon("--mix", str(mix), sources={})
    with d.feed(B, T) as feed:
        for k, batch in enumerate(take(feed, n)):
            assert_batch_equals(batch, np.array(stream[k * size:(k + 1) * size]), f"batch {k}")
        cursor = feed.state_dict()["cursor"]
        assert cursor["filters"] == {"web": "(int_score >= 3) and (language == 'en')"}
        assert cursor["filtered"] == {"web": counts_before(
            scored, offline_filter, cursor["mix"]["sources"]["web"][0])}
        figures = d.status()["streams"][0]["filters"]
    assert set(figures) == {"web"} and figures["web"]["dropped"] > 0
