"""The fused_ln library's RoPE and softmax kernels (external_ops/fused_ln/fused_attn_cpu.cc) and
their wrappers in evaclip_paddle.ops.fused_attn, against the native Paddle math they replace.

As in test_fused_norm.py, the op comes from the installed `fused_ln` package, else a JIT build of
this checkout's sources; a library without these kernels fails the tests instead of skipping them.
"""

import os

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from evaclip_paddle.model.rope import VisionRotaryEmbedding, pair_rotation_matrix
from evaclip_paddle.ops import fused_attn, fused_norm

pytestmark = pytest.mark.filterwarnings("ignore:No ccache found")  # Paddle's build chatter

TOL = 1e-6  # float32: max |err| <= TOL * max(1, max |ref|)


@pytest.fixture(scope="module")
def op(tmp_path_factory):
    build = tmp_path_factory.mktemp("fused_ln_build")
    mod = fused_norm.load_op(build_directory=str(build), jit=True, strict=True)
    assert fused_attn.available(), "the fused_ln library was built without the RoPE/softmax kernels"
    return mod


def assert_close(actual, ref, tol, what):
    """max |actual - ref| <= tol * max(1, max |ref|); returns the max abs error."""
    a, r = actual.numpy().astype(np.float64), ref.numpy().astype(np.float64)
    assert a.shape == r.shape, f"{what}: shape {a.shape} != {r.shape}"
    err = float(np.abs(a - r).max()) if a.size else 0.0
    scale = max(1.0, float(np.abs(r).max()) if r.size else 0.0)
    assert err <= tol * scale, f"{what}: max abs err {err:.3g} > {tol:g} * {scale:.3g}"
    return err


def leaf(a, dtype="float32"):
    return paddle.to_tensor(np.asarray(a, dtype=dtype), stop_gradient=False)


def grads(y, inputs, dy):
    return paddle.grad([y], inputs, [dy])


# ---- RoPE --------------------------------------------------------------------------------------

def rope_reference(x, cos, sin):
    """The model's math: x * cos + matmul(x, R) * sin, tables broadcast over the heads."""
    rot = paddle.to_tensor(pair_rotation_matrix(x.shape[-1]), dtype=x.dtype)
    return x * cos.unsqueeze(-2) + paddle.matmul(x, rot) * sin.unsqueeze(-2)


def rope_tables(shape, per_sample, rng):
    """Random tables (sin[2m] != sin[2m+1]: exercises every term of the kernel)."""
    b, n, _, d = shape
    ts = [b, n, d] if per_sample else [n, d]
    return (paddle.to_tensor(rng.randn(*ts).astype("float32")) for _ in range(2))


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
@pytest.mark.parametrize("shape", [(2, 197, 12, 64), (3, 5, 2, 6), (1, 1, 1, 2), (2, 33, 3, 130)], ids=str)
def test_rope_matches_native(op, shape, per_sample):
    rng = np.random.RandomState(sum(shape))
    x = leaf(rng.randn(*shape))
    cos, sin = rope_tables(shape, per_sample, rng)
    assert fused_attn._rope_op(x, cos, sin) is not None  # the kernel, not the fallback
    dy = paddle.to_tensor(rng.randn(*shape).astype("float32"))
    y, ref = fused_attn.rope(x, cos, sin), rope_reference(x, cos, sin)
    assert_close(y, ref, TOL, "rope")
    assert_close(grads(y, [x], dy)[0], grads(ref, [x], dy)[0], TOL, "rope dx")


