"""x @ W + b with the bias folded into the GEMM and a cheap bias gradient on CPU.

Paddle's CPU column reduction (the bias grad of a broadcast add: sum of dy over all rows) runs
~70x slower than a GEMV: on [1576, 2048] it takes ~22 ms, ones[1, M] @ dy ~0.3 ms. Its broadcast
bias add is slow too (13 ms on [6304, 2048] against 4 ms for a same-shape add), so the forward
adds the bias in place after the GEMM where autograd does not record it, and uses addmm (whose
GEMM accumulates onto the broadcast bias) where it does. The math is the same x @ W + b.
"""
from __future__ import annotations

import paddle
import paddle.nn.functional as F
from paddle.autograd import PyLayer

from ..ops import fused_act

# Off: plain F.linear / broadcast add (reference path; also used outside dygraph).
FAST_BIAS_GRAD = True


_ONES = {}


def _ones(m: int, dtype):
    """A cached [1, m] ones row (read-only; a fresh one per backward cost ~0.1 ms x 150 a step)."""
    key = (m, str(dtype))
    if key not in _ONES:
        if len(_ONES) > 64:        # varying sequence lengths: keep the cache bounded
            _ONES.clear()
        _ONES[key] = paddle.ones([1, m], dtype=dtype)
    return _ONES[key]


class _BiasAdd(PyLayer):
    @staticmethod
    def forward(ctx, y, b):
        return y + b

    @staticmethod
    def backward(ctx, dy):
        n = dy.shape[-1]
        d2 = dy.reshape([-1, n])
        db = paddle.matmul(_ones(d2.shape[0], dy.dtype), d2).reshape([n])
        return dy, db


def _bias_op(y, b):
    """The fused_ln in-place bias kernel for float32 CPU tensors, else None."""
    return fused_act._op("evaclip_bias_add", y, b)


def _addmm(x, w, b, untracked: bool = False):
    """x @ w + b on the flattened rows. untracked: no autograd records this (no_grad, or a PyLayer
    forward), so the bias may go onto the GEMM's output in place: one pass over it, where addmm
    first copies the broadcast bias (+5 ms on [6304, 768] x [768, 2048])."""
    x2 = x.reshape([-1, x.shape[-1]])
    op = _bias_op(x2, b) if untracked else None
    if op is not None:
        y = paddle.matmul(x2, w)
        op(y, b)
    else:
        y = paddle.addmm(b.unsqueeze(0), x2, w)
    return y.reshape(x.shape[:-1] + [w.shape[-1]])


class _Linear(PyLayer):
    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        return _addmm(x, w, b, untracked=True)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensor()
        n = dy.shape[-1]
        d2 = dy.reshape([-1, n])
        dx = None if x.stop_gradient else paddle.matmul(dy, w, transpose_y=True)
        dw = None if w.stop_gradient else paddle.matmul(x.reshape([-1, x.shape[-1]]), d2, transpose_x=True)
        db = paddle.matmul(_ones(d2.shape[0], dy.dtype), d2).reshape([n])
        return dx, dw, db


def _fast(b) -> bool:
    """The GEMV bias gradient applies: a trainable bias, in dygraph on CPU."""
    return (b is not None and FAST_BIAS_GRAD and not b.stop_gradient and paddle.in_dynamic_mode()
            and paddle.get_device() == "cpu")


def bias_add(y, b):
    """y + b (b broadcast over the last axis)."""
    if b is None:
        return y
    return _BiasAdd.apply(y, b) if _fast(b) else y + b


def linear(x, w, b=None):
    """F.linear(x, w, b) with the bias in the GEMM and its gradient as a GEMV (see module doc)."""
    if not paddle.in_dynamic_mode():
        y = fused_act.linear_act(x, w, b)  # the MKL kernel in a static CPU-kernel trace, else None
        if y is not None:
            return y
    if b is None or not (FAST_BIAS_GRAD and paddle.in_dynamic_mode() and paddle.get_device() == "cpu"):
        return F.linear(x, w, b)
    if not paddle.is_grad_enabled():
        return _addmm(x, w, b, untracked=True)
    if b.stop_gradient:
        return _addmm(x, w, b)
    return _Linear.apply(x, w, b)
