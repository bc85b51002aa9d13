"""Command line of training (examples/evaclip/run_pretrain_dist.py and the `evaclip-train` script)."""
from __future__ import annotations

import json
import logging
import sys
from typing import List, Optional

from .args import ArgsError, TrainingArguments, parse_args

logger = logging.getLogger("evaclip_paddle.train")


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


def run_eval_only(args: TrainingArguments) -> dict:
    """--do_eval without --do_train: zero-shot classification of --pretrained / --model."""
    from .. import factory
    from ..eval.demo_eval import evaluate_classification
    from .loop import check_precision, select_device

    device = select_device(args)
    amp_dtype = check_precision(args, device)
    path = args.load_pretrained_path()
    model = factory.create_model(args.model if not path or path != args.model else None, pretrained=path)
    return evaluate_classification(model, args.classification_eval, batch_size=args.per_device_eval_batch_size,
                                   amp_dtype=amp_dtype, progress=not args.disable_tqdm)


def main(argv: Optional[List[str]] = None) -> int:
    _setup_logging()
    try:
        args = parse_args(argv)
    except ArgsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    defaults = TrainingArguments()
    for flag in TrainingArguments.COMPAT_FLAGS:
        if getattr(args, flag) != getattr(defaults, flag):
            logger.warning("--%s is accepted for PaddleMIX compatibility and has no effect here", flag)

    from ..checkpoint_io import CheckpointError
    from ..parallel.topology import TopologyError
    from .checkpoint import CheckpointError as TrainCheckpointError
    from .loop import NonFiniteError, run_training

    try:
        if not args.should_train():
            metrics = run_eval_only(args)
            print(json.dumps({"eval": metrics}, indent=1, default=str))
            return 0
        summary = run_training(args)
    except (ArgsError, TopologyError, CheckpointError, TrainCheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    last = next((loss for _, loss in reversed(summary["losses"]) if loss is not None), None)
    print(json.dumps({"global_step": summary["global_step"], "last_loss": last, "eval": summary["eval"],
                      "last_checkpoint": summary["last_checkpoint"], "output_dir": summary["output_dir"],
                      "skipped_samples": summary["counters"]["skipped_samples"],
                      "nonfinite_steps": summary["counters"]["nonfinite_steps"]}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
