"""Weight initialisers that act in place on parameters (paddle's global seed drives them)."""
from __future__ import annotations

import paddle


@paddle.no_grad()
def trunc_normal_(p, std: float, bound: float = 2.0):
    """Normal(0, std) truncated to +-bound*std by resampling (not clipping, which piles mass on the edges)."""
    x = paddle.randn(p.shape, dtype="float32")
    bad = x.abs() > bound
    while bool(bad.any()):
        x = paddle.where(bad, paddle.randn(p.shape, dtype="float32"), x)
        bad = x.abs() > bound
    p.set_value((x * std).astype(p.dtype))


@paddle.no_grad()
def normal_(p, std: float):
    p.set_value((paddle.randn(p.shape, dtype="float32") * std).astype(p.dtype))


@paddle.no_grad()
def zeros_(p):
    p.set_value(paddle.zeros(p.shape, dtype=p.dtype))


@paddle.no_grad()
def scale_(p, factor: float):
    p.set_value(p * factor)
