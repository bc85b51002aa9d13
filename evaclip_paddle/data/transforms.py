"""Image preprocessing for EVA-CLIP models, with PIL and numpy only (no torchvision).

The evaluation pipeline reproduces open_clip's ``image_transform(size, is_train=False)`` (which
is built from torchvision transforms) operation for operation, so outputs match it exactly:

1. resize so that the shorter side is ``size`` (the longer side becomes
   ``int(size * long / short)``, i.e. floored), skipped when the size is already right;
2. center crop ``size x size`` at ``top = int(round((h - size) / 2))`` (Python rounding), padding
   with zeros first if the image is smaller than the crop;
3. ``convert('RGB')``.  As in open_clip this happens *after* resizing, so a palette or 1-bit
   image is resized by PIL with nearest-neighbour sampling, and RGBA with premultiplied alpha;
4. ``uint8 / 255`` in float32, then ``(x - mean) / std`` per channel, channels first.

The training pipeline is open_clip's default one: ``RandomResizedCrop(size, scale=(0.9, 1.0),
ratio=(3/4, 4/3), bicubic)`` followed by steps 3-4, with crop parameters drawn from a numpy
``Generator`` instead of torch's RNG (so the crops themselves differ from torch's draws; the
crop rule and the pixels produced for given crop parameters are the same).

open_clip always uses bicubic for the training crop and for the shorter-side resize to a
non-square size, whatever ``interpolation`` says; here ``interpolation`` is honoured everywhere.
With the default ('bicubic') the two agree.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "image_transform",
    "ValTransform",
    "TrainTransform",
    "to_tensor_batch",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
_RESIZE_MODES = ("shortest", "longest", "squash")

SizeArg = Union[int, Sequence[int]]


def _check_size(image_size: SizeArg) -> Tuple[int, int]:
    """``image_size`` as ``(height, width)``, validated."""
    if isinstance(image_size, (bool, np.bool_)):
        raise TypeError("image_size must be an int or a (height, width) pair, got a bool")
    if isinstance(image_size, numbers.Integral):
        pair = (int(image_size), int(image_size))
    elif isinstance(image_size, (tuple, list)):
        if len(image_size) == 1:
            image_size = (image_size[0], image_size[0])
        if len(image_size) != 2:
            raise ValueError(f"image_size must be an int or a (height, width) pair, got {image_size!r}")
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_)) for v in image_size):
            raise TypeError(f"image_size must hold ints, got {image_size!r}")
        pair = (int(image_size[0]), int(image_size[1]))
    else:
        raise TypeError(f"image_size must be an int or a (height, width) pair, got {type(image_size).__name__}")
    if pair[0] <= 0 or pair[1] <= 0:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return pair


def _check_stats(values, name: str) -> np.ndarray:
    if isinstance(values, numbers.Real):
        values = (values,) * 3
    arr = np.asarray(values, dtype=np.float32).reshape(-1)
    if arr.shape != (3,):
        raise ValueError(f"{name} must have 3 values (one per RGB channel), got {values!r}")
    if name == "std" and np.any(arr <= 0):
        raise ValueError(f"std must be positive, got {values!r}")
    return arr.reshape(3, 1, 1)


def _as_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise ValueError(f"array images must be HxW or HxWxC with C in (1, 3, 4), got shape {image.shape}")
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if image.dtype == np.bool_:
            return Image.fromarray(image.astype(np.uint8) * 255)
        if image.dtype != np.uint8:
            raise TypeError(f"array images must be uint8 or bool, got {image.dtype}")
        return Image.fromarray(image)
    raise TypeError(f"expected a PIL.Image.Image (or a uint8 numpy array), got {type(image).__name__}")


def _resize(img: Image.Image, hw: Tuple[int, int], resample) -> Image.Image:
    h, w = hw
    if (img.height, img.width) == (h, w):
        return img
    return img.resize((w, h), resample)


def _resize_shorter_side(img: Image.Image, size: int, resample) -> Image.Image:
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)  # floor, like torchvision's Resize(int)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    return _resize(img, (new_h, new_w), resample)


def _resize_keep_ratio(img: Image.Image, target: Tuple[int, int], longest: float, resample) -> Image.Image:
    """Scale so that the shorter (longest=0) or longer (longest=1) side fits ``target``."""
    h, w = img.height, img.width
    rh, rw = h / target[0], w / target[1]
    ratio = max(rh, rw) * longest + min(rh, rw) * (1.0 - longest)
    return _resize(img, (round(h / ratio), round(w / ratio)), resample)


def _pad_fill(img: Image.Image, fill):
    bands = len(img.getbands())
    if img.mode == "F":
        return float(fill)
    return tuple([int(fill)] * bands) if bands > 1 else int(fill)


def _center_crop(img: Image.Image, out_hw: Tuple[int, int], fill=0) -> Image.Image:
    ch, cw = out_hw
    h, w = img.height, img.width
    if cw > w or ch > h:
        border = (
            (cw - w) // 2 if cw > w else 0,
            (ch - h) // 2 if ch > h else 0,
            (cw - w + 1) // 2 if cw > w else 0,
            (ch - h + 1) // 2 if ch > h else 0,
        )
        palette = img.getpalette() if img.mode == "P" else None
        img = ImageOps.expand(img, border=border, fill=_pad_fill(img, fill))
        if palette is not None:
            img.putpalette(palette)
        h, w = img.height, img.width
        if (h, w) == (ch, cw):
            return img
    top = int(round((h - ch) / 2.0))
    left = int(round((w - cw) / 2.0))
    return img.crop((left, top, left + cw, top + ch))


def _to_normalized_array(img: Image.Image, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    rgb = img.convert("RGB")
    arr = np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32)
    arr /= np.float32(255.0)
    arr -= mean
    arr /= std
    return np.ascontiguousarray(arr)


class ValTransform:
    """Deterministic evaluation preprocessing: PIL image -> float32 array ``[3, H, W]``."""

    def __init__(self, image_size: SizeArg, mean=None, std=None, interpolation: str = "bicubic",
                 resize_mode: str = "shortest", fill_color: int = 0):
        self.size = _check_size(image_size)
        if interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}, got {interpolation!r}")
        if resize_mode not in _RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {_RESIZE_MODES}, got {resize_mode!r}")
        self.interpolation = interpolation
        self.resize_mode = resize_mode
        self.fill_color = fill_color
        self.mean = _check_stats(OPENAI_CLIP_MEAN if mean is None else mean, "mean")
        self.std = _check_stats(OPENAI_CLIP_STD if std is None else std, "std")

    def resize_and_crop(self, image) -> Image.Image:
        """The geometric part only (PIL image in, PIL image out, mode unchanged)."""
        img = _as_pil(image)
        if img.width == 0 or img.height == 0:
            raise ValueError("cannot preprocess an empty image")
        resample = _RESAMPLE[self.interpolation]
        if self.resize_mode == "squash":
            return _resize(img, self.size, resample)
        if self.resize_mode == "longest":
            img = _resize_keep_ratio(img, self.size, 1.0, resample)
            return _center_crop(img, self.size, fill=self.fill_color)
        if self.size[0] == self.size[1]:
            img = _resize_shorter_side(img, self.size[0], resample)
        else:
            img = _resize_keep_ratio(img, self.size, 0.0, resample)
        return _center_crop(img, self.size)

    def __call__(self, image) -> np.ndarray:
        return _to_normalized_array(self.resize_and_crop(image), self.mean, self.std)

    def __repr__(self) -> str:
        return (f"ValTransform(size={self.size}, resize_mode={self.resize_mode!r}, "
                f"interpolation={self.interpolation!r})")


class TrainTransform:
    """Random resized crop + normalisation: PIL image -> float32 array ``[3, H, W]``.

    Randomness comes from ``rng`` passed to the call, else from the transform's own
    ``numpy.random.Generator`` (seeded with ``seed``)."""

    def __init__(self, image_size: SizeArg, mean=None, std=None, interpolation: str = "bicubic",
                 scale: Tuple[float, float] = (0.9, 1.0), ratio: Tuple[float, float] = (3 / 4, 4 / 3),
                 seed: Optional[int] = None):
        self.size = _check_size(image_size)
        if interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}, got {interpolation!r}")
        scale = tuple(float(s) for s in scale)
        ratio = tuple(float(r) for r in ratio)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
            raise ValueError(f"scale must be (min, max) with 0 < min <= max, got {scale}")
        if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must be (min, max) with 0 < min <= max, got {ratio}")
        self.interpolation = interpolation
        self.scale = scale
        self.ratio = ratio
        self.mean = _check_stats(OPENAI_CLIP_MEAN if mean is None else mean, "mean")
        self.std = _check_stats(OPENAI_CLIP_STD if std is None else std, "std")
        self.rng = np.random.default_rng(seed)

    def crop_params(self, width: int, height: int, rng: Optional[np.random.Generator] = None):
        """``(top, left, crop_height, crop_width)`` of one random crop (torchvision's rule:
        10 tries at a random area fraction and log-uniform aspect ratio, then a central crop)."""
        rng = self.rng if rng is None else rng
        area = height * width
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target_area = area * rng.uniform(self.scale[0], self.scale[1])
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                return top, left, h, w
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, int(round(height * self.ratio[1]))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def crop_and_resize(self, image, params) -> Image.Image:
        """Apply given crop parameters (crop, then resize the crop to the output size)."""
        img = _as_pil(image)
        top, left, h, w = params
        img = img.crop((left, top, left + w, top + h))
        return _resize(img, self.size, _RESAMPLE[self.interpolation])

    def __call__(self, image, rng: Optional[np.random.Generator] = None) -> np.ndarray:
        img = _as_pil(image)
        if img.width == 0 or img.height == 0:
            raise ValueError("cannot preprocess an empty image")
        params = self.crop_params(img.width, img.height, rng)
        return _to_normalized_array(self.crop_and_resize(img, params), self.mean, self.std)

    def __repr__(self) -> str:
        return f"TrainTransform(size={self.size}, scale={self.scale}, ratio={self.ratio})"


def image_transform(image_size: SizeArg, is_train: bool, mean=None, std=None,
                    interpolation: str = "bicubic", resize_mode: str = "shortest",
                    scale: Tuple[float, float] = (0.9, 1.0), fill_color: int = 0,
                    seed: Optional[int] = None):
    """Preprocessing callable like open_clip's ``image_transform`` (default augmentation).

    ``mean``/``std`` default to the OpenAI CLIP statistics.  ``resize_mode`` ('shortest',
    'longest', 'squash') and ``fill_color`` only affect evaluation; ``scale`` and ``seed`` only
    training."""
    if is_train:
        return TrainTransform(image_size, mean=mean, std=std, interpolation=interpolation, scale=scale,
                              seed=seed)
    return ValTransform(image_size, mean=mean, std=std, interpolation=interpolation,
                        resize_mode=resize_mode, fill_color=fill_color)


def to_tensor_batch(arrays):
    """Stack preprocessed ``[3, H, W]`` arrays into a float32 paddle tensor ``[N, 3, H, W]``."""
    import paddle  # deferred: the transforms themselves do not need paddle

    arrays = list(arrays)
    if not arrays:
        raise ValueError("to_tensor_batch needs at least one array")
    shapes = {tuple(np.shape(a)) for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"all arrays must have the same shape, got {sorted(shapes)}")
    shape = shapes.pop()
    if len(shape) != 3:
        raise ValueError(f"expected [C, H, W] arrays, got shape {shape}")
    return paddle.to_tensor(np.stack([np.asarray(a, dtype=np.float32) for a in arrays]))
