// Pieces shared by the float32 CPU kernels outside fused_ln_cpu.cc (fused_act_cpu.cc,
// fused_attn_cpu.cc, fused_sdpa_cpu.cc, fused_gemm_cpu.cc): the per-ISA clone attribute, a
// vectorisable exp, the normal CDF, a softmax row, the bias/GELU row epilogue, the parallel loop
// and its chunk sizes, and the input check.
// Everything has internal linkage, so each file gets its own copy.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "paddle/extension.h"

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && \
    __GNUC__ >= 12
#define FA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FA_CLONES
#endif
// Helpers must be inlined into the target_clones callers, or they run as the baseline build.
#define FA_INLINE inline __attribute__((always_inline))

int fused_ln_threads();  // fused_ln_cpu.cc: the thread count all the kernels follow

namespace {

// exp_approx: Cody-Waite range reduction to |r| <= ln2/2 and a degree-6 polynomial; relative error
// about 2 ulp for inputs in [-87.3, 88]. Inputs below -87.3 (-inf included) give exactly 0 and
// inputs above 88 saturate at e^88. Unlike std::exp it has no branches or calls, so `omp simd`
// loops around it vectorise (Paddle 3.3.1's own CPU exp is scalar).
FA_INLINE float exp_approx(float x) {
  const float lo = -87.33654f, hi = 88.0f;
  float xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < lo ? 0.f : e * scale;  // (a NaN input fails every comparison and stays NaN)
}

// Phi(x), the standard normal CDF, as 1 - erfc/2 or erfc/2 with erfc(|x|/sqrt2) from the
// Chebyshev-fitted form t * exp(-z^2 + P(t)), t = 1 / (1 + z/2) (fractional error < 1.2e-7, Numerical
// Recipes' erfcc coefficients): one exp and no branches, so the loops vectorise. Paddle's CPU gelu
// calls a scalar erf per element (text MLP [32,77,2048] fwd 6.7 ms here).
FA_INLINE float normal_cdf(float x) {
  const float z = std::fabs(x) * 0.70710678118654752f;
  const float t = 1.f / (1.f + 0.5f * z);
  float p = 0.17087277f;
  p = p * t - 0.82215223f;
  p = p * t + 1.48851587f;
  p = p * t - 1.13520398f;
  p = p * t + 0.27886807f;
  p = p * t - 0.18628806f;
  p = p * t + 0.09678418f;
  p = p * t + 0.37409196f;
  p = p * t + 1.00002368f;
  p = p * t - 1.26551223f;
  const float half_erfc = 0.5f * t * exp_approx(p - z * z);
  return x >= 0.f ? 1.f - half_erfc : half_erfc;
}

// One row: y = softmax(x * scale + mask) (mask may be null; y may be x). Three passes over a row
// that stays in L1: z = x * scale + mask and its max (z kept in y), e = exp(z - max) and its sum,
// y = e / sum. Max-subtracted, so large logits stay finite; z = -inf gives exp_approx(-inf) = 0
// exactly. (Each simd lane reads and writes only its own index, so y == x is safe.)
FA_INLINE void softmax_row(const float* x, const float* mask, float scale, float* y, int64_t len) {
  float mx = -std::numeric_limits<float>::infinity();
  if (mask != nullptr) {
#pragma omp simd reduction(max : mx)
    for (int64_t i = 0; i < len; ++i) {
      const float z = x[i] * scale + mask[i];
      y[i] = z;
      mx = z > mx ? z : mx;
    }
  } else {
#pragma omp simd reduction(max : mx)
    for (int64_t i = 0; i < len; ++i) {
      const float z = x[i] * scale;
      y[i] = z;
      mx = z > mx ? z : mx;
    }
  }
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < len; ++i) {
    const float e = exp_approx(y[i] - mx);
    y[i] = e;
    sum += e;
  }
  const float inv = 1.f / sum;
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) y[i] *= inv;
}

constexpr int64_t kBlock = 1 << 14;  // elements per parallel work item of the elementwise/row kernels

// Rows per parallel work item so that one holds about kBlock elements of rows of row_len.
inline int64_t rows_per_chunk(int64_t row_len) {
  return std::max<int64_t>(1, kBlock / std::max<int64_t>(1, row_len));
}

// Rows [r0, r0 + n) of y [rows, len]: y += b (b may be null when gelu), then the exact GELU when
// gelu. The epilogue of the bias op and of the inference linear.
[[maybe_unused]] FA_CLONES void bias_act_rows(float* y, const float* __restrict b, int64_t r0,
                                              int64_t n, int64_t len, bool gelu) {
  for (int64_t r = r0; r < r0 + n; ++r) {
    float* __restrict yr = y + r * len;
    if (gelu) {
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        const float z = yr[i] + (b ? b[i] : 0.f);
        yr[i] = z * normal_cdf(z);
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) yr[i] += b[i];
    }
  }
}

void check_f32_cpu(const char* op, const paddle::Tensor& t, const char* what) {
  PD_CHECK(t.is_cpu(), op, ": ", what, " must be a CPU tensor (these kernels are CPU-only)");
  PD_CHECK(t.dtype() == paddle::DataType::FLOAT32, op, ": ", what, " must be float32");
}

// body(i0, len) over [0, n) in chunks of `chunk`, statically spread over the kernels' threads
// (no more threads than chunks: a chunk is the smallest piece worth a thread).
template <typename F>
void parallel_chunks(int64_t n, int64_t chunk, F&& body) {
  const int64_t chunks = (n + chunk - 1) / chunk;
  const int nt = static_cast<int>(std::min<int64_t>(fused_ln_threads(), chunks));
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t i0 = c * chunk;
    body(i0, std::min(chunk, n - i0));
  }
}

}  // namespace
