// The SwiGLU gate silu(a) * b and the exact (erf) GELU as Paddle custom ops (CPU, float32), built
// into the same library as the norms.
//
// Why: Paddle 3.3.1's CPU exp is scalar (an exp over 3.7M floats takes ~9 ms here, PyTorch ~0.5 ms),
// and silu * b is the slowest non-GEMM op of an EVA02 training step (fwd+bwd on [8,197,2048]:
// 28 ms, PyTorch 6 ms). This kernel uses a polynomial exp that the compiler vectorises (one clone
// per ISA level, as in fused_ln_cpu.cc) and fuses the product: 12 ms.
//
// exp_approx (cpu_common.h) saturates below -87.3 (0) and above 88 (e^88): the kernel only needs
// exp(-a) inside a sigmoid, where both limits give the right sigmoid.
#include <vector>

#include "cpu_common.h"
#include "paddle/extension.h"

namespace {

FA_INLINE float sigmoid(float a) { return 1.f / (1.f + exp_approx(-a)); }

FA_CLONES void swiglu_fwd(const float* __restrict a, const float* __restrict b, float* __restrict y,
                          int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = a[i] * sigmoid(a[i]) * b[i];
}

FA_CLONES void swiglu_bwd(const float* __restrict a, const float* __restrict b,
                          const float* __restrict dy, float* __restrict da, float* __restrict db,
                          int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float s = sigmoid(a[i]);
    const float silu = a[i] * s;
    // d silu / da = s * (1 + a * (1 - s))
    da[i] = dy[i] * b[i] * (s + silu * (1.f - s));
    db[i] = dy[i] * silu;
  }
}

FA_CLONES void gelu_fwd(const float* __restrict x, float* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * normal_cdf(x[i]);
}

// d/dx x Phi(x) = Phi(x) + x phi(x), phi the normal density.
FA_CLONES void gelu_bwd(const float* __restrict x, const float* __restrict dy, float* __restrict dx,
                        int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float pdf = 0.39894228040143268f * exp_approx(-0.5f * x[i] * x[i]);
    dx[i] = dy[i] * (normal_cdf(x[i]) + x[i] * pdf);
  }
}

}  // namespace

std::vector<paddle::Tensor> GeluForward(const paddle::Tensor& x) {
  check_f32_cpu("evaclip_gelu", x, "input");
  auto y = paddle::empty(x.shape(), x.dtype(), x.place());
  const float* px = x.data<float>();
  float* py = y.data<float>();
  parallel_chunks(x.numel(), kBlock, [&](int64_t i0, int64_t len) { gelu_fwd(px + i0, py + i0, len); });
  return {y};
}

std::vector<paddle::Tensor> GeluBackward(const paddle::Tensor& x, const paddle::Tensor& dy) {
  check_f32_cpu("evaclip_gelu_grad", dy, "output gradient");
  auto dx = paddle::empty(x.shape(), x.dtype(), x.place());
  const float* px = x.data<float>();
  const float* pg = dy.data<float>();
  float* pdx = dx.data<float>();
  parallel_chunks(x.numel(), kBlock,
                  [&](int64_t i0, int64_t len) { gelu_bwd(px + i0, pg + i0, pdx + i0, len); });
  return {dx};
}

std::vector<std::vector<int64_t>> SameShape1(const std::vector<int64_t>& x) { return {x}; }
std::vector<paddle::DataType> SameDtype1(const paddle::DataType& x) { return {x}; }

PD_BUILD_OP(evaclip_gelu)
    .Inputs({"X"})
    .Outputs({"Y"})
    .SetKernelFn(PD_KERNEL(GeluForward))
    .SetInferShapeFn(PD_INFER_SHAPE(SameShape1))
    .SetInferDtypeFn(PD_INFER_DTYPE(SameDtype1));

PD_BUILD_GRAD_OP(evaclip_gelu)
    .Inputs({"X", paddle::Grad("Y")})
    .Outputs({paddle::Grad("X")})
    .SetKernelFn(PD_KERNEL(GeluBackward));

std::vector<paddle::Tensor> SwigluForward(const paddle::Tensor& a, const paddle::Tensor& b) {
  check_f32_cpu("evaclip_swiglu", a, "gate input");
  check_f32_cpu("evaclip_swiglu", b, "value input");
  PD_CHECK(a.shape() == b.shape(), "evaclip_swiglu: inputs differ in shape");
  auto y = paddle::empty(a.shape(), a.dtype(), a.place());
  const float* pa = a.data<float>();
  const float* pb = b.data<float>();
  float* py = y.data<float>();
  parallel_chunks(a.numel(), kBlock,
                  [&](int64_t i0, int64_t len) { swiglu_fwd(pa + i0, pb + i0, py + i0, len); });
  return {y};
}

