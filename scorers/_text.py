"""Bounded text for log and error messages (no imports from flowrl or torch; flowrl imports it too).

A prompt (or a scorer's error text) may be megabytes long; a message quotes at most its first
``n`` characters and says how long the whole was, so one bad prompt cannot flood stderr.
"""
from __future__ import annotations

from typing import Any

__all__ = ["short"]


def short(text: Any, n: int = 80, *, quote: bool = False) -> str:
    """``text`` (``str(text)`` if not a string) for a message: as it is when it has at most ``n``
    characters, else its first ``n`` characters followed by ``"... (N chars)"``. ``quote=True``
    quotes the kept text as ``repr`` does (what a ``%r`` / ``{x!r}`` gave), the length note outside
    the quotes: ``'a red circle and a blue'... (1000000 chars)``."""
    s = text if isinstance(text, str) else str(text)
    if len(s) <= n:
        return repr(s) if quote else s
    head = s[:n]
    return f"{head!r}... ({len(s)} chars)" if quote else f"{head}... ({len(s)} chars)"