def test_rope_model_tables(op):
    """The model's own tables (CLS row first, gathered per sample as after patch dropout)."""
    emb = VisionRotaryEmbedding(64, 14)
    rng = np.random.RandomState(0)
    x = leaf(rng.randn(2, 197, 12, 64))
    dy = paddle.to_tensor(rng.randn(2, 197, 12, 64).astype("float32"))
    cos, sin, rot = emb.tables(heads=12)
    ref = x * cos + paddle.matmul(x, rot) * sin
    y = fused_attn.rope(x, emb.cos, emb.sin)
    assert_close(y, ref, TOL, "rope shared")
    assert_close(grads(y, [x], dy)[0], grads(ref, [x], dy)[0], TOL, "rope shared dx")
    keep = paddle.to_tensor(np.stack([rng.permutation(196)[:100] for _ in range(2)]))
    cos, sin, rot = emb.tables(keep=keep)  # [B, 1 + K, 1, D]
    xk = leaf(rng.randn(2, 101, 12, 64))
    y = fused_attn.rope(xk, cos.squeeze(2), sin.squeeze(2))
    assert_close(y, xk * cos + paddle.matmul(xk, rot) * sin, TOL, "rope per sample")


def test_rope_fallbacks(op):
    rng = np.random.RandomState(1)
    shape = (2, 7, 3, 8)
    cos, sin = rope_tables(shape, False, rng)
    # float64 x goes the native way, with the same result as the reference
    x64 = leaf(rng.randn(*shape), "float64")
    c64, s64 = cos.astype("float64"), sin.astype("float64")
    assert fused_attn._rope_op(x64, c64, s64) is None
    np.testing.assert_array_equal(fused_attn.rope(x64, c64, s64).numpy(), rope_reference(x64, c64, s64).numpy())
    # tables of another shape ([1, N, D] for B = 2) broadcast natively
    x = leaf(rng.randn(*shape))
    c1, s1 = cos.unsqueeze(0), sin.unsqueeze(0)
    assert fused_attn._rope_op(x, c1, s1) is None
    assert_close(fused_attn.rope(x, c1, s1), rope_reference(x, cos, sin), TOL, "rope [1, N, D] tables")
    # tables that want a gradient get it from the native math (the kernel gives them none)
    c, s = cos.detach(), sin.detach()
    c.stop_gradient = False
    assert fused_attn._rope_op(x, c, s) is None
    gc = grads(fused_attn.rope(x, c, s), [c], paddle.ones(shape))[0]
    assert gc.shape == [7, 8] and float(gc.abs().sum()) > 0
    # constant tables get no gradient from the kernel
    y = op.evaclip_rope(x, c, s)
    assert paddle.grad([y], [x, c], [paddle.ones(shape)], allow_unused=True)[1] is None


def test_rope_strided_input(op):
    old = paddle.get_flags(["FLAGS_use_stride_kernel"])  # configure_cpu turns stride kernels off
    paddle.set_flags({"FLAGS_use_stride_kernel": True})
    try:
        base = paddle.randn([2, 4, 5, 16])
        x = base.transpose([0, 2, 1, 3])  # [2, 5, 4, 16] view
        cos, sin = rope_tables((2, 5, 4, 16), False, np.random.RandomState(2))
        assert_close(fused_attn.rope(x, cos, sin), rope_reference(x.contiguous(), cos, sin), TOL, "strided")
    finally:
        paddle.set_flags(old)


# ---- softmax -----------------------------------------------------------------------------------

def causal(n, l=None):
    return paddle.triu(paddle.full([n, l or n], float("-inf")), 1)


def softmax_reference(x, scale, mask):
    s = x * scale
    return F.softmax(s if mask is None else s + mask, axis=-1)


SOFTMAX_CASES = [  # (x shape, scale, mask kind)
    ((2, 12, 197, 197), 0.125, None),
    ((4, 8, 77, 77), 0.125, "causal"),
    ((2, 3, 17, 33), 0.7, "random"),
    ((3, 5, 13), 1.0, None),          # L not a multiple of the vector width
    ((3, 40), 2.0, "causal"),         # 2-D x: the mask is the whole input's shape
    ((6, 1), 1.0, None),              # L = 1: all ones, zero gradient
    ((2, 4, 9, 1), 0.5, "causal"),
]


def make_mask(kind, nq, l, rng):
    if kind is None:
        return None
    if kind == "causal":
        return causal(nq, l)
    return paddle.to_tensor((rng.randn(nq, l) * 3).astype("float32"))


