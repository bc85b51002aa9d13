"""Parameter groups (tower x decay x layer), LAMB and AdamW, warmup+cosine schedule, global grad clip.

The optimizers are plain functional updates over parameter groups in dygraph, so they run the same
on CPU and GPU, keep their state keyed by parameter *name* (checkpoints do not depend on the
parallel layout), and can be restricted to the parameters a rank owns (ZeRO-1 style sharding).
"""
from __future__ import annotations

import math
import re
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np
import paddle

TOWERS = ("visual", "text", "other")
_NO_DECAY_NAMES = ("pos_embed", "cls_token", "positional_embedding", "logit_scale")
_LAYER0_NAMES = ("patch_embed", "pos_embed", "cls_token", "positional_embedding", "token_embedding")
_BLOCK_RE = re.compile(r"(?:^|\.)(?:res)?blocks\.(\d+)\.")


def tower_of(name: str) -> str:
    head = name.split(".", 1)[0]
    return head if head in ("visual", "text") else "other"


def no_weight_decay(name: str, param) -> bool:
    """1-d tensors (norms, biases, scalars), biases and positional/class embeddings are not decayed."""
    return len(param.shape) <= 1 or name.endswith(".bias") or any(k in name for k in _NO_DECAY_NAMES)


def layer_id(name: str, num_layers: int) -> int:
    """0 for the embeddings, N+1 for block N, num_layers+1 for everything after the blocks."""
    if any(k in name for k in _LAYER0_NAMES):
        return 0
    m = _BLOCK_RE.search(name)
    return int(m.group(1)) + 1 if m else num_layers + 1


def _pick(value, fallback):
    return fallback if value is None else value


def build_param_groups(model, learning_rate: float, weight_decay: float, layer_decay: float = 1.0,
                       visual_lr=None, text_lr=None, visual_wd=None, text_wd=None,
                       visual_ld=None, text_ld=None) -> List[dict]:
    """Groups of (tower, decay, layer id), each with its base LR, weight decay and LR scale.

    Tower values left None fall back to the global ones; the layer-wise LR scale of a parameter is
    ld^(L+1-layer_id) with L the tower's depth. Parameters outside the towers (logit_scale) use the
    global LR and weight decay with scale 1.
    """
    cfg = getattr(model, "cfg", None)
    depth = {"visual": cfg.vision_cfg.layers if cfg else 0, "text": cfg.text_cfg.layers if cfg else 0}
    tower_lr = {"visual": _pick(visual_lr, learning_rate), "text": _pick(text_lr, learning_rate),
                "other": learning_rate}
    tower_wd = {"visual": _pick(visual_wd, weight_decay), "text": _pick(text_wd, weight_decay),
                "other": weight_decay}
    tower_ld = {"visual": _pick(visual_ld, layer_decay), "text": _pick(text_ld, layer_decay), "other": 1.0}
    groups: Dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if p.stop_gradient:  # frozen parameters are not optimised
            continue
        tower = tower_of(name)
        decay = not no_weight_decay(name, p)
        if tower == "other":
            lid, scale = 0, 1.0
        else:
            lid = layer_id(name, depth[tower])
            scale = tower_ld[tower] ** (depth[tower] + 1 - lid)
        key = (tower, decay, lid)
        if key not in groups:
            groups[key] = {"name": f"{tower}_layer{lid}_{'decay' if decay else 'no_decay'}", "tower": tower,
                           "layer_id": lid, "base_lr": float(tower_lr[tower]),
                           "weight_decay": float(tower_wd[tower]) if decay else 0.0,
                           "lr_scale": float(scale), "lr": 0.0, "params": [], "param_names": []}
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return [groups[k] for k in sorted(groups, key=lambda k: (TOWERS.index(k[0]), k[2], not k[1]))]


class WarmupCosine:
    """factor(step) = (step+1)/warmup during warmup, then 0.5*(1+cos(pi*progress)) down to 0.

    Each group's LR is base_lr * lr_scale * factor(step); `step` counts optimizer updates from 0.
    """

    def __init__(self, total_steps: int, warmup_steps: int = 0):
        if total_steps < 1:
            raise ValueError(f"schedule needs at least one step, got total_steps={total_steps}")
        self.total_steps, self.warmup_steps = int(total_steps), max(0, int(warmup_steps))

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def apply(self, optimizer, step: int) -> None:
        f = self.factor(step)
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * g["lr_scale"] * f

    def state_dict(self) -> dict:
        return {"total_steps": self.total_steps, "warmup_steps": self.warmup_steps}

    def set_state_dict(self, state: dict) -> None:
        self.total_steps, self.warmup_steps = int(state["total_steps"]), int(state["warmup_steps"])


# Off: the plain in-place Paddle ops everywhere (the reference path of the tests).
USE_FUSED = True


