"""The README demo: generate the shapes set, train a small EVA02-CLIP on CPU, evaluate zero-shot.

    python -m evaclip_paddle.demo                 # or: bash run.sh demo
    python -m evaclip_paddle.demo --out_dir /tmp/demo --steps 100 --quick

The held-out eval set contains only colour-shape combinations that training never showed; the
printed top-1 accuracy is over those classes (chance = 1 / number of held-out classes).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional

DEMO_MODEL = "EVA02-CLIP-demo"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evaclip_paddle.demo", allow_abbrev=False,
                                description="Train a small EVA02-CLIP on generated shapes and evaluate zero-shot "
                                            "on held-out colour-shape combinations.")
    p.add_argument("--out_dir", default=os.path.join("outputs", "demo"), help="data and run directory")
    p.add_argument("--steps", type=int, default=1200, help="optimizer steps")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--per_combo", type=int, default=150, help="training images per colour-shape combination")
    p.add_argument("--eval_per_class", type=int, default=20)
    p.add_argument("--optimizer", choices=("lamb", "adamw"), default="lamb")
    p.add_argument("--learning_rate", type=float, default=5e-3)
    p.add_argument("--warmup_steps", type=int, default=80)
    p.add_argument("--weight_decay", type=float, default=0.05)
    p.add_argument("--eval_steps", type=int, default=0, help="also evaluate every N steps (0: only at the end)")
    p.add_argument("--workers", type=int, default=1, help="data loader worker processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue the run in out_dir from its newest checkpoint")
    p.add_argument("--quick", action="store_true", help="small data, 200 steps (CI): shows learning, not the full result")
    p.add_argument("--disable_tqdm", action="store_true")
    p.add_argument("--min_accuracy", type=float, default=0.0,
                   help="exit with status 1 when held-out top-1 is below this (0..1)")
    return p


def _all_class_accuracy(model, data_dir: str, manifest: dict, batch_size: int = 128) -> float:
    """Held-out images classified among ALL colour-shape names (seen ones included): a harder, diagnostic
    number, since a model biased towards the training combinations loses here."""
    import numpy as np

    from .eval.demo_eval import ZeroShotJsonSet
    from .eval.zeroshot import evaluate_zeroshot_classification
    from .data.transforms import image_transform

    names = manifest["train_combinations"] + manifest["heldout_combinations"]
    ds = ZeroShotJsonSet(os.path.join(data_dir, "eval", "zeroshot.json"),
                         image_transform(model.cfg.vision_cfg.image_size, is_train=False))
    index = {n: i for i, n in enumerate(names)}
    ds.labels = [index[ds.classnames[lab]] for lab in ds.labels]
    ds.classnames = names
    from .data.tokenizer import CLIPTokenizer
    tok = CLIPTokenizer(context_length=model.cfg.text_cfg.context_length)
    out = evaluate_zeroshot_classification(model, tok, ds, names, ds.templates, batch_size=batch_size)
    return float(np.asarray(out["acc1"]))


def main(argv: Optional[List[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    t_start = time.time()
    from .train.cli import _setup_logging
    _setup_logging()

    from .data.demo import generate
    from .factory import get_model_config
    from .train.args import TrainingArguments
    from .train.loop import run_training

    cfg = get_model_config(DEMO_MODEL)
    data_dir, run_dir = os.path.join(a.out_dir, "data"), os.path.join(a.out_dir, "run")
    if a.quick:   # CI: a few minutes of CPU become well under one; it shows learning, not the full result
        a.per_combo, a.eval_per_class, a.steps, a.batch_size, a.warmup_steps = 40, 10, 200, 64, 15
    per_combo, eval_per_class = a.per_combo, a.eval_per_class
    t0 = time.time()
    manifest = generate(data_dir, image_size=cfg.vision_cfg.image_size, per_combo=per_combo,
                        eval_per_class=eval_per_class, seed=a.seed)
    t_data = time.time() - t0
    print(f"data: {manifest['num_train']} training pairs of {len(manifest['train_combinations'])} colour-shape "
          f"combinations; {len(manifest['heldout_combinations'])} held-out classes x {eval_per_class} eval images "
          f"({t_data:.1f} s) -> {data_dir}", flush=True)

    args = TrainingArguments(
        model=DEMO_MODEL, train_data=data_dir, output_dir=run_dir, per_device_train_batch_size=a.batch_size,
        optimizer=a.optimizer, learning_rate=a.learning_rate, weight_decay=a.weight_decay, layer_decay=1.0,
        warmup_steps=a.warmup_steps, max_steps=a.steps, max_grad_norm=5.0, seed=a.seed,
        logging_steps=max(1, min(25, a.steps // 10)), save_steps=max(1, a.steps // 3), save_total_limit=2,
        dataloader_num_workers=a.workers, classification_eval=os.path.join(data_dir, "eval"),
        eval_steps=a.eval_steps, per_device_eval_batch_size=256, disable_tqdm=a.disable_tqdm,
        resume_from_checkpoint="latest" if a.resume else None, overwrite_output_dir=not a.resume,
        do_train=True).validate()
    t0 = time.time()
    summary = run_training(args)
    t_train = time.time() - t0

    from .factory import create_model
    from .eval.demo_eval import evaluate_classification
    model = create_model(pretrained=run_dir)
    held = summary["eval"]
    seen = evaluate_classification(model, os.path.join(data_dir, "eval_seen"), batch_size=256)
    all_cls = _all_class_accuracy(model, data_dir, manifest)
    wall = time.time() - t_start
    n_held = held["num_classes"]
    result = {"heldout_top1": held["acc1"], "heldout_classes": n_held, "chance": 1.0 / n_held,
              "seen_top1": seen["acc1"], "heldout_top1_among_all_classes": all_cls,
              "steps": summary["global_step"], "train_seconds": round(t_train, 1), "wall_seconds": round(wall, 1),
              "checkpoint": summary["last_checkpoint"], "weights": run_dir, "train_log": summary["train_log"],
              "visualdl": os.path.join(run_dir, "runs")}
    with open(os.path.join(a.out_dir, "demo_result.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(f"\nzero-shot top-1 on {n_held} held-out colour-shape classes (never seen in training): "
          f"{100 * held['acc1']:.1f}%  (chance {100 / n_held:.1f}%)")
    print(f"  seen combinations: {100 * seen['acc1']:.1f}%;  held-out images among all "
          f"{len(manifest['train_combinations']) + n_held} names: {100 * all_cls:.1f}%")
    print(f"  wall time {wall:.0f} s (data {t_data:.0f} s, training+eval {t_train:.0f} s, {summary['global_step']} steps)")
    print(f"  weights: {run_dir}  checkpoints: {run_dir}/checkpoint-*  log: {summary['train_log']}  "
          f"VisualDL: visualdl --logdir {os.path.join(run_dir, 'runs')}")
    return 1 if held["acc1"] < a.min_accuracy else 0


if __name__ == "__main__":
    sys.exit(main())
