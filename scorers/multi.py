"""Weighted multi-reward: several scorers, every component kept, bad samples masked, never averaged.

From a config such as ``rewards: {pickscore: 1.0, hpsv21: 0.5}``::

    multi = MultiReward({"pickscore": 1.0, "hpsv21": 0.5}, device="cuda", options={"pickscore": {...}})
    out = multi(images, prompts)          # -> Rewards
    out.components["pickscore"]           # [N] float32, the raw scores
    out.total                             # [N] Σ_k w_k · r_k, NaN where out.valid is False
    out.valid                             # [N] bool: every weighted component finite
    out.issues                            # [RewardIssue(scorer, kind, count, message), ...]

A scorer that returns NaN/inf for some samples, raises, or returns the wrong shape is reported by
name with the number of samples affected; those samples are invalid (``total`` NaN). Components with
weight 0 are computed and reported but do not invalidate samples; ``on_error="raise"`` makes a
raising scorer abort. This is Flow-GRPO's ``multi_score`` (arXiv 2505.05470) with explicit
invalid-sample handling.
"""
from __future__ import annotations

import logging
import math
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch

from scorers._text import short
from scorers.registry import get as get_scorer

logger = logging.getLogger(__name__)

ON_ERROR = ("mask", "raise")
MESSAGE_CHARS = 500  # a scorer's error text is cut to this many characters in issues and logs


@dataclass(frozen=True)
class RewardIssue:
    """One problem of one scorer on one batch: ``kind`` is ``"nan"``, ``"inf"``, ``"error"`` or
    ``"shape"``; ``count`` samples are affected."""

    scorer: str
    kind: str
    count: int
    message: str = ""

    def __str__(self) -> str:
        extra = f": {self.message}" if self.message else ""
        return f"{self.scorer}: {self.kind} in {self.count} sample(s){extra}"


@dataclass
class Rewards:
    """Scores of one batch. ``components``: name → [N] float32; ``total``: [N] weighted sum (NaN where
    invalid); ``valid``: [N] bool; ``weights``: name → weight; ``issues``: what went wrong, by scorer."""

    components: Dict[str, torch.Tensor]
    total: torch.Tensor
    valid: torch.Tensor
    weights: Dict[str, float]
    issues: List[RewardIssue] = field(default_factory=list)

    @property
    def n_invalid(self) -> int:
        return int((~self.valid).sum())

    def summary(self) -> Dict[str, float]:
        """Means for logging: ``total`` over valid samples, each component over its finite values,
        plus ``invalid`` (count). NaN where nothing is left to average."""
        def _mean(x: torch.Tensor) -> float:
            x = x.detach().float()
            return float(x.mean()) if x.numel() else math.nan

        out = {"total": _mean(self.total[self.valid]), "invalid": float(self.n_invalid)}
        for name, comp in self.components.items():
            out[name] = _mean(comp[torch.isfinite(comp)])
        return out


def combine(
    components: Mapping[str, torch.Tensor], weights: Mapping[str, float]
) -> Tuple[torch.Tensor, torch.Tensor, List[RewardIssue]]:
    """total_i = Σ_k w_k · r_{k,i} over the weighted components, valid_i = all r_{k,i} with w_k ≠ 0
    finite; total_i = NaN where not valid. Returns (total [N], valid [N] bool, issues for NaN/inf).

    The weighted sum of rewards is Flow-GRPO's ``multi_score`` (arXiv 2505.05470); the masking is ours.
    """
    if not components:
        raise ValueError("components must hold at least one scorer's scores")
    missing = set(components) - set(weights)
    if missing:
        raise ValueError(f"weights has no entry for components {sorted(missing)}")
    sizes = {name: tuple(v.shape) for name, v in components.items()}
    if len({s for s in sizes.values()}) != 1 or len(next(iter(sizes.values()))) != 1:
        raise ValueError(f"components must all be 1-D of one length, got shapes {sizes}")
    n = next(iter(components.values())).shape[0]
    first = next(iter(components.values()))
    valid = torch.ones(n, dtype=torch.bool, device=first.device)
    total = torch.zeros(n, dtype=torch.float32, device=first.device)
    issues: List[RewardIssue] = []
    for name, r in components.items():
        r = r.to(device=first.device, dtype=torch.float32)
        nan, inf = torch.isnan(r), torch.isinf(r)
        if nan.any():
            issues.append(RewardIssue(name, "nan", int(nan.sum())))
        if inf.any():
            issues.append(RewardIssue(name, "inf", int(inf.sum())))
        w = float(weights[name])
        if w == 0.0:
            continue
        ok = ~(nan | inf)
        valid = valid & ok
        total = total + w * torch.where(ok, r, torch.zeros_like(r))
    total = torch.where(valid, total, torch.full_like(total, float("nan")))
    return total, valid, issues


def _check_weights(weights: Mapping[str, float]) -> Dict[str, float]:
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError(f"weights must be a non-empty {{name: weight}} dict, got {weights!r}")
    out = {}
    for name, w in weights.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"weights: scorer names must be non-empty strings, got {name!r}")
        try:
            wf = float(w)
        except (TypeError, ValueError):
            raise ValueError(f"weights[{name!r}] must be a number, got {w!r}") from None
        if not math.isfinite(wf):
            raise ValueError(f"weights[{name!r}] must be finite, got {w!r}")
        out[name] = wf
    return out