@pytest.mark.parametrize("shape, scale, mask_kind", SOFTMAX_CASES, ids=str)
def test_softmax_matches_native(op, shape, scale, mask_kind):
    rng = np.random.RandomState(len(shape) * 100 + shape[-1])
    x = leaf(rng.randn(*shape) * 4)
    mask = make_mask(mask_kind, shape[-2], shape[-1], rng)
    op_, _ = fused_attn._softmax_op(x, mask)
    assert op_ is not None  # the kernel, not the fallback
    dy = paddle.to_tensor(rng.randn(*shape).astype("float32"))
    y, ref = fused_attn.softmax(x, scale, mask), softmax_reference(x, scale, mask)
    assert_close(y, ref, TOL, "softmax")
    assert_close(grads(y, [x], dy)[0], grads(ref, [x], dy)[0], TOL, "softmax dx")
    if mask_kind == "causal":  # masked entries are exactly 0, rows still sum to 1
        blocked = np.broadcast_to(np.isneginf(mask.numpy()), shape)
        assert (y.numpy()[blocked] == 0).all()
        np.testing.assert_allclose(y.numpy().sum(-1), 1.0, atol=1e-6)


def test_softmax_large_logits(op):
    rng = np.random.RandomState(3)
    a = rng.randn(4, 8, 50).astype("float32") * 3
    a[..., ::7] = 1e4  # a few huge logits per row: the rest underflow to exactly 0
    a[..., 3::11] = -1e4
    a[1] = rng.choice([-1e4, 1e4], size=(8, 50))  # rows of ties at the extremes
    x = leaf(a)
    dy = paddle.to_tensor(rng.randn(*a.shape).astype("float32"))
    for scale, mask in ((1.0, None), (0.125, causal(8, 50))):
        y, ref = fused_attn.softmax(x, scale, mask), softmax_reference(x, scale, mask)
        assert np.isfinite(y.numpy()).all()
        assert_close(y, ref, TOL, f"softmax ±1e4 scale {scale}")
        g = grads(y, [x], dy)[0]
        assert np.isfinite(g.numpy()).all()
        assert_close(g, grads(ref, [x], dy)[0], TOL, f"softmax ±1e4 dx scale {scale}")


def test_softmax_mask_with_leading_ones(op):
    x = leaf(np.random.RandomState(4).randn(2, 3, 10, 12))
    mask = causal(10, 12).reshape([1, 1, 10, 12])
    assert fused_attn._softmax_op(x, mask)[0] is not None
    assert_close(fused_attn.softmax(x, 0.3, mask), softmax_reference(x, 0.3, mask), TOL, "[1, 1, Nq, L] mask")


def test_softmax_fallbacks(op):
    rng = np.random.RandomState(5)
    x64 = leaf(rng.randn(2, 3, 6, 6), "float64")
    mask = causal(6)
    assert fused_attn._softmax_op(x64, mask.astype("float64"))[0] is None
    np.testing.assert_array_equal(
        fused_attn.softmax(x64, 0.5, mask.astype("float64")).numpy(),
        softmax_reference(x64, 0.5, mask.astype("float64")).numpy(),
    )
    x = leaf(rng.randn(2, 3, 6, 6))
    per_batch = paddle.to_tensor(rng.randn(2, 1, 6, 6).astype("float32"))  # not an [Nq, L] table
    assert fused_attn._softmax_op(x, per_batch)[0] is None
    assert_close(fused_attn.softmax(x, 0.5, per_batch), softmax_reference(x, 0.5, per_batch), 0, "per-batch mask")
    learned = paddle.to_tensor(rng.randn(6, 6).astype("float32"), stop_gradient=False)
    assert fused_attn._softmax_op(x, learned)[0] is None  # the kernel gives the mask no gradient
    gm = grads(fused_attn.softmax(x, 1.0, learned), [learned], paddle.randn([2, 3, 6, 6]))[0]
    assert gm.shape == [6, 6]


