"""Linear and embedding layers that shard themselves over the model-parallel group.

With one rank in the group they are exactly `F.linear` / `F.embedding` on a full weight, so the
single-device model and the tensor-parallel model are the same code. Weights are stored the
Paddle way, [in, out]; a column-parallel layer owns a slice of the out dimension, a row-parallel
layer a slice of the in dimension (Megatron pairing: column then row, one all-reduce per pair).
"""
from __future__ import annotations

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from . import topology
from .collectives import copy_to_mp, gather_from_mp, reduce_from_mp
from ..model.linear import bias_add, linear


# Weights start at zero (no RNG draw): how much of the global RNG stream construction consumes then
# does not depend on the layout, and model.init_weights draws shards from full-size tensors, so a
# seed gives the same model at every tensor-parallel degree.
_ZERO = nn.initializer.Constant(0.0)


def _split(n: int, what: str) -> int:
    world = topology.mp_world_size()
    if n % world:
        raise ValueError(f"{what}={n} is not divisible by the tensor-parallel degree {world} "
                         f"(--tensor_parallel_degree)")
    return n // world


class ColumnParallelLinear(nn.Layer):
    """y = x W + b with W split along its output dimension; output stays split unless gather_output."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, gather_output: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.world, self.group = topology.mp_world_size(), topology.get_mp_group()
        self.out_local = _split(out_features, "out_features")
        self.gather_output = gather_output
        self.weight = self.create_parameter([in_features, self.out_local], default_initializer=_ZERO)
        self.weight.is_distributed = self.world > 1
        self.weight.split_axis = 1
        self.bias = self.create_parameter([self.out_local], is_bias=True) if bias else None
        if self.bias is not None:
            self.bias.is_distributed = self.world > 1
            self.bias.split_axis = 0

    def forward(self, x):
        if self.world > 1:
            x = copy_to_mp(x, self.group)
        y = linear(x, self.weight, self.bias)
        if self.gather_output and self.world > 1:
            y = gather_from_mp(y, self.group)
        return y


class RowParallelLinear(nn.Layer):
    """y = x W + b with W split along its input dimension; the input arrives already split."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.world, self.group = topology.mp_world_size(), topology.get_mp_group()
        self.in_local = _split(in_features, "in_features")
        self.weight = self.create_parameter([self.in_local, out_features], default_initializer=_ZERO)
        self.weight.is_distributed = self.world > 1
        self.weight.split_axis = 0
        # The bias is replicated and added once, after the reduction.
        self.bias = self.create_parameter([out_features], is_bias=True) if bias else None

    def forward(self, x):
        if self.world == 1:
            return linear(x, self.weight, self.bias)
        y = reduce_from_mp(F.linear(x, self.weight), self.group)
        return bias_add(y, self.bias)


class VocabParallelEmbedding(nn.Layer):
    """Token embedding with the vocabulary split over the model-parallel ranks."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.world, self.group = topology.mp_world_size(), topology.get_mp_group()
        self.num_embeddings = num_embeddings
        self.per_rank = _split(num_embeddings, "vocab_size")
        self.start = topology.mp_rank() * self.per_rank
        self.weight = self.create_parameter([self.per_rank, embedding_dim], default_initializer=_ZERO)
        self.weight.is_distributed = self.world > 1
        self.weight.split_axis = 0

    def forward(self, ids):
        if self.world == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        local = paddle.where(outside, paddle.zeros_like(local), local)
        out = F.embedding(local, self.weight)
        out = out * (~outside).unsqueeze(-1).astype(out.dtype)
        return reduce_from_mp(out, self.group)
