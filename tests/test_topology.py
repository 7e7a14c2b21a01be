"""Rank, world size and device resolution (consumer/topology.py), on CPU.

The CUDA queries are replaced by a fake node with two GPUs: what is tested is the
resolution to an indexed device, which `torch.cuda.set_device` in the link thread
needs, not CUDA itself (tests/test_cuda.py runs that where a GPU exists).
"""

from __future__ import annotations

import logging
import resource

import pytest
import torch

from tokenfeed.common.errors import ConfigError
from tokenfeed.consumer import transfer
from tokenfeed.consumer.topology import collective_device, resolve_rank, resolve_topology


@pytest.fixture
def two_gpus(monkeypatch):
    """A node with cuda:0 and cuda:1, cuda:1 current; no torchrun variables."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "CUDA_VISIBLE_DEVICES", "SLURM_LOCALID"):
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


# -- rank and world size: arguments, torch.distributed, torchrun, Slurm, else 0 of 1 --------


@pytest.mark.parametrize("env, want", [
    ({}, (0, 1)),
    ({"SLURM_PROCID": "2", "SLURM_NTASKS": "4"}, (2, 4)),
    ({"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "2", "SLURM_NTASKS": "4"}, (1, 2)),
    ({"SLURM_NTASKS": "1"}, (0, 1)),  # one task: nothing to tell apart
    ({"OMPI_COMM_WORLD_SIZE": "1", "PMI_SIZE": "1"}, (0, 1)),
])
def test_rank_and_world_size_in_order_of_precedence(env, want):
    assert resolve_rank(None, None, env) == want


def test_explicit_rank_and_world_size_win_over_every_variable():
    env = {"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "2", "SLURM_NTASKS": "4",
           "OMPI_COMM_WORLD_SIZE": "8"}
    assert resolve_rank(3, 5, env) == (3, 5)


@pytest.mark.parametrize("env", [{"OMPI_COMM_WORLD_SIZE": "2"}, {"PMI_SIZE": "16"},
                                 {"SLURM_NTASKS": "4"}])
def test_several_tasks_and_no_rank_is_an_error_not_rank_0_of_1(env):
    with pytest.raises(ConfigError, match="same data") as info:
        resolve_rank(None, None, env)
    name, value = next(iter(env.items()))
    assert f"{name}={value}" in str(info.value)


def test_a_process_group_wins_over_the_variables(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 3)
    assert resolve_rank(None, None, {"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}) == (1, 3)


# -- devices -----------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["mps", "xpu", "meta"])
def test_devices_other_than_cpu_and_cuda_are_a_clear_error(device):
    with pytest.raises(ConfigError, match=f"not '{device}'.*device='cpu'"):
        resolve_topology(0, 1, device)


def test_cuda_under_srun_becomes_cuda_slurm_localid(two_gpus, monkeypatch):
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert resolve_topology(None, None, "cuda").device == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "0")  # torchrun's variable first
    assert resolve_topology(None, None, "cuda").device == torch.device("cuda", 0)


def test_cuda_under_srun_with_one_bound_gpu_per_task_is_cuda_0(two_gpus, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # --gpus-per-task=1
    monkeypatch.setenv("SLURM_LOCALID", "3")
    assert resolve_topology(None, None, "cuda").device == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "3")  # torchrun never binds: still an error
    with pytest.raises(ConfigError, match=r"LOCAL_RANK=3 .* names cuda:3"):
        resolve_topology(None, None, "cuda")


def test_object_collectives_run_on_the_groups_then_the_feeds_then_the_local_device(
        two_gpus, monkeypatch):
    cuda0, cuda1 = torch.device("cuda", 0), torch.device("cuda", 1)
    assert collective_device("cpu", None, cuda1) is None  # gloo: nothing to make current
    assert collective_device("cuda", cuda0, cuda1) == cuda0  # init_process_group(device_id)
    assert collective_device("cuda", None, cuda1) == cuda1  # the feed's
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert collective_device("cuda", None, None) == cuda1  # a state, not a feed
    assert collective_device("cuda", None, torch.device("cpu")) == cuda1


# -- pinning and the memlock limit -------------------------------------------------------


def test_memlock_below_the_ring_forbids_pinning_unless_unlimited_or_root():
    mib = 1 << 20
    assert "64 KiB, below the 3 MiB ring" in transfer.memlock_shortfall(
        3 * mib - 5, (64 << 10, 64 << 10), euid=1000)
    assert transfer.memlock_shortfall(3 * mib, (4 * mib, 4 * mib), euid=1000) is None
    unlimited = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
    assert transfer.memlock_shortfall(3 * mib, unlimited, euid=1000) is None
    assert transfer.memlock_shortfall(3 * mib, (64 << 10, 64 << 10), euid=0) is None


def test_the_unpinned_fallback_warns_once_per_process(monkeypatch, caplog):
    monkeypatch.setattr(transfer, "_warned", type(transfer._warned)())
    with caplog.at_level(logging.WARNING, logger=transfer.__name__):
        transfer.warn_unpinned("the memlock limit (ulimit -l) is 64 KiB")
        transfer.warn_unpinned("the memlock limit (ulimit -l) is 64 KiB")
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "ulimit -l unlimited" in warnings[0]
