"""Parity with open_clip/timm (PyTorch): one random state dict, saved by torch.save, converted by our
torch-free reader, gives the same image and text features in Paddle; and our reverse output loads
into open_clip with strict=True.

Measured on the project machine (fp32, CPU): EVA02-B-16 image 5.7e-06 / text 4.3e-06 max abs difference
on features of magnitude ~4; tiny EVA01 / EVA02 / postnorm+RMSNorm towers stay below 2e-06.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")
skdata = pytest.importorskip("skimage.data")

import paddle  # noqa: E402

import evaclip_paddle as ec  # noqa: E402
from evaclip_paddle.checkpoint_io import read_state_dict  # noqa: E402
from evaclip_paddle.convert import convert_checkpoint  # noqa: E402

TOL = 1e-4
CAPTIONS = ["a photo of an astronaut", "a cat lying on a rug", "a cup of coffee on a saucer",
            "a rocket on the launch pad at night", "a", "two horses grazing in a field, black and white photo"]


def _photos():
    from PIL import Image
    return [Image.fromarray(f()).convert("RGB") for f in (skdata.astronaut, skdata.chelsea, skdata.coffee,
                                                          skdata.rocket)]


def _perturb(module, seed):
    """Random init leaves biases at zero and the head at 1e-3 scale: move every tensor off its init so
    that a wrong mapping (a swapped bias, a missed transpose) changes the features."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("logit_scale"):
                continue
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
            if name.endswith("head.weight"):
                p.normal_(0, 0.05, generator=g)


def _paddle_features(model_dir, images, ids):
    model = ec.create_model(pretrained=model_dir)
    model.eval()
    with paddle.no_grad():
        fi = model.encode_image(paddle.to_tensor(images)).numpy()
        ft = model.encode_text(paddle.to_tensor(ids)).numpy()
    return model, fi, ft


# ---------------------------------------------------------------------------------------------- EVA02-B-16
@pytest.fixture(scope="module")
def eva02_b16(tmp_path_factory):
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("EVA02-B-16", pretrained=None)
    model.eval()
    _perturb(model, 1)
    tmp = tmp_path_factory.mktemp("eva02_b16")
    ckpt = str(tmp / "open_clip_eva02_b16.pt")
    torch.save(model.state_dict(), ckpt)
    images = torch.stack([preprocess(im) for im in _photos()])
    ids = open_clip.tokenize(CAPTIONS)
    with torch.no_grad():
        fi, ft = model.encode_image(images).numpy(), model.encode_text(ids).numpy()
    out = str(tmp / "paddle")
    report = convert_checkpoint(ckpt, out)          # torch-free reader; model detected from keys and shapes
    return dict(model=model, ckpt=ckpt, tmp=tmp, images=images.numpy(), ids=ids.numpy(), fi=fi, ft=ft,
                paddle_dir=out, report=report)


def test_eva02_b16_features_match_open_clip(eva02_b16):
    d = eva02_b16
    report = d["report"]
    assert report.layout == "open_clip" and report.model == "EVA02-CLIP-B-16"
    assert not report.missing and not report.unexpected
    model, fi, ft = _paddle_features(d["paddle_dir"], d["images"], d["ids"])
    di, dt = np.abs(fi - d["fi"]).max(), np.abs(ft - d["ft"]).max()
    # measured: image 5.7e-06, text 4.3e-06 (features up to ~4.7 in magnitude)
    assert di < TOL and dt < TOL, f"EVA02-B-16 max abs diff: image {di:.2e}, text {dt:.2e}"
    assert float(model.logit_scale) == pytest.approx(float(d["model"].logit_scale), abs=0)


def _open_clip_to_original_eva(sd):
    """The inverse of timm's EVA checkpoint filter, written out by hand (independent of our tables):
    `visual.trunk.` -> `visual.`; `attn.norm` -> `attn.inner_attn_ln`; SwiGLU `mlp.fc1_g/fc1_x/norm/fc2`
    -> `mlp.w1/w2/ffn_ln/w3`; split-attention biases `attn.q_proj.bias/v_proj.bias` -> `attn.q_bias/v_bias`;
    plus the RoPE tables the EVA code saves (top level and in every attention, [196, 64] for B-16).
    Text keys are shared. Wrapped like a DeepSpeed/DDP checkpoint: {'module': {'module.' + key: tensor}}."""
    out = {}
    for k, v in sd.items():
        if k.startswith("visual.trunk."):
            k = "visual." + k[len("visual.trunk."):]
            for a, b in ((".attn.norm.", ".attn.inner_attn_ln."), (".mlp.fc1_g.", ".mlp.w1."),
                         (".mlp.fc1_x.", ".mlp.w2."), (".mlp.norm.", ".mlp.ffn_ln."), (".mlp.fc2.", ".mlp.w3."),
                         (".attn.q_proj.bias", ".attn.q_bias"), (".attn.v_proj.bias", ".attn.v_bias")):
                k = k.replace(a, b)
        out[k] = v
    for name in ("freqs_cos", "freqs_sin"):
        out[f"visual.rope.{name}"] = torch.randn(196, 64)
        for i in range(12):
            out[f"visual.blocks.{i}.attn.rope.{name}"] = out[f"visual.rope.{name}"]
    return {"module": {"module." + k: v for k, v in out.items()}, "epoch": 1}


