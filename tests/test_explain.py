"""`tokenfeed explain`: the segments it lists for a saved state's next batches are exactly
what a consumer resumed from that state receives from a real daemon, bit for bit, with
every segment re-read from its Parquet row and re-tokenized here; and bad input.

Each case takes states at several points of a live stream, runs `explain --json` on
them for 5 batches, resumes a fresh feed from each state, and compares every row's
T+1 tokens (inputs[r] + targets[r][-1]) with the concatenated segments."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import tiktoken
from conftest import BOS_ID, ENCODING

from tokenfeed.common.control import request
from tokenfeed.producer.cli import main
from tokenfeed.tools.corpus import sample_documents, write_shards

N = 5  # batches explained per state


@cache
def _column(path: Path, row_group: int) -> list[Any]:
    return pq.ParquetFile(path).read_row_group(row_group, columns=["text"]).column(0).to_pylist()


def segment_tokens(segment: dict[str, Any], roots: dict[str, Path],
                   enc: tiktoken.Encoding) -> list[int]:
    """The segment's tokens, from its Parquet row re-tokenized here: [BOS] + text, sliced."""
    text = _column(roots[segment["source"]] / segment["file"], segment["row_group"])[
        segment["row"]]
    assert isinstance(text, str), f"segment {segment} names a null row"
    return ([BOS_ID, *enc.encode_ordinary(text)])[segment["start"]:segment["end"]]


def run_explain(capsys: pytest.CaptureFixture[str], data: list[str], state: Any, tmp: Path,
                *extra: str) -> tuple[int, str, str]:
    path = tmp / f"state-{abs(hash(json.dumps(state, sort_keys=True)))}.json"
    path.write_text(json.dumps(state))
    capsys.readouterr()
    code = main(["explain", *data, "--tokenizer", ENCODING, "--state", str(path), *extra])
    out, err = capsys.readouterr()
    return code, out, err


def explained(capsys: pytest.CaptureFixture[str], data: list[str], state: Any, tmp: Path,
              *extra: str) -> list[dict[str, Any]]:
    code, out, err = run_explain(capsys, data, state, tmp, "--batches", str(N), "--json",
                                 *extra)
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


def assert_explains(lines: list[dict[str, Any]], batches: list[tuple[Any, Any]],
                    roots: dict[str, Path], enc: tiktoken.Encoding, where: str) -> None:
    assert [line["batch"] for line in lines] == list(range(len(batches))), where
    for k, (line, (x, y)) in enumerate(zip(lines, batches, strict=True)):
        assert len(line["rows"]) == x.shape[0], where
        for r, segments in enumerate(line["rows"]):
            want = [*x[r].tolist(), int(y[r][-1])]
            got = [t for s in segments for t in segment_tokens(s, roots, enc)]
            assert got == want, f"{where}: batch {k} row {r}: {segments}"


def resumed(daemon: Any, b: int, t: int, state: Any, n: int = N,
            **kwargs: Any) -> list[tuple[Any, Any]]:
    with daemon.feed(b, t, **kwargs) as feed:
        feed.load_state_dict(state)
        return [next(feed) for _ in range(n)]


def states_at(daemon: Any, b: int, t: int, points: list[int], **kwargs: Any) -> list[Any]:
    """The feed's state_dict() after each of `points` batches (ascending)."""
    out = []
    with daemon.feed(b, t, **kwargs) as feed:
        taken = 0
        for p in points:
            for _ in range(p - taken):
                next(feed)
            taken = p
            out.append(feed.state_dict())
    return out


def check_points(capsys: pytest.CaptureFixture[str], tmp: Path, daemon: Any, corpus: Path,
                 encoding: tiktoken.Encoding, b: int, t: int, points: list[int],
                 **kwargs: Any) -> None:
    for p, state in zip(points, states_at(daemon, b, t, points, **kwargs), strict=True):
        lines = explained(capsys, ["--data", str(corpus)], state, tmp)
        assert_explains(lines, resumed(daemon, b, t, state, **kwargs), {"data": corpus},
                        encoding, f"{kwargs} after {p} batches")


