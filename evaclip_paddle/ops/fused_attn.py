"""RoPE and the attention softmax on the fused_ln op library's CPU kernels (external_ops/).

Paddle 3.3.1's CPU softmax uses a scalar exp (30 ms on [32, 12, 197, 197] scores with 2 threads;
PyTorch 7.4 ms, this kernel 8.5 ms), and EVA02's rotary embedding costs a mul, a tiny matmul, a mul
and an add per q/k (18 ms on [32, 197, 12, 64]; this kernel 2 ms). The kernels vectorise exp, fold
the score scale and the additive mask into the softmax, and do RoPE in one pass. For inference,
attention itself is one kernel (evaclip_attention_fwd: MKL sgemm on the [B, N, H, D] layout, no
transposes); it has no gradient, so training keeps the matmul + fused softmax path.
bench/bench_attn.py measures them against the native math.

Like fused_act, the kernels cover float32 CPU tensors in dygraph and in static_trace() (the
CPU-kernel export programs). Anything else (GPU, other dtypes, other static graphs such as the
portable export, unsupported shapes, a library built before these ops existed, a
mask or rope table that wants a gradient: the ops give them none) takes the native Paddle math,
which computes the same function.
"""
from __future__ import annotations

import paddle
import paddle.nn.functional as F

from ..model.rope import pair_rotation_matrix
from . import fused_norm
from .fused_act import _op, static_tracing


def _rope_op(x, cos, sin):
    op = _op("evaclip_rope", x, cos, sin)
    if op is None or not (cos.stop_gradient and sin.stop_gradient):
        return None
    if x.ndim != 4 or x.shape[-1] % 2 or cos.shape != sin.shape:
        return None
    b, n, _, d = x.shape
    return op if cos.shape in ([n, d], [b, n, d]) else None


def _rope_native(x, cos, sin):
    # [N, D] -> [N, 1, D] and [B, N, D] -> [B, N, 1, D] broadcast over the head axis of x.
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    place = x.place if paddle.in_dynamic_mode() else None  # (static graph values have no place)
    rot = paddle.to_tensor(pair_rotation_matrix(x.shape[-1]), dtype=x.dtype, place=place)
    return x * cos + paddle.matmul(x, rot) * sin


@paddle.jit.not_to_static
def rope(x, cos, sin):
    """EVA02 rotary embedding on interleaved pairs of the head dim.

    x: [B, N, H, D]; cos, sin: [N, D] (shared by the batch) or [B, N, D] (per sample, e.g. after
    patch dropout). Same as ``x * cos + matmul(x, pair_rotation_matrix(D)) * sin`` with the tables
    broadcast over the heads.
    """
    op = _rope_op(x, cos, sin)
    if op is None:
        return _rope_native(x, cos, sin)
    c = fused_norm._contiguous
    return op(c(x), c(cos), c(sin))


def _mask_table(shape, mask):
    """mask as the [Nq, L] table the op broadcasts over scores of shape [..., Nq, L], or None if
    it is not one (leading size-1 dims, as in [1, 1, Nq, L], are dropped)."""
    if len(shape) < 2 or mask.ndim < 2 or list(mask.shape[-2:]) != list(shape[-2:]):
        return None
    if any(d != 1 for d in mask.shape[:-2]):
        return None
    return mask if mask.ndim == 2 else mask.reshape(list(shape[-2:]))


def _softmax_op(x, mask, shape=None):
    """(op, mask table) when the kernel can take scores of `shape` (default: x's) with the dtype
    and place of x, and this mask; else (None, None)."""
    op = _op("evaclip_softmax", x, *([] if mask is None else [mask]))
    shape = list(x.shape if shape is None else shape)
    if op is None or not shape:
        return None, None
    if mask is None:
        return op, None
    table = _mask_table(shape, mask) if mask.stop_gradient else None
    return (op, table) if table is not None else (None, None)


