"""Corpus scanning (producer/dataset.py): splits, row-group order, errors and fingerprints."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tokenfeed.common.errors import DataError
from tokenfeed.producer.dataset import RowGroupRef, scan_dataset


def write_shard(
    path: Path,
    row_groups: int,
    *,
    column: str = "text",
    rows: int = 2,
    values: pa.Array | None = None,
) -> Path:
    """A Parquet file of `row_groups` row groups of `rows` rows each in `column`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    column_type = pa.string() if values is None else values.type
    with pq.ParquetWriter(path, pa.schema([(column, column_type)])) as writer:
        for g in range(row_groups):
            data = (
                values
                if values is not None
                else pa.array([f"{path.stem} group {g} row {r}" for r in range(rows)])
            )
            writer.write_table(pa.table({column: data}))
    assert pq.ParquetFile(path).num_row_groups == row_groups
    return path


def write_corpus(root: Path, groups_per_file: dict[str, int]) -> Path:
    for name, groups in groups_per_file.items():
        write_shard(root / name, groups)
    return root


# -- splits ------------------------------------------------------------------------


def test_last_val_files_files_form_the_val_split(tmp_path: Path) -> None:
    write_corpus(tmp_path, {"a.parquet": 1, "b.parquet": 1, "c.parquet": 1, "d.parquet": 1})
    ds = scan_dataset(tmp_path, val_files=2)
    assert [Path(f).name for f in ds.split("train").files] == ["a.parquet", "b.parquet"]
    assert [Path(f).name for f in ds.split("val").files] == ["c.parquet", "d.parquet"]


def test_files_are_ordered_by_name_not_by_creation(tmp_path: Path) -> None:
    write_corpus(tmp_path, {"shard_02.parquet": 1, "shard_00.parquet": 1, "shard_01.parquet": 1})
    ds = scan_dataset(tmp_path, val_files=1)
    assert [Path(f).name for f in ds.split("train").files] == [
        "shard_00.parquet",
        "shard_01.parquet",
    ]
    assert [Path(f).name for f in ds.split("val").files] == ["shard_02.parquet"]


def test_non_parquet_files_are_ignored(tmp_path: Path) -> None:
    write_corpus(tmp_path, {"a.parquet": 1, "b.parquet": 1})
    (tmp_path / "README.md").write_text("not data")
    (tmp_path / "c.parquet.tmp").write_bytes(b"partial")
    ds = scan_dataset(tmp_path, val_files=1)
    assert [Path(f).name for f in ds.split("train").files] == ["a.parquet"]


def test_val_files_zero_puts_every_file_in_train(tmp_path: Path) -> None:
    write_corpus(tmp_path, {"a.parquet": 2, "b.parquet": 1})
    ds = scan_dataset(tmp_path, val_files=0)
    assert [Path(f).name for f in ds.split("train").files] == ["a.parquet", "b.parquet"]
    assert len(ds.split("train")) == 3


def test_empty_val_split_raises_data_error_mentioning_val_files(tmp_path: Path) -> None:
    write_corpus(tmp_path, {"a.parquet": 1, "b.parquet": 1})
    ds = scan_dataset(tmp_path, val_files=0)
    with pytest.raises(DataError, match="--val-files"):
        ds.split("val")


def test_val_files_covering_every_file_leaves_train_empty(tmp_path: Path) -> None:
    write_corpus(tmp_path, {"a.parquet": 1, "b.parquet": 1})
    ds = scan_dataset(tmp_path, val_files=5)
    assert len(ds.split("val").files) == 2
    with pytest.raises(DataError, match="--val-files"):
        ds.split("train")


def test_negative_val_files_is_a_data_error(tmp_path: Path) -> None:
    write_corpus(tmp_path, {"a.parquet": 1})
    with pytest.raises(DataError, match="--val-files -1"):
        scan_dataset(tmp_path, val_files=-1)


def test_unknown_split_name_is_a_data_error(tmp_path: Path) -> None:
    write_corpus(tmp_path, {"a.parquet": 1, "b.parquet": 1})
    with pytest.raises(DataError, match="'test'"):
        scan_dataset(tmp_path).split("test")


# -- row-group sequence ------------------------------------------------------------


