"""Convert other tokenizer formats into tokenfeed's tokenizer directory, checked exactly.

    encoding, bos = import_tokenizer(Path(src), allow_pickle=..., pattern=..., bos=...)
    save_tokenizer_dir(encoding, out, bos=bos)

Sources, by what `src` is:

- nanochat's `tokenizer.pkl` (or a directory holding one): a pickled tiktoken `Encoding`.
  Unpickling can run code from the file, so it is read only with `allow_pickle=True`, and
  then with an unpickler that resolves no global but `tiktoken.core.Encoding`: a pickle
  naming anything else is refused before that thing is imported or called. The daemon
  never unpickles; it reads the directory this writes.
- a `*.tiktoken` ranks file ("<base64 token> <rank>" lines, tiktoken's format) plus the
  split `pattern`; nanochat's special tokens (`vocab.SPECIAL_TOKENS`) are added after the
  highest rank.
- a Hugging Face `tokenizer.json` of a byte-level BPE (GPT-2, Llama-3, Qwen style): model
  BPE, a ByteLevel pre-tokenizer (alone, or after one Split regex), no normalizer, a
  ByteLevel decoder. Its vocabulary is mapped from the byte-to-unicode alphabet back to
  bytes and its ids become ranks. tiktoken merges by rank and Hugging Face by merge order,
  so every merge must make a token whose id grows with the merge's position, no two
  merges making one token (checked for every merge), and on sample texts (tricky
  whitespace, digits, contractions, scripts, emoji) tiktoken's ids must equal a plain
  merge-order BPE's and decode back to the text. Anything else is refused, naming what
  differs. Added tokens become special
  tokens: identical on any text that does not contain an added token's literal content
  (tokenfeed encodes such text as ordinary text; Hugging Face would emit the added id).

Failure behaviour: every refusal is a `TokenizerError` naming the file, the field and the
fix. Nothing is written here; the caller saves the returned encoding.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
from itertools import pairwise
from pathlib import Path
from typing import Any

import tiktoken

from tokenfeed.common.errors import TokenizerError
from tokenfeed.producer.backends import SELF_CHECK_TEXTS
from tokenfeed.producer.tokenizer import bos_token, read_ranks
from tokenfeed.tools.vocab import SPECIAL_TOKENS

NANOCHAT_PICKLE = "tokenizer.pkl"
HF_FILE = "tokenizer.json"
# GPT-2's pre-tokenizer regex: what a ByteLevel pre-tokenizer with use_regex=true applies.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_PICKLE_ALLOWED = {("tiktoken.core", "Encoding")}


class _EncodingUnpickler(pickle.Unpickler):
    """Resolves only tiktoken's Encoding class; any other global is refused unimported."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_ALLOWED:
            raise TokenizerError(
                f"the pickle names {module}.{name}; a tokenizer.pkl holds only a "
                "tiktoken.core.Encoding. Refused without importing or calling it."
            )
        return tiktoken.Encoding


def load_pickle(path: Path, *, allow_pickle: bool) -> tiktoken.Encoding:
    if not allow_pickle:
        raise TokenizerError(
            f"{path} is a pickle: loading one can run code from the file. Pass "
            "--allow-pickle only for a file you trust (nanochat's own tokenizer.pkl)."
        )
    try:
        enc = _EncodingUnpickler(io.BytesIO(path.read_bytes())).load()
    except TokenizerError as e:
        raise TokenizerError(f"{path}: {e}") from None
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise TokenizerError(f"{path} is not a readable pickled tiktoken Encoding: {e}") from e
    if not isinstance(enc, tiktoken.Encoding):
        raise TokenizerError(f"{path} holds a {type(enc).__name__}, not a tiktoken Encoding")
    return enc


def load_ranks_file(path: Path, pattern: str | None) -> tiktoken.Encoding:
    if not pattern:
        raise TokenizerError(
            f"{path} holds ranks only; pass --pattern with the split regex it was trained "
            "with (nanochat's and train-tokenizer's: see `tokenfeed train-tokenizer --help`)"
        )
    ranks = read_ranks(path)
    first = max(ranks.values()) + 1
    special = {token: first + i for i, token in enumerate(SPECIAL_TOKENS)}
    try:
        return tiktoken.Encoding(name=path.stem, pat_str=pattern, mergeable_ranks=ranks,
                                 special_tokens=special)
    except ValueError as e:
        raise TokenizerError(f"--pattern {pattern!r} is rejected by tiktoken: {e}") from e


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable bytes map to themselves, the rest above 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _refuse(path: Path, what: str) -> TokenizerError:
    return TokenizerError(
        f"{path}: {what}; only byte-level BPE tokenizers (GPT-2, Llama-3, Qwen style) import "
        "exactly, so it was refused"
    )


def _hf_pattern(path: Path, config: dict[str, Any]) -> str:
    pre = config.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if not kinds or kinds[-1] != "ByteLevel" or len(kinds) > 2:
        raise _refuse(path, f"pre_tokenizer is {kinds}, not [Split?, ByteLevel]")
    byte_level = steps[-1]
    if byte_level.get("add_prefix_space"):
        raise _refuse(path, "ByteLevel add_prefix_space is true (tiktoken adds no space)")
    if len(steps) == 2:
        split = steps[0]
        regex = (split.get("pattern") or {}).get("Regex")
        if kinds[0] != "Split" or not regex or split.get("behavior") != "Isolated" \
                or split.get("invert"):
            raise _refuse(path, f"pre_tokenizer step {split} is not an isolated Split regex")
        if byte_level.get("use_regex", True):
            raise _refuse(path, "ByteLevel use_regex is true after a Split (two regexes)")
        return str(regex)
    if not byte_level.get("use_regex", True):
        raise _refuse(path, "ByteLevel use_regex is false and there is no Split regex")
    return GPT2_PATTERN


