"""State-dict layouts: one key-mapping table per foreign layout, used in both directions.

Layouts:
  paddle     ours (Paddle Linear weights [in, out]; q/k/v always split)
  eva        the original EVA-CLIP PyTorch code (baaivision/EVA): `visual.blocks.*` with fused
             `attn.qkv` or split `attn.{q,k,v}_proj`, `attn.q_bias`/`attn.v_bias`, sub-LN names
             `inner_attn_ln`/`ffn_ln`, persistent RoPE tables `*.rope.freqs_{cos,sin}`; open_clip-style text
  open_clip  open_clip with a timm `Eva` trunk: `visual.trunk.*`, `attn.norm`, `mlp.fc1_g/fc1_x/norm/fc2`,
             `q_proj.bias`/`v_proj.bias` when split, `q_bias`/`v_bias` when fused; same text as eva
  paddlemix  PaddleMIX: vision like ours; text `transformer.resblocks.*` with `attn.{q,k,v,out}_proj`
             already [in, out]; `logit_scale` of shape [1]

A rule ties a group of our keys to a group of theirs with an operation:
  same     identical tensor             linear   2-D Linear weight, PyTorch [out, in] <-> Paddle [in, out]
  qkv      fused [3W, W] PyTorch weight <-> our q/k/v [W, W]   cat     fused [3W] bias <-> our q/k/v biases
  scalar   shape [1] <-> shape []        rope_cos/rope_sin   tables the EVA code saves (made on write)
`when` names the architecture flag a rule needs (fused/split attention, swiglu/mlp, rope); `{i}` is a block.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from ..checkpoint_io import CheckpointError

LAYOUTS = ("paddle", "eva", "open_clip", "paddlemix")
LAYOUT_ALIASES = {"paddle": "paddle", "ours": "paddle", "eva": "eva", "torch-eva": "eva", "eva_clip": "eva",
                  "open_clip": "open_clip", "openclip": "open_clip", "open-clip": "open_clip", "timm": "open_clip",
                  "paddlemix": "paddlemix"}


class Rule(NamedTuple):
    ours: Tuple[str, ...]
    theirs: Tuple[str, ...]
    op: str
    when: Optional[str] = None


class Step(NamedTuple):
    src: Tuple[str, ...]
    dst: Tuple[str, ...]
    op: str
    direction: str      # "read": theirs -> ours; "write": ours -> theirs


def _r(ours, theirs, op="same", when=None) -> Rule:
    as_t = (lambda x: (x,) if isinstance(x, str) else tuple(x))
    return Rule(as_t(ours), as_t(theirs), op, when)


def _norm(ours, theirs, when=None) -> List[Rule]:
    return [_r(ours + ".weight", theirs + ".weight", "same", when), _r(ours + ".bias", theirs + ".bias", "same", when)]


def _lin(ours, theirs, op="linear", when=None) -> List[Rule]:
    return [_r(ours + ".weight", theirs + ".weight", op, when), _r(ours + ".bias", theirs + ".bias", "same", when)]


VB, TB = "visual.blocks.{i}.", "text.blocks.{i}."
_QKV_W = tuple(VB + f"attn.{n}_proj.weight" for n in "qkv")
_TQKV_W = tuple(TB + f"attn.{n}_proj.weight" for n in "qkv")
_TQKV_B = tuple(TB + f"attn.{n}_proj.bias" for n in "qkv")

# Every key template of our layout (the identity table is built from it).
OUR_TEMPLATES = (
    ["logit_scale", "visual.patch_embed.proj.weight", "visual.patch_embed.proj.bias", "visual.cls_token",
     "visual.pos_embed"]
    + [VB + n + s for n in ("norm1", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.inner_attn_ln", "attn.proj",
                            "norm2", "mlp.fc1", "mlp.w1", "mlp.w2", "mlp.ffn_ln", "mlp.fc2", "mlp.w3")
       for s in (".weight", ".bias")]
    + ["visual.norm.weight", "visual.norm.bias", "visual.head.weight", "visual.head.bias",
       "text.token_embedding.weight", "text.positional_embedding"]
    + [TB + n + s for n in ("norm1", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.proj", "norm2", "mlp.fc1",
                            "mlp.fc2") for s in (".weight", ".bias")]
    + ["text.norm.weight", "text.norm.bias", "text.text_projection"]
)


def _vision_common(p: str) -> List[Rule]:
    b = p + "blocks.{i}."
    return [
        _r("visual.patch_embed.proj.weight", p + "patch_embed.proj.weight"),
        _r("visual.patch_embed.proj.bias", p + "patch_embed.proj.bias"),
        _r("visual.cls_token", p + "cls_token"), _r("visual.pos_embed", p + "pos_embed"),
        *_norm(VB + "norm1", b + "norm1"), *_norm(VB + "norm2", b + "norm2"),
        *_lin(VB + "attn.proj", b + "attn.proj"),
        *_norm("visual.norm", p + "norm"), *_lin("visual.head", p + "head"),
    ]


def _torch_text() -> List[Rule]:
    """open_clip's text tower, which the EVA code shares."""
    r = "text.transformer.resblocks.{i}."
    return [
        _r("text.token_embedding.weight", "text.token_embedding.weight"),
        _r("text.positional_embedding", "text.positional_embedding"),
        *_norm(TB + "norm1", r + "ln_1"),
        _r(_TQKV_W, r + "attn.in_proj_weight", "qkv"), _r(_TQKV_B, r + "attn.in_proj_bias", "cat"),
        *_lin(TB + "attn.proj", r + "attn.out_proj"),
        *_norm(TB + "norm2", r + "ln_2"),
        *_lin(TB + "mlp.fc1", r + "mlp.c_fc"), *_lin(TB + "mlp.fc2", r + "mlp.c_proj"),
        *_norm("text.norm", "text.ln_final"),
        _r("text.text_projection", "text.text_projection"),
        _r("logit_scale", "logit_scale"),
    ]


