"""LAION-style part files as an endless, resumable training stream.

File list: a text file with one part path per line (relative paths are relative to the list's
directory; blank lines and '#' comments ignored). Each part is text (UTF-8, else gb18030), optionally
gzip-compressed (.gz), one sample per line, tab-separated: column 2 (index 1) is JSON with
"caption_en" (else "blip_caption_en"), column 5 (index 4) the base64-encoded image. Images under
5 px are dropped. Unusable lines become None items, which the collate counts as skipped.

Parts are split across data-parallel ranks (rank r reads parts r, r+W, ...), so ranks never read
the same sample; within a rank, DataLoader worker w takes lines w, w+nw, ... of the rank's stream.
Epoch e reads the rank's parts in an order drawn from (seed, e). The stream never ends; a resumed
run skips exactly the lines the interrupted run consumed (without decoding them).
"""
from __future__ import annotations

import base64
import binascii
import gzip
import json
import logging
import os
from typing import Iterator, List, Optional

import numpy as np
import paddle

from .samples import BadSample, decode_image, sample_rng

logger = logging.getLogger("evaclip_paddle.data")


def read_filelist(path: str) -> List[str]:
    base = os.path.dirname(os.path.abspath(path))
    parts = []
    with open(path, "r", encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts.append(line if os.path.isabs(line) else os.path.join(base, line))
    if not parts:
        raise ValueError(f"{path}: the LAION file list names no part files")
    missing = [p for p in parts if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{path}: {len(missing)} part file(s) not found, e.g. {missing[0]}")
    return parts


def open_part(path: str):
    """Binary line iterator over a part (gzip detected by magic bytes, whatever the name)."""
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def count_lines(path: str) -> int:
    with open_part(path) as f:
        return sum(1 for _ in f)


def decode_text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        try:
            return raw.decode("gb18030")
        except UnicodeDecodeError:
            raise BadSample("line is neither UTF-8 nor gb18030 text") from None


def parse_line(raw: bytes, min_size: int = 5):
    """(PIL image, caption) of one part line; BadSample says why a line is unusable."""
    cols = decode_text(raw).rstrip("\r\n").split("\t")
    if len(cols) < 5:
        raise BadSample(f"expected >= 5 tab-separated columns, got {len(cols)}")
    try:
        meta = json.loads(cols[1])
    except json.JSONDecodeError as e:
        raise BadSample(f"column 2 is not valid JSON ({e.msg})") from None
    caption = meta.get("caption_en") or meta.get("blip_caption_en") if isinstance(meta, dict) else None
    if not isinstance(caption, str) or not caption.strip():
        raise BadSample("no caption_en / blip_caption_en in column 2")
    try:
        data = base64.b64decode(cols[4].strip(), validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadSample(f"column 5 is not valid base64 ({e})") from None
    return decode_image(data, min_size), caption


class LaionStream(paddle.io.IterableDataset):
    """Iterable dataset of (image array, caption) or None items.

    start_batch: batches of `batch_size` items the DataLoader already consumed (resume). With
    `num_workers` workers the DataLoader takes batches from them in turn (strict round robin), so the
    sequence of batches is a pure function of (parts, seed, batch size, workers).
    """

    def __init__(self, parts: List[str], transform=None, seed: int = 0, batch_size: int = 1,
                 start_batch: int = 0, num_workers: int = 0, rank: int = 0, world: int = 1, min_size: int = 5):
        if len(parts) < world:
            raise ValueError(f"{len(parts)} LAION part file(s) for {world} data-parallel ranks: every rank needs "
                             "at least one part (split the data into more parts)")
        self.parts = parts[rank::world]
        self.transform, self.seed, self.batch_size = transform, int(seed), int(batch_size)
        self.start_batch, self.num_workers, self.min_size = int(start_batch), max(1, int(num_workers)), min_size
        self._lines = None

    def lines_per_epoch(self) -> int:
        if self._lines is None:
            self._lines = sum(count_lines(p) for p in self.parts)
        return self._lines

    def _worker(self):
        info = paddle.io.get_worker_info()
        return (info.id, info.num_workers) if info is not None else (0, 1)

    def part_order(self, epoch: int) -> np.ndarray:
        return np.random.RandomState((self.seed * 1000003 + epoch) % (2 ** 32)).permutation(len(self.parts))

    def __iter__(self) -> Iterator[Optional[tuple]]:
        w, nw = self._worker()
        # The DataLoader always asks worker 0 first: after `start_batch` batches, worker w plays the
        # part of the worker the uninterrupted run would have asked at this point.
        w = (w + self.start_batch) % nw
        done = self.start_batch // nw + (1 if w < self.start_batch % nw else 0)
        skip, epoch = done * self.batch_size, 0
        if skip:
            total = self.lines_per_epoch()
            mine = (total - w + nw - 1) // nw          # lines of one epoch that fall to this worker
            if mine == 0:
                raise ValueError("the LAION parts of this rank are empty")
            epoch, skip = divmod(skip, mine)
        while True:
            produced = 0
            for k in self.part_order(epoch):
                with open_part(self.parts[k]) as f:
                    for line_no, raw in enumerate(f):
                        pos = produced
                        produced += 1
                        if pos % nw != w:
                            continue
                        if skip:
                            skip -= 1
                            continue
                        yield self._item(raw, (self.seed, epoch, int(k), line_no), self.parts[k], line_no)
            if produced == 0:
                raise ValueError(f"the LAION parts of this rank are empty: {self.parts}")
            epoch += 1

    def _item(self, raw: bytes, seed, part: str, line_no: int):
        try:
            image, caption = parse_line(raw, self.min_size)
            arr = self.transform(image, sample_rng(seed)) if self.transform is not None else np.asarray(image)
        except Exception as e:  # corrupt data is counted, never fatal
            logger.warning("skipping %s line %d: %s", part, line_no + 1, e)
            return None
        return arr, caption
