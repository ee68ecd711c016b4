"""The common shape of every scorer: batching, input conversion and the output contract.

Call convention (all scorers)::

    scores = scorer(images, prompts, **metadata)   # torch.Tensor [B], float32, on CPU

``images``: a float tensor [B, 3, H, W] with values in [0, 1] (what a flow policy decodes), or a list
of PIL images. ``prompts``: a list of B strings. Subclasses implement :meth:`score_batch` on a tensor
chunk of at most ``batch_size`` images already on the scorer's device; this class does the chunking,
the PIL -> tensor conversion and the output checks.
"""
from __future__ import annotations

from typing import Any, List, Sequence, Union

import numpy as np
import torch

ImagesLike = Union[torch.Tensor, Sequence[Any]]


def pil_to_tensor(images: Sequence[Any]) -> torch.Tensor:
    """List of PIL images (all the same size) -> float32 [B, 3, H, W] in [0, 1]."""
    arrays = []
    for i, im in enumerate(images):
        if not hasattr(im, "convert"):
            raise TypeError(f"images[{i}] is {type(im).__name__}, expected a PIL image or a tensor batch")
        arrays.append(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0)
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"PIL images must share one size to be batched, got {sorted(shapes)}")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def as_image_tensor(images: ImagesLike) -> torch.Tensor:
    """Validate and convert scorer input to float [B, 3, H, W] in [0, 1]."""
    if isinstance(images, torch.Tensor):
        x = images
    else:
        x = pil_to_tensor(list(images))
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(x.shape)}")
    if not torch.is_floating_point(x):
        raise TypeError(f"image tensor must be floating point in [0, 1], got {x.dtype}")
    return x


class Scorer:
    """Base class: subclasses set ``name`` and implement :meth:`score_batch`.

    Args:
        device: where the model runs.
        dtype: the model's dtype (inputs are cast to it).
        batch_size: images per internal forward pass.
        differentiable: keep the autograd graph from the input images to the scores (for
            reward-gradient methods); otherwise scoring runs under ``torch.no_grad()`` and the result
            is detached on CPU.
    """

    name: str = "scorer"

    def __init__(self, device="cpu", dtype=torch.float32, batch_size: int = 16, differentiable: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = int(batch_size)
        self.differentiable = bool(differentiable)

    def score_batch(self, images: torch.Tensor, prompts: List[str], **metadata) -> torch.Tensor:
        """Score one chunk: images [b, 3, H, W] in [0, 1] on ``self.device`` -> [b]."""
        raise NotImplementedError

    def __call__(self, images: ImagesLike, prompts: Sequence[str], **metadata) -> torch.Tensor:
        x = as_image_tensor(images)
        prompts = list(prompts)
        if len(prompts) != x.shape[0]:
            raise ValueError(f"{self.name}: got {x.shape[0]} images but {len(prompts)} prompts")
        outs = []
        ctx = torch.enable_grad() if self.differentiable else torch.no_grad()
        with ctx:
            for start in range(0, x.shape[0], self.batch_size):
                stop = start + self.batch_size
                chunk_meta = {
                    k: (v[start:stop] if isinstance(v, (list, tuple, torch.Tensor)) else v) for k, v in metadata.items()
                }
                chunk = x[start:stop].to(self.device, torch.float32)
                out = self.score_batch(chunk, prompts[start:stop], **chunk_meta)
                out = out.reshape(-1).float()
                if out.shape[0] != chunk.shape[0]:
                    raise RuntimeError(f"{self.name}: score_batch returned {out.shape[0]} scores for {chunk.shape[0]} images")
                outs.append(out)
        scores = torch.cat(outs) if outs else torch.zeros(0)
        return scores if self.differentiable else scores.detach().cpu()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device={self.device}, batch_size={self.batch_size})"
