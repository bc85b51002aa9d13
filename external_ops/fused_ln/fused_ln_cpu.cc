// fused_ln: LayerNorm and RMSNorm over the last dimension as Paddle custom ops.
//
// This file holds the op registration, the input checks shared by both devices, and the CPU
// kernels. GPU tensors are forwarded to fused_ln_cuda.cu, which is only compiled (and
// FUSED_LN_WITH_CUDA only defined) when Paddle has CUDA and nvcc exists.
//
// CPU design:
//  * rows are processed in fixed chunks taken dynamically by OpenMP threads; the backward keeps
//    a dweight/dbias partial sum per chunk (deterministic for any thread count, see below);
//  * each row is processed in a few passes over data that stays in L1/L2 (two-pass variance,
//    no catastrophic cancellation), all in float32;
//  * inner loops are `omp simd` reductions, and the row kernels are compiled once per ISA level
//    (AVX-512 / AVX2+FMA / baseline) with target_clones: the extension must run on any x86-64
//    machine, so -march=native is not an option.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "fused_ln.h"
#include "paddle/extension.h"

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && \
    __GNUC__ >= 12
// The loader resolves each clone set once (ifunc) for the CPU it runs on.
#define FLN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FLN_CLONES
#endif

// Helpers must be inlined into the target_clones callers, or they run as the baseline build.
#define FLN_INLINE inline __attribute__((always_inline))

#define FLN_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

using DT = paddle::DataType;
using bf16_bits = uint16_t;  // bfloat16 handled as raw bits: portable and vectorisable

// Set by fused_ln_set_num_threads; 0 = default_threads().
std::atomic<int> g_num_threads{0};

// OMP_NUM_THREADS as the process sees it at the first call. libgomp may have read the variable
// before `import paddle` pinned it to 1, so read it here: the op then follows the same setting as
// Paddle's own CPU math (1 per process unless the user asked for more).
int default_threads() {
  static const int n = [] {
    const char* env = std::getenv("OMP_NUM_THREADS");
    int v = env ? std::atoi(env) : 0;
#ifdef _OPENMP
    if (v <= 0) v = omp_get_max_threads();
#endif
    return std::max(v, 1);
  }();
  return n;
}

int max_threads() {
  const int n = g_num_threads.load(std::memory_order_relaxed);
  return n > 0 ? n : default_threads();
}

FLN_INLINE float to_f32(float v) { return v; }
FLN_INLINE float to_f32(bf16_bits v) {
  const uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
FLN_INLINE void store(float& dst, float v) { dst = v; }
FLN_INLINE void store(bf16_bits& dst, float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
  // Rounding would carry a NaN with a small payload into Inf: keep it a quiet NaN instead.
  dst = static_cast<bf16_bits>(((u & 0x7FFFFFFFu) > 0x7F800000u) ? ((u >> 16) | 0x40u) : rounded);
}

// ---------------------------------------------------------------------------------------------
// Row kernels. kRms: RMSNorm (no mean, no bias); otherwise LayerNorm.
//
// Reductions keep kLanes independent partial sums (a fixed-size array the compiler maps onto
// vector registers): a single vector accumulator would serialise on the add latency, and an
// explicit array keeps the summation order independent of the ISA clone.

constexpr int64_t kLanes = 64;

// sum over the row of (x - shift)^p, p = 1 or 2
template <int kPow, typename T>
FLN_INLINE float row_moment(const T* __restrict xr, int64_t n, float shift) {
  float acc[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) {
      const float d = to_f32(xr[c + j]) - shift;
      acc[j] += kPow == 1 ? d : d * d;
    }
  }
  for (int64_t j = 0; c + j < n; ++j) {
    const float d = to_f32(xr[c + j]) - shift;
    acc[j] += kPow == 1 ? d : d * d;
  }
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

template <bool kRms, typename T>
FLN_CLONES void fwd_rows(const T* __restrict x, const float* __restrict w, const float* __restrict b,
                         T* __restrict y, float* __restrict mean, float* __restrict invvar,
                         int64_t r0, int64_t r1, int64_t n, float eps) {
  const float fn = static_cast<float>(n);
  for (int64_t r = r0; r < r1; ++r) {
    const T* __restrict xr = x + r * n;
    T* __restrict yr = y + r * n;
    // Two passes (mean, then squared deviations): the second reads L1, and unlike
    // E[x^2] - E[x]^2 it cannot cancel catastrophically on rows with a large mean.
    const float mu = kRms ? 0.f : row_moment<1>(xr, n, 0.f) / fn;
    const float rs = 1.f / std::sqrt(row_moment<2>(xr, n, mu) / fn + eps);
    if constexpr (!kRms) mean[r] = mu;
    invvar[r] = rs;
    if constexpr (kRms) {
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) store(yr[c], to_f32(xr[c]) * rs * to_f32(w[c]));
    } else {
#pragma omp simd
      for (int64_t c = 0; c < n; ++c)
        store(yr[c], (to_f32(xr[c]) - mu) * rs * to_f32(w[c]) + to_f32(b[c]));
    }
  }
}

