"""Training: flags, optimizers and schedules, checkpoints, the loop."""
from .args import ArgsError, TrainingArguments, parse_args
from .loop import NonFiniteError, run_training

__all__ = ["ArgsError", "TrainingArguments", "parse_args", "NonFiniteError", "run_training"]
