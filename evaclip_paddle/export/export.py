"""Static-graph export of the EVA-CLIP encoders for Paddle Inference (`evaclip-export`).

Each tower is traced with paddle.jit.to_static (dynamic batch) and saved with paddle.jit.save as
`<tower>/model.json` (PIR program) + `<tower>/model.pdiparams`: the portable program (any device and
precision). Where the fused_ln op library has its MKL kernels, `<tower>/cpu/model.json` is the same
encoder on those kernels for fp32 on CPU (see _cpu_kernels), sharing the parameter file. Beside them:
`preprocess.json` (all a consumer needs to feed the encoders), the tokenizer vocabulary, the
custom-op library when a program uses one, and `export.json` (written last: its presence marks a
complete export).
"""
from __future__ import annotations

import argparse
import contextlib
import filecmp
import json
import os
import re
import shutil
import sys
import warnings
from typing import Dict, Optional, Sequence

import numpy as np
import paddle

from .predictor import EXPORT_META, EncoderPredictor
from .preprocess import build_spec, write_spec

TOWERS = ("image", "text")
FORMAT_VERSION = 1
# PIR serialises ops as "<dialect id>.<name>"; dialect 3 is the custom-op dialect.
_CUSTOM_OP_RE = re.compile(r'"#":"3\.([A-Za-z0-9_]+)"')


class _ImageEncoder(paddle.nn.Layer):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image):  # dy2static needs the first argument spelled `self`
        return self.model.encode_image(image)


class _TextEncoder(paddle.nn.Layer):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, text):
        return self.model.encode_text(text)


# ------------------------------------------------------------------------------------------------
# Trace-time rewrites. Paddle Inference's oneDNN path is slow on three patterns of the dygraph code:
# Paddle's masked scaled_dot_product_attention (text tower, see _sdpa_masked_explicit),
# a [N, 1, D] table broadcast over [B, N, H, D] (the RoPE multiply falls to a reference kernel, ~30x
# slower than the same multiply on [B, H, N, D] with [N, D] tables) and silu, which has no oneDNN
# kernel (so it runs in fp32 between bf16 reorders) while swish, the same function, is fused into the
# fc before it. The rewrites compute the same values; they apply only while tracing, and the parity
# check (verify) covers them.
def _rope_batch_broadcast(orig):
    """apply_rope with tables broadcast over the batch dim only: the same values.

    The x * cos + (x @ rot) * sin form gets [N, H, D] tables (no reshape of x, which oneDNN copies)
    and the rotation as a constant of the program rather than a saved buffer, so the program has the
    parameters of the CPU-kernel variant (which has no rotation matrix) and they are stored once.
    Any other form runs on [B, H, N, D] with [N, D] tables."""
    from ..model.rope import pair_rotation_matrix

    consts = {}

    def rotation(d, dtype):
        # One constant per traced program, shared by every layer's q and k (24 copies of it made
        # the B-16 program JSON 2.8 MB). The program is held with it, so its id stays unique.
        prog = None if paddle.in_dynamic_mode() else paddle.static.default_main_program()
        if prog is None:
            return paddle.to_tensor(pair_rotation_matrix(d), dtype=dtype)
        key = (id(prog), d, str(dtype))
        if key not in consts:
            consts[key] = (prog, paddle.to_tensor(pair_rotation_matrix(d), dtype=dtype))
        return consts[key][1]

    def apply_rope(x, cos, sin, *rest):
        if cos.ndim != 3:  # per-sample tables (patch dropout): keep the original
            return orig(x, cos, sin, *rest)
        n, h, d = x.shape[1], x.shape[2], x.shape[3]
        if len(rest) == 1 and rest[0].ndim == 2:
            rot = rotation(d, x.dtype)
            return x * cos.expand([n, h, d]) + paddle.matmul(x, rot) * sin.expand([n, h, d])
        xt = x.transpose([0, 2, 1, 3])
        return orig(xt, cos.squeeze(1), sin.squeeze(1), *rest).transpose([0, 2, 1, 3])
    return apply_rope