// One row of the backward's first pass: accumulates sum(dy*w*xhat) and sum(dy*w) into lane
// arrays, and dy*xhat, dy into the chunk's dweight/dbias sums.
template <bool kRms, typename T>
FLN_INLINE void bwd_row_sums(const T* __restrict xr, const T* __restrict gr,
                             const float* __restrict w, float mu, float rs, int64_t c0, int64_t len,
                             float* __restrict a_gx, float* __restrict a_g,
                             float* __restrict dw_sum, float* __restrict db_sum) {
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    const int64_t c = c0 + j;
    const float xh = (to_f32(xr[c]) - mu) * rs;
    const float g = to_f32(gr[c]);
    const float gw = g * to_f32(w[c]);
    a_gx[j] += gw * xh;
    dw_sum[c] += g * xh;
    if constexpr (!kRms) {
      a_g[j] += gw;
      db_sum[c] += g;
    }
  }
}

// dx for rows [r0, r1), and those rows' dweight (+ dbias) sums added into dw_sum / db_sum.
template <bool kRms, typename T>
FLN_CLONES void bwd_rows(const T* __restrict x, const float* __restrict w,
                         const float* __restrict mean, const float* __restrict invvar,
                         const T* __restrict dy, T* __restrict dx, float* __restrict dw_sum,
                         float* __restrict db_sum, int64_t r0, int64_t r1, int64_t n) {
  constexpr int64_t kL = kLanes / 2;  // two lane arrays live at once
  const float inv_n = 1.f / static_cast<float>(n);
  for (int64_t r = r0; r < r1; ++r) {
    const T* __restrict xr = x + r * n;
    const T* __restrict gr = dy + r * n;
    T* __restrict dxr = dx + r * n;
    const float mu = kRms ? 0.f : mean[r];
    const float rs = invvar[r];
    float a_gx[kL] = {}, a_g[kL] = {};
    int64_t c = 0;
    for (; c + kL <= n; c += kL)
      bwd_row_sums<kRms>(xr, gr, w, mu, rs, c, kL, a_gx, a_g, dw_sum, db_sum);
    bwd_row_sums<kRms>(xr, gr, w, mu, rs, c, n - c, a_gx, a_g, dw_sum, db_sum);
    float s_gx = 0.f, s_g = 0.f;
#pragma omp simd reduction(+ : s_gx, s_g)
    for (int64_t j = 0; j < kL; ++j) {
      s_gx += a_gx[j];
      s_g += a_g[j];
    }
    // LayerNorm: dx = rs * (dy*w - mean(dy*w) - xhat * mean(dy*w*xhat)); RMSNorm drops the
    // mean(dy*w) term (s_g stays 0).
    const float m_gx = s_gx * inv_n, m_g = s_g * inv_n;
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) {
      const float xh = (to_f32(xr[c]) - mu) * rs;
      store(dxr[c], rs * (to_f32(gr[c]) * to_f32(w[c]) - m_g - xh * m_gx));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Threading and dispatch.
//
// Rows go in chunks whose boundaries depend on the row count only. Threads take chunks
// dynamically (a busy core, common on shared machines, then delays one chunk, not a whole
// static share), and the backward keeps one dweight/dbias partial sum per chunk, added up in
// chunk order: results are bitwise identical for any thread count, and fp32 rounding grows
// with the chunk length, not with the number of rows.

constexpr int64_t kMaxChunks = 256;

int64_t rows_per_chunk(int64_t rows) {
  return std::max<int64_t>(32, (rows + kMaxChunks - 1) / kMaxChunks);
}

// Threads worth using: at least ~16K elements each, else fork/join costs more than it saves.
int plan_threads(int64_t rows, int64_t n) {
  constexpr int64_t kGrain = 1 << 14;
  const int64_t by_work = std::max<int64_t>(1, rows * n / kGrain);
  const int64_t chunks = (rows + rows_per_chunk(rows) - 1) / rows_per_chunk(rows);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({max_threads(), chunks, by_work})));
}

