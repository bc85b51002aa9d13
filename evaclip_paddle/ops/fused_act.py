"""The SwiGLU gate silu(a) * b and the exact GELU on the fused_ln op library's CPU kernels
(external_ops/).

Paddle 3.3.1's CPU exp is scalar, which makes silu the slowest non-GEMM op of an EVA02 training
step; the library's kernel vectorises exp and fuses the product (fwd+bwd 28 -> 12 ms on
[8, 197, 2048], 2 threads). It covers float32 CPU tensors in dygraph, and static traces inside
static_trace() (the CPU-kernel export programs, which also get linear_act); anything else (GPU,
other dtypes, other static graphs such as the portable export, a library built before this op
existed) takes the native Paddle math, which computes the same function. Results agree with it to float32 rounding (~3e-7
relative here).
"""
from __future__ import annotations

import contextlib

import paddle
import paddle.nn.functional as F

from . import fused_norm


# Set (by export._cpu_kernels) while a CPU inference program is traced: the kernels then go
# into the static program too. Static values have no place, so only the dtype is checked then.
_STATIC_TRACE = {"on": False}


@contextlib.contextmanager
def static_trace():
    """Within it, static-graph tracing (paddle.jit.to_static) records these kernels, as dygraph
    runs them; the resulting program runs on CPU only (Paddle Inference with the op library)."""
    prev = _STATIC_TRACE["on"]
    _STATIC_TRACE["on"] = True
    try:
        yield
    finally:
        _STATIC_TRACE["on"] = prev


def static_tracing() -> bool:
    """True while a static CPU-kernel program is being traced (see static_trace)."""
    return _STATIC_TRACE["on"] and not paddle.in_dynamic_mode()


def kernels_traceable() -> bool:
    """The kernels can run here: dygraph, or a static trace within static_trace()."""
    return paddle.in_dynamic_mode() or _STATIC_TRACE["on"]


def _op(name: str, *tensors):
    """The op's function when every tensor can take it, else None."""
    if not paddle.in_dynamic_mode():
        if not _STATIC_TRACE["on"] or any(t.dtype != paddle.float32 for t in tensors):
            return None
    elif any(t.dtype != paddle.float32 or not t.place.is_cpu_place() for t in tensors):
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


_ACTS = {None: 0, "gelu": 1}


@paddle.jit.not_to_static
def linear_act(x, weight, bias=None, act=None):
    """act(x @ weight + bias) as one evaclip_linear_fwd call (MKL sgemm + one epilogue pass), or
    None where the kernel does not apply: it has no gradient, so it is used only while tracing a
    static inference program (static_trace), where Paddle Inference would otherwise run the
    linear as oneDNN's slower fc."""
    if not static_tracing() or act not in _ACTS:
        return None
    op = _op("evaclip_linear_fwd", x, weight, *([] if bias is None else [bias]))
    if op is None or weight.ndim != 2:
        return None
    return op(x, weight, bias, _ACTS[act])


def available() -> bool:
    """True when the loaded op library has the CPU gate kernel."""
    mod = fused_norm._module()
    return mod is not None and hasattr(mod, "evaclip_swiglu")


def linear_available() -> bool:
    """True when the loaded op library has the inference linear kernel (built only where Paddle
    ships MKL)."""
    mod = fused_norm._module()
    return mod is not None and hasattr(mod, "evaclip_linear_fwd")
