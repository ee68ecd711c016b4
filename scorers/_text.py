"""Bounded text for log and error messages (no imports from flowrl or torch; flowrl imports it too).

A prompt (or a scorer's error text) may be megabytes long; a message quotes at most its first
``n`` characters and says how long the whole was, so one bad prompt cannot flood stderr.
"""
from __future__ import annotations

import logging
from typing import Any

__all__ = ["bound_log_messages", "short"]


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


def bound_log_messages(limit: int = 2000) -> None:
    """Cut every log record's message to ``limit`` characters (with :func:`short`), in this process
    and for every logger, libraries' included: diffusers' notice of a truncated CLIP prompt quotes
    the whole cut-off text, megabytes for a megabyte prompt. Installs a record factory once;
    later calls only change the limit."""
    global _LOG_LIMIT
    _LOG_LIMIT = int(limit)
    if _LOG_LIMIT_INSTALLED:
        return
    base = logging.getLogRecordFactory()

    def factory(*args, **kwargs):
        record = base(*args, **kwargs)
        msg = record.getMessage()
        if len(msg) > _LOG_LIMIT:
            record.msg, record.args = short(msg, _LOG_LIMIT), None
        return record

    logging.setLogRecordFactory(factory)
    globals()["_LOG_LIMIT_INSTALLED"] = True


_LOG_LIMIT = 2000
_LOG_LIMIT_INSTALLED = False