def test_concat_batches_are_explained_exactly(start_daemon, corpus, encoding, capsys,
                                              tmp_path):
    # 0: a fresh feed's state; 3: inside the first row groups; 40: well into the epoch
    check_points(capsys, tmp_path, start_daemon(), corpus, encoding, 4, 64, [0, 3, 40])


@pytest.mark.parametrize("packing", ["bestfit", "nanochat"])
def test_best_fit_batches_are_explained_exactly(start_daemon, corpus, encoding, capsys,
                                                tmp_path, packing):
    # a small buffer: pieces of earlier row groups stay buffered across the states
    check_points(capsys, tmp_path, start_daemon(), corpus, encoding, 4, 64, [0, 4, 30],
                 packing=packing, buffer_docs=16)


@pytest.mark.parametrize("packing", ["concat", "bestfit"])
@pytest.mark.slow
def test_shuffled_batches_name_each_documents_row_in_the_file(start_daemon, corpus, encoding,
                                                              capsys, tmp_path, packing):
    # a seed shuffles row groups per epoch and rows inside each (the worker's doc_seed)
    check_points(capsys, tmp_path, start_daemon(), corpus, encoding, 4, 64, [2, 25],
                 packing=packing, shuffle_seed=1234, buffer_docs=16)


@pytest.fixture(scope="module")
def holey(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 files of 8-row groups, every 5th row null (skipped by the workers): epochs in
    ~40 batches of 4 x 64."""
    docs: list[str | None] = list(sample_documents(60_000))
    docs = [None if i % 5 == 2 else d for i, d in enumerate(docs)]
    out = tmp_path_factory.mktemp("holey")
    write_shards(docs, out, num_files=3, rows_per_group=8)
    return out


@pytest.mark.parametrize("packing", ["concat", "bestfit"])
@pytest.mark.slow
def test_second_epoch_with_null_rows_is_explained_exactly(start_daemon, holey, encoding,
                                                          capsys, tmp_path, packing):
    daemon = start_daemon(data=holey)
    kw = {"packing": packing, "shuffle_seed": 5, "buffer_docs": 16}
    points = [30, 70]
    states = states_at(daemon, 4, 64, points, **kw)
    assert states[-1]["cursor"]["epoch"] >= 1, "the last state must lie past the first epoch"
    for p, state in zip(points, states, strict=True):
        lines = explained(capsys, ["--data", str(holey)], state, tmp_path)
        assert_explains(lines, resumed(daemon, 4, 64, state, **kw), {"data": holey},
                        encoding, f"{packing} after {p} batches")


@pytest.mark.parametrize("packing", ["concat", "bestfit"])
@pytest.mark.slow
def test_elastic_resume_4_to_3_is_explained_exactly(start_daemon, corpus, encoding, capsys,
                                                    tmp_path, packing):
    b, t = 2, 32
    kw = {"packing": packing, "buffer_docs": 8}
    daemon = start_daemon()
    data, roots = ["--data", str(corpus)], {"data": corpus}
    job = [states_at(daemon, b, t, [5], rank=r, world_size=4, **kw)[0] for r in range(4)]
    # the gathered file of the 4-rank job, one rank of it picked with --rank
    lines = explained(capsys, data, job, tmp_path, "--rank", "2", "--tokenizer-backend",
                      "tiktoken")
    assert_explains(lines, resumed(daemon, b, t, job, rank=2, world_size=4, **kw), roots,
                    encoding, "rank 2 of the gathered 4-rank state")
    for r in range(3):
        with daemon.feed(b, t, rank=r, world_size=3, **kw) as feed:
            feed.load_state_dict(job)  # elastic: 4 -> 3
            loaded = feed.state_dict()  # before its first batch: every old rank's cursor
            for _ in range(3):
                next(feed)
            later = feed.state_dict()  # its cursor holds the elastic layout
        assert "elastic_from" in loaded["cursor"] and "elastic" in later["cursor"]
        for name, state in (("loaded", loaded), ("3 batches later", later)):
            lines = explained(capsys, data, state, tmp_path)
            assert_explains(lines, resumed(daemon, b, t, state, rank=r, world_size=3, **kw),
                            roots, encoding, f"new rank {r}, {name}")


WEIGHTS = {"code": 0.3, "web": 0.7}


@pytest.mark.parametrize("packing", ["concat", "bestfit"])
@pytest.mark.slow
def test_mixture_after_a_live_reweight_is_explained_exactly(start_daemon, sources, encoding,
                                                            capsys, tmp_path, packing):
    b, t = 4, 256
    kw = {"packing": packing, "shuffle_seed": 3, "mix": WEIGHTS, "buffer_docs": 16}
    daemon = start_daemon(sources=sources)
    states = []
    with daemon.feed(b, t, **kw) as feed:
        states.append([next(feed) for _ in range(3)] and feed.state_dict())
        request(daemon.run_dir, "mix", weights={"code": 0.8, "web": 0.2}, split="train")
        states.append([next(feed) for _ in range(12)] and feed.state_dict())
    assert len(states[-1]["cursor"]["mix"]["weights"]) == 2, "the reweight is in the state"
    mix = tmp_path / "mix.toml"
    mix.write_text("".join(f'[sources.{n}]\npath = "{p}"\nweight = {WEIGHTS[n]}\n'
                           for n, p in sources.items()))
    flags = [["--source", f"{n}={p}"] for n, p in sources.items()]
    named = set()
    for i, state in enumerate(states):
        data = ["--mix", str(mix)] if i else [f for pair in flags for f in pair]
        lines = explained(capsys, data, state, tmp_path)
        assert_explains(lines, resumed(daemon, b, t, state, **kw), sources, encoding,
                        f"{packing} mixture, state {i}")
        named |= {s["source"] for line in lines for row in line["rows"] for s in row}
    assert named == {"code", "web"}


@pytest.mark.parametrize("packing", ["concat", "bestfit"])
@pytest.mark.slow
def test_skip_prints_the_state_a_consumer_reaches_that_many_batches_later(
        start_daemon, corpus, encoding, capsys, tmp_path, packing):
    b, t, k = 4, 64, 7
    kw = {"packing": packing, "shuffle_seed": 9, "buffer_docs": 16}
    daemon = start_daemon()
    state, later = states_at(daemon, b, t, [4, 4 + k], **kw)
    code, out, err = run_explain(capsys, ["--data", str(corpus)], state, tmp_path,
                                 "--skip", str(k))
    assert code == 0, err
    skipped = json.loads(out)
    assert skipped["cursor"] == later["cursor"]  # the very state the consumer saved there
    assert {k: v for k, v in skipped.items() if k != "cursor"} == {
        k: v for k, v in later.items() if k != "cursor"}
    # a job restarted from it receives what skip_batches=k delivers, and explain agrees
    with daemon.feed(b, t, **kw) as feed:
        feed.load_state_dict(state, skip_batches=k)
        pending = feed.state_dict()  # still to skip: carried in the state
        want = [next(feed) for _ in range(N)]
    assert pending["skip_batches"] == k
    roots = {"data": corpus}
    assert_explains(explained(capsys, ["--data", str(corpus)], skipped, tmp_path), want,
                    roots, encoding, "from the printed state")
    assert_explains(explained(capsys, ["--data", str(corpus)], pending, tmp_path), want,
                    roots, encoding, "from a state with skip_batches pending")
    lines = explained(capsys, ["--data", str(corpus)], state, tmp_path, "--skip", str(k),
                      "--text")
    assert [line["batch"] for line in lines] == list(range(k, k + N))
    for segment in (s for line in lines for row in line["rows"] for s in row):
        # documents read while skipping are read again for their text
        assert segment["text"] == encoding.decode(segment_tokens(segment, roots, encoding))
    assert_explains([{**line, "batch": i} for i, line in enumerate(lines)], want, roots,
                    encoding, "--skip with --batches")


def test_text_and_table_show_the_documents(start_daemon, corpus, capsys, tmp_path):
    state = {"version": 1, "spec": {"batch_size": 2, "seq_len": 32}, "cursor": None}
    code, out, err = run_explain(capsys, ["--data", str(corpus)], state, tmp_path,
                                 "--batches", "1", "--json", "--text")
    assert code == 0, err
    rows = json.loads(out)["rows"]
    enc = tiktoken.get_encoding(ENCODING)
    for segment in (s for row in rows for s in row):
        assert segment["text"] == enc.decode(segment_tokens(segment, {"data": corpus}, enc))
    code, out, err = run_explain(capsys, ["--data", str(corpus)], state, tmp_path,
                                 "--batches", "2")
    assert code == 0, err
    assert out.startswith("batch 0\n  row   0  ") and "\nbatch 1\n" in out
    assert f"data:{rows[0][0]['file']}#{rows[0][0]['row_group']}:{rows[0][0]['row']}" in out


def test_bad_input_names_the_fix(start_daemon, corpus, holey, capsys, tmp_path):
    b, t = 2, 32
    daemon = start_daemon()
    job = [states_at(daemon, b, t, [2], rank=r, world_size=2)[0] for r in range(2)]
    data = ["--data", str(corpus)]

    def error(state: Any, *extra: str, data: list[str] = data) -> str:
        code, _, err = run_explain(capsys, data, state, tmp_path, "--batches", "1", *extra)
        assert code == 2 and err.count("\n") == 1, err  # one line, no traceback
        return err

    assert "--rank 2 is out of range: the job state holds ranks 0..1" in error(job, "--rank",
                                                                                 "2")
    assert "pass --rank R (0..1)" in error(job)
    assert "drop --rank" in error(job[0], "--rank", "1")
    assert "pass --rank between 0 and 2" in error(job, "--rank", "3", "--world-size", "3")
    assert "needs every rank's state" in error(job[0], "--world-size", "3")
    err = error(job[0], data=["--data", str(holey)])
    assert "differs from this daemon's source data" in err and "pass the --data" in err
    err = error(job[0], "--bos", "<|fim_prefix|>")
    assert "saved with tokenizer identity" in err and "pass the --tokenizer" in err
    (tmp_path / "bad.json").write_text("{not json")
    code = main(["explain", *data, "--state", str(tmp_path / "bad.json"), "--batches", "1"])
    assert code == 2 and "is not JSON" in capsys.readouterr().err
    code, _, err = run_explain(capsys, data, job[0], tmp_path)  # neither --batches nor --skip
    assert code == 2 and "pass --batches N" in err


STATES = Path(__file__).parent / "fixtures" / "states"


@pytest.mark.parametrize("name", sorted(p.stem for p in STATES.glob("*.json")))
def test_states_saved_by_0_2_0_are_explained_without_a_daemon(name, encoding, capsys,
                                                               tmp_path):
    """The saved states of test_state_fixtures.py, with the batches a consumer resumed from
    each received (recorded then): concat, best fit, shuffled, a second epoch, mixtures
    with a pending and an applied reweight, elastic 2 -> 3 ranks and saved again."""
    fixture = json.loads((STATES / f"{name}.json").read_text())
    if fixture["daemon"] == "web":
        roots, data = {"data": STATES / "data" / "web"}, ["--data", str(STATES / "data" / "web")]
    else:
        roots = {n: STATES / "data" / n for n in ("code", "web")}
        data = [f for n, p in roots.items() for f in ("--source", f"{n}={p}")]
    for case in fixture["cases"]:
        where = f"{name} rank {case['rank']}/{case['world_size']}"
        extra = ("--rank", str(case["rank"]), "--world-size", str(case["world_size"]))
        n = len(case["batches"])
        code, out, err = run_explain(capsys, data, case["state"], tmp_path, "--batches",
                                     str(n), "--json", *extra)
        assert code == 0, err
        batches = [(np.array(x), np.array(y)) for x, y in case["batches"]]
        assert_explains([json.loads(line) for line in out.splitlines()], batches, roots,
                        encoding, where)
        code, out, err = run_explain(capsys, data, case["state"], tmp_path, "--skip", str(n),
                                     *extra)
        assert code == 0, err
        after = json.loads(out)
        want = case["after"]
        if "mix" in want["cursor"]:  # `mixed` counts units mixed ahead: not a position
            want = {**want, "cursor": {**want["cursor"], "mix": {
                **want["cursor"]["mix"], "mixed": after["cursor"]["mix"]["mixed"]}}}
        assert after == want, where
