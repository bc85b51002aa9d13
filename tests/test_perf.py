"""CPU execution settings (evaclip_paddle.perf), each checked in a fresh process: they change
process-wide state (MXCSR of every thread, OpenMP pools) that must not leak into other tests."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

x86 = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="MXCSR is x86-64 only")

_PROBE = textwrap.dedent("""
    import numpy as np, paddle
    from evaclip_paddle.perf import configure_cpu
    from evaclip_paddle.ops import fused_act
    assert fused_act.available(), "the fused_ln op library (external_ops) is not built"
    swiglu = fused_act.swiglu
    tiny = np.full([1 << 16], 1e-39, np.float32)          # subnormal
    x = paddle.to_tensor(tiny)
    paddle.base.core.set_num_threads(2)                   # both OpenMP pools get their workers
    paddle.matmul(paddle.ones([512, 512]), paddle.ones([512, 4096]))   # ... before the switch
    swiglu(paddle.ones([1 << 16]), paddle.ones([1 << 16]))
    info = configure_cpu(2)
    main = float((tiny * np.float32(1.0))[0])              # numpy on the main thread
    ops = float(paddle.matmul(x.reshape([256, 256]), paddle.ones([256, 4096])).abs().max())  # MKL/oneDNN workers
    # libgomp workers (iomp5 copies the master's MXCSR at each fork, libgomp does not): the gate
    # op splits 2^16 elements into work items of 2^14 over both threads; silu(1) * 1e-39 is subnormal
    ew = float(swiglu(paddle.ones([1 << 16]), x).abs().max())
    print(info["flush_denormals"], main, ops, ew)
""")


def _probe(env_extra):
    env = dict(os.environ, OMP_NUM_THREADS="2", **env_extra)
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    flag, main, ops, ew = out.stdout.split()[-4:]
    return flag == "True", float(main), float(ops), float(ew)


@x86
def test_configure_cpu_flushes_subnormals_on_every_thread():
    flag, main, ops, ew = _probe({})
    assert flag
    assert (main, ops, ew) == (0.0, 0.0, 0.0)


@x86
def test_flush_can_be_turned_off():
    flag, main, ops, ew = _probe({"EVACLIP_FLUSH_DENORMALS": "0"})
    assert not flag
    assert main > 0 and ops > 0 and ew > 0                 # subnormal arithmetic kept


def _env_after(code, **env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", code + "; import os; print(os.environ.get('GOMP_SPINCOUNT'))"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()[-1]


def test_gomp_spincount_set_before_paddle_loads_libgomp():
    assert _env_after("import evaclip_paddle") == "10000"
    assert _env_after("import evaclip_paddle", GOMP_SPINCOUNT="7") == "7"              # the user's wins
    assert _env_after("import evaclip_paddle", EVACLIP_GOMP_SPINCOUNT="500") == "500"
    assert _env_after("import evaclip_paddle", EVACLIP_GOMP_SPINCOUNT="default") == "None"
    assert _env_after("import evaclip_paddle", OMP_WAIT_POLICY="PASSIVE") == "None"
    assert _env_after("import paddle, evaclip_paddle") == "None"                       # too late: left alone


def test_default_threads_ignore_the_one_paddle_writes(monkeypatch):
    """The predictor's default thread count is the user's OMP_NUM_THREADS, else every usable CPU,
    never the OMP_NUM_THREADS=1 that `import paddle` writes where it was unset."""
    from evaclip_paddle import perf

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as paddle leaves it
    monkeypatch.setitem(perf._USER_OMP, "known", True)
    monkeypatch.setitem(perf._USER_OMP, "value", None)
    assert perf.default_threads() == len(os.sched_getaffinity(0))
    monkeypatch.setitem(perf._USER_OMP, "value", "3")
    assert perf.default_threads() == 3
    monkeypatch.setitem(perf._USER_OMP, "known", False)  # evaclip_paddle imported after paddle
    assert perf.default_threads() == 1
    # and in a fresh process, importing evaclip_paddle first records an unset variable
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", "import evaclip_paddle, paddle, os; from evaclip_paddle.perf import "
                          "default_threads; print(os.environ['OMP_NUM_THREADS'], default_threads())"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.split()[-2:] == ["1", str(len(os.sched_getaffinity(0)))], out.stderr[-2000:]
