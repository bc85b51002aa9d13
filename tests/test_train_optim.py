"""Optimizers against a NumPy reference, parameter groups against hand-computed values, schedule, grad norm."""
import math

import numpy as np
import paddle
import pytest

import evaclip_paddle as ec
from evaclip_paddle.train.optim import (AdamW, Lamb, WarmupCosine, build_param_groups, clip_grads_,
                                        create_optimizer, global_grad_norm, layer_id, no_weight_decay)

B1, B2, EPS = 0.9, 0.98, 1e-6


def _np_moments(g, m, v, t):
    m = B1 * m + (1 - B1) * g
    v = B2 * v + (1 - B2) * g * g
    return m, v, (m / (1 - B1 ** t)) / (np.sqrt(v / (1 - B2 ** t)) + EPS)


def np_lamb(w, g, m, v, t, lr, wd):
    m, v, upd = _np_moments(g, m, v, t)
    upd = upd + wd * w
    wn, un = np.linalg.norm(w), np.linalg.norm(upd)
    ratio = np.clip(wn / un, 0.01, 10.0) if wn > 0 and un > 0 else 1.0
    return w - lr * ratio * upd, m, v


def np_adamw(w, g, m, v, t, lr, wd):
    w = w * (1 - lr * wd)
    m, v, upd = _np_moments(g, m, v, t)
    return w - lr * upd, m, v


def _params(rng):
    shapes = {"a.weight": [5, 3], "a.bias": [3], "scale": [], "tiny": [4]}
    values = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    values["tiny"] *= 1e-4          # ||w|| much smaller than the update: trust ratio clamps at 0.01
    values["a.bias"][:] = 0.0       # ||w|| = 0 at the first step: trust ratio 1
    params = {}
    for k, val in values.items():
        p = paddle.create_parameter(list(val.shape), "float32")
        p.set_value(paddle.to_tensor(val))
        params[k] = p
    return params, values


@pytest.mark.parametrize("fused", [True, False], ids=["fused-kernel", "paddle-ops"])
@pytest.mark.parametrize("name,ref", [("lamb", np_lamb), ("adamw", np_adamw)])
def test_optimizer_matches_numpy_reference(name, ref, fused, monkeypatch):
    from evaclip_paddle.train import optim
    monkeypatch.setattr(optim, "USE_FUSED", fused)
    z = paddle.zeros([3])
    assert (optim._adam_op(z, z, z) is not None) == fused, "the fused_ln library (external_ops) is not built"
    rng = np.random.default_rng(0)
    params, w = _params(rng)
    groups = [{"name": "decay", "tower": "visual", "params": [params["a.weight"], params["tiny"]],
               "param_names": ["a.weight", "tiny"], "weight_decay": 0.1, "lr": 0.0, "base_lr": 0.0, "lr_scale": 1.0},
              {"name": "no_decay", "tower": "other", "params": [params["a.bias"], params["scale"]],
               "param_names": ["a.bias", "scale"], "weight_decay": 0.0, "lr": 0.0, "base_lr": 0.0, "lr_scale": 1.0}]
    opt = create_optimizer(name, groups, B1, B2, EPS)
    state = {k: (np.zeros_like(v), np.zeros_like(v)) for k, v in w.items()}
    for t, lrs in enumerate([(1e-2, 3e-2), (5e-3, 1e-2), (2e-2, 2e-3), (1e-2, 1e-2)], start=1):
        grads = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in w.items()}
        for k, p in params.items():
            p.grad = None
            (p * paddle.to_tensor(grads[k])).sum().backward()
        groups[0]["lr"], groups[1]["lr"] = lrs
        opt.step()
        opt.clear_grad()
        for gi, g in enumerate(groups):
            for k in g["param_names"]:
                w[k], m, v = ref(w[k], grads[k], *state[k], t, lrs[gi], g["weight_decay"])
                state[k] = (m, v)
        for k, p in params.items():
            np.testing.assert_allclose(p.numpy(), w[k], rtol=2e-5, atol=1e-7, err_msg=f"{name} step {t} {k}")
    # the optimizer state survives a round trip through its (name-keyed, numpy) state dict
    sd = opt.state_dict()
    opt2 = create_optimizer(name, groups, B1, B2, EPS)
    opt2.set_state_dict(sd)
    assert opt2.t == 4
    np.testing.assert_allclose(opt2.state["a.weight"]["exp_avg"].numpy(), state["a.weight"][0], rtol=1e-5)


def test_lamb_trust_ratio_is_clamped():
    p = paddle.create_parameter([4], "float32")
    p.set_value(paddle.full([4], 1e-6))
    (p * 1.0).sum().backward()
    opt = Lamb([{"params": [p], "param_names": ["p"], "weight_decay": 0.0, "lr": 1.0}], B1, B2, EPS)
    opt.step()
    # Adam direction is ~1 per element: ||u|| = 2, ||w|| = 2e-6 -> ratio clamps at 0.01
    np.testing.assert_allclose(p.numpy(), 1e-6 - 0.01 * np.ones(4) / (1 + EPS), rtol=1e-4)


def test_optimizer_rejects_state_of_other_kind():
    p = paddle.create_parameter([2], "float32")
    g = [{"params": [p], "param_names": ["p"], "weight_decay": 0.0, "lr": 0.1}]
    with pytest.raises(ValueError, match="optimizer"):
        AdamW(g).set_state_dict(Lamb(g).state_dict())