def test_same_bits_for_any_thread_count(op):
    rng = np.random.RandomState(6)
    x = leaf(rng.randn(4, 12, 77, 77))
    dy = paddle.randn(x.shape)
    q = leaf(rng.randn(4, 50, 12, 64))
    cos, sin = rope_tables(q.shape, False, rng)
    outs = {}
    for threads in (1, 2):
        fused_norm.set_num_threads(threads)
        y, r = fused_attn.softmax(x, 0.125, causal(77)), fused_attn.rope(q, cos, sin)
        outs[threads] = [y.numpy(), grads(y, [x], dy)[0].numpy(), r.numpy(), grads(r, [q], q)[0].numpy()]
    fused_norm.set_num_threads(0)
    for a, b in zip(outs[1], outs[2]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda op: op.evaclip_rope(paddle.ones([2, 3, 4, 8]), paddle.ones([4, 8]), paddle.ones([4, 8])),
         "must be \\[N, D\\] or \\[B, N, D\\]"),
        (lambda op: op.evaclip_rope(paddle.ones([2, 3, 4, 5]), paddle.ones([3, 5]), paddle.ones([3, 5])),
         "head dim must be even"),
        (lambda op: op.evaclip_rope(paddle.ones([2, 3, 4, 8], "float64"), paddle.ones([3, 8]), paddle.ones([3, 8])),
         "must be float32"),
        (lambda op: op.evaclip_softmax(paddle.ones([2, 3, 4]), paddle.ones([4, 3]), 1.0), "mask must be \\[Nq, L\\]"),
        (lambda op: op.evaclip_softmax(paddle.ones([2, 3], "float64"), None, 1.0), "must be float32"),
    ],
    ids=["rope-table", "rope-odd-dim", "rope-dtype", "softmax-mask", "softmax-dtype"],
)
def test_clear_errors(op, call, message):
    with pytest.raises(Exception, match=message):
        call(op)


# ---- attention ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, is_causal", [((2, 197, 12, 64), False), ((3, 77, 8, 64), True),
                                              ((2, 5, 3, 16), True)], ids=str)
