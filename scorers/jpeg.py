"""JPEG (in)compressibility rewards of DDPO (Black et al., arXiv 2305.13301).

DDPO's definition (its reward code; docs/methods.md, "Upstream references"): quantise the image to uint8 with
``(x · 255).round().clamp(0, 255)``, save it with PIL as JPEG at quality 95, and take the file size
in kilobytes (bytes / 1000). ``jpeg_incompressibility`` = size; ``jpeg_compressibility`` = −size.
The encoding is not differentiable: asking for ``differentiable=True`` is an error.
"""
from __future__ import annotations

import io
from typing import List

import numpy as np
import torch
from PIL import Image

from scorers.base import Scorer
from scorers.registry import register


def jpeg_size_kb(image_uint8_hwc: np.ndarray, quality: int = 95) -> float:
    """Size in kB (bytes / 1000) of the PIL JPEG encoding at ``quality`` of an [H, W, 3] uint8 image
    (DDPO, arXiv 2305.13301)."""
    if image_uint8_hwc.dtype != np.uint8 or image_uint8_hwc.ndim != 3 or image_uint8_hwc.shape[2] != 3:
        raise ValueError(f"image must be uint8 [H, W, 3], got {image_uint8_hwc.dtype} {image_uint8_hwc.shape}")
    buf = io.BytesIO()
    Image.fromarray(image_uint8_hwc).save(buf, format="JPEG", quality=int(quality))
    return buf.tell() / 1000.0


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [0, 1] → uint8 [B, H, W, 3] with DDPO's quantisation (x·255).round().clamp(0, 255)."""
    return (images.detach() * 255).round().clamp(0, 255).to(torch.uint8).cpu().permute(0, 2, 3, 1).numpy()


class JpegScorer(Scorer):
    def __init__(self, name: str, sign: float, quality: int = 95, **kw):
        if kw.get("differentiable"):
            raise ValueError(f"{name}: JPEG file size is not differentiable; use differentiable=False")
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"quality must be in [1, 100], got {quality}")
        super().__init__(**kw)
        self.name = name
        self.sign = float(sign)
        self.quality = int(quality)

    def score_batch(self, images: torch.Tensor, prompts: List[str], **metadata) -> torch.Tensor:
        arr = to_uint8_hwc(images)
        sizes = [jpeg_size_kb(a, self.quality) for a in arr]
        return self.sign * torch.tensor(sizes, dtype=torch.float32)


@register("jpeg_compressibility")
def jpeg_compressibility(device="cpu", dtype=torch.float32, checkpoint=None, batch_size: int = 64,
                         differentiable: bool = False, quality: int = 95) -> JpegScorer:
    """−(JPEG size in kB at ``quality``), DDPO's compressibility reward. ``checkpoint`` is unused."""
    if checkpoint is not None:
        raise ValueError("jpeg_compressibility has no checkpoint; got checkpoint=%r" % (checkpoint,))
    return JpegScorer("jpeg_compressibility", -1.0, quality, device="cpu", dtype=dtype, batch_size=batch_size,
                      differentiable=differentiable)


@register("jpeg_incompressibility")
def jpeg_incompressibility(device="cpu", dtype=torch.float32, checkpoint=None, batch_size: int = 64,
                           differentiable: bool = False, quality: int = 95) -> JpegScorer:
    """JPEG size in kB at ``quality``, DDPO's incompressibility reward. ``checkpoint`` is unused."""
    if checkpoint is not None:
        raise ValueError("jpeg_incompressibility has no checkpoint; got checkpoint=%r" % (checkpoint,))
    return JpegScorer("jpeg_incompressibility", 1.0, quality, device="cpu", dtype=dtype, batch_size=batch_size,
                      differentiable=differentiable)
