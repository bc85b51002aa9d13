"""Export to Paddle Inference: parity with dygraph, metadata, preprocessing spec, CLI."""
import json
import os

import numpy as np
import paddle
import pytest
from PIL import Image

import evaclip_paddle as ec
from evaclip_paddle.data.transforms import image_transform
from evaclip_paddle.export import export as export_mod
from evaclip_paddle.export import export_model, read_spec, transform_from_spec
from evaclip_paddle.export.predictor import EncoderPredictor, ExportError, cpu_bf16_supported
from evaclip_paddle.inference import EVACLIPPredictor

MODELS = ["EVA02-CLIP-tiny", "EVA01-CLIP-tiny"]


def _model(name):
    m = ec.create_model(name, seed=0)
    # The 0.001 head init makes image features ~1e-4; rescale so a 1e-4 tolerance means something.
    w = m.visual.head.weight
    w.set_value(paddle.randn(w.shape) * w.shape[0] ** -0.5)
    m.eval()
    return m


@pytest.fixture(scope="module", params=MODELS)
def exported(request, tmp_path_factory):
    m = _model(request.param)
    out = str(tmp_path_factory.mktemp("export") / request.param)
    meta = export_model(m, out, model_name=request.param, verify=False)
    return request.param, m, out, meta


CPU_KERNELS = export_mod.cpu_kernels_available()


@pytest.mark.parametrize("kernels", ["auto", "native"])
@pytest.mark.parametrize("batch", [1, 7])
def test_inference_matches_dygraph(exported, batch, kernels):
    """Both programs of a tower: the portable one and, where the op library has the MKL kernels
    (CI builds it), the CPU fp32 one that 'auto' picks on CPU."""
    name, m, out, _ = exported
    pred = EVACLIPPredictor(out, threads=2, kernels=kernels)
    cfg = m.cfg
    rng = np.random.RandomState(batch)
    img = rng.randn(batch, 3, cfg.vision_cfg.image_size, cfg.vision_cfg.image_size).astype("float32")
    ids = np.asarray(ec.get_tokenizer()([f"photo number {i} of a {'dog' * (i + 1)}" for i in range(batch)]))
    with paddle.no_grad():
        ref_i = m.encode_image(paddle.to_tensor(img)).numpy()
        ref_t = m.encode_text(paddle.to_tensor(ids)).numpy()
    got_i = pred.encode_image(img, normalize=False)
    got_t = pred.encode_text(ids, normalize=False)
    assert got_i.shape == (batch, cfg.embed_dim) and got_t.shape == (batch, cfg.embed_dim)
    assert np.abs(ref_i).max() > 0.1 and np.abs(ref_t).max() > 0.1  # not vacuously small
    np.testing.assert_allclose(got_i, ref_i, atol=1e-4, rtol=0)
    np.testing.assert_allclose(got_t, ref_t, atol=1e-4, rtol=0)
    want = "cpu_kernels" if kernels == "auto" and CPU_KERNELS else "portable"
    assert pred.tower("image").program == pred.tower("text").program == want
    n = pred.encode_image(img)  # normalised by default
    np.testing.assert_allclose(np.linalg.norm(n, axis=1), 1.0, atol=1e-5)