def test_attention_matches_sdpa(op, shape, is_causal):
    rng = np.random.RandomState(shape[1])
    q, k, v = (leaf(rng.randn(*shape)) for _ in range(3))
    mask = causal(shape[1]) if is_causal else None
    dy = paddle.to_tensor(rng.randn(*shape).astype("float32"))
    y = fused_attn.attention(q, k, v, mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert_close(y, ref, 2 * TOL, "attention")
    for name, g, r in zip("qkv", grads(y, [q, k, v], dy), grads(ref, [q, k, v], dy)):
        assert_close(g, r, 2 * TOL, f"attention d{name}")


def test_attention_fallback_is_sdpa(op):
    rng = np.random.RandomState(7)
    q, k, v = (leaf(rng.randn(2, 6, 2, 8), "float64") for _ in range(3))
    np.testing.assert_array_equal(fused_attn.attention(q, k, v).numpy(),
                                  F.scaled_dot_product_attention(q, k, v).numpy())


def test_static_graph_takes_the_native_path(op):
    """to_static (export) runs the wrappers' native math; it matches the kernels' dygraph result.

    In a fresh process: Paddle 3.3.1's run_program segfaults (pir DenseTensorType::classof) on
    this program after some earlier tests' to_static/export programs in the same process."""
    import subprocess
    import sys
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            "import test_fused_attn as t; t._check_static_graph(); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.split()[-1:] == ["ok"], out.stderr[-3000:]


def _check_static_graph():
    class Block(paddle.nn.Layer):
        def forward(self, x, cos, sin, mask):
            y = fused_attn.rope(x, cos, sin)
            return fused_attn.attention(y, y, x, mask) + fused_attn.softmax(y, 0.5)

    rng = np.random.RandomState(8)
    x = paddle.to_tensor(rng.randn(2, 5, 3, 8).astype("float32"))
    cos, sin = rope_tables(x.shape, False, rng)
    block = Block()
    want = block(x, cos, sin, causal(5))
    got = paddle.jit.to_static(block, full_graph=True)(x, cos, sin, causal(5))
    assert_close(got, want, TOL, "static graph")


# ---- inference attention (evaclip_attention_fwd) -------------------------------------------------

@pytest.fixture(scope="module")
def attn_op(op):
    """The forward-only attention kernel; it exists only where Paddle ships MKL (its sgemm)."""
    libs = os.path.join(os.path.dirname(paddle.__file__), "libs")
    if not os.path.isfile(os.path.join(libs, "libmklml_intel.so")):
        pytest.skip("this paddle ships no libmklml_intel.so: the op is compiled out")
    assert fused_attn.inference_available(), "the fused_ln library was built without evaclip_attention_fwd"
    return op.evaclip_attention_fwd


def attention_reference64(q, k, v, mask):
    """softmax(q k^T / sqrt(D) + mask) v in float64 numpy, on [B, N, H, D] arrays."""
    q, k, v = (t.numpy().astype(np.float64).transpose(0, 2, 1, 3) for t in (q, k, v))
    s = q @ k.transpose(0, 1, 3, 2) * q.shape[-1] ** -0.5
    if mask is not None:
        s = s + mask.numpy().astype(np.float64)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return paddle.to_tensor((p @ v).transpose(0, 2, 1, 3))


INFERENCE_CASES = [  # (B, Nq, Nk, H, D, mask kind)
    (2, 197, 197, 12, 64, None),       # EVA02-B-16 vision
    (3, 77, 77, 8, 64, "causal"),      # text, causal mask
    (2, 9, 23, 3, 64, "random"),       # Nq != Nk
    (1, 5, 31, 5, 64, "causal"),       # Nq != Nk, causal; B * H = 5 heads for 2 threads
    (3, 13, 13, 5, 32, None),          # D = 32; B * H = 15, odd
    (1, 1, 1, 1, 8, None),
]


@pytest.mark.parametrize("b, nq, nk, h, d, mask_kind", INFERENCE_CASES, ids=str)
def test_inference_attention_matches_sdpa(attn_op, b, nq, nk, h, d, mask_kind):
    rng = np.random.RandomState(nq * 7 + nk)
    q = leaf(rng.randn(b, nq, h, d))
    k, v = (leaf(rng.randn(b, nk, h, d)) for _ in range(2))
    mask = make_mask(mask_kind, nq, nk, rng)
    with paddle.no_grad():
        assert fused_attn._inference_op(q, k, v, mask)[0] is not None  # the kernel, not the fallback
        y = fused_attn.attention(q, k, v, mask)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert y.shape == [b, nq, h, d]
    assert_close(y, ref, 2 * TOL, "inference attention vs sdpa")
    assert_close(y, attention_reference64(q, k, v, mask), 2 * TOL, "inference attention vs float64")


def test_inference_attention_value_dim(attn_op):
    """v may have another head dim than q and k: o is [B, Nq, H, Dv]."""
    rng = np.random.RandomState(11)
    q, k = paddle.randn([2, 6, 3, 16]), paddle.randn([2, 10, 3, 16])
    v = paddle.to_tensor(rng.randn(2, 10, 3, 24).astype("float32"))
    o = attn_op(q, k, v, None, 0.25)
    assert o.shape == [2, 6, 3, 24]
    assert_close(o, attention_reference64(q, k, v, None), 2 * TOL, "Dv != D")  # (scale 16^-0.5)


def test_inference_attention_large_logits(attn_op):
    """Logits of +-1e3 after the scale: finite, and the same as the float64 softmax."""
    rng = np.random.RandomState(12)
    q = paddle.to_tensor((np.sign(rng.randn(2, 20, 4, 16)) * 250).astype("float32"))
    k = paddle.to_tensor(np.sign(rng.randn(2, 20, 4, 16)).astype("float32"))
    v = paddle.to_tensor(rng.randn(2, 20, 4, 16).astype("float32"))
    for mask in (None, causal(20)):
        with paddle.no_grad():
            y = fused_attn.attention(q, k, v, mask)
        assert np.isfinite(y.numpy()).all()
        assert_close(y, attention_reference64(q, k, v, mask), 2 * TOL, "±1e3 logits")


def test_inference_attention_same_bits_for_any_thread_count(attn_op):
    q, k, v = (paddle.randn([3, 40, 5, 32]) for _ in range(3))
    outs = []
    for threads in (1, 2, 3):
        fused_norm.set_num_threads(threads)
        outs.append(attn_op(q, k, v, causal(40), 0.2).numpy())
    fused_norm.set_num_threads(0)
    for o in outs[1:]:
        np.testing.assert_array_equal(outs[0], o)


def test_attention_with_grad_keeps_the_differentiable_path(attn_op):
    """With gradients due the kernel (which has none) is skipped and the grads match sdpa's."""
    rng = np.random.RandomState(13)
    q, k, v = (leaf(rng.randn(2, 77, 8, 64)) for _ in range(3))
    mask = causal(77)
    assert fused_attn._inference_op(q, k, v, mask)[0] is None
    dy = paddle.to_tensor(rng.randn(2, 77, 8, 64).astype("float32"))
    y = fused_attn.attention(q, k, v, mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert not y.stop_gradient
    assert_close(y, ref, 2 * TOL, "attention with grad")
    for name, g, r in zip("qkv", grads(y, [q, k, v], dy), grads(ref, [q, k, v], dy)):
        assert_close(g, r, 2 * TOL, f"attention d{name}")
    # Constant inputs need no gradient even with grad enabled: the kernel takes them.
    consts = [t.detach() for t in (q, k, v)]
    assert fused_attn._inference_op(*consts, mask)[0] is not None
    learned = paddle.to_tensor(rng.randn(77, 77).astype("float32"), stop_gradient=False)
    assert fused_attn._inference_op(*consts, learned)[0] is None  # a mask that wants a gradient


def test_inference_attention_fallbacks(attn_op):
    rng = np.random.RandomState(14)
    with paddle.no_grad():
        q = paddle.to_tensor(rng.randn(2, 6, 4, 8).astype("float32"))
        kv = paddle.to_tensor(rng.randn(2, 6, 2, 8).astype("float32"))  # grouped heads
        assert fused_attn._inference_op(q, kv, kv, None)[0] is None
        per_batch = paddle.to_tensor(rng.randn(2, 1, 6, 6).astype("float32"))
        assert fused_attn._inference_op(q, q, q, per_batch)[0] is None
        np.testing.assert_array_equal(fused_attn.attention(q, q, q, per_batch).numpy(),
                                      F.scaled_dot_product_attention(q, q, q, attn_mask=per_batch).numpy())
        old = fused_attn.USE_INFERENCE_OP
        fused_attn.USE_INFERENCE_OP = False
        try:
            assert fused_attn._inference_op(q, q, q, None)[0] is None
        finally:
            fused_attn.USE_INFERENCE_OP = old


@pytest.mark.parametrize(
    "args, message",
    [
        (([2, 3, 4, 8], [2, 5, 4, 16], [2, 5, 4, 8], None), "k must be \\[B, Nk, H, D\\]"),
        (([2, 3, 4, 8], [2, 5, 4, 8], [2, 6, 4, 8], None), "v must be \\[B, Nk, H, Dv\\]"),
        (([2, 3, 4, 8], [2, 5, 4, 8], [2, 5, 4, 8], [5, 3]), "mask must be \\[Nq, Nk\\]"),
        (([2, 3, 8], [2, 3, 8], [2, 3, 8], None), "must be \\[B, N, H, D\\]"),
    ],
    ids=["k-shape", "v-shape", "mask-shape", "rank"],
)
def test_inference_attention_clear_errors(attn_op, args, message):
    *qkv, mask = args
    with pytest.raises(Exception, match=message):
        attn_op(*(paddle.ones(s) for s in qkv), None if mask is None else paddle.zeros(mask), 1.0)
