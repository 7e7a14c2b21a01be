"""`TokenFeed(provenance=True)`: each batch's segments, recorded by a real daemon while it
packs, equal what `explain` (producer/provenance.py, run here in-process on the same
state) lists for the same batches, and re-tokenizing each segment from its Parquet row
gives every row's T+1 tokens bit for bit; and bad provenance frames are refused.

Cases: concat, best fit and the nanochat preset, a seeded shuffle, a two-source mixture
after a live reweight, a resume from a saved state (a stream that starts recording at a
resumed position: concat offset, best-fit buffer), the second epoch over null rows, and
an elastic resume 4 -> 3."""

from __future__ import annotations

import sysconfig
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import tiktoken
from conftest import ENCODING
from test_explain import segment_tokens

from tokenfeed.common import protocol
from tokenfeed.common.config import StreamSpec
from tokenfeed.common.control import request
from tokenfeed.common.errors import ConfigError, ProtocolError
from tokenfeed.consumer.provenance import parse
from tokenfeed.producer.dataset import scan_dataset
from tokenfeed.producer.doc_runs import LazyRuns, Runs
from tokenfeed.producer.packer import make_packer
from tokenfeed.producer.position import (
    DOCS,
    PIECE,
    REST,
    TOKENS,
    BestFitPosition,
    ConcatPosition,
)
from tokenfeed.producer.provenance import explain
from tokenfeed.producer.slot_provenance import MAX_RECORD_BYTES, SlotProvenance
from tokenfeed.producer.tokenizer import load_tokenizer
from tokenfeed.producer.units import Unit
from tokenfeed.tools.corpus import sample_documents, write_shards

N = 5  # batches compared per state


def explained(roots: dict[str, Path], state: dict[str, Any], n: int = N,
              weights: dict[str, float] | None = None) -> list[list[list[dict[str, Any]]]]:
    """explain's rows for the `n` batches after `state`, in this process."""
    datasets = {name: scan_dataset(path) for name, path in sorted(roots.items())}
    got = explain(datasets, load_tokenizer(ENCODING), state, batches=n, weights=weights,
                  backend="tiktoken")
    return [[[s.to_json() for s in row] for row in rows] for rows in got.batches]


def taken(feed: Any, n: int = N) -> tuple[list[tuple[Any, Any]], list[Any]]:
    """`n` batches and the provenance of each."""
    batches, provenance = [], []
    for _ in range(n):
        batches.append(next(feed))
        provenance.append(feed.last_provenance())
    return batches, provenance


def check(roots: dict[str, Path], state: dict[str, Any], batches: list[tuple[Any, Any]],
          live: list[Any], enc: tiktoken.Encoding, where: str,
          weights: dict[str, float] | None = None) -> None:
    assert live == explained(roots, state, len(batches), weights), where
    for k, ((x, y), rows) in enumerate(zip(batches, live, strict=True)):
        assert len(rows) == x.shape[0], where
        for r, segments in enumerate(rows):
            want = [*x[r].tolist(), int(y[r][-1])]
            got = [t for s in segments for t in segment_tokens(s, roots, enc)]
            assert got == want, f"{where}: batch {k} row {r}: {segments}"


def check_points(daemon: Any, roots: dict[str, Path], enc: tiktoken.Encoding, b: int, t: int,
                 points: list[int], **kw: Any) -> None:
    """One provenance feed; at each point, its state and the next N batches' provenance."""
    with daemon.feed(b, t, provenance=True, **kw) as feed:
        done = 0
        for p in points:
            for _ in range(p - done):
                next(feed)
            state = feed.state_dict()
            batches, live = taken(feed)
            done = p + N
            check(roots, state, batches, live, enc, f"{kw} after {p} batches")


def test_concat_provenance_equals_explain(start_daemon, corpus, encoding):
    check_points(start_daemon(), {"data": corpus}, encoding, 4, 64, [0, 30])


@pytest.mark.parametrize("packing", ["bestfit", "nanochat"])
def test_best_fit_provenance_equals_explain(start_daemon, corpus, encoding, packing):
    # a small buffer: tails and pieces of earlier row groups in every window
    check_points(start_daemon(), {"data": corpus}, encoding, 4, 64, [0, 25],
                 packing=packing, buffer_docs=16)


