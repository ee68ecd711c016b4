"""LAION aesthetic predictor v2 ("improved aesthetic predictor", C. Schuhmann, LAION, 2022).

How the official checkpoint maps onto the code (checked against
``christophschuhmann/improved-aesthetic-predictor``, ``simple_inference.py``):

* ``sac+logos+ava1-l14-linearMSE.pth`` is the bare state dict of ``MLP(768).layers``, an
  ``nn.Sequential`` of Linear(768,1024), Dropout(0.2), Linear(1024,128), Dropout(0.2),
  Linear(128,64), Dropout(0.1), Linear(64,16), Linear(16,1) — no activations (the ReLUs are
  commented out in the release; "linearMSE"). Its keys are therefore ``layers.0``, ``layers.2``,
  ``layers.4``, ``layers.6``, ``layers.7`` (``.weight``/``.bias``); :class:`AestheticMLP` keeps that
  exact layout, so the file loads as is (``torch.load(weights_only=True)`` + strict key check).
* Input: the image embedding of OpenAI CLIP ViT-L/14 (``clip.load("ViT-L/14")``,
  ``encode_image``), L2-normalised (a zero vector is left unchanged). We use open_clip
  ``ViT-L-14`` with the ``openai`` weights (QuickGELU) and the CLIP preprocessing (224, bicubic
  resize of the shorter side, centre crop, OpenAI mean/std; :data:`scorers._preprocess.CLIP_224`).
  PIL images and uint8 tensors go through that transform as ``clip.load``'s ``preprocess`` runs it
  (PIL resize and crop, then RGB; :func:`scorers._preprocess.pil_pixel_values`), float tensors
  through the differentiable torch path (≤ 1.1/255 per pixel from PIL's uint8 rounding).
* score = MLP(ê) — roughly 1–10 (the AVA rating scale). The prompt is not used.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from scorers._loading import load_checkpoint_file, load_state_dict_strict, resolve_checkpoint_file, unwrap_state_dict
from scorers._preprocess import CLIP_224
from scorers.base import Scorer
from scorers.clip import OpenClipEncoder
from scorers.registry import register

FILENAME = "sac+logos+ava1-l14-linearMSE.pth"
DEFAULT_CHECKPOINT = (
    "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac%2Blogos%2Bava1-l14-linearMSE.pth"
)


class AestheticMLP(nn.Module):
    """The released predictor head: y = W₅(W₄(W₃(W₂(W₁x + b₁) + b₂) + b₃) + b₄) + b₅ on the
    normalised CLIP embedding x (dropouts are inactive at inference); layer indices match the file."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        if input_size < 1:
            raise ValueError(f"input_size must be >= 1, got {input_size}")
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def load_aesthetic_mlp(checkpoint: str, input_size: int = 768, what: str = "aesthetic checkpoint") -> AestheticMLP:
    """Read the predictor file (file / folder / URL / hub id) strictly into :class:`AestheticMLP`."""
    path = resolve_checkpoint_file(checkpoint, FILENAME, what)
    state = unwrap_state_dict(load_checkpoint_file(path), ("state_dict",))
    mlp = AestheticMLP(input_size)
    load_state_dict_strict(mlp, state, f"{what} ({path})")
    return mlp


class AestheticScorer(Scorer):
    name = "aesthetic"
    pil_input = True  # PIL / uint8 reach score_batch as they are: the encoder runs the official pipeline

    def __init__(self, encoder: OpenClipEncoder, mlp: AestheticMLP, **kw):
        super().__init__(**kw)
        self.encoder = encoder
        self.mlp = mlp.eval()
        for p in self.mlp.parameters():
            p.requires_grad_(False)

    def score_batch(self, images: torch.Tensor, prompts: List[str], **metadata) -> torch.Tensor:
        emb = self.encoder.encode_images(images)  # L2-normalised, float32
        return self.mlp(emb.to(next(self.mlp.parameters()).dtype)).squeeze(-1)


@register("aesthetic")
def aesthetic(
    device="cpu",
    dtype: torch.dtype = torch.float32,
    checkpoint: Optional[str] = None,
    batch_size: int = 16,
    differentiable: bool = False,
    clip_arch: str = "ViT-L-14",
    clip_checkpoint: str = "openai",
    clip_quick_gelu: Optional[bool] = True,
) -> AestheticScorer:
    """LAION aesthetic predictor v2. ``checkpoint``: the MLP file (default: the release on GitHub);
    ``clip_arch``/``clip_checkpoint``: the CLIP image encoder (default open_clip ViT-L-14 with the
    ``openai`` weights; a state-dict file also works); ``clip_quick_gelu``: True for OpenAI weights."""
    enc = OpenClipEncoder(
        clip_arch, clip_checkpoint, filename="open_clip_pytorch_model.bin", quick_gelu=clip_quick_gelu,
        spec=CLIP_224, device=device, dtype=dtype, what="aesthetic CLIP checkpoint",
    )
    dim = int(enc.model.visual.output_dim)
    mlp = load_aesthetic_mlp(checkpoint or DEFAULT_CHECKPOINT, dim).to(device=device, dtype=dtype)
    return AestheticScorer(enc, mlp, device=device, dtype=dtype, batch_size=batch_size, differentiable=differentiable)
