"""A tiny, real-format Wan text-to-video pipeline (``WanPipeline``) built offline with random weights.

The architecture of the released Wan2.1 / Wan2.2 T2V checkpoints, much smaller: a UMT5 text encoder
(``UMT5EncoderModel`` from a ``UMT5Config``; the T5 character tokenizer of :mod:`flowrl.demo.tiny_image`),
a ``WanTransformer3DModel`` with 3-D RoPE, QK RMS-norm across heads and (1, 2, 2) patches, an
``AutoencoderKLWan`` with the released temporal (4) and spatial (8) factors and Wan2.1's 16-channel
``latents_mean`` / ``latents_std``. ``two_experts=True`` gives the Wan2.2 A14B layout: a second
transformer (the low-noise expert) and ``boundary_ratio`` 0.875 (Wan2.2-T2V-A14B's).

The scheduler is ``FlowMatchEulerDiscreteScheduler(shift=3.0)`` instead of the released UniPC solver
(flow_shift 3.0 is Wan's 480p setting): with it the pipeline's own call is an Euler ODE that flowrl's
all-ODE sampling must reproduce (the parity test), as Flow-Factory and flow_grpo-style Wan training
step with their own Euler / SDE schedulers. 32x32 with 5 frames gives 2 latent frames of 4x4, 8 tokens.
"""

from __future__ import annotations

import torch

from flowrl.core.rng import stream_seed
from flowrl.demo.tiny_image import tiny_t5_tokenizer

__all__ = ["build_tiny_wan_pipeline", "WAN22_BOUNDARY_RATIO"]

WAN22_BOUNDARY_RATIO = 0.875  # Wan2.2-T2V-A14B model_index.json


def _seeded(seed: int, offset: int, build):
    """``build()`` in a forked CPU RNG seeded with the stream ``(seed, "tiny", "wan", offset)``; offsets name
    the component: 1 text encoder, 3 transformer, 4 VAE, 5 transformer_2."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(seed, "tiny", "wan", offset))
        return build()


def _tiny_transformer(num_layers: int, num_heads: int, head_dim: int, text_dim: int, latent_channels: int):
    from diffusers import WanTransformer3DModel  # heavy: diffusers, only when a tiny model is built

    inner = num_heads * head_dim
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=num_heads,
        attention_head_dim=head_dim,
        in_channels=latent_channels,
        out_channels=latent_channels,
        text_dim=text_dim,
        freq_dim=32,
        ffn_dim=2 * inner,
        num_layers=num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=64,
    )


def build_tiny_wan_pipeline(
    seed: int = 0,
    *,
    num_layers: int = 2,
    num_heads: int = 2,
    head_dim: int = 12,
    t5_max_length: int = 512,
    vae_base_dim: int = 4,
    two_experts: bool = False,
):
    """A tiny ``WanPipeline`` (Wan2.1 T2V architecture; Wan2.2 A14B with ``two_experts=True``) with random
    weights, deterministic per ``seed``. ``head_dim`` must be a multiple of 6 (Wan's RoPE splits it into
    time, height and width parts). Saved folders reload with ``WanPipeline.from_pretrained``."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline  # heavy: diffusers
    from transformers import UMT5Config, UMT5EncoderModel  # heavy: transformers

    if head_dim % 6 or head_dim < 6:
        raise ValueError(f"head_dim must be a positive multiple of 6 (Wan's 3-D RoPE), got {head_dim}")
    tok = tiny_t5_tokenizer(t5_max_length)
    text_dim = 32
    te_cfg = UMT5Config(
        vocab_size=len(tok), d_model=text_dim, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        is_encoder_decoder=False, use_cache=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
    )
    text_encoder = _seeded(seed, 1, lambda: UMT5EncoderModel(te_cfg).eval())
    z_dim = 16  # Wan2.1's latent channels (latents_mean / latents_std are the VAE's defaults, 16 of each)
    transformer = _seeded(seed, 3, lambda: _tiny_transformer(num_layers, num_heads, head_dim, text_dim, z_dim))
    transformer_2 = (_seeded(seed, 5, lambda: _tiny_transformer(num_layers, num_heads, head_dim, text_dim, z_dim))
                     if two_experts else None)
    vae = _seeded(seed, 4, lambda: AutoencoderKLWan(
        base_dim=vae_base_dim, z_dim=z_dim, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
        temperal_downsample=[False, True, True],
    ).eval())
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = WanPipeline(
        tokenizer=tok, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer,
        transformer_2=transformer_2, boundary_ratio=WAN22_BOUNDARY_RATIO if two_experts else None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_wan22_pipeline(seed: int = 0, **kwargs):
    """:func:`build_tiny_wan_pipeline` with two experts (Wan2.2 A14B layout)."""
    return build_tiny_wan_pipeline(seed, two_experts=True, **kwargs)
