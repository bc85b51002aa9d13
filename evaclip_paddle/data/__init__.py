"""Text tokenisation and image preprocessing."""
from .tokenizer import CLIPTokenizer, DEFAULT_CONTEXT_LENGTH, clean_text, tokenize
from .transforms import (IMAGENET_MEAN, IMAGENET_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, TrainTransform,
                         ValTransform, image_transform, to_tensor_batch)

__all__ = ["CLIPTokenizer", "DEFAULT_CONTEXT_LENGTH", "clean_text", "tokenize", "IMAGENET_MEAN", "IMAGENET_STD",
           "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "TrainTransform", "ValTransform", "image_transform",
           "to_tensor_batch"]
