"""Zero-shot classifier: per class, the mean of the normalised template embeddings, renormalised."""
from __future__ import annotations

from typing import Callable, List, Sequence, Union

import numpy as np
import paddle
import paddle.nn.functional as F

Template = Union[str, Callable[[str], str]]


def _fill(template: Template, classname: str) -> str:
    return template(classname) if callable(template) else template.replace("{c}", classname)


@paddle.no_grad()
def build_zero_shot_classifier(model, tokenizer, classnames: Sequence[str], templates: Sequence[Template],
                               batch_size: int = 256, progress: bool = False) -> paddle.Tensor:
    """Returns the [embed_dim, num_classes] classifier matrix.

    Templates are strings with "{c}" for the class name (CLIP-Benchmark's format) or callables.
    Prompts of several classes are batched together, up to `batch_size` texts per forward.
    """
    if not classnames or not templates:
        raise ValueError("zero-shot classifier needs at least one class name and one template")
    was_training = model.training
    model.eval()
    per_batch = max(1, batch_size // len(templates))
    chunks = range(0, len(classnames), per_batch)
    if progress:
        from tqdm import tqdm
        chunks = tqdm(chunks, desc="zero-shot classifier", unit="batch")
    columns: List[paddle.Tensor] = []
    for start in chunks:
        names = classnames[start:start + per_batch]
        texts = [_fill(t, c) for c in names for t in templates]
        ids = paddle.to_tensor(np.asarray(tokenizer(texts)), dtype="int64")
        emb = F.normalize(model.encode_text(ids).astype("float32"), axis=-1)
        emb = emb.reshape([len(names), len(templates), -1]).mean(axis=1)
        columns.append(F.normalize(emb, axis=-1))
    if was_training:
        model.train()
    return paddle.concat(columns, axis=0).T


def zero_shot_logits(image_features: paddle.Tensor, classifier: paddle.Tensor) -> paddle.Tensor:
    """100 * normalised image features @ classifier, as CLIP does."""
    return 100.0 * F.normalize(image_features.astype("float32"), axis=-1) @ classifier