// f(r0, r1, chunk) for every chunk of rows.
template <typename F>
void for_each_chunk(int64_t rows, int nt, const F& f) {
  const int64_t step = rows_per_chunk(rows);
  const int64_t chunks = (rows + step - 1) / step;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
  for (int64_t k = 0; k < chunks; ++k) f(k * step, std::min(rows, (k + 1) * step), k);
}

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<T>) with the element type of the (validated) CPU x.
template <typename F>
void dispatch_cpu(const paddle::Tensor& x, const F& f) {
  if (x.dtype() == DT::FLOAT32)
    f(Tag<float>{});
  else
    f(Tag<bf16_bits>{});
}

template <typename T>
const T* cptr(const paddle::Tensor& t) {
  return static_cast<const T*>(t.data());
}
template <typename T>
T* mptr(paddle::Tensor& t) {
  return static_cast<T*>(t.data());
}

// The CPU kernels take float32 weights: instantiating them per weight dtype too would add a
// third of the build time and code size, while converting a bfloat16 weight costs n loads.
const float* weight_f32(const paddle::Tensor& w, std::vector<float>& buf) {
  if (w.dtype() == DT::FLOAT32) return cptr<float>(w);
  const bf16_bits* p = cptr<bf16_bits>(w);
  buf.resize(static_cast<size_t>(w.numel()));
  for (size_t i = 0; i < buf.size(); ++i) buf[i] = to_f32(p[i]);
  return buf.data();
}

#ifdef FUSED_LN_WITH_CUDA
FusedLnDtype cuda_dtype(DT t) {
  return t == DT::FLOAT16 ? kFusedLnF16 : t == DT::BFLOAT16 ? kFusedLnBF16 : kFusedLnF32;
}
#endif

std::string shape_str(const std::vector<int64_t>& s) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << "]";
  return os.str();
}

int64_t leading_rows(const std::vector<int64_t>& shape) {
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < shape.size(); ++i) {
    if (shape[i] < 0) return -1;  // unknown at graph-build time
    rows *= shape[i];
  }
  return rows;
}

void check_inputs(const char* op, const paddle::Tensor& x, const paddle::Tensor& w,
                  const paddle::Tensor* b) {
  const auto& xs = x.shape();
  PD_CHECK(!xs.empty(), op, ": x must have at least one dimension (the normalized one)");
  const int64_t n = xs.back();
  PD_CHECK(n > 0, op, ": the normalized (last) dimension of x must be > 0, got ", shape_str(xs));
  PD_CHECK(w.numel() == n, op, ": normalized shape mismatch: weight ", shape_str(w.shape()),
           " has ", w.numel(), " elements but x ", shape_str(xs), " has last dim ", n);
  if (b) {
    PD_CHECK(b->numel() == n, op, ": normalized shape mismatch: bias ", shape_str(b->shape()),
             " has ", b->numel(), " elements but x ", shape_str(xs), " has last dim ", n);
    PD_CHECK(b->dtype() == w.dtype(), op, ": bias dtype ", b->dtype(),
             " must equal weight dtype ", w.dtype());
  }
  const DT xt = x.dtype();
  const bool gpu = x.is_gpu();
  PD_CHECK(xt == DT::FLOAT32 || xt == DT::BFLOAT16 || (gpu && xt == DT::FLOAT16), op,
           ": unsupported input dtype ", xt,
           gpu ? "; expected float32, bfloat16 or float16"
               : "; expected float32 or bfloat16 (float16 is GPU-only)");
  PD_CHECK(w.dtype() == DT::FLOAT32 || w.dtype() == xt, op, ": weight dtype ", w.dtype(),
           " must be float32 or the input dtype ", xt);
  PD_CHECK(x.is_gpu() == w.is_gpu() && (!b || b->is_gpu() == x.is_gpu()), op,
           ": x, weight and bias must be on the same device");
  PD_CHECK(x.is_contiguous(), op, ": x must be contiguous (call .contiguous() first), shape ",
           shape_str(xs));
  PD_CHECK(w.is_contiguous() && (!b || b->is_contiguous()), op,
           ": weight and bias must be contiguous");
}

