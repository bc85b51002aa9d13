"""Zero-shot pipeline: synthetic classifier (hand-computed metrics), cache, data formats, CLI results JSON."""
import json
import math
import os
import types

import numpy as np
import paddle
import pytest
from PIL import Image

from evaclip_paddle.eval import zeroshot as zs
from evaclip_paddle.eval.data import (CaptionDataset, ImageFolderDataset, ImageListDataset, load_classnames,
                                      load_templates)

# Text embeddings per prompt (unnormalised on purpose): cat -> e0, dog -> mean(e1, e2), car -> e2.
PROMPTS = {"a cat": [1, 0, 0], "the cat": [2, 0, 0], "a dog": [0, 1, 0], "the dog": [0, 0, 1],
           "a car": [0, 0, 1], "the car": [0, 0, 3]}
CLASSES, TEMPLATES = ["cat", "dog", "car"], ["a {c}", "the {c}"]
R2 = 1 / math.sqrt(2)


class FakeTokenizer:
    context_length = 1

    def __init__(self):
        self.vocab = {t: i for i, t in enumerate(PROMPTS)}

    def __call__(self, texts):
        return np.array([[self.vocab[t]] for t in texts], dtype=np.int64)


class FakeCLIP(paddle.nn.Layer):
    """encode_text looks the prompt up; encode_image returns the 3-vector 'image' itself."""

    def __init__(self):
        super().__init__()
        self.cfg = types.SimpleNamespace(embed_dim=3)
        self.visual = paddle.nn.Linear(1, 1)
        self.text = paddle.nn.Embedding(len(PROMPTS), 3)
        self.text.weight.set_value(paddle.to_tensor(np.array(list(PROMPTS.values()), np.float32)))
        self.text_calls = 0

    def encode_text(self, ids):
        self.text_calls += 1
        return self.text(ids[:, 0])

    def encode_image(self, x):
        return x


class Images(paddle.io.Dataset):
    # A [1,0,0] cat -> cat.  B [0,1,0] dog -> dog.  C [0,0,1] car -> car (100 vs 70.7 for dog).
    # D [0,1,1] car -> dog (100 vs 70.7).  E [1,0,1] dog -> cat and car tie at 70.7, argmax picks cat; dog is 3rd.
    items = [([1, 0, 0], 0), ([0, 1, 0], 1), ([0, 0, 1], 2), ([0, 1, 1], 2), ([1, 0, 1], 1)]
    classes = CLASSES

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        x, y = self.items[i]
        return np.array(x, np.float32), y


def test_classifier_is_mean_of_normalised_templates():
    model = FakeCLIP()
    w = zs.build_zero_shot_classifier(model, FakeTokenizer(), CLASSES, TEMPLATES, batch_size=4).numpy()
    np.testing.assert_allclose(w, np.array([[1, 0, 0], [0, R2, R2], [0, 0, 1]]).T, atol=1e-7)
    assert model.text_calls == 2                                 # 6 prompts in batches of 4
    # class-specific prompts (CuPL-style dict) and callables give the same classifier
    cupl = {c: [t.replace("{c}", c) for t in TEMPLATES] for c in CLASSES}
    w2 = zs.build_zero_shot_classifier(model, FakeTokenizer(), CLASSES, cupl).numpy()
    w3 = zs.build_zero_shot_classifier(model, FakeTokenizer(), CLASSES, [lambda c: f"a {c}", lambda c: f"the {c}"])
    np.testing.assert_allclose(w2, w, atol=1e-7)
    np.testing.assert_allclose(w3.numpy(), w, atol=1e-7)
    logits = zs.zero_shot_logits(paddle.to_tensor([[0.0, 2.0, 2.0]]), paddle.to_tensor(w)).numpy()
    np.testing.assert_allclose(logits, [[0, 100, 100 * R2]], atol=1e-4)


