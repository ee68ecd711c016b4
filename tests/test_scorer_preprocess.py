"""scorers._preprocess against the official preprocessing of each learned scorer, without models.

PIL / uint8 inputs (:func:`pil_pixel_values`) must give the official transform's pixels:

* CLIP_224 (OpenAI CLIP ``clip/clip.py::_transform`` @ d05afc43; ImageReward
  ``ImageReward/ImageReward.py::_transform`` @ c1392c6d; the aesthetic predictor's ``clip.load``;
  open_clip ``image_transform(..., is_train=False)``): torchvision on the PIL image;
* HF_CLIP_224 (PickScore, yuvalkirstain/PickScore @ f79607ff, with transformers 4.27.3's
  ``CLIPImageProcessor``): transformers 5's PIL backend ``CLIPImageProcessorPil``, which keeps that
  arithmetic (alpha images aside, see below);
* HPS_224 (tgxs002/HPSv2 @ 866735ec, ``hpsv2/src/open_clip/transform.py``): ``ToTensor``,
  ``ResizeMaxSize`` on the float tensor, ``Normalize`` — re-stated below with torchvision.

Float inputs (:func:`preprocess`) resize in torch and are documented, not exact: their distance to
the official pixels is bounded here.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from scorers import _preprocess as P

# Tolerance of the PIL path against the official transforms: it makes the same PIL calls in the same
# order and the same float32 operations afterwards (v/255 — or v·(1/255) in float64 then float32 for
# transformers, identical for all 256 levels — then (v − mean)/std), so it is bit-identical here.
# One float32 ulp at the largest normalised magnitude (|x| ≤ (1 − 0.408)/0.276 = 2.15 < 4, ulp
# 2**-21 ≈ 4.8e-7) leaves room for a platform that fuses subtract/divide differently; it is ~30000x
# below one 8-bit level in normalised units (1/255/0.276 ≈ 0.014), which a wrong filter, crop offset,
# conversion order or resize path moves at least some pixels by.
PIL_ATOL = 2.0**-21

# Sizes chosen to exercise every branch: identity (224²), downscale of square / landscape /
# portrait images, crop offsets that are .5 (torchvision rounds half to even, transformers floors:
# 517×381 → 303×224, offset 39.5), an upscale (97×150), and white noise (bicubic overshoot).
SIZES = [(224, 224), (256, 256), (300, 500), (517, 381), (97, 150)]


def _images():
    g = np.random.default_rng(7)
    out = []
    for h, w in SIZES:
        out.append((f"noise{h}x{w}", Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8))))
        coarse = torch.from_numpy(g.random((1, 3, max(2, h // 16), max(2, w // 16))))
        sm = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)
        arr = (sm[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        out.append((f"smooth{h}x{w}", Image.fromarray(arr)))
    return out


IMAGES = _images()
IDS = [n for n, _ in IMAGES]
OTHER_MODES = {  # converted to RGB after the resize by torchvision pipelines, before it by transformers
    "RGBA": Image.fromarray(np.random.default_rng(8).integers(0, 256, (120, 90, 4), dtype=np.uint8), "RGBA"),
    "L": Image.fromarray(np.random.default_rng(9).integers(0, 256, (90, 130), dtype=np.uint8), "L"),
}


def openai_clip_transform(n: int = 224):
    """openai/CLIP clip/clip.py::_transform (@ d05afc43), built from torchvision."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    return Compose([Resize(n, interpolation=InterpolationMode.BICUBIC), CenterCrop(n), lambda im: im.convert("RGB"),
                    ToTensor(), Normalize(P.OPENAI_CLIP_MEAN, P.OPENAI_CLIP_STD)])


