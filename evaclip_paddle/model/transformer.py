"""One transformer block family for both towers.

The vision variants (EVA01, EVA02 with RoPE/SwiGLU/sub-LN, postnorm, RMSNorm) and the causal text
block differ only by constructor flags. q/k/v and MLP input projections are column-parallel, the
output projections row-parallel, so the same block runs sharded under tensor parallelism.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.distributed.fleet.utils import recompute

from ..parallel import topology
from ..parallel.layers import ColumnParallelLinear, RowParallelLinear
from .norm import make_norm
from .linear import linear
from .rope import apply_rope
from ..ops import fused_act, fused_attn

# Exact math attention instead of the fused kernel (used by tests as the reference path).
USE_SDPA = True


@dataclass
class BlockSpec:
    width: int
    heads: int
    mlp_hidden: int
    q_bias: bool = True         # bias on q (and v)
    k_bias: bool = False        # text attention has a full q/k/v bias
    swiglu: bool = False
    subln: bool = False
    postnorm: bool = False
    rms: bool = False
    eps: float = 1e-6
    fused_ln: bool = False      # use the external_ops kernels (norms; the CPU SwiGLU gate)
    causal: bool = False
    proj_bias: bool = True      # bias of attn.proj and the MLP linears


class DropPath(nn.Layer):
    """Stochastic depth per sample."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = paddle.bernoulli(paddle.full([x.shape[0]] + [1] * (x.ndim - 1), keep, dtype=x.dtype))
        return x * mask / keep


class Attention(nn.Layer):
    def __init__(self, s: BlockSpec):
        super().__init__()
        if s.heads % topology.mp_world_size():
            raise ValueError(f"{s.heads} attention heads are not divisible by the tensor-parallel degree "
                             f"{topology.mp_world_size()}")
        self.heads_local = s.heads // topology.mp_world_size()
        self.head_dim = s.width // s.heads
        self.causal = s.causal
        self.q_proj = ColumnParallelLinear(s.width, s.width, bias=s.q_bias)
        self.k_proj = ColumnParallelLinear(s.width, s.width, bias=s.k_bias)
        self.v_proj = ColumnParallelLinear(s.width, s.width, bias=s.q_bias)
        self.inner_attn_ln = make_norm(s.width, s.eps, s.rms, s.fused_ln, sharded=True) if s.subln else None
        self.proj = RowParallelLinear(s.width, s.width, bias=s.proj_bias)
        self.fused = s.fused_ln     # external_ops RoPE/softmax kernels where they apply (CPU fp32 dygraph)

    def forward(self, x, rope=None, mask=None):
        """mask: additive [N, N] attention mask (the text tower passes its causal mask, built once
        per forward instead of once per layer)."""
        B, N = x.shape[0], x.shape[1]
        if self.q_proj.world > 1:
            from ..parallel.collectives import copy_to_mp
            x = copy_to_mp(x, self.q_proj.group)                      # once for q, k and v
        # Three GEMMs rather than one on concatenated weights: no weight concat and no split in
        # backward, which cost more than the GEMM batching saves on CPU.
        shape = [B, N, self.heads_local, self.head_dim]
        q = linear(x, self.q_proj.weight, self.q_proj.bias).reshape(shape)
        k = linear(x, self.k_proj.weight, self.k_proj.bias).reshape(shape)
        v = linear(x, self.v_proj.weight, self.v_proj.bias).reshape(shape)
        fused = self.fused and fused_act.kernels_traceable()   # (a portable export keeps the native math)
        if rope is not None and fused:
            cos, sin = rope[0][..., 0, :], rope[1][..., 0, :]         # the kernel broadcasts the head axis
            q, k = fused_attn.rope(q, cos, sin), fused_attn.rope(k, cos, sin)
        elif rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)          # CLS row is the identity
        if mask is None and self.causal:
            mask = causal_mask(N, q.dtype)
        if USE_SDPA and fused:
            o = fused_attn.attention(q, k, v, mask)                    # falls back to sdpa itself
        elif USE_SDPA:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            o = attention_math(q, k, v, mask)
        o = o.reshape([B, N, self.heads_local * self.head_dim])
        if self.inner_attn_ln is not None:
            o = self.inner_attn_ln(o)
        return self.proj(o)


