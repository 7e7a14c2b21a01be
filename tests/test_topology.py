"""Rank, world size and device resolution (consumer/topology.py), on CPU.

The CUDA queries are replaced by a fake node with two GPUs: what is tested is the
resolution to an indexed device, which `torch.cuda.set_device` in the link thread
needs, not CUDA itself (tests/test_cuda.py runs that where a GPU exists).
"""

from __future__ import annotations

import pytest
import torch

from tokenfeed.common.errors import ConfigError
from tokenfeed.consumer.topology import resolve_topology


@pytest.fixture
def two_gpus(monkeypatch):
    """A node with cuda:0 and cuda:1, cuda:1 current; no torchrun variables."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("device", ["cuda", torch.device("cuda"), None])
def test_cuda_without_index_becomes_cuda_local_rank(two_gpus, monkeypatch, device):
    monkeypatch.setenv("LOCAL_RANK", "0")
    topo = resolve_topology(None, None, device)
    assert topo.device == torch.device("cuda", 0) and topo.device.index == 0


def test_cuda_without_index_or_local_rank_becomes_the_current_device(two_gpus):
    assert resolve_topology(None, None, "cuda").device == torch.device("cuda", 1)


def test_explicit_cuda_index_is_kept(two_gpus, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert resolve_topology(None, None, "cuda:1").device == torch.device("cuda", 1)


def test_local_rank_past_the_visible_devices_is_a_clear_config_error(two_gpus, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    for device in ("cuda", None):
        with pytest.raises(ConfigError) as info:
            resolve_topology(None, None, device)
        message = str(info.value)
        assert "LOCAL_RANK=2" in message and "2 CUDA device" in message
        assert "CUDA_VISIBLE_DEVICES='4,5'" in message and "nproc_per_node" in message


def test_explicit_index_past_the_visible_devices_is_a_clear_config_error(two_gpus):
    with pytest.raises(ConfigError, match=r"device='cuda:5' names cuda:5.* 2 CUDA device"):
        resolve_topology(None, None, "cuda:5")


def test_cuda_without_cuda_is_a_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_topology(None, None, "cuda")


def test_cpu_stays_cpu_whatever_local_rank_says(two_gpus, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "7")
    assert resolve_topology(None, None, "cpu").device == torch.device("cpu")


def test_no_device_without_cuda_is_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_topology(None, None, None).device == torch.device("cpu")


def test_rank_and_world_size_come_from_torchrun_variables(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    topo = resolve_topology(None, None, "cpu")
    assert (topo.rank, topo.world_size) == (3, 4)


def test_feed_asked_for_cuda_holds_an_indexed_device(start_daemon, two_gpus, monkeypatch):
    daemon = start_daemon(workers=1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    feed = daemon.feed(2, 64, device="cuda")  # the design document's own example
    try:
        assert feed.device == torch.device("cuda", 1)
    finally:
        feed.close()
