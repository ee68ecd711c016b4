"""ImageReward v1.0 scorer: key table, strict loading of an official-layout file, numerics, call contract.

Everything runs offline on a reduced config of the same architecture (tiny ViT and BERT) with a tiny
WordPiece vocabulary. The numerics are checked against an independent float64 re-implementation of
the official forward pass (ImageReward/ImageReward.py + models/BLIP/vit.py + models/BLIP/med.py,
github.com/THUDM/ImageReward) written below with plain torch functionals on the *official* key names.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import scorers
from scorers._loading import CheckpointError
from scorers.imagereward import (
    DERIVED_KEYS,
    KEY_TABLE,
    MAX_LENGTH,
    REWARD_MEAN,
    REWARD_STD,
    ImageRewardConfig,
    ImageRewardModel,
    ImageRewardScorer,
    build_imagereward,
    convert_official_state_dict,
    official_key_shapes,
    official_to_ours,
    ours_to_official,
    prepare_tokenizer,
    resolve_checkpoint,
    tokenize,
)

WORDS = [
    "a", "an", "the", "red", "blue", "green", "cat", "dog", "on", "under", "mat", "sofa", "photo", "of",
    "painting", "castle", "sunset", "over", "sea", "big", "small", "##s", "##y", "high", "quality", ",", ".",
]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
PROMPTS = [
    "a red cat on the mat",
    "a photo of a dog",
    "the castle",
    "painting of a sunset over the sea, high quality",
    "a blue dog under the sofa",
    "zebra",  # unknown word -> [UNK]
    "small green cats",
    "an big dog on a red sofa .",
]


def make_tokenizer():
    from transformers import BertTokenizer

    return prepare_tokenizer(BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}))


def tiny_config() -> ImageRewardConfig:
    return ImageRewardConfig.tiny(vocab_size=len(VOCAB) + 2)  # + [DEC] + [ENC], as 30522 + 2 upstream


def random_official_state_dict(cfg: ImageRewardConfig, seed: int = 0) -> dict:
    """A state dict with exactly the official key names at ``cfg``'s size, generated from the mapping
    table (inverse map of our model's keys), with random values of O(1) activations, plus the
    persistent ``position_ids`` buffer med.py saves."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in official_key_shapes(ImageRewardModel(cfg)).items():
        z = torch.randn(shape, generator=g)
        if len(shape) == 1:
            v = 1.0 + 0.1 * z if (key.endswith("weight")) else 0.1 * z  # LayerNorm scales / biases
        elif key.endswith(("cls_token", "pos_embed")):
            v = 0.5 * z
        else:  # Linear / Conv / Embedding weights: 1/sqrt(fan_in)
            v = z / math.sqrt(float(np.prod(shape[1:])))
        sd[key] = v
    sd["blip.text_encoder.embeddings.position_ids"] = torch.arange(cfg.max_position_embeddings).expand(1, -1).clone()
    return sd


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    cfg = tiny_config()
    sd = random_official_state_dict(cfg)
    path = tmp_path_factory.mktemp("imagereward") / "ImageReward.pt"
    torch.save(sd, path)  # the release is a bare state dict (ImageReward/utils.py: torch.load -> load_state_dict)
    return cfg, sd, path


@pytest.fixture(scope="module")
def scorer(official):
    cfg, _, path = official
    return build_imagereward(path, tokenizer=make_tokenizer(), config=cfg, batch_size=8)


def smooth_images(n: int, h: int = 40, w: int = 48, seed: int = 1) -> torch.Tensor:
    """Natural-ish images in [0, 1]: low-frequency random fields, quantised to uint8 levels."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, 3, 5, 6, generator=g), size=(h, w), mode="bilinear", align_corners=False)
    return (x * 255).round() / 255


# ---------------------------------------------------------------------------------------------
# independent float64 reference of the official forward pass, on official key names
# ---------------------------------------------------------------------------------------------


def _lin(x, sd, p):
    return x @ sd[p + ".weight"].T + sd[p + ".bias"]


def _ln(x, sd, p, eps):
    return F.layer_norm(x, (x.shape[-1],), sd[p + ".weight"], sd[p + ".bias"], eps)


def _heads(x, n):
    b, t, c = x.shape
    return x.reshape(b, t, n, c // n).transpose(1, 2)


def ref_visual_encoder(sd, px, cfg):
    """models/BLIP/vit.py VisionTransformer.forward: patch conv, [cls] + pos, pre-norm blocks, final norm."""
    p = "blip.visual_encoder."
    x = F.conv2d(px, sd[p + "patch_embed.proj.weight"], sd[p + "patch_embed.proj.bias"], stride=cfg.patch_size)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd[p + "cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + sd[p + "pos_embed"]
    b, n, c = x.shape
    nh = cfg.vision_heads
    for i in range(cfg.vision_layers):
        q = f"{p}blocks.{i}."
        h = _ln(x, sd, q + "norm1", 1e-6)
        qkv = _lin(h, sd, q + "attn.qkv").reshape(b, n, 3, nh, c // nh).permute(2, 0, 3, 1, 4)
        att = torch.softmax(qkv[0] @ qkv[1].transpose(-2, -1) * (c // nh) ** -0.5, dim=-1)
        x = x + _lin((att @ qkv[2]).transpose(1, 2).reshape(b, n, c), sd, q + "attn.proj")
        h = _ln(x, sd, q + "norm2", 1e-6)
        x = x + _lin(F.gelu(_lin(h, sd, q + "mlp.fc1")), sd, q + "mlp.fc2")
    return _ln(x, sd, p + "norm", 1e-6)


def _bert_attention(x, kv, bias, sd, p, nh):
    """med.py BertAttention: softmax(QK^T/sqrt(d) + mask) V, dense, LayerNorm(out + x) (post-norm)."""
    q, k, v = (_heads(_lin(t, sd, f"{p}.self.{name}"), nh) for t, name in ((x, "query"), (kv, "key"), (kv, "value")))
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        s = s + bias
    ctx = (torch.softmax(s, dim=-1) @ v).transpose(1, 2).reshape(x.shape)
    return _ln(_lin(ctx, sd, f"{p}.output.dense") + x, sd, f"{p}.output.LayerNorm", 1e-12)


def ref_reward(sd, px, ids, mask, cfg):
    """ImageReward.score_gard: text encoder cross-attending to the image, [0] token, MLP, (r - mean)/std."""
    img = ref_visual_encoder(sd, px, cfg)
    p = "blip.text_encoder."
    pos = torch.arange(ids.shape[1])
    x = sd[p + "embeddings.word_embeddings.weight"][ids] + sd[p + "embeddings.position_embeddings.weight"][pos]
    x = _ln(x, sd, p + "embeddings.LayerNorm", 1e-12)
    bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * -10000.0  # BertModel.get_extended_attention_mask
    for i in range(cfg.text_layers):
        q = f"{p}encoder.layer.{i}."
        x = _bert_attention(x, x, bias, sd, q + "attention", cfg.text_heads)
        x = _bert_attention(x, img, None, sd, q + "crossattention", cfg.text_heads)  # image mask: all ones
        x = _ln(_lin(F.gelu(_lin(x, sd, q + "intermediate.dense")), sd, q + "output.dense") + x, sd, q + "output.LayerNorm", 1e-12)
    r = x[:, 0]
    for j in (0, 2, 4, 6, 7):  # dropouts are identity in eval
        r = _lin(r, sd, f"mlp.layers.{j}")
    return (r.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072


def official_pil_pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """The official PIL pipeline (ImageReward/ImageReward.py::_transform) with torchvision itself."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    t = Compose([
        Resize(size, interpolation=InterpolationMode.BICUBIC), CenterCrop(size), ToTensor(),
        Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    ])
    return torch.stack([t(im) for im in to_pil(images)])