def _eva_table() -> List[Rule]:
    p, b = "visual.", "visual.blocks.{i}."
    return _vision_common(p) + [
        _r(_QKV_W, b + "attn.qkv.weight", "qkv", "fused"),
        *[_r(o, b + f"attn.{n}_proj.weight", "linear", "split") for o, n in zip(_QKV_W, "qkv")],
        _r(VB + "attn.q_proj.bias", b + "attn.q_bias"), _r(VB + "attn.v_proj.bias", b + "attn.v_bias"),
        *_norm(VB + "attn.inner_attn_ln", b + "attn.inner_attn_ln"),
        *_lin(VB + "mlp.w1", b + "mlp.w1"), *_lin(VB + "mlp.w2", b + "mlp.w2"), *_lin(VB + "mlp.w3", b + "mlp.w3"),
        *_lin(VB + "mlp.fc1", b + "mlp.fc1"), *_lin(VB + "mlp.fc2", b + "mlp.fc2"),
        *_norm(VB + "mlp.ffn_ln", b + "mlp.ffn_ln"),
        # The EVA code registers its RoPE module at the top and inside every attention (persistent buffers).
        _r((), p + "rope.freqs_cos", "rope_cos", "rope"), _r((), p + "rope.freqs_sin", "rope_sin", "rope"),
        _r((), b + "attn.rope.freqs_cos", "rope_cos", "rope"), _r((), b + "attn.rope.freqs_sin", "rope_sin", "rope"),
    ] + _torch_text()