def test_evaluate_classification_hand_computed(tmp_path):
    model = FakeCLIP()
    m = zs.evaluate_zeroshot_classification(model, FakeTokenizer(), Images(), CLASSES, TEMPLATES, batch_size=2,
                                            cache_dir=str(tmp_path))
    assert m["acc1"] == pytest.approx(3 / 5)
    assert math.isnan(m["acc5"])                                 # 3 classes
    assert m["mean_per_class_recall"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert (m["num_images"], m["skipped_images"]) == (5, 0)
    # second run: classifier from the disk cache, no text forward at all
    model.text_calls = 0
    zs.evaluate_zeroshot_classification(model, FakeTokenizer(), Images(), CLASSES, TEMPLATES, cache_dir=str(tmp_path))
    assert model.text_calls == 0
    assert len(os.listdir(tmp_path)) == 1
    # the key changes with the templates and with the text weights
    k = zs.classifier_cache_key(model, FakeTokenizer(), CLASSES, TEMPLATES)
    assert k != zs.classifier_cache_key(model, FakeTokenizer(), CLASSES, TEMPLATES[:1])
    model.text.weight.set_value(model.text.weight * 2)
    assert k != zs.classifier_cache_key(model, FakeTokenizer(), CLASSES, TEMPLATES)


def test_bundled_metadata():
    names, tmpl = load_classnames(), load_templates()
    assert len(names) == 1000 and names[0] == "tench" and names[-1] == "toilet paper"
    assert len(tmpl) == 80 and tmpl[0] == "a bad photo of a {c}." and all("{c}" in t for t in tmpl)


def test_classnames_templates_files(tmp_path):
    (tmp_path / "cn.json").write_text(json.dumps({"pets": ["cat", "dog"], "cars": ["a", "b"]}))
    (tmp_path / "t.json").write_text(json.dumps({"pets": ["a photo of a {c}."]}))
    (tmp_path / "cn.txt").write_text("cat\ndog\n")
    (tmp_path / "bad.json").write_text(json.dumps({"pets": ["no placeholder"]}))
    assert load_classnames(str(tmp_path / "cn.json"), "pets") == ["cat", "dog"]
    assert load_classnames(str(tmp_path / "cn.txt"), "x") == ["cat", "dog"]
    assert load_templates(str(tmp_path / "t.json"), "other") == ["a photo of a {c}."]  # one set: any dataset
    with pytest.raises(KeyError, match="flowers"):
        load_classnames(str(tmp_path / "cn.json"), "flowers")
    with pytest.raises(ValueError, match="placeholder"):
        load_templates(str(tmp_path / "bad.json"), "pets")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_templates(str(tmp_path / "nope.json"))


def _img(path, seed):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (36, 44, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


def test_image_folder_list_and_captions(tmp_path):
    for c, name in enumerate(["n02", "n01", "n10"]):
        for i in range(2):
            _img(str(tmp_path / "f" / name / "sub" / f"{i}.png"), c * 10 + i)
    ds = ImageFolderDataset(str(tmp_path / "f"))
    assert ds.classes == ["n01", "n02", "n10"] and ds.labels == [0, 0, 1, 1, 2, 2]   # sorted folder order
    x, y, i, ok = ds[2]
    assert x.shape == (36, 44, 3) and (y, i, ok) == (1, 2, 1)
    (tmp_path / "list.txt").write_text("f/n01/sub/0.png 1\nf/n10/sub/1.png\t0\n")
    lst = ImageListDataset(str(tmp_path / "list.txt"))
    assert lst.labels == [1, 0] and lst.paths[0] == str(tmp_path / "f" / "n01" / "sub" / "0.png")
    (tmp_path / "paths.txt").write_text("f/n01/sub/0.png\nf/n01/sub/1.png\n")
    (tmp_path / "labels.txt").write_text("3\n")
    with pytest.raises(ValueError, match="1 labels but .* 2 images"):
        ImageListDataset(str(tmp_path / "paths.txt"), str(tmp_path / "labels.txt"))
    ann = [{"image": "a.jpg", "caption": ["x", "y"], "image_id": "1"}, {"image": "b.jpg", "caption": "z"},
           {"image": "a.jpg", "caption": "w"}]
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    cd = CaptionDataset(str(tmp_path / "ann.json"))
    assert cd.captions == [["x", "y", "w"], ["z"]] and cd.text_to_image().tolist() == [0, 0, 0, 1]
    karpathy = {"images": [{"filename": "a.jpg", "filepath": "val", "split": "test", "sentences": [{"raw": "q"}]},
                           {"filename": "b.jpg", "filepath": "val", "split": "train", "sentences": [{"raw": "r"}]}]}
    (tmp_path / "k.json").write_text(json.dumps(karpathy))
    kd = CaptionDataset(str(tmp_path / "k.json"), image_root="/data")
    assert kd.paths == [os.path.join("/data", "val", "a.jpg")] and kd.captions == [["q"]]
    with pytest.raises(ValueError, match="entry 0 needs"):
        (tmp_path / "bad.json").write_text(json.dumps([{"img": "a"}]))
        CaptionDataset(str(tmp_path / "bad.json"))


def test_cli_classification_and_retrieval(tmp_path):
    """End to end with the tiny model: results JSON in CLIP-Benchmark's shape, a corrupt image counted."""
    from evaclip_paddle.eval.cli import build_parser, run

    root = tmp_path / "data"
    for c in ("n01", "n02", "n03"):
        for i in range(2):
            _img(str(root / c / f"{i}.jpg"), 10 * int(c[1:]) + i)
    (root / "n02" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    (tmp_path / "cn.json").write_text(json.dumps({"toy": ["apple", "banana", "cherry"]}))
    (tmp_path / "t.json").write_text(json.dumps({"toy": ["a photo of a {c}.", "a {c}."]}))
    args = build_parser().parse_args([
        "--model", "EVA02-CLIP-tiny", "--classification_eval", str(root), "--dataset", "toy",
        "--classnames", str(tmp_path / "cn.json"), "--templates", str(tmp_path / "t.json"),
        "--output_dir", str(tmp_path / "out"), "--dataloader_num_workers", "0", "--disable_tqdm",
        "--per_device_eval_batch_size", "4"])
    res = run(args)
    saved = json.loads(open(res["output_file"]).read())
    assert os.path.basename(res["output_file"]) == "toy_none_EVA02-CLIP-tiny_en_zeroshot_classification.json"
    assert {"dataset", "model", "pretrained", "task", "metrics"} <= set(saved)
    assert saved["task"] == "zeroshot_classification" and saved["dataset"] == "toy"
    assert set(saved["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert saved["num_images"] == 6 and saved["skipped_images"] == 1
    assert saved["skipped_files"][0]["path"].endswith("broken.jpg")
    assert os.listdir(tmp_path / "out" / "classifier_cache")

    ann = [{"image": f"{c}/{i}.jpg", "caption": [f"{c} {i} {j}" for j in range(5)], "image_id": f"{c}{i}"}
           for c in ("n01", "n03") for i in range(2)] + [{"image": "n02/broken.jpg", "caption": ["x"] * 5}]
    (root / "coco_karpathy_test.json").write_text(json.dumps(ann))
    args = build_parser().parse_args([
        "--model", "EVA02-CLIP-tiny", "--task", "zeroshot_retrieval", "--retrieval_eval",
        str(root / "coco_karpathy_test.json"), "--recall_k", "1", "5", "--output_dir", str(tmp_path / "out"),
        "--dataloader_num_workers", "0", "--disable_tqdm"])
    res = run(args)
    assert res["dataset"] == "mscoco_captions" and res["task"] == "zeroshot_retrieval"
    assert set(res["metrics"]) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5)}
    assert (res["num_images"], res["num_texts"], res["skipped_images"]) == (4, 20, 1)
    assert res["metrics"]["image_retrieval_recall@5"] == 1.0      # only 4 images: every caption hits at 5


def test_pretrained_text_model_loads_only_the_text_tower(tmp_path):
    from evaclip_paddle import create_model
    from evaclip_paddle.checkpoint_io import save_weights
    from evaclip_paddle.eval.cli import _load_text_tower

    a, b = create_model("EVA02-CLIP-tiny", seed=0), create_model("EVA02-CLIP-tiny", seed=1)
    save_weights({k: v for k, v in b.state_dict().items() if k.startswith("text.")}, str(tmp_path / "txt"))
    vis_before = a.visual.head.weight.numpy().copy()
    _load_text_tower(a, str(tmp_path / "txt"))
    np.testing.assert_array_equal(a.text.text_projection.numpy(), b.text.text_projection.numpy())
    np.testing.assert_array_equal(a.visual.head.weight.numpy(), vis_before)
    save_weights({"visual.head.weight": b.visual.head.weight}, str(tmp_path / "vis"))
    with pytest.raises(ValueError, match="no text-tower keys"):
        _load_text_tower(a, str(tmp_path / "vis"))


def test_paddlemix_eval_folder_layout(tmp_path):
    from evaclip_paddle.eval.cli import _paddlemix_layout

    assert _paddlemix_layout(str(tmp_path)) is None
    (tmp_path / "images").mkdir()
    (tmp_path / "labels.txt").write_text("tench\ngoldfish\n")
    (tmp_path / "templates.txt").write_text("a photo of a {}.\nitap of a {}.\n")
    images, names, templates = _paddlemix_layout(str(tmp_path))
    assert images == str(tmp_path / "images") and names == ["tench", "goldfish"]
    assert templates == ["a photo of a {c}.", "itap of a {c}."]
