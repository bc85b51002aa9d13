"""Image transforms against open_clip's torchvision pipelines on real photos."""
import math

import numpy as np
import pytest
from PIL import Image

import open_clip
import torch
import torchvision.transforms.functional as TF
from skimage import data as skdata
from sklearn.datasets import load_sample_images

from evaclip_paddle.data.transforms import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, TrainTransform, ValTransform,
                                            image_transform, to_tensor_batch)

# Measured on this project's machine (Pillow 13.0.0, torchvision 0.28.0): max abs diff 0.0 on every
# image, size and mode below -- the pipelines perform the same PIL and float32 operations.
TOL = 1e-6


def _photos():
    rgb = {name: getattr(skdata, name)() for name in ("astronaut", "chelsea", "coffee", "rocket")}
    images = {name: Image.fromarray(arr) for name, arr in rgb.items()}
    images["camera_L"] = Image.fromarray(skdata.camera())  # grayscale 512x512
    horse = skdata.horse()  # bool 328x400
    assert horse.dtype == np.bool_
    images["horse_1bit"] = Image.fromarray(horse)  # PIL mode '1'
    images["horse_L"] = Image.fromarray(horse.astype(np.uint8) * 255)
    images["page_L_small"] = Image.fromarray(skdata.page())  # 191x384: upscaled
    images["logo_RGBA"] = Image.fromarray(skdata.logo())
    images["chelsea_P"] = images["chelsea"].quantize(64)
    for i, arr in enumerate(load_sample_images().images):  # china pagoda, flower
        images[f"sklearn_{i}"] = Image.fromarray(arr)
    rng = np.random.default_rng(0)
    images["tiny_7x3"] = Image.fromarray(rng.integers(0, 256, (3, 7, 3), dtype=np.uint8))
    images["strip_20x400"] = Image.fromarray(rng.integers(0, 256, (400, 20, 3), dtype=np.uint8))
    return images


PHOTOS = _photos()


@pytest.fixture(scope="module")
def model_preprocess():
    _, _, preprocess = open_clip.create_model_and_transforms("EVA02-B-16", pretrained=None)
    return preprocess


def _max_diff(ours, ref_tensor):
    ref = ref_tensor.numpy()
    assert ours.shape == ref.shape and ours.dtype == np.float32
    return float(np.max(np.abs(ours - ref)))


