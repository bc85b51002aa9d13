"""Export to Paddle Inference, predictors, and the embedding tools built on them.

`export_model` / `evaclip-export` write an export folder; `EVACLIPPredictor` (also importable from
`evaclip_paddle.inference`) runs it; `evaclip-embed` and `evaclip-serve` use the predictor.
"""
from .predictor import (EVACLIPPredictor, EncoderPredictor, ExportError, cpu_bf16_supported, read_export_meta,
                        register_op_library)
from .preprocess import PREPROCESS_FILE, read_spec, transform_from_spec

__all__ = ["EVACLIPPredictor", "EncoderPredictor", "ExportError", "PREPROCESS_FILE", "cpu_bf16_supported",
           "export_model", "read_export_meta", "read_spec", "register_op_library", "transform_from_spec"]


def export_model(*args, **kwargs):
    """See `evaclip_paddle.export.export.export_model` (imported lazily: it pulls in the model code)."""
    from .export import export_model as _export
    return _export(*args, **kwargs)
