"""HPS v2 and v2.1 (Wu et al., "Human Preference Score v2", arXiv 2306.09341).

The official checkpoints (``HPS_v2_compressed.pt`` for ``hpsv2``, ``HPS_v2.1_compressed.pt`` for
``hpsv21``, hub repo ``xswu/HPSv2``) hold the state dict of an open_clip ``ViT-H-14`` CLIP; they are
read into current open_clip with ``torch.load(weights_only=True)`` and a strict key check. The
tokenizer is open_clip's (context 77); preprocessing is HPS v2's ``ResizeMaxSize(224)`` letterbox
(:data:`scorers._preprocess.HPS_224`), whose float path is the official transform.

    score = cos(image_features, text_features)      (matched pairs; typically 0.2-0.35)

How the checkpoint maps onto the code: docs/methods.md ("HPS v2 / v2.1").
"""
from __future__ import annotations

from typing import List, Optional

import torch

from scorers._preprocess import HPS_224
from scorers.base import Scorer
from scorers.clip import OpenClipEncoder
from scorers.registry import register

HUB_REPO = "xswu/HPSv2"
FILENAMES = {"hpsv2": "HPS_v2_compressed.pt", "hpsv21": "HPS_v2.1_compressed.pt"}
ARCH = "ViT-H-14"


def hps_from_embeddings(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """s_i = ⟨ê_i, t̂_i⟩, the diagonal of Ê·T̂ᵀ for L2-normalised embeddings (HPS v2, arXiv 2306.09341)."""
    if image_emb.shape != text_emb.shape:
        raise ValueError(f"image_emb {tuple(image_emb.shape)} and text_emb {tuple(text_emb.shape)} must match")
    return (image_emb * text_emb).sum(-1)


class HPSScorer(Scorer):
    pil_input = True  # PIL / uint8 reach score_batch as they are: the encoder runs the official pipeline

    def __init__(self, encoder: OpenClipEncoder, name: str, **kw):
        super().__init__(**kw)
        self.encoder = encoder
        self.name = name

    def score_batch(self, images: torch.Tensor, prompts: List[str], **metadata) -> torch.Tensor:
        return hps_from_embeddings(self.encoder.encode_images(images), self.encoder.encode_texts(prompts))


def _make(version: str, device, dtype, checkpoint, batch_size, differentiable, arch) -> HPSScorer:
    enc = OpenClipEncoder(
        arch,
        checkpoint or HUB_REPO,
        filename=FILENAMES[version],
        quick_gelu=False,  # official: force_quick_gelu=False, ViT-H-14 uses GELU
        spec=HPS_224,
        device=device,
        dtype=dtype,
        wrappers=("state_dict",),
        what=f"{version} checkpoint",
    )
    return HPSScorer(enc, version, device=device, dtype=dtype, batch_size=batch_size, differentiable=differentiable)


@register("hpsv2")
def hpsv2(
    device="cpu",
    dtype: torch.dtype = torch.float32,
    checkpoint: Optional[str] = None,
    batch_size: int = 16,
    differentiable: bool = False,
    arch: str = ARCH,
) -> HPSScorer:
    """HPS v2.0. ``checkpoint``: ``HPS_v2_compressed.pt`` as a file, a folder holding it, a URL or a hub
    id (default ``xswu/HPSv2``). ``arch``: open_clip model name or JSON config (default ViT-H-14)."""
    return _make("hpsv2", device, dtype, checkpoint, batch_size, differentiable, arch)


@register("hpsv21")
def hpsv21(
    device="cpu",
    dtype: torch.dtype = torch.float32,
    checkpoint: Optional[str] = None,
    batch_size: int = 16,
    differentiable: bool = False,
    arch: str = ARCH,
) -> HPSScorer:
    """HPS v2.1. ``checkpoint``: ``HPS_v2.1_compressed.pt`` as a file, a folder holding it, a URL or a
    hub id (default ``xswu/HPSv2``). ``arch``: open_clip model name or JSON config (default ViT-H-14)."""
    return _make("hpsv21", device, dtype, checkpoint, batch_size, differentiable, arch)
