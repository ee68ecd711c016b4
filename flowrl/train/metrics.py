"""What one training step logs (``metrics.jsonl``, the accelerate tracker, the progress bar).

Every step logs :data:`STEP_KEYS`, plus ``reward/<name>`` and ``reward/<name>_std`` per reward,
``ratio_first_min`` / ``ratio_first_max`` (the first minibatch's ratio range: exactly 1 on-policy)
when the loss reports ratios, and ``eval/<name>`` at evaluation steps; ``teacher_beta`` with a teacher
(KDRL), ``reward_weight/<name>`` and ``reward_influence/<name>`` with dynamic reward weights. Means
skip NaN; rewards are taken over all processes.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

STEP_KEYS = (
    "step", "reward/total", "reward/total_std", "invalid_samples", "zero_std_frac", "filtered_samples",
    "downsampled_samples",  # D3S: samples left out by advantage.sample_keep
    "clip_frac", "clip_frac_low", "clip_frac_high", "approx_kl", "kl", "ratio_mean", "policy_loss", "loss",
    "ratio_min", "ratio_max", "grad_norm", "update_ratio", "skipped_optimizer_steps", "beta", "lr", "nfe",
    "time/sampling", "time/scoring", "time/scoring_total", "time/update", "time/step",
)
LOSS_MEANS = ("clip_frac", "clip_frac_low", "clip_frac_high", "approx_kl", "kl", "ratio_mean", "policy_loss", "loss")
#: logged only by the objectives that compute them: the forward-process ones (:mod:`flowrl.flow.forward`),
#: KDRL's teacher KL and DisCO's groups with both positives and negatives (:mod:`flowrl.text.learner`)
OBJECTIVE_MEANS = ("old_kl", "dpo_accuracy", "teacher_kl", "disco_valid_groups")


def mean(xs: Sequence[Optional[float]]) -> float:
    """Mean of the finite values (NaN when there is none)."""
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def _std(x: torch.Tensor) -> float:
    ok = torch.isfinite(x)
    return float(x[ok].std()) if ok.sum() > 1 else 0.0


def reward_metrics(rewards: torch.Tensor, names: Sequence[str], weights: Sequence[float],
                   gather: Callable[[torch.Tensor], torch.Tensor]) -> Tuple[Dict[str, Any], int]:
    """``({"reward/total", "reward/total_std", "reward/<name>", "reward/<name>_std",
    "invalid_samples"}, rows over all processes)`` of this process's rewards ``[N, R]`` (or
    ``[N, K, R]``: the first granularity), weighted by ``weights``; ``gather`` collects rows from
    every process."""
    flat = rewards if rewards.ndim == 2 else rewards[:, 0]
    total = (flat * torch.tensor(list(weights))).sum(1)
    g_total = gather(total)
    out: Dict[str, Any] = {"reward/total": float(torch.nanmean(g_total)), "reward/total_std": _std(g_total)}
    for i, n in enumerate(names):
        col = gather(flat[:, i].contiguous())
        out[f"reward/{n}"] = float(torch.nanmean(col))
        out[f"reward/{n}_std"] = _std(col)
    out["invalid_samples"] = int(gather((~torch.isfinite(total)).long()).sum())
    return out, int(g_total.numel())


def update_metrics(loss_stats: List[Dict[str, float]], grad_norms: List[float], update_ratios: List[float],
                   skipped: int) -> Dict[str, Any]:
    """The inner updates' statistics: loss means over minibatches, the ratio range (and the first
    minibatch's), mean gradient norm, the largest weight-update ratio, skipped optimizer steps."""
    out: Dict[str, Any] = {k: mean([s.get(k) for s in loss_stats]) for k in LOSS_MEANS}
    out.update({k: mean([s.get(k) for s in loss_stats]) for k in OBJECTIVE_MEANS if any(k in s for s in loss_stats)})
    out["ratio_min"] = min([s["ratio_min"] for s in loss_stats if "ratio_min" in s], default=float("nan"))
    out["ratio_max"] = max([s["ratio_max"] for s in loss_stats if "ratio_max" in s], default=float("nan"))
    if loss_stats and "ratio_min" in loss_stats[0]:
        out["ratio_first_min"] = loss_stats[0]["ratio_min"]  # on-policy first pass: exactly 1
        out["ratio_first_max"] = loss_stats[0]["ratio_max"]
    out["grad_norm"] = mean(grad_norms)
    out["update_ratio"] = max(update_ratios, default=float("nan"))
    out["skipped_optimizer_steps"] = skipped
    return out
