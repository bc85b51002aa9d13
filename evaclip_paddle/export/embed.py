"""`evaclip-embed`: images (a folder or a list file) or texts (one per line) -> embeddings.

Outputs in --out: `embeddings.npy` (float32 [rows, dim]), `ids.jsonl` (one line per row, same
order), `errors.jsonl` (inputs that could not be read, with the reason). Unreadable inputs never
stop the run.

Resumable: the inputs are cut into fixed chunks; each finished chunk is written to `chunks/` and
then recorded in `manifest.json` (every write is temp-file + rename, so a kill leaves either the
old or the new state). A rerun skips recorded chunks and recomputes only the unfinished one.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, List, Optional

import numpy as np

from .predictor import KERNELS, KERNELS_HELP

MANIFEST = "manifest.json"
CHUNK_DIR = "chunks"
FINAL_FILES = ("embeddings.npy", "ids.jsonl", "errors.jsonl")
MANIFEST_VERSION = 1


class ResumeError(ValueError):
    """--out holds a run with different settings."""


class _Stop(Exception):
    """--max-batches reached: stop as an interruption would."""


# ---------------------------------------------------------------------------------------------------- inputs
def list_image_folder(folder: str, exclude: Optional[str] = None) -> List[tuple]:
    """(id, path) of every non-hidden file under folder, sorted by relative path; ids are posix paths."""
    out = []
    skip = os.path.realpath(exclude) if exclude else None
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and os.path.realpath(os.path.join(root, d)) != skip)
        for f in files:
            if not f.startswith("."):
                path = os.path.join(root, f)
                out.append((os.path.relpath(path, folder).replace(os.sep, "/"), path))
    return sorted(out)


def list_image_file(list_file: str) -> List[tuple]:
    """(id, path) per non-blank line; relative paths are relative to the list file's folder."""
    base = os.path.dirname(os.path.abspath(list_file))
    out = []
    with open(list_file, "r", encoding="utf-8") as f:
        for line in f:
            s = line.rstrip("\r\n")
            if s.strip():
                out.append((s, s if os.path.isabs(s) else os.path.join(base, s)))
    return out


def list_texts(text_file: str) -> List[tuple]:
    """(line number, text) per line (0-based; blank lines are embedded too, to keep numbering simple)."""
    with open(text_file, "r", encoding="utf-8") as f:
        return [(i, line.rstrip("\r\n")) for i, line in enumerate(f)]


def ordered_map(fn: Callable, items: Iterable, workers: int, window: int) -> Iterator:
    """fn over items on a thread pool, results in input order, at most `window` in flight."""
    it = iter(items)
    if workers <= 0:
        for x in it:
            yield fn(x)
        return
    ex = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="evaclip-decode")
    try:
        q = deque(ex.submit(fn, x) for _, x in zip(range(max(1, window)), it))  # range first: no item lost
        while q:
            fut = q.popleft()
            for x in it:
                q.append(ex.submit(fn, x))
                break
            yield fut.result()
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def _safe(fn):
    def run(x):
        try:
            return True, fn(x)
        except Exception as e:  # any unreadable input is an error entry, never an abort
            return False, f"{type(e).__name__}: {e}"
    return run


# ---------------------------------------------------------------------------------------------------- storage
def _atomic_write(path: str, write: Callable):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: str, obj):
    _atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode("utf-8")))


