"""Weight initialisers that act in place on parameters (paddle's global seed drives them).

A tensor-parallel shard (`is_distributed`) is cut from a draw of the whole tensor, so a seed gives
the same model under every parallel layout (and the mp ranks' shards never start as copies).
"""
from __future__ import annotations

import paddle
import paddle.nn as nn


def _full_shape(p):
    shape = list(p.shape)
    if getattr(p, "is_distributed", False):
        from ..parallel import topology
        shape[p.split_axis] *= topology.mp_world_size()
    return shape


def _local(x, p):
    """This rank's shard of a full-shape draw `x` for parameter `p`."""
    if not getattr(p, "is_distributed", False):
        return x
    from ..parallel import topology
    n, r = p.shape[p.split_axis], topology.mp_rank()
    return paddle.slice(x, axes=[p.split_axis], starts=[r * n], ends=[(r + 1) * n])


@paddle.no_grad()
def trunc_normal_(p, std: float, bound: float = 2.0):
    """Normal(0, std) truncated to +-bound*std: a true truncated distribution (Paddle's kernel samples
    it directly, far faster than resampling), not clipping, which would pile mass on the edges."""
    full = paddle.empty(_full_shape(p), dtype="float32")
    nn.initializer.TruncatedNormal(mean=0.0, std=std, a=-bound * std, b=bound * std)(full)
    p.set_value(_local(full, p).astype(p.dtype))


@paddle.no_grad()
def normal_(p, std: float):
    p.set_value((_local(paddle.randn(_full_shape(p), dtype="float32"), p) * std).astype(p.dtype))


@paddle.no_grad()
def zeros_(p):
    p.set_value(paddle.zeros(p.shape, dtype=p.dtype))


@paddle.no_grad()
def scale_(p, factor: float):
    p.set_value(p * factor)
