"""Shared configuration (common/config.py): stream specs, run dirs and socket addresses."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest

from tokenfeed.common.config import (
    MAX_IPC_PATH_BYTES,
    RUN_DIR_ENV,
    StreamSpec,
    control_address,
    default_run_dir,
    ensure_private_dir,
    ipc_address,
    resolve_run_dir,
)
from tokenfeed.common.errors import ConfigError

# -- StreamSpec validation ---------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "shown"),
    [
        ({"split": "test"}, "split='test'"),
        ({"rank": 2, "world_size": 2}, "rank=2"),
        ({"rank": 5, "world_size": 2}, "rank=5"),
        ({"rank": -1}, "rank=-1"),
        ({"world_size": 0}, "world_size=0"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"seq_len": 0}, "seq_len=0"),
        ({"seq_len": -3}, "seq_len=-3"),
        ({"packing": "greedy"}, "packing='greedy'"),
    ],
)
def test_invalid_stream_spec_is_a_config_error_naming_the_value(
    overrides: dict[str, Any], shown: str
) -> None:
    kwargs: dict[str, Any] = {"batch_size": 4, "seq_len": 16, **overrides}
    with pytest.raises(ConfigError) as info:
        StreamSpec(**kwargs)
    assert shown in str(info.value)


def test_world_size_zero_is_reported_as_world_size_not_rank() -> None:
    with pytest.raises(ConfigError, match=r"world_size=0 must be in \[1, "):
        StreamSpec(rank=0, world_size=0, batch_size=1, seq_len=1)


def test_last_rank_of_a_world_is_valid() -> None:
    spec = StreamSpec(rank=7, world_size=8, batch_size=1, seq_len=1)
    assert (spec.rank, spec.world_size) == (7, 8)


def test_stream_spec_defaults_to_train_rank_zero_of_one_concat() -> None:
    spec = StreamSpec(batch_size=2, seq_len=3)
    assert (spec.split, spec.rank, spec.world_size, spec.packing, spec.shuffle_seed) == (
        "train",
        0,
        1,
        "concat",
        None,
    )


def test_stream_spec_needs_keyword_arguments() -> None:
    with pytest.raises(TypeError):
        StreamSpec("train", 0, 1, 4, 16)


# -- window_tokens -----------------------------------------------------------------


def test_concat_window_is_batch_times_seq_plus_one() -> None:
    assert StreamSpec(batch_size=4, seq_len=16, packing="concat").window_tokens == 4 * 16 + 1


def test_bestfit_window_is_batch_times_seq_plus_one_each_row() -> None:
    assert StreamSpec(batch_size=4, seq_len=16, packing="bestfit").window_tokens == 4 * (16 + 1)


# -- to_dict / from_dict -----------------------------------------------------------


def test_stream_spec_round_trips_through_a_dict() -> None:
    spec = StreamSpec(
        split="val",
        rank=3,
        world_size=4,
        batch_size=8,
        seq_len=1024,
        packing="bestfit",
        shuffle_seed=1234,
    )
    d = spec.to_dict()
    assert d == {
        "split": "val",
        "rank": 3,
        "world_size": 4,
        "batch_size": 8,
        "seq_len": 1024,
        "packing": "bestfit",
        "shuffle_seed": 1234,
        "buffer_docs": 1000,
        "min_tail": 32,
        "mix": None,
    }
    assert StreamSpec.from_dict(d) == spec


def test_stream_spec_from_dict_fills_defaults_for_absent_fields() -> None:
    assert StreamSpec.from_dict({"batch_size": 2, "seq_len": 5}) == StreamSpec(
        batch_size=2, seq_len=5
    )


def test_stream_spec_from_dict_rejects_unknown_fields_naming_them() -> None:
    d = {**StreamSpec(batch_size=2, seq_len=5).to_dict(), "seq_length": 5, "bsz": 2}
    with pytest.raises(ConfigError, match=r"unknown fields \['bsz', 'seq_length'\]"):
        StreamSpec.from_dict(d)


def test_stream_spec_from_dict_validates_values() -> None:
    d = {**StreamSpec(batch_size=2, seq_len=5).to_dict(), "rank": 1}
    with pytest.raises(ConfigError, match="rank=1"):
        StreamSpec.from_dict(d)


# -- run dir -----------------------------------------------------------------------


def test_default_run_dir_honours_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(RUN_DIR_ENV, str(tmp_path / "run"))
    assert default_run_dir() == tmp_path / "run"


def test_default_run_dir_expands_a_tilde_in_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv(RUN_DIR_ENV, "~/tf")
    assert default_run_dir() == tmp_path / "tf"


def test_default_run_dir_without_the_environment_is_per_user(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    assert default_run_dir().name == f"tokenfeed-{os.getuid()}"


def test_empty_environment_variable_falls_back_to_the_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(RUN_DIR_ENV, "")
    assert default_run_dir().name == f"tokenfeed-{os.getuid()}"


def test_resolve_run_dir_prefers_the_flag_and_makes_it_absolute(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(RUN_DIR_ENV, "/nowhere/else")
    monkeypatch.chdir(tmp_path)
    assert resolve_run_dir("rel") == tmp_path / "rel"


def test_resolve_run_dir_without_a_flag_uses_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(RUN_DIR_ENV, str(tmp_path / "env"))
    assert resolve_run_dir(None) == tmp_path / "env"


# -- ipc_address -------------------------------------------------------------------


def run_dir_of_socket_path_bytes(n: int, name: str) -> Path:
    """A run dir such that `<run_dir>/<name>` is exactly n bytes."""
    base = "/tmp/tf-"
    pad = n - len(base) - 1 - len(name)
    return Path(base + "x" * pad)


def test_ipc_address_accepts_a_path_of_exactly_the_limit() -> None:
    run_dir = run_dir_of_socket_path_bytes(MAX_IPC_PATH_BYTES, "control")
    assert ipc_address(run_dir, "control") == f"ipc://{run_dir}/control"
    assert len(f"{run_dir}/control".encode()) == 107


def test_ipc_address_rejects_a_path_over_the_limit_asking_for_a_shorter_run_dir() -> None:
    run_dir = run_dir_of_socket_path_bytes(MAX_IPC_PATH_BYTES + 1, "control")
    with pytest.raises(ConfigError) as info:
        ipc_address(run_dir, "control")
    message = str(info.value)
    assert "108 bytes" in message
    assert "pass a shorter --run-dir" in message


def test_ipc_address_counts_bytes_not_characters() -> None:
    # 'é' is 2 bytes in UTF-8: a path of 107 characters but 108 bytes.
    run_dir = run_dir_of_socket_path_bytes(MAX_IPC_PATH_BYTES, "control")
    run_dir = Path(str(run_dir)[:-1] + "é")
    assert len(str(run_dir / "control")) == MAX_IPC_PATH_BYTES
    assert len(str(run_dir / "control").encode()) == MAX_IPC_PATH_BYTES + 1
    with pytest.raises(ConfigError, match="shorter --run-dir"):
        ipc_address(run_dir, "control")


def test_control_address_is_the_control_socket_in_the_run_dir() -> None:
    assert control_address(Path("/tmp/tf-run")) == "ipc:///tmp/tf-run/control"


# -- ensure_private_dir ------------------------------------------------------------


def test_ensure_private_dir_creates_a_missing_dir_with_mode_0700(tmp_path: Path) -> None:
    run_dir = tmp_path / "a" / "run"
    ensure_private_dir(run_dir)
    assert run_dir.is_dir()
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700


def test_ensure_private_dir_tightens_an_existing_0755_dir(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    os.chmod(run_dir, 0o755)
    ensure_private_dir(run_dir)
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700


def test_ensure_private_dir_keeps_an_existing_private_dir_and_its_files(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    (run_dir / "lock").write_text("123")
    ensure_private_dir(run_dir)
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    assert (run_dir / "lock").read_text() == "123"


@pytest.mark.parametrize(
    "overrides",
    [{"batch_size": 2.5}, {"seq_len": True}, {"rank": 0.5, "world_size": 2}],
    ids=["float-batch-size", "bool-seq-len", "float-rank"],
)
def test_non_integer_sizes_are_a_config_error(overrides: dict[str, Any]) -> None:
    kwargs: dict[str, Any] = {"batch_size": 4, "seq_len": 16, **overrides}
    with pytest.raises(ConfigError):
        StreamSpec(**kwargs)


def test_cursor_and_topology_integers_are_bounded() -> None:
    with pytest.raises(ConfigError, match="world_size"):
        StreamSpec(world_size=2**40, batch_size=1, seq_len=1)
    with pytest.raises(ConfigError, match="shuffle_seed"):
        StreamSpec(batch_size=1, seq_len=1, shuffle_seed=2**70)
    with pytest.raises(ConfigError, match="smaller batch"):
        StreamSpec(batch_size=2**20, seq_len=2**20)
