"""Writers: streaming safetensors (optionally sharded, with an HF-style index), PyTorch zip checkpoints
written without torch, Paddle .pdparams; all into a temporary name that is renamed only when complete.

safetensors layout: 8-byte little-endian header length, a JSON header (dtype, shape, data_offsets per
key, padded with spaces to a multiple of 8), then the raw little-endian tensor bytes in header order.
The header needs only shapes and dtypes, which the plan knows before any tensor is read, so tensors are
written one at a time.

PyTorch zip layout: `<name>/data.pkl` (a pickle whose tensors are `torch._utils._rebuild_tensor_v2`
calls on persistent storage ids), `<name>/data/<N>` raw storages (stored, 64-byte aligned here),
`<name>/byteorder`, `<name>/version`. The pickle is emitted opcode by opcode, so torch is not needed.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import zipfile
from typing import List, Optional, Sequence

import numpy as np

from ..checkpoint_io import CheckpointError
from .tensors import STORAGE, contiguous, nbytes

_ST_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64",
             "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}
_TORCH_STORAGE_NAMES = {"float32": "FloatStorage", "float16": "HalfStorage", "bfloat16": "BFloat16Storage",
                        "float64": "DoubleStorage", "int64": "LongStorage", "int32": "IntStorage",
                        "int16": "ShortStorage", "int8": "CharStorage", "uint8": "ByteStorage", "bool": "BoolStorage"}
FILE_SUFFIXES = {".safetensors": "safetensors", ".pt": "pt", ".pth": "pt", ".bin": "pt", ".pdparams": "pdparams"}
# Files this module writes into an output directory (replaced together with --overwrite).
_OURS = re.compile(r"^(model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|model_state\.pdparams|"
                   r"model\.pt|config\.json)$")


def parse_size(text) -> int:
    """'5GB', '500MB', '2GiB', '123' -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?i?b?)\s*", str(text).lower())
    if not m:
        raise ValueError(f"cannot parse size '{text}' (e.g. 5GB, 500MB)")
    unit = m.group(2).rstrip("b")
    mult = {"": 1, "k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9, "t": 10 ** 12,
            "ki": 2 ** 10, "mi": 2 ** 20, "gi": 2 ** 30, "ti": 2 ** 40}[unit]
    return int(float(m.group(1)) * mult)


def _single_file(out: str) -> Optional[str]:
    return next((f for s, f in FILE_SUFFIXES.items() if out.endswith(s)), None)


def check_target(out: str, to: str, fmt: Optional[str], dtype: str, max_shard_size, overwrite: bool) -> str:
    """Validates the output request before anything is read; returns the weights format."""
    single = _single_file(out)
    if fmt is None:
        fmt = single or "safetensors"
    if fmt not in ("safetensors", "pdparams", "pt"):
        raise ValueError(f"unknown output format '{fmt}' (safetensors, pdparams or pt)")
    if single and single != fmt:
        raise ValueError(f"{out}: the file name says {single} but the format asked for is {fmt}")
    if fmt == "pdparams" and to != "paddle":
        raise ValueError("pdparams output holds Paddle-layout weights; use --to paddle or another format")
    if fmt == "pt" and to == "paddle":
        raise ValueError("pt output is for the PyTorch layouts (--to torch-eva or open_clip)")
    if fmt == "pdparams" and dtype == "bfloat16":
        raise ValueError("bf16 output needs the safetensors format (pdparams carries no bfloat16 dtype)")
    if max_shard_size and (fmt != "safetensors" or single):
        raise ValueError("sharding (--max-shard-size) is available for safetensors output into a directory")
    if os.path.exists(out) and not overwrite:
        if os.path.isfile(out) or os.listdir(out):
            raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    if os.path.isfile(out) and not single:
        raise FileExistsError(f"{out} is a file; give a directory or a weights file name")
    return fmt


