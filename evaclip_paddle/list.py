"""`python -m evaclip_paddle.list`: the model zoo as a table (parameters counted without allocating)."""
from __future__ import annotations

import argparse

from .factory import count_parameters, get_model_config, list_models


def _fmt(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--all", action="store_true", help="include the tiny test/demo configs")
    args = ap.parse_args(argv)
    rows = []
    for name in list_models(include_tiny=args.all):
        c = get_model_config(name)
        v, t = c.vision_cfg, c.text_cfg
        n = count_parameters(name)
        kind = "+".join(k for k, on in (("rope", v.rope), ("swiglu", v.naiveswiglu), ("subln", v.subln),
                                        ("postnorm", v.postnorm), ("rms", v.use_rms_norm)) if on) or "eva01"
        rows.append((name, f"{v.width}/{v.layers}/{v.heads}", f"{v.patch_size}@{v.image_size}", kind,
                     f"{t.width}/{t.layers}/{t.heads}", str(c.embed_dim), _fmt(n["visual"]), _fmt(n["text"]),
                     _fmt(n["total"])))
    head = ("model", "vision W/L/H", "patch@img", "variant", "text W/L/H", "embed", "visual", "text", "total")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    for r in [head] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()
