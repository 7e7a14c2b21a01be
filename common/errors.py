"""Errors shared by the daemon, its workers and the consumer client.

Every error names the offending value and the fix. `UserInputError` and its
subclasses are user mistakes: the CLI prints them as one line on stderr and exits
with code 2, never with a traceback.
"""

from __future__ import annotations


class TokenfeedError(Exception):
    """Base class of every error tokenfeed raises on purpose."""


class UserInputError(TokenfeedError):
    """A bad flag, path, file or argument; the message says what to change."""


class DataError(UserInputError):
    """The corpus cannot be read as asked: no files, missing column, bad split."""


class TokenizerError(UserInputError):
    """The tokenizer spec names nothing that can be loaded offline."""


class ConfigError(UserInputError):
    """A configuration value is out of range or inconsistent."""


class VocabularyMismatchError(ConfigError):
    """The model's vocabulary is smaller than the daemon's tokenizer: ids would overflow it."""


class StateMismatchError(UserInputError):
    """A saved feed state does not match the stream it is loaded into."""


class ProtocolError(TokenfeedError):
    """A control message is malformed, of an unknown op or of another protocol version."""


class DaemonUnavailableError(TokenfeedError):
    """No daemon answers on the control socket."""


class DaemonGoneError(TokenfeedError):
    """The daemon shut down or stopped answering while a consumer was attached."""


class DetachedError(DaemonGoneError):
    """The daemon dropped this consumer (silent past its timeout) and reclaimed its slots."""


class StreamFailedError(TokenfeedError):
    """The daemon could not produce a stream (a row group kept failing, say)."""


class JobFeedError(TokenfeedError):
    """One rank's feed failed or stalled: every rank of the job raises this same error
    (`tokenfeed.consumer.JobHealth`). `rank` is the failing rank (None when a rank's
    process left the check without a word), `step` the check it failed at, `reason` its
    own error."""

    def __init__(self, message: str, *, rank: int | None, step: int, reason: str) -> None:
        super().__init__(message)
        self.rank, self.step, self.reason = rank, step, reason

    def __reduce__(self) -> tuple[object, ...]:  # keyword-only fields survive a pickle
        return _job_feed_error, (str(self), self.rank, self.step, self.reason)


def _job_feed_error(message: str, rank: int | None, step: int, reason: str) -> JobFeedError:
    return JobFeedError(message, rank=rank, step=step, reason=reason)


class ShmFullError(TokenfeedError):
    """`/dev/shm` has no room for a segment; names the bytes needed, the bytes free and the fix."""


class NotSharedError(TokenfeedError):
    """This process does not share `/dev/shm`, the run dir or the uid with the daemon."""
