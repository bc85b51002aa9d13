"""Checkpoint conversion: torch-free readers, layout tables in both directions, dtypes, sharding,
one-tower checkpoints, zoo detection, the CLI, and clear errors that leave no output behind."""
import json
import os
import subprocess
import sys
import weakref

import numpy as np
import paddle
import pytest

import evaclip_paddle as ec
from evaclip_paddle.checkpoint_io import CheckpointError, read_state_dict, save_weights
from evaclip_paddle.convert import cli, convert_checkpoint, load_state_dict, open_as_ours, open_checkpoint
from evaclip_paddle.convert import readers as R
from evaclip_paddle.convert.layouts import expected_shapes
from evaclip_paddle.convert.tensors import bf16_bits_to_f32, f32_to_bf16_bits

TINY = ["EVA02-CLIP-tiny", "EVA01-CLIP-tiny", "EVA-CLIP-rms-tiny", "EVA02-CLIP-postnorm-tiny"]


def _paddle_dir(tmp_path, name="EVA02-CLIP-tiny", seed=1):
    model = ec.create_model(name, seed=seed)
    d = str(tmp_path / f"{name}-paddle")
    save_weights(model, d, config=model.cfg.to_dict())
    return d, {k: v.numpy() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _leftovers(folder):
    return [f for f in os.listdir(folder) if ".tmp-" in f]


# ---------------------------------------------------------------------------------------------- layouts
def test_expected_shapes_match_every_zoo_model():
    for name in ec.list_models():
        model = ec.create_model(name, lazy=True)
        built = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert built == dict(expected_shapes(ec.get_model_config(name))), name


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("to,fmt", [("eva", "safetensors"), ("eva", "pt"), ("open_clip", "safetensors"),
                                    ("open_clip", "pt")])
def test_round_trip_is_bit_identical(tmp_path, name, to, fmt):
    src, ref = _paddle_dir(tmp_path, name)
    mid = str(tmp_path / f"mid.{fmt}")
    convert_checkpoint(src, mid, to=to)
    report = convert_checkpoint(mid, str(tmp_path / "back"), model=name)
    assert report.layout == to and not report.missing and not report.unexpected
    assert _same(load_state_dict(str(tmp_path / "back")), ref)


def test_torch_layouts_have_reference_key_names(tmp_path):
    src, ref = _paddle_dir(tmp_path, "EVA02-CLIP-tiny")
    convert_checkpoint(src, str(tmp_path / "eva.safetensors"), to="torch-eva")
    convert_checkpoint(src, str(tmp_path / "oc.safetensors"), to="open_clip")
    eva = R.read_state_dict_numpy(str(tmp_path / "eva.safetensors"))
    oc = R.read_state_dict_numpy(str(tmp_path / "oc.safetensors"))
    # EVA02 in the original code: split q/k/v, q_bias/v_bias, SwiGLU w1/w2/w3 + ffn_ln, saved RoPE tables
    for k in ("visual.blocks.1.attn.q_bias", "visual.blocks.1.attn.inner_attn_ln.weight", "visual.blocks.0.mlp.w3.bias",
              "visual.blocks.0.mlp.ffn_ln.weight", "visual.rope.freqs_cos", "visual.blocks.1.attn.rope.freqs_sin",
              "text.transformer.resblocks.1.attn.in_proj_weight", "text.ln_final.bias"):
        assert k in eva, k
    assert eva["visual.rope.freqs_cos"].shape == (16, 16)          # grid 4x4, head_width 16
    for k in ("visual.trunk.blocks.1.attn.q_proj.bias", "visual.trunk.blocks.0.attn.norm.weight",
              "visual.trunk.blocks.0.mlp.fc1_g.weight", "visual.trunk.blocks.0.mlp.fc2.weight",
              "visual.trunk.head.bias"):
        assert k in oc, k
    assert not any("rope" in k for k in oc)
    w = ref["text.blocks.0.attn.q_proj.weight"]
    assert np.array_equal(oc["text.transformer.resblocks.0.attn.in_proj_weight"][: w.shape[1]], w.T)
    assert np.array_equal(oc["visual.trunk.blocks.0.mlp.fc1_g.weight"], ref["visual.blocks.0.mlp.w1.weight"].T)


def _to_paddlemix(sd):
    """Our layout -> PaddleMIX's, by hand: vision unchanged; text blocks under transformer.resblocks with
    ln_1/ln_2, attn.{q,k,v,out}_proj, mlp.c_fc/c_proj (weights stay [in, out]); ln_final; logit_scale [1]."""
    out = {}
    for k, v in sd.items():
        if k.startswith("text.blocks."):
            _, _, i, rest = k.split(".", 3)
            for a, b in (("norm1.", "ln_1."), ("norm2.", "ln_2."), ("attn.proj.", "attn.out_proj."),
                         ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj.")):
                rest = rest.replace(a, b) if rest.startswith(a) else rest
            k = f"text.transformer.resblocks.{i}.{rest}"
        elif k.startswith("text.norm."):
            k = "text.ln_final." + k.rsplit(".", 1)[1]
        out[k] = v.reshape([1]) if k == "logit_scale" else v
    return out


def test_paddlemix_pdparams_with_config_hints(tmp_path):
    _, ref = _paddle_dir(tmp_path, "EVA02-CLIP-postnorm-tiny")
    d = tmp_path / "paddlemix"
    d.mkdir()
    paddle.save(_to_paddlemix(ref), str(d / "model_state.pdparams"))
    # PaddleMIX's config schema is not ours: it only serves as a hint (postnorm tells apart two tiny models)
    (d / "config.json").write_text(json.dumps({"vision_config": {"postnorm": True, "embed_dim": 64},
                                               "text_config": {"width": 64, "heads": 4, "layers": 2}}))
    report = convert_checkpoint(str(d), str(tmp_path / "ours"))
    assert report.layout == "paddlemix" and report.model == "EVA02-CLIP-postnorm-tiny"
    assert _same(load_state_dict(str(tmp_path / "ours")), ref)


# ---------------------------------------------------------------------------------------------- readers
def test_torch_zip_reader_dtypes_offsets_strides(tmp_path):
    torch = pytest.importorskip("torch")
    base = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    sd = {"view": base[:, 2:5], "transposed": base.t(), "row": base[3], "half": base.half()[1:],
          "bf16": base.bfloat16().t(), "int64": torch.arange(12).reshape(3, 4)[:, ::2], "scalar": torch.tensor(3.5),
          "empty": torch.zeros(0, 4), "mask": base > 0}
    path = str(tmp_path / "x.pt")
    torch.save({"model": sd, "epoch": 3, "args": {"lr": 1e-3}, "optimizer_name": "lamb"}, path)
    tensors = open_checkpoint(path).tensors
    assert list(tensors) == list(sd)
    for k, t in tensors.items():
        want = sd[k].float().numpy() if sd[k].dtype == torch.bfloat16 else sd[k].numpy()
        assert t.shape == tuple(sd[k].shape) and np.array_equal(t.values(), want), k
    assert tensors["bf16"].dtype == "bfloat16"
    bits = sd["bf16"].contiguous().view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(tensors["bf16"].storage(), bits)


def test_reader_never_runs_pickled_code(tmp_path):
    torch = pytest.importorskip("torch")

    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))
    path = str(tmp_path / "evil.pt")
    torch.save({"w": torch.ones(2), "payload": Boom()}, path)
    tensors = open_checkpoint(path).tensors
    assert list(tensors) == ["w"] and not (tmp_path / "pwned").exists()
    import pickle
    with open(tmp_path / "evil.pdparams", "wb") as f:          # same for the Paddle pickle reader
        pickle.dump({"w": np.ones(2, np.float32), "payload": Boom()}, f, protocol=4)
    tensors = open_checkpoint(str(tmp_path / "evil.pdparams")).tensors
    assert list(tensors) == ["w"] and not (tmp_path / "pwned").exists()


