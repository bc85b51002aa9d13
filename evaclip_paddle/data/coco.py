"""COCO-Karpathy caption JSON as a map-style training set.

The file is a JSON list of {"caption": str or [str, ...], "image": relative path, "image_id": ...};
image paths are relative to `image_root` (default: the JSON's directory). An entry with a list of
captions gives one sample per caption. Malformed entries are dropped (and counted) when the file is
read; unreadable images are skipped at load time (the item is None, which the collate counts).
"""
from __future__ import annotations

import json
import logging
import os
from typing import List, Optional, Tuple

import numpy as np

from .samples import decode_image, sample_rng

logger = logging.getLogger("evaclip_paddle.data")


def read_coco_json(path: str) -> Tuple[List[Tuple[str, str]], int]:
    """([(image relative path, caption)], number of malformed entries dropped)."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if isinstance(raw, dict) and "annotations" in raw and "images" not in raw:
        raw = raw["annotations"]
    if not isinstance(raw, list):
        raise ValueError(f"{path}: expected a JSON list of {{caption, image, image_id}} entries (COCO-Karpathy "
                         f"format), got {type(raw).__name__}")
    pairs, bad = [], 0
    for i, e in enumerate(raw):
        caps = e.get("caption") if isinstance(e, dict) else None
        img = e.get("image") if isinstance(e, dict) else None
        caps = [caps] if isinstance(caps, str) else caps
        if not isinstance(img, str) or not isinstance(caps, list) or not caps \
                or not all(isinstance(c, str) and c.strip() for c in caps):
            bad += 1
            if bad <= 5:
                logger.warning("%s: entry %d is not {caption: str|[str], image: str}; dropped", path, i)
            continue
        pairs.extend((img, c) for c in caps)
    if not pairs:
        raise ValueError(f"{path}: no usable entries (each needs a 'caption' and an 'image' path)")
    return pairs, bad


class CocoCaptions:
    """Items are (image array [3,H,W] float32, caption) or None when the image cannot be used.

    Keys are ints or (index, sample_seed) pairs; the seed drives the random augmentation, so an item
    is the same whichever worker or run produces it.
    """

    def __init__(self, json_path: str, image_root: Optional[str] = None, transform=None, min_size: int = 5):
        self.json_path = json_path
        self.root = image_root or os.path.dirname(os.path.abspath(json_path))
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"image root for {json_path} not found: {self.root} (see --image_root)")
        self.pairs, self.malformed = read_coco_json(json_path)
        self.transform, self.min_size = transform, min_size

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, int(key))
        rel, caption = self.pairs[index]
        path = os.path.join(self.root, rel)
        try:
            with open(path, "rb") as f:
                data = f.read()
            image = decode_image(data, self.min_size)
            arr = self.transform(image, sample_rng(seed)) if self.transform is not None else np.asarray(image)
        except Exception as e:  # one bad file must not stop training: the collate counts it
            logger.warning("skipping %s: %s", path, e)
            return None
        return arr, caption


def sampler_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's permutation of all n samples (same on every rank)."""
    return np.random.RandomState((int(seed) * 1000003 + int(epoch)) % (2 ** 32)).permutation(n)


class StridedBatchSampler:
    """Batches of (index, sample_seed) for one epoch and one data rank.

    The epoch's global permutation is strided over the data ranks (rank r takes positions r, r+W, ...),
    so ranks see disjoint samples; batches start at `start_step` (resume mid-epoch).
    """

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1,
                 start_step: int = 0):
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, epoch
        self.rank, self.world, self.start_step = rank, world, start_step

    def steps(self) -> int:
        return (self.n // self.world) // self.batch_size

    def __len__(self) -> int:
        return max(0, self.steps() - self.start_step)

    def __iter__(self):
        order = sampler_order(self.n, self.seed, self.epoch)[self.rank::self.world]
        base = (int(self.seed) * 7919 + self.epoch * 104729) % (2 ** 31)
        for step in range(self.start_step, self.steps()):
            idx = order[step * self.batch_size:(step + 1) * self.batch_size]
            yield [(int(i), base + int(i)) for i in idx]
