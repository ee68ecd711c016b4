"""Flow-matching text-to-image models as RL policies: a thin adapter over diffusers pipelines.

A :class:`FlowPolicy` exposes exactly what a sampler and a learner need from a rectified-flow
model (SD3 / SD3.5, arXiv 2403.03206; FLUX.1):

* interpolation ``x_sigma = (1 - sigma) * x0 + sigma * eps`` with ``sigma in [0, 1]``, sigma = 1 pure noise;
* the network predicts the velocity ``v ~ eps - x0``; an ODE (Euler) step is ``x' = x + v * (sigma' - sigma)``;
* the latent layout the sampler works in is the pipeline's own: SD3 ``[B, C, h, w]``, FLUX packed
  2x2 patches ``[B, h*w/4, 4C]``.

Only the transformer is trainable; text encoders and the VAE are frozen and may be kept in a lower
precision (``frozen_dtype``). Prompt embeddings are cached per prompt string (LRU).
:meth:`FlowPolicy.velocity` reproduces one denoiser evaluation of the pipeline's ``__call__``
(timestep scaling, classifier-free guidance for SD3, guidance embedding for FLUX).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor

from flowrl.flow import steps
from flowrl.flow.schedule import sigmas_for_scheduler

logger = logging.getLogger(__name__)

__all__ = ["PromptEmbeds", "FlowPolicy", "pad_rows"]


# --------------------------------------------------------------------------------------------
# Prompt embeddings
# --------------------------------------------------------------------------------------------


@dataclass
class PromptEmbeds:
    """Text conditioning for a batch, as plain tensors whose first dimension is the batch.

    SD3: ``prompt_embeds`` [B, S, D_joint], ``pooled`` [B, D_pool], and for classifier-free
    guidance ``negative_prompt_embeds`` / ``negative_pooled`` of the same shapes (row i is the
    negative prompt for sample i). FLUX: ``prompt_embeds`` [B, S, D_t5], ``pooled`` [B, D_clip],
    ``text_ids`` [B, S, 3] (FLUX's text position ids, identical across rows; stored per row so
    that every field indexes by sample). Families whose prompts have their own lengths (Qwen-Image,
    Wan, Z-Image, ...) give ``prompt_mask`` [B, S] (1 token, 0 padding; ``negative_prompt_mask`` for the
    negative branch): rows of different lengths are padded with zeros to the longest
    (:func:`pad_rows`); families without a pooled embedding leave ``pooled`` None. ``image_latents``
    [B, L, D] and ``image_ids`` [B, L, k]: a conditioning image per row (instruction editing), in the
    family's packed layout.
    """

    prompt_embeds: Tensor
    pooled: Tensor | None = None
    negative_prompt_embeds: Tensor | None = None
    negative_pooled: Tensor | None = None
    text_ids: Tensor | None = None
    prompt_mask: Tensor | None = None
    negative_prompt_mask: Tensor | None = None
    image_latents: Tensor | None = None
    image_ids: Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.prompt_embeds, Tensor) or self.prompt_embeds.dim() != 3:
            raise ValueError("prompt_embeds must be a [B, S, D] tensor")
        if self.pooled is not None and (not isinstance(self.pooled, Tensor) or self.pooled.dim() != 2):
            raise ValueError("pooled must be a [B, D] tensor")
        if self.negative_pooled is not None and (self.pooled is None or self.negative_prompt_embeds is None):
            raise ValueError("negative_pooled needs pooled and negative_prompt_embeds")
        if self.negative_prompt_embeds is not None and self.pooled is not None and self.negative_pooled is None:
            raise ValueError("negative_prompt_embeds and negative_pooled must be given together")
        b = self.prompt_embeds.shape[0]
        for f in fields(self):
            t = getattr(self, f.name)
            if t is not None and t.shape[0] != b:
                raise ValueError(f"{f.name} has batch {t.shape[0]}, expected {b} (the batch of prompt_embeds)")
        for emb, mask in (("prompt_embeds", "prompt_mask"), ("negative_prompt_embeds", "negative_prompt_mask")):
            e, m = getattr(self, emb), getattr(self, mask)
            if m is not None and (e is None or tuple(m.shape) != tuple(e.shape[:2])):
                raise ValueError(f"{mask} must be [B, S] with the B and S of {emb}, got {tuple(m.shape)}")
        if (self.negative_prompt_embeds is not None and self.prompt_mask is None
                and self.negative_prompt_embeds.shape != self.prompt_embeds.shape):
            raise ValueError(
                f"negative_prompt_embeds shape {tuple(self.negative_prompt_embeds.shape)} differs from "
                f"prompt_embeds shape {tuple(self.prompt_embeds.shape)}"
            )

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    @property
    def batch_size(self) -> int:
        """Number of rows."""
        return self.prompt_embeds.shape[0]

    @property
    def has_negative(self) -> bool:
        """Whether the negative (unconditional) branch for CFG is present."""
        return self.negative_prompt_embeds is not None

    def _map(self, fn) -> "PromptEmbeds":
        return PromptEmbeds(**{f.name: (None if getattr(self, f.name) is None else fn(getattr(self, f.name)))
                               for f in fields(self)})

    def select(self, index: Tensor | Sequence[int] | slice) -> "PromptEmbeds":
        """Rows by index: a LongTensor / list of row numbers (repeats allowed, e.g.
        ``torch.arange(B).repeat_interleave(G)`` to expand prompts into groups), a bool mask, or a slice."""
        if isinstance(index, slice):
            return self._map(lambda t: t[index])
        if not isinstance(index, Tensor):
            index = torch.as_tensor(list(index), dtype=torch.long)
        if index.dtype == torch.bool:
            if index.shape != (len(self),):
                raise ValueError(f"bool index must have shape ({len(self)},), got {tuple(index.shape)}")
            index = index.nonzero().flatten()
        if index.dim() != 1 or index.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise ValueError(f"index must be a 1-D integer or bool tensor, got {index.dtype} {tuple(index.shape)}")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= len(self)):
            raise ValueError(f"index out of range for {len(self)} rows: min {int(index.min())}, max {int(index.max())}")
        index = index.long()
        return self._map(lambda t: t.index_select(0, index.to(t.device)))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "PromptEmbeds":
        """Move to ``device`` and cast floating-point tensors to ``dtype`` (either may be None)."""

        def move(t: Tensor) -> Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)

        return self._map(move)

    def detach(self) -> "PromptEmbeds":
        """A copy with every tensor detached."""
        return self._map(lambda t: t.detach())

    def tensors(self) -> dict[str, Tensor]:
        """The present fields as a ``name -> tensor`` dict (for a Rollout or a safetensors file)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_tensors(cls, d: dict[str, Tensor]) -> "PromptEmbeds":
        """Inverse of :meth:`tensors`; unknown keys are an error naming the key."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown PromptEmbeds field(s) {unknown}; valid fields are {sorted(known)}")
        if "prompt_embeds" not in d:
            raise ValueError("PromptEmbeds.from_tensors: missing required field(s) ['prompt_embeds']")
        return cls(**d)

    @classmethod
    def cat(cls, items: Sequence["PromptEmbeds"]) -> "PromptEmbeds":
        """Concatenate along the batch dimension (all items must have the same fields); sequences of
        different lengths are padded to the longest (:func:`pad_rows`, which needs their masks)."""
        if not items:
            raise ValueError("items must be a non-empty sequence of PromptEmbeds")
        present = [set(e.tensors()) for e in items]
        if any(p != present[0] for p in present):
            raise ValueError(f"cannot concatenate PromptEmbeds with different fields: {present}")
        rows = [{k: t[i] for k, t in e.tensors().items()} for e in items for i in range(len(e))]
        return cls(**pad_rows(rows))


# Fields of PromptEmbeds with a sequence dimension (dim 1 of the batch), the mask that says which of its
# positions hold tokens, and the value its padding takes.
_SEQ_FIELDS = {"prompt_embeds": "prompt_mask", "text_ids": "prompt_mask", "prompt_mask": "prompt_mask",
               "negative_prompt_embeds": "negative_prompt_mask", "negative_prompt_mask": "negative_prompt_mask"}


def pad_rows(rows: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Stack per-row embedding tensors (no batch dimension) into batched ones. Rows whose sequences
    differ in length are padded with zeros at the end to the longest, which needs the row's mask
    (``prompt_mask`` / ``negative_prompt_mask``: its zeros mark the padding), as the pipelines pad a
    batch of prompts to its longest (Qwen-Image, Wan)."""
    out: dict[str, Tensor] = {}
    for k in rows[0]:
        ts = [r[k] for r in rows]
        if all(t.shape == ts[0].shape for t in ts):
            out[k] = torch.stack(ts)
            continue
        mask = _SEQ_FIELDS.get(k)
        if mask is None or mask not in rows[0]:
            raise ValueError(f"PromptEmbeds: rows of {k!r} differ in shape ({sorted({tuple(t.shape) for t in ts})}) "
                             "and have no mask to pad them with")
        n = max(t.shape[0] for t in ts)
        out[k] = torch.stack([torch.cat([t, t.new_zeros(n - t.shape[0], *t.shape[1:])]) for t in ts])
    return out


