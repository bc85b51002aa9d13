"""Evaluation datasets (ImageFolder, image list, caption JSON) and class-name / template files.

Class names and templates use CLIP-Benchmark's JSON format: an object keyed by dataset name whose value
is a list of names (classnames) or a list of "{c}" templates; a templates value may instead be an object
{classname: [prompts]} (class-specific prompts, CuPL style). A bare list and, for class names, a text
file with one name per line are accepted too.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

METADATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metadata")
DEFAULT_CLASSNAMES = os.path.join(METADATA_DIR, "en_classnames.json")
DEFAULT_TEMPLATES = os.path.join(METADATA_DIR, "en_zeroshot_classification_templates.json")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

Templates = Union[List[str], Dict[str, List[str]]]


def _read_json(path: str, what: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def _pick(data, path: str, dataset: Optional[str], what: str):
    """A bare list, or the entry of `dataset` in an object keyed by dataset name."""
    if isinstance(data, list):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a list or an object keyed by dataset name, got {type(data).__name__}")
    if dataset in data:
        return data[dataset]
    if len(data) == 1 and what == "templates" and all(isinstance(v, list) for v in data.values()):
        return next(iter(data.values()))  # one generic template set: use it for any dataset
    raise KeyError(f"{path}: no {what} for dataset '{dataset}' (keys: {', '.join(sorted(data)[:20])})")


def load_classnames(path: Optional[str] = None, dataset: str = "imagenet1k") -> List[str]:
    """Class names of `dataset` from a CLIP-Benchmark-style JSON (default: the bundled ImageNet-1k names)."""
    path = path or DEFAULT_CLASSNAMES
    if path.endswith(".txt"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"classnames file not found: {path}")
        with open(path, "r", encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
    else:
        names = _pick(_read_json(path, "classnames"), path, dataset, "classnames")
    if not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{path}: classnames of '{dataset}' must be a non-empty list of strings")
    return list(names)


def load_templates(path: Optional[str] = None, dataset: str = "imagenet1k") -> Templates:
    """Templates of `dataset` (default: the 80 OpenAI ImageNet templates); strings contain "{c}"."""
    path = path or DEFAULT_TEMPLATES
    templates = _pick(_read_json(path, "templates"), path, dataset, "templates")
    if isinstance(templates, dict):
        if not all(isinstance(v, list) and v and all(isinstance(s, str) for s in v) for v in templates.values()):
            raise ValueError(f"{path}: class-specific templates of '{dataset}' must map names to lists of prompts")
        return {k: list(v) for k, v in templates.items()}
    if not templates or not all(isinstance(t, str) for t in templates):
        raise ValueError(f"{path}: templates of '{dataset}' must be a non-empty list of strings")
    missing = [t for t in templates if "{c}" not in t]
    if missing:
        raise ValueError(f"{path}: templates without the '{{c}}' placeholder: {missing[:3]}")
    return list(templates)


def load_image(path: str):
    """Decoded PIL image in its own mode: open_clip's transform converts to RGB only after resizing."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return im


class _ImageSamples:
    """Shared part: a list of image paths, a transform, and a fallback for unreadable files.

    __getitem__ returns (image CHW float32, label, index, ok). An unreadable image yields zeros and ok=0,
    so batches keep a fixed shape through any DataLoader; the evaluator drops those rows and reports them.
    """

    paths: List[str]

    def __init__(self, transform: Optional[Callable] = None):
        self.transform = transform
        self.fallback_shape: Optional[Tuple[int, ...]] = None

    def __len__(self):
        return len(self.paths)

    def label(self, i: int) -> int:
        return -1

    def _fallback(self):
        if self.fallback_shape is None:
            from PIL import Image
            self.fallback_shape = tuple(np.asarray(self._apply(Image.new("RGB", (64, 64)))).shape)
        return np.zeros(self.fallback_shape, dtype=np.float32)

    def _apply(self, img):
        return img.convert("RGB") if self.transform is None else self.transform(img)

    def __getitem__(self, i: int):
        try:
            x = np.asarray(self._apply(load_image(self.paths[i])), dtype=np.float32)
            ok = 1
        except Exception:  # unreadable or truncated file: reported by the evaluator, not fatal
            x, ok = self._fallback(), 0
        return x, np.int64(self.label(i)), np.int64(i), np.int64(ok)

    def read_error(self, i: int) -> str:
        """Re-reads a failed image to tell why (only called for the few that fail)."""
        try:
            self._apply(load_image(self.paths[i]))
            return "unreadable in a loader worker"
        except Exception as e:
            return f"{type(e).__name__}: {e}"


class ImageFolderDataset(_ImageSamples):
    """root/<class folder>/**/<image>; class index = position of the folder in sorted order
    (for ImageNet: sorted wnids, which is the order of the bundled class names)."""

    def __init__(self, root: str, transform: Optional[Callable] = None):
        super().__init__(transform)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder not found: {root}")
        self.root = root
        self.classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
        if not self.classes:
            raise ValueError(f"{root}: no class folders (expected root/<class>/<image files>)")
        self.paths, self.labels = [], []
        for c, name in enumerate(self.classes):
            for dirpath, dirnames, files in os.walk(os.path.join(root, name), followlinks=True):
                dirnames.sort()
                for f in sorted(files):
                    if f.lower().endswith(IMAGE_EXTENSIONS):
                        self.paths.append(os.path.join(dirpath, f))
                        self.labels.append(c)
        if not self.paths:
            raise ValueError(f"{root}: no images with extensions {IMAGE_EXTENSIONS} in the class folders")

    def label(self, i: int) -> int:
        return self.labels[i]


