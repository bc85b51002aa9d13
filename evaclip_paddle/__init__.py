"""EVA-CLIP model zoo on PaddlePaddle."""
import sys as _sys

from . import perf as _perf

if "paddle" not in _sys.modules:   # libgomp reads its spin count when paddle loads it
    _perf.set_gomp_spincount()
    _perf.record_user_threads()    # before paddle writes OMP_NUM_THREADS=1
from .config import CLIPConfig, ConfigError, TextConfig, VisionConfig
from .factory import (add_model_config, count_parameters, create_model, create_model_and_transforms,
                      get_model_config, get_tokenizer, list_models)

__version__ = "0.1.0"
__all__ = ["CLIPConfig", "ConfigError", "TextConfig", "VisionConfig", "add_model_config", "count_parameters",
           "create_model", "create_model_and_transforms", "get_model_config", "get_tokenizer", "list_models"]
