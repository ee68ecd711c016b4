"""Qwen-Image (``QwenImagePipeline``) as a :class:`flowrl.flow.policy.FlowPolicy`."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor

from flowrl.flow.policy import FlowPolicy, PackedGrid, PromptEmbeds

_MASK_MEMO = 16  # masks whose extent is remembered (a rollout's chunks: cond + negative each)


def mask_extent(mask: Tensor, memo: "OrderedDict[int, tuple[Tensor, int, int, bool]]") -> tuple[int, bool]:
    """``(n, full)`` of a ``[B, S]`` 0/1 mask: ``n`` the longest row's token count, ``full`` whether the first
    ``n`` columns hold no padding. Read from the device once per mask tensor (keyed by identity and
    in-place version; ``memo`` holds the tensor so that its id is not reused), LRU of :data:`_MASK_MEMO`."""
    key = id(mask)
    hit = memo.get(key)
    if hit is not None and hit[0] is mask and hit[1] == mask._version:
        memo.move_to_end(key)
        return hit[2], hit[3]
    n = int(mask.sum(dim=1).max())
    full = bool(mask[:, :n].all())
    memo[key] = (mask, mask._version, n, full)
    while len(memo) > _MASK_MEMO:
        memo.popitem(last=False)
    return n, full


class QwenImagePolicy(PackedGrid, FlowPolicy):
    """Qwen-Image (``QwenImagePipeline``): an MMDiT over packed 2x2 latent patches ``[B, h*w/4, 4C]`` of
    a 3-D (video-format, one frame) VAE, conditioned on the last hidden states of Qwen2.5-VL.

    Conventions, as the pipeline's ``__call__``:

    * prompts: ``template.format(prompt)`` through the text encoder, the template's first
      ``prompt_template_encode_start_idx`` tokens dropped; prompts have their own lengths, so rows carry
      ``prompt_mask`` (a batch is zero-padded to its longest prompt, and the transformer masks the padding
      out of its joint attention);
    * true classifier-free guidance with a negative prompt, two transformer calls (cond, uncond), and the
      combined prediction rescaled to the conditional one's norm per token:
      ``v = c * ||v_c|| / ||c||`` with ``c = v_u + g (v_c - v_u)`` (norms over the channel dimension);
    * the transformer gets ``timestep = sigma`` (the pipeline passes ``t / 1000``) and ``img_shapes``;
    * sigmas: ``linspace(1, 1/n, n)`` fed to the scheduler with the resolution-dependent ``mu`` of the
      packed token count (dynamic shifting, and ``shift_terminal`` where the config has it);
    * decoding: ``z * latents_std + latents_mean`` per channel, the VAE decodes one frame.
    """

    family = "qwen_image"
    pipeline_class_name = "QwenImagePipeline"
    default_max_sequence_length = 512  # the pipeline's __call__ default
    _frozen_names = ("text_encoder", "vae")
    _uses_negative = True
    _schedule_kind = "flux"  # the pipeline feeds linspace(1, 1/n, n) and mu(image_seq_len), as FluxPipeline

    #: CFG's two branches in one transformer call on 2B rows instead of two calls on B (the pipeline's way, whose
    #: rounding this keeps by default): fewer, larger kernels; the same velocity up to batch-size rounding
    batched_cfg: bool = False

    def __init__(self, pipeline: Any, **kwargs: Any) -> None:
        super().__init__(pipeline, **kwargs)
        limit = int(getattr(pipeline, "tokenizer_max_length", 1024))
        if self.max_sequence_length > limit:
            raise ValueError(f"max_sequence_length must be <= {limit} for Qwen-Image, got {self.max_sequence_length}")
        cfg = self.transformer.config
        if cfg.get("guidance_embeds", False):
            raise ValueError("guidance-distilled Qwen-Image transformers (guidance_embeds=True) are not supported")
        if cfg.get("use_additional_t_cond", False):
            raise ValueError("Qwen-Image transformers with use_additional_t_cond=True (layered) are not supported")
        self._grids: OrderedDict[int, tuple[int, int]] = OrderedDict()  # seq len -> (h/2, w/2) of latents
        self._mask_extents: OrderedDict = OrderedDict()  # prompt masks read from the device (mask_extent)

    @classmethod
    def _pipeline_cls(cls):
        from diffusers import QwenImagePipeline  # heavy: diffusers, only when a pipeline is used

        return QwenImagePipeline

    # ---- prompts ----------------------------------------------------------------------------

    def _encode_batch(self, prompts: list[str]) -> dict[str, Tensor]:
        """The pipeline's ``encode_prompt``; ``prompt_mask`` is all ones for the one prompt it is called
        with (the pipeline drops an all-ones mask: it is given back here so that rows can be padded)."""
        pe, mask = self.pipeline.encode_prompt(
            prompt=prompts,
            device=self.device,
            num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )
        if mask is None:
            mask = torch.ones(pe.shape[:2], dtype=torch.long, device=pe.device)
        return {"prompt_embeds": pe, "prompt_mask": mask.long()}

    # ---- latent geometry --------------------------------------------------------------------

    def _grid(self, height: int, width: int) -> tuple[int, int]:
        """``(h/2, w/2)``: the patch grid of an image, ``h = H / vae_scale_factor``."""
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
        """``randn [B, 1, C, h, w]`` (the VAE's frame axis), packed: what ``prepare_latents`` draws."""
        from diffusers.utils.torch_utils import randn_tensor  # heavy: diffusers (see above)

        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        seq, dim = self.latent_shape(height, width)
        gh, gw = self._grids[seq]
        c = dim // 4
        noise = randn_tensor((batch, 1, c, 2 * gh, 2 * gw), generator=generator, device=self.device,
                             dtype=torch.float32)
        return self.pipeline._pack_latents(noise, batch, c, 2 * gh, 2 * gw)

    # ---- the denoiser -----------------------------------------------------------------------

    def _trim(self, embeds: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Drop the padding columns no row uses, and the mask when no padding is left (the pipeline
        passes ``None`` for a batch of full rows). What a mask needs (its longest row, whether padding is
        left) is read from the device once per mask tensor and remembered (:func:`mask_extent`), so the
        sampler's steps, which call with the same embedding tensors, do not wait for the device."""
        if mask is None:
            return embeds, None
        n, full = mask_extent(mask, self._mask_extents)
        return embeds[:, :n], (None if full else mask[:, :n])

    def _call(self, x: Tensor, timestep: Tensor, embeds: Tensor, mask: Tensor | None, grid: tuple[int, int]) -> Tensor:
        embeds, mask = self._trim(embeds, mask)
        return self.denoiser(
            hidden_states=x,
            timestep=timestep,
            encoder_hidden_states=embeds,
            encoder_hidden_states_mask=mask,
            img_shapes=[[(1, grid[0], grid[1])]] * x.shape[0],
            return_dict=False,
        )[0].float()

    def _call_both(self, x: Tensor, timestep: Tensor, e: PromptEmbeds, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """The conditional and the negative branch in one transformer call on ``[cond; negative]`` rows
        (``batched_cfg``): each side trimmed, the shorter zero-padded to the longer with a zero mask, which the
        joint attention leaves out, as it does a padded batch of prompts."""
        sides = [self._trim(e.prompt_embeds, e.prompt_mask), self._trim(e.negative_prompt_embeds, e.negative_prompt_mask)]
        n = max(emb.shape[1] for emb, _ in sides)
        embeds, masks = [], []
        for emb, mask in sides:
            b, k = emb.shape[:2]
            if mask is None:
                mask = torch.ones(b, k, dtype=torch.long, device=emb.device)
            embeds.append(torch.cat([emb, emb.new_zeros(b, n - k, emb.shape[2])], dim=1))
            masks.append(torch.cat([mask.long(), mask.new_zeros(b, n - k, dtype=torch.long)], dim=1))
        no_padding = all(m is None for _, m in sides) and all(emb.shape[1] == n for emb, _ in sides)
        out = self.denoiser(
            hidden_states=torch.cat([x, x]),
            timestep=torch.cat([timestep, timestep]),
            encoder_hidden_states=torch.cat(embeds),
            encoder_hidden_states_mask=None if no_padding else torch.cat(masks),
            img_shapes=[[(1, grid[0], grid[1])]] * (2 * x.shape[0]),
            return_dict=False,
        )[0].float()
        return out.chunk(2)

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
        """Qwen-Image velocity; with ``guidance_scale > 1`` true CFG with the norm rescale
        ``v = c * ||v_c|| / ||c||``, ``c = v_u + g (v_c - v_u)`` (one transformer call per branch).
        ``height``/``width`` (pixels) default to the last ``latent_shape`` call with the same token count."""
        if not isinstance(x, Tensor) or x.dim() != 3:
            raise ValueError(f"x must be a packed [B, L, D] tensor for Qwen-Image, got {getattr(x, 'shape', type(x))}")
        b, seq = x.shape[0], x.shape[1]
        if len(embeds) != b:
            raise ValueError(f"embeds has {len(embeds)} rows but x has batch {b}")
        g = float(guidance_scale)
        if not math.isfinite(g):
            raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")
        grid = self._grid_for(seq, height, width)
        s = self._sigma_batch(sigma, b)
        xin = x.to(device=self.device, dtype=self.dtype)
        e = embeds.to(device=self.device, dtype=self.dtype)
        # The pipeline passes (sigma * 1000 in the latents' dtype) / 1000; mirror it exactly.
        timestep = (s * self.num_train_timesteps).to(self.dtype) / self.num_train_timesteps
        if g > 1.0 and not e.has_negative:
            raise ValueError("guidance_scale > 1 needs negative embeddings (encode_prompts gives them for Qwen-Image)")
        if g > 1.0 and self.batched_cfg:
            v, v_u = self._call_both(xin, timestep, e, grid)
        else:
            v = self._call(xin, timestep, e.prompt_embeds, e.prompt_mask, grid)
        if g > 1.0:
            if not self.batched_cfg:
                v_u = self._call(xin, timestep, e.negative_prompt_embeds, e.negative_prompt_mask, grid)
            comb = v_u + g * (v - v_u)
            v = comb * (torch.norm(v, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
        self.nfe += 1
        return v

    def decode(self, x: Tensor, *, height: int | None = None, width: int | None = None) -> Tensor:
        """Unpack to ``[B, C, 1, h, w]``, ``z * std + mean`` per channel (the pipeline divides by
        ``1 / std``), decode the one frame, map ``[-1, 1]`` to ``[0, 1]``."""
        if not isinstance(x, Tensor) or x.dim() != 3:
            raise ValueError(f"x must be a packed [B, L, D] tensor for Qwen-Image, got {getattr(x, 'shape', type(x))}")
        gh, gw = self._grid_for(x.shape[1], height, width)
        f = self.vae_scale_factor
        vae = self.pipeline.vae
        z = self.pipeline._unpack_latents(x.to(self.device), gh * 2 * f, gw * 2 * f, f).to(vae.dtype)
        c = int(vae.config.z_dim)
        mean = torch.tensor(vae.config.latents_mean).view(1, c, 1, 1, 1).to(z.device, z.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, c, 1, 1, 1).to(z.device, z.dtype)
        img = vae.decode(z / inv_std + mean, return_dict=False)[0][:, :, 0]
        return (img.float() * 0.5 + 0.5).clamp(0, 1)
