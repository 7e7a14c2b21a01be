"""nanochat's training-loop shape against a tokenfeed daemon, as one rank of a job.

The loop of nanochat's scripts/base_train.py, with the model left out: the first
batch is fetched before the loop; each step trains on (x, y) and fetches the next
batch with its state *during* the step (the prefetch); a checkpoint at step s stores
the state that came with the prefetched batch, gathered from every rank into one
file written by rank 0, exactly as examples/nanochat/ patches base_train.py to do.

    python tests/nanochat_loop.py --run-dir D --ckpt states.json --out rank.npy \\
        --steps 12 --save-at 5 [--batch-size 2 --seq-len 64 --packing nanochat]

With RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set it joins a gloo process group.
If --ckpt exists it resumes from it; it stops after saving at --save-at (or at
--steps) WITHOUT closing the feed, like a trainer that just ends, and writes the
rows (inputs and the last target) of every batch it trained on to --out.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from tokenfeed.consumer import TokenFeed, gather_states


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run-dir", required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--save-at", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--packing", default="nanochat")
    p.add_argument("--vocab-size", type=int, default=100_352)
    p.add_argument("--bos-id", type=int, default=100_257)  # nanochat: tokenizer's BOS
    args = p.parse_args()

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    feed = TokenFeed(args.batch_size, args.seq_len, run_dir=args.run_dir, device="cpu",
                     packing=args.packing).check_tokenizer(bos_id=args.bos_id,
                                                           vocab_size=args.vocab_size)
    ckpt = Path(args.ckpt)
    step = 0
    if ckpt.exists():
        meta = json.loads(ckpt.read_text())
        feed.load_state_dict(meta["dataloader_state_dict"])  # every rank's; takes its own
        step = meta["step"]
    loader = feed.with_state()
    x, y, state = next(loader)  # kick off the load of the first batch
    trained = []
    while True:
        if step == args.save_at:
            states = gather_states(state)  # the prefetched batch's: resume trains on it
            if feed.spec.rank == 0:
                ckpt.write_text(json.dumps({"step": step, "dataloader_state_dict": states},
                                           indent=2))
        if step in (args.save_at, args.steps):
            break
        assert int(y.max()) < args.vocab_size and bool((x[:, 1:] == y[:, :-1]).all())
        trained.append(torch.cat([x, y[:, -1:]], dim=1).numpy())  # "train": rows of T+1
        x, y, state = next(loader)  # prefetch the next batch during the step
        step += 1
    np.save(args.out, np.stack(trained) if trained else np.zeros((0,), dtype=np.int64))
    if dist.is_initialized():
        dist.barrier()  # rank 0 has written the file before anyone exits
        dist.destroy_process_group()
    # no feed.close(): the interpreter exit detaches it


if __name__ == "__main__":
    main()
