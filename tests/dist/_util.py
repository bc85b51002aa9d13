"""Shared bits of the multi-process worker scripts (run under paddle.distributed.launch)."""
from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")  # processes share the CI machine's cores
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import numpy as np  # noqa: E402


def report(**fields) -> None:
    """One machine-readable line for the pytest driver (it reads the worker logs)."""
    print("RESULT " + json.dumps(fields, sort_keys=True), flush=True)


def max_diff(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise AssertionError(f"shape {a.shape} vs {b.shape}")
    return float(np.abs(a - b).max()) if a.size else 0.0


def dict_diff(a: dict, b: dict):
    """(max abs diff, max diff scaled by max(1, |a| max) per tensor, worst key); keys must agree.

    The scaled figure is what tests bound: fp32 sums of O(10) gradients carry ~1e-6 rounding noise
    whatever the code does, while O(1) tensors are held to the absolute tolerance."""
    if set(a) != set(b):
        raise AssertionError(f"key sets differ: only left {sorted(set(a) - set(b))[:5]}, "
                             f"only right {sorted(set(b) - set(a))[:5]}")
    worst, scaled, key = 0.0, 0.0, None
    for k in a:
        d = max_diff(a[k], b[k])
        s = d / max(1.0, float(np.abs(np.asarray(a[k])).max()) if np.asarray(a[k]).size else 1.0)
        worst = max(worst, d)
        if s > scaled:
            scaled, key = s, k
    return worst, scaled, key
