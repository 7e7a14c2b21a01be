"""tokenfeed.integrations: `TokenFeed` in the shapes the torch ecosystem plugs in.

    TokenFeedDataset(batch_size, seq_len, **TokenFeed kwargs)   # torch IterableDataset
    TokenFeedStateful(feed)                                     # DCP Stateful, every rank's state
    tokenfeed.integrations.torchtitan.TokenFeedDataLoader       # torchtitan 0.3 (extra: torchtitan)

These import `tokenfeed.consumer` and `tokenfeed.common`, never the daemon's side, and
nothing beyond torch: torchdata (`StatefulDataLoader`) and torchtitan are optional
extras, imported only by the module that needs them. See docs/integrations.md.
"""

from tokenfeed.integrations.dataset import TokenFeedDataset
from tokenfeed.integrations.dcp import TokenFeedStateful

__all__ = ["TokenFeedDataset", "TokenFeedStateful"]