def test_export_metadata(exported):
    name, m, out, meta = exported
    with open(os.path.join(out, "export.json")) as f:
        disk = json.load(f)
    assert disk == json.loads(json.dumps(meta))
    assert disk["model"] == name and disk["embed_dim"] == m.cfg.embed_dim
    for t in disk["towers"].values():
        assert t["custom_ops"] == []  # the portable programs are plain Paddle
    if CPU_KERNELS:
        assert {"evaclip_linear_fwd", "evaclip_attention_fwd"} <= set(disk["custom_ops"]["names"])
        for tower, t in disk["towers"].items():
            v = t["cpu_kernels"]
            assert v["model_file"] == f"{tower}/cpu/model.json" and "evaclip_linear_fwd" in v["custom_ops"]
            assert v["params_file"] == t["params_file"]  # identical parameters are stored once
            assert not os.path.exists(os.path.join(out, tower, "cpu", "model.pdiparams"))
        # tracing the variant switched the model's kernel flags on; they are back as they were
        assert not any(getattr(x, "fused", False) for x in m.sublayers())
        from evaclip_paddle.ops import fused_act
        assert not fused_act._STATIC_TRACE["on"]
    else:
        assert disk["custom_ops"] is None and not any("cpu_kernels" in t for t in disk["towers"].values())
    assert disk["towers"]["image"]["input"] == {"name": "image", "shape": [-1, 3, 32, 32], "dtype": "float32"}
    assert disk["towers"]["text"]["input"] == {"name": "text", "shape": [-1, 77], "dtype": "int64"}
    for t in disk["towers"].values():
        assert all(os.path.isfile(os.path.join(out, t[k])) for k in ("model_file", "params_file"))
    # Traced with the oneDNN-friendly rewrites (parity above covers them): EVA02's image tower has
    # two, EVA01's none, and every text tower's masked attention one; the model code is left as it was.
    want = ["rope_batch_broadcast", "silu_as_swish"] if m.cfg.vision_cfg.rope else []
    assert disk["rewrites"] == {"image": want, "text": ["sdpa_masked_explicit"]}
    import paddle.nn.functional as F
    from evaclip_paddle.model import rope, transformer
    assert transformer.apply_rope is rope.apply_rope and F.silu.__module__.startswith("paddle")
    assert F.scaled_dot_product_attention.__module__.startswith("paddle")
    spec = read_spec(out)
    assert spec["text"]["context_length"] == 77
    assert os.path.isfile(os.path.join(out, spec["text"]["vocab_file"]))


def _images():
    rng = np.random.RandomState(0)
    arr = lambda h, w, c=3: rng.randint(0, 256, (h, w, c) if c > 1 else (h, w), dtype=np.uint8)  # noqa: E731
    return [Image.fromarray(arr(50, 80)), Image.fromarray(arr(91, 33)), Image.fromarray(arr(20, 25)),
            Image.fromarray(arr(40, 40, 4), "RGBA"), Image.fromarray(arr(45, 70, 1)).convert("P"),
            Image.fromarray(arr(64, 48, 1))]


@pytest.mark.parametrize("size", [32, 224])
def test_preprocess_json_reproduces_val_transform(tmp_path, size):
    from evaclip_paddle.export.preprocess import build_spec, write_spec

    cfg = ec.get_model_config("EVA02-CLIP-tiny").replace(image_size=size, patch_size=8)
    write_spec(build_spec(cfg), str(tmp_path))
    with open(tmp_path / "preprocess.json") as f:
        raw = json.load(f)
    assert raw["image"]["size"] == [size, size] and raw["image"]["interpolation"] == "bicubic"
    assert raw["image"]["resize_mode"] == "shortest" and len(raw["image"]["mean"]) == 3
    ours, ref = transform_from_spec(read_spec(str(tmp_path))["image"]), image_transform(size, is_train=False)
    for im in _images():
        a, b = ours(im), ref(im)
        assert a.shape == (3, size, size) and a.dtype == np.float32
        assert np.array_equal(a, b)


def test_cli_export_bf16_verified(tmp_path, capsys):
    out = str(tmp_path / "cli")
    assert export_mod.main(["--model", "EVA02-CLIP-tiny", "--out", out, "--tower", "image", "--precision", "bf16",
                            "--threads", "2", "--cpu-kernels", "on" if CPU_KERNELS else "off"]) == 0
    meta = json.loads(open(os.path.join(out, "export.json")).read())
    assert meta["precision"] == "bf16" and list(meta["towers"]) == ["image"]
    assert meta["verify"]["image"]["max_rel_err"] < 1e-4
    assert ("cpu_kernels" in meta["towers"]["image"]) == CPU_KERNELS
    if CPU_KERNELS:  # both programs verified against dygraph
        assert meta["verify"]["image"]["cpu_kernels_max_rel_err"] < 1e-4
    assert "text" not in read_spec(out)
    pred = EVACLIPPredictor(out, threads=2)  # bf16 recorded as the default run precision
    assert pred.precision == "bf16"
    x = np.random.RandomState(0).randn(4, 3, 32, 32).astype("float32")
    lo = pred.encode_image(x)
    assert pred.tower("image").precision_used == ("bf16" if cpu_bf16_supported() else "fp32")
    hi = EVACLIPPredictor(out, threads=2, precision="fp32").encode_image(x)
    assert np.min(np.sum(lo * hi, axis=1)) > 0.99  # bf16 (oneDNN) agrees with fp32 in direction
    with pytest.raises(ExportError, match="no 'text' tower"):
        pred.encode_text(np.zeros((1, 77), np.int64))


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="evaclip-export"):
        EVACLIPPredictor(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="model file not found"):
        EncoderPredictor(str(tmp_path / "x.json"), str(tmp_path / "x.pdiparams"))
    m = ec.create_model("EVA02-CLIP-tiny")
    with pytest.raises(ValueError, match="towers"):
        export_model(m, str(tmp_path / "o"), towers=["audio"])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "export.json").write_text("{not json")
    with pytest.raises(ExportError, match="not valid JSON"):
        EVACLIPPredictor(str(tmp_path / "bad"))