def write_output(out: str, entries, to: str, fmt: str, cfg, max_shard_size: Optional[int], overwrite: bool,
                 progress: bool = False) -> List[str]:
    """Writes all entries (and config.json in directory mode) atomically; returns the written paths."""
    bar = _progress(entries, progress)
    single = _single_file(out)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(out))}.tmp-{os.getpid()}")
    try:
        if single:
            _write_weights(tmp, entries, fmt, to, bar)
            os.replace(tmp, out)
            return [out]
        os.makedirs(tmp, exist_ok=True)
        names = _write_dir(tmp, entries, to, fmt, max_shard_size, bar)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg.to_dict(), f, indent=2)
        names.append("config.json")
        _publish(tmp, out, names, overwrite)
        return [os.path.join(out, n) for n in names]
    except BaseException:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)
        raise
    finally:
        bar.close()


def _publish(tmp: str, out: str, names: Sequence[str], overwrite: bool) -> None:
    if not os.path.exists(out):
        os.replace(tmp, out)
        return
    if not overwrite and os.listdir(out):
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    for old in os.listdir(out):          # stale weights of an earlier conversion (other shard counts)
        if _OURS.match(old) and old not in names:
            os.remove(os.path.join(out, old))
    for n in names:
        os.replace(os.path.join(tmp, n), os.path.join(out, n))
    shutil.rmtree(tmp, ignore_errors=True)


