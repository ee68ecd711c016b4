"""Videos for image scorers, and a temporal-consistency reward.

A video is a float tensor ``[B, 3, F, H, W]`` in [0, 1] (what a video flow policy decodes, e.g. Wan).

* An image scorer scores a video as the mean of its scores over a subset of frames
  (:func:`score_video_frames`): ``score_frames`` ``"all"`` (every frame), ``"first_last"`` (frames 0 and
  F - 1) or ``"every_k"`` (frames 0, k, 2k, ... and always the last). :class:`scorers.multi.MultiReward`
  does this for every scorer that does not set ``video_input = True``.
* ``temporal_consistency`` (registered) takes the video itself: the mean over consecutive frame pairs
  of the cosine similarity of the frames' mean-centred pixel vectors (a per-pair Pearson
  correlation of the pixels), in [-1, 1]; 1 for a static video. Frames are first average-pooled to
  at most ``size`` pixels a side so that the score looks at structure rather than pixel noise.
"""
from __future__ import annotations

from typing import Any, Callable, List, Sequence

import torch

from scorers.registry import register

SCORE_FRAMES = ("all", "first_last", "every_k")


def is_video(images: Any) -> bool:
    """Whether ``images`` is a video batch ``[B, 3, F, H, W]`` (a 5-D tensor)."""
    return isinstance(images, torch.Tensor) and images.ndim == 5


def check_video(video: torch.Tensor) -> None:
    if not is_video(video) or video.shape[1] != 3 or video.shape[2] < 1:
        raise ValueError(f"video must be a [B, 3, F, H, W] tensor with F >= 1, got {getattr(video, 'shape', type(video))}")


def frame_indices(num_frames: int, score_frames: str = "all", every_k: int = 4) -> List[int]:
    """The frames an image scorer sees (module docstring)."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if score_frames == "all":
        return list(range(num_frames))
    if score_frames == "first_last":
        return sorted({0, num_frames - 1})
    if score_frames == "every_k":
        if isinstance(every_k, bool) or not isinstance(every_k, int) or every_k < 1:
            raise ValueError(f"every_k must be a positive int, got {every_k!r}")
        return sorted(set(range(0, num_frames, every_k)) | {num_frames - 1})
    raise ValueError(f"score_frames must be one of {SCORE_FRAMES}, got {score_frames!r}")


def _repeat_metadata(metadata: dict, k: int) -> dict:
    """Per-sample metadata (lists, tuples, tensors of length B) repeated for the k frames of each sample."""
    out = {}
    for name, v in metadata.items():
        if isinstance(v, torch.Tensor) and v.ndim >= 1:
            out[name] = v.repeat_interleave(k, dim=0)
        elif isinstance(v, (list, tuple)):
            out[name] = type(v)(x for x in v for _ in range(k))
        else:
            out[name] = v
    return out


def score_video_frames(scorer: Callable, video: torch.Tensor, prompts: Sequence[str], *, score_frames: str = "all",
                       every_k: int = 4, **metadata) -> torch.Tensor:
    """``[B]``: the mean over the selected frames of ``scorer``'s score of each frame (the frames of all
    samples are scored in one call of B * k images, each with its sample's prompt and metadata)."""
    check_video(video)
    prompts = list(prompts)
    b, f = video.shape[0], video.shape[2]
    if len(prompts) != b:
        raise ValueError(f"got {b} videos but {len(prompts)} prompts")
    idx = frame_indices(f, score_frames, every_k)
    k = len(idx)
    frames = video[:, :, idx].permute(0, 2, 1, 3, 4).reshape(b * k, 3, *video.shape[3:])
    out = scorer(frames, [p for p in prompts for _ in range(k)], **_repeat_metadata(metadata, k))
    out = torch.as_tensor(out).float().reshape(-1)
    if out.numel() != b * k:
        raise ValueError(f"scorer returned {out.numel()} scores for {b * k} frames")
    return out.reshape(b, k).mean(dim=1)


def temporal_consistency_scores(video: torch.Tensor, size: int = 32) -> torch.Tensor:
    """``[B]``: mean over t of ``cos(c_t, c_{t+1})`` with ``c_t`` frame t average-pooled to at most ``size``
    a side, flattened and mean-centred; 1.0 for a video of one frame."""
    check_video(video)
    b, _, f, h, w = video.shape
    if f == 1:
        return torch.ones(b)
    x = video.float().permute(0, 2, 1, 3, 4).reshape(b * f, 3, h, w)
    if max(h, w) > size:
        x = torch.nn.functional.adaptive_avg_pool2d(x, (min(h, size), min(w, size)))
    x = x.reshape(b, f, -1)
    x = x - x.mean(dim=2, keepdim=True)
    x = torch.nn.functional.normalize(x, dim=2, eps=1e-8)
    return (x[:, 1:] * x[:, :-1]).sum(dim=2).mean(dim=1)


class TemporalConsistency:
    """The ``temporal_consistency`` reward (module docstring); takes videos, ``[B]`` float32 on CPU."""

    name = "temporal_consistency"
    video_input = True

    def __init__(self, size: int = 32):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        self.size = size

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **metadata) -> torch.Tensor:
        if not is_video(images):
            raise ValueError("temporal_consistency scores videos [B, 3, F, H, W]; got "
                             f"{getattr(images, 'shape', type(images))}")
        if len(list(prompts)) != images.shape[0]:
            raise ValueError(f"temporal_consistency: got {images.shape[0]} videos but {len(list(prompts))} prompts")
        with torch.no_grad():
            return temporal_consistency_scores(images.detach(), self.size).cpu()


@register("temporal_consistency")
def temporal_consistency(device="cpu", dtype=torch.float32, checkpoint=None, size: int = 32) -> TemporalConsistency:
    """Mean frame-to-frame similarity of a video (no model; ``device``/``dtype`` unused)."""
    if checkpoint is not None:
        raise ValueError(f"temporal_consistency has no checkpoint; got checkpoint={checkpoint!r}")
    return TemporalConsistency(size)
