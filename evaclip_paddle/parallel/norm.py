"""LayerNorm / RMSNorm over features split across the tensor-parallel ranks (EVA02's sub-LN sits
between a column- and a row-parallel linear, where each rank holds width/mp features).

Statistics are those of the FULL width, so the result equals the unsharded norm: RMSNorm sums
squares across ranks; LayerNorm combines per-shard (mean, M2) pairs with the parallel-variance
formula (one collective, no E[x^2]-mean^2 cancellation). Weight and bias are split like the features.
"""
from __future__ import annotations

import paddle
import paddle.nn as nn

from . import topology
from .collectives import all_gather_with_grad, sum_partial


class ShardedNorm(nn.Layer):
    def __init__(self, dim: int, eps: float = 1e-6, rms: bool = False):
        super().__init__()
        self.world, self.group = topology.mp_world_size(), topology.get_mp_group()
        if dim % self.world:
            raise ValueError(f"normalised width {dim} is not divisible by the tensor-parallel degree {self.world}")
        self.dim, self.eps, self.rms = dim, eps, rms
        self.local = dim // self.world
        self.weight = self.create_parameter([self.local], default_initializer=nn.initializer.Constant(1.0))
        self.weight.is_distributed, self.weight.split_axis = self.world > 1, 0
        self.bias = None
        if not rms:
            self.bias = self.create_parameter([self.local], is_bias=True)
            self.bias.is_distributed, self.bias.split_axis = self.world > 1, 0

    def forward(self, x):
        dtype = x.dtype
        if dtype != paddle.float32:
            x = x.astype("float32")
        w = self.weight.astype("float32") if self.weight.dtype != paddle.float32 else self.weight
        if self.rms:
            ss = sum_partial(x.pow(2).sum(-1, keepdim=True), self.group)
            y = x * paddle.rsqrt(ss / self.dim + self.eps) * w
        else:
            mean_r = x.mean(-1, keepdim=True)
            m2_r = (x - mean_r).pow(2).sum(-1, keepdim=True)
            # [.., 2*world]: (mean_0, m2_0, mean_1, m2_1, ...), ordered by mp rank.
            stats = all_gather_with_grad(paddle.concat([mean_r, m2_r], axis=-1), self.group, axis=-1)
            means, m2s = stats[..., 0::2], stats[..., 1::2]
            mean = means.mean(-1, keepdim=True)
            m2 = m2s.sum(-1, keepdim=True) + self.local * (means - mean).pow(2).sum(-1, keepdim=True)
            b = self.bias.astype("float32") if self.bias.dtype != paddle.float32 else self.bias
            y = (x - mean) * paddle.rsqrt(m2 / self.dim + self.eps) * w + b
        return y if y.dtype == dtype else y.astype(dtype)

    def extra_repr(self):
        return f"{self.dim} (local {self.local}), eps={self.eps}, rms={self.rms}"
