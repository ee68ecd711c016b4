"""A tiny, real-format Qwen-Image pipeline built offline with random weights.

Every component has the class and the layout of the released ``Qwen/Qwen-Image`` checkpoint, only much
smaller: a ``QwenImageTransformer2DModel`` (dual-stream MMDiT with QK RMS-norm and 3-axis scaled RoPE)
over packed 2x2 patches of 16 latent channels, an ``AutoencoderKLQwenImage`` (3-D causal VAE with the
released per-channel ``latents_mean`` / ``latents_std``), a ``Qwen2_5_VLForConditionalGeneration`` text
encoder (a tiny vision tower included, unused by text prompts), a ``Qwen2Tokenizer`` built in code, and
a ``FlowMatchEulerDiscreteScheduler`` with Qwen-Image's dynamic-shifting settings.

The tokenizer is byte-level BPE (every byte is a token) whose merges make each word of the pipeline's
prompt template one token, as Qwen's vocabulary does: the template's system prefix is then exactly
``prompt_template_encode_start_idx`` (34) tokens, so the pipeline drops the prefix and keeps the
user's prompt, as with the real model. Same seed, same weights (each component under its own derived
seed, in a forked RNG); the saved folder reloads with ``QwenImagePipeline.from_pretrained``.
"""

from __future__ import annotations

import re

import torch

from flowrl.core.rng import stream_seed
from flowrl.demo.tiny_image import _byte_to_unicode

__all__ = ["tiny_qwen2_tokenizer", "build_tiny_qwen_image_pipeline", "QWEN_SPECIAL_TOKENS"]

# Qwen2.5's special tokens used by the chat template and the vision placeholders, in Qwen's order.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)

# The words of QwenImagePipeline's prompt template (system prefix and assistant turn).
_TEMPLATE_WORDS = (
    "system", "Describe", " the", " image", " by", " detailing", " color", " shape", " size", " texture",
    " quantity", " text", " spatial", " relationships", " of", " objects", " and", " background", "user",
    "assistant",
)

# The flow-matching scheduler settings of the released Qwen-Image (scheduler/scheduler_config.json):
# exponential dynamic shifting with mu from 0.5 at 256 tokens to 0.9 at 8192, and the schedule's end
# stretched to 0.02.
QWEN_IMAGE_SCHEDULER = dict(
    num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
    base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
)


def tiny_qwen2_tokenizer(words=_TEMPLATE_WORDS):
    """A ``Qwen2Tokenizer`` built offline: the 256 byte symbols of byte-level BPE, one whole-word token
    per entry of ``words`` (a leading space is the byte-level ``Ġ``; merges join characters left to right,
    longest words first, every prefix in the vocabulary), then Qwen2.5's special tokens."""
    from transformers import Qwen2Tokenizer  # heavy: transformers, only when a tiny model is built

    b2u = _byte_to_unicode()
    vocab: dict[str, int] = {}
    for s in b2u.values():
        vocab[s] = len(vocab)
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for w in sorted(dict.fromkeys(words), key=lambda w: (-len(w), w)):
        if not re.fullmatch(r" ?[!-~]+", w):
            raise ValueError(f"words: expected printable ASCII (no spaces) with an optional leading space, got {w!r}")
        parts = [b2u[b] for b in w.encode()]
        cur = parts[0]
        for nxt in parts[1:]:
            if (cur, nxt) not in seen:
                seen.add((cur, nxt))
                merges.append((cur, nxt))
            cur = cur + nxt
            vocab.setdefault(cur, len(vocab))
    for t in QWEN_SPECIAL_TOKENS:
        vocab[t] = len(vocab)
    return Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=32768,
                          extra_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]))


def _seeded(seed: int, offset: int, build):
    """``build()`` in a forked CPU RNG seeded with the stream ``(seed, "tiny", "qwen_image", offset)``;
    ``offset`` names the component: 1 text encoder, 3 transformer, 4 VAE."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(seed, "tiny", "qwen_image", offset))
        return build()


def _text_encoder_config(tok, hidden: int, layers: int, heads: int):
    from transformers import Qwen2_5_VLConfig  # heavy: transformers, only when a tiny model is built

    head_dim = hidden // heads
    if head_dim % 16:
        raise ValueError(f"hidden // heads must be a multiple of 16 (3-part mrope), got {head_dim}")
    q = head_dim // 16  # mrope sections (temporal, height, width) of head_dim / 2 in Qwen2.5-VL's 2:3:3 ratio (16, 24, 24)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    text = dict(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=2048,
        rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                            "mrope_section": [2 * q, 3 * q, 3 * q]},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        use_cache=False,
    )
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=hidden,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[0])
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def build_tiny_qwen_image_pipeline(
    seed: int = 0,
    *,
    num_layers: int = 2,
    num_heads: int = 2,
    head_dim: int = 16,
    text_hidden: int = 32,
    text_layers: int = 2,
    vae_base_dim: int = 8,
):
    """A tiny ``QwenImagePipeline`` with random weights (Qwen-Image architecture, ~10^5 parameters per
    component). The VAE compresses 2x (``vae_scale_factor`` 2), so image sides must be multiples of 4
    and a 32x32 image is 8x8 = 64 packed tokens. RoPE axes (frame, row, column) split ``head_dim`` as
    the released (16, 56, 56) splits 128."""
    from diffusers import (  # heavy: diffusers, only when a tiny model is built
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLForConditionalGeneration  # heavy (see above)

    if head_dim % 8 or head_dim < 8:
        raise ValueError(f"head_dim must be a positive multiple of 8 (three even RoPE axes), got {head_dim}")
    tok = tiny_qwen2_tokenizer()
    te_cfg = _text_encoder_config(tok, text_hidden, text_layers, 2)
    text_encoder = _seeded(seed, 1, lambda: Qwen2_5_VLForConditionalGeneration(te_cfg).eval())
    a = head_dim // 8 * 2  # (16, 56, 56) / 128 -> (1/8, 7/16, 7/16), rounded to even sizes
    r = (head_dim - a) // 2 - ((head_dim - a) // 2) % 2
    axes = (a, r, head_dim - a - r)
    latent_channels = 16
    transformer = _seeded(
        seed,
        3,
        lambda: QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=4 * latent_channels,
            out_channels=latent_channels,
            num_layers=num_layers,
            attention_head_dim=head_dim,
            num_attention_heads=num_heads,
            joint_attention_dim=text_hidden,
            guidance_embeds=False,
            axes_dims_rope=axes,
        ),
    )
    vae = _seeded(
        seed,
        4,
        lambda: AutoencoderKLQwenImage(
            base_dim=vae_base_dim, z_dim=latent_channels, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[],
            temperal_downsample=[False],
        ).eval(),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER)
    pipe = QwenImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok, transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
