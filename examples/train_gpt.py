"""A small GPT trained from tokenfeed: torchrun-ready, gradient accumulation, validation,
one checkpoint for the whole job and an exact resume.

    tokenfeed serve --data DIR --run-dir /tmp/tf &                 # once per node
    python examples/train_gpt.py --run-dir /tmp/tf --steps 50      # one process, CPU is fine
    torchrun --nproc_per_node=2 examples/train_gpt.py --run-dir /tmp/tf --steps 50
    python examples/train_gpt.py --run-dir /tmp/tf --steps 100 --resume   # continues at 51

Rank and world size come from torchrun's environment: with WORLD_SIZE > 1 the script
joins a process group (gloo on CPU, nccl on GPUs) and wraps the model in
DistributedDataParallel; `TokenFeed` reads the same group, so rank r of W gets rank r's
stream. A step is `--grad-accum` micro-batches of `--batch-size` x `--seq-len` tokens per
rank; gradients are synchronised once per step (`no_sync` on the others).

Every `--val-every` steps (and at the last) each rank measures the loss on the first
`--val-batches` batches of a fresh `split="val"` feed, so every evaluation sees the same
tokens; rank 0 prints the mean over ranks. Every `--ckpt-every` steps (and at the last)
rank 0 writes `--ckpt-dir/ckpt.pt` (to a temporary name, then renamed): the model, the
optimizer, the step and `gather_states(feed)`, every rank's position after its last batch.
`--resume` loads it on every rank, and the feed continues with the exact batch that would
have come next; a state it cannot continue from (another batch shape, other data or
tokenizer) is one error line naming what differs.

The model: token + position embeddings, `--layers` pre-norm blocks (causal attention with
`scaled_dot_product_attention`, a 4x GELU MLP), the head tied to the token embedding. Its
vocabulary is the daemon's tokenizer's (`feed.vocab_size`), padded to a multiple of 64.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tokenfeed.common.errors import StateMismatchError
from tokenfeed.consumer import TokenFeed, gather_states

VOCAB_MULTIPLE = 64  # embedding rows padded up: ids above the tokenizer's never occur


class Block(nn.Module):
    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv, self.proj = nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2), is_causal=True)
        h = h + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return h + self.mlp(self.ln2(h))


class GPT(nn.Module):
    def __init__(self, vocab: int, seq_len: int, d_model: int, layers: int, heads: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d_model)
        nn.init.normal_(self.tok.weight, std=0.02)  # the tied head starts near uniform

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        for block in self.blocks:
            h = block(h)
        logits = self.ln(h) @ self.tok.weight.T
        return F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), y.view(-1))


def mean_over_ranks(value: float, device: torch.device) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)  # nccl: on the GPU
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def val_loss(model: nn.Module, args: argparse.Namespace) -> float:
    """Mean loss on the first `--val-batches` batches of a fresh val feed."""
    model.eval()
    losses = []
    with torch.no_grad(), TokenFeed(args.batch_size, args.seq_len, split="val",
                                    run_dir=args.run_dir) as val:
        for x, y in val.take(args.val_batches):
            losses.append(model(x, y).item())
    model.train()
    return sum(losses) / len(losses)


def save(path: Path, model: nn.Module, optim: torch.optim.Optimizer, step: int,
         feed: TokenFeed, rank: int) -> None:
    states = gather_states(feed)  # a collective: every rank calls it
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"model": model.state_dict(), "optim": optim.state_dict(),
                    "step": step, "data": states}, tmp)
        os.replace(tmp, path)  # a crash mid-write never leaves a torn checkpoint


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run-dir", help="the daemon's run dir (default: $TOKENFEED_RUN_DIR)")
    p.add_argument("--steps", type=int, default=50, help="optimizer steps in all")
    p.add_argument("--batch-size", type=int, default=4, help="rows per micro-batch, per rank")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--grad-accum", type=int, default=2, help="micro-batches per step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--val-every", type=int, default=25, help="steps between evaluations")
    p.add_argument("--val-batches", type=int, default=4, help="val batches per evaluation")
    p.add_argument("--ckpt-dir", default="ckpt-gpt")
    p.add_argument("--ckpt-every", type=int, default=25, help="steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from --ckpt-dir/ckpt.pt")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    ckpt_path = Path(args.ckpt_dir) / "ckpt.pt"
    if args.resume and not ckpt_path.exists():
        print(f"train_gpt: error: --resume: no checkpoint at {ckpt_path}; run without "
              "--resume first, or pass its --ckpt-dir", file=sys.stderr)
        return 2
    if torch.cuda.is_available():  # before NCCL and the feed: else every rank uses cuda:0
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.manual_seed(0)  # the same initial weights on every rank

    feed = TokenFeed(args.batch_size, args.seq_len, run_dir=args.run_dir)  # rank/world: dist
    vocab = math.ceil(feed.vocab_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    model: nn.Module = GPT(vocab, args.seq_len, args.d_model, args.layers, args.heads)
    model.to(feed.device)
    try:  # fused: one kernel for all parameters, ~4x faster on CPU (torch >= 2.4 there)
        optim = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, fused=True)
    except RuntimeError:
        optim = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    step = 0
    if args.resume:
        ckpt = torch.load(ckpt_path, map_location=feed.device)
        model.load_state_dict(ckpt["model"])
        optim.load_state_dict(ckpt["optim"])
        try:
            feed.load_state_dict(ckpt["data"])  # this rank's entry; before the first next()
        except StateMismatchError as e:  # another batch shape, data or tokenizer
            print(f"train_gpt: error: --resume from {ckpt_path}: {e}", file=sys.stderr)
            return 2
        step = ckpt["step"]
        if rank == 0:
            print(f"resumed from {ckpt_path} at step {step}; data cursor "
                  f"{ckpt['data'][0]['cursor']}", flush=True)
    raw = model
    if dist.is_initialized():
        model = nn.parallel.DistributedDataParallel(model)
    if rank == 0:
        params = sum(p.numel() for p in raw.parameters())
        print(f"GPT {params / 1e6:.1f}M parameters, vocab {vocab:,}; "
              f"{dist.get_world_size() if dist.is_initialized() else 1} rank(s) x "
              f"{args.grad_accum} x {args.batch_size} x {args.seq_len} tokens per step",
              flush=True)

    with feed:
        while step < args.steps:
            start_s = time.perf_counter()
            total = 0.0
            for micro in range(args.grad_accum):
                x, y = next(feed)
                last = micro == args.grad_accum - 1
                sync = contextlib.nullcontext() if last or not dist.is_initialized() \
                    else model.no_sync()  # type: ignore[operator]
                with sync:
                    loss = model(x, y) / args.grad_accum
                    loss.backward()
                total += loss.item()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optim.step()
            optim.zero_grad(set_to_none=True)
            step += 1
            train_loss = mean_over_ranks(total, feed.device)
            if rank == 0:
                tokens = args.grad_accum * args.batch_size * args.seq_len
                print(f"step {step:>5}/{args.steps}  loss {train_loss:.4f}  "
                      f"{tokens / (time.perf_counter() - start_s):,.0f} tok/s per rank  "
                      f"epoch {feed.epoch}", flush=True)
            if step % args.val_every == 0 or step == args.steps:
                loss_val = mean_over_ranks(val_loss(raw, args), feed.device)
                if rank == 0:
                    print(f"step {step:>5}/{args.steps}  val loss {loss_val:.4f}", flush=True)
            if step % args.ckpt_every == 0 or step == args.steps:
                save(ckpt_path, raw, optim, step, feed, rank)
                if rank == 0:
                    print(f"step {step:>5}/{args.steps}  checkpoint {ckpt_path}", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
