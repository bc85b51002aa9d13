"""EVA02 2D rotary position embedding for patch tokens.

Per axis, head_dim/2 channels carry frequencies 1/10000^(2k/(head_dim/2)), each repeated for an
interleaved (x0, x1) pair; the h half comes first, then the w half. Positions are
arange(grid)/grid * pt_seq_len, i.e. rescaled to the grid the model was pre-trained on (16), which is
why B-16 at grid 14 and L-14-336 at grid 24 do not use plain indices.
"""
from __future__ import annotations

import numpy as np
import paddle
import paddle.nn as nn


def rope_tables(head_dim: int, grid: int, pt_seq_len: int = 16, theta: float = 10000.0):
    """cos, sin tables of shape [grid*grid, head_dim] (row-major patch order), float32 numpy."""
    half = head_dim // 2
    freqs = 1.0 / theta ** (np.arange(0, half, 2, dtype=np.float64)[: half // 2] / half)
    t = np.arange(grid, dtype=np.float64) / grid * pt_seq_len
    f = np.repeat(np.outer(t, freqs), 2, axis=-1)                       # [grid, half], pairs interleaved
    fh = np.broadcast_to(f[:, None, :], (grid, grid, half))
    fw = np.broadcast_to(f[None, :, :], (grid, grid, half))
    ang = np.concatenate([fh, fw], axis=-1).reshape(grid * grid, head_dim)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def rotate_pairs(x):
    """(x0, x1) -> (-x1, x0) on interleaved channel pairs of the last axis."""
    shape = x.shape
    pairs = x.reshape(shape[:-1] + [shape[-1] // 2, 2])
    return paddle.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(shape)


class VisionRotaryEmbedding(nn.Layer):
    """Holds the tables as non-persistent buffers (checkpoints never need them)."""

    def __init__(self, head_dim: int, grid: int, pt_seq_len: int = 16):
        super().__init__()
        cos, sin = rope_tables(head_dim, grid, pt_seq_len)
        self.register_buffer("cos", paddle.to_tensor(cos), persistable=False)
        self.register_buffer("sin", paddle.to_tensor(sin), persistable=False)

    def tables(self, keep=None, dtype=None):
        """cos/sin shaped to broadcast over [B, N, heads, head_dim] tokens.

        keep: [B, K] indices of the patch tokens kept by patch dropout (CLS excluded), so a
        dropped-out sequence still rotates each token by its own position.
        """
        cos, sin = self.cos, self.sin
        if keep is None:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)                # [N, 1, D]
        else:
            cos = paddle.gather(cos, keep.flatten()).reshape(keep.shape + [1, -1])  # [B, K, 1, D]
            sin = paddle.gather(sin, keep.flatten()).reshape(keep.shape + [1, -1])
        if dtype is not None and cos.dtype != dtype:
            cos, sin = cos.astype(dtype), sin.astype(dtype)
        return cos, sin


def apply_rope(x, cos, sin):
    """x: [B, N, H, D] patch tokens (no CLS)."""
    return x * cos + rotate_pairs(x) * sin
