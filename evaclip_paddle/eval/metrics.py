"""Zero-shot metrics on numpy arrays, with CLIP-Benchmark's definitions.

Ties. CLIP-Benchmark (1.6.2) takes `torch.topk(scores, k)` and counts a hit when a positive is among the
k indices it returns; which of several equal scores torch keeps at the k-th place is unspecified (on CPU
it is not the lowest index). We make that one choice deterministic and independent of batching or rank
count: items are ordered by score, descending, and equal scores by index, ascending (a stable sort).
An item's rank is therefore  #{j: s_j > s_i} + #{j < i: s_j == s_i}, and it is in the top k iff rank < k.
Without ties both definitions agree exactly. Top-1 equals `argmax` (first maximum), which is what
CLIP-Benchmark's mean per-class recall uses.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, Sequence

import numpy as np


def label_ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Rank (0 = best) of scores[i, targets[i]] in row i, ties broken by lower column first."""
    scores = np.asarray(scores)
    targets = np.asarray(targets, dtype=np.int64)
    if scores.ndim != 2 or targets.shape != (scores.shape[0],):
        raise ValueError(f"scores must be [N, C] and targets [N], got {list(scores.shape)} and {list(targets.shape)}")
    if len(targets) == 0:
        return np.zeros([0], dtype=np.int64)
    if targets.min() < 0 or targets.max() >= scores.shape[1]:
        raise ValueError(f"target index out of range [0, {scores.shape[1]})")
    own = scores[np.arange(len(targets)), targets][:, None]
    cols = np.arange(scores.shape[1])[None, :]
    ahead = (scores > own) | ((scores == own) & (cols < targets[:, None]))
    return ahead.sum(axis=1)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, ks: Iterable[int] = (1, 5)) -> Dict[int, float]:
    """Fraction of samples whose label is among the k highest logits (k capped at the class count)."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    out = {}
    ranks = label_ranks(logits, labels) if len(labels) else None
    for k in ks:
        kk = min(k, logits.shape[1])
        out[k] = float((ranks < kk).mean()) if len(labels) else 0.0
    return out


def mean_per_class_recall(logits: np.ndarray, labels: np.ndarray, num_classes: int = None) -> float:
    """Top-1 recall averaged over the classes that occur in `labels` (sklearn's balanced accuracy)."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    pred = logits.argmax(axis=1)
    classes = np.unique(labels)
    if len(classes) == 0:
        return 0.0
    return float(np.mean([(pred[labels == c] == c).mean() for c in classes]))


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> Dict[str, float]:
    """acc1, acc5, mean_per_class_recall as CLIP-Benchmark reports them (acc5 is NaN below 5 classes)."""
    logits, labels = np.asarray(logits, dtype=np.float32), np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        raise ValueError("no samples to score (empty dataset, or every image was skipped)")
    num_classes = logits.shape[1]
    acc = topk_accuracy(logits, labels, (1, 5))
    return {
        "acc1": acc[1],
        "acc5": acc[5] if num_classes >= 5 else math.nan,
        "mean_per_class_recall": mean_per_class_recall(logits, labels),
    }


def _best_positive_rank(scores: np.ndarray, positive_cols: Sequence[np.ndarray]) -> np.ndarray:
    """Per row: the smallest rank among that row's positive columns (ties by lower column first)."""
    out = np.empty(len(scores), dtype=np.int64)
    order = np.argsort(-scores, axis=1, kind="stable")   # stable on -s keeps lower index first among equals
    rank = np.empty_like(order)
    rows = np.arange(scores.shape[0])[:, None]
    rank[rows, order] = np.arange(scores.shape[1])[None, :]
    for i, cols in enumerate(positive_cols):
        out[i] = rank[i, cols].min() if len(cols) else np.iinfo(np.int64).max
    return out


def retrieval_metrics(image_features: np.ndarray, text_features: np.ndarray, text_to_image: np.ndarray,
                      recall_k: Iterable[int] = (1, 5, 10), chunk: int = 1024) -> Dict[str, float]:
    """Recall@k both ways on unit-norm features, CLIP-Benchmark's keys and definitions.

    text_to_image[t] is the image index of caption t (several captions per image).
    image_retrieval_recall@k: per caption, its image is among the k best images for it.
    text_retrieval_recall@k: per image, at least one of its captions is among the k best captions.
    Scores are computed in chunks of rows, so memory stays O(chunk * pool).
    """
    img = np.asarray(image_features, dtype=np.float32)
    txt = np.asarray(text_features, dtype=np.float32)
    t2i = np.asarray(text_to_image, dtype=np.int64)
    if len(img) == 0 or len(txt) == 0:
        raise ValueError("retrieval needs at least one image and one caption")
    if t2i.shape != (len(txt),) or t2i.min() < 0 or t2i.max() >= len(img):
        raise ValueError(f"text_to_image must give an image index in [0, {len(img)}) for each of {len(txt)} captions")
    ks = sorted(set(int(k) for k in recall_k))
    if not ks or ks[0] < 1:
        raise ValueError(f"recall_k values must be >= 1, got {list(recall_k)}")
    t_rank = np.concatenate([label_ranks(txt[s:s + chunk] @ img.T, t2i[s:s + chunk])
                             for s in range(0, len(txt), chunk)])
    captions_of = [[] for _ in range(len(img))]
    for t, i in enumerate(t2i):
        captions_of[i].append(t)
    captions_of = [np.asarray(c, dtype=np.int64) for c in captions_of]
    i_rank = np.concatenate([_best_positive_rank(img[s:s + chunk] @ txt.T, captions_of[s:s + chunk])
                             for s in range(0, len(img), chunk)])
    has_caption = np.array([len(c) > 0 for c in captions_of])
    metrics = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = float((t_rank < k).mean())
        # Images without any caption cannot be hit; CLIP-Benchmark would divide by zero there: leave them out.
        metrics[f"text_retrieval_recall@{k}"] = float((i_rank[has_caption] < k).mean())
    return metrics
