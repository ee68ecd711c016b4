"""Verifiable text tasks for the LLM path and its demo: multi-digit arithmetic.

A record is ``{"prompt": "37+58=", "answer": "95"}``; the reward functions in
:mod:`flowrl.text.rewards` compare completions with the ``answer`` column. Train and held-out
problems are disjoint: a problem's split is decided by a hash of its operands, so the split does
not depend on how many problems are drawn or in which order.
"""
from __future__ import annotations

import hashlib
import random
from typing import Dict, List, Sequence

OPS = ("+", "-")


def _split_of(a: int, b: int, op: str, test_fraction: float) -> str:
    h = int.from_bytes(hashlib.sha256(f"{a}{op}{b}".encode()).digest()[:4], "little")
    return "test" if h / 2**32 < test_fraction else "train"


def make_problem(a: int, b: int, op: str = "+") -> Dict[str, str]:
    """The record of ``a op b`` (subtraction keeps a >= b so answers are non-negative)."""
    if op not in OPS:
        raise ValueError(f"op: must be one of {OPS}, got {op!r}")
    if op == "-" and a < b:
        a, b = b, a
    value = a + b if op == "+" else a - b
    return {"prompt": f"{a}{op}{b}=", "answer": str(value)}


def arithmetic_records(split: str, n: int, seed: int = 0, *, digits: int = 2, ops: Sequence[str] = ("+",),
                       test_fraction: float = 0.2) -> List[Dict[str, str]]:
    """``n`` distinct problems of the ``split`` ("train" or "test") with operands of up to
    ``digits`` digits, drawn deterministically from ``seed``."""
    if split not in ("train", "test"):
        raise ValueError(f"split: must be 'train' or 'test', got {split!r}")
    if n < 1:
        raise ValueError(f"n: must be >= 1, got {n}")
    hi = 10 ** digits - 1
    lo = 10 ** (digits - 1) if digits > 1 else 0
    space = (hi - lo + 1) ** 2 * len(ops)
    rng = random.Random(f"{seed}-{split}-{digits}-{''.join(ops)}")
    seen, out = set(), []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 50 * space + 1000:
            raise ValueError(f"n: only {len(out)} {split} problems exist with digits={digits}, ops={list(ops)}")
        a, b, op = rng.randint(lo, hi), rng.randint(lo, hi), rng.choice(list(ops))
        key = (a, b, op)
        if key in seen or _split_of(a, b, op, test_fraction) != split:
            continue
        seen.add(key)
        out.append(make_problem(a, b, op))
    return out