def test_reference_pipeline_is_the_models_preprocess(model_preprocess):
    same = open_clip.image_transform(224, is_train=False, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
    assert repr(model_preprocess) == repr(same)
    assert "Resize(size=224, interpolation=bicubic" in repr(model_preprocess)


def test_val_matches_eva02_preprocess_224(model_preprocess):
    ours = image_transform(224, is_train=False)
    worst = 0.0
    for name, img in PHOTOS.items():
        worst = max(worst, _max_diff(ours(img), model_preprocess(img)))
        assert worst <= TOL, name
    assert worst <= TOL


@pytest.mark.parametrize("size", [224, 336])
def test_val_matches_open_clip_image_transform(size):
    ref = open_clip.image_transform(size, is_train=False)
    ours = image_transform(size, is_train=False)
    for name, img in PHOTOS.items():
        out = ours(img)
        assert out.shape == (3, size, size)
        assert _max_diff(out, ref(img)) <= TOL, name


@pytest.mark.parametrize("kwargs", [
    dict(image_size=(224, 288)),
    dict(image_size=224, resize_mode="longest"),
    dict(image_size=(256, 192), resize_mode="longest", fill_color=128),
    dict(image_size=(200, 240), resize_mode="squash"),
    dict(image_size=224, interpolation="bilinear"),
    dict(image_size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
])
def test_val_other_modes_match_open_clip(kwargs):
    ref = open_clip.image_transform(is_train=False, **kwargs)
    ours = image_transform(is_train=False, **kwargs)
    for name in ("chelsea", "rocket", "camera_L", "logo_RGBA", "chelsea_P", "strip_20x400", "tiny_7x3"):
        img = PHOTOS[name]
        assert _max_diff(ours(img), ref(img)) <= TOL, (name, kwargs)


def test_val_geometry_rules():
    # chelsea is 451x300: shorter side -> 224, longer side int(224*451/300) = 336, crop left
    # round((336-224)/2) = 56; at 336 the long side is 505 and the crop left round(84.5) = 84
    t = ValTransform(224)
    crop = t.resize_and_crop(PHOTOS["chelsea"])
    assert crop.size == (224, 224) and crop.mode == "RGB"
    resized = PHOTOS["chelsea"].resize((336, 224), Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(crop), np.asarray(resized.crop((56, 0, 280, 224))))
    resized = PHOTOS["chelsea"].resize((505, 336), Image.Resampling.BICUBIC)
    crop = ValTransform(336).resize_and_crop(PHOTOS["chelsea"])
    assert np.array_equal(np.asarray(crop), np.asarray(resized.crop((84, 0, 420, 336))))
    # mode conversion happens after resizing, like open_clip: the 1-bit image stays 1-bit here
    assert ValTransform(224).resize_and_crop(PHOTOS["horse_1bit"]).mode == "1"


def test_val_accepts_arrays_and_checks_inputs():
    t = image_transform(224, is_train=False)
    arr = skdata.astronaut()
    np.testing.assert_array_equal(t(arr), t(Image.fromarray(arr)))
    for bad in (0, -5, (224, 0), (1, 2, 3), ()):
        with pytest.raises(ValueError):
            image_transform(bad, is_train=False)
    for bad in ("224", 224.0, True, (224, "a"), None):
        with pytest.raises(TypeError):
            image_transform(bad, is_train=True)
    with pytest.raises(ValueError):
        image_transform(224, is_train=False, interpolation="nearest")
    with pytest.raises(ValueError):
        image_transform(224, is_train=False, resize_mode="fit")
    with pytest.raises(ValueError):
        image_transform(224, is_train=False, mean=(0.5, 0.5))
    with pytest.raises(ValueError):
        image_transform(224, is_train=False, std=(0.5, 0.0, 0.5))
    with pytest.raises(TypeError):
        t("not an image")
    with pytest.raises(ValueError):
        t(np.zeros((4, 4, 2), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------
# training transform
# ---------------------------------------------------------------------------------------------

def _value_range():
    mean = np.asarray(OPENAI_CLIP_MEAN, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(OPENAI_CLIP_STD, dtype=np.float32).reshape(3, 1, 1)
    return (0 - mean) / std, (1 - mean) / std


@pytest.mark.parametrize("size", [224, 336])
def test_train_shape_range_and_determinism(size):
    lo, hi = _value_range()
    a = image_transform(size, is_train=True, seed=7)
    b = image_transform(size, is_train=True, seed=7)
    c = image_transform(size, is_train=True, seed=8)
    outs_a, outs_b, outs_c = [], [], []
    for name in ("astronaut", "chelsea", "rocket", "camera_L", "horse_1bit", "sklearn_1"):
        img = PHOTOS[name]
        for _ in range(2):
            x = a(img)
            outs_a.append(x)
            outs_b.append(b(img))
            outs_c.append(c(img))
            assert x.shape == (3, size, size) and x.dtype == np.float32
            assert np.all(x >= lo - 1e-6) and np.all(x <= hi + 1e-6)
    for x, y in zip(outs_a, outs_b):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(outs_a, outs_c))
    # an explicit generator overrides the transform's own one
    g1, g2 = np.random.default_rng(3), np.random.default_rng(3)
    np.testing.assert_array_equal(a(PHOTOS["coffee"], rng=g1), c(PHOTOS["coffee"], rng=g2))


def test_train_crop_matches_torchvision_given_the_same_params():
    t = TrainTransform(224, seed=0)
    mean = torch.tensor(OPENAI_CLIP_MEAN)
    std = torch.tensor(OPENAI_CLIP_STD)
    for name in ("astronaut", "coffee", "camera_L", "logo_RGBA", "sklearn_0"):
        img = PHOTOS[name]
        for _ in range(3):
            top, left, h, w = t.crop_params(img.width, img.height)
            ours = _to_array(t.crop_and_resize(img, (top, left, h, w)), t)
            ref = TF.resized_crop(img, top, left, h, w, [224, 224], TF.InterpolationMode.BICUBIC)
            ref = TF.normalize(TF.to_tensor(ref.convert("RGB")), mean, std)
            assert _max_diff(ours, ref) <= TOL, name


def _to_array(pil_img, t):
    from evaclip_paddle.data.transforms import _to_normalized_array

    return _to_normalized_array(pil_img, t.mean, t.std)


def test_train_crop_statistics_and_fallback():
    t = TrainTransform(224, seed=1)
    W, H = 512, 512
    fracs, ratios = [], []
    for _ in range(2000):
        top, left, h, w = t.crop_params(W, H)
        assert 0 <= top <= H - h and 0 <= left <= W - w
        fracs.append(h * w / (W * H))
        ratios.append(w / h)
    fracs, ratios = np.array(fracs), np.array(ratios)
    assert fracs.min() > 0.88 and fracs.max() <= 1.0
    # with >= 90% of a square image, w/h can only vary within about [0.9, 1.11]
    assert ratios.min() > 0.88 and ratios.max() < 1.13
    assert ratios.max() / ratios.min() > 1.15  # the aspect ratio really varies
    assert len(set(zip(fracs.round(4), ratios.round(4)))) > 500
    # on a 640x427 photo no 90% crop fits the ratio range: every call is the central fallback,
    # width round(427 * 4/3) = 569, as in torchvision
    assert {t.crop_params(640, 427) for _ in range(50)} == {(0, 35, 427, 569)}
    # no random crop fits a 1000x10 strip: torchvision's central fallback
    strip = Image.new("RGB", (1000, 10))
    assert t.crop_params(1000, 10) == tuple(torch_params(strip))
    assert t(strip).shape == (3, 224, 224)


def torch_params(img):
    import torchvision.transforms as T

    return T.RandomResizedCrop.get_params(img, scale=[0.9, 1.0], ratio=[3 / 4, 4 / 3])


def test_train_checks_arguments():
    with pytest.raises(ValueError):
        TrainTransform(224, scale=(1.0, 0.5))
    with pytest.raises(ValueError):
        TrainTransform(224, ratio=(0.0, 1.0))
    with pytest.raises(ValueError):
        TrainTransform(0)


def test_to_tensor_batch():
    import paddle

    t = image_transform(224, is_train=False)
    arrays = [t(PHOTOS[n]) for n in ("astronaut", "camera_L", "sklearn_0")]
    batch = to_tensor_batch(arrays)
    assert isinstance(batch, paddle.Tensor)
    assert list(batch.shape) == [3, 3, 224, 224] and batch.dtype == paddle.float32
    np.testing.assert_array_equal(batch.numpy(), np.stack(arrays))
    with pytest.raises(ValueError):
        to_tensor_batch([])
    with pytest.raises(ValueError):
        to_tensor_batch([arrays[0], arrays[0][:, :100]])
    with pytest.raises(ValueError):
        to_tensor_batch([np.zeros((224, 224), np.float32)])
    assert not math.isnan(float(batch.numpy().sum()))