def _open_clip_table() -> List[Rule]:
    p, b = "visual.trunk.", "visual.trunk.blocks.{i}."
    return _vision_common(p) + [
        _r(_QKV_W, b + "attn.qkv.weight", "qkv", "fused"),
        _r(VB + "attn.q_proj.bias", b + "attn.q_bias", "same", "fused"),
        _r(VB + "attn.v_proj.bias", b + "attn.v_bias", "same", "fused"),
        *[_r(o, b + f"attn.{n}_proj.weight", "linear", "split") for o, n in zip(_QKV_W, "qkv")],
        _r(VB + "attn.q_proj.bias", b + "attn.q_proj.bias", "same", "split"),
        _r(VB + "attn.v_proj.bias", b + "attn.v_proj.bias", "same", "split"),
        *_norm(VB + "attn.inner_attn_ln", b + "attn.norm"),
        *_lin(VB + "mlp.w1", b + "mlp.fc1_g"), *_lin(VB + "mlp.w2", b + "mlp.fc1_x"),
        *_lin(VB + "mlp.w3", b + "mlp.fc2", when="swiglu"),
        *_lin(VB + "mlp.fc1", b + "mlp.fc1"), *_lin(VB + "mlp.fc2", b + "mlp.fc2", when="mlp"),
        *_norm(VB + "mlp.ffn_ln", b + "mlp.norm"),
    ] + _torch_text()


def _paddlemix_table() -> List[Rule]:
    r = "text.transformer.resblocks.{i}."
    vision = [_r(k, k) for k in OUR_TEMPLATES if k.startswith("visual.")]
    return vision + [
        _r("text.token_embedding.weight", "text.token_embedding.weight"),
        _r("text.positional_embedding", "text.positional_embedding"),
        *_norm(TB + "norm1", r + "ln_1"),
        *[x for n in "qkv" for x in _lin(TB + f"attn.{n}_proj", r + f"attn.{n}_proj", "same")],
        *_lin(TB + "attn.proj", r + "attn.out_proj", "same"),
        *_norm(TB + "norm2", r + "ln_2"),
        *_lin(TB + "mlp.fc1", r + "mlp.c_fc", "same"), *_lin(TB + "mlp.fc2", r + "mlp.c_proj", "same"),
        *_norm("text.norm", "text.ln_final"),
        _r("text.text_projection", "text.text_projection"),
        _r("logit_scale", "logit_scale", "scalar"),
    ]


TABLES: Dict[str, List[Rule]] = {
    "paddle": [_r(k, k) for k in OUR_TEMPLATES],
    "eva": _eva_table(),
    "open_clip": _open_clip_table(),
    "paddlemix": _paddlemix_table(),
}

# Buffers that are recomputed by every implementation: skipped on read, never reported as unexpected.
IGNORED = re.compile(r"(^|\.)rope\.|\.k_bias$|(^|\.)attn_mask$|relative_position_index$|num_batches_tracked$")


# --------------------------------------------------------------------------------------------- key normalisation
_TEXT_TOP = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
_VISION_TOP = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.", "head.", "fc_norm.", "rope.")
_TIMM_NAMES = re.compile(r"^visual\.blocks\.\d+\.(mlp\.fc1_g|mlp\.fc1_x|mlp\.norm|attn\.norm)\.")


def normalize_keys(keys: Iterable[str]) -> "OrderedDict[str, str]":
    """new key -> key as stored: drops `module.`, puts bare text/vision keys under `text.`/`visual.`,
    moves timm-named vision keys under `visual.trunk.`, and `text.logit_scale` to `logit_scale`."""
    keys = list(keys)
    names = [k[len("module."):] if k.startswith("module.") else k for k in keys]
    names = ["logit_scale" if n == "text.logit_scale" else n for n in names]
    if not any(n.startswith("text.") for n in names) and any(n.startswith(("transformer.", "token_embedding."))
                                                             for n in names):
        names = ["text." + n if n.startswith(_TEXT_TOP) else n for n in names]
    if not any(n.startswith("visual.") for n in names) and any(n in ("cls_token", "pos_embed") for n in names):
        names = ["visual." + n if n.startswith(_VISION_TOP) else n for n in names]
    if any(_TIMM_NAMES.match(n) for n in names):
        names = ["visual.trunk." + n[len("visual."):] if n.startswith("visual.") else n for n in names]
    out: "OrderedDict[str, str]" = OrderedDict()
    for new, old in zip(names, keys):
        if new in out:
            raise CheckpointError(f"keys '{out[new]}' and '{old}' both map to '{new}'")
        out[new] = old
    return out


