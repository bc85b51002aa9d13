"""Zero-shot evaluation throughput, evaclip_paddle vs open_clip (PyTorch), same weights, same threads, CPU.

    python bench/bench_eval.py [--model EVA02-CLIP-B-16] [--batch_size 32] [--iters 3] [--out FILE.json]

Per batch: preprocess `batch_size` photos (each side its own transform), encode, normalise, logits
against a 1000-class classifier (built once beforehand, as the cache does). The two frameworks alternate
batch by batch so that machine noise hits both alike. Paddle runs once plain and once with oneDNN
(FLAGS_use_mkldnn). Reports images/s and the ratio ours / open_clip. One random state dict, converted
from open_clip's layout by the library's converter, serves both sides.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections import OrderedDict

THREADS = int(os.environ.get("BENCH_THREADS", "2"))
os.environ["OMP_NUM_THREADS"] = str(THREADS)  # before paddle/torch import: paddle pins 1 otherwise

OPEN_CLIP_NAME = {"EVA02-CLIP-B-16": "EVA02-B-16", "EVA02-CLIP-L-14": "EVA02-L-14", "EVA01-CLIP-g-14": "EVA01-g-14"}


def photos(n):
    """n RGB photos from scikit-image's offline samples, cycled."""
    import skimage.data
    from PIL import Image

    names = ["astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle", "horse", "camera"]
    imgs = []
    for name in names:
        a = getattr(skimage.data, name)()
        a = a[0] if isinstance(a, tuple) else a
        imgs.append(Image.fromarray(a).convert("RGB") if a.ndim == 2 or a.dtype == bool else Image.fromarray(a))
    return [imgs[i % len(imgs)] for i in range(n)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="EVA02-CLIP-B-16")
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--iters", type=int, default=3, help="timed batches per side (after one warm-up)")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--out", default=None, help="write the result JSON here")
    args = ap.parse_args(argv)

    import numpy as np
    import open_clip
    import paddle
    import paddle.nn.functional as F
    import torch

    from evaclip_paddle.checkpoint_io import load_state_dict_into
    from evaclip_paddle.convert import open_as_ours
    from evaclip_paddle.convert.readers import Checkpoint
    from evaclip_paddle.convert.tensors import from_array
    from evaclip_paddle.data.transforms import image_transform
    from evaclip_paddle.factory import get_model_config
    from evaclip_paddle.model.clip import EVACLIP

    torch.set_num_threads(THREADS)
    paddle.set_device("cpu")
    torch.manual_seed(0)
    ref, _, ref_pre = open_clip.create_model_and_transforms(OPEN_CLIP_NAME.get(args.model, args.model), pretrained=None)
    ref.eval()
    sd = OrderedDict((k, v.detach().numpy()) for k, v in ref.state_dict().items())
    view, _, _ = open_as_ours(Checkpoint("memory", OrderedDict((k, from_array(v, k)) for k, v in sd.items()), "memory"),
                              model=args.model)
    ours = EVACLIP(get_model_config(args.model))
    load_state_dict_into(ours, {k: view[k] for k in view if k != "logit_scale"})
    ours.eval()
    del view, sd
    pre = image_transform(ours.cfg.vision_cfg.image_size, is_train=False)

    rng = np.random.default_rng(0)
    w = rng.normal(size=(ours.cfg.embed_dim, args.classes)).astype(np.float32)
    w /= np.linalg.norm(w, axis=0, keepdims=True)
    w_t, w_p = torch.from_numpy(w), paddle.to_tensor(w)
    imgs = photos(args.batch_size)

    def run_ref():
        with torch.no_grad():
            x = torch.stack([ref_pre(im) for im in imgs])
            f = torch.nn.functional.normalize(ref.encode_image(x), dim=-1)
            return (100.0 * f @ w_t).numpy()

    def run_ours():
        with paddle.no_grad():
            x = paddle.to_tensor(np.stack([pre(im) for im in imgs]))
            f = F.normalize(ours.encode_image(x), axis=-1)
            return (100.0 * f @ w_p).numpy()

    def run_ours_mkldnn():
        paddle.set_flags({"FLAGS_use_mkldnn": True})
        try:
            return run_ours()
        finally:
            paddle.set_flags({"FLAGS_use_mkldnn": False})

    sides = {"open_clip": run_ref, "paddle": run_ours, "paddle_onednn": run_ours_mkldnn}
    outs = {k: fn() for k, fn in sides.items()}                       # warm-up, and outputs to compare
    diffs = {k: float(np.abs(outs[k] - outs["open_clip"]).max()) for k in ("paddle", "paddle_onednn")}
    times = {k: [] for k in sides}
    for _ in range(args.iters):
        for k, fn in sides.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    ips = {k: args.batch_size / statistics.median(v) for k, v in times.items()}
    result = {
        "model": args.model, "batch_size": args.batch_size, "threads": THREADS, "iters": args.iters,
        "images_per_s": {k: round(v, 3) for k, v in ips.items()},
        "ratio_vs_open_clip": {k: round(ips[k] / ips["open_clip"], 3) for k in ("paddle", "paddle_onednn")},
        "max_abs_logit_diff_vs_open_clip": diffs,
        "batch_seconds": {k: [round(t, 3) for t in v] for k, v in times.items()},
        "load_average": os.getloadavg(), "cpu": platform.processor() or platform.machine(),
        "versions": {"paddle": paddle.__version__, "torch": torch.__version__, "open_clip": open_clip.__version__},
    }
    print(json.dumps(result, indent=2))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
