"""Fused LayerNorm / RMSNorm backed by the `fused_ln` custom op (sources in external_ops/).

The op is found, once per process, in this order:
  1. the installed package `fused_ln` (``pip install --no-build-isolation external_ops/``);
  2. a JIT build with ``paddle.utils.cpp_extension.load`` into
     ``~/.cache/evaclip_paddle/ops/<key>`` when ``EVACLIP_JIT_OPS=1`` (or ``load_op(jit=True)``).
Without it every function here falls back to native Paddle math (one warning per process), so
callers never need to check. Only one of the two may be loaded in a process: Paddle aborts when
the same op name is registered twice, which is why ``load_op`` always prefers what is loaded.

Semantics (both paths): statistics and arithmetic in float32, output in the dtype of x;
weight/bias may be float32 or the dtype of x. RMSNorm is T5-style:
``y = w * x * rsqrt(mean(x^2) + eps)`` with the mean taken in float32.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import importlib
import os
import sys
import threading
import warnings

import paddle
import paddle.nn.functional as F

__all__ = [
    "FusedLayerNorm",
    "FusedRMSNorm",
    "fused_layer_norm",
    "fused_ops_available",
    "fused_rms_norm",
    "get_num_threads",
    "load_op",
    "op_library_path",
    "set_num_threads",
]

_OP_NAME = "fused_ln"
_REPO_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "external_ops", "fused_ln")
_SRC_DIR = os.path.abspath(os.environ.get("EVACLIP_OPS_SRC", _REPO_SRC))
# Keep in sync with external_ops/setup.py (-g0: half the build time of Paddle's default -g).
_CXX_FLAGS = ["-O3", "-g0", "-fopenmp", "-fno-trapping-math"]
_NVCC_FLAGS = ["-O3"]
_LINK_FLAGS = ["-fopenmp"]


def _mkl_flags():
    """(cxx, link) flags for the attention op's sgemm on Paddle's own libmklml_intel.so, or
    ([], []) when this paddle has none (the op is then compiled out). Same as setup.py's."""
    libs = os.path.join(os.path.dirname(paddle.__file__), "libs")
    if not os.path.isfile(os.path.join(libs, "libmklml_intel.so")):
        return [], []
    return ["-DFUSED_LN_WITH_MKL"], [f"-L{libs}", "-lmklml_intel", f"-Wl,-rpath,{libs}"]

_lock = threading.Lock()
_state = {"module": None, "so": None, "how": None, "error": None, "implicit_tried": False, "warned": False}
_clib = None


def _default_build_root():
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "evaclip_paddle", "ops")


def _nvcc_found():
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")):
            return True
    import shutil

    return shutil.which("nvcc") is not None


def _jit_plan():
    """(sources, cxx flags, link flags, key): the key changes with sources, flags, Paddle and
    Python."""
    with_cuda = paddle.is_compiled_with_cuda() and _nvcc_found() and os.environ.get("FUSED_LN_CUDA") != "0"
    cpu_files = ("fused_ln_cpu.cc", "fused_act_cpu.cc", "fused_attn_cpu.cc", "fused_sdpa_cpu.cc",
                 "fused_gemm_cpu.cc")
    sources = [os.path.join(_SRC_DIR, name) for name in cpu_files]
    mkl_cxx, mkl_link = _mkl_flags()
    cxx = list(_CXX_FLAGS) + mkl_cxx
    link = list(_LINK_FLAGS) + mkl_link
    if with_cuda:
        sources.append(os.path.join(_SRC_DIR, "fused_ln_cuda.cu"))
        cxx.append("-DFUSED_LN_WITH_CUDA")
    h = hashlib.sha256()
    for path in sources + [os.path.join(_SRC_DIR, name) for name in ("fused_ln.h", "cpu_common.h", "mkl_min.h")]:
        with open(path, "rb") as f:
            h.update(f.read())
    h.update(repr((cxx, _NVCC_FLAGS, link, paddle.__version__, sys.version_info[:2])).encode())
    key = f"paddle{paddle.__version__}-{'cuda' if with_cuda else 'cpu'}-{h.hexdigest()[:12]}"
    return sources, cxx, link, key


