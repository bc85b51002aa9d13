"""Causal text transformer (open_clip layout): features at the EOT token (the argmax id)."""
from __future__ import annotations

import paddle
import paddle.nn as nn

from ..config import TextConfig
from ..parallel.layers import VocabParallelEmbedding
from . import init as winit
from .norm import make_norm
from .transformer import Block, BlockSpec, causal_mask, run_blocks


class TextTransformer(nn.Layer):
    def __init__(self, cfg: TextConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.grad_checkpointing = False
        self.token_embedding = VocabParallelEmbedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = self.create_parameter([cfg.context_length, cfg.width])
        spec = BlockSpec(width=cfg.width, heads=cfg.heads, mlp_hidden=cfg.mlp_hidden, q_bias=True, k_bias=True,
                         eps=cfg.norm_eps, fused_ln=cfg.fused_ln, causal=True)
        self.blocks = nn.LayerList([Block(spec) for _ in range(cfg.layers)])
        self.norm = make_norm(cfg.width, cfg.norm_eps, False, cfg.fused_ln)
        self.text_projection = self.create_parameter([cfg.width, embed_dim])

    def init_weights(self):
        w, layers = self.cfg.width, self.cfg.layers
        attn_std, proj_std, fc_std = w ** -0.5, w ** -0.5 * (2 * layers) ** -0.5, (2 * w) ** -0.5
        winit.normal_(self.token_embedding.weight, 0.02)
        winit.normal_(self.positional_embedding, 0.01)
        for blk in self.blocks:
            for lin, std in ((blk.attn.q_proj, attn_std), (blk.attn.k_proj, attn_std), (blk.attn.v_proj, attn_std),
                             (blk.attn.proj, proj_std), (blk.mlp.fc1, fc_std), (blk.mlp.fc2, proj_std)):
                winit.normal_(lin.weight, std)
                winit.zeros_(lin.bias)
        winit.normal_(self.text_projection, w ** -0.5)

    def check_ids(self, ids):
        if ids.ndim != 2:
            raise ValueError(f"token ids must be [batch, length], got shape {list(ids.shape)}")
        if ids.shape[1] > self.cfg.context_length:
            raise ValueError(f"token sequence length {ids.shape[1]} exceeds context_length {self.cfg.context_length}")
        if not paddle.in_dynamic_mode() or ids.size == 0:
            return
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.cfg.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is out of range [0, {self.cfg.vocab_size}) for this text tower")

    def forward(self, ids):
        self.check_ids(ids)
        n = ids.shape[1]
        x = self.token_embedding(ids) + self.positional_embedding[:n]
        mask = causal_mask(n, x.dtype)                                  # once, shared by every layer
        x = run_blocks(self.blocks, x, None, self.grad_checkpointing and self.training, mask=mask)
        x = self.norm(x)
        eot = paddle.argmax(ids, axis=-1)                               # EOT has the largest id
        x = paddle.take_along_axis(x, eot.reshape([-1, 1, 1]).expand([-1, 1, x.shape[-1]]), axis=1,
                                   broadcast=False).squeeze(1)
        return paddle.matmul(x, self.text_projection.astype(x.dtype))
