"""Splitting evaluation work over ranks and gathering it back in the original order.

Every rank takes one contiguous block of ceil(N / world) items (the last blocks may be short or empty).
Results travel as fixed-shape arrays of that block size, padded, with a per-row status, so that
all_gather sees equal shapes everywhere; concatenating the gathered blocks restores item order, and
dropping padding rows restores the exact count. Works on gloo (CPU) and NCCL alike.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

PAD, OK, FAILED = 0, 1, 2


class _Local:
    def __repr__(self):
        return "LOCAL"


LOCAL = _Local()   # as a group: no splitting, this rank evaluates everything alone


def resolve_group(group=None):
    """The group to split over. None means: the job's data group when a training topology is set up
    (ranks of one tensor-parallel group must see the same images), else every rank."""
    if group is not None:
        return group
    import paddle.distributed as dist

    if not dist.is_initialized():
        return LOCAL
    from ..parallel.topology import get_topology

    topo = get_topology()
    if topo.world > 1:
        return topo.data_group if topo.data_group is not None else LOCAL
    return None


def world_and_rank(group=None) -> Tuple[int, int]:
    import paddle.distributed as dist

    group = resolve_group(group)
    if group is LOCAL:
        return 1, 0
    if group is not None:
        return int(group.nranks), int(group.rank)
    return int(dist.get_world_size()), int(dist.get_rank())


def block(n: int, world: int, rank: int) -> Tuple[int, int, int]:
    """(start, stop, block_size) of this rank's share of n items."""
    size = -(-n // world) if n else 0
    start = min(n, rank * size)
    return start, min(n, start + size), size


def all_gather_rows(array: np.ndarray, group=None) -> np.ndarray:
    """Concatenation over ranks (in rank order) of equally shaped arrays; the array itself on one rank."""
    world, _ = world_and_rank(group)
    if world == 1:
        return array
    import paddle
    import paddle.distributed as dist

    parts = []
    # gloo has no kernels for every dtype: move int data as int64 and float data as float32.
    kind = "int64" if np.issubdtype(array.dtype, np.integer) else "float32"
    dist.all_gather(parts, paddle.to_tensor(np.ascontiguousarray(array.astype(kind))), group=resolve_group(group))
    return np.concatenate([p.numpy() for p in parts], axis=0).astype(array.dtype, copy=False)


def gather_blocks(rows: np.ndarray, status: np.ndarray, n: int, group=None) -> Tuple[np.ndarray, np.ndarray]:
    """rows [block, ...] and status [block] of every rank -> (rows [n, ...], status [n]) in item order."""
    rows_all = all_gather_rows(rows, group)
    status_all = all_gather_rows(status, group)
    keep = status_all != PAD
    rows_all, status_all = rows_all[keep], status_all[keep]
    if len(rows_all) != n:
        raise RuntimeError(f"gathered {len(rows_all)} results for {n} items: ranks disagree about the dataset")
    return rows_all, status_all


def all_ranks_true(flag: bool, group=None) -> bool:
    world, _ = world_and_rank(group)
    if world == 1:
        return bool(flag)
    return bool(all_gather_rows(np.asarray([1 if flag else 0], dtype=np.int64), group).min() == 1)


def all_gather_objects(obj, group=None) -> list:
    """One picklable object per rank, in rank order."""
    world, _ = world_and_rank(group)
    if world == 1:
        return [obj]
    import paddle.distributed as dist

    parts: list = []
    dist.all_gather_object(parts, obj, group=resolve_group(group))
    return parts


def maybe_init_parallel_env() -> Optional[int]:
    """Initialises paddle.distributed when started by paddle.distributed.launch with several ranks."""
    import os

    import paddle.distributed as dist

    if int(os.environ.get("PADDLE_TRAINERS_NUM", "1")) > 1 and not dist.is_initialized():
        dist.init_parallel_env()
    return world_and_rank()[0]
