"""Zero-shot logits equal open_clip's on real photos, with one random EVA02-B-16 state dict on both sides.

open_clip side: `open_clip.build_zero_shot_classifier` + its preprocess + encode_image. Our side: the
converter (open_clip layout -> ours), our tokenizer, transform, classifier and image encoder. 10 ImageNet
classes x 5 OpenAI templates keep the text side short; the full-size towers run once per side.
"""
import os
from collections import OrderedDict

import numpy as np
import open_clip  # the PyTorch peer is part of the test environment: a missing one is an error, not a skip
import torch

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def test_zero_shot_logits_match_open_clip(tmp_path):
    import skimage.data
    from PIL import Image

    from evaclip_paddle.checkpoint_io import load_state_dict_into
    from evaclip_paddle.convert import open_as_ours
    from evaclip_paddle.convert.readers import Checkpoint
    from evaclip_paddle.convert.tensors import from_array
    from evaclip_paddle.eval import zeroshot as zs
    from evaclip_paddle.eval.data import ImageListDataset, load_classnames, load_templates
    from evaclip_paddle.factory import get_model_config, get_tokenizer
    from evaclip_paddle.model.clip import EVACLIP

    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    ref_model, _, preprocess = open_clip.create_model_and_transforms("EVA02-B-16", pretrained=None)
    ref_model.eval()

    # Convert through the library's converter (in memory, no file), into a model built without init.
    sd = OrderedDict((k, v.detach().numpy()) for k, v in ref_model.state_dict().items())
    ck = Checkpoint("open_clip EVA02-B-16 (memory)", OrderedDict((k, from_array(v, k)) for k, v in sd.items()),
                    "memory")
    view, cfg, report = open_as_ours(ck, model="EVA02-CLIP-B-16")
    assert report.layout == "open_clip" and not report.missing and not report.unexpected, report.summary()
    ours = EVACLIP(get_model_config("EVA02-CLIP-B-16"))
    # logit_scale plays no part in zero-shot logits (always 100 * cosine)
    missing, unexpected = load_state_dict_into(ours, {k: view[k] for k in view if k != "logit_scale"})
    assert missing == ["logit_scale"] and not unexpected
    ours.eval()
    del view, sd

    # Class names and templates from our bundled data files = open_clip's metadata.
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
    names, templates = load_classnames()[:10], load_templates()[:5]
    assert names == list(IMAGENET_CLASSNAMES[:10])
    assert templates == [t("{c}") for t in OPENAI_IMAGENET_TEMPLATES[:5]]

    for n in PHOTOS:
        Image.fromarray(getattr(skimage.data, n)()).save(tmp_path / f"{n}.png")
    (tmp_path / "list.txt").write_text("".join(f"{n}.png {i}\n" for i, n in enumerate(PHOTOS)))

    with torch.no_grad():
        ref_w = open_clip.build_zero_shot_classifier(ref_model, open_clip.get_tokenizer("EVA02-B-16"), names,
                                                     OPENAI_IMAGENET_TEMPLATES[:5], num_classes_per_batch=10)
        x = torch.stack([preprocess(Image.open(tmp_path / f"{n}.png")) for n in PHOTOS])
        ref_f = torch.nn.functional.normalize(ref_model.encode_image(x), dim=-1)
        ref_logits = (100.0 * ref_f @ ref_w).numpy()
    del ref_model

    w = zs.build_zero_shot_classifier(ours, get_tokenizer("EVA02-CLIP-B-16"), names, templates, 50)
    ds = ImageListDataset(str(tmp_path / "list.txt"), transform=zs._default_transform(ours))
    feats, labels, status = zs.encode_images(ours, ds, batch_size=4)
    logits = 100.0 * feats @ w.numpy()

    assert (status == 1).all() and labels.tolist() == [0, 1, 2, 3]
    np.testing.assert_allclose(w.numpy(), ref_w.numpy(), atol=1e-6)
    assert ref_logits.std(axis=0).min() > 0.5           # the photos give different logits: a real comparison
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=0)
