"""A tiny, real-format FLUX.1 Kontext pipeline (``FluxKontextPipeline``) built offline with random weights.

FLUX.1 Kontext-dev has exactly FLUX.1-dev's architecture (a ``FluxTransformer2DModel`` with guidance
embedding, a CLIP and a T5 text encoder, the 16-channel VAE, the dynamic-shifting scheduler); what
makes it an editing model is the pipeline, which appends the source image's packed latents to the
noisy tokens. So the tiny Kontext pipeline holds the components of the tiny FLUX.1 pipeline
(:func:`flowrl.demo.tiny_image.build_tiny_flux_pipeline`: per-component derived seeds in a forked RNG,
tokenizers built in code), under the Kontext pipeline class. Its saved folder reloads with
``FluxKontextPipeline.from_pretrained``.
"""

from __future__ import annotations

__all__ = ["build_tiny_flux_kontext_pipeline"]


def build_tiny_flux_kontext_pipeline(seed: int = 0, **flux_kwargs):
    """A tiny ``FluxKontextPipeline`` with random weights, deterministic per ``seed``; ``flux_kwargs`` go to
    :func:`flowrl.demo.tiny_image.build_tiny_flux_pipeline` (layers, heads, ``guidance_embeds``, ...)."""
    from diffusers import FluxKontextPipeline  # heavy: diffusers, only when a tiny model is built

    from flowrl.demo.tiny_image import build_tiny_flux_pipeline

    flux = build_tiny_flux_pipeline(seed=seed, **flux_kwargs)
    c = flux.components
    pipe = FluxKontextPipeline(
        scheduler=c["scheduler"],
        vae=c["vae"],
        text_encoder=c["text_encoder"],
        tokenizer=c["tokenizer"],
        text_encoder_2=c["text_encoder_2"],
        tokenizer_2=c["tokenizer_2"],
        transformer=c["transformer"],
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
