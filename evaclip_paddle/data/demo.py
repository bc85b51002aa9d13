"""A generated image-text set for demos and tests: coloured shapes on noisy backgrounds.

Classes are colour x shape combinations ("red circle"). Of the 10 evaluated colours x 5 shapes, 20
combinations are held out (two per colour): training captions and images never show them, but every
colour and every shape appears in training with other partners (plus 6 extra colours shown with every
shape, which makes shape features colour-invariant), so zero-shot accuracy on the held-out
combinations measures compositional generalisation of both towers. Images are drawn with PIL at a
random position, size and slight rotation on a noisy background. Everything is a pure function of
the seed.

Layout written under `out_dir`:
  train.json                 COCO-Karpathy list of {caption, image, image_id}
  images/train/*.png         training images (the same samples as the LAION parts)
  laion/filelist.txt         LAION file list (relative part paths), parts part-00000.txt, part-00001.gz
  eval/zeroshot.json         held-out eval set: classnames, templates, samples [{image, label}]
  eval_seen/zeroshot.json    a small eval set of the training combinations (diagnostic)
  manifest.json              colours, shapes, which combinations are held out, counts, seed
"""
from __future__ import annotations

import base64
import gzip
import io
import json
import math
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (225, 35, 35), "orange": (250, 145, 25), "yellow": (245, 225, 40), "lime": (160, 235, 50),
    "green": (30, 150, 50), "cyan": (40, 215, 225), "blue": (40, 75, 230), "purple": (140, 50, 200),
    "pink": (250, 120, 190), "white": (240, 240, 240),
}
# Colours that appear in training with every shape and are never evaluated: more colours per shape
# make the image tower's shape features colour-invariant, which is what transfers to held-out pairs.
EXTRA_COLOURS: Dict[str, Tuple[int, int, int]] = {
    "gray": (150, 150, 150), "brown": (150, 90, 40), "teal": (20, 140, 130), "magenta": (235, 40, 235),
    "gold": (215, 175, 45), "maroon": (135, 25, 45),
}
ALL_COLOURS = {**COLOURS, **EXTRA_COLOURS}
SHAPES = ("circle", "square", "triangle", "star", "cross")

TRAIN_TEMPLATES = (
    "a photo of a {c} {s}.", "a {c} {s}.", "a picture of a {c} {s}.", "a {s} that is {c}.",
    "a {c} {s} on a dark background.", "there is a {c} {s} in the image.", "a {s}, coloured {c}.",
    "a drawing of a {c} {s}.", "{c} {s}", "the {s} is {c}.", "an image of a {c} {s}.",
)
EVAL_TEMPLATES = ("a photo of a {c}.", "a {c}.", "a picture of a {c}.", "a drawing of a {c}.")
FORMAT_VERSION = 3


def split_combinations(colours: Sequence[str] = tuple(COLOURS), shapes: Sequence[str] = SHAPES,
                       heldout_per_colour: int = 2) -> Tuple[List[Tuple[str, str]], List[Tuple[str, str]]]:
    """(train, heldout) combinations. Colour i holds out shapes i, i+1, ... (mod #shapes): a cyclic
    band, so every colour keeps #shapes - heldout_per_colour training shapes and every shape keeps
    training colours."""
    if not 0 < heldout_per_colour < len(shapes):
        raise ValueError(f"heldout_per_colour must be in [1, {len(shapes) - 1}], got {heldout_per_colour}")
    train, held = [], []
    for i, c in enumerate(colours):
        band = {(i + k) % len(shapes) for k in range(heldout_per_colour)}
        for j, s in enumerate(shapes):
            (held if j in band else train).append((c, s))
    train += [(c, s) for c in EXTRA_COLOURS if c not in colours for s in shapes]
    for s in shapes:
        if not any(ts == s for _, ts in train):
            raise ValueError(f"shape '{s}' has no training colour; use fewer held-out combinations")
    return train, held


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> List[Tuple[float, float]]:
    def ring(n, radii, start):
        return [(cx + radii[k % len(radii)] * math.cos(start + 2 * math.pi * k / n),
                 cy + radii[k % len(radii)] * math.sin(start + 2 * math.pi * k / n)) for k in range(n)]
    if shape == "square":
        return ring(4, [r * 1.2], math.pi / 4 + angle)
    if shape == "diamond":
        return [(cx, cy - r * 1.25), (cx + r * 0.8, cy), (cx, cy + r * 1.25), (cx - r * 0.8, cy)]
    if shape == "triangle":
        return ring(3, [r * 1.2], -math.pi / 2 + angle)
    if shape == "star":
        return ring(10, [r * 1.25, r * 0.5], -math.pi / 2 + angle)
    if shape == "cross":
        a, b = r * 1.1, r * 0.38
        pts = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b),
               (-b, -b)]
        ca, sa = math.cos(angle), math.sin(angle)
        return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in pts]
    raise ValueError(f"unknown shape '{shape}'")


