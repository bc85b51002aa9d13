"""EVA-CLIP model zoo on PaddlePaddle."""
from .config import CLIPConfig, ConfigError, TextConfig, VisionConfig
from .factory import (add_model_config, count_parameters, create_model, create_model_and_transforms,
                      get_model_config, get_tokenizer, list_models)

__version__ = "0.1.0"
__all__ = ["CLIPConfig", "ConfigError", "TextConfig", "VisionConfig", "add_model_config", "count_parameters",
           "create_model", "create_model_and_transforms", "get_model_config", "get_tokenizer", "list_models"]