def test_bfloat16_rounding_matches_torch():
    torch = pytest.importorskip("torch")
    scale = 10.0 ** np.random.RandomState(1).randint(-30, 30, 4096)
    x = (np.random.RandomState(0).randn(4096) * scale).astype(np.float32)
    x[:4] = [np.inf, -0.0, 1e-40, 3.3895314e38]
    want = torch.from_numpy(x).bfloat16().view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(f32_to_bf16_bits(x), want)
    assert np.isnan(bf16_bits_to_f32(f32_to_bf16_bits(np.array([np.nan], np.float32))))[0]


def test_dtype_control(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file
    src, ref = _paddle_dir(tmp_path, "EVA01-CLIP-tiny")
    convert_checkpoint(src, str(tmp_path / "bf16"), dtype="bf16")
    got = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    for k, v in ref.items():
        assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], torch.from_numpy(v).bfloat16()), k
    # bf16 -> bf16 (keep) and through the torch layouts stays bit-exact
    convert_checkpoint(str(tmp_path / "bf16"), str(tmp_path / "oc.pt"), to="open_clip", dtype="keep")
    oc = torch.load(str(tmp_path / "oc.pt"), weights_only=True)
    assert oc["visual.trunk.blocks.0.attn.qkv.weight"].dtype == torch.bfloat16
    convert_checkpoint(str(tmp_path / "oc.pt"), str(tmp_path / "back"), dtype="keep", model="EVA01-CLIP-tiny")
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert all(torch.equal(back[k], got[k]) for k in got)
    # our loader widens bf16 for the fp32 model; fp16 output is plain numpy float16
    model = ec.create_model(pretrained=str(tmp_path / "back"))
    w = model.state_dict()["visual.head.weight"].numpy()
    assert np.array_equal(w, got["visual.head.weight"].float().numpy())
    convert_checkpoint(src, str(tmp_path / "fp16"), dtype="fp16")
    h = read_state_dict(str(tmp_path / "fp16"))
    assert h["visual.head.weight"].dtype == np.float16
    assert np.array_equal(h["visual.head.weight"], ref["visual.head.weight"].astype(np.float16))