class GroupOptimizer:
    """Base: param groups, per-parameter state keyed by name, an optional ownership filter.

    `owned`: None (update everything) or a set of parameter names this rank updates; a sharding
    wrapper sets it and broadcasts the updated parameters from their owners after `step`.
    Updates are written with in-place kernels into preallocated buffers: on CPU an out-of-place
    elementwise op on a large tensor (the 49408-row token embedding) costs 5-10x an in-place one.
    The gradient buffers are used as scratch space (they are cleared after the step anyway).
    """

    state_keys: Sequence[str] = ()

    def __init__(self, param_groups: List[dict], beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8):
        if not param_groups:
            raise ValueError("optimizer got no trainable parameters")
        self.param_groups = param_groups
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)
        self.t = 0
        self.state: Dict[str, Dict[str, paddle.Tensor]] = {}
        self._scratch: Dict[str, paddle.Tensor] = {}
        self.owned: Optional[set] = None
        # set by parallel.zero under tensor parallelism: sums a shard's squares over its mp group, so
        # per-tensor norms (LAMB's trust ratio) are those of the full tensor
        self.shard_sq_reduce: Optional[Callable] = None
        self._current = None

    def _tensor_norm(self, x) -> paddle.Tensor:
        flat = x.reshape([-1])
        sq = paddle.dot(flat, flat)
        if self.shard_sq_reduce is not None and getattr(self._current, "is_distributed", False):
            sq = self.shard_sq_reduce(sq)
        return sq.sqrt()

    def parameters(self) -> List:
        return [p for g in self.param_groups for p in g["params"]]

    def named_parameters(self):
        for g in self.param_groups:
            yield from zip(g["param_names"], g["params"])

    def clear_grad(self) -> None:
        for p in self.parameters():
            p.clear_gradient(False)

    def _slot(self, name: str, p) -> Dict[str, paddle.Tensor]:
        if name not in self.state:
            self.state[name] = {k: paddle.zeros(p.shape, dtype="float32") for k in self.state_keys}
        return self.state[name]

    def _buf(self, name: str, p) -> paddle.Tensor:
        if name not in self._scratch:
            self._scratch[name] = paddle.zeros(p.shape, dtype="float32")
        return self._scratch[name]

    @paddle.no_grad()
    def step(self) -> None:
        self.t += 1
        for g in self.param_groups:
            for name, p in zip(g["param_names"], g["params"]):
                if p.grad is None or (self.owned is not None and name not in self.owned):
                    continue
                grad = p.grad if p.grad.dtype == paddle.float32 else p.grad.astype("float32")
                w = p if p.dtype == paddle.float32 else p.astype("float32")
                self._current = p
                self._update(w, grad, self._slot(name, p), self._buf(name, p), g["lr"], g["weight_decay"])
                if w is not p:
                    paddle.assign(w.astype(p.dtype), output=p)

    def _moments(self, g, s, buf):
        """exp_avg <- b1 exp_avg + (1-b1) g; exp_avg_sq <- b2 exp_avg_sq + (1-b2) g^2 (g is clobbered);
        returns the bias-corrected denominator sqrt(v_hat) + eps in buf."""
        m, v = s["exp_avg"], s["exp_avg_sq"]
        buf.copy_(g, False)
        buf.multiply_(g)
        buf.scale_(1 - self.beta2)
        v.scale_(self.beta2)
        v.add_(buf)
        g.scale_(1 - self.beta1)
        m.scale_(self.beta1)
        m.add_(g)
        bc2 = 1 - self.beta2 ** self.t if getattr(self, "bias_correction", True) else 1.0
        buf.copy_(v, False)
        buf.sqrt_()
        buf.scale_(1.0 / math.sqrt(bc2), bias=self.eps)
        return buf

    def _direction(self, g, s, buf, step_scale: float):
        """Updates the moments and leaves step_scale * m / (sqrt(v_hat) + eps) in g.

        On CPU float32 in dygraph one fused_ln kernel does it in a single pass (EVA02-B-16 AdamW
        step 0.89 -> 0.33 s on 2 cores); elsewhere the in-place Paddle ops of _moments.
        """
        op = _adam_op(g, s["exp_avg"], s["exp_avg_sq"])
        if op is not None:
            bc2 = 1 - self.beta2 ** self.t if getattr(self, "bias_correction", True) else 1.0
            # g is a parameter's .grad, which Paddle refuses as an in-place target; detach() shares
            # its memory without that check
            op(g.detach(), s["exp_avg"], s["exp_avg_sq"], self.beta1, self.beta2, self.eps, 1.0 / math.sqrt(bc2),
               float(step_scale))
            return g
        denom = self._moments(g, s, buf)
        g.copy_(s["exp_avg"], False)
        g.divide_(denom)
        g.scale_(step_scale)
        return g

    def _update(self, w, g, s, buf, lr, wd):
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"t": self.t, "type": type(self).__name__,
                "state": {n: {k: v.numpy() for k, v in s.items()} for n, s in self.state.items()},
                "groups": [{k: v for k, v in g.items() if k not in ("params", "param_names")}
                           for g in self.param_groups]}

    def set_state_dict(self, sd: dict) -> None:
        if sd.get("type") not in (None, type(self).__name__):
            raise ValueError(f"optimizer state is for {sd.get('type')}, this run uses {type(self).__name__} "
                             "(check --optimizer)")
        self.t = int(sd["t"])
        known = {n for g in self.param_groups for n in g["param_names"]}
        unknown = [n for n in sd["state"] if n not in known]
        if unknown:
            raise ValueError(f"optimizer state has parameters this model lacks: {unknown[:5]}")
        self.state = {n: {k: paddle.to_tensor(np.asarray(v), dtype="float32") for k, v in s.items()}
                      for n, s in sd["state"].items()}


