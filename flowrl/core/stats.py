"""Merging per-micro-batch loss statistics into one record per optimizer step."""
from __future__ import annotations

from typing import Dict, Iterable, Mapping, Tuple


def merge_stats(parts: Iterable[Tuple[Mapping[str, float], float]]) -> Dict[str, float]:
    """Combine ``(stats, weight)`` pairs: ``*_min`` keys take the minimum, ``*_max`` the maximum,
    ``num_*`` counts and ``loss`` add up, every other key is the weight-averaged mean (weight =
    the number of actions the stats were taken over)."""
    acc: Dict[str, float] = {}
    total_w = 0.0
    for stats, w in parts:
        w = float(w)
        for k, v in stats.items():
            v = float(v)
            if k.endswith("_min"):
                acc[k] = min(acc.get(k, v), v)
            elif k.endswith("_max"):
                acc[k] = max(acc.get(k, v), v)
            elif k.startswith("num_") or k == "loss":
                acc[k] = acc.get(k, 0.0) + v
            else:
                acc[k] = acc.get(k, 0.0) + v * w
        total_w += w
    for k in list(acc):
        if not (k.endswith("_min") or k.endswith("_max") or k.startswith("num_") or k == "loss"):
            acc[k] = acc[k] / total_w if total_w > 0 else 0.0
    return acc