@pytest.mark.parametrize("packing", ["concat", "bestfit"])
def test_shuffled_provenance_names_rows_in_the_file(start_daemon, corpus, encoding, packing):
    check_points(start_daemon(), {"data": corpus}, encoding, 4, 64, [2],
                 packing=packing, shuffle_seed=1234, buffer_docs=16)


@pytest.fixture(scope="module")
def holey(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 files of 8-row groups, every 5th row null: epochs in ~40 batches of 4 x 64."""
    docs: list[str | None] = list(sample_documents(60_000))
    docs = [None if i % 5 == 2 else d for i, d in enumerate(docs)]
    out = tmp_path_factory.mktemp("holey")
    write_shards(docs, out, num_files=3, rows_per_group=8)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("packing", ["concat", "bestfit"])
def test_second_epoch_provenance_over_null_rows(start_daemon, holey, encoding, packing):
    daemon = start_daemon(data=holey)
    kw = {"packing": packing, "shuffle_seed": 5, "buffer_docs": 16}
    with daemon.feed(4, 64, provenance=True, **kw) as feed:
        for _ in range(60):
            next(feed)
        state = feed.state_dict()
        assert state["cursor"]["epoch"] >= 1, "the state must lie past the first epoch"
        batches, live = taken(feed)
    check({"data": holey}, state, batches, live, encoding, f"{packing}, second epoch")


@pytest.mark.parametrize("packing", ["concat", "bestfit"])
def test_resumed_stream_records_from_the_saved_position(start_daemon, corpus, encoding,
                                                        packing):
    """A state of a feed without provenance: the provenance feed that loads it gets a
    stream of its own, recording from the resumed position (an offset into a unit; a
    best-fit buffer of pieces of earlier units)."""
    kw = {"packing": packing, "buffer_docs": 16, "shuffle_seed": 7}
    daemon = start_daemon()
    with daemon.feed(4, 64, **kw) as feed:
        for _ in range(11):
            next(feed)
        state = feed.state_dict()
    with daemon.feed(4, 64, provenance=True, **kw) as feed:
        feed.load_state_dict(state)
        assert feed.last_provenance() is None  # no batch returned yet
        batches, live = taken(feed)
    check({"data": corpus}, state, batches, live, encoding, f"{packing} resumed")


WEIGHTS = {"code": 0.3, "web": 0.7}


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """web: Python's documentation (5 files); code: the standard library's modules (4)."""
    root = tmp_path_factory.mktemp("mixture")
    write_shards(sample_documents(160_000), root / "web", num_files=5, rows_per_group=11)
    stdlib = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:200]
    code = [text[:6000] for p in stdlib if len(text := p.read_text(errors="replace")) > 200]
    write_shards(code, root / "code", num_files=4, rows_per_group=10)
    return {"code": root / "code", "web": root / "web"}


@pytest.mark.parametrize("packing", ["concat", "bestfit"])
def test_mixture_provenance_after_a_live_reweight(start_daemon, sources, encoding, packing):
    b, t = 4, 256
    kw = {"packing": packing, "shuffle_seed": 3, "mix": WEIGHTS, "buffer_docs": 16}
    daemon = start_daemon(sources=sources)
    with daemon.feed(b, t, provenance=True, **kw) as feed:
        for _ in range(3):
            next(feed)
        request(daemon.run_dir, "mix", weights={"code": 0.8, "web": 0.2}, split="train")
        for _ in range(12):
            next(feed)
        state = feed.state_dict()
        batches, live = taken(feed)
    assert len(state["cursor"]["mix"]["weights"]) == 2, "the reweight is in the state"
    check(sources, state, batches, live, encoding, f"{packing} mixture", WEIGHTS)
    assert {s["source"] for rows in live for row in rows for s in row} == {"code", "web"}


@pytest.mark.slow
@pytest.mark.parametrize("packing", ["concat", "bestfit"])
def test_elastic_resume_4_to_3_provenance(start_daemon, corpus, encoding, packing):
    b, t = 2, 32
    kw = {"packing": packing, "buffer_docs": 8}
    daemon = start_daemon()
    job = []
    for r in range(4):
        with daemon.feed(b, t, rank=r, world_size=4, **kw) as feed:
            for _ in range(5):
                next(feed)
            job.append(feed.state_dict())
    for r in range(3):
        with daemon.feed(b, t, rank=r, world_size=3, provenance=True, **kw) as feed:
            feed.load_state_dict(job)  # elastic: its first units are items of a layout
            state = feed.state_dict()
            batches, live = taken(feed)
        check({"data": corpus}, state, batches, live, encoding, f"{packing} new rank {r}")


@pytest.mark.parametrize("packing", ["concat", "bestfit"])
def test_excluded_documents_are_never_named(start_daemon, corpus, encoding, tmp_path,
                                            packing):
    """With an exclusion list the rows still re-tokenize from their segments, and no
    segment names a listed document (explain applying lists is compared elsewhere)."""
    listed = []
    for path in sorted(corpus.glob("*.parquet"))[:-1]:  # the train split
        pf = pq.ParquetFile(path)
        for g in range(pf.num_row_groups):
            values = pf.read_row_group(g, columns=["text"]).column(0).to_pylist()
            listed += [(path.name, g, r) for r, v in enumerate(values) if isinstance(v, str)]
    listed = listed[1::3]
    exclude = tmp_path / "exclude.jsonl"
    exclude.write_text("".join(f"{f},{g},{r}\n" for f, g, r in listed))
    with start_daemon().feed(4, 64, provenance=True, exclude=exclude, packing=packing,
                             buffer_docs=16) as feed:
        batches, live = taken(feed, 12)
    named = set()
    for k, ((x, y), rows) in enumerate(zip(batches, live, strict=True)):
        for r, segments in enumerate(rows):
            want = [*x[r].tolist(), int(y[r][-1])]
            got = [t for s in segments for t in segment_tokens(s, {"data": corpus}, encoding)]
            assert got == want, f"{packing}: batch {k} row {r}"
            named |= {(s["file"], s["row_group"], s["row"]) for s in segments}
    assert named and not named & set(listed)


@pytest.mark.parametrize("item, at, rows, offsets, doc_starts", [
    ((PIECE, 9, 1, 3), [0, 1], [3, 3], [0, 3], [0]),  # a tail: its BOS, then token 3 on
    ((PIECE, 9, 1, 1), [0], [3], [0], [0]),  # BOS + tokens 1.. is the whole document
    ((TOKENS, 9, 7, 0), [0, 5], [3, 4], [2, 0], [5]),  # the rest of a document, no BOS
    ((DOCS, 9, 1, 0), [0, 7], [3, 4], [0, 0], [0, 7]),
    ((REST, 9, 1, 2), [0, 5], [3, 4], [2, 0], [0, 5]),
])
def test_elastic_items_keep_each_tokens_document_offset(item, at, rows, offsets, doc_starts):
    """A row group of documents (rows 0, 3, 4; 5, 7 and 4 tokens) under each kind of
    elastic item (elastic.py), read back as runs: where each run starts in the unit,
    its document's row and the document token it starts at."""
    runs = Runs.of_docs(0, 2, np.array([0, 3, 4]), np.array([5, 7, 4])).shaped(item)
    assert (runs.at.tolist(), runs.ident[:, 2].tolist(), runs.off.tolist(),
            runs.doc_starts.tolist()) == (at, rows, offsets, doc_starts)
    _, start, end = runs.slice(0, runs.n)
    assert int((end - start).sum()) == runs.n


def test_a_record_over_the_bound_is_sent_as_unavailable():
    """Windows of tens of thousands of tiny documents: the daemon sends no record over
    MAX_RECORD_BYTES (a control frame holds 1 MiB), and says why."""
    spec = StreamSpec(split="train", rank=0, world_size=1, batch_size=32, seq_len=2048)
    stream = SimpleNamespace(spec=spec, packer=None, supply=SimpleNamespace())
    recorder = SlotProvenance(stream, ["data"])  # type: ignore[arg-type]
    recorder.files = [["data", "shard_00000.parquet"]]
    n = spec.window_tokens  # one span per token
    ident = np.zeros((n, 3), dtype=np.int64)
    ident[:, 2] = np.arange(n)
    got = recorder._encode(ident, np.zeros(n, dtype=np.int64), np.ones(n, dtype=np.int64))
    assert set(got) == {"unavailable"} and f"over {MAX_RECORD_BYTES}" in got["unavailable"]
    with pytest.raises(ConfigError, match=r"tokenfeed explain"):
        parse(got, 32, 2048, "concat").rows()


def test_runs_that_disagree_with_the_packer_make_records_unavailable_not_errors():
    """A unit's runs are made when a record of it is first cut; if they cover other than
    the tokens the packer got of it (a bug), that record and every one filled after it
    say so, and the records before it are still cut."""
    spec = StreamSpec(split="train", rank=0, world_size=1, batch_size=2, seq_len=63)
    packer = make_packer(spec, ConcatPosition(0))
    table = SimpleNamespace(next_seq=0, slots=[None] * 4)
    stream = SimpleNamespace(spec=spec, packer=packer, supply=SimpleNamespace(), table=table)
    recorder = SlotProvenance(stream, ["data"])  # type: ignore[arg-type]
    recorder.files = [["data", "shard_00000.parquet"]]
    lengths = np.full(4, 64, dtype=np.int64)  # a unit is two windows of 128 tokens
    for unit in range(3):
        # unit 1 is recorded one token short
        runs = np.array([64, 64, 64, 63 if unit == 1 else 64], dtype=np.int64)
        recorder.source_units[(0, unit)] = LazyRuns(
            partial(Runs.of_docs, 0, unit, np.arange(4), runs))
        got = Unit.of_lengths(np.zeros(256, dtype=np.uint32), lengths)
        recorder.pushed(unit, got)
        packer.push(unit, got.tokens, got.doc_starts)
        out = np.empty(spec.window_tokens, dtype=np.uint32)
        for _ in range(2):
            before = packer.position
            packer.fill(out)
            recorder.filled(0, before)
            table.next_seq += 1
    assert "spans" in recorder.record(1)  # unit 0's second window
    why = recorder.record(2)["unavailable"]  # unit 1's first
    assert why == "unit 1: recorded 255 tokens, the packer got 256"
    assert recorder.record(3)["unavailable"] == why
    # filled before the fault was found, in unit 0: still cut
    assert "spans" in recorder.record(0)


def test_provenance_off_is_a_clear_error(start_daemon):
    with start_daemon().feed(2, 32) as feed:
        next(feed)
        with pytest.raises(ConfigError, match=r"provenance=True"):
            feed.last_provenance()


def test_attach_with_a_bad_provenance_field_is_refused(start_daemon):
    daemon = start_daemon()
    spec = {"split": "train", "rank": 0, "world_size": 1, "batch_size": 2, "seq_len": 32}
    with pytest.raises(ConfigError, match=r"provenance='yes' must be True or False"):
        request(daemon.run_dir, "attach", spec=spec, start=None, replicas=1,
                provenance="yes", expect="attached")
    assert daemon.status()["streams"] == [], "a refused attach leaves no stream"


def _record(spans: list[tuple[int, int, int, int, int]]) -> dict[str, Any]:
    return {"files": [["data", "shard_00000.parquet"]],
            "spans": np.array(spans, dtype="<i8").reshape(-1, 5).tobytes()}


def test_a_valid_record_reads_as_explains_rows():
    doc = {"source": "data", "file": "shard_00000.parquet", "row_group": 0, "row": 3}
    # concat, B=2 T=32: 65 tokens; row 1 starts at token 32, the last token of row 0
    got = parse(_record([(0, 0, 3, 0, 40), (0, 0, 3, 40, 50), (0, 1, 5, 0, 15)]), 2, 32,
                "concat").rows()
    assert got == [[{**doc, "start": 0, "end": 33}],
                   [{**doc, "start": 32, "end": 50},  # two spans of one run: one segment
                    {**doc, "row_group": 1, "row": 5, "start": 0, "end": 15}]]
    # best fit, B=2 T=32: rows of 33 tokens, a tail's BOS then its rest
    got = parse(_record([(0, 0, 3, 0, 33), (0, 0, 4, 0, 1), (0, 0, 4, 90, 122)]), 2, 32,
                "bestfit").rows()
    assert got == [[{**doc, "start": 0, "end": 33}],
                   [{**doc, "row": 4, "start": 0, "end": 1},
                    {**doc, "row": 4, "start": 90, "end": 122}]]


ONE = (0, 0, 3, 0, 33)  # a whole window of 33 tokens: B=1, T=32, concat


@pytest.mark.parametrize("bad, why", [
    ("not a map", "not a map"),
    ({"files": []}, "not a map"),
    ({**_record([ONE]), "rows": b""}, "not a map"),
    ({**_record([ONE]), "files": [["data"]]}, "'files'"),
    ({**_record([ONE]), "files": [[1, "f"]]}, "'files'"),
    ({**_record([ONE]), "files": "data"}, "'files'"),
    ({**_record([ONE]), "spans": b"\x00" * 7}, "'spans' is not int64"),
    ({**_record([ONE]), "spans": b""}, "'spans' is not int64"),
    ({**_record([ONE]), "spans": "text"}, "'spans' is not int64"),
    (_record([(1, 0, 3, 0, 33)]), "outside its table"),
    (_record([(0, -1, 3, 0, 33)]), "outside its table"),
    (_record([(0, 0, -3, 0, 33)]), "outside its table"),
    (_record([(0, 0, 3, -3, 30)]), "outside its table"),
    (_record([(0, 0, 3, 5, 5), ONE]), "empty or oversized"),
    (_record([(0, 0, 3, 9, 5), (0, 0, 3, 0, 37)]), "empty or oversized"),
    (_record([(0, 0, 3, 1 << 62, (1 << 62) + 33)]), "empty or oversized"),
    (_record([(0, 0, 3, 0, 32)]), "cover 32 tokens, not the window's 33"),
    (_record([ONE, ONE]), "cover 66 tokens"),
    ({"unavailable": 7}, "'unavailable' is not a string"),
])
def test_bad_records_are_refused_naming_the_fault(bad, why):
    with pytest.raises(ProtocolError, match=why):
        parse(bad, 1, 32, "concat")


def test_a_record_the_daemon_could_not_send_names_explain():
    got = parse({"unavailable": "over 524288 bytes"}, 1, 32, "concat")
    with pytest.raises(ConfigError, match=r"tokenfeed explain"):
        got.rows()


def test_an_oversized_frame_is_refused_before_decoding():
    frame = protocol.encode("ready", stream=0, slot=0, seq=0, cursor={},
                            provenance=_record([ONE] * 30_000))
    with pytest.raises(ProtocolError, match=r"exceeds"):
        protocol.decode(frame)


def test_best_fit_records_packed_again_name_exactly_the_tokens_delivered():
    """Best fit's placements are not recorded while packing: a record is cut by packing
    its window again from the position before it (SlotProvenance._replay). In-process,
    every token is numbered by its place in the stream of units, so each record's spans,
    each inside its document, read back as numbers, must be the window filled, bit for
    bit: cut in order (the replaying packer kept from one batch to the next) and in
    reverse (packed again from each batch's own position)."""
    spec = StreamSpec(split="train", rank=0, world_size=1, batch_size=4, seq_len=256,
                      packing="bestfit", buffer_docs=64)
    packer = make_packer(spec, BestFitPosition(0, 0, 0, "", 0))
    table = SimpleNamespace(next_seq=0, slots=[None] * 8)
    stream = SimpleNamespace(spec=spec, packer=packer, supply=SimpleNamespace(), table=table)
    recorder = SlotProvenance(stream, ["data"])  # type: ignore[arg-type]
    recorder.files = [["data", "shard_00000.parquet"]]
    rng = np.random.default_rng(7)
    base, starts, sizes, windows = [], [], [], []
    total = 0
    while len(windows) < recorder.keep_batches:
        while not packer.ready():
            lengths = rng.lognormal(4.5, 1, 40).astype(np.int64) + 2
            unit = Unit.of_lengths(np.arange(total, total + int(lengths.sum()),
                                             dtype=np.uint32), lengths)
            recorder.units[len(base)] = LazyRuns(
                partial(Runs.of_docs, 0, len(base), np.arange(40), lengths), len(unit.tokens))
            recorder._kept = None
            base.append(total)
            starts.append(unit.doc_starts)
            sizes.append(lengths)
            total += len(unit.tokens)
            packer.push(len(base) - 1, unit.tokens, unit.doc_starts)
        before = packer.position
        out = np.empty(spec.window_tokens, dtype=np.uint32)
        packer.fill(out)
        recorder.filled(0, before)
        table.next_seq += 1
        windows.append(out)

    def numbers(record: dict[str, Any]) -> np.ndarray:
        spans = np.frombuffer(record["spans"], dtype="<i8").reshape(-1, 5).tolist()
        assert all(0 <= lo < hi <= sizes[u][d] for _, u, d, lo, hi in spans), spans
        return np.concatenate([base[u] + starts[u][d] + np.arange(lo, hi)
                               for _, u, d, lo, hi in spans])

    first = len(windows) - recorder.keep_batches
    for order in (range(first, len(windows)), reversed(range(first, len(windows)))):
        recorder._replayer = None
        for seq in order:
            np.testing.assert_array_equal(numbers(recorder.record(seq)), windows[seq],
                                          err_msg=f"batch {seq}")
