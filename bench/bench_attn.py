"""Native Paddle vs the fused_ln CPU kernels for RoPE, the attention softmax and attention.

    python bench/bench_attn.py --threads 2 --out bench_attn.json

Cases (EVA02 B-16 shapes): RoPE on q-shaped [B, 197, 12, 64] against the model's
apply_rope (x * cos + matmul(x, rot) * sin, tables materialised over the heads); the softmax of
[B, 12, 197, 197] scores against F.softmax(x * scale); fused_attn.attention against
F.scaled_dot_product_attention (vision [8, 197, 12, 64], text [32, 77, 8, 64] with the causal mask,
and [32, 197, 12, 64] forward only). Forward runs under no_grad; fwd_bwd takes the grads of the
inputs. Under no_grad fused_attn.attention runs the evaclip_attention_fwd kernel; the
"attention infer" rows also time the matmul + fused softmax path it replaces (column "prev"). Runs under perf.configure_cpu, as training and eval do. Medians of --repeats runs after
--warmup; native and fused alternate inside every repeat so a noisy machine slows both alike.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="threads for Paddle and the ops")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=None, help="write results as JSON here")
    p.add_argument("--only", default="", help="run only the ops whose name contains this (rope, softmax, ...)")
    return p.parse_args()


def time_pair(fns, inputs, dy, modes, warmup, repeats):
    """(median, min) ms per (fn name, mode), the fns alternating inside every repeat."""
    import paddle

    def run(f, mode):
        if mode == "fwd":
            with paddle.no_grad():
                f(*inputs)
        else:
            paddle.grad([f(*inputs)], [t for t in inputs if not t.stop_gradient], [dy])

    times = {(n, m): [] for n in fns for m in modes}
    for i in range(warmup + repeats):
        for mode in modes:
            for name, f in fns.items():
                t0 = time.perf_counter()
                run(f, mode)
                if i >= warmup:
                    times[(name, mode)].append((time.perf_counter() - t0) * 1e3)
    return {k: (statistics.median(v), min(v)) for k, v in times.items()}


def cases():
    """(op, shape, native fn, fused fn, inputs, dy, modes) for every benchmark row."""
    import paddle
    import paddle.nn.functional as F

    from evaclip_paddle.model.rope import VisionRotaryEmbedding, apply_rope
    from evaclip_paddle.model.transformer import causal_mask
    from evaclip_paddle.ops import fused_attn

    def leaf(shape):
        t = paddle.randn(shape)
        t.stop_gradient = False
        return t

    both = ("fwd", "fwd_bwd")
    for b in (8, 32):
        emb = VisionRotaryEmbedding(64, 14)
        cos, sin, rot = emb.tables(heads=12)
        x = leaf([b, 197, 12, 64])
        yield ("rope", x.shape, lambda x: apply_rope(x, cos, sin, rot),
               lambda x: fused_attn.rope(x, emb.cos, emb.sin), [x], paddle.randn(x.shape), both)
    for b in (8, 32):
        s = leaf([b, 12, 197, 197])
        yield ("softmax", s.shape, lambda s: F.softmax(s * 0.125), lambda s: fused_attn.softmax(s, 0.125),
               [s], paddle.randn(s.shape), both)
    for shape, causal, modes in (([8, 197, 12, 64], False, both), ([32, 77, 8, 64], True, both),
                                 ([32, 197, 12, 64], False, ("fwd",))):
        mask = causal_mask(shape[1]) if causal else None
        qkv = [leaf(shape) for _ in range(3)]
        yield ("attention" + (" causal" if causal else ""), shape,
               lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
               lambda q, k, v: fused_attn.attention(q, k, v, mask), qkv, paddle.randn(shape), modes)
    for shape, causal in (([32, 197, 12, 64], False), ([32, 77, 8, 64], True)):
        mask = causal_mask(shape[1]) if causal else None
        qkv = [leaf(shape) for _ in range(3)]
        yield ("attention infer" + (" causal" if causal else ""), shape,
               lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
               lambda q, k, v: fused_attn.attention(q, k, v, mask), qkv, None, ("fwd",),
               lambda q, k, v: previous_attention(q, k, v, mask))


def previous_attention(q, k, v, mask):
    """fused_attn.attention without the inference kernel: transposes, matmuls, fused softmax."""
    from evaclip_paddle.ops import fused_attn

    fused_attn.USE_INFERENCE_OP = False
    try:
        return fused_attn.attention(q, k, v, mask)
    finally:
        fused_attn.USE_INFERENCE_OP = True


def main():
    args = parse_args()
    # `import paddle` pins OMP_NUM_THREADS to 1 unless it is already set: set it first.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import paddle

    from evaclip_paddle.ops import fused_attn, fused_norm
    from evaclip_paddle.perf import configure_cpu

    configure_cpu(args.threads)  # the training/eval CPU settings: oneDNN, no stride kernels, malloc, FTZ
    fused_norm.load_op(jit=True, strict=True)
    fused_norm.set_num_threads(args.threads)
    assert fused_attn.available(), "the loaded fused_ln library has no RoPE/softmax kernels"
    paddle.seed(0)

    results = []
    for op, shape, native, fused, inputs, dy, modes, *prev in cases():
        if args.only not in op:
            continue
        fns = {"native": native, "fused": fused, **({"prev": prev[0]} if prev else {})}
        t = time_pair(fns, inputs, dy, modes, args.warmup, args.repeats)
        for mode in modes:
            (n, n_min), (f, f_min) = t[("native", mode)], t[("fused", mode)]
            row = {"op": op, "shape": list(shape), "mode": mode, "native_ms": n, "fused_ms": f,
                   "speedup": n / f, "native_min_ms": n_min, "fused_min_ms": f_min}
            extra = ""
            if prev:
                row["prev_ms"], row["prev_min_ms"] = t[("prev", mode)]
                extra = f"   prev {row['prev_ms']:.2f} ({row['prev_ms'] / f:.2f}x)"
            results.append(row)
            print(f"{op:<24}{str(tuple(shape)):<20}{mode:<9}{n:>10.2f}{f:>10.2f}{n / f:>8.2f}x"
                  f"{n_min:>10.2f}{f_min:>10.2f}{n_min / f_min:>8.2f}x{extra}", flush=True)
    print(f"(native ms, fused ms, speedup: median, then min, of {args.repeats}) threads={args.threads} "
          f"paddle {paddle.__version__} op: {fused_norm._state['how']}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"threads": args.threads, "repeats": args.repeats, "warmup": args.warmup,
                       "paddle": paddle.__version__, "machine": platform.platform(),
                       "cpu_count": os.cpu_count(), "results": results}, fh, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