class ImageListDataset(_ImageSamples):
    """A text file of image paths (relative to `image_root`, default: the list's folder), each line either
    "path<TAB or space>label" or just "path" with the labels in `labels_file` (one integer a line).
    Labels are 0-based indices into the class-name list."""

    def __init__(self, list_file: str, labels_file: Optional[str] = None, image_root: Optional[str] = None,
                 transform: Optional[Callable] = None):
        super().__init__(transform)
        if not os.path.isfile(list_file):
            raise FileNotFoundError(f"image list not found: {list_file}")
        root = image_root if image_root is not None else os.path.dirname(os.path.abspath(list_file))
        with open(list_file, "r", encoding="utf-8") as f:
            lines = [ln.rstrip("\n") for ln in f if ln.strip()]
        ext_labels = None
        if labels_file:
            if not os.path.isfile(labels_file):
                raise FileNotFoundError(f"labels file not found: {labels_file}")
            with open(labels_file, "r", encoding="utf-8") as f:
                ext_labels = [ln.strip() for ln in f if ln.strip()]
            if len(ext_labels) != len(lines):
                raise ValueError(f"{labels_file} has {len(ext_labels)} labels but {list_file} lists "
                                 f"{len(lines)} images")
        self.paths, self.labels = [], []
        for n, line in enumerate(lines):
            if ext_labels is not None:
                path, lab = line.strip(), ext_labels[n]
            else:
                parts = line.strip().rsplit(None, 1)
                if len(parts) != 2:
                    raise ValueError(f"{list_file}:{n + 1}: expected 'path label' (or pass a labels file), "
                                     f"got {line!r}")
                path, lab = parts
            try:
                self.labels.append(int(lab))
            except ValueError:
                raise ValueError(f"{labels_file or list_file}: label of line {n + 1} is not an integer: {lab!r}")
            self.paths.append(path if os.path.isabs(path) else os.path.join(root, path))
        if not self.paths:
            raise ValueError(f"{list_file}: no images listed")
        self.classes = None

    def label(self, i: int) -> int:
        return self.labels[i]


class CaptionDataset(_ImageSamples):
    """Retrieval annotations: a JSON list of {"image": path, "caption": str or [str, ...], ...}
    (COCO-Karpathy / Flickr30k test and val files), or Karpathy's {"images": [{"filename"|"filepath",
    "sentences": [{"raw": ...}], "split": ...}]} with `split` choosing the images."""

    def __init__(self, ann_file: str, image_root: Optional[str] = None, transform: Optional[Callable] = None,
                 split: str = "test"):
        super().__init__(transform)
        data = _read_json(ann_file, "retrieval annotation")
        root = image_root if image_root is not None else os.path.dirname(os.path.abspath(ann_file))
        entries = []
        if isinstance(data, dict) and "images" in data:
            for e in data["images"]:
                if e.get("split", split) != split:
                    continue
                rel = os.path.join(e.get("filepath", ""), e["filename"])
                entries.append((rel, [s["raw"] if isinstance(s, dict) else s for s in e.get("sentences", [])]))
        elif isinstance(data, list):
            for n, e in enumerate(data):
                if not isinstance(e, dict) or "image" not in e or "caption" not in e:
                    raise ValueError(f"{ann_file}: entry {n} needs 'image' and 'caption' keys")
                caps = e["caption"] if isinstance(e["caption"], list) else [e["caption"]]
                entries.append((e["image"], caps))
        else:
            raise ValueError(f"{ann_file}: expected a list of {{image, caption}} or Karpathy's {{'images': [...]}}")
        # Training-style files repeat an image once per caption: merge them, keeping first-seen order.
        merged: Dict[str, List[str]] = {}
        for rel, caps in entries:
            merged.setdefault(rel, []).extend(str(c) for c in caps)
        if not merged:
            raise ValueError(f"{ann_file}: no images (split '{split}')")
        self.paths = [r if os.path.isabs(r) else os.path.join(root, r) for r in merged]
        self.captions: List[List[str]] = list(merged.values())
        empty = [p for p, c in zip(merged, self.captions) if not c]
        if empty:
            raise ValueError(f"{ann_file}: images without captions, e.g. {empty[:3]}")

    def text_to_image(self) -> np.ndarray:
        return np.concatenate([np.full(len(c), i, dtype=np.int64) for i, c in enumerate(self.captions)])

    def all_captions(self) -> List[str]:
        return [c for caps in self.captions for c in caps]


def open_classification_dataset(path: str, transform: Optional[Callable] = None, labels_file: Optional[str] = None,
                                image_root: Optional[str] = None) -> _ImageSamples:
    """A folder -> ImageFolderDataset; a file -> ImageListDataset."""
    if os.path.isdir(path):
        return ImageFolderDataset(path, transform)
    if os.path.isfile(path):
        return ImageListDataset(path, labels_file, image_root, transform)
    raise FileNotFoundError(f"classification dataset not found: {path} (an ImageFolder directory or an image list)")


def check_classnames(dataset, classnames: Sequence[str], source: str) -> None:
    """Labels must index into the class names; an ImageFolder must have one folder per name."""
    classes = getattr(dataset, "classes", None)
    if classes is not None and len(classes) != len(classnames):
        raise ValueError(f"{getattr(dataset, 'root', 'dataset')} has {len(classes)} class folders but {source} gives "
                         f"{len(classnames)} class names; pass --classnames for this dataset")
    labels = getattr(dataset, "labels", None)
    if labels is not None and len(labels) and (min(labels) < 0 or max(labels) >= len(classnames)):
        raise ValueError(f"labels must be in [0, {len(classnames)}) for the {len(classnames)} names of {source}, "
                         f"found {min(labels)}..{max(labels)}")
