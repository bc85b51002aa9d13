"""Contrastive (InfoNCE) loss of CLIP, with the feature gathering of data-parallel training.

With one rank every option reduces to the single-process loss. With several ranks:
- gather_with_grad: gathered features carry gradients back to the rank that produced them.
- otherwise: features are gathered without gradients, and the local slice is put back so the
  local features still get their gradient.
- local_loss: each rank scores only its own rows against all gathered columns (labels offset by
  rank * local batch), which costs O(n * N) instead of O(N^2).
"""
from __future__ import annotations

import math

import paddle
import paddle.nn.functional as F

LOGIT_SCALE_MAX = math.log(100.0)


def _gather(x, group, rank: int, world: int, with_grad: bool):
    """Rows of every rank, ordered by rank. Without grad, the local rows keep their autograd link."""
    from .parallel import collectives  # only needed with more than one rank

    if with_grad:
        return collectives.all_gather_with_grad(x, group)
    return collectives.all_gather_nograd(x, group)


class ClipLoss:
    """loss = (CE(image->text) + CE(text->image)) / 2 over the (gathered) batch."""

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, group=None,
                 rank: int = 0, world_size: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"ClipLoss: rank {rank} is not in a world of size {world_size}")
        self.local_loss, self.gather_with_grad = local_loss, gather_with_grad
        self.group, self.rank, self.world_size = group, rank, world_size

    def logits(self, image_features, text_features, logit_scale):
        """(logits_per_image, logits_per_text, labels) as this rank scores them."""
        n = image_features.shape[0]
        if self.world_size > 1:
            all_img = _gather(image_features, self.group, self.rank, self.world_size, self.gather_with_grad)
            all_txt = _gather(text_features, self.group, self.rank, self.world_size, self.gather_with_grad)
            if self.local_loss:
                per_image = logit_scale * paddle.matmul(image_features, all_txt, transpose_y=True)
                per_text = logit_scale * paddle.matmul(text_features, all_img, transpose_y=True)
                labels = paddle.arange(n, dtype="int64") + n * self.rank
                return per_image, per_text, labels
            per_image = logit_scale * paddle.matmul(all_img, all_txt, transpose_y=True)
            return per_image, per_image.T, paddle.arange(per_image.shape[0], dtype="int64")
        per_image = logit_scale * paddle.matmul(image_features, text_features, transpose_y=True)
        return per_image, per_image.T, paddle.arange(n, dtype="int64")

    def __call__(self, image_features, text_features, logit_scale, valid=None):
        """valid: optional float [n] mask of this rank's real rows (1) vs padding (0); padded rows are
        neither scored nor used as negatives (ranks pad to equal shapes when samples were skipped)."""
        # Softmax in fp32 whatever the AMP dtype of the features.
        image_features = image_features.astype("float32")
        text_features = text_features.astype("float32")
        logit_scale = logit_scale.astype("float32")
        per_image, per_text, labels = self.logits(image_features, text_features, logit_scale)
        if valid is None:
            return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2
        valid = valid.astype("float32").reshape([-1])
        all_valid = valid if self.world_size == 1 else _gather(valid, self.group, self.rank, self.world_size, False)
        rows = valid if (self.local_loss or self.world_size == 1) else all_valid
        mask_cols = (1.0 - all_valid) * -1e9                      # padded columns are never a match
        ce = F.cross_entropy(per_image + mask_cols, labels, reduction="none").reshape([-1]) + \
            F.cross_entropy(per_text + mask_cols, labels, reduction="none").reshape([-1])
        return (ce * rows).sum() / (2 * paddle.clip(rows.sum(), min=1.0))


@paddle.no_grad()
def clamp_logit_scale_(model, max_value: float = LOGIT_SCALE_MAX) -> None:
    """Clamps the learnable log temperature in place to [0, ln 100] (after each optimizer step)."""
    p = model.logit_scale
    p.set_value(paddle.clip(p, 0.0, max_value))
