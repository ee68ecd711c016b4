"""Every random stream of a run from one derivation: ``(seed, *keys) -> 63-bit seed -> torch.Generator``.

Why one function: a stream must be the same on every process and in every run, whatever the number
of processes, which process samples a prompt, or whether the run was killed and resumed. So a
stream is never a process's RNG state, only a pure function of the run seed and keys that name
what the stream is for. A prompt's group then does not depend on which process samples it,
``build_plan`` picks the same steps on every process, and a resumed run repeats the draws of an
uninterrupted one exactly.

Keys: a purpose string first, then ints from outer to inner. The names in use::

    generator(seed, "prompts", epoch)                         # epoch order of the training records
    generator(seed, "plan", step)                             # the plan's random choices (flow.plan)
    generator(seed, "sample", step, record, position)         # an image prompt's noise at a step
    generator(seed, "sample", step, record, position, row)    # one text row (group member) of it
    generator(seed, "minibatch", step, epoch)                 # the order of inner-epoch minibatches
    generator(seed, "budget", kind, step)                     # a rollout budget's prompt draws (core.budgets)
    generator(seed, "pretrain", phase, step)                  # pretraining (demo.pretrain_image/_text)
    stream_seed(seed, "tiny", model, component)               # the weights of a tiny test model

Encoding (a promise: a changed encoding changes every run's draws, and ``tests/test_rng.py`` pins
one value). The seed and each key is an ``int`` (anything with ``__index__``: numpy and 0-d torch
integers too; not ``bool``) or a ``str``. The bytes hashed are ``b"flowrl.rng/1"`` followed by,
per item, ``b"i" + decimal + b";"`` for an int or ``b"s" + utf-8 byte length + b":" + utf-8
bytes`` for a str, so no two different key tuples share an encoding. The stream seed is the
first 8 bytes of its SHA-256, little-endian, masked to 63 bits (what ``manual_seed`` takes on
every backend). Floats, None and nested sequences are rejected: their text form is not canonical.
"""
from __future__ import annotations

import hashlib
import operator
from typing import Union

import torch

__all__ = ["generator", "stream_seed"]

Key = Union[int, str]
_PREFIX = b"flowrl.rng/1"
_MASK63 = (1 << 63) - 1


def _encode(item: object, where: str) -> bytes:
    if isinstance(item, str):
        raw = item.encode("utf-8")
        return b"s%d:" % len(raw) + raw
    if isinstance(item, bool) or not hasattr(type(item), "__index__"):
        raise TypeError(f"flowrl.core.rng: {where} must be an int or a str, got {type(item).__name__} {item!r}")
    return b"i%d;" % operator.index(item)


def stream_seed(seed: int, *keys: Key) -> int:
    """The 63-bit seed of the stream named by ``(seed, *keys)`` (module doc: encoding and key names)."""
    if isinstance(seed, (str, bool)) or not hasattr(type(seed), "__index__"):
        raise TypeError(f"flowrl.core.rng: the seed must be an int, got {type(seed).__name__} {seed!r}")
    parts = [_PREFIX, _encode(seed, "the seed")]
    parts += [_encode(k, f"key {i}") for i, k in enumerate(keys)]
    digest = hashlib.sha256(b"".join(parts)).digest()
    return int.from_bytes(digest[:8], "little") & _MASK63


def generator(seed: int, *keys: Key, device: Union[str, torch.device] = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with :func:`stream_seed` ``(seed, *keys)``."""
    return torch.Generator(device=device).manual_seed(stream_seed(seed, *keys))
