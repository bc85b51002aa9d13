"""CPU/GPU execution settings chosen deliberately (Paddle pins OpenMP to 1 thread on import)."""
from __future__ import annotations

import os


def set_threads_env(threads: int = None) -> int:
    """Call BEFORE importing paddle: sets OMP_NUM_THREADS (default: all cores) unless already set."""
    n = threads or int(os.environ.get("OMP_NUM_THREADS", 0)) or (os.cpu_count() or 1)
    os.environ["OMP_NUM_THREADS"] = str(n)
    return n


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
    if not paddle.is_compiled_with_cuda() or paddle.device.get_device() == "cpu":
        paddle.set_flags({"FLAGS_use_mkldnn": bool(onednn)})
    return {"threads": n, "onednn": bool(onednn)}
