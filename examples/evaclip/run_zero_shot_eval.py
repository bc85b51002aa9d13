"""Zero-shot classification / retrieval evaluation of an EVA-CLIP model (see `--help`).

    python examples/evaclip/run_zero_shot_eval.py --model EVA02-CLIP-B-16 --pretrained CKPT_DIR \
        --classification_eval IMAGENET_VAL_DIR --per_device_eval_batch_size 64 --output_dir OUT
    python -m paddle.distributed.launch --nproc_per_node 2 examples/evaclip/run_zero_shot_eval.py ...
"""
import os
import sys

# Paddle pins OpenMP to one thread on import unless told otherwise: use the cores we have.
os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))

from evaclip_paddle.eval.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
