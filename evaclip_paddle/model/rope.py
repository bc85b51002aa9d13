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


def pair_rotation_matrix(head_dim: int) -> np.ndarray:
    """R with x @ R = (-x1, x0) on each interleaved pair: a tiny GEMM is faster here than
    strided slicing, stacking or flipping, forward and backward."""
    r = np.zeros((head_dim, head_dim), np.float32)
    for m in range(head_dim // 2):
        r[2 * m + 1, 2 * m] = -1.0
        r[2 * m, 2 * m + 1] = 1.0
    return r


class VisionRotaryEmbedding(nn.Layer):
    """Holds the tables as non-persistent buffers (checkpoints never need them).

    Row 0 is an identity rotation for the CLS token (cos 1, sin 0), so the rotation applies to the
    whole sequence without slicing CLS off and concatenating it back.
    """

    def __init__(self, head_dim: int, grid: int, pt_seq_len: int = 16):
        super().__init__()
        cos, sin = rope_tables(head_dim, grid, pt_seq_len)
        cos = np.concatenate([np.ones((1, head_dim), np.float32), cos])
        sin = np.concatenate([np.zeros((1, head_dim), np.float32), sin])
        self.register_buffer("cos", paddle.to_tensor(cos), persistable=False)
        self.register_buffer("sin", paddle.to_tensor(sin), persistable=False)
        self.register_buffer("rot", paddle.to_tensor(pair_rotation_matrix(head_dim)), persistable=False)

    def tables(self, keep=None, dtype=None, heads: int = 1):
        """cos/sin shaped to broadcast over [B, 1 + N, heads, head_dim] tokens (CLS first).

        keep: [B, K] indices of the patch tokens kept by patch dropout (CLS excluded), so a
        dropped-out sequence still rotates each token by its own position.
        heads: materialise the head axis; broadcasting over it is a slow path of Paddle's CPU
        kernels (a [N, 1, D] multiply over [B, N, H, D] measured ~10x slower than [N, H, D]).
        """
        cos, sin = self.cos, self.sin
        if keep is None:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)                # [1+N, 1, D]
        else:
            rows = paddle.concat([paddle.zeros([keep.shape[0], 1], keep.dtype), keep + 1], axis=1)
            cos = paddle.gather(cos, rows.flatten()).reshape(rows.shape + [1, -1])  # [B, 1+K, 1, D]
            sin = paddle.gather(sin, rows.flatten()).reshape(rows.shape + [1, -1])
        if heads > 1:
            cos = cos.expand(cos.shape[:-2] + [heads, cos.shape[-1]])
            sin = sin.expand(sin.shape[:-2] + [heads, sin.shape[-1]])
        rot = self.rot
        if dtype is not None and cos.dtype != dtype:
            cos, sin, rot = cos.astype(dtype), sin.astype(dtype), rot.astype(dtype)
        return cos, sin, rot


def apply_rope(x, cos, sin, rot):
    """x: [B, 1 + N, H, D] tokens with CLS first; tables from VisionRotaryEmbedding.tables."""
    return x * cos + paddle.matmul(x, rot) * sin
