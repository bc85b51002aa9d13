"""Single-GPU training throughput and MFU (needs a CUDA build of Paddle; exits with a message otherwise).

    python bench/bench_gpu.py [--model EVA02-CLIP-L-14] [--batch 64] [--steps 10] [--peak_tflops auto]

One train step = forward of both towers in bf16 autocast (O1), ClipLoss, backward, AdamW step;
recompute optional. Reports samples/s and model FLOPs utilisation against the GPU's dense bf16 peak
(looked up by device name, or given with --peak_tflops). Writes JSON with --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets.
PEAKS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "V100": 125.0}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="EVA02-CLIP-L-14")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--recompute", action="store_true")
    ap.add_argument("--peak_tflops", default="auto")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import paddle
    if not paddle.is_compiled_with_cuda() or paddle.device.cuda.device_count() == 0:
        print("bench_gpu: no CUDA device visible to Paddle (install a paddlepaddle-gpu 3.x build); nothing run")
        return 2
    paddle.set_device("gpu")
    import evaclip_paddle as ec
    from bench_train import model_flops

    model = ec.create_model(args.model, seed=0, grad_checkpointing=args.recompute)
    model.train()
    opt = paddle.optimizer.AdamW(1e-5, parameters=model.parameters(), weight_decay=0.05)
    s = model.cfg.vision_cfg.image_size
    img = paddle.randn([args.batch, 3, s, s])
    ids = paddle.randint(1, 49406, [args.batch, model.cfg.text_cfg.context_length])
    labels = paddle.arange(args.batch)

    def step():
        with paddle.amp.auto_cast(dtype="bfloat16", level="O1"):
            a, t, scale = model(img, ids)
            logits = (scale * a @ t.T).astype("float32")
        loss = (paddle.nn.functional.cross_entropy(logits, labels)
                + paddle.nn.functional.cross_entropy(logits.T, labels)) / 2
        loss.backward()
        opt.step()
        opt.clear_grad()
        return loss

    for _ in range(2):
        step()
    paddle.device.synchronize()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        paddle.device.synchronize()
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    name = paddle.device.cuda.get_device_name()
    peak = float(args.peak_tflops) if args.peak_tflops != "auto" else next(
        (v for k, v in PEAKS.items() if k in name), None)
    flops = model_flops(model.cfg, args.batch, train=True)
    result = {"model": args.model, "batch": args.batch, "device": name, "step_s": sec,
              "samples_per_s": args.batch / sec, "tflops": flops / sec / 1e12,
              "mfu": (flops / sec / 1e12 / peak) if peak else None,
              "peak_mem_gib": paddle.device.cuda.max_memory_allocated() / 2 ** 30}
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
