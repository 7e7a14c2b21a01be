"""Configuration both sides share: the stream a consumer asks for, and where the daemon lives.

A stream is defined by `(split, rank, world_size)` plus the batch shape and packing:
rank `r` of `W` reads row groups `r, r+W, r+2W, ...` of the split's global row-group
sequence and packs them into windows of `batch_size * seq_len + 1` tokens.

The run directory holds the daemon's control socket (`<run_dir>/control`), its
worker socket and its lock file. It is private to the user (mode 0700).
"""

from __future__ import annotations

import enum
import math
import os
import stat
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tokenfeed.common.errors import ConfigError

RUN_DIR_ENV = "TOKENFEED_RUN_DIR"
CONTROL_SOCKET_NAME = "control"
WORKER_SOCKET_NAME = "workers"
SPLITS = ("train", "val")
PACKINGS = ("concat", "bestfit")
MAX_WORLD_SIZE = 1 << 20
MAX_REPLICAS = 1024  # processes of one data-parallel rank sharing its stream (TP x PP)
MAX_WINDOW_TOKENS = 1 << 31  # one ring slot; far beyond any batch that fits a GPU
MAX_POSITION = 1 << 53  # cursor integers stay exact in JSON (float64) and msgpack
MAX_BUFFER_DOCS = 1500  # a bestfit feed state lists them all: worst case ~16 KB
# Named packings a consumer may ask for: each sets the spec's (packing, buffer_docs,
# min_tail). "bestfit" is tokenfeed's best fit (cropped tails of >= 32 tokens return to
# the buffer: 0.09-0.15% of the tokens read are discarded); "nanochat" is nanochat's rule
# (every cropped tail discarded: 31-37%), for numbers comparable with nanochat's own
# loader. Both keep the age rule that bounds how far a resume re-reads (producer/bestfit.py).
PACKING_PRESETS: dict[str, dict[str, Any]] = {
    "concat": {"packing": "concat", "buffer_docs": 1000, "min_tail": 32},  # last two unused
    "bestfit": {"packing": "bestfit", "buffer_docs": 1000, "min_tail": 32},
    "nanochat": {"packing": "bestfit", "buffer_docs": 1000, "min_tail": None},
}
MAX_SOURCES = 64  # named sources of one mixture
MAX_SKIP_BATCHES = 1 << 40  # load_state_dict(skip_batches=N): N below this, on both sides
MAX_SOURCE_NAME = 64
# AF_UNIX paths are limited to 108 bytes on Linux (sun_path), terminator included.
MAX_IPC_PATH_BYTES = 107


