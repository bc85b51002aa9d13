"""Side-by-side throughput: evaclip_paddle vs open_clip (PyTorch) on the same machine, same threads.

    python bench/bench_train.py [--model EVA02-CLIP-B-16] [--batches 8 32] [--iters 3] [--warmup 2] [--out bench/results/train.json]

Measures, interleaving the two frameworks iteration by iteration so machine noise hits both alike:
train step (fwd + ClipLoss + bwd + AdamW) samples/s per batch size, image inference images/s,
text encode sentences/s, peak RSS of each framework (separate subprocesses), this machine's fp32
GEMM peak, and the fraction of it each implementation reaches (model FLOPs / time / peak).
Prints a table of ratios (ours / open_clip) and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

THREADS = int(os.environ.get("BENCH_THREADS", "2"))
os.environ["OMP_NUM_THREADS"] = str(THREADS)  # before paddle/torch import: paddle pins 1 otherwise
# The library's pre-import settings (perf.set_gomp_spincount) need it imported before paddle;
# open_clip shares the process (and libgomp) with it: measured alone, torch is unaffected by them.
import evaclip_paddle  # noqa: E402,F401

OPEN_CLIP_NAME = {"EVA02-CLIP-B-16": "EVA02-B-16", "EVA02-CLIP-L-14": "EVA02-L-14", "EVA01-CLIP-g-14": "EVA01-g-14"}


def model_flops(cfg, batch: int, train: bool, tower: str = "both") -> float:
    """Matmul FLOPs of one forward (x3 for forward+backward) of both towers."""
    v, t = cfg.vision_cfg, cfg.text_cfg
    n = v.grid_size ** 2 + 1
    mlp = (3 if v.naiveswiglu else 2) * v.width * v.mlp_hidden
    vis = v.layers * n * 2 * (4 * v.width ** 2 + mlp) + v.layers * 4 * n * n * v.width
    vis += (n - 1) * 2 * 3 * v.patch_size ** 2 * v.width + 2 * v.width * cfg.embed_dim
    L = t.context_length
    txt = t.layers * L * 2 * (4 * t.width ** 2 + 2 * t.width * t.mlp_hidden) + t.layers * 4 * L * L * t.width
    total = {"both": vis + txt, "image": vis, "text": txt}[tower] * batch
    return total * (3 if train else 1)


def gemm_peak(fw: str, n: int = 2048, reps: int = 5) -> float:
    if fw == "torch":
        import torch
        a, b = torch.randn(n, n), torch.randn(n, n)
        mm = lambda: torch.mm(a, b)  # noqa: E731
    else:
        import paddle
        a, b = paddle.randn([n, n]), paddle.randn([n, n])
        mm = lambda: float(paddle.matmul(a, b)[0, 0])  # noqa: E731  (sync)
    mm()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        mm()
        ts.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(ts) / 1e9


class Ours:
    name = "evaclip_paddle"

    def __init__(self, model_name: str):
        import paddle
        import evaclip_paddle as ec
        from evaclip_paddle.perf import configure_cpu
        configure_cpu(THREADS)
        self.paddle = paddle
        self.model = ec.create_model(model_name, seed=0)
        self.cfg = self.model.cfg
        self.opt = paddle.optimizer.AdamW(1e-5, parameters=self.model.parameters(), weight_decay=0.05)

    def data(self, b):
        p = self.paddle
        s = self.cfg.vision_cfg.image_size
        return p.randn([b, 3, s, s]), p.randint(1, 49406, [b, 77])

    def train_step(self, img, ids):
        p = self.paddle
        self.model.train()
        a, t, s = self.model(img, ids)
        logits = s * a @ t.T
        labels = p.arange(a.shape[0])
        loss = (p.nn.functional.cross_entropy(logits, labels) + p.nn.functional.cross_entropy(logits.T, labels)) / 2
        loss.backward()
        self.opt.step()
        self.opt.clear_grad()
        return float(loss)

    def encode_image(self, img):
        self.model.eval()
        with self.paddle.no_grad():
            return float(self.model.encode_image(img)[0, 0])

    def encode_text(self, ids):
        self.model.eval()
        with self.paddle.no_grad():
            return float(self.model.encode_text(ids)[0, 0])


class Theirs:
    name = "open_clip"

    def __init__(self, model_name: str):
        import open_clip
        import torch
        torch.set_num_threads(THREADS)
        # Subnormals flushed for both frameworks (ours: perf.configure_cpu), so the setting itself
        # earns neither side anything; BENCH_TORCH_FLUSH=0 measures open_clip's default instead.
        torch.set_flush_denormal(os.environ.get("BENCH_TORCH_FLUSH", "1") == "1")
        torch.manual_seed(0)
        self.torch = torch
        self.model = open_clip.create_model(OPEN_CLIP_NAME[model_name], pretrained=None)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5, weight_decay=0.05)
        self.size = self.model.visual.image_size[0] if isinstance(self.model.visual.image_size, tuple) else 224

    def data(self, b):
        t = self.torch
        return t.randn(b, 3, self.size, self.size), t.randint(1, 49406, (b, 77))

    def train_step(self, img, ids):
        t = self.torch
        self.model.train()
        a, txt, s = self.model(img, ids)[:3]
        logits = s * a @ txt.T
        labels = t.arange(a.shape[0])
        loss = (t.nn.functional.cross_entropy(logits, labels) + t.nn.functional.cross_entropy(logits.T, labels)) / 2
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()
        return float(loss)

    def encode_image(self, img):
        self.model.eval()
        with self.torch.no_grad():
            return float(self.model.encode_image(img)[0, 0])

    def encode_text(self, ids):
        self.model.eval()
        with self.torch.no_grad():
            return float(self.model.encode_text(ids)[0, 0])


def interleaved(fns, iters, warmup=2):
    """Median seconds of each fn, alternating fns each iteration after `warmup` calls each (Paddle's
    first steps page-fault heavily while its allocator grows: one warm-up call understates it)."""
    for _ in range(warmup):
        for f in fns:
            f()
    times = [[] for _ in fns]
    for _ in range(iters):
        for i, f in enumerate(fns):
            t0 = time.perf_counter()
            f()
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def rss_child(fw: str, model: str, batch: int):
    """Peak RSS (MiB) of a fresh process doing two train steps with one framework. VmHWM, not
    ru_maxrss: the latter survives execve, so a child would report its parent's peak."""
    code = (f"import sys; sys.argv=['x']; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r});"
            f"import bench_train as b; m=(b.Ours if {fw!r}=='ours' else b.Theirs)({model!r});"
            f"d=m.data({batch}); m.train_step(*d); m.train_step(*d);"
            f"print([int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')][0]/1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    try:
        return float(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="EVA02-CLIP-B-16", choices=sorted(OPEN_CLIP_NAME))
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls of each fn before timing")
    ap.add_argument("--infer_batch", type=int, default=32)
    ap.add_argument("--no_rss", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "train.json"))
    args = ap.parse_args(argv)

    ours, theirs = Ours(args.model), Theirs(args.model)
    rows = []
    for b in args.batches:
        d1, d2 = ours.data(b), theirs.data(b)
        t1, t2 = interleaved([lambda: ours.train_step(*d1), lambda: theirs.train_step(*d2)], args.iters, args.warmup)
        fl = model_flops(ours.cfg, b, True)
        rows.append((f"train step b{b} (samples/s)", b / t1, b / t2, fl / t1 / 1e9, fl / t2 / 1e9))
    b = args.infer_batch
    d1, d2 = ours.data(b), theirs.data(b)
    t1, t2 = interleaved([lambda: ours.encode_image(d1[0]), lambda: theirs.encode_image(d2[0])], args.iters, args.warmup)
    fl = model_flops(ours.cfg, b, False, "image")
    rows.append((f"encode_image b{b} (images/s)", b / t1, b / t2, fl / t1 / 1e9, fl / t2 / 1e9))
    t1, t2 = interleaved([lambda: ours.encode_text(d1[1]), lambda: theirs.encode_text(d2[1])], args.iters, args.warmup)
    fl = model_flops(ours.cfg, b, False, "text")
    rows.append((f"encode_text b{b} (texts/s)", b / t1, b / t2, fl / t1 / 1e9, fl / t2 / 1e9))
    peak_p, peak_t = gemm_peak("paddle"), gemm_peak("torch")
    peak = max(peak_p, peak_t)

    print(f"\n{args.model}, {THREADS} threads; fp32 GEMM peak 2048^3: paddle {peak_p:.0f}, torch {peak_t:.0f} GFLOP/s")
    print(f"{'metric':32s} {'ours':>9s} {'open_clip':>9s} {'ratio':>6s} {'ours %peak':>10s} {'oc %peak':>9s}")
    result = {"model": args.model, "threads": THREADS, "gemm_peak_gflops": {"paddle": peak_p, "torch": peak_t},
              "rows": []}
    for name, a, c, fa, fc in rows:
        print(f"{name:32s} {a:9.2f} {c:9.2f} {a / c:6.2f} {100 * fa / peak:9.1f}% {100 * fc / peak:8.1f}%")
        result["rows"].append({"metric": name, "ours": a, "open_clip": c, "ratio": a / c,
                               "ours_frac_peak": fa / peak, "open_clip_frac_peak": fc / peak})
    if not args.no_rss:
        b0 = args.batches[0]
        r1, r2 = rss_child("ours", args.model, b0), rss_child("theirs", args.model, b0)
        if r1 and r2:
            print(f"{'peak RSS train b%d (MiB)' % b0:32s} {r1:9.0f} {r2:9.0f} {r1 / r2:6.2f}")
            result["peak_rss_mib"] = {"ours": r1, "open_clip": r2, "batch": b0}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
