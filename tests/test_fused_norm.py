"""The fused_ln custom op (external_ops/) against native Paddle, and its library wrappers.

The op is built once per module (JIT into a temporary directory) unless an installed `fused_ln`
package is present, so a fresh clone tests its own sources.
"""

import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from evaclip_paddle.ops import fused_norm

pytestmark = pytest.mark.filterwarnings("ignore:No ccache found")  # Paddle's build chatter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTHS = [1, 3, 64, 77, 768, 1001, 1280, 1408, 1792, 4096, 5120]
TOL = 1e-5


@pytest.fixture(scope="module")
def op(tmp_path_factory):
    build = tmp_path_factory.mktemp("fused_ln_build")
    return fused_norm.load_op(build_directory=str(build), jit=True, strict=True)


def assert_close(actual, ref, tol, what):
    """max |actual - ref| <= tol * max(1, max |ref|): absolute for O(1) values, relative for
    large sums such as dweight over many rows."""
    a = actual.astype("float32").numpy() if isinstance(actual, paddle.Tensor) else actual
    r = ref.astype("float32").numpy() if isinstance(ref, paddle.Tensor) else ref
    assert a.shape == r.shape, f"{what}: shape {a.shape} != {r.shape}"
    err = float(np.abs(a.astype(np.float64) - r).max()) if a.size else 0.0
    scale = max(1.0, float(np.abs(r).max()) if r.size else 0.0)
    assert err <= tol * scale, f"{what}: max abs err {err:.3g} > {tol:g} * {scale:.3g}"


def make_inputs(shape, seed, dtype="float32"):
    rng = np.random.RandomState(seed)
    d = shape[-1]
    x = (rng.randn(*shape) * 2 + 0.5).astype("float32")
    t = lambda a, sg=False: paddle.to_tensor(a, stop_gradient=sg)  # noqa: E731
    return (
        t(x).astype(dtype).detach(),
        t(rng.rand(d).astype("float32") + 0.5),
        t(rng.randn(d).astype("float32")),
        t(rng.randn(*shape).astype("float32"), True).astype(dtype),
    )


def rms_reference(x, w, eps):
    """T5-style RMSNorm in float32: y = w * x * rsqrt(mean(x^2) + eps)."""
    return w * (x * paddle.rsqrt((x * x).mean(axis=-1, keepdim=True) + eps))


def grads(y, inputs, dy):
    return paddle.grad([y], inputs, [dy])


@pytest.mark.parametrize("width", WIDTHS)
def test_layer_norm_matches_native(op, width):
    x, w, b, dy = make_inputs((2, 5, width), seed=width)
    x.stop_gradient = False
    y, mean, invvar = op.evaclip_layer_norm(x, w, b, 1e-5)
    ref = F.layer_norm(x, [width], w, b, 1e-5)
    assert_close(y, ref, TOL, "y")
    assert_close(mean, x.mean(axis=-1).reshape([-1]), TOL, "mean")
    assert_close(invvar, paddle.rsqrt(x.var(axis=-1, unbiased=False) + 1e-5).reshape([-1]), 1e-4, "invvar")
    for name, g, r in zip(("dx", "dweight", "dbias"), grads(y, [x, w, b], dy), grads(ref, [x, w, b], dy)):
        assert_close(g, r, TOL, name)


@pytest.mark.parametrize("width", WIDTHS)
def test_rms_norm_matches_reference(op, width):
    x, w, _, dy = make_inputs((2, 5, width), seed=100 + width)
    x.stop_gradient = False
    y, invvar = op.evaclip_rms_norm(x, w, 1e-6)
    ref = rms_reference(x, w, 1e-6)
    assert_close(y, ref, TOL, "y")
    assert invvar.shape == [10]
    for name, g, r in zip(("dx", "dweight"), grads(y, [x, w], dy), grads(ref, [x, w], dy)):
        assert_close(g, r, TOL, name)


@pytest.mark.parametrize("shape", [(1, 768), (768,), (1, 1, 77)], ids=str)
def test_single_row(op, shape):
    x, w, b, dy = make_inputs(shape, seed=7)
    x.stop_gradient = False
    y = op.evaclip_layer_norm(x, w, b, 1e-5)[0]
    ref = F.layer_norm(x.reshape([1, -1]), [shape[-1]], w, b, 1e-5).reshape(list(shape))  # F wants 2-D+
    assert y.shape == list(shape)
    assert_close(y, ref, TOL, "y")
    for name, g, r in zip(("dx", "dweight", "dbias"), grads(y, [x, w, b], dy), grads(ref, [x, w, b], dy)):
        assert_close(g, r, TOL, name)


