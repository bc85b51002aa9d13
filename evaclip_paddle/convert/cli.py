"""`evaclip-convert SRC OUT`: convert EVA-CLIP checkpoints between PyTorch (original EVA-CLIP, open_clip),
PaddleMIX and this package's Paddle layout, one tensor at a time, without torch."""
from __future__ import annotations

import argparse
import sys

from ..checkpoint_io import CheckpointError
from ..config import ConfigError
from .converter import convert_checkpoint
from .writers import parse_size

EPILOG = """examples:
  evaclip-convert open_clip_pytorch_model.bin out/eva02-b16                 # -> Paddle, model detected
  evaclip-convert EVA02_CLIP_L_psz14_s4B.pt out/l14 --model EVA02-CLIP-L-14 --dtype bf16
  evaclip-convert out/l14 l14_open_clip.safetensors --to open_clip         # back to open_clip
  evaclip-convert EVA01_CLIP_g_14.pt out/g14 --max-shard-size 2GB
"""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="evaclip-convert", description=__doc__, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="checkpoint file (.pt/.pth/.bin/.safetensors/.pdparams), shard index or directory")
    ap.add_argument("out", help="output directory (weights + config.json) or a single .safetensors/.pt/.pdparams file")
    ap.add_argument("--model", default=None,
                    help="zoo model name or config .json (default: config.json beside SRC, else detected)")
    ap.add_argument("--to", default="paddle", choices=["paddle", "torch-eva", "eva", "open_clip"],
                    help="target layout (default: paddle)")
    ap.add_argument("--from", dest="source_layout", default=None,
                    choices=["paddle", "eva", "torch-eva", "open_clip", "paddlemix"],
                    help="source layout (default: detected from the keys)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16", "keep"],
                    help="dtype of floating tensors in the output (default: fp32)")
    ap.add_argument("--format", dest="fmt", default=None, choices=["safetensors", "pdparams", "pt"],
                    help="weights format (default: from OUT's suffix, else safetensors)")
    ap.add_argument("--max-shard-size", default=None, help="shard safetensors output, e.g. 2GB (HF-style index)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty OUT")
    ap.add_argument("--no-verify", action="store_true", help="skip CRC checks of PyTorch zip storages")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bar and summary")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = convert_checkpoint(
            args.src, args.out, model=args.model, to=args.to, dtype=args.dtype, fmt=args.fmt,
            max_shard_size=parse_size(args.max_shard_size) if args.max_shard_size else None,
            source_layout=args.source_layout, overwrite=args.overwrite, verify=not args.no_verify,
            progress=not args.quiet)
    except (CheckpointError, ConfigError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"evaclip-convert: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("evaclip-convert: interrupted; no output written", file=sys.stderr)
        return 130
    if not args.quiet:
        print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
