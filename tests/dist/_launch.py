"""Runs a worker script under `python -m paddle.distributed.launch` and collects its RESULT lines."""
from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(tmp_dir: str, extra: dict = None) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["EVACLIP_TEST_DIR"] = str(tmp_dir)
    env.update(extra or {})
    return env


def _logs(log_dir: str) -> str:
    out = []
    for f in sorted(glob.glob(os.path.join(log_dir, "workerlog.*"))):
        with open(f, "r", errors="replace") as fh:
            out.append(f"==== {os.path.basename(f)} ====\n" + fh.read()[-6000:])
    return "\n".join(out)


def results(log_dir: str) -> list:
    found = []
    for f in sorted(glob.glob(os.path.join(log_dir, "workerlog.*"))):
        with open(f, "r", errors="replace") as fh:
            for line in fh:
                if line.startswith("RESULT "):
                    found.append(json.loads(line[len("RESULT "):]))
    return found


def launch(script: str, nproc: int, tmp_dir, timeout: int = 240, extra_env: dict = None,
           launch_args: tuple = ()) -> list:
    """Runs tests/dist/<script> on `nproc` local ranks; raises with the worker logs on failure."""
    log_dir = os.path.join(str(tmp_dir), f"log_{os.path.splitext(script)[0]}_{nproc}")
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", str(nproc),
           "--log_dir", log_dir, *launch_args, os.path.join(HERE, script)]
    try:
        proc = subprocess.run(cmd, env=worker_env(tmp_dir, extra_env), cwd=REPO, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{script} timed out after {timeout}s\n{_logs(log_dir)}") from None
    if proc.returncode != 0:
        raise AssertionError(f"{script} failed (rc {proc.returncode})\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}\n{_logs(log_dir)}")
    return results(log_dir)