class ChunkStore:
    """Chunk files + a manifest that records which chunks are complete."""

    def __init__(self, out_dir: str, settings: dict, restart: bool = False):
        self.out = out_dir
        self.settings = settings
        self.path = os.path.join(out_dir, MANIFEST)
        self.chunk_dir = os.path.join(out_dir, CHUNK_DIR)
        if restart:
            for name in (MANIFEST,) + FINAL_FILES:
                if os.path.exists(os.path.join(out_dir, name)):
                    os.remove(os.path.join(out_dir, name))
            shutil.rmtree(self.chunk_dir, ignore_errors=True)
        os.makedirs(self.chunk_dir, exist_ok=True)
        self.manifest = {"version": MANIFEST_VERSION, "settings": settings, "chunks": {}, "complete": False}
        if os.path.isfile(self.path):
            with open(self.path, "r", encoding="utf-8") as f:
                old = json.load(f)
            diff = [k for k in sorted(set(settings) | set(old.get("settings", {})))
                    if old.get("settings", {}).get(k) != settings.get(k)]
            if diff:
                k = diff[0]
                raise ResumeError(f"{self.path} belongs to a different run ({k}: {old['settings'].get(k)!r} there, "
                                  f"{settings.get(k)!r} now); pass --restart to start over or use another --out")
            self.manifest = old

    def done(self, i: int) -> bool:
        return str(i) in self.manifest["chunks"]

    def _files(self, i: int):
        return os.path.join(self.chunk_dir, f"{i:06d}.npy"), os.path.join(self.chunk_dir, f"{i:06d}.json")

    def commit(self, i: int, emb: np.ndarray, ids: list, errors: list):
        npy, meta = self._files(i)
        _atomic_write(npy, lambda f: np.save(f, np.ascontiguousarray(emb, dtype=np.float32)))
        _write_json(meta, {"ids": ids, "errors": errors})
        self.manifest["chunks"][str(i)] = {"rows": int(emb.shape[0]), "errors": len(errors)}
        _write_json(self.path, self.manifest)  # the commit point

    def finalize(self, num_chunks: int, dim: int, keep_chunks: bool = False) -> dict:
        from numpy.lib.format import open_memmap

        rows = sum(self.manifest["chunks"][str(i)]["rows"] for i in range(num_chunks))
        emb_path = os.path.join(self.out, "embeddings.npy")
        tmp = emb_path + ".tmp"
        mm = open_memmap(tmp, mode="w+", dtype=np.float32, shape=(rows, dim))
        ids_lines, err_lines, r = [], [], 0
        for i in range(num_chunks):
            npy, meta = self._files(i)
            part = np.load(npy)
            with open(meta, "r", encoding="utf-8") as f:
                m = json.load(f)
            if part.shape[0] != len(m["ids"]):
                raise ResumeError(f"{npy}: {part.shape[0]} rows but {len(m['ids'])} ids; rerun with --restart")
            mm[r:r + part.shape[0]] = part
            for id_ in m["ids"]:
                ids_lines.append(json.dumps({"row": r, **id_}, ensure_ascii=False))
                r += 1
            err_lines += [json.dumps(e, ensure_ascii=False) for e in m["errors"]]
        mm.flush()
        del mm
        os.replace(tmp, emb_path)
        for name, lines in (("ids.jsonl", ids_lines), ("errors.jsonl", err_lines)):
            _atomic_write(os.path.join(self.out, name), lambda f, ls=lines: f.write(
                "".join(s + "\n" for s in ls).encode("utf-8")))
        self.manifest["complete"] = True
        self.manifest["rows"], self.manifest["errors"] = rows, len(err_lines)
        _write_json(self.path, self.manifest)
        if not keep_chunks:
            shutil.rmtree(self.chunk_dir, ignore_errors=True)
        return {"rows": rows, "errors": len(err_lines)}


# ---------------------------------------------------------------------------------------------------- run
def _items_digest(items) -> str:
    h = hashlib.sha256()
    for id_, _ in items:
        h.update(str(id_).encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()


def run(export_dir: str, out_dir: str, images: Optional[str] = None, texts: Optional[str] = None,
        batch_size: int = 32, chunk_size: int = 1024, workers: int = 4, normalize: bool = True,
        max_batches: Optional[int] = None, restart: bool = False, keep_chunks: bool = False,
        progress: bool = True, predictor=None, device: str = "cpu", threads: Optional[int] = None,
        precision: Optional[str] = None, onednn: bool = True, kernels: str = "auto") -> dict:
    """Embeds images or texts into out_dir (see the module doc); returns a summary dict."""
    if (images is None) == (texts is None):
        raise ValueError("give exactly one of images= (folder or list file) and texts= (text file)")
    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"batch_size and chunk_size must be >= 1, got {batch_size}, {chunk_size}")
    if images is not None:
        kind = "image"
        if os.path.isdir(images):
            items = list_image_folder(images, exclude=out_dir)
        elif os.path.isfile(images):
            items = list_image_file(images)
        else:
            raise FileNotFoundError(f"--images: no such folder or list file: {images}")
    else:
        kind = "text"
        if not os.path.isfile(texts):
            raise FileNotFoundError(f"--texts: no such file: {texts}")
        items = list_texts(texts)

    if predictor is None:
        from .predictor import EVACLIPPredictor
        predictor = EVACLIPPredictor(export_dir, device=device, threads=threads, precision=precision,
                                     onednn=onednn, max_batch=batch_size, kernels=kernels)
    if kind not in predictor.towers:
        raise ValueError(f"{export_dir}: this export has no {kind} tower (it has: {', '.join(predictor.towers)})")
    with open(os.path.join(predictor.export_dir, "export.json"), "rb") as f:
        export_digest = hashlib.sha256(f.read()).hexdigest()
    settings = {"kind": kind, "items": len(items), "items_sha256": _items_digest(items), "chunk_size": chunk_size,
                "normalize": bool(normalize), "export_sha256": export_digest, "precision": predictor.precision}
    os.makedirs(out_dir, exist_ok=True)
    store = ChunkStore(out_dir, settings, restart=restart)
    num_chunks = (len(items) + chunk_size - 1) // chunk_size
    summary = {"out": out_dir, "kind": kind, "items": len(items), "chunks": num_chunks,
               "chunks_done_before": sum(store.done(i) for i in range(num_chunks)), "chunks_computed": 0,
               "batches": 0, "complete": False}
    if store.manifest.get("complete"):
        summary.update(complete=True, rows=store.manifest["rows"], errors=store.manifest["errors"])
        return summary

    pending = [i for i in range(num_chunks) if not store.done(i)]
    if kind == "image":
        load = _safe(lambda path, tf=predictor.transform: _load_image(path, tf))
        encode = lambda xs: predictor.encode_image(np.stack(xs), normalize=normalize)  # noqa: E731
    else:
        load = _safe(lambda t: t)
        encode = lambda xs: predictor.encode_text(predictor.tokenizer(xs), normalize=normalize)  # noqa: E731
    stream = ordered_map(load, (items[j][1] for i in pending
                                for j in range(i * chunk_size, min((i + 1) * chunk_size, len(items)))),
                         workers if kind == "image" else 0, window=max(2 * batch_size, 2 * workers))
    bar = _progress(len(items), sum(min(chunk_size, len(items) - i * chunk_size)
                                    for i in range(num_chunks) if store.done(i)), progress, kind)
    try:
        for ci in pending:
            parts, ids, errors, xs, xs_ids = [], [], [], [], []

            def flush():
                if not xs:
                    return
                if max_batches is not None and summary["batches"] >= max_batches:
                    raise _Stop()
                parts.append(encode(xs))
                summary["batches"] += 1
                ids.extend(xs_ids)
                xs.clear()
                xs_ids.clear()

            for j in range(ci * chunk_size, min((ci + 1) * chunk_size, len(items))):
                ok, val = next(stream)
                id_ = {"id": items[j][0]} if kind == "image" else {"id": items[j][0], "text": items[j][1]}
                if ok:
                    xs.append(val)
                    xs_ids.append(id_)
                    if len(xs) == batch_size:
                        flush()
                else:
                    errors.append({**id_, "error": val})
                bar.update(1)
            flush()
            emb = np.concatenate(parts) if parts else np.zeros((0, predictor.embed_dim), np.float32)
            store.commit(ci, emb, ids, errors)
            summary["chunks_computed"] += 1
    except _Stop:
        summary["stopped_after_batches"] = max_batches
        return summary
    finally:
        bar.close()
        stream.close()
    summary.update(complete=True, **store.finalize(num_chunks, predictor.embed_dim, keep_chunks))
    return summary