std::vector<paddle::Tensor> norm_fwd(const char* op, const paddle::Tensor& x,
                                     const paddle::Tensor& w, const paddle::Tensor* b, float eps) {
  check_inputs(op, x, w, b);
  PD_CHECK(x.is_cpu() || x.is_gpu(), op, ": unsupported place (CPU or GPU tensors only)");
  const int64_t n = x.shape().back(), rows = leading_rows(x.shape());
  auto y = paddle::empty(x.shape(), x.dtype(), x.place());
  auto invvar = paddle::empty({rows}, DT::FLOAT32, x.place());
  paddle::Tensor mean;
  if (b) mean = paddle::empty({rows}, DT::FLOAT32, x.place());
  if (x.is_gpu()) {
#ifdef FUSED_LN_WITH_CUDA
    const int err = fused_ln_cuda_fwd(
        cuda_dtype(x.dtype()), cuda_dtype(w.dtype()), x.data(), w.data(), b ? b->data() : nullptr,
        y.data(), b ? mptr<float>(mean) : nullptr, mptr<float>(invvar), rows, n, eps, x.stream());
    PD_CHECK(err == 0, op, ": CUDA forward failed: ", fused_ln_cuda_error_string(err));
#else
    PD_THROW(op, ": this fused_ln build has no CUDA kernels (build it where nvcc and a CUDA "
             "build of Paddle exist)");
#endif
    if (b) return {y, mean, invvar};
    return {y, invvar};
  }
  const int nt = plan_threads(rows, n);
  std::vector<float> wbuf, bbuf;
  const float* wp = weight_f32(w, wbuf);
  const float* bp = b ? weight_f32(*b, bbuf) : nullptr;
  float* mp = b ? mptr<float>(mean) : nullptr;
  float* ip = mptr<float>(invvar);
  dispatch_cpu(x, [&](auto xtag) {
    using T = typename decltype(xtag)::type;
    const T* xp = cptr<T>(x);
    T* yp = mptr<T>(y);
    for_each_chunk(rows, nt, [&](int64_t r0, int64_t r1, int64_t) {
      if (b)
        fwd_rows<false, T>(xp, wp, bp, yp, mp, ip, r0, r1, n, eps);
      else
        fwd_rows<true, T>(xp, wp, bp, yp, mp, ip, r0, r1, n, eps);
    });
  });
  if (b) return {y, mean, invvar};
  return {y, invvar};
}

