"""FLUX.1 (dev, schnell) as a :class:`flowrl.flow.policy.FlowPolicy`."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor

from flowrl.flow.policy import FlowPolicy, PackedGrid, PromptEmbeds


class FluxPolicy(PackedGrid, FlowPolicy):
    """FLUX.1 (``FluxPipeline``): packed latents ``[B, h*w/4, 4C]`` (2x2 patches), guidance given to the
    transformer as an embedding (FLUX.1-dev is guidance-distilled: no negative branch); the
    transformer gets ``timestep = sigma`` (the pipeline passes ``t / 1000`` and the model scales by
    1000 inside). Models without guidance embedding (schnell) ignore ``guidance_scale``.
    """

    family = "flux"
    pipeline_class_name = "FluxPipeline"
    default_max_sequence_length = 512
    _frozen_names = ("text_encoder", "text_encoder_2", "vae")
    _uses_negative = False
    _schedule_kind = "flux"  # FluxPipeline feeds linspace(1, 1/n, n), with or without dynamic shifting

    def __init__(self, pipeline: Any, **kwargs: Any) -> None:
        super().__init__(pipeline, **kwargs)
        self._grids: OrderedDict[int, tuple[int, int]] = OrderedDict()  # seq len -> (h/2, w/2) of latents

    @classmethod
    def _pipeline_cls(cls):
        from diffusers import FluxPipeline  # heavy: diffusers (see above)

        return FluxPipeline

    def _encode_batch(self, prompts: list[str]) -> dict[str, Tensor]:
        pe, pooled, text_ids = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            device=self.device,
            num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )
        return {
            "prompt_embeds": pe,
            "pooled": pooled,
            "text_ids": text_ids.unsqueeze(0).expand(len(prompts), *text_ids.shape),
        }

    def _grid(self, height: int, width: int) -> tuple[int, int]:
        f = self.vae_scale_factor
        self._check_size(height, width, 2 * f)
        return height // (2 * f), width // (2 * f)

    def latent_shape(self, height: int, width: int) -> tuple[int, int]:
        gh, gw = self._grid(height, width)
        self._grids[gh * gw] = (gh, gw)
        self._grids.move_to_end(gh * gw)
        c = int(self.transformer.config.in_channels)
        return (gh * gw, c)

    def initial_noise(self, batch, height, width, generator=None) -> Tensor:
        from diffusers.utils.torch_utils import randn_tensor  # heavy: diffusers (see above)

        if not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        seq, dim = self.latent_shape(height, width)
        gh, gw = self._grids[seq]
        c = dim // 4
        noise = randn_tensor((batch, c, 2 * gh, 2 * gw), generator=generator, device=self.device, dtype=torch.float32)
        return self.pack(noise)

    @staticmethod
    def pack(latents: Tensor) -> Tensor:
        """``[B, C, h, w]`` -> ``[B, (h/2)(w/2), 4C]``: 2x2 patches, channel-major within a patch (FLUX's layout)."""
        b, c, h, w = latents.shape
        x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // 2) * (w // 2), c * 4)

    @staticmethod
    def unpack(x: Tensor, grid: tuple[int, int]) -> Tensor:
        """Inverse of :meth:`pack` for a latent grid of ``grid = (h/2, w/2)`` patches."""
        b, n, d = x.shape
        gh, gw = grid
        if gh * gw != n or d % 4:
            raise ValueError(f"cannot unpack x of shape {tuple(x.shape)} to a {gh}x{gw} patch grid")
        y = x.reshape(b, gh, gw, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return y.reshape(b, d // 4, gh * 2, gw * 2)

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
        """FLUX velocity with distilled guidance: ``v = f(x, sigma, c, g)`` with ``g`` embedded like the
        timestep (FLUX.1-dev); ``height``/``width`` (pixels) default to the last ``latent_shape`` call
        with the same token count, else a square grid."""
        if not isinstance(x, Tensor) or x.dim() != 3:
            raise ValueError(f"x must be a packed [B, L, D] tensor for FLUX, got {getattr(x, 'shape', type(x))}")
        b, seq = x.shape[0], x.shape[1]
        if len(embeds) != b:
            raise ValueError(f"embeds has {len(embeds)} rows but x has batch {b}")
        g = float(guidance_scale)
        if not math.isfinite(g):
            raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")
        gh, gw = self._grid_for(seq, height, width)
        s = self._sigma_batch(sigma, b)
        xin = x.to(device=self.device, dtype=self.dtype)
        e = embeds.to(device=self.device, dtype=self.dtype)
        # The pipeline passes (sigma * 1000 in the latents' dtype) / 1000; mirror it exactly.
        timestep = (s * self.num_train_timesteps).to(self.dtype) / self.num_train_timesteps
        guidance = (
            torch.full((b,), g, device=self.device, dtype=torch.float32)
            if self.transformer.config.guidance_embeds
            else None
        )
        img_ids = self.pipeline._prepare_latent_image_ids(b, gh, gw, self.device, self.dtype)
        if e.text_ids is not None:
            txt_ids = e.text_ids[0]
        else:
            txt_ids = torch.zeros(e.prompt_embeds.shape[1], 3, device=self.device, dtype=self.dtype)
        v = self.denoiser(
            hidden_states=xin,
            timestep=timestep,
            guidance=guidance,
            pooled_projections=e.pooled,
            encoder_hidden_states=e.prompt_embeds,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0].float()
        self.nfe += 1
        return v

    def decode(self, x: Tensor, *, height: int | None = None, width: int | None = None) -> Tensor:
        """Unpack (grid from ``height``/``width`` or as in :meth:`velocity`), then VAE-decode."""
        if not isinstance(x, Tensor) or x.dim() != 3:
            raise ValueError(f"x must be a packed [B, L, D] tensor for FLUX, got {getattr(x, 'shape', type(x))}")
        grid = self._grid_for(x.shape[1], height, width)
        return self._vae_decode(self.unpack(x, grid))