def detect_layout(shapes: Dict[str, Tuple[int, ...]]) -> str:
    """Guesses the layout of normalised keys (shapes settle what names cannot)."""
    keys = list(shapes)
    if any(k.startswith("visual.trunk.") for k in keys):
        return "open_clip"
    if any(k.startswith("text.blocks.") for k in keys):
        return "paddle"
    if any(k.startswith("text.transformer.resblocks.") and ".attn.q_proj." in k for k in keys):
        return "paddlemix"
    if any(k.endswith((".attn.in_proj_weight", ".attn.qkv.weight", ".attn.q_bias")) for k in keys):
        return "eva"
    if any(re.match(r"visual\.blocks\.\d+\.attn\.q_proj\.weight$", k) for k in keys):
        # split attention without q_bias: ours/PaddleMIX ([in, out]) or EVA (PyTorch [out, in]); an MLP
        # input weight is not square, so its orientation against the token width decides.
        width = shapes.get("visual.cls_token", (0,))[-1]
        for k, s in shapes.items():
            if re.match(r"visual\.blocks\.\d+\.mlp\.(fc1|w1)\.weight$", k) and len(s) == 2 and s[0] != s[1]:
                return "paddle" if s[0] == width else "eva"
        return "paddle"
    if "logit_scale" in shapes and len(keys) == 1:
        return "paddle"
    sample = ", ".join(keys[:6])
    raise CheckpointError(f"unrecognised state-dict layout (not EVA-CLIP, open_clip, PaddleMIX or ours); "
                          f"first keys: {sample}")


def read_flags(keys: Iterable[str]) -> Dict[str, bool]:
    keys = list(keys)
    fused = any(k.startswith("visual.") and k.endswith(".attn.qkv.weight") for k in keys)
    swiglu = any(".mlp.fc1_g." in k or ".mlp.w1." in k for k in keys)
    return {"fused": fused, "split": not fused, "swiglu": swiglu, "mlp": not swiglu, "rope": False}


def write_flags(cfg) -> Dict[str, bool]:
    v = cfg.vision_cfg
    # Both reference implementations split q/k/v exactly when sub-LN is on (EVA02), else fuse them.
    return {"fused": not v.subln, "split": v.subln, "swiglu": v.naiveswiglu, "mlp": not v.naiveswiglu,
            "rope": v.rope}


# --------------------------------------------------------------------------------------------- planning
def _pattern(template: str):
    return re.compile(re.escape(template).replace(r"\{i\}", r"(\d+)") + "$")


def _indices(template: str, keys: Iterable[str]) -> List[int]:
    pat = _pattern(template)
    return sorted({int(m.group(1)) for m in map(pat.match, keys) if m})


def block_indices(keys: Iterable[str], tower: str) -> List[int]:
    pat = re.compile(rf"^{tower}\.blocks\.(\d+)\.")
    return sorted({int(m.group(1)) for m in map(pat.match, keys) if m})


