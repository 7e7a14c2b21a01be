"""Restart a torchrun job on another number of ranks without losing or repeating data.

    tokenfeed serve --data DIR --detach
    torchrun --nproc_per_node=4 examples/elastic_resume.py --ckpt-dir /tmp/ck --steps 20
    torchrun --nproc_per_node=3 examples/elastic_resume.py --ckpt-dir /tmp/ck --steps 40

Every rank saves its own feed state (`data-rank{r}.json`, a few hundred bytes to a
few KB) with each checkpoint, and rank 0 saves the model and `world_size`. On restart
EVERY rank reads ALL the data files of the previous job and passes the list to
`feed.load_state_dict`: with the same number of ranks each takes its own entry (exact
resume); with another, the rest of the epoch is divided among the new ranks, so every
token of every document is trained on once, and later epochs use the new world size.
Each run prints one line per rank: how many tokens it trained on and its data epoch.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tokenfeed.consumer import TokenFeed


def save(ckpt: Path, rank: int, world: int, step: int, model: torch.nn.Module,
         feed: TokenFeed) -> None:
    ckpt.mkdir(parents=True, exist_ok=True)
    for old in ckpt.glob("data-rank*.json") if rank == 0 else ():
        if int(old.stem.removeprefix("data-rank")) >= world:  # a larger previous job's
            old.unlink()
    (ckpt / f"data-rank{rank}.json").write_text(json.dumps(feed.state_dict()))
    if rank == 0:
        torch.save({"model": model.state_dict(), "step": step, "world_size": world},
                   ckpt / "model.pt")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt-dir", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--run-dir", help="tokenfeed daemon run dir (default: $TOKENFEED_RUN_DIR)")
    args = p.parse_args()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1

    # A bigram model over hashed targets: the point is the data path, not the model.
    model = torch.nn.Sequential(torch.nn.Embedding(100_352, 16), torch.nn.Linear(16, 1024))
    optim = torch.optim.SGD(model.parameters(), lr=0.1)
    feed = TokenFeed(args.batch_size, args.seq_len, run_dir=args.run_dir, device="cpu")
    ckpt, step = Path(args.ckpt_dir), 0
    if (ckpt / "model.pt").exists():
        saved = torch.load(ckpt / "model.pt")
        model.load_state_dict(saved["model"])
        step = saved["step"]
        states = [json.loads((ckpt / f"data-rank{r}.json").read_text())
                  for r in range(saved["world_size"])]  # every rank reads every file
        feed.load_state_dict(states)  # same world size: exact; another: elastic
    tokens = 0
    with feed:
        while step < args.steps:
            x, y = next(feed)
            loss = F.cross_entropy(model(x).flatten(0, 1), (y % 1024).flatten())
            optim.zero_grad()
            loss.backward()
            optim.step()
            tokens += x.numel()
            step += 1
        if dist.is_initialized():
            dist.barrier()
        save(ckpt, rank, world, step, model, feed)
        print(f"rank {rank}/{world}: trained on {tokens} tokens, step {step}, "
              f"data epoch {feed.epoch}", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