# --------------------------------------------------------------------------------------------
# Loading helpers
# --------------------------------------------------------------------------------------------


def _looks_like_local_path(s: str) -> bool:
    """True when ``s`` can only be a filesystem path (not a hub id ``owner/name``)."""
    return (
        os.path.isabs(s)
        or s.startswith((".", "~"))
        or "\\" in s
        or s.count("/") > 1
        or os.path.exists(s)
    )


_HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "proxies")


def _read_model_index(path: str, hub_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """``model_index.json`` of a local folder or a hub repository (only that small file is fetched)."""
    if os.path.isdir(path):
        f = Path(path) / "model_index.json"
        if not f.is_file():
            raise FileNotFoundError(f"model folder {path!r} has no model_index.json (not a diffusers pipeline folder)")
        return json.loads(f.read_text())
    from diffusers import DiffusionPipeline  # heavy: diffusers, only when a pipeline is loaded

    try:
        return dict(DiffusionPipeline.load_config(path, **(hub_kwargs or {})))
    except Exception as e:  # noqa: BLE001 - re-raised with the path named
        raise OSError(
            f"could not load the pipeline config of {path!r}: not a local folder, and the hub lookup failed "
            f"({type(e).__name__}: {e})"
        ) from e


def _check_model_path(path: str) -> None:
    if _looks_like_local_path(path):
        expanded = os.path.expanduser(path)
        if not os.path.isdir(expanded):
            raise FileNotFoundError(f"model path {path!r} does not exist or is not a folder")


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``{"dtype": ...}`` for diffusers versions that renamed ``torch_dtype`` (0.42+), else ``{"torch_dtype": ...}``."""
    try:
        from diffusers.utils import deprecation_utils  # heavy: diffusers (see above)

        if hasattr(deprecation_utils, "_resolve_dtype"):
            return {"dtype": dtype}
    except ImportError:
        pass
    return {"torch_dtype": dtype}


def _component_absent(index: dict[str, Any], name: str) -> bool:
    v = index.get(name)
    return v is None or (isinstance(v, (list, tuple)) and (len(v) < 2 or v[0] is None or v[1] is None))


# --------------------------------------------------------------------------------------------
# The policy
# --------------------------------------------------------------------------------------------


class FlowPolicy:
    """A diffusers flow-matching pipeline seen as a policy; :class:`SD3Policy` and :class:`FluxPolicy`
    implement it.

    Attributes: ``pipeline`` (the diffusers pipeline), ``transformer`` (the only trainable module),
    ``device``, ``dtype`` (the transformer's), ``frozen_dtype`` (text encoders and VAE),
    ``max_sequence_length`` (T5 length), ``nfe`` (velocity evaluations since construction or since
    it was last set to 0: one per call of :meth:`velocity`, whether or not it ran the CFG branch;
    the CFG branch is one transformer call on a 2B batch).
    """

    family: ClassVar[str] = ""  # the model.family name (flowrl.flow.models.FAMILIES)
    pipeline_class_name: ClassVar[str] = ""
    default_max_sequence_length: ClassVar[int] = 256
    _frozen_names: ClassVar[tuple[str, ...]] = ()
    _uses_negative: ClassVar[bool] = False  # whether encode_prompts adds the CFG negative branch
    _schedule_kind: ClassVar[str] = "sd3"  # which sigmas the pipeline feeds its scheduler (schedule.py)

    def __init__(
        self,
        pipeline: Any,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        frozen_dtype: torch.dtype | None = None,
        max_sequence_length: int | None = None,
        cache_size: int = 4096,
    ) -> None:
        if type(self) is FlowPolicy:
            raise TypeError("FlowPolicy is abstract: use FlowPolicy.from_pretrained / from_pipeline, or a subclass")
        if not _is_subclass_named(type(pipeline), self.pipeline_class_name):
            raise ValueError(
                f"pipeline must be a {self.pipeline_class_name}, got {type(pipeline).__name__}"
            )
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        self.pipeline = pipeline
        self.device = torch.device(device)
        self.dtype: torch.dtype = dtype or pipeline.transformer.dtype
        self.frozen_dtype: torch.dtype = frozen_dtype or self.dtype
        msl = self.default_max_sequence_length if max_sequence_length is None else int(max_sequence_length)
        if msl < 1:
            raise ValueError(f"max_sequence_length must be >= 1, got {max_sequence_length}")
        self.max_sequence_length = msl
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[str, dict[str, Tensor]] = OrderedDict()
        self._image_cache: OrderedDict[Any, dict[str, Tensor]] = OrderedDict()  # source images (editing), by content
        self.nfe = 0
        self.num_encoded = 0  # prompts sent through the text encoders (cache misses)
        # What velocity() calls: the transformer itself, or a wrapper of it that a training loop
        # installs (accelerate's DDP/FSDP module), so gradients are synchronised by that wrapper.
        self.forward_module: Optional[torch.nn.Module] = None
        # where the text encoders wait between prompt encodings (offload_text_encoders); None: on ``device``
        self.text_encoder_home: Optional[torch.device] = None
        self._encoders_loaded = False  # inside _text_encoders_loaded

        _place(pipeline.transformer, self.device, self.dtype)
        for name in self._frozen_names:
            m = getattr(pipeline, name, None)
            if m is not None:
                _place(m, self.device, self.frozen_dtype)
                m.requires_grad_(False)
                m.eval()
        if hasattr(pipeline, "set_progress_bar_config"):
            pipeline.set_progress_bar_config(disable=True)

    # ---- construction ---------------------------------------------------------------------

    @classmethod
    def _pipeline_cls(cls):
        raise NotImplementedError

    @classmethod
    def _load_kwargs(cls, index: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
        return {}

    @classmethod
    def from_pipeline(cls, pipeline: Any, **kwargs: Any) -> "FlowPolicy":
        """Wrap an existing pipeline; on :class:`FlowPolicy` itself, picks the subclass by pipeline class."""
        if cls is FlowPolicy:
            sub = _policy_class_for(type(pipeline).__name__, mro=type(pipeline).__mro__)
            return sub(pipeline, **kwargs)
        return cls(pipeline, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike,
        *,
        torch_dtype: torch.dtype = torch.float32,
        frozen_dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        max_sequence_length: int | None = None,
        cache_size: int = 4096,
        **pipeline_kwargs: Any,
    ) -> "FlowPolicy":
        """Load a pipeline from a hub id or a local folder (same code path) and wrap it.

        ``torch_dtype`` is the transformer's dtype; ``frozen_dtype`` (default: ``torch_dtype``) the
        text encoders' and VAE's. On :class:`FlowPolicy` the subclass is chosen from
        ``model_index.json``'s ``_class_name``. For SD3 folders without T5 (``text_encoder_3`` null
        in ``model_index.json``), ``text_encoder_3=None, tokenizer_3=None`` are passed explicitly.
        ``pipeline_kwargs`` go to ``<Pipeline>.from_pretrained`` (e.g. ``revision``, ``variant``, or
        ``text_encoder_3=None`` to drop T5). A missing local folder raises ``FileNotFoundError``
        naming the path.
        """
        path = os.fspath(path_or_hub_id)
        if not path:
            raise ValueError("path_or_hub_id must be a non-empty string")
        _check_model_path(path)
        path = os.path.expanduser(path) if _looks_like_local_path(path) else path
        index = _read_model_index(path, {k: v for k, v in pipeline_kwargs.items() if k in _HUB_KWARGS})
        target = cls
        if cls is FlowPolicy:
            target = _policy_class_for(str(index.get("_class_name", "")), path=path)
        elif index.get("_class_name") not in (None, target.pipeline_class_name):
            raise ValueError(
                f"{path!r} holds a {index.get('_class_name')}, but {target.__name__} needs a {target.pipeline_class_name}"
            )
        kwargs = dict(target._load_kwargs(index, pipeline_kwargs))
        kwargs.update(pipeline_kwargs)
        try:
            pipe = target._pipeline_cls().from_pretrained(path, **_dtype_kwarg(torch_dtype), **kwargs)
        except (OSError, ValueError) as e:
            err = ValueError if isinstance(e, ValueError) else OSError
            raise err(f"could not load a {target.pipeline_class_name} from {path!r}: {e}") from e
        return target(
            pipe,
            device=device,
            dtype=torch_dtype,
            frozen_dtype=frozen_dtype,
            max_sequence_length=max_sequence_length,
            cache_size=cache_size,
        )

    # ---- modules --------------------------------------------------------------------------

    @property
    def transformer(self) -> torch.nn.Module:
        """The denoiser (the only trainable module). Setting it also sets ``pipeline.transformer``
        (e.g. to swap in an EMA or a PEFT-wrapped copy)."""
        return self.pipeline.transformer

    @property
    def denoiser(self) -> torch.nn.Module:
        """The module velocity() calls: ``forward_module`` when set, else the transformer."""
        return self.forward_module if self.forward_module is not None else self.pipeline.transformer

    @transformer.setter
    def transformer(self, module: torch.nn.Module) -> None:
        self.pipeline.transformer = module

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        """The frozen modules by pipeline attribute name (text encoders, VAE)."""
        return {n: getattr(self.pipeline, n) for n in self._frozen_names if getattr(self.pipeline, n, None) is not None}

    def to(self, device: torch.device | str) -> "FlowPolicy":
        """Move every module and the prompt cache to ``device`` (offloaded text encoders stay where they wait)."""
        self.device = torch.device(device)
        self.transformer.to(self.device)
        parked = self.text_encoders() if self.text_encoder_home is not None else {}
        for name, m in self.frozen_modules().items():
            m.to(self.text_encoder_home if name in parked else self.device)
        for cache in (self._cache, self._image_cache):
            for k, rows in cache.items():
                cache[k] = {n: t.to(self.device) for n, t in rows.items()}
        return self

    def text_encoders(self) -> dict[str, torch.nn.Module]:
        """The frozen text encoders (``text_encoder*`` modules of the pipeline), by name."""
        return {n: m for n, m in self.frozen_modules().items() if n.startswith("text_encoder")}

    def offload_text_encoders(self, device: torch.device | str | None = "cpu") -> None:
        """Keep the text encoders on ``device`` (the CPU by default; None: back on the policy's device) between
        prompt encodings. A prompt missing from the cache brings them to the policy's device for the batch of
        missing prompts, then they go back; cached prompts need no encoder. Frees their weights' memory on the
        accelerator for sampling and training (T5-XXL: 9.5 GB in bf16, Qwen2.5-VL-7B: 16.6 GB); the price is
        two host transfers per encoding batch, paid once per prompt of a fixed prompt list."""
        self.text_encoder_home = None if device is None or torch.device(device) == self.device else torch.device(device)
        for m in self.text_encoders().values():
            m.to(self.text_encoder_home or self.device)

    @contextlib.contextmanager
    def _text_encoders_loaded(self):
        """The text encoders on the policy's device for the duration (they return to their home after)."""
        home = self.text_encoder_home
        if home is None or self._encoders_loaded:  # not offloaded, or loaded by an enclosing call
            yield
            return
        modules = list(self.text_encoders().values())
        for m in modules:
            m.to(self.device)
        self._encoders_loaded = True
        try:
            yield
        finally:
            self._encoders_loaded = False
            for m in modules:
                m.to(home)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.pipeline.scheduler.config.get("num_train_timesteps", 1000))

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipeline.vae_scale_factor)

    def clear_prompt_cache(self) -> None:
        """Forget all cached prompt embeddings (and encoded source images)."""
        self._cache.clear()
        self._image_cache.clear()

    # ---- prompts --------------------------------------------------------------------------

    def _encode_batch(self, prompts: list[str]) -> dict[str, Tensor]:
        """Run the text encoders on ``prompts``; returns batched tensors (no negatives)."""
        raise NotImplementedError

    def _cached_rows(self, prompts: list[str]) -> list[dict[str, Tensor]]:
        """Per-prompt embedding rows, encoding only the prompts not cached (LRU).

        Each missing prompt is encoded in a batch of its own: a GEMM's rounding can depend on the
        number of rows (the pooled CLIP projection of a prompt encoded beside others differs in
        the last bits on some CPUs), so encoding one at a time makes a prompt's embedding a
        function of the prompt alone, whatever else was cached before (exact resume, reloads).
        """
        missing: list[str] = []
        for p in prompts:
            if p not in self._cache and p not in missing:
                missing.append(p)
        with self._text_encoders_loaded() if missing else contextlib.nullcontext():
            self._encode_missing(missing)
        rows = []
        for p in prompts:
            self._cache.move_to_end(p)
            rows.append(self._cache[p])
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return rows

    def _encode_missing(self, missing: list[str]) -> None:
        """Encode each of ``missing`` alone (see :meth:`_cached_rows`) into the cache."""
        for p in missing:
            with torch.no_grad():
                out = self._encode_batch([p])
            self.num_encoded += 1
            self._cache[p] = {
                k: v[0].detach().to(device=self.device, dtype=self.dtype if v.is_floating_point() else v.dtype)
                .clone()
                for k, v in out.items()
            }

    def encode_prompts(self, prompts: Sequence[str], negative_prompt: str = "",
                       images: Sequence[Any] | None = None) -> PromptEmbeds:
        """Embeddings of ``prompts`` (one row per prompt), in the transformer's dtype on ``device``.

        Embeddings are cached per prompt string (LRU, ``cache_size`` entries); only prompts not in
        the cache go through the text encoders, one prompt per call (batch-independent results). For SD3 the negative branch for CFG is
        the embedding of ``negative_prompt`` repeated per row; FLUX (guidance-distilled) has none
        and ignores ``negative_prompt``. ``images`` (editing families): one source image per prompt
        (a file path, a PIL image or a [3, H, W] / [1, 3, H, W] tensor in [0, 1]), encoded by the
        family (``image_latents`` / ``image_ids``) and cached by content (a path by its resolved name,
        size and mtime), so a row's key is its (prompt, image).
        """
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise ValueError(f"prompts must be a list of strings, got {type(prompts).__name__}")
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts must be a non-empty list of strings")
        bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
        if bad:
            raise ValueError(f"prompts must all be strings, got {sorted(set(bad))}")
        if not isinstance(negative_prompt, str):
            raise ValueError(f"negative_prompt must be a string, got {type(negative_prompt).__name__}")
        paired = images is not None and self._prompt_sees_image
        wanted = [] if paired else prompts + ([negative_prompt] if self._uses_negative else [])
        # one round trip of offloaded text encoders for the prompts and the negative prompt together
        with self._text_encoders_loaded() if any(p not in self._cache for p in wanted) else contextlib.nullcontext():
            return self._encode_rows(prompts, negative_prompt, images, paired)

    def _encode_rows(self, prompts: list[str], negative_prompt: str, images, paired: bool) -> PromptEmbeds:
        """The rows of :meth:`encode_prompts` (checked arguments), cached or encoded."""
        if paired:  # the text encoder reads the image too: one row per (prompt, image)
            rows = self._image_rows(images, len(prompts), prompts)
        else:
            rows = self._cached_rows(prompts)
            if images is not None:
                rows = [dict(r, **ir) for r, ir in zip(rows, self._image_rows(images, len(prompts)))]
        if self._uses_negative:
            negs = (self._image_rows(images, len(prompts), [negative_prompt] * len(prompts)) if paired
                    else self._cached_rows([negative_prompt]) * len(rows))
            keep = ("prompt_embeds", "pooled", "prompt_mask")
            rows = [dict(r, **{f"negative_{k}": v for k, v in ng.items() if k in keep}) for r, ng in zip(rows, negs)]
        return PromptEmbeds(**pad_rows(rows))

    # ---- source images (instruction editing) ----------------------------------------------------

    #: Editing families whose text encoder reads the source image with the prompt (Qwen-Image-Edit): their
    #: rows come from :meth:`_encode_pair` and are cached by (prompt, image); others (Kontext) combine the
    #: prompt's cached rows with :meth:`_encode_image`'s, cached by image.
    _prompt_sees_image: ClassVar[bool] = False

    def _encode_image(self, image: Any) -> dict[str, Tensor]:
        """One loaded source image -> per-row tensors (no batch dimension), e.g. ``image_latents`` and
        ``image_ids``; only editing families implement it."""
        raise ValueError(f"model family {self.family or type(self).__name__!r} takes no source image (images=...)")

    def _encode_pair(self, prompt: str, image: Any) -> dict[str, Tensor]:
        """One prompt with its loaded source image -> every per-row tensor (text and image); the families
        with ``_prompt_sees_image`` implement it."""
        raise ValueError(f"model family {self.family or type(self).__name__!r} encodes no (prompt, image) pair")

    def _image_key_extra(self) -> Any:
        """What else an encoded image depends on (e.g. the size it is resized to); part of its cache key."""
        return None

    def _image_rows(self, images: Sequence[Any], n: int, prompts: Sequence[str] | None = None) -> list[dict[str, Tensor]]:
        """The encoded source image of each of ``n`` prompts (cached by content, LRU like prompts); with
        ``prompts``, each (prompt, image) pair encoded together (:meth:`_encode_pair`)."""
        if isinstance(images, (str, bytes)) or not isinstance(images, Sequence) or len(images) != n:
            raise ValueError(f"images must be a list of one source image per prompt ({n}), got {_describe(images)}")
        if any(im is None for im in images):
            raise ValueError("images: every prompt needs a source image (None given); pass images=None for none")
        keys = [(image_key(im), self._image_key_extra(), None if prompts is None else prompts[i])
                for i, im in enumerate(images)]
        pairs_missing = prompts is not None and any(k not in self._image_cache for k in keys)
        with self._text_encoders_loaded() if pairs_missing else contextlib.nullcontext():
            return self._image_rows_of(images, keys, prompts)

    def _image_rows_of(self, images, keys, prompts) -> list[dict[str, Tensor]]:
        rows = []
        for i, (im, key) in enumerate(zip(images, keys)):
            if key not in self._image_cache:
                with torch.no_grad():
                    out = (self._encode_image(load_image(im)) if prompts is None
                           else self._encode_pair(prompts[i], load_image(im)))
                if prompts is not None:
                    self.num_encoded += 1
                self._image_cache[key] = {
                    k: v.detach().to(device=self.device, dtype=self.dtype if v.is_floating_point() else v.dtype).clone()
                    for k, v in out.items()
                }
            self._image_cache.move_to_end(key)
            rows.append(self._image_cache[key])
        while len(self._image_cache) > self.cache_size:
            self._image_cache.popitem(last=False)
        return rows

    # ---- latent geometry ------------------------------------------------------------------

    def _check_size(self, height: int, width: int, multiple: int) -> None:
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
            if v % multiple:
                raise ValueError(f"{name} must be divisible by {multiple} for this model, got {v}")

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """Per-sample shape of ``x`` in the sampler's layout for an image of ``height`` x ``width``."""
        raise NotImplementedError

    def image_seq_len(self, height: int, width: int) -> int:
        """Number of image tokens the transformer sees (used for resolution-dependent shifting)."""
        raise NotImplementedError

    def initial_noise(
        self,
        batch: int,
        height: int,
        width: int,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> Tensor:
        """Standard normal ``x`` at sigma = 1, float32 ``[batch, *latent_shape]`` on ``device``.

        Drawn exactly as the pipeline's ``prepare_latents`` draws it (same shape, order and
        generator use), so the same generator gives the same start as the pipeline's own call.
        """
        raise NotImplementedError

    def sigmas(self, num_steps: int, height: int, width: int) -> Tensor:
        """The pipeline's sigma schedule for ``num_steps`` steps: float32 ``[num_steps + 1]``,
        decreasing from ~1 and ending with 0 (``flowrl.flow.schedule.sigmas_for_scheduler`` on the
        scheduler's config, with the image token count for dynamic shifting)."""
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
        cfg = dict(self.pipeline.scheduler.config)
        seq = self.image_seq_len(height, width)
        return sigmas_for_scheduler(cfg, num_steps, image_seq_len=seq, pipeline=self._schedule_kind).to(torch.float32)

    # ---- the denoiser ---------------------------------------------------------------------

    def _sigma_batch(self, sigma: float | Tensor, batch: int) -> Tensor:
        """``sigma`` as a float32 ``[batch]`` tensor on ``device``."""
        if isinstance(sigma, Tensor):
            s = sigma.detach().to(device=self.device, dtype=torch.float32)
            if s.dim() == 0:
                s = s.expand(batch)
            elif s.shape != (batch,):
                raise ValueError(f"sigma must be a float, a 0-d tensor or a [{batch}] tensor, got shape {tuple(s.shape)}")
        else:
            try:
                s = torch.full((batch,), float(sigma), device=self.device, dtype=torch.float32)
            except (TypeError, ValueError):
                raise ValueError(f"sigma must be a float or a tensor, got {type(sigma).__name__}") from None
        host = steps.host_values(sigma)
        # checked where that needs no device synchronisation (a float, a CPU tensor; as flow.steps checks
        # sigmas): a sigma already on an accelerator is the sampler's or the learner's, from a checked schedule
        if host is not None and not bool(((host >= 0) & (host <= 1)).all()):  # NaN fails both comparisons
            raise ValueError(f"sigma must lie in [0, 1], got {host.tolist()}")
        return s

    def velocity(self, x: Tensor, sigma: float | Tensor, embeds: PromptEmbeds, guidance_scale: float) -> Tensor:
        """Velocity ``v(x, sigma | c)`` (float32, shape of ``x``). Differentiable w.r.t. the
        transformer's parameters when called under grad. Increments ``nfe`` by one."""
        raise NotImplementedError

    def decode(self, x: Tensor) -> Tensor:
        """Images ``[B, 3, H, W]`` float32 in [0, 1] from latents in the sampler's layout (video families:
        frames ``[B, 3, F, H, W]``)."""
        raise NotImplementedError

    def _vae_decode(self, latents: Tensor) -> Tensor:
        """``(VAE.decode(latents / scaling + shift) / 2 + 0.5).clamp(0, 1)`` in float32."""
        vae = self.pipeline.vae
        cfg = vae.config
        z = latents.to(device=self.device, dtype=vae.dtype)
        z = z / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        img = vae.decode(z, return_dict=False)[0]
        return (img.float() / 2 + 0.5).clamp(0, 1)

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.transformer.parameters())
        return (
            f"{type(self).__name__}(transformer={type(self.transformer).__name__} [{n:,} params], "
            f"device={self.device}, dtype={self.dtype}, frozen_dtype={self.frozen_dtype})"
        )


