"""FLUX.2 (dev and klein) as a :class:`flowrl.flow.policy.FlowPolicy`.

Two pipelines share one transformer (``Flux2Transformer2DModel``), VAE (``AutoencoderKLFlux2``), latent
layout and schedule, and differ in the text encoder and the guidance convention:

* ``Flux2Pipeline`` (FLUX.2-dev, family ``flux2``): Mistral-3 (``Mistral3ForConditionalGeneration``) with a
  system message, hidden states of layers (10, 20, 30) concatenated per token; guidance-distilled, the
  guidance scale goes to the transformer as an embedding, no negative branch;
* ``Flux2KleinPipeline`` (FLUX.2-klein, family ``flux2_klein``): Qwen3 (``Qwen3ForCausalLM``) through its
  chat template, layers (9, 18, 27); no guidance embedding but true classifier-free guidance
  ``v = v_u + g (v_c - v_u)`` with the empty prompt as the negative, when ``g > 1`` and the
  checkpoint is not step-distilled (``is_distilled`` in ``model_index.json``: then ``g`` is ignored).

Conventions shared by both (diffusers 0.42 ``pipelines/flux2``):

* prompts are padded to ``max_sequence_length`` tokens (``padding="max_length"``) and the transformer
  attends to every position, padding included, with no mask: the pipeline does the same, and since
  every row has the same length a row's velocity does not depend on the other rows;
* text position ids are 4-axis ``(t, h, w, l) = (0, 0, 0, i)``, image ids ``(0, row, col, 0)``;
* the latent is the VAE latent patchified 2x2 (``4 C`` channels) and normalised by the VAE's batch-norm
  running statistics, packed row-major to ``[B, (H/2f)(W/2f), 4C]`` (f the VAE scale factor);
  decoding undoes the normalisation ``z * sqrt(var + eps) + mean``, unpatchifies and runs the VAE;
* the transformer gets ``timestep = sigma`` (the pipeline passes ``t / 1000``; the model multiplies by
  1000) and, for dev, ``guidance = g`` (also multiplied by 1000 inside);
* sigmas: ``linspace(1, 1/n, n)`` shifted by ``e^mu / (e^mu + 1/t - 1)`` with FLUX.2's empirical
  ``mu(image tokens, n)`` (:func:`flowrl.flow.schedule.flux2_mu`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor

from flowrl.flow.policy import FlowPolicy, PackedGrid, PromptEmbeds


class Flux2Policy(PackedGrid, FlowPolicy):
    """FLUX.2-dev (``Flux2Pipeline``): packed latents ``[B, L, 4C]``, guidance as an embedding.

    ``height`` / ``width`` of :meth:`velocity` and :meth:`decode` default to the last
    :meth:`latent_shape` call with the same token count, else a square grid.
    """

    family = "flux2"
    pipeline_class_name = "Flux2Pipeline"
    default_max_sequence_length = 512  # the pipeline's default; prompts are padded to it
    _frozen_names = ("text_encoder", "vae")
    _uses_negative = False
    _schedule_kind = "flux2"

    def __init__(self, pipeline: Any, **kwargs: Any) -> None:
        super().__init__(pipeline, **kwargs)
        self._grids: OrderedDict[int, tuple[int, int]] = OrderedDict()  # tokens -> (h, w) of the packed grid
        self._ids: dict[tuple[int, int], Tensor] = {}  # (h, w) -> image position ids [h*w, 4]

    @classmethod
    def _pipeline_cls(cls):
        from diffusers import Flux2Pipeline  # heavy: diffusers, only when a pipeline is loaded

        return Flux2Pipeline

    # ---- prompts ----------------------------------------------------------------------------

    def _encode_batch(self, prompts: list[str]) -> dict[str, Tensor]:
        """The pipeline's ``encode_prompt``: ``prompt_embeds`` [B, S, 3 D] (S = max_sequence_length) and
        4-axis ``text_ids`` [B, S, 4]."""
        pe, text_ids = self.pipeline.encode_prompt(
            prompt=prompts, device=self.device, num_images_per_prompt=1, max_sequence_length=self.max_sequence_length
        )
        return {"prompt_embeds": pe, "text_ids": text_ids}

    # ---- latent geometry ----------------------------------------------------------------------

    def _grid(self, height: int, width: int) -> tuple[int, int]:
        """``(H / 2f, W / 2f)``: the packed token grid of an ``height`` x ``width`` image."""
        f = self.vae_scale_factor
        self._check_size(height, width, 2 * f)
        return height // (2 * f), width // (2 * f)

    def latent_shape(self, height: int, width: int) -> tuple[int, int]:
        gh, gw = self._grid(height, width)
        self._grids[gh * gw] = (gh, gw)
        self._grids.move_to_end(gh * gw)
        while len(self._grids) > 64:
            self._grids.popitem(last=False)
        return (gh * gw, int(self.transformer.config.in_channels))

    def initial_noise(self, batch, height, width, generator=None) -> Tensor:
        """``randn [batch, 4C, H/2f, W/2f]`` as the pipeline's ``prepare_latents`` draws it, then packed."""
        from diffusers.utils.torch_utils import randn_tensor  # heavy: diffusers (see above)

        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        seq, dim = self.latent_shape(height, width)
        gh, gw = self._grids[seq]
        noise = randn_tensor((batch, dim, gh, gw), generator=generator, device=self.device, dtype=torch.float32)
        return self.pipeline._pack_latents(noise)

    @staticmethod
    def unpack(x: Tensor, grid: tuple[int, int]) -> Tensor:
        """``[B, h*w, C]`` -> ``[B, C, h, w]``: inverse of the pipeline's row-major ``_pack_latents``
        (what ``_unpack_latents_with_ids`` computes for the ids of :meth:`image_ids`)."""
        b, n, c = x.shape
        gh, gw = grid
        if gh * gw != n:
            raise ValueError(f"cannot unpack x of shape {tuple(x.shape)} to a {gh}x{gw} grid")
        return x.permute(0, 2, 1).reshape(b, c, gh, gw)

    def image_ids(self, grid: tuple[int, int]) -> Tensor:
        """Image position ids ``[h*w, 4]`` = ``(0, row, col, 0)`` (the pipeline's ``_prepare_latent_ids``)."""
        ids = self._ids.get(grid)
        if ids is None or ids.device != self.device:  # made on another device before a to()
            ids = self._ids[grid] = self.pipeline._prepare_latent_ids(torch.empty(1, 0, *grid))[0].to(self.device)
        return ids

    # ---- the denoiser -----------------------------------------------------------------------

    def _check_velocity_inputs(self, x: Tensor, embeds: PromptEmbeds, guidance_scale: float) -> float:
        if not isinstance(x, Tensor) or x.dim() != 3:
            raise ValueError(f"x must be a packed [B, L, D] tensor for FLUX.2, got {getattr(x, 'shape', type(x))}")
        if len(embeds) != x.shape[0]:
            raise ValueError(f"embeds has {len(embeds)} rows but x has batch {x.shape[0]}")
        g = float(guidance_scale)
        if not math.isfinite(g):
            raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")
        return g

    def _text_ids(self, embeds: Tensor, text_ids: Tensor | None) -> Tensor:
        """Text ids ``(0, 0, 0, i)``; the transformer reads the first row's (every row's are the same)."""
        if text_ids is None:
            return self.pipeline._prepare_text_ids(embeds[:1]).to(self.device)
        return text_ids

    def _transformer(self, x: Tensor, timestep: Tensor, prompt_embeds: Tensor, text_ids: Tensor | None,
                     img_ids: Tensor, guidance: Tensor | None) -> Tensor:
        """One transformer call as the pipeline makes it; float32 output of the shape of ``x``."""
        return self.denoiser(
            hidden_states=x,
            timestep=timestep,
            guidance=guidance,
            encoder_hidden_states=prompt_embeds,
            txt_ids=self._text_ids(prompt_embeds, text_ids),
            img_ids=img_ids,
            return_dict=False,
        )[0].float()

    def _timestep(self, sigma: float | Tensor, batch: int) -> Tensor:
        """``(sigma * 1000 in the transformer's dtype) / 1000``: the pipeline's ``t.to(latents.dtype) / 1000``."""
        s = self._sigma_batch(sigma, batch)
        return (s * self.num_train_timesteps).to(self.dtype) / self.num_train_timesteps

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
        """FLUX.2-dev velocity ``v = f(x, sigma, c, g)``, the guidance ``g`` embedded like the timestep
        (guidance distillation, Meng et al. arXiv 2210.03142); a transformer without guidance embedding
        ignores ``g``."""
        g = self._check_velocity_inputs(x, embeds, guidance_scale)
        b = x.shape[0]
        gh, gw = self._grid_for(x.shape[1], height, width)
        e = embeds.to(device=self.device, dtype=self.dtype)
        guidance = torch.full((b,), g, device=self.device, dtype=torch.float32)
        v = self._transformer(x.to(device=self.device, dtype=self.dtype), self._timestep(sigma, b), e.prompt_embeds,
                              e.text_ids, self.image_ids((gh, gw)), guidance)
        self.nfe += 1
        return v

    # ---- decoding ---------------------------------------------------------------------------

    def decode(self, x: Tensor, *, height: int | None = None, width: int | None = None) -> Tensor:
        """Unpack, undo the VAE's batch-norm normalisation ``z = x sqrt(var + eps) + mean``, unpatchify
        2x2, VAE-decode; ``[B, 3, H, W]`` float32 in [0, 1]."""
        if not isinstance(x, Tensor) or x.dim() != 3:
            raise ValueError(f"x must be a packed [B, L, D] tensor for FLUX.2, got {getattr(x, 'shape', type(x))}")
        vae = self.pipeline.vae
        z = self.unpack(x.to(device=self.device, dtype=vae.dtype), self._grid_for(x.shape[1], height, width))
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(z.device, z.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(z.device, z.dtype)
        z = self.pipeline._unpatchify_latents(z * std + mean)
        img = vae.decode(z, return_dict=False)[0]
        return (img.float() / 2 + 0.5).clamp(0, 1)


class Flux2KleinPolicy(Flux2Policy):
    """FLUX.2-klein (``Flux2KleinPipeline``): Qwen3 text encoder, no guidance embedding, true CFG.

    ``v = v_u + g (v_c - v_u)`` for ``g > 1`` (Ho & Salimans, arXiv 2207.12598) with the negative
    branch of :meth:`encode_prompts` (the empty prompt by default, as the pipeline), computed in one
    transformer call on ``[uncond; cond]``; a step-distilled checkpoint (``is_distilled``) has no
    negative branch and ignores ``g``, as the pipeline does.
    """

    family = "flux2_klein"
    pipeline_class_name = "Flux2KleinPipeline"
    _uses_negative = True

    def __init__(self, pipeline: Any, **kwargs: Any) -> None:
        super().__init__(pipeline, **kwargs)
        self.is_distilled = bool(getattr(pipeline.config, "is_distilled", False))
        self._uses_negative = not self.is_distilled  # instance override of the class default

    @classmethod
    def _pipeline_cls(cls):
        from diffusers import Flux2KleinPipeline  # heavy: diffusers, only when a pipeline is loaded

        return Flux2KleinPipeline

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
        """FLUX.2-klein velocity: ``v_c`` for ``g <= 1`` or a distilled model, else ``v_u + g (v_c - v_u)``."""
        g = self._check_velocity_inputs(x, embeds, guidance_scale)
        b = x.shape[0]
        img_ids = self.image_ids(self._grid_for(x.shape[1], height, width))
        e = embeds.to(device=self.device, dtype=self.dtype)
        xin = x.to(device=self.device, dtype=self.dtype)
        t = self._timestep(sigma, b)
        if g > 1.0 and not self.is_distilled:
            if not e.has_negative:
                raise ValueError("guidance_scale > 1 needs negative embeddings (encode_prompts gives them for klein)")
            if e.negative_prompt_embeds.shape != e.prompt_embeds.shape:
                raise ValueError(
                    f"negative_prompt_embeds {tuple(e.negative_prompt_embeds.shape)} and prompt_embeds "
                    f"{tuple(e.prompt_embeds.shape)} differ in shape (both are padded to max_sequence_length)"
                )
            out = self._transformer(torch.cat([xin, xin]), torch.cat([t, t]),
                                    torch.cat([e.negative_prompt_embeds, e.prompt_embeds]), e.text_ids, img_ids, None)
            v_u, v_c = out.chunk(2)
            v = v_u + g * (v_c - v_u)
        else:
            v = self._transformer(xin, t, e.prompt_embeds, e.text_ids, img_ids, None)
        self.nfe += 1
        return v
