"""Tiny, real-format FLUX.2 pipelines (dev and klein) built offline with random weights.

The components have the released checkpoints' classes and structure, only much smaller:

* ``Flux2Transformer2DModel``: double- and single-stream blocks, 4-axis RoPE (axes summing to the head
  dim), guidance embedding for dev, none for klein; ``in_channels = 4 * latent_channels`` (2x2
  patchified latents, 128 in the release);
* ``AutoencoderKLFlux2`` with its latent batch-norm, whose running mean / variance are set to random
  values (the release's are fitted), so decoding's de-normalisation is exercised;
* dev: ``Mistral3ForConditionalGeneration`` (a Pixtral vision tower + a Mistral LM of 30 layers, so
  the pipeline's default hidden-state layers (10, 20, 30) exist) behind a ``PixtralProcessor``;
  klein: ``Qwen3ForCausalLM`` of 27 layers (layers (9, 18, 27)) and its tokenizer;
* FLUX.2's ``FlowMatchEulerDiscreteScheduler`` config (dynamic exponential shift).

Tokenizers are built in code: a WordPiece vocabulary of whole words (the pipeline's system message,
the ``shapes`` prompt words) with a character fallback, and chat templates in the Mistral / Qwen3
formats, so the system message and the chat markup take few tokens and a short
``max_sequence_length`` still holds the prompt. The same seed gives the same weights (each component
from its own derived seed, in a forked RNG); saved folders reload with ``<Pipeline>.from_pretrained``.
"""

from __future__ import annotations

import string

import torch

from flowrl.core.rng import stream_seed

__all__ = [
    "tiny_wordpiece_tokenizer",
    "tiny_pixtral_processor",
    "build_tiny_flux2_pipeline",
    "build_tiny_flux2_klein_pipeline",
]

# Prompt words that get one token each (the ``shapes`` grammar's words and a few common ones).
_PROMPT_WORDS = (
    "a an the of and with on in one two three four photo image red green blue yellow purple orange black white "
    "circle circles square squares triangle triangles left right above below"
).split()

MISTRAL_SPECIALS = ("<s>", "</s>", "<unk>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                    "[IMG]", "[IMG_BREAK]", "[IMG_END]")
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")

# Mistral's chat format (system prompt, [INST] turns), reading text parts of list-valued contents.
_MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['content'] is string %}{% set text = m['content'] %}"
    "{% else %}{% set text = m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') %}"
    "{% endif %}"
    "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif m['role'] == 'user' %}[INST]{{ text }}[/INST]"
    "{% else %}{{ text }}{{ eos_token }}{% endif %}{% endfor %}"
)
# Qwen3's chat format with enable_thinking=False (an empty think block opens the answer).
_QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def _seeded(seed: int, offset: int, build):
    """``build()`` in a forked CPU RNG seeded with the stream ``(seed, "tiny", "flux2", offset)``;
    ``offset`` names the component: 1 text encoder, 3 transformer, 4 VAE."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(seed, "tiny", "flux2", offset))
        return build()


def tiny_wordpiece_tokenizer(specials, words=(), *, pad: str, unk: str, bos: str | None = None,
                             eos: str | None = None, chat_template: str | None = None, max_length: int = 512):
    """A ``PreTrainedTokenizerFast`` over a WordPiece vocabulary built in code: ``specials`` first (never
    split), then ``words`` (one token each), then every printable ASCII character alone and as a
    ``##`` continuation, so any other word is spelled out. Punctuation and whitespace split words
    (BERT pre-tokenizer); right padding; ``chat_template`` as given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # heavy: tokenizers, only when a tiny model is built
    from transformers import PreTrainedTokenizerFast  # heavy: transformers (see above)

    vocab: dict[str, int] = {}
    chars = string.ascii_letters + string.digits + string.punctuation
    for t in [*specials, *words, *chars, *("##" + c for c in chars)]:
        vocab.setdefault(t, len(vocab))
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token=unk, max_input_chars_per_word=100))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=pad, unk_token=unk, bos_token=bos, eos_token=eos,
        additional_special_tokens=[s for s in specials if s not in (pad, unk, bos, eos)],
        model_max_length=max_length,
    )
    fast.padding_side = "right"
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def _system_words() -> list[str]:
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE  # heavy: diffusers (see above)

    return [w for w in SYSTEM_MESSAGE.replace(",", " ").replace(".", " ").split()]


def tiny_pixtral_processor():
    """A ``PixtralProcessor`` (the FLUX.2-dev tokenizer class) over :func:`tiny_wordpiece_tokenizer` with
    Mistral's special tokens and chat format, and a default ``PixtralImageProcessor``."""
    from transformers import PixtralImageProcessor, PixtralProcessor  # heavy: transformers (see above)

    tok = tiny_wordpiece_tokenizer(MISTRAL_SPECIALS, _system_words() + _PROMPT_WORDS, pad="<pad>", unk="<unk>",
                                   bos="<s>", eos="</s>")
    return PixtralProcessor(image_processor=PixtralImageProcessor(), tokenizer=tok, spatial_merge_size=2,
                            chat_template=_MISTRAL_TEMPLATE)