def test_cpu_bf16_detection(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor: 0\nflags\t\t: fpu sse avx512f amx_bf16 amx_tile\n")
    assert cpu_bf16_supported(str(f))
    f.write_text("processor: 0\nflags\t\t: fpu sse avx2\n")
    assert not cpu_bf16_supported(str(f))
    assert not cpu_bf16_supported(str(tmp_path / "missing"))


def test_custom_op_detection_and_lookup(tmp_path, monkeypatch):
    from evaclip_paddle.export.export import _custom_ops
    from evaclip_paddle.export import predictor as pmod
    from evaclip_paddle.export.predictor import _find_op_library

    monkeypatch.setattr(pmod, "_package_op_library", lambda load: None)  # isolate from a built op
    prog = tmp_path / "model.json"
    prog.write_text('{"ops":[{"#":"1.matmul"},{"#":"3.evaclip_layer_norm","A":[]},{"#":"0.t_f32"}]}')
    assert _custom_ops(str(prog)) == ["evaclip_layer_norm"]
    monkeypatch.delenv("EVACLIP_OP_LIBRARY", raising=False)
    ops = {"names": ["evaclip_layer_norm"], "library": "ops/lib.so"}
    lib = tmp_path / "ops" / "lib.so"
    lib.parent.mkdir()
    lib.write_bytes(b"")
    assert _find_op_library(ops, str(tmp_path), str(lib)) == str(lib)
    monkeypatch.setenv("EVACLIP_OP_LIBRARY", str(lib))
    assert _find_op_library(ops, str(tmp_path), None) == str(lib)
    monkeypatch.delenv("EVACLIP_OP_LIBRARY")
    lib.unlink()
    with pytest.raises(ExportError, match="evaclip_layer_norm.*no op library was found"):
        _find_op_library(ops, str(tmp_path), None)
    loaded = tmp_path / "loaded.so"
    loaded.write_bytes(b"")
    monkeypatch.setattr(pmod, "_package_op_library", lambda load: str(loaded))
    # What the process already loaded wins: an op name must never be registered twice.
    assert _find_op_library(ops, str(tmp_path), str(tmp_path / "other.so")) == str(loaded)


def test_fused_norm_model_exports(tmp_path):
    """With the fused-norm op built, the exported program uses it, the library travels with the
    export and a fresh process registers it; without it the model falls back to native norms and
    the export needs no custom op. Both must match dygraph."""
    import subprocess
    import sys

    from evaclip_paddle.ops import fused_norm

    m = _model("EVA02-CLIP-tiny")
    m2 = ec.create_model("EVA02-CLIP-tiny", fused_ln=True)
    m2.set_state_dict(m.state_dict())
    m2.eval()
    out = str(tmp_path / "fused")
    meta = export_model(m2, out, verify=False)
    x = np.random.RandomState(0).randn(3, 3, 32, 32).astype("float32")
    with paddle.no_grad():
        ref = m2.encode_image(paddle.to_tensor(x)).numpy()
    if not fused_norm.fused_ops_available():
        assert meta["custom_ops"] is None
        np.testing.assert_allclose(EVACLIPPredictor(out, threads=2).encode_image(x, normalize=False), ref, atol=1e-4)
        return
    assert meta["custom_ops"]["names"] and os.path.isfile(os.path.join(out, meta["custom_ops"]["library"]))
    np.save(tmp_path / "x.npy", x)
    code = ("import sys, numpy as np; from evaclip_paddle.inference import EVACLIPPredictor; "
            f"p = EVACLIPPredictor(sys.argv[1], threads=2); np.save(sys.argv[3], p.encode_image(np.load(sys.argv[2]), "
            "normalize=False))")
    env = {k: v for k, v in os.environ.items() if k != "EVACLIP_JIT_OPS"}
    subprocess.run([sys.executable, "-c", code, out, str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                   check=True, env=env, timeout=300)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), ref, atol=1e-4)


