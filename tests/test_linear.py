"""model.linear: the CPU fast path (bias folded into addmm, bias gradient as a GEMV) against
Paddle's F.linear, values and gradients, for every mix of frozen and trainable operands."""
from __future__ import annotations

import itertools

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from evaclip_paddle.model import linear as lin

TOL = 2e-5   # fp32, K = 48: same GEMM, different accumulation order at most


def _tensors(shape, k, n, seed=0):
    rng = np.random.default_rng(seed)
    mk = lambda *s: paddle.to_tensor(rng.standard_normal(s).astype("float32"))  # noqa: E731
    return mk(*shape, k), mk(k, n), mk(n), mk(*shape, n)


def _grads(fn, x, w, b, dy, flags):
    x, w, b = (t.detach() for t in (x, w, b))
    for t, f in zip((x, w, b), flags):
        t.stop_gradient = not f
    y = fn(x, w, b)
    if any(flags):
        (y * dy).sum().backward()
    return y.numpy(), [None if t.grad is None else t.grad.numpy() for t in (x, w, b)]


@pytest.mark.parametrize("shape", [(5,), (3, 7)])
@pytest.mark.parametrize("flags", list(itertools.product([True, False], repeat=3)))
def test_matches_f_linear(shape, flags):
    assert lin.FAST_BIAS_GRAD
    x, w, b, dy = _tensors(shape, 48, 24)
    y, g = _grads(lin.linear, x, w, b, dy, flags)
    y_ref, g_ref = _grads(F.linear, x, w, b, dy, flags)
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=TOL)
    for name, a, r in zip("xwb", g, g_ref):
        assert (a is None) == (r is None), f"grad of {name}"
        if a is not None:
            np.testing.assert_allclose(a, r, rtol=0, atol=TOL, err_msg=f"grad of {name}")


def test_no_grad_and_no_bias():
    x, w, b, _ = _tensors((4,), 48, 24)
    w.stop_gradient = b.stop_gradient = False
    with paddle.no_grad():
        y = lin.linear(x, w, b)
    assert y.stop_gradient
    np.testing.assert_allclose(y.numpy(), F.linear(x, w, b).numpy(), rtol=0, atol=TOL)
    np.testing.assert_allclose(lin.linear(x, w).numpy(), F.linear(x, w).numpy(), rtol=0, atol=TOL)


def test_inference_path_uses_the_in_place_bias_kernel():
    from evaclip_paddle.ops import fused_norm
    x, w, b, _ = _tensors((6, 5), 48, 24)
    assert lin._bias_op(x, b) is not None, "the fused_ln library (external_ops) is not built"
    with paddle.no_grad():
        y = lin.linear(x, w, b)
    np.testing.assert_allclose(y.numpy(), F.linear(x, w, b).numpy(), rtol=0, atol=TOL)
    op = fused_norm._module().evaclip_bias_add
    with pytest.raises(Exception, match="bias size 23 differs"):
        op(paddle.zeros([4, 24]), paddle.zeros([23]))
