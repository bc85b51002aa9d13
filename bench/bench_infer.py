"""Encoder inference throughput: our Paddle Inference predictor vs open_clip (PyTorch eager).

    python bench/bench_infer.py [--tower image|text] [--batch 32] [--threads 2] [--rounds 2] [--iters 3]
                                [--out result.json]

Engines (each measured in its own subprocess, rounds alternate between them so that a noisy,
shared machine hits all of them alike): ours fp32 (the CPU-kernel program the predictor picks for
fp32 on CPU, and the portable oneDNN program as ours-fp32/native) and bf16 (oneDNN bf16), open_clip
EVA02-B-16 fp32 (as is, and with our predictor's heap setting as openclip-fp32/mallopt) and bf16
autocast; random weights, same batch, same thread count. Also measures
this machine's bf16 GEMM peak (torch bf16 matmul and a Paddle Inference oneDNN-bf16 MLP stack) and
reports the fraction of it our bf16 predictor reaches (model FLOPs / time / peak).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

# "<engine>/<variant>": ours-fp32/native runs the portable program where the default (auto) runs
# the CPU-kernel one; openclip-fp32/mallopt is open_clip with the heap setting our predictor makes
# (perf.tune_malloc), to show how much of the gap is that setting.
ENGINES = ("ours-fp32", "ours-fp32/native", "ours-bf16", "openclip-fp32", "openclip-fp32/mallopt", "openclip-bf16")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="EVA02-CLIP-B-16", help="our model name")
    p.add_argument("--openclip-model", default="EVA02-B-16")
    p.add_argument("--tower", choices=["image", "text"], default="image",
                   help="encoder to time (text: the same token ids for both, EVA02-B-16's 77-token context)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="passes over all engines (alternating)")
    p.add_argument("--iters", type=int, default=3, help="timed iterations per engine per round (after warmup)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--no-rewrites", dest="rewrites", action="store_false", help="export without the oneDNN rewrites")
    p.add_argument("--fused-ln", action="store_true", help="export with the fused-norm custom op (default: native)")
    p.add_argument("--no-peak", dest="peak", action="store_false")
    p.add_argument("--wait-policy", choices=["passive", "default"], default="passive",
                   help="OMP_WAIT_POLICY for every engine: passive (idle OpenMP threads sleep instead of "
                        "spinning; fairer on a shared CPU) or each runtime's default")
    p.add_argument("--workdir", default=None, help="keep the export here (default: a temp folder)")
    p.add_argument("--out", default=None, help="write the results as JSON")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--export-dir", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def text_encoder_flops(cfg) -> float:
    """Multiply-adds x2 of one text (full context) through the text tower (GEMMs and attention)."""
    t, w = cfg.text_cfg.context_length, cfg.text_cfg.width
    h = int(w * cfg.text_cfg.mlp_ratio)
    per_block = 2 * t * w * 3 * w + 2 * 2 * t * t * w + 2 * t * w * w + 2 * 2 * t * w * h
    return float(cfg.text_cfg.layers * per_block + 2 * w * cfg.embed_dim)


def _inputs(cfg, tower, batch):
    """Random pixels, or token ids (SOT, a few tokens, EOT) from the exporter's sampler."""
    import numpy as np

    from evaclip_paddle.export.export import _sample_input
    if tower == "text":
        return _sample_input(cfg, "text", batch)
    s = cfg.vision_cfg.image_size
    return np.random.RandomState(0).randn(batch, 3, s, s).astype("float32")


def image_encoder_flops(cfg) -> float:
    """Multiply-adds x2 of one image through the vision tower (GEMMs and attention; norms ignored)."""
    v = cfg.vision_cfg
    t = v.grid_size ** 2 + 1
    w, h = v.width, v.mlp_hidden
    per_block = 2 * t * w * 3 * w + 2 * 2 * t * t * w + 2 * t * w * w
    per_block += (3 if v.naiveswiglu else 2) * 2 * t * w * h
    patch = 2 * (t - 1) * w * v.in_chans * v.patch_size ** 2
    return float(v.layers * per_block + patch + 2 * w * cfg.embed_dim)


# ------------------------------------------------------------------------------------------------ workers
def _timeit(fn, warmup, iters, cpu=None):
    """Wall times (and, into `cpu`, process CPU times: less sensitive to other load on the machine)."""
    out = None
    for _ in range(warmup):
        out = fn()
    ts = []
    for _ in range(iters):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        ts.append(time.perf_counter() - t)
        if cpu is not None:
            cpu.append(time.process_time() - c)
    return ts, out


def worker_ours(a, precision, variant):
    import numpy as np
    from evaclip_paddle.inference import EVACLIPPredictor

    pred = EVACLIPPredictor(a.export_dir, threads=a.threads, precision=precision, max_batch=a.batch,
                            kernels=variant or "auto")
    import evaclip_paddle as ec
    tower = pred.tower(a.tower)
    x = _inputs(ec.get_model_config(a.model), a.tower, a.batch)
    cpu = []
    ts, out = _timeit(lambda: tower(x), a.warmup, a.iters, cpu)
    return {"times": ts, "cpu_times": cpu, "precision_used": f"{tower.precision_used} {tower.program}", "out": out}


