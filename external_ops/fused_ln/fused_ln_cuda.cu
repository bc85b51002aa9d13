// CUDA kernels of fused_ln (LayerNorm / RMSNorm over the last dim). Compiled only when Paddle
// has CUDA and nvcc exists; fused_ln_cpu.cc validates inputs, allocates outputs and calls the
// launchers at the bottom with raw pointers (see fused_ln.h).
//
// Forward and dx: one block per row (grid-stride over rows), block-wide sums built from warp
// shuffles, any row width, float32 accumulation for float32 / float16 / bfloat16 data.
// dweight / dbias: a column-parallel pass writes per-row-chunk partial sums, a second pass adds
// them up; two passes instead of atomics keep the result deterministic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "fused_ln.h"

namespace {

__device__ __forceinline__ float ld(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float ld(const __half* p, int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ float ld(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}
__device__ __forceinline__ void st(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void st(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }
__device__ __forceinline__ void st(__nv_bfloat16* p, int64_t i, float v) {
  p[i] = __float2bfloat16_rn(v);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block, returned to every thread. blockDim.x is a multiple of 32.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float partial[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // a previous call may still be reading `partial`
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  const int nwarps = blockDim.x >> 5;
  return warp_sum(lane < nwarps ? partial[lane] : 0.f);
}

template <bool kRms, typename T, typename W>
__global__ void fwd_kernel(const T* __restrict__ x, const W* __restrict__ w,
                           const W* __restrict__ b, T* __restrict__ y, float* __restrict__ mean,
                           float* __restrict__ invvar, int64_t rows, int64_t n, float eps) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * n;
    T* yr = y + r * n;
    float mu = 0.f;
    if (!kRms) {
      float s = 0.f;
      for (int64_t c = threadIdx.x; c < n; c += blockDim.x) s += ld(xr, c);
      mu = block_sum(s) / n;
    }
    float ss = 0.f;  // two-pass variance: the re-read hits L1/L2
    for (int64_t c = threadIdx.x; c < n; c += blockDim.x) {
      const float d = ld(xr, c) - mu;
      ss += d * d;
    }
    const float rs = rsqrtf(block_sum(ss) / n + eps);
    if (threadIdx.x == 0) {
      if (!kRms) mean[r] = mu;
      invvar[r] = rs;
    }
    for (int64_t c = threadIdx.x; c < n; c += blockDim.x) {
      const float v = (ld(xr, c) - mu) * rs * ld(w, c);
      st(yr, c, kRms ? v : v + ld(b, c));
    }
  }
}

template <bool kRms, typename T, typename W>
__global__ void bwd_dx_kernel(const T* __restrict__ x, const W* __restrict__ w,
                              const float* __restrict__ mean, const float* __restrict__ invvar,
                              const T* __restrict__ dy, T* __restrict__ dx, int64_t rows,
                              int64_t n) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * n;
    const T* gr = dy + r * n;
    T* dxr = dx + r * n;
    const float mu = kRms ? 0.f : mean[r];
    const float rs = invvar[r];
    float s_gx = 0.f, s_g = 0.f;
    for (int64_t c = threadIdx.x; c < n; c += blockDim.x) {
      const float gw = ld(gr, c) * ld(w, c);
      s_gx += gw * (ld(xr, c) - mu) * rs;
      s_g += gw;
    }
    const float m_gx = block_sum(s_gx) / n;
    const float m_g = kRms ? 0.f : block_sum(s_g) / n;
    for (int64_t c = threadIdx.x; c < n; c += blockDim.x) {
      const float xh = (ld(xr, c) - mu) * rs;
      st(dxr, c, rs * (ld(gr, c) * ld(w, c) - m_g - xh * m_gx));
    }
  }
}

constexpr int kColTile = 32;  // columns per block (one warp wide: coalesced row reads)
constexpr int kRowLanes = 8;  // rows read concurrently per block

// partial[chunk][c] = sum over the rows of chunk `blockIdx.y` of dy*xhat (and dy).
template <bool kRms, typename T>
__global__ void bwd_dw_partial_kernel(const T* __restrict__ x, const float* __restrict__ mean,
                                      const float* __restrict__ invvar, const T* __restrict__ dy,
                                      float* __restrict__ pw, float* __restrict__ pb,
                                      int64_t rows, int64_t n) {
  __shared__ float sw[kRowLanes][kColTile + 1];
  __shared__ float sb[kRowLanes][kColTile + 1];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kColTile + threadIdx.x;
  float aw = 0.f, ab = 0.f;
  if (c < n) {
    for (int64_t r = static_cast<int64_t>(blockIdx.y) * kRowLanes + threadIdx.y; r < rows;
         r += static_cast<int64_t>(gridDim.y) * kRowLanes) {
      const float g = ld(dy + r * n, c);
      const float mu = kRms ? 0.f : mean[r];
      aw += g * (ld(x + r * n, c) - mu) * invvar[r];
      ab += g;
    }
  }
  sw[threadIdx.y][threadIdx.x] = aw;
  sb[threadIdx.y][threadIdx.x] = ab;
  __syncthreads();
  if (threadIdx.y == 0 && c < n) {
    for (int i = 1; i < kRowLanes; ++i) {
      aw += sw[i][threadIdx.x];
      ab += sb[i][threadIdx.x];
    }
    pw[static_cast<int64_t>(blockIdx.y) * n + c] = aw;
    if (!kRms) pb[static_cast<int64_t>(blockIdx.y) * n + c] = ab;
  }
}

template <bool kRms, typename W>
__global__ void bwd_dw_final_kernel(const float* __restrict__ pw, const float* __restrict__ pb,
                                    int chunks, int64_t n, W* __restrict__ dw,
                                    W* __restrict__ db) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= n) return;
  float aw = 0.f, ab = 0.f;
  for (int k = 0; k < chunks; ++k) {
    aw += pw[k * n + c];
    if (!kRms) ab += pb[k * n + c];
  }
  st(dw, c, aw);
  if (!kRms) st(db, c, ab);
}

