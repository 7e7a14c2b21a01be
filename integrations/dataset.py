"""`TokenFeedDataset`: a `TokenFeed` as a `torch.utils.data.IterableDataset`.

    ds = TokenFeedDataset(32, 2048, packing="bestfit")           # TokenFeed's arguments
    for x, y in DataLoader(ds, batch_size=None, num_workers=0): ...
    loader = StatefulDataLoader(ds, batch_size=None)             # torchdata
    ckpt["loader"] = loader.state_dict()                         # holds ds.state_dict()
    loader.load_state_dict(ckpt["loader"])                       # exact resume

Each item is one whole batch (the daemon batches), so the DataLoader must not batch
again (`batch_size=None`), and it runs in the training process: the daemon's worker
pool already tokenizes in parallel, and a copy of the feed in each DataLoader worker
would read one stream several times. `num_workers > 0` is a `ConfigError` naming that.

The feed is created with the dataset (a daemon must answer, as for `TokenFeed`) and
reads on: a new `iter()` (the next DataLoader epoch) continues the stream, which never
ends, except with `max_batches` (a fixed validation set): then each `iter()` (each
evaluation, as torchtitan's validator runs one) is one round, the same batches.
`state_dict()` is the feed's: the position after the last batch the iterator handed
out, which is what `StatefulDataLoader` asks for between batches (with `num_workers=0`
nothing is read ahead on its side). `load_state_dict()` on a dataset
whose feed has already returned batches replaces the feed with a fresh one at the
state; a job state (every rank's, `gather_states`) is accepted as by `TokenFeed`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from tokenfeed.common.errors import ConfigError
from tokenfeed.consumer.feed import TokenFeed

_IN_PROCESS = ("TokenFeedDataset runs in the training process: use DataLoader(ds, "
               "batch_size=None, num_workers=0) (the tokenfeed daemon's workers already "
               "tokenize in parallel; a feed per DataLoader worker would read the stream "
               "several times)")


class TokenFeedDataset(IterableDataset[tuple[Any, ...]]):
    def __init__(self, batch_size: int, seq_len: int, **feed_kwargs: Any) -> None:
        self._args = (batch_size, seq_len)
        self._kwargs = feed_kwargs
        self.feed = TokenFeed(batch_size, seq_len, **feed_kwargs)

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        if get_worker_info() is not None:
            raise ConfigError(_IN_PROCESS)
        feed = self.feed
        if feed.spec.max_batches is not None:  # a fixed validation set: each iter() a round
            yield from iter(feed)
            return
        while True:  # a stream never ends; the DataLoader's consumer decides when to stop
            yield next(feed)

    def state_dict(self) -> dict[str, Any]:
        return self.feed.state_dict()

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        if self.feed.batches_returned:  # already read: continue on a fresh feed
            self.feed.close()
            self.feed = TokenFeed(*self._args, **self._kwargs)
        self.feed.load_state_dict(state)

    def close(self) -> None:
        self.feed.close()

    def __reduce__(self) -> Any:
        raise ConfigError(_IN_PROCESS)
