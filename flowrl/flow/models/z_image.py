"""Z-Image (Z-Image, Z-Image-Turbo; ``ZImagePipeline``) as a :class:`flowrl.flow.policy.FlowPolicy`."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from flowrl.flow.policy import FlowPolicy, PromptEmbeds


class ZImagePolicy(FlowPolicy):
    """Z-Image (``ZImagePipeline``): a single-stream DiT conditioned on Qwen3 caption features.

    Conventions of the pipeline, reproduced here:

    * prompts: the Qwen3 chat template (one user turn, generation prompt), padded to
      ``max_sequence_length``, the text encoder's second-to-last hidden state kept at the real tokens
      only: every prompt has its own length (``prompt_mask`` marks it in the padded rows);
    * layout ``[B, C, h, w]`` with ``h = 2 * (H // (2 f))`` (``f`` the VAE factor); the transformer
      takes a list of ``[C, 1, h, w]`` tensors and a list of ``[L_i, D]`` caption features and makes
      2x2 patches itself. Rows of different caption lengths are handled by the transformer's own
      attention mask (padding never attended), so a row's output does not depend on its batch
      beyond float rounding;
    * timestep ``(1000 - sigma N) / 1000`` (= ``1 - sigma``, N = ``num_train_timesteps``): the model
      embeds ``t_scale * (1 - sigma)``, and predicts ``x0 - eps``: the velocity is its negation;
    * CFG: ``guidance_scale = g > 0`` turns it on, ``v_out = pos + g (pos - neg)`` (so g is the
      usual scale minus one; ``g = 0`` is no CFG, Z-Image-Turbo's setting), with the pipeline's
      ``cfg_truncation`` (no CFG where ``1 - sigma > cfg_truncation``) and ``cfg_normalization``
      (the guided output's norm clipped to ``cfg_normalization`` times the conditional's; 0 = off),
      attributes of the policy with the pipeline's defaults (1.0, 0.0);
    * sigmas ``linspace(1, 1/n, n)`` (torch, float32) through the scheduler's shift (static, or
      dynamic with ``mu`` from the image token count ``(h/2)(w/2)``); VAE ``z / scaling + shift``.
    """

    family = "z_image"
    pipeline_class_name = "ZImagePipeline"
    default_max_sequence_length = 512  # ZImagePipeline.__call__'s default
    _frozen_names = ("text_encoder", "vae")
    _uses_negative = True
    _schedule_kind = "z_image"

    def __init__(self, pipeline: Any, **kwargs: Any) -> None:
        super().__init__(pipeline, **kwargs)
        self.cfg_truncation: float = 1.0  # ZImagePipeline.__call__ defaults
        self.cfg_normalization: float = 0.0

    @classmethod
    def _pipeline_cls(cls):
        from diffusers import ZImagePipeline  # heavy: diffusers, only when a pipeline is loaded

        return ZImagePipeline

    # ---- prompts --------------------------------------------------------------------------

    def _encode_batch(self, prompts: list[str]) -> dict[str, Tensor]:
        """One prompt (``_cached_rows`` encodes one at a time): its caption features ``[1, L, D]`` at
        the real tokens and an all-ones ``prompt_mask`` ``[1, L]``."""
        if len(prompts) != 1:
            raise ValueError(f"ZImagePolicy encodes one prompt at a time, got {len(prompts)}")
        # encode_prompt rewrites the list it is given in place (chat template): hand it a copy
        feats, _ = self.pipeline.encode_prompt(
            prompt=list(prompts),
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        pe = feats[0].unsqueeze(0)
        return {"prompt_embeds": pe, "prompt_mask": torch.ones(pe.shape[:2], dtype=torch.bool, device=pe.device)}

    # ---- latent geometry ------------------------------------------------------------------

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """``(C, 2 (H // 2f), 2 (W // 2f))``: the pipeline's ``prepare_latents`` shape."""
        f = self.vae_scale_factor
        self._check_size(height, width, 2 * f)
        return (int(self.transformer.config.in_channels), 2 * (height // (2 * f)), 2 * (width // (2 * f)))

    def image_seq_len(self, height: int, width: int) -> int:
        """``(h/2)(w/2)`` image tokens (as the pipeline computes it for ``mu``)."""
        _, h, w = self.latent_shape(height, width)
        return (h // 2) * (w // 2)

    def initial_noise(self, batch, height, width, generator=None) -> Tensor:
        from diffusers.utils.torch_utils import randn_tensor  # heavy: diffusers (see above)

        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        shape = (batch, *self.latent_shape(height, width))
        return randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)

    # ---- the denoiser ---------------------------------------------------------------------

    @staticmethod
    def _rows(embeds: Tensor, mask: Tensor | None) -> list[Tensor]:
        """Padded ``[B, S, D]`` caption features as the list of ``[L_i, D]`` the transformer takes."""
        if mask is None:
            return list(embeds.unbind(0))
        m = mask.bool()
        return [e[k] for e, k in zip(embeds.unbind(0), m.unbind(0))]

    def _cfg_settings(self) -> tuple[float, float]:
        """``(cfg_truncation, cfg_normalization)`` checked; a truncation of None or above 1 never truncates."""
        trunc = math.inf if self.cfg_truncation is None else float(self.cfg_truncation)
        norm = float(self.cfg_normalization or 0.0)
        if math.isnan(trunc):
            raise ValueError(f"cfg_truncation must be a number or None, got {self.cfg_truncation!r}")
        if not (math.isfinite(norm) and norm >= 0):
            raise ValueError(f"cfg_normalization must be >= 0 (0 = off), got {self.cfg_normalization!r}")
        return trunc, norm

    def velocity(self, x: Tensor, sigma: float | Tensor, embeds: PromptEmbeds, guidance_scale: float) -> Tensor:
        """``v = -out`` with ``out = pos + g (pos - neg)`` for the rows whose CFG is on (``g > 0`` and
        ``1 - sigma <= cfg_truncation``), else ``out = pos``; one transformer call on the list
        ``[cond rows; uncond rows with CFG]`` (the pipeline's order)."""
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"x must be a [B, C, h, w] tensor for Z-Image, got {getattr(x, 'shape', type(x))}")
        b = x.shape[0]
        if len(embeds) != b:
            raise ValueError(f"embeds has {len(embeds)} rows but x has batch {b}")
        g = float(guidance_scale)
        if not math.isfinite(g) or g < 0:
            raise ValueError(f"guidance_scale must be finite and >= 0 (0 = no CFG), got {guidance_scale}")
        trunc, norm = self._cfg_settings()
        s = self._sigma_batch(sigma, b)
        # the pipeline: scheduler timestep t = sigma * N (float32), then (1000 - t) / 1000
        timestep = (1000 - s * self.num_train_timesteps) / 1000
        cfg_rows = [i for i, t in enumerate(timestep.tolist()) if not t > trunc] if g > 0 else []
        if cfg_rows and not embeds.has_negative:
            raise ValueError("guidance_scale > 0 needs negative embeddings (encode_prompts gives them for Z-Image)")
        e = embeds.to(device=self.device, dtype=self.dtype)
        cond = self._rows(e.prompt_embeds, e.prompt_mask)
        xs = list(x.to(device=self.device, dtype=self.dtype).unsqueeze(2).unbind(0))
        caps, lat, ts = cond, xs, timestep
        if cfg_rows:
            neg = self._rows(e.negative_prompt_embeds, e.negative_prompt_mask)
            idx = torch.tensor(cfg_rows, device=self.device)
            caps = cond + [neg[i] for i in cfg_rows]
            lat = xs + [xs[i] for i in cfg_rows]
            ts = torch.cat([timestep, timestep.index_select(0, idx)])
        out = self.denoiser(lat, ts, caps, return_dict=False)[0]
        pos = [o.float() for o in out[:b]]
        for j, i in enumerate(cfg_rows):
            pos[i] = self._guided(pos[i], out[b + j].float(), g, norm)
        self.nfe += 1
        return -torch.stack(pos).squeeze(2)

    @staticmethod
    def _guided(pos: Tensor, neg: Tensor, g: float, norm: float) -> Tensor:
        """``pos + g (pos - neg)``, its norm clipped to ``norm * |pos|`` when ``norm > 0``."""
        pred = pos + g * (pos - neg)
        if norm > 0:
            limit = torch.linalg.vector_norm(pos) * norm
            size = torch.linalg.vector_norm(pred)
            pred = torch.where(size > limit, pred * (limit / size), pred)
        return pred

    def decode(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"x must be a [B, C, h, w] tensor for Z-Image, got {getattr(x, 'shape', type(x))}")
        return self._vae_decode(x)
