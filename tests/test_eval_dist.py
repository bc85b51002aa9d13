"""2 ranks (paddle.distributed.launch, CPU gloo) give the same zero-shot results as 1 rank.

Run as a script it is the per-rank worker: `python -m paddle.distributed.launch --nproc_per_node 2
tests/test_eval_dist.py DATA_DIR OUT_DIR`.
"""
import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
CLASSES = ["red thing", "green thing", "blue thing"]
TEMPLATES = ["a photo of a {c}.", "a {c}.", "art of the {c}."]


def make_data(root):
    """3 class folders with 3/3/2 images plus one corrupt file: 9 items, so 2 ranks get 5 and 4 (1 pad)."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for c, n in zip(("c0", "c1", "c2"), (3, 3, 2)):
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (30 + i, 40, 3), dtype=np.uint8)).save(
                os.path.join(root, c, f"{i}.png"))
    with open(os.path.join(root, "c1", "9_corrupt.png"), "wb") as f:
        f.write(b"\x89PNG broken")
    ann = [{"image": f"c{c}/{i}.png", "caption": [f"image {c} {i} caption {j}" for j in range(5)]}
           for c, n in enumerate((3, 3, 2)) for i in range(n)]
    ann.insert(4, {"image": "c1/9_corrupt.png", "caption": ["lost"] * 5})
    with open(os.path.join(root, "captions.json"), "w") as f:
        json.dump(ann, f)


def evaluate(data_dir, out_dir):
    """Everything the comparison needs, computed on however many ranks this process belongs to."""
    import paddle
    from evaclip_paddle import create_model, get_tokenizer
    from evaclip_paddle.eval import dist, zeroshot as zs
    from evaclip_paddle.eval.data import ImageFolderDataset

    dist.maybe_init_parallel_env()
    world, rank = dist.world_and_rank()
    model = create_model("EVA02-CLIP-tiny", seed=0)
    model.eval()
    tok = get_tokenizer("EVA02-CLIP-tiny")
    cache = os.path.join(out_dir, "cache")
    m1 = zs.evaluate_zeroshot_classification(model, tok, data_dir, CLASSES, TEMPLATES, batch_size=2, cache_dir=cache)
    m2 = zs.evaluate_zeroshot_classification(model, tok, data_dir, CLASSES, TEMPLATES, batch_size=3, cache_dir=cache)
    clf = zs.build_zero_shot_classifier(model, tok, CLASSES, TEMPLATES, 4, split_across_ranks=True).numpy()
    ds = ImageFolderDataset(data_dir, zs._default_transform(model))
    feats, labels, status = zs.encode_images(model, ds, batch_size=2)
    alone = zs.encode_images(model, ds, batch_size=4, group=dist.LOCAL)[0]   # no splitting: every rank all
    np.testing.assert_allclose(alone, feats, atol=1e-5)
    ret = zs.evaluate_zeroshot_retrieval(model, tok, os.path.join(data_dir, "captions.json"), recall_k=(1, 2, 5),
                                         batch_size=2, text_batch_size=7)
    if rank == 0:
        np.savez(os.path.join(out_dir, f"world{world}.npz"), feats=feats, labels=labels, status=status, clf=clf)
        with open(os.path.join(out_dir, f"world{world}.json"), "w") as f:
            json.dump({"cls": m1, "cls_cached": m2, "ret": ret, "world": world}, f)
    if world > 1:
        paddle.distributed.barrier()


def test_two_ranks_match_one(tmp_path):
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    make_data(data)
    os.makedirs(out)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PADDLE_TRAINERS_NUM", None)
    proc = subprocess.run([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2",
                           "--log_dir", str(tmp_path / "log"), __file__, data, out],
                          env=env, capture_output=True, text=True, timeout=240)
    logs = "".join(open(os.path.join(tmp_path, "log", f)).read()[-20000:] for f in sorted(os.listdir(tmp_path / "log"))
                   if f.startswith("workerlog"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + logs
    # rank 1 read the corrupt file; rank 0 reports it with rank 1's reason
    assert "skipped unreadable image" in logs and "9_corrupt.png (UnidentifiedImageError" in logs

    evaluate(data, out)                     # this process: one rank
    one, two = (json.load(open(os.path.join(out, f"world{w}.json"))) for w in (1, 2))
    assert (one["world"], two["world"]) == (1, 2)
    for key in ("cls", "cls_cached", "ret"):
        assert one[key] == two[key], key
    assert one["cls"]["num_images"] == 8 and one["cls"]["skipped_images"] == 1
    assert (one["ret"]["num_images"], one["ret"]["num_texts"]) == (8, 40)
    a, b = (np.load(os.path.join(out, f"world{w}.npz")) for w in (1, 2))
    np.testing.assert_array_equal(a["status"], b["status"])
    np.testing.assert_array_equal(a["labels"], b["labels"])
    assert a["labels"].tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2] and a["status"].tolist()[6] == 2   # corrupt: FAILED
    np.testing.assert_allclose(a["feats"], b["feats"], atol=1e-5)
    np.testing.assert_allclose(a["clf"], b["clf"], atol=1e-6)
    assert len(os.listdir(os.path.join(out, "cache"))) == 1


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(HERE))
    evaluate(sys.argv[1], sys.argv[2])
