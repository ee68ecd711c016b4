"""Tiny, real-format SD3 and FLUX.1 pipelines built offline with random weights.

The models have exactly the architecture of the released checkpoints, only much smaller:

* SD3 / SD3.5-Medium (arXiv 2403.03206): an MMDiT ``SD3Transformer2DModel`` with QK RMS-norm and
  dual-attention layers, two CLIP text encoders with projection, no T5, a 16-channel
  ``AutoencoderKL`` and ``FlowMatchEulerDiscreteScheduler(shift=3.0)``;
* FLUX.1-dev: a ``FluxTransformer2DModel`` with guidance embedding, double- and single-stream
  blocks and 3-axis RoPE, a CLIP and a T5 encoder, a 16-channel ``AutoencoderKL`` and FLUX.1's
  dynamic-shifting scheduler.

Tokenizers are built in code from a character-level vocabulary, so nothing is downloaded; saved
folders reload with ``<Pipeline>.from_pretrained``. The same seed always gives the same weights
(each component under its own derived seed, in a forked RNG).
"""

from __future__ import annotations

import logging
import string
from pathlib import Path
from typing import Sequence

import torch

from flowrl.core.rng import stream_seed
from flowrl.demo import TINY_BUILDERS
from flowrl.inputs import writable_dir

logger = logging.getLogger(__name__)

__all__ = [
    "tiny_clip_tokenizer",
    "tiny_t5_tokenizer",
    "build_tiny_sd3_pipeline",
    "build_tiny_flux_pipeline",
    "save_tiny",
    "count_params",
    "TINY_KINDS",
]

TINY_KINDS = tuple(TINY_BUILDERS)  # every image family with a tiny builder

# Scaling/shift factors of the released 16-channel VAEs (SD3/SD3.5 and FLUX.1 vae/config.json).
_SD3_VAE_FACTORS = (1.5305, 0.0609)
_FLUX_VAE_FACTORS = (0.3611, 0.1159)


