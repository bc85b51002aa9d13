// The few MKL entry points the inference kernels call. Paddle ships MKL (libmklml_intel.so) but no
// MKL headers, so they are declared here; the build defines FUSED_LN_WITH_MKL only when the
// library is there.
#pragma once

extern "C" {
void cblas_sgemm(int layout, int transa, int transb, int m, int n, int k, float alpha,
                 const float* a, int lda, const float* b, int ldb, float beta, float* c, int ldc);
int MKL_Set_Num_Threads_Local(int nt);
}

namespace {
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
}  // namespace
