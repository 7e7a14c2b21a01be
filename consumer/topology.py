"""Where this training rank sits: rank, world size and device, read once.

Order of precedence: explicit arguments, then an initialized `torch.distributed`
process group, then the `RANK` / `WORLD_SIZE` / `LOCAL_RANK` variables that
torchrun sets, then a single process on CPU or `cuda:LOCAL_RANK`.

A CUDA device always leaves here with an index: `"cuda"` becomes
`cuda:LOCAL_RANK` under torchrun, else the current device, because the link
thread must `torch.cuda.set_device` it. An index past the visible devices is a
`ConfigError` that names the count and `CUDA_VISIBLE_DEVICES`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tokenfeed.common.errors import ConfigError


@dataclass(frozen=True)
class Topology:
    rank: int
    world_size: int
    device: torch.device


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_topology(
    rank: int | None, world_size: int | None, device: str | torch.device | None
) -> Topology:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank() if rank is None else rank
        world_size = dist.get_world_size() if world_size is None else world_size
    rank = rank if rank is not None else (_env_int("RANK") or 0)
    world_size = world_size if world_size is not None else (_env_int("WORLD_SIZE") or 1)
    asked = device
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"device={device!r} is not a torch device ({e})") from None
    if dev.type == "cuda":
        dev = _indexed_cuda(dev, asked)
    return Topology(rank, world_size, dev)


def _indexed_cuda(dev: torch.device, asked: object) -> torch.device:
    if not torch.cuda.is_available():
        raise ConfigError(f"device={asked!r} asked for, but CUDA is not available; use 'cpu'")
    local = _env_int("LOCAL_RANK")
    if dev.index is not None:
        index, source = dev.index, f"device={asked!r}"
    elif local is not None:
        index, source = local, f"LOCAL_RANK={local} (for device={asked!r})"
    else:
        index, source = torch.cuda.current_device(), f"the current device (for device={asked!r})"
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        raise ConfigError(
            f"{source} names cuda:{index}, but this process sees {count} CUDA device(s) "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); launch one "
            "rank per visible GPU (torchrun --nproc_per_node) or pass device='cuda:N'"
        )
    return torch.device("cuda", index)


@dataclass(frozen=True)
class MeshPlacement:
    rank: int  # data-parallel rank
    world_size: int  # data-parallel degree
    replicas: int  # processes on this node that read the same data-parallel rank


def mesh_placement(
    ranks: np.ndarray, dim_names: Sequence[str], dp_dims: str | Sequence[str], me: int,
    local_world_size: int,
) -> MeshPlacement:
    """This process's data-parallel rank, degree and node-local replicas in a device mesh.

    `ranks` is the mesh as an array of global ranks (`DeviceMesh.mesh`); `dp_dims` names
    the data-parallel dimension(s) (two for HSDP, say), flattened in mesh order. The
    replicas are the processes with the same data-parallel coordinates on this node
    (global rank // `local_world_size`): the tensor- or pipeline-parallel peers that one
    daemon serves from one stream.
    """
    dims = [dp_dims] if isinstance(dp_dims, str) else list(dp_dims)
    names = list(dim_names)
    unknown = [d for d in dims if d not in names]
    if unknown:
        raise ConfigError(f"dp_dim {unknown} is not a dimension of the mesh {names}; pass the "
                          "name of its data-parallel dimension (or dimensions)")
    where = np.argwhere(ranks == me)
    if len(where) != 1:
        raise ConfigError(f"rank {me} is not in the mesh {ranks.tolist()}")
    coord = where[0]
    axes = [names.index(d) for d in dims]
    shape = [ranks.shape[a] for a in axes]
    rank = int(np.ravel_multi_index([coord[a] for a in axes], shape)) if axes else 0
    peers = ranks[tuple(int(coord[a]) if a in axes else slice(None)
                        for a in range(ranks.ndim))]
    node = me // local_world_size
    replicas = int(np.count_nonzero(np.asarray(peers) // local_world_size == node))
    return MeshPlacement(rank, int(np.prod(shape)), replicas)
