"""Zero-shot classification on the eval sets the trainer accepts with --classification_eval DIR.

Three layouts of DIR are understood:
- a demo eval set (zeroshot.json: classnames, "{c}" templates, samples [{image, label}]), as written by
  evaclip_paddle.data.demo;
- PaddleMIX's layout: labels.txt (one class name per line), templates.txt (one "{}" template per line)
  and an ImageFolder under images/;
- a plain ImageFolder (one folder per class; class names from the bundled ImageNet list when the
  count matches, else from the folder names).
"""
from __future__ import annotations

import json
import os
from typing import Callable, Optional

import numpy as np

from .zeroshot import evaluate_zeroshot_classification


class ZeroShotJsonSet:
    """Map-style dataset of (transformed image, label) from a zeroshot.json file."""

    def __init__(self, json_path: str, transform: Callable):
        with open(json_path, "r", encoding="utf-8") as f:
            meta = json.load(f)
        for key in ("classnames", "templates", "samples"):
            if key not in meta:
                raise ValueError(f"{json_path}: missing '{key}'")
        root = os.path.dirname(os.path.abspath(json_path))
        self.classnames, self.templates = list(meta["classnames"]), list(meta["templates"])
        self.paths = [os.path.join(root, s["image"]) for s in meta["samples"]]
        self.labels = [int(s["label"]) for s in meta["samples"]]
        bad = [lab for lab in self.labels if not 0 <= lab < len(self.classnames)]
        if bad:
            raise ValueError(f"{json_path}: label {bad[0]} is outside [0, {len(self.classnames)})")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            x = self.transform(im.convert("RGB"))
        return np.asarray(x, dtype=np.float32), np.int64(self.labels[i])


def describe_eval_set(path: str) -> str:
    if os.path.isfile(os.path.join(path, "zeroshot.json")):
        return "demo"
    if os.path.isfile(os.path.join(path, "labels.txt")) and os.path.isdir(os.path.join(path, "images")):
        return "paddlemix"
    if os.path.isdir(path):
        return "imagefolder"
    raise FileNotFoundError(f"--classification_eval {path}: not a directory")


def evaluate_classification(model, path: str, tokenizer=None, batch_size: int = 64, num_workers: int = 0,
                            group=None, amp_dtype: Optional[str] = None, progress: bool = False) -> dict:
    """{"acc1", "acc5", "mean_per_class_recall", "num_images", "num_classes", ...} of `model` on DIR."""
    from ..data.tokenizer import CLIPTokenizer
    from ..data.transforms import image_transform

    m = model
    while hasattr(m, "_layers"):
        m = m._layers
    tokenizer = tokenizer or CLIPTokenizer(context_length=m.cfg.text_cfg.context_length)
    transform = image_transform(m.cfg.vision_cfg.image_size, is_train=False)
    kind = describe_eval_set(path)
    common = dict(batch_size=batch_size, num_workers=num_workers, group=group, amp_dtype=amp_dtype,
                  progress=progress)
    if kind == "demo":
        ds = ZeroShotJsonSet(os.path.join(path, "zeroshot.json"), transform)
        out = evaluate_zeroshot_classification(model, tokenizer, ds, ds.classnames, ds.templates, **common)
        out["num_classes"] = len(ds.classnames)
    elif kind == "paddlemix":
        with open(os.path.join(path, "labels.txt"), "r", encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
        templates = None
        tpath = os.path.join(path, "templates.txt")
        if os.path.isfile(tpath):
            with open(tpath, "r", encoding="utf-8") as f:
                templates = [line.strip().replace("{}", "{c}") for line in f if line.strip()]
        out = evaluate_zeroshot_classification(model, tokenizer, os.path.join(path, "images"), names, templates,
                                               transform=transform, **common)
        out["num_classes"] = len(names)
    else:
        out = evaluate_zeroshot_classification(model, tokenizer, path, transform=transform, **common)
    out["eval_set"] = kind
    return out
