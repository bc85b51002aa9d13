"""Lazily read tensors and the little dtype arithmetic the converter needs.

Everything is numpy. numpy has no bfloat16, so a bfloat16 tensor travels as its uint16 bit patterns
together with the logical dtype name "bfloat16"; layout operations (transpose, split, concat,
reshape) move those bits unchanged, so bf16 -> bf16 conversion is bit-exact. Arithmetic values are
obtained by widening to float32 (exact: bf16 is the top half of a float32).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import numpy as np

# logical dtype name -> numpy storage dtype
STORAGE = {
    "float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2"), "float64": np.dtype("<f8"),
    "int64": np.dtype("<i8"), "int32": np.dtype("<i4"), "int16": np.dtype("<i2"), "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"), "bool": np.dtype("?"),
}
FLOATS = ("float32", "float16", "bfloat16", "float64")

# user-facing spellings of an output dtype
DTYPE_ALIASES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16", "half": "float16",
                 "bf16": "bfloat16", "bfloat16": "bfloat16", "keep": "keep"}


def canonical_dtype(name: str) -> str:
    key = str(name).lower()
    if key not in DTYPE_ALIASES:
        raise ValueError(f"unknown dtype '{name}' (choose from fp32, bf16, fp16, keep)")
    return DTYPE_ALIASES[key]


def numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def nbytes(shape: Sequence[int], dtype: str) -> int:
    return numel(shape) * STORAGE[dtype].itemsize


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float32 values (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(x: np.ndarray, chunk: int = 1 << 22) -> np.ndarray:
    """float32 values -> bfloat16 bit patterns, rounding to nearest even; NaN stays NaN.
    Works through `chunk` elements at a time, so temporaries stay small for big tensors."""
    x = np.asarray(x, dtype=np.float32)
    flat = contiguous(x).reshape(-1)
    out = np.empty(flat.shape, dtype=np.uint16)
    for i in range(0, flat.size, chunk):
        u = flat[i:i + chunk].view(np.uint32)
        r = (u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16
        nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
        if nan.any():
            r[nan] = (u[nan] >> 16) | np.uint32(0x0040)        # keep it a (quiet) NaN
        out[i:i + chunk] = r
    return out.reshape(x.shape)


def contiguous(arr: np.ndarray) -> np.ndarray:
    """C-contiguous array, keeping 0-d arrays 0-d (np.ascontiguousarray would make them 1-d)."""
    arr = np.asarray(arr)
    return arr if arr.flags.c_contiguous else arr.copy(order="C")


def to_values(arr: np.ndarray, dtype: str) -> np.ndarray:
    """Storage array -> numpy values (bfloat16 widened to float32)."""
    return bf16_bits_to_f32(arr) if dtype == "bfloat16" else arr


def cast(values: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Values of logical dtype `src` -> storage array of logical dtype `dst` (only floats change)."""
    if src == dst or src not in FLOATS or dst not in FLOATS:
        return values
    if src == "bfloat16":
        values = bf16_bits_to_f32(values)
    if dst == "bfloat16":
        return f32_to_bf16_bits(values)
    return values.astype(STORAGE[dst])


def resolve_out_dtype(requested: str, src: str) -> str:
    """The dtype a tensor is written in: integers keep theirs; 'keep' keeps the source's."""
    if requested == "keep" or src not in FLOATS:
        return src
    return requested


class LazyTensor:
    """Shape and dtype known up front; the data is read only when `storage()` is called."""

    __slots__ = ("shape", "dtype", "where", "_loader")

    def __init__(self, shape: Sequence[int], dtype: str, loader: Callable[[], np.ndarray], where: str):
        if dtype not in STORAGE:
            raise ValueError(f"{where}: unsupported dtype {dtype}")
        self.shape: Tuple[int, ...] = tuple(int(d) for d in shape)
        self.dtype = dtype
        self.where = where
        self._loader = loader

    @property
    def nbytes(self) -> int:
        return nbytes(self.shape, self.dtype)

    def storage(self) -> np.ndarray:
        """The tensor as stored (bfloat16 as uint16 bits), shaped `self.shape`."""
        arr = self._loader()
        if tuple(arr.shape) != self.shape:
            arr = arr.reshape(self.shape)
        return arr

    def values(self) -> np.ndarray:
        return to_values(self.storage(), self.dtype)

    def __repr__(self):
        return f"LazyTensor({list(self.shape)}, {self.dtype}, {self.where})"


def from_array(arr: np.ndarray, where: str, dtype: Optional[str] = None) -> LazyTensor:
    """Wraps an in-memory numpy array (dtype guessed from numpy unless given)."""
    if dtype is None:
        dtype = numpy_dtype_name(arr.dtype)
    return LazyTensor(arr.shape, dtype, lambda: arr, where)


def numpy_dtype_name(dt) -> str:
    dt = np.dtype(dt)
    for name, st in STORAGE.items():
        if name != "bfloat16" and st.kind == dt.kind and st.itemsize == dt.itemsize:
            return name
    if dt == np.uint16:          # Paddle hands bfloat16 parameters to numpy as uint16
        return "bfloat16"
    raise ValueError(f"unsupported numpy dtype {dt}")