int threads_for(int64_t n) {
  // Enough threads for a few elements each; a multiple of 32 for block_sum.
  const int64_t t = std::min<int64_t>(1024, std::max<int64_t>(32, (n + 3) / 4));
  return static_cast<int>((t + 31) / 32 * 32);
}

unsigned grid_rows(int64_t rows) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(rows, 1 << 20)));
}

// Row chunks of the dweight pass: enough blocks to fill a GPU, each still summing many rows.
int dw_chunks(int64_t rows) {
  return static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(256, (rows + 4 * kRowLanes - 1) / (4 * kRowLanes))));
}

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<T>, Tag<W>) with the CUDA element types of the (validated) x / weight dtypes.
template <typename F>
cudaError_t dispatch(FusedLnDtype xt, FusedLnDtype wt, const F& f) {
  const bool w32 = wt == kFusedLnF32;
  switch (xt) {
    case kFusedLnF32:
      f(Tag<float>{}, Tag<float>{});
      break;
    case kFusedLnF16:
      if (w32) f(Tag<__half>{}, Tag<float>{});
      else f(Tag<__half>{}, Tag<__half>{});
      break;
    case kFusedLnBF16:
      if (w32) f(Tag<__nv_bfloat16>{}, Tag<float>{});
      else f(Tag<__nv_bfloat16>{}, Tag<__nv_bfloat16>{});
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

int64_t fused_ln_cuda_bwd_workspace(int64_t rows, int64_t n, bool rms) {
  return (rms ? 1 : 2) * static_cast<int64_t>(dw_chunks(rows)) * n;
}

const char* fused_ln_cuda_error_string(int err) {
  return cudaGetErrorString(static_cast<cudaError_t>(err));
}

int fused_ln_cuda_fwd(FusedLnDtype xt, FusedLnDtype wt, const void* x, const void* weight,
                      const void* bias, void* y, float* mean, float* invvar, int64_t rows,
                      int64_t n, float eps, void* stream) {
  if (rows == 0) return cudaSuccess;
  const auto s = static_cast<cudaStream_t>(stream);
  return dispatch(xt, wt, [&](auto xtag, auto wtag) {
    using T = typename decltype(xtag)::type;
    using W = typename decltype(wtag)::type;
    const auto* xp = static_cast<const T*>(x);
    const auto* wp = static_cast<const W*>(weight);
    auto* yp = static_cast<T*>(y);
    if (bias)
      fwd_kernel<false, T, W><<<grid_rows(rows), threads_for(n), 0, s>>>(
          xp, wp, static_cast<const W*>(bias), yp, mean, invvar, rows, n, eps);
    else
      fwd_kernel<true, T, W><<<grid_rows(rows), threads_for(n), 0, s>>>(
          xp, wp, nullptr, yp, nullptr, invvar, rows, n, eps);
  });
}

int fused_ln_cuda_bwd(FusedLnDtype xt, FusedLnDtype wt, const void* x, const void* weight,
                      const float* mean, const float* invvar, const void* dy, void* dx,
                      void* dweight, void* dbias, float* workspace, int64_t rows, int64_t n,
                      void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  const bool rms = mean == nullptr;
  const int chunks = dw_chunks(rows);
  float* pw = workspace;
  float* pb = rms ? nullptr : workspace + static_cast<int64_t>(chunks) * n;
  return dispatch(xt, wt, [&](auto xtag, auto wtag) {
    using T = typename decltype(xtag)::type;
    using W = typename decltype(wtag)::type;
    const auto* xp = static_cast<const T*>(x);
    const auto* gp = static_cast<const T*>(dy);
    const auto* wp = static_cast<const W*>(weight);
    auto* dxp = static_cast<T*>(dx);
    const dim3 col_grid(static_cast<unsigned>((n + kColTile - 1) / kColTile), chunks);
    const dim3 col_block(kColTile, kRowLanes);
    const unsigned fin_grid = static_cast<unsigned>((n + 255) / 256);
    // rows == 0 still runs the dweight passes: they write the zeros the grads must be.
    if (rms) {
      if (rows > 0)
        bwd_dx_kernel<true, T, W><<<grid_rows(rows), threads_for(n), 0, s>>>(
            xp, wp, nullptr, invvar, gp, dxp, rows, n);
      bwd_dw_partial_kernel<true, T><<<col_grid, col_block, 0, s>>>(xp, nullptr, invvar, gp, pw,
                                                                     pb, rows, n);
      bwd_dw_final_kernel<true, W><<<fin_grid, 256, 0, s>>>(pw, pb, chunks, n,
                                                            static_cast<W*>(dweight), nullptr);
    } else {
      if (rows > 0)
        bwd_dx_kernel<false, T, W><<<grid_rows(rows), threads_for(n), 0, s>>>(
            xp, wp, mean, invvar, gp, dxp, rows, n);
      bwd_dw_partial_kernel<false, T><<<col_grid, col_block, 0, s>>>(xp, mean, invvar, gp, pw,
                                                                      pb, rows, n);
      bwd_dw_final_kernel<false, W><<<fin_grid, 256, 0, s>>>(
          pw, pb, chunks, n, static_cast<W*>(dweight), static_cast<W*>(dbias));
    }
  });
}
