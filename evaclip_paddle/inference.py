"""Paddle Inference predictors for exported EVA-CLIP encoders (see `evaclip_paddle.export.predictor`)."""
from .export.predictor import (EVACLIPPredictor, EncoderPredictor, ExportError, cpu_bf16_supported, cpu_flags,
                               read_export_meta, register_op_library)

__all__ = ["EVACLIPPredictor", "EncoderPredictor", "ExportError", "cpu_bf16_supported", "cpu_flags",
           "read_export_meta", "register_op_library"]