def plan(layout: str, keys: Iterable[str], direction: str, flags: Dict[str, bool]) -> Tuple[List[Step], set]:
    """Steps converting `keys` (theirs when reading, ours when writing); returns (steps, keys used)."""
    if layout not in TABLES:
        raise ValueError(f"unknown layout '{layout}' (choose from {', '.join(LAYOUTS)})")
    keys = list(keys)
    present = set(keys)
    towers = {t: block_indices(keys, t) for t in ("visual", "text")}
    steps, used, made = [], set(), set()
    for rule in TABLES[layout]:
        if rule.when and not flags.get(rule.when, False):
            continue
        src, dst = (rule.theirs, rule.ours) if direction == "read" else (rule.ours, rule.theirs)
        if not src and direction == "read":
            continue
        if not src:   # generated on write: only for a tower that is there
            tower = dst[0].split(".")[0]
            if not any(k.startswith(tower + ".") for k in keys):
                continue
            idx = towers[tower] if "{i}" in dst[0] else [None]
        else:
            idx = _indices(src[0], keys) if "{i}" in src[0] else [None]
        for i in idx:
            s = tuple(k.format(i=i) for k in src)
            d = tuple(k.format(i=i) for k in dst)
            if not all(k in present for k in s) or used.intersection(s):
                continue
            clash = made.intersection(d)
            if clash:
                raise CheckpointError(f"ambiguous {layout} layout: '{sorted(clash)[0]}' is produced twice")
            steps.append(Step(s, d, rule.op, direction))
            used.update(s)
            made.update(d)
    return steps, used


