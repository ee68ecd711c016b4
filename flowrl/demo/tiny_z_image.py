"""A tiny, real-format Z-Image pipeline (``ZImagePipeline``) built offline with random weights.

The components have the architecture of the released Z-Image / Z-Image-Turbo checkpoints, only much
smaller:

* ``ZImageTransformer2DModel``: a single-stream DiT with noise / context refiner blocks, QK RMS-norm,
  3-axis RoPE (caption position, row, column) whose axes sum to the head width, 2x2 patches made
  inside the model;
* a ``Qwen3Model`` text encoder (the pipeline reads its second-to-last hidden state), with a Qwen2
  byte-level BPE tokenizer built in code (every byte one token, no merges) and a chat template that
  writes Qwen3's ``<|im_start|>user ... <|im_end|>`` turn and opens the assistant's;
* a 16-channel ``AutoencoderKL`` with the scaling / shift factors of the FLUX.1 VAE Z-Image uses;
* ``FlowMatchEulerDiscreteScheduler(shift=3.0)`` without dynamic shifting (Z-Image-Turbo's).

The same seed gives the same weights (each component in a forked RNG under its own derived seed,
:func:`flowrl.demo.tiny_image._seeded`); the saved folder reloads with ``ZImagePipeline.from_pretrained``.
"""

from __future__ import annotations

from flowrl.demo.tiny_image import _FLUX_VAE_FACTORS, _byte_to_unicode, _seeded, _tiny_vae

__all__ = ["QWEN3_CHAT_TEMPLATE", "tiny_qwen_tokenizer", "build_tiny_z_image_pipeline"]

# Qwen3's chat format, reduced to what ZImagePipeline uses (user turns, the generation prompt, and the
# empty think block Qwen3 writes when thinking is switched off).
QWEN3_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)
_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def tiny_qwen_tokenizer(max_length: int = 512):
    """A ``Qwen2Tokenizer`` (the class of Qwen3's tokenizer) built offline: the 256 byte-level symbols,
    no merges (one token per byte), ``<|endoftext|>`` as pad / eos, ``<|im_start|>`` / ``<|im_end|>`` as
    special tokens, right padding, and :data:`QWEN3_CHAT_TEMPLATE`."""
    from transformers import AddedToken, Qwen2Tokenizer  # heavy: transformers, only when a tiny model is built

    if max_length < 8:
        raise ValueError(f"max_length must be >= 8 (the chat template alone is longer), got {max_length}")
    vocab: dict[str, int] = {}
    for s in _byte_to_unicode().values():
        vocab[s] = len(vocab)
    for s in _SPECIALS:
        vocab[s] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=max_length)
    tok.add_tokens([AddedToken(s, special=True) for s in _SPECIALS[1:]], special_tokens=True)  # never split
    tok.padding_side = "right"
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    return tok


def build_tiny_z_image_pipeline(
    seed: int = 0,
    *,
    dim: int = 32,
    n_heads: int = 2,
    n_layers: int = 2,
    n_refiner_layers: int = 1,
    text_hidden: int = 32,
    text_layers: int = 3,
    latent_channels: int = 16,
    vae_blocks: int = 2,
    max_length: int = 512,
):
    """A tiny ``ZImagePipeline`` with random weights (module doc). ``dim / n_heads`` (the head width)
    must be a multiple of 8 (three even RoPE axes); images need sides divisible by
    ``2 * vae_scale_factor`` = ``2 ** vae_blocks`` (4 px by default)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel  # heavy: diffusers, only when a tiny model is built
    from transformers import Qwen3Config, Qwen3Model  # heavy: transformers, only when a tiny model is built

    if n_heads < 1 or dim % n_heads or (dim // n_heads) % 8:
        raise ValueError(f"dim / n_heads must be a whole multiple of 8 (RoPE axes), got dim={dim}, n_heads={n_heads}")
    if text_layers < 2:
        raise ValueError(f"text_layers must be >= 2 (the pipeline reads the second-to-last hidden state), got {text_layers}")
    tok = tiny_qwen_tokenizer(max_length)
    qcfg = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=text_hidden,
        intermediate_size=2 * text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=text_hidden // 2,
        max_position_embeddings=max_length,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    text_encoder = _seeded(seed, 1, lambda: Qwen3Model(qcfg).eval())
    head = dim // n_heads
    # RoPE axes (caption/frame, row, column) as Z-Image's (32, 48, 48): the first a quarter, all even.
    a = max(2, (head // 8) * 2)
    rest = head - a
    b = rest // 2 - (rest // 2) % 2
    axes = [a, b, rest - b]
    transformer = _seeded(
        seed,
        3,
        lambda: ZImageTransformer2DModel(
            all_patch_size=(2,),
            all_f_patch_size=(1,),
            in_channels=latent_channels,
            dim=dim,
            n_layers=n_layers,
            n_refiner_layers=n_refiner_layers,
            n_heads=n_heads,
            n_kv_heads=n_heads,
            norm_eps=1e-5,
            qk_norm=True,
            cap_feat_dim=text_hidden,
            rope_theta=256.0,
            t_scale=1000.0,
            axes_dims=axes,
            axes_lens=[max_length + 64, 128, 128],  # caption positions come first on axis 0; 128 rows: 512 px
        ),
    )
    vae = _tiny_vae(seed, 4, latent_channels, _FLUX_VAE_FACTORS, vae_blocks)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    pipe = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe
