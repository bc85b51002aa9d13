"""Checkpoint interoperability: read PyTorch (EVA-CLIP, open_clip/timm), PaddleMIX and our own checkpoints
without torch, convert them one tensor at a time, and write Paddle or PyTorch layouts back.

    from evaclip_paddle.convert import convert_checkpoint
    convert_checkpoint("open_clip_pytorch_model.bin", "out/eva02-b16")        # then create_model(pretrained=...)
"""
from .converter import (Report, OursView, convert_checkpoint, load_state_dict, match_zoo, open_as_ours,
                        plan_output)
from .layouts import LAYOUTS, detect_layout, expected_shapes
from .readers import Checkpoint, open_checkpoint

__all__ = ["Checkpoint", "LAYOUTS", "OursView", "Report", "convert_checkpoint", "detect_layout", "expected_shapes",
           "load_state_dict", "match_zoo", "open_as_ours", "open_checkpoint", "plan_output"]
