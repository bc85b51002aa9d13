"""Pieces shared by the training datasets: image decoding, per-sample RNG, the batch collate."""
from __future__ import annotations

import io
from typing import List, Optional

import numpy as np
from PIL import Image


class BadSample(ValueError):
    """A sample that cannot be used (the reason is the message)."""


def decode_image(data: bytes, min_size: int = 5) -> Image.Image:
    """RGB PIL image from encoded bytes; images smaller than min_size px on a side are refused."""
    if not data:
        raise BadSample("empty image payload")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:
        raise BadSample(f"not a decodable image ({type(e).__name__}: {e})") from None
    if img.width < min_size or img.height < min_size:
        raise BadSample(f"image is {img.width}x{img.height}, smaller than {min_size} px")
    return img.convert("RGB")


def sample_rng(seed) -> np.random.Generator:
    """The augmentation RNG of one sample: a pure function of its seed (an int or a tuple of ints)."""
    return np.random.default_rng(seed)


class Collate:
    """Drops unusable items (None), stacks images, tokenises captions.

    Returns {"image": float32 [n,3,H,W], "text": int64 [n,ctx], "skipped": int64 [1]}; n may be 0
    when every item of the batch was unusable.
    """

    def __init__(self, tokenizer, image_size: int):
        self.tokenizer, self.image_size = tokenizer, image_size

    def __call__(self, items: List[Optional[tuple]]) -> dict:
        ok = [x for x in items if x is not None]
        skipped = np.asarray([len(items) - len(ok)], dtype=np.int64)
        if not ok:
            s = self.image_size
            ctx = getattr(self.tokenizer, "context_length", 77)
            return {"image": np.zeros([0, 3, s, s], np.float32), "text": np.zeros([0, ctx], np.int64),
                    "skipped": skipped}
        images = np.stack([np.asarray(x[0], dtype=np.float32) for x in ok])
        text = np.asarray(self.tokenizer([x[1] for x in ok]), dtype=np.int64)
        return {"image": images, "text": text, "skipped": skipped}
