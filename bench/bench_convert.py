"""Converter memory and speed on a >= 1 GB checkpoint (benchmark, not a test).

    python bench/bench_convert.py [--model EVA01-CLIP-g-14] [--workdir DIR] [--synth] [--keep] [--out FILE.json]

1. Writes a random checkpoint of the model in open_clip's layout as a PyTorch .pt: with torch.save in a
   child process when torch is importable, else (or with --synth) with the library's torch-free zip writer,
   tensor by tensor. EVA01-CLIP-g-14 is 4.5 GB in fp32.
2. In a fresh child process per conversion, measures the peak resident set size above the baseline taken
   right before converting (VmHWM after resetting it through /proc/self/clear_refs where the kernel allows,
   else VmHWM - VmRSS at start) and the wall time, for:
     .pt (open_clip) -> Paddle safetensors, fp32
     .pt (open_clip) -> Paddle safetensors, bf16
     Paddle dir      -> open_clip .pt (torch-free writer)
Target: peak extra RSS <= 25% of the checkpoint size.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def open_clip_shapes(model: str):
    """(key, shape) of the model's open_clip-layout state dict, from the library's layout tables."""
    from evaclip_paddle import get_model_config
    from evaclip_paddle.convert import layouts as L
    cfg = get_model_config(model)
    ours = L.expected_shapes(cfg)
    steps, _ = L.plan("open_clip", list(ours), "write", L.write_flags(cfg))
    out = []
    for st in steps:
        for k, s in zip(st.dst, L.op_shapes(st, [ours[x] for x in st.src], cfg)):
            out.append((k, tuple(s)))
    return out


def make_checkpoint(model: str, path: str, synth: bool) -> str:
    shapes = open_clip_shapes(model)
    spec = path + ".shapes.json"
    with open(spec, "w") as f:
        json.dump(shapes, f)
    if not synth:
        code = ("import json,sys,torch\n"
                "g=torch.Generator().manual_seed(0)\n"
                "sd={k: torch.randn(s, generator=g)*0.02 for k, s in json.load(open(sys.argv[1]))}\n"
                "torch.save(sd, sys.argv[2])\n")
        r = subprocess.run([sys.executable, "-c", code, spec, path], capture_output=True, text=True)
        if r.returncode == 0:
            os.remove(spec)
            return "torch.save"
        print(f"torch.save failed ({r.stderr.strip().splitlines()[-1] if r.stderr else r.returncode}); "
              f"synthesising instead", file=sys.stderr)
    import numpy as np
    from evaclip_paddle.convert.converter import Entry
    from evaclip_paddle.convert.writers import _NoBar, _write_torch_zip
    rng = np.random.default_rng(0)
    entries = [Entry(k, s, "float32", (lambda s=s: (rng.standard_normal(s, dtype=np.float32) * 0.02)))
               for k, s in shapes]
    _write_torch_zip(path, entries, _NoBar())
    os.remove(spec)
    return "library torch-zip writer (synthesised)"


def measure(args_json: str) -> None:
    """Child process: one conversion, prints a JSON line with peak extra RSS and seconds."""
    a = json.loads(args_json)
    from evaclip_paddle.convert import convert_checkpoint
    import evaclip_paddle.convert.writers  # noqa: F401  (imports done before the baseline)
    reset = _reset_peak()
    base = _status("VmRSS")
    hwm0 = _status("VmHWM")
    t = time.perf_counter()
    report = convert_checkpoint(a["src"], a["out"], to=a["to"], dtype=a["dtype"], model=a.get("model"))
    secs = time.perf_counter() - t
    peak = _status("VmHWM")
    extra = peak - base     # without the reset, VmHWM may still hold an import-time peak: an over-estimate
    print(json.dumps({"peak_extra_rss": extra, "baseline_rss": base, "hwm_at_start": hwm0, "seconds": secs,
                      "hwm_reset": reset,
                      "model": report.model, "layout": report.layout}))


def run_one(src, out, to, dtype, model=None):
    payload = json.dumps({"src": src, "out": out, "to": to, "dtype": dtype, "model": model})
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure", payload], capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise RuntimeError(r.stderr)
    return json.loads(r.stdout.strip().splitlines()[-1])


def dir_size(path):
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="EVA01-CLIP-g-14")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "evaclip_bench_convert"))
    ap.add_argument("--synth", action="store_true", help="write the source checkpoint without torch")
    ap.add_argument("--keep", action="store_true", help="keep the files in --workdir")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    ap.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        return measure(args.measure)
    os.makedirs(args.workdir, exist_ok=True)
    src = os.path.join(args.workdir, "open_clip_random.pt")
    t = time.perf_counter()
    how = make_checkpoint(args.model, src, args.synth)
    size = os.path.getsize(src)
    print(f"source: {args.model} random weights, open_clip layout, {size / 2 ** 30:.2f} GiB via {how} "
          f"({time.perf_counter() - t:.0f} s)")
    runs = [("pt -> paddle fp32", src, os.path.join(args.workdir, "paddle_fp32"), "paddle", "fp32", None),
            ("pt -> paddle bf16", src, os.path.join(args.workdir, "paddle_bf16"), "paddle", "bf16", None),
            ("paddle -> open_clip pt", os.path.join(args.workdir, "paddle_fp32"),
             os.path.join(args.workdir, "back_open_clip.pt"), "open_clip", "fp32", None)]
    results = {"model": args.model, "checkpoint_bytes": size, "source_writer": how, "runs": []}
    try:
        for name, a, b, to, dtype, model in runs:
            r = run_one(a, b, to, dtype, model)
            r.update(name=name, input_bytes=dir_size(a), output_bytes=dir_size(b),
                     peak_extra_fraction=r["peak_extra_rss"] / dir_size(a))
            results["runs"].append(r)
            print(f"{name:24s} {r['seconds']:7.1f} s  peak extra RSS {r['peak_extra_rss'] / 2 ** 20:8.0f} MiB "
                  f"= {100 * r['peak_extra_fraction']:5.1f}% of the input ({r['input_bytes'] / 2 ** 30:.2f} GiB)"
                  f"  target <= 25%: {'ok' if r['peak_extra_fraction'] <= 0.25 else 'MISSED'}")
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
