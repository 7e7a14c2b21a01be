"""integrations.torchtitan against torchtitan 0.3 itself (skipped where it is not
installed): the loader built by its config's `build(...)` with the trainer's arguments
yields the oracle's batches with per-document positions; its tokenizer check; the
recipes load through torchtitan's own ConfigManager. The multi-rank checkpoint runs
through torchtitan's CheckpointManager are in tests/test_dcp.py."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BOS_ID, assert_batch_equals

pytest.importorskip("torchtitan")

from tokenfeed.common.errors import VocabularyMismatchError
from tokenfeed.integrations.torchtitan import TokenFeedDataLoader

B, T = 2, 64


class Tokenizer:
    """What the loader reads of torchtitan's BaseTokenizer."""

    def __init__(self, vocab: int, bos_id: int | None) -> None:
        self.vocab, self.bos_id = vocab, bos_id

    def get_vocab_size(self) -> int:
        return self.vocab


def build(run_dir, tokenizer=None, **config):
    # the keyword arguments torchtitan 0.3's Trainer passes (trainer.py, "build dataloader")
    return TokenFeedDataLoader.Config(run_dir=str(run_dir), **config).build(
        dp_world_size=2, dp_rank=1, tokenizer=tokenizer, seq_len=T, local_batch_size=B,
        snapshot_every_n_steps=10)


def test_built_by_its_config_it_yields_the_oracles_batches_and_positions(start_daemon,
                                                                         oracle):
    from torchtitan.components.dataloader import BaseDataLoader

    daemon = start_daemon(workers=1)
    want = oracle(rank=1, world_size=2, batch_size=B, seq_len=T, n=3)
    loader = build(daemon.run_dir, Tokenizer(100_277, BOS_ID))
    restarts = 0
    try:
        assert isinstance(loader, BaseDataLoader)
        for i, ((inputs, labels), window) in enumerate(zip(loader, want, strict=False)):
            assert set(inputs) == {"input", "positions"}
            assert_batch_equals((inputs["input"], labels), window, f"batch {i}")
            x, pos = inputs["input"].numpy(), inputs["positions"].numpy()
            assert str(inputs["positions"].dtype) == "torch.int64"
            for row in range(B):  # 0 at the row start and every BOS, else one more
                for t in range(T):
                    start = t == 0 or x[row, t] == BOS_ID
                    assert pos[row, t] == (0 if start else pos[row, t - 1] + 1)
            restarts += int(np.count_nonzero(x[:, 1:] == BOS_ID))
    finally:
        loader.close()
    assert restarts > 0  # documents began inside rows: the positions restarted there


@pytest.mark.parametrize("tokenizer, match", [
    (Tokenizer(2_000, None), "smaller than the daemon's tokenizer"),
    (Tokenizer(128_256, 128_000), "starts documents with id 100257.*with 128000"),
])
def test_a_trainer_tokenizer_unlike_the_daemons_is_refused(start_daemon, tokenizer, match):
    daemon = start_daemon(workers=1)
    with pytest.raises(VocabularyMismatchError, match=match):
        build(daemon.run_dir, tokenizer)
    build(daemon.run_dir, tokenizer, check_tokenizer=False).close()


def test_the_recipes_load_through_torchtitans_config_manager(tmp_path):
    try:  # the recipes import torchtitan's trainer, which imports triton (CUDA torch has it)
        import torchtitan.trainer  # noqa: F401
    except ImportError as e:
        pytest.skip(f"torchtitan's trainer does not import here ({e})")
    from torchtitan.config import ConfigManager

    config = ConfigManager().parse_args([
        "--module", "tokenfeed.integrations.torchtitan_recipes", "--config",
        "llama3_debugmodel", "--dataloader.packing", "bestfit", "--dataloader.run-dir",
        str(tmp_path)])
    assert isinstance(config.dataloader, TokenFeedDataLoader.Config)
    assert (config.dataloader.packing, config.dataloader.run_dir) == ("bestfit", str(tmp_path))
    assert config.validator.enable is False