def _byte_to_unicode() -> dict[int, str]:
    """Reversible map of the 256 byte values to printable unicode characters.

    This is the byte-level alphabet used by GPT-2/CLIP BPE (the ``ByteLevel`` pre-tokenizer of the
    ``tokenizers`` library): printable Latin-1 bytes map to themselves, the rest to code points
    from 256 upwards, in byte order.
    """
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    mapping: dict[int, str] = {}
    extra = 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def tiny_clip_tokenizer(max_length: int = 16, words: Sequence[str] = ()):
    """A ``CLIPTokenizer`` built offline from a byte-level BPE vocabulary.

    The vocabulary holds every byte symbol, every byte symbol with CLIP's end-of-word suffix
    ``</w>``, and the two special tokens (``<|startoftext|>``, ``<|endoftext|>`` last, as in CLIP).
    Without ``words`` there are no merges and every word is split into characters, which is all a
    random-weight test model needs. Each of ``words`` (lower-case ASCII) becomes one token: merges join
    its characters left to right (``c i`` -> ``ci``, ``ci r`` -> ``cir``, ..., ``circl e</w>`` ->
    ``circle</w>``), and every prefix is in the vocabulary, so a word the merges cannot finish still
    tokenizes the same way wherever it appears (longer words' merges rank first, which resolves the
    overlaps of the short vocabularies this is meant for). Other words fall back to characters. ``max_length``
    becomes ``model_max_length`` (the pipelines pad CLIP input to it).
    """
    from transformers import CLIPTokenizer  # heavy: transformers, only when a tiny model is built

    if max_length < 3:
        raise ValueError(f"max_length must be >= 3 (bos + token + eos), got {max_length}")
    symbols = list(_byte_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for w in sorted(dict.fromkeys(words), key=lambda w: (-len(w), w)):
        if not w or not w.isascii() or not w.isalpha() or w != w.lower():
            raise ValueError(f"words: expected lower-case ASCII letters, got {w!r}")
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        cur = parts[0]
        for nxt in parts[1:]:
            if (cur, nxt) not in seen:
                seen.add((cur, nxt))
                merges.append((cur, nxt))
            cur = cur + nxt
            vocab.setdefault(cur, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def tiny_t5_tokenizer(max_length: int = 512):
    """A T5 tokenizer (``transformers.T5Tokenizer``, the fast ``tokenizers``-backed class that
    ``T5TokenizerFast`` aliases in transformers 5) built offline from a character-level Unigram
    vocabulary: ``<pad>``=0, ``</s>``=1, ``<unk>``=2 as in T5, the SentencePiece word marker ``▁``,
    then ASCII letters, digits and punctuation. No sentinel (extra_id) tokens.
    """
    from transformers import T5Tokenizer  # heavy: transformers, only when a tiny model is built

    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def count_params(module: torch.nn.Module) -> int:
    """Number of parameters of a module."""
    return sum(p.numel() for p in module.parameters())


def _seeded(seed: int, offset: int, build):
    """Run ``build()`` in a forked CPU RNG seeded with the stream ``(seed, "tiny", "image", offset)`` of
    :mod:`flowrl.core.rng` (modules draw their init from the global RNG); ``offset`` names the
    component: 1, 2 text encoders, 3 transformer, 4 VAE."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(seed, "tiny", "image", offset))
        return build()


def _tiny_vae(seed: int, offset: int, latent_channels: int, factors: tuple[float, float], vae_blocks: int):
    from diffusers import AutoencoderKL  # heavy: diffusers, only when a tiny model is built

    if vae_blocks < 1:
        raise ValueError(f"vae_blocks must be >= 1, got {vae_blocks}")
    widths = tuple(8 * min(2**i, 2) for i in range(vae_blocks))  # 8, 16, 16, ...
    return _seeded(
        seed,
        offset,
        lambda: AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * vae_blocks,
            up_block_types=("UpDecoderBlock2D",) * vae_blocks,
            block_out_channels=widths,
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=8,
            sample_size=32,
            scaling_factor=factors[0],
            shift_factor=factors[1],
            use_quant_conv=False,
            use_post_quant_conv=False,
            force_upcast=True,
        ).eval(),
    )


def _clip_config(tokenizer, hidden: int, projection: int, act: str):
    from transformers import CLIPTextConfig  # heavy: transformers, only when a tiny model is built

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=projection,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act=act,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_sd3_pipeline(
    seed: int = 0,
    sample_size: int = 16,
    *,
    num_layers: int = 2,
    num_heads: int = 2,
    head_dim: int = 16,
    latent_channels: int = 16,
    clip_max_length: int = 16,
    vae_blocks: int = 2,
    dual_attention: bool = True,
    qk_norm: str | None = "rms_norm",
    clip_words: Sequence[str] = (),
):
    """A tiny ``StableDiffusion3Pipeline`` (SD3.5-Medium architecture) with random weights.

    ``sample_size`` is the transformer's default latent side; the pipeline's default image side is
    ``sample_size * vae_scale_factor`` with ``vae_scale_factor = 2 ** (vae_blocks - 1)`` (32 px by
    default). ``text_encoder_3``/``tokenizer_3`` are ``None`` (the pipeline then uses zero T5
    embeddings of ``joint_attention_dim`` width, as it does for SD3 without T5).
    ``dual_attention=False, qk_norm=None`` gives the SD3-Medium variant. ``clip_words``: whole-word
    tokens of both CLIP tokenizers (:func:`tiny_clip_tokenizer`; default character-level).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline  # heavy: diffusers, only when a tiny model is built
    from transformers import CLIPTextModelWithProjection  # heavy: transformers, only when a tiny model is built

    tok1 = tiny_clip_tokenizer(clip_max_length, clip_words)
    tok2 = tiny_clip_tokenizer(clip_max_length, clip_words)
    # CLIP-L-like (quick GELU) and CLIP-G-like (GELU) of different widths, so that a wrong concat fails.
    hid1, hid2 = 32, 48
    te1 = _seeded(
        seed, 1, lambda: CLIPTextModelWithProjection(_clip_config(tok1, hid1, hid1, "quick_gelu")).eval()
    )
    te2 = _seeded(seed, 2, lambda: CLIPTextModelWithProjection(_clip_config(tok2, hid2, hid2, "gelu")).eval())
    inner = num_heads * head_dim
    transformer = _seeded(
        seed,
        3,
        lambda: SD3Transformer2DModel(
            sample_size=sample_size,
            patch_size=2,
            in_channels=latent_channels,
            num_layers=num_layers,
            attention_head_dim=head_dim,
            num_attention_heads=num_heads,
            joint_attention_dim=2 * (hid1 + hid2),  # the "T5 width"; CLIP features are zero-padded to it
            caption_projection_dim=inner,
            pooled_projection_dim=hid1 + hid2,
            out_channels=latent_channels,
            pos_embed_max_size=max(4 * sample_size, 32),
            dual_attention_layers=(0,) if dual_attention else (),
            qk_norm=qk_norm,
        ),
    )
    vae = _tiny_vae(seed, 4, latent_channels, _SD3_VAE_FACTORS, vae_blocks)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=te1,
        tokenizer=tok1,
        text_encoder_2=te2,
        tokenizer_2=tok2,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_flux_pipeline(
    seed: int = 0,
    *,
    num_layers: int = 1,
    num_single_layers: int = 1,
    num_heads: int = 2,
    head_dim: int = 16,
    latent_channels: int = 16,
    clip_max_length: int = 16,
    t5_max_length: int = 512,
    vae_blocks: int = 2,
    guidance_embeds: bool = True,
):
    """A tiny ``FluxPipeline`` (FLUX.1-dev architecture) with random weights.

    The transformer takes packed 2x2 latent patches (``in_channels = 4 * latent_channels``, 64 as
    in FLUX.1), has guidance embedding (``guidance_embeds=True`` like FLUX.1-dev; False gives the
    schnell variant) and RoPE axes that sum to ``head_dim``. Images must have sides divisible by
    ``2 * vae_scale_factor`` (4 px by default).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel  # heavy: diffusers, only when a tiny model is built
    from transformers import CLIPTextModel, T5Config, T5EncoderModel  # heavy: transformers, only when a tiny model is built

    if head_dim % 4 != 0 or head_dim < 8:
        raise ValueError(f"head_dim must be a multiple of 4 and >= 8 (RoPE axes), got {head_dim}")
    tok1 = tiny_clip_tokenizer(clip_max_length)
    tok2 = tiny_t5_tokenizer(t5_max_length)
    clip_hidden, t5_dim = 32, 48
    te1 = _seeded(seed, 1, lambda: CLIPTextModel(_clip_config(tok1, clip_hidden, clip_hidden, "quick_gelu")).eval())
    t5_cfg = T5Config(
        vocab_size=len(tok2),
        d_model=t5_dim,
        d_kv=12,
        d_ff=96,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tok2.pad_token_id,
        eos_token_id=tok2.eos_token_id,
        decoder_start_token_id=tok2.pad_token_id,
    )
    te2 = _seeded(seed, 2, lambda: T5EncoderModel(t5_cfg).eval())
    # RoPE axes (time/id, row, column) as FLUX.1's (16, 56, 56) -- even sizes summing to head_dim.
    a = max(2, (head_dim // 8) * 2)
    rest = head_dim - a
    axes = (a, rest // 2 - (rest // 2) % 2, rest - (rest // 2 - (rest // 2) % 2))
    transformer = _seeded(
        seed,
        3,
        lambda: FluxTransformer2DModel(
            patch_size=1,
            in_channels=4 * latent_channels,
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            attention_head_dim=head_dim,
            num_attention_heads=num_heads,
            joint_attention_dim=t5_dim,
            pooled_projection_dim=clip_hidden,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=axes,
        ),
    )
    vae = _tiny_vae(seed, 4, latent_channels, _FLUX_VAE_FACTORS, vae_blocks)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=te1,
        tokenizer=tok1,
        text_encoder_2=te2,
        tokenizer_2=tok2,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny(kind: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Build the tiny ``kind`` pipeline (a key of :data:`flowrl.demo.TINY_BUILDERS`) and save it to ``out_dir``.

    The folder is what ``<Pipeline>.from_pretrained(out_dir)`` (and ``FlowPolicy.from_pretrained``)
    loads; for "sd3" the folder has no T5, so a plain diffusers load must pass
    ``text_encoder_3=None, tokenizer_3=None`` (``FlowPolicy.from_pretrained`` does this itself).
    Returns the folder path.
    """
    if kind not in TINY_KINDS:
        raise ValueError(f"kind must be one of {TINY_KINDS}, got {kind!r}")
    out = writable_dir(out_dir, "model folder")  # a file or an unwritable place fails before the build
    import importlib

    module, name = TINY_BUILDERS[kind].split(":")
    pipe = getattr(importlib.import_module(module), name)(seed=seed)
    pipe.save_pretrained(out, safe_serialization=True)
    logger.info("saved tiny %s pipeline to %s", kind, out)
    return out
