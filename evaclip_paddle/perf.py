"""CPU/GPU execution settings chosen deliberately (Paddle pins OpenMP to 1 thread on import)."""
from __future__ import annotations

import os


# OMP_NUM_THREADS as the user had it before `import paddle` set it to 1 (where it was unset);
# recorded by evaclip_paddle/__init__.py when it is imported before paddle.
_USER_OMP = {"known": False, "value": None}


def record_user_threads():
    """Remembers the user's OMP_NUM_THREADS; only meaningful before paddle is imported."""
    import sys
    if "paddle" not in sys.modules:
        _USER_OMP.update(known=True, value=os.environ.get("OMP_NUM_THREADS"))


def default_threads() -> int:
    """Threads for inference when none are asked for: OMP_NUM_THREADS as the user set it, else the
    CPUs this process may run on (Paddle's own default, 1 thread, or the 1 that `import paddle`
    writes into OMP_NUM_THREADS, would leave the other cores idle)."""
    v = _USER_OMP["value"] if _USER_OMP["known"] else os.environ.get("OMP_NUM_THREADS")
    try:
        n = int(v) if v else 0
    except ValueError:
        n = 0
    if n > 0:
        return n
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def set_threads_env(threads: int = None) -> int:
    """Call BEFORE importing paddle: sets OMP_NUM_THREADS (default: all cores) unless already set."""
    n = threads or int(os.environ.get("OMP_NUM_THREADS", 0)) or (os.cpu_count() or 1)
    os.environ["OMP_NUM_THREADS"] = str(n)
    return n


def tune_malloc() -> bool:
    """Keep freed memory in the heap instead of returning it to the OS (glibc mallopt).

    Paddle's CPU allocator frees large blocks to the OS, so every big activation page-faults anew;
    with high mmap/trim thresholds the same blocks are reused. Measured here: EVA02-B-16 image
    encoding ~1.4x faster. Opt out with EVACLIP_MALLOC_TUNE=0. No-op outside glibc.
    """
    if os.environ.get("EVACLIP_MALLOC_TUNE", "1") != "1":
        return False
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = libc.mallopt(m_mmap_threshold, 1 << 30) == 1
    ok &= libc.mallopt(m_trim_threshold, (1 << 31) - 1) == 1
    return bool(ok)


# libgomp (our custom ops) spins ~300k iterations after each parallel region by default; that
# spinning takes the cores from the oneDNN/MKL matmul that follows on libiomp5. 10k spins still
# cover the gap between two of our own ops. Measured on EVA02-B-16, 2 threads, separate runs:
# train step b8 5.22 -> 4.50 s, text encode b32 1.06 -> 0.91 s; a tiny model's step unchanged.
_GOMP_SPINCOUNT = "10000"


def set_gomp_spincount() -> bool:
    """Sets GOMP_SPINCOUNT for libgomp, which reads it once when it loads (on `import paddle`).

    Called by `import evaclip_paddle` when paddle is not imported yet; a user's GOMP_SPINCOUNT or
    OMP_WAIT_POLICY wins, and EVACLIP_GOMP_SPINCOUNT=<n> or 'default' overrides ours.
    """
    if "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        return False
    v = os.environ.get("EVACLIP_GOMP_SPINCOUNT", _GOMP_SPINCOUNT)
    if not v.isdigit():
        return False
    os.environ["GOMP_SPINCOUNT"] = v
    return True


# iomp5 spins 200 ms by default; 0 makes every short op of a small model pay a wake-up (demo model
# step 0.068 -> 0.14 s), 1 ms keeps those and frees the cores between matmuls and our libgomp ops.
_BLOCKTIME_MS = 1


def omp_blocktime(ms: int = None) -> bool:
    """How long idle Intel-OpenMP workers spin before sleeping (iomp5's default: 200 ms).

    Paddle's kernels (oneDNN/MKL and its own) run on libiomp5 while our custom ops run on libgomp:
    after every matmul, iomp5's spinning workers steal the cores the next libgomp op needs (measured: a fused LayerNorm between matmuls 4.8 ms instead of 0.9 ms when each op is
    synchronised). EVACLIP_KMP_BLOCKTIME=<ms> or 'default' (leave it); a user's KMP_BLOCKTIME wins.
    """
    if "KMP_BLOCKTIME" in os.environ:
        return False
    if ms is None:
        v = os.environ.get("EVACLIP_KMP_BLOCKTIME", str(_BLOCKTIME_MS))
        if not v.isdigit():
            return False
        ms = int(v)
    try:
        import ctypes
        lib = ctypes.CDLL("libiomp5.so")   # the copy Paddle loaded (matched by soname)
        lib.kmp_set_blocktime(int(ms))
        return True
    except (OSError, AttributeError):
        return False


