"""Training data for the loop: format detection, per-rank splitting, resumable batch iteration."""
from __future__ import annotations

import json
import os
from typing import Iterator, Optional, Tuple

import numpy as np
import paddle

from .coco import CocoCaptions, StridedBatchSampler
from .laion import LaionStream, read_filelist
from .samples import Collate


def resolve_train_data(path: str, task_name: str = "") -> Tuple[str, str]:
    """(format, file): 'coco' + JSON path or 'laion' + file-list path.

    A directory written by `python -m evaclip_paddle.demo` resolves to its COCO JSON.
    """
    if os.path.isdir(path):
        manifest = os.path.join(path, "manifest.json")
        if not os.path.isfile(manifest):
            raise ValueError(f"--train_data {path}: a directory must be a demo set (manifest.json); give a "
                             "COCO-Karpathy .json or a LAION file list instead")
        with open(manifest, "r", encoding="utf-8") as f:
            m = json.load(f)
        if task_name == "laion":
            return "laion", os.path.join(path, m["laion_filelist"])
        return "coco", os.path.join(path, m["coco_json"])
    if task_name:
        return ("coco" if task_name == "coco_clip" else "laion"), path
    return ("coco" if path.lower().endswith(".json") else "laion"), path


class TrainData:
    """Yields (epoch, step_in_epoch, batch) from any global step on, forever.

    batch: {"image": [n,3,H,W] float32, "text": [n,ctx] int64, "skipped": [1] int64} (numpy or paddle).
    COCO: one DataLoader per epoch over the rank's strided share, shuffled by (seed, epoch).
    LAION: one endless stream; `steps_per_epoch` is computed from line counts only when asked.
    """

    def __init__(self, path: str, batch_size: int, transform, tokenizer, image_size: int, seed: int = 0,
                 num_workers: int = 0, rank: int = 0, world: int = 1, image_root: Optional[str] = None,
                 task_name: str = ""):
        self.kind, self.file = resolve_train_data(path, task_name)
        self.batch_size, self.transform, self.seed = int(batch_size), transform, int(seed)
        self.num_workers, self.rank, self.world = int(num_workers), int(rank), int(world)
        self.collate = Collate(tokenizer, image_size)
        self.malformed = 0
        if self.kind == "coco":
            self.dataset = CocoCaptions(self.file, image_root or None, transform)
            self.malformed = self.dataset.malformed
            self.num_samples = len(self.dataset)
            spe = StridedBatchSampler(self.num_samples, self.batch_size, self.seed, 0, rank, world).steps()
            if spe < 1:
                raise ValueError(f"--train_data {self.file}: {self.num_samples} samples are fewer than one batch "
                                 f"({self.batch_size} per device x {world} data-parallel ranks)")
            self._spe = spe
        else:
            self.parts = read_filelist(self.file)
            if len(self.parts) < world:
                raise ValueError(f"--train_data {self.file}: {len(self.parts)} part file(s) for {world} "
                                 "data-parallel ranks; every rank needs at least one part")
            self.num_samples = None
            self._spe = None

    @property
    def steps_per_epoch(self) -> int:
        if self._spe is None:  # LAION: every rank must agree, so count all parts (cheap next to training)
            from .laion import count_lines
            per_rank = min(sum(count_lines(p) for p in self.parts[r::self.world]) for r in range(self.world))
            self._spe = max(1, per_rank // self.batch_size)
        return self._spe

    def position(self, step: int) -> dict:
        """Data position after `step` optimizer steps (what a checkpoint stores)."""
        if self.kind == "coco":
            epoch, in_epoch = divmod(step, self.steps_per_epoch)
            return {"epoch": epoch, "step_in_epoch": in_epoch, "sampler_seed": self.seed, "kind": "coco"}
        return {"epoch": step // self._spe if self._spe else 0, "batches_consumed": step, "sampler_seed": self.seed,
                "kind": "laion"}

    def _loader(self, dataset, **kw):
        return paddle.io.DataLoader(dataset, collate_fn=self.collate, num_workers=self.num_workers,
                                    return_list=True, **kw)

    def batches(self, start_step: int = 0) -> Iterator[Tuple[int, int, dict]]:
        if self.kind == "coco":
            epoch, s = divmod(start_step, self.steps_per_epoch)
            while True:
                sampler = StridedBatchSampler(self.num_samples, self.batch_size, self.seed, epoch, self.rank,
                                              self.world, start_step=s)
                for batch in self._loader(self.dataset, batch_sampler=sampler):
                    yield epoch, s, batch
                    s += 1
                epoch, s = epoch + 1, 0
        stream = LaionStream(self.parts, self.transform, self.seed, self.batch_size, start_batch=start_step,
                             num_workers=self.num_workers, rank=self.rank, world=self.world)
        step = start_step
        for batch in self._loader(stream, batch_size=self.batch_size, drop_last=False):
            spe = self._spe
            yield (step // spe, step % spe, batch) if spe else (0, step, batch)
            step += 1


def as_numpy(x) -> np.ndarray:
    return x.numpy() if hasattr(x, "numpy") else np.asarray(x)
