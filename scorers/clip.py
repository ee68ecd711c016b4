"""CLIP encoders shared by the learned scorers, and the ``clipscore`` scorer.

Two back-ends load a published checkpoint as released (hub id or local path), checked key by key:
:class:`OpenClipEncoder` (an open_clip architecture filled from a state-dict file; HPS v2/v2.1, the
LAION aesthetic predictor) and :class:`HFClipEncoder` (transformers' ``CLIPModel``; PickScore).
Both take a float tensor [B, 3, H, W] in [0, 1] (preprocessed in torch, differentiable) or PIL
images / a uint8 tensor (the official PIL pipeline of the encoder's
:class:`~scorers._preprocess.PreprocessSpec`).

``clipscore`` (Radford et al., arXiv 2103.00020; CLIP-S of Hessel et al., arXiv 2104.08718) is the
cosine similarity of the L2-normalised image and text embeddings, in one of three conventions
(option ``convention``): ``"cosine"`` (default, in [-1, 1]), ``"clip_s"`` (2.5 · max(cos, 0)) or
``"x100"`` (100 · max(cos, 0), torchmetrics' scale). See docs/methods.md ("CLIP back-ends").
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, List, Optional, Sequence

import torch

from scorers._loading import (
    CheckpointError,
    load_checkpoint_file,
    load_state_dict_strict,
    raise_for_loading_info,
    resolve_checkpoint_file,
    strip_prefix,
    unwrap_state_dict,
)
from scorers._preprocess import CLIP_224, PreprocessSpec, is_pil_or_uint8, pil_pixel_values, preprocess
from scorers.base import Scorer
from scorers.registry import register

logger = logging.getLogger(__name__)

CLIP_CONVENTIONS = ("cosine", "clip_s", "x100")


def _freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def l2_normalize(x: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """x / ‖x‖₂ along the last dimension; a zero vector is left as is (its norm is replaced by 1,
    as in the LAION aesthetic predictor's ``normalized``)."""
    n = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x / torch.where(n > eps, n, torch.ones_like(n))


def clip_convention(cos: torch.Tensor, convention: str) -> torch.Tensor:
    """Report cosine similarities in a named convention (see the module docstring).

    cosine: s = cos; clip_s: s = 2.5·max(cos, 0) (Hessel et al., arXiv 2104.08718);
    x100: s = 100·max(cos, 0) (torchmetrics CLIPScore).
    """
    if convention == "cosine":
        return cos
    if convention == "clip_s":
        return 2.5 * cos.clamp_min(0.0)
    if convention == "x100":
        return 100.0 * cos.clamp_min(0.0)
    raise ValueError(f"convention must be one of {CLIP_CONVENTIONS}, got {convention!r}")


def _features(out: Any) -> torch.Tensor:
    """transformers ≥ 5 returns a model output whose ``pooler_output`` is the projected embedding
    from ``get_image_features``/``get_text_features``; older versions return the tensor."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        raise TypeError(f"unexpected CLIP feature output {type(out).__name__}")
    return pooled


def _pixel_values(images, spec: PreprocessSpec, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Float [b, 3, H, W] in [0, 1] → :func:`preprocess` (torch, differentiable; unchanged device);
    PIL image(s) / uint8 tensor → :func:`pil_pixel_values` (the official pipeline of ``spec``, on the
    CPU) moved to ``device``."""
    if is_pil_or_uint8(images):
        return pil_pixel_values(images, spec, dtype=dtype).to(device)
    return preprocess(images, spec, dtype=dtype)


# ------------------------------------------------------------------------------------------------
# open_clip


def open_clip_arch(arch: str) -> str:
    """An open_clip model name, or the path of a JSON model config (registered under its file stem;
    this is how tests build reduced models of the same architecture family)."""
    import open_clip  # heavy: open_clip, only for HPS / aesthetic

    if arch.endswith(".json"):
        if not os.path.isfile(arch):
            raise FileNotFoundError(f"arch: model config file not found: {arch}")
        with open(arch) as f:
            cfg = json.load(f)
        if "vision_cfg" not in cfg or "text_cfg" not in cfg:
            raise ValueError(f"arch: {arch} is not an open_clip model config (needs vision_cfg and text_cfg)")
        open_clip.add_model_config(arch)
        return os.path.splitext(os.path.basename(arch))[0]
    if open_clip.get_model_config(arch) is None:
        raise ValueError(f"arch: unknown open_clip model {arch!r} (see open_clip.list_models())")
    return arch


def resolve_open_clip_weights(arch: str, checkpoint: str, filename: Optional[str], what: str) -> tuple[str, Optional[bool]]:
    """Local file for ``checkpoint``: an open_clip pretrained tag for ``arch`` (e.g. ``"openai"``,
    fetched by open_clip from its hub mirror) or anything :func:`resolve_checkpoint_file` accepts.
    Returns (path, quick_gelu from the pretrained tag or None)."""
    import open_clip  # heavy: open_clip, only for HPS / aesthetic

    if not os.path.exists(os.fspath(checkpoint)) and "/" not in checkpoint and ":" not in checkpoint:
        cfg = open_clip.pretrained.get_pretrained_cfg(arch, checkpoint)
        if not cfg:
            raise ValueError(f"{what}: {checkpoint!r} is neither a file nor an open_clip pretrained tag of {arch}")
        try:
            path = open_clip.pretrained.download_pretrained(cfg)
        except Exception as e:
            raise OSError(f"{what}: cannot get open_clip weights {arch}/{checkpoint}: {e}") from e
        return path, cfg.get("quick_gelu")
    return resolve_checkpoint_file(checkpoint, filename, what), None


class _DropRandomInitWarning(logging.Filter):
    """open_clip warns "No pretrained weights loaded ... initialized randomly" when built with
    ``pretrained=None``; we fill the weights right after, so that warning would mislead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def create_open_clip_model(name: str, quick_gelu: bool) -> torch.nn.Module:
    """``open_clip.create_model(name, pretrained=None, force_quick_gelu=quick_gelu)`` (weights to be loaded)."""
    import open_clip  # heavy: open_clip, only for HPS / aesthetic

    filt = _DropRandomInitWarning()
    root = logging.getLogger()
    root.addFilter(filt)
    try:
        return open_clip.create_model(name, pretrained=None, force_quick_gelu=quick_gelu)
    finally:
        root.removeFilter(filt)


class OpenClipEncoder:
    """An open_clip CLIP model with frozen weights loaded strictly from one state-dict file.

    Args:
        arch: open_clip model name or JSON config path (:func:`open_clip_arch`).
        checkpoint: file / folder / URL / hub id / open_clip pretrained tag.
        filename: the file to take from a folder or a hub repo.
        quick_gelu: build with QuickGELU (OpenAI's weights need it); ``None`` takes the pretrained
            tag's setting, else False.
        spec: image preprocessing (:class:`scorers._preprocess.PreprocessSpec`).
        wrappers: dict keys that may wrap the state dict in the file (e.g. ``"state_dict"``).
    """

    def __init__(
        self,
        arch: str,
        checkpoint: str,
        *,
        filename: Optional[str] = None,
        quick_gelu: Optional[bool] = None,
        spec: PreprocessSpec = CLIP_224,
        device="cpu",
        dtype: torch.dtype = torch.float32,
        wrappers: Sequence[str] = ("state_dict",),
        what: str = "open_clip checkpoint",
    ):
        import open_clip  # heavy: open_clip, only for HPS / aesthetic

        name = open_clip_arch(arch)
        path, tag_quick_gelu = resolve_open_clip_weights(name, checkpoint, filename, what)
        if quick_gelu is None:
            quick_gelu = bool(tag_quick_gelu)
        model = create_open_clip_model(name, quick_gelu)
        raw = load_checkpoint_file(path)
        state = strip_prefix(unwrap_state_dict(raw, wrappers), "module.")
        if "logit_scale" in state and getattr(model, "logit_scale", None) is not None:
            ls = state["logit_scale"]
            if hasattr(ls, "ndim") and ls.ndim != model.logit_scale.ndim and ls.numel() == model.logit_scale.numel():
                state["logit_scale"] = ls.reshape(model.logit_scale.shape)  # 0-d vs 1-d across open_clip versions
        load_state_dict_strict(model, state, f"{what} ({path})")
        self.model = _freeze(model.to(device=device, dtype=dtype))
        self.tokenizer = open_clip.get_tokenizer(name)
        self.spec = spec
        self.device = torch.device(device)
        self.dtype = dtype
        self.path = path

    def pixel_values(self, images) -> torch.Tensor:
        """Images → the model input [b, 3, S, S] in ``self.dtype`` (module docstring): float [b, 3, H, W]
        in [0, 1] through the torch path (differentiable); PIL image(s) or a uint8 tensor through the
        official PIL pipeline of ``self.spec``, moved to the model's device."""
        return _pixel_values(images, self.spec, self.dtype, self.device)

    def encode_images(self, images) -> torch.Tensor:
        """Images (float [b, 3, H, W] in [0, 1], PIL image(s) or uint8 [b, 3, H, W]; see
        :meth:`pixel_values`) → L2-normalised image embeddings (float32)."""
        return l2_normalize(self.model.encode_image(self.pixel_values(images)).float())

    def encode_texts(self, prompts: List[str]) -> torch.Tensor:
        """Prompts → L2-normalised text embeddings (float32)."""
        tokens = self.tokenizer(list(prompts)).to(self.device)
        return l2_normalize(self.model.encode_text(tokens).float())


# ------------------------------------------------------------------------------------------------
# transformers


def spec_from_image_processor(ip: Any) -> PreprocessSpec:
    """PreprocessSpec from a transformers CLIP image processor (its published config): bicubic
    shortest-edge resize, centre crop (offsets truncated, as transformers does), mean/std."""
    def _get(d: Any, key: str) -> Any:
        if d is None:
            return None
        return d.get(key) if isinstance(d, dict) else getattr(d, key, None)

    resample = getattr(ip, "resample", 3)
    if int(getattr(resample, "value", resample)) != 3:
        raise ValueError(f"image processor resample={resample!r}: only bicubic (3) is implemented in torch")
    short = _get(getattr(ip, "size", None), "shortest_edge")
    crop = getattr(ip, "crop_size", None)
    crop_h, crop_w = _get(crop, "height"), _get(crop, "width")
    if short is None or crop_h is None or crop_h != crop_w:
        raise ValueError(f"image processor size={getattr(ip, 'size', None)} crop_size={crop}: expected shortest_edge and a square crop")
    if not getattr(ip, "do_center_crop", True):
        raise ValueError("image processor has do_center_crop=False; not supported")
    return PreprocessSpec(
        resize=int(short),
        crop=int(crop_h),
        mean=tuple(float(v) for v in ip.image_mean),
        std=tuple(float(v) for v in ip.image_std),
        crop_rounding="floor",
    )


def load_hf_clip_model(checkpoint: str, device="cpu", dtype: torch.dtype = torch.float32, what: str = "CLIP checkpoint"):
    """``transformers.CLIPModel.from_pretrained(checkpoint)`` (hub id or local folder); a missing,
    unexpected or wrongly shaped key is a :class:`CheckpointError` (transformers would only warn)."""
    from transformers import CLIPModel  # heavy: transformers, only for HF CLIP (PickScore)

    try:
        model, info = CLIPModel.from_pretrained(
            checkpoint, output_loading_info=True, ignore_mismatched_sizes=True, dtype=dtype
        )
    except (OSError, ValueError) as e:
        raise OSError(f"{what}: cannot load a CLIPModel from {checkpoint!r}: {e}") from e
    raise_for_loading_info(info, f"{what} ({checkpoint})")
    return _freeze(model.to(device))


class HFClipEncoder:
    """transformers CLIP model + the tokenizer and preprocessing constants of ``processor``.

    Args:
        checkpoint: hub id or local folder of the CLIP model (``from_pretrained``).
        processor: hub id or local folder holding the tokenizer and ``preprocessor_config.json``;
            defaults to ``checkpoint``.
        max_length: text truncation length (77, CLIP's context).
    """

    def __init__(
        self,
        checkpoint: str,
        processor: Optional[str] = None,
        *,
        device="cpu",
        dtype: torch.dtype = torch.float32,
        max_length: int = 77,
        what: str = "CLIP checkpoint",
    ):
        from transformers import AutoImageProcessor, AutoTokenizer  # heavy: transformers (see above)

        self.model = load_hf_clip_model(checkpoint, device, dtype, what)
        processor = processor or checkpoint
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(processor)
            image_processor = AutoImageProcessor.from_pretrained(processor)
        except (OSError, ValueError) as e:
            raise OSError(f"{what}: cannot load the tokenizer / image processor from {processor!r}: {e}") from e
        self.spec = spec_from_image_processor(image_processor)
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_length = int(max_length)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    def pixel_values(self, images) -> torch.Tensor:
        """As :meth:`OpenClipEncoder.pixel_values`; the PIL pipeline here is the processor's
        (``CLIPImageProcessor`` on PIL, as transformers 4.27.3: RGB first, PIL resize, floored crop)."""
        return _pixel_values(images, self.spec, self.dtype, self.device)

    def encode_images(self, images) -> torch.Tensor:
        """Images (see :meth:`pixel_values`) → L2-normalised image embeddings (float32)."""
        return l2_normalize(_features(self.model.get_image_features(pixel_values=self.pixel_values(images))).float())

    def encode_texts(self, prompts: List[str]) -> torch.Tensor:
        tok = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        out = self.model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        return l2_normalize(_features(out).float())


# ------------------------------------------------------------------------------------------------
# clipscore

DEFAULT_CLIPSCORE_HF = "openai/clip-vit-large-patch14"


class ClipScorer(Scorer):
    """cos(image, text) of a CLIP model, in the chosen ``convention`` (module docstring). PIL images
    and uint8 tensors are preprocessed with the encoder's official PIL pipeline, float tensors in torch."""

    name = "clipscore"
    pil_input = True  # PIL / uint8 reach score_batch as they are: the encoder runs the official pipeline

    def __init__(self, encoder, convention: str = "cosine", **kw):
        super().__init__(**kw)
        if convention not in CLIP_CONVENTIONS:
            raise ValueError(f"convention must be one of {CLIP_CONVENTIONS}, got {convention!r}")
        self.encoder = encoder
        self.convention = convention

    def score_batch(self, images: torch.Tensor, prompts: List[str], **metadata) -> torch.Tensor:
        img = self.encoder.encode_images(images)
        txt = self.encoder.encode_texts(prompts)
        return clip_convention((img * txt).sum(-1), self.convention)


@register("clipscore")
def clipscore(
    device="cpu",
    dtype: torch.dtype = torch.float32,
    checkpoint: Optional[str] = None,
    batch_size: int = 16,
    differentiable: bool = False,
    backend: str = "transformers",
    convention: str = "cosine",
    processor: Optional[str] = None,
    arch: str = "ViT-L-14",
    quick_gelu: Optional[bool] = None,
) -> ClipScorer:
    """CLIP score.

    ``backend="transformers"``: ``checkpoint`` is a hub id or folder for ``CLIPModel`` (default
    ``openai/clip-vit-large-patch14``, the CLIP that Flow-GRPO and DDPO score with); ``processor``
    defaults to the checkpoint. ``backend="open_clip"``: ``arch`` (default ``ViT-L-14``) with
    ``checkpoint`` an open_clip pretrained tag (default ``"openai"``) or a state-dict file/URL/hub
    file. ``convention``: ``cosine`` | ``clip_s`` | ``x100`` (module docstring).
    """
    if backend == "transformers":
        enc = HFClipEncoder(checkpoint or DEFAULT_CLIPSCORE_HF, processor, device=device, dtype=dtype, what="clipscore checkpoint")
    elif backend == "open_clip":
        enc = OpenClipEncoder(
            arch, checkpoint or "openai", quick_gelu=quick_gelu, spec=CLIP_224, device=device, dtype=dtype,
            filename="open_clip_pytorch_model.bin", what="clipscore checkpoint",
        )
    else:
        raise ValueError(f"backend must be 'transformers' or 'open_clip', got {backend!r}")
    return ClipScorer(enc, convention, device=device, dtype=dtype, batch_size=batch_size, differentiable=differentiable)


__all__ = [
    "CheckpointError",
    "ClipScorer",
    "HFClipEncoder",
    "OpenClipEncoder",
    "clip_convention",
    "clipscore",
    "l2_normalize",
    "load_hf_clip_model",
    "open_clip_arch",
    "spec_from_image_processor",
]
