"""One rank of a job that checkpoints its data position with torch.distributed.checkpoint.

    RANK=r WORLD_SIZE=w MASTER_ADDR=.. MASTER_PORT=.. python dcp_rank.py \
        --run-dir D --ckpt C --kind feed|titan --save-after K --out TOKENS.npy
    ... --load                    # resume from C instead, and read to the end of epoch 0

kind `feed`: `{"dataloader": TokenFeedStateful(feed)}` through `dcp.save` / `dcp.load`.
kind `titan`: `TokenFeedDataLoader` built by its config's `build(...)` with the
arguments torchtitan's trainer passes, checkpointed by torchtitan's own
`CheckpointManager` (step K, a one-layer model, its own DCP calls).
Writes the tokens this rank delivered (the epoch-0 part when resuming) to --out.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from tokenfeed.consumer import TokenFeed
from tokenfeed.integrations import TokenFeedStateful

B, T = 2, 64


class Plain:
    """A Stateful of plain values: the optimizer and scheduler slots of the checkpointer."""

    def __init__(self) -> None:
        self.value = {"step": torch.zeros(1)}

    def state_dict(self) -> dict[str, Any]:
        return self.value

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = state


def titan(args: argparse.Namespace, rank: int, world: int) -> tuple[Any, Any, Any]:
    from torchtitan.components.checkpoint import CheckpointManager

    from tokenfeed.integrations.torchtitan import TokenFeedDataLoader

    loader = TokenFeedDataLoader.Config(run_dir=args.run_dir).build(
        dp_world_size=world, dp_rank=rank, tokenizer=None, seq_len=T, local_batch_size=B,
        snapshot_every_n_steps=1)
    manager = CheckpointManager.Config(enable=True, folder="ckpt", interval=1,
                                       keep_latest_k=0).build(
        dataloader=loader, model_parts=[torch.nn.Linear(4, 4)], optimizers=Plain(),
        lr_schedulers=Plain(), states={"train_state": Plain()}, sd_adapter=None,
        base_folder=args.ckpt)

    def batches() -> Any:
        for inputs, labels in loader:
            assert inputs["positions"].dtype == torch.int64
            yield inputs["input"], labels

    return loader.feed, manager, batches()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run-dir", required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--kind", choices=["feed", "titan"], required=True)
    p.add_argument("--save-after", type=int, default=5)
    p.add_argument("--load", action="store_true")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.kind == "titan":
        feed, manager, batches = titan(args, rank, world)
    else:
        feed = TokenFeed(B, T, run_dir=args.run_dir, device="cpu")  # rank/world: the group
        manager, batches = None, iter(feed)
    tokens: list[int] = []
    if args.load:
        if manager is not None:
            assert manager.load(step=args.save_after), "no checkpoint loaded"
        else:
            dcp.load({"dataloader": TokenFeedStateful(feed)}, checkpoint_id=args.ckpt)
        while True:  # to the end of epoch 0 (the batch crossing it holds `offset` of epoch 1)
            x, y = next(batches)
            window = np.concatenate([x.numpy().ravel(), y.numpy()[-1:, -1]])
            cursor = feed.state_dict()["cursor"]
            if cursor["epoch"] > 0:
                tokens += window[:len(window) - cursor["offset"]].tolist()
                break
            tokens += window.tolist()
    else:
        for _ in range(args.save_after):
            x, y = next(batches)
            tokens += np.concatenate([x.numpy().ravel(), y.numpy()[-1:, -1]]).tolist()
        if manager is not None:
            assert manager.save(curr_step=args.save_after), "no checkpoint written"
        else:
            dcp.save({"dataloader": TokenFeedStateful(feed)}, checkpoint_id=args.ckpt)
    np.save(args.out, np.array(tokens, dtype=np.int64))
    if manager is not None:
        manager.close()
    feed.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
