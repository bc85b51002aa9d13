// evaclip_attention_fwd(q, k, v, mask?, scale): softmax(q k^T * scale + mask) v for inference
// (CPU, float32, forward only: no grad op).
//
// q [B, Nq, H, D], k [B, Nk, H, D], v [B, Nk, H, Dv] stay in the model's layout: each (b, h)
// head is a strided matrix (leading dim H * D) that MKL's sgemm reads in place, so nothing is
// transposed. The op writes o [B, Nq, H, Dv] the same way. Per head: S = scale * Q K^T into a
// thread-local [Nq, Nk] buffer (small enough to stay in L2), the row softmax with the optional
// additive mask [Nq, Nk] in place, then O = P V. Heads are spread over the kernels' threads, and
// every sgemm runs single-threaded inside its thread.
//
// The MKL sgemm comes from Paddle's own libmklml_intel.so; the build defines FUSED_LN_WITH_MKL
// only when that library is there, and without it the op is left out (the Python wrapper then
// keeps the matmul + softmax path).
#ifdef FUSED_LN_WITH_MKL

#include <vector>

#include "cpu_common.h"
#include "mkl_min.h"
#include "paddle/extension.h"

namespace {

// The shapes of one call; strides are in floats.
struct AttnShape {
  int64_t b, nq, nk, h, d, dv;
};

// In-place softmax of rows [0, n) of s [n, len] plus the optional mask [n, len] (s is already
// scaled by the sgemm).
FA_CLONES void softmax_inplace(float* s, const float* __restrict mask, int64_t n, int64_t len) {
  for (int64_t r = 0; r < n; ++r)
    softmax_row(s + r * len, mask ? mask + r * len : nullptr, 1.f, s + r * len, len);
}

// One (b, h) head: S = scale * Q K^T, softmax, O = P V. `scratch` holds nq * nk floats.
void attend_head(const float* q, const float* k, const float* v, const float* mask, float scale,
                 float* o, int64_t pair, const AttnShape& sh, float* scratch) {
  const int64_t b = pair / sh.h, h = pair % sh.h;
  const float* qh = q + (b * sh.nq * sh.h + h) * sh.d;
  const float* kh = k + (b * sh.nk * sh.h + h) * sh.d;
  const float* vh = v + (b * sh.nk * sh.h + h) * sh.dv;
  float* oh = o + (b * sh.nq * sh.h + h) * sh.dv;
  const int nq = static_cast<int>(sh.nq), nk = static_cast<int>(sh.nk);
  const int ldqk = static_cast<int>(sh.h * sh.d), ldvo = static_cast<int>(sh.h * sh.dv);
  cblas_sgemm(kRowMajor, kNoTrans, kTrans, nq, nk, static_cast<int>(sh.d), scale, qh, ldqk, kh,
              ldqk, 0.f, scratch, nk);
  softmax_inplace(scratch, mask, sh.nq, sh.nk);
  cblas_sgemm(kRowMajor, kNoTrans, kNoTrans, nq, static_cast<int>(sh.dv), nk, 1.f, scratch, nk,
              vh, ldvo, 0.f, oh, ldvo);
}

// All B * H heads, statically spread over the kernels' threads. MKL would otherwise start its
// own team inside every call (oversubscribing the cores), so each thread asks it for one thread
// while it works and restores its previous setting after. (Heads in sequence with MKL's own two
// threads per sgemm measured 1.5-2x slower: the small sgemms do not split well, and the softmax
// would run on one core.)
void attend_all(const float* q, const float* k, const float* v, const float* mask, float scale,
                float* o, const AttnShape& sh) {
  const int64_t pairs = sh.b * sh.h;
  const int nt = static_cast<int>(std::min<int64_t>(fused_ln_threads(), pairs));
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const int prev = MKL_Set_Num_Threads_Local(1);
    std::vector<float> scratch(static_cast<size_t>(sh.nq * sh.nk));
#pragma omp for schedule(static)
    for (int64_t p = 0; p < pairs; ++p) attend_head(q, k, v, mask, scale, o, p, sh, scratch.data());
    MKL_Set_Num_Threads_Local(prev);
  }
}

AttnShape attn_shape(const paddle::Tensor& q, const paddle::Tensor& k, const paddle::Tensor& v,
                     const paddle::optional<paddle::Tensor>& mask) {
  const char* op = "evaclip_attention_fwd";
  check_f32_cpu(op, q, "q");
  check_f32_cpu(op, k, "k");
  check_f32_cpu(op, v, "v");
  const auto qs = q.shape(), ks = k.shape(), vs = v.shape();
  PD_CHECK(qs.size() == 4 && ks.size() == 4 && vs.size() == 4, op, ": q, k, v must be [B, N, H, D]");
  PD_CHECK(ks[0] == qs[0] && ks[2] == qs[2] && ks[3] == qs[3], op,
           ": k must be [B, Nk, H, D] for q [B, Nq, H, D]");
  PD_CHECK(vs[0] == ks[0] && vs[1] == ks[1] && vs[2] == ks[2], op, ": v must be [B, Nk, H, Dv]");
  PD_CHECK(ks[1] > 0, op, ": k and v need at least one position");
  if (mask) {
    check_f32_cpu(op, *mask, "mask");
    PD_CHECK(mask->shape() == std::vector<int64_t>({qs[1], ks[1]}), op, ": mask must be [Nq, Nk]");
  }
  return {qs[0], qs[1], ks[1], qs[2], qs[3], vs[3]};
}

}  // namespace

std::vector<paddle::Tensor> AttentionForward(const paddle::Tensor& q, const paddle::Tensor& k,
                                             const paddle::Tensor& v,
                                             const paddle::optional<paddle::Tensor>& mask,
                                             float scale) {
  const AttnShape sh = attn_shape(q, k, v, mask);
  auto o = paddle::empty({sh.b, sh.nq, sh.h, sh.dv}, q.dtype(), q.place());
  if (o.numel() == 0) return {o};
  attend_all(q.data<float>(), k.data<float>(), v.data<float>(),
             mask ? mask->data<float>() : nullptr, scale, o.data<float>(), sh);
  return {o};
}

std::vector<std::vector<int64_t>> AttentionInferShape(
    const std::vector<int64_t>& q, const std::vector<int64_t>& k, const std::vector<int64_t>& v,
    const paddle::optional<std::vector<int64_t>>& mask) {
  return {{q[0], q[1], q[2], v[3]}};
}

std::vector<paddle::DataType> AttentionInferDtype(const paddle::DataType& q,
                                                  const paddle::DataType& k,
                                                  const paddle::DataType& v,
                                                  const paddle::optional<paddle::DataType>& mask) {
  return {q};
}

// Inference only: no PD_BUILD_GRAD_OP (the Python wrapper uses it only when no gradient is due).
PD_BUILD_OP(evaclip_attention_fwd)
    .Inputs({"Q", "K", "V", paddle::Optional("Mask")})
    .Outputs({"O"})
    .Attrs({"scale: float"})
    .SetKernelFn(PD_KERNEL(AttentionForward))
    .SetInferShapeFn(PD_INFER_SHAPE(AttentionInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(AttentionInferDtype));

#endif  // FUSED_LN_WITH_MKL