def test_sharded_output_and_index(tmp_path):
    src, ref = _paddle_dir(tmp_path, "EVA02-CLIP-tiny")
    out = str(tmp_path / "sharded")
    report = convert_checkpoint(src, out, max_shard_size=4 * 2 ** 20)
    shards = [f for f in os.listdir(out) if f.startswith("model-")]
    assert len(shards) >= 3 and os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    assert any(f.endswith("index.json") for f in report.files)
    assert _same(read_state_dict(out), ref)
    model = ec.create_model(out)                  # config.json and the index picked from the directory
    assert np.array_equal(model.state_dict()["text.text_projection"].numpy(), ref["text.text_projection"])
    # torch layout, sharded, and back
    convert_checkpoint(out, str(tmp_path / "oc"), to="open_clip", max_shard_size=2 ** 20)
    convert_checkpoint(str(tmp_path / "oc"), str(tmp_path / "back"))
    assert _same(load_state_dict(str(tmp_path / "back")), ref)


def test_conversion_streams_one_step_at_a_time(tmp_path):
    """Each source tensor is read once, and no more than one step's tensors are alive at a time."""
    src, _ = _paddle_dir(tmp_path, "EVA01-CLIP-tiny")
    convert_checkpoint(src, str(tmp_path / "oc.safetensors"), to="open_clip")
    ck = open_checkpoint(str(tmp_path / "oc.safetensors"))
    alive, peak, reads = set(), [0], {}
    for key, t in ck.tensors.items():
        def load(inner=t._loader, key=key):
            arr = np.array(inner())
            reads[key] = reads.get(key, 0) + 1
            alive.add(id(arr))
            weakref.finalize(arr, alive.discard, id(arr))
            peak[0] = max(peak[0], len(alive))
            return arr
        t._loader = load
    view, cfg, _ = open_as_ours(ck, model="EVA01-CLIP-tiny")
    from evaclip_paddle.convert.converter import plan_output
    for e in plan_output(view, cfg, "paddle"):
        e.fetch()
    assert set(reads.values()) == {1} and peak[0] <= 2


# ---------------------------------------------------------------------------------------------- key variants
def test_wrappers_prefixes_and_top_level_text(tmp_path):
    torch = pytest.importorskip("torch")
    src, ref = _paddle_dir(tmp_path, "EVA01-CLIP-tiny")
    convert_checkpoint(src, str(tmp_path / "eva.safetensors"), to="eva")
    from safetensors.torch import load_file
    eva = load_file(str(tmp_path / "eva.safetensors"))
    # OpenAI-style top-level text keys, DDP `module.` prefix, `state_dict` wrapper, text.logit_scale
    flat = {}
    for k, v in eva.items():
        k = k[len("text."):] if k.startswith("text.") else k
        flat["module." + ("text.logit_scale" if k == "logit_scale" else k)] = v
    torch.save({"state_dict": flat, "step": 10}, str(tmp_path / "wrapped.pt"))
    report = convert_checkpoint(str(tmp_path / "wrapped.pt"), str(tmp_path / "out"), model="EVA01-CLIP-tiny")
    assert report.layout == "eva" and not report.unexpected and not report.missing
    assert _same(load_state_dict(str(tmp_path / "out")), ref)


