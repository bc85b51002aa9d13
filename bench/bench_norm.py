"""Native Paddle LayerNorm / RMSNorm vs the fused_ln custom op, side by side on this CPU.

    python bench/bench_norm.py --threads 2 --out bench_norm.json

Each case times forward (no autograd) and forward+backward (grads of x, weight, bias) as the
median of --repeats runs after --warmup runs; native and fused calls alternate inside every
repeat so a noisy machine slows both alike. The op is taken from the installed `fused_ln`
package, else JIT-built into ~/.cache/evaclip_paddle/ops.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

SHAPES = [(64, 197, 768), (16, 257, 1408), (8, 257, 4096)]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="threads for Paddle and the op")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=None, help="write results as JSON here")
    p.add_argument("--quick", action="store_true", help="smallest shape only, 5 repeats")
    return p.parse_args()


def main():
    args = parse_args()
    # `import paddle` pins OMP_NUM_THREADS to 1 unless it is already set: set it first.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import paddle
    import paddle.nn.functional as F

    from evaclip_paddle.ops import fused_norm

    paddle.base.core.set_num_threads(args.threads)  # MKL / oneDNN math threads
    mod = fused_norm.load_op(jit=True, strict=True)
    fused_norm.set_num_threads(args.threads)
    try:
        from paddle.incubate.nn.functional import fused_rms_norm as paddle_rms_kernel
    except ImportError:
        paddle_rms_kernel = None

    shapes = SHAPES[:1] if args.quick else SHAPES
    repeats = 5 if args.quick else args.repeats
    eps = 1e-5

    def native_rms(x, w):
        return x * paddle.rsqrt(x.square().mean(axis=-1, keepdim=True) + eps) * w

    def run_case(fns, x, params, dy, modes=("fwd", "fwd_bwd")):
        """Median (and min) ms per mode for each named fn, alternating the fns every repeat."""

        def fwd(f):
            with paddle.no_grad():
                f(x, *params)

        def fwd_bwd(f):
            y = f(x, *params)
            paddle.grad([y], [x, *params], [dy])

        runners = {"fwd": fwd, "fwd_bwd": fwd_bwd}
        times = {name: {m: [] for m in modes} for name in fns}
        for i in range(args.warmup + repeats):
            for mode in modes:
                for name, f in fns.items():
                    t0 = time.perf_counter()
                    runners[mode](f)
                    dt = (time.perf_counter() - t0) * 1e3
                    if i >= args.warmup:
                        times[name][mode].append(dt)
        return {
            n: {m: statistics.median(v) for m, v in d.items()} | {m + "_min": min(v) for m, v in d.items()}
            for n, d in times.items()
        }

    results = []
    for shape in shapes:
        d = shape[-1]
        paddle.seed(0)
        x = paddle.randn(shape)
        x.stop_gradient = False
        w = paddle.rand([d]) + 0.5
        b = paddle.randn([d])
        w.stop_gradient = b.stop_gradient = False
        dy = paddle.randn(shape)

        ln = run_case(
            {
                "native": lambda x, w, b: F.layer_norm(x, [d], w, b, eps),
                "fused": lambda x, w, b: mod.evaclip_layer_norm(x, w, b, eps)[0],
            },
            x, (w, b), dy,
        )
        rms = run_case(
            {"native": native_rms, "fused": lambda x, w: mod.evaclip_rms_norm(x, w, eps)[0]}, x, (w,), dy
        )
        if paddle_rms_kernel is not None:  # Paddle's own RMSNorm kernel: forward only on CPU
            try:  # (its grad kernel, fused_rms_norm_quant_grad, is not registered for CPU)
                kernel = run_case(
                    {"paddle_kernel": lambda x, w: paddle_rms_kernel(x, w, None, eps, x.ndim - 1)[0]},
                    x, (w,), dy, modes=("fwd",),
                )
                rms["paddle_kernel"] = kernel["paddle_kernel"]
            except Exception as e:  # noqa: BLE001
                print(f"incubate fused_rms_norm skipped: {type(e).__name__}: {str(e)[:120]}")
        for op, r, native_name in (
            ("layer_norm", ln, "F.layer_norm"),
            ("rms_norm", rms, "composite math"),
        ):
            for mode in ("fwd", "fwd_bwd"):
                row = {
                    "op": op,
                    "shape": list(shape),
                    "mode": mode,
                    "native": native_name,
                    "native_ms": r["native"][mode],
                    "fused_ms": r["fused"][mode],
                    "speedup": r["native"][mode] / r["fused"][mode],
                    "native_min_ms": r["native"][mode + "_min"],
                    "fused_min_ms": r["fused"][mode + "_min"],
                    "speedup_of_min": r["native"][mode + "_min"] / r["fused"][mode + "_min"],
                }
                if mode in r.get("paddle_kernel", {}):
                    row["paddle_rms_kernel_ms"] = r["paddle_kernel"][mode]
                results.append(row)

    print(f"\nthreads={args.threads}  repeats={repeats}  paddle {paddle.__version__}  "
          f"op: {fused_norm._state['how']}  cpu: {platform.processor() or platform.machine()}")
    head = (f"{'op':<11}{'shape':<17}{'mode':<9}{'native ms':>11}{'fused ms':>10}{'speedup':>9}"
            f"{'(of min)':>10}{'paddle rms kernel ms':>22}")
    print(head)
    print("-" * len(head))
    for r in results:
        extra = f"{r['paddle_rms_kernel_ms']:>22.2f}" if "paddle_rms_kernel_ms" in r else ""
        print(f"{r['op']:<11}{str(tuple(r['shape'])):<17}{r['mode']:<9}{r['native_ms']:>11.2f}"
              f"{r['fused_ms']:>10.2f}{r['speedup']:>8.2f}x{r['speedup_of_min']:>9.2f}x{extra}")
    print("native: layer_norm = F.layer_norm; rms_norm = x * rsqrt(mean(x^2) + eps) * w in Paddle ops;")
    print("paddle rms kernel = paddle.incubate.nn.functional.fused_rms_norm (no CPU backward). ms = median.")

    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "threads": args.threads,
                    "repeats": repeats,
                    "warmup": args.warmup,
                    "paddle": paddle.__version__,
                    "op_source": fused_norm._state["how"],
                    "machine": platform.platform(),
                    "cpu_count": os.cpu_count(),
                    "results": results,
                },
                f,
                indent=2,
            )
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
