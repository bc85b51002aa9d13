"""Zero-shot classification and retrieval.

Classifier: per class, the mean of the normalised template embeddings, renormalised (CLIP's recipe);
logits = 100 * normalised image features @ classifier. Images (and captions, and classes while the
classifier is built) are split over the ranks of `group` and gathered back in order, so several ranks
give the same metrics as one. Functions return plain dicts of numbers, for the training loop to log.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import paddle
import paddle.nn.functional as F

from . import dist
from .data import (CaptionDataset, _ImageSamples, check_classnames, load_classnames, load_templates,
                   open_classification_dataset)
from .metrics import classification_metrics, retrieval_metrics

Template = Union[str, Callable[[str], str]]
logger = logging.getLogger("evaclip_paddle.eval")


def _fill(template: Template, classname: str) -> str:
    return template(classname) if callable(template) else template.replace("{c}", classname)


def _prompts(classnames: Sequence[str], templates) -> Tuple[List[str], np.ndarray]:
    """All prompt texts and, for each, its class index. `templates` is a list (shared by every class)
    or a dict {classname: [prompts]} of class-specific prompts."""
    texts, owner = [], []
    for c, name in enumerate(classnames):
        if isinstance(templates, dict):
            if name not in templates:
                raise KeyError(f"class-specific templates have no prompts for class '{name}'")
            mine = list(templates[name])
        else:
            mine = [_fill(t, name) for t in templates]
        texts.extend(mine)
        owner.extend([c] * len(mine))
    return texts, np.asarray(owner, dtype=np.int64)


def _unwrap(model):
    """The EVACLIP layer under DataParallel / fleet wrappers."""
    while hasattr(model, "_layers"):
        model = model._layers
    return model


def _progress(iterable, enabled: bool, **kw):
    if not enabled:
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, **kw)


@paddle.no_grad()
def encode_texts(model, tokenizer, texts: Sequence[str], batch_size: int = 256, progress: bool = False,
                 amp_dtype: Optional[str] = None) -> np.ndarray:
    """Unit-norm float32 text embeddings [len(texts), D] on this rank (no splitting)."""
    model = _unwrap(model)
    out = []
    for s in _progress(range(0, len(texts), batch_size), progress, desc="texts", unit="batch"):
        ids = paddle.to_tensor(np.asarray(tokenizer(list(texts[s:s + batch_size])), dtype=np.int64))
        with _autocast(amp_dtype):
            emb = model.encode_text(ids)
        out.append(F.normalize(emb.astype("float32"), axis=-1).numpy())
    return np.concatenate(out, axis=0) if out else np.zeros([0, model.cfg.embed_dim], np.float32)


def _encode_texts_split(model, tokenizer, texts, batch_size, progress, group, amp_dtype) -> np.ndarray:
    """encode_texts over the ranks of `group`: each encodes one block, all get the whole result."""
    world, rank = dist.world_and_rank(group)
    start, stop, size = dist.block(len(texts), world, rank)
    mine = encode_texts(model, tokenizer, texts[start:stop], batch_size, progress and rank == 0, amp_dtype)
    if world == 1:
        return mine
    rows = np.zeros([size, _unwrap(model).cfg.embed_dim], np.float32)
    rows[:len(mine)] = mine
    status = np.full([size], dist.PAD, np.int64)
    status[:len(mine)] = dist.OK
    return dist.gather_blocks(rows, status, len(texts), group)[0]


@paddle.no_grad()
def build_zero_shot_classifier(model, tokenizer, classnames: Sequence[str], templates,
                               batch_size: int = 256, progress: bool = False, *, group=None,
                               split_across_ranks: bool = False, amp_dtype: Optional[str] = None) -> paddle.Tensor:
    """Returns the [embed_dim, num_classes] classifier matrix (float32).

    templates: strings with "{c}" for the class name (CLIP-Benchmark's format), callables (open_clip's),
    or a dict {classname: [prompts]}. Prompts are encoded `batch_size` texts per forward.
    split_across_ranks: each rank of `group` encodes a block of the prompts; every rank gets the result.
    """
    if not len(classnames) or not len(templates):
        raise ValueError("zero-shot classifier needs at least one class name and one template")
    m = _unwrap(model)
    was_training = m.training
    m.eval()
    try:
        texts, owner = _prompts(list(classnames), templates)
        if split_across_ranks:
            emb = _encode_texts_split(m, tokenizer, texts, batch_size, progress, group, amp_dtype)
        else:
            emb = encode_texts(m, tokenizer, texts, batch_size, progress, amp_dtype)
    finally:
        if was_training:
            m.train()
    sums = np.zeros([len(classnames), emb.shape[1]], np.float64)
    np.add.at(sums, owner, emb.astype(np.float64))
    mean = sums / np.bincount(owner, minlength=len(classnames))[:, None]
    mean /= np.linalg.norm(mean, axis=1, keepdims=True)
    return paddle.to_tensor(mean.astype(np.float32).T)


def zero_shot_logits(image_features: paddle.Tensor, classifier: paddle.Tensor) -> paddle.Tensor:
    """100 * normalised image features @ classifier, as CLIP does."""
    return 100.0 * F.normalize(image_features.astype("float32"), axis=-1) @ classifier


def classifier_cache_key(model, tokenizer, classnames: Sequence[str], templates) -> str:
    """sha256 of everything the classifier depends on: text-tower weights, tokenizer, names, templates."""
    m = _unwrap(model)
    h = hashlib.sha256(b"evaclip-zeroshot-classifier-v1")
    h.update(json.dumps(m.cfg.to_dict() if hasattr(m.cfg, "to_dict") else str(m.cfg), sort_keys=True).encode())
    tower = m.text if hasattr(m, "text") else m
    for name, p in sorted(tower.state_dict().items()):
        arr = np.ascontiguousarray(p.astype("float32").numpy() if p.dtype == paddle.bfloat16 else p.numpy())
        h.update(f"{name}:{arr.dtype}:{list(arr.shape)}".encode())
        h.update(arr.tobytes())
    h.update(f"{type(tokenizer).__name__}:{getattr(tokenizer, 'context_length', '')}".encode())
    if isinstance(templates, dict):
        tmpl = {k: list(v) for k, v in templates.items()}
    else:
        tmpl = [t if isinstance(t, str) else t("{c}") for t in templates]
    h.update(json.dumps({"classnames": list(classnames), "templates": tmpl}, sort_keys=True).encode())
    return h.hexdigest()


def get_zero_shot_classifier(model, tokenizer, classnames, templates, batch_size: int = 256,
                             progress: bool = False, cache_dir: Optional[str] = None, group=None,
                             amp_dtype: Optional[str] = None) -> paddle.Tensor:
    """build_zero_shot_classifier split over ranks, with an on-disk cache keyed by classifier_cache_key."""
    path = None
    if cache_dir:
        key = classifier_cache_key(model, tokenizer, classnames, templates)
        path = os.path.join(cache_dir, f"zeroshot_classifier_{key[:32]}.npy")
        # Ranks decide together: one that used the cache while another builds would skip its collectives.
        if dist.all_ranks_true(os.path.isfile(path), group):
            w = None
            try:
                w = np.load(path)
                if w.shape != (_unwrap(model).cfg.embed_dim, len(classnames)):
                    raise ValueError(f"shape {list(w.shape)}")
            except (OSError, ValueError) as e:
                logger.warning("ignoring unusable classifier cache %s (%s)", path, e)
                w = None
            if dist.all_ranks_true(w is not None, group):
                logger.info("zero-shot classifier loaded from cache %s", path)
                return paddle.to_tensor(w)
    clf = build_zero_shot_classifier(model, tokenizer, classnames, templates, batch_size, progress,
                                     group=group, split_across_ranks=True, amp_dtype=amp_dtype)
    if path and dist.world_and_rank(group)[1] == 0:
        try:
            os.makedirs(cache_dir, exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp.npy"
            np.save(tmp, clf.numpy())
            os.replace(tmp, path)                      # atomic: readers never see half a file
        except OSError as e:
            logger.warning("could not write the classifier cache %s (%s)", path, e)
    return clf


class _Adapter(_ImageSamples):
    """Any map-style dataset of (image, label) pairs (images already transformed) in our item protocol."""

    def __init__(self, base):
        super().__init__(None)
        self.base = base
        self.paths = [f"item {i}" for i in range(len(base))]
        self.classes = getattr(base, "classes", None)

    def __getitem__(self, i):
        x, y = self.base[i][:2]
        return np.asarray(x, dtype=np.float32), np.int64(y), np.int64(i), np.int64(1)


def _autocast(amp_dtype):
    if not amp_dtype:
        import contextlib
        return contextlib.nullcontext()
    return paddle.amp.auto_cast(True, dtype=amp_dtype)


def _param_dtype(model):
    for p in _unwrap(model).visual.parameters():
        return p.dtype
    return paddle.float32


@paddle.no_grad()
def encode_images(model, dataset, batch_size: int = 32, num_workers: int = 0, progress: bool = False,
                  group=None, amp_dtype: Optional[str] = None,
                  skipped: Optional[list] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit-norm float32 image features [N, D], labels [N] and status [N] (dist.OK / dist.FAILED) of
    the whole dataset on every rank; each rank encodes one block. Failed images have zero features;
    their (path, reason) go to `skipped` on rank 0 and to the log."""
    from paddle.io import DataLoader, Subset

    m = _unwrap(model)
    world, rank = dist.world_and_rank(group)
    n = len(dataset)
    start, stop, size = dist.block(n, world, rank)
    feats = np.zeros([size, m.cfg.embed_dim], np.float32)
    labels = np.full([size], -1, np.int64)
    status = np.full([size], dist.PAD, np.int64)
    was_training = m.training
    m.eval()
    dtype = _param_dtype(m)
    try:
        if stop > start:
            loader = DataLoader(Subset(dataset, list(range(start, stop))), batch_size=batch_size, shuffle=False,
                                drop_last=False, num_workers=num_workers)
            total = -(-(stop - start) // batch_size)
            for x, y, idx, ok in _progress(loader, progress and rank == 0, total=total, desc="images", unit="batch"):
                idx, ok = idx.numpy() - start, ok.numpy().astype(bool)
                labels[idx] = y.numpy()
                status[idx] = np.where(ok, dist.OK, dist.FAILED)
                if ok.any():
                    imgs = x if ok.all() else paddle.to_tensor(x.numpy()[ok])
                    with _autocast(amp_dtype):
                        f = m.encode_image(imgs.astype(dtype))
                    feats[idx[ok]] = F.normalize(f.astype("float32"), axis=-1).numpy()
    finally:
        if was_training:
            m.train()
    failed_local = [int(i) + start for i in np.nonzero(status == dist.FAILED)[0]]
    labels = dist.gather_blocks(labels, status, n, group)[0]
    feats, status = dist.gather_blocks(feats, status, n, group)
    failed = np.nonzero(status == dist.FAILED)[0]
    if len(failed):
        # Each rank knows why its own images failed; rank 0 reports the whole list.
        reasons = {i: dataset.read_error(i) if hasattr(dataset, "read_error") else "unreadable" for i in failed_local}
        gathered = _gather_dicts(reasons, group)
        if rank == 0:
            for i in failed:
                path = dataset.paths[i] if hasattr(dataset, "paths") else f"item {i}"
                why = gathered.get(int(i), "unreadable")
                logger.warning("skipped unreadable image %s (%s)", path, why)
                if skipped is not None:
                    skipped.append({"path": path, "error": why})
    return feats, labels, status


def _gather_dicts(d: dict, group) -> dict:
    out = {}
    for part in dist.all_gather_objects(d, group):
        out.update(part)
    return out


def _default_transform(model):
    from ..data.transforms import image_transform

    return image_transform(_unwrap(model).cfg.vision_cfg.image_size, is_train=False)


def _as_dataset(obj, model, transform, opener):
    if isinstance(obj, (str, os.PathLike)):
        return opener(os.fspath(obj), transform or _default_transform(model))
    if isinstance(obj, _ImageSamples):
        if obj.transform is None:
            obj.transform = transform or _default_transform(model)
        return obj
    if hasattr(obj, "__getitem__") and hasattr(obj, "__len__"):
        return _Adapter(obj)
    raise TypeError(f"expected a dataset path or a map-style dataset, got {type(obj).__name__}")


def evaluate_zeroshot_classification(model, tokenizer, dataset, classnames: Optional[Sequence[str]] = None,
                                     templates=None, *, dataset_name: str = "imagenet1k",
                                     transform: Optional[Callable] = None, labels_file: Optional[str] = None,
                                     image_root: Optional[str] = None, batch_size: int = 32,
                                     text_batch_size: int = 256, num_workers: int = 0, progress: bool = False,
                                     cache_dir: Optional[str] = None, group=None, amp_dtype: Optional[str] = None,
                                     classifier: Optional[paddle.Tensor] = None,
                                     skipped: Optional[list] = None) -> Dict[str, float]:
    """Zero-shot top-1 / top-5 / mean per-class recall of `model` on `dataset`.

    dataset: an ImageFolder directory, an image-list file (see data.ImageListDataset), one of our dataset
    objects, or any map-style dataset of (transformed image, label) pairs. classnames / templates: lists
    (or a templates dict of class-specific prompts); default: the bundled lists of `dataset_name`
    (ImageNet-1k names, 80 OpenAI templates). An ImageFolder whose class count differs from the bundled
    names falls back to its folder names. Call it on every rank of `group`; the default splits over the
    training topology's data group (tensor-parallel peers share images) or, without one, over all ranks;
    `group=dist.LOCAL` evaluates everything on the calling rank alone.
    Returns {"acc1", "acc5", "mean_per_class_recall", "num_images", "skipped_images"}.
    """
    ds = _as_dataset(dataset, model, transform,
                     lambda p, t: open_classification_dataset(p, t, labels_file=labels_file, image_root=image_root))
    source = "the classnames argument"
    if classnames is None:
        try:
            classnames, source = load_classnames(None, dataset_name), f"the bundled '{dataset_name}' names"
        except KeyError:
            classnames = None
        folders = getattr(ds, "classes", None)
        if folders and (classnames is None or len(folders) != len(classnames)):
            logger.warning("using the %d folder names as class names (no matching class-name list for '%s')",
                           len(folders), dataset_name)
            classnames, source = [c.replace("_", " ") for c in folders], "the folder names"
        if classnames is None:
            raise ValueError(f"no class names for dataset '{dataset_name}': pass classnames (a --classnames file)")
    check_classnames(ds, classnames, source)
    if templates is None:
        templates = load_templates(None, dataset_name)  # the bundled file's one set (OpenAI's 80) fits any name
    _, rank = dist.world_and_rank(group)
    if classifier is None:
        classifier = get_zero_shot_classifier(model, tokenizer, classnames, templates, text_batch_size,
                                              progress and rank == 0, cache_dir, group, amp_dtype)
    feats, labels, status = encode_images(model, ds, batch_size, num_workers, progress, group, amp_dtype, skipped)
    ok = status == dist.OK
    logits = 100.0 * feats[ok] @ np.asarray(classifier.numpy(), dtype=np.float32)
    out = classification_metrics(logits, labels[ok])
    out.update(num_images=int(ok.sum()), skipped_images=int((~ok).sum()))
    return out


def evaluate_zeroshot_retrieval(model, tokenizer, dataset, *, image_root: Optional[str] = None,
                                transform: Optional[Callable] = None, recall_k: Sequence[int] = (1, 5, 10),
                                split: str = "test", batch_size: int = 32, text_batch_size: int = 256,
                                num_workers: int = 0, progress: bool = False, group=None,
                                amp_dtype: Optional[str] = None, skipped: Optional[list] = None) -> Dict[str, float]:
    """Image->text and text->image recall@k on a caption JSON (COCO-Karpathy / Flickr30k) or CaptionDataset.

    Images that cannot be read are left out together with their captions (and counted).
    Returns CLIP-Benchmark's metric keys plus "num_images", "num_texts", "skipped_images".
    """
    ds = _as_dataset(dataset, model, transform,
                     lambda p, t: CaptionDataset(p, image_root=image_root, transform=t, split=split))
    if not isinstance(ds, CaptionDataset):
        raise TypeError("retrieval needs a caption JSON path or a CaptionDataset")
    feats, _, status = encode_images(model, ds, batch_size, num_workers, progress, group, amp_dtype, skipped)
    texts, t2i = ds.all_captions(), ds.text_to_image()
    _, rank = dist.world_and_rank(group)
    text_feats = _encode_texts_split(model, tokenizer, texts, text_batch_size, progress and rank == 0, group,
                                     amp_dtype)
    ok = status == dist.OK
    new_index = np.cumsum(ok) - 1                      # image index after dropping failed ones
    keep_t = ok[t2i]
    out = retrieval_metrics(feats[ok], text_feats[keep_t], new_index[t2i[keep_t]], recall_k)
    out.update(num_images=int(ok.sum()), num_texts=int(keep_t.sum()), skipped_images=int((~ok).sum()))
    return out
