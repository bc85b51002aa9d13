"""The one factory: model names -> configs -> models (+ transforms, tokenizer)."""
from __future__ import annotations

import dataclasses
import difflib
import os
from functools import lru_cache
from typing import Dict, List, Optional, Tuple, Union

import paddle

from .config import CLIPConfig, load_config_file

_CONFIG_DIR = os.path.join(os.path.dirname(__file__), "model_configs")
_USER_CONFIG_DIRS: List[str] = []

PRECISIONS = ("fp32", "bf16", "fp16")


def add_model_config(path: str) -> None:
    """Registers a JSON file or a folder of JSON files as extra model configs."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"model config path does not exist: {path}")
    _USER_CONFIG_DIRS.append(path)
    _registry.cache_clear()


@lru_cache(maxsize=1)
def _registry() -> Dict[str, str]:
    found = {}
    for root in [_CONFIG_DIR] + _USER_CONFIG_DIRS:
        files = [root] if os.path.isfile(root) else [os.path.join(root, f) for f in sorted(os.listdir(root))]
        for f in files:
            if f.endswith(".json"):
                found[os.path.splitext(os.path.basename(f))[0]] = f
    return found


def list_models(include_tiny: bool = True) -> List[str]:
    names = sorted(_registry())
    return names if include_tiny else [n for n in names if not n.endswith(("-tiny", "-demo"))]


def _canonical(name: str) -> str:
    reg = _registry()
    if name in reg:
        return name
    # open_clip spells the EVA models without "-CLIP" (EVA02-B-16); accept that spelling.
    for cand in (name.replace("EVA02-", "EVA02-CLIP-", 1), name.replace("EVA01-", "EVA01-CLIP-", 1)):
        if cand in reg:
            return cand
    close = difflib.get_close_matches(name, list(reg), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown model '{name}'{hint} (list_models() shows all {len(reg)})")


def get_model_config(name: str) -> CLIPConfig:
    """Config of a zoo model by name, or of a JSON file given by path."""
    if name.endswith(".json") and os.path.isfile(name):
        return load_config_file(name)
    cfg = load_config_file(_registry()[_canonical(name)])
    return cfg


def _resolve_config(model: Union[str, CLIPConfig], force_image_size=None, force_patch_dropout=None,
                    fused_ln=None) -> CLIPConfig:
    cfg = model if isinstance(model, CLIPConfig) else get_model_config(model)
    over = {}
    if force_image_size is not None:
        over["image_size"] = int(force_image_size)
    if force_patch_dropout is not None:
        over["patch_dropout"] = float(force_patch_dropout)
    if fused_ln is not None:
        over["fused_ln"] = bool(fused_ln)
    if over:
        cfg = cfg.replace(**over)
        cfg.vision_cfg.validate(f"{cfg.name} (with overrides {over})")
    if fused_ln is not None:
        cfg = dataclasses.replace(cfg, text_cfg=dataclasses.replace(cfg.text_cfg, fused_ln=bool(fused_ln)))
    return cfg


def _config_for_pretrained(model_name: Optional[str], pretrained: Optional[str]) -> Tuple[CLIPConfig, str]:
    """Config when no zoo name is given: config.json in the directory (model_name or pretrained), else
    detected from the checkpoint's keys and shapes. Returns (config, weights path)."""
    src = model_name or pretrained
    if not src:
        raise ValueError("create_model needs a model name, a config, or pretrained=<directory with config.json>")
    folder = src if os.path.isdir(src) else os.path.dirname(src)
    cfg_path = os.path.join(folder, "config.json")
    if os.path.isfile(cfg_path):
        cfg = load_config_file(cfg_path)
        cfg = dataclasses.replace(cfg, name=os.path.basename(os.path.abspath(folder)))
    else:
        from .convert.converter import open_as_ours
        _, cfg, _ = open_as_ours(src)
    return cfg, pretrained or src


def create_model(model_name: Union[str, CLIPConfig, None] = None, pretrained: Optional[str] = None,
                 precision: str = "fp32",
                 force_image_size: Optional[int] = None, force_patch_dropout: Optional[float] = None,
                 grad_checkpointing: bool = False, fused_ln: Optional[bool] = None, lazy: bool = False,
                 seed: Optional[int] = None):
    """Builds an EVA-CLIP model.

    model_name: zoo name, config .json, CLIPConfig, or a directory holding config.json (then also the
        weights unless `pretrained` is given); None takes the config from `pretrained`.
    pretrained: a directory written by the converter / trainer (config + weights) or a weights file of any
        layout the converter reads (ours, PaddleMIX, EVA-CLIP or open_clip PyTorch checkpoints).
    lazy: build under paddle.LazyGuard (no memory for parameters; for counting giant configs).
    """
    from .model.clip import EVACLIP

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got '{precision}'")
    if not lazy and not device_supports(precision):
        raise RuntimeError(
            f"precision '{precision}' is not available on {paddle.device.get_device()}: Paddle has no "
            f"{_DTYPES[precision]} matmul kernel there in dygraph. Use precision='fp32', or export the model "
            f"and run it with Paddle Inference in bf16 (oneDNN) for fast CPU serving.")
    if model_name is None or (isinstance(model_name, str) and os.path.isdir(model_name)):
        model_name, pretrained = _config_for_pretrained(model_name, pretrained)
    cfg = _resolve_config(model_name, force_image_size, force_patch_dropout, fused_ln)
    if seed is not None:
        paddle.seed(seed)
    if lazy:
        with paddle.LazyGuard():
            return EVACLIP(cfg)
    model = EVACLIP(cfg)
    if pretrained:
        from .checkpoint_io import load_pretrained
        load_pretrained(model, pretrained, init_missing=True)    # initialises only if the checkpoint is partial
    else:
        model.init_weights()
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    if precision != "fp32":
        model.to(dtype=_DTYPES[precision])
    return model


_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def device_supports(precision: str) -> bool:
    """Whether the current device has dygraph matmul kernels for this precision (CPU: fp32 only)."""
    try:
        a = paddle.ones([2, 2], dtype=_DTYPES[precision])
        paddle.matmul(a, a)
        return True
    except Exception:  # NotFound: kernel not registered for this place/dtype
        return False


def create_model_and_transforms(model_name, pretrained=None, precision="fp32", **kwargs) -> Tuple:
    """(model, train_transform, val_transform) as open_clip returns them."""
    from .data.transforms import image_transform

    model = create_model(model_name, pretrained=pretrained, precision=precision, **kwargs)
    size = model.cfg.vision_cfg.image_size
    return model, image_transform(size, is_train=True), image_transform(size, is_train=False)


def get_tokenizer(model_name: Optional[str] = None, context_length: Optional[int] = None):
    from .data.tokenizer import CLIPTokenizer

    if context_length is None and model_name is not None:
        context_length = get_model_config(model_name).text_cfg.context_length
    return CLIPTokenizer(context_length=context_length or 77)


def count_parameters(model_or_name) -> Dict[str, int]:
    """Parameter counts per tower; a name is built lazily, so even the 18B config costs no memory."""
    model = create_model(model_or_name, lazy=True) if isinstance(model_or_name, (str, CLIPConfig)) else model_or_name
    counts = {"visual": 0, "text": 0, "other": 0}
    for name, p in model.named_parameters():
        n = 1
        for d in p.shape:
            n *= int(d)
        counts[name.split(".", 1)[0] if name.split(".", 1)[0] in counts else "other"] += n
    counts["total"] = sum(counts.values())
    return counts
