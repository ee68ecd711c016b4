"""Reward functions for the text path: plain Python callables, several, weighted.

A reward function is ``fn(prompts, completions, **batch) -> list[float | None]`` (TRL's
convention): ``batch`` holds the dataset columns of each row (e.g. ``answer``), repeated per
group member. ``None`` (or NaN/inf) marks a row the function cannot score; such a row is invalid
for that reward and is reported, never averaged in.
"""
from __future__ import annotations

import importlib
import logging
import math
import re
from typing import Callable, Dict, List, Mapping, Sequence, Tuple

import torch

from scorers._text import short

log = logging.getLogger(__name__)

RewardFn = Callable[..., Sequence]
_BUILTIN: Dict[str, RewardFn] = {}


def register_reward(name: str):
    def deco(fn: RewardFn) -> RewardFn:
        _BUILTIN[name] = fn
        return fn

    return deco


def resolve_reward(name: str) -> RewardFn:
    """A built-in reward function by name, or any callable by dotted path ``pkg.mod:fn``/``pkg.mod.fn``."""
    if name in _BUILTIN:
        return _BUILTIN[name]
    if "." in name or ":" in name:
        mod, sep, attr = name.partition(":")
        if not sep:
            mod, _, attr = name.rpartition(".")
        try:
            fn = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise KeyError(f"reward function {name!r}: cannot import it ({e})") from None
        if not callable(fn):
            raise KeyError(f"reward function {name!r} is not callable")
        return fn
    raise KeyError(f"unknown reward function {name!r} (built-in: {', '.join(sorted(_BUILTIN))}; or a dotted path)")


def score_completions(fns: Mapping[str, RewardFn], prompts: Sequence[str], completions: Sequence[str],
                      batch: Mapping[str, Sequence] | None = None) -> Tuple[torch.Tensor, List[str]]:
    """Run every reward function: ``([N, R] float32 with NaN for unscorable rows, names)``.

    A function that raises marks all its rows NaN and is logged by name; wrong-length output is
    an error."""
    batch = dict(batch or {})
    n = len(completions)
    cols, names = [], []
    for name, fn in fns.items():
        try:
            out = list(fn(prompts=list(prompts), completions=list(completions), **batch))
        except Exception as e:  # a user's reward function failing must not kill the run silently
            log.warning("reward %s raised %s: %s; its %d samples are marked invalid", name, type(e).__name__,
                        short(e, 500), n)  # the error text may quote a (long) prompt
            out = [None] * n
        if len(out) != n:
            raise ValueError(f"reward {name!r} returned {len(out)} values for {n} completions")
        vals = [float("nan") if v is None else float(v) for v in out]
        bad = sum(1 for v in vals if not math.isfinite(v))
        if bad:
            log.warning("reward %s: %d of %d samples invalid (None/NaN/inf)", name, bad, n)
        cols.append(torch.tensor([v if math.isfinite(v) else float("nan") for v in vals], dtype=torch.float32))
        names.append(name)
    return torch.stack(cols, dim=1), names


_NUMBER = re.compile(r"-?\d+")


@register_reward("exact_match")
def exact_match(prompts, completions, answer=None, **_) -> List[float]:
    """1.0 when the completion, stripped, equals the ``answer`` column (as text), else 0.0."""
    if answer is None:
        raise ValueError("exact_match needs an 'answer' column")
    return [1.0 if c.strip() == str(a).strip() else 0.0 for c, a in zip(completions, answer)]


@register_reward("first_number_match")
def first_number_match(prompts, completions, answer=None, **_) -> List[float]:
    """1.0 when the first integer in the completion equals ``answer`` (lenient exact match)."""
    if answer is None:
        raise ValueError("first_number_match needs an 'answer' column")
    out = []
    for c, a in zip(completions, answer):
        m = _NUMBER.search(c)
        out.append(1.0 if m and m.group(0) == str(a).strip() else 0.0)
    return out


@register_reward("digit_accuracy")
def digit_accuracy(prompts, completions, answer=None, **_) -> List[float]:
    """Partial credit: the fraction of the answer's characters matched position by position,
    right-aligned (units digit first), minus a penalty for extra length; in [0, 1]."""
    if answer is None:
        raise ValueError("digit_accuracy needs an 'answer' column")
    out = []
    for c, a in zip(completions, answer):
        c, a = c.strip(), str(a).strip()
        if not a:
            out.append(0.0)
            continue
        hits = sum(1 for x, y in zip(reversed(c), reversed(a)) if x == y)
        extra = max(0, len(c) - len(a))
        out.append(max(0.0, (hits - extra) / len(a)))
    return out


_INTEGER = re.compile(r"-?\d+")


@register_reward("integer_format")
def integer_format(prompts, completions, **_) -> List[float]:
    """1.0 when the completion, stripped, is one integer numeral (``-?\\d+``), else 0.0: a format
    reward that needs no answer (the arithmetic demo's counterpart of a "well-formed answer" reward,
    e.g. for dynamic reward weighting beside ``exact_match``)."""
    return [1.0 if _INTEGER.fullmatch(c.strip()) else 0.0 for c in completions]
