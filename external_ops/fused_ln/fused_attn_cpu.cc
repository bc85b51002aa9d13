// Attention helpers as Paddle custom ops (CPU, float32), built into the same library as the norms:
//
//  * evaclip_rope(x, cos, sin): EVA02's rotary embedding on interleaved pairs of the head dim,
//      y[2m]   = x[2m]   * cos[2m]   - x[2m+1] * sin[2m]
//      y[2m+1] = x[2m+1] * cos[2m+1] + x[2m]   * sin[2m+1]
//    x [B, N, H, D]; cos/sin [N, D] (shared) or [B, N, D] (per sample, after patch dropout).
//    Natively this is a mul, a tiny matmul, a mul and an add per tensor (~15 ms on
//    [32, 197, 12, 64]); here it is one pass. The tables get no gradient (constant buffers).
//  * evaclip_softmax(x, mask?, scale): softmax(x * scale + mask) over the last dim, the optional
//    additive mask [Nq, L] broadcast over the leading dims of x [..., Nq, L]. Paddle 3.3.1's CPU
//    softmax uses a scalar exp (30 ms on [32, 12, 197, 197], PyTorch 7.4 ms); this one uses the
//    vectorised exp_approx and folds the scale and the mask add into its first pass.
//
// Both parallelise over rows in chunks of ~kBlock elements, like the SwiGLU kernels.
#include <vector>

#include "cpu_common.h"
#include "paddle/extension.h"

namespace {

// ---- RoPE -------------------------------------------------------------------------------------

// One head vector of d = 2 * half floats. The forward rotates each pair by the table's angle, the
// backward by the transposed rotation (for a true rotation sin[2m] == sin[2m+1], but nothing here
// relies on it).
template <bool kBackward>
FA_INLINE void rope_vec(const float* __restrict x, const float* __restrict c,
                        const float* __restrict s, float* __restrict y, int64_t half) {
#pragma omp simd
  for (int64_t m = 0; m < half; ++m) {
    const float x0 = x[2 * m], x1 = x[2 * m + 1];
    if (kBackward) {
      y[2 * m] = x0 * c[2 * m] + x1 * s[2 * m + 1];
      y[2 * m + 1] = x1 * c[2 * m + 1] - x0 * s[2 * m];
    } else {
      y[2 * m] = x0 * c[2 * m] - x1 * s[2 * m];
      y[2 * m + 1] = x1 * c[2 * m + 1] + x0 * s[2 * m + 1];
    }
  }
}

// Rows [r0, r0 + n) of x viewed as [rows, heads, d]; row r uses table row r % table_rows, which
// covers both the shared [N, D] and the per-sample [B, N, D] tables.
struct RopeShape {
  int64_t heads, d, table_rows;
};

template <bool kBackward>
FA_INLINE void rope_rows(const float* x, const float* c, const float* s, float* y, int64_t r0,
                         int64_t n, RopeShape sh) {
  const int64_t row = sh.heads * sh.d;
  for (int64_t r = r0; r < r0 + n; ++r) {
    const int64_t t = (r % sh.table_rows) * sh.d;
    for (int64_t h = 0; h < sh.heads; ++h) {
      const int64_t o = r * row + h * sh.d;
      rope_vec<kBackward>(x + o, c + t, s + t, y + o, sh.d / 2);
    }
  }
}

// target_clones wants plain functions, hence one per direction.
FA_CLONES void rope_fwd_rows(const float* x, const float* c, const float* s, float* y, int64_t r0,
                             int64_t n, RopeShape sh) {
  rope_rows<false>(x, c, s, y, r0, n, sh);
}

FA_CLONES void rope_bwd_rows(const float* dy, const float* c, const float* s, float* dx,
                             int64_t r0, int64_t n, RopeShape sh) {
  rope_rows<true>(dy, c, s, dx, r0, n, sh);
}

RopeShape rope_shape(const paddle::Tensor& x, const paddle::Tensor& cos, const paddle::Tensor& sin) {
  const char* op = "evaclip_rope";
  check_f32_cpu(op, x, "x");
  check_f32_cpu(op, cos, "cos");
  check_f32_cpu(op, sin, "sin");
  const auto xs = x.shape();
  PD_CHECK(xs.size() == 4, op, ": x must be [B, N, H, D]");
  PD_CHECK(xs[3] % 2 == 0, op, ": the head dim must be even, got ", xs[3]);
  PD_CHECK(cos.shape() == sin.shape(), op, ": cos and sin differ in shape");
  const auto ts = cos.shape();
  const bool shared = ts == std::vector<int64_t>{xs[1], xs[3]};
  const bool per_sample = ts == std::vector<int64_t>{xs[0], xs[1], xs[3]};
  PD_CHECK(shared || per_sample, op, ": cos/sin must be [N, D] or [B, N, D] for x [B, N, H, D]");
  return {xs[2], xs[3], shared ? xs[1] : xs[0] * xs[1]};
}

// ---- softmax ----------------------------------------------------------------------------------

// Rows [r0, r0 + n) of x viewed as [rows, len]; row r adds mask row r % mask_rows (mask may be
// null).
FA_CLONES void softmax_rows(const float* __restrict x, const float* __restrict mask,
                            int64_t mask_rows, float scale, float* __restrict y, int64_t r0,
                            int64_t n, int64_t len) {
  for (int64_t r = r0; r < r0 + n; ++r)
    softmax_row(x + r * len, mask ? mask + (r % mask_rows) * len : nullptr, scale, y + r * len, len);
}

// dx = scale * y * (dy - sum(dy * y)) per row.
FA_CLONES void softmax_grad_rows(const float* __restrict y, const float* __restrict dy, float scale,
                                 float* __restrict dx, int64_t r0, int64_t n, int64_t len) {
  for (int64_t r = r0; r < r0 + n; ++r) {
    const float* yr = y + r * len;
    const float* gr = dy + r * len;
    float* dr = dx + r * len;
    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
    for (int64_t i = 0; i < len; ++i) dot += gr[i] * yr[i];
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) dr[i] = scale * yr[i] * (gr[i] - dot);
  }
}

}  // namespace

