"""A training rank as a launcher starts it: `python rank_probe.py RUN_DIR N [--dist]`.

Prints one JSON line: the rank and world size the feed resolved by itself (no
arguments) and the sha1 of each of its first N batches (`conftest.window_digest`'s).
With --dist it first joins a gloo process group from the launcher's variables.
"""

from __future__ import annotations

import hashlib
import json
import sys

import torch.distributed as dist

from tokenfeed.consumer import TokenFeed, gather_states

B, T = 2, 64


def main() -> None:
    run_dir, n = sys.argv[1], int(sys.argv[2])
    if "--dist" in sys.argv:
        dist.init_process_group("gloo")
    with TokenFeed(B, T, run_dir=run_dir, device="cpu") as feed:
        digests = []
        for _ in range(n):
            x, y = next(feed)
            digests.append(hashlib.sha1(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest())
        gathered = len(gather_states(feed)) if dist.is_initialized() else None
        print(json.dumps({"rank": feed.spec.rank, "world_size": feed.spec.world_size,
                          "digests": digests, "gathered": gathered}), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
