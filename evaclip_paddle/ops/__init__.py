"""Custom ops of evaclip_paddle, each with a native-Paddle fallback."""

from .fused_norm import (
    FusedLayerNorm,
    FusedRMSNorm,
    fused_layer_norm,
    fused_ops_available,
    fused_rms_norm,
    get_num_threads,
    load_op,
    op_library_path,
    set_num_threads,
)

__all__ = [
    "FusedLayerNorm",
    "FusedRMSNorm",
    "fused_layer_norm",
    "fused_ops_available",
    "fused_rms_norm",
    "get_num_threads",
    "load_op",
    "op_library_path",
    "set_num_threads",
]