def test_one_tower_checkpoint_loads_into_its_tower(tmp_path):
    src, ref = _paddle_dir(tmp_path, "EVA02-CLIP-tiny")
    convert_checkpoint(src, str(tmp_path / "oc.safetensors"), to="open_clip")
    full = R.read_state_dict_numpy(str(tmp_path / "oc.safetensors"))
    from safetensors.numpy import save_file
    save_file({k[len("visual.trunk."):]: v for k, v in full.items() if k.startswith("visual.")},
              str(tmp_path / "timm_vision.safetensors"))          # a bare timm trunk checkpoint
    view, cfg, report = open_as_ours(str(tmp_path / "timm_vision.safetensors"), model="EVA02-CLIP-tiny")
    assert report.layout == "open_clip" and not report.unexpected
    assert all(k.startswith(("text.", "logit_scale")) for k in report.missing)
    assert any("one-tower" in n for n in report.notes)
    with pytest.warns(UserWarning, match="missing keys"):
        model = ec.create_model("EVA02-CLIP-tiny", pretrained=str(tmp_path / "timm_vision.safetensors"))
    got = model.state_dict()
    assert all(np.array_equal(got[k].numpy(), ref[k]) for k in ref if k.startswith("visual."))
    assert not np.array_equal(got["text.text_projection"].numpy(), ref["text.text_projection"])


def test_zoo_detection(tmp_path):
    src, _ = _paddle_dir(tmp_path, "EVA02-CLIP-tiny")
    convert_checkpoint(src, str(tmp_path / "oc.pt"), to="open_clip")
    report = convert_checkpoint(str(tmp_path / "oc.pt"), str(tmp_path / "out"))
    assert report.model == "EVA02-CLIP-tiny" and any("detected" in n for n in report.notes)
    model = ec.create_model(pretrained=str(tmp_path / "oc.pt"))    # no name, no config: detected
    assert model.cfg.name == "EVA02-CLIP-tiny"
    # EVA01-CLIP-tiny and EVA02-CLIP-postnorm-tiny have identical shapes (postnorm is invisible)
    src, _ = _paddle_dir(tmp_path, "EVA01-CLIP-tiny")
    convert_checkpoint(src, str(tmp_path / "e01.safetensors"), to="eva")
    with pytest.raises(CheckpointError, match="EVA01-CLIP-tiny.*EVA02-CLIP-postnorm-tiny|--model"):
        convert_checkpoint(str(tmp_path / "e01.safetensors"), str(tmp_path / "out2"))
    assert not os.path.exists(tmp_path / "out2")
    # a model outside the zoo: the error says what the shapes show
    import dataclasses
    cfg = ec.get_model_config("EVA02-CLIP-tiny")
    cfg = dataclasses.replace(cfg, text_cfg=dataclasses.replace(cfg.text_cfg, layers=3))
    save_weights(ec.create_model(cfg), str(tmp_path / "custom"))        # weights only, no config.json
    with pytest.raises(CheckpointError, match=r"no model of the zoo.*width 64, depth 2, patch 8, image 32, "
                                              r"swiglu\+subln\+qkv_bias; text width 64, layers 3"):
        convert_checkpoint(str(tmp_path / "custom"), str(tmp_path / "out3"))
    report = convert_checkpoint(str(tmp_path / "custom"), str(tmp_path / "out3"), model=cfg)
    assert report.model == cfg.name and not report.missing


