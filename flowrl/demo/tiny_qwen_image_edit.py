"""A tiny, real-format Qwen-Image-Edit pipeline (``QwenImageEditPipeline``) built offline with random weights.

Qwen-Image-Edit has Qwen-Image's architecture (a ``QwenImageTransformer2DModel``, the 3-D ``AutoencoderKLQwenImage``,
a ``Qwen2_5_VLForConditionalGeneration`` text encoder and the dynamic-shifting scheduler); what makes it an editing
model is the pipeline: the Qwen2.5-VL encoder reads the source image inside its prompt template (a
``Qwen2VLProcessor`` turns the image into vision tokens) and the source image's packed VAE latents are appended to
the noisy tokens. So the tiny pipeline reuses the tiny Qwen-Image components
(:func:`flowrl.demo.tiny_qwen_image.build_tiny_qwen_image_pipeline`: per-component derived seeds in a forked RNG),
with a tokenizer whose vocabulary has the edit template's words, and adds a tiny ``Qwen2VLProcessor`` (its image
processor sized for the tiny vision tower: 14-px patches, 2x2 merge, images of 56..112 px a side). The saved folder
reloads with ``QwenImageEditPipeline.from_pretrained``.
"""

from __future__ import annotations

import re

__all__ = ["build_tiny_qwen_image_edit_pipeline", "tiny_qwen2_vl_processor", "tiny_qwen2_edit_tokenizer"]

# QwenImageEditPipeline's system prompt (the words only: each becomes one token of the tiny vocabulary).
_EDIT_SYSTEM = (
    "Describe the key features of the input image (color, shape, size, texture, objects, background), then explain "
    "how the user's text instruction should alter or modify the image. Generate a new image that meets the user's "
    "requirements while maintaining consistency with the original input where appropriate."
)
_EDIT_WORDS = tuple(dict.fromkeys(re.findall(r" ?[A-Za-z]+", _EDIT_SYSTEM) + ["system", "user", "assistant"]))
# Pieces Qwen's vocabulary holds as single tokens in that prompt (a contraction and punctuation runs).
_EDIT_PIECES = ("'s", " (", "),")


def tiny_qwen2_edit_tokenizer():
    """The tiny byte-level BPE ``Qwen2Tokenizer`` (:func:`flowrl.demo.tiny_qwen_image.tiny_qwen2_tokenizer`) with
    one token per word of the edit template and per piece of ``_EDIT_PIECES``: the template's prefix before the
    vision tokens is then exactly ``prompt_template_encode_start_idx`` (64) tokens, as with Qwen's vocabulary,
    so the pipeline keeps the image tokens and the user's prompt."""
    from flowrl.demo.tiny_qwen_image import tiny_qwen2_tokenizer

    return tiny_qwen2_tokenizer(_EDIT_WORDS + _EDIT_PIECES)


def tiny_qwen2_vl_processor(tokenizer):
    """A ``Qwen2VLProcessor`` over ``tokenizer`` with a Qwen2-VL image processor for a tiny vision tower: the
    released patch geometry (14 px patches, 2x2 spatial merge, 2 frames per temporal patch) and the image resized
    to between 56x56 and 112x112 px (4 to 16 vision tokens)."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor  # heavy: transformers

    geometry = dict(patch_size=14, merge_size=2, temporal_patch_size=2,
                    size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112})
    return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**geometry), tokenizer=tokenizer,
                            video_processor=Qwen2VLVideoProcessor(**geometry))


def build_tiny_qwen_image_edit_pipeline(seed: int = 0, **qwen_kwargs):
    """A tiny ``QwenImageEditPipeline`` with random weights, deterministic per ``seed``; ``qwen_kwargs`` go to
    :func:`flowrl.demo.tiny_qwen_image.build_tiny_qwen_image_pipeline` (layers, heads, widths). The VAE
    compresses 2x: image sides must be multiples of 4."""
    from diffusers import QwenImageEditPipeline  # heavy: diffusers, only when a tiny model is built

    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration  # heavy (see above)

    from flowrl.core.rng import stream_seed
    from flowrl.demo.tiny_qwen_image import _text_encoder_config, build_tiny_qwen_image_pipeline

    base = build_tiny_qwen_image_pipeline(seed=seed, **qwen_kwargs)
    c = base.components
    tok = tiny_qwen2_edit_tokenizer()
    te = c["text_encoder"].config.text_config
    cfg = _text_encoder_config(tok, te.hidden_size, te.num_hidden_layers, te.num_attention_heads)
    with torch.random.fork_rng(devices=[]):  # the edit vocabulary's encoder, under its own derived seed
        torch.manual_seed(stream_seed(seed, "tiny", "qwen_image_edit", 1))
        text_encoder = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    pipe = QwenImageEditPipeline(
        scheduler=c["scheduler"], vae=c["vae"], text_encoder=text_encoder, tokenizer=tok,
        processor=tiny_qwen2_vl_processor(tok), transformer=c["transformer"],
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