def test_row_groups_follow_file_order_then_group_order(tmp_path: Path) -> None:
    write_corpus(tmp_path, {"a.parquet": 2, "b.parquet": 3, "c.parquet": 1, "z.parquet": 4})
    plan = scan_dataset(tmp_path, val_files=1).split("train")
    assert [(r.path, r.row_group) for r in plan.row_groups] == [
        (str(tmp_path / "a.parquet"), 0),
        (str(tmp_path / "a.parquet"), 1),
        (str(tmp_path / "b.parquet"), 0),
        (str(tmp_path / "b.parquet"), 1),
        (str(tmp_path / "b.parquet"), 2),
        (str(tmp_path / "c.parquet"), 0),
    ]
    assert len(plan) == 6


def test_row_group_sizes_come_from_the_footer(tmp_path: Path) -> None:
    texts = ["x" * 100, None, "y" * 300]
    pq.write_table(pa.table({"text": pa.array(texts, pa.string()),
                             "id": pa.array([1, 2, 3])}), tmp_path / "a.parquet",
                   row_group_size=3)
    ref = scan_dataset(tmp_path, val_files=0).split("train").row_groups[0]
    assert ref.num_rows == 3
    assert 400 <= ref.text_bytes < 2000  # the text column only (pages may hold it twice)


def test_parts_cover_every_row_once_in_order() -> None:
    ref = RowGroupRef("a.parquet", 0, num_rows=1024, text_bytes=4_300_000)
    parts = ref.parts(1 << 20)
    assert len(parts) == 5
    assert parts[0][0] == 0 and parts[-1][1] == 1024
    assert all(hi == lo for (_, hi), (lo, _) in itertools.pairwise(parts))
    assert max(hi - lo for lo, hi in parts) - min(hi - lo for lo, hi in parts) <= 1
    assert RowGroupRef("a.parquet", 0, 3, 10**9).parts(1024) == [(0, 1), (1, 2), (2, 3)]
    assert RowGroupRef("a.parquet", 0, 0, 0).parts(1024) == [(0, 0)]


def test_unit_position_strides_ranks_through_the_global_sequence(tmp_path: Path) -> None:
    # 7 train row groups; rank 2 of 3 reads global 2, 5, 8, 11, ... = epoch*7 + ordinal.
    write_corpus(tmp_path, {"a.parquet": 3, "b.parquet": 4, "v.parquet": 1})
    plan = scan_dataset(tmp_path, val_files=1).split("train")
    assert [plan.unit_position(2, 3, u) for u in range(5)] == [
        (0, 2),
        (0, 5),
        (1, 1),
        (1, 4),
        (2, 0),
    ]


def test_unit_position_of_the_only_rank_walks_epochs_in_order(tmp_path: Path) -> None:
    write_corpus(tmp_path, {"a.parquet": 2, "b.parquet": 1, "v.parquet": 1})
    plan = scan_dataset(tmp_path, val_files=1).split("train")
    assert [plan.unit_position(0, 1, u) for u in range(7)] == [
        (0, 0),
        (0, 1),
        (0, 2),
        (1, 0),
        (1, 1),
        (1, 2),
        (2, 0),
    ]


def test_ranks_of_a_world_cover_each_epoch_exactly_once(tmp_path: Path) -> None:
    # 6 row groups over 4 ranks: the first 12 global positions are two whole epochs.
    write_corpus(tmp_path, {"a.parquet": 5, "b.parquet": 1, "v.parquet": 1})
    plan = scan_dataset(tmp_path, val_files=1).split("train")
    seen = sorted(plan.unit_position(r, 4, u) for r in range(4) for u in range(3))
    assert seen == [(e, o) for e in range(2) for o in range(6)]


# -- errors ------------------------------------------------------------------------


def test_missing_data_dir_is_a_data_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="does not exist") as info:
        scan_dataset(missing)
    assert str(missing) in str(info.value)


def test_dir_without_parquet_files_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"no \*\.parquet files"):
        scan_dataset(tmp_path)


def test_file_without_the_text_column_names_the_file_and_its_columns(tmp_path: Path) -> None:
    write_shard(tmp_path / "a.parquet", 1)
    bad = tmp_path / "b.parquet"
    pq.write_table(pa.table({"body": ["x"], "id": [1]}), bad)
    with pytest.raises(DataError) as info:
        scan_dataset(tmp_path)
    message = str(info.value)
    assert str(bad) in message
    assert "'text'" in message
    assert "body, id" in message
    assert "--text-column" in message


def test_text_column_option_selects_another_column(tmp_path: Path) -> None:
    write_shard(tmp_path / "a.parquet", 2, column="body")
    ds = scan_dataset(tmp_path, text_column="body", val_files=0)
    assert ds.text_column == "body"
    assert len(ds.split("train")) == 2