def _jit_build(build_directory, verbose):
    from paddle.utils.cpp_extension import load

    sources, cxx, link, key = _jit_plan()
    build_directory = os.path.abspath(build_directory or os.path.join(_default_build_root(), key))
    os.makedirs(build_directory, exist_ok=True)  # load() does not create it
    lock_file = open(os.path.join(build_directory, ".lock"), "w")
    try:
        try:  # ranks of one job share the cache dir: build once, the others wait
            import fcntl

            fcntl.flock(lock_file, fcntl.LOCK_EX)
        except ImportError:
            pass
        module = load(
            name=_OP_NAME,
            sources=sources,
            extra_cxx_cflags=cxx,
            extra_cuda_cflags=list(_NVCC_FLAGS),
            extra_ldflags=link,
            build_directory=build_directory,
            verbose=verbose,
        )
    finally:
        lock_file.close()
    return module, os.path.join(build_directory, _OP_NAME, _OP_NAME + ".so")


def _installed_so(module):
    so = getattr(module, "so_path", None)
    if so and os.path.exists(so):
        return so
    hits = glob.glob(os.path.join(os.path.dirname(os.path.abspath(module.__file__)), "*.so"))
    return hits[0] if hits else None


def load_op(build_directory=None, jit=None, verbose=False, strict=False):
    """Load the fused_ln op once per process and return its Python module (None if unavailable).

    jit: True builds from source when no installed package exists; None (default) does so only
    when EVACLIP_JIT_OPS=1. build_directory: where a JIT build goes (default: a cache dir keyed
    by sources/flags/Paddle version). strict: raise instead of returning None.
    """
    with _lock:
        if _state["module"] is not None:
            return _state["module"]
        errors = []
        try:
            module = importlib.import_module(_OP_NAME)
            _state.update(module=module, so=_installed_so(module), how="installed", error=None)
            return module
        except ImportError as e:
            errors.append(f"no installed `{_OP_NAME}` package ({e})")
        if jit is None:
            jit = os.environ.get("EVACLIP_JIT_OPS", "") == "1"
        if jit:
            try:
                module, so = _jit_build(build_directory, verbose)
                _state.update(module=module, so=so, how="jit", error=None)
                return module
            except Exception as e:  # noqa: BLE001 - any build failure means "fall back"
                errors.append(f"JIT build failed: {type(e).__name__}: {e}")
        else:
            errors.append("JIT build not enabled (set EVACLIP_JIT_OPS=1)")
        _state["error"] = "; ".join(errors)
        if strict:
            raise RuntimeError(f"fused_ln op unavailable: {_state['error']}")
        return None


def _module():
    if _state["module"] is None and not _state["implicit_tried"]:
        _state["implicit_tried"] = True
        load_op()
    return _state["module"]


def fused_ops_available() -> bool:
    """True when the fused_ln op is loaded (or loadable, see load_op) in this process."""
    return _module() is not None


def op_library_path():
    """Path of the op's shared library, or None. A process that runs an exported model with
    paddle.inference must first call
    ``paddle.utils.cpp_extension.load_op_meta_info_and_register_op(path)``."""
    _module()
    return _state["so"]


def loaded_op_library():
    """Path of the op library this process has already loaded, or None; unlike op_library_path()
    it never loads one."""
    return _state["so"]


def _lib():
    global _clib
    if _clib is None and op_library_path():
        _clib = ctypes.CDLL(_state["so"])  # the library Paddle already loaded: same handle
    return _clib


def set_num_threads(n: int) -> None:
    """Threads of the CPU kernels (0: follow OMP_NUM_THREADS, which `import paddle` sets to 1
    unless it was set before)."""
    if _lib() is not None:
        _lib().fused_ln_set_num_threads(int(n))


def get_num_threads() -> int:
    return int(_lib().fused_ln_get_num_threads()) if _lib() is not None else 1