def _sdpa_masked_explicit(orig):
    """scaled_dot_product_attention with an additive mask (the text tower's causal mask) as its
    plain matmul / softmax / matmul: Paddle's own static form of it runs as a oneDNN fused_matmul
    that took 1.3 s per layer for EVA02-B-16 text at batch 32 (2 texts/s; this form 39 texts/s).
    Calls without a mask, or with dropout, causal or scale arguments, keep the original."""
    def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                     *args, **kwargs):
        if attn_mask is None or dropout_p or is_causal or args or kwargs.get("scale") is not None:
            return orig(query, key, value, attn_mask, dropout_p, is_causal, *args, **kwargs)
        q, k, v = (t.transpose([0, 2, 1, 3]) for t in (query, key, value))
        s = paddle.matmul(q, k, transpose_y=True) * (query.shape[-1] ** -0.5) + attn_mask
        return paddle.matmul(paddle.nn.functional.softmax(s, axis=-1), v).transpose([0, 2, 1, 3])
    return scaled_dot_product_attention


def _same_rope(model, new, orig) -> bool:
    """The rewrite gives the dygraph values on a random input (guards against model-code changes)."""
    try:
        v = model.cfg.vision_cfg
        with paddle.no_grad():
            tables = model.visual.rope.tables()
            n = tables[0].shape[0]
            x = paddle.to_tensor(np.random.RandomState(0).randn(2, n, v.heads, v.head_width).astype("float32"))
            return bool(np.allclose(new(x, *tables).numpy(), orig(x, *tables).numpy(), atol=1e-5))
    except Exception as e:  # a changed interface: trace the original code
        warnings.warn(f"RoPE export rewrite skipped ({type(e).__name__}: {e})")
        return False


class _Rewrites:
    """Context manager installing the rewrites into the model modules while tracing."""

    def __init__(self, model, tower: str, enabled: bool = True):
        self.enabled, self.tower = enabled, tower
        self.model, self.applied, self._undo = model, [], []

    def __enter__(self):
        if not self.enabled:
            return self
        import paddle.nn.functional as F

        from ..model import transformer as tmod

        if self.tower == "text" and hasattr(F, "scaled_dot_product_attention"):
            sdpa = F.scaled_dot_product_attention
            F.scaled_dot_product_attention = _sdpa_masked_explicit(sdpa)
            self._undo.append(lambda: setattr(F, "scaled_dot_product_attention", sdpa))
            self.applied.append("sdpa_masked_explicit")
        if self.tower != "image":
            return self
        vcfg = self.model.cfg.vision_cfg
        if vcfg.rope and hasattr(tmod, "apply_rope"):
            orig = tmod.apply_rope
            new = _rope_batch_broadcast(orig)
            if _same_rope(self.model, new, orig):
                tmod.apply_rope = new
                self._undo.append(lambda: setattr(tmod, "apply_rope", orig))
                self.applied.append("rope_batch_broadcast")
        if vcfg.naiveswiglu and hasattr(F, "swish"):
            silu, swish = F.silu, F.swish

            def silu_as_swish(x, name=None):  # the same function; oneDNN has swish (and fuses it)
                return swish(x)

            F.silu = silu_as_swish
            self._undo.append(lambda: setattr(F, "silu", silu))
            self.applied.append("silu_as_swish")
        return self

    def __exit__(self, *exc):
        for undo in reversed(self._undo):
            undo()
        self._undo = []
        return False


@contextlib.contextmanager
def _cpu_kernels(model):
    """Trace with the fused_ln CPU kernels (custom ops) in place of the native math, for the CPU
    fp32 variant of a program. Every layer with a `fused` switch (norms, attention, MLPs) has it
    on while tracing, and ops.fused_act.static_trace lets the kernels into the static program:
    linears as MKL sgemm + bias (+ GELU) in one op, RoPE, attention, the SwiGLU gate and the
    norms. Paddle Inference runs those ops on CPU only."""
    from ..ops import fused_act

    saved = [(m, m.fused) for m in model.sublayers(include_self=True) if isinstance(getattr(m, "fused", None), bool)]
    for m, _ in saved:
        m.fused = True
    try:
        with fused_act.static_trace():
            yield
    finally:
        for m, flag in saved:
            m.fused = flag


