"""examples/loss_spike.py on the checkpoint of a real two-rank job: the documents it
excludes are those of the step range, and its restart states are the consumers' own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import ENCODING
from test_explain import assert_explains

from tokenfeed.producer.dataset import scan_dataset
from tokenfeed.producer.provenance import explain
from tokenfeed.producer.tokenizer import load_tokenizer

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "loss_spike.py"


def run_example(ckpt: Path, out: Path, corpus: Path) -> str:
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--ckpt-dir", str(ckpt), "--ckpt-step", "3",
         "--from-step", "5", "--to-step", "7", "--data", str(corpus), "--out", str(out)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_example_excludes_the_ranges_documents_and_restarts_after_it(
        start_daemon, corpus, encoding, tmp_path):
    b, t = 2, 32
    daemon = start_daemon()
    ckpt, later, spike = [], [], []
    for r in range(2):
        with daemon.feed(b, t, rank=r, world_size=2) as feed:
            for _ in range(3):
                next(feed)
            ckpt.append(feed.state_dict())  # the checkpoint at step 3
            spike.append([next(feed) for _ in range(4)][2:])  # steps 5 and 6
            later.append(feed.state_dict())  # after step 6: where a restart begins
    per_rank, gathered = tmp_path / "per-rank", tmp_path / "gathered"
    per_rank.mkdir()
    gathered.mkdir()
    for r, state in enumerate(ckpt):
        (per_rank / f"data-rank{r}.json").write_text(json.dumps(state))
    (gathered / "data.json").write_text(json.dumps(ckpt))
    printed = run_example(per_rank, tmp_path / "a", corpus)
    assert run_example(gathered, tmp_path / "b", corpus) == printed.replace(
        str(tmp_path / "a"), str(tmp_path / "b"))
    assert "rank 1: batches 2..3 after the checkpoint" in printed
    assert "skip_batches=4" in printed
    out = tmp_path / "a"
    restart = json.loads((out / "restart.json").read_text())
    assert [json.loads((out / f"restart-rank{r}.json").read_text()) for r in range(2)] == \
        restart
    assert [s["cursor"] for s in restart] == [s["cursor"] for s in later]
    excluded = {tuple(json.loads(line).values())
                for line in (out / "exclude.jsonl").read_text().splitlines()}
    # the range's batches as explain lists them are the batches the ranks received, and
    # the file excludes exactly their documents
    datasets, tokenizer = {"data": scan_dataset(corpus)}, load_tokenizer(ENCODING)
    documents = set()
    for r in range(2):
        got = explain(datasets, tokenizer, ckpt[r], skip=2, batches=2)
        lines = [{"batch": k, "rows": [[s.to_json() for s in row] for row in rows]}
                 for k, rows in enumerate(got.batches)]
        assert_explains(lines, spike[r], {"data": corpus}, encoding, f"rank {r}")
        documents |= {s.document for rows in got.batches for row in rows for s in row}
    assert excluded == documents