def render(colour: str, shape: str, size: int, rng: np.random.RandomState) -> Image.Image:
    """One image: a noisy dark background and one jittered shape at a random place and size."""
    base = rng.uniform(25, 80)
    tint = rng.uniform(-10, 10, size=3)
    bg = base + tint + rng.normal(0, 10, size=(size, size, 3))
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    r = rng.uniform(0.22, 0.34) * size
    margin = r * 1.3
    cx, cy = rng.uniform(margin, size - margin), rng.uniform(margin, size - margin)
    fill = tuple(int(np.clip(v + rng.uniform(-18, 18), 0, 255)) for v in ALL_COLOURS[colour])
    angle = rng.uniform(-0.2, 0.2)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=fill)
    arr = np.asarray(img).astype(np.float32) + rng.normal(0, 5, size=(size, size, 3))  # noise on the shape too
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _png(img: Image.Image) -> bytes:
    # Lossless: JPEG's chroma subsampling blurs colour edges by 2 px, a lot at 32 px.
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _write_atomic(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _eval_set(out_dir: str, name: str, combos, per_class: int, size: int, rng) -> None:
    d = os.path.join(out_dir, name)
    os.makedirs(os.path.join(d, "images"), exist_ok=True)
    classnames = [f"{c} {s}" for c, s in combos]
    samples = []
    for label, (c, s) in enumerate(combos):
        for k in range(per_class):
            rel = f"images/{label:02d}_{k:03d}.png"
            _write_atomic(os.path.join(d, rel), _png(render(c, s, size, rng)))
            samples.append({"image": rel, "label": label})
    meta = {"format": "evaclip-zeroshot", "version": FORMAT_VERSION, "classnames": classnames,
            "templates": list(EVAL_TEMPLATES), "samples": samples}
    _write_atomic(os.path.join(d, "zeroshot.json"), json.dumps(meta, indent=1).encode("utf-8"))


def generate(out_dir: str, image_size: int = 32, per_combo: int = 200, eval_per_class: int = 20,
             seen_eval_per_class: int = 5, seed: int = 0, heldout_per_colour: int = 2,
             laion_parts: int = 2) -> dict:
    """Writes the demo set (COCO + LAION formats + eval sets); returns the manifest.

    An existing set with the same parameters is reused (the manifest records them).
    """
    params = {"image_size": image_size, "per_combo": per_combo, "eval_per_class": eval_per_class,
              "seen_eval_per_class": seen_eval_per_class, "seed": seed, "heldout_per_colour": heldout_per_colour,
              "laion_parts": laion_parts, "version": FORMAT_VERSION}
    manifest_path = os.path.join(out_dir, "manifest.json")
    if os.path.isfile(manifest_path):
        with open(manifest_path, "r", encoding="utf-8") as f:
            old = json.load(f)
        if old.get("params") == params:
            return old
    train, held = split_combinations(tuple(COLOURS), SHAPES, heldout_per_colour)
    rng = np.random.RandomState(seed)
    os.makedirs(os.path.join(out_dir, "images", "train"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "laion"), exist_ok=True)
    order = [train[i % len(train)] for i in range(len(train) * per_combo)]
    rng.shuffle(order)
    entries, lines = [], [[] for _ in range(laion_parts)]
    for i, (c, s) in enumerate(order):
        data = _png(render(c, s, image_size, rng))
        rel = f"images/train/{i:06d}.png"
        _write_atomic(os.path.join(out_dir, rel), data)
        caption = TRAIN_TEMPLATES[rng.randint(len(TRAIN_TEMPLATES))].format(c=c, s=s)
        entries.append({"caption": caption, "image": rel, "image_id": f"demo_{i}"})
        meta = json.dumps({"caption_en": caption, "colour": c, "shape": s})
        # LAION columns: key, JSON meta, width, height, base64 image
        lines[i % laion_parts].append(f"demo_{i}\t{meta}\t{image_size}\t{image_size}\t"
                                      f"{base64.b64encode(data).decode('ascii')}\n")
    _write_atomic(os.path.join(out_dir, "train.json"), json.dumps(entries, indent=0).encode("utf-8"))
    parts = []
    for k, part in enumerate(lines):
        text = "".join(part).encode("utf-8")
        name = f"part-{k:05d}.gz" if k % 2 else f"part-{k:05d}.txt"   # both plain and gzip parts
        _write_atomic(os.path.join(out_dir, "laion", name), gzip.compress(text, 6, mtime=0) if k % 2 else text)
        parts.append(name)
    _write_atomic(os.path.join(out_dir, "laion", "filelist.txt"), ("\n".join(parts) + "\n").encode("utf-8"))
    _eval_set(out_dir, "eval", held, eval_per_class, image_size, rng)
    if seen_eval_per_class:
        _eval_set(out_dir, "eval_seen", [(c, s) for c, s in train if c in COLOURS], seen_eval_per_class,
                  image_size, rng)
    manifest = {"params": params, "colours": list(COLOURS), "extra_colours": list(EXTRA_COLOURS), "shapes": list(SHAPES),
                "train_combinations": [f"{c} {s}" for c, s in train],
                "heldout_combinations": [f"{c} {s}" for c, s in held],
                "num_train": len(entries), "num_eval": len(held) * eval_per_class,
                "coco_json": "train.json", "laion_filelist": "laion/filelist.txt", "eval_dir": "eval"}
    _write_atomic(manifest_path, json.dumps(manifest, indent=1).encode("utf-8"))
    return manifest