def to_pil(images: torch.Tensor):
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


# ---------------------------------------------------------------------------------------------
# key table
# ---------------------------------------------------------------------------------------------


def official_keys_from_upstream_modules(n_vis: int, n_txt: int) -> set:
    """The official key set, enumerated from the upstream module definitions (vit.py Block/VisionTransformer,
    med.py BertEmbeddings/BertLayer with cross-attention, BLIP_Pretrain projections, ImageReward.MLP) —
    independently of KEY_TABLE."""
    wb = (".weight", ".bias")
    keys = {"blip.visual_encoder.cls_token", "blip.visual_encoder.pos_embed"}
    keys |= {"blip.visual_encoder.patch_embed.proj" + s for s in wb} | {"blip.visual_encoder.norm" + s for s in wb}
    for i in range(n_vis):
        for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {f"blip.visual_encoder.blocks.{i}.{m}{s}" for s in wb}
    t = "blip.text_encoder."
    keys |= {t + "embeddings.position_ids", t + "embeddings.word_embeddings.weight", t + "embeddings.position_embeddings.weight"}
    keys |= {t + "embeddings.LayerNorm" + s for s in wb}
    for i in range(n_txt):
        for att in ("attention", "crossattention"):
            for m in ("self.query", "self.key", "self.value", "output.dense", "output.LayerNorm"):
                keys |= {f"{t}encoder.layer.{i}.{att}.{m}{s}" for s in wb}
        for m in ("intermediate.dense", "output.dense", "output.LayerNorm"):
            keys |= {f"{t}encoder.layer.{i}.{m}{s}" for s in wb}
    keys |= {f"blip.{p}_proj{s}" for p in ("vision", "text") for s in wb}
    keys |= {f"mlp.layers.{j}{s}" for j in (0, 2, 4, 6, 7) for s in wb}
    return keys


