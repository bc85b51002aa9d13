"""The two towers and the learnable temperature."""
from __future__ import annotations

import math

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ..config import CLIPConfig
from .text import TextTransformer
from .vision import EVAVisionTransformer

LOGIT_SCALE_MAX = math.log(100.0)


class EVACLIP(nn.Layer):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = EVAVisionTransformer(cfg.vision_cfg, cfg.embed_dim)
        self.text = TextTransformer(cfg.text_cfg, cfg.embed_dim)
        self.logit_scale = self.create_parameter(
            [], default_initializer=nn.initializer.Constant(math.log(1 / 0.07)))

    def init_weights(self):
        self.visual.init_weights()
        self.text.init_weights()
        with paddle.no_grad():
            self.logit_scale.set_value(paddle.full([], math.log(1 / 0.07), dtype=self.logit_scale.dtype))

    def set_grad_checkpointing(self, enable: bool = True):
        self.visual.grad_checkpointing = enable
        self.text.grad_checkpointing = enable

    def encode_image(self, image, normalize: bool = False, keep=None):
        f = self.visual(image, keep=keep)
        return F.normalize(f, axis=-1) if normalize else f

    def encode_text(self, text, normalize: bool = False):
        f = self.text(text)
        return F.normalize(f, axis=-1) if normalize else f

    def clamped_logit_scale(self):
        return paddle.clip(self.logit_scale, 0.0, LOGIT_SCALE_MAX).exp()

    def forward(self, image=None, text=None):
        """Returns (image_features, text_features, logit_scale) with unit-norm features."""
        img = self.encode_image(image, normalize=True) if image is not None else None
        txt = self.encode_text(text, normalize=True) if text is not None else None
        return img, txt, self.clamped_logit_scale()
