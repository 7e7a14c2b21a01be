"""`tokenfeed import-tokenizer`: nanochat's pickle, .tiktoken ranks, Hugging Face byte-level BPE."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import rustbpe
import tiktoken
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from tokenfeed.common.errors import TokenizerError
from tokenfeed.producer.tokenizer import RANKS_FILE, load_tokenizer, save_tokenizer_dir
from tokenfeed.tools.importers import import_tokenizer
from tokenfeed.tools.train_tokenizer import export_encoding
from tokenfeed.tools.vocab import BOS_TOKEN, SPECIAL_TOKENS, SPLIT_PATTERN


def tokenfeed(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tokenfeed.producer", *args],
                          capture_output=True, text=True, timeout=120)


def corpus_documents(data: Path) -> list[str]:
    docs: list[str] = []
    for path in sorted(data.glob("*.parquet")):
        docs += [d for d in pq.read_table(path).column("text").to_pylist() if d]
    return docs


@pytest.fixture(scope="module")
def nanochat_encoding(corpus: Path) -> tiktoken.Encoding:
    """What nanochat's RustBPETokenizer.train_from_iterator builds (and pickles on save)."""
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(iter(corpus_documents(corpus)), 1024 - len(SPECIAL_TOKENS),
                            pattern=SPLIT_PATTERN)
    return export_encoding(bpe, "rustbpe")


def test_nanochat_pickle_imports_with_the_same_ids_on_the_corpus(
    nanochat_encoding: tiktoken.Encoding, corpus: Path, tmp_path: Path
) -> None:
    (tmp_path / "nanochat").mkdir()
    with open(tmp_path / "nanochat" / "tokenizer.pkl", "wb") as f:
        pickle.dump(nanochat_encoding, f)  # nanochat's RustBPETokenizer.save
    result = tokenfeed("import-tokenizer", str(tmp_path / "nanochat"), "--out",
                       str(tmp_path / "out"), "--allow-pickle")
    assert result.returncode == 0, result.stderr
    tok = load_tokenizer(str(tmp_path / "out"))
    assert (tok.bos, tok.bos_id) == (BOS_TOKEN, nanochat_encoding._special_tokens[BOS_TOKEN])
    assert tok.n_vocab == nanochat_encoding.n_vocab
    for index, doc in enumerate(corpus_documents(corpus)):
        assert tok.encode(doc).tolist() == nanochat_encoding.encode_ordinary(doc), index


def test_pickle_is_refused_without_allow_pickle(
    nanochat_encoding: tiktoken.Encoding, tmp_path: Path
) -> None:
    (tmp_path / "tokenizer.pkl").write_bytes(pickle.dumps(nanochat_encoding))
    result = tokenfeed("import-tokenizer", str(tmp_path / "tokenizer.pkl"), "--out",
                       str(tmp_path / "out"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--allow-pickle" in result.stderr and "run code" in result.stderr
    assert not (tmp_path / "out").exists()


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_naming_anything_but_tiktoken_encoding_is_never_called(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    (tmp_path / "tokenizer.pkl").write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(TokenizerError, match=r"names posix\.system"):
        import_tokenizer(tmp_path / "tokenizer.pkl", allow_pickle=True)
    assert not marker.exists()


def test_tiktoken_ranks_file_with_pattern_gives_the_same_ids(
    nanochat_encoding: tiktoken.Encoding, corpus: Path, tmp_path: Path
) -> None:
    save_tokenizer_dir(nanochat_encoding, tmp_path / "dir", bos=BOS_TOKEN)
    ranks = tmp_path / "bpe.tiktoken"
    ranks.write_bytes((tmp_path / "dir" / RANKS_FILE).read_bytes())
    with pytest.raises(TokenizerError, match="--pattern"):
        import_tokenizer(ranks)
    enc, bos = import_tokenizer(ranks, pattern=SPLIT_PATTERN)
    assert bos == BOS_TOKEN and enc._special_tokens == nanochat_encoding._special_tokens
    for doc in corpus_documents(corpus):
        assert enc.encode_ordinary(doc) == nanochat_encoding.encode_ordinary(doc)


def hf_tokenizer(docs: list[str], *, gpt2_style: bool, vocab_size: int = 1024) -> Tokenizer:
    """A byte-level BPE trained with `tokenizers`: nanochat's set-up, or GPT-2's."""
    tok = Tokenizer(models.BPE(byte_fallback=False, unk_token=None, fuse_unk=False))
    if gpt2_style:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(pattern=Regex(SPLIT_PATTERN), behavior="isolated",
                                 invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=0, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"])
    tok.train_from_iterator(docs, trainer)
    return tok


@pytest.mark.parametrize("gpt2_style", [False, True], ids=["split-regex", "gpt2"])
def test_hf_byte_level_bpe_imports_with_the_ids_tokenizers_gives(
    corpus: Path, tmp_path: Path, gpt2_style: bool
) -> None:
    docs = corpus_documents(corpus)
    hf = hf_tokenizer(docs, gpt2_style=gpt2_style)
    hf.save(str(tmp_path / "tokenizer.json"))
    result = tokenfeed("import-tokenizer", str(tmp_path / "tokenizer.json"), "--out",
                       str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    tok = load_tokenizer(str(tmp_path / "out"))
    assert tok.bos == "<|endoftext|>" and tok.bos_id == hf.token_to_id("<|endoftext|>")
    assert tok.n_vocab == hf.get_vocab_size()
    for index, doc in enumerate(docs):
        assert tok.encode(doc).tolist() == hf.encode(doc, add_special_tokens=False).ids, index


def test_hf_tokenizer_with_a_normalizer_is_refused_naming_it(corpus: Path, tmp_path: Path) -> None:
    hf = hf_tokenizer(corpus_documents(corpus)[:20], gpt2_style=True, vocab_size=400)
    hf.normalizer = normalizers.NFC()
    hf.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="normalizer 'NFC'"):
        import_tokenizer(tmp_path / "tokenizer.json")


def test_hf_merges_out_of_id_order_are_refused_naming_the_merge(
    corpus: Path, tmp_path: Path
) -> None:
    hf = hf_tokenizer(corpus_documents(corpus)[:20], gpt2_style=True, vocab_size=400)
    config = json.loads(hf.to_str())
    merges = config["model"]["merges"]
    merges[3], merges[4] = merges[4], merges[3]
    (tmp_path / "tokenizer.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match=r"merge 4 \(.*merge order and id order differ"):
        import_tokenizer(tmp_path / "tokenizer.json")


def test_cli_imports_a_tiktoken_file_with_the_nanochat_pattern_by_name(
    nanochat_encoding: tiktoken.Encoding, tmp_path: Path
) -> None:
    save_tokenizer_dir(nanochat_encoding, tmp_path / "dir", bos=BOS_TOKEN)
    ranks = tmp_path / "bpe.tiktoken"
    ranks.write_bytes((tmp_path / "dir" / RANKS_FILE).read_bytes())
    result = tokenfeed("import-tokenizer", str(ranks), "--pattern", "nanochat", "--out",
                       str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    tok = load_tokenizer(str(tmp_path / "out"))
    assert tok.encoding._pat_str == SPLIT_PATTERN
    assert tok.identity == load_tokenizer(str(tmp_path / "dir")).identity
