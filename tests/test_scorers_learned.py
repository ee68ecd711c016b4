"""Learned scorers (PickScore, HPS v2/v2.1, aesthetic, clipscore) and JPEG compressibility, offline.

Every learned scorer is built from a reduced config of its real architecture family (tiny widths and
depths, the real patch size, image size, vocabulary and tokenizer) with random weights, saved to
tmp_path in the official file format, and loaded through the same loading code users run on the
released checkpoints. Official key names are generated here from the published layouts (not read
from the model under test), so a layout drift in the model classes would fail the load.
"""
from __future__ import annotations

import gzip
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import scorers
from scorers import _preprocess as P
from scorers._loading import CheckpointError, check_state_dict, load_checkpoint_file, resolve_checkpoint_file

TINY = dict(width=32, layers=2, heads=2, embed=16)


# ------------------------------------------------------------------------------------------------
# artefacts: tokenizer/processor, tiny checkpoints in the official formats


def _smooth_images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Random but spatially smooth images in [0, 1] (bicubic upsampling of a coarse grid)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, max(2, h // 8), max(2, w // 8), generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
    return x.clamp(0, 1)


def _to_pil(x: torch.Tensor):
    arr = (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


def _quantise(x: torch.Tensor) -> torch.Tensor:
    return (x * 255).round().clamp(0, 255) / 255


def _open_clip_cfg(embed_dim: int) -> dict:
    # The ViT-H-14 / ViT-L-14 family at reduced width/depth: same patch size, image size, context
    # length and vocabulary as the released models.
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": 224, "layers": TINY["layers"], "width": TINY["width"], "head_width": 16, "patch_size": 14},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": TINY["width"], "heads": TINY["heads"], "layers": TINY["layers"]},
    }


def official_open_clip_shapes(cfg: dict) -> dict:
    """Key → shape of an open_clip ``CLIP`` state dict as published in HPS_v2(.1)_compressed.pt
    (layout of tgxs002/HPSv2 hpsv2/src/open_clip/model.py + transformer.py), for a config dict."""
    v, t, e = cfg["vision_cfg"], cfg["text_cfg"], cfg["embed_dim"]
    vw, tw, p = v["width"], t["width"], v["patch_size"]
    grid = v["image_size"] // p
    shapes = {
        "visual.class_embedding": (vw,),
        "visual.positional_embedding": (grid * grid + 1, vw),
        "visual.proj": (vw, e),
        "visual.conv1.weight": (vw, 3, p, p),
        "visual.ln_pre.weight": (vw,), "visual.ln_pre.bias": (vw,),
        "visual.ln_post.weight": (vw,), "visual.ln_post.bias": (vw,),
        "token_embedding.weight": (t["vocab_size"], tw),
        "positional_embedding": (t["context_length"], tw),
        "ln_final.weight": (tw,), "ln_final.bias": (tw,),
        "text_projection": (tw, e),
        "logit_scale": (),
    }
    for prefix, w, layers in (("visual.transformer", vw, v["layers"]), ("transformer", tw, t["layers"])):
        for i in range(layers):
            b = f"{prefix}.resblocks.{i}"
            shapes.update({
                f"{b}.ln_1.weight": (w,), f"{b}.ln_1.bias": (w,),
                f"{b}.attn.in_proj_weight": (3 * w, w), f"{b}.attn.in_proj_bias": (3 * w,),
                f"{b}.attn.out_proj.weight": (w, w), f"{b}.attn.out_proj.bias": (w,),
                f"{b}.ln_2.weight": (w,), f"{b}.ln_2.bias": (w,),
                f"{b}.mlp.c_fc.weight": (4 * w, w), f"{b}.mlp.c_fc.bias": (4 * w,),
                f"{b}.mlp.c_proj.weight": (w, 4 * w), f"{b}.mlp.c_proj.bias": (w,),
            })
    return shapes


# sac+logos+ava1-l14-linearMSE.pth: nn.Sequential indices of the Linear layers (dropouts at 1, 3, 5).
AESTHETIC_SHAPES = {
    "layers.0.weight": (1024, 768), "layers.0.bias": (1024,),
    "layers.2.weight": (128, 1024), "layers.2.bias": (128,),
    "layers.4.weight": (64, 128), "layers.4.bias": (64,),
    "layers.6.weight": (16, 64), "layers.6.bias": (16,),
    "layers.7.weight": (1, 16), "layers.7.bias": (1,),
}


def _random_state(shapes: dict, seed: int, scale: float = 0.05) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, s in shapes.items():
        if k.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight", "ln_final.weight")):
            out[k] = 1 + scale * torch.randn(s, generator=g)
        elif k == "logit_scale":
            out[k] = torch.tensor(float(np.log(1 / 0.07)))
        else:
            out[k] = scale * torch.randn(s, generator=g) * (4 if k.endswith("embedding") else 1)
    return out