def _load_image(path: str, transform):
    from .preprocess import load_and_transform
    return load_and_transform(path, transform)


def _progress(total: int, initial: int, enabled: bool, kind: str):
    try:
        from tqdm import tqdm
        return tqdm(total=total, initial=initial, disable=not enabled, unit=kind[:3], desc="embedding",
                    file=sys.stderr, dynamic_ncols=True)
    except ImportError:  # tqdm is a dependency, but a missing bar should never stop a run
        class _Null:
            def update(self, n): pass
            def close(self): pass
        return _Null()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaclip-embed", description="Embed images or texts with an exported EVA-CLIP.")
    p.add_argument("--export", required=True, help="export folder written by evaclip-export")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="a folder (searched recursively) or a text file listing image paths")
    src.add_argument("--texts", help="a UTF-8 text file, one text per line")
    p.add_argument("--out", required=True, help="output folder (rerun with the same --out to resume)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--chunk-size", type=int, default=1024, help="inputs per committed chunk (the resume unit)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="image decoding threads")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU math threads of the predictor (default: OMP_NUM_THREADS if set, else all usable CPUs)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                   help="default: the precision recorded at export")
    p.add_argument("--no-onednn", dest="onednn", action="store_false")
    p.add_argument("--kernels", choices=KERNELS, default="auto", help=KERNELS_HELP)
    p.add_argument("--no-normalize", dest="normalize", action="store_false", help="keep raw (unnormalised) features")
    p.add_argument("--max-batches", type=int, default=None,
                   help="stop after this many batches, as an interruption would (testing resume)")
    p.add_argument("--restart", action="store_true", help="discard a previous run in --out")
    p.add_argument("--keep-chunks", action="store_true", help="keep chunks/ after the final files are written")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        summary = run(a.export, a.out, images=a.images, texts=a.texts, batch_size=a.batch_size,
                      chunk_size=a.chunk_size, workers=a.workers, normalize=a.normalize, max_batches=a.max_batches,
                      restart=a.restart, keep_chunks=a.keep_chunks, progress=a.progress, device=a.device,
                      threads=a.threads, precision=a.precision, onednn=a.onednn,
                      kernels=a.kernels)
    except (ResumeError, FileNotFoundError, ValueError) as e:
        print(f"evaclip-embed: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0 if summary["complete"] else 3


if __name__ == "__main__":
    sys.exit(main())