std::vector<paddle::Tensor> norm_bwd(const char* op, const paddle::Tensor& x,
                                     const paddle::Tensor& w, const paddle::Tensor* mean,
                                     const paddle::Tensor& invvar, const paddle::Tensor& dy_in) {
  // Upstream grads can be strided views (e.g. of a transpose); x and weight were checked in fwd.
  const paddle::Tensor dy = dy_in.is_contiguous() ? dy_in : dy_in.contiguous();
  const int64_t n = x.shape().back(), rows = leading_rows(x.shape());
  auto dx = paddle::empty(x.shape(), x.dtype(), x.place());
  auto dw = paddle::empty(w.shape(), w.dtype(), w.place());
  paddle::Tensor db;
  if (mean) db = paddle::empty(w.shape(), w.dtype(), w.place());
  if (x.is_gpu()) {
#ifdef FUSED_LN_WITH_CUDA
    auto work = paddle::empty({fused_ln_cuda_bwd_workspace(rows, n, mean == nullptr)},
                              DT::FLOAT32, x.place());
    const int err = fused_ln_cuda_bwd(
        cuda_dtype(x.dtype()), cuda_dtype(w.dtype()), x.data(), w.data(),
        mean ? cptr<float>(*mean) : nullptr, cptr<float>(invvar), dy.data(), dx.data(),
        dw.data(), mean ? db.data() : nullptr, mptr<float>(work), rows, n, x.stream());
    PD_CHECK(err == 0, op, ": CUDA backward failed: ", fused_ln_cuda_error_string(err));
#else
    PD_THROW(op, ": this fused_ln build has no CUDA kernels");
#endif
    if (mean) return {dx, dw, db};
    return {dx, dw};
  }
  const int nt = plan_threads(rows, n);
  const int64_t chunks = (rows + rows_per_chunk(rows) - 1) / rows_per_chunk(rows);
  // Per chunk: [dweight sums | dbias sums], n floats each; every chunk zeroes its own.
  std::unique_ptr<float[]> part(new float[static_cast<size_t>(chunks) * 2 * n]);
  std::vector<float> wbuf;
  const float* wp = weight_f32(w, wbuf);
  const float* mp = mean ? cptr<float>(*mean) : nullptr;
  const float* ip = cptr<float>(invvar);
  dispatch_cpu(x, [&](auto xtag) {
    using T = typename decltype(xtag)::type;
    const T* xp = cptr<T>(x);
    const T* gp = cptr<T>(dy);
    T* dxp = mptr<T>(dx);
    for_each_chunk(rows, nt, [&](int64_t r0, int64_t r1, int64_t k) {
      float* p = part.get() + static_cast<size_t>(k) * 2 * n;
      std::fill(p, p + 2 * n, 0.f);
      if (mean)
        bwd_rows<false, T>(xp, wp, mp, ip, gp, dxp, p, p + n, r0, r1, n);
      else
        bwd_rows<true, T>(xp, wp, mp, ip, gp, dxp, p, nullptr, r0, r1, n);
    });
  });
  // Add the chunk sums up in chunk order, into the weight dtype; parallel over columns once
  // that is worth a fork.
  const bool w32 = w.dtype() == DT::FLOAT32;
  float* dw32 = w32 ? mptr<float>(dw) : nullptr;
  float* db32 = w32 && mean ? mptr<float>(db) : nullptr;
  bf16_bits* dw16 = w32 ? nullptr : mptr<bf16_bits>(dw);
  bf16_bits* db16 = !w32 && mean ? mptr<bf16_bits>(db) : nullptr;
  const float* pp = part.get();
#pragma omp parallel for num_threads(nt) if (nt > 1 && n * chunks >= (1 << 16))
  for (int64_t c = 0; c < n; ++c) {
    float sw = 0.f, sb = 0.f;
    for (int64_t k = 0; k < chunks; ++k) {
      sw += pp[static_cast<size_t>(k) * 2 * n + c];
      if (mean) sb += pp[static_cast<size_t>(k) * 2 * n + n + c];
    }
    if (w32) {
      dw32[c] = sw;
      if (db32) db32[c] = sb;
    } else {
      store(dw16[c], sw);
      if (db16) store(db16[c], sb);
    }
  }
  if (mean) return {dx, dw, db};
  return {dx, dw};
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Op registration. The op names carry a project prefix: Paddle already has built-in ops called
// fused_layer_norm / fused_rms_norm, and a custom op may not reuse a registered name.

std::vector<paddle::Tensor> LayerNormForward(const paddle::Tensor& x, const paddle::Tensor& weight,
                                             const paddle::Tensor& bias, float epsilon) {
  return norm_fwd("evaclip_layer_norm", x, weight, &bias, epsilon);
}

std::vector<paddle::Tensor> LayerNormBackward(const paddle::Tensor& x, const paddle::Tensor& weight,
                                              const paddle::Tensor& mean,
                                              const paddle::Tensor& invvar,
                                              const paddle::Tensor& dy) {
  return norm_bwd("evaclip_layer_norm", x, weight, &mean, invvar, dy);
}

std::vector<paddle::Tensor> RmsNormForward(const paddle::Tensor& x, const paddle::Tensor& weight,
                                           float epsilon) {
  return norm_fwd("evaclip_rms_norm", x, weight, nullptr, epsilon);
}

std::vector<paddle::Tensor> RmsNormBackward(const paddle::Tensor& x, const paddle::Tensor& weight,
                                            const paddle::Tensor& invvar,
                                            const paddle::Tensor& dy) {
  return norm_bwd("evaclip_rms_norm", x, weight, nullptr, invvar, dy);
}

// Shape/dtype functions let static graphs (to_static, export) use the ops; -1 dims pass through.
std::vector<std::vector<int64_t>> LayerNormInferShape(const std::vector<int64_t>& x,
                                                      const std::vector<int64_t>& weight,
                                                      const std::vector<int64_t>& bias) {
  const int64_t rows = leading_rows(x);
  return {x, {rows}, {rows}};
}

std::vector<paddle::DataType> LayerNormInferDtype(const paddle::DataType& x,
                                                  const paddle::DataType& weight,
                                                  const paddle::DataType& bias) {
  return {x, DT::FLOAT32, DT::FLOAT32};
}

std::vector<std::vector<int64_t>> RmsNormInferShape(const std::vector<int64_t>& x,
                                                    const std::vector<int64_t>& weight) {
  return {x, {leading_rows(x)}};
}

std::vector<paddle::DataType> RmsNormInferDtype(const paddle::DataType& x,
                                                const paddle::DataType& weight) {
  return {x, DT::FLOAT32};
}

PD_BUILD_OP(evaclip_layer_norm)
    .Inputs({"X", "Weight", "Bias"})
    .Outputs({"Y", "Mean", "Invvar"})
    .Attrs({"epsilon: float"})
    .SetKernelFn(PD_KERNEL(LayerNormForward))
    .SetInferShapeFn(PD_INFER_SHAPE(LayerNormInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(LayerNormInferDtype));

PD_BUILD_GRAD_OP(evaclip_layer_norm)
    .Inputs({"X", "Weight", "Mean", "Invvar", paddle::Grad("Y")})
    .Outputs({paddle::Grad("X"), paddle::Grad("Weight"), paddle::Grad("Bias")})
    .SetKernelFn(PD_KERNEL(LayerNormBackward));

PD_BUILD_OP(evaclip_rms_norm)
    .Inputs({"X", "Weight"})
    .Outputs({"Y", "Invvar"})
    .Attrs({"epsilon: float"})
    .SetKernelFn(PD_KERNEL(RmsNormForward))
    .SetInferShapeFn(PD_INFER_SHAPE(RmsNormInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(RmsNormInferDtype));

PD_BUILD_GRAD_OP(evaclip_rms_norm)
    .Inputs({"X", "Weight", "Invvar", paddle::Grad("Y")})
    .Outputs({paddle::Grad("X"), paddle::Grad("Weight")})
    .SetKernelFn(PD_KERNEL(RmsNormBackward));

// ---------------------------------------------------------------------------------------------
// Plain C entry points, reached from Python with ctypes on the op library.

// Shared with fused_act_cpu.cc, so every kernel of the library follows one thread setting.
int fused_ln_threads() { return max_threads(); }

FLN_EXPORT void fused_ln_set_num_threads(int n) {
  g_num_threads.store(n > 0 ? n : 0, std::memory_order_relaxed);
}

FLN_EXPORT int fused_ln_get_num_threads() { return max_threads(); }

FLN_EXPORT int fused_ln_has_cuda() {
#ifdef FUSED_LN_WITH_CUDA
  return 1;
#else
  return 0;
#endif
}
