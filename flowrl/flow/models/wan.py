"""Wan2.1 / Wan2.2 text-to-video (``WanPipeline``) as a :class:`flowrl.flow.policy.FlowPolicy`.

Conventions of ``diffusers.pipelines.wan.pipeline_wan`` (the reference this module follows):

* latents ``[B, C, F', H/8, W/8]`` with ``F' = (num_frames - 1) // 4 + 1`` (the VAE's temporal and spatial
  factors), drawn by ``prepare_latents`` with one ``randn_tensor`` call; sides divisible by 16 (8 x the
  2x2 spatial patch);
* the UMT5 prompt embedding is cut to the prompt's tokens and zero-padded to ``max_sequence_length``
  (512): every row has the same length and the transformer gets no mask, so a row's velocity does
  not depend on the other rows;
* classifier-free guidance with two transformer calls (conditional, then the negative prompt, default
  ""): ``v = v_u + g (v_c - v_u)`` when ``g > 1``;
* the transformer gets ``timestep = sigma * num_train_timesteps`` (the scheduler's ``timesteps``); with
  ``expand_timesteps`` (Wan2.2 TI2V-5B) one timestep per latent token;
* Wan2.2 A14B: ``transformer`` (high-noise expert) where ``t >= boundary_ratio * num_train_timesteps``,
  ``transformer_2`` (low-noise expert, guidance ``guidance_scale_2``) below;
* decoding: ``z = x * std + mean`` per channel (the VAE's ``latents_mean`` / ``latents_std``), the
  ``AutoencoderKLWan`` decode, ``video / 2 + 0.5`` clamped: frames ``[B, 3, F, H, W]`` in [0, 1].

The released checkpoints ship a ``UniPCMultistepScheduler`` with flow sigmas; flowrl steps with its
own solvers and only needs the sigmas: :meth:`WanPolicy.sigmas` reproduces UniPC's flow sigmas and
``FlowMatchEulerDiscreteScheduler``'s (the tiny test model uses the latter, as flow_grpo's and
Flow-Factory's Wan training replace the solver, so that the pipeline's own call is an Euler ODE the
parity test can compare with).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flowrl.flow.policy import FlowPolicy, PromptEmbeds, _place
from flowrl.flow.schedule import sigmas_for_scheduler

EXPERTS = ("transformer", "transformer_2")


def unipc_flow_sigmas(num_steps: int, shift: float, num_train_timesteps: int = 1000) -> Tensor:
    """Sigmas of ``UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=shift).set_timesteps(n)``:
    ``t = linspace(1, 1/N, n + 1)[:-1]`` (float64), ``sigma = shift t / (1 + (shift - 1) t)``, the first
    lowered by 1e-6 (UniPC avoids log 0), then a final 0; float32 ``[n + 1]``."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if not shift > 0:
        raise ValueError(f"flow_shift must be positive, got {shift!r}")
    t = np.linspace(1, 1 / num_train_timesteps, num_steps + 1)[:-1]
    s = shift * t / (1 + (shift - 1) * t)
    if abs(s[0] - 1) < 1e-6:
        s[0] -= 1e-6
    return torch.from_numpy(np.concatenate([s, [0.0]]).astype(np.float32))


