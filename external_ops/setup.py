"""Build and install the `fused_ln` Paddle custom ops (LayerNorm / RMSNorm; on CPU also the SwiGLU
gate, RoPE and the attention softmax).

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
sources = ["fused_ln/fused_ln_cpu.cc", "fused_ln/fused_act_cpu.cc", "fused_ln/fused_attn_cpu.cc"]
if want_cuda():
    ext = CUDAExtension(
        sources=sources + ["fused_ln/fused_ln_cuda.cu"],
        extra_compile_args={"cxx": CXX_FLAGS + ["-DFUSED_LN_WITH_CUDA"], "nvcc": NVCC_FLAGS},
        extra_link_args=LINK_FLAGS,
    )
else:
    ext = CppExtension(
        sources=sources,
        extra_compile_args={"cxx": CXX_FLAGS},
        extra_link_args=LINK_FLAGS,
    )

setup(name="fused_ln", version="0.1.0", ext_modules=ext)
