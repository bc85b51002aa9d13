"""Checkpoint readers that yield (key, LazyTensor) without importing torch.

- PyTorch zip checkpoints (.pt/.pth/.bin, torch >= 1.6): `*/data.pkl` is unpickled by a restricted
  Unpickler that maps torch's storage classes and tensor-rebuild functions onto records of the
  `*/data/<N>` members; every other global becomes an inert placeholder, so no code from the file
  runs. Members are stored uncompressed, so a tensor is read through np.memmap at the member's offset
  (storage offset and strides honoured) and only when asked for; CRC32 of each storage is checked.
- .safetensors: the header is parsed here (bfloat16 included) and tensors are memory-mapped.
- Paddle .pdparams (a pickle of numpy arrays, read whole, with only numpy's rebuild functions allowed).
- HF-style `*.index.json` shard indexes of any of the above, and directories holding one of them.
"""
from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
import zlib
from collections import OrderedDict
from typing import Dict, Optional, Tuple

import numpy as np

from ..checkpoint_io import CheckpointError
from .tensors import STORAGE, LazyTensor, from_array, nbytes, numel, numpy_dtype_name

# Names searched, in order, when a directory is given.
DIR_CANDIDATES = (
    "model.safetensors.index.json", "model.safetensors", "model_state.pdparams", "open_clip_model.safetensors",
    "open_clip_pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model.bin",
)
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".pdparams", ".ckpt")
WRAPPERS = ("state_dict", "model", "module")

_TORCH_STORAGES = {
    "FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16", "DoubleStorage": "float64",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool",
}
_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


class Checkpoint:
    """An ordered mapping key -> LazyTensor plus where it came from and any config.json beside it."""

    def __init__(self, path: str, tensors: "OrderedDict[str, LazyTensor]", fmt: str, config: Optional[dict] = None):
        self.path, self.tensors, self.format, self.config = path, tensors, fmt, config

    def __repr__(self):
        return f"Checkpoint({self.path!r}, {len(self.tensors)} tensors, {self.format})"


