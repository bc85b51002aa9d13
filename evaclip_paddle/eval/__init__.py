"""Zero-shot classification and retrieval evaluation (CLIP-Benchmark-compatible metrics and results)."""
from .metrics import classification_metrics, mean_per_class_recall, retrieval_metrics, topk_accuracy
from .zeroshot import (build_zero_shot_classifier, encode_images, encode_texts, evaluate_zeroshot_classification,
                       evaluate_zeroshot_retrieval, get_zero_shot_classifier, zero_shot_logits)

__all__ = ["build_zero_shot_classifier", "classification_metrics", "encode_images", "encode_texts",
           "evaluate_zeroshot_classification", "evaluate_zeroshot_retrieval", "get_zero_shot_classifier",
           "mean_per_class_recall", "retrieval_metrics", "topk_accuracy", "zero_shot_logits"]