class MultiReward:
    """Build the scorers named in ``weights`` and combine their scores (module docstring).

    Args:
        weights: scorer name (registered or dotted path) → weight.
        device, dtype: passed to every scorer factory unless ``options[name]`` overrides them.
        options: scorer name → extra factory keyword arguments (``checkpoint=``, ``batch_size=``, …).
        scorers: prebuilt callables by name (used instead of building that name).
        on_error: ``"mask"`` (report and mark the batch's samples invalid) or ``"raise"``.
        score_frames, every_k: for a video batch ``[N, 3, F, H, W]``, the frames an image scorer
            scores (its score is their mean; :func:`scorers.video.score_video_frames`); scorers that
            set ``video_input = True`` (``temporal_consistency``) get the video itself.
    """

    def __init__(
        self,
        weights: Mapping[str, float],
        *,
        device="cpu",
        dtype: torch.dtype = torch.float32,
        options: Optional[Mapping[str, Mapping[str, Any]]] = None,
        scorers: Optional[Mapping[str, Callable]] = None,
        on_error: str = "mask",
        score_frames: str = "all",
        every_k: int = 4,
    ):
        from scorers.video import frame_indices

        self.weights = _check_weights(weights)
        frame_indices(1, score_frames, every_k)  # a bad setting fails here, not at the first video
        self.score_frames, self.every_k = score_frames, every_k
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        options = dict(options or {})
        unknown = set(options) - set(self.weights)
        if unknown:
            raise ValueError(f"options given for scorers not in weights: {sorted(unknown)}")
        prebuilt = dict(scorers or {})
        unknown = set(prebuilt) - set(self.weights)
        if unknown:
            raise ValueError(f"scorers given that are not in weights: {sorted(unknown)}")
        self.on_error = on_error
        self.scorers: Dict[str, Callable] = {}
        for name in self.weights:
            if name in prebuilt:
                self.scorers[name] = prebuilt[name]
            else:
                kw = {"device": device, "dtype": dtype, **dict(options.get(name, {}))}
                self.scorers[name] = get_scorer(name, **kw)

    def _call_scorer(self, fn: Callable, images, prompts, metadata):
        """``fn``'s scores; a video goes to an image scorer frame by frame (mean over ``score_frames``)."""
        from scorers.video import is_video, score_video_frames

        if is_video(images) and not getattr(fn, "video_input", False):
            return score_video_frames(fn, images, prompts, score_frames=self.score_frames, every_k=self.every_k,
                                      **metadata)
        return fn(images, prompts, **metadata)

    def _run_one(self, name: str, fn: Callable, images, prompts, n: int, metadata) -> Tuple[torch.Tensor, Optional[RewardIssue]]:
        try:
            out = self._call_scorer(fn, images, prompts, metadata)
        except Exception as e:  # a reward model failing must not kill a long run unless asked to
            # the error text may quote a (megabytes long) prompt: cut it, here and in the traceback
            msg = short(f"{type(e).__name__}: {e}", MESSAGE_CHARS)
            if self.on_error == "raise":
                raise RuntimeError(f"scorer {name!r} failed: {msg}") from e
            frames = "".join(traceback.format_tb(e.__traceback__))
            logger.error("scorer %r raised on a batch of %d\nTraceback (most recent call last):\n%s%s", name, n, frames, msg)
            return torch.full((n,), float("nan")), RewardIssue(name, "error", n, msg)
        if not isinstance(out, torch.Tensor):
            try:
                out = torch.as_tensor(out, dtype=torch.float32)
            except Exception:
                out = None
        if out is None or out.numel() != n:
            shape = None if out is None else tuple(out.shape)
            msg = f"returned shape {shape} for {n} samples"
            if self.on_error == "raise":
                raise RuntimeError(f"scorer {name!r} {msg}")
            return torch.full((n,), float("nan")), RewardIssue(name, "shape", n, msg)
        return out.reshape(-1).float(), None

    def __call__(self, images, prompts, **metadata) -> Rewards:
        prompts = list(prompts)
        n = len(prompts)
        components: Dict[str, torch.Tensor] = {}
        hard_issues: List[RewardIssue] = []
        for name, fn in self.scorers.items():
            comp, issue = self._run_one(name, fn, images, prompts, n, metadata)
            components[name] = comp
            if issue is not None:
                hard_issues.append(issue)
        device = next(iter(components.values())).device
        components = {k: v.to(device) for k, v in components.items()}
        total, valid, issues = combine(components, self.weights)
        # an "error"/"shape" issue already explains its NaNs: do not report them twice
        failed = {i.scorer for i in hard_issues}
        issues = hard_issues + [i for i in issues if i.scorer not in failed]
        for issue in issues:
            if issue.kind == "error":  # already logged with its traceback
                continue
            if self.weights[issue.scorer] == 0.0:
                logger.warning("reward %s (weight 0: monitored only, samples stay valid)", issue)
            else:
                logger.warning("reward %s; those samples are marked invalid", issue)
        return Rewards(components, total, valid, dict(self.weights), issues)

    def __repr__(self) -> str:
        return f"MultiReward({self.weights}, on_error={self.on_error!r})"