def _tiny_transformer(seed: int, latent_channels: int, text_dim: int, guidance_embeds: bool, *, num_layers: int,
                      num_single_layers: int, num_heads: int, head_dim: int):
    from diffusers import Flux2Transformer2DModel  # heavy: diffusers, only when a tiny model is built

    if head_dim % 8 != 0:
        raise ValueError(f"head_dim must be a multiple of 8 (four even RoPE axes), got {head_dim}")
    return _seeded(seed, 3, lambda: Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=head_dim,
        num_attention_heads=num_heads,
        joint_attention_dim=text_dim,
        timestep_guidance_channels=32,
        mlp_ratio=3.0,
        axes_dims_rope=(head_dim // 4,) * 4,  # (t, h, w, l) as the release's (32, 32, 32, 32)
        rope_theta=2000,
        guidance_embeds=guidance_embeds,
    ))


def _tiny_vae(seed: int, latent_channels: int):
    """``AutoencoderKLFlux2`` with two blocks (scale factor 2) and random batch-norm statistics."""
    from diffusers import AutoencoderKLFlux2  # heavy: diffusers, only when a tiny model is built

    def build():
        vae = AutoencoderKLFlux2(
            in_channels=3, out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(8, 16), layers_per_block=1, latent_channels=latent_channels, norm_num_groups=8,
            sample_size=32,
        ).eval()
        n = vae.bn.running_mean.numel()
        vae.bn.running_mean.copy_(0.2 * torch.randn(n))
        vae.bn.running_var.copy_(0.5 + 1.5 * torch.rand(n))
        return vae

    return _seeded(seed, 4, build)


def _scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler  # heavy: diffusers, only when a tiny model is built

    # FLUX.2-dev / klein scheduler_config.json: dynamic exponential shift (mu comes from the pipeline).
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential",
    )


def build_tiny_flux2_pipeline(seed: int = 0, *, latent_channels: int = 8, hidden: int = 16, num_layers: int = 1,
                              num_single_layers: int = 1, num_heads: int = 2, head_dim: int = 16):
    """A tiny ``Flux2Pipeline`` (FLUX.2-dev architecture) with random weights.

    Text features are the Mistral LM's hidden states of layers 10, 20, 30 concatenated
    (``joint_attention_dim = 3 * hidden``). Images need sides divisible by 4 (VAE scale factor 2,
    2x2 packing).
    """
    from diffusers import Flux2Pipeline  # heavy: diffusers, only when a tiny model is built
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    processor = tiny_pixtral_processor()
    tok = processor.tokenizer
    text_cfg = MistralConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=30,
        num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2, max_position_embeddings=1024,
        sliding_window=None, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    vision_cfg = PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     head_dim=8, patch_size=4, image_size=32, num_channels=3)
    cfg = Mistral3Config(vision_config=vision_cfg, text_config=text_cfg, image_token_index=tok.convert_tokens_to_ids("[IMG]"),
                         spatial_merge_size=2, tie_word_embeddings=False)
    te = _seeded(seed, 1, lambda: Mistral3ForConditionalGeneration(cfg).eval())
    transformer = _tiny_transformer(seed, latent_channels, 3 * hidden, True, num_layers=num_layers,
                                    num_single_layers=num_single_layers, num_heads=num_heads, head_dim=head_dim)
    pipe = Flux2Pipeline(scheduler=_scheduler(), vae=_tiny_vae(seed, latent_channels), text_encoder=te,
                         tokenizer=processor, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_flux2_klein_pipeline(seed: int = 0, *, is_distilled: bool = False, latent_channels: int = 8,
                                    hidden: int = 16, num_layers: int = 1, num_single_layers: int = 1,
                                    num_heads: int = 2, head_dim: int = 16):
    """A tiny ``Flux2KleinPipeline`` (FLUX.2-klein base architecture: true CFG, no guidance embedding) with
    random weights; ``is_distilled=True`` gives the step-distilled variant (no CFG). Text features are the
    Qwen3 LM's hidden states of layers 9, 18, 27 concatenated (``joint_attention_dim = 3 * hidden``)."""
    from diffusers import Flux2KleinPipeline  # heavy: diffusers, only when a tiny model is built
    from transformers import Qwen3Config, Qwen3ForCausalLM  # heavy: transformers (see above)

    tok = tiny_wordpiece_tokenizer(QWEN_SPECIALS, ["user", "assistant", *_PROMPT_WORDS], pad="<|endoftext|>",
                                   unk="<|endoftext|>", eos="<|im_end|>", chat_template=_QWEN_TEMPLATE)
    cfg = Qwen3Config(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=27,
        num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2, max_position_embeddings=1024,
        tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
    )
    te = _seeded(seed, 1, lambda: Qwen3ForCausalLM(cfg).eval())
    transformer = _tiny_transformer(seed, latent_channels, 3 * hidden, False, num_layers=num_layers,
                                    num_single_layers=num_single_layers, num_heads=num_heads, head_dim=head_dim)
    pipe = Flux2KleinPipeline(scheduler=_scheduler(), vae=_tiny_vae(seed, latent_channels), text_encoder=te,
                              tokenizer=tok, transformer=transformer, is_distilled=is_distilled)
    pipe.set_progress_bar_config(disable=True)
    return pipe