std::vector<paddle::Tensor> SwigluBackward(const paddle::Tensor& a, const paddle::Tensor& b,
                                           const paddle::Tensor& dy) {
  check_f32_cpu("evaclip_swiglu_grad", dy, "output gradient");
  auto da = paddle::empty(a.shape(), a.dtype(), a.place());
  auto db = paddle::empty(b.shape(), b.dtype(), b.place());
  const float* pa = a.data<float>();
  const float* pb = b.data<float>();
  const float* pg = dy.data<float>();
  float* pda = da.data<float>();
  float* pdb = db.data<float>();
  parallel_chunks(a.numel(), kBlock, [&](int64_t i0, int64_t len) {
    swiglu_bwd(pa + i0, pb + i0, pg + i0, pda + i0, pdb + i0, len);
  });
  return {da, db};
}

std::vector<std::vector<int64_t>> SameShape2(const std::vector<int64_t>& a, const std::vector<int64_t>& b) {
  return {a};
}
std::vector<paddle::DataType> SameDtype2(const paddle::DataType& a, const paddle::DataType& b) { return {a}; }

PD_BUILD_OP(evaclip_swiglu)
    .Inputs({"A", "B"})
    .Outputs({"Y"})
    .SetKernelFn(PD_KERNEL(SwigluForward))
    .SetInferShapeFn(PD_INFER_SHAPE(SameShape2))
    .SetInferDtypeFn(PD_INFER_DTYPE(SameDtype2));

PD_BUILD_GRAD_OP(evaclip_swiglu)
    .Inputs({"A", "B", paddle::Grad("Y")})
    .Outputs({paddle::Grad("A"), paddle::Grad("B")})
    .SetKernelFn(PD_KERNEL(SwigluBackward));

// ---- Adam moments and direction, in place (the optimizer's hot loop) ---------------------------
// m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;  g <- step_scale * m / (sqrt(v) / sqrt(bc2) + eps)
// One pass over g, m, v instead of the ~10 in-place Paddle ops of train/optim.py's Python path
// (each a full pass over memory: EVA02-B-16's AdamW step took ~0.9 s on 2 cores).

namespace {

FA_CLONES void adam_direction(float* __restrict g, float* __restrict m, float* __restrict v, int64_t n,
                              float b1, float b2, float eps, float inv_sqrt_bc2, float step_scale) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i];
    const float mi = b1 * m[i] + (1.f - b1) * gi;
    const float vi = b2 * v[i] + (1.f - b2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    g[i] = step_scale * (mi / (std::sqrt(vi) * inv_sqrt_bc2 + eps));
  }
}

}  // namespace

void AdamDirection(paddle::Tensor& g, paddle::Tensor& m, paddle::Tensor& v, float beta1, float beta2,
                   float eps, float inv_sqrt_bc2, float step_scale) {
  const char* op = "evaclip_adam_direction";
  check_f32_cpu(op, g, "gradient");
  check_f32_cpu(op, m, "exp_avg");
  check_f32_cpu(op, v, "exp_avg_sq");
  PD_CHECK(g.numel() == m.numel() && g.numel() == v.numel(), op, ": gradient and state sizes differ");
  float* pg = g.data<float>();
  float* pm = m.data<float>();
  float* pv = v.data<float>();
  parallel_chunks(g.numel(), kBlock, [&](int64_t i0, int64_t len) {
    adam_direction(pg + i0, pm + i0, pv + i0, len, beta1, beta2, eps, inv_sqrt_bc2, step_scale);
  });
}

PD_BUILD_OP(evaclip_adam_direction)
    .Inputs({"G", "M", "V"})
    .Outputs({"GOut", "MOut", "VOut"})
    .SetInplaceMap({{"G", "GOut"}, {"M", "MOut"}, {"V", "VOut"}})
    .Attrs({"beta1: float", "beta2: float", "eps: float", "inv_sqrt_bc2: float", "step_scale: float"})
    .SetKernelFn(PD_KERNEL(AdamDirection));

// ---- y += b over rows, in place (the bias of a linear layer after its GEMM) ----------------------
// Paddle's addmm pays a separate broadcast copy of the bias before its GEMM (+5 ms on a
// [6304, 768] x [768, 2048] product here) and its broadcast add is slower still; one in-place pass
// over y after the GEMM costs about half of either.

void BiasAdd(paddle::Tensor& y, const paddle::Tensor& b) {
  const char* op = "evaclip_bias_add";
  check_f32_cpu(op, y, "input");
  check_f32_cpu(op, b, "bias");
  const int64_t n = b.numel();
  PD_CHECK(n > 0 && !y.shape().empty() && y.shape().back() == n, op, ": bias size ", n,
           " differs from the last dim of the input");
  const int64_t rows = y.numel() / n;
  float* py = y.data<float>();
  const float* pb = b.data<float>();
  parallel_chunks(rows, rows_per_chunk(n), [&](int64_t r0, int64_t len) {
    bias_act_rows(py, pb, r0, len, n, false);
  });
}

PD_BUILD_OP(evaclip_bias_add)
    .Inputs({"Y", "B"})
    .Outputs({"YOut"})
    .SetInplaceMap({{"Y", "YOut"}})
    .SetKernelFn(PD_KERNEL(BiasAdd));