def worker_openclip(a, precision, variant):
    import numpy as np
    import open_clip
    import torch

    if variant == "mallopt":
        from evaclip_paddle.perf import tune_malloc
        assert tune_malloc(), "mallopt failed"

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)  # same random weights in every worker, so bf16 and fp32 outputs compare
    import evaclip_paddle as ec
    full = open_clip.create_model(a.openclip_model, pretrained=None).eval()
    x = torch.from_numpy(_inputs(ec.get_model_config(a.model), a.tower, a.batch))
    encode = full.visual if a.tower == "image" else full.encode_text

    def run():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            return encode(x).float().numpy()
    cpu = []
    ts, out = _timeit(run, a.warmup, a.iters, cpu)
    return {"times": ts, "cpu_times": cpu, "precision_used": f"{precision} {variant or 'eager'}", "out": out}


def worker_peak(a):
    """bf16 GEMM rates: torch matmul 4096^3, and a Paddle Inference oneDNN-bf16 MLP stack."""
    import numpy as np
    import paddle
    import torch

    torch.set_num_threads(a.threads)
    n = 4096
    x, y = torch.randn(n, n).bfloat16(), torch.randn(n, n).bfloat16()
    ts, _ = _timeit(lambda: torch.matmul(x, y), 1, 5)
    res = {"torch_bf16_matmul_4096": 2 * n ** 3 / min(ts)}

    from evaclip_paddle.export.predictor import EncoderPredictor
    mlp = paddle.nn.Sequential(*[paddle.nn.Sequential(paddle.nn.Linear(768, 3072), paddle.nn.Linear(3072, 768))
                                 for _ in range(4)])  # 8 GEMM layers, as in FACTS.md
    spec = paddle.static.InputSpec([None, 197, 768], "float32", name="x")
    prefix = os.path.join(a.export_dir, "mlp_peak", "model")
    paddle.jit.save(paddle.jit.to_static(mlp, input_spec=[spec], full_graph=True), prefix)
    pred = EncoderPredictor(prefix + ".json", prefix + ".pdiparams", threads=a.threads, precision="bf16")
    xin = np.random.RandomState(0).randn(8, 197, 768).astype("float32")
    ts, _ = _timeit(lambda: pred(xin), 2, 10)
    res["paddle_inference_bf16_mlp_stack"] = 8 * 2 * 8 * 197 * 768 * 3072 / min(ts)
    return res


def run_worker(a):
    import numpy as np

    if a.worker == "peak":
        res = worker_peak(a)
    else:
        engine, _, variant = a.worker.partition("/")
        kind, precision = engine.split("-")
        res = (worker_ours if kind == "ours" else worker_openclip)(a, precision, variant)
        np.save(os.path.join(a.export_dir, f"out_{a.worker.replace('/', '_')}.npy"), res.pop("out"))
    print("RESULT " + json.dumps(res), flush=True)


def spawn(a, worker: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", worker, "--export-dir", a.export_dir,
           "--wait-policy", a.wait_policy,
           "--tower", a.tower, "--model", a.model, "--batch", str(a.batch), "--threads", str(a.threads),
           "--iters", str(a.iters), "--warmup", str(a.warmup),
           "--openclip-model", a.openclip_model]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads), GLOG_minloglevel="2")
    if a.wait_policy == "passive":  # read by both Paddle's (Intel) and torch's (GNU) OpenMP runtimes
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"worker {worker} failed (rc {p.returncode}):\n{p.stderr[-3000:]}")


