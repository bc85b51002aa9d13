"""The conversion pipeline: any checkpoint -> our layout (lazily) -> any target layout, one step at a time."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

from ..checkpoint_io import CheckpointError
from ..config import CLIPConfig, ConfigError, config_from_dict
from . import layouts as L
from .readers import Checkpoint, open_checkpoint
from .tensors import FLOATS, canonical_dtype, cast, contiguous, resolve_out_dtype, to_values


@dataclasses.dataclass
class Report:
    source: str
    layout: str
    model: str
    config: CLIPConfig
    missing: List[str]
    unexpected: List[str]
    ignored: List[str]
    notes: List[str] = dataclasses.field(default_factory=list)
    files: List[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        lines = [f"source: {self.source} ({self.layout} layout)", f"model: {self.model}"]
        if self.missing:
            lines.append(f"missing keys ({len(self.missing)}): {', '.join(self.missing[:8])}"
                         + (" ..." if len(self.missing) > 8 else ""))
        if self.unexpected:
            lines.append(f"unexpected keys ({len(self.unexpected)}): {', '.join(self.unexpected[:8])}"
                         + (" ..." if len(self.unexpected) > 8 else ""))
        if self.ignored:
            lines.append(f"ignored buffers: {len(self.ignored)}")
        lines += self.notes
        if self.files:
            lines.append("wrote: " + ", ".join(self.files))
        return "\n".join(lines)


class OursView(Mapping):
    """Our-layout tensors computed on demand from a checkpoint; a Mapping of key -> numpy values.

    `storage(key)` gives the array in its stored dtype (bfloat16 as uint16 bits) and `dtype(key)` its
    logical dtype. The outputs of the last step are cached, so a fused q/k/v is read once for all three.
    """

    def __init__(self, tensors, steps: List[L.Step]):
        self._src, self._steps = tensors, steps
        self._where: Dict[str, Tuple[int, int]] = {}
        self._shape: Dict[str, Tuple[int, ...]] = {}
        self._dtype: Dict[str, str] = {}
        for n, st in enumerate(steps):
            ins = [tensors[k] for k in st.src]
            dts = {t.dtype for t in ins}
            dt = dts.pop() if len(dts) == 1 else "float32"
            for j, (k, s) in enumerate(zip(st.dst, L.op_shapes(st, [t.shape for t in ins]))):
                self._where[k], self._shape[k], self._dtype[k] = (n, j), tuple(s), dt
        self._cache: Tuple[Optional[int], Optional[list]] = (None, None)

    def shape(self, key) -> Tuple[int, ...]:
        return self._shape[key]

    def dtype(self, key) -> str:
        return self._dtype[key]

    def source_keys(self, key) -> Tuple[str, ...]:
        return self._steps[self._where[key][0]].src

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        return dict(self._shape)

    def storage(self, key) -> np.ndarray:
        n, j = self._where[key]
        if self._cache[0] != n:
            st = self._steps[n]
            ins = [self._src[k] for k in st.src]
            if len({t.dtype for t in ins}) == 1:
                arrays = [t.storage() for t in ins]
            else:
                arrays = [np.asarray(t.values(), dtype=np.float32) for t in ins]
            self._cache = (None, None)            # drop the previous step before computing the next
            self._cache = (n, L.run_op(st, arrays))
        return self._cache[1][j]

    def __getitem__(self, key) -> np.ndarray:
        return to_values(self.storage(key), self._dtype[key])

    def __contains__(self, key) -> bool:
        return key in self._where

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


# ------------------------------------------------------------------------------------------ reading
def open_as_ours(source: Union[str, Checkpoint], model: Union[None, str, CLIPConfig] = None,
                 layout: Optional[str] = None, verify: bool = True) -> Tuple[OursView, CLIPConfig, Report]:
    """Opens a checkpoint of any supported layout as a lazy view in our layout, plus its config.

    model: zoo name, config .json path or CLIPConfig; when None it comes from a config.json beside the
    weights or is detected from the keys and shapes. Shape mismatches raise; missing and unexpected
    keys are reported.
    """
    ck = source if isinstance(source, Checkpoint) else open_checkpoint(source, verify=verify)
    names = L.normalize_keys(ck.tensors)
    tensors = {new: ck.tensors[old] for new, old in names.items()}
    shapes = {k: t.shape for k, t in tensors.items()}
    if layout is None:
        layout = L.detect_layout({k: s for k, s in shapes.items() if not L.IGNORED.search(k)})
    else:
        layout = L.LAYOUT_ALIASES.get(layout, layout)
    steps, used = L.plan(layout, tensors, "read", L.read_flags(tensors))
    ignored = [names[k] for k in tensors if k not in used and L.IGNORED.search(k)]
    leftover = [k for k in tensors if k not in used and not L.IGNORED.search(k)]
    view = OursView(tensors, steps)
    ours = view.shapes()
    cfg, name, notes = _resolve_config(model, ck, ours)
    expected = L.expected_shapes(cfg)
    for k, s in ours.items():
        if k in expected and tuple(expected[k]) != tuple(s):
            src = ", ".join(names[x] for x in view.source_keys(k))
            raise CheckpointError(f"{ck.path}: shape mismatch for '{k}' (from '{src}'): checkpoint {list(s)} "
                                  f"vs model {name} {list(expected[k])}")
    unexpected = [names[k] for k in leftover] + [k for k in ours if k not in expected]
    missing = [k for k in expected if k not in ours]
    present = {k.split(".")[0] for k in ours}
    if missing and len(present & {"visual", "text"}) == 1:
        tower = (present & {"visual", "text"}).pop()
        notes.append(f"one-tower checkpoint: only the {tower} tower is present")
    return view, cfg, Report(ck.path, layout, name, cfg, missing, unexpected, ignored, notes)


def _resolve_config(model, ck: Checkpoint, ours: Dict[str, tuple]) -> Tuple[CLIPConfig, str, List[str]]:
    from ..factory import get_model_config
    if isinstance(model, CLIPConfig):
        return model, model.name, []
    if model is not None:
        cfg = get_model_config(model)
        return cfg, cfg.name, []
    if ck.config is not None and {"embed_dim", "vision_cfg", "text_cfg"} <= set(ck.config):
        try:
            cfg = config_from_dict(ck.config, name="config.json", where=f"{ck.path}: config.json")
            return cfg, cfg.name, ["config from config.json beside the weights"]
        except ConfigError:
            pass        # an open_clip/EVA config with other fields: use it only as a hint
    return match_zoo(ours, ck.config, ck.path)


_HINT_VISION = ("postnorm", "head_width", "rope", "subln", "naiveswiglu", "use_rms_norm", "qkv_bias", "patch_size",
                "pt_hw_seq_len")
_HINT_TEXT = ("heads", "width", "layers")


def _hints(raw: Optional[dict]) -> Tuple[dict, dict]:
    if not isinstance(raw, dict):
        return {}, {}
    raw = raw.get("model_cfg", raw)
    v = raw.get("vision_cfg") or raw.get("vision_config") or {}
    t = raw.get("text_cfg") or raw.get("text_config") or {}
    return ({k: v[k] for k in _HINT_VISION if isinstance(v, dict) and k in v},
            {k: t[k] for k in _HINT_TEXT if isinstance(t, dict) and k in t})


def _signature(cfg: CLIPConfig, towers) -> tuple:
    sig = []
    if "visual" in towers:
        sig.append(repr(dataclasses.replace(cfg.vision_cfg, drop_path_rate=0.0, patch_dropout=0.0, fused_ln=False)))
    if "text" in towers:
        sig.append(repr(dataclasses.replace(cfg.text_cfg, fused_ln=False)))
    return tuple(sig) + (cfg.embed_dim,)


def match_zoo(ours: Dict[str, tuple], raw_config: Optional[dict] = None,
              where: str = "checkpoint") -> Tuple[CLIPConfig, str, List[str]]:
    """Finds the zoo model whose state-dict keys and shapes match the present towers."""
    from ..factory import get_model_config, list_models
    towers = {k.split(".")[0] for k in ours} & {"visual", "text"}
    if not towers:
        raise CheckpointError(f"{where}: neither a vision nor a text tower found; cannot tell the model")
    exact, partial = [], []
    for name in list_models():
        cfg = get_model_config(name)
        exp = {k: s for k, s in L.expected_shapes(cfg).items() if k.split(".")[0] in towers}
        mine = {k: tuple(s) for k, s in ours.items() if k.split(".")[0] in towers}
        if exp == mine:
            exact.append(cfg)
        elif all(exp.get(k) == s for k, s in mine.items()):
            partial.append(cfg)
    cands = exact or partial
    hv, ht = _hints(raw_config)
    if hv or ht:
        fit = [c for c in cands if all(getattr(c.vision_cfg, k) == v for k, v in hv.items())
               and all(getattr(c.text_cfg, k) == v for k, v in ht.items())]
        cands = fit or cands
    if not cands:
        raise CheckpointError(f"{where}: no model of the zoo matches this checkpoint ({L.describe_shapes(ours)}); "
                              f"pass the model name or a config .json (--model)")
    kinds = {_signature(c, towers) for c in cands}
    if len(kinds) > 1:
        raise CheckpointError(f"{where}: the keys and shapes fit several models ({', '.join(c.name for c in cands)}) "
                              f"that differ in what shapes cannot show; pass --model")
    cfg = cands[0]
    notes = [f"model detected from keys and shapes: {cfg.name}" + (" (exact)" if exact else " (partial)")]
    if len(cands) > 1:
        notes.append(f"the absent tower is unknown; config of {cfg.name} used (also fits: "
                     f"{', '.join(c.name for c in cands[1:])})")
    return cfg, cfg.name, notes


def load_state_dict(source: str, model=None, layout: Optional[str] = None) -> Dict[str, np.ndarray]:
    """Our-layout numpy state dict of any checkpoint (materialised; values in their float dtype)."""
    view, _, _ = open_as_ours(source, model, layout)
    return {k: contiguous(view[k]) for k in view}


# ------------------------------------------------------------------------------------------ writing
@dataclasses.dataclass
class Entry:
    key: str
    shape: Tuple[int, ...]
    dtype: str
    fetch: object          # () -> C-contiguous storage array of `dtype`


def plan_output(view: OursView, cfg: CLIPConfig, to: str, dtype: str = "float32") -> List[Entry]:
    """Entries (key, shape, dtype, fetch) of the target layout, in writing order; nothing is read yet."""
    to = L.LAYOUT_ALIASES.get(to, to)
    dtype = canonical_dtype(dtype)
    keys = list(view)
    if to == "paddle":
        steps = [L.Step((k,), (k,), "same", "write") for k in keys]
    else:
        steps, used = L.plan(to, keys, "write", L.write_flags(cfg))
        left = [k for k in keys if k not in used]
        if left:
            raise CheckpointError(f"cannot express '{left[0]}' in the {to} layout (and {len(left) - 1} more)")
    entries: List[Entry] = []
    cache = {"step": None, "out": None}

    def make_fetch(n, j, st, src_dt, out_dt):
        def fetch():
            if cache["step"] != n:
                cache["step"], cache["out"] = None, None
                if len({view.dtype(k) for k in st.src}) <= 1:
                    arrays = [view.storage(k) for k in st.src]
                else:
                    arrays = [np.asarray(view[k], dtype=np.float32) for k in st.src]
                cache["step"], cache["out"] = n, L.run_op(st, arrays, cfg)
            arr = cast(cache["out"][j], src_dt, out_dt)
            return contiguous(arr)
        return fetch

    for n, st in enumerate(steps):
        in_dts = {view.dtype(k) for k in st.src}
        src_dt = in_dts.pop() if len(in_dts) == 1 else "float32"
        out_shapes = L.op_shapes(st, [view.shape(k) for k in st.src], cfg)
        for j, (k, s) in enumerate(zip(st.dst, out_shapes)):
            out_dt = resolve_out_dtype(dtype, src_dt)
            entries.append(Entry(k, tuple(s), out_dt, make_fetch(n, j, st, src_dt, out_dt)))
    return entries


def convert_checkpoint(src: str, out: str, model=None, to: str = "paddle", dtype: str = "fp32",
                       fmt: Optional[str] = None, max_shard_size: Optional[int] = None,
                       source_layout: Optional[str] = None, overwrite: bool = False, verify: bool = True,
                       progress: bool = False) -> Report:
    """Converts `src` (any supported checkpoint) into `out` (a directory, or a single weights file).

    to: paddle (ours; + config.json, loadable by create_model(pretrained=out)), eva (original EVA-CLIP
    PyTorch code) or open_clip. dtype: fp32 | bf16 | fp16 | keep. fmt: safetensors (default) | pdparams
    (paddle only) | pt (torch layouts; written without torch). Output appears only when complete.
    """
    from .writers import check_target, write_output
    to = L.LAYOUT_ALIASES.get(to, to)
    if to not in ("paddle", "eva", "open_clip"):
        raise ValueError(f"unknown target layout '{to}' (paddle, torch-eva or open_clip)")
    dtype = canonical_dtype(dtype)
    fmt = check_target(out, to, fmt, dtype, max_shard_size, overwrite)
    view, cfg, report = open_as_ours(src, model, source_layout, verify)
    entries = plan_output(view, cfg, to, dtype)
    report.files = write_output(out, entries, to, fmt, cfg, max_shard_size, overwrite, progress)
    if dtype != "keep" and any(view.dtype(k) in FLOATS and view.dtype(k) != dtype for k in view):
        report.notes.append(f"floating tensors written as {dtype}")
    return report
