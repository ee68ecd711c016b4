"""The common shape of every scorer: batching, input conversion and the output contract.

Call convention (all scorers)::

    scores = scorer(images, prompts, **metadata)   # torch.Tensor [B], float32, on CPU

``images``: a float tensor [B, 3, H, W] in [0, 1] (what a flow policy decodes), a list of PIL images,
or a ``torch.uint8`` tensor [B, 3, H, W]. ``prompts``: B strings. Subclasses implement
:meth:`Scorer.score_batch` on a chunk of at most ``batch_size`` images; this class does the chunking
and the input and output checks. A float tensor reaches ``score_batch`` on the scorer's device as
float32 (differentiable with ``differentiable=True``); PIL images and uint8 tensors reach it
unchanged, under ``torch.no_grad()``, when the scorer sets :attr:`Scorer.pil_input` (the learned
scorers, which run their official PIL preprocessing), else converted to float32 in [0, 1] (v / 255).
"""
from __future__ import annotations

from typing import Any, List, Sequence, Union

import numpy as np
import torch

from scorers._preprocess import _is_pil, is_pil_or_uint8

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


def uint8_to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 tensor of 8-bit levels -> float32 v / 255 (the values :func:`pil_to_tensor` gives for
    the same pixels)."""
    return images.to(torch.float32) / 255.0


def as_image_tensor(images: ImagesLike) -> torch.Tensor:
    """Validate and convert scorer input (float tensor, uint8 tensor or PIL images) to float
    [B, 3, H, W] in [0, 1]. A float tensor is returned as it is."""
    if isinstance(images, torch.Tensor):
        x = uint8_to_float(images) if images.dtype == torch.uint8 else images
    else:
        x = pil_to_tensor([images] if _is_pil(images) else list(images))
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(x.shape)}")
    if not torch.is_floating_point(x):
        raise TypeError(f"image tensor must be floating point in [0, 1] or uint8, got {x.dtype}")
    return x


def as_8bit_batch(images: ImagesLike) -> Union[torch.Tensor, List[Any]]:
    """PIL image(s) -> list of PIL images (as given: any mode and size); uint8 tensor -> itself,
    checked to be [B, 3, H, W]. The input of a :attr:`Scorer.pil_input` scorer's official path."""
    if isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8:
            raise TypeError(f"expected a uint8 tensor, got {images.dtype}")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
        return images
    items = [images] if _is_pil(images) else list(images)
    for i, im in enumerate(items):
        if not _is_pil(im):
            raise TypeError(f"images[{i}] is {type(im).__name__}, expected a PIL image")
    return items


def takes_8bit_images(scorer: Any) -> bool:
    """Whether ``scorer`` preprocesses PIL / uint8 input itself (:attr:`Scorer.pil_input`)."""
    return bool(getattr(scorer, "pil_input", False))


def _chunk_metadata(metadata, start: int, stop: int):
    return {k: (v[start:stop] if isinstance(v, (list, tuple, torch.Tensor)) else v) for k, v in metadata.items()}


class Scorer:
    """Base class: subclasses set ``name`` and implement :meth:`score_batch`.

    Args:
        device: where the model runs.
        dtype: the model's dtype (inputs are cast to it).
        batch_size: images per internal forward pass.
        differentiable: keep the autograd graph from the input images to the scores (for
            reward-gradient methods); otherwise scoring runs under ``torch.no_grad()`` and the result
            is detached on CPU. PIL / uint8 input has no graph to keep.
    """

    name: str = "scorer"
    #: True: PIL images and uint8 tensors reach :meth:`score_batch` as they are (a list of PIL images
    #: or a uint8 [b, 3, H, W] CPU tensor) and the scorer preprocesses them as its model's official
    #: package does; False: they are converted to float [b, 3, H, W] in [0, 1] first.
    pil_input: bool = False

    def __init__(self, device="cpu", dtype=torch.float32, batch_size: int = 16, differentiable: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = int(batch_size)
        self.differentiable = bool(differentiable)

    def score_batch(self, images: torch.Tensor, prompts: List[str], **metadata) -> torch.Tensor:
        """Score one chunk: images [b, 3, H, W] in [0, 1] on ``self.device`` -> [b] (and, when
        :attr:`pil_input` is set, also a list of PIL images or a uint8 [b, 3, H, W] CPU tensor)."""
        raise NotImplementedError

    def __call__(self, images: ImagesLike, prompts: Sequence[str], **metadata) -> torch.Tensor:
        if self.pil_input and is_pil_or_uint8(images):
            return self._call_8bit(as_8bit_batch(images), list(prompts), metadata)
        x = as_image_tensor(images)
        prompts = list(prompts)
        if len(prompts) != x.shape[0]:
            raise ValueError(f"{self.name}: got {x.shape[0]} images but {len(prompts)} prompts")
        outs = []
        ctx = torch.enable_grad() if self.differentiable else torch.no_grad()
        with ctx:
            for start in range(0, x.shape[0], self.batch_size):
                stop = start + self.batch_size
                chunk_meta = _chunk_metadata(metadata, start, stop)
                chunk = x[start:stop].to(self.device, torch.float32)
                out = self.score_batch(chunk, prompts[start:stop], **chunk_meta)
                out = out.reshape(-1).float()
                if out.shape[0] != chunk.shape[0]:
                    raise RuntimeError(f"{self.name}: score_batch returned {out.shape[0]} scores for {chunk.shape[0]} images")
                outs.append(out)
        scores = torch.cat(outs) if outs else torch.zeros(0)
        return scores if self.differentiable else scores.detach().cpu()

    def _call_8bit(self, items, prompts: List[str], metadata) -> torch.Tensor:
        """PIL / uint8 input of a :attr:`pil_input` scorer: chunks of the input itself, no graph."""
        n = len(items)
        if len(prompts) != n:
            raise ValueError(f"{self.name}: got {n} images but {len(prompts)} prompts")
        outs = []
        with torch.no_grad():
            for start in range(0, n, self.batch_size):
                stop = start + self.batch_size
                chunk = items[start:stop]
                out = self.score_batch(chunk, prompts[start:stop], **_chunk_metadata(metadata, start, stop))
                out = out.reshape(-1).float()
                if out.shape[0] != len(chunk):
                    raise RuntimeError(f"{self.name}: score_batch returned {out.shape[0]} scores for {len(chunk)} images")
                outs.append(out)
        scores = torch.cat(outs) if outs else torch.zeros(0)
        return scores if self.differentiable else scores.detach().cpu()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device={self.device}, batch_size={self.batch_size})"
