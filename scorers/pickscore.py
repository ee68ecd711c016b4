"""PickScore_v1 (Kirstain et al., "Pick-a-Pic", arXiv 2305.01569).

``yuvalkirstain/PickScore_v1`` is a transformers ``CLIPModel`` folder, loaded with every key checked
(:func:`scorers.clip.load_hf_clip_model`); prompts and images are processed as the authors' processor
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` does (PIL pipeline on PIL/uint8 input, differentiable torch
on float input).

    score = scale * logit_scale.exp() * cos(image, text)      (matched pairs; typically 20-23)

Option ``scale`` defaults to 1.0, the authors' score (Flow-GRPO trains on ``scale=1/26``). How the
checkpoint maps onto the code: docs/methods.md ("PickScore_v1").
"""
from __future__ import annotations

from typing import List, Optional

import torch

from scorers.base import Scorer
from scorers.clip import HFClipEncoder
from scorers.registry import register

DEFAULT_CHECKPOINT = "yuvalkirstain/PickScore_v1"
DEFAULT_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def pickscore_from_embeddings(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """s_i = exp(logit_scale) · ⟨ê_i, t̂_i⟩ for L2-normalised image/text embeddings of matched pairs
    (PickScore, Kirstain et al., arXiv 2305.01569)."""
    if image_emb.shape != text_emb.shape:
        raise ValueError(f"image_emb {tuple(image_emb.shape)} and text_emb {tuple(text_emb.shape)} must match")
    return logit_scale.float().exp() * (image_emb * text_emb).sum(-1)


class PickScoreScorer(Scorer):
    name = "pickscore"
    pil_input = True  # PIL / uint8 reach score_batch as they are: the encoder runs the official pipeline

    def __init__(self, encoder: HFClipEncoder, scale: float = 1.0, **kw):
        super().__init__(**kw)
        self.encoder = encoder
        self.scale = float(scale)

    def score_batch(self, images: torch.Tensor, prompts: List[str], **metadata) -> torch.Tensor:
        img = self.encoder.encode_images(images)
        txt = self.encoder.encode_texts(prompts)
        return self.scale * pickscore_from_embeddings(img, txt, self.encoder.logit_scale)


@register("pickscore")
def pickscore(
    device="cpu",
    dtype: torch.dtype = torch.float32,
    checkpoint: Optional[str] = None,
    batch_size: int = 16,
    differentiable: bool = False,
    processor: Optional[str] = None,
    scale: float = 1.0,
) -> PickScoreScorer:
    """PickScore_v1. ``checkpoint``: hub id or local folder (default ``yuvalkirstain/PickScore_v1``);
    ``processor``: hub id or folder with the tokenizer and preprocessor config (default
    ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``, as the authors); ``scale``: multiplies the score."""
    enc = HFClipEncoder(
        checkpoint or DEFAULT_CHECKPOINT, processor or DEFAULT_PROCESSOR, device=device, dtype=dtype,
        what="pickscore checkpoint",
    )
    return PickScoreScorer(enc, scale, device=device, dtype=dtype, batch_size=batch_size, differentiable=differentiable)
