"""Tensor-parallel throughput on CPU: a small EVA02 CLIP at mp=1 vs mp=2 (gloo), fwd+bwd.

    python bench/bench_tp.py [--width 256 --layers 4 --batch 8 --steps 5]

Prints tokens/s (image + text tokens through both towers, forward and backward) and, for mp=2, the
share of step time spent inside the tensor-parallel collectives (host-side timer around each
call). mp=1 runs at 1 and 2 threads; each mp=2 rank runs 1 thread, so "mp=1, 2 threads" vs "mp=2"
uses the same cores. A benchmark, not a test: numbers depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def bench_config(width: int, layers: int):
    from evaclip_paddle.config import config_from_dict
    heads = max(2, width // 64)
    return config_from_dict({
        "embed_dim": width,
        "vision_cfg": {"image_size": 64, "patch_size": 8, "width": width, "layers": layers,
                       "head_width": width // heads, "mlp_ratio": 2.6667, "rope": True, "naiveswiglu": True,
                       "subln": True},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": width, "heads": heads, "layers": layers},
    }, name=f"bench-w{width}-l{layers}")


def worker(args) -> None:
    import numpy as np
    import paddle
    import paddle.distributed as dist

    from evaclip_paddle.model.clip import EVACLIP
    from evaclip_paddle.parallel import collectives
    from evaclip_paddle.parallel.topology import init_topology

    paddle.set_device("cpu")
    cfg = bench_config(args.width, args.layers)
    topo = init_topology(tensor_parallel_degree=args.mp, model_cfg=cfg)
    paddle.seed(0)                                            # same replicated weights on every rank
    model = EVACLIP(cfg)
    model.init_weights()
    model.train()
    rng = np.random.RandomState(0)
    img = paddle.to_tensor(rng.randn(args.batch, 3, 64, 64).astype("float32"))
    ids = rng.randint(1, 49000, (args.batch, 32)).astype("int64")
    ids[:, -1] = 49407
    ids = paddle.to_tensor(ids)
    tokens = args.batch * ((64 // 8) ** 2 + 1 + 32)

    def step():
        f_img, f_txt, scale = model(img, ids)
        logits = scale * f_img @ f_txt.T
        labels = paddle.arange(args.batch)
        loss = (paddle.nn.functional.cross_entropy(logits, labels)
                + paddle.nn.functional.cross_entropy(logits.T, labels)) / 2
        loss.backward()
        model.clear_gradients()

    for _ in range(2):
        step()
    if not topo.is_single:
        dist.barrier()
    collectives.enable_comm_timing(True)
    collectives.comm_stats(reset=True)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    dt = (time.perf_counter() - t0) / args.steps
    comm = collectives.comm_stats()
    if topo.rank == 0:
        res = dict(mp=args.mp, threads=int(os.environ.get("OMP_NUM_THREADS", "1")), step_s=dt,
                   tokens_per_s=tokens / dt, comm_share=comm["seconds"] / (dt * args.steps),
                   comm_calls_per_step=comm["calls"] / args.steps,
                   params_per_rank=sum(int(np.prod(p.shape)) for p in model.parameters()))
        with open(args.out, "w") as f:
            json.dump(res, f)


def run(args, mp: int, threads: int, tmp: str) -> dict:
    out = os.path.join(tmp, f"mp{mp}_t{threads}.json")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads),
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    me = [os.path.abspath(__file__), "--worker", "--mp", str(mp), "--out", out, "--width", str(args.width),
          "--layers", str(args.layers), "--batch", str(args.batch), "--steps", str(args.steps)]
    if mp == 1:
        cmd = [sys.executable] + me
    else:
        cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", str(mp),
               "--log_dir", os.path.join(tmp, f"log_mp{mp}")] + me
    p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if p.returncode != 0 or not os.path.exists(out):
        raise SystemExit(f"benchmark run mp={mp} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    with open(out) as f:
        return json.load(f)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mp", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(args, 1, 1, tmp), run(args, 1, 2, tmp), run(args, 2, 1, tmp)]
    print(f"model: EVA02 CLIP width {args.width}, {args.layers}+{args.layers} layers, batch {args.batch}, "
          f"64 px / patch 8 + 32 text tokens, fwd+bwd, {args.steps} timed steps")
    print(f"{'layout':<22}{'step s':>9}{'tokens/s':>11}{'comm share':>12}{'colls/step':>12}{'params/rank':>13}")
    for r in rows:
        name = f"mp={r['mp']} ({r['threads']} thread{'s' if r['threads'] > 1 else ''}/rank)"
        print(f"{name:<22}{r['step_s']:>9.3f}{r['tokens_per_s']:>11.0f}{r['comm_share']:>12.1%}"
              f"{r['comm_calls_per_step']:>12.0f}{r['params_per_rank']:>13,}")


if __name__ == "__main__":
    main()
