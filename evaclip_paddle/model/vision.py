"""EVA vision transformer: EVA01, EVA02 (RoPE, SwiGLU, sub-LN), postnorm and RMSNorm variants by config."""
from __future__ import annotations

import math

import numpy as np
import paddle
import paddle.nn as nn

from ..config import VisionConfig
from ..parallel.layers import ColumnParallelLinear, RowParallelLinear
from . import init as winit
from .norm import make_norm
from .rope import VisionRotaryEmbedding
from .transformer import Block, BlockSpec, run_blocks


class PatchEmbed(nn.Layer):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.image_size, self.patch_size = cfg.image_size, cfg.patch_size
        self.proj = nn.Conv2D(cfg.in_chans, cfg.width, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x):
        if x.ndim != 4:
            raise ValueError(f"images must be [batch, channels, height, width], got shape {list(x.shape)}")
        h, w = x.shape[-2], x.shape[-1]
        if (h, w) != (self.image_size, self.image_size):
            raise ValueError(f"image size {h}x{w} does not match the model's {self.image_size}x{self.image_size}"
                             f" (patch size {self.patch_size}); resize or create the model with force_image_size")
        return self.proj(x).flatten(2).transpose([0, 2, 1])              # [B, N, W]


def patch_dropout_indices(batch: int, num_patches: int, prob: float):
    """Random subset of patch indices per sample (FLIP/CLIPA): k = max(1, int(N*(1-p))), sorted."""
    k = max(1, int(num_patches * (1.0 - prob)))
    scores = paddle.randn([batch, num_patches])
    keep = paddle.topk(scores, k, axis=-1).indices
    return paddle.sort(keep, axis=-1)


class EVAVisionTransformer(nn.Layer):
    def __init__(self, cfg: VisionConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.grad_checkpointing = False
        self.patch_embed = PatchEmbed(cfg)
        n = cfg.grid_size ** 2
        self.cls_token = self.create_parameter([1, 1, cfg.width])
        self.pos_embed = self.create_parameter([1, n + 1, cfg.width])
        self.rope = VisionRotaryEmbedding(cfg.head_width, cfg.grid_size, cfg.pt_hw_seq_len) if cfg.rope else None
        spec = BlockSpec(width=cfg.width, heads=cfg.heads, mlp_hidden=cfg.mlp_hidden, q_bias=cfg.qkv_bias,
                         swiglu=cfg.naiveswiglu, subln=cfg.subln, postnorm=cfg.postnorm, rms=cfg.use_rms_norm,
                         eps=cfg.norm_eps, fused_ln=cfg.fused_ln)
        dpr = np.linspace(0, cfg.drop_path_rate, cfg.layers).tolist()
        self.blocks = nn.LayerList([Block(spec, dpr[i]) for i in range(cfg.layers)])
        self.norm = make_norm(cfg.width, cfg.norm_eps, cfg.use_rms_norm, cfg.fused_ln)
        self.head = nn.Linear(cfg.width, embed_dim, bias_attr=None if cfg.qkv_bias else False)
        self.patch_dropout = cfg.patch_dropout

    def init_weights(self):
        winit.trunc_normal_(self.pos_embed, 0.02)
        winit.trunc_normal_(self.cls_token, 0.02)
        for layer in self.sublayers(include_self=True):
            if isinstance(layer, (nn.Linear, ColumnParallelLinear, RowParallelLinear)):
                winit.trunc_normal_(layer.weight, 0.02)
                if layer.bias is not None:
                    winit.zeros_(layer.bias)
        # Deeper residual branches start smaller: divide by sqrt(2 * layer_id), layer_id from 1.
        for i, blk in enumerate(self.blocks):
            scale = 1.0 / math.sqrt(2.0 * (i + 1))
            winit.scale_(blk.attn.proj.weight, scale)
            winit.scale_((blk.mlp.w3 if hasattr(blk.mlp, "w3") else blk.mlp.fc2).weight, scale)
        winit.scale_(self.head.weight, 0.001)
        # Conv patch embedding: trunc normal like the linears (EVA's _init_weights skips Conv: keep
        # Paddle's default there, as the reference keeps PyTorch's).

    def forward(self, images, keep=None):
        """images [B, C, H, W] -> embeddings [B, embed_dim].

        keep: optional [B, K] patch indices to keep (patch dropout); drawn at random in training when
        the config's patch_dropout > 0.
        """
        x = self.patch_embed(images)
        B, N = x.shape[0], x.shape[1]
        x = x + self.pos_embed[:, 1:].astype(x.dtype)
        cls = (self.cls_token + self.pos_embed[:, :1]).astype(x.dtype).expand([B, -1, -1])
        if keep is None and self.training and self.patch_dropout > 0:
            keep = patch_dropout_indices(B, N, self.patch_dropout)
        if keep is not None:
            x = paddle.take_along_axis(x, keep.unsqueeze(-1).expand([-1, -1, x.shape[-1]]), axis=1,
                                       broadcast=False)
        x = paddle.concat([cls, x], axis=1)
        rope = self.rope.tables(keep, x.dtype, self.blocks[0].attn.heads_local) if self.rope is not None else None
        x = run_blocks(self.blocks, x, rope, self.grad_checkpointing and self.training)
        x = self.norm(x)[:, 0]
        return self.head(x)
