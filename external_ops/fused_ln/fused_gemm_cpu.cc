// evaclip_linear_fwd(x, w, bias?, act): act(x @ w + bias) for inference (CPU, float32, forward
// only: no grad op).
//
// Why: in Paddle Inference a linear layer becomes oneDNN's fc (inner product), which reached about
// 240 GFLOP/s on this project's 2-core test machine against about 320 for MKL's sgemm, the GEMM
// the dygraph matmul runs; the linears are ~85% of an encoder's FLOPs. This op is one MKL sgemm on
// x viewed as [M, K] (w is Paddle's [K, N] layout, read in place) and one pass over the output that
// adds the bias and applies the optional exact GELU (act = 1), so the fc's separate bias and
// activation passes go too. The export writes it only into the CPU-kernel variant of a program.
#ifdef FUSED_LN_WITH_MKL

#include <vector>

#include "cpu_common.h"
#include "mkl_min.h"
#include "paddle/extension.h"

std::vector<paddle::Tensor> LinearForward(const paddle::Tensor& x, const paddle::Tensor& w,
                                          const paddle::optional<paddle::Tensor>& bias, int act) {
  const char* op = "evaclip_linear_fwd";
  check_f32_cpu(op, x, "x");
  check_f32_cpu(op, w, "weight");
  PD_CHECK(act == 0 || act == 1, op, ": act must be 0 (none) or 1 (gelu), got ", act);
  auto xs = x.shape();
  const auto ws = w.shape();
  PD_CHECK(!xs.empty() && ws.size() == 2 && xs.back() == ws[0], op,
           ": x [..., K] needs a weight [K, N]; got K = ", xs.empty() ? -1 : xs.back(),
           " and a weight of rank ", ws.size(), " with ", ws.empty() ? -1 : ws[0], " rows");
  const int64_t k = ws[0], n = ws[1];
  int64_t m = 1;  // rows: the product of x's leading dims (x.numel() / k fails for k = 0)
  for (size_t i = 0; i + 1 < xs.size(); ++i) m *= xs[i];
  if (bias) {
    check_f32_cpu(op, *bias, "bias");
    PD_CHECK(bias->numel() == n, op, ": bias has ", bias->numel(), " elements, the weight ", n,
             " columns");
  }
  xs.back() = n;
  auto y = paddle::empty(xs, x.dtype(), x.place());
  if (m == 0 || n == 0) return {y};
  float* py = y.data<float>();
  if (k == 0) {
    std::fill(py, py + m * n, 0.f);
  } else {
    cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, static_cast<int>(m), static_cast<int>(n),
                static_cast<int>(k), 1.f, x.data<float>(), static_cast<int>(k), w.data<float>(),
                static_cast<int>(n), 0.f, py, static_cast<int>(n));
  }
  const float* pb = bias ? bias->data<float>() : nullptr;
  if (pb == nullptr && act == 0) return {y};
  parallel_chunks(m, rows_per_chunk(n), [&](int64_t r0, int64_t len) {
    bias_act_rows(py, pb, r0, len, n, act == 1);
  });
  return {y};
}

std::vector<std::vector<int64_t>> LinearInferShape(const std::vector<int64_t>& x,
                                                   const std::vector<int64_t>& w,
                                                   const paddle::optional<std::vector<int64_t>>& b) {
  std::vector<int64_t> out = x;
  if (!out.empty() && w.size() == 2) out.back() = w[1];
  return {out};
}

std::vector<paddle::DataType> LinearInferDtype(const paddle::DataType& x, const paddle::DataType& w,
                                               const paddle::optional<paddle::DataType>& b) {
  return {x};
}

// Inference only: no PD_BUILD_GRAD_OP (only exported CPU programs use it).
PD_BUILD_OP(evaclip_linear_fwd)
    .Inputs({"X", "W", paddle::Optional("Bias")})
    .Outputs({"Y"})
    .Attrs({"act: int"})
    .SetKernelFn(PD_KERNEL(LinearForward))
    .SetInferShapeFn(PD_INFER_SHAPE(LinearInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(LinearInferDtype));

#endif  // FUSED_LN_WITH_MKL
