"""tokenfeed.consumer: the client that runs inside each training rank."""

from tokenfeed.consumer.feed import TokenFeed
from tokenfeed.consumer.state import gather_states, job_state

__all__ = ["TokenFeed", "gather_states", "job_state"]