def test_non_string_text_column_is_a_data_error_naming_its_type(tmp_path: Path) -> None:
    bad = write_shard(tmp_path / "a.parquet", 1, values=pa.array([1, 2], type=pa.int64()))
    with pytest.raises(DataError, match="type int64, not string") as info:
        scan_dataset(tmp_path, val_files=0)
    assert str(bad) in str(info.value)


def test_large_string_text_column_is_accepted(tmp_path: Path) -> None:
    write_shard(tmp_path / "a.parquet", 1, values=pa.array(["x", "y"], type=pa.large_string()))
    assert len(scan_dataset(tmp_path, val_files=0).split("train")) == 1


def test_corrupt_parquet_file_is_a_data_error_naming_it(tmp_path: Path) -> None:
    write_shard(tmp_path / "a.parquet", 1)
    bad = tmp_path / "b.parquet"
    bad.write_bytes(b"PAR1 this is not a parquet footer PAR1")
    with pytest.raises(DataError, match="not a readable Parquet file") as info:
        scan_dataset(tmp_path)
    assert str(bad) in str(info.value)


def test_truncated_parquet_file_is_a_data_error(tmp_path: Path) -> None:
    good = write_shard(tmp_path / "a.parquet", 2, rows=50)
    data = good.read_bytes()
    (tmp_path / "b.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="not a readable Parquet file"):
        scan_dataset(tmp_path)


# -- fingerprint -------------------------------------------------------------------


def test_fingerprint_is_equal_for_an_identical_copy_of_the_dir(tmp_path: Path) -> None:
    first = write_corpus(tmp_path / "one", {"a.parquet": 2, "b.parquet": 1})
    second = tmp_path / "two"
    shutil.copytree(first, second)
    assert scan_dataset(first).fingerprint == scan_dataset(second).fingerprint


def test_fingerprint_changes_when_a_file_changes_size(tmp_path: Path) -> None:
    root = write_corpus(tmp_path, {"a.parquet": 2, "b.parquet": 1})
    before = scan_dataset(root).fingerprint
    size = (root / "b.parquet").stat().st_size
    write_shard(root / "b.parquet", 1, rows=20)  # same row-group count, more rows
    assert (root / "b.parquet").stat().st_size != size
    assert scan_dataset(root).fingerprint != before


def test_fingerprint_changes_when_a_file_changes_row_group_count(tmp_path: Path) -> None:
    root = write_corpus(tmp_path, {"a.parquet": 2, "b.parquet": 1})
    before = scan_dataset(root).fingerprint
    write_shard(root / "a.parquet", 3)
    assert scan_dataset(root).fingerprint != before


def test_fingerprint_changes_when_a_file_is_renamed(tmp_path: Path) -> None:
    root = write_corpus(tmp_path, {"a.parquet": 2, "b.parquet": 1})
    before = scan_dataset(root).fingerprint
    (root / "b.parquet").rename(root / "c.parquet")
    assert scan_dataset(root).fingerprint != before


def test_fingerprint_changes_when_a_file_is_added(tmp_path: Path) -> None:
    root = write_corpus(tmp_path, {"a.parquet": 2, "b.parquet": 1})
    before = scan_dataset(root).fingerprint
    write_shard(root / "c.parquet", 1)
    assert scan_dataset(root).fingerprint != before


def test_fingerprint_of_local_files_keeps_the_format_saved_states_hold(tmp_path: Path) -> None:
    """The part before the dot is what states saved before the shard groups carried."""
    import hashlib

    root = write_corpus(tmp_path, {"a.parquet": 2, "b.parquet": 1})
    lines = "".join(f"{name}\0{(root / name).stat().st_size}\0{groups}\n"
                    for name, groups in (("a.parquet", 2), ("b.parquet", 1)))
    overall, groups = scan_dataset(root).fingerprint.split(".")
    assert overall == hashlib.sha256(lines.encode()).hexdigest()[:16]
    assert len(groups) == 64


def test_a_changed_file_is_named_from_the_fingerprint_groups(tmp_path: Path) -> None:
    from tokenfeed.producer.dataset import changed_shards

    root = write_corpus(tmp_path, {"a.parquet": 2, "b.parquet": 1, "c.parquet": 1})
    before = scan_dataset(root).fingerprint
    write_shard(root / "b.parquet", 1, rows=20)
    after = scan_dataset(root)
    assert "b.parquet" in changed_shards(before, after)
    assert changed_shards(before.split(".")[0], after) is None  # a state from before the groups