def test_param_groups_of_two_tower_model():
    model = ec.create_model("EVA02-CLIP-tiny")        # vision 2 blocks, text 2 blocks
    groups = build_param_groups(model, learning_rate=5e-4, weight_decay=0.1, layer_decay=1.0,
                                visual_lr=2e-4, text_lr=2e-5, visual_wd=0.05, text_wd=0.02,
                                visual_ld=0.75, text_ld=0.5)
    where = {n: g for g in groups for n in g["param_names"]}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))

    def check(name, tower, lid, lr, wd, scale):
        g = where[name]
        assert (g["tower"], g["layer_id"], g["base_lr"], g["weight_decay"]) == (tower, lid, lr, wd), name
        assert g["lr_scale"] == pytest.approx(scale), name

    # vision: L = 2, scale = 0.75^(3 - id)
    check("visual.patch_embed.proj.weight", "visual", 0, 2e-4, 0.05, 0.75 ** 3)
    check("visual.pos_embed", "visual", 0, 2e-4, 0.0, 0.75 ** 3)
    check("visual.cls_token", "visual", 0, 2e-4, 0.0, 0.75 ** 3)
    check("visual.blocks.0.attn.q_proj.weight", "visual", 1, 2e-4, 0.05, 0.75 ** 2)
    check("visual.blocks.0.attn.q_proj.bias", "visual", 1, 2e-4, 0.0, 0.75 ** 2)
    check("visual.blocks.1.mlp.w3.weight", "visual", 2, 2e-4, 0.05, 0.75)
    check("visual.blocks.1.norm1.weight", "visual", 2, 2e-4, 0.0, 0.75)
    check("visual.norm.weight", "visual", 3, 2e-4, 0.0, 1.0)
    check("visual.head.weight", "visual", 3, 2e-4, 0.05, 1.0)
    # text: L = 2, scale = 0.5^(3 - id); our keys are text.blocks.{i}.
    check("text.token_embedding.weight", "text", 0, 2e-5, 0.02, 0.125)
    check("text.positional_embedding", "text", 0, 2e-5, 0.0, 0.125)
    check("text.blocks.0.mlp.fc1.weight", "text", 1, 2e-5, 0.02, 0.25)
    check("text.blocks.1.attn.proj.bias", "text", 2, 2e-5, 0.0, 0.5)
    check("text.text_projection", "text", 3, 2e-5, 0.02, 1.0)
    check("logit_scale", "other", 0, 5e-4, 0.0, 1.0)

    # the LR each group gets at a step: base * scale * schedule factor
    sched = WarmupCosine(total_steps=10, warmup_steps=2)
    opt = create_optimizer("lamb", groups)
    sched.apply(opt, 0)
    assert where["visual.pos_embed"]["lr"] == pytest.approx(2e-4 * 0.75 ** 3 * 0.5)
    sched.apply(opt, 6)    # cosine progress (6-2)/8 = 0.5 -> factor 0.5
    assert where["text.blocks.0.mlp.fc1.weight"]["lr"] == pytest.approx(2e-5 * 0.25 * 0.5)
    assert where["logit_scale"]["lr"] == pytest.approx(5e-4 * 0.5)


def test_tower_values_fall_back_to_global_ones():
    model = ec.create_model("EVA02-CLIP-tiny")
    groups = build_param_groups(model, learning_rate=1e-3, weight_decay=0.1, layer_decay=0.5)
    g = next(g for g in groups if "text.blocks.0.mlp.fc1.weight" in g["param_names"])
    assert (g["base_lr"], g["weight_decay"], g["lr_scale"]) == (1e-3, 0.1, 0.25)


def test_decay_and_layer_rules():
    p2, p1 = paddle.zeros([2, 2]), paddle.zeros([2])
    assert no_weight_decay("x.bias", p2) and no_weight_decay("x.weight", p1)
    assert no_weight_decay("visual.pos_embed", p2) and not no_weight_decay("visual.head.weight", p2)
    assert layer_id("text.transformer.resblocks.4.attn.in_proj_weight", 12) == 5   # open_clip spelling too
    assert layer_id("visual.blocks.11.mlp.w1.weight", 12) == 12
    assert layer_id("text.ln_final.weight", 12) == 13


def test_schedule_warmup_then_cosine_to_zero():
    s = WarmupCosine(total_steps=12, warmup_steps=4)
    assert [s.factor(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s.factor(8) == pytest.approx(0.5)
    assert s.factor(12) == pytest.approx(0.0) and s.factor(20) == pytest.approx(0.0)


def test_global_grad_norm_and_clip():
    rng = np.random.default_rng(1)
    ps, gs = [], []
    for shape in ([3, 4], [5], [2, 2]):
        p = paddle.create_parameter(shape, "float32")
        g = rng.standard_normal(shape).astype(np.float32)
        (p * paddle.to_tensor(g)).sum().backward()
        ps.append(p)
        gs.append(g)
    ps[0].is_distributed = True
    want = math.sqrt(sum(float((g ** 2).sum()) for g in gs))
    assert float(global_grad_norm(ps)) == pytest.approx(want, rel=1e-5)
    seen = {}

    def reduce(split, rep):   # a parallel layout's hook: split part and replicated part arrive separately
        seen["split"], seen["rep"] = float(split), float(rep)
        return split * 2 + rep
    norm = global_grad_norm(ps, group_reduce=reduce)
    assert seen["split"] == pytest.approx(float((gs[0] ** 2).sum()), rel=1e-5)
    assert float(norm) == pytest.approx(math.sqrt(2 * seen["split"] + seen["rep"]), rel=1e-5)
    clip_grads_(ps, 1.0, global_grad_norm(ps))
    assert float(global_grad_norm(ps)) == pytest.approx(1.0, rel=1e-4)
    np.testing.assert_allclose(ps[1].grad.numpy(), gs[1] / want, rtol=1e-4)