@dataclass(frozen=True, kw_only=True)
class StreamSpec:
    """What a consumer asks the daemon for; equal specs may share one ring."""

    split: str = "train"
    rank: int = 0
    world_size: int = 1
    batch_size: int
    seq_len: int
    packing: str = "concat"
    shuffle_seed: int | None = None
    buffer_docs: int = 1000  # bestfit: documents to choose from (nanochat's buffer_size)
    min_tail: int | None = 32  # bestfit: shorter cropped tails are discarded; None: all are
    # Weights of a mixture of named sources, (name, weight) sorted by name, summing to 1;
    # None: the daemon's own weights (a one-source daemon: no mixture).
    mix: tuple[tuple[str, float], ...] | None = None
    # A fixed validation round: the stream ends after this many batches (None: it runs on).
    # Left out of to_dict() when None, so states and daemons that predate it are unchanged.
    max_batches: int | None = None

    def __post_init__(self) -> None:
        if self.mix is not None:
            object.__setattr__(self, "mix", normalize_mix(self.mix))
        for name in ("rank", "world_size", "batch_size", "seq_len", "buffer_docs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{name}={value!r} must be an integer")
        seed = self.shuffle_seed
        if seed is not None and (
            not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63
        ):
            raise ConfigError(f"shuffle_seed={seed!r} must be None or an integer in [0, 2**63)")
        if not 1 <= self.buffer_docs <= MAX_BUFFER_DOCS:
            raise ConfigError(
                f"buffer_docs={self.buffer_docs} must be in [1, {MAX_BUFFER_DOCS}] "
                "(the feed state lists every buffered document)"
            )
        tail = self.min_tail
        if tail is not None and (not isinstance(tail, int) or isinstance(tail, bool) or tail < 1):
            raise ConfigError(f"min_tail={tail!r} must be None or an integer >= 1")
        if self.split not in SPLITS:
            raise ConfigError(f"split={self.split!r} is unknown; use one of {SPLITS}")
        if not 1 <= self.world_size <= MAX_WORLD_SIZE:
            raise ConfigError(f"world_size={self.world_size} must be in [1, {MAX_WORLD_SIZE}]")
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(
                f"rank={self.rank} is outside [0, world_size={self.world_size}); "
                "pass the rank of this process among world_size ranks"
            )
        if self.batch_size < 1 or self.seq_len < 1:
            raise ConfigError(
                f"batch_size={self.batch_size} and seq_len={self.seq_len} must both be >= 1"
            )
        if self.packing not in PACKINGS:
            raise ConfigError(f"packing={self.packing!r} is unknown; use one of {PACKINGS}")
        check_max_batches(self.max_batches, self.split)
        if self.window_tokens > MAX_WINDOW_TOKENS:
            raise ConfigError(
                f"batch_size={self.batch_size} x seq_len={self.seq_len} makes a window of "
                f"{self.window_tokens} tokens, over {MAX_WINDOW_TOKENS}; use a smaller batch"
            )

    @property
    def window_tokens(self) -> int:
        """Tokens in one slot: B*T+1 for concat (inputs and targets overlap by one)."""
        if self.packing == "bestfit":
            return self.batch_size * (self.seq_len + 1)
        return self.batch_size * self.seq_len + 1

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mix"] = None if self.mix is None else dict(self.mix)
        if self.max_batches is None:
            del d["max_batches"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StreamSpec:
        fields = {"split", "rank", "world_size", "batch_size", "seq_len", "packing",
                  "shuffle_seed", "buffer_docs", "min_tail", "mix", "max_batches"}
        if not isinstance(d, dict):
            raise ConfigError(f"stream spec {d!r} is not a map")
        unknown = set(d) - fields
        if unknown:
            raise ConfigError(f"stream spec has unknown fields {sorted(unknown)}")
        try:
            return cls(**d)
        except TypeError as e:  # a required field is missing
            raise ConfigError(f"bad stream spec: {e}") from None


def check_max_batches(max_batches: Any, split: str) -> None:
    """A fixed validation round's length: None, or an integer >= 1 of a val stream."""
    if max_batches is None:
        return
    if (not isinstance(max_batches, int) or isinstance(max_batches, bool)
            or not 1 <= max_batches < MAX_SKIP_BATCHES):
        raise ConfigError(f"max_batches={max_batches!r} must be None or an integer in "
                          f"[1, {MAX_SKIP_BATCHES})")
    if split != "val":
        raise ConfigError(
            f"max_batches={max_batches} is for split='val' (a fixed validation set, the same "
            f"batches every round); a {split!r} feed runs until you stop taking batches")


def round_batches(tokens: Any, max_batches: int | None, batch_size: int, seq_len: int,
                   world_size: int) -> int:
    """`tokens=` of a validation round, all ranks together, as batches per rank (floor,
    nanochat's `eval_tokens // (B * T * world_size)`)."""
    if max_batches is not None:
        raise ConfigError(f"pass tokens={tokens!r} or max_batches={max_batches!r}, not both")
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
        raise ConfigError(f"tokens={tokens!r} must be an integer >= 1")
    per_round = batch_size * seq_len * world_size
    if tokens < per_round:
        raise ConfigError(
            f"tokens={tokens} is less than one batch on every rank ({batch_size} x {seq_len} "
            f"x {world_size} ranks = {per_round} tokens); raise tokens or use max_batches")
    return tokens // per_round


def normalize_mix(mix: Any) -> tuple[tuple[str, float], ...]:
    """Mixture weights as (name, weight) pairs sorted by name, summing to 1.

    Accepts a map or pairs of source name -> non-negative finite number, not all zero.
    """
    items = list(mix.items()) if isinstance(mix, dict) else mix
    try:
        pairs = [(name, weight) for name, weight in items]
    except (TypeError, ValueError):
        raise ConfigError(f"mix={mix!r} must map source names to weights, e.g. "
                          "{'web': 0.7, 'code': 0.3}") from None
    if not 1 <= len(pairs) <= MAX_SOURCES:
        raise ConfigError(f"mix names {len(pairs)} sources; name 1 to {MAX_SOURCES}")
    for name, weight in pairs:
        check_source_name(name)
        if (not isinstance(weight, (int, float)) or isinstance(weight, bool)
                or not math.isfinite(weight) or weight < 0):
            raise ConfigError(f"mix weight {weight!r} of source {name!r} must be a finite "
                              "number >= 0")
    if len({name for name, _ in pairs}) != len(pairs):
        raise ConfigError(f"mix={mix!r} names a source twice")
    total = math.fsum(float(w) for _, w in pairs)
    if total <= 0:
        raise ConfigError(f"mix={mix!r} has no positive weight; give at least one source > 0")
    return tuple(sorted((name, float(w) / total) for name, w in pairs))


def check_feed_options(*, vocab_size: Any, prefetch: Any, replicas: Any,
                       allow_source_changes: Any) -> None:
    """TokenFeed's scalar options, checked before anything connects."""
    if not isinstance(allow_source_changes, bool):
        raise ConfigError(f"allow_source_changes={allow_source_changes!r} must be True or False")
    if vocab_size is not None and (
        not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 1
    ):
        raise ConfigError(f"vocab_size={vocab_size!r} must be None or an integer >= 1")
    if not isinstance(prefetch, int) or isinstance(prefetch, bool) or prefetch < 1:
        raise ConfigError(f"prefetch={prefetch!r} must be an integer >= 1")
    if not isinstance(replicas, int) or isinstance(replicas, bool) or not (
            1 <= replicas <= MAX_REPLICAS):
        raise ConfigError(
            f"replicas={replicas!r} must be an integer in [1, {MAX_REPLICAS}]: the number "
            "of processes on this node that read this data-parallel rank's batches")


def check_source_name(name: Any) -> str:
    if (not isinstance(name, str) or not 1 <= len(name) <= MAX_SOURCE_NAME
            or not all(c.isalnum() or c in "_-." for c in name)):
        raise ConfigError(
            f"source name {name!r} must be 1-{MAX_SOURCE_NAME} letters, digits, '_', '-' or '.'"
        )
    return name


def default_run_dir() -> Path:
    """`$TOKENFEED_RUN_DIR`, else `<tmp>/tokenfeed-<uid>`: one daemon per user per node."""
    env = os.environ.get(RUN_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path(tempfile.gettempdir()) / f"tokenfeed-{os.getuid()}"


def resolve_run_dir(run_dir: str | os.PathLike[str] | None) -> Path:
    return Path(run_dir).expanduser().absolute() if run_dir else default_run_dir().absolute()


def ipc_address(run_dir: Path, name: str) -> str:
    path = str(run_dir / name)
    if len(path.encode()) > MAX_IPC_PATH_BYTES:
        raise ConfigError(
            f"socket path {path!r} is {len(path.encode())} bytes, over the "
            f"{MAX_IPC_PATH_BYTES}-byte limit of Unix sockets; pass a shorter --run-dir"
        )
    return f"ipc://{path}"


def control_address(run_dir: Path) -> str:
    return ipc_address(run_dir, CONTROL_SOCKET_NAME)


def ensure_private_dir(path: Path) -> None:
    """Create `path` with mode 0700, or check that an existing one is ours and private."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise ConfigError(
            f"run dir {path} belongs to uid {st.st_uid}, not to you (uid {os.getuid()}); "
            f"pass --run-dir or set {RUN_DIR_ENV} to a directory of your own"
        )
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, 0o700)


class Preset(enum.Enum):
    VALUE = "the packing preset's value"


PRESET = Preset.VALUE  # a keyword left to the packing preset


def resolve_packing(
    packing: str, buffer_docs: int | Preset, min_tail: int | Preset | None
) -> dict[str, Any]:
    """The spec fields of a packing preset, with the keywords the caller set."""
    if packing not in PACKING_PRESETS:
        raise ConfigError(f"packing={packing!r} is unknown; use one of {tuple(PACKING_PRESETS)}")
    fields = dict(PACKING_PRESETS[packing])
    if packing == "nanochat" and min_tail not in (PRESET, None):
        raise ConfigError(
            f"packing='nanochat' discards every cropped tail, so min_tail={min_tail!r} "
            "contradicts it; use packing='bestfit' to keep tails of min_tail tokens or more"
        )
    if buffer_docs is not PRESET:
        fields["buffer_docs"] = buffer_docs
    if min_tail is not PRESET:
        fields["min_tail"] = min_tail
    return fields
