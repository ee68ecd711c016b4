"""Image preprocessing for the learned scorers: torch on float tensors (differentiable), the
official PIL pipelines on PIL images and uint8 tensors.

Every learned scorer turns its images into its model's input with the steps its authors use: a
bicubic resize, a square centre crop (or, for HPS, a letterbox pad), and normalisation with the
model's published mean/std (:class:`PreprocessSpec`; :data:`CLIP_224`, :data:`HF_CLIP_224`,
:data:`HPS_224`). Two paths:

* float tensors [B, 3, H, W] in [0, 1] (:func:`preprocess`): torch's antialiased bicubic
  ``interpolate``, differentiable; within 1.1/255 per pixel of the official PIL transform
  (bit-identical for HPS, whose official resize runs on the float tensor);
* PIL images and uint8 tensors (:func:`pil_pixel_values`): the official PIL pipeline itself, with
  its operation order and arithmetic, so the pixels equal the official transform's.

The source of each spec and the measured differences between the paths are in docs/methods.md
("Image preprocessing"). Checkpoint-loading helpers live in :mod:`scorers._loading`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# OpenAI CLIP normalisation constants (OpenAI CLIP's ``_transform``; identical to open_clip's
# OPENAI_DATASET_MEAN/STD and in the laion CLIP-ViT-H-14 and BLIP/ImageReward preprocessing).
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

    (h', w') from :func:`shorter_side_size`; antialiased bicubic ``interpolate`` (PIL's filter).
    ``clamp=True`` (the PIL pipelines): two 1-D passes, width first then height, each clamped to
    [0, 1] — PIL resamples horizontally then vertically and saturates to uint8 after each pass, so
    an overshoot of the first pass never reaches the second. Clamping only once at the end lets
    that overshoot through: on white noise it moved pixels by up to 21/255 from PIL (3/255 on smooth
    images); with the per-pass clamp the gap is PIL's uint8 rounding, ≤ 1.1/255 measured.
    ``clamp=False``: one 2-D pass, unclamped (torchvision's ``Resize`` on a float tensor).
    Matches ``torchvision.transforms.Resize(size, InterpolationMode.BICUBIC)`` as used by CLIP
    (Radford et al., arXiv 2103.00020) and its descendants. Differentiable.
    """
    _check_images(images)
    h, w = images.shape[-2:]
    out_hw = shorter_side_size(h, w, size)
    if out_hw == (h, w):
        return images.clamp(0.0, 1.0) if clamp else images
    # interpolate's bicubic kernel is implemented in float32/64; keep half types working.
    x = images if images.dtype in (torch.float32, torch.float64) else images.float()
    if not clamp:
        x = F.interpolate(x, size=out_hw, mode="bicubic", align_corners=False, antialias=True)
        return x.to(images.dtype)
    # Pillow's resampling (docs/methods.md, "Upstream references"): horizontal pass
    # first into an 8-bit temporary image, then vertical; a pass whose size does not change is
    # skipped. Each 8-bit pass ends in clip8, i.e. rounds and clamps; we only clamp.
    if out_hw[1] != w:
        x = F.interpolate(x, size=(h, out_hw[1]), mode="bicubic", align_corners=False, antialias=True).clamp(0.0, 1.0)
    if out_hw[0] != h:
        x = F.interpolate(x, size=out_hw, mode="bicubic", align_corners=False, antialias=True).clamp(0.0, 1.0)
    return x.to(images.dtype)


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
    This is ``ResizeMaxSize`` of HPS v2's bundled open_clip, which the official scorer selects
    with ``light_augmentation=True`` (docs/methods.md, "Image preprocessing"); it runs
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
PIL_PIPELINES = ("torchvision", "transformers", "tensor")


