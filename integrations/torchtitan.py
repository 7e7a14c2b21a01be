"""`TokenFeedDataLoader`: tokenfeed as torchtitan 0.3's data loader (`pip install
tokenfeed[torchtitan]`).

torchtitan's trainer builds its loader from the config with its own arguments,

    config.dataloader.build(dp_world_size=..., dp_rank=..., tokenizer=..., seq_len=...,
                            local_batch_size=..., snapshot_every_n_steps=...)

iterates it for `({"input": x, "positions": p}, labels)` and hands it to its
`CheckpointManager` under the key `dataloader`, which DCP saves and loads through
`state_dict()` / `load_state_dict()`. Here batch k of data-parallel rank r is batch k
of the tokenfeed stream (split, r, dp_world_size), on CPU (the trainer moves each
micro-batch to the GPU); `positions` restart at 0 at every BOS and every row start
(`doc_info`), int64 as torchtitan's own loader gives them, so block-causal attention
and RoPE see documents. The saved value is the job state of every data-parallel rank
(integrations/dcp.py), the same on every rank: a resume at another data-parallel degree
is tokenfeed's elastic resume, where torchtitan's own loaders refuse to reshard (its
`dp_rank_{i}` keys; pytorch/torchtitan issues 811 and 816). The gather runs over the
default process group; tensor- and pipeline-parallel peers of a data-parallel rank
read the same stream (`replicas`, one tokenization) and must agree.

The tokenizer torchtitan built (from `hf_assets_path`) is checked against the daemon's
when `check_tokenizer` is set: its vocabulary must hold the daemon's ids and its BOS,
if it has one, must be the daemon's. A recipe for `--module/--config` is
`tokenfeed.integrations.torchtitan_recipes`; see docs/torchtitan.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torchtitan.components.dataloader import BaseDataLoader

from tokenfeed.consumer.feed import TokenFeed
from tokenfeed.integrations.dcp import TokenFeedStateful, job_state_of


class TokenFeedDataLoader(BaseDataLoader):
    @dataclass(kw_only=True, slots=True)
    class Config(BaseDataLoader.Config):
        run_dir: str | None = None
        """The node daemon's run dir (default: $TOKENFEED_RUN_DIR, else tokenfeed's default)."""

        split: str = "train"
        packing: str = "concat"
        """concat, bestfit (rows start at a BOS) or nanochat."""

        shuffle_seed: int | None = None
        replicas: int = 1
        """Processes on a node that read one data-parallel rank's batches (TP x PP peers)."""

        positions: bool = True
        """Yield per-document positions (restart at every BOS) with the inputs."""

        check_tokenizer: bool = True
        """Refuse a daemon whose tokenizer does not fit the trainer's."""

        reconnect_s: float = 0.0

    def __init__(
        self,
        config: Config,
        *,
        dp_world_size: int,
        dp_rank: int,
        tokenizer: Any = None,
        seq_len: int,
        local_batch_size: int,
        **_unused: Any,  # snapshot_every_n_steps: the state is a few KB, taken on demand
    ) -> None:
        self.config = config
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        self._shape = (local_batch_size, seq_len)
        self.feed = self._new_feed()
        self._stateful = TokenFeedStateful(self)
        if config.check_tokenizer and tokenizer is not None:
            _check(self.feed, tokenizer)

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        while True:  # the stream never ends; torchtitan stops at training.steps
            batch = next(self.feed)
            inputs = {"input": batch[0]}
            if self.config.positions:
                inputs["positions"] = batch[2].position_ids.to(torch.int64)
            yield inputs, batch[1]

    def state_dict(self) -> dict[str, Any]:
        return self._stateful.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:  # torchtitan: an empty state is valid (nothing saved)
            return
        states = job_state_of(state_dict)
        if self.feed.batches_returned:  # loaded after it read: a fresh feed at the state
            self.feed.close()
            self.feed = self._new_feed()
        self.feed.load_state_dict(states)

    def _new_feed(self) -> TokenFeed:
        c = self.config
        return TokenFeed(*self._shape, split=c.split, rank=self.dp_rank,
                         world_size=self.dp_world_size, device="cpu", run_dir=c.run_dir,
                         packing=c.packing, shuffle_seed=c.shuffle_seed, replicas=c.replicas,
                         doc_info=c.positions, reconnect_s=c.reconnect_s)

    def close(self) -> None:
        self.feed.close()


def _check(feed: TokenFeed, tokenizer: Any) -> None:
    vocab = tokenizer.get_vocab_size() if hasattr(tokenizer, "get_vocab_size") else None
    bos = getattr(tokenizer, "bos_id", None)
    feed.check_tokenizer(vocab_size=vocab if isinstance(vocab, int) else None,
                         bos_id=bos if isinstance(bos, int) else None)
