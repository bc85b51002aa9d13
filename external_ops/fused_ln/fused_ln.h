// Interface between the op glue (fused_ln_cpu.cc) and the CUDA kernels (fused_ln_cuda.cu).
//
// Tensor contract of the ops, identical on CPU and GPU:
//   x        [..., n]  contiguous; float32 or bfloat16 (GPU also float16)
//   weight   n elements; float32 or the dtype of x (bias: the dtype of weight)
//   y        dtype of x; statistics (mean, invvar) float32, one per row
//   dweight, dbias: dtype of weight. All arithmetic accumulates in float32.
//
// The CUDA side deliberately sees raw pointers only: it includes no Paddle header, so it builds
// with a bare CUDA toolkit and its kernels can be compiled and checked without a CUDA Paddle.
#pragma once

#include <cstdint>

enum FusedLnDtype : int { kFusedLnF32 = 0, kFusedLnF16 = 1, kFusedLnBF16 = 2 };

// Floats of device scratch the backward needs (per-chunk dweight/dbias partial sums).
int64_t fused_ln_cuda_bwd_workspace(int64_t rows, int64_t n, bool rms);

// bias/mean are nullptr for RMSNorm. stream is a cudaStream_t. Return a cudaError_t (0 = ok).
int fused_ln_cuda_fwd(FusedLnDtype xt, FusedLnDtype wt, const void* x, const void* weight,
                      const void* bias, void* y, float* mean, float* invvar, int64_t rows,
                      int64_t n, float eps, void* stream);
int fused_ln_cuda_bwd(FusedLnDtype xt, FusedLnDtype wt, const void* x, const void* weight,
                      const float* mean, const float* invvar, const void* dy, void* dx,
                      void* dweight, void* dbias, float* workspace, int64_t rows, int64_t n,
                      void* stream);
const char* fused_ln_cuda_error_string(int err);
