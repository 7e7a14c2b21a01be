"""tokenfeed.consumer: the client that runs inside each training rank."""

from tokenfeed.consumer.feed import TokenFeed

__all__ = ["TokenFeed"]
