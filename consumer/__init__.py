"""tokenfeed.consumer: the client that runs inside each training rank."""

from tokenfeed.consumer.feed import TokenFeed
from tokenfeed.consumer.health import JobHealth
from tokenfeed.consumer.state import gather_states, job_state

__all__ = ["JobHealth", "TokenFeed", "gather_states", "job_state"]
