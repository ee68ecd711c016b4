"""Tiny causal LMs built offline: a character-level tokenizer and a small Qwen2 model.

Used by the tests, by ``flowrl make-tiny lm DIR`` and as the starting point of the shipped demo LM.
The folder written by :func:`save_tiny_lm` is an ordinary transformers model folder:
``AutoModelForCausalLM.from_pretrained(dir)`` and ``AutoTokenizer.from_pretrained(dir)`` load it.
"""
from __future__ import annotations

import string
from pathlib import Path
from typing import Sequence

import torch

from flowrl.core.rng import stream_seed
from flowrl.inputs import writable_dir

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
DEFAULT_CHARS = string.digits + string.ascii_lowercase + " +-*=?:.,()"


def char_tokenizer(chars: Sequence[str] = DEFAULT_CHARS):
    """A character-level ``PreTrainedTokenizerFast`` (one token per character), left padding,
    built with the ``tokenizers`` library (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # heavy: tokenizers/transformers, only when the tiny LM is built
    from transformers import PreTrainedTokenizerFast  # heavy (see above)

    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for c in chars:
        if c not in vocab:
            vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK)
    fast.padding_side = "left"
    return fast


def build_tiny_lm(tokenizer=None, *, hidden_size: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                  intermediate_size: int = 128, max_positions: int = 128, seed: int = 0):
    """(model, tokenizer): a randomly initialised ``Qwen2ForCausalLM`` of a few hundred thousand
    parameters and its char tokenizer. Same seed, same weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM  # heavy: transformers, only when the tiny LM is built

    tokenizer = tokenizer or char_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    with torch.random.fork_rng():
        torch.manual_seed(stream_seed(seed, "tiny", "lm"))  # the module init draws from the global RNG
        model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


def save_tiny_lm(out_dir, seed: int = 0, **kwargs) -> Path:
    """Write a tiny LM + tokenizer folder that transformers' Auto classes load."""
    out = writable_dir(out_dir, "model folder")
    model, tok = build_tiny_lm(seed=seed, **kwargs)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
