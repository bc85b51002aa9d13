"""evaclip_linear_fwd, the inference linear of CPU-kernel export programs: act(x @ W + b) with MKL
sgemm and one epilogue pass, against float64 numpy; and the switch that lets it into static traces
only (ops.fused_act.static_trace)."""
import os

import numpy as np
import paddle
import pytest

from evaclip_paddle.ops import fused_act, fused_norm

pytestmark = pytest.mark.filterwarnings("ignore:No ccache found")  # Paddle's build chatter


@pytest.fixture(scope="module")
def lin_op(tmp_path_factory):
    libs = os.path.join(os.path.dirname(paddle.__file__), "libs")
    if not os.path.isfile(os.path.join(libs, "libmklml_intel.so")):
        pytest.skip("this paddle ships no libmklml_intel.so: the op is compiled out")
    mod = fused_norm.load_op(build_directory=str(tmp_path_factory.mktemp("fused_ln_build")), jit=True, strict=True)
    assert hasattr(mod, "evaclip_linear_fwd"), "the fused_ln library was built without evaclip_linear_fwd"
    return mod.evaclip_linear_fwd


def reference64(x, w, b, act):
    y = x.astype(np.float64).reshape(-1, x.shape[-1]) @ w.astype(np.float64)
    if b is not None:
        y = y + b.astype(np.float64)
    if act == 1:
        from math import erf
        y = y * 0.5 * (1.0 + np.vectorize(erf)(y / np.sqrt(2.0)))
    return y.reshape(x.shape[:-1] + (w.shape[1],))


@pytest.mark.parametrize("act", [0, 1], ids=["none", "gelu"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("xshape,n", [((2, 197, 64), 96), ((5, 3, 7, 33), 17), ((1, 40), 1), ((3, 1), 5)])
def test_matches_float64(lin_op, xshape, n, bias, act):
    rng = np.random.RandomState(sum(xshape) + n)
    x = rng.randn(*xshape).astype("float32")
    w = (rng.randn(xshape[-1], n) / np.sqrt(xshape[-1])).astype("float32")
    b = rng.randn(n).astype("float32") if bias else None
    got = lin_op(paddle.to_tensor(x), paddle.to_tensor(w), None if b is None else paddle.to_tensor(b), act).numpy()
    ref = reference64(x, w, b, act)
    assert got.shape == ref.shape and got.dtype == np.float32
    err = np.abs(got - ref).max()
    assert err <= 2e-6 * max(1.0, np.abs(ref).max()), f"max abs err {err:.3g}"  # fp32 GEMM rounding


def test_empty_and_zero_k(lin_op):
    y = lin_op(paddle.zeros([0, 4]), paddle.ones([4, 3]), paddle.ones([3]), 0)
    assert y.shape == [0, 3]
    y = lin_op(paddle.zeros([2, 0]), paddle.ones([0, 3]), paddle.to_tensor([1.0, -2.0, 0.5]), 1)
    np.testing.assert_allclose(y.numpy(), np.tile(reference64(np.zeros((1, 1)), np.zeros((1, 3)),
                                                              np.array([1.0, -2.0, 0.5]), 1), (2, 1)), atol=1e-7)


@pytest.mark.parametrize(
    "args,message",
    [
        (([2, 5], [4, 3], None, 0), "needs a weight \\[K, N\\]"),
        (([2, 4], [4, 3], [2], 0), "bias has 2 elements, the weight 3 columns"),
        (([2, 4], [4, 3], None, 2), "act must be 0 \\(none\\) or 1 \\(gelu\\)"),
    ],
    ids=["k", "bias", "act"],
)
def test_clear_errors(lin_op, args, message):
    xs, ws, bs, act = args
    with pytest.raises(Exception, match=message):
        lin_op(paddle.ones(xs), paddle.ones(ws), None if bs is None else paddle.ones(bs), act)


def test_only_static_traces_take_it(lin_op):
    """Dygraph (training, eval) keeps the differentiable path: linear_act declines there, inside
    static_trace too, and static_trace restores the previous state even on an error."""
    x, w, b = paddle.ones([2, 4]), paddle.ones([4, 3]), paddle.ones([3])
    assert fused_act.linear_act(x, w, b, "gelu") is None
    with fused_act.static_trace():
        assert fused_act.kernels_traceable() and not fused_act.static_tracing()
        assert fused_act.linear_act(x, w, b) is None
    with pytest.raises(KeyError):
        with fused_act.static_trace():
            raise KeyError("boom")
    assert not fused_act._STATIC_TRACE["on"]
