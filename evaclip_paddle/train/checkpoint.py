"""Training checkpoints: written atomically, found again by `latest`, rotated by save_total_limit.

A checkpoint is the directory output_dir/checkpoint-<step>/ holding
  model.safetensors + config.json   full (unsharded) weights: create_model(pretrained=dir) reads them
  optimizer.safetensors             optimizer moments keyed by parameter name (per rank when several)
  rng_state.pkl                     paddle / numpy / python RNG states (per rank when several)
  trainer_state.json                step, data position, scheduler, loss scaler, counters, args
Everything is written into a hidden temporary directory that is renamed into place only when
complete, so a crash never leaves a half checkpoint under a checkpoint-<step> name.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from typing import Callable, Dict, List, Optional

import numpy as np
import paddle

from ..checkpoint_io import read_state_dict, save_weights

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not fit this run; the message names it."""


def _rank_suffix(rank: int, world: int) -> str:
    return "" if world == 1 else f"-rank{rank:05d}"


def list_checkpoints(output_dir: str) -> List[tuple]:
    """[(step, path)] of complete checkpoints in output_dir, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = _STEP_RE.match(name)
        path = os.path.join(output_dir, name)
        if m and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> Optional[str]:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "paddle": paddle.get_rng_state()}
    if paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0:
        state["paddle_cuda"] = paddle.get_cuda_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    paddle.set_rng_state(state["paddle"])
    if "paddle_cuda" in state and paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0:
        paddle.set_cuda_rng_state(state["paddle_cuda"])


def _flatten_optimizer(opt_state: dict):
    tensors = {}
    for name, slots in opt_state["state"].items():
        for key, value in slots.items():
            tensors[f"{name}::{key}"] = np.array(value, dtype=np.float32, order="C")
    meta = {k: v for k, v in opt_state.items() if k != "state"}
    return tensors, meta


def _unflatten_optimizer(tensors: Dict[str, np.ndarray], meta: dict) -> dict:
    state: Dict[str, dict] = {}
    for flat, value in tensors.items():
        name, key = flat.rsplit("::", 1)
        state.setdefault(name, {})[key] = value
    return dict(meta, state=state)


def save_checkpoint(output_dir: str, step: int, model_state: Optional[Dict[str, np.ndarray]], model_config: dict,
                    optimizer_state: dict, trainer_state: dict, rank: int = 0, world: int = 1,
                    barrier: Callable[[], None] = lambda: None, save_total_limit: Optional[int] = None) -> str:
    """Writes checkpoint-<step> (every rank calls it; rank 0 passes the full model_state)."""
    from safetensors.numpy import save_file

    final = os.path.join(output_dir, f"{PREFIX}{step}")
    tmp = os.path.join(output_dir, f".tmp-{PREFIX}{step}")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    suffix = _rank_suffix(rank, world)
    if rank == 0:
        save_weights(model_state, tmp, config=model_config)
    # A merged state (full tensors by name, parallel.zero) is one file, written by rank 0, whatever the layout.
    merged = bool(optimizer_state.get("merged"))
    if rank == 0 or not merged:
        tensors, meta = _flatten_optimizer(optimizer_state)
        save_file(tensors, os.path.join(tmp, f"optimizer{'' if merged else suffix}.safetensors"),
                  metadata={"meta": json.dumps(meta)})
    with open(os.path.join(tmp, f"rng_state{suffix}.pkl"), "wb") as f:
        pickle.dump(rng_state(), f, protocol=4)
    barrier()
    if rank == 0:
        state = dict(trainer_state, global_step=int(step), world_size=int(world), format_version=FORMAT_VERSION)
        with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:   # last file: marks completion
            json.dump(state, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
        if save_total_limit:
            for _, old in list_checkpoints(output_dir)[:-save_total_limit]:
                if os.path.abspath(old) != os.path.abspath(final):
                    shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def resolve_resume(spec: Optional[str], output_dir: str) -> Optional[str]:
    """`latest` -> newest complete checkpoint in output_dir (None when there is none yet); a path is checked."""
    if not spec:
        return None
    if spec == "latest":
        return latest_checkpoint(output_dir)
    if not os.path.isfile(os.path.join(spec, STATE_FILE)):
        raise CheckpointError(f"--resume_from_checkpoint {spec}: not a complete checkpoint (no {STATE_FILE})")
    return spec


def load_checkpoint(path: str, rank: int = 0, world: int = 1, data_rank: Optional[int] = None) -> dict:
    """{"trainer_state", "model_state", "optimizer_state", "rng_state"} of a checkpoint directory.

    A checkpoint with a merged optimizer state resumes under any number of processes / layout; the
    RNG state then comes from the saved rank that read the same data rank (rank 0 if none did).
    """
    from safetensors import safe_open
    from safetensors.numpy import load_file

    state_path = os.path.join(path, STATE_FILE)
    if not os.path.isfile(state_path):
        raise CheckpointError(f"{path}: not a complete checkpoint (no {STATE_FILE})")
    with open(state_path, "r", encoding="utf-8") as f:
        trainer_state = json.load(f)
    saved_world = int(trainer_state.get("world_size", 1))
    merged_path = os.path.join(path, "optimizer.safetensors")
    if saved_world != world and not os.path.isfile(merged_path):
        raise CheckpointError(f"{path}: written by {saved_world} process(es) with per-rank optimizer files, this "
                              f"run has {world}; resume with the same number of processes")
    suffix = _rank_suffix(rank, world)
    opt_path = os.path.join(path, f"optimizer{suffix}.safetensors")
    if not os.path.isfile(opt_path):
        opt_path = merged_path
    if saved_world == world:
        rng_rank = rank
    else:   # fleet's rank order: rank = data_rank * mp + mp_rank
        saved_mp = max(1, int((trainer_state.get("args") or {}).get("tensor_parallel_degree") or 1))
        d = rank if data_rank is None else int(data_rank)
        rng_rank = d * saved_mp if d * saved_mp < saved_world else 0
    rng_path = os.path.join(path, f"rng_state{_rank_suffix(rng_rank, saved_world)}.pkl")
    for p in (opt_path, rng_path):
        if not os.path.isfile(p):
            raise CheckpointError(f"{path}: missing {os.path.basename(p)}")
    with safe_open(opt_path, framework="numpy") as f:
        meta = json.loads(f.metadata()["meta"])
    optimizer_state = _unflatten_optimizer(load_file(opt_path), meta)
    with open(rng_path, "rb") as f:
        rng = pickle.load(f)
    return {"trainer_state": trainer_state, "model_state": read_state_dict(path),
            "optimizer_state": optimizer_state, "rng_state": rng}