# ----------------------------------------------------------------------------------------- entry point
def open_checkpoint(path: str, verify: bool = True) -> Checkpoint:
    """Opens a checkpoint file, shard index or directory; reads no tensor data yet."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    config = None
    if os.path.isdir(path):
        config = _read_config(os.path.join(path, "config.json"))
        path = _weights_in_dir(path)
    elif os.path.isfile(os.path.join(os.path.dirname(path) or ".", "config.json")):
        config = _read_config(os.path.join(os.path.dirname(path) or ".", "config.json"))
    if path.endswith(".index.json"):
        tensors, fmt = _open_index(path, verify)
    else:
        tensors, fmt = _open_file(path, verify)
    if not tensors:
        raise CheckpointError(f"{path}: the checkpoint holds no tensors")
    return Checkpoint(path, tensors, fmt, config)


def _read_config(path: str) -> Optional[dict]:
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "r", encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


def _weights_in_dir(d: str) -> str:
    for name in DIR_CANDIDATES:
        if os.path.isfile(os.path.join(d, name)):
            return os.path.join(d, name)
    found = sorted(f for f in os.listdir(d) if f.endswith(WEIGHT_SUFFIXES) or f.endswith(".index.json"))
    if len(found) == 1:
        return os.path.join(d, found[0])
    if not found:
        raise CheckpointError(f"{d}: no checkpoint found (looked for {', '.join(DIR_CANDIDATES)} "
                              f"or a single *{'/*'.join(WEIGHT_SUFFIXES)} file)")
    raise CheckpointError(f"{d}: several checkpoint files ({', '.join(found)}); pass one of them")


def _sniff(path: str) -> str:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04" or head[:4] == b"PK\x05\x06":
        return "zip"
    if len(head) >= 9 and head[8:9] == b"{":
        (n,) = struct.unpack("<Q", head[:8])
        if 0 < n <= size - 8:
            return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    if size == 0:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")
    raise CheckpointError(f"{path}: not a checkpoint (expected a PyTorch zip .pt/.bin, .safetensors or Paddle "
                          f".pdparams; the file starts with {head[:8]!r})")


def _open_file(path: str, verify: bool) -> Tuple["OrderedDict[str, LazyTensor]", str]:
    kind = _sniff(path)
    if kind == "zip":
        return read_torch_zip(path, verify), "torch"
    if kind == "safetensors":
        return read_safetensors(path), "safetensors"
    return read_pickle(path), "pdparams"


def _open_index(path: str, verify: bool):
    try:
        with open(path, "r", encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a valid shard index ({type(e).__name__}: {e})") from None
    base = os.path.dirname(path)
    shards: Dict[str, OrderedDict] = {}
    fmt = None
    out: "OrderedDict[str, LazyTensor]" = OrderedDict()
    for key, shard in weight_map.items():
        if shard not in shards:
            shard_path = os.path.join(base, shard)
            if not os.path.isfile(shard_path):
                raise CheckpointError(f"{path}: shard '{shard}' (for key '{key}') is missing")
            shards[shard], fmt = _open_file(shard_path, verify)
        if key not in shards[shard]:
            raise CheckpointError(f"{path}: key '{key}' is not in its shard '{shard}'")
        out[key] = shards[shard][key]
    return out, fmt or "safetensors"


# ----------------------------------------------------------------------------------------- safetensors
def read_safetensors(path: str) -> "OrderedDict[str, LazyTensor]":
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise CheckpointError(f"{path}: truncated safetensors file (header of {n} bytes, file {size})")
            header = json.loads(f.read(n).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, struct.error) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    base = 8 + n
    out: "OrderedDict[str, LazyTensor]" = OrderedDict()
    items = sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                   key=lambda kv: kv[1].get("data_offsets", [0])[0] if isinstance(kv[1], dict) else 0)
    for key, info in items:
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors entry for key '{key}': {info!r}") from None
        if end - begin != nbytes(shape, dtype):
            raise CheckpointError(f"{path}: key '{key}' has {end - begin} bytes for shape {shape} {dtype}")
        if base + end > size:
            raise CheckpointError(f"{path}: truncated file: key '{key}' ends at byte {base + end}, file has {size}")
        out[key] = LazyTensor(shape, dtype, _mapped_reader(path, base + begin, shape, dtype), f"{path}:{key}")
    return out


def _mapped_reader(path: str, offset: int, shape, dtype: str):
    def load():
        n = numel(shape)
        if n == 0:
            return np.empty(shape, STORAGE[dtype])
        return np.memmap(path, dtype=STORAGE[dtype], mode="r", offset=offset, shape=(n,)).reshape(shape)
    return load


# ----------------------------------------------------------------------------------------- pickle / pdparams
def read_pickle(path: str) -> "OrderedDict[str, LazyTensor]":
    """Paddle .pdparams (paddle.save of a dict): numpy arrays, or (name, array) tuples for tensors.
    Unpickled with only numpy's array-rebuilding globals allowed; any other object is a placeholder."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[2:3] == b"\x8a":      # legacy torch files open with a pickled magic number (LONG1)
            raise CheckpointError(f"{path}: legacy (pre-1.6, non-zip) PyTorch serialization is not supported; "
                                  f"re-save it with torch.save(..., _use_new_zipfile_serialization=True)")
        f.seek(0)
        try:
            obj = _RestrictedUnpickler(f, path, _NUMPY_GLOBALS).load()
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - name the file, keep the cause
            raise CheckpointError(f"{path}: cannot read as a Paddle .pdparams pickle ({type(e).__name__}: {e})") \
                from None
    obj = unwrap(obj, path)
    out: "OrderedDict[str, LazyTensor]" = OrderedDict()
    for k, v in obj.items():
        if isinstance(v, tuple) and len(v) == 2 and isinstance(v[1], np.ndarray):
            v = v[1]                   # paddle.save stores a Tensor as (name, ndarray)
        if isinstance(v, np.ndarray) and v.dtype != object:
            out[str(k)] = from_array(v, f"{path}:{k}")
    return out


