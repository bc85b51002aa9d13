"""Autograd-aware collectives built on `paddle.distributed` + `PyLayer`.

Paddle's own tensor-parallel ops (c_identity, c_concat, mp_allreduce...) have no CPU kernels and gloo
lacks their calc-stream entry points, so these are written once on the plain collectives, which exist
for both gloo (CPU) and NCCL (GPU). Every op is the identity (no communication) when the group has
one rank or is None with no tensor parallelism, so single-device code paths pay nothing.

Gradient conventions (every rank back-propagates the same replicated loss):
- copy_to_mp      fwd identity           bwd all-reduce   (replicated input feeding sharded compute)
- reduce_from_mp  fwd all-reduce         bwd identity     (partial sums whose result is used replicated)
- sum_partial     fwd all-reduce         bwd all-reduce   (partial sums whose result feeds sharded compute)
- gather_from_mp  fwd concat last dim    bwd own slice
- scatter_to_mp   fwd own slice          bwd concat last dim
- all_gather_with_grad  fwd concat       bwd own slice of the summed gradient
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import paddle
import paddle.distributed as dist
from paddle.autograd import PyLayer

from . import topology

# Host-side time spent inside collectives (benchmarks read it; on GPU it is only indicative).
_STATS = {"enabled": False, "seconds": 0.0, "calls": 0}


def comm_stats(reset: bool = False) -> dict:
    out = {"seconds": _STATS["seconds"], "calls": _STATS["calls"]}
    if reset:
        _STATS["seconds"], _STATS["calls"] = 0.0, 0
    return out


def enable_comm_timing(on: bool = True) -> None:
    _STATS["enabled"] = bool(on)


@contextmanager
def _timed():
    if not _STATS["enabled"]:
        yield
        return
    t0 = time.perf_counter()
    try:
        yield
    finally:
        _STATS["seconds"] += time.perf_counter() - t0
        _STATS["calls"] += 1


def _nranks(group) -> int:
    return 1 if group is None else int(group.nranks)


def _mp(group):
    return topology.get_mp_group() if group is None else group


def _all_reduce(x, group):
    y = x.clone()
    with _timed():
        dist.all_reduce(y, group=group)
    return y


def _all_gather(x, group, axis):
    parts = []
    with _timed():
        dist.all_gather(parts, x, group=group)
    return paddle.concat(parts, axis=axis)


def _own_slice(x, group, axis):
    n, r = int(group.nranks), int(group.rank)
    size = x.shape[axis]
    if size % n:
        raise ValueError(f"cannot split axis {axis} of size {size} evenly over {n} ranks")
    step = size // n
    return paddle.slice(x, axes=[axis], starts=[r * step], ends=[(r + 1) * step]).clone()


class _CopyToGroup(PyLayer):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.clone()

    @staticmethod
    def backward(ctx, dy):
        return _all_reduce(dy, ctx.group)


class _ReduceFromGroup(PyLayer):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, dy):
        return dy.clone()


class _SumPartial(PyLayer):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, dy):
        return _all_reduce(dy, ctx.group)


class _GatherLast(PyLayer):
    """Concat along the last axis; each rank's slice only feeds its own shard, so backward is a split."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, group, -1)

    @staticmethod
    def backward(ctx, dy):
        return _own_slice(dy, ctx.group, dy.ndim - 1)


class _ScatterLast(PyLayer):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _own_slice(x, group, x.ndim - 1)

    @staticmethod
    def backward(ctx, dy):
        return _all_gather(dy, ctx.group, -1)


class _AllGatherWithGrad(PyLayer):
    """Concat along `axis`. Every rank uses the whole gathered tensor, so the gradient of this rank's
    piece is the sum over ranks of their gradients for that piece: all-reduce, then take our slice."""

    @staticmethod
    def forward(ctx, x, group, axis):
        ctx.group, ctx.axis = group, axis
        return _all_gather(x, group, axis)

    @staticmethod
    def backward(ctx, dy):
        return _own_slice(_all_reduce(dy, ctx.group), ctx.group, ctx.axis)


def copy_to_mp(x, group=None):
    """Identity forward, all-reduce of the gradient over the tensor-parallel group."""
    group = _mp(group)
    return x if _nranks(group) == 1 else _CopyToGroup.apply(x, group)


def reduce_from_mp(x, group=None):
    """All-reduce (sum) forward, identity backward."""
    group = _mp(group)
    return x if _nranks(group) == 1 else _ReduceFromGroup.apply(x, group)


def sum_partial(x, group=None):
    """All-reduce forward and backward: for partial statistics (e.g. a norm's sum of squares over a
    feature shard) whose total is then used by every rank's own shard."""
    group = _mp(group)
    return x if _nranks(group) == 1 else _SumPartial.apply(x, group)


def gather_from_mp(x, group=None):
    """Concatenate the last-axis shards of all tensor-parallel ranks."""
    group = _mp(group)
    return x if _nranks(group) == 1 else _GatherLast.apply(x, group)


def scatter_to_mp(x, group=None):
    """Keep this rank's slice of the last axis."""
    group = _mp(group)
    return x if _nranks(group) == 1 else _ScatterLast.apply(x, group)


def all_gather_with_grad(x, group=None, axis: int = 0):
    """Concatenate `x` of every rank of `group` along `axis` (default batch), differentiably, ordered
    by group rank; all ranks pass the same shape. `group` None (e.g. `Topology.data_group` when
    there is one data rank) or a one-rank group: returns `x`. Never pass None to mean the whole job:
    under tensor parallelism that would gather the mp ranks' identical copies."""
    if _nranks(group) == 1:
        return x
    return _AllGatherWithGrad.apply(x, group, axis % x.ndim)


def all_gather_nograd(x, group=None):
    """Batch-axis gather whose other ranks' rows are constants; this rank's own rows keep their
    autograd link (the usual "gather without gradient" of CLIP training, where each rank's loss
    back-propagates into its own features only). `group` as for all_gather_with_grad."""
    if _nranks(group) == 1:
        return x
    with paddle.no_grad():
        parts = []
        with _timed():
            dist.all_gather(parts, x.detach(), group=group)
    parts[int(group.rank)] = x
    return paddle.concat(parts, axis=0)

