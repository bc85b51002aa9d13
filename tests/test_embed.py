"""evaclip-embed: folder with bad files, resume after interruption, texts, settings mismatch."""
import json
import os

import numpy as np
import pytest
from PIL import Image

import evaclip_paddle as ec
from evaclip_paddle.export import embed as embed_mod
from evaclip_paddle.export import export_model
from evaclip_paddle.inference import EVACLIPPredictor

GOOD = ["a.png", "b.jpg", "sub/c.png", "sub/d.jpg", "sub/deeper/e.png"]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("embed_export"))
    export_model(ec.create_model("EVA02-CLIP-tiny", seed=1), out, verify=False)
    return out


@pytest.fixture(scope="module")
def predictor(export_dir):
    return EVACLIPPredictor(export_dir, threads=2)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.RandomState(0)
    for i, rel in enumerate(GOOD):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.randint(0, 256, (30 + 7 * i, 45 - 3 * i, 3), dtype=np.uint8)).save(p)
    full = root / "b.jpg"
    (root / "sub" / "corrupt.jpg").write_bytes(full.read_bytes()[: len(full.read_bytes()) // 3])  # truncated
    (root / "notes.txt").write_text("not an image\n")
    (root / ".hidden.png").write_bytes(b"ignored: hidden files are skipped")
    return str(root)


def _read(out):
    emb = np.load(os.path.join(out, "embeddings.npy"))
    ids = [json.loads(s) for s in open(os.path.join(out, "ids.jsonl"))]
    errs = [json.loads(s) for s in open(os.path.join(out, "errors.jsonl"))]
    return emb, ids, errs


def test_folder_with_bad_files(export_dir, predictor, image_dir, tmp_path, capsys):
    out = str(tmp_path / "run")
    rc = embed_mod.main(["--export", export_dir, "--images", image_dir, "--out", out, "--batch-size", "2",
                         "--chunk-size", "4", "--workers", "2", "--threads", "2", "--no-progress"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["complete"] and summary["rows"] == 5 and summary["errors"] == 2
    emb, ids, errs = _read(out)
    assert [d["id"] for d in ids] == sorted(GOOD) and [d["row"] for d in ids] == list(range(5))
    assert sorted(e["id"] for e in errs) == ["notes.txt", "sub/corrupt.jpg"]
    assert all(e["error"] for e in errs)
    ref = predictor.embed_images([Image.open(os.path.join(image_dir, d["id"])) for d in ids])
    np.testing.assert_allclose(emb, ref, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert not os.path.exists(os.path.join(out, "chunks"))  # cleaned once the final files exist


class _Counting:
    """The real predictor, counting encoder calls, optionally failing after `fail_after` calls."""

    def __init__(self, inner, fail_after=None):
        self.inner, self.calls, self.fail_after = inner, 0, fail_after

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode_image(self, x, normalize=True):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("injected failure")
        self.calls += 1
        return self.inner.encode_image(x, normalize)


def test_interrupted_run_resumes(export_dir, predictor, image_dir, tmp_path):
    kw = dict(images=image_dir, batch_size=1, chunk_size=1, workers=2, progress=False)
    full = str(tmp_path / "full")
    embed_mod.run(export_dir, full, predictor=predictor, **kw)
    ref = _read(full)

    # Sorted inputs: a.png b.jpg notes.txt sub/c.png sub/corrupt.jpg sub/d.jpg sub/deeper/e.png (one per chunk).
    # 1) --max-batches 2: a, b embedded, notes.txt recorded as an error (no batch), then stop; exit code 3.
    out = str(tmp_path / "resume")
    rc = embed_mod.main(["--export", export_dir, "--images", image_dir, "--out", out, "--batch-size", "1",
                         "--chunk-size", "1", "--max-batches", "2", "--no-progress", "--threads", "2"])
    assert rc == 3
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert sorted(manifest["chunks"]) == ["0", "1", "2"] and not manifest["complete"]
    assert not os.path.exists(os.path.join(out, "embeddings.npy"))

    # 2) an exception on the second batch of the next run: c.png and corrupt.jpg stay committed.
    failing = _Counting(predictor, fail_after=1)
    with pytest.raises(RuntimeError, match="injected"):
        embed_mod.run(export_dir, out, predictor=failing, **kw)
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert sorted(manifest["chunks"]) == ["0", "1", "2", "3", "4"]

    # 3) the rerun computes only d.jpg and e.png.
    counting = _Counting(predictor)
    summary = embed_mod.run(export_dir, out, predictor=counting, **kw)
    assert summary["complete"] and summary["chunks_done_before"] == 5 and summary["chunks_computed"] == 2
    assert counting.calls == 2
    got = _read(out)
    assert got[1] == ref[1] and got[2] == ref[2]
    np.testing.assert_allclose(got[0], ref[0], atol=1e-6)

    # 4) a finished run is not recomputed; different settings are refused.
    again = _Counting(predictor)
    assert embed_mod.run(export_dir, out, predictor=again, **kw)["complete"] and again.calls == 0
    with pytest.raises(embed_mod.ResumeError, match="chunk_size"):
        embed_mod.run(export_dir, out, predictor=predictor, **{**kw, "chunk_size": 2})
    summary = embed_mod.run(export_dir, out, predictor=predictor, restart=True, **{**kw, "chunk_size": 3})
    assert summary["complete"] and summary["chunks_done_before"] == 0 and summary["rows"] == 5


def test_texts(export_dir, predictor, tmp_path, capsys):
    texts = ["a photo of a dog", "a diagram", "", "une tour eiffel", "x" * 500]
    src = tmp_path / "texts.txt"
    src.write_text("\n".join(texts) + "\n", encoding="utf-8")
    out = str(tmp_path / "texts_out")
    assert embed_mod.main(["--export", export_dir, "--texts", str(src), "--out", out, "--batch-size", "2",
                           "--chunk-size", "3", "--no-progress", "--threads", "2", "--kernels", "native"]) == 0
    emb, ids, errs = _read(out)
    assert errs == [] and [d["id"] for d in ids] == list(range(5)) and [d["text"] for d in ids] == texts
    # the portable program (--kernels native) against the fixture's default pick (the CPU-kernel
    # program where the op library has it)
    np.testing.assert_allclose(emb, predictor.embed_texts(texts), atol=1e-5)


def test_list_file_and_errors(export_dir, image_dir, tmp_path, capsys):
    lst = tmp_path / "list.txt"
    lst.write_text(f"{os.path.join(image_dir, 'a.png')}\n\n{os.path.join(image_dir, 'missing.png')}\n")
    out = str(tmp_path / "list_out")
    assert embed_mod.main(["--export", export_dir, "--images", str(lst), "--out", out, "--no-progress",
                           "--threads", "2"]) == 0
    emb, ids, errs = _read(out)
    assert emb.shape == (1, 64) and len(errs) == 1 and "missing.png" in errs[0]["id"]
    assert "FileNotFoundError" in errs[0]["error"]
    assert embed_mod.main(["--export", export_dir, "--images", str(tmp_path / "nope"), "--out", out]) == 2
    assert "no such folder or list file" in capsys.readouterr().err
