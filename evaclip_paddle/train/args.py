"""Training flags: PaddleMIX's run_pretrain_dist.py command line (PaddleNLP TrainingArguments names)
plus this project's own, as one validated dataclass.

Booleans are written the PaddleNLP way, `--flag True|False` or a bare `--flag`. Unknown flags and
impossible combinations raise ArgsError naming the flag.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
from dataclasses import dataclass
from typing import List, Optional

__all__ = ["TrainingArguments", "ArgsError", "parse_args"]


class ArgsError(ValueError):
    """A flag is unknown, malformed or contradicts another; the message names it."""


@dataclass
class TrainingArguments:
    # ---- model ----
    model: str = "EVA02-CLIP-B-16"
    pretrained: Optional[str] = None          # converted weights dir; PaddleMIX's "True" = load from --model dir
    skip_list: str = ""                       # comma-separated key prefixes not loaded from --pretrained
    # PaddleMIX names its cached zero-shot classifier after this; here the classifier is rebuilt from the
    # trained text tower at every eval (a cached one would be stale), so the value is only recorded.
    pretrained_text_model: str = ""
    context_length: Optional[int] = None      # must match the model's text context when given
    force_patch_dropout: Optional[float] = None
    recompute: bool = False
    # ---- data ----
    train_data: str = ""                      # COCO-Karpathy .json, LAION file list, or a demo dir
    image_root: str = ""                      # COCO images root (default: the JSON's directory)
    task_name: str = ""                       # coco_clip | laion: force the format of --train_data
    classification_eval: str = ""             # zero-shot eval set (demo eval dir or ImageFolder)
    dataloader_num_workers: int = 0
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    # ---- optimisation ----
    optimizer: str = "lamb"
    learning_rate: float = 5e-5
    visual_lr: Optional[float] = None         # None: --learning_rate
    text_lr: Optional[float] = None
    weight_decay: float = 0.0
    visual_wd: Optional[float] = None         # None: --weight_decay
    text_wd: Optional[float] = None
    layer_decay: float = 1.0
    visual_ld: Optional[float] = None         # None: --layer_decay
    text_ld: Optional[float] = None
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    num_train_epochs: float = 3.0
    max_steps: int = -1
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    local_loss: bool = False
    gather_with_grad: bool = False
    seed: int = 42
    # ---- precision ----
    bf16: bool = False
    fp16: bool = False
    fp16_opt_level: str = "O1"
    max_nonfinite_steps: int = 10
    # ---- parallel layout (set up by evaclip_paddle.parallel) ----
    tensor_parallel_degree: int = -1
    sharding_parallel_degree: int = -1
    pipeline_parallel_degree: int = -1
    sharding: str = ""
    device: str = "auto"                      # auto | cpu | gpu
    cpu_threads: int = 0                      # 0: OMP_NUM_THREADS if set, else cores / local processes
    # ---- outputs ----
    output_dir: str = "output"
    overwrite_output_dir: bool = False
    logging_dir: str = ""                     # default: output_dir/runs
    logging_steps: int = 10
    save_strategy: str = "steps"              # steps | epoch | no
    save_steps: int = 500
    save_total_limit: Optional[int] = None
    resume_from_checkpoint: Optional[str] = None   # "latest" or a checkpoint dir
    report_to: str = "visualdl"               # visualdl | none
    disable_tqdm: bool = False
    eval_steps: int = 0                       # 0: zero-shot eval only at the end
    do_train: Optional[bool] = None           # neither --do_train nor --do_eval given: train
    do_eval: bool = False
    # ---- accepted for PaddleMIX command-line compatibility; no effect here ----
    start_epoch: int = 0
    last_epoch: int = -1
    tensorboard: bool = False
    tensor_fusion: bool = False
    cpu_core_bind: bool = False

    COMPAT_FLAGS = ("start_epoch", "last_epoch", "tensorboard", "tensor_fusion", "cpu_core_bind")

    # ------------------------------------------------------------------ derived values
    @property
    def sharding_stages(self) -> List[str]:
        return [w for w in self.sharding.replace(",", " ").split() if w]

    @property
    def precision(self) -> str:
        return "bf16" if self.bf16 else ("fp16" if self.fp16 else "fp32")

    def should_train(self) -> bool:
        return self.do_train if self.do_train is not None else not self.do_eval

    def load_pretrained_path(self) -> Optional[str]:
        """--pretrained PATH, or PaddleMIX's `--pretrained True` meaning: weights live in the --model dir."""
        v = self.pretrained
        if v is None or v.strip().lower() in ("", "false", "0", "no", "none"):
            return None
        if v.strip().lower() in ("true", "1", "yes"):
            return self.model
        return v

    # ------------------------------------------------------------------ validation
    def validate(self) -> "TrainingArguments":
        def bad(flag, msg):
            raise ArgsError(f"--{flag}: {msg}")

        if self.bf16 and self.fp16:
            raise ArgsError("--bf16 and --fp16 cannot both be set: pick one mixed-precision dtype")
        if self.fp16_opt_level.upper() != "O1":
            bad("fp16_opt_level", f"only O1 (fp32 master weights, autocast compute) is supported, got "
                                  f"'{self.fp16_opt_level}'")
        if self.optimizer.lower() not in ("lamb", "adamw"):
            bad("optimizer", f"must be lamb or adamw, got '{self.optimizer}'")
        self.optimizer = self.optimizer.lower()
        for stage in self.sharding_stages:
            if stage not in ("stage1", "stage2"):
                bad("sharding", f"unknown or unsupported stage '{stage}' (stage1 or stage2)")
        if len(self.sharding_stages) > 1:
            bad("sharding", f"give one stage, got '{self.sharding}'")
        if self.pipeline_parallel_degree > 1:
            bad("pipeline_parallel_degree", "pipeline parallelism is not supported for CLIP training")
        for flag in ("tensor_parallel_degree", "sharding_parallel_degree"):
            v = getattr(self, flag)
            if v == 0 or v < -1:
                bad(flag, f"must be -1 (unset) or >= 1, got {v}")
        if self.sharding_parallel_degree > 1 and not self.sharding_stages:
            bad("sharding", f"--sharding_parallel_degree {self.sharding_parallel_degree} needs --sharding "
                            "stage1 or stage2")
        if self.device not in ("auto", "cpu", "gpu"):
            bad("device", f"must be auto, cpu or gpu, got '{self.device}'")
        for flag in ("per_device_train_batch_size", "per_device_eval_batch_size", "logging_steps",
                     "max_nonfinite_steps"):
            if getattr(self, flag) < 1:
                bad(flag, f"must be >= 1, got {getattr(self, flag)}")
        if self.dataloader_num_workers < 0:
            bad("dataloader_num_workers", f"must be >= 0, got {self.dataloader_num_workers}")
        for flag in ("learning_rate", "visual_lr", "text_lr", "weight_decay", "visual_wd", "text_wd",
                     "adam_epsilon", "max_grad_norm"):
            v = getattr(self, flag)
            if v is not None and v < 0:
                bad(flag, f"must be >= 0, got {v}")
        for flag in ("layer_decay", "visual_ld", "text_ld"):
            v = getattr(self, flag)
            if v is not None and not 0 < v <= 1:
                bad(flag, f"layer decay must be in (0, 1], got {v}")
        for flag in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, flag) < 1:
                bad(flag, f"must be in [0, 1), got {getattr(self, flag)}")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            bad("max_steps", "set --max_steps > 0 or --num_train_epochs > 0")
        if self.warmup_steps < 0:
            bad("warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.warmup_ratio < 1:
            bad("warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            bad("save_total_limit", f"must be >= 1, got {self.save_total_limit}")
        if self.save_strategy not in ("steps", "epoch", "no"):
            bad("save_strategy", f"must be steps, epoch or no, got '{self.save_strategy}'")
        self.report_to = {"all": "visualdl", "": "none"}.get(self.report_to.lower(), self.report_to.lower())
        if self.report_to not in ("visualdl", "none"):
            bad("report_to", f"must be visualdl or none, got '{self.report_to}'")
        if self.force_patch_dropout is not None and not 0 <= self.force_patch_dropout < 1:
            bad("force_patch_dropout", f"must be in [0, 1), got {self.force_patch_dropout}")
        if self.task_name and self.task_name not in ("coco_clip", "laion"):
            bad("task_name", f"must be coco_clip or laion (or empty: detect from --train_data), got "
                             f"'{self.task_name}'")
        if self.should_train() and not self.train_data:
            bad("train_data", "is required for training (a COCO-Karpathy .json, a LAION file list, or a "
                              "directory made by `python -m evaclip_paddle.demo`)")
        if self.train_data and not os.path.exists(self.train_data):
            bad("train_data", f"not found: {self.train_data}")
        if self.classification_eval and not os.path.isdir(self.classification_eval):
            bad("classification_eval", f"not a directory: {self.classification_eval}")
        if self.do_eval and not self.classification_eval:
            bad("do_eval", "needs --classification_eval DIR")
        r = self.resume_from_checkpoint
        if r and r != "latest" and not os.path.isdir(r):
            bad("resume_from_checkpoint", f"not a checkpoint directory: {r} (or use 'latest')")
        return self


# ---------------------------------------------------------------------- parsing
_TRUE, _FALSE = ("true", "1", "yes", "y", "t"), ("false", "0", "no", "n", "f")


def _str2bool(flag):
    def conv(v):
        if isinstance(v, bool):
            return v
        s = str(v).strip().lower()
        if s in _TRUE:
            return True
        if s in _FALSE:
            return False
        raise ArgsError(f"--{flag}: expected True or False, got '{v}'")
    conv.__name__ = "bool"
    return conv


def _typed(flag, kind):
    def conv(v):
        try:
            return kind(v)
        except ValueError:
            raise ArgsError(f"--{flag}: expected {kind.__name__}, got '{v}'") from None
    conv.__name__ = kind.__name__
    return conv


def _optional(flag, kind):
    def conv(v):
        if str(v).strip().lower() in ("none", "null", ""):
            return None
        return _typed(flag, kind)(v)
    conv.__name__ = kind.__name__
    return conv


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ArgsError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="run_pretrain_dist.py", allow_abbrev=False, add_help=True,
                     description="EVA-CLIP training (PaddleMIX command line).")
    hints = {f.name: f.type for f in dataclasses.fields(TrainingArguments)}
    for f in dataclasses.fields(TrainingArguments):
        name, kind = f.name, str(hints[f.name])
        if kind in ("bool", "Optional[bool]"):
            parser.add_argument(f"--{name}", nargs="?", const=True, default=f.default, type=_str2bool(name))
        elif kind == "int":
            parser.add_argument(f"--{name}", default=f.default, type=_typed(name, int))
        elif kind == "float":
            parser.add_argument(f"--{name}", default=f.default, type=_typed(name, float))
        elif kind == "Optional[int]":
            parser.add_argument(f"--{name}", default=f.default, type=_optional(name, int))
        elif kind == "Optional[float]":
            parser.add_argument(f"--{name}", default=f.default, type=_optional(name, float))
        else:
            parser.add_argument(f"--{name}", default=f.default, type=str)
    return parser


def parse_args(argv: Optional[List[str]] = None, validate: bool = True) -> TrainingArguments:
    parser = build_parser()
    known = [a.option_strings[0][2:] for a in parser._actions if a.option_strings[0].startswith("--")]
    ns, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = next((u for u in unknown if u.startswith("-")), unknown[0])
        base = flag.split("=", 1)[0].lstrip("-")
        close = difflib.get_close_matches(base, known, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else ""
        what = "unknown flag" if flag.startswith("-") else "unexpected value"
        raise ArgsError(f"{what} '{flag}'{hint}")
    args = TrainingArguments(**{k: v for k, v in vars(ns).items()})
    return args.validate() if validate else args