def cpu_kernels_available() -> bool:
    """The loaded op library has the kernels a CPU-kernel program needs (the linear op is built
    only where Paddle ships MKL)."""
    try:
        from ..ops import fused_act, fused_attn
    except Exception:  # the ops package is optional
        return False
    return fused_act.linear_available() and fused_attn.inference_available()


def _save_cpu_variant(model, out_dir, tower, wrapper, spec, portable_params):
    """Traces and saves `<tower>/cpu/model.json`; its parameters are written once when they are
    byte-identical to the portable program's (the usual case: same parameters, same order)."""
    with _cpu_kernels(model):
        static = paddle.jit.to_static(wrapper(model), input_spec=[spec], full_graph=True)
        prefix = os.path.join(out_dir, tower, "cpu", "model")
        paddle.jit.save(static, prefix)
    params = f"{tower}/cpu/model.pdiparams"
    if filecmp.cmp(prefix + ".pdiparams", os.path.join(out_dir, portable_params), shallow=False):
        os.remove(prefix + ".pdiparams")
        params = portable_params
    return {"model_file": f"{tower}/cpu/model.json", "params_file": params, "onednn": False,
            "custom_ops": _custom_ops(prefix + ".json")}


def _keep_python_helpers():
    """Helpers that only pick Python objects run as plain Python while tracing: dy2static cannot
    convert the try/except import in model.norm._fused_ops (the fused-norm op path)."""
    from ..model import norm
    if callable(getattr(norm, "_fused_ops", None)):
        paddle.jit.not_to_static(norm._fused_ops)  # marks the function object; harmless in dygraph


def _input_spec(cfg, tower: str):
    if tower == "image":
        s = cfg.vision_cfg.image_size
        return paddle.static.InputSpec([None, cfg.vision_cfg.in_chans, s, s], "float32", name="image")
    return paddle.static.InputSpec([None, cfg.text_cfg.context_length], "int64", name="text")


def _sample_input(cfg, tower: str, batch: int, seed: int = 0) -> np.ndarray:
    rng = np.random.RandomState(seed)
    if tower == "image":
        s = cfg.vision_cfg.image_size
        return rng.randn(batch, cfg.vision_cfg.in_chans, s, s).astype(np.float32)
    ids = np.zeros((batch, cfg.text_cfg.context_length), np.int64)
    for i in range(batch):  # SOT, a few tokens, EOT (the largest id, which pools the features)
        n = 3 + i % 5
        ids[i, 0], ids[i, 1:n + 1], ids[i, n + 1] = 49406, rng.randint(1, 49000, n), 49407
    return ids


def _custom_ops(program_file: str):
    with open(program_file, "r", encoding="utf-8") as f:
        return sorted(set(_CUSTOM_OP_RE.findall(f.read())))


def _op_library_for_export(explicit: Optional[str]) -> Optional[str]:
    from .predictor import _package_op_library
    return explicit or os.environ.get("EVACLIP_OP_LIBRARY") or _package_op_library(load=True)