# ---------------------------------------------------------------------------------------------- errors
def test_corrupt_and_truncated_files_fail_cleanly(tmp_path):
    torch = pytest.importorskip("torch")
    src, _ = _paddle_dir(tmp_path, "EVA01-CLIP-tiny")
    convert_checkpoint(src, str(tmp_path / "ok.pt"), to="eva")
    convert_checkpoint(src, str(tmp_path / "ok.safetensors"), to="eva")
    raw = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
    flipped = bytearray(raw)
    i = raw.index(b"archive/data/1") + 200                   # inside a tensor's bytes
    flipped[i:i + 8] = b"\xff" * 8
    (tmp_path / "flipped.pt").write_bytes(bytes(flipped))
    st = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(st[: len(st) - 1000])
    (tmp_path / "notes.txt").write_text("these are not weights\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    cases = {"cut.pt": "truncated", "flipped.pt": "CRC mismatch", "cut.safetensors": "truncated",
             "notes.txt": "not a checkpoint", "empty.pt": "empty file"}
    for name, msg in cases.items():
        out = tmp_path / f"out-{name.replace('.', '-')}"
        with pytest.raises(CheckpointError, match=msg) as exc:
            convert_checkpoint(str(tmp_path / name), str(out), model="EVA01-CLIP-tiny")
        assert name in str(exc.value)
        assert not out.exists() and not _leftovers(tmp_path)
    with pytest.raises(CheckpointError, match="CRC mismatch in storage of key 'visual"):
        convert_checkpoint(str(tmp_path / "flipped.pt"), str(tmp_path / "o"), model="EVA01-CLIP-tiny")


def test_wrong_model_and_shape_mismatch(tmp_path):
    src, _ = _paddle_dir(tmp_path, "EVA01-CLIP-tiny")
    with pytest.raises(ValueError, match="unknown model 'EVA01-CLIP-tinny'.*did you mean EVA01-CLIP-tiny"):
        convert_checkpoint(src, str(tmp_path / "out"), model="EVA01-CLIP-tinny")
    cfg = json.loads((tmp_path / "EVA01-CLIP-tiny-paddle" / "config.json").read_text())
    cfg["vision_cfg"]["image_size"] = 48
    (tmp_path / "big.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"'visual.pos_embed'.*\[1, 17, 64\].*\[1, 37, 64\]"):
        convert_checkpoint(src, str(tmp_path / "out"), model=str(tmp_path / "big.json"))
    with pytest.raises(CheckpointError, match=r"shape mismatch for 'visual.pos_embed'"):
        ec.create_model(str(tmp_path / "big.json"), pretrained=src)
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    src, _ = _paddle_dir(tmp_path, "EVA01-CLIP-tiny")
    from evaclip_paddle.convert import writers
    real, calls = writers._fetch, []

    def flaky(e):
        calls.append(e.key)
        if len(calls) == 20:
            raise KeyboardInterrupt
        return real(e)
    monkeypatch.setattr(writers, "_fetch", flaky)
    for out in ("dir_out", "file_out.safetensors", "file_out.pt"):
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            convert_checkpoint(src, str(tmp_path / out), to="paddle" if out == "dir_out" else "open_clip")
        assert not (tmp_path / out).exists() and not _leftovers(tmp_path)
    # an existing output is not replaced without overwrite
    monkeypatch.setattr(writers, "_fetch", real)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        convert_checkpoint(src, str(tmp_path / "busy"))
    convert_checkpoint(src, str(tmp_path / "busy"), overwrite=True)
    assert {"keep.txt", "model.safetensors", "config.json"} <= set(os.listdir(tmp_path / "busy"))


# ---------------------------------------------------------------------------------------------- CLI
def test_cli(tmp_path, capsys):
    src, ref = _paddle_dir(tmp_path, "EVA02-CLIP-tiny")
    assert cli.main([src, str(tmp_path / "oc.pt"), "--to", "open_clip", "-q"]) == 0
    assert cli.main([str(tmp_path / "oc.pt"), str(tmp_path / "back"), "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "open_clip layout" in out and "EVA02-CLIP-tiny" in out
    assert _same(load_state_dict(str(tmp_path / "back")), ref)
    assert cli.main([src, str(tmp_path / "x"), "--model", "EVA02-CLIP-tinny"]) == 2
    assert "unknown model" in capsys.readouterr().err and not (tmp_path / "x").exists()
    (tmp_path / "notes.txt").write_text("hello")
    assert cli.main([str(tmp_path / "notes.txt"), str(tmp_path / "y")]) == 2
    assert "not a checkpoint" in capsys.readouterr().err and not (tmp_path / "y").exists()


def test_python_m_entry_point(tmp_path):
    src, ref = _paddle_dir(tmp_path, "EVA-CLIP-rms-tiny")
    r = subprocess.run([sys.executable, "-m", "evaclip_paddle.convert", src, str(tmp_path / "eva.safetensors"),
                        "--to", "torch-eva", "-q"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "text.transformer.resblocks.0.attn.in_proj_weight" in R.read_state_dict_numpy(
        str(tmp_path / "eva.safetensors"))
