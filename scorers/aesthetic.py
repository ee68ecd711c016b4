"""LAION aesthetic predictor v2 ("improved aesthetic predictor", C. Schuhmann, LAION, 2022).

``sac+logos+ava1-l14-linearMSE.pth`` is the bare state dict of a purely linear MLP
768→1024→128→64→16→1 (:class:`AestheticMLP` keeps its layout, so the file loads as is) on the
L2-normalised image embedding of OpenAI CLIP ViT-L/14 (open_clip ``ViT-L-14`` ``openai``, CLIP
preprocessing :data:`scorers._preprocess.CLIP_224`).

    score = MLP(e / |e|)      (roughly 1-10, the AVA rating scale; the prompt is not used)

How the release maps onto the code: docs/methods.md ("LAION aesthetic predictor v2").
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
