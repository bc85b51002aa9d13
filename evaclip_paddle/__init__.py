"""EVA-CLIP model zoo on PaddlePaddle."""
import os as _os

# Before anything loads paddle's OpenMP runtimes: idle OpenMP threads sleep instead of spinning.
# Paddle runs oneDNN/MKL on libiomp5 and its own kernels (and ours) on libgomp; spinning workers of
# one steal the cores the other needs (text encoding b32 ~1.15x here, see perf.py). Only a default:
# an OMP_WAIT_POLICY already set wins; EVACLIP_OMP_PASSIVE=0 opts out.
if _os.environ.get("EVACLIP_OMP_PASSIVE", "1") == "1":
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from .config import CLIPConfig, ConfigError, TextConfig, VisionConfig
from .factory import (add_model_config, count_parameters, create_model, create_model_and_transforms,
                      get_model_config, get_tokenizer, list_models)

__version__ = "0.1.0"
__all__ = ["CLIPConfig", "ConfigError", "TextConfig", "VisionConfig", "add_model_config", "count_parameters",
           "create_model", "create_model_and_transforms", "get_model_config", "get_tokenizer", "list_models"]