def test_zero_variance_rows(op):
    x = paddle.full([4, 256], 3.25)
    x.stop_gradient = False
    w, b = paddle.rand([256]) + 0.5, paddle.randn([256])
    w.stop_gradient = b.stop_gradient = False
    y = op.evaclip_layer_norm(x, w, b, 1e-5)[0]
    np.testing.assert_array_equal(y.numpy(), np.broadcast_to(b.numpy(), [4, 256]))  # xhat == 0
    dy = paddle.randn([4, 256])
    ref = F.layer_norm(x, [256], w, b, 1e-5)
    for name, g, r in zip(("dx", "dweight", "dbias"), grads(y, [x, w, b], dy), grads(ref, [x, w, b], dy)):
        assert np.isfinite(g.numpy()).all(), name
        assert_close(g, r, 1e-4, name)  # dx scales with rsqrt(eps) ~ 316 here
    yr = op.evaclip_rms_norm(paddle.zeros([2, 64]), paddle.ones([64]), 1e-6)[0]
    np.testing.assert_array_equal(yr.numpy(), 0.0)


@pytest.mark.parametrize("weight_dtype", ["float32", "bfloat16"])
def test_bfloat16(op, weight_dtype):
    """bf16 in/out with float32 math: the reference is computed in float32 from the same
    bf16-rounded inputs (Paddle has no CPU bf16 layer_norm kernel)."""
    x, w, b, dy = make_inputs((3, 7, 1408), seed=11, dtype="bfloat16")
    w, b = w.astype(weight_dtype).detach(), b.astype(weight_dtype).detach()
    for t in (x, w, b):
        t.stop_gradient = False
    y = op.evaclip_layer_norm(x, w, b, 1e-5)[0]
    yr = op.evaclip_rms_norm(x, w, 1e-6)[0]
    assert y.dtype == paddle.bfloat16 and yr.dtype == paddle.bfloat16
    gx, gw, gb = grads(y, [x, w, b], dy)
    rx, rw = grads(yr, [x, w], dy)
    assert gw.dtype == w.dtype and gb.dtype == b.dtype

    f32 = lambda t: t.astype("float32").detach()  # noqa: E731
    x32, w32, b32, dy32 = f32(x), f32(w), f32(b), f32(dy)
    for t in (x32, w32, b32):
        t.stop_gradient = False
    ref = F.layer_norm(x32, [1408], w32, b32, 1e-5)
    ref_r = rms_reference(x32, w32, 1e-6)
    bf16_tol = 2.0**-8  # one bf16 rounding of the output
    wtol = TOL * 10 if weight_dtype == "float32" else bf16_tol  # float32 grads: float32 accuracy
    assert_close(y, ref, bf16_tol, "y")
    assert_close(yr, ref_r, bf16_tol, "rms y")
    for name, g, r, tol in zip(("dx", "dweight", "dbias"), (gx, gw, gb), grads(ref, [x32, w32, b32], dy32),
                               (bf16_tol, wtol, wtol)):
        assert_close(g, r, tol, name)
    for name, g, r, tol in zip(("rms dx", "rms dweight"), (rx, rw), grads(ref_r, [x32, w32], dy32),
                               (bf16_tol, wtol)):
        assert_close(g, r, tol, name)


def test_strided_input_is_handled(op):
    old = paddle.get_flags(["FLAGS_use_stride_kernel"])  # configure_cpu turns stride kernels off
    paddle.set_flags({"FLAGS_use_stride_kernel": True})
    try:
        _check_strided_input(op)
    finally:
        paddle.set_flags(old)