def test_original_eva_layout_converts_to_same_weights(eva02_b16):
    d = eva02_b16
    eva_ckpt = str(d["tmp"] / "eva_original.pt")
    torch.save(_open_clip_to_original_eva(d["model"].state_dict()), eva_ckpt)
    out = str(d["tmp"] / "from_eva")
    report = convert_checkpoint(eva_ckpt, out)
    assert report.layout == "eva" and report.model == "EVA02-CLIP-B-16" and not report.unexpected
    assert len(report.ignored) == 26                       # RoPE tables: recomputed, never read
    a, b = read_state_dict(d["paddle_dir"]), read_state_dict(out)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # and back to the original layout: same keys and tensors (RoPE tables recomputed, not copied)
    back = str(d["tmp"] / "eva_back.safetensors")
    convert_checkpoint(out, back, to="torch-eva")
    from safetensors.torch import load_file
    got = load_file(back)
    want = {k[len("module."):]: v for k, v in _open_clip_to_original_eva(d["model"].state_dict())["module"].items()}
    assert got.keys() == want.keys()
    for k, v in want.items():
        if ".rope." in k:
            assert got[k].shape == v.shape
        else:
            assert torch.equal(got[k], v), k


def _wipe(model):
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()


def test_reverse_output_loads_strict_into_open_clip(eva02_b16):
    d = eva02_b16
    model = d["model"]                      # runs last on the fixture: its weights are wiped and reloaded
    back = str(d["tmp"] / "open_clip_back.pt")
    convert_checkpoint(d["paddle_dir"], back, to="open_clip")     # a torch zip written without torch
    _wipe(model)
    model.load_state_dict(torch.load(back, weights_only=True), strict=True)
    with torch.no_grad():
        fi = model.encode_image(torch.from_numpy(d["images"])).numpy()
        ft = model.encode_text(torch.from_numpy(d["ids"])).numpy()
    # identical weights (transposes are exact), so identical features
    assert np.array_equal(fi, d["fi"]) and np.array_equal(ft, d["ft"])
    # and the safetensors flavour through open_clip's own loader
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    st = str(d["tmp"] / "open_clip_back.safetensors")
    convert_checkpoint(d["paddle_dir"], st, to="open_clip")
    _wipe(model)
    open_clip.load_checkpoint(model, st, strict=True)
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------- small variants
def _timm_trunk(name):
    from timm.layers import RmsNorm
    from timm.models.eva import Eva
    common = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=64, global_pool="token")
    if name == "EVA01-CLIP-tiny":          # fused qkv + q/v bias, no RoPE (EVA01, bigE style)
        return Eva(**common, mlp_ratio=4.0, qkv_fused=True, qkv_bias=True)
    if name == "EVA-CLIP-rms-tiny":        # residual post-norm + RMSNorm, no q/v bias, no head bias (18B style)
        trunk = Eva(**common, mlp_ratio=4.0, qkv_fused=True, qkv_bias=False, use_post_norm=True, norm_layer=RmsNorm)
        trunk.head = torch.nn.Linear(64, 64, bias=False)
        return trunk
    if name == "EVA02-CLIP-tiny":          # RoPE + SwiGLU + sub-LN, split q/k/v (EVA02 style)
        return Eva(**common, mlp_ratio=2.6667, qkv_fused=False, swiglu_mlp=True, scale_mlp=True,
                   scale_attn_inner=True, use_rot_pos_emb=True, ref_feat_shape=(16, 16))
    raise KeyError(name)


@pytest.mark.parametrize("name", ["EVA01-CLIP-tiny", "EVA-CLIP-rms-tiny", "EVA02-CLIP-tiny"])
def test_small_variants_match_timm_and_open_clip_towers(tmp_path, name):
    torch.manual_seed(0)
    trunk = _timm_trunk(name).eval()
    text = open_clip.model._build_text_tower(64, dict(context_length=77, vocab_size=49408, width=64, heads=4,
                                                      layers=2)).eval()
    _perturb(trunk, 2)
    _perturb(text, 3)
    sd = {"visual.trunk." + k: v for k, v in trunk.state_dict().items()}
    sd.update({"text." + k: v for k, v in text.state_dict().items()})
    sd["logit_scale"] = torch.tensor(2.5)
    ckpt = str(tmp_path / "ckpt.pt")
    torch.save(sd, ckpt)
    out = str(tmp_path / "paddle")
    report = convert_checkpoint(ckpt, out, model=name)
    assert not report.missing and not report.unexpected, report.summary()

    preprocess = open_clip.image_transform(32, is_train=False)
    images = torch.stack([preprocess(im) for im in _photos()])
    ids = open_clip.tokenize(CAPTIONS)
    with torch.no_grad():
        ti, tt = trunk(images).numpy(), text(ids).numpy()
    _, fi, ft = _paddle_features(out, images.numpy(), ids.numpy())
    di, dt = np.abs(fi - ti).max(), np.abs(ft - tt).max()
    assert di < TOL and dt < TOL, f"{name} max abs diff: image {di:.2e}, text {dt:.2e}"

    # reverse: strict load into fresh timm / open_clip towers reproduces the weights exactly
    back = str(tmp_path / "back.safetensors")
    convert_checkpoint(out, back, to="open_clip")
    from safetensors.torch import load_file
    got = load_file(back)
    assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)
    trunk2 = _timm_trunk(name)
    trunk2.load_state_dict({k[len("visual.trunk."):]: v for k, v in got.items() if k.startswith("visual.")},
                           strict=True)
