"""Classification metrics on numpy logits (CLIP-Benchmark definitions)."""
from __future__ import annotations

from typing import Dict, Iterable

import numpy as np


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, ks: Iterable[int] = (1, 5)) -> Dict[int, float]:
    """Fraction of samples whose label is among the k highest logits (k capped at the class count)."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    order = np.argsort(-logits, axis=1, kind="stable")
    out = {}
    for k in ks:
        kk = min(k, logits.shape[1])
        out[k] = float((order[:, :kk] == labels[:, None]).any(axis=1).mean()) if len(labels) else 0.0
    return out


def mean_per_class_recall(logits: np.ndarray, labels: np.ndarray, num_classes: int = None) -> float:
    """Top-1 recall averaged over the classes that occur in `labels`."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    pred = logits.argmax(axis=1)
    classes = np.unique(labels)
    if len(classes) == 0:
        return 0.0
    return float(np.mean([(pred[labels == c] == c).mean() for c in classes]))