def _write_json(obj, path: str):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def export_model(model, out_dir: str, towers: Sequence[str] = TOWERS, precision: str = "fp32",
                 model_name: Optional[str] = None, verify: bool = True, threads: Optional[int] = None,
                 op_library: Optional[str] = None, verify_tol: float = 1e-4, rewrites: bool = True,
                 cpu_kernels: Optional[bool] = None) -> Dict:
    """Exports `model` (an EVACLIP in fp32) into out_dir; returns the export metadata.

    precision is the default run precision recorded for predictors (weights stay fp32: oneDNN bf16
    and GPU mixed precision convert at load time). verify: run each saved program once in Paddle
    Inference and compare with dygraph (relative max error <= verify_tol, else an error).
    rewrites: trace with the oneDNN-friendly equivalents of slow patterns (see _Rewrites).
    cpu_kernels: also save each tower as a CPU fp32 program on the fused_ln kernels (see
    _cpu_kernels), which predictors prefer for fp32 on CPU; None: when the op library has them.
    The portable program (any device, any precision) is always written.
    """
    from ..factory import PRECISIONS

    towers = list(dict.fromkeys(towers))
    bad = [t for t in towers if t not in TOWERS]
    if bad or not towers:
        raise ValueError(f"towers must be a non-empty subset of {TOWERS}, got {list(towers)}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got '{precision}'")
    dtypes = {str(p.dtype) for p in model.parameters()}
    if dtypes != {"paddle.float32"}:
        raise ValueError(f"export needs an fp32 model (create_model(..., precision='fp32')), found {sorted(dtypes)}")
    if cpu_kernels is None:
        cpu_kernels = cpu_kernels_available()
    elif cpu_kernels and not cpu_kernels_available():
        raise RuntimeError("cpu_kernels=True needs the fused_ln op library with its MKL kernels (build "
                           "external_ops/ against a Paddle that ships libmklml_intel.so)")
    cfg = model.cfg
    was_training = model.training
    model.eval()
    os.makedirs(out_dir, exist_ok=True)
    meta_path = os.path.join(out_dir, EXPORT_META)
    if os.path.exists(meta_path):
        os.remove(meta_path)  # an interrupted re-export must not look complete
    meta = {"format": "evaclip_paddle.export", "format_version": FORMAT_VERSION, "model": model_name or cfg.name,
            "embed_dim": cfg.embed_dim, "precision": precision, "weights_dtype": "float32",
            "config": cfg.to_dict(), "logit_scale": float(model.logit_scale.numpy()),
            "paddle_version": paddle.__version__, "towers": {}, "custom_ops": None}
    wrappers = {"image": _ImageEncoder, "text": _TextEncoder}
    used_ops = set()
    _keep_python_helpers()
    try:
        for tower in towers:
            spec = _input_spec(cfg, tower)
            with _Rewrites(model, tower, rewrites) as rw:
                static = paddle.jit.to_static(wrappers[tower](model), input_spec=[spec], full_graph=True)
                prefix = os.path.join(out_dir, tower, "model")
                paddle.jit.save(static, prefix)
            meta.setdefault("rewrites", {})[tower] = rw.applied
            ops = _custom_ops(prefix + ".json")
            used_ops.update(ops)
            meta["towers"][tower] = {
                "model_file": f"{tower}/model.json", "params_file": f"{tower}/model.pdiparams",
                "custom_ops": ops,
                "input": {"name": spec.name, "shape": [-1] + list(spec.shape[1:]),
                          "dtype": str(spec.dtype).split(".")[-1]},
                "output": {"shape": [-1, cfg.embed_dim], "dtype": "float32", "normalized": False},
            }
            cpu_dir = os.path.join(out_dir, tower, "cpu")
            if os.path.isdir(cpu_dir):
                shutil.rmtree(cpu_dir)  # a previous export's variant must not outlive this one
            if cpu_kernels:
                variant = _save_cpu_variant(model, out_dir, tower, wrappers[tower], spec,
                                            meta["towers"][tower]["params_file"])
                used_ops.update(variant["custom_ops"])
                meta["towers"][tower]["cpu_kernels"] = variant
    finally:
        model.train(was_training)

    if used_ops:
        lib = _op_library_for_export(op_library)
        rel = None
        if lib and os.path.isfile(lib):  # a copy travels with the export (same paddle version needed)
            os.makedirs(os.path.join(out_dir, "ops"), exist_ok=True)
            rel = f"ops/{os.path.basename(lib)}"
            shutil.copy2(lib, os.path.join(out_dir, rel))
        else:
            warnings.warn(f"the exported program uses custom op(s) {sorted(used_ops)} but their library was not "
                          "found to copy; predictors must load it (op_library= or EVACLIP_OP_LIBRARY)")
        meta["custom_ops"] = {"names": sorted(used_ops), "library": rel, "provider": "evaclip_paddle.ops.fused_norm"}

    vocab_rel = None
    if "text" in towers:
        from ..data.tokenizer import default_bpe_path
        os.makedirs(os.path.join(out_dir, "tokenizer"), exist_ok=True)
        vocab_rel = f"tokenizer/{os.path.basename(default_bpe_path())}"
        shutil.copy2(default_bpe_path(), os.path.join(out_dir, vocab_rel))
    write_spec(build_spec(cfg, vocab_rel, towers), out_dir)

    if verify:
        meta["verify"] = _verify(model, cfg, out_dir, meta, threads, op_library, verify_tol)
    _write_json(meta, meta_path)
    return meta


