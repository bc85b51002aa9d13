"""Build and install the `fused_ln` Paddle custom ops (LayerNorm / RMSNorm; on CPU also the SwiGLU
gate, RoPE, the attention softmax and, where Paddle ships MKL, inference attention).

    pip install --no-build-isolation external_ops/

`--no-build-isolation` is required: the build imports the installed paddle (its headers,
libraries and cpp_extension), which pip's isolated build environment would hide.

The CPU kernels always build (any C++17 compiler with OpenMP). The CUDA kernels are added only
when this paddle is a CUDA build and nvcc is found; FUSED_LN_CUDA=0 forces a CPU-only build.
"""

import os
import shutil

import paddle
from paddle.utils.cpp_extension import CppExtension, CUDAExtension, setup

HERE = os.path.dirname(os.path.abspath(__file__))

# Keep in sync with evaclip_paddle/ops/fused_norm.py (JIT build). No -march=native: the library
# must run on other CPUs; the kernels carry their own AVX2/AVX-512 clones instead. -g0 drops the
# debug info Paddle's defaults ask for: it halves the build time. -fno-trapping-math lets GCC turn
# the float selects of fused_act_cpu.cc into blends, i.e. vectorise them (no code here reads FP
# exception flags; results are unchanged).
CXX_FLAGS = ["-O3", "-g0", "-fopenmp", "-fno-trapping-math"]
NVCC_FLAGS = ["-O3"]
LINK_FLAGS = ["-fopenmp"]


def mkl_flags():
    """(cxx, link) flags for the attention op's sgemm: Paddle's own MKL (libmklml_intel.so in
    <paddle>/libs), found at run time through an rpath. Without it the op is compiled out. Only
    mklml is linked: libiomp5, which it needs, is already loaded by paddle, and linking it here
    would change the OpenMP runtime the other kernels run on."""
    libs = os.path.join(os.path.dirname(paddle.__file__), "libs")
    if not os.path.isfile(os.path.join(libs, "libmklml_intel.so")):
        return [], []
    return ["-DFUSED_LN_WITH_MKL"], [f"-L{libs}", "-lmklml_intel", f"-Wl,-rpath,{libs}"]


def find_nvcc():
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")):
            return os.path.join(root, "bin", "nvcc")
    return shutil.which("nvcc")


def want_cuda():
    if os.environ.get("FUSED_LN_CUDA", "").strip() == "0":
        return False
    return paddle.is_compiled_with_cuda() and find_nvcc() is not None


# setuptools wants source paths relative to the setup.py directory.
os.chdir(HERE)
sources = ["fused_ln/fused_ln_cpu.cc", "fused_ln/fused_act_cpu.cc", "fused_ln/fused_attn_cpu.cc",
           "fused_ln/fused_sdpa_cpu.cc", "fused_ln/fused_gemm_cpu.cc"]
MKL_CXX, MKL_LINK = mkl_flags()
if want_cuda():
    ext = CUDAExtension(
        sources=sources + ["fused_ln/fused_ln_cuda.cu"],
        extra_compile_args={"cxx": CXX_FLAGS + MKL_CXX + ["-DFUSED_LN_WITH_CUDA"], "nvcc": NVCC_FLAGS},
        extra_link_args=LINK_FLAGS + MKL_LINK,
    )
else:
    ext = CppExtension(
        sources=sources,
        extra_compile_args={"cxx": CXX_FLAGS + MKL_CXX},
        extra_link_args=LINK_FLAGS + MKL_LINK,
    )

setup(name="fused_ln", version="0.1.0", ext_modules=ext)
