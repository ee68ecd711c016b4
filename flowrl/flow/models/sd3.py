"""Stable Diffusion 3 / 3.5 as a :class:`flowrl.flow.policy.FlowPolicy`."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from flowrl.flow.policy import FlowPolicy, PromptEmbeds, _component_absent


class SD3Policy(FlowPolicy):
    """Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``), arXiv 2403.03206.

    Layout ``[B, C, h, w]``; classifier-free guidance ``v = v_u + g (v_c - v_u)`` computed with one
    transformer call on the concatenated ``[uncond; cond]`` batch when ``g > 1`` (as the pipeline);
    the transformer gets ``timestep = sigma * num_train_timesteps``.
    """

    family = "sd3"
    pipeline_class_name = "StableDiffusion3Pipeline"
    default_max_sequence_length = 256  # the pipeline's default T5 length (zeros when there is no T5)
    _frozen_names = ("text_encoder", "text_encoder_2", "text_encoder_3", "vae")
    _uses_negative = True
    _schedule_kind = "sd3"

    @classmethod
    def _pipeline_cls(cls):
        from diffusers import StableDiffusion3Pipeline  # heavy: diffusers (see above)

        return StableDiffusion3Pipeline

    @classmethod
    def _load_kwargs(cls, index: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        for name in ("text_encoder_3", "tokenizer_3"):
            if name not in given and _component_absent(index, name):
                kw[name] = None
        return kw

    def _encode_batch(self, prompts: list[str]) -> dict[str, Tensor]:
        pe, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return {"prompt_embeds": pe, "pooled": pooled}

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.vae_scale_factor
        self._check_size(height, width, f * int(self.transformer.config.patch_size))
        return (int(self.transformer.config.in_channels), height // f, width // f)

    def image_seq_len(self, height: int, width: int) -> int:
        _, h, w = self.latent_shape(height, width)
        p = int(self.transformer.config.patch_size)
        return (h // p) * (w // p)

    def initial_noise(self, batch, height, width, generator=None) -> Tensor:
        from diffusers.utils.torch_utils import randn_tensor  # heavy: diffusers (see above)

        if not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        shape = (batch, *self.latent_shape(height, width))
        return randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)

    def velocity(self, x: Tensor, sigma: float | Tensor, embeds: PromptEmbeds, guidance_scale: float) -> Tensor:
        """SD3 velocity with classifier-free guidance (Ho & Salimans, arXiv 2207.12598):
        ``v = v_u + g (v_c - v_u)`` if ``g > 1`` (one batched call on ``[uncond; cond]``), else ``v_c``."""
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"x must be a [B, C, h, w] tensor for SD3, got {getattr(x, 'shape', type(x))}")
        b = x.shape[0]
        if len(embeds) != b:
            raise ValueError(f"embeds has {len(embeds)} rows but x has batch {b}")
        g = float(guidance_scale)
        if not math.isfinite(g):
            raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")
        t = self._sigma_batch(sigma, b) * self.num_train_timesteps
        xin = x.to(device=self.device, dtype=self.dtype)
        e = embeds.to(device=self.device, dtype=self.dtype)
        if g > 1.0:
            if not e.has_negative:
                raise ValueError("guidance_scale > 1 needs negative embeddings (encode_prompts gives them for SD3)")
            out = self.denoiser(
                hidden_states=torch.cat([xin, xin]),
                timestep=torch.cat([t, t]),
                encoder_hidden_states=torch.cat([e.negative_prompt_embeds, e.prompt_embeds]),
                pooled_projections=torch.cat([e.negative_pooled, e.pooled]),
                return_dict=False,
            )[0]
            v_u, v_c = out.float().chunk(2)
            v = v_u + g * (v_c - v_u)
        else:
            v = self.denoiser(
                hidden_states=xin,
                timestep=t,
                encoder_hidden_states=e.prompt_embeds,
                pooled_projections=e.pooled,
                return_dict=False,
            )[0].float()
        self.nfe += 1
        return v

    def decode(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"x must be a [B, C, h, w] tensor for SD3, got {getattr(x, 'shape', type(x))}")
        return self._vae_decode(x)