std::vector<paddle::Tensor> RopeForward(const paddle::Tensor& x, const paddle::Tensor& cos,
                                        const paddle::Tensor& sin) {
  const RopeShape sh = rope_shape(x, cos, sin);
  auto y = paddle::empty(x.shape(), x.dtype(), x.place());
  const float *px = x.data<float>(), *pc = cos.data<float>(), *ps = sin.data<float>();
  float* py = y.data<float>();
  const int64_t rows = x.shape()[0] * x.shape()[1];
  parallel_chunks(rows, rows_per_chunk(sh.heads * sh.d), [&](int64_t r0, int64_t n) {
    rope_fwd_rows(px, pc, ps, py, r0, n, sh);
  });
  return {y};
}

std::vector<paddle::Tensor> RopeBackward(const paddle::Tensor& cos, const paddle::Tensor& sin,
                                         const paddle::Tensor& dy) {
  const RopeShape sh = rope_shape(dy, cos, sin);
  auto dx = paddle::empty(dy.shape(), dy.dtype(), dy.place());
  const float *pg = dy.data<float>(), *pc = cos.data<float>(), *ps = sin.data<float>();
  float* pdx = dx.data<float>();
  const int64_t rows = dy.shape()[0] * dy.shape()[1];
  parallel_chunks(rows, rows_per_chunk(sh.heads * sh.d), [&](int64_t r0, int64_t n) {
    rope_bwd_rows(pg, pc, ps, pdx, r0, n, sh);
  });
  return {dx};
}

