"""Reward scorers for flowrl behind one registry (never imports flowrl.flow or flowrl.train).

``scorers.get(name, device=..., dtype=..., checkpoint=..., **options)`` builds a scorer;
``scorers.available()`` lists the registered names; ``MultiReward`` combines several with weights
and marks samples whose score is NaN/inf (or whose scorer failed) invalid.
"""
from scorers.multi import MultiReward, RewardIssue, Rewards, combine
from scorers.registry import UnknownScorerError, available, get, get_factory, register

__all__ = ["available", "get", "get_factory", "register", "UnknownScorerError", "MultiReward", "Rewards",
           "RewardIssue", "combine"]
