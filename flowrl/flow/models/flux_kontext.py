"""FLUX.1 Kontext (instruction editing) as a :class:`flowrl.flow.policy.FlowPolicy`.

Kontext is FLUX.1-dev with in-context image conditioning (``FluxKontextPipeline``): the source image is
VAE-encoded (the latent distribution's mode), normalised ``(z - shift) * scale``, packed in 2x2 patches
like the noisy latents and appended to them along the token axis. Its position ids are the noisy
tokens' ``(0, row, col)`` with the first axis set to 1. The transformer sees ``[x; image]`` and the
velocity is its output cut to the ``x`` tokens. Guidance is FLUX's embedded (distilled) guidance; the
pipeline's optional true CFG (``true_cfg_scale > 1`` with a negative prompt) is
``v = v_neg + s (v_pos - v_neg)`` from two transformer calls on the same ``[x; image]``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from flowrl.flow.models.flux import FluxPolicy
from flowrl.flow.policy import PromptEmbeds

#: ``condition_image_size`` value that resizes the source image as the pipeline's ``_auto_resize=True`` does.
AUTO = "auto"


class FluxKontextPolicy(FluxPolicy):
    """FLUX.1 Kontext (``FluxKontextPipeline``): FLUX's packed layout, timestep and guidance embedding,
    plus a per-row source image in ``PromptEmbeds.image_latents`` / ``image_ids``
    (:meth:`encode_prompts` with ``images=``). Without a source image it is FLUX text-to-image.

    ``condition_image_size`` (how a source image is sized before VAE encoding):

    * ``"auto"`` (default; the pipeline's ``_auto_resize=True``): the Kontext training resolution
      (``PREFERRED_KONTEXT_RESOLUTIONS``) nearest the image's aspect ratio;
    * ``None`` (the pipeline's ``_auto_resize=False``): the image's own size;
    * an int ``s`` or ``(height, width)``: that size (Flow-Factory's ``condition_image_size``);

    then rounded down to a multiple of ``2 * vae_scale_factor``. ``true_cfg_scale`` (default 1: off):
    when > 1, :meth:`encode_prompts` adds the negative prompt's branch and :meth:`velocity` applies
    true CFG as the pipeline does.
    """

    family = "flux_kontext"
    pipeline_class_name = "FluxKontextPipeline"
    default_max_sequence_length = 512
    _frozen_names = ("text_encoder", "text_encoder_2", "vae")
    _schedule_kind = "flux"  # linspace(1, 1/n, n) with mu from the noisy tokens only (the pipeline's image_seq_len)

    def __init__(self, pipeline: Any, **kwargs: Any) -> None:
        super().__init__(pipeline, **kwargs)
        self.condition_image_size: Any = AUTO
        self.true_cfg_scale: float = 1.0

    @classmethod
    def _pipeline_cls(cls):
        from diffusers import FluxKontextPipeline  # heavy: diffusers, only when a pipeline is loaded

        return FluxKontextPipeline

    @property
    def _uses_negative(self) -> bool:  # the negative branch only for true CFG
        s = float(self.true_cfg_scale)
        if not math.isfinite(s):
            raise ValueError(f"true_cfg_scale must be finite, got {self.true_cfg_scale}")
        return s > 1.0

    # ---- the source image ---------------------------------------------------------------------

    def condition_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) a ``height`` x ``width`` source image is resized to (see the class doc)."""
        m = 2 * self.vae_scale_factor
        size = self.condition_image_size
        if size == AUTO:
            from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS  # heavy: diffusers

            aspect = width / height
            _, width, height = min((abs(aspect - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
        elif size is not None:
            if isinstance(size, int) and not isinstance(size, bool):
                height = width = size
            elif isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(v, int) for v in size):
                height, width = size
            else:
                raise ValueError(f"condition_image_size must be 'auto', None, an int or (height, width), got {size!r}")
        h, w = height // m * m, width // m * m
        if h < m or w < m:
            raise ValueError(f"source image of {height}x{width} px is smaller than {m} px (2 x vae_scale_factor)")
        return h, w

    def _image_key_extra(self) -> Any:
        return self.condition_image_size if not isinstance(self.condition_image_size, list) else tuple(self.condition_image_size)

    def _encode_image(self, image: Any) -> dict[str, Tensor]:
        """One source image -> ``image_latents`` [L, 4C] and ``image_ids`` [L, 3] (no batch dimension):
        resize and normalise to [-1, 1] with the pipeline's image processor, VAE mode, then
        ``(z - shift) * scale``, 2x2 packing, ids ``(1, row, col)``."""
        pipe = self.pipeline
        proc = pipe.image_processor
        h0, w0 = proc.get_default_height_width(image)
        h, w = self.condition_size(int(h0), int(w0))
        pixels = proc.preprocess(proc.resize(image, h, w), h, w)
        vae = pipe.vae
        pixels = pixels.to(device=self.device, dtype=vae.dtype)
        z = pipe._encode_vae_image(image=pixels, generator=None)  # argmax: the posterior's mode, no draw
        c, lh, lw = z.shape[1], z.shape[2], z.shape[3]
        latents = pipe._pack_latents(z, 1, c, lh, lw)[0]
        ids = pipe._prepare_latent_image_ids(1, lh // 2, lw // 2, self.device, self.dtype)
        ids[..., 0] = 1
        return {"image_latents": latents, "image_ids": ids}

    # ---- the denoiser ---------------------------------------------------------------------------

    def velocity(
        self,
        x: Tensor,
        sigma: float | Tensor,
        embeds: PromptEmbeds,
        guidance_scale: float,
        *,
        height: int | None = None,
        width: int | None = None,
    ) -> Tensor:
        """Kontext velocity: ``f([x; image], sigma, c, g)[:, :L_x]`` with FLUX's embedded guidance ``g``;
        with ``true_cfg_scale = s > 1``: ``v_neg + s (v_pos - v_neg)``. ``height``/``width`` as FLUX's."""
        if not isinstance(x, Tensor) or x.dim() != 3:
            raise ValueError(f"x must be a packed [B, L, D] tensor for FLUX Kontext, got {getattr(x, 'shape', type(x))}")
        b, seq = x.shape[0], x.shape[1]
        if len(embeds) != b:
            raise ValueError(f"embeds has {len(embeds)} rows but x has batch {b}")
        g = float(guidance_scale)
        if not math.isfinite(g):
            raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")
        gh, gw = self._grid_for(seq, height, width)
        s = self._sigma_batch(sigma, b)
        e = embeds.to(device=self.device, dtype=self.dtype)
        hidden = x.to(device=self.device, dtype=self.dtype)
        ids = self.pipeline._prepare_latent_image_ids(b, gh, gw, self.device, self.dtype)
        if e.image_latents is not None:
            if e.image_ids is None:
                raise ValueError("embeds.image_latents needs embeds.image_ids")
            if not torch.equal(e.image_ids, e.image_ids[:1].expand_as(e.image_ids)):
                raise ValueError("the rows' source images differ in size: sample rows of one image size per call")
            hidden = torch.cat([hidden, e.image_latents], dim=1)
            ids = torch.cat([ids, e.image_ids[0]], dim=0)
        # the pipeline: timestep = (t in the latents' dtype) / 1000 with t = sigma * 1000
        timestep = (s * self.num_train_timesteps).to(self.dtype) / self.num_train_timesteps
        guidance = torch.full((b,), g, device=self.device, dtype=torch.float32) if self.transformer.config.guidance_embeds else None
        txt_ids = e.text_ids[0] if e.text_ids is not None else torch.zeros(
            e.prompt_embeds.shape[1], 3, device=self.device, dtype=self.dtype)

        def run(prompt_embeds: Tensor, pooled: Tensor | None) -> Tensor:
            out = self.denoiser(hidden_states=hidden, timestep=timestep, guidance=guidance, pooled_projections=pooled,
                                encoder_hidden_states=prompt_embeds, txt_ids=txt_ids, img_ids=ids, return_dict=False)[0]
            return out[:, :seq].float()

        v = run(e.prompt_embeds, e.pooled)
        cfg = float(self.true_cfg_scale)
        if cfg > 1.0:
            if not e.has_negative:
                raise ValueError("true_cfg_scale > 1 needs negative embeddings (encode_prompts gives them when it is set)")
            v_neg = run(e.negative_prompt_embeds, e.negative_pooled)
            v = v_neg + cfg * (v - v_neg)
        self.nfe += 1
        return v
