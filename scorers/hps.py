"""HPS v2 and v2.1 (Wu et al., "Human Preference Score v2", arXiv 2306.09341).

How the official checkpoints map onto the code (checked against ``tgxs002/HPSv2``,
``hpsv2/img_score.py`` and its bundled ``hpsv2/src/open_clip``):

* Files ``HPS_v2_compressed.pt`` (``hpsv2``) and ``HPS_v2.1_compressed.pt`` (``hpsv21``) in the hub
  repo ``xswu/HPSv2``. Each is a dict whose ``"state_dict"`` entry is the state dict of an open_clip
  ``ViT-H-14`` CLIP (no ``module.`` prefix; keys ``visual.*``, ``transformer.resblocks.*``,
  ``token_embedding.weight``, ``positional_embedding``, ``ln_final.*``, ``text_projection``,
  ``logit_scale``); the official code loads it with ``model.load_state_dict(checkpoint['state_dict'])``
  (strict). The bundled open_clip's ``CLIP`` and today's ``open_clip.model.CLIP`` have the same
  parameter names and shapes and compute the same features (checked once on a reduced config),
  so the file is read into current open_clip with ``torch.load(weights_only=True)`` and our strict
  key check.
* Tokenizer: ``get_tokenizer('ViT-H-14')`` — open_clip's ``SimpleTokenizer`` (context 77).
* Preprocessing: ``create_model_and_transforms(..., light_augmentation=True)`` → ``ToTensor``,
  ``ResizeMaxSize(224)`` (longer side to 224, bicubic, zero-pad to a square), ``Normalize`` with the
  OpenAI CLIP mean/std (:data:`scorers._preprocess.HPS_224`). The official resize runs on the float
  tensor, so our float path is the official transform; PIL images and uint8 tensors are converted
  to RGB and ``ToTensor``-ed first (:func:`scorers._preprocess.pil_pixel_values`; upstream would
  keep an RGBA image's 4 channels), and may differ in size.
* score = diag(image_features @ text_features.T) with both L2-normalised (``output_dict=True``
  features of open_clip are normalised), i.e. cos(image, text) of matched pairs; typical values
  are 0.2–0.35. The official scorer runs under CUDA autocast (fp16); pass ``dtype`` to match.
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