def _check_strided_input(op):
    base = paddle.randn([96, 4])
    x = base.transpose([1, 0])  # a strided view
    assert not x.is_contiguous()
    w, b = paddle.rand([96]) + 0.5, paddle.randn([96])
    ref = F.layer_norm(x.contiguous(), [96], w, b, 1e-5)
    assert_close(op.evaclip_layer_norm(x, w, b, 1e-5)[0], ref, TOL, "raw op")
    assert_close(fused_norm.fused_layer_norm(x, w, b, 1e-5), ref, TOL, "wrapper")


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda op: op.evaclip_layer_norm(paddle.ones([2, 4], "int32"), paddle.ones([4]), paddle.zeros([4]), 1e-5),
         "unsupported input dtype"),
        (lambda op: op.evaclip_rms_norm(paddle.ones([2, 4], "float64"), paddle.ones([4], "float64"), 1e-5),
         "unsupported input dtype"),
        (lambda op: op.evaclip_layer_norm(paddle.ones([2, 4]), paddle.ones([5]), paddle.zeros([5]), 1e-5),
         "normalized shape mismatch"),
        (lambda op: op.evaclip_layer_norm(paddle.ones([2, 4]), paddle.ones([4]), paddle.zeros([3]), 1e-5),
         "normalized shape mismatch"),
        (lambda op: op.evaclip_rms_norm(paddle.ones([2, 4]), paddle.ones([2, 3]), 1e-5),
         "normalized shape mismatch"),
        (lambda op: op.evaclip_layer_norm(paddle.ones([2, 4]), paddle.ones([4], "float64"), paddle.zeros([4], "float64"), 1e-5),
         "weight dtype"),
        (lambda op: op.evaclip_layer_norm(paddle.ones([2, 4]), paddle.ones([4]), paddle.zeros([4], "bfloat16"), 1e-5),
         "bias dtype"),
    ],
    ids=["int32", "float64", "weight-numel", "bias-numel", "rms-weight-numel", "weight-dtype", "bias-dtype"],
)
def test_clear_errors(op, call, message):
    with pytest.raises(Exception, match=message):
        call(op)


def test_wrappers_use_the_op(op):
    x, w, b, _ = make_inputs((4, 33), seed=3)
    assert fused_norm.fused_ops_available()
    assert os.path.isfile(fused_norm.op_library_path())
    assert_close(fused_norm.fused_layer_norm(x, w, b, 1e-5), F.layer_norm(x, [33], w, b, 1e-5), TOL, "ln")
    assert_close(fused_norm.fused_layer_norm(x), F.layer_norm(x, [33]), TOL, "ln without affine")
    assert_close(fused_norm.fused_rms_norm(x, w, 1e-6), rms_reference(x, w, 1e-6), TOL, "rms")
    fused_norm.set_num_threads(1)
    assert fused_norm.get_num_threads() == 1
    fused_norm.set_num_threads(0)


def test_same_bits_for_any_thread_count(op):
    x, w, b, dy = make_inputs((512, 768), seed=9)
    x.stop_gradient = False
    outs = {}
    for threads in (1, 2):
        fused_norm.set_num_threads(threads)
        y = op.evaclip_layer_norm(x, w, b, 1e-5)[0]
        outs[threads] = [t.numpy() for t in [y, *grads(y, [x, w, b], dy)]]
    fused_norm.set_num_threads(0)
    for a, r in zip(outs[1], outs[2]):
        np.testing.assert_array_equal(a, r)


def test_fallback_without_op_warns_once(monkeypatch):
    state = dict(fused_norm._state, module=None, so=None, implicit_tried=True, warned=False, error="test: no op")
    monkeypatch.setattr(fused_norm, "_state", state)
    x, w, b, _ = make_inputs((4, 33), seed=5)
    with pytest.warns(RuntimeWarning, match="falling back") as record:
        y = fused_norm.fused_layer_norm(x, w, b, 1e-5)
        yr = fused_norm.fused_rms_norm(x, w, 1e-6)
        yb = fused_norm.fused_layer_norm(x.astype("bfloat16"), w, b, 1e-5)  # no CPU bf16 kernel: float32 math
    assert len([r for r in record if "fused_ln" in str(r.message)]) == 1
    assert not fused_norm.fused_ops_available() and fused_norm.op_library_path() is None
    assert_close(y, F.layer_norm(x, [33], w, b, 1e-5), 0, "ln")
    assert_close(yr, rms_reference(x, w, 1e-6), TOL, "rms")
    assert yb.dtype == paddle.bfloat16


class TinyBlock(paddle.nn.Layer):
    def __init__(self, d):
        super().__init__()
        self.fc = paddle.nn.Linear(d, d)
        self.ln = fused_norm.FusedLayerNorm(d)
        self.rms = fused_norm.FusedRMSNorm(d)
        self.ln.bias.set_value(paddle.randn([d]) * 0.1)

    def forward(self, x):
        return self.rms(self.ln(self.fc(x)) + x)