def _has_cuda():
    return _lib() is not None and bool(_lib().fused_ln_has_cuda())


def _warn_once(reason):
    if not _state["warned"]:
        _state["warned"] = True
        warnings.warn(
            f"fused_ln op not used ({reason}); falling back to native Paddle LayerNorm/RMSNorm. "
            "Install it with `pip install --no-build-isolation external_ops/` or set EVACLIP_JIT_OPS=1.",
            RuntimeWarning,
            stacklevel=4,  # the caller of fused_layer_norm / fused_rms_norm
        )


def _on_gpu(x):
    if paddle.in_dynamic_mode():
        return x.place.is_gpu_place()
    return paddle.device.get_device().startswith("gpu")


def _usable(x):
    """The op module when it can take x, else None (after warning once)."""
    mod = _module()
    if mod is None:
        _warn_once(_state["error"])
        return None
    if _on_gpu(x) and not _has_cuda():
        _warn_once("this fused_ln build has no CUDA kernels")
        return None
    return mod


def _f32(t):
    return t if t is None or t.dtype == paddle.float32 else t.astype("float32")


def _cast_like(y, x):
    return y if y.dtype == x.dtype else y.astype(x.dtype)


def _contiguous(x):
    # The op reads memory row-major; strided views (transpose, slicing) need a copy first.
    if paddle.in_dynamic_mode() and not x.is_contiguous():
        return x.contiguous()
    return x


@paddle.jit.not_to_static
def fused_layer_norm(x, weight=None, bias=None, eps: float = 1e-5):
    """LayerNorm over the last dim of x (any leading dims), with autograd for x, weight, bias."""
    mod = _usable(x)
    if mod is None:  # same semantics in native math: float32 compute, output in x's dtype
        xf = _f32(x).reshape([1, -1]) if x.ndim == 1 else _f32(x)  # F.layer_norm wants 2-D+
        y = F.layer_norm(xf, [x.shape[-1]], _f32(weight), _f32(bias), eps)
        return _cast_like(y.reshape(x.shape) if x.ndim == 1 else y, x)
    n = x.shape[-1]
    if weight is None:
        weight = paddle.ones([n], dtype=x.dtype)
    if bias is None:
        bias = paddle.zeros([n], dtype=weight.dtype)
    return mod.evaclip_layer_norm(_contiguous(x), weight, bias, float(eps))[0]


@paddle.jit.not_to_static
def fused_rms_norm(x, weight=None, eps: float = 1e-6):
    """T5-style RMSNorm over the last dim of x: w * x * rsqrt(mean(x^2) + eps)."""
    mod = _usable(x)
    if mod is None:
        xf = _f32(x)
        y = xf * paddle.rsqrt(xf.square().mean(axis=-1, keepdim=True) + eps)
        if weight is not None:
            y = y * _f32(weight)
        return _cast_like(y, x)
    if weight is None:
        weight = paddle.ones([x.shape[-1]], dtype=x.dtype)
    return mod.evaclip_rms_norm(_contiguous(x), weight, float(eps))[0]


class FusedLayerNorm(paddle.nn.LayerNorm):
    """Drop-in for paddle.nn.LayerNorm over the last dim (same parameters and state dict)."""

    def forward(self, x):
        if len(self._normalized_shape) != 1:
            return super().forward(x)
        return fused_layer_norm(x, self.weight, self.bias, self._epsilon)


class FusedRMSNorm(paddle.nn.Layer):
    """RMSNorm over the last dim with a learnable scale named `weight`."""

    def __init__(self, hidden_size: int, epsilon: float = 1e-6, weight_attr=None):
        super().__init__()
        self._epsilon = epsilon
        self.weight = self.create_parameter(
            [hidden_size], attr=weight_attr, default_initializer=paddle.nn.initializer.Constant(1.0)
        )

    def forward(self, x):
        return fused_rms_norm(x, self.weight, self._epsilon)

    def extra_repr(self):
        return f"{self.weight.shape[0]}, epsilon={self._epsilon}"