# ------------------------------------------------------------------------------------------------ main
def main(argv=None):
    a = parse_args(argv)
    if a.worker:
        return run_worker(a)
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    import numpy as np

    import evaclip_paddle as ec
    from evaclip_paddle.export import export_model

    engines = [e for e in a.engines.split(",") if e]
    tmp = None
    if a.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_infer_")
        a.workdir = tmp.name
    a.export_dir = os.path.join(a.workdir, a.tower)
    cfg = ec.get_model_config(a.model)
    unit = "images" if a.tower == "image" else "texts"
    flops = (image_encoder_flops if a.tower == "image" else text_encoder_flops)(cfg) * a.batch
    meta_path = os.path.join(a.export_dir, "export.json")
    have = json.load(open(meta_path))["towers"] if os.path.isfile(meta_path) else {}
    if any(e.startswith("ours") for e in engines) and a.tower not in have:
        t0 = time.time()
        model = ec.create_model(a.model, seed=0, fused_ln=a.fused_ln)
        export_model(model, a.export_dir, towers=[a.tower], verify=False, rewrites=a.rewrites)
        del model
        print(f"exported {a.model} {a.tower} tower in {time.time() - t0:.0f}s -> {a.export_dir}", flush=True)

    times = {e: [] for e in engines}
    cpu_times = {e: [] for e in engines}
    used = {}
    for r in range(a.rounds):
        for e in engines:
            res = spawn(a, e)
            times[e] += res["times"]
            cpu_times[e] += res["cpu_times"]
            used[e] = res["precision_used"]
            print(f"round {r + 1}: {e:14s} wall " + " ".join(f"{t:.2f}s" for t in res["times"]) +
                  "  cpu " + " ".join(f"{t:.2f}s" for t in res["cpu_times"]), flush=True)
    peak = spawn(a, "peak") if a.peak else {}

    med = {e: float(np.median(ts)) for e, ts in times.items()}
    cpu_med = {e: float(np.median(ts)) for e, ts in cpu_times.items()}
    ips = {e: a.batch / t for e, t in med.items()}
    peak_rate = max(peak.values()) if peak else None
    rows = []
    for e in engines:
        row = {"engine": e, "precision_used": used[e], "median_s": med[e], f"{unit}_per_s": ips[e],
               "tflops": flops / med[e] / 1e12, "all_times": times[e], "cpu_median_s": cpu_med[e],
               "all_cpu_times": cpu_times[e]}
        for ref in ("openclip-fp32", "openclip-bf16"):
            if ref in ips:
                row[f"x_{ref}"] = ips[e] / ips[ref]
                row[f"cpu_x_{ref}"] = cpu_med[ref] / cpu_med[e]
        if peak_rate:
            row["frac_bf16_peak"] = flops / med[e] / peak_rate
        rows.append(row)
    agree = {}
    for lo, hi in (("ours-bf16", "ours-fp32"), ("ours-fp32_native", "ours-fp32"), ("openclip-bf16", "openclip-fp32")):
        f1, f2 = (os.path.join(a.export_dir, f"out_{x}.npy") for x in (lo, hi))
        if os.path.isfile(f1) and os.path.isfile(f2):
            u, v = np.load(f1), np.load(f2)
            cos = (u * v).sum(1) / np.linalg.norm(u, axis=1) / np.linalg.norm(v, axis=1)
            agree[f"{lo}_vs_{hi}_min_cosine"] = float(cos.min())

    size = f"{cfg.vision_cfg.image_size} px" if a.tower == "image" else f"{cfg.text_cfg.context_length} tokens"
    print(f"\n{a.model} {a.tower} encoder, batch {a.batch}, {size}, {a.threads} threads, "
          f"{flops / a.batch / 1e9:.1f} GFLOP/{unit[:-1]}; median of {a.rounds}x{a.iters} iterations; "
          f"OpenMP wait policy: {a.wait_policy}")
    head = (f"| engine | runs as | {unit}/s | s/batch | vs open_clip fp32 | vs open_clip bf16 | TFLOP/s | of bf16 peak "
            "| CPU s/batch | CPU-time vs open_clip fp32 / bf16 |")
    print(head + "\n|" + "---|" * 10)
    nan = float("nan")
    for r in rows:
        print(f"| {r['engine']} | {r['precision_used']} | {r[f'{unit}_per_s']:.2f} | {r['median_s']:.2f} | "
              f"{r.get('x_openclip-fp32', nan):.2f}x | {r.get('x_openclip-bf16', nan):.2f}x | "
              f"{r['tflops']:.3f} | {100 * r.get('frac_bf16_peak', nan):.0f}% | {r['cpu_median_s']:.2f} | "
              f"{r.get('cpu_x_openclip-fp32', nan):.2f}x / {r.get('cpu_x_openclip-bf16', nan):.2f}x |")
    if peak:
        print("bf16 GEMM peak: " + ", ".join(f"{k} {v / 1e12:.2f} TFLOP/s" for k, v in peak.items()))
    for k, v in agree.items():
        print(f"{k}: {v:.4f}")
    targets = {}
    if {"ours-fp32", "openclip-fp32"} <= set(ips):
        targets["fp32 >= 1.0x open_clip fp32"] = ips["ours-fp32"] / ips["openclip-fp32"] >= 1.0
    if {"ours-bf16", "openclip-fp32"} <= set(ips):
        targets["bf16 >= 3x open_clip fp32"] = ips["ours-bf16"] / ips["openclip-fp32"] >= 3.0
    if {"ours-bf16", "openclip-bf16"} <= set(ips):
        targets["bf16 >= 1.0x open_clip bf16"] = ips["ours-bf16"] / ips["openclip-bf16"] >= 1.0
    for k, ok in targets.items():
        print(f"target {k}: {'met' if ok else 'MISSED'}")
    result = {"model": a.model, "openclip_model": a.openclip_model, "tower": a.tower, "batch": a.batch, "threads": a.threads,
              f"gflop_per_{unit[:-1]}": flops / a.batch / 1e9, "rows": rows, "peak_flops": peak, "agreement": agree,
              "targets": targets, "rewrites": a.rewrites, "fused_ln": a.fused_ln, "wait_policy": a.wait_policy}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
    if tmp is not None:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
