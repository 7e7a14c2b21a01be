"""Where this training rank sits: rank, world size and device, read once.

Rank and world size, each from the first of: the explicit argument, an initialized
`torch.distributed` process group, torchrun's `RANK` / `WORLD_SIZE`, Slurm's
`SLURM_PROCID` / `SLURM_NTASKS` (`srun python train.py` with no launcher between),
else rank 0 of 1. Falling back to 0 of 1 while Slurm or MPI (`OMPI_COMM_WORLD_SIZE`,
`PMI_SIZE`) says several tasks run is a `ConfigError`: every task would read rank 0's
stream and train on the same data.

Devices: `cpu` and `cuda` only (a `mps` or `xpu` device is a `ConfigError`: the ring
is copied to a CUDA device or into CPU tensors). A CUDA device always leaves here with
an index: `"cuda"` becomes `cuda:LOCAL_RANK` (torchrun), else `cuda:SLURM_LOCALID`
(`cuda:0` when the task sees one GPU: srun bound it), else the calling thread's
current device; the link thread `torch.cuda.set_device`s it.
An index past the visible devices is a `ConfigError` that names the count and
`CUDA_VISIBLE_DEVICES`.

`collective_device` is the device an object collective (`all_gather_object`) of a
process group runs on, so `gather_states` can make it current: NCCL otherwise uses the
calling thread's current device, cuda:0 on every rank that never called `set_device`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tokenfeed.common.errors import ConfigError

SUPPORTED_DEVICE_TYPES = ("cpu", "cuda")
# Variables that count the tasks of a launch which gives tokenfeed no rank of its own.
_TASK_COUNTS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


@dataclass(frozen=True)
class Topology:
    rank: int
    world_size: int
    device: torch.device


def _env_int(name: str, env: Mapping[str, str] | None = None) -> int | None:
    value = (os.environ if env is None else env).get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_rank(
    rank: int | None, world_size: int | None, env: Mapping[str, str] | None = None
) -> tuple[int, int]:
    """(rank, world_size), each from the first source that has it (module docstring)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank() if rank is None else rank
        world_size = dist.get_world_size() if world_size is None else world_size
    if rank is None and world_size is None and _env_int("RANK", env) is None:
        # srun starts every task of the step itself: the Slurm pair, taken whole
        rank, world_size = _env_int("SLURM_PROCID", env), _env_int("SLURM_NTASKS", env)
        if rank is None:
            world_size = None
    rank = rank if rank is not None else _env_int("RANK", env)
    world_size = world_size if world_size is not None else _env_int("WORLD_SIZE", env)
    if world_size is None:
        tasks = {name: n for name in _TASK_COUNTS if (n := _env_int(name, env)) is not None}
        several = {name: n for name, n in tasks.items() if n > 1}
        if several:
            said = ", ".join(f"{k}={v}" for k, v in several.items())
            raise ConfigError(
                f"this process is one of several tasks ({said}) but nothing says which: no "
                "rank/world_size argument, no torch.distributed process group, no RANK/"
                "WORLD_SIZE (torchrun) or SLURM_PROCID; as rank 0 of 1 every task would train "
                "on the same data. Launch with torchrun (srun torchrun ...), call "
                "torch.distributed.init_process_group() first, or pass rank= and world_size="
            )
    return (rank if rank is not None else 0), (world_size if world_size is not None else 1)


def resolve_topology(
    rank: int | None, world_size: int | None, device: str | torch.device | None
) -> Topology:
    rank, world_size = resolve_rank(rank, world_size)
    return Topology(rank, world_size, resolve_device(device))


def resolve_device(device: str | torch.device | None) -> torch.device:
    asked = device
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device={device!r} is not a torch device ({e})") from None
    if dev.type not in SUPPORTED_DEVICE_TYPES:
        raise ConfigError(
            f"device={asked!r}: tokenfeed delivers batches to 'cpu' or 'cuda' devices, not "
            f"{dev.type!r}; pass device='cpu' and move the batch with .to({str(dev)!r})"
        )
    if dev.type == "cuda":
        dev = _indexed_cuda(dev, asked)
    return dev


def local_rank(env: Mapping[str, str] | None = None) -> tuple[int, str] | None:
    """This process's index among the node's tasks and the variable that said it."""
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        value = _env_int(name, env)
        if value is not None:
            return value, name
    return None


def _indexed_cuda(dev: torch.device, asked: object) -> torch.device:
    if not torch.cuda.is_available():
        raise ConfigError(f"device={asked!r} asked for, but CUDA is not available; use 'cpu'")
    local = local_rank()
    if dev.index is not None:
        index, source = dev.index, f"device={asked!r}"
    elif local is not None:
        index, source = local[0], f"{local[1]}={local[0]} (for device={asked!r})"
    else:
        index, source = torch.cuda.current_device(), f"the current device (for device={asked!r})"
    count = torch.cuda.device_count()
    if local is not None and local[1] == "SLURM_LOCALID" and dev.index is None and count == 1:
        index = 0  # srun --gpus-per-task=1 binds each task to one GPU: it is its cuda:0
    if not 0 <= index < count:
        raise ConfigError(
            f"{source} names cuda:{index}, but this process sees {count} CUDA device(s) "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); launch one "
            "rank per visible GPU (torchrun --nproc_per_node) or pass device='cuda:N'"
        )
    return torch.device("cuda", index)


def collective_device(
    device_type: str, bound: torch.device | None, feed_device: torch.device | None
) -> torch.device | None:
    """The CUDA device to make current for an object collective on a group whose object
    collectives run on `device_type` (None: nothing to make current, e.g. gloo on CPU).

    The group's own device (`init_process_group(device_id=...)`) first, then the feed's,
    then `cuda:LOCAL_RANK` (or SLURM_LOCALID), then the current device."""
    if device_type != "cuda":
        return None
    if bound is not None and bound.type == "cuda" and bound.index is not None:
        return bound
    if feed_device is not None and feed_device.type == "cuda":
        return feed_device
    return _indexed_cuda(torch.device("cuda"), "the process group's 'cuda'")


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