@dataclass(frozen=True)
class PreprocessSpec:
    """The published preprocessing of one model.

    ``mode="shortest_crop"``: bicubic resize of the shorter side to ``resize``, centre crop ``crop``
    (offset rounding ``crop_rounding``), clamp to [0, 1] when ``clamp`` (the PIL/uint8 pipelines).
    ``mode="longest_pad"``: letterbox to ``resize`` (:func:`resize_longer_side_and_pad`); ``crop``
    must equal ``resize``. Then normalise with ``mean``/``std``.

    ``pil_pipeline``: which official pipeline :func:`pil_pixel_values` runs on PIL / uint8 input —
    ``"torchvision"`` (PIL ``Resize`` + ``CenterCrop``, then RGB, ``ToTensor``, ``Normalize``: OpenAI
    CLIP, open_clip, ImageReward), ``"transformers"`` (RGB first, PIL resize, truncated crop offsets,
    rescale in float64, normalise in float32: ``CLIPImageProcessor``'s PIL backend, PickScore) or
    ``"tensor"`` (``ToTensor`` then this spec's float path: HPS v2's ``ResizeMaxSize``). ``None``
    (default) derives it: ``longest_pad`` → ``"tensor"``, ``crop_rounding="floor"`` →
    ``"transformers"``, else ``"torchvision"``.
    """

    resize: int = 224
    crop: int = 224
    mean: Tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: Tuple[float, float, float] = OPENAI_CLIP_STD
    crop_rounding: str = "torchvision"
    mode: str = "shortest_crop"
    clamp: bool = True
    pil_pipeline: Optional[str] = None

    @property
    def pil_pipeline_name(self) -> str:
        """The resolved :attr:`pil_pipeline` (see the class docstring)."""
        if self.pil_pipeline is not None:
            return self.pil_pipeline
        if self.mode == "longest_pad":
            return "tensor"
        return "transformers" if self.crop_rounding == "floor" else "torchvision"

    def __post_init__(self) -> None:
        if self.pil_pipeline is not None and self.pil_pipeline not in PIL_PIPELINES:
            raise ValueError(f"pil_pipeline must be one of {PIL_PIPELINES} or None, got {self.pil_pipeline!r}")
        if self.pil_pipeline in ("torchvision", "transformers") and self.mode != "shortest_crop":
            raise ValueError(f"pil_pipeline {self.pil_pipeline!r} needs mode 'shortest_crop', got {self.mode!r}")
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
# HPS v2 / v2.1 official scorer (create_model_and_transforms(..., light_augmentation=True)
# -> ToTensor, ResizeMaxSize(224, fill=0), Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)).
HPS_224 = PreprocessSpec(mode="longest_pad", clamp=False)


def preprocess(images: torch.Tensor, spec: PreprocessSpec = CLIP_224, dtype: torch.dtype | None = None) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] → model input following ``spec``, cast to ``dtype``.

    shortest_crop: x_in = Normalize(CenterCrop(Resize_bicubic(x))) — the CLIP transform of Radford et
    al. (arXiv 2103.00020); longest_pad: x_in = Normalize(Pad(Resize_bicubic(x))) — HPS v2's
    (arXiv 2306.09341). Differentiable w.r.t. ``images``.

    Distance to the official transform of the same 8-bit pixels (float64, random images; module
    docstring): CLIP_224 and HF_CLIP_224 ≤ 1.1/255 per pixel (mean 0.26/255); HPS_224 exact. For
    PIL / uint8 input use :func:`pil_pixel_values`, which is exact for all three.
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


# --------------------------------------------------------------------------------------------------
# PIL images and uint8 tensors: the official pipelines themselves
# --------------------------------------------------------------------------------------------------


def _is_pil(obj: Any) -> bool:
    return isinstance(obj, Image.Image)


def is_pil_or_uint8(images: Any) -> bool:
    """True for a PIL image, a non-empty list/tuple of PIL images, or a ``torch.uint8`` tensor —
    the inputs :func:`pil_pixel_values` preprocesses with the official pipeline."""
    if isinstance(images, torch.Tensor):
        return images.dtype == torch.uint8
    if _is_pil(images):
        return True
    return isinstance(images, (list, tuple)) and len(images) > 0 and all(_is_pil(im) for im in images)


def as_pil_images(images: Any) -> List[Any]:
    """PIL image(s) or a uint8 tensor [B, 3, H, W] (or [3, H, W]) → list of PIL images.

    The tensor's values are the image's 8-bit levels (``Image.fromarray`` of the HWC array), so a
    uint8 tensor and the PIL images it came from give the same pixels. PIL images are passed as
    they are (any mode, any sizes: each is preprocessed on its own, as upstream)."""
    if isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8:
            raise TypeError(f"images: expected a uint8 tensor, got {images.dtype}")
        x = images.unsqueeze(0) if images.ndim == 3 else images
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"uint8 images must have shape [B, 3, H, W], got {tuple(images.shape)}")

        arr = x.detach().cpu().permute(0, 2, 3, 1).contiguous().numpy()
        return [Image.fromarray(a, "RGB") for a in arr]
    if _is_pil(images):
        return [images]
    out = list(images)
    for i, im in enumerate(out):
        if not _is_pil(im):
            raise TypeError(f"images[{i}] is {type(im).__name__}, expected a PIL image")
    return out


