"""The training loop: model, data, optimizer, schedule, AMP, non-finite skipping, checkpoints, logs.

`run_training(args)` is the whole pipeline behind examples/evaclip/run_pretrain_dist.py. A parallel
layout plugs in through a parallel.topology.Topology and train.hooks.ParallelHooks; a single process
needs neither.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import paddle

from ..loss import ClipLoss, clamp_logit_scale_
from ..perf import configure_cpu
from . import checkpoint as ckpt
from .args import ArgsError, TrainingArguments
from .hooks import ParallelHooks, default_hooks
from .optim import WarmupCosine, build_param_groups, clip_grads_, create_optimizer, global_grad_norm

logger = logging.getLogger("evaclip_paddle.train")


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class LossScaler:
    """Dynamic loss scaling for fp16: halve on overflow, double after `growth_interval` good steps."""

    def __init__(self, enabled: bool, init_scale: float = 2.0 ** 15, growth_interval: int = 1000,
                 min_scale: float = 1.0):
        self.enabled, self.scale, self.growth_interval, self.min_scale = enabled, float(init_scale), growth_interval, min_scale
        self.good_steps = 0

    def scale_loss(self, loss):
        return loss * self.scale if self.enabled else loss

    @paddle.no_grad()
    def unscale_(self, params) -> None:
        if self.enabled:
            for p in params:
                if p.grad is not None:
                    p.grad.scale_(1.0 / self.scale)

    def update(self, found_nonfinite: bool) -> None:
        if not self.enabled:
            return
        if found_nonfinite:
            self.scale, self.good_steps = max(self.min_scale, self.scale / 2), 0
        else:
            self.good_steps += 1
            if self.good_steps >= self.growth_interval:
                self.scale, self.good_steps = self.scale * 2, 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def set_state_dict(self, s: dict) -> None:
        self.scale, self.good_steps = float(s["scale"]), int(s["good_steps"])


# ---------------------------------------------------------------------------------------- setup
def _launch_omp_threads() -> Optional[str]:
    """OMP_NUM_THREADS as the process was started with (paddle overwrites it with 1 at import)."""
    try:
        with open("/proc/self/environ", "rb") as f:
            env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        v = env.get(b"OMP_NUM_THREADS")
        return v.decode() if v is not None else None
    except OSError:  # not Linux: trust the current environment
        return os.environ.get("OMP_NUM_THREADS")


def configure_cpu_threads(requested: int = 0) -> int:
    """CPU compute threads: --cpu_threads, else an OMP_NUM_THREADS the user set, else the cores shared
    evenly by the processes of this node (paddle would otherwise run single-threaded)."""
    n = requested
    if n <= 0:
        user = _launch_omp_threads()
        if user and user.isdigit() and int(user) > 0:
            n = int(user)
        else:
            local = int(os.environ.get("PADDLE_LOCAL_SIZE", os.environ.get("PADDLE_TRAINERS_NUM", "1")) or 1)
            n = max(1, (os.cpu_count() or 1) // max(1, local))
    os.environ["OMP_NUM_THREADS"] = str(n)
    paddle.base.core.set_num_threads(n)
    return n


def select_device(args: TrainingArguments) -> str:
    has_gpu = paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
    if args.device == "gpu" and not has_gpu:
        raise ArgsError("--device gpu: this Paddle build or machine has no CUDA GPU")
    device = "gpu" if (args.device == "gpu" or (args.device == "auto" and has_gpu)) else "cpu"
    paddle.set_device(device)
    if device == "cpu":
        threads = configure_cpu_threads(args.cpu_threads)
        configure_cpu(threads)      # oneDNN, contiguous transposes, malloc thresholds (perf.py)
        logger.info("CPU training with %d compute thread(s)", threads)
    return device


def check_precision(args: TrainingArguments, device: str) -> Optional[str]:
    """The autocast dtype, after checking that the device really computes in it (fail at start)."""
    if args.precision == "fp32":
        return None
    dtype, flag = ("bfloat16", "--bf16") if args.bf16 else ("float16", "--fp16")
    reason = None
    try:
        with paddle.amp.auto_cast(True, dtype=dtype, level="O1"):
            y = paddle.matmul(paddle.ones([8, 8]), paddle.ones([8, 8]))
        if y.dtype != getattr(paddle, dtype):
            reason = f"autocast leaves matmul in {y.dtype} (no {dtype} matmul kernel in Paddle dygraph)"
    except Exception as e:  # missing kernels surface as errors on some builds
        reason = f"{dtype} matmul fails ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    if reason:
        raise ArgsError(f"{flag}: not supported on this device ({device}): {reason}. Train in fp32 (drop {flag}) "
                        "or use a GPU that supports it.")
    return dtype


def _skip(key: str, patterns: Sequence[str]) -> bool:
    import fnmatch
    return any(key.startswith(p) or fnmatch.fnmatchcase(key, p) for p in patterns)


def load_initial_weights(model, path: str, skip_list: str = "", hooks: Optional[ParallelHooks] = None,
                         prefix: str = "") -> dict:
    """Initialises `model` from a converted (or any convertible) checkpoint, leaving out keys that start
    with / match an entry of the comma-separated skip_list; `prefix` limits loading to one tower."""
    from ..checkpoint_io import load_state_dict_into
    from ..convert.converter import open_as_ours

    view, _, report = open_as_ours(path, model=model.cfg)
    patterns = [s.strip() for s in skip_list.split(",") if s.strip()]
    keys = [k for k in view if not _skip(k, patterns) and k.startswith(prefix)]
    sd = {k: np.asarray(view[k]) for k in keys}
    if hooks is not None and hooks.load_state_dict is not None:
        hooks.load_state_dict(model, sd)
        missing = [k for k in model.state_dict() if k not in sd]
    else:
        missing, _ = load_state_dict_into(model, sd, source=report.source)
    info = {"source": report.source, "loaded": len(sd), "skipped_by_skip_list": len(list(view)) - len(keys),
            "missing": [k for k in missing if k.startswith(prefix)]}
    logger.info("initial weights from %s: %d tensors loaded, %d skipped by --skip_list, %d missing",
                path, info["loaded"], info["skipped_by_skip_list"], len(info["missing"]))
    return info


class _Reporter:
    """JSON-lines log, VisualDL scalars and the progress bar, all on rank 0."""

    def __init__(self, args: TrainingArguments, is_main: bool, total: int, start: int):
        self.is_main = is_main
        self.jsonl = os.path.join(args.output_dir, "train_log.jsonl")
        self.writer = None
        self.bar = None
        if not is_main:
            return
        if start > 0 and os.path.isfile(self.jsonl):   # drop entries the interrupted run logged past the checkpoint
            with open(self.jsonl, "r", encoding="utf-8") as f:
                keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= start]
            with open(self.jsonl, "w", encoding="utf-8") as f:
                f.writelines(keep)
        elif start == 0 and os.path.isfile(self.jsonl):
            os.remove(self.jsonl)
        if args.report_to == "visualdl":
            from visualdl import LogWriter
            self.writer = LogWriter(logdir=args.logging_dir or os.path.join(args.output_dir, "runs"))
        if not args.disable_tqdm:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)

    def log(self, record: dict) -> None:
        if not self.is_main:
            return
        with open(self.jsonl, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.writer.add_scalar(tag=k if "/" in k else f"train/{k}", value=float(v), step=record["step"])
        if self.bar is None:
            logger.info(" ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))

    def advance(self, loss: Optional[float]) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _tower_lrs(optimizer) -> Dict[str, float]:
    out: Dict[str, float] = {}
    for g in optimizer.param_groups:
        out[g["tower"]] = max(out.get(g["tower"], 0.0), g["lr"])
    return {f"lr/{k}": v for k, v in out.items()}


def _as_numpy(x) -> np.ndarray:
    return x.numpy() if hasattr(x, "numpy") else np.asarray(x)


def _pad_batch(images: np.ndarray, texts: np.ndarray, size: int):
    n = images.shape[0]
    pad_i = np.zeros((size - n,) + images.shape[1:], images.dtype)
    pad_t = np.zeros((size - n,) + texts.shape[1:], texts.dtype)
    valid = paddle.to_tensor(np.arange(size) < n, dtype="float32")
    return np.concatenate([images, pad_i]), np.concatenate([texts, pad_t]), valid


# ----------------------------------------------------------------------------------------- loop
def run_training(args: TrainingArguments, topology=None, hooks: Optional[ParallelHooks] = None,
                 callbacks: Sequence[Callable[[int, dict], None]] = (), loss_fn=None) -> dict:
    """Trains as the flags say; returns a summary (steps, per-step losses, eval metrics, paths).

    callbacks(step, info) run after every step (tests use them to interrupt a run).
    """
    from .. import factory
    from ..data.loader import TrainData
    from ..data.tokenizer import CLIPTokenizer
    from ..data.transforms import image_transform
    from ..parallel.topology import init_topology

    device = select_device(args)
    amp_dtype = check_precision(args, device)
    cfg = factory.get_model_config(args.model)
    if args.context_length is not None and args.context_length != cfg.text_cfg.context_length:
        raise ArgsError(f"--context_length {args.context_length}: model {args.model} has a text context of "
                        f"{cfg.text_cfg.context_length}")
    topo = topology or init_topology(max(1, args.tensor_parallel_degree), args.sharding_parallel_degree,
                                     args.sharding, model_cfg=cfg)
    hooks = hooks or default_hooks(topo)
    is_main = topo.rank == 0
    os.makedirs(args.output_dir, exist_ok=True)

    resume_path = ckpt.resolve_resume(args.resume_from_checkpoint, args.output_dir)
    if resume_path is None and args.resume_from_checkpoint == "latest":
        logger.info("--resume_from_checkpoint latest: no checkpoint in %s yet, starting fresh", args.output_dir)
    if resume_path is None and ckpt.list_checkpoints(args.output_dir) and not args.overwrite_output_dir:
        raise ArgsError(f"--output_dir {args.output_dir} already holds checkpoints (newest: "
                        f"{ckpt.latest_checkpoint(args.output_dir)}); pass --resume_from_checkpoint latest to "
                        "continue, or --overwrite_output_dir True to train anew there")

    # Same initial weights on every rank; per-data-rank RNG afterwards (patch dropout differs per rank).
    model = factory.create_model(cfg, force_patch_dropout=args.force_patch_dropout,
                                 grad_checkpointing=args.recompute, seed=args.seed)
    init_path = args.load_pretrained_path()
    if init_path and not resume_path:
        load_initial_weights(model, init_path, args.skip_list, hooks)
    paddle.seed(topo.seed_for(args.seed))
    np.random.seed(topo.seed_for(args.seed) % (2 ** 32))
    import random
    random.seed(topo.seed_for(args.seed))
    model.train()
    train_model = hooks.wrap_model(model)

    groups = build_param_groups(model, args.learning_rate, args.weight_decay, args.layer_decay,
                                args.visual_lr, args.text_lr, args.visual_wd, args.text_wd,
                                args.visual_ld, args.text_ld)
    optimizer = hooks.wrap_optimizer(create_optimizer(args.optimizer, groups, args.adam_beta1, args.adam_beta2,
                                                      args.adam_epsilon))
    params = [p for g in groups for p in g["params"]]

    tokenizer = CLIPTokenizer(context_length=cfg.text_cfg.context_length)
    size = cfg.vision_cfg.image_size
    data = TrainData(args.train_data, args.per_device_train_batch_size, image_transform(size, is_train=True),
                     tokenizer, size, seed=args.seed, num_workers=args.dataloader_num_workers,
                     rank=topo.data_rank, world=topo.data_world, image_root=args.image_root or None,
                     task_name=args.task_name)
    total = args.max_steps if args.max_steps > 0 else max(1, math.ceil(args.num_train_epochs * data.steps_per_epoch))
    warmup = args.warmup_steps if args.warmup_steps > 0 else int(math.ceil(args.warmup_ratio * total))
    schedule = WarmupCosine(total, warmup)
    scaler = LossScaler(enabled=amp_dtype == "float16")
    loss_fn = loss_fn or ClipLoss(args.local_loss, args.gather_with_grad, topo.data_group, topo.data_rank,
                                  topo.data_world)

    step, counters = 0, {"skipped_samples": data.malformed, "nonfinite_steps": 0, "consecutive_nonfinite": 0}
    if resume_path:
        state = ckpt.load_checkpoint(resume_path, topo.rank, topo.world, data_rank=topo.data_rank)
        ts = state["trainer_state"]
        if ts.get("model") not in (None, cfg.name):
            raise ckpt.CheckpointError(f"{resume_path}: checkpoint of model {ts.get('model')}, this run trains "
                                       f"{cfg.name} (--model)")
        if hooks.load_state_dict is not None:
            hooks.load_state_dict(model, state["model_state"])
        else:
            from ..checkpoint_io import load_state_dict_into
            load_state_dict_into(model, state["model_state"], strict=True, source=resume_path)
        optimizer.set_state_dict(state["optimizer_state"])
        scaler.set_state_dict(ts["loss_scaler"])
        counters.update(ts["counters"])
        step = int(ts["global_step"])
        ckpt.set_rng_state(state["rng_state"])
        logger.info("resumed from %s at step %d", resume_path, step)

    def save(at_step: int) -> str:
        model_state = hooks.full_state_dict(model)
        trainer_state = {"model": cfg.name, "data": data.position(at_step), "scheduler": schedule.state_dict(),
                         "loss_scaler": scaler.state_dict(), "counters": dict(counters),
                         "args": {k: v for k, v in vars(args).items()}, "time": time.time()}
        path = ckpt.save_checkpoint(args.output_dir, at_step, model_state if is_main else None, cfg.to_dict(),
                                    optimizer.state_dict(), trainer_state, topo.rank, topo.world, hooks.barrier,
                                    args.save_total_limit)
        if is_main:
            logger.info("saved %s", path)
        return path

    def evaluate(at_step: int) -> dict:
        from ..eval.demo_eval import evaluate_classification
        metrics = evaluate_classification(model, args.classification_eval, tokenizer,
                                          batch_size=args.per_device_eval_batch_size, group=topo.data_group,
                                          amp_dtype=amp_dtype)
        record = {"step": at_step, **{f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}}
        reporter.log(record)
        model.train()
        return metrics

    reporter = _Reporter(args, is_main, total, step)
    history: List[tuple] = []
    window = {"loss": [], "samples": 0, "t0": time.time()}
    last_saved, eval_metrics, norm_fn = None, None, hooks.grad_norm or (lambda ps: global_grad_norm(ps))
    batches = data.batches(step)
    try:
        while step < total:
            epoch, in_epoch, batch = next(batches)
            skipped = int(np.asarray(batch["skipped"]).sum())
            counters["skipped_samples"] += skipped
            images, texts = _as_numpy(batch["image"]), _as_numpy(batch["text"])
            n, valid = int(images.shape[0]), None
            if topo.data_world > 1 and n < args.per_device_train_batch_size:
                # Gathers need equal shapes on every rank: pad, and mask the padding out of the loss.
                images, texts, valid = _pad_batch(images, texts, args.per_device_train_batch_size)
            loss_value, finite = None, False
            if n > 0 or topo.data_world > 1:
                with paddle.amp.auto_cast(amp_dtype is not None, dtype=amp_dtype or "float16", level="O1"):
                    img_f, txt_f, scale = train_model(paddle.to_tensor(images), paddle.to_tensor(texts))
                loss = loss_fn(img_f, txt_f, scale) if valid is None else loss_fn(img_f, txt_f, scale, valid=valid)
                scaler.scale_loss(loss).backward()
                if hooks.sync_grads is not None:
                    hooks.sync_grads(params)
                scaler.unscale_(params)
                norm = norm_fn(params)
                loss_value, norm_value = hooks.loss_value(loss), float(norm)
                finite = not hooks.any_rank(not (math.isfinite(loss_value) and math.isfinite(norm_value)))
            if finite:
                clip_grads_(hooks.grad_params(params), args.max_grad_norm, norm)
                schedule.apply(optimizer, step)
                optimizer.step()
                clamp_logit_scale_(model)
                counters["consecutive_nonfinite"] = 0
                window["loss"].append(loss_value)
            elif n > 0:
                counters["nonfinite_steps"] += 1
                counters["consecutive_nonfinite"] += 1
                logger.warning("step %d: non-finite loss/gradient (loss %s), update skipped", step + 1, loss_value)
            optimizer.clear_grad()
            scaler.update(not finite and n > 0)
            window["samples"] += n
            step += 1
            history.append((step, loss_value if finite else None))
            reporter.advance(loss_value if finite else None)

            if step % args.logging_steps == 0 or step == total or \
                    counters["consecutive_nonfinite"] >= args.max_nonfinite_steps:
                dt = max(1e-9, time.time() - window["t0"])
                record = {"step": step, "epoch": round(epoch + (in_epoch + 1) / data._spe, 4) if data._spe else 0.0,
                          "loss": float(np.mean(window["loss"])) if window["loss"] else float("nan"),
                          **_tower_lrs(optimizer), "logit_scale": float(model.logit_scale.exp()),
                          "grad_norm": norm_value if n > 0 else float("nan"),
                          "samples_per_sec": window["samples"] * topo.data_world / dt,
                          "skipped_samples": counters["skipped_samples"], "nonfinite_steps": counters["nonfinite_steps"]}
                reporter.log(record)
                window = {"loss": [], "samples": 0, "t0": time.time()}
            if counters["consecutive_nonfinite"] >= args.max_nonfinite_steps:
                path = save(step)
                raise NonFiniteError(
                    f"{counters['consecutive_nonfinite']} consecutive steps had a non-finite loss or gradient "
                    f"(--max_nonfinite_steps {args.max_nonfinite_steps}); stopped at step {step}, state saved to {path}. "
                    "Lower the learning rate, check the data, or use fp32.")
            save_now = (args.save_strategy == "steps" and args.save_steps > 0 and step % args.save_steps == 0) or \
                       (args.save_strategy == "epoch" and data._spe and step % data._spe == 0)
            if save_now and step < total:
                last_saved = save(step)
            if args.classification_eval and args.eval_steps > 0 and step % args.eval_steps == 0 and step < total:
                eval_metrics = evaluate(step)
            for cb in callbacks:
                cb(step, {"loss": loss_value, "epoch": epoch, "step_in_epoch": in_epoch})
        if args.save_strategy != "no":
            last_saved = save(step)
        final_state = hooks.full_state_dict(model)   # collective under tensor parallelism: every rank
        if is_main:   # final weights next to the checkpoints, loadable with create_model(pretrained=output_dir)
            from ..checkpoint_io import save_weights
            save_weights(final_state, args.output_dir, config=cfg.to_dict())
        if args.classification_eval:
            eval_metrics = evaluate(step)
    finally:
        reporter.close()
        del batches
    return {"global_step": step, "total_steps": total, "losses": history, "eval": eval_metrics,
            "last_checkpoint": last_saved, "output_dir": args.output_dir, "counters": counters,
            "train_log": reporter.jsonl}