def test_recompute_matches_plain(op):
    from paddle.distributed.fleet.utils import recompute

    paddle.seed(0)
    block = TinyBlock(64)
    x = paddle.randn([3, 5, 64])
    dy = paddle.randn([3, 5, 64])

    def run(use_recompute):
        block.clear_gradients()
        xi = x.detach()
        xi.stop_gradient = False
        y = recompute(block, xi) if use_recompute else block(xi)
        (y * dy).sum().backward()  # recompute feeds parameter grads through .grad, not paddle.grad
        return [y.numpy(), xi.grad.numpy()] + [p.grad.numpy() for p in block.parameters()]

    got, want = run(True), run(False)
    assert len(got) == 2 + 5  # fc weight/bias, ln weight/bias, rms weight
    for i, (a, r) in enumerate(zip(got, want)):
        assert_close(a, r, TOL, f"output/grad {i}")


_PREDICT = textwrap.dedent(
    """
    import sys, numpy as np, paddle
    from paddle import inference
    from paddle.utils.cpp_extension import load_op_meta_info_and_register_op
    so, model, out = sys.argv[1:4]
    load_op_meta_info_and_register_op(so)  # a fresh process knows nothing of the custom op
    cfg = inference.Config(model + ".json", model + ".pdiparams")
    cfg.disable_gpu()
    pred = inference.create_predictor(cfg)
    results = {}
    for batch in (2, 5):
        x = np.load(out + f"_in{batch}.npy")
        h = pred.get_input_handle(pred.get_input_names()[0])
        h.reshape(x.shape)
        h.copy_from_cpu(x)
        pred.run()
        results[f"b{batch}"] = pred.get_output_handle(pred.get_output_names()[0]).copy_to_cpu()
    np.savez(out + "_out.npz", **results)
    """
)


