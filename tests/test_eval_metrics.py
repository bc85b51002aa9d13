"""Zero-shot metrics against hand-computed values (CLIP-Benchmark definitions, our tie rule)."""
import math

import numpy as np
import pytest

from evaclip_paddle.eval.metrics import (classification_metrics, label_ranks, mean_per_class_recall,
                                         retrieval_metrics, topk_accuracy)

# 5 samples, 3 classes. s2 ties class 0 and its label 1: the lower index (0) ranks first.
LOGITS = np.array([[0.9, 0.05, 0.05],   # label 0: rank 0
                   [0.2, 0.5, 0.3],     # label 2: rank 1
                   [0.4, 0.4, 0.2],     # label 1: rank 1 (tie with class 0)
                   [0.1, 0.1, 0.8],     # label 2: rank 0
                   [0.0, 0.0, 1.0]],    # label 2: rank 0
                  dtype=np.float32)
LABELS = np.array([0, 2, 1, 2, 2])


def test_ranks_and_topk_by_hand():
    assert label_ranks(LOGITS, LABELS).tolist() == [0, 1, 1, 0, 0]
    acc = topk_accuracy(LOGITS, LABELS, (1, 2, 5))
    assert acc[1] == pytest.approx(3 / 5) and acc[2] == 1.0 and acc[5] == 1.0   # k capped at 3 classes
    # class 0: 1/1, class 1: 0/1, class 2: 2/3
    assert mean_per_class_recall(LOGITS, LABELS) == pytest.approx((1 + 0 + 2 / 3) / 3)


def test_classification_metrics_shape_and_nan_acc5():
    m = classification_metrics(LOGITS, LABELS)
    assert set(m) == {"acc1", "acc5", "mean_per_class_recall"}
    assert math.isnan(m["acc5"])                 # CLIP-Benchmark: acc5 is NaN with fewer than 5 classes
    with pytest.raises(ValueError, match="no samples"):
        classification_metrics(np.zeros([0, 3]), np.zeros([0], np.int64))


def test_top5_tie_at_the_boundary():
    row = np.ones([2, 6], np.float32)            # all six classes tie
    m = topk_accuracy(row, np.array([4, 5]), (5,))
    assert m[5] == 0.5                           # label 4 has rank 4 (in), label 5 rank 5 (out)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_mean_per_class_recall_is_balanced_accuracy():
    from sklearn.metrics import balanced_accuracy_score
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 7)).astype(np.float32)
    labels = rng.integers(0, 6, size=200)        # class 6 never occurs: it is left out of the mean
    assert mean_per_class_recall(logits, labels) == pytest.approx(
        balanced_accuracy_score(labels, logits.argmax(1)), abs=1e-12)


def test_topk_equals_stable_sort_without_ties():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(300, 20)).astype(np.float32)
    labels = rng.integers(0, 20, size=300)
    order = np.argsort(-logits, axis=1)
    for k in (1, 5, 10):
        want = (order[:, :k] == labels[:, None]).any(1).mean()
        assert topk_accuracy(logits, labels, (k,))[k] == pytest.approx(want)


def test_retrieval_by_hand_with_ties():
    # Identity image features make scores[t, i] = text_feats[t, i].
    img = np.eye(3, dtype=np.float32)
    txt = np.array([[0.9, 0.1, 0.0],    # t0 -> img0, rank 0
                    [0.5, 0.5, 0.0],    # t1 -> img0, tie with img1, img0 first: rank 0
                    [0.5, 0.5, 0.0],    # t2 -> img1, tie, img0 first: rank 1
                    [0.2, 0.3, 0.1],    # t3 -> img2, rank 2
                    [0.0, 0.0, 0.0]],   # t4 -> img2, all tie: rank 2
                   dtype=np.float32)
    t2i = np.array([0, 0, 1, 2, 2])
    m = retrieval_metrics(img, txt, t2i, recall_k=(1, 2, 3), chunk=2)
    assert m["image_retrieval_recall@1"] == pytest.approx(2 / 5)
    assert m["image_retrieval_recall@2"] == pytest.approx(3 / 5)
    assert m["image_retrieval_recall@3"] == 1.0
    # img0 column [.9 .5 .5 .2 0]: t0 first (hit@1). img1 column [.1 .5 .5 .3 0]: t1 (idx 1) before t2, so
    # its caption t2 has rank 1 (hit@2). img2 column [0 0 0 .1 0]: t3 first (hit@1).
    assert m["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert m["text_retrieval_recall@2"] == 1.0
    assert list(m)[:2] == ["image_retrieval_recall@1", "text_retrieval_recall@1"]


def test_retrieval_any_caption_counts_and_chunking():
    rng = np.random.default_rng(2)
    img = rng.normal(size=(13, 8)).astype(np.float32)
    t2i = np.repeat(np.arange(13), 5)
    txt = rng.normal(size=(65, 8)).astype(np.float32)
    s = txt @ img.T
    want_i2t = [(np.argsort(-s[:, i])[:3][:, None] == np.nonzero(t2i == i)[0][None]).any() for i in range(13)]
    want_t2i = [(np.argsort(-s[t])[:3] == t2i[t]).any() for t in range(65)]
    for chunk in (4, 1024):
        m = retrieval_metrics(img, txt, t2i, recall_k=(3,), chunk=chunk)
        assert m["text_retrieval_recall@3"] == pytest.approx(np.mean(want_i2t))
        assert m["image_retrieval_recall@3"] == pytest.approx(np.mean(want_t2i))


def test_retrieval_input_errors():
    with pytest.raises(ValueError, match="text_to_image"):
        retrieval_metrics(np.eye(2), np.eye(2), np.array([0, 2]))
    with pytest.raises(ValueError, match="recall_k"):
        retrieval_metrics(np.eye(2), np.eye(2), np.array([0, 1]), recall_k=(0,))