class PackedGrid:
    """For families whose sampler layout is packed 2x2 latent patches ``[B, gh * gw, D]`` (FLUX.1, FLUX.2,
    Qwen-Image): the token count and the patch grid of an image. The family gives ``_grid(height, width)``
    and ``_grids`` (token count -> grid, filled by its ``latent_shape``)."""

    def image_seq_len(self, height: int, width: int) -> int:
        gh, gw = self._grid(height, width)
        return gh * gw

    def _grid_for(self, seq_len: int, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """The patch grid of packed latents with ``seq_len`` tokens: from ``height``/``width`` when given,
        else from the last :meth:`latent_shape` call with that token count, else a square grid."""
        if height is not None or width is not None:
            if height is None or width is None:
                raise ValueError("give both height and width, or neither")
            gh, gw = self._grid(height, width)
            if gh * gw != seq_len:
                raise ValueError(f"x has {seq_len} tokens but a {height}x{width} image has {gh * gw}")
            return gh, gw
        if seq_len in self._grids:
            return self._grids[seq_len]
        r = math.isqrt(seq_len)
        if r * r == seq_len:
            return r, r
        raise ValueError(
            f"cannot tell the image size of packed latents with {seq_len} tokens: call latent_shape(height, width) "
            "first or pass height= and width="
        )


_CPU_ALIGNMENT = 64  # bytes; torch's own CPU allocator aligns every new storage to this


def _place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move ``module`` to ``device``, cast it to ``dtype`` only when it is not already in it, and
    give every CPU tensor storage aligned as torch's allocator aligns it.

    Weights loaded from a safetensors file can sit at any 8-byte offset of the file's buffer, and
    a CPU GEMM may round differently on a misaligned operand (seen on AMD EPYC: the CLIP text
    projection of a reloaded model differed by 2e-7 from the model that was saved). With aligned
    copies a reloaded model computes exactly as the model it was saved from.
    """
    module.to(device=device)
    if any(p.is_floating_point() and p.dtype != dtype for p in module.parameters()):
        module.to(dtype=dtype)
    for m in module.modules():
        for p in m._parameters.values():
            if p is not None and p.device.type == "cpu" and p.data_ptr() % _CPU_ALIGNMENT:
                p.data = p.data.clone()
        for name, b in m._buffers.items():
            if b is not None and b.device.type == "cpu" and b.data_ptr() % _CPU_ALIGNMENT:
                m._buffers[name] = b.clone()


def _describe(x: Any) -> str:
    return f"{len(x)} item(s)" if isinstance(x, Sequence) and not isinstance(x, (str, bytes)) else type(x).__name__


def image_key(image: Any) -> tuple:
    """A cache key of a source image by content: a path by its resolved name, size and mtime; a PIL
    image or tensor by a hash of its pixels."""
    import hashlib

    if isinstance(image, (str, os.PathLike)):
        p = Path(image).expanduser().resolve()
        try:
            st = p.stat()
        except OSError:
            raise ValueError(f"source image {os.fspath(image)!r} not found") from None
        return ("path", str(p), st.st_size, st.st_mtime_ns)
    if isinstance(image, Tensor):
        t = image.detach().to("cpu").contiguous()
        return ("tensor", tuple(t.shape), str(t.dtype), hashlib.sha1(t.numpy().tobytes()).hexdigest())
    if hasattr(image, "tobytes") and hasattr(image, "mode") and hasattr(image, "size"):  # PIL.Image
        return ("pil", image.mode, tuple(image.size), hashlib.sha1(image.tobytes()).hexdigest())
    raise ValueError(f"a source image must be a file path, a PIL image or a tensor, got {type(image).__name__}")


def load_image(image: Any) -> Any:
    """A source image as the pipelines' image processor takes it: a path is opened as an RGB PIL image
    (ValueError naming it when unreadable); a [3, H, W] tensor gets a batch dimension."""
    if isinstance(image, (str, os.PathLike)):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(os.fspath(image)) as im:
                return im.convert("RGB")
        except (OSError, UnidentifiedImageError) as e:
            raise ValueError(f"source image {os.fspath(image)!r} is not a readable image ({type(e).__name__})") from None
    if isinstance(image, Tensor):
        if image.dim() == 3:
            image = image.unsqueeze(0)
        if image.dim() != 4 or image.shape[:2] != (1, 3):
            raise ValueError(f"a source image tensor must be [3, H, W] or [1, 3, H, W], got {tuple(image.shape)}")
        return image.float()
    if hasattr(image, "convert"):
        return image.convert("RGB")
    raise ValueError(f"a source image must be a file path, a PIL image or a tensor, got {type(image).__name__}")


def _is_subclass_named(klass: type, name: str) -> bool:
    return any(k.__name__ == name for k in klass.__mro__)


def _policy_class_for(class_name: str, path: str | None = None, mro: tuple[type, ...] = ()) -> type[FlowPolicy]:
    """The registered policy class whose pipeline is ``class_name`` (or one of the classes in ``mro``)."""
    from flowrl.flow.models import policy_classes  # the family registry (imports this module)

    names = [class_name] + [k.__name__ for k in mro]
    classes = policy_classes()
    for sub in classes.values():
        if sub.pipeline_class_name in names:
            return sub
    where = f" in {path!r}" if path else ""
    raise ValueError(
        f"unsupported pipeline class {class_name!r}{where}; supported: "
        f"{sorted(c.pipeline_class_name for c in classes.values())}"
    )


def __getattr__(name: str):
    """``SD3Policy`` / ``FluxPolicy`` and every other family's class, from :mod:`flowrl.flow.models`."""
    if name.endswith("Policy") and not name.startswith("_"):
        from flowrl.flow import models

        for cls in models.policy_classes().values():
            if cls.__name__ == name:
                return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
