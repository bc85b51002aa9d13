"""EVA-CLIP training with PaddleMIX's command line.

    python -m paddle.distributed.launch --nproc_per_node N examples/evaclip/run_pretrain_dist.py \
        --model EVA02-CLIP-B-16 --train_data coco_karpathy_train.json --optimizer lamb ...

All flags: `--help`; the pipeline lives in evaclip_paddle.train.
"""
import os
import sys

# Run from a checkout without installing the package.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from evaclip_paddle.train.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