def _verify(model, cfg, out_dir, meta, threads, op_library, tol):
    """Runs each saved program in Paddle Inference (fp32, oneDNN) against dygraph on 2 samples."""
    if meta["custom_ops"]:
        from .predictor import _find_op_library, register_op_library
        register_op_library(_find_op_library(meta["custom_ops"], out_dir, op_library))
    report = {}
    was_training = model.training
    model.eval()
    try:
        for tower, t in meta["towers"].items():
            report[tower] = _verify_tower(model, cfg, out_dir, tower, t, threads, tol)
    finally:
        model.train(was_training)
    return report


def _verify_tower(model, cfg, out_dir, tower, t, threads, tol):
    x = _sample_input(cfg, tower, 2)
    with paddle.no_grad():
        ref = (model.encode_image if tower == "image" else model.encode_text)(paddle.to_tensor(x)).numpy()
    report = {"batch": 2}
    programs = [("max_rel_err", t, True)]
    if t.get("cpu_kernels"):
        programs.append(("cpu_kernels_max_rel_err", t["cpu_kernels"], False))
    for key, prog, onednn in programs:
        pred = EncoderPredictor(os.path.join(out_dir, prog["model_file"]), os.path.join(out_dir, prog["params_file"]),
                                threads=threads, input_dtype=t["input"]["dtype"], onednn=onednn)
        got = pred(x)
        err = float(np.abs(got - ref).max() / max(float(np.abs(ref).max()), 1e-12))
        if not err <= tol:
            raise RuntimeError(f"{os.path.join(out_dir, prog['model_file'])}: Paddle Inference output differs from "
                               f"dygraph by {err:.2e} (relative) > {tol:.0e}")
        report[key] = err
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaclip-export", description="Export EVA-CLIP encoders to Paddle Inference.")
    p.add_argument("--model", required=True, help="model name (evaclip-list) or a config .json")
    p.add_argument("--pretrained", default=None, help="weights folder/file; omitted: random weights (with a warning)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--tower", choices=["image", "text", "both"], default="both")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="default run precision recorded for predictors (weights are stored fp32)")
    p.add_argument("--fused-ln", choices=["off", "on", "config"], default="off",
                   help="norm kernels in the exported program: native (off, the default: Paddle Inference "
                        "has its own fused oneDNN/GPU layer_norm, and the custom op makes oneDNN bf16 insert "
                        "reorders), the fused-norm custom op (on), or as the model config says")
    p.add_argument("--cpu-kernels", choices=["auto", "on", "off"], default="auto",
                   help="also write each tower as a CPU fp32 program on the fused_ln kernels (MKL sgemm "
                        "linears, fused attention/RoPE/norms), which predictors use for fp32 on CPU: when the "
                        "op library has them (auto), always (on: an error without them) or never (off)")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the inference-vs-dygraph check")
    p.add_argument("--no-rewrites", dest="rewrites", action="store_false",
                   help="trace the dygraph code as is (no oneDNN-friendly op rewrites)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the verification run")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights (no --pretrained)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from ..factory import create_model

    if not args.pretrained:
        warnings.warn("no --pretrained given: exporting randomly initialised weights")
    fused = {"off": False, "on": True, "config": None}[args.fused_ln]
    model = create_model(args.model, pretrained=args.pretrained, fused_ln=fused, seed=args.seed)
    towers = TOWERS if args.tower == "both" else (args.tower,)
    meta = export_model(model, args.out, towers=towers, precision=args.precision, model_name=args.model,
                        verify=args.verify, threads=args.threads, rewrites=args.rewrites,
                        cpu_kernels={"auto": None, "on": True, "off": False}[args.cpu_kernels])
    summary = {t: [meta["towers"][t]["model_file"]] + ([meta["towers"][t]["cpu_kernels"]["model_file"]]
                                                       if meta["towers"][t].get("cpu_kernels") else [])
               for t in meta["towers"]}
    print(json.dumps({"out": args.out, "towers": summary, "custom_ops": meta["custom_ops"],
                      "verify": meta.get("verify")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
