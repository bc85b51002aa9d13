"""Reading and writing our own (Paddle-layout) weights: .pdparams or .safetensors, single or sharded."""
from __future__ import annotations

import json
import os
from typing import Dict, Tuple

import numpy as np
import paddle

WEIGHT_FILES = ("model.safetensors", "model_state.pdparams", "model.safetensors.index.json")


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the file and key."""


def find_weights(path: str) -> str:
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        for name in WEIGHT_FILES:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise CheckpointError(f"{path}: no weights found (looked for {', '.join(WEIGHT_FILES)})")
    raise FileNotFoundError(f"pretrained weights not found: {path}")


def read_state_dict(path: str) -> Dict[str, np.ndarray]:
    """Numpy state dict of a Paddle-layout checkpoint file (or sharded index)."""
    path = find_weights(path)
    try:
        if path.endswith(".index.json"):
            with open(path, "r", encoding="utf-8") as f:
                index = json.load(f)
            out = {}
            for shard in sorted(set(index["weight_map"].values())):
                out.update(read_state_dict(os.path.join(os.path.dirname(path), shard)))
            return out
        if path.endswith(".safetensors"):
            from .convert.readers import read_safetensors   # memory-mapped; understands bfloat16
            return {k: t.values() for k, t in read_safetensors(path).items()}
        if path.endswith((".pdparams", ".pdopt")):
            sd = paddle.load(path, return_numpy=True)
            if not isinstance(sd, dict):
                raise CheckpointError(f"{path}: expected a dict of tensors, got {type(sd).__name__}")
            return {k: np.asarray(v) for k, v in sd.items()}
    except CheckpointError:
        raise
    except Exception as e:  # corrupt or foreign files: name the file, keep the cause
        raise CheckpointError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from e
    raise CheckpointError(f"{path}: unknown weights format (expected .safetensors, .pdparams or an index .json)")


def load_state_dict_into(model, sd: Dict[str, np.ndarray], strict: bool = False,
                         source: str = "state dict") -> Tuple[list, list]:
    """Copies matching tensors into `model`; returns (missing, unexpected). Shape mismatches are errors."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    for k in sd:
        if k not in own:
            continue
        v, target = sd[k], own[k]       # sd may be a lazy mapping: read one tensor at a time
        if list(v.shape) != list(target.shape):
            raise CheckpointError(f"{source}: shape mismatch for '{k}': checkpoint {list(v.shape)} "
                                  f"vs model {list(target.shape)}")
        target.set_value(paddle.to_tensor(np.asarray(v)).astype(target.dtype))
    if strict and (missing or unexpected):
        raise CheckpointError(f"{source}: missing keys {missing[:10]}{'...' if len(missing) > 10 else ''}, "
                              f"unexpected keys {unexpected[:10]}{'...' if len(unexpected) > 10 else ''}")
    return missing, unexpected


def load_pretrained(model, path: str, strict: bool = False, init_missing: bool = False):
    """Loads weights of any supported layout (ours, PaddleMIX, EVA-CLIP or open_clip PyTorch files) one
    tensor at a time; missing/unexpected keys are reported, shape mismatches refused.

    init_missing: run model.init_weights() first, but only when the checkpoint lacks some of the model's
    tensors (a complete checkpoint overwrites everything, so the costly initialisation is skipped).
    """
    from .convert.converter import open_as_ours
    view, _, report = open_as_ours(path, model=model.cfg)
    if init_missing and any(k not in view for k in model.state_dict()):
        model.init_weights()
    missing, unexpected = load_state_dict_into(model, view, strict=strict, source=report.source)
    unexpected = unexpected + [k for k in report.unexpected if k not in unexpected]
    if missing or unexpected:
        import warnings
        warnings.warn(f"{report.source}: {len(missing)} missing keys (e.g. {missing[:3]}), "
                      f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
    return missing, unexpected


def save_weights(model_or_sd, out_dir: str, config: dict = None, fmt: str = "safetensors") -> str:
    """Writes weights (+config.json) into out_dir atomically (temp name, then rename)."""
    os.makedirs(out_dir, exist_ok=True)
    sd = model_or_sd.state_dict() if hasattr(model_or_sd, "state_dict") else model_or_sd
    arrays = {k: (v.numpy() if hasattr(v, "numpy") else np.asarray(v)) for k, v in sd.items()}
    if fmt == "safetensors":
        from safetensors.numpy import save_file
        dst = os.path.join(out_dir, "model.safetensors")
        tmp = dst + ".tmp"
        save_file({k: np.array(v, order="C") for k, v in arrays.items()}, tmp)  # ascontiguousarray makes 0-d 1-d
    elif fmt == "pdparams":
        dst = os.path.join(out_dir, "model_state.pdparams")
        tmp = dst + ".tmp"
        paddle.save(arrays, tmp)
    else:
        raise ValueError(f"unknown weights format '{fmt}' (safetensors or pdparams)")
    os.replace(tmp, dst)
    if config is not None:
        ctmp = os.path.join(out_dir, "config.json.tmp")
        with open(ctmp, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        os.replace(ctmp, os.path.join(out_dir, "config.json"))
    return dst