class WanPolicy(FlowPolicy):
    """Wan2.1 / Wan2.2 T2V (``WanPipeline``): video latents ``[B, C, F', h, w]``, UMT5 prompts padded
    to ``max_sequence_length``, two-pass CFG with a negative prompt, one or two experts (module docstring).

    ``num_frames`` (default 81, the pipeline's) fixes the video length of :meth:`latent_shape`;
    ``(num_frames - 1)`` must be divisible by the VAE's temporal factor (4). ``expert``: which expert is
    the trainable ``transformer`` of this policy (``"transformer"``, the high-noise one, or
    ``"transformer_2"``, the low-noise one of Wan2.2); the other stays frozen and is still used for
    the sigmas on its side of the boundary.
    """

    family = "wan"
    pipeline_class_name = "WanPipeline"
    default_max_sequence_length = 512  # WanPipeline.__call__'s default
    default_num_frames = 81
    _frozen_names = ("text_encoder", "vae")
    _uses_negative = True
    is_video = True
    #: CFG's two branches in one transformer call on 2B rows (as QwenImagePolicy.batched_cfg); off: the pipeline's two calls
    batched_cfg: bool = False

    def __init__(self, pipeline: Any, *, num_frames: int | None = None, expert: str = "transformer",
                 **kwargs: Any) -> None:
        if expert not in EXPERTS:
            raise ValueError(f"expert must be one of {EXPERTS}, got {expert!r}")
        if getattr(pipeline, expert, None) is None:
            raise ValueError(f"expert={expert!r}: the pipeline has no {expert}")
        self._expert = expert
        super().__init__(pipeline, **kwargs)  # places pipeline.transformer (the trained expert by default)
        _place(self.transformer, self.device, self.dtype)
        other = self._other_expert_module()
        if other is not None:  # the expert not trained: frozen, in the trained one's dtype (it is a denoiser)
            _place(other, self.device, self.dtype)
            other.requires_grad_(False)
            other.eval()
        self.num_frames = self.default_num_frames if num_frames is None else num_frames
        self.guidance_scale_2: float | None = None  # Wan2.2's low-noise guidance (None: guidance_scale)

    @classmethod
    def _pipeline_cls(cls):
        from diffusers import WanPipeline  # heavy: diffusers, only when a pipeline is loaded

        return WanPipeline

    # ---- modules --------------------------------------------------------------------------

    @property
    def transformer(self) -> torch.nn.Module:
        """The trained expert (``pipeline.transformer`` unless ``expert="transformer_2"``)."""
        return getattr(self.pipeline, self._expert)

    @transformer.setter
    def transformer(self, module: torch.nn.Module) -> None:
        setattr(self.pipeline, self._expert, module)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.forward_module if self.forward_module is not None else self.transformer

    @property
    def expert(self) -> str:
        """Which pipeline attribute is the trained expert (``"transformer"`` or ``"transformer_2"``)."""
        return self._expert

    def set_expert(self, expert: str) -> None:
        """Train ``expert`` instead (before any LoRA or optimizer is set up): it becomes ``transformer``
        of this policy, in the policy's dtype; the other one is frozen. Needs a two-expert pipeline."""
        if expert not in EXPERTS:
            raise ValueError(f"expert must be one of {EXPERTS}, got {expert!r}")
        if getattr(self.pipeline, expert, None) is None or self.boundary_ratio is None:
            raise ValueError(f"expert={expert!r}: the pipeline has no {expert} used by a boundary_ratio (Wan2.2)")
        if self.forward_module is not None:
            raise ValueError("set_expert: the trained module is already wrapped for training")
        self._expert = expert
        _place(self.transformer, self.device, self.dtype)
        other = self._other_expert_module()
        other.requires_grad_(False)
        other.eval()

    def _other_expert_module(self) -> torch.nn.Module | None:
        if self.boundary_ratio is None:
            return None
        return getattr(self.pipeline, EXPERTS[1 - EXPERTS.index(self._expert)], None)

    @property
    def boundary_ratio(self) -> float | None:
        """Wan2.2's expert boundary (None: one expert)."""
        r = self.pipeline.config.get("boundary_ratio") if hasattr(self.pipeline, "config") else None
        return None if r is None else float(r)

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        out = super().frozen_modules()
        other = self._other_expert_module()
        if other is not None:
            out[EXPERTS[1 - EXPERTS.index(self._expert)]] = other
        return out

    @property
    def num_frames(self) -> int:
        return self._num_frames

    @num_frames.setter
    def num_frames(self, n: int) -> None:
        k = self.vae_scale_factor_temporal
        if isinstance(n, bool) or not isinstance(n, int) or n < 1 or (n - 1) % k:
            raise ValueError(f"num_frames must be a positive int with (num_frames - 1) divisible by {k}, got {n!r}")
        self._num_frames = n

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipeline.vae_scale_factor_spatial)

    @property
    def vae_scale_factor_temporal(self) -> int:
        return int(self.pipeline.vae_scale_factor_temporal)

    # ---- prompts --------------------------------------------------------------------------

    def _encode_batch(self, prompts: list[str]) -> dict[str, Tensor]:
        """UMT5 embedding, cut to the prompt's tokens and zero-padded to ``max_sequence_length`` (the
        pipeline's ``encode_prompt``); no mask: the transformer attends to the padding as the pipeline's does."""
        pe, _ = self.pipeline.encode_prompt(
            prompt=prompts, negative_prompt=None, do_classifier_free_guidance=False, num_videos_per_prompt=1,
            max_sequence_length=self.max_sequence_length, device=self.device,
        )
        return {"prompt_embeds": pe}

    # ---- latent geometry ------------------------------------------------------------------

    def _patch(self) -> tuple[int, int, int]:
        return tuple(int(p) for p in self.transformer.config.patch_size)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int, int]:
        """``(C, F', H/8, W/8)`` with ``F' = (num_frames - 1) // 4 + 1``."""
        f = self.vae_scale_factor
        _, ph, pw = self._patch()
        self._check_size(height, width, f * max(ph, pw))
        frames = (self.num_frames - 1) // self.vae_scale_factor_temporal + 1
        return (int(self.transformer.config.in_channels), frames, height // f, width // f)

    def image_seq_len(self, height: int, width: int) -> int:
        """Video tokens ``F'/p_t * h/p_h * w/p_w``."""
        _, fr, h, w = self.latent_shape(height, width)
        pt, ph, pw = self._patch()
        return (fr // pt) * (h // ph) * (w // pw)

    def initial_noise(self, batch, height, width, generator=None) -> Tensor:
        from diffusers.utils.torch_utils import randn_tensor  # heavy: diffusers (see above)

        if not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"generator: {len(generator)} generators for a batch of {batch}")
        shape = (batch, *self.latent_shape(height, width))
        return randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)

    def sigmas(self, num_steps: int, height: int, width: int) -> Tensor:
        """The scheduler's sigmas: ``FlowMatchEulerDiscreteScheduler`` (as SD3: the scheduler spaces its own
        timesteps, static ``shift``) or the released ``UniPCMultistepScheduler`` with flow sigmas
        (:func:`unipc_flow_sigmas`). WanPipeline passes neither sigmas nor ``mu``."""
        if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
        self.latent_shape(height, width)  # checks the size
        cfg = dict(self.pipeline.scheduler.config)
        name = cfg.get("_class_name") or type(self.pipeline.scheduler).__name__
        if name == "UniPCMultistepScheduler":
            if not cfg.get("use_flow_sigmas") or cfg.get("use_dynamic_shifting") or cfg.get("shift_terminal") or \
                    cfg.get("use_karras_sigmas") or cfg.get("use_exponential_sigmas") or cfg.get("use_beta_sigmas"):
                raise ValueError("scheduler: a UniPCMultistepScheduler is supported with use_flow_sigmas=True and "
                                 "a static flow_shift only (the released Wan configs)")
            if cfg.get("final_sigmas_type", "zero") != "zero":
                raise ValueError("scheduler: UniPC final_sigmas_type must be 'zero'")
            return unipc_flow_sigmas(num_steps, float(cfg.get("flow_shift", 1.0)),
                                     int(cfg.get("num_train_timesteps", 1000)))
        cfg.setdefault("_class_name", name)
        return sigmas_for_scheduler(cfg, num_steps, pipeline="sd3").to(torch.float32)

    # ---- the denoiser ---------------------------------------------------------------------

    def _timestep(self, t: Tensor, x: Tensor) -> Tensor:
        """``[B]`` timesteps, or ``[B, tokens]`` for ``expand_timesteps`` (Wan2.2 TI2V: one per 2x2 patch)."""
        if not self.pipeline.config.get("expand_timesteps", False):
            return t
        _, _, fr, h, w = x.shape
        _, ph, pw = self._patch()
        return t[:, None].expand(t.shape[0], fr * (h // ph) * (w // pw))

    def _expert_call(self, module, x: Tensor, t: Tensor, e: PromptEmbeds, g: float) -> Tensor:
        """One expert on rows ``x`` at timesteps ``t``, with two-pass CFG as the pipeline when ``g > 1``."""
        ts = self._timestep(t, x)
        if g > 1.0 and not e.has_negative:
            raise ValueError("guidance_scale > 1 needs negative embeddings (encode_prompts gives them for Wan)")
        if g > 1.0 and self.batched_cfg:  # both branches in one call (prompts are padded to one length: no mask)
            v, v_u = module(hidden_states=torch.cat([x, x]), timestep=torch.cat([ts, ts]),
                            encoder_hidden_states=torch.cat([e.prompt_embeds, e.negative_prompt_embeds]),
                            return_dict=False)[0].chunk(2)
            return (v_u + g * (v - v_u)).float()
        v = module(hidden_states=x, timestep=ts, encoder_hidden_states=e.prompt_embeds, return_dict=False)[0]
        if g > 1.0:
            v_u = module(hidden_states=x, timestep=ts, encoder_hidden_states=e.negative_prompt_embeds,
                         return_dict=False)[0]
            v = v_u + g * (v - v_u)  # in the transformer's dtype, as the pipeline
        return v.float()

    def velocity(self, x: Tensor, sigma: float | Tensor, embeds: PromptEmbeds, guidance_scale: float,
                 guidance_scale_2: float | None = None) -> Tensor:
        """Wan velocity ``v = v_u + g (v_c - v_u)`` (``g > 1``; else ``v_c``) of the expert for each row's
        timestep ``t = 1000 sigma``: Wan2.2's low-noise expert below ``boundary_ratio * 1000`` with
        ``guidance_scale_2`` (default ``guidance_scale``, as the pipeline). Rows on either side run separately."""
        if not isinstance(x, Tensor) or x.dim() != 5:
            raise ValueError(f"x must be a [B, C, F, h, w] tensor for Wan, got {getattr(x, 'shape', type(x))}")
        b = x.shape[0]
        if len(embeds) != b:
            raise ValueError(f"embeds has {len(embeds)} rows but x has batch {b}")
        g = float(guidance_scale)
        if guidance_scale_2 is None:
            guidance_scale_2 = self.guidance_scale_2
        g2 = g if guidance_scale_2 is None else float(guidance_scale_2)
        if not (math.isfinite(g) and math.isfinite(g2)):
            raise ValueError(f"guidance_scale must be finite, got {guidance_scale}, {guidance_scale_2}")
        t = self._sigma_batch(sigma, b) * self.num_train_timesteps
        xin = x.to(device=self.device, dtype=self.dtype)
        e = embeds.to(device=self.device, dtype=self.dtype)
        if self.boundary_ratio is None:
            v = self._expert_call(self.denoiser, xin, t, e, g)
        else:
            high = t >= self.boundary_ratio * self.num_train_timesteps
            v = torch.empty(x.shape, dtype=torch.float32, device=self.device)
            parts = []
            for rows, name, gs in ((high, "transformer", g), (~high, "transformer_2", g2)):
                if bool(rows.any()):
                    idx = rows.nonzero().flatten()
                    module = self.denoiser if name == self._expert else getattr(self.pipeline, name)
                    if module is None:
                        raise ValueError(f"sigma {float(t[idx[0]]) / self.num_train_timesteps:.4f} needs {name}, "
                                         "which the pipeline does not have")
                    sub = xin if len(idx) == b else xin.index_select(0, idx)
                    parts.append((idx, self._expert_call(module, sub, t[idx], e.select(idx) if len(idx) < b else e, gs)))
            if len(parts) == 1 and len(parts[0][0]) == b:
                v = parts[0][1]
            else:
                v = v.index_copy(0, parts[0][0], parts[0][1])
                for idx, part in parts[1:]:
                    v = v.index_copy(0, idx, part)
        self.nfe += 1
        return v

    def decode(self, x: Tensor) -> Tensor:
        """Frames ``[B, 3, F, H, W]`` float32 in [0, 1]: ``z = x / (1 / std) + mean`` (the pipeline's
        operations), the Wan VAE, then ``(video / 2 + 0.5).clamp(0, 1)``."""
        if not isinstance(x, Tensor) or x.dim() != 5:
            raise ValueError(f"x must be a [B, C, F, h, w] tensor for Wan, got {getattr(x, 'shape', type(x))}")
        vae = self.pipeline.vae
        cfg = vae.config
        z = x.to(device=self.device, dtype=vae.dtype)
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
        inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
        video = vae.decode(z / inv_std + mean, return_dict=False)[0]
        return (video.float() / 2 + 0.5).clamp(0, 1)