def unwrap(obj, path: str):
    """Descends through `state_dict` / `model` / `module` wrappers to the dict of tensors."""
    while isinstance(obj, dict):
        for w in WRAPPERS:
            if isinstance(obj.get(w), dict):
                obj = obj[w]
                break
        else:
            break
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return obj


# ----------------------------------------------------------------------------------------- torch zip
class _StorageType:
    """Stands in for torch.FloatStorage & co."""

    def __init__(self, name: str):
        self.name, self.dtype = name, _TORCH_STORAGES.get(name)


class _Storage:
    __slots__ = ("key", "dtype", "numel")

    def __init__(self, key: str, dtype: str, n: int):
        self.key, self.dtype, self.numel = key, dtype, n


class _TensorRecord:
    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage, offset, size, stride):
        if not isinstance(storage, _Storage):
            raise pickle.UnpicklingError(f"tensor rebuilt from a {type(storage).__name__}, not a storage")
        self.storage, self.offset = storage, int(offset)
        self.size, self.stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)


class _Opaque:
    """Placeholder for any non-tensor object in the pickle: accepts everything, does nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, item):
        pass

    def extend(self, items):
        pass


def _placeholder(module: str, name: str):
    return type(str(name), (_Opaque,), {"__module__": f"placeholder.{module}"})


def _rebuild_tensor(storage, storage_offset, size, stride, *rest):
    return _TensorRecord(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *rest):
    return data


def _rebuild_from_type(func, new_type, args, state):
    return func(*args)


def _codecs_encode(text, encoding="utf-8"):
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"unexpected encoding {encoding!r} in pickle")
    return str(text).encode("latin1")


_SAFE_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "slice"): slice,
    ("builtins", "complex"): complex, ("builtins", "bytearray"): bytearray,
    ("_codecs", "encode"): _codecs_encode,
}


def _numpy_globals():
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:                 # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar
    table = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("builtins", "tuple"): tuple,
             ("collections", "OrderedDict"): OrderedDict}
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        table[(mod, "_reconstruct")] = _reconstruct
        table[(mod, "scalar")] = scalar
    return table


_NUMPY_GLOBALS = _numpy_globals()


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals of `table` (plus torch storage types); all else becomes a placeholder."""

    def __init__(self, f, path: str, table=None):
        super().__init__(f)
        self._path = path
        self._table = _SAFE_GLOBALS if table is None else table
        self._storages: Dict[str, _Storage] = {}

    def find_class(self, module, name):
        safe = self._table.get((module, name))
        if safe is not None:
            return safe
        if module == "torch" and name.endswith("Storage") and self._table is _SAFE_GLOBALS:
            return _StorageType(name)
        return _placeholder(module, name)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, stype, key, _location, n = pid
        dtype = stype.dtype if isinstance(stype, _StorageType) else None
        if dtype is None:
            name = stype.name if isinstance(stype, _StorageType) else type(stype).__name__
            raise CheckpointError(f"{self._path}: unsupported torch storage type {name} (storage {key})")
        key = str(key)
        if key not in self._storages:
            self._storages[key] = _Storage(key, dtype, int(n))
        return self._storages[key]