@pytest.mark.skipif(not CPU_KERNELS, reason="needs the fused_ln op library with its MKL kernels (CI builds it)")
def test_cpu_kernel_program(exported, tmp_path):
    """The CPU variant runs its linears, attention, RoPE and norms as our kernels (no native
    softmax, norm or activation is left in it); kernels='cpu' fails clearly where it cannot be used."""
    import collections
    import re

    name, m, out, meta = exported
    for tower in ("image", "text"):
        with open(os.path.join(out, meta["towers"][tower]["cpu_kernels"]["model_file"])) as f:
            ops = collections.Counter(re.findall(r'"#":"[0-9]+\.([A-Za-z0-9_]+)"', f.read()))
        n_blocks = (m.cfg.vision_cfg if tower == "image" else m.cfg.text_cfg).layers
        assert ops["evaclip_attention_fwd"] == n_blocks
        assert ops["evaclip_linear_fwd"] >= 4 * n_blocks
        assert not {"softmax", "layer_norm", "gelu", "silu", "swish"} & set(ops), ops
        assert ops["matmul"] <= 1  # the output projection (one small GEMM) may stay native
    from evaclip_paddle.ops import fused_norm
    try:  # the kernels (libgomp) follow the predictor's thread count, not OMP_NUM_THREADS
        EVACLIPPredictor(out, threads=3).tower("image")
        assert fused_norm.get_num_threads() == 3
    finally:
        fused_norm.set_num_threads(0)
    pred = EVACLIPPredictor(out, threads=2, kernels="cpu")
    assert pred.tower("image").program == "cpu_kernels"
    plain = str(tmp_path / "plain")
    export_model(m, plain, towers=["image"], verify=False, cpu_kernels=False)
    assert "cpu_kernels" not in json.load(open(os.path.join(plain, "export.json")))["towers"]["image"]
    with pytest.raises(ExportError, match="no CPU-kernel 'image' program"):
        EVACLIPPredictor(plain, kernels="cpu").tower("image")
    with pytest.raises(ValueError, match="kernels must be one of"):
        EVACLIPPredictor(plain, kernels="fast")
    # A CPU-kernel program that does not load (here: damaged) falls back to the portable one under
    # 'auto', with a warning; 'cpu' reports the failure.
    import shutil
    broken = str(tmp_path / "broken")
    shutil.copytree(out, broken)
    with open(os.path.join(broken, "image", "cpu", "model.json"), "w") as f:
        f.write('{"base_code": {"magic": "pir"}, "program": 7}')
    with pytest.warns(UserWarning, match="CPU-kernel program did not load"):
        fallback = EVACLIPPredictor(broken, threads=2)
        assert fallback.tower("image").program == "portable"
    x = np.random.RandomState(0).randn(2, 3, 32, 32).astype("float32")
    np.testing.assert_allclose(fallback.encode_image(x), pred.encode_image(x), atol=1e-5)
    with pytest.raises(Exception):
        EVACLIPPredictor(broken, kernels="cpu").tower("image")
    # Re-exporting without the variant removes the old one.
    export_model(m, out + "_again", towers=["image"], verify=False)
    assert os.path.isdir(os.path.join(out + "_again", "image", "cpu"))
    export_model(m, out + "_again", towers=["image"], verify=False, cpu_kernels=False)
    assert not os.path.exists(os.path.join(out + "_again", "image", "cpu"))
