"""A training rank as a launcher starts it: `python rank_probe.py RUN_DIR N OUT_DIR [--dist]`.

Writes `OUT_DIR/rank{R}.json`: the rank and world size the feed resolved by itself
(no arguments) and the sha1 of each of its first N batches (`conftest.window_digest`'s).
A file per rank, not a line on stdout: a launcher that forwards several ranks' output
through one pipe may join their lines. With --dist it first joins a gloo process group
from the launcher's variables.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch.distributed as dist

from tokenfeed.consumer import TokenFeed, gather_states

B, T = 2, 64


def main() -> None:
    run_dir, n, out_dir = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    if "--dist" in sys.argv:
        dist.init_process_group("gloo")
    with TokenFeed(B, T, run_dir=run_dir, device="cpu") as feed:
        digests = []
        for _ in range(n):
            x, y = next(feed)
            digests.append(hashlib.sha1(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest())
        gathered = len(gather_states(feed)) if dist.is_initialized() else None
        result = {"rank": feed.spec.rank, "world_size": feed.spec.world_size,
                  "digests": digests, "gathered": gathered}
        tmp = out_dir / f".rank{feed.spec.rank}.json"
        tmp.write_text(json.dumps(result))
        tmp.rename(out_dir / f"rank{feed.spec.rank}.json")  # whole or absent
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
