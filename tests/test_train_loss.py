"""ClipLoss against a NumPy reference; one-rank semantics of local_loss / gather_with_grad; padding mask."""
import math

import numpy as np
import paddle
import pytest

from evaclip_paddle.loss import LOGIT_SCALE_MAX, ClipLoss, clamp_logit_scale_


def _np_clip_loss(img, txt, scale):
    def ce(logits):
        logits = logits - logits.max(1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        return -np.mean(np.diag(logp))
    lg = scale * img @ txt.T
    return (ce(lg) + ce(lg.T)) / 2


def _feats(n=6, d=8, seed=0):
    rng = np.random.default_rng(seed)
    img, txt = rng.standard_normal((n, d)), rng.standard_normal((n, d))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    return img.astype(np.float32), txt.astype(np.float32)


@pytest.mark.parametrize("local_loss,gather_with_grad", [(False, False), (True, True), (True, False), (False, True)])
def test_single_rank_loss_matches_reference(local_loss, gather_with_grad):
    img, txt = _feats()
    loss = ClipLoss(local_loss, gather_with_grad)(paddle.to_tensor(img), paddle.to_tensor(txt), paddle.to_tensor(10.0))
    assert float(loss) == pytest.approx(_np_clip_loss(img, txt, 10.0), rel=1e-5)


def test_padding_mask_equals_loss_on_real_rows():
    img, txt = _feats(n=8)
    valid = paddle.to_tensor(np.array([1, 1, 1, 1, 1, 0, 0, 0], np.float32))
    masked = ClipLoss()(paddle.to_tensor(img), paddle.to_tensor(txt), paddle.to_tensor(5.0), valid=valid)
    assert float(masked) == pytest.approx(_np_clip_loss(img[:5], txt[:5], 5.0), rel=1e-5)
    ones = ClipLoss()(paddle.to_tensor(img), paddle.to_tensor(txt), paddle.to_tensor(5.0),
                      valid=paddle.ones([8], dtype="float32"))
    assert float(ones) == pytest.approx(_np_clip_loss(img, txt, 5.0), rel=1e-5)


def test_gradient_flows_to_both_towers_and_temperature():
    img, txt = _feats()
    a, b = paddle.to_tensor(img, stop_gradient=False), paddle.to_tensor(txt, stop_gradient=False)
    s = paddle.to_tensor(3.0, stop_gradient=False)
    ClipLoss()(a, b, s).backward()
    assert all(float(t.grad.abs().sum()) > 0 for t in (a, b, s))


def test_logit_scale_is_clamped_in_place():
    class M(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.logit_scale = self.create_parameter([])
    m = M()
    for value, want in ((7.0, LOGIT_SCALE_MAX), (-1.0, 0.0), (2.0, 2.0)):
        m.logit_scale.set_value(paddle.to_tensor(value))
        clamp_logit_scale_(m)
        assert float(m.logit_scale) == pytest.approx(want)
    assert LOGIT_SCALE_MAX == pytest.approx(math.log(100))