def causal_mask(n: int, dtype="float32"):
    """Additive mask: -inf above the diagonal."""
    return paddle.triu(paddle.full([n, n], float("-inf"), dtype=dtype), 1)


def attention_math(q, k, v, mask=None):
    """Plain softmax(q k^T / sqrt(d) + mask) v on [B, N, H, D] tensors, fp32 softmax."""
    q, k, v = (t.transpose([0, 2, 1, 3]) for t in (q, k, v))
    s = paddle.matmul(q, k, transpose_y=True) * (q.shape[-1] ** -0.5)
    if mask is not None:
        s = s + mask
    p = F.softmax(s.astype("float32"), axis=-1).astype(v.dtype)
    return paddle.matmul(p, v).transpose([0, 2, 1, 3])


class Mlp(nn.Layer):
    """fc1 -> GELU -> (ffn_ln) -> fc2."""

    def __init__(self, s: BlockSpec):
        super().__init__()
        self.fc1 = ColumnParallelLinear(s.width, s.mlp_hidden, bias=s.proj_bias)
        self.ffn_ln = make_norm(s.mlp_hidden, s.eps, s.rms, s.fused_ln, sharded=True) if s.subln else None
        self.fc2 = RowParallelLinear(s.mlp_hidden, s.width, bias=s.proj_bias)
        self.fused = s.fused_ln     # external_ops GELU kernel where it applies (CPU fp32 dygraph)

    def forward(self, x):
        # A static CPU-kernel trace fuses fc1's bias and the GELU into its GEMM.
        fuse = self.fused and self.fc1.world == 1
        h = fused_act.linear_act(x, self.fc1.weight, self.fc1.bias, "gelu") if fuse else None
        if h is None:
            h = fused_act.gelu(self.fc1(x)) if self.fused else F.gelu(self.fc1(x))
        if self.ffn_ln is not None:
            h = self.ffn_ln(h)
        return self.fc2(h)


class SwiGLU(nn.Layer):
    """w3(ffn_ln(silu(w1 x) * w2 x))."""

    def __init__(self, s: BlockSpec):
        super().__init__()
        self.w1 = ColumnParallelLinear(s.width, s.mlp_hidden, bias=s.proj_bias)
        self.w2 = ColumnParallelLinear(s.width, s.mlp_hidden, bias=s.proj_bias)
        self.ffn_ln = make_norm(s.mlp_hidden, s.eps, s.rms, s.fused_ln, sharded=True) if s.subln else None
        self.w3 = RowParallelLinear(s.mlp_hidden, s.width, bias=s.proj_bias)
        self.fused = s.fused_ln     # external_ops gate kernel where it applies (CPU fp32 dygraph)

    def forward(self, x):
        h = fused_act.swiglu(self.w1(x), self.w2(x)) if self.fused else F.silu(self.w1(x)) * self.w2(x)
        if self.ffn_ln is not None:
            h = self.ffn_ln(h)
        return self.w3(h)


class Block(nn.Layer):
    def __init__(self, s: BlockSpec, drop_path: float = 0.0):
        super().__init__()
        self.postnorm = s.postnorm
        self.norm1 = make_norm(s.width, s.eps, s.rms, s.fused_ln)
        self.attn = Attention(s)
        self.norm2 = make_norm(s.width, s.eps, s.rms, s.fused_ln)
        self.mlp = SwiGLU(s) if s.swiglu else Mlp(s)
        self.drop_path = DropPath(drop_path)

    def forward(self, x, rope=None, mask=None):
        if self.postnorm:
            x = x + self.drop_path(self.norm1(self.attn(x, rope, mask)))
            return x + self.drop_path(self.norm2(self.mlp(x)))
        x = x + self.drop_path(self.attn(self.norm1(x), rope, mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def run_blocks(blocks: nn.LayerList, x, rope=None, checkpoint: bool = False, mask=None):
    """Applies the blocks, recomputing each one's activations in backward when `checkpoint`."""
    for blk in blocks:
        if checkpoint and x.stop_gradient is False:
            x = recompute(blk, x, rope, mask)
        else:
            x = blk(x, rope, mask)
    return x
