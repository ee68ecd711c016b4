"""ImageReward v1.0 (Xu et al., arXiv 2304.05977) without the ``image-reward`` package.

The published ``ImageReward.pt`` (a BLIP ViT-L/16 image encoder, BLIP's BERT-base "MED" text
encoder with cross-attention to the image tokens, and a linear reward head) is loaded into
transformers' :class:`~transformers.BlipVisionModel` and :class:`~transformers.BlipTextModel`
through :data:`KEY_TABLE`. Scoring follows the official ``ImageReward.score``:

    r = mlp(text_encoder(prompt, cross-attending to vit(image))[first token])
    score = (r - 0.16717362830052426) / 1.0333394966054072

with the OpenAI CLIP transform at 224 px (PIL on PIL/uint8 input, as upstream; differentiable torch
on float input) and the bert-base-uncased tokenizer plus ``[DEC]``/``[ENC]`` at ``max_length=35``.
How each checkpoint key maps onto the modules, and the measured float-path differences, are in
docs/methods.md ("ImageReward v1.0").
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from scorers._loading import CheckpointError, check_state_dict, load_checkpoint_file, load_state_dict_strict
from scorers._preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PreprocessSpec,
    is_pil_or_uint8,
    pil_pixel_values,
    preprocess,
)
from scorers._loading import strip_prefix, unwrap_state_dict
from scorers.base import Scorer
from scorers.registry import register

logger = logging.getLogger(__name__)

# ``self.mean`` / ``self.std`` of the official ImageReward class.
REWARD_MEAN: float = 0.16717362830052426
REWARD_STD: float = 1.0333394966054072
# The official ``self.blip.tokenizer(prompt, padding='max_length', truncation=True, max_length=35)``.
MAX_LENGTH: int = 35
# The hub repository and file name of the release (the official package's ``_MODELS``).
DEFAULT_CHECKPOINT: str = "THUDM/ImageReward"
CHECKPOINT_FILENAME: str = "ImageReward.pt"
DEFAULT_TOKENIZER: str = "bert-base-uncased"
DEC_TOKEN: str = "[DEC]"
ENC_TOKEN: str = "[ENC]"


# --------------------------------------------------------------------------------------------------
# Architecture
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRewardConfig:
    """Sizes of the ImageReward architecture. Defaults are the published v1.0 model:
    ``BLIP_Pretrain(image_size=224, vit='large')`` (BLIP's ``create_vit``) and
    ``med_config.json``; ``encoder_width`` = the ViT width, as ``BLIP_Pretrain`` sets it."""

    image_size: int = 224  # input resolution of the ViT (and of the resize/crop)
    patch_size: int = 16  # ViT patch size
    vision_width: int = 1024  # ViT-L width
    vision_layers: int = 24  # ViT-L depth
    vision_heads: int = 16  # ViT-L heads
    vision_mlp: int = 4096  # mlp_ratio 4
    vision_eps: float = 1e-6  # timm ViT: partial(nn.LayerNorm, eps=1e-6)
    text_width: int = 768  # med_config hidden_size
    text_layers: int = 12  # med_config num_hidden_layers
    text_heads: int = 12  # med_config num_attention_heads
    text_intermediate: int = 3072  # med_config intermediate_size
    vocab_size: int = 30524  # med_config vocab_size: bert-base-uncased 30522 + [DEC] + [ENC]
    max_position_embeddings: int = 512  # med_config
    text_eps: float = 1e-12  # med_config layer_norm_eps
    pad_token_id: int = 0  # med_config pad_token_id
    embed_dim: int = 256  # BLIP_Pretrain embed_dim (vision_proj / text_proj, unused by the reward)
    head_dims: Tuple[int, int, int, int] = (1024, 128, 64, 16)  # ImageReward MLP hidden sizes
    head_dropouts: Tuple[float, float, float] = (0.2, 0.2, 0.1)  # after the first three Linear layers

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("vision_eps", "text_eps"):
                if not v > 0:
                    raise ValueError(f"{f.name} must be > 0, got {v}")
            elif f.name == "head_dims":
                if len(v) != 4 or any(int(d) < 1 for d in v):
                    raise ValueError(f"head_dims must be 4 positive sizes (the official head has 5 Linear layers), got {v}")
            elif f.name == "head_dropouts":
                if len(v) != 3 or any(not 0.0 <= p < 1.0 for p in v):
                    raise ValueError(f"head_dropouts must be 3 probabilities in [0, 1), got {v}")
            elif f.name == "pad_token_id":
                if v < 0:
                    raise ValueError(f"pad_token_id must be >= 0, got {v}")
            elif v < 1:
                raise ValueError(f"{f.name} must be >= 1, got {v}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.vision_width % self.vision_heads:
            raise ValueError(f"vision_width ({self.vision_width}) must be divisible by vision_heads ({self.vision_heads})")
        if self.text_width % self.text_heads:
            raise ValueError(f"text_width ({self.text_width}) must be divisible by text_heads ({self.text_heads})")
        if self.max_position_embeddings < MAX_LENGTH:
            raise ValueError(f"max_position_embeddings must be >= {MAX_LENGTH} (the prompt length), got {self.max_position_embeddings}")

    @classmethod
    def from_any(cls, config: Union["ImageRewardConfig", Mapping[str, Any], None]) -> "ImageRewardConfig":
        """``None`` → the published sizes; a mapping → ``ImageRewardConfig(**mapping)`` (unknown keys are an error)."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        if isinstance(config, Mapping):
            names = {f.name for f in fields(cls)}
            unknown = sorted(set(config) - names)
            if unknown:
                raise ValueError(f"config: unknown ImageRewardConfig fields {unknown} (valid: {sorted(names)})")
            kw = dict(config)
            for k in ("head_dims", "head_dropouts"):
                if k in kw:
                    kw[k] = tuple(kw[k])
            return cls(**kw)
        raise TypeError(f"config must be an ImageRewardConfig, a dict or None, got {type(config).__name__}")

    @classmethod
    def tiny(cls, vocab_size: int = 64) -> "ImageRewardConfig":
        """A reduced config of the same architecture (for tests and examples; seconds on a CPU)."""
        return cls(
            image_size=32, patch_size=8, vision_width=32, vision_layers=2, vision_heads=4, vision_mlp=64,
            text_width=32, text_layers=2, text_heads=4, text_intermediate=64, vocab_size=vocab_size,
            max_position_embeddings=40, embed_dim=16, head_dims=(48, 24, 16, 8),
        )

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def vision_config(self):
        """The :class:`transformers.BlipVisionConfig` of the image tower."""
        from transformers import BlipVisionConfig  # heavy: transformers, only when ImageReward is built

        return BlipVisionConfig(
            hidden_size=self.vision_width, intermediate_size=self.vision_mlp, num_hidden_layers=self.vision_layers,
            num_attention_heads=self.vision_heads, image_size=self.image_size, patch_size=self.patch_size,
            hidden_act="gelu", layer_norm_eps=self.vision_eps, attention_dropout=0.0,
        )

    def text_config(self):
        """The :class:`transformers.BlipTextConfig` of the text encoder (``is_decoder=True`` only makes
        transformers build the cross-attention blocks; the model is run bidirectionally)."""
        from transformers import BlipTextConfig  # heavy: transformers, only when ImageReward is built

        return BlipTextConfig(
            vocab_size=self.vocab_size, hidden_size=self.text_width, encoder_hidden_size=self.vision_width,
            intermediate_size=self.text_intermediate, num_hidden_layers=self.text_layers,
            num_attention_heads=self.text_heads, max_position_embeddings=self.max_position_embeddings,
            hidden_act="gelu", layer_norm_eps=self.text_eps, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, pad_token_id=self.pad_token_id, bos_token_id=None, eos_token_id=None,
            sep_token_id=None, is_decoder=True, use_cache=False,
        )


def normalize_reward(raw: torch.Tensor, mean: float = REWARD_MEAN, std: float = REWARD_STD) -> torch.Tensor:
    """ImageReward's published standardisation: score = (r − mean) / std, with
    mean = 0.16717362830052426, std = 1.0333394966054072 (Xu et al., arXiv 2304.05977; the
    official ``ImageReward`` class)."""
    if not std > 0:
        raise ValueError(f"std must be > 0, got {std}")
    return (raw - mean) / std


class RewardHead(nn.Module):
    """ImageReward's MLP: Linear(d, h0), Dropout, Linear(h0, h1), Dropout, Linear(h1, h2), Dropout,
    Linear(h2, h3), Linear(h3, 1) — no non-linearity (Xu et al., arXiv 2304.05977; the module indices
    0, 2, 4, 6, 7 of ``layers`` are the official ``mlp.layers.*`` keys)."""

    def __init__(self, in_dim: int, dims: Sequence[int] = (1024, 128, 64, 16), dropouts: Sequence[float] = (0.2, 0.2, 0.1)):
        super().__init__()
        h0, h1, h2, h3 = (int(d) for d in dims)
        p0, p1, p2 = (float(p) for p in dropouts)
        self.layers = nn.Sequential(
            nn.Linear(in_dim, h0), nn.Dropout(p0),
            nn.Linear(h0, h1), nn.Dropout(p1),
            nn.Linear(h1, h2), nn.Dropout(p2),
            nn.Linear(h2, h3),
            nn.Linear(h3, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ImageRewardModel(nn.Module):
    """BLIP ViT + BLIP text encoder with cross-attention + reward head (ImageReward v1.0 architecture).

    ``forward(pixel_values, input_ids, attention_mask)`` returns the standardised reward [B] (float32).
    ``vision_proj``/``text_proj`` are BLIP's contrastive projections: they are in the published file and
    kept here so it loads strictly, but the reward does not use them.
    """

    def __init__(self, config: Optional[ImageRewardConfig] = None):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel  # heavy: transformers, only when ImageReward is built

        self.config = ImageRewardConfig.from_any(config)
        c = self.config
        self.vision = BlipVisionModel(c.vision_config())
        self.text = BlipTextModel(c.text_config(), add_pooling_layer=False)
        self.vision_proj = nn.Linear(c.vision_width, c.embed_dim)
        self.text_proj = nn.Linear(c.text_width, c.embed_dim)
        self.head = RewardHead(c.text_width, c.head_dims, c.head_dropouts)
        self.reward_mean = REWARD_MEAN
        self.reward_std = REWARD_STD

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """All ViT tokens after the final LayerNorm: [B, 1 + (S/P)², vision_width]."""
        return self.vision(pixel_values=pixel_values).last_hidden_state

    def features(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Hidden state of the first text token after cross-attending to the image: [B, text_width]."""
        if pixel_values.ndim != 4 or input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
            raise ValueError(
                f"expected pixel_values [B, 3, H, W] and input_ids/attention_mask [B, L] of one shape, got "
                f"{tuple(pixel_values.shape)}, {tuple(input_ids.shape)}, {tuple(attention_mask.shape)}"
            )
        if pixel_values.shape[0] != input_ids.shape[0]:
            raise ValueError(f"batch sizes differ: {pixel_values.shape[0]} images, {input_ids.shape[0]} prompts")
        img = self.image_embeds(pixel_values)
        img_mask = torch.ones(img.shape[:-1], dtype=torch.long, device=img.device)
        out = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=img,
            encoder_attention_mask=img_mask,
            is_decoder=False,
            return_dict=True,
        )
        return out.last_hidden_state[:, 0, :]

    def raw_reward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """r = mlp(feature) before standardisation, float32 [B] (the head runs in float32 as upstream)."""
        feats = self.features(pixel_values, input_ids, attention_mask).float()
        head_dtype = self.head.layers[0].weight.dtype
        return self.head(feats.to(head_dtype)).float().squeeze(-1)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return normalize_reward(self.raw_reward(pixel_values, input_ids, attention_mask), self.reward_mean, self.reward_std)


# --------------------------------------------------------------------------------------------------
# Key-mapping table: official ImageReward.pt names <-> ours
# --------------------------------------------------------------------------------------------------

# (official, ours). An entry ending in "." maps a prefix (the rest of the key is kept); other
# entries map one whole key. "{i}" stands for a layer index. Order matters: the first match wins.
KEY_TABLE: Tuple[Tuple[str, str], ...] = (
    # BLIP ViT (timm layout) -> transformers BlipVisionModel
    ("blip.visual_encoder.cls_token", "vision.embeddings.class_embedding"),
    ("blip.visual_encoder.pos_embed", "vision.embeddings.position_embedding"),
    ("blip.visual_encoder.patch_embed.proj.", "vision.embeddings.patch_embedding."),
    ("blip.visual_encoder.blocks.{i}.norm1.", "vision.encoder.layers.{i}.layer_norm1."),
    ("blip.visual_encoder.blocks.{i}.attn.qkv.", "vision.encoder.layers.{i}.self_attn.qkv."),
    ("blip.visual_encoder.blocks.{i}.attn.proj.", "vision.encoder.layers.{i}.self_attn.projection."),
    ("blip.visual_encoder.blocks.{i}.norm2.", "vision.encoder.layers.{i}.layer_norm2."),
    ("blip.visual_encoder.blocks.{i}.mlp.fc1.", "vision.encoder.layers.{i}.mlp.fc1."),
    ("blip.visual_encoder.blocks.{i}.mlp.fc2.", "vision.encoder.layers.{i}.mlp.fc2."),
    ("blip.visual_encoder.norm.", "vision.post_layernorm."),
    # BLIP MED text encoder -> transformers BlipTextModel, a port of the same
    # code: the sub-module names (embeddings.*, encoder.layer.{i}.attention.self.query, ...
    # crossattention.*, intermediate.*, output.*) are identical.
    ("blip.text_encoder.", "text."),
    ("blip.vision_proj.", "vision_proj."),
    ("blip.text_proj.", "text_proj."),
    # ImageReward MLP head
    ("mlp.layers.", "head.layers."),
)

# Official keys that hold a derived value rather than weights: checked (if present), not loaded.
# BLIP's MED registers ``position_ids`` = arange(max_position_embeddings) as a persistent buffer;
# transformers keeps it non-persistent.
DERIVED_KEYS: Tuple[str, ...] = ("blip.text_encoder.embeddings.position_ids",)


def _rule_regex(pattern: str) -> "re.Pattern[str]":
    body = re.escape(pattern).replace(re.escape("{i}"), r"(?P<i>\d+)")
    return re.compile("^" + body + ("(?P<rest>.+)$" if pattern.endswith(".") else "$"))


_FORWARD = tuple((_rule_regex(o), u) for o, u in KEY_TABLE)
_BACKWARD = tuple((_rule_regex(u), o) for o, u in KEY_TABLE)


def _apply(rules, key: str, direction: str) -> str:
    for rx, template in rules:
        m = rx.match(key)
        if m:
            out = template.replace("{i}", m.group("i")) if "{i}" in template else template
            if template.endswith("."):
                out += m.group("rest")
            return out
    raise KeyError(f"no rule in imagereward.KEY_TABLE maps the {direction} key {key!r}")


def official_to_ours(key: str) -> str:
    """Name in :class:`ImageRewardModel` of the official ``ImageReward.pt`` key ``key`` (via :data:`KEY_TABLE`)."""
    return _apply(_FORWARD, key, "official")


def ours_to_official(key: str) -> str:
    """Official ``ImageReward.pt`` name of the :class:`ImageRewardModel` key ``key`` (inverse of :func:`official_to_ours`)."""
    return _apply(_BACKWARD, key, "model")


def official_key_shapes(model: ImageRewardModel) -> Dict[str, Tuple[int, ...]]:
    """Official key → shape that a file for ``model``'s config must have (derived keys excluded)."""
    return {ours_to_official(k): tuple(v.shape) for k, v in model.state_dict().items()}


def convert_official_state_dict(
    state_dict: Mapping[str, torch.Tensor], model: ImageRewardModel, what: str = "ImageReward checkpoint"
) -> Dict[str, torch.Tensor]:
    """Check an official-layout state dict against ``model`` and rename it to ``model``'s keys.

    Raises :class:`CheckpointError` naming missing/unexpected official keys and every shape mismatch
    (key, checkpoint shape, model shape), or a derived buffer whose value is not what the code derives.
    """
    sd = dict(strip_prefix(unwrap_state_dict(state_dict), "module."))
    expected = official_key_shapes(model)
    max_pos = model.config.max_position_embeddings
    for key in DERIVED_KEYS:
        if key in sd:
            value = sd.pop(key)
            want = torch.arange(max_pos).expand(1, -1)
            if tuple(value.shape) != tuple(want.shape):
                raise CheckpointError(f"{what}: shape mismatch for {key!r}: checkpoint {tuple(value.shape)} vs model {tuple(want.shape)}")
            if not torch.equal(value.to("cpu", torch.long), want):
                raise CheckpointError(f"{what}: {key!r} must be arange({max_pos}), the file holds other values")
    check_state_dict(expected, sd, what)
    return {official_to_ours(k): v for k, v in sd.items()}


def load_official_weights(model: ImageRewardModel, checkpoint: Union[str, "os.PathLike[str]", Mapping[str, torch.Tensor]]) -> ImageRewardModel:
    """Load an official ``ImageReward.pt`` (a path, read with ``weights_only=True``, or a state dict)
    into ``model`` strictly; returns ``model``."""
    if isinstance(checkpoint, Mapping):
        sd, what = checkpoint, "ImageReward state dict"
    else:
        sd, what = load_checkpoint_file(checkpoint), f"ImageReward checkpoint {os.fspath(checkpoint)}"
    ours = convert_official_state_dict(sd, model, what)
    load_state_dict_strict(model, ours, what)
    return model


def resolve_checkpoint(checkpoint: Union[str, "os.PathLike[str]", None]) -> str:
    """A local file, a folder holding ``ImageReward.pt``, or a hub repo id (default ``THUDM/ImageReward``,
    fetched with ``huggingface_hub.hf_hub_download``) → local path of the ``.pt`` file."""
    ckpt = DEFAULT_CHECKPOINT if checkpoint is None else os.fspath(checkpoint)
    if os.path.isfile(ckpt):
        return ckpt
    if os.path.isdir(ckpt):
        path = os.path.join(ckpt, CHECKPOINT_FILENAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint folder {ckpt} has no {CHECKPOINT_FILENAME}")
        return path
    if ckpt.count("/") == 1 and not ckpt.startswith((".", "/")) and not ckpt.endswith((".pt", ".pth")):
        from huggingface_hub import hf_hub_download  # heavy: only to download the hub checkpoint

        try:
            return hf_hub_download(repo_id=ckpt, filename=CHECKPOINT_FILENAME)
        except Exception as e:  # offline, unknown repo, ...
            raise FileNotFoundError(f"checkpoint {ckpt!r}: not a local file or folder, and the hub download failed ({e})") from e
    raise FileNotFoundError(f"checkpoint not found: {ckpt}")


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def prepare_tokenizer(tokenizer: Any = DEFAULT_TOKENIZER):
    """BLIP's tokenizer (BLIP's ``init_tokenizer``): a BERT WordPiece tokenizer (a folder or hub
    id, default ``bert-base-uncased``, or a tokenizer object) with ``[DEC]`` added as bos token and
    ``[ENC]`` as an additional special token; ``tokenizer.enc_token_id`` is set as upstream. Tokens
    already present are not added twice."""
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import BertTokenizer  # heavy: transformers, only when ImageReward is built

        tokenizer = BertTokenizer.from_pretrained(os.fspath(tokenizer))
    if not callable(tokenizer) or not hasattr(tokenizer, "add_special_tokens"):
        raise TypeError(f"tokenizer must be a path/hub id or a transformers tokenizer, got {type(tokenizer).__name__}")
    vocab = tokenizer.get_vocab()
    if DEC_TOKEN not in vocab:
        tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    if ENC_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [ENC_TOKEN]})
    tokenizer.enc_token_id = tokenizer.convert_tokens_to_ids(ENC_TOKEN)
    return tokenizer


def tokenize(tokenizer, prompts: Sequence[str], max_length: int = MAX_LENGTH) -> Tuple[torch.Tensor, torch.Tensor]:
    """Official text input: ``padding="max_length"``, ``truncation=True``, ``max_length=35`` → (ids, mask) [B, 35]."""
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompts[{i}] must be a str, got {type(p).__name__}")
    enc = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


# --------------------------------------------------------------------------------------------------
# Scorer
# --------------------------------------------------------------------------------------------------


class ImageRewardScorer(Scorer):
    """ImageReward v1.0 standardised reward of (image, prompt) pairs; higher is better.

    ``images``: a float tensor [B, 3, H, W] in [0, 1] (torch preprocessing, differentiable), or PIL
    images / a ``torch.uint8`` tensor [B, 3, H, W] (the official PIL preprocessing; PIL images may
    differ in size). The two differ by the uint8 resampling of PIL (module docstring, step 1).

    Args:
        model: an :class:`ImageRewardModel` with weights loaded.
        tokenizer: a tokenizer prepared by :func:`prepare_tokenizer`.
        device, dtype, batch_size, differentiable: see :class:`scorers.base.Scorer`.
    """

    name = "imagereward"
    pil_input = True  # PIL / uint8 chunks reach score_batch as they are (the official preprocessing)

    def __init__(self, model: ImageRewardModel, tokenizer, device="cpu", dtype=torch.float32, batch_size: int = 16, differentiable: bool = False):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size, differentiable=differentiable)
        n_tok = len(tokenizer)
        if n_tok > model.config.vocab_size:
            raise ValueError(
                f"tokenizer has {n_tok} tokens but the model's vocab_size is {model.config.vocab_size}: "
                "use the tokenizer the checkpoint was trained with (bert-base-uncased + [DEC] + [ENC])"
            )
        if n_tok != model.config.vocab_size:
            logger.warning("imagereward: tokenizer has %d tokens, model vocab_size is %d", n_tok, model.config.vocab_size)
        self.tokenizer = tokenizer
        self.model = model.to(self.device, dtype).eval()
        self.model.head.float()  # upstream applies the MLP to float32 features
        self.model.requires_grad_(False)
        size = model.config.image_size
        # The official ``_transform``: Resize(224, BICUBIC) + CenterCrop(224) on the PIL image,
        # RGB, ToTensor, Normalize with the OpenAI CLIP mean/std (torchvision's PIL pipeline).
        self.preprocess_spec = PreprocessSpec(resize=size, crop=size, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
                                              pil_pipeline="torchvision")

    def pixel_values(self, images) -> torch.Tensor:
        """Images → the model's normalised [b, 3, S, S] input.

        Float [b, 3, H, W] in [0, 1]: torch resize/crop/normalise (differentiable). PIL image(s) or a
        uint8 tensor: the official PIL pipeline (ImageReward's ``_transform``), float32."""
        if is_pil_or_uint8(images):
            return pil_pixel_values(images, self.preprocess_spec)
        return preprocess(images, self.preprocess_spec)

    def score_pixels(self, pixel_values: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Standardised rewards [b] (float32) from already preprocessed pixels."""
        ids, mask = tokenize(self.tokenizer, prompts)
        pv = pixel_values.to(self.device, self.dtype)
        return self.model(pv, ids.to(self.device), mask.to(self.device))

    def score_batch(self, images: torch.Tensor, prompts: List[str], **metadata) -> torch.Tensor:
        return self.score_pixels(self.pixel_values(images), prompts)


def build_imagereward(
    checkpoint: Union[str, "os.PathLike[str]", Mapping[str, torch.Tensor], None] = None,
    tokenizer: Any = DEFAULT_TOKENIZER,
    config: Union[ImageRewardConfig, Mapping[str, Any], None] = None,
    device="cpu",
    dtype=torch.float32,
    batch_size: int = 16,
    differentiable: bool = False,
) -> ImageRewardScorer:
    """Build the ImageReward scorer: architecture from ``config`` (default: the published sizes), weights
    from the official ``checkpoint`` (path, folder, hub id — default ``THUDM/ImageReward`` — or a state
    dict in the official layout), BLIP's tokenizer from ``tokenizer``."""
    cfg = ImageRewardConfig.from_any(config)
    tok = prepare_tokenizer(tokenizer)
    model = ImageRewardModel(cfg)
    source = checkpoint if isinstance(checkpoint, Mapping) else resolve_checkpoint(checkpoint)
    load_official_weights(model, source)
    return ImageRewardScorer(model, tok, device=device, dtype=dtype, batch_size=batch_size, differentiable=differentiable)


@register("imagereward")
def make_imagereward(
    device="cpu",
    dtype=torch.float32,
    checkpoint=None,
    batch_size: int = 16,
    differentiable: bool = False,
    tokenizer: Any = DEFAULT_TOKENIZER,
    config: Union[ImageRewardConfig, Mapping[str, Any], None] = None,
    **options,
) -> ImageRewardScorer:
    """Registry factory for ``imagereward`` (options: ``tokenizer`` folder/hub id/object, ``config``)."""
    if options:
        raise TypeError(f"imagereward: unknown options {sorted(options)} (valid: tokenizer, config, batch_size, differentiable)")
    return build_imagereward(checkpoint, tokenizer=tokenizer, config=config, device=device, dtype=dtype,
                             batch_size=batch_size, differentiable=differentiable)
