"""The offline sample corpus: stdlib text, deterministic, written as Parquet shards."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tokenfeed.common.errors import ConfigError
from tokenfeed.tools.corpus import (
    MIN_DOC_CHARS,
    build_installed_corpus,
    build_sample_corpus,
    installed_sources,
    sample_documents,
    write_shards,
)


def utf8_bytes(docs: list[str]) -> int:
    return sum(len(doc.encode("utf-8")) for doc in docs)


def read_column(paths: list[Path], column: str) -> list[object]:
    return [value for path in paths for value in pq.read_table(path)[column].to_pylist()]


@pytest.fixture(scope="module")
def all_documents() -> list[str]:  # every source of the install parsed: its tests are slow
    return sample_documents(10**9)


def test_two_builds_write_identical_documents(tmp_path: Path) -> None:
    first = build_sample_corpus(tmp_path / "a", target_bytes=200_000, num_files=3)
    second = build_sample_corpus(tmp_path / "b", target_bytes=200_000, num_files=3)
    assert [p.name for p in first] == [p.name for p in second]
    first_text = read_column(first, "text")
    assert first_text == read_column(second, "text")
    assert len(first_text) > 10


def test_target_bytes_is_an_upper_bound_met_closely() -> None:
    for target_bytes in (50_000, 300_000):
        total = utf8_bytes(sample_documents(target_bytes))
        assert target_bytes - MIN_DOC_CHARS <= total <= target_bytes


@pytest.mark.slow
def test_larger_target_than_the_stdlib_returns_everything_once(
    all_documents: list[str],
) -> None:
    assert len(set(all_documents)) == len(all_documents)
    assert utf8_bytes(all_documents) > 1_000_000  # CPython 3.11: ~2.4 MB


@pytest.mark.slow
def test_documents_are_long_enough(all_documents: list[str]) -> None:
    assert min(len(doc) for doc in all_documents) >= MIN_DOC_CHARS


@pytest.mark.slow
def test_documents_include_help_topics_docstrings_and_license(
    all_documents: list[str],
) -> None:
    import pydoc_data.topics

    assert pydoc_data.topics.topics["assert"] in all_documents
    assert any(doc.startswith("Heap queue algorithm") for doc in all_documents)  # heapq
    assert any("PYTHON SOFTWARE FOUNDATION LICENSE" in doc for doc in all_documents)


def test_shards_have_requested_row_groups(tmp_path: Path) -> None:
    docs = [f"document {i}" for i in range(100)]
    paths = write_shards(docs, tmp_path, num_files=3, rows_per_group=10)
    assert [p.name for p in paths] == [f"shard_{i:05d}.parquet" for i in range(3)]
    groups = []
    for path in paths:
        meta = pq.ParquetFile(path).metadata
        groups.append([meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
    assert groups == [[10, 10, 10, 4], [10, 10, 10, 3], [10, 10, 10, 3]]


def test_shards_hold_text_and_global_id_in_order(tmp_path: Path) -> None:
    docs = [f"document {i}" for i in range(25)]
    paths = write_shards(docs, tmp_path / "new" / "dir", num_files=4, rows_per_group=4)
    schema = pq.read_schema(paths[0])
    assert schema.names == ["text", "id"]
    assert schema.field("text").type == pa.string()
    assert schema.field("id").type == pa.int64()
    assert read_column(paths, "text") == docs
    assert read_column(paths, "id") == list(range(25))


def test_text_column_name_is_configurable(tmp_path: Path) -> None:
    paths = write_shards(["a", "b"], tmp_path, num_files=1, rows_per_group=1, text_column="content")
    assert pq.read_schema(paths[0]).names == ["content", "id"]


def test_null_documents_survive_as_nulls(tmp_path: Path) -> None:
    docs = ["first", None, "third", None]
    paths = write_shards(docs, tmp_path, num_files=2, rows_per_group=1)
    assert read_column(paths, "text") == docs


@pytest.mark.parametrize(
    ("num_files", "rows_per_group", "match"),
    [(0, 10, "num_files is 0"), (2, 0, "rows_per_group is 0"), (6, 10, "5 documents")],
)
def test_write_shards_rejects_bad_counts(
    tmp_path: Path, num_files: int, rows_per_group: int, match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        write_shards(["doc"] * 5, tmp_path, num_files=num_files, rows_per_group=rows_per_group)


@pytest.mark.slow
def test_default_build_writes_eight_shards(tmp_path: Path) -> None:
    paths = build_sample_corpus(tmp_path)  # its time: benchmarks/startup.py
    assert len(paths) == 8


def test_installed_sources_add_site_packages_to_the_stdlib() -> None:
    keys = [key for _, key in installed_sources()]
    assert any(key.endswith("numpy/__init__.py") for key in keys)  # a dependency's docstrings
    assert not any("/tests/" in key for key in keys)
    assert keys == [key for _, key in installed_sources()]


def test_installed_corpus_has_full_row_groups_and_the_rest_last(tmp_path: Path) -> None:
    sources = installed_sources()[:80]  # parsing all of site-packages takes ~20 s
    paths = build_installed_corpus(tmp_path / "a", docs_per_group=8, groups_per_file=2,
                                   sources=sources)
    groups = []
    for path in paths:
        meta = pq.ParquetFile(path).metadata
        groups.append([meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
    assert all(g == [8, 8] for g in groups[:-1])
    assert 1 <= sum(groups[-1]) <= 16
    texts = read_column(paths, "text")
    assert len(set(texts)) == len(texts)
    assert min(len(t) for t in texts) >= MIN_DOC_CHARS
    again = build_installed_corpus(tmp_path / "b", docs_per_group=8, groups_per_file=2,
                                   sources=sources)
    assert read_column(again, "text") == texts