def test_export_runs_in_paddle_inference(op, tmp_path):
    paddle.seed(1)
    block = TinyBlock(48)
    block.eval()
    expected = {}  # dygraph outputs, before to_static converts the layer
    for batch in (2, 5):
        x = np.random.RandomState(batch).randn(batch, 6, 48).astype("float32")
        np.save(str(tmp_path / f"io_in{batch}.npy"), x)
        expected[f"b{batch}"] = block(paddle.to_tensor(x)).numpy()
    spec = [paddle.static.InputSpec([None, 6, 48], "float32", name="x")]
    static = paddle.jit.to_static(block, input_spec=spec, full_graph=True)
    model = str(tmp_path / "tiny")
    paddle.jit.save(static, model)
    script = tmp_path / "predict.py"
    script.write_text(_PREDICT)
    proc = subprocess.run(
        [sys.executable, str(script), fused_norm.op_library_path(), model, str(tmp_path / "io")],
        capture_output=True, text=True, timeout=120, cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(str(tmp_path / "io_out.npz"))
    for key, ref in expected.items():
        assert_close(got[key], ref, TOL, f"inference {key}")


def _nvcc():
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")):
            return os.path.join(root, "bin", "nvcc")
    return shutil.which("nvcc")


def test_cuda_kernels_compile(tmp_path):
    """The .cu includes no Paddle header, so nvcc alone can check it (no CUDA Paddle needed)."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("no nvcc / CUDA toolkit found")
    src = os.path.join(REPO, "external_ops", "fused_ln", "fused_ln_cuda.cu")
    proc = subprocess.run(
        [nvcc, "-c", src, "-o", str(tmp_path / "k.o"), "-std=c++17", "-O3", "-Xcompiler", "-fPIC",
         "-gencode=arch=compute_80,code=sm_80"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_cuda_op_matches_native(op):
    if not paddle.is_compiled_with_cuda():
        pytest.skip("paddle is not compiled with CUDA")
    if _nvcc() is None:
        pytest.skip("no nvcc / CUDA toolkit found")
    if paddle.device.cuda.device_count() == 0:
        pytest.skip("no CUDA device visible")
    assert fused_norm._has_cuda(), "op was built without its CUDA kernels"
    for width in (3, 768, 1001, 5120):
        for dtype, tol in (("float32", TOL), ("float16", 2.0**-9), ("bfloat16", 2.0**-7)):
            x, w, b, dy = (t.cuda().detach() for t in make_inputs((4, 9, width), seed=width))
            x, dy = x.astype(dtype).detach(), dy.astype(dtype)
            for t in (x, w, b):
                t.stop_gradient = False
            y = op.evaclip_layer_norm(x, w, b, 1e-5)[0]
            xr = x.astype("float32").detach()
            xr.stop_gradient = False
            ref = F.layer_norm(xr, [width], w, b, 1e-5)
            assert y.dtype == x.dtype
            assert_close(y, ref, tol, f"cuda {dtype} {width} y")
            got = grads(y, [x, w, b], dy)
            want = grads(ref, [xr, w, b], dy.astype("float32"))
            for name, g, r in zip(("dx", "dweight", "dbias"), got, want):
                assert_close(g, r, tol if name == "dx" else 1e-4, f"cuda {dtype} {width} {name}")
            yr = op.evaclip_rms_norm(x, w, 1e-6)[0]
            assert_close(yr, rms_reference(xr, w, 1e-6), tol, f"cuda {dtype} {width} rms")


# ---- SwiGLU gate (fused_act_cpu.cc) ------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1,), (7, 3), (2, 197, 2048), (3, 16385)])   # odd sizes, several blocks
def test_swiglu_gate_matches_native(op, shape):
    from evaclip_paddle.ops import fused_act
    rng = np.random.RandomState(len(shape))
    a = paddle.to_tensor((rng.randn(*shape) * 6).astype("float32"), stop_gradient=False)
    b = paddle.to_tensor(rng.randn(*shape).astype("float32"), stop_gradient=False)
    g = paddle.to_tensor(rng.randn(*shape).astype("float32"))
    assert fused_act._op("evaclip_swiglu", a, b) is not None      # the kernel, not the fallback
    y = fused_act.swiglu(a, b)
    ref = F.silu(a) * b
    da, db = paddle.grad(y, [a, b], g)
    rda, rdb = paddle.grad(ref, [a, b], g)
    assert_close(y, ref, 2e-6, "swiglu")          # (relative to max(1, |ref|))
    assert_close(da, rda, 2e-6, "swiglu d gate")
    assert_close(db, rdb, 2e-6, "swiglu d value")


def test_swiglu_gate_extremes_and_fallbacks(op):
    from evaclip_paddle.ops import fused_act
    assert fused_act.available()
    x = paddle.to_tensor(np.array([-1e4, -100., -88.5, -20., 0., 1e-8, 20., 88.5, 1e4, np.nan], np.float32))
    y = fused_act.swiglu(x, paddle.ones_like(x)).numpy()
    ref = (F.silu(x)).numpy()
    assert np.isnan(y[-1])
    np.testing.assert_allclose(y[:-1], ref[:-1], rtol=1e-6, atol=1e-30)
    # non-contiguous inputs are copied, other dtypes take the native path
    base = paddle.randn([64, 32])
    t = base.transpose([1, 0])
    np.testing.assert_allclose(fused_act.swiglu(t, t).numpy(), (F.silu(t) * t).numpy(), rtol=2e-6, atol=1e-6)
    h = paddle.randn([4, 8]).astype("float64")
    np.testing.assert_allclose(fused_act.swiglu(h, h).numpy(), (F.silu(h) * h).numpy(), rtol=1e-12)


# ---- exact GELU (fused_act_cpu.cc) -------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1,), (7, 3), (4, 77, 2048), (3, 16385)])
def test_gelu_matches_native(op, shape):
    from evaclip_paddle.ops import fused_act
    rng = np.random.RandomState(len(shape) + 10)
    x = paddle.to_tensor((rng.randn(*shape) * 4).astype("float32"), stop_gradient=False)
    g = paddle.to_tensor(rng.randn(*shape).astype("float32"))
    assert fused_act._op("evaclip_gelu", x) is not None            # the kernel, not the fallback
    y, ref = fused_act.gelu(x), F.gelu(x)
    (dx,), (rdx,) = paddle.grad(y, [x], g), paddle.grad(ref, [x], g)
    assert_close(y, ref, 1e-6, "gelu")            # (relative to max(1, |ref|))
    assert_close(dx, rdx, 1e-6, "gelu dx")


def test_gelu_extremes_and_fallbacks(op):
    from evaclip_paddle.ops import fused_act
    x = paddle.to_tensor(np.array([-1e4, -40., -9., -3., -0.5, 0., 1e-8, 0.5, 3., 9., 40., 1e4, np.nan],
                                  np.float32), stop_gradient=False)
    y, ref = fused_act.gelu(x), F.gelu(x)
    (dx,), (rdx,) = paddle.grad(y, [x], paddle.ones_like(x)), paddle.grad(ref, [x], paddle.ones_like(x))
    assert np.isnan(y.numpy()[-1])
    np.testing.assert_allclose(y.numpy()[:-1], ref.numpy()[:-1], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dx.numpy()[:-1], rdx.numpy()[:-1], rtol=1e-6, atol=1e-7)
    h = paddle.randn([4, 8]).astype("float64")                     # other dtypes: the native op
    np.testing.assert_allclose(fused_act.gelu(h).numpy(), F.gelu(h).numpy(), rtol=1e-12)
