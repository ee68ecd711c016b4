"""Torch-only image preprocessing for the learned scorers (differentiable on the tensor path).

Every learned scorer turns a float batch [B, 3, H, W] in [0, 1] into its model's input with the same
steps its authors use: a bicubic resize, a square centre crop (or, for HPS, a letterbox pad), and
normalisation with the model's published mean/std. Doing it in torch keeps the autograd graph, so a
reward can be differentiated w.r.t. the images (``differentiable=True``).

Sources of the constants and behaviour (each model's own release):

* OpenAI CLIP (``openai/CLIP clip/clip.py::_transform``): ``Resize(n_px, BICUBIC)`` of the shorter
  side, ``CenterCrop(n_px)``, ``Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)`` on PIL images.
  open_clip uses the same constants (``open_clip/constants.py``: ``OPENAI_DATASET_MEAN/STD``) and
  the same transform for ``ViT-L-14`` 'openai' (the LAION aesthetic predictor's backbone):
  :data:`CLIP_224`.
* HPS v2 / v2.1 (``tgxs002/HPSv2 hpsv2/img_score.py``): ``create_model_and_transforms('ViT-H-14',
  ..., light_augmentation=True)`` selects the validation transform ``ToTensor()``,
  ``ResizeMaxSize(224)`` (longer side to 224, bicubic on the float tensor, zero padding to a
  square), ``Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)``: :data:`HPS_224`.
* PickScore_v1 is scored with the processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``
  (``preprocessor_config.json``: ``shortest_edge`` 224, ``resample`` 3 = bicubic, ``crop_size`` 224,
  ``image_mean``/``image_std`` = the OpenAI CLIP constants). transformers' ``center_crop``
  truncates the offset (``int((H - h) / 2)``), torchvision rounds it: :data:`HF_CLIP_224`.
* ImageReward v1.0 (BLIP ViT-L, ``THUDM/ImageReward ImageReward/ImageReward.py::_transform``):
  ``Resize(224, BICUBIC)``, ``CenterCrop(224)``, ``Normalize`` with the OpenAI CLIP constants:
  :data:`CLIP_224`.

Resizing uses ``torch.nn.functional.interpolate(mode="bicubic", antialias=True)``, PyTorch's port
of PIL's antialiased bicubic filter (Keys kernel, a = -0.5); on the PIL pipelines the result is
clamped to [0, 1] as PIL's uint8 output is. A test compares it with PIL and with torchvision.

The shared checkpoint-loading helpers live in :mod:`scorers._loading` and are re-exported here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

from scorers._loading import (  # noqa: F401  (re-exported: one import place for scorer modules)
    CheckpointError,
    check_state_dict,
    load_checkpoint_file,
    load_state_dict_strict,
)

# OpenAI CLIP normalisation constants (openai/CLIP clip/clip.py::_transform; identical in
# open_clip/constants.py OPENAI_DATASET_MEAN/STD and in the laion CLIP-ViT-H-14 and
# BLIP/ImageReward preprocessing).
OPENAI_CLIP_MEAN: Tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: Tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

_CROP_ROUNDING = ("torchvision", "floor")


def _check_images(images: torch.Tensor, arg: str = "images") -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor [B, 3, H, W], got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{arg} must have shape [B, 3, H, W], got {tuple(images.shape)}")
    if not torch.is_floating_point(images):
        raise TypeError(f"{arg} must be floating point in [0, 1], got {images.dtype}")


def shorter_side_size(height: int, width: int, size: int) -> Tuple[int, int]:
    """Output (height, width) when the shorter side is resized to ``size`` keeping aspect ratio.

    new_short = size, new_long = floor(size · long / short) — torchvision's
    ``_compute_resized_output_size`` and transformers' ``get_resize_output_image_size``
    (``default_to_square=False``) both truncate the long side this way.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if height < 1 or width < 1:
        raise ValueError(f"image height and width must be >= 1, got {height}x{width}")
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def resize_shorter_side(images: torch.Tensor, size: int, clamp: bool = True) -> torch.Tensor:
    """Bicubic resize so that the shorter side equals ``size`` (aspect ratio kept).

    x' = interpolate(x, (h', w'), bicubic, antialias) with (h', w') from :func:`shorter_side_size`;
    clamped to [0, 1] when ``clamp`` (PIL's uint8 output saturates the bicubic overshoot).
    Matches ``torchvision.transforms.Resize(size, InterpolationMode.BICUBIC)`` as used by CLIP
    (Radford et al., arXiv 2103.00020) and its descendants. Differentiable.
    """
    _check_images(images)
    h, w = images.shape[-2:]
    out_hw = shorter_side_size(h, w, size)
    if out_hw == (h, w):
        x = images
    else:
        # interpolate's bicubic kernel is implemented in float32/64; keep half types working.
        work = images if images.dtype in (torch.float32, torch.float64) else images.float()
        x = F.interpolate(work, size=out_hw, mode="bicubic", align_corners=False, antialias=True).to(images.dtype)
    return x.clamp(0.0, 1.0) if clamp else x


