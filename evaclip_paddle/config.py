"""Typed model configuration: one JSON file per architecture, validated on load.

The JSON keys follow the EVA-CLIP model_configs format (so users can drop in their own files);
a few spelling aliases of that format are accepted and normalised here, once.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

__all__ = ["VisionConfig", "TextConfig", "CLIPConfig", "ConfigError", "load_config_file", "config_from_dict"]


class ConfigError(ValueError):
    """A model config is malformed; the message names the file and the key."""


# Keys of the EVA/open_clip JSON format that we read under another name.
_VISION_ALIASES = {"fusedLN": "fused_ln", "use_rms_norm": "use_rms_norm"}
# Keys that are meaningful only for the PyTorch implementation (kernel choices): accepted, ignored.
_IGNORED = {"xattn", "eva_model_name", "timm_model_name", "timm_model_pretrained", "timm_pool", "timm_proj",
            "hf_model_name", "hf_tokenizer_name", "hf_model_pretrained", "proj", "pooler_type", "masked_language_modeling"}


@dataclass
class VisionConfig:
    image_size: int
    patch_size: int
    width: int
    layers: int
    head_width: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True           # q and v biases (never k) and the head bias, as EVA does
    rope: bool = False              # EVA02 2D rotary embedding on patch tokens
    pt_hw_seq_len: int = 16         # RoPE positions are rescaled onto this grid
    intp_freq: bool = True
    naiveswiglu: bool = False       # SwiGLU MLP (w1, w2, w3)
    subln: bool = False             # sub-LN: inner_attn_ln and ffn_ln
    postnorm: bool = False          # x + drop_path(norm(f(x)))  (bigE, 18B)
    use_rms_norm: bool = False      # T5-style RMSNorm (8B, 18B)
    drop_path_rate: float = 0.0
    patch_dropout: float = 0.0
    norm_eps: float = 1e-6
    fused_ln: bool = False          # use the external_ops norm kernels when built
    in_chans: int = 3

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def heads(self) -> int:
        return self.width // self.head_width

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)

    def validate(self, where: str) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"{where}: image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        if self.width % self.head_width:
            raise ConfigError(f"{where}: width {self.width} is not divisible by head_width {self.head_width}")
        if self.rope and self.head_width % 4:
            raise ConfigError(f"{where}: rope needs head_width divisible by 4, got {self.head_width}")
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ConfigError(f"{where}: patch_dropout must be in [0, 1), got {self.patch_dropout}")


@dataclass
class TextConfig:
    width: int
    heads: int
    layers: int
    context_length: int = 77
    vocab_size: int = 49408
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-5
    fused_ln: bool = False

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)

    def validate(self, where: str) -> None:
        if self.width % self.heads:
            raise ConfigError(f"{where}: text width {self.width} is not divisible by heads {self.heads}")


@dataclass
class CLIPConfig:
    embed_dim: int
    vision_cfg: VisionConfig
    text_cfg: TextConfig
    name: str = "custom"

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("name")
        return d

    def replace(self, **vision_overrides) -> "CLIPConfig":
        return dataclasses.replace(self, vision_cfg=dataclasses.replace(self.vision_cfg, **vision_overrides))


def _build(cls, raw: Dict[str, Any], where: str, aliases: Dict[str, str]):
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        name = aliases.get(key, key)
        if name in _IGNORED:
            continue
        if name not in known:
            raise ConfigError(f"{where}: unknown key '{key}' (known: {', '.join(sorted(known))})")
        kwargs[name] = value
    missing = [f.name for f in known.values()
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               and f.name not in kwargs]
    if missing:
        raise ConfigError(f"{where}: missing required field(s): {', '.join(missing)}")
    for name, value in kwargs.items():
        want = known[name].type
        ok = {"int": isinstance(value, int) and not isinstance(value, bool),
              "float": isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
              "bool": isinstance(value, bool)}.get(want, True)
        if not ok:
            raise ConfigError(f"{where}.{name}: expected {want}, got {value!r}")
    return cls(**kwargs)


def config_from_dict(raw: Dict[str, Any], name: str = "custom", where: Optional[str] = None) -> CLIPConfig:
    where = where or name
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a JSON object")
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in raw:
            raise ConfigError(f"{where}: missing required field '{key}'")
    extra = set(raw) - {"embed_dim", "vision_cfg", "text_cfg", "custom_text", "quick_gelu"}
    if extra:
        raise ConfigError(f"{where}: unknown top-level key(s): {', '.join(sorted(extra))}")
    if raw.get("quick_gelu"):
        raise ConfigError(f"{where}: quick_gelu is not used by any EVA-CLIP model and is not supported")
    vision = _build(VisionConfig, raw["vision_cfg"], f"{where}: vision_cfg", _VISION_ALIASES)
    text = _build(TextConfig, raw["text_cfg"], f"{where}: text_cfg", {"fusedLN": "fused_ln"})
    vision.validate(f"{where}: vision_cfg")
    text.validate(f"{where}: text_cfg")
    embed_dim = raw["embed_dim"]
    if not isinstance(embed_dim, int) or embed_dim <= 0:
        raise ConfigError(f"{where}: embed_dim must be a positive integer, got {embed_dim!r}")
    return CLIPConfig(embed_dim=embed_dim, vision_cfg=vision, text_cfg=text, name=name)


def load_config_file(path: str) -> CLIPConfig:
    name = os.path.splitext(os.path.basename(path))[0]
    try:
        with open(path, "r", encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return config_from_dict(raw, name=name, where=path)