@pytest.mark.parametrize("full", [False, True], ids=["tiny", "published"])
def test_key_table_is_a_bijection_onto_the_official_keys(full):
    cfg = ImageRewardConfig() if full else tiny_config()
    if full:
        with torch.device("meta"):  # the published sizes without allocating 1.8 GB
            model = ImageRewardModel(cfg)
    else:
        model = ImageRewardModel(cfg)
    ours = list(model.state_dict())
    mapped = [ours_to_official(k) for k in ours]
    assert len(set(mapped)) == len(ours)  # injective
    official = official_keys_from_upstream_modules(cfg.vision_layers, cfg.text_layers)
    assert set(mapped) | set(DERIVED_KEYS) == official  # onto: every official key is ours or a derived buffer
    assert set(DERIVED_KEYS) <= official and not set(DERIVED_KEYS) & set(mapped)
    assert all(official_to_ours(o) == k for k, o in zip(ours, mapped))  # inverse
    # LayerNorm eps as upstream (timm ViT: 1e-6; med_config.json: 1e-12) — too small to see numerically
    ln_eps = {n: m.eps for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    assert {e for n, e in ln_eps.items() if n.startswith("vision.")} == {1e-6}
    assert {e for n, e in ln_eps.items() if n.startswith("text.")} == {1e-12}
    if full:
        assert len(official) == 625
        shapes = official_key_shapes(model)
        # shapes of the published file, from the upstream configs (ViT-L/16 @ 224, med_config.json, MLP 768->...->1)
        assert shapes["blip.visual_encoder.pos_embed"] == (1, 197, 1024)
        assert shapes["blip.visual_encoder.patch_embed.proj.weight"] == (1024, 3, 16, 16)
        assert shapes["blip.visual_encoder.blocks.23.mlp.fc1.weight"] == (4096, 1024)
        assert shapes["blip.text_encoder.embeddings.word_embeddings.weight"] == (30524, 768)
        assert shapes["blip.text_encoder.encoder.layer.11.crossattention.self.key.weight"] == (768, 1024)
        assert shapes["blip.vision_proj.weight"] == (256, 1024) and shapes["blip.text_proj.weight"] == (256, 768)
        assert [shapes[f"mlp.layers.{j}.weight"] for j in (0, 2, 4, 6, 7)] == [(1024, 768), (128, 1024), (64, 128), (16, 64), (1, 16)]


def test_key_table_rejects_unknown_names():
    with pytest.raises(KeyError, match="blip.itm_head.weight"):
        official_to_ours("blip.itm_head.weight")
    with pytest.raises(KeyError, match="nothing.here"):
        ours_to_official("nothing.here")
    assert all(len(pair) == 2 for pair in KEY_TABLE)


# ---------------------------------------------------------------------------------------------
# loading through the real path
# ---------------------------------------------------------------------------------------------


def test_official_file_loads_strictly_with_identical_values(official, scorer):
    cfg, sd, path = official
    ours = scorer.model.state_dict()
    assert len(ours) == len(sd) - 1  # all but the derived position_ids buffer
    for k, v in ours.items():
        assert torch.equal(v, sd[ours_to_official(k)]), k
    assert torch.equal(scorer.model.text.embeddings.position_ids, sd["blip.text_encoder.embeddings.position_ids"])


def test_registry_and_wrapped_files(official, tmp_path):
    cfg, sd, path = official
    assert "imagereward" in scorers.available()
    s = scorers.get("imagereward", checkpoint=str(path), tokenizer=make_tokenizer(), config=cfg.to_dict(), batch_size=4)
    assert isinstance(s, ImageRewardScorer) and s.batch_size == 4
    # A training-script layout ({"state_dict": {"module.<key>": ...}}) and a folder holding ImageReward.pt load too.
    wrapped = tmp_path / "ImageReward.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": torch.tensor(3)}, wrapped)
    assert resolve_checkpoint(tmp_path) == str(wrapped)
    s2 = build_imagereward(tmp_path, tokenizer=make_tokenizer(), config=cfg)
    x = smooth_images(2)
    assert torch.equal(s2(x, PROMPTS[:2]), s(x, PROMPTS[:2]))
    with pytest.raises(TypeError, match="unknown options"):
        scorers.get("imagereward", checkpoint=str(path), tokenizer=make_tokenizer(), config=cfg, resolution=512)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        resolve_checkpoint(tmp_path / "missing.pt")