# --------------------------------------------------------------------------------------------- operations
def op_shapes(step: Step, shapes: Sequence[Tuple[int, ...]], ctx=None) -> List[Tuple[int, ...]]:
    op, read = step.op, step.direction == "read"
    if op == "same":
        return [tuple(shapes[0])]
    if op == "linear":
        _need_2d(step, shapes[0])
        return [tuple(reversed(shapes[0]))]
    if op == "qkv":
        if read:
            _need_2d(step, shapes[0])
            if shapes[0][0] % 3:
                raise CheckpointError(f"'{step.src[0]}': fused q/k/v weight of shape {list(shapes[0])} "
                                      f"is not divisible by 3 along dim 0")
            return [(shapes[0][1], shapes[0][0] // 3)] * 3
        return [(sum(s[1] for s in shapes), shapes[0][0])]
    if op == "cat":
        if read:
            if len(shapes[0]) != 1 or shapes[0][0] % 3:
                raise CheckpointError(f"'{step.src[0]}': fused bias of shape {list(shapes[0])} cannot be split in 3")
            return [(shapes[0][0] // 3,)] * 3
        return [(sum(s[0] for s in shapes),)]
    if op == "scalar":
        return [()] if read else [(1,)]
    if op in ("rope_cos", "rope_sin"):
        v = ctx.vision_cfg
        return [(v.grid_size ** 2, v.head_width)]
    raise ValueError(f"unknown op {op}")


def _need_2d(step, shape):
    if len(shape) != 2:
        raise CheckpointError(f"'{step.src[0]}' should be a 2-D Linear weight, found shape {list(shape)}")


def run_op(step: Step, arrays: List[np.ndarray], ctx=None) -> List[np.ndarray]:
    """Applies a step to storage arrays (dtype-agnostic, so bfloat16 bits pass unchanged)."""
    op, read = step.op, step.direction == "read"
    if op == "same":
        return [arrays[0]]
    if op == "linear":
        return [arrays[0].T]
    if op == "qkv":
        if read:
            return [p.T for p in np.split(arrays[0], 3, axis=0)]
        return [np.concatenate([a.T for a in arrays], axis=0)]
    if op == "cat":
        return np.split(arrays[0], 3) if read else [np.concatenate(arrays)]
    if op == "scalar":
        return [arrays[0].reshape(())] if read else [arrays[0].reshape((1,))]
    if op in ("rope_cos", "rope_sin"):
        from ..model.rope import rope_tables
        v = ctx.vision_cfg
        cos, sin = rope_tables(v.head_width, v.grid_size, v.pt_hw_seq_len)
        return [cos if op == "rope_cos" else sin]
    raise ValueError(f"unknown op {op}")


# --------------------------------------------------------------------------------------------- expected shapes
def expected_shapes(cfg) -> "OrderedDict[str, Tuple[int, ...]]":
    """Every key and shape of our state dict for a config (full, unsharded), without building a model."""
    v, t, e = cfg.vision_cfg, cfg.text_cfg, cfg.embed_dim
    out: "OrderedDict[str, Tuple[int, ...]]" = OrderedDict(logit_scale=())

    def norm(name, d, rms=False):
        out[name + ".weight"] = (d,)
        if not rms:
            out[name + ".bias"] = (d,)

    def lin(name, i, o, bias=True):
        out[name + ".weight"] = (i, o)
        if bias:
            out[name + ".bias"] = (o,)

    w, h, rms = v.width, v.mlp_hidden, v.use_rms_norm
    out["visual.patch_embed.proj.weight"] = (w, v.in_chans, v.patch_size, v.patch_size)
    out["visual.patch_embed.proj.bias"] = (w,)
    out["visual.cls_token"] = (1, 1, w)
    out["visual.pos_embed"] = (1, v.grid_size ** 2 + 1, w)
    for i in range(v.layers):
        b = f"visual.blocks.{i}."
        norm(b + "norm1", w, rms)
        lin(b + "attn.q_proj", w, w, v.qkv_bias)
        lin(b + "attn.k_proj", w, w, False)
        lin(b + "attn.v_proj", w, w, v.qkv_bias)
        if v.subln:
            norm(b + "attn.inner_attn_ln", w, rms)
        lin(b + "attn.proj", w, w)
        norm(b + "norm2", w, rms)
        if v.naiveswiglu:
            lin(b + "mlp.w1", w, h)
            lin(b + "mlp.w2", w, h)
        else:
            lin(b + "mlp.fc1", w, h)
        if v.subln:
            norm(b + "mlp.ffn_ln", h, rms)
        lin(b + ("mlp.w3" if v.naiveswiglu else "mlp.fc2"), h, w)
    norm("visual.norm", w, rms)
    lin("visual.head", w, e, v.qkv_bias)
    d = t.width
    out["text.token_embedding.weight"] = (t.vocab_size, d)
    out["text.positional_embedding"] = (t.context_length, d)
    for i in range(t.layers):
        b = f"text.blocks.{i}."
        norm(b + "norm1", d)
        for n in "qkv":
            lin(b + f"attn.{n}_proj", d, d)
        lin(b + "attn.proj", d, d)
        norm(b + "norm2", d)
        lin(b + "mlp.fc1", d, t.mlp_hidden)
        lin(b + "mlp.fc2", t.mlp_hidden, d)
    norm("text.norm", d)
    out["text.text_projection"] = (d, e)
    return out


def describe_shapes(shapes: Dict[str, Tuple[int, ...]]) -> str:
    """What the shapes say about the architecture, for error messages."""
    parts = []
    if "visual.cls_token" in shapes or "visual.patch_embed.proj.weight" in shapes:
        w = (shapes["visual.cls_token"][-1] if "visual.cls_token" in shapes
             else shapes["visual.patch_embed.proj.weight"][0])
        depth = len(block_indices(shapes, "visual"))
        patch = shapes.get("visual.patch_embed.proj.weight", (0, 0, 0, 0))[-1]
        n = shapes.get("visual.pos_embed", (1, 1, 0))[1] - 1
        grid = int(round(n ** 0.5)) if n > 0 else 0
        kind = [f for f, pat in (("swiglu", ".mlp.w1."), ("subln", ".inner_attn_ln."), ("qkv_bias", ".q_proj.bias"))
                if any(pat in k for k in shapes if k.startswith("visual."))]
        if "visual.norm.weight" in shapes and "visual.norm.bias" not in shapes:
            kind.append("rmsnorm")
        parts.append(f"vision width {w}, depth {depth}, patch {patch}, image {grid * patch}"
                     + (f", {'+'.join(kind)}" if kind else ""))
    if "text.token_embedding.weight" in shapes:
        d = shapes["text.token_embedding.weight"][1]
        parts.append(f"text width {d}, layers {len(block_indices(shapes, 'text'))}")
    if "text.text_projection" in shapes:
        parts.append(f"embed {shapes['text.text_projection'][-1]}")
    return "; ".join(parts) or "no recognisable tower"