def read_torch_zip(path: str, verify: bool = True) -> "OrderedDict[str, LazyTensor]":
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated zip checkpoint ({e})") from None
    with zf:
        pkl = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") <= 1]
        if not pkl:
            raise CheckpointError(f"{path}: zip file without data.pkl (not a PyTorch checkpoint)")
        prefix = pkl[0][: -len("data.pkl")]
        members = {i.filename: i for i in zf.infolist()}
        big_endian = False
        if prefix + "byteorder" in members:
            big_endian = zf.read(prefix + "byteorder").strip() == b"big"
        try:
            with zf.open(pkl[0]) as f:
                obj = _RestrictedUnpickler(f, path).load()
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - corrupt pickle: name the file
            raise CheckpointError(f"{path}: corrupt data.pkl ({type(e).__name__}: {e})") from None
    obj = unwrap(obj, path)
    reader = _ZipStorageReader(path, prefix, members, big_endian, verify)
    out: "OrderedDict[str, LazyTensor]" = OrderedDict()
    for k, v in obj.items():
        if isinstance(v, _TensorRecord):
            out[str(k)] = LazyTensor(v.size, v.storage.dtype, reader.loader(v, str(k)), f"{path}:{k}")
    return out


class _ZipStorageReader:
    def __init__(self, path, prefix, members, big_endian, verify):
        self.path, self.prefix, self.members = path, prefix, members
        self.big_endian, self.verify = big_endian, verify
        self.size = os.path.getsize(path)
        self._offsets: Dict[str, int] = {}
        self._verified = set()

    def _data_offset(self, info: zipfile.ZipInfo, key: str) -> int:
        if info.filename in self._offsets:
            return self._offsets[info.filename]
        with open(self.path, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            raise CheckpointError(f"{self.path}: corrupt zip entry {info.filename} (for key '{key}')")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        if start + info.file_size > self.size:
            raise CheckpointError(f"{self.path}: truncated: data of '{key}' ends past the end of the file")
        self._offsets[info.filename] = start
        return start

    def loader(self, rec: _TensorRecord, key: str):
        def load():
            st = rec.storage
            name = f"{self.prefix}data/{st.key}"
            info = self.members.get(name)
            if info is None:
                raise CheckpointError(f"{self.path}: storage {name} of key '{key}' is missing")
            dt = STORAGE[st.dtype]
            if self.big_endian:
                dt = dt.newbyteorder(">")
            if info.file_size != st.numel * dt.itemsize:
                raise CheckpointError(f"{self.path}: storage of key '{key}' has {info.file_size} bytes, "
                                      f"expected {st.numel * dt.itemsize}")
            n = numel(rec.size)
            if n == 0:
                return np.empty(rec.size, STORAGE[st.dtype])
            extent = rec.offset + sum((s - 1) * abs(t) for s, t in zip(rec.size, rec.stride)) + 1
            if rec.offset < 0 or extent > st.numel:
                raise CheckpointError(f"{self.path}: key '{key}' reads past its storage")
            if info.compress_type == zipfile.ZIP_STORED:
                flat = np.memmap(self.path, dtype=dt, mode="r", offset=self._data_offset(info, key),
                                 shape=(st.numel,))
            else:   # not written by torch, but a re-zipped file still works (read into memory)
                with zipfile.ZipFile(self.path) as zf:
                    flat = np.frombuffer(zf.read(name), dtype=dt)
            if self.verify and st.key not in self._verified:
                if zlib.crc32(flat) & 0xFFFFFFFF != info.CRC:
                    raise CheckpointError(f"{self.path}: CRC mismatch in storage of key '{key}' (corrupt file)")
                self._verified.add(st.key)
            view = np.lib.stride_tricks.as_strided(flat[rec.offset:], shape=rec.size,
                                                   strides=[t * dt.itemsize for t in rec.stride], writeable=False)
            arr = np.array(view, dtype=STORAGE[st.dtype])     # private copy; the mapping is released
            del flat, view
            return arr
        return load


def read_state_dict_numpy(path: str) -> Dict[str, np.ndarray]:
    """Keys as stored and numpy values (bfloat16 widened to float32); for tests and small files."""
    ck = open_checkpoint(path)
    return {k: t.values() for k, t in ck.tensors.items()}


__all__ = ["Checkpoint", "open_checkpoint", "read_safetensors", "read_torch_zip", "read_pickle", "unwrap",
           "read_state_dict_numpy", "numpy_dtype_name"]
