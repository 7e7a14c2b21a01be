"""A small torchrun training script fed by tokenfeed, with exact data resume.

    tokenfeed serve --data DIR &                       # once per node
    torchrun --nproc_per_node=2 examples/train.py --steps 50 --ckpt-dir /tmp/ckpt
    torchrun --nproc_per_node=2 examples/train.py --steps 100 --ckpt-dir /tmp/ckpt  # resumes

Each rank saves its own checkpoint (`rank{r}.pt`) holding the model, the optimizer
and `feed.state_dict()`; on restart it loads them and the feed continues with the
exact batch that would have come next. The model is a tiny bigram-style
language model: the point is the data path, not the model.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tokenfeed.consumer import TokenFeed


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--ckpt-dir", default="ckpt")
    p.add_argument("--ckpt-every", type=int, default=10)
    p.add_argument("--run-dir", help="tokenfeed daemon run dir (default: $TOKENFEED_RUN_DIR)")
    args = p.parse_args()

    if torch.cuda.is_available():  # before NCCL and the feed: else every rank uses cuda:0
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0

    feed = TokenFeed(args.batch_size, args.seq_len, run_dir=args.run_dir)  # rank/world from dist
    device = feed.device  # cuda:LOCAL_RANK, or CPU
    # The model's vocabulary is the daemon's tokenizer's, padded to a multiple of 64; the
    # check fails at once, naming both, if a restarted daemon serves another tokenizer.
    vocab = -(-feed.vocab_size // 64) * 64
    feed.check_tokenizer(vocab_size=vocab)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(vocab, 64), torch.nn.Linear(64, vocab))
    model.to(device)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)

    ckpt_path = Path(args.ckpt_dir) / f"rank{rank}.pt"
    step = 0
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device)
        model.load_state_dict(ckpt["model"])
        optim.load_state_dict(ckpt["optim"])
        feed.load_state_dict(ckpt["data"])  # before the first next(): exact continuation
        step = ckpt["step"]
        print(f"rank {rank}: resumed at step {step}, data cursor {ckpt['data']['cursor']}")

    with feed:
        while step < args.steps:
            x, y = next(feed)
            logits = model(x)
            loss = F.cross_entropy(logits.view(-1, vocab), y.view(-1))
            optim.zero_grad(set_to_none=True)
            loss.backward()
            if dist.is_initialized():
                for param in model.parameters():
                    if param.grad is not None:
                        dist.all_reduce(param.grad, op=dist.ReduceOp.AVG)
            optim.step()
            step += 1
            if step % args.ckpt_every == 0 or step == args.steps:
                ckpt_path.parent.mkdir(parents=True, exist_ok=True)
                torch.save({"model": model.state_dict(), "optim": optim.state_dict(),
                            "step": step, "data": feed.state_dict()}, ckpt_path)
                print(f"rank {rank}: step {step} loss {loss.item():.3f} epoch {feed.epoch} "
                      f"(checkpoint saved)")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