def test_renamed_key_is_reported_by_name(official, tmp_path):
    cfg, sd, _ = official
    bad = dict(sd)
    bad["blip.visual_encoder.blocks.1.attn.qkv_weight"] = bad.pop("blip.visual_encoder.blocks.1.attn.qkv.weight")
    bad["blip.itm_head.weight"] = torch.zeros(2, cfg.text_width)
    path = tmp_path / "renamed.pt"
    torch.save(bad, path)
    with pytest.raises(CheckpointError) as e:
        build_imagereward(path, tokenizer=make_tokenizer(), config=cfg)
    msg = str(e.value)
    assert "missing keys (1)" in msg and "'blip.visual_encoder.blocks.1.attn.qkv.weight'" in msg
    assert "unexpected keys (2)" in msg and "'blip.visual_encoder.blocks.1.attn.qkv_weight'" in msg
    assert "'blip.itm_head.weight'" in msg and str(path) in msg


def test_many_missing_keys_are_listed_then_counted(official):
    cfg, sd, _ = official
    bad = {k: v for k, v in sd.items() if not k.startswith("blip.text_encoder.encoder.")}
    n_missing = sum(k.startswith("blip.text_encoder.encoder.") for k in sd)
    with pytest.raises(CheckpointError, match=rf"missing keys \({n_missing}\): .* and {n_missing - 5} more"):
        convert_official_state_dict(bad, ImageRewardModel(cfg))