def _pil_torchvision(im: Any, spec: PreprocessSpec) -> np.ndarray:
    """torchvision's PIL pipeline (OpenAI CLIP's ``_transform``, identical in ImageReward's and
    open_clip's ``image_transform(..., is_train=False)``; docs/methods.md, "Image preprocessing"):
    ``Resize(n, BICUBIC)`` → ``PIL.resize`` of the shorter side to n (long side truncated),
    ``CenterCrop`` → ``PIL.crop`` at round((H − n)/2), then
    ``convert("RGB")`` (after the resize, as upstream), ``ToTensor`` (uint8 → float32, ÷ 255).
    Returns float32 [3, n, n] before normalisation."""
    w, h = im.size
    nh, nw = shorter_side_size(h, w, spec.resize)
    if (nh, nw) != (h, w):
        im = im.resize((nw, nh), Image.BICUBIC)
    c = spec.crop
    top, left = int(round((nh - c) / 2.0)), int(round((nw - c) / 2.0))
    if (top, left, c, c) != (0, 0, nh, nw):
        im = im.crop((left, top, left + c, top + c))
    arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return (arr.astype(np.float32) / np.float32(255.0)).transpose(2, 0, 1)


def _pil_transformers(im: Any, spec: PreprocessSpec) -> np.ndarray:
    """transformers' CLIPImageProcessor on PIL (the "slow" processor of transformers 4.27.3, which
    PickScore's code pins; ``CLIPImageProcessorPil`` in transformers 5):
    ``convert("RGB")`` first, ``PIL.resize(BICUBIC)`` of the shorter side (long side truncated),
    crop at ⌊(H − n)/2⌋, rescale ``uint8.astype(float64) · (1/255)`` → float32.
    Returns float32 [3, n, n] before normalisation."""
    im = im.convert("RGB")
    w, h = im.size
    nh, nw = shorter_side_size(h, w, spec.resize)
    if (nh, nw) != (h, w):
        im = im.resize((nw, nh), Image.BICUBIC)
    arr = np.asarray(im, dtype=np.uint8)
    c = spec.crop
    top, left = (nh - c) // 2, (nw - c) // 2
    arr = arr[top : top + c, left : left + c]
    return (arr.astype(np.float64) * (1.0 / 255.0)).astype(np.float32).transpose(2, 0, 1)


def pil_pixel_values(images: Any, spec: PreprocessSpec = CLIP_224, dtype: torch.dtype | None = None) -> torch.Tensor:
    """PIL image(s) or a uint8 tensor → the model input [B, 3, crop, crop] exactly as the official
    pipeline named by ``spec.pil_pipeline_name`` computes it (float32; cast to ``dtype`` at the end).

    * ``torchvision`` / ``transformers``: the uint8 resize and crop are done by PIL itself with the
      reference code's operation order, sizes and offsets; then x = (v/255 − mean)/std in float32
      (torchvision ``Normalize`` / transformers ``normalize`` both subtract then divide in float32).
    * ``tensor`` (HPS v2): ``ToTensor`` of the RGB image, then :func:`preprocess` — the official
      ``ResizeMaxSize`` runs on the float tensor too, so the float path is the official one. HPS keeps RGBA
      images as 4 channels; here every image is converted to RGB.

    Images of different sizes are allowed (each is resized on its own, as upstream). Not
    differentiable (the input is 8-bit). The result lies on the CPU.
    """
    pil = as_pil_images(images)
    if not pil:
        raise ValueError("images: empty batch")
    name = spec.pil_pipeline_name
    if name == "tensor":
        out = []
        for im in pil:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
            t = torch.from_numpy(arr.astype(np.float32) / np.float32(255.0)).permute(2, 0, 1)[None]
            out.append(preprocess(t.contiguous(), spec))
        x = torch.cat(out)
    else:
        step = _pil_torchvision if name == "torchvision" else _pil_transformers
        x = torch.from_numpy(np.stack([step(im, spec) for im in pil]))
        x = normalize(x, spec.mean, spec.std)
    return x if dtype is None else x.to(dtype)
