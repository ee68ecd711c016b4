"""Qwen-Image-Edit (instruction editing) as a :class:`flowrl.flow.policy.FlowPolicy`.

Qwen-Image-Edit (``QwenImageEditPipeline``) is Qwen-Image's MMDiT with the source image entering twice:

* the Qwen2.5-VL text encoder reads it inside the prompt template (the processor expands ``<|image_pad|>`` into
  the image's vision tokens), so the prompt embedding of a row is a function of (prompt, image); the negative
  prompt of true CFG reads the same image;
* its VAE latents (the posterior's mode, normalised ``(z - mean) / std`` per channel) are packed in 2x2 patches
  and appended to the noisy tokens; ``img_shapes`` lists both grids, and the velocity is the transformer's
  output cut to the noisy tokens.

The source image is first resized to ``calculate_dimensions(1024 * 1024, w / h)`` (about one megapixel at its
aspect ratio, sides multiples of 32), for the VL encoder and the VAE alike. ``QwenImageEditPlusPipeline``
(Qwen-Image-Edit-2509/2511: several source images, a different template, a 384x384 VL copy) is not supported.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from flowrl.flow.models.qwen_image import QwenImagePolicy
from flowrl.flow.policy import PromptEmbeds

#: ``condition_image_size`` value that sizes the source image as the pipeline does (about 1 MP, its aspect).
AUTO = "auto"


class QwenImageEditPolicy(QwenImagePolicy):
    """Qwen-Image-Edit (``QwenImageEditPipeline``): Qwen-Image's packed layout, timestep, sigma schedule and true
    CFG with the norm rescale (``guidance_scale`` is the pipeline's ``true_cfg_scale``), plus a per-row source
    image (:meth:`encode_prompts` with ``images=``) seen by the text encoder and appended as latent tokens
    (``PromptEmbeds.image_latents`` [B, L_img, 4C], ``image_ids`` [B, L_img, 3] = ``(1, row, col)`` per token).

    ``condition_image_size`` (how a source image is sized before encoding): ``"auto"`` (default, the pipeline's
    rule ``calculate_dimensions(1024 * 1024, w / h)``); ``None`` (its own size); an int ``s`` (``s`` x ``s``) or
    ``(height, width)``; then rounded down to a multiple of ``2 * vae_scale_factor``.
    """

    family = "qwen_image_edit"
    pipeline_class_name = "QwenImageEditPipeline"
    _prompt_sees_image = True

    def __init__(self, pipeline: Any, **kwargs: Any) -> None:
        super().__init__(pipeline, **kwargs)
        self.condition_image_size: Any = AUTO

    @classmethod
    def _pipeline_cls(cls):
        from diffusers import QwenImageEditPipeline  # heavy: diffusers, only when a pipeline is loaded

        return QwenImageEditPipeline

    # ---- prompts and the source image ----------------------------------------------------------

    def _encode_batch(self, prompts: list[str]) -> dict[str, Tensor]:
        """Prompts alone cannot be encoded: the template holds an image placeholder that the VL processor fills."""
        raise ValueError("model family 'qwen_image_edit' needs a source image per prompt: "
                         "encode_prompts(prompts, images=[...]) (records with an 'image' column)")

    def condition_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) a ``height`` x ``width`` source image is resized to (see the class doc)."""
        m = 2 * self.vae_scale_factor
        size = self.condition_image_size
        if size == AUTO:
            from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit  # heavy: diffusers

            width, height, _ = edit.calculate_dimensions(1024 * 1024, width / height)
        elif size is not None:
            if isinstance(size, int) and not isinstance(size, bool):
                height = width = size
            elif isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(v, int) for v in size):
                height, width = size
            else:
                raise ValueError(f"condition_image_size must be 'auto', None, an int or (height, width), got {size!r}")
        h, w = int(height) // m * m, int(width) // m * m
        if h < m or w < m:
            raise ValueError(f"source image of {height}x{width} px is smaller than {m} px (2 x vae_scale_factor)")
        return h, w

    def _image_key_extra(self) -> Any:
        s = self.condition_image_size
        return tuple(s) if isinstance(s, list) else s

    def _resized(self, image: Any) -> Any:
        """The source image at :meth:`condition_size`, as a PIL image (what the pipeline gives the VL processor;
        a tensor in [0, 1] is converted to 8-bit RGB first, as the processor expects PIL pixels)."""
        proc = self.pipeline.image_processor
        if isinstance(image, Tensor):
            image = proc.numpy_to_pil(proc.pt_to_numpy(image.detach().float().cpu().clamp(0, 1)))[0]
        w0, h0 = image.size
        h, w = self.condition_size(int(h0), int(w0))
        return proc.resize(image, h, w)

    def _encode_pair(self, prompt: str, image: Any) -> dict[str, Tensor]:
        """One (prompt, source image) -> ``prompt_embeds`` [S, D] and ``prompt_mask`` [S] (the pipeline's
        ``encode_prompt`` with the resized image), ``image_latents`` [L, 4C] and ``image_ids`` [L, 3]."""
        pipe = self.pipeline
        small = self._resized(image)
        pe, mask = pipe.encode_prompt(prompt=[prompt], image=small, device=self.device, num_images_per_prompt=1)
        if mask is None:  # the pipeline drops an all-ones mask; rows need it for padding
            mask = torch.ones(pe.shape[:2], dtype=torch.long, device=pe.device)
        w, h = small.size
        pixels = pipe.image_processor.preprocess(small, h, w).unsqueeze(2)  # [1, 3, 1, H, W] in [-1, 1]
        vae = pipe.vae
        z = pipe._encode_vae_image(image=pixels.to(device=self.device, dtype=vae.dtype), generator=None)  # mode
        c, lh, lw = z.shape[1], z.shape[3], z.shape[4]
        latents = pipe._pack_latents(z, 1, c, lh, lw)[0]
        rows = torch.arange(lh // 2, device=self.device).repeat_interleave(lw // 2)
        cols = torch.arange(lw // 2, device=self.device).repeat(lh // 2)
        ids = torch.stack([torch.ones_like(rows), rows, cols], dim=-1)
        return {"prompt_embeds": pe[0], "prompt_mask": mask[0].long(), "image_latents": latents, "image_ids": ids}

    @staticmethod
    def _image_grid(e: PromptEmbeds) -> tuple[int, int]:
        """``(h/2, w/2)`` of the rows' source image tokens (the last token's ids are ``(1, h/2 - 1, w/2 - 1)``)."""
        if e.image_ids is None:
            raise ValueError("embeds.image_latents needs embeds.image_ids")
        if not torch.equal(e.image_ids, e.image_ids[:1].expand_as(e.image_ids)):
            raise ValueError("the rows' source images differ in size: sample rows of one image size per call")
        last = e.image_ids[0, -1].tolist()
        return int(last[1]) + 1, int(last[2]) + 1

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
        """``f([x; image], sigma, c)[:, :L_x]``; with ``guidance_scale = g > 1`` true CFG with Qwen-Image's norm
        rescale ``v = c * ||v_c|| / ||c||``, ``c = v_u + g (v_c - v_u)``, the negative branch on the same
        ``[x; image]``. Without a source image it is Qwen-Image text-to-image. ``height``/``width`` as Qwen-Image's."""
        if not isinstance(x, Tensor) or x.dim() != 3:
            raise ValueError(f"x must be a packed [B, L, D] tensor for Qwen-Image-Edit, got {getattr(x, 'shape', type(x))}")
        b, seq = x.shape[0], x.shape[1]
        if len(embeds) != b:
            raise ValueError(f"embeds has {len(embeds)} rows but x has batch {b}")
        g = float(guidance_scale)
        if not math.isfinite(g):
            raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")
        grid = self._grid_for(seq, height, width)
        s = self._sigma_batch(sigma, b)
        e = embeds.to(device=self.device, dtype=self.dtype)
        hidden = x.to(device=self.device, dtype=self.dtype)
        shapes = [(1, grid[0], grid[1])]
        if e.image_latents is not None:
            shapes.append((1, *self._image_grid(e)))
            hidden = torch.cat([hidden, e.image_latents], dim=1)
        # the pipeline: timestep = (t in the latents' dtype) / 1000 with t = sigma * 1000
        timestep = (s * self.num_train_timesteps).to(self.dtype) / self.num_train_timesteps

        def run(prompt_embeds: Tensor, mask: Tensor | None) -> Tensor:
            pe, m = self._trim(prompt_embeds, mask)
            out = self.denoiser(hidden_states=hidden, timestep=timestep, encoder_hidden_states=pe,
                                encoder_hidden_states_mask=m, img_shapes=[shapes] * b, return_dict=False)[0]
            return out[:, :seq].float()

        v = run(e.prompt_embeds, e.prompt_mask)
        if g > 1.0:
            if not e.has_negative:
                raise ValueError("guidance_scale > 1 needs negative embeddings (encode_prompts gives them for Qwen-Image-Edit)")
            v_u = run(e.negative_prompt_embeds, e.negative_prompt_mask)
            comb = v_u + g * (v - v_u)
            v = comb * (torch.norm(v, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
        self.nfe += 1
        return v