def test_wrong_shape_names_key_and_both_shapes(official):
    cfg, sd, _ = official
    bad = dict(sd)
    bad["mlp.layers.0.weight"] = torch.zeros(47, cfg.text_width)
    with pytest.raises(CheckpointError) as e:
        convert_official_state_dict(bad, ImageRewardModel(cfg))
    msg = str(e.value)
    assert "'mlp.layers.0.weight'" in msg and f"(47, {cfg.text_width})" in msg and f"({cfg.head_dims[0]}, {cfg.text_width})" in msg
    bad = dict(sd)
    bad["blip.text_encoder.embeddings.position_ids"] = torch.arange(cfg.max_position_embeddings).flip(0)[None]
    with pytest.raises(CheckpointError, match="position_ids.*arange"):
        convert_official_state_dict(bad, ImageRewardModel(cfg))
    # the derived buffer is optional (a file re-saved from transformers has none)
    del bad["blip.text_encoder.embeddings.position_ids"]
    assert len(convert_official_state_dict(bad | {"mlp.layers.0.weight": sd["mlp.layers.0.weight"]}, ImageRewardModel(cfg))) == len(sd) - 1


# ---------------------------------------------------------------------------------------------
# tokenisation and numerics
# ---------------------------------------------------------------------------------------------


def test_tokenizer_matches_blip_init_tokenizer():
    tok = make_tokenizer()
    v = len(VOCAB)
    assert len(tok) == v + 2 == tiny_config().vocab_size
    assert tok.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [v, v + 1] and tok.enc_token_id == v + 1
    assert tok.bos_token == "[DEC]"
    assert len(prepare_tokenizer(tok)) == v + 2  # idempotent
    long_prompt = " ".join(["red cat"] * 40)
    ids, mask = tokenize(tok, ["a red cat", long_prompt])
    assert ids.shape == mask.shape == (2, MAX_LENGTH)
    cls, sep, pad = (tok.convert_tokens_to_ids(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
    assert ids[0, :5].tolist() == [cls, VOCAB.index("a"), VOCAB.index("red"), VOCAB.index("cat"), sep]
    assert (ids[0, 5:] == pad).all() and mask[0].tolist() == [1] * 5 + [0] * (MAX_LENGTH - 5)
    assert ids[1, 0] == cls and ids[1, -1] == sep and mask[1].all()  # truncated to 35 with [SEP] kept
    assert (ids != tok.enc_token_id).all()  # upstream scoring keeps [CLS]; [ENC] is never inserted


def test_matches_independent_float64_reference(official, scorer):
    cfg, sd, _ = official
    sd64 = {k: (v.double() if v.is_floating_point() else v) for k, v in sd.items()}
    x = smooth_images(len(PROMPTS))
    px = scorer.pixel_values(x)
    ids, mask = tokenize(scorer.tokenizer, PROMPTS)
    want = ref_reward(sd64, px.double(), ids, mask, cfg)
    got = scorer.score_pixels(px, PROMPTS)
    assert got.dtype == torch.float32
    assert want.std() > 0.05  # the random model discriminates, so the comparison is not vacuous
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5)
    # the normalisation is the published one
    raw = scorer.model.raw_reward(px, ids, mask)
    torch.testing.assert_close(got, (raw - REWARD_MEAN) / REWARD_STD)


def test_padding_does_not_change_the_reward(scorer):
    """Padded positions are masked: the score of a prompt equals its score without padding."""
    x = smooth_images(1)
    px = scorer.pixel_values(x)
    ids, mask = tokenize(scorer.tokenizer, ["a red cat on the mat"])
    n = int(mask.sum())
    full = scorer.model(px, ids, mask)
    short = scorer.model(px, ids[:, :n], mask[:, :n])
    torch.testing.assert_close(full, short, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# call contract
# ---------------------------------------------------------------------------------------------


def test_output_shape_dtype_and_sensitivity(scorer):
    x = smooth_images(5, 37, 53)
    out = scorer(x, PROMPTS[:5])
    assert out.shape == (5,) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert torch.isfinite(out).all() and not out.requires_grad
    same_img = scorer(x[:1].expand(3, -1, -1, -1), PROMPTS[:3])
    assert same_img.std() > 1e-3  # the prompt matters
    same_txt = scorer(x[:3], [PROMPTS[0]] * 3)
    assert same_txt.std() > 1e-3  # the image matters
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        scorer(x[:3], PROMPTS[:2])


def test_batch_of_8_equals_8_batches_of_1(scorer):
    x = smooth_images(8, seed=3)
    one_by_one = ImageRewardScorer(scorer.model, scorer.tokenizer, batch_size=1)
    torch.testing.assert_close(scorer(x, PROMPTS), one_by_one(x, PROMPTS), rtol=0, atol=1e-5)


def official_transform(size: int):
    """ImageReward/ImageReward.py::_transform (THUDM/ImageReward @ c1392c6d) built from torchvision:
    Resize(n, BICUBIC) and CenterCrop(n) on the PIL image, then RGB, ToTensor, Normalize."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    return Compose([
        Resize(size, interpolation=InterpolationMode.BICUBIC), CenterCrop(size), lambda im: im.convert("RGB"),
        ToTensor(), Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    ])


def random_pil_images():
    """8-bit images the way users pass them: white noise and smooth fields, square / portrait /
    landscape, odd sizes (crop offsets that round), one upscaled, and two non-RGB modes (RGBA with
    varying alpha, L) whose conversion upstream happens after the resize."""
    g = np.random.default_rng(0)
    ims = [Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((64, 64), (45, 71), (97, 50), (20, 27))]
    ims += to_pil(smooth_images(2, 41, 67, seed=21))
    ims.append(Image.fromarray(g.integers(0, 256, (50, 60, 4), dtype=np.uint8), "RGBA"))
    ims.append(Image.fromarray(g.integers(0, 256, (70, 40), dtype=np.uint8), "L"))
    return ims


# Tolerance of the PIL path: it makes the same PIL calls in the same order as the official transform
# and the same float32 operations afterwards (v/255, then (v - mean)/std), so it is bit-identical
# here; 1 float32 ulp of the largest normalised magnitude (|x| <= (1 - 0.408)/0.276 = 2.15 <
# 4, ulp 2**-21) leaves room for a platform that fuses the subtract/divide differently and is
# still ~1000x below one 8-bit level (1/255/0.27 = 0.0146), which any deviation in the resize,
# crop or conversion moves some pixels by.
PIL_ATOL = 2.0**-21


def test_pil_and_uint8_inputs_are_preprocessed_as_the_official_package(scorer):
    """PIL images (any size, any mode) and uint8 tensors get exactly the official ``_transform``
    pixels, and their scores are the scores of those pixels."""
    size = scorer.model.config.image_size
    t = official_transform(size)
    ims = random_pil_images()
    want = torch.stack([t(im) for im in ims])
    got = scorer.pixel_values(ims)
    assert got.dtype == torch.float32 and got.shape == want.shape == (len(ims), 3, size, size)
    torch.testing.assert_close(got, want, rtol=0, atol=PIL_ATOL)
    # scores of a mixed-size PIL batch = the model on the official pixels (chunked: batch_size 3)
    s3 = ImageRewardScorer(scorer.model, scorer.tokenizer, batch_size=3)
    prompts = (PROMPTS * 2)[: len(ims)]
    out = s3(ims, prompts)
    assert out.shape == (len(ims),) and out.dtype == torch.float32 and out.device.type == "cpu"
    torch.testing.assert_close(out, scorer.score_pixels(want, prompts), rtol=0, atol=1e-6)
    # a uint8 tensor [B, 3, H, W] is the same 8-bit image as the PIL image it came from
    x = smooth_images(4, 45, 71, seed=22)
    u8 = (x * 255).round().to(torch.uint8)
    want = torch.stack([t(im) for im in to_pil(x)])
    torch.testing.assert_close(scorer.pixel_values(u8), want, rtol=0, atol=PIL_ATOL)
    torch.testing.assert_close(scorer(u8, PROMPTS[:4]), scorer.score_pixels(want, PROMPTS[:4]), rtol=0, atol=1e-6)
    torch.testing.assert_close(scorer(to_pil(x), PROMPTS[:4]), scorer(u8, PROMPTS[:4]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="4 images but 3 prompts"):
        scorer(u8, PROMPTS[:3])


def test_float_path_vs_official_pil_transform(scorer):
    """A float tensor is preprocessed in torch (differentiable), which is not PIL's uint8 resampling.
    On the 8-bit image of the same pixels the official transform differs by at most 1.5/255 per
    pixel (stated; measured 1.05/255: PIL rounds to uint8 after each 1-D pass) and the score by at
    most 5 % of the scores' spread over the batch (stated; measured 2.4 %)."""
    x = smooth_images(8, 40, 48, seed=5)
    t_scores = scorer(x, PROMPTS)
    size = scorer.model.config.image_size
    pil_px = official_pil_pixels(x, size)
    ours_px = scorer.pixel_values(x)
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
    assert ((ours_px - pil_px) * std).abs().max() <= 1.5 / 255
    pil_scores = scorer(to_pil(x), PROMPTS)
    torch.testing.assert_close(pil_scores, scorer.score_pixels(pil_px, PROMPTS), rtol=0, atol=1e-6)
    tol = 0.05 * float(t_scores.std())
    assert 0 < (pil_scores - t_scores).abs().max() <= tol


def test_differentiable_path_gives_finite_gradients(official, scorer):
    cfg, sd, _ = official
    s = ImageRewardScorer(scorer.model, scorer.tokenizer, batch_size=3, differentiable=True)
    x = smooth_images(4, 36, 44, seed=7).requires_grad_(True)
    out = s(x, PROMPTS[:4])
    assert out.requires_grad and out.shape == (4,)
    (g,) = torch.autograd.grad(out.sum(), x)
    assert g.shape == x.shape and torch.isfinite(g).all() and g.abs().sum() > 0
    # and it is the gradient of the official computation (float64 reference on the same preprocessing)
    x64 = x.detach().double().requires_grad_(True)
    sd64 = {k: (v.double() if v.is_floating_point() else v) for k, v in sd.items()}
    ids, mask = tokenize(s.tokenizer, PROMPTS[:4])
    ref = ref_reward(sd64, s.pixel_values(x64), ids, mask, cfg)
    (g64,) = torch.autograd.grad(ref.sum(), x64)
    torch.testing.assert_close(g.double(), g64, rtol=1e-3, atol=1e-4 * float(g64.abs().max()))
    # the reward model stays frozen
    assert all(not p.requires_grad for p in s.model.parameters())


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="vision_heads"):
        ImageRewardConfig(vision_width=30, vision_heads=4)
    with pytest.raises(ValueError, match="unknown ImageRewardConfig fields \\['depth'\\]"):
        ImageRewardConfig.from_any({"depth": 3})
    with pytest.raises(ValueError, match="head_dims"):
        ImageRewardConfig(head_dims=(8, 8))
    cfg = tiny_config()
    with pytest.raises(ValueError, match="tokenizer has"):
        ImageRewardScorer(ImageRewardModel(ImageRewardConfig.tiny(vocab_size=10)), make_tokenizer())
    assert ImageRewardConfig.from_any(cfg.to_dict()) == cfg


def test_reduced_precision_model_keeps_a_float32_head(official, scorer):
    """dtype=bfloat16 runs the towers in bf16 and the MLP head in float32 (as upstream's ``.float()``);
    the result is float32 and within bf16 rounding of the float32 scores (stated: 15 % of the spread)."""
    cfg, sd, _ = official
    s16 = build_imagereward(sd, tokenizer=make_tokenizer(), config=cfg, dtype=torch.bfloat16)
    assert s16.model.vision.post_layernorm.weight.dtype == torch.bfloat16
    assert s16.model.head.layers[0].weight.dtype == torch.float32
    x = smooth_images(8, seed=11)
    a, b = scorer(x, PROMPTS), s16(x, PROMPTS)
    assert b.dtype == torch.float32 and torch.isfinite(b).all()
    assert (a - b).abs().max() <= 0.15 * float(a.std())
