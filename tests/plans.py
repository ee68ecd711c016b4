"""``plan_config(kind="window", window=dict(size=3))``: a PlanConfig whose sections (subset, window,
tail, singular, tree) are given as dicts of their fields, for tests that build many plans."""

from __future__ import annotations

from flowrl.flow.plan import PlanConfig, SingularConfig, SubsetConfig, TailConfig, TreeConfig, WindowConfig

_SECTIONS = {"subset": SubsetConfig, "window": WindowConfig, "tail": TailConfig, "singular": SingularConfig,
             "tree": TreeConfig}


def plan_config(**kw) -> PlanConfig:
    """PlanConfig(**kw) with each section's dict turned into its dataclass (not validated)."""
    return PlanConfig(**{k: _SECTIONS[k](**v) if k in _SECTIONS and isinstance(v, dict) else v
                         for k, v in kw.items()})