def _adam_op(g, m, v):
    """The fused_ln in-place Adam kernel when it applies (contiguous float32 CPU tensors, dygraph),
    else None."""
    if not USE_FUSED or not all(t.is_contiguous() for t in (g, m, v)):
        return None
    from ..ops.fused_act import _op
    return _op("evaclip_adam_direction", g, m, v)


def _norm(x) -> paddle.Tensor:
    flat = x.reshape([-1])
    return paddle.dot(flat, flat).sqrt()


class AdamW(GroupOptimizer):
    """Decoupled weight decay (w <- w*(1 - lr*wd)), then the bias-corrected Adam step."""

    state_keys = ("exp_avg", "exp_avg_sq")

    def _update(self, w, g, s, buf, lr, wd):
        if wd:
            w.scale_(1 - lr * wd)
        w.subtract_(self._direction(g, s, buf, lr / (1 - self.beta1 ** self.t)))


class Lamb(GroupOptimizer):
    """LAMB as DeepSpeed publishes it: bias-corrected Adam direction plus weight decay, scaled by the
    trust ratio ||w|| / ||update|| clamped to [min_trust, max_trust] (1 when either norm is 0)."""

    state_keys = ("exp_avg", "exp_avg_sq")

    def __init__(self, param_groups, beta1=0.9, beta2=0.999, eps=1e-8, min_trust: float = 0.01,
                 max_trust: float = 10.0, bias_correction: bool = True):
        super().__init__(param_groups, beta1, beta2, eps)
        self.min_trust, self.max_trust, self.bias_correction = float(min_trust), float(max_trust), bias_correction

    def _update(self, w, g, s, buf, lr, wd):
        bc1 = 1 - self.beta1 ** self.t if self.bias_correction else 1.0
        self._direction(g, s, buf, 1.0 / bc1)                # g = adam direction m_hat / (sqrt(v_hat) + eps)
        if wd:
            buf.copy_(w, False)
            buf.scale_(wd)
            g.add_(buf)
        w_norm, u_norm = self._tensor_norm(w), self._tensor_norm(g)
        ratio = paddle.where((w_norm > 0) & (u_norm > 0), w_norm / paddle.clip(u_norm, min=1e-30),
                             paddle.ones_like(w_norm))
        ratio = paddle.clip(ratio, self.min_trust, self.max_trust)
        g.scale_(ratio * lr)
        w.subtract_(g)


def create_optimizer(name: str, param_groups: List[dict], beta1=0.9, beta2=0.999, eps=1e-8) -> GroupOptimizer:
    name = name.lower()
    if name == "lamb":
        return Lamb(param_groups, beta1, beta2, eps)
    if name == "adamw":
        return AdamW(param_groups, beta1, beta2, eps)
    raise ValueError(f"--optimizer must be lamb or adamw, got '{name}'")


GroupReduce = Callable[[paddle.Tensor, paddle.Tensor], paddle.Tensor]


@paddle.no_grad()
def global_grad_norm(params: Iterable, group_reduce: Optional[GroupReduce] = None) -> paddle.Tensor:
    """L2 norm of all gradients, as one fp32 0-d tensor.

    Sums of squares are kept apart for parameters split over tensor-parallel ranks
    (`p.is_distributed`) and replicated ones, and handed to `group_reduce(sq_split, sq_replicated)`;
    a parallel layout supplies a reduce that all-reduces the split part over its group and counts the
    replicated part once. Default (one rank): their sum.
    """
    split, rep = [], []
    for p in params:
        if p.grad is None:
            continue
        s = p.grad.astype("float32").square().sum()
        (split if getattr(p, "is_distributed", False) else rep).append(s)
    zero = paddle.zeros([], dtype="float32")
    sq_split = paddle.add_n(split) if split else zero
    sq_rep = paddle.add_n(rep) if rep else zero
    total = group_reduce(sq_split, sq_rep) if group_reduce is not None else sq_split + sq_rep
    return total.sqrt()


@paddle.no_grad()
def clip_grads_(params: Iterable, max_norm: float, total_norm: paddle.Tensor) -> None:
    """Scales all gradients by max_norm / total_norm when the norm exceeds max_norm."""
    if max_norm <= 0:
        return
    norm = float(total_norm)
    if norm <= max_norm:
        return
    coef = max_norm / (norm + 1e-6)
    for p in params:
        if p.grad is not None:
            p.grad.scale_(coef)
