"""torchtitan 0.3 recipes fed by tokenfeed, for its `--module/--config`:

    tokenfeed serve --detach --data ~/data/fineweb --tokenizer ~/tok/llama3-tokenfeed
    torchrun --nproc_per_node=8 -m torchtitan.train \
        --module tokenfeed.integrations.torchtitan_recipes --config llama3_8b

Each recipe is torchtitan's own (`torchtitan.models.llama3.config_registry`) with its
data loader replaced by `TokenFeedDataLoader` (the daemon on `$TOKENFEED_RUN_DIR`,
else tokenfeed's default run dir) and its validator off (torchtitan's validator reads
its own Hugging Face dataset). Everything else stays overridable on the command line
(`--dataloader.packing bestfit`, `--training.steps 100`...). The daemon must serve the
model's tokenizer: `tokenfeed import-tokenizer` converts the `tokenizer.json` under
`hf_assets_path`; the loader refuses another (check_tokenizer). docs/torchtitan.md.
"""

from __future__ import annotations

from typing import Any

from torchtitan.models.llama3 import config_registry as llama3

from tokenfeed.integrations.torchtitan import TokenFeedDataLoader


def with_tokenfeed(config: Any, **loader: Any) -> Any:
    """`config` (a torchtitan `Trainer.Config`) reading its batches from tokenfeed."""
    config.dataloader = TokenFeedDataLoader.Config(**loader)
    config.validator.enable = False
    return config


def llama3_debugmodel() -> Any:
    return with_tokenfeed(llama3.llama3_debugmodel())


def llama3_8b() -> Any:
    return with_tokenfeed(llama3.llama3_8b())


def llama3_70b() -> Any:
    return with_tokenfeed(llama3.llama3_70b())
