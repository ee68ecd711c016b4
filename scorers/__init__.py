"""Reward scorers for flowrl behind one registry (never imports flowrl.flow or flowrl.train)."""
from scorers.registry import UnknownScorerError, available, get, get_factory, register

__all__ = ["available", "get", "get_factory", "register", "UnknownScorerError"]