_MXCSR_FTZ_DAZ = 0x8040   # flush-to-zero (results) | denormals-are-zero (inputs)


def _loaded_omp_runtimes() -> list:
    """Paths of the OpenMP runtimes mapped into this process (libgomp, libiomp5, libomp)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "omp" in line and ".so" in line}
    except OSError:
        return []
    return sorted(p for p in paths if os.path.basename(p).startswith(("libgomp", "libiomp5", "libomp")))


def flush_denormals() -> bool:
    """Treat subnormal floats as zero on this thread and on every OpenMP worker (x86-64, glibc).

    Late in backward the text tower's gradients hold thousands of subnormals per tensor; a GEMM
    that touches them takes the microcoded slow path (measured: [2048,1576]x[1576,768] with ~9%
    subnormal rows 656 ms -> 17 ms). MXCSR is per thread, so it is set here, in each loaded OpenMP
    pool (their GOMP_parallel runs fesetenv on every worker), and threads created later inherit it.
    Values below 1.2e-38 become 0; fp32 training is unaffected at that scale. Opt out with
    EVACLIP_FLUSH_DENORMALS=0.
    """
    import platform
    if os.environ.get("EVACLIP_FLUSH_DENORMALS", "1") != "1" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        import ctypes
        libm = ctypes.CDLL("libm.so.6")
        env = ctypes.create_string_buffer(32)          # glibc x86-64 fenv_t; MXCSR is its last word
        if libm.fegetenv(env) != 0:
            return False
        mxcsr = int.from_bytes(env.raw[28:32], "little") | _MXCSR_FTZ_DAZ
        env = ctypes.create_string_buffer(env.raw[:28] + mxcsr.to_bytes(4, "little"), 32)
        fesetenv = ctypes.cast(libm.fesetenv, ctypes.c_void_p)
        for path in _loaded_omp_runtimes():
            try:
                ctypes.CDLL(path).GOMP_parallel(fesetenv, env, 0, 0)   # fn(data) on each worker
            except (OSError, AttributeError):
                pass
        return libm.fesetenv(env) == 0
    except OSError:
        return False


def configure_cpu(threads: int = None, onednn: bool = None) -> dict:
    """Thread count for Paddle's CPU kernels and (optionally) oneDNN kernels in dygraph.

    onednn None reads EVACLIP_ONEDNN (default on): oneDNN matmuls are ~1.4-2x faster than the
    default CPU kernels here (FACTS.md).
    """
    import paddle
    n = threads or int(os.environ.get("OMP_NUM_THREADS", 0)) or (os.cpu_count() or 1)
    paddle.base.core.set_num_threads(n)
    if onednn is None:
        onednn = os.environ.get("EVACLIP_ONEDNN", "1") == "1"
    on_cpu = not paddle.is_compiled_with_cuda() or paddle.device.get_device() == "cpu"
    strided = os.environ.get("EVACLIP_STRIDE_KERNELS", "0") == "1"
    if on_cpu:
        # Stride kernels off: transpose/slice then produce contiguous outputs with the fast copy
        # kernels; with them on, views reach matmul/reshape, whose strided->contiguous copy is
        # ~40x slower here (sdpa on [8,197,12,64]: 57 ms -> 17 ms; train step ~1.2-1.35x).
        paddle.set_flags({"FLAGS_use_mkldnn": bool(onednn), "FLAGS_use_stride_kernel": strided})
    malloc = tune_malloc() if on_cpu else False
    blocktime = omp_blocktime() if on_cpu else False
    ftz = flush_denormals() if on_cpu else False
    return {"threads": n, "onednn": bool(onednn), "malloc_tuned": malloc, "stride_kernels": strided or not on_cpu,
            "omp_blocktime_set": blocktime, "flush_denormals": ftz,
            "gomp_spincount": os.environ.get("GOMP_SPINCOUNT")}
