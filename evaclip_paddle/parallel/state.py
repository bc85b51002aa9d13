"""Tensor-parallel state dicts: full tensors <-> per-rank shards, and the global gradient norm.

A parameter is sharded when it carries `is_distributed=True`; `split_axis` says along which axis
(set by parallel.layers and parallel.norm, the same convention fleet's layers use). Checkpoints hold
full tensors, so they load under any tensor-parallel degree.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
import paddle
import paddle.distributed as dist

from .topology import Topology, get_topology


def distributed_axes(model) -> Dict[str, int]:
    """{state-dict key: split axis} of the model's sharded parameters (empty without TP)."""
    out = {}
    for name, p in model.named_parameters():
        if getattr(p, "is_distributed", False):
            axis = getattr(p, "split_axis", None)
            if axis is None:
                raise ValueError(f"parameter '{name}' is marked is_distributed but has no split_axis")
            out[name] = int(axis)
    return out


def shard(full: np.ndarray, axis: int, rank: int, world: int, key: str = "?") -> np.ndarray:
    """This rank's contiguous slice of `full` along `axis`."""
    n = full.shape[axis]
    if n % world:
        raise ValueError(f"'{key}': axis {axis} of size {n} does not split over {world} tensor-parallel ranks")
    step = n // world
    index = [slice(None)] * full.ndim
    index[axis] = slice(rank * step, (rank + 1) * step)
    return np.ascontiguousarray(full[tuple(index)])


def split_state_dict(full_sd: Mapping[str, np.ndarray], axes: Mapping[str, int], rank: int,
                     world: int) -> Dict[str, np.ndarray]:
    """Offline: the shard of a full state dict that tensor-parallel rank `rank` of `world` holds."""
    return {k: shard(np.asarray(v), axes[k], rank, world, k) if k in axes and world > 1 else np.asarray(v)
            for k, v in full_sd.items()}


def merge_state_dicts(shards: List[Mapping[str, np.ndarray]], axes: Mapping[str, int]) -> Dict[str, np.ndarray]:
    """Offline: full tensors from the per-rank state dicts (ordered by mp rank)."""
    out = {}
    for k, v in shards[0].items():
        if k in axes and len(shards) > 1:
            out[k] = np.concatenate([np.asarray(s[k]) for s in shards], axis=axes[k])
        else:
            out[k] = np.asarray(v)
    return out


def _full(t, key: str, axes: Mapping[str, int], topo: Topology) -> np.ndarray:
    if key not in axes:
        return t.numpy()
    parts = []
    dist.all_gather(parts, t.detach(), group=topo.mp_group)
    return np.concatenate([p.numpy() for p in parts], axis=axes[key])


def full_state_dict(model, topo: Optional[Topology] = None) -> Dict[str, np.ndarray]:
    """Numpy state dict with every sharded tensor gathered to its full shape, on every rank.

    Collective over the model-parallel group: all its ranks must call it.
    """
    topo = topo or get_topology()
    axes = distributed_axes(model) if topo.mp_degree > 1 else {}
    return {k: _full(v, k, axes, topo) for k, v in model.state_dict().items()}


def full_grads(model, topo: Optional[Topology] = None) -> Dict[str, np.ndarray]:
    """{parameter name: full gradient} (parameters without a gradient are left out); collective
    over the model-parallel group."""
    topo = topo or get_topology()
    axes = distributed_axes(model) if topo.mp_degree > 1 else {}
    return {k: _full(p.grad, k, axes, topo) for k, p in model.named_parameters() if p.grad is not None}


def load_full_state_dict(model, full_sd: Mapping[str, np.ndarray], topo: Optional[Topology] = None,
                         strict: bool = True, source: str = "state dict") -> Tuple[list, list]:
    """Copies full tensors into a (possibly sharded) model, slicing this rank's part of sharded ones.

    Returns (missing, unexpected) keys; with `strict` either is an error. Shapes must match.
    """
    topo = topo or get_topology()
    axes = distributed_axes(model) if topo.mp_degree > 1 else {}
    own = model.state_dict()
    missing = [k for k in own if k not in full_sd]
    unexpected = [k for k in full_sd if k not in own]
    if strict and (missing or unexpected):
        raise KeyError(f"{source}: missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                       f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    for k, p in own.items():
        if k not in full_sd:
            continue
        full = np.asarray(full_sd[k])
        part = shard(full, axes[k], topo.mp_rank, topo.mp_degree, k) if k in axes else full
        if list(part.shape) != list(p.shape):
            what = f" (full {list(full.shape)} split over {topo.mp_degree} ranks)" if k in axes else ""
            raise ValueError(f"{source}: '{k}' has shape {list(part.shape)}{what}, the model expects {list(p.shape)}")
        p.set_value(paddle.to_tensor(part).astype(p.dtype))
    return missing, unexpected


def global_grad_norm_sq(params, topo: Optional[Topology] = None, owned_shard: bool = False):
    """Squared L2 norm of the gradients of the whole (unsharded) model, as a float32 0-d tensor,
    equal on every rank.

    `params`: parameters, or (parameter, gradient) pairs where the gradient lives elsewhere (ZeRO-2
    keeps a row-split tensor's rows on a proxy). Sharded parameters' squares are summed over the
    model-parallel group; replicated ones (equal on every mp rank) count once. `owned_shard`:
    `params` is this rank's ZeRO partition (other ranks' copies are stale or freed): the total is
    then also summed over the sharding group, as fleet's clip does.
    """
    topo = topo or get_topology()
    dist_sq = paddle.zeros([], dtype="float32")
    rep_sq = paddle.zeros([], dtype="float32")
    for item in params:
        if isinstance(item, tuple):
            p, g = item
        else:
            p = item
            g = getattr(p, "main_grad", None)
            g = p.grad if g is None else g
        if g is None:
            continue
        sq = g.astype("float32").pow(2).sum()
        if getattr(p, "is_distributed", False) and topo.mp_degree > 1:
            dist_sq = dist_sq + sq
        else:
            rep_sq = rep_sq + sq
    with paddle.no_grad():
        if topo.mp_degree > 1:
            dist.all_reduce(dist_sq, group=topo.mp_group)
        total = dist_sq + rep_sq
        if owned_shard and topo.sharding_degree > 1:
            dist.all_reduce(total, group=topo.sharding_group)
    return total