def _write_dir(d: str, entries, to: str, fmt: str, max_shard_size, bar) -> List[str]:
    if fmt == "pdparams":
        _write_weights(os.path.join(d, "model_state.pdparams"), entries, fmt, to, bar)
        return ["model_state.pdparams"]
    if fmt == "pt":
        _write_weights(os.path.join(d, "model.pt"), entries, fmt, to, bar)
        return ["model.pt"]
    shards = _shard(entries, max_shard_size)
    if len(shards) == 1:
        _write_safetensors(os.path.join(d, "model.safetensors"), entries, _metadata(to), bar)
        return ["model.safetensors"]
    names, weight_map, total = [], {}, 0
    for i, group in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(os.path.join(d, name), group, _metadata(to), bar)
        names.append(name)
        for e in group:
            weight_map[e.key] = name
            total += nbytes(e.shape, e.dtype)
    with open(os.path.join(d, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names + ["model.safetensors.index.json"]


def _shard(entries, max_size: Optional[int]):
    if not max_size:
        return [list(entries)]
    shards, cur, size = [], [], 0
    for e in entries:
        n = nbytes(e.shape, e.dtype)
        if cur and size + n > max_size:
            shards.append(cur)
            cur, size = [], 0
        cur.append(e)
        size += n
    if cur or not shards:
        shards.append(cur)
    return shards


def _metadata(to: str) -> dict:
    return {"format": "pt" if to != "paddle" else "paddle", "layout": to, "writer": "evaclip_paddle.convert"}


def _write_weights(path: str, entries, fmt: str, to: str, bar) -> None:
    if fmt == "safetensors":
        _write_safetensors(path, entries, _metadata(to), bar)
    elif fmt == "pt":
        _write_torch_zip(path, entries, bar)
    else:
        _write_pdparams(path, entries, bar)


def _fetch(e) -> np.ndarray:
    arr = e.fetch()
    if tuple(arr.shape) != tuple(e.shape) or arr.dtype != STORAGE[e.dtype]:
        raise CheckpointError(f"internal error: '{e.key}' came out {list(arr.shape)} {arr.dtype}, "
                              f"planned {list(e.shape)} {e.dtype}")
    return contiguous(arr)


def _write_safetensors(path: str, entries, metadata: dict, bar) -> None:
    header, offset = {"__metadata__": {k: str(v) for k, v in metadata.items()}}, 0
    for e in entries:
        n = nbytes(e.shape, e.dtype)
        header[e.key] = {"dtype": _ST_NAMES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * ((-len(raw)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for e in entries:
            arr = _fetch(e)
            if arr.size:
                f.write(arr.reshape(-1).view(np.uint8).data)
            bar.update(arr.nbytes)
            del arr


def _write_pdparams(path: str, entries, bar) -> None:
    import paddle
    state = {}
    for e in entries:               # paddle.save pickles the whole dict: this format is not streamed
        state[e.key] = _fetch(e)
        bar.update(state[e.key].nbytes)
    paddle.save(state, path)


# ------------------------------------------------------------------------------------------ torch zip
class _Pickle:
    """Emits pickle protocol 2 opcodes for the one structure torch checkpoints need."""

    def __init__(self):
        self.buf = bytearray(b"\x80\x02")

    def glob(self, module: str, name: str):
        self.buf += b"c" + f"{module}\n{name}\n".encode("ascii")

    def text(self, s: str):
        b = s.encode("utf-8")
        self.buf += b"X" + struct.pack("<I", len(b)) + b

    def int(self, n: int):
        if -2 ** 31 <= n < 2 ** 31:
            self.buf += b"J" + struct.pack("<i", n)
        else:
            enc = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
            self.buf += b"\x8a" + bytes([len(enc)]) + enc

    def ints(self, values):
        self.buf += b"("
        for v in values:
            self.int(int(v))
        self.buf += b"t"

    def empty_ordered_dict(self):
        self.glob("collections", "OrderedDict")
        self.buf += b")R"


def _torch_pickle(entries) -> bytes:
    p = _Pickle()
    p.empty_ordered_dict()
    p.buf += b"("                                          # MARK for SETITEMS
    for i, e in enumerate(entries):
        p.text(e.key)
        p.glob("torch._utils", "_rebuild_tensor_v2")
        p.buf += b"("                                      # args of _rebuild_tensor_v2
        p.buf += b"("                                      # persistent id ('storage', type, key, location, numel)
        p.text("storage")
        p.glob("torch", _TORCH_STORAGE_NAMES[e.dtype])
        p.text(str(i))
        p.text("cpu")
        p.int(_numel(e.shape))
        p.buf += b"tQ"                                     # TUPLE, BINPERSID
        p.int(0)                                           # storage offset
        p.ints(e.shape)
        p.ints(_contiguous_strides(e.shape))
        p.buf += b"\x89"                                   # requires_grad=False
        p.empty_ordered_dict()                             # backward hooks
        p.buf += b"tR"                                     # TUPLE, REDUCE
    p.buf += b"u."                                         # SETITEMS, STOP
    return bytes(p.buf)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _contiguous_strides(shape):
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= int(d)
    return list(reversed(strides))


def _write_torch_zip(path: str, entries, bar) -> None:
    root = "archive"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        zf.writestr(_info(zf, f"{root}/data.pkl"), _torch_pickle(entries))
        zf.writestr(_info(zf, f"{root}/byteorder"), b"little")
        for i, e in enumerate(entries):
            arr = _fetch(e)
            info = _info(zf, f"{root}/data/{i}", align=64)
            with zf.open(info, "w", force_zip64=True) as f:
                if arr.size:
                    f.write(arr.reshape(-1).view(np.uint8).data)
            bar.update(arr.nbytes)
            del arr
        zf.writestr(_info(zf, f"{root}/version"), b"3\n")


def _info(zf: zipfile.ZipFile, name: str, align: int = 0) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    if align:
        # local header (30) + name + our padding field (4 + pad) + zip64 field (20) -> data offset
        start = zf.fp.tell() + 30 + len(name.encode("utf-8")) + 4 + 20
        pad = (-start) % align
        info.extra = struct.pack("<HH", 0x4246, pad) + b"\0" * pad
    return info


def _progress(entries, enabled: bool):
    total = sum(nbytes(e.shape, e.dtype) for e in entries)
    if enabled:
        try:
            from tqdm import tqdm
            return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="converting")
        except ImportError:
            pass
    return _NoBar()


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass
