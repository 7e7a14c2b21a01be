"""serve's configuration (producer/config.py) and the flags that fill it (producer/cli.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenfeed.common.errors import ConfigError
from tokenfeed.producer.cli import build_parser, daemon_config
from tokenfeed.producer.config import (
    DaemonConfig,
    SourceConfig,
    field_default,
    load_mix_file,
)


def test_serve_flags_default_to_the_daemon_config(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        ["serve", "--data", str(tmp_path), "--run-dir", str(tmp_path / "run")])
    assert daemon_config(args) == DaemonConfig(data_dir=tmp_path, run_dir=tmp_path / "run")


def test_demo_flags_default_to_the_daemon_config() -> None:
    args = build_parser().parse_args(["demo"])
    for name in ("tokenizer", "bos", "workers", "slots", "val_files", "text_column"):
        assert getattr(args, name) == field_default(DaemonConfig, name), name


def test_serve_help_shows_the_config_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default {field_default(DaemonConfig, 'workers')})" in text
    assert f"(default {field_default(DaemonConfig, 'max_ring_bytes') >> 20})" in text
    assert f"(default {field_default(DaemonConfig, 'metrics_host')};" in text


def test_flags_given_reach_the_daemon_config(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        ["serve", "--data", str(tmp_path), "--run-dir", str(tmp_path / "run"), "--workers",
         "1", "--max-ring-mib", "64", "--task-kib", "4", "--cache-gib", "0.5",
         "--on-error", "skip", "--on-backend-mismatch", "fail"])
    config = daemon_config(args)
    assert (config.workers, config.max_ring_bytes, config.task_bytes, config.cache_bytes,
            config.on_error, config.on_backend_mismatch) == (
        1, 64 << 20, 4 << 10, 1 << 29, "skip", "fail")


def test_field_default_refuses_a_field_without_one() -> None:
    with pytest.raises(TypeError, match="run_dir has no default"):
        field_default(DaemonConfig, "run_dir")
    with pytest.raises(TypeError, match="no field 'nope'"):
        field_default(DaemonConfig, "nope")


def test_mix_file_gives_sources_and_normalized_weights(tmp_path: Path) -> None:
    mix = tmp_path / "mix.toml"
    mix.write_text('[sources.web]\npath = "/data/fineweb"\nweight = 3\n'
                   '[sources.code]\npath = "s3://bucket/stack"\ntext_column = "content"\n')
    sources, weights = load_mix_file(mix)
    assert sources == (SourceConfig("web", Path("/data/fineweb")),
                       SourceConfig("code", "s3://bucket/stack", "content"))
    assert weights == (("code", 0.25), ("web", 0.75))


def test_mix_file_that_is_not_toml_is_an_error_naming_the_file(tmp_path: Path) -> None:
    mix = tmp_path / "mix.toml"
    mix.write_text("[sources.web\npath = 1\n")
    with pytest.raises(ConfigError, match=f"--mix {mix}"):
        load_mix_file(mix)
