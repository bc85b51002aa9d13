"""Multi-process parallel tests on CPU/gloo, each a `paddle.distributed.launch` of a tests/dist/ worker.

The workers assert; these drivers check the launch succeeded and every rank reported, and bound the
reported numbers again so a failure names the figure. About 1 minute on 2 cores in all.
"""
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist"))
from _launch import HERE, REPO, free_port, launch, results, worker_env  # noqa: E402

TOL = 1e-5


def _by_case(rows, case):
    return [r for r in rows if r["case"] == case]


def test_tensor_parallel_mp2_matches_one_process(tmp_path):
    rows = launch("tp_mp2.py", 2, tmp_path)
    assert len(_by_case(rows, "done")) == 2, rows
    for case in ("eva02_tiny", "rms_subln"):
        got = _by_case(rows, case)
        assert len(got) == 2
        for r in got:
            assert r["n_sharded"] > 0
            assert r["feat_img"] <= TOL and r["feat_txt"] <= TOL, r
            assert r["grad_scaled"] <= TOL, r          # per tensor: |diff| / max(1, |grad| max)
            assert r["state_roundtrip"] == 0.0 and r["grad_norm_sq_rel"] < 1e-5, r
    assert [r["diff"] for r in _by_case(rows, "init")] == [0.0, 0.0]
    for r in _by_case(rows, "gather"):
        assert max(r["grad_local"], r["grad_global"], r["nograd_global"]) <= TOL, r
    for r in _by_case(rows, "ops"):
        assert max(v for k, v in r.items() if k not in ("case", "rank")) == 0.0, r


@pytest.mark.parametrize("layout", ["mp2dp2", "mp2sh2"])
def test_four_ranks_groups_and_training_math(tmp_path, layout):
    rows = launch("groups4.py", 4, tmp_path, extra_env={"LAYOUT": layout})
    assert len(_by_case(rows, "done")) == 4, rows
    groups = _by_case(rows, "groups")
    assert sorted(r["rank"] for r in groups) == [0, 1, 2, 3]
    mp_groups = {tuple(r["groups"]["mp"]) for r in groups}
    assert mp_groups == {(0, 1), (2, 3)}
    assert {tuple(r["groups"]["data"]) for r in groups} == {(0, 2), (1, 3)}
    for r in _by_case(rows, "train"):
        assert r["norm_sq_rel"] < 1e-5, r
        if layout == "mp2sh2":
            assert r["sgd_step_scaled"] <= TOL, r
        else:
            assert r["grad_scaled"] <= TOL, r


def test_two_nodes_on_loopback(tmp_path):
    port = free_port()
    procs = []
    for node in range(2):
        log_dir = os.path.join(str(tmp_path), f"node{node}")
        cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nnodes", "2", "--master",
               f"127.0.0.1:{port}", "--nproc_per_node", "1", "--log_dir", log_dir,
               os.path.join(HERE, "two_nodes.py")]
        procs.append((log_dir, subprocess.Popen(cmd, env=worker_env(tmp_path), cwd=REPO, stdout=subprocess.PIPE,
                                                stderr=subprocess.STDOUT, text=True)))
    rows, outs = [], []
    for log_dir, p in procs:
        try:
            out, _ = p.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            for _, q in procs:
                q.kill()
            raise AssertionError("two-node launch timed out")
        outs.append(out[-3000:])
        assert p.returncode == 0, "\n".join(outs)
        rows += results(log_dir)
    assert sorted(r["rank"] for r in rows) == [0, 1], (rows, outs)
    assert all(r["all_reduce"] == [3.0] * 3 for r in rows), rows