def hf_processor():
    """The PIL backend of transformers' CLIPImageProcessor with laion/CLIP-ViT-H-14's published config."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3)


def hps_transform(im: Image.Image) -> torch.Tensor:
    """tgxs002/HPSv2 @ 866735ec hpsv2/src/open_clip/transform.py, ``image_transform(224, is_train=False,
    resize_longest_max=True)``: ToTensor, ResizeMaxSize(224) (F.resize with torchvision's default
    antialias, F.pad [left, top, right, bottom] with 0), Normalize — re-stated with torchvision."""
    import torchvision.transforms.functional as TF

    t = TF.to_tensor(im.convert("RGB"))
    h, w = t.shape[1:]
    scale = 224 / float(max(h, w))
    if scale != 1.0:
        nh, nw = round(h * scale), round(w * scale)
        t = TF.resize(t, [nh, nw], TF.InterpolationMode.BICUBIC)
        ph, pw = 224 - nh, 224 - nw
        t = TF.pad(t, [pw // 2, ph // 2, pw - pw // 2, ph - ph // 2], fill=0)
    return TF.normalize(t, P.OPENAI_CLIP_MEAN, P.OPENAI_CLIP_STD)


# ------------------------------------------------------------------------------------------------
# PIL / uint8 path: equal to the official transforms


@pytest.mark.parametrize("name,im", IMAGES + list(OTHER_MODES.items()), ids=IDS + list(OTHER_MODES))
def test_clip_pil_path_is_the_openai_clip_and_open_clip_transform(name, im):
    import open_clip

    got = P.pil_pixel_values(im, P.CLIP_224)[0]
    torch.testing.assert_close(got, openai_clip_transform()(im), rtol=0, atol=PIL_ATOL)
    torch.testing.assert_close(got, open_clip.image_transform(224, is_train=False)(im), rtol=0, atol=PIL_ATOL)


@pytest.mark.parametrize("name,im", IMAGES + [("L", OTHER_MODES["L"])], ids=IDS + ["L"])
def test_hf_pil_path_is_the_clip_image_processor(name, im):
    want = hf_processor()(im, return_tensors="pt").pixel_values[0]
    torch.testing.assert_close(P.pil_pixel_values(im, P.HF_CLIP_224)[0], want, rtol=0, atol=PIL_ATOL)


def test_hf_pil_path_converts_alpha_as_transformers_4_27():
    """transformers 4.27.3 (PickScore's pin) converts with ``im.convert("RGB")`` (alpha dropped);
    transformers 5 composites alpha onto white. We follow the pinned version."""
    im = OTHER_MODES["RGBA"]
    want = hf_processor()(im.convert("RGB"), return_tensors="pt").pixel_values[0]
    torch.testing.assert_close(P.pil_pixel_values(im, P.HF_CLIP_224)[0], want, rtol=0, atol=PIL_ATOL)


@pytest.mark.parametrize("name,im", IMAGES + [("L", OTHER_MODES["L"])], ids=IDS + ["L"])
def test_hps_pil_path_is_the_hpsv2_transform(name, im):
    torch.testing.assert_close(P.pil_pixel_values(im, P.HPS_224)[0], hps_transform(im), rtol=0, atol=PIL_ATOL)


@pytest.mark.parametrize("spec", [P.CLIP_224, P.HF_CLIP_224, P.HPS_224], ids=["clip", "hf", "hps"])
def test_uint8_tensor_and_mixed_size_batches(spec):
    """A uint8 tensor [B, 3, H, W] is the 8-bit image it holds; a list may mix sizes; dtype casts at the end."""
    pil = [im for _, im in IMAGES[:4]]
    batch = P.pil_pixel_values(pil, spec)
    assert batch.shape == (4, 3, 224, 224) and batch.dtype == torch.float32
    for i, im in enumerate(pil):
        u8 = torch.from_numpy(np.array(im)).permute(2, 0, 1)[None]
        torch.testing.assert_close(P.pil_pixel_values(u8, spec), batch[i : i + 1], rtol=0, atol=0)
        torch.testing.assert_close(P.pil_pixel_values(u8[0], spec), batch[i : i + 1], rtol=0, atol=0)
    assert P.pil_pixel_values(pil[:1], spec, dtype=torch.float64).dtype == torch.float64


def test_input_classification_and_errors():
    im = IMAGES[0][1]
    assert P.is_pil_or_uint8(im) and P.is_pil_or_uint8([im, im]) and P.is_pil_or_uint8((im,))
    assert P.is_pil_or_uint8(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))
    assert not P.is_pil_or_uint8(torch.zeros(1, 3, 4, 4))
    assert not P.is_pil_or_uint8([]) and not P.is_pil_or_uint8([im, "x"]) and not P.is_pil_or_uint8(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        P.pil_pixel_values(torch.zeros(1, 4, 8, 8, dtype=torch.uint8))
    with pytest.raises(TypeError, match="expected a PIL image"):
        P.pil_pixel_values([im, "x"])
    with pytest.raises(ValueError, match="empty"):
        P.pil_pixel_values([])


def test_pil_pipeline_resolution():
    assert P.CLIP_224.pil_pipeline_name == "torchvision"
    assert P.HF_CLIP_224.pil_pipeline_name == "transformers"
    assert P.HPS_224.pil_pipeline_name == "tensor"
    assert P.PreprocessSpec(pil_pipeline="tensor").pil_pipeline_name == "tensor"
    with pytest.raises(ValueError, match="pil_pipeline must be one of"):
        P.PreprocessSpec(pil_pipeline="pil")
    with pytest.raises(ValueError, match="needs mode 'shortest_crop'"):
        P.PreprocessSpec(mode="longest_pad", pil_pipeline="torchvision")


# ------------------------------------------------------------------------------------------------
# float path: documented distance to the official pixels


def _denorm(x: torch.Tensor) -> torch.Tensor:
    m = torch.tensor(P.OPENAI_CLIP_MEAN, dtype=x.dtype).view(-1, 3, 1, 1)
    s = torch.tensor(P.OPENAI_CLIP_STD, dtype=x.dtype).view(-1, 3, 1, 1)
    return x * s + m


@pytest.mark.parametrize("spec", [P.CLIP_224, P.HF_CLIP_224], ids=["clip", "hf"])
def test_float_path_distance_to_the_official_pil_pipeline(spec):
    """The float path (torch resize in float64 here) on the same 8-bit pixels vs the official pixels:
    stated ≤ 1.5/255 max and ≤ 0.4/255 mean per pixel (measured 1.09/255 and 0.26/255; it is PIL's
    rounding to uint8 after each 1-D pass). Without the per-pass clamp of ``resize_shorter_side``
    the white-noise images would miss by up to 21/255."""
    worst, means = 0.0, []
    for _, im in IMAGES:
        x = torch.from_numpy(np.asarray(im, dtype=np.float64) / 255).permute(2, 0, 1)[None]
        ours = _denorm(P.preprocess(x, spec))
        ref = _denorm(P.pil_pixel_values(im, spec).double())
        d = (ours - ref).abs() * 255
        worst = max(worst, float(d.max()))
        means.append(float(d.mean()))
    assert worst <= 1.5 and float(np.mean(means)) <= 0.4, (worst, np.mean(means))


def test_hps_float_path_is_the_official_path():
    """HPS resizes the float tensor itself, so the float path on 8-bit pixels is the official transform
    (float32, same torch interpolate): equal to PIL_ATOL."""
    for _, im in IMAGES:
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / np.float32(255)).permute(2, 0, 1)[None]
        torch.testing.assert_close(P.preprocess(x.contiguous(), P.HPS_224)[0], hps_transform(im), rtol=0, atol=PIL_ATOL)


# ------------------------------------------------------------------------------------------------
# scorers.base: which input reaches score_batch


class _Recorder:
    """Scorer mixin recording what score_batch receives; score = one number per image."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.seen = []

    def score_batch(self, images, prompts, **metadata):
        self.seen.append((images, list(prompts), metadata, torch.is_grad_enabled()))
        return torch.arange(len(images), dtype=torch.float32) + 10 * len(self.seen)


def _recorders():
    from scorers.base import Scorer

    class Plain(_Recorder, Scorer):
        name = "plain"

    class Official(_Recorder, Scorer):
        name = "official"
        pil_input = True

    return Plain, Official


def test_scorer_base_gives_pil_and_uint8_input_to_pil_input_scorers_as_they_are():
    """``pil_input`` scorers get PIL lists (mixed sizes/modes, the same objects) and uint8 tensors in
    chunks of ``batch_size``, metadata chunked alongside, under no_grad even when differentiable;
    float tensors still arrive as float32 chunks (the unchanged float path)."""
    _, Official = _recorders()
    s = Official(batch_size=2, differentiable=True)
    pil = [im for _, im in IMAGES[:3]] + [OTHER_MODES["RGBA"]]
    out = s(pil, list("abcd"), step=3, idx=[0, 1, 2, 3])
    assert out.shape == (4,) and not out.requires_grad
    assert [len(c[0]) for c in s.seen] == [2, 2] and all(a is b for a, b in zip(s.seen[0][0] + s.seen[1][0], pil))
    assert [c[1] for c in s.seen] == [["a", "b"], ["c", "d"]]
    assert [c[2] for c in s.seen] == [{"step": 3, "idx": [0, 1]}, {"step": 3, "idx": [2, 3]}]
    assert not any(c[3] for c in s.seen)  # 8-bit input: nothing to differentiate
    s.seen.clear()
    u8 = torch.randint(0, 256, (3, 3, 5, 7), dtype=torch.uint8)
    s(u8, list("abc"))
    assert [c[0].dtype for c in s.seen] == [torch.uint8] * 2 and torch.equal(torch.cat([c[0] for c in s.seen]), u8)
    s.seen.clear()
    x = u8.float() / 255
    s(x, list("abc"))
    assert all(c[0].dtype == torch.float32 and c[3] for c in s.seen)  # float path, graph kept
    assert torch.equal(torch.cat([c[0] for c in s.seen]), x)
    s.seen.clear()
    s(pil[0], ["a"])  # one PIL image is a batch of one
    assert s.seen[0][0] == [pil[0]]
    with pytest.raises(ValueError, match="official: got 4 images but 3 prompts"):
        s(pil, list("abc"))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        s(torch.zeros(2, 4, 5, 5, dtype=torch.uint8), ["a", "b"])


def test_scorer_base_converts_pil_and_uint8_to_float_for_the_other_scorers():
    """Without ``pil_input``: PIL images → RGB floats v/255 (as before), and a uint8 tensor → the same
    v/255 (it used to be rejected); one size per batch."""
    from scorers.base import as_image_tensor, pil_to_tensor

    Plain, _ = _recorders()
    s = Plain(batch_size=4)
    pil = [IMAGES[0][1], IMAGES[1][1]]  # both 224x224
    s(pil, ["a", "b"])
    want = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) / 255 for im in pil])).permute(0, 3, 1, 2)
    assert s.seen[0][0].dtype == torch.float32 and torch.equal(s.seen[0][0], want)
    u8 = torch.from_numpy(np.stack([np.asarray(im) for im in pil])).permute(0, 3, 1, 2)
    s(u8, ["a", "b"])
    assert torch.equal(s.seen[1][0], want)
    assert torch.equal(as_image_tensor(u8), pil_to_tensor(pil))
    rgba = OTHER_MODES["RGBA"]
    assert torch.equal(as_image_tensor([rgba]), pil_to_tensor([rgba.convert("RGB")]))
    with pytest.raises(ValueError, match="share one size"):
        s([IMAGES[0][1], IMAGES[4][1]], ["a", "b"])
    with pytest.raises(TypeError, match="floating point in \\[0, 1\\] or uint8"):
        s(torch.zeros(1, 3, 4, 4, dtype=torch.int32), ["a"])