def _softmax_native(x, scale, mask):
    s = x * scale if scale != 1.0 else x
    return F.softmax(s if mask is None else s + mask, axis=-1)


@paddle.jit.not_to_static
def softmax(x, scale: float = 1.0, mask=None):
    """softmax(x * scale + mask) over the last dim.

    mask: optional additive mask broadcast over the leading dims of x [..., Nq, L]; the kernel
    takes [Nq, L] (or that with leading 1s) and may hold -inf (not a whole row). Other masks go
    the native way. The mask gets no gradient from the kernel.
    """
    op, table = _softmax_op(x, mask)
    if op is None:
        return _softmax_native(x, scale, mask)
    c = fused_norm._contiguous
    return op(c(x), None if table is None else c(table), float(scale))


# Switch for A/B runs: False keeps inference on the matmul + fused softmax path below.
USE_INFERENCE_OP = True


def _no_grad_due(*tensors):
    # (a static CPU-kernel trace is an inference program)
    return static_tracing() or not paddle.is_grad_enabled() or all(t.stop_gradient for t in tensors)


def _inference_op(q, k, v, mask):
    """(op, mask table) when evaclip_attention_fwd can take this call, else (None, None). The op
    has no gradient, so it is used only when none is due (no_grad, or nothing requires one)."""
    if not USE_INFERENCE_OP:
        return None, None
    op = _op("evaclip_attention_fwd", q, k, v, *([] if mask is None else [mask]))
    if op is None or not _no_grad_due(q, k, v, *([] if mask is None else [mask])):
        return None, None
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or k.shape[1] == 0:
        return None, None
    (b, nq, h, d), (bk, nk, hk, dk) = q.shape, k.shape
    if [bk, hk, dk] != [b, h, d] or list(v.shape[:3]) != [b, nk, h]:
        return None, None
    if mask is None:
        return op, None
    table = _mask_table([nq, nk], mask)
    return (op, table) if table is not None else (None, None)


@paddle.jit.not_to_static
def attention(q, k, v, mask=None):
    """softmax(q k^T / sqrt(D) + mask) v for q, k, v [B, N, H, D] (the layout the model and
    F.scaled_dot_product_attention use), returned as [B, N, H, D].

    Inference (no gradient due) runs the evaclip_attention_fwd kernel: per head, sgemm on the
    [B, N, H, D] buffers in place, softmax, sgemm, with no transposes. Otherwise this is the math
    of scaled_dot_product_attention's CPU path, with the scale and the mask folded into the fused
    softmax. Where neither kernel applies (GPU, other dtypes, static graphs, other mask shapes,
    different head counts) this is F.scaled_dot_product_attention itself.
    """
    op, table = _inference_op(q, k, v, mask)
    if op is not None:
        c = fused_norm._contiguous
        return op(c(q), c(k), c(v), None if table is None else c(table), float(q.shape[-1] ** -0.5))
    usable = q.ndim == 4 and k.ndim == 4 and q.shape[2] == k.shape[2] == v.shape[2]
    scores = [q.shape[0], q.shape[2], q.shape[1], k.shape[1]] if usable else None
    if not usable or _softmax_op(q, mask, scores)[0] is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    q, k, v = (t.transpose([0, 2, 1, 3]) for t in (q, k, v))
    s = paddle.matmul(q, k, transpose_y=True)
    p = softmax(s, q.shape[-1] ** -0.5, mask)
    return paddle.matmul(p, v).transpose([0, 2, 1, 3])


def available() -> bool:
    """True when the loaded op library has the RoPE and softmax kernels."""
    mod = fused_norm._module()
    return mod is not None and hasattr(mod, "evaclip_rope") and hasattr(mod, "evaclip_softmax")


def inference_available() -> bool:
    """True when the loaded op library has the inference attention kernel (built only where
    Paddle ships MKL)."""
    mod = fused_norm._module()
    return mod is not None and hasattr(mod, "evaclip_attention_fwd")
