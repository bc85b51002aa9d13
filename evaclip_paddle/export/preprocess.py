"""The preprocessing an exported encoder expects, as a small JSON document, and back.

The document is meant for consumers that have nothing but the export folder: it spells out every
step of the evaluation transform (resize rule, interpolation, crop, scaling, mean/std, layout) and
the tokenizer settings. `transform_from_spec` rebuilds the exact `ValTransform` from it.
"""
from __future__ import annotations

import io
import json
import os
from typing import Any, Dict, Optional

import numpy as np

PREPROCESS_FILE = "preprocess.json"
SPEC_VERSION = 1


class PreprocessError(ValueError):
    """A preprocess.json is malformed; the message names the file and key."""


def image_spec(image_size: int, mean=None, std=None, interpolation: str = "bicubic",
               resize_mode: str = "shortest", fill_color: int = 0) -> Dict[str, Any]:
    from ..data.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    mean = [float(v) for v in (OPENAI_CLIP_MEAN if mean is None else mean)]
    std = [float(v) for v in (OPENAI_CLIP_STD if std is None else std)]
    return {
        "size": [int(image_size), int(image_size)],            # [height, width]
        "resize_mode": resize_mode,                             # shortest | longest | squash
        "interpolation": interpolation,                         # PIL resampling filter
        "crop": "center",
        "fill_color": int(fill_color),
        "convert": "RGB",                                       # after resizing, as open_clip does
        "scale": 1.0 / 255.0,                                   # uint8 -> [0, 1] before mean/std
        "mean": mean,
        "std": std,
        "layout": "NCHW",
        "dtype": "float32",
        "steps": [
            "resize: shortest mode scales the shorter side to size (longer side floored); longest mode "
            "fits the longer side (rounded) then pads with fill_color; squash resizes to size exactly",
            "center crop to size, top/left = round((in - out) / 2), zero padding if smaller",
            "convert to RGB, uint8 * scale, (x - mean) / std per channel, channels first",
        ],
    }


def text_spec(context_length: int, vocab_size: int, vocab_file: Optional[str]) -> Dict[str, Any]:
    return {
        "tokenizer": "clip_bpe",
        "vocab_file": vocab_file,                   # relative to the export folder
        "context_length": int(context_length),
        "vocab_size": int(vocab_size),
        "sot_id": 49406,
        "eot_id": 49407,
        "pad_id": 0,
        "lowercase": True,
        "truncate": "keep the end-of-text id as the last token",
        "dtype": "int64",
    }


def build_spec(cfg, vocab_file: Optional[str] = None, towers=("image", "text")) -> Dict[str, Any]:
    """The preprocess document of a model config (CLIPConfig)."""
    spec: Dict[str, Any] = {"version": SPEC_VERSION}
    if "image" in towers:
        spec["image"] = image_spec(cfg.vision_cfg.image_size)
    if "text" in towers:
        spec["text"] = text_spec(cfg.text_cfg.context_length, cfg.text_cfg.vocab_size, vocab_file)
    return spec


def write_spec(spec: Dict[str, Any], out_dir: str) -> str:
    path = os.path.join(out_dir, PREPROCESS_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(spec, f, indent=2)
    os.replace(tmp, path)
    return path


def read_spec(path: str) -> Dict[str, Any]:
    if os.path.isdir(path):
        path = os.path.join(path, PREPROCESS_FILE)
    try:
        with open(path, "r", encoding="utf-8") as f:
            spec = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"preprocess spec not found: {path}") from None
    except json.JSONDecodeError as e:
        raise PreprocessError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(spec, dict) or spec.get("version") != SPEC_VERSION:
        raise PreprocessError(f"{path}: expected an object with version {SPEC_VERSION}")
    return spec


def transform_from_spec(image: Dict[str, Any], where: str = "preprocess.json"):
    """The evaluation transform (PIL image -> float32 [3, H, W]) described by spec['image']."""
    from ..data.transforms import ValTransform

    for key in ("size", "mean", "std", "interpolation", "resize_mode"):
        if key not in image:
            raise PreprocessError(f"{where}: image.{key} is missing")
    if image.get("crop", "center") != "center" or image.get("convert", "RGB") != "RGB":
        raise PreprocessError(f"{where}: only center crop and RGB conversion are supported")
    if abs(float(image.get("scale", 1 / 255)) - 1 / 255) > 1e-12 or image.get("layout", "NCHW") != "NCHW":
        raise PreprocessError(f"{where}: only scale 1/255 and NCHW layout are supported")
    size = image["size"]
    size = int(size) if isinstance(size, int) else [int(v) for v in size]
    return ValTransform(size, mean=image["mean"], std=image["std"], interpolation=image["interpolation"],
                        resize_mode=image["resize_mode"], fill_color=int(image.get("fill_color", 0)))


def open_image(source):
    """A fully decoded PIL image from a path or bytes; raises (never returns) on unreadable data."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(source, (bytes, bytearray, memoryview)):
        with open(source, "rb") as fh:  # read whole: no file handle outlives the call
            source = fh.read()
    try:
        img = Image.open(io.BytesIO(source))
    except UnidentifiedImageError:  # PIL's message names a BytesIO object; say what is wrong instead
        raise UnidentifiedImageError(f"not an image in a format PIL can read ({len(source)} bytes)") from None
    img.load()  # decode now, so truncated files fail here and not inside a batch
    return img


def load_and_transform(source, transform) -> np.ndarray:
    return transform(open_image(source))