def _merge_bpe(word: bytes, merge_rank: dict[tuple[bytes, bytes], int],
               whole: set[bytes]) -> list[bytes]:
    """Plain BPE by merge order, as Hugging Face applies a merges list; a piece in `whole`
    (the vocabulary, with Hugging Face's ignore_merges) is one token as it is."""
    if word in whole:
        return [word]
    parts = [bytes([b]) for b in word]
    while len(parts) > 1:
        candidates = [(merge_rank[pair], i) for i, pair in enumerate(pairwise(parts))
                      if pair in merge_rank]
        if not candidates:
            break
        _, i = min(candidates)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def load_hf(path: Path) -> tiktoken.Encoding:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path} is not a readable tokenizer.json: {e}") from e
    model = config.get("model") or {}
    if model.get("type") != "BPE":
        raise _refuse(path, f"model type is {model.get('type')!r}, not 'BPE'")
    if config.get("normalizer") is not None:
        raise _refuse(path, f"normalizer {config['normalizer'].get('type')!r} changes the text")
    decoder = config.get("decoder") or {}
    if decoder.get("type") != "ByteLevel":
        raise _refuse(path, f"decoder is {decoder.get('type')!r}, not 'ByteLevel'")
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise _refuse(path, f"model {key} is {model[key]!r}")
    pattern = _hf_pattern(path, config)
    to_byte = {c: b for b, c in _bytes_to_unicode().items()}
    added = {t["content"]: int(t["id"]) for t in config.get("added_tokens", [])}
    ranks: dict[bytes, int] = {}
    for text, token_id in model.get("vocab", {}).items():
        if added.get(text) == token_id:
            continue  # GPT-2 lists <|endoftext|> in both; it is a special token here
        try:
            ranks[bytes(to_byte[c] for c in text)] = int(token_id)
        except KeyError:
            raise _refuse(path, f"vocab entry {text!r} is not in the byte-level alphabet") \
                from None
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise _refuse(path, f"{len(missing)} single bytes have no token (first {missing[0]:#04x})")
    merge_rank: dict[tuple[bytes, bytes], int] = {}
    made: set[bytes] = set()
    previous = -1
    for index, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        a, b = (bytes(to_byte[c] for c in s) for s in (left, right))
        result = ranks.get(a + b)
        if result is None or a + b in made or result <= previous:
            raise _refuse(path, f"merge {index} ({left!r} {right!r}) gives "
                          f"{'no token' if result is None else f'id {result}'} after id "
                          f"{previous}: merge order and id order differ")
        previous = result
        made.add(a + b)
        merge_rank[(a, b)] = index
    special = {text: token_id for text, token_id in added.items() if text.encode() not in ranks}
    enc = tiktoken.Encoding(name=path.parent.name or "hf", pat_str=pattern,
                            mergeable_ranks=ranks, special_tokens=special)
    whole = set(ranks) if model.get("ignore_merges") else set()
    _check_hf_sample(path, enc, merge_rank, ranks, whole)
    return enc


def _check_hf_sample(path: Path, enc: tiktoken.Encoding,
                     merge_rank: dict[tuple[bytes, bytes], int], ranks: dict[bytes, int],
                     whole: set[bytes]) -> None:
    import regex  # tiktoken's own dependency

    splitter = regex.compile(enc._pat_str)
    for text in SELF_CHECK_TEXTS:
        expected = [ranks[part] for piece in splitter.findall(text)
                    for part in _merge_bpe(piece.encode("utf-8"), merge_rank, whole)]
        got = enc.encode_ordinary(text)
        if got != expected:
            raise _refuse(path, f"on {text[:40]!r} tiktoken gives {got[:8]}... and the merges "
                          f"list gives {expected[:8]}...")
        if enc.decode(got) != text:
            raise _refuse(path, f"{text[:40]!r} does not decode back to itself")


def import_tokenizer(
    src: Path, *, allow_pickle: bool = False, pattern: str | None = None, bos: str | None = None
) -> tuple[tiktoken.Encoding, str]:
    """The encoding in `src` and its document separator; see the module docstring."""
    if src.is_dir():
        for name in (NANOCHAT_PICKLE, HF_FILE):
            if (src / name).is_file():
                return import_tokenizer(src / name, allow_pickle=allow_pickle,
                                        pattern=pattern, bos=bos)
        raise TokenizerError(f"{src} holds neither {NANOCHAT_PICKLE} nor {HF_FILE}; pass the file")
    if not src.is_file():
        raise TokenizerError(f"{src} does not exist; pass a tokenizer.pkl, a .tiktoken ranks "
                             "file or a Hugging Face tokenizer.json")
    with open(src, "rb") as f:
        head = f.read(2)
    if src.suffix in (".pkl", ".pickle") or head[:1] == b"\x80":
        enc = load_pickle(src, allow_pickle=allow_pickle)
    elif src.suffix == ".json":
        enc = load_hf(src)
    elif src.suffix == ".tiktoken" or _looks_like_ranks(src):
        enc = load_ranks_file(src, pattern)
    else:
        raise TokenizerError(f"{src}: not a pickle, a .tiktoken ranks file or a .json; "
                             "pass one of those")
    if pattern and src.suffix != ".tiktoken" and pattern != enc._pat_str:
        raise TokenizerError(f"--pattern is for .tiktoken ranks files; {src} has its own")
    return enc, bos_token(enc, bos)


def _looks_like_ranks(path: Path) -> bool:
    with open(path, "rb") as f:
        first = f.readline().split()
    if len(first) != 2 or not first[1].isdigit():
        return False
    try:
        base64.b64decode(first[0], validate=True)
    except ValueError:
        return False
    return True