def center_crop(images: torch.Tensor, size: int, rounding: str = "torchvision") -> torch.Tensor:
    """Central ``size`` × ``size`` crop.

    Offsets: ``torchvision`` → top = round((H − size)/2) (Python round, ties to even, as in
    ``torchvision.transforms.functional.center_crop``); ``floor`` → top = (H − size) // 2 (as in
    ``transformers.image_transforms.center_crop``). Same for the left offset. Raises if the image is
    smaller than the crop (the scorers always resize first).
    """
    _check_images(images)
    if rounding not in _CROP_ROUNDING:
        raise ValueError(f"rounding must be one of {_CROP_ROUNDING}, got {rounding!r}")
    h, w = images.shape[-2:]
    if size < 1 or size > h or size > w:
        raise ValueError(f"crop size {size} does not fit in an image of {h}x{w}")
    if rounding == "torchvision":
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    else:
        top, left = (h - size) // 2, (w - size) // 2
    return images[..., top : top + size, left : left + size]


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Per-channel normalisation (x − mean_c) / std_c (torchvision ``Normalize``). Differentiable."""
    _check_images(images)
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std must have 3 entries, got {len(mean)} and {len(std)}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std entries must be > 0, got {tuple(std)}")
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - m) / s


def resize_longer_side_and_pad(images: torch.Tensor, size: int, fill: float = 0.0, antialias: bool = True) -> torch.Tensor:
    """Letterbox to ``size`` × ``size``: scale so the longer side is ``size``, then pad centrally.

    s = size / max(H, W); (h', w') = (round(H·s), round(W·s)); bicubic resize (skipped when s = 1);
    pad ⌊(size−w')/2⌋ left, the rest right, ⌊(size−h')/2⌋ top, the rest bottom, with ``fill``.
    This is ``ResizeMaxSize`` of HPS v2's bundled open_clip (``hpsv2/src/open_clip/transform.py``),
    which the official scorer ``hpsv2/img_score.py`` selects with ``light_augmentation=True``; it runs
    on the float tensor after ``ToTensor()``, so nothing is clamped. HPS v2: Wu et al., arXiv 2306.09341.
    ``antialias=True`` is torchvision's tensor default since 0.17. Differentiable.
    """
    _check_images(images)
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    h, w = images.shape[-2:]
    scale = size / float(max(h, w))
    x = images
    if scale != 1.0:
        nh, nw = round(h * scale), round(w * scale)
        work = images if images.dtype in (torch.float32, torch.float64) else images.float()
        x = F.interpolate(work, size=(nh, nw), mode="bicubic", align_corners=False, antialias=antialias).to(images.dtype)
        pad_h, pad_w = size - nh, size - nw
        if pad_h or pad_w:
            x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=float(fill))
    return x


_MODES = ("shortest_crop", "longest_pad")


@dataclass(frozen=True)
class PreprocessSpec:
    """The published preprocessing of one model.

    ``mode="shortest_crop"``: bicubic resize of the shorter side to ``resize``, centre crop ``crop``
    (offset rounding ``crop_rounding``), clamp to [0, 1] when ``clamp`` (the PIL/uint8 pipelines).
    ``mode="longest_pad"``: letterbox to ``resize`` (:func:`resize_longer_side_and_pad`); ``crop``
    must equal ``resize``. Then normalise with ``mean``/``std``.
    """

    resize: int = 224
    crop: int = 224
    mean: Tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: Tuple[float, float, float] = OPENAI_CLIP_STD
    crop_rounding: str = "torchvision"
    mode: str = "shortest_crop"
    clamp: bool = True

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {self.mode!r}")
        if self.crop > self.resize:
            raise ValueError(f"crop ({self.crop}) must be <= resize ({self.resize})")
        if self.mode == "longest_pad" and self.crop != self.resize:
            raise ValueError(f"mode 'longest_pad' needs crop == resize, got {self.crop} and {self.resize}")
        if self.crop_rounding not in _CROP_ROUNDING:
            raise ValueError(f"crop_rounding must be one of {_CROP_ROUNDING}, got {self.crop_rounding!r}")


# OpenAI CLIP / open_clip at 224 px on PIL images (aesthetic on ViT-L-14 'openai', clipscore with
# open_clip, ImageReward's BLIP transform): Resize(224, BICUBIC) + CenterCrop(224) + Normalize.
CLIP_224 = PreprocessSpec()
# transformers CLIPImageProcessor of laion/CLIP-ViT-H-14-laion2B-s32B-b79K (PickScore_v1, clipscore with
# transformers): shortest_edge 224, bicubic, crop 224 with truncated offsets, OpenAI constants.
HF_CLIP_224 = PreprocessSpec(crop_rounding="floor")
# HPS v2 / v2.1 official scorer (hpsv2/img_score.py: create_model_and_transforms(..., light_augmentation=True)
# -> ToTensor, ResizeMaxSize(224, fill=0), Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)).
HPS_224 = PreprocessSpec(mode="longest_pad", clamp=False)


def preprocess(images: torch.Tensor, spec: PreprocessSpec = CLIP_224, dtype: torch.dtype | None = None) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] → model input following ``spec``, cast to ``dtype``.

    shortest_crop: x_in = Normalize(CenterCrop(Resize_bicubic(x))) — the CLIP transform of Radford et
    al. (arXiv 2103.00020); longest_pad: x_in = Normalize(Pad(Resize_bicubic(x))) — HPS v2's
    (arXiv 2306.09341). Differentiable w.r.t. ``images``.
    """
    _check_images(images)
    x = images if images.dtype in (torch.float32, torch.float64) else images.float()
    if spec.mode == "longest_pad":
        x = resize_longer_side_and_pad(x, spec.resize)
        if spec.clamp:
            x = x.clamp(0.0, 1.0)
    else:
        x = resize_shorter_side(x, spec.resize, clamp=spec.clamp)
        x = center_crop(x, spec.crop, spec.crop_rounding)
    x = normalize(x, spec.mean, spec.std)
    return x if dtype is None else x.to(dtype)