std::vector<paddle::Tensor> SoftmaxForward(const paddle::Tensor& x,
                                           const paddle::optional<paddle::Tensor>& mask,
                                           float scale) {
  const char* op = "evaclip_softmax";
  check_f32_cpu(op, x, "x");
  const auto xs = x.shape();
  PD_CHECK(!xs.empty(), op, ": x must have at least one dim");
  const int64_t len = xs.back();
  const float* pm = nullptr;
  int64_t mask_rows = 1;
  if (mask) {
    check_f32_cpu(op, *mask, "mask");
    const bool fits = xs.size() >= 2 && mask->shape() == std::vector<int64_t>{xs[xs.size() - 2], len};
    PD_CHECK(fits, op, ": mask must be [Nq, L] for x [..., Nq, L]");
    pm = mask->data<float>();
    mask_rows = xs[xs.size() - 2];
  }
  auto y = paddle::empty(xs, x.dtype(), x.place());
  if (x.numel() == 0) return {y};
  const float* px = x.data<float>();
  float* py = y.data<float>();
  parallel_chunks(x.numel() / len, rows_per_chunk(len), [&](int64_t r0, int64_t n) {
    softmax_rows(px, pm, mask_rows, scale, py, r0, n, len);
  });
  return {y};
}

std::vector<paddle::Tensor> SoftmaxBackward(const paddle::Tensor& y, const paddle::Tensor& dy,
                                            float scale) {
  check_f32_cpu("evaclip_softmax_grad", dy, "output gradient");
  PD_CHECK(dy.shape() == y.shape(), "evaclip_softmax_grad: gradient and output differ in shape");
  auto dx = paddle::empty(y.shape(), y.dtype(), y.place());
  if (y.numel() == 0) return {dx};
  const int64_t len = y.shape().back();
  const float *py = y.data<float>(), *pg = dy.data<float>();
  float* pdx = dx.data<float>();
  parallel_chunks(y.numel() / len, rows_per_chunk(len), [&](int64_t r0, int64_t n) {
    softmax_grad_rows(py, pg, scale, pdx, r0, n, len);
  });
  return {dx};
}

// Shape/dtype functions let static graphs (to_static, export) use the ops.
std::vector<std::vector<int64_t>> RopeInferShape(const std::vector<int64_t>& x,
                                                 const std::vector<int64_t>& cos,
                                                 const std::vector<int64_t>& sin) {
  return {x};
}

std::vector<paddle::DataType> RopeInferDtype(const paddle::DataType& x, const paddle::DataType& cos,
                                             const paddle::DataType& sin) {
  return {x};
}

std::vector<std::vector<int64_t>> SoftmaxInferShape(
    const std::vector<int64_t>& x, const paddle::optional<std::vector<int64_t>>& mask) {
  return {x};
}

std::vector<paddle::DataType> SoftmaxInferDtype(const paddle::DataType& x,
                                                const paddle::optional<paddle::DataType>& mask) {
  return {x};
}

PD_BUILD_OP(evaclip_rope)
    .Inputs({"X", "Cos", "Sin"})
    .Outputs({"Y"})
    .SetKernelFn(PD_KERNEL(RopeForward))
    .SetInferShapeFn(PD_INFER_SHAPE(RopeInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(RopeInferDtype));

// No Grad("Cos") / Grad("Sin"): the tables are constants.
PD_BUILD_GRAD_OP(evaclip_rope)
    .Inputs({"Cos", "Sin", paddle::Grad("Y")})
    .Outputs({paddle::Grad("X")})
    .SetKernelFn(PD_KERNEL(RopeBackward));

PD_BUILD_OP(evaclip_softmax)
    .Inputs({"X", paddle::Optional("Mask")})
    .Outputs({"Y"})
    .Attrs({"scale: float"})
    .SetKernelFn(PD_KERNEL(SoftmaxForward))
    .SetInferShapeFn(PD_INFER_SHAPE(SoftmaxInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(SoftmaxInferDtype));

// The gradient needs the output, not x; the mask gets none.
PD_BUILD_GRAD_OP(evaclip_softmax)
    .Inputs({"Y", paddle::Grad("Y")})
    .Outputs({paddle::Grad("X")})
    .Attrs({"scale: float"})
    .SetKernelFn(PD_KERNEL(SoftmaxBackward));