def _clip_bpe_tokenizer():
    """transformers CLIPTokenizer with the real CLIP BPE (open_clip ships bpe_simple_vocab_16e6), built
    offline the way CLIP's SimpleTokenizer builds its vocabulary."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={v: i for i, v in enumerate(vocab)}, merges=merges)


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """All tiny checkpoints, written once per module in the official formats."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    root = tmp_path_factory.mktemp("scorer_art")
    # processor folder like laion/CLIP-ViT-H-14-laion2B-s32B-b79K: tokenizer + preprocessor_config.json
    proc = root / "processor"
    _clip_bpe_tokenizer().save_pretrained(proc)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3).save_pretrained(proc)
    # PickScore_v1: a transformers CLIPModel folder (reduced CLIP ViT-H-14: patch 14, 224 px, 77 tokens)
    torch.manual_seed(1)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu"),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=224, patch_size=14, hidden_act="gelu"),
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(root / "pickscore")
    # HPS v2 / v2.1: {"state_dict": <open_clip ViT-H-14 keys>} in HPS_v2(.1)_compressed.pt
    hcfg = _open_clip_cfg(TINY["embed"])
    (root / "tiny-ViT-H-14.json").write_text(json.dumps(hcfg))
    hshapes = official_open_clip_shapes(hcfg)
    (root / "hps").mkdir()
    torch.save({"state_dict": _random_state(hshapes, 2)}, root / "hps" / "HPS_v2_compressed.pt")
    torch.save({"state_dict": _random_state(hshapes, 3)}, root / "hps" / "HPS_v2.1_compressed.pt")
    # aesthetic: bare MLP state dict + an open_clip ViT-L-14-family image tower (embed 768 as the real one)
    lcfg = _open_clip_cfg(768)
    (root / "tiny-ViT-L-14.json").write_text(json.dumps(lcfg))
    torch.save(_random_state(official_open_clip_shapes(lcfg), 4), root / "clip_l14.pt")
    g = torch.Generator().manual_seed(5)
    mlp = {k: torch.randn(s, generator=g) / np.sqrt(s[-1]) for k, s in AESTHETIC_SHAPES.items()}
    (root / "aesthetic").mkdir()
    torch.save(mlp, root / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth")
    return root


SCORER_KW = {
    "pickscore": lambda a: dict(checkpoint=str(a / "pickscore"), processor=str(a / "processor")),
    "hpsv2": lambda a: dict(checkpoint=str(a / "hps"), arch=str(a / "tiny-ViT-H-14.json")),
    "hpsv21": lambda a: dict(checkpoint=str(a / "hps"), arch=str(a / "tiny-ViT-H-14.json")),
    "aesthetic": lambda a: dict(checkpoint=str(a / "aesthetic"), clip_checkpoint=str(a / "clip_l14.pt"),
                                clip_arch=str(a / "tiny-ViT-L-14.json")),
    "clipscore": lambda a: dict(checkpoint=str(a / "pickscore"), processor=str(a / "processor")),
    "clipscore_open_clip": lambda a: dict(backend="open_clip", checkpoint=str(a / "clip_l14.pt"),
                                          arch=str(a / "tiny-ViT-L-14.json"), quick_gelu=True),
}
LEARNED = list(SCORER_KW)


@pytest.fixture(scope="module")
def built(art):
    out = {}
    for key, kw in SCORER_KW.items():
        name = "clipscore" if key.startswith("clipscore") else key
        out[key] = scorers.get(name, batch_size=8, **kw(art))
    return out


PROMPTS = ["a red circle above a blue square", "two cats", "a photo of an astronaut riding a horse",
           "", "A very long prompt " * 20, "three green triangles", "an oil painting", "ünïcödé text!!"]


# ------------------------------------------------------------------------------------------------
# preprocessing against independent references


@pytest.mark.parametrize("hw", [(512, 512), (300, 500), (517, 381), (97, 150)])
def test_preprocess_matches_official_transforms(hw):
    """Float (tensor) path vs the official PIL/torchvision pipelines. CLIP_224 vs open_clip's transform
    and HF_CLIP_224 vs transformers' CLIPImageProcessor differ only by PIL's uint8 rounding after each
    resize pass: ≤ 0.025 max (1.5/255 over std 0.261), ≤ 0.01 mean (normalised units, 1/255 ≈ 0.015).
    HPS_224 vs a torchvision re-statement of HPS's ToTensor/ResizeMaxSize/Normalize: equal to 1e-5.
    (The PIL path, :func:`scorers._preprocess.pil_pixel_values`, is exact: tests/test_scorer_preprocess.py.)"""
    import open_clip
    import torchvision.transforms.functional as TF
    from transformers import CLIPImageProcessor

    h, w = hw
    x = _quantise(_smooth_images(1, h, w, seed=h + w))
    pil = _to_pil(x)[0]
    ours = P.preprocess(x, P.CLIP_224)[0]
    ref = open_clip.image_transform(224, is_train=False)(pil)
    assert ours.shape == ref.shape == (3, 224, 224)
    assert (ours - ref).abs().max() < 0.025 and (ours - ref).abs().mean() < 0.01

    hf = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3)
    ref = hf(pil, return_tensors="pt").pixel_values[0]
    ours = P.preprocess(x, P.HF_CLIP_224)[0]
    assert (ours - ref).abs().max() < 0.025 and (ours - ref).abs().mean() < 0.01

    t = TF.to_tensor(pil)
    s = 224 / max(h, w)
    nh, nw = round(h * s), round(w * s)
    t = TF.resize(t, [nh, nw], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    ph, pw = 224 - nh, 224 - nw
    t = TF.pad(t, [pw // 2, ph // 2, pw - pw // 2, ph - ph // 2], fill=0)
    ref = TF.normalize(t, P.OPENAI_CLIP_MEAN, P.OPENAI_CLIP_STD)
    ours = P.preprocess(x, P.HPS_224)[0]
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_resize_matches_pil_bicubic():
    """Our antialiased bicubic downscale vs PIL's (the reference of every official pipeline)."""
    x = _quantise(_smooth_images(1, 403, 611, seed=7))
    pil = _to_pil(x)[0].resize((330, 218), Image.BICUBIC)  # 218 · 611/403 = 330.5, truncated
    ref = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255).permute(2, 0, 1)
    ours = P.resize_shorter_side(x, 218)[0]
    assert ours.shape == ref.shape == (3, 218, 330)
    assert (ours - ref).abs().max() <= 2 / 255 + 1e-6


def test_center_crop_offsets_and_sizes():
    idx = torch.arange(227 * 230, dtype=torch.float32).reshape(1, 1, 227, 230).expand(1, 3, 227, 230)
    tv = P.center_crop(idx, 224, "torchvision")
    fl = P.center_crop(idx, 224, "floor")
    # (227-224)/2 = 1.5 → torchvision rounds to 2, transformers truncates to 1; (230-224)/2 = 3 for both
    assert tv[0, 0, 0, 0].item() == 2 * 230 + 3 and fl[0, 0, 0, 0].item() == 1 * 230 + 3
    import torchvision.transforms.functional as TF
    torch.testing.assert_close(tv, TF.center_crop(idx, [224, 224]))
    assert P.shorter_side_size(300, 500, 224) == (224, 373)  # 224·500/300 = 373.3 → 373
    assert P.shorter_side_size(611, 403, 218) == (330, 218)
    with pytest.raises(ValueError, match="crop size"):
        P.center_crop(idx, 300)
    with pytest.raises(ValueError, match="rounding"):
        P.center_crop(idx, 10, "nearest")
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        P.preprocess(torch.rand(3, 64, 64))


# ------------------------------------------------------------------------------------------------
# the common contract of every learned scorer


@pytest.mark.parametrize("key", LEARNED)
def test_shape_dtype_and_batching_invariance(built, key):
    s = built[key]
    x = _smooth_images(8, 96, 128, seed=11)
    s.batch_size = 8
    one = s(x, PROMPTS)
    assert one.shape == (8,) and one.dtype == torch.float32 and one.device.type == "cpu"
    assert torch.isfinite(one).all()
    assert one.std() > 0  # random weights still separate different images/prompts
    s.batch_size = 1
    try:
        eight = s(x, PROMPTS)
    finally:
        s.batch_size = 8
    torch.testing.assert_close(one, eight, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("key", LEARNED)
def test_scorer_spec_selects_its_official_pil_pipeline(built, key):
    """The preprocessing spec each scorer carries, run on PIL input by
    :func:`scorers._preprocess.pil_pixel_values`, is that scorer's official transform: PickScore and
    clipscore (transformers) → transformers' CLIPImageProcessor (PIL backend, PickScore's
    ``AutoProcessor`` of laion/CLIP-ViT-H-14 under transformers 4.27.3); HPS v2/v2.1 → HPSv2's
    ToTensor + ResizeMaxSize(224) + Normalize (tgxs002/HPSv2 @ 866735ec); aesthetic and clipscore
    (open_clip) → OpenAI CLIP's ``_transform`` (openai/CLIP @ d05afc43, used by the aesthetic
    predictor's ``clip.load``). Tolerance 2**-21: bit-identical float32 pipelines, one ulp of slack
    (see tests/test_scorer_preprocess.py)."""
    import torchvision.transforms as T
    import torchvision.transforms.functional as TF
    from transformers import CLIPImageProcessorPil

    spec = built[key].encoder.spec
    g = np.random.default_rng(3)
    ims = [Image.fromarray(g.integers(0, 256, (300, 500, 3), dtype=np.uint8)),
           _to_pil(_quantise(_smooth_images(1, 517, 381, seed=4)))[0]]
    for im in ims:
        if key in ("pickscore", "clipscore"):
            hf = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3)
            want = hf(im, return_tensors="pt").pixel_values[0]
        elif key.startswith("hps"):
            t = TF.to_tensor(im)
            h, w = t.shape[1:]
            nh, nw = round(h * 224 / max(h, w)), round(w * 224 / max(h, w))
            t = TF.resize(t, [nh, nw], TF.InterpolationMode.BICUBIC)
            t = TF.pad(t, [(224 - nw) // 2, (224 - nh) // 2, 224 - nw - (224 - nw) // 2, 224 - nh - (224 - nh) // 2], fill=0)
            want = TF.normalize(t, P.OPENAI_CLIP_MEAN, P.OPENAI_CLIP_STD)
        else:
            want = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                              lambda im: im.convert("RGB"), T.ToTensor(), T.Normalize(P.OPENAI_CLIP_MEAN, P.OPENAI_CLIP_STD)])(im)
        torch.testing.assert_close(P.pil_pixel_values(im, spec)[0], want, rtol=0, atol=2.0**-21)


def _scores_from_pixels(s, px: torch.Tensor, prompts) -> torch.Tensor:
    """The scorer's model and score formula applied to model-input pixels ``px`` [B, 3, 224, 224],
    bypassing the scorer's own image handling (``__call__``, ``score_batch``, ``encode_images``)."""
    from scorers.clip import HFClipEncoder, _features, clip_convention, l2_normalize

    enc = s.encoder
    with torch.no_grad():
        px = px.to(enc.device, enc.dtype)
        if isinstance(enc, HFClipEncoder):
            img = _features(enc.model.get_image_features(pixel_values=px))
        else:
            img = enc.model.encode_image(px)
        img = l2_normalize(img.float())
        if s.name == "aesthetic":
            return s.mlp(img).squeeze(-1)
        cos = (img * enc.encode_texts(list(prompts))).sum(-1)
    if s.name == "pickscore":
        return s.scale * enc.logit_scale.float().exp() * cos
    if s.name == "clipscore":
        return clip_convention(cos, s.convention)
    assert s.name in ("hpsv2", "hpsv21")
    return cos


def _user_images():
    """8-bit images as users pass them: white noise (landscape, portrait, an upscale) and a smooth
    field, plus two non-RGB modes (RGBA with varying alpha, L) that the torchvision pipelines convert
    after resizing: mixed sizes and modes in one list."""
    g = np.random.default_rng(21)
    ims = [Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((300, 500), (517, 381), (97, 150))]
    ims += _to_pil(_quantise(_smooth_images(1, 240, 320, seed=22)))
    ims.append(Image.fromarray(g.integers(0, 256, (260, 230, 4), dtype=np.uint8), "RGBA"))
    ims.append(Image.fromarray(g.integers(0, 256, (230, 300), dtype=np.uint8), "L"))
    return ims


# Tolerance of "the scorer equals its model on these pixels": the pixels are bit-identical
# (tests/test_scorer_preprocess.py), the model and the chunks are the same, so the computation is
# identical; 8 float32 ulps of the largest score leave room for kernels that reduce in another order
# for another memory layout. The float path of the same 8-bit pixels moves the tiny models' scores
# by > 2x this (asserted; 5.8x for the tiny aesthetic model, whose image dependence is weak, up
# to 1000x), so a scorer that took the wrong path would fail.
def _tol(ref: torch.Tensor) -> float:
    return 8 * torch.finfo(torch.float32).eps * float(ref.abs().max())


def _chunked(s, pixels_of, items, prompts, batch_size: int) -> torch.Tensor:
    """:func:`_scores_from_pixels` chunk by chunk, as the scorer chunks (``pixels_of(chunk)``)."""
    return torch.cat([
        _scores_from_pixels(s, pixels_of(items[i : i + batch_size]), prompts[i : i + batch_size])
        for i in range(0, len(items), batch_size)
    ])


@pytest.mark.parametrize("key", LEARNED)
def test_pil_and_uint8_inputs_score_as_the_model_on_the_official_pixels(built, key):
    """PIL lists (any size, any mode) and uint8 tensors reach the scorer as they are and are
    preprocessed by :func:`scorers._preprocess.pil_pixel_values` with the scorer's spec (the official
    pipeline); the scores equal the model applied to those pixels. Float tensors keep the torch path
    (:func:`scorers._preprocess.preprocess`), unchanged."""
    s = built[key]
    spec = s.encoder.spec
    ims = _user_images()
    prompts = PROMPTS[: len(ims)]
    g = torch.Generator().manual_seed(23)
    u8 = torch.cat([torch.randint(0, 256, (3, 3, 300, 500), generator=g, dtype=torch.uint8),
                    (_smooth_images(3, 300, 500, seed=24) * 255).round().to(torch.uint8)])
    x = u8.float() / 255
    s.batch_size = 4  # chunks of 4 and 2; the PIL list mixes sizes and modes within a chunk
    try:
        got = s(ims, prompts)
        got8 = s(u8, prompts)
        got_float = s(x, prompts)
    finally:
        s.batch_size = 8
    want = _chunked(s, lambda c: P.pil_pixel_values(c, spec), ims, prompts, 4)
    assert got.shape == (len(ims),) and got.dtype == torch.float32 and got.device.type == "cpu"
    torch.testing.assert_close(got, want, rtol=0, atol=_tol(want))
    # uint8 [B, 3, H, W]: the 8-bit image it holds, through the same official pipeline
    want8 = _chunked(s, lambda c: P.pil_pixel_values(c, spec), u8, prompts, 4)
    torch.testing.assert_close(got8, want8, rtol=0, atol=_tol(want8))
    # the float tensor of the same pixels keeps the torch path (as before this change) ...
    torch.testing.assert_close(got_float, _chunked(s, lambda c: P.preprocess(c, spec), x, prompts, 4), rtol=0, atol=_tol(want8))
    # ... which is the official transform for HPS (it resizes the float tensor), and differs from it
    # by PIL's uint8 rounding in the resize for the others
    gap = float((got_float - want8).abs().max())
    if spec.pil_pipeline_name == "tensor":
        assert gap <= _tol(want8), gap
    else:
        assert gap > 2 * _tol(want8), (gap, _tol(want8))  # measured 5.8x (aesthetic) to 725x (PickScore)


@pytest.mark.parametrize("key", LEARNED)
def test_uint8_tensor_equals_pil_and_float_path_is_close(built, key):
    """A uint8 tensor and the PIL images it came from are the same input: identical scores (same
    computation in one process). An unquantised float tensor of those images takes the torch path;
    its score is within 2e-3·(1 + |s|) of the official one (8-bit quantisation plus PIL's uint8
    resampling; for HPS only the quantisation)."""
    s = built[key]
    x = _smooth_images(4, 80, 120, seed=12)
    prompts = PROMPTS[:4]
    via_pil = s(_to_pil(x), prompts)
    u8 = (x * 255).round().clamp(0, 255).to(torch.uint8)
    assert torch.equal(s(u8, prompts), via_pil)
    if s.encoder.spec.pil_pipeline_name == "tensor":  # HPS: the official transform is the float path
        torch.testing.assert_close(s(_quantise(x), prompts), via_pil, atol=1e-5, rtol=1e-5)
    diff = (s(x, prompts) - via_pil).abs()
    assert (diff <= 2e-3 * (1 + via_pil.abs())).all(), diff


@pytest.mark.parametrize("key", LEARNED)
def test_remote_scores_a_png_as_the_official_path_on_its_pixels(built, key):
    """Server round trip: the training loop's float images travel as 8-bit PNG and the server hands
    the decoded PIL images to the scorer, which takes its official path: the remote score is the
    in-process score of the uint8 tensor ``quantize_uint8(x)`` (identical: same pixels, same
    computation in one process), not the float path of ``x``. PIL input travels as it is (an RGBA
    image keeps its alpha, sizes may differ)."""
    from scorers.remote import RemoteScorer, quantize_uint8
    from scorers.server import ScorerServer

    s = built[key]
    x = torch.rand(3, 3, 150, 210, generator=torch.Generator().manual_seed(24))
    prompts = PROMPTS[:3]
    ims = _user_images()[-3:]  # smooth RGB, RGBA, L: three sizes
    with ScorerServer(s, port=0) as srv:
        remote = RemoteScorer(srv.url, retries=0, timeout=60)
        got = remote(x, prompts)
        got_pil = remote(ims, prompts)
    assert torch.equal(got, s(quantize_uint8(x), prompts))
    assert torch.equal(got_pil, s(ims, prompts))
    if s.encoder.spec.pil_pipeline_name != "tensor":  # the float path of the same pixels differs
        assert float((got - s(quantize_uint8(x).float() / 255, prompts)).abs().max()) > 2 * _tol(got)


@pytest.mark.parametrize("key", ["aesthetic", "clipscore_open_clip", "pickscore"])
def test_cli_passes_images_as_loaded(art, tmp_path, key):
    """``flowrl score`` opens each file and passes the PIL image as it is (no ``convert("RGB")``):
    an RGBA PNG and an RGB JPEG of other sizes score as the scorer scores ``Image.open(path)``."""
    from scorers.cli import main as score_main

    g = np.random.default_rng(25)
    d = tmp_path / "imgs"
    d.mkdir()
    Image.fromarray(g.integers(0, 256, (260, 230, 4), dtype=np.uint8), "RGBA").save(d / "0001.png")
    Image.fromarray(g.integers(0, 256, (240, 300, 3), dtype=np.uint8)).save(d / "0002.jpg", quality=90)
    Image.fromarray(g.integers(0, 256, (250, 250, 4), dtype=np.uint8), "RGBA").save(d / "0003.png")
    (tmp_path / "prompts.txt").write_text("a cat\na dog\nthree birds\n")
    name = "clipscore" if key.startswith("clipscore") else key
    opts = [f"{k}={v}" for k, v in SCORER_KW[key](art).items() if k != "checkpoint"]
    args = ["--scorer", name, "--checkpoint", SCORER_KW[key](art)["checkpoint"], "--images", str(d),
            "--prompts", str(tmp_path / "prompts.txt"), "--output", str(tmp_path / "s.csv")]
    for o in opts:
        args += ["--option", o]
    assert score_main(args, stdout=io.StringIO()) == 0
    rows = (tmp_path / "s.csv").read_text().splitlines()[1:]
    got = torch.tensor([float(r.rsplit(",", 1)[1]) for r in rows])
    s = scorers.get(name, batch_size=16, **SCORER_KW[key](art))
    files = ["0001.png", "0002.jpg", "0003.png"]
    want = torch.cat([s([Image.open(d / f)], [p]) for f, p in zip(files, ["a cat", "a dog", "three birds"])])
    torch.testing.assert_close(got, want, rtol=0, atol=_tol(want))
    if key != "pickscore":  # torchvision pipeline: RGB after the resize, so converting first differs
        rgb_first = s([Image.open(d / "0001.png").convert("RGB")], ["a cat"])
        assert float((rgb_first - want[0]).abs()) > 20 * _tol(want)


@pytest.mark.parametrize("key", LEARNED)
def test_differentiable_path_gives_finite_gradients(art, key):
    name = "clipscore" if key.startswith("clipscore") else key
    s = scorers.get(name, batch_size=2, differentiable=True, **SCORER_KW[key](art))
    x = _smooth_images(3, 64, 96, seed=13).requires_grad_(True)
    y = s(x, PROMPTS[:3])
    assert y.shape == (3,) and y.requires_grad
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # not differentiable by default: detached result, no graph
    s2 = scorers.get(name, batch_size=2, **SCORER_KW[key](art))
    assert not s2(x, PROMPTS[:3]).requires_grad


def test_prompt_count_mismatch_is_an_error(built):
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        built["hpsv2"](torch.rand(3, 3, 32, 32), ["a", "b"])


# ------------------------------------------------------------------------------------------------
# scores against each library's own forward pass


def test_pickscore_is_logit_scale_times_cosine_of_transformers_clip(art, built):
    """Reference: transformers' CLIPModel.forward on the processor's pixel values — its
    logits_per_image = logit_scale.exp() · cos — diagonal, as the PickScore authors compute."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(art / "pickscore").eval()
    tok = AutoTokenizer.from_pretrained(art / "processor")
    ip = AutoImageProcessor.from_pretrained(art / "processor")
    x = _quantise(_smooth_images(4, 240, 320, seed=14))
    prompts = PROMPTS[:4]
    with torch.no_grad():
        inp = tok(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        pix = ip(_to_pil(x), return_tensors="pt").pixel_values
        ref = model(input_ids=inp.input_ids, attention_mask=inp.attention_mask, pixel_values=pix).logits_per_image.diagonal()
    ours = built["pickscore"](x, prompts)
    # differences come only from the processor's uint8 rounding after resizing
    torch.testing.assert_close(ours, ref, atol=2e-3 * float(ref.abs().max()), rtol=0)
    # and the scale factor is really exp(logit_scale): clipscore (cosine) of the same model times it
    cos = built["clipscore"](x, prompts)
    torch.testing.assert_close(ours, cos * model.logit_scale.exp().item(), atol=1e-4, rtol=1e-5)


def test_hps_is_cosine_of_open_clip_features(art, built):
    """Reference: open_clip's own CLIP forward (output_dict features are normalised) on HPS's
    preprocessing re-stated with torchvision, and open_clip's tokenizer; score = diagonal."""
    import open_clip
    import torchvision.transforms.functional as TF

    from scorers.clip import open_clip_arch

    name = open_clip_arch(str(art / "tiny-ViT-H-14.json"))
    model = open_clip.create_model(name, pretrained=None, output_dict=True)
    model.load_state_dict(torch.load(art / "hps" / "HPS_v2.1_compressed.pt", weights_only=True)["state_dict"])
    model.eval()
    x = _quantise(_smooth_images(3, 200, 120, seed=15))
    prompts = PROMPTS[:3]
    batch = []
    for pil in _to_pil(x):
        t = TF.to_tensor(pil)
        t = TF.resize(t, [224, round(120 * 224 / 200)], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        pw = 224 - t.shape[-1]
        t = TF.pad(t, [pw // 2, 0, pw - pw // 2, 0], fill=0)
        batch.append(TF.normalize(t, P.OPENAI_CLIP_MEAN, P.OPENAI_CLIP_STD))
    with torch.no_grad():
        out = model(torch.stack(batch), open_clip.get_tokenizer(name)(prompts))
        ref = (out["image_features"] @ out["text_features"].T).diagonal()
    torch.testing.assert_close(built["hpsv21"](x, prompts), ref, atol=1e-5, rtol=1e-4)
    assert (ref.abs() <= 1 + 1e-6).all()
    # v2 and v2.1 read their own files
    assert not torch.allclose(built["hpsv2"](x, prompts), built["hpsv21"](x, prompts))


def test_aesthetic_is_the_linear_mlp_on_normalised_clip_embedding(art, built):
    """The released head has no activations: score = a·ê + c with a, c composed in float64."""
    import open_clip

    from scorers.clip import open_clip_arch

    name = open_clip_arch(str(art / "tiny-ViT-L-14.json"))
    clip = open_clip.create_model(name, pretrained=None, force_quick_gelu=True)
    clip.load_state_dict(torch.load(art / "clip_l14.pt", weights_only=True))
    clip.eval()
    mlp = torch.load(art / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth", weights_only=True)
    A, b = torch.eye(768, dtype=torch.float64), torch.zeros(768, dtype=torch.float64)
    for i in (0, 2, 4, 6, 7):  # compose the five affine maps: A ← W·A, b ← W·b + bias
        W, bi = mlp[f"layers.{i}.weight"].double(), mlp[f"layers.{i}.bias"].double()
        A, b = W @ A, W @ b + bi
    x = _smooth_images(4, 150, 150, seed=16)
    with torch.no_grad():
        emb = clip.encode_image(P.preprocess(x, P.CLIP_224)).double()
    emb = emb / emb.norm(dim=-1, keepdim=True)
    ref = (emb @ A.T).squeeze(-1) + b
    torch.testing.assert_close(built["aesthetic"](x, PROMPTS[:4]).double(), ref, atol=1e-5, rtol=1e-5)
    # the prompt is not used
    torch.testing.assert_close(built["aesthetic"](x, ["x"] * 4), built["aesthetic"](x, PROMPTS[:4]))


def test_clip_conventions():
    from scorers.clip import clip_convention

    cos = torch.tensor([-0.5, 0.0, 0.2, 1.0])
    torch.testing.assert_close(clip_convention(cos, "cosine"), cos)
    torch.testing.assert_close(clip_convention(cos, "clip_s"), torch.tensor([0.0, 0.0, 0.5, 2.5]))
    torch.testing.assert_close(clip_convention(cos, "x100"), torch.tensor([0.0, 0.0, 20.0, 100.0]))
    with pytest.raises(ValueError, match="convention"):
        clip_convention(cos, "percent")


def test_clipscore_backends_and_options(art, built):
    x = _smooth_images(3, 64, 64, seed=17)
    cos = built["clipscore_open_clip"](x, PROMPTS[:3])
    assert (cos.abs() <= 1 + 1e-6).all()
    s = scorers.get("clipscore", convention="clip_s", **SCORER_KW["clipscore_open_clip"](art))
    torch.testing.assert_close(s(x, PROMPTS[:3]), 2.5 * cos.clamp_min(0))
    with pytest.raises(ValueError, match="backend"):
        scorers.get("clipscore", backend="jax")


# ------------------------------------------------------------------------------------------------
# loading: official key names load, tampered files fail with a readable message


def test_official_layouts_match_the_models(art):
    """The key/shape layouts written here from the published files match the model classes, at the
    reduced size used by the tests and at full size (ViT-H-14 for HPS, ViT-L-14 + the 768-wide MLP
    for the aesthetic predictor; built on the meta device, no weights)."""
    import open_clip

    from scorers.aesthetic import AestheticMLP
    from scorers.clip import open_clip_arch

    for cfg_file in ("tiny-ViT-H-14.json", "tiny-ViT-L-14.json"):
        cfg = json.loads((art / cfg_file).read_text())
        model = open_clip.create_model(open_clip_arch(str(art / cfg_file)), pretrained=None)
        check_state_dict(model, official_open_clip_shapes(cfg), "open_clip")  # raises on any difference
    for arch, quick_gelu in (("ViT-H-14", False), ("ViT-L-14", True)):
        with torch.device("meta"):
            full = open_clip.create_model(arch, pretrained=None, force_quick_gelu=quick_gelu, device="meta")
        shapes = official_open_clip_shapes(open_clip.get_model_config(arch))
        check_state_dict(full, shapes, arch)
        assert len(shapes) == 14 + 12 * (open_clip.get_model_config(arch)["vision_cfg"]["layers"]
                                          + open_clip.get_model_config(arch)["text_cfg"]["layers"])
    assert shapes["visual.proj"] == (1024, 768)  # ViT-L-14 image embedding width = the MLP's input
    check_state_dict(AestheticMLP(768), AESTHETIC_SHAPES, "aesthetic")


def _tamper(sd: dict, rename: str, reshape: str, extra: int = 0) -> dict:
    sd = dict(sd)
    sd[rename + "_renamed"] = sd.pop(rename)
    sd[reshape] = torch.zeros(7)
    for i in range(extra):
        sd[f"junk.{i}"] = torch.zeros(1)
    return sd


def test_tampered_hps_checkpoint_is_rejected_with_names_and_shapes(art, tmp_path):
    sd = torch.load(art / "hps" / "HPS_v2_compressed.pt", weights_only=True)["state_dict"]
    torch.save({"state_dict": _tamper(sd, "visual.proj", "ln_final.bias", extra=6)}, tmp_path / "HPS_v2_compressed.pt")
    with pytest.raises(CheckpointError) as e:
        scorers.get("hpsv2", checkpoint=str(tmp_path), arch=str(art / "tiny-ViT-H-14.json"))
    msg = str(e.value)
    assert "missing keys (1): 'visual.proj'" in msg
    # 7 unexpected keys: the first 5 in sorted order are listed, then a count
    assert "unexpected keys (7): 'junk.0', 'junk.1', 'junk.2', 'junk.3', 'junk.4' and 2 more" in msg
    assert "'ln_final.bias': checkpoint (7,) vs model (32,)" in msg
    assert "hpsv2 checkpoint" in msg


def test_tampered_aesthetic_checkpoint_is_rejected(art, tmp_path):
    sd = torch.load(art / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth", weights_only=True)
    torch.save(_tamper(sd, "layers.7.weight", "layers.2.bias"), tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    with pytest.raises(CheckpointError) as e:
        scorers.get("aesthetic", **{**SCORER_KW["aesthetic"](art), "checkpoint": str(tmp_path)})
    msg = str(e.value)
    assert "missing keys (1): 'layers.7.weight'" in msg
    assert "unexpected keys (1): 'layers.7.weight_renamed'" in msg
    assert "'layers.2.bias': checkpoint (7,) vs model (128,)" in msg


def test_tampered_pickscore_checkpoint_is_rejected(art, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    d = tmp_path / "pick"
    shutil.copytree(art / "pickscore", d)
    sd = load_file(d / "model.safetensors")
    save_file(_tamper(sd, "text_projection.weight", "visual_projection.weight"), d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        scorers.get("pickscore", checkpoint=str(d), processor=str(art / "processor"))
    msg = str(e.value)
    assert "missing keys (1): 'text_projection.weight'" in msg
    assert "unexpected keys (1): 'text_projection.weight_renamed'" in msg
    assert "'visual_projection.weight': checkpoint (7,) vs model (16, 32)" in msg


class _NotATensor:
    """A pickled Python object that weights_only=True must refuse to rebuild."""


def test_load_checkpoint_file_is_weights_only(tmp_path):
    torch.save({"obj": _NotATensor()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_checkpoint_file(tmp_path / "evil.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_checkpoint_file(tmp_path / "list.pt")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint_file(tmp_path / "nope.pt")


def test_resolve_checkpoint_forms(tmp_path, monkeypatch):
    (tmp_path / "a.pt").write_bytes(b"x")
    assert resolve_checkpoint_file(tmp_path / "a.pt") == str(tmp_path / "a.pt")
    assert resolve_checkpoint_file(tmp_path, "a.pt") == str(tmp_path / "a.pt")
    with pytest.raises(FileNotFoundError, match=r"'b.pt' not found in folder .* a.pt"):
        resolve_checkpoint_file(tmp_path, "b.pt", "hpsv2 checkpoint")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="xswu/HPSv2"):
        resolve_checkpoint_file("xswu/HPSv2", "HPS_v2_compressed.pt", "hpsv2 checkpoint")
    monkeypatch.setenv("FLOWRL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="offline"):
        resolve_checkpoint_file("https://example.invalid/x+y.pth", None, "aesthetic checkpoint")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "x+y.pth").write_bytes(b"x")  # a cached download is reused
    assert resolve_checkpoint_file("https://example.invalid/x%2By.pth") == str(tmp_path / "cache" / "x+y.pth")


# ------------------------------------------------------------------------------------------------
# jpeg (DDPO)


def _ddpo_reference_kb(x: torch.Tensor) -> list:
    out = []
    for a in (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy():
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=95)
        out.append(len(buf.getvalue()) / 1000)
    return out


def test_jpeg_compressibility_matches_ddpo_definition():
    x = torch.cat([_smooth_images(3, 64, 80, seed=18), torch.rand(1, 3, 64, 80), torch.full((1, 3, 64, 80), 0.5)])
    s = scorers.get("jpeg_compressibility", batch_size=2)
    y = s(x, [""] * 5)
    ref = torch.tensor(_ddpo_reference_kb(x), dtype=torch.float32)
    torch.testing.assert_close(y, -ref)
    torch.testing.assert_close(scorers.get("jpeg_incompressibility")(x, [""] * 5), ref)
    assert y[4] > y[0] > y[3]  # flat image compresses best, noise worst
    torch.testing.assert_close(s(_to_pil(x), [""] * 5), y)  # PIL path: same uint8 pixels
    with pytest.raises(ValueError, match="not differentiable"):
        scorers.get("jpeg_compressibility", differentiable=True)


def test_builtin_names_registered():
    names = set(scorers.available())
    assert {"pickscore", "hpsv2", "hpsv21", "clipscore", "aesthetic", "jpeg_compressibility"} <= names
