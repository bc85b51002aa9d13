"""LayerNorm and T5-style RMSNorm, computed in fp32 whatever the input dtype.

`fused=True` routes through the external_ops kernels when they are built; the ops module falls
back to the native math (with one warning) when they are not, so a config never fails on it.
"""
from __future__ import annotations

import paddle
import paddle.nn as nn
import paddle.nn.functional as F


@paddle.jit.not_to_static
def _fused_ops():
    try:
        from ..ops import fused_norm
    except ImportError:  # ops package not present in this build
        return None
    return fused_norm


class LayerNorm(nn.Layer):
    def __init__(self, dim: int, eps: float = 1e-5, fused: bool = False):
        super().__init__()
        self.dim, self.eps, self.fused = dim, eps, fused
        self.weight = self.create_parameter([dim], default_initializer=nn.initializer.Constant(1.0))
        self.bias = self.create_parameter([dim], is_bias=True)

    def forward(self, x):
        dtype = x.dtype
        if dtype != paddle.float32:
            x = x.astype("float32")
        w, b = self.weight, self.bias
        if w.dtype != paddle.float32:
            w, b = w.astype("float32"), b.astype("float32")
        ops = _fused_ops() if self.fused else None
        if ops is not None:
            y = ops.fused_layer_norm(x, w, b, self.eps)
        else:
            y = F.layer_norm(x, [self.dim], weight=w, bias=b, epsilon=self.eps)
        return y if y.dtype == dtype else y.astype(dtype)

    def extra_repr(self):
        return f"{self.dim}, eps={self.eps}, fused={self.fused}"


class RMSNorm(nn.Layer):
    """y = w * x / sqrt(mean(x^2) + eps); no bias, no mean subtraction (EVA-CLIP-8B/18B)."""

    def __init__(self, dim: int, eps: float = 1e-6, fused: bool = False):
        super().__init__()
        self.dim, self.eps, self.fused = dim, eps, fused
        self.weight = self.create_parameter([dim], default_initializer=nn.initializer.Constant(1.0))

    def forward(self, x):
        dtype = x.dtype
        if dtype != paddle.float32:
            x = x.astype("float32")
        w = self.weight if self.weight.dtype == paddle.float32 else self.weight.astype("float32")
        ops = _fused_ops() if self.fused else None
        if ops is not None:
            y = ops.fused_rms_norm(x, w, self.eps)
        else:
            y = x * paddle.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * w
        return y if y.dtype == dtype else y.astype(dtype)

    def extra_repr(self):
        return f"{self.dim}, eps={self.eps}, fused={self.fused}"


def make_norm(dim: int, eps: float, rms: bool = False, fused: bool = False, sharded: bool = False) -> nn.Layer:
    """`sharded`: the normalised features are split over the tensor-parallel ranks (sub-LN inside an
    attention or MLP), so statistics must be taken over the full width."""
    from ..parallel import topology
    if sharded and topology.mp_world_size() > 1:
        from ..parallel.norm import ShardedNorm
        return ShardedNorm(dim, eps, rms)
    return RMSNorm(dim, eps, fused) if rms else LayerNorm(dim, eps, fused)
