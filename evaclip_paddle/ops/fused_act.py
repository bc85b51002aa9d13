"""The SwiGLU gate silu(a) * b and the exact GELU on the fused_ln op library's CPU kernels
(external_ops/).

Paddle 3.3.1's CPU exp is scalar, which makes silu the slowest non-GEMM op of an EVA02 training
step; the library's kernel vectorises exp and fuses the product (fwd+bwd 28 -> 12 ms on
[8, 197, 2048], 2 threads). It covers float32 CPU tensors in dygraph; anything else (GPU, other
dtypes, static graphs such as export, a library built before this op existed) takes the native
Paddle math, which computes the same function. Results agree with it to float32 rounding (~3e-7
relative here).
"""
from __future__ import annotations

import paddle
import paddle.nn.functional as F

from . import fused_norm


def _op(name: str, *tensors):
    """The op's function when every tensor can take it, else None."""
    if not paddle.in_dynamic_mode():
        return None
    for t in tensors:
        if t.dtype != paddle.float32 or not t.place.is_cpu_place():
            return None
    mod = fused_norm._module()
    return getattr(mod, name, None) if mod is not None else None


@paddle.jit.not_to_static
def swiglu(a, b):
    """silu(a) * b."""
    op = _op("evaclip_swiglu", a, b)
    if op is None or a.shape != b.shape:
        return F.silu(a) * b
    return op(fused_norm._contiguous(a), fused_norm._contiguous(b))


@paddle.jit.not_to_static
def gelu(x):
    """Exact (erf) GELU, x * Phi(x): the same function as F.gelu(x)."""
    op = _op("evaclip_gelu", x)
    if op is None:
        return F.gelu(x)
    return op(fused_norm._contiguous(x))


def available() -> bool:
    """True when the loaded op library has the CPU gate kernel."""
    mod = fused_norm._module()
    return mod is not None and hasattr(mod, "evaclip_swiglu")
