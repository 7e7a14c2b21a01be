"""`tokenfeed explain` for states saved under what a run drops: an exclusion list, a serve
filter, a mixture source's filter, and a row group skipped under `--on-error skip`.

As in test_explain.py, each explained batch is compared with what a consumer resumed from
the same state receives from a real daemon: every segment re-read from its Parquet row
and re-tokenized here, each row's T+1 tokens bit for bit. And no segment names a document
the run dropped; explain's header says what it applied; bad input names the fix.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from test_bad_data import corrupt_row_group
from test_explain import N, assert_explains, explained, resumed, run_explain, states_at

from tokenfeed.common.exclude import read_exclude_file
from tokenfeed.producer.filters import Filter

B, T = 4, 64
BESTFIT = {"packing": "bestfit", "buffer_docs": 8}  # pieces of several row groups buffered
PACKINGS = {"concat": {}, "bestfit": BESTFIT}
BAD_FILE, BAD_GROUP = "shard_00001.parquet", 1  # the 5th of the 12 train row groups

Doc = tuple[str, int, int]  # (file, row_group, row)


def train_documents(root: Path) -> list[Doc]:
    """Every row of the train split (all files but the last), in file order."""
    files = sorted(root.glob("*.parquet"))[:-1]
    return [(f.name, g, r) for f in files for g in range(pq.ParquetFile(f).num_row_groups)
            for r in range(pq.ParquetFile(f).metadata.row_group(g).num_rows)]


def ids(root: Path, doc: Doc) -> int:
    """The `id` column of a row (tools/corpus.py writes one: the document's index)."""
    file, g, r = doc
    return int(pq.ParquetFile(root / file).read_row_group(g, columns=["id"]).column(0)[r]
               .as_py())


def split(lines: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(explain's header, the batch lines) of `explain --json` where something applies."""
    assert "explain" in lines[0] and all("batch" in line for line in lines[1:]), lines[0]
    return lines[0]["explain"], lines[1:]


def named(lines: list[dict[str, Any]], source: str = "data") -> set[Doc]:
    return {(s["file"], s["row_group"], s["row"]) for line in lines for row in line["rows"]
            for s in row if s["source"] == source}


def write_list(path: Path, docs: list[Doc]) -> Path:
    path.write_text("".join(f"{f},{g},{r}\n" for f, g, r in docs))
    return path


@pytest.mark.parametrize("packing, served", [("concat", False), ("bestfit", True)])
def test_a_state_saved_under_an_exclusion_list_is_explained_exactly(
        start_daemon, corpus, encoding, capsys, tmp_path, packing, served):
    # every other document of the epoch: each explained batch meets the list
    excluded = train_documents(corpus)[1::2]
    path = write_list(tmp_path / "spike.csv", excluded)
    daemon = start_daemon(*(["--exclude", str(path)] if served else []))
    kw = {**PACKINGS[packing], **({} if served else {"exclude": str(path)})}
    data, roots = ["--data", str(corpus)], {"data": corpus}
    states = states_at(daemon, B, T, [0, 3, 20], **kw)
    assert states[0]["cursor"] is None  # a fresh feed's: the list applies from the start
    sha = states[-1]["cursor"]["exclude"]["sha256"]
    for p, state in zip([0, 3, 20], states, strict=True):
        header, lines = split(explained(capsys, data, state, tmp_path, "--exclude", str(path)))
        assert header["exclude"] == {"sha256": sha, "unit": 0, "keep": 0,
                                     "documents": len(excluded)}
        assert header["filters"] is None and header["skipped_row_groups"] == []
        assert_explains(lines, resumed(daemon, B, T, state, **kw), roots, encoding,
                        f"{packing} under the list, after {p} batches")
        assert not named(lines) & set(excluded), "an excluded document was explained"
    # explain's --json output, header and all, is an exclusion file of those documents
    listing = tmp_path / "explained.jsonl"
    listing.write_text("".join(json.dumps(line) + "\n" for line in [{"explain": header},
                                                                    *lines]))
    assert {(e.file, e.row_group, e.row) for e in read_exclude_file(listing)} == named(lines)


@pytest.mark.parametrize("packing", ["concat", "bestfit"])
@pytest.mark.slow
def test_a_list_begun_at_a_resumed_state_is_explained_exactly(
        start_daemon, corpus, encoding, capsys, tmp_path, packing):
    """The loss-spike case: a state saved without a list, explained with one (the list
    begins inside its unit, as for a feed resumed with exclude=), and the states such a
    feed saves later."""
    excluded = train_documents(corpus)[::2]
    path = write_list(tmp_path / "spike.csv", excluded)
    kw = PACKINGS[packing]
    daemon = start_daemon()
    data, roots, listed = ["--data", str(corpus)], {"data": corpus}, ("--exclude", str(path))
    (plain,) = states_at(daemon, B, T, [9], **kw)
    assert "exclude" not in plain["cursor"]
    with daemon.feed(B, T, exclude=str(path), **kw) as feed:
        feed.load_state_dict(plain)
        want = [next(feed) for _ in range(N)]
        begun = feed.state_dict()  # N batches on, its mark (0, 0) once past the list's unit
    header, lines = split(explained(capsys, data, plain, tmp_path, *listed))
    assert header["exclude"]["sha256"] == begun["cursor"]["exclude"]["sha256"]
    assert_explains(lines, want, roots, encoding, f"{packing}: the list begins at the state")
    # --skip N prints the very state the feed saved there, the list's mark included
    code, out, err = run_explain(capsys, data, plain, tmp_path, "--skip", str(N), *listed)
    assert code == 0, err
    assert json.loads(out)["cursor"] == begun["cursor"]
    for state in (begun, *states_at(daemon, B, T, [2], exclude=str(path), **kw)):
        header, lines = split(explained(capsys, data, state, tmp_path, *listed))
        assert header["exclude"] == {**state["cursor"]["exclude"], "documents": len(excluded)}
        assert_explains(lines, resumed(daemon, B, T, state, exclude=str(path), **kw), roots,
                        encoding, f"{packing}: mark {state['cursor']['exclude']}")


def test_a_state_under_a_list_refuses_no_list_and_another_naming_both_hashes(
        start_daemon, corpus, capsys, tmp_path):
    docs = train_documents(corpus)
    path = write_list(tmp_path / "a.csv", docs[1::2])
    other = write_list(tmp_path / "b.csv", docs[1::3])
    (state,) = states_at(start_daemon(), B, T, [2], exclude=str(path))
    sha = state["cursor"]["exclude"]["sha256"]
    data = ["--data", str(corpus)]

    def error(*extra: str) -> str:
        code, _, err = run_explain(capsys, data, state, tmp_path, "--batches", "1", *extra)
        assert code == 2 and err.count("\n") == 1, err  # one line, no traceback
        return err

    err = error()
    assert f"exclusion list with sha256 {sha}" in err and "no --exclude" in err
    assert "pass --exclude with the exclusion file kept next to that checkpoint" in err
    err = error("--exclude", str(other))
    (other_sha,) = {w for w in err.replace(",", " ").split() if len(w) == 64} - {sha}
    assert sha in err and other_sha != sha and "pass --exclude" in err
    # a list naming a shard this data does not have: the daemon's own check, naming it
    bad = tmp_path / "bad.csv"
    bad.write_text("shard_09999.parquet,0,0\n")
    err = error("--exclude", str(bad))
    assert "bad.csv line 1" in err and "is not a shard of source 'data'" in err


def dropped_ids(n: int) -> list[int]:
    """Every third document, and a whole row group (ids 16-18: file 2's first)."""
    return sorted({i for i in range(n) if i % 3 == 1} | {16, 17, 18})


@pytest.mark.parametrize("packing", ["concat", "bestfit"])
def test_a_state_under_a_serve_filter_is_explained_exactly(
        start_daemon, corpus, encoding, capsys, tmp_path, packing):
    docs = train_documents(corpus)
    drop = dropped_ids(len(docs))
    text = f"id not in [{', '.join(map(str, drop))}]"
    daemon = start_daemon("--filter", text)
    kw = PACKINGS[packing]
    data, roots = ["--data", str(corpus)], {"data": corpus}
    normal = {"data": Filter.parse(text).text}
    states = states_at(daemon, B, T, [0, 4, 25], **kw)
    for p, state in zip([0, 4, 25], states, strict=True):
        want = resumed(daemon, B, T, state, **kw)
        # the filter as the state records it, or given again as for serve: the same batches
        # (a fresh feed's state records no position, so no filter: it must be given)
        assert state["cursor"] is None if p == 0 else state["cursor"]["filters"] == normal
        for given in ([], ["--filter", text])[1 if p == 0 else 0:]:
            header, lines = split(explained(capsys, data, state, tmp_path, *given))
            assert header["filters"] == normal
            assert header["exclude"] is None
            assert_explains(lines, want, roots, encoding, f"{packing} after {p}, {given}")
            assert not {ids(corpus, d) for d in named(lines)} & set(drop)
    code, out, err = run_explain(capsys, data, state, tmp_path, "--batches", "2")
    assert code == 0 and out.startswith(f"dropped: filter of data: {normal['data']}\n"
                                        "batch 0\n"), err
    # --skip prints the state the feed saved 21 batches on, its kept/dropped counts too
    code, out, err = run_explain(capsys, data, states[1], tmp_path, "--skip", "21")
    assert code == 0, err
    assert json.loads(out)["cursor"] == states[2]["cursor"]


@pytest.mark.parametrize("packing", ["concat", "bestfit"])
@pytest.mark.slow
def test_a_per_source_filter_and_a_list_in_a_mixture_are_explained_exactly(
        start_daemon, sources, encoding, capsys, tmp_path, packing):
    web = train_documents(sources["web"])
    drop = dropped_ids(len(web))
    text = f"id not in [{', '.join(map(str, drop))}]"
    mix = tmp_path / "mix.toml"
    mix.write_text(f'[sources.code]\npath = "{sources["code"]}"\nweight = 0.3\n'
                   f'[sources.web]\npath = "{sources["web"]}"\nweight = 0.7\n'
                   f'filter = "{text}"\n')
    # and every other document of the other source excluded, by a list of source entries
    excluded = train_documents(sources["code"])[::2]
    path = tmp_path / "code.csv"
    path.write_text("".join(f"code,{f},{g},{r}\n" for f, g, r in excluded))
    daemon = start_daemon("--mix", str(mix), sources={})
    kw = {**PACKINGS[packing], "shuffle_seed": 3, "exclude": str(path)}
    flags = [f for n, p in sources.items() for f in ("--source", f"{n}={p}")]
    seen = set()
    normal = {"web": Filter.parse(text).text}
    for p, state in zip([2, 12], states_at(daemon, B, 256, [2, 12], **kw), strict=True):
        assert state["cursor"]["filters"] == normal
        want = resumed(daemon, B, 256, state, **kw)
        # the mix file's filter, or --source flags and the filter the state records
        for data in (["--mix", str(mix)], flags):
            header, lines = split(explained(capsys, data, state, tmp_path, "--exclude",
                                            str(path)))
            assert header["filters"] == normal
            assert header["exclude"]["sha256"] == state["cursor"]["exclude"]["sha256"]
            assert_explains(lines, want, sources, encoding, f"{packing} after {p}, {data[0]}")
            assert not {ids(sources["web"], d) for d in named(lines, "web")} & set(drop)
            assert not named(lines, "code") & set(excluded)
            seen |= {s["source"] for line in lines for row in line["rows"] for s in row}
    assert seen == {"code", "web"}


@pytest.mark.slow
def test_a_filter_other_than_the_states_is_refused_naming_both(
        start_daemon, corpus, sources, capsys, tmp_path):
    text = "id not in [1, 2, 3]"
    (state,) = states_at(start_daemon("--filter", text), B, T, [1])
    (plain,) = states_at(start_daemon(), B, T, [1])
    data = ["--data", str(corpus)]

    def error(state: Any, *extra: str, data: list[str] = data) -> str:
        code, _, err = run_explain(capsys, data, state, tmp_path, "--batches", "1", *extra)
        assert code == 2 and err.count("\n") == 1, err
        return err

    err = error(state, "--filter", "id not in [1, 2]")
    assert "given as 'id not in [1, 2]'" in err and "under the filter 'id not in [1, 2, 3]'" \
        in err and "pass the filter the run used" in err
    err = error(plain, "--filter", text)
    assert "saved under no filter" in err
    err = error(state, "--filter", "no_such_column > 1")
    assert "given as 'no_such_column > 1'" in err
    mix = tmp_path / "mix.toml"
    mix.write_text(f'[sources.web]\npath = "{sources["web"]}"\n')
    err = error(state, "--filter", text, data=["--mix", str(mix)])
    assert "--filter filters --data" in err


def test_an_elastic_resume_under_a_filter_and_a_list_is_explained_exactly(
        start_daemon, corpus, encoding, capsys, tmp_path):
    """A 2-rank job saved under both, resumed on 3 ranks: the gathered state, --world-size."""
    b, t = 2, 32
    docs = train_documents(corpus)
    text = f"id not in [{', '.join(map(str, dropped_ids(len(docs))))}]"
    path = write_list(tmp_path / "spike.csv", docs[::4])
    daemon = start_daemon("--filter", text)
    kw = {"exclude": str(path)}
    job = [states_at(daemon, b, t, [5], rank=r, world_size=2, **kw)[0] for r in range(2)]
    data, roots = ["--data", str(corpus)], {"data": corpus}
    for r in range(3):
        header, lines = split(explained(capsys, data, job, tmp_path, "--rank", str(r),
                                        "--world-size", "3", "--exclude", str(path)))
        assert header["filters"] == {"data": Filter.parse(text).text}
        assert header["exclude"]["sha256"] == job[0]["cursor"]["exclude"]["sha256"]
        assert_explains(lines, resumed(daemon, b, t, job, rank=r, world_size=3, **kw), roots,
                        encoding, f"new rank {r} of 3")
        assert not named(lines) & set(docs[::4])


@pytest.fixture
def damaged(corpus: Path, tmp_path: Path) -> Path:
    out = tmp_path / "data"
    shutil.copytree(corpus, out)
    return out


@pytest.mark.parametrize("packing", ["concat", "bestfit"])
@pytest.mark.slow
def test_a_row_group_skipped_under_on_error_skip_is_explained_exactly(
        start_daemon, damaged, encoding, capsys, tmp_path, packing):
    daemon = start_daemon("--on-error", "skip", data=damaged)
    corrupt_row_group(damaged / BAD_FILE, BAD_GROUP)  # after the start, as a failing disk
    kw = PACKINGS[packing]
    data, roots = ["--data", str(damaged)], {"data": damaged}
    # the bad row group is read for the batches after 20 and 26 (concat), or for the
    # first ones (best fit reads buffer_docs documents ahead)
    points = [0, 20, 26]
    skipped_by = []
    states = states_at(daemon, B, T, points, **kw)
    for p, state in zip(points, states, strict=True):
        header, lines = split(explained(capsys, data, state, tmp_path, "--on-error", "skip"))
        assert header["on_error"] == "skip"
        assert_explains(lines, resumed(daemon, B, T, state, **kw), roots, encoding,
                        f"{packing} after {p}")
        assert not any(f == BAD_FILE and g == BAD_GROUP for f, g, _ in named(lines))
        skipped_by.append(header["skipped_row_groups"])
    code, out, err = run_explain(capsys, data, states[1], tmp_path, "--skip", "6",
                                 "--on-error", "skip")
    assert code == 0, err
    assert json.loads(out)["cursor"] == states[2]["cursor"]
    bad = {"source": "data", "file": BAD_FILE, "row_group": BAD_GROUP}
    met = [s for s, skipped in zip(states, skipped_by, strict=True) if bad in skipped]
    assert met, f"no explained range read the bad row group: {skipped_by}"
    assert daemon.status()["streams"][0]["skipped_row_groups"][0].endswith(
        f"{BAD_FILE}#{BAD_GROUP}")
    # the run's own rule, --on-error fail: the file and row group, and the fix
    code, _, err = run_explain(capsys, data, met[0], tmp_path, "--batches", str(N))
    assert code == 2 and err.count("\n") == 1, err
    assert f"{BAD_FILE} row group {BAD_GROUP} cannot be read" in err
    assert "pass explain --on-error skip" in err
