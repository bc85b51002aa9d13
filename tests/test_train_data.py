"""Training data: LAION/COCO parsing, corrupt samples skipped and counted, rank splits, resumable order,
and the demo generator (deterministic, held-out combinations never in training)."""
import base64
import gzip
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from evaclip_paddle.data.coco import StridedBatchSampler
from evaclip_paddle.data.demo import ALL_COLOURS, COLOURS, SHAPES, generate, split_combinations
from evaclip_paddle.data.laion import LaionStream
from evaclip_paddle.data.loader import TrainData
from evaclip_paddle.data.tokenizer import CLIPTokenizer
from evaclip_paddle.data.transforms import image_transform
from evaclip_paddle.train.args import TrainingArguments
from evaclip_paddle.train.loop import run_training


def _png(size=12, colour=(200, 30, 30)):
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def _line(caption, payload: bytes, key="k", meta_text=None):
    meta = meta_text if meta_text is not None else json.dumps({"caption_en": caption})
    return f"{key}\t{meta}\t12\t12\t{base64.b64encode(payload).decode()}\n"


def _laion_dir(tmp_path, n_good=11):
    good = [_line(f"a red square number {i}", _png()) for i in range(n_good)]
    bad = [
        "k\t" + json.dumps({"caption_en": "broken"}) + "\t12\t12\t@@not*base64!!\n",     # broken base64
        _line("not an image", b"hello, this is text and not a picture"),                # non-image payload
        _line("", _png(), meta_text="{caption_en: oops"),                               # invalid JSON
        _line("too small", _png(size=3)),                                               # under 5 px
    ]
    lines = good[:3] + bad[:2] + good[3:8] + bad[2:] + good[8:]
    # one good line whose other JSON fields are Chinese, written in gb18030 (not UTF-8)
    zh = _line("", _png(), meta_text=json.dumps({"caption_en": "a red square", "caption_zh": "红色方块"},
                                                ensure_ascii=False)).encode("gb18030")
    part0 = "".join(lines[:9]).encode("utf-8") + zh
    part1 = gzip.compress("".join(lines[9:]).encode("utf-8"))
    (tmp_path / "p0.txt").write_bytes(part0)
    (tmp_path / "p1.gz").write_bytes(part1)
    (tmp_path / "list.txt").write_text("p0.txt\n# a comment\n\np1.gz\n")
    return tmp_path / "list.txt", len(lines) + 1


def test_corrupt_laion_samples_are_skipped_and_counted(tmp_path):
    filelist, n_lines = _laion_dir(tmp_path)
    assert n_lines == 16
    out = tmp_path / "run"
    args = TrainingArguments(model="EVA02-CLIP-tiny", train_data=str(filelist), output_dir=str(out),
                             per_device_train_batch_size=4, max_steps=4, learning_rate=1e-3, logging_steps=1,
                             save_strategy="no", report_to="none", disable_tqdm=True, seed=0).validate()
    summary = run_training(args)      # 4 steps x 4 lines: exactly one pass over the 16 lines
    assert summary["global_step"] == 4 and summary["counters"]["skipped_samples"] == 4
    logs = [json.loads(line) for line in open(out / "train_log.jsonl")]
    assert logs[-1]["skipped_samples"] == 4
    assert all(loss is not None and np.isfinite(loss) for _, loss in summary["losses"])
    one_batch = TrainData(str(filelist), 16, None, CLIPTokenizer(context_length=8), 12, seed=0)
    batch = next(one_batch.batches(0))[2]
    assert int(np.asarray(batch["skipped"]).sum()) == 4 and batch["image"].shape[0] == 12


def test_corrupt_coco_images_are_skipped(tmp_path):
    (tmp_path / "img").mkdir()
    entries = []
    for i in range(6):
        (tmp_path / "img" / f"{i}.png").write_bytes(_png())
        entries.append({"caption": f"red {i}", "image": f"img/{i}.png", "image_id": i})
    (tmp_path / "img" / "2.png").write_bytes(b"\x89PNG truncated")
    entries.append({"caption": "missing", "image": "img/none.png", "image_id": 9})
    entries.append({"image": "img/0.png"})                       # malformed: no caption
    entries.append({"caption": ["two", "captions"], "image": "img/1.png", "image_id": 1})
    (tmp_path / "train.json").write_text(json.dumps(entries))
    data = TrainData(str(tmp_path / "train.json"), 9, image_transform(12, True), CLIPTokenizer(context_length=8), 12)
    assert data.malformed == 1 and data.num_samples == 9
    _, _, batch = next(data.batches(0))
    assert int(np.asarray(batch["skipped"]).sum()) == 2 and batch["image"].shape == [7, 3, 12, 12]


def test_ranks_read_disjoint_data(tmp_path):
    parts = [str(tmp_path / f"p{i}") for i in range(5)]
    for p in parts:
        open(p, "w").close()
    split = [LaionStream(parts, rank=r, world=2).parts for r in range(2)]
    assert set(split[0]).isdisjoint(split[1]) and sorted(split[0] + split[1]) == sorted(parts)
    with pytest.raises(ValueError, match="part"):
        LaionStream(parts[:1], rank=0, world=2)
    seen = []
    for r in range(3):
        for batch in StridedBatchSampler(40, 4, seed=3, epoch=1, rank=r, world=3):
            seen += [i for i, _ in batch]
    assert len(seen) == len(set(seen)) == 36


@pytest.mark.parametrize("fmt,workers", [("coco_clip", 0), ("laion", 2)])
def test_resumed_loader_continues_the_same_sequence(tmp_path, fmt, workers):
    data_dir = tmp_path / "demo"
    generate(str(data_dir), image_size=16, per_combo=2, eval_per_class=1, seen_eval_per_class=0, seed=1)

    def loader():
        return TrainData(str(data_dir), 8, image_transform(16, True), CLIPTokenizer(context_length=8), 16, seed=5,
                         num_workers=workers, task_name=fmt)
    it = loader().batches(0)
    full = [np.asarray(next(it)[2]["image"]) for _ in range(9)]
    it = loader().batches(5)
    for k in range(5, 9):
        np.testing.assert_array_equal(np.asarray(next(it)[2]["image"]), full[k])


def test_demo_set_is_deterministic_and_holds_out_combinations(tmp_path):
    a = generate(str(tmp_path / "a"), image_size=16, per_combo=2, eval_per_class=2, seen_eval_per_class=1, seed=7)
    b = generate(str(tmp_path / "b"), image_size=16, per_combo=2, eval_per_class=2, seen_eval_per_class=1, seed=7)
    assert a == b
    for rel in ("train.json", "laion/part-00000.txt", "laion/part-00001.gz", "eval/zeroshot.json",
                "images/train/000005.png", "eval/images/03_001.png"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    train, held = split_combinations()
    assert len(held) >= 20 and not set(train) & set(held)
    assert {c for c, _ in train} == set(ALL_COLOURS) and {s for _, s in train} == set(SHAPES)
    assert {c for c, _ in held} == set(COLOURS)         # evaluated colours are all seen with other shapes
    captions = [e["caption"] for e in json.load(open(tmp_path / "a" / "train.json"))]
    for c, s in held:                      # no training caption names a held-out combination
        assert not any(c in cap.split() and s in cap.replace(",", " ").replace(".", " ").split() for cap in captions)
    ev = json.load(open(tmp_path / "a" / "eval" / "zeroshot.json"))
    assert ev["classnames"] == [f"{c} {s}" for c, s in held] and len(ev["samples"]) == 2 * len(held)
    assert os.path.isfile(tmp_path / "a" / "laion" / "filelist.txt")
