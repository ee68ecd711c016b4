"""Group-relative advantages and their 2025 variants (torch only).

Shared by the image path (one reward per image, a group = the images of one prompt) and the text
path (one reward per completion). Rewards are ``[N]`` or ``[N, R]``, ``group_ids [N]`` integer ids;
the result is ``[N]`` per trajectory (trees: ``[N, T]`` per transition,
:func:`tree_transition_advantages`). The GRPO advantage (Shao et al., arXiv 2402.03300) is

    A_i = (r_i - mean_g(r)) / (std_g(r) + eps)

with the Bessel-corrected std by default (``std_unbiased=False``: Flow-GRPO's population std). A
non-finite reward marks an invalid sample: excluded from every statistic, advantage exactly 0,
``keep=False``. Statistics run in float64. Where each default comes from: docs/methods.md
("Group-relative advantages").
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import torch
from torch import Tensor

from flowrl.core.checks import check_number
from flowrl.core.losses import KEEP_SCOPES, check_keep_schedule, linear_ramp

logger = logging.getLogger(__name__)

__all__ = [
    "AdvantageConfig",
    "DynamicRewardWeights",
    "GroupStats",
    "PerPromptStatTracker",
    "SmoothStatTracker",
    "advantage_preset",
    "compute_advantages",
    "dcpo_merge_stats",
    "dcpo_smooth_advantages",
    "gradient_influence",
    "group_stats",
    "max_variance_subset",
    "mixed_var_advantages",
    "multi_granularity_advantages",
    "reward_weight_update",
    "tree_node_advantages",
    "tree_node_values",
    "tree_transition_advantages",
    "variance_downsample",
    "unlikeliness_ranks",
    "unlikeliness_rewards",
    "unlikely_advantages",
]

_CENTERS = ("group", "batch", "none")
_SCALES = ("group", "batch", "none")
_MULTI = ("sum_then_normalize", "normalize_then_sum")
_POST = ("none", "batch")
_NAN_POLICIES = ("any", "all")
_RISKS = ("none", "mvar")
_CREDITS = ("uniform", "std")


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------


@dataclass
class AdvantageConfig:
    """How rewards become advantages. Every field has a default; ``validate()`` checks them."""

    center: str = "group"  # baseline subtracted: "group" mean (GRPO), "batch" mean (global norm), "none"
    scale: str = "group"  # "group" std, "batch" std (TRL scale_rewards=batch, Flow-GRPO global_std), "none" (Dr. GRPO)
    eps: float = 1e-4  # added to the std: A = (r - mu)/(sigma + eps); TRL/Flow-GRPO 1e-4, verl/NGRPO 1e-6
    std_unbiased: bool = True  # Bessel-corrected std (TRL, verl, DanceGRPO); False = population std (Flow-GRPO np.std)
    multi_reward: str = "sum_then_normalize"  # [N, R]: sum then normalise, or "normalize_then_sum" (MixGRPO, GDPO)
    reward_weights: tuple[float, ...] | None = None  # one weight per reward column; None = all 1.0
    normalize_weights: bool = False  # divide reward_weights by their sum before mixing (MixGRPO)
    post_norm: str = "none"  # after normalize_then_sum: "batch" z-scores the summed advantages (TRL/GDPO)
    nan_policy: str = "any"  # "any": one NaN/inf reward invalidates a sample; "all": only if all are NaN/inf (TRL)
    ngrpo_max_reward: float | None = None  # NGRPO (2509.18851): virtual samples with this reward join each group
    ngrpo_num_virtual: int = 1  # how many virtual maximum-reward samples NGRPO adds per group
    filter_zero_std: bool = False  # DAPO dynamic sampling (2503.14476): keep=False for groups with zero reward variance
    zero_std_tol: float = 0.0  # a group is zero-variance when max(r) - min(r) <= this tolerance
    clip: float | None = None  # clamp advantages to [-clip, clip] (Flow-GRPO/DanceGRPO adv_clip_max = 5)
    stat_tracking: bool = False  # Flow-GRPO/DDPO: baseline from each prompt's reward history across steps (PerPromptStatTracker)
    stat_buffer_size: int | None = 32  # rewards kept per prompt by the tracker (None: unbounded)
    stat_min_count: int = 0  # prompts with fewer tracked rewards use batch statistics (DDPO 16)
    # DCPO, RiskPO, D3S (issue 20)
    smooth_tracking: bool = False  # DCPO (2509.02333) smooth standardisation: mixes the step's and each prompt's cumulative z-scores
    risk: str = "none"  # "mvar": RiskPO (2510.00911) mixed value-at-risk advantage over bundles of groups; "none": off
    risk_alpha: float = 0.2  # RiskPO: lower quantile level alpha (the CVaR tail and the RVaR range start)
    risk_beta: float = 0.9  # RiskPO: upper quantile level beta (the RVaR range end)
    risk_mix: float = 1.5  # RiskPO: weight w of the CVaR term, A = (w CVaR + RVaR) / (w + 1); 0: RVaR only
    risk_bundle: int = 5  # RiskPO: groups (prompts) per bundle; a bundle's k-th "paper" sums the k-th completion of each
    risk_credit: str = "std"  # RiskPO: a paper's advantage to its completions: "uniform", or "std" (divided by the group's std)
    sample_keep: float | None = None  # D3S (2509.22115): fraction of samples kept to maximise Var(A) at step 0; None: all
    sample_keep_end: float | None = None  # D3S: the fraction reached after sample_keep_steps training steps (linear); None: constant
    sample_keep_steps: int = 0  # D3S: length of that ramp in training steps
    sample_keep_scope: str = "batch"  # D3S: select over the step's batch ("batch") or within each group ("group", D3S-I)
    # -- 2025 variants (text: the rollout's sequence likelihoods; any path: per-reward gradients) --
    unlikely_penalty: float = 0.0  # Rewarding the unlikely (2506.02355): r <- r (1 - penalty * rank / G), rank by likelihood; 0: off
    dynamic_weights: bool = False  # dynamic reward weighting (2509.11452): reward weights follow each reward's gradient influence
    dynamic_weights_reg: float = 1e-5  # its regularisation: w <- softmax(log w + lr * influence / reg) (upstream regularization_factor)
    dynamic_weights_every: int = 1  # steps whose influences are averaged per weight update (upstream weight_accumulation_steps)

    def validate(self) -> "AdvantageConfig":
        """Raise ``ValueError("<field>: <reason>")`` on the first invalid field; return self."""
        if self.center not in _CENTERS:
            raise ValueError(f"center: must be one of {_CENTERS}, got {self.center!r}")
        if self.scale not in _SCALES:
            raise ValueError(f"scale: must be one of {_SCALES}, got {self.scale!r}")
        if not (isinstance(self.eps, (int, float)) and self.eps >= 0 and math.isfinite(self.eps)):
            raise ValueError(f"eps: must be a finite number >= 0, got {self.eps!r}")
        if self.multi_reward not in _MULTI:
            raise ValueError(f"multi_reward: must be one of {_MULTI}, got {self.multi_reward!r}")
        if self.reward_weights is not None:
            if len(self.reward_weights) == 0:
                raise ValueError("reward_weights: must be None or a non-empty sequence")
            if not all(isinstance(w, (int, float)) and math.isfinite(w) for w in self.reward_weights):
                raise ValueError(f"reward_weights: must be finite numbers, got {self.reward_weights!r}")
            if self.normalize_weights and not sum(self.reward_weights) > 0:
                raise ValueError(f"normalize_weights: the reward weights must have a positive sum, got {self.reward_weights!r}")
        if self.post_norm not in _POST:
            raise ValueError(f"post_norm: must be one of {_POST}, got {self.post_norm!r}")
        if self.post_norm != "none" and self.multi_reward != "normalize_then_sum":
            raise ValueError("post_norm: only applies with multi_reward='normalize_then_sum'")
        if self.nan_policy not in _NAN_POLICIES:
            raise ValueError(f"nan_policy: must be one of {_NAN_POLICIES}, got {self.nan_policy!r}")
        if self.ngrpo_max_reward is not None:
            if not math.isfinite(self.ngrpo_max_reward):
                raise ValueError("ngrpo_max_reward: must be finite")
            if self.center != "group":
                raise ValueError("ngrpo_max_reward: NGRPO calibrates the group baseline, requires center='group'")
        if not (isinstance(self.ngrpo_num_virtual, int) and self.ngrpo_num_virtual >= 1):
            raise ValueError(f"ngrpo_num_virtual: must be an int >= 1, got {self.ngrpo_num_virtual!r}")
        check_number("zero_std_tol", self.zero_std_tol, ge=0)
        check_number("clip", self.clip, gt=0, none_ok=True, why="null: no clipping")
        self._validate_variants()
        return self

    def _validate_variants(self) -> None:
        """The DCPO / RiskPO / D3S fields (their ``ValueError("<field>: ...")``)."""
        if self.risk not in _RISKS:
            raise ValueError(f"risk: must be one of {_RISKS}, got {self.risk!r}")
        if self.smooth_tracking or self.risk != "none":
            what = "smooth_tracking" if self.smooth_tracking else "risk"
            if self.smooth_tracking and self.risk != "none":
                raise ValueError("smooth_tracking: DCPO's standardisation and risk (RiskPO) are two different advantages; choose one")
            if self.stat_tracking or self.ngrpo_max_reward is not None:
                raise ValueError(f"{what}: cannot be combined with stat_tracking or ngrpo_max_reward (each replaces the baseline)")
            if self.center != "group" or self.scale == "batch" or (self.smooth_tracking and self.scale != "group"):
                raise ValueError(f"{what}: has its own group statistics; needs center 'group' and scale 'group'"
                                 + (" or 'none'" if not self.smooth_tracking else ""))
        for name in ("risk_alpha", "risk_beta"):
            check_number(name, getattr(self, name), gt=0, lt=1)
        if not self.risk_alpha < self.risk_beta:
            raise ValueError(f"risk_alpha: must be below risk_beta ({self.risk_beta}), got {self.risk_alpha}")
        check_number("risk_mix", self.risk_mix, ge=0)
        if not (isinstance(self.risk_bundle, int) and self.risk_bundle >= 1):
            raise ValueError(f"risk_bundle: must be an int >= 1, got {self.risk_bundle!r}")
        if self.risk_credit not in _CREDITS:
            raise ValueError(f"risk_credit: must be one of {_CREDITS}, got {self.risk_credit!r}")
        check_keep_schedule("sample_keep", self.sample_keep, self.sample_keep_end, self.sample_keep_steps,
                            self.sample_keep_scope)
        # unlikeliness reward, dynamic reward weights
        check_number("unlikely_penalty", self.unlikely_penalty, ge=0, le=1,
                     why="a reward keeps at least 1 - penalty of its value")
        if not isinstance(self.dynamic_weights, bool):
            raise ValueError(f"dynamic_weights: must be true or false, got {self.dynamic_weights!r}")
        check_number("dynamic_weights_reg", self.dynamic_weights_reg, gt=0)
        if not (isinstance(self.dynamic_weights_every, int) and self.dynamic_weights_every >= 1):
            raise ValueError(f"dynamic_weights_every: must be an int >= 1, got {self.dynamic_weights_every!r}")


def advantage_preset(name: str, **overrides: Any) -> AdvantageConfig:
    """Named advantage recipes as their libraries / papers define them.

    * ``trl`` / ``grpo``: group mean, group Bessel std, eps 1e-4 (TRL ``scale_rewards='group'``).
    * ``trl_batch``: group mean, batch std (TRL ``scale_rewards='batch'``, PPO-Lite 2508.08221).
    * ``dr_grpo``: group mean, no std (Dr. GRPO, 2503.20783; TRL ``scale_rewards='none'``).
    * ``gdpo``: per-reward group z-score, weighted sum, batch z-score (GDPO 2601.05242; TRL
      ``multi_objective_aggregation='normalize_then_sum'``).
    * ``mixgrpo``: per-reward group z-score (Bessel std, eps 1e-8) then the sum weighted by the reward
      weights divided by their sum, clipped at 5 (MixGRPO ``advantage_aggr``, 2507.21802; the
      authors' code it was checked against: docs/methods.md, "Upstream references").
    * ``flow_grpo``: per-prompt mean, population std, eps 1e-4, clip 5 (Flow-GRPO 2505.05470;
      its SD3 configs set ``global_std=True`` -> pass ``scale='batch'``).
    * ``dance_grpo``: group mean, Bessel std, eps 1e-8, clip 5 (DanceGRPO 2505.07818).
    * ``verl``: group mean, Bessel std, eps 1e-6 (verl ``compute_grpo_outcome_advantage``).
    * ``ngrpo``: one virtual sample with reward 1.0 in every group, eps 1e-6 (NGRPO 2509.18851).
    * ``dapo``: GRPO advantages with zero-variance groups filtered (DAPO 2503.14476).
    """
    presets: dict[str, dict[str, Any]] = {
        "trl": {},
        "grpo": {},
        "trl_batch": {"scale": "batch"},
        "dr_grpo": {"scale": "none"},
        "gdpo": {"multi_reward": "normalize_then_sum", "post_norm": "batch", "nan_policy": "all"},
        "mixgrpo": {"multi_reward": "normalize_then_sum", "normalize_weights": True, "eps": 1e-8, "clip": 5.0},
        "flow_grpo": {"std_unbiased": False, "clip": 5.0},
        "dance_grpo": {"eps": 1e-8, "clip": 5.0},
        "verl": {"eps": 1e-6},
        "ngrpo": {"eps": 1e-6, "ngrpo_max_reward": 1.0, "ngrpo_num_virtual": 1},
        "dapo": {"filter_zero_std": True},
    }
    if name not in presets:
        raise ValueError(f"name: unknown advantage preset {name!r}; choose from {sorted(presets)}")
    known = {f.name for f in fields(AdvantageConfig)}
    for key in overrides:
        if key not in known:
            raise ValueError(f"{key}: not a field of AdvantageConfig")
    return AdvantageConfig(**{**presets[name], **overrides}).validate()


# --------------------------------------------------------------------------------------------
# per-prompt statistics with history (Flow-GRPO / DDPO)
# --------------------------------------------------------------------------------------------


class PerPromptStatTracker:
    """Per-prompt reward history for the baseline (DDPO 2305.13301; Flow-GRPO 2505.05470).

    ``update(keys, rewards)`` appends each reward to its prompt's history (keeping at most
    ``buffer_size`` most recent values, ``None`` = unbounded) and returns, for every sample,
    the mean and std of its prompt's history *including the current rewards*. Flow-GRPO calls
    ``clear()`` once per epoch; without ``clear()`` the baseline keeps a history across steps.
    If a prompt has fewer than ``min_count`` rewards in its history, the caller falls back to
    batch statistics (DDPO's rule); ``count`` is returned for that purpose.

    State is plain Python (lists of floats) so ``state_dict()`` / ``load_state_dict()``
    round-trip exactly for resume. Keys must be ``str`` or ``int`` to be serialised.
    """

    def __init__(self, buffer_size: int | None = None, min_count: int = 0) -> None:
        if buffer_size is not None and (not isinstance(buffer_size, int) or buffer_size < 1):
            raise ValueError(f"buffer_size: must be None or an int >= 1, got {buffer_size!r}")
        if not isinstance(min_count, int) or min_count < 0:
            raise ValueError(f"min_count: must be an int >= 0, got {min_count!r}")
        self.buffer_size = buffer_size
        self.min_count = min_count
        self._history: dict[Hashable, deque[float]] = {}

    def __len__(self) -> int:
        """Number of distinct prompts with a history."""
        return len(self._history)

    def history(self, key: Hashable) -> list[float]:
        """The stored rewards of one prompt (oldest first); empty list if unseen."""
        return list(self._history.get(key, ()))

    def clear(self) -> None:
        """Forget every history (Flow-GRPO calls this at the start of each epoch)."""
        self._history.clear()

    def update(
        self, keys: Sequence[Hashable], rewards: Tensor, unbiased: bool = True
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Append rewards and return per-sample ``(mean, std, count)`` of each prompt's history.

        mean = (1/n) sum_h r_h; std = sqrt(sum_h (r_h - mean)^2 / (n - 1 if unbiased else n)),
        0 when n < 2 (unbiased) or n < 1. All float64, shape [N].
        """
        rewards = torch.as_tensor(rewards)
        if rewards.ndim != 1 or len(keys) != rewards.shape[0]:
            raise ValueError(
                f"keys: need one key per reward, got {len(keys)} keys for rewards of shape {tuple(rewards.shape)}"
            )
        vals = rewards.detach().to("cpu", torch.float64).tolist()
        if not all(math.isfinite(v) for v in vals):
            raise ValueError("rewards: non-finite (NaN/inf) rewards must be filtered out before PerPromptStatTracker.update")
        for key, value in zip(keys, vals):
            if key not in self._history:
                self._history[key] = deque(maxlen=self.buffer_size)
            self._history[key].append(value)
        cache: dict[Hashable, tuple[float, float, float]] = {}
        for key in keys:
            if key in cache:
                continue
            hist = torch.tensor(list(self._history[key]), dtype=torch.float64)
            n = hist.numel()
            mean = hist.mean().item()
            ddof = 1 if unbiased else 0
            std = math.sqrt(((hist - mean) ** 2).sum().item() / (n - ddof)) if n - ddof > 0 else 0.0
            cache[key] = (mean, std, float(n))
        out = torch.tensor([cache[k] for k in keys], dtype=torch.float64).reshape(len(keys), 3)
        return out[:, 0], out[:, 1], out[:, 2]

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state: ``{"buffer_size", "min_count", "keys", "history"}``."""
        for key in self._history:
            if not isinstance(key, (str, int)):
                raise ValueError(f"keys: only str/int prompt keys can be serialised, got {type(key).__name__}")
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "keys": list(self._history.keys()),
            "history": [list(v) for v in self._history.values()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore exactly what :meth:`state_dict` returned."""
        for name in ("buffer_size", "min_count", "keys", "history"):
            if name not in state:
                raise ValueError(f"state: missing entry {name!r}")
        if len(state["keys"]) != len(state["history"]):
            raise ValueError("state: 'keys' and 'history' differ in length")
        self.__init__(buffer_size=state["buffer_size"], min_count=state["min_count"])
        for key, values in zip(state["keys"], state["history"]):
            self._history[key] = deque((float(v) for v in values), maxlen=self.buffer_size)


# --------------------------------------------------------------------------------------------
# group statistics
# --------------------------------------------------------------------------------------------


class GroupStats(NamedTuple):
    """Per-sample broadcast of per-group statistics (all float64 except the index)."""

    mean: Tensor  # [N] group mean of valid values (incl. NGRPO virtual samples)
    std: Tensor  # [N] group std (0 if fewer than 2 values)
    count: Tensor  # [N] number of valid values in the group (excl. virtual samples)
    zero_var: Tensor  # [N] bool: the group's valid values are all equal (or < 2 of them)
    index: Tensor  # [N] contiguous group index in [0, num_groups)
    num_groups: int


def _group_index(group_ids: Tensor, n: int) -> tuple[Tensor, int]:
    group_ids = torch.as_tensor(group_ids)
    if group_ids.ndim != 1 or group_ids.shape[0] != n:
        raise ValueError(f"group_ids: must have shape [{n}], got {tuple(group_ids.shape)}")
    if group_ids.is_floating_point() or group_ids.is_complex():
        raise ValueError("group_ids: must be an integer or bool tensor")
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num = int(inverse.max().item()) + 1 if n > 0 else 0
    return inverse, num


def group_stats(
    values: Tensor,
    group_ids: Tensor,
    valid: Tensor | None = None,
    *,
    unbiased: bool = True,
    virtual_value: float | None = None,
    num_virtual: int = 0,
    zero_std_tol: float = 0.0,
) -> GroupStats:
    """Mean and std of ``values`` within each group, vectorised with scatter-adds. Non-finite
    values (NaN, +-inf) are left out, as are those where ``valid`` is False.

    mu_g = (sum_{i in g, valid} v_i + K*v_max) / (n_g + K)
    sigma_g = sqrt( (sum (v_i - mu_g)^2 + K (v_max - mu_g)^2) / (n_g + K - ddof) ), ddof = 1 if unbiased.

    ``K = num_virtual`` virtual samples of value ``virtual_value`` implement NGRPO's advantage
    calibration (arXiv 2509.18851: mean/std over the group plus the maximum reward). Without
    virtual samples a group with n_g < 2 gets sigma = 0.
    """
    values = torch.as_tensor(values)
    n = values.shape[0]
    index, num_groups = _group_index(group_ids, n)
    v = values.detach().to(torch.float64)
    if valid is None:
        valid = torch.isfinite(v)
    valid = valid.to(torch.bool) & torch.isfinite(v)
    vz = torch.where(valid, v, torch.zeros_like(v))
    w = valid.to(torch.float64)
    dev = v.device
    cnt = torch.zeros(num_groups, dtype=torch.float64, device=dev).index_add_(0, index, w)
    tot = torch.zeros(num_groups, dtype=torch.float64, device=dev).index_add_(0, index, vz)
    k = float(num_virtual) if virtual_value is not None else 0.0
    if k > 0:
        tot = tot + k * float(virtual_value)
    n_all = cnt + k
    mean_g = tot / n_all.clamp(min=1.0)
    sq = torch.where(valid, (v - mean_g[index]) ** 2, torch.zeros_like(v))
    ss = torch.zeros(num_groups, dtype=torch.float64, device=dev).index_add_(0, index, sq)
    if k > 0:
        ss = ss + k * (float(virtual_value) - mean_g) ** 2
    denom = n_all - (1.0 if unbiased else 0.0)
    std_g = torch.where(denom > 0, ss / denom.clamp(min=1e-300), torch.zeros_like(ss)).sqrt()
    std_g = torch.where(n_all >= 2, std_g, torch.zeros_like(std_g))
    big = torch.finfo(torch.float64).max
    vmax = torch.full((num_groups,), -big, dtype=torch.float64, device=dev).scatter_reduce(
        0, index, torch.where(valid, v, torch.full_like(v, -big)), reduce="amax"
    )
    vmin = torch.full((num_groups,), big, dtype=torch.float64, device=dev).scatter_reduce(
        0, index, torch.where(valid, v, torch.full_like(v, big)), reduce="amin"
    )
    zero_var_g = (cnt < 2) | ((vmax - vmin) <= zero_std_tol)
    return GroupStats(mean_g[index], std_g[index], cnt[index], zero_var_g[index], index, num_groups)


def _batch_moments(v: Tensor, valid: Tensor, unbiased: bool) -> tuple[Tensor, Tensor]:
    """Mean and std over the valid entries of a float64 vector (std 0 if fewer than 2)."""
    x = v[valid]
    if x.numel() == 0:
        zero = torch.zeros((), dtype=torch.float64, device=v.device)
        return zero, zero
    mean = x.mean()
    ddof = 1 if unbiased else 0
    if x.numel() - ddof <= 0 or x.numel() < 2:
        return mean, torch.zeros((), dtype=torch.float64, device=v.device)
    return mean, (((x - mean) ** 2).sum() / (x.numel() - ddof)).sqrt()


def _tracked_stats(
    r: Tensor, valid: Tensor, tracker: PerPromptStatTracker, prompt_keys: Sequence[Hashable] | None, unbiased: bool
) -> tuple[Tensor, Tensor]:
    """Per-sample mean and std of each prompt's reward history (DDPO 2305.13301, Flow-GRPO 2505.05470).

    The valid rewards join their prompt's history first; a prompt with fewer than
    ``max(min_count, 1)`` tracked rewards uses the batch mean and std (DDPO's rule).
    """
    assert prompt_keys is not None
    idx = torch.nonzero(valid, as_tuple=False).flatten().tolist()
    t_mean = torch.zeros_like(r)
    t_std = torch.zeros_like(r)
    t_cnt = torch.zeros_like(r)
    if idx:
        m, s, c = tracker.update([prompt_keys[i] for i in idx], r[idx], unbiased=unbiased)
        sel = torch.tensor(idx, device=r.device)
        t_mean[sel], t_std[sel], t_cnt[sel] = m.to(r.device), s.to(r.device), c.to(r.device)
    b_mean, b_std = _batch_moments(r, valid, unbiased)
    enough = t_cnt >= max(tracker.min_count, 1)
    return torch.where(enough, t_mean, b_mean.expand_as(r)), torch.where(enough, t_std, b_std.expand_as(r))


def _normalize_column(
    r: Tensor,
    valid: Tensor,
    group_ids: Tensor,
    cfg: AdvantageConfig,
    tracker: PerPromptStatTracker | None,
    prompt_keys: Sequence[Hashable] | None,
) -> tuple[Tensor, GroupStats]:
    """One reward column -> advantages (float64), following cfg.center / cfg.scale.

    A = (r - baseline) / (sigma + eps)   (or r - baseline when scale='none');
    baseline = group mean, batch mean or 0; sigma = group std, batch std. The group statistics
    include NGRPO's virtual samples (arXiv 2509.18851) when ``cfg.ngrpo_max_reward`` is set; with
    a tracker they are the prompt's history statistics (:func:`_tracked_stats`).
    """
    virtual = cfg.ngrpo_max_reward
    gs = group_stats(
        r,
        group_ids,
        valid,
        unbiased=cfg.std_unbiased,
        virtual_value=virtual,
        num_virtual=cfg.ngrpo_num_virtual if virtual is not None else 0,
        zero_std_tol=cfg.zero_std_tol,
    )
    mean_g, std_g = gs.mean, gs.std
    if tracker is not None:
        mean_g, std_g = _tracked_stats(r, valid, tracker, prompt_keys, cfg.std_unbiased)
    if cfg.center == "group":
        base = mean_g
    elif cfg.center == "batch":
        base = _batch_moments(r, valid, cfg.std_unbiased)[0].expand_as(r)
    else:
        base = torch.zeros_like(r)
    adv = torch.where(valid, r - base, torch.zeros_like(r))
    if cfg.scale == "group":
        adv = adv / (std_g + cfg.eps)
    elif cfg.scale == "batch":
        adv = adv / (_batch_moments(r, valid, cfg.std_unbiased)[1] + cfg.eps)
    if cfg.center == "group" and tracker is None and virtual is None:
        # exact zeros for groups without signal (r - mean may otherwise be ~1e-16)
        adv = torch.where(gs.zero_var, torch.zeros_like(adv), adv)
    return adv, gs


def _reward_matrix(rewards: Tensor) -> tuple[Tensor, torch.dtype]:
    """``[N]``/``[N, R]`` rewards -> ``([N, R] float64 with NaN for every non-finite value, output dtype)``.

    +-inf is invalid exactly as NaN is; finite values pass through unchanged.
    """
    rewards = torch.as_tensor(rewards)
    if rewards.ndim not in (1, 2):
        raise ValueError(f"rewards: must have shape [N] or [N, R], got {tuple(rewards.shape)}")
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    r2 = rewards.detach().to(torch.float64)
    if r2.ndim == 1:
        r2 = r2.unsqueeze(1)
    r2 = torch.where(torch.isfinite(r2), r2, torch.full_like(r2, float("nan")))
    if r2.shape[1] == 0:
        raise ValueError("rewards: need at least one reward column")
    return r2, out_dtype


def _reward_weights(cfg: AdvantageConfig, num_r: int, device: torch.device) -> Tensor:
    """w_k, one per reward column (all 1 by default), divided by sum_k w_k with ``normalize_weights`` (MixGRPO)."""
    weights = cfg.reward_weights if cfg.reward_weights is not None else (1.0,) * num_r
    if len(weights) != num_r:
        raise ValueError(f"reward_weights: {len(weights)} weights for {num_r} reward columns")
    w = torch.tensor(weights, dtype=torch.float64, device=device)
    return w / w.sum() if cfg.normalize_weights else w


def _check_tracker(
    cfg: AdvantageConfig, tracker: PerPromptStatTracker | None, prompt_keys: Sequence[Hashable] | None,
    n: int, num_r: int,
) -> None:
    """A tracker needs one prompt key per sample, one normalised column and no NGRPO; DCPO's
    ``smooth_tracking`` needs a :class:`SmoothStatTracker`, and it and RiskPO need one column."""
    if (cfg.smooth_tracking or cfg.risk != "none") and cfg.multi_reward == "normalize_then_sum" and num_r > 1:
        raise ValueError("multi_reward: 'normalize_then_sum' with several rewards is not supported with "
                         "smooth_tracking or risk (they standardise the summed reward)")
    if cfg.smooth_tracking and not isinstance(tracker, SmoothStatTracker):
        raise ValueError("tracker: smooth_tracking (DCPO) needs a SmoothStatTracker, the prompts' state across steps")
    if tracker is None:
        return
    if isinstance(tracker, SmoothStatTracker) and not cfg.smooth_tracking:
        raise ValueError("tracker: a SmoothStatTracker is used only with smooth_tracking")
    if prompt_keys is None or len(prompt_keys) != n:
        raise ValueError("prompt_keys: a tracker needs one prompt key per sample")
    if cfg.multi_reward == "normalize_then_sum" and num_r > 1:
        raise ValueError("tracker: not supported with multi_reward='normalize_then_sum'")
    if cfg.ngrpo_max_reward is not None:
        raise ValueError("tracker: not supported together with ngrpo_max_reward")


def _weighted_total(r2: Tensor, col_nan: Tensor, w: Tensor, valid: Tensor) -> Tensor:
    """r_i = sum_k w_k r_ik over the finite columns; NaN for invalid samples."""
    total = torch.where(col_nan, torch.zeros_like(r2), r2 * w).sum(1)
    return torch.where(valid, total, torch.full_like(total, float("nan")))


def _normalize_then_sum(
    r2: Tensor, col_nan: Tensor, valid: Tensor, w: Tensor, group_ids: Tensor, cfg: AdvantageConfig
) -> tuple[Tensor, Tensor, GroupStats]:
    """A_i = sum_k w_k A_ik, each column normalised alone (MixGRPO 2507.21802, GDPO 2601.05242).

    ``post_norm='batch'`` then z-scores A over the valid samples (GDPO, TRL ``normalize_then_sum``).
    Returns ``(A, zero-variance in every column, the last column's GroupStats)``.
    """
    adv = torch.zeros(r2.shape[0], dtype=torch.float64, device=r2.device)
    zero_var = torch.ones(r2.shape[0], dtype=torch.bool, device=r2.device)
    for k in range(r2.shape[1]):
        col_valid = valid & ~col_nan[:, k]
        a_k, gs = _normalize_column(r2[:, k], col_valid, group_ids, cfg, None, None)
        adv = adv + torch.where(col_valid, w[k] * a_k, torch.zeros_like(a_k))
        zero_var = zero_var & gs.zero_var
    if cfg.post_norm == "batch":
        m, s = _batch_moments(adv, valid, cfg.std_unbiased)
        adv = (adv - m) / (s + cfg.eps)
    return adv, zero_var, gs


def _clip_advantages(adv: Tensor, clip: float | None) -> tuple[Tensor, Tensor]:
    """A <- clamp(A, -c, c) (Flow-GRPO/DanceGRPO ``adv_clip_max``); returns ``(A, |A| > c)``."""
    if clip is None:
        return adv, torch.zeros(adv.shape, dtype=torch.bool, device=adv.device)
    return adv.clamp(-clip, clip), adv.abs() > clip


def _advantage_stats(
    keep: Tensor, counts: dict[str, Tensor], logged: Tensor, valid: Tensor, group_ids: Tensor, gs: GroupStats,
    zero_var: Tensor, cfg: AdvantageConfig,
) -> dict[str, Any]:
    """``keep``, group and sample counts (``counts``: name -> bool mask) and the moments of the
    (weighted, summed) reward, as Python numbers."""
    num_groups = gs.num_groups
    zero_g = torch.zeros(num_groups, dtype=torch.bool, device=logged.device).index_put_(
        (gs.index,), zero_var, accumulate=False
    )
    rs = logged[valid]
    std_g = group_stats(logged, group_ids, valid, unbiased=cfg.std_unbiased)
    per_group_std = torch.zeros(num_groups, dtype=torch.float64, device=logged.device).index_put_(
        (std_g.index,), std_g.std
    )
    return {
        "keep": keep,
        "num_groups": num_groups,
        "zero_std_count": int(zero_g.sum().item()),
        "zero_std_frac": float(zero_g.float().mean().item()) if num_groups else 0.0,
        **{name: int(mask.sum().item()) for name, mask in counts.items()},
        "reward_mean": float(rs.mean().item()) if rs.numel() else float("nan"),
        "reward_std": float(rs.std(unbiased=cfg.std_unbiased).item()) if rs.numel() > 1 else 0.0,
        "reward_std_mean": float(per_group_std.mean().item()) if num_groups else 0.0,
    }


def compute_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    cfg: AdvantageConfig | None = None,
    tracker: PerPromptStatTracker | SmoothStatTracker | None = None,
    prompt_keys: Sequence[Hashable] | None = None,
    *,
    step: int = 0,
) -> tuple[Tensor, dict[str, Any]]:
    """Group-relative advantages (GRPO, arXiv 2402.03300) with the options of its descendants.

    Single reward:  A_i = (r_i - mu_g(i)) / (sigma_g(i) + eps)   (center/scale per ``cfg``).
    Multi-reward ``sum_then_normalize``:  r_i = sum_k w_k r_ik, then as above (TRL default).
    Multi-reward ``normalize_then_sum``:  A_i = sum_k w_k A_ik with A_ik the normalised k-th
    reward (MixGRPO ``advantage_aggr`` 2507.21802); ``post_norm='batch'`` then z-scores A over the
    batch (GDPO 2601.05242, TRL ``normalize_then_sum``).
    ``smooth_tracking`` (DCPO, :func:`_smooth_column`, with a :class:`SmoothStatTracker`) or
    ``risk='mvar'`` (RiskPO, :func:`mixed_var_advantages`) replace the group z-score.
    Then: invalid samples -> 0, optional DAPO zero-variance filter (keep=False, A=0), optional clip,
    optional D3S down-sampling (:func:`variance_downsample`; keep=False, A=0 for the rows left out).

    Args:
        rewards: ``[N]`` or ``[N, R]``; a non-finite value (NaN, +inf, -inf) marks an invalid
            reward, the same for all three (see ``cfg.nan_policy``).
        group_ids: ``[N]`` integer group ids (a prompt's samples share an id).
        cfg: options (default: TRL-style group z-score).
        tracker: per-prompt history (Flow-GRPO, :class:`PerPromptStatTracker`) or cumulative
            statistics (DCPO, :class:`SmoothStatTracker`); requires ``prompt_keys``.
        prompt_keys: ``N`` hashable prompt identifiers used as the tracker's keys.
        step: the training step, for the D3S keep-fraction schedule.

    Returns:
        ``(advantages [N], stats)`` with stats ``keep`` (bool [N]: valid and not filtered),
        ``num_groups``, ``zero_std_count``, ``zero_std_frac``, ``filtered_count``,
        ``invalid_count``, ``clipped_count``, ``downsampled_count``, ``reward_mean``, ``reward_std``,
        ``reward_std_mean`` (mean within-group std) and, with a tracker, ``tracked_prompts``.
    """
    cfg = (cfg or AdvantageConfig()).validate()
    if cfg.unlikely_penalty:
        raise ValueError("unlikely_penalty: needs the rollout's sequence log-likelihoods; call unlikely_advantages")
    r2, out_dtype = _reward_matrix(rewards)
    n, num_r = r2.shape
    w = _reward_weights(cfg, num_r, r2.device)
    _check_tracker(cfg, tracker, prompt_keys, n, num_r)
    # validity: a non-finite reward in any column (nan_policy 'all': in every column) invalidates a sample
    col_nan = torch.isnan(r2)
    invalid = col_nan.any(1) if cfg.nan_policy == "any" else col_nan.all(1)
    valid = ~invalid
    # multi-reward combination, centring and scaling
    logged = _weighted_total(r2, col_nan, w, valid)
    if cfg.multi_reward == "sum_then_normalize" or num_r == 1:
        if cfg.smooth_tracking:
            assert isinstance(tracker, SmoothStatTracker) and prompt_keys is not None
            adv, gs = _smooth_column(logged, valid, group_ids, cfg, tracker, prompt_keys)
        elif cfg.risk != "none":
            gs = group_stats(logged, group_ids, valid, unbiased=cfg.std_unbiased, zero_std_tol=cfg.zero_std_tol)
            adv = mixed_var_advantages(logged, group_ids, valid, cfg)
        else:
            adv, gs = _normalize_column(logged, valid, group_ids, cfg, tracker, prompt_keys)
        zero_var = gs.zero_var
    else:
        adv, zero_var, gs = _normalize_then_sum(r2, col_nan, valid, w, group_ids, cfg)
    # invalid samples -> 0; DAPO dynamic sampling drops zero-variance groups; clipping
    adv = torch.where(valid, adv, torch.zeros_like(adv))
    keep = valid.clone()
    filtered = torch.zeros(n, dtype=torch.bool, device=r2.device)
    if cfg.filter_zero_std:
        filtered = zero_var & valid
        keep = keep & ~zero_var
        adv = torch.where(zero_var, torch.zeros_like(adv), adv)
    adv, clipped = _clip_advantages(adv, cfg.clip)
    dropped = torch.zeros(n, dtype=torch.bool, device=r2.device)
    if cfg.sample_keep is not None:  # D3S: keep the subset with the largest Var(A)
        frac = linear_ramp(step, cfg.sample_keep, cfg.sample_keep_end, cfg.sample_keep_steps)
        chosen = variance_downsample(adv, group_ids, keep, frac, cfg.sample_keep_scope)
        dropped, keep = keep & ~chosen, keep & chosen
        adv = torch.where(chosen, adv, torch.zeros_like(adv))
    counts = {"filtered_count": filtered, "invalid_count": invalid, "clipped_count": clipped,
              "downsampled_count": dropped}
    stats = _advantage_stats(keep, counts, logged, valid, group_ids, gs, zero_var, cfg)
    if tracker is not None:
        stats["tracked_prompts"] = len(tracker)
    return adv.to(out_dtype), stats


# --------------------------------------------------------------------------------------------
# trees, branches and granularities (TempFlow-GRPO, G2RPO, Dynamic-TreeRPO)
# --------------------------------------------------------------------------------------------


def _check_parent(parent: Tensor) -> Tensor:
    parent = torch.as_tensor(parent)
    if parent.ndim != 1 or parent.is_floating_point():
        raise ValueError(f"parent: must be a 1-D integer tensor, got dtype {parent.dtype} shape {tuple(parent.shape)}")
    m = parent.shape[0]
    if ((parent < -1) | (parent >= m)).any():
        raise ValueError("parent: entries must be -1 (root) or a node index in [0, M)")
    if (parent == torch.arange(m, device=parent.device)).any():
        raise ValueError("parent: a node cannot be its own parent")
    # cycle check: following parents must reach -1 within M hops
    cur = parent.clone()
    for _ in range(m):
        alive = cur >= 0
        if not alive.any():
            break
        cur = torch.where(alive, parent[cur.clamp(min=0)], cur)
    if (cur >= 0).any():
        raise ValueError("parent: the parent links contain a cycle")
    return parent


def _is_leaf(parent: Tensor) -> Tensor:
    m = parent.shape[0]
    has_child = torch.zeros(m, dtype=torch.bool, device=parent.device)
    kids = parent[parent >= 0]
    has_child[kids] = True
    return ~has_child


def tree_node_values(parent: Tensor, leaf_rewards: Tensor) -> Tensor:
    """Value of every tree node = mean reward of the leaves below it (TreeGRPO/Dynamic-TreeRPO 2509.23352).

    V(v) = (1/|L(v)|) sum_{l in L(v)} r_l, L(v) = valid (finite: not NaN or +-inf) leaves in the
    subtree of v (a leaf's value is its own reward). Nodes with no valid leaf below get NaN.

    Args:
        parent: ``[M]`` parent index of each node, ``-1`` for roots.
        leaf_rewards: ``[M]`` reward of each leaf; entries of internal nodes are ignored.
    """
    parent = _check_parent(parent)
    r = torch.as_tensor(leaf_rewards).detach().to(torch.float64)
    m = parent.shape[0]
    if r.shape != (m,):
        raise ValueError(f"leaf_rewards: must have shape [{m}], got {tuple(r.shape)}")
    leaf = _is_leaf(parent) & torch.isfinite(r)
    tot = torch.zeros(m, dtype=torch.float64, device=r.device)
    cnt = torch.zeros(m, dtype=torch.float64, device=r.device)
    cur = torch.nonzero(leaf, as_tuple=False).flatten()
    val = r[cur]
    while cur.numel():
        tot.index_add_(0, cur, val)
        cnt.index_add_(0, cur, torch.ones_like(val))
        nxt = parent[cur]
        keep = nxt >= 0
        cur, val = nxt[keep], val[keep]
    out = tot / cnt.clamp(min=1.0)
    return torch.where(cnt > 0, out, torch.full_like(out, float("nan")))


def tree_node_advantages(
    parent: Tensor, node_values: Tensor, cfg: AdvantageConfig | None = None
) -> Tensor:
    """Advantage of each node against its siblings (same parent) (TempFlow-GRPO 2508.04324, G2RPO 2510.01982).

    A(v) = (V(v) - mean_{u: parent(u)=parent(v)} V(u)) / (std_siblings + eps), per ``cfg``
    (center/scale/eps/std_unbiased/clip; tracker, NGRPO, filtering and multi-reward do not apply).
    Roots (parent -1) and nodes with a non-finite value (NaN, +-inf) get 0 and are left out of
    their siblings' statistics; an only child gets 0 (no siblings).
    Returned in float64, shape [M].
    """
    cfg = (cfg or AdvantageConfig()).validate()
    parent = _check_parent(parent)
    v = torch.as_tensor(node_values).detach().to(torch.float64)
    if v.shape != parent.shape:
        raise ValueError(f"node_values: must have shape {tuple(parent.shape)}, got {tuple(v.shape)}")
    valid = (parent >= 0) & torch.isfinite(v)
    plain = AdvantageConfig(
        center=cfg.center, scale=cfg.scale, eps=cfg.eps, std_unbiased=cfg.std_unbiased,
        zero_std_tol=cfg.zero_std_tol,
    )
    # roots all share group id -1 but are invalid, so they never enter any statistic
    adv, _ = _normalize_column(v, valid, parent, plain, None, None)
    adv = torch.where(valid, adv, torch.zeros_like(adv))
    return _clip_advantages(adv, cfg.clip)[0]


def tree_transition_advantages(
    parent: Tensor, leaf_node: Tensor, step_node: Tensor, total: Tensor, cfg: AdvantageConfig | None = None
) -> tuple[Tensor, Tensor]:
    """Advantages of a tree rollout's stored transitions (TempFlow-GRPO 2508.04324, Dynamic-TreeRPO 2509.23352).

    A node's value is the mean reward of the valid leaves under it (:func:`tree_node_values`), its
    advantage is taken against its siblings (:func:`tree_node_advantages`); a node without siblings
    (a stochastic step that did not branch) inherits its parent's advantage. Each stored transition
    gets the advantage of the node it creates: ``A[i, t] = A(step_node[i, t])`` (0 where
    ``step_node`` is -1, and for rows whose reward is not finite).

    Args:
        parent: ``[M]`` parent index of each node, -1 for roots; nodes numbered parents first.
        leaf_node: ``[N]`` the leaf node of each row (trajectory).
        step_node: ``[N, T]`` the node each stored transition creates, -1 for none.
        total: ``[N]`` each row's reward (NaN, +-inf: invalid).
        cfg: normalisation options for the sibling comparison.

    Returns:
        ``(advantages [N, T] float64, valid [N] bool)``.
    """
    parent = _check_parent(parent).cpu()
    m = parent.shape[0]
    child = parent >= 0
    if (parent[child] >= torch.arange(m)[child]).any():
        raise ValueError("parent: nodes must be numbered parents first")
    total = torch.as_tensor(total).detach().to(torch.float64).cpu()
    valid = torch.isfinite(total)
    leaf_r = torch.full((m,), float("nan"), dtype=torch.float64)
    leaf_r[torch.as_tensor(leaf_node).cpu()] = torch.where(valid, total, torch.full_like(total, float("nan")))
    node_adv = tree_node_advantages(parent, tree_node_values(parent, leaf_r), cfg)
    n_children = torch.zeros(m, dtype=torch.long)
    n_children.index_add_(0, parent[child], torch.ones(int(child.sum()), dtype=torch.long))
    only = child & (n_children[parent.clamp(min=0)] == 1)
    for v in range(m):  # parents precede children, so a chain of only children inherits in one pass
        if only[v]:
            node_adv[v] = node_adv[parent[v]]
    step_node = torch.as_tensor(step_node).cpu()
    adv = torch.where(step_node >= 0, node_adv[step_node.clamp(min=0)], torch.zeros((), dtype=torch.float64))
    adv = torch.where(valid.unsqueeze(1), adv, torch.zeros_like(adv))
    return adv, valid


def multi_granularity_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    cfg: AdvantageConfig | None = None,
    reduce: str = "sum",
) -> tuple[Tensor, dict[str, Any]]:
    """Multi-granularity advantage integration (G2RPO, arXiv 2510.01982).

    After a branch step the ODE continuation is run at K granularities (step strides); each
    gives its own image and reward. A_i = sum_k A_ik ("sum", as the G2RPO code does) or
    (1/K) sum_k A_ik ("mean"), with A_ik = :func:`compute_advantages` of granularity k within
    the group (multi-reward per ``cfg``; G2RPO normalises each reward, i.e.
    ``multi_reward='normalize_then_sum'``).

    Args:
        rewards: ``[N, K]`` (one reward) or ``[N, K, R]`` (R rewards) per granularity.
        group_ids: ``[N]`` group ids (G2RPO: one group per prompt and branch step).
        cfg: advantage options, applied per granularity (clip is applied after the reduction).
        reduce: ``"sum"`` or ``"mean"`` over granularities.

    Returns:
        ``(advantages [N], stats)``; ``stats["keep"]`` is the AND of the per-granularity keeps,
        ``stats["per_granularity"]`` the list of per-granularity stats.
    """
    cfg = (cfg or AdvantageConfig()).validate()
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce: must be 'sum' or 'mean', got {reduce!r}")
    rewards = torch.as_tensor(rewards)
    if rewards.ndim not in (2, 3):
        raise ValueError(f"rewards: must have shape [N, K] or [N, K, R], got {tuple(rewards.shape)}")
    k = rewards.shape[1]
    if k < 1:
        raise ValueError("rewards: need at least one granularity")
    inner = AdvantageConfig(**{f.name: getattr(cfg, f.name) for f in fields(AdvantageConfig)})
    inner.clip = None
    total = None
    keep = None
    per: list[dict[str, Any]] = []
    for j in range(k):
        a, st = compute_advantages(rewards[:, j], group_ids, inner)
        total = a.to(torch.float64) if total is None else total + a.to(torch.float64)
        keep = st["keep"] if keep is None else keep & st["keep"]
        per.append(st)
    assert total is not None and keep is not None
    if reduce == "mean":
        total = total / k
    total = torch.where(keep, total, torch.zeros_like(total))
    total, clipped = _clip_advantages(total, cfg.clip)
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    stats = {
        "keep": keep,
        "per_granularity": per,
        "clipped_count": int(clipped.sum().item()),
        "zero_std_count": sum(p["zero_std_count"] for p in per),
        "invalid_count": int((~keep).sum().item()),
    }
    return total.to(out_dtype), stats


# --------------------------------------------------------------------------------------------
# DCPO's smooth standardisation, RiskPO's mixed value-at-risk, D3S's sample selection
# --------------------------------------------------------------------------------------------


class SmoothStatTracker:
    """Per-prompt cumulative reward statistics for DCPO's smooth advantage standardisation (arXiv 2509.02333).

    Holds ``(mean, std, times)`` per prompt key: the statistics merged over the ``times`` steps in
    which the prompt was sampled (:func:`dcpo_merge_stats`). Plain Python state, so
    ``state_dict()`` / ``load_state_dict()`` round-trip exactly for resume; keys must be ``str``
    or ``int`` to be serialised.
    """

    def __init__(self) -> None:
        self._state: dict[Hashable, tuple[float, float, int]] = {}

    def __len__(self) -> int:
        """Number of prompts with statistics."""
        return len(self._state)

    def get(self, key: Hashable) -> tuple[float, float, int]:
        """``(mean, std, times)`` of a prompt; ``(0.0, 0.0, 0)`` if never seen."""
        return self._state.get(key, (0.0, 0.0, 0))

    def set(self, key: Hashable, mean: float, std: float, times: int) -> None:
        self._state[key] = (float(mean), float(std), int(times))

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state: ``{"keys", "stats"}`` (stats: ``[mean, std, times]`` per key)."""
        for key in self._state:
            if not isinstance(key, (str, int)):
                raise ValueError(f"keys: only str/int prompt keys can be serialised, got {type(key).__name__}")
        return {"keys": list(self._state), "stats": [list(v) for v in self._state.values()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore exactly what :meth:`state_dict` returned."""
        if set(state) != {"keys", "stats"} or len(state["keys"]) != len(state["stats"]):
            raise ValueError("state: expected 'keys' and 'stats' of equal length")
        self._state = {}
        for key, (mean, std, times) in zip(state["keys"], state["stats"]):
            self.set(key, mean, std, times)


def dcpo_merge_stats(mean_old: float, std_old: float, times: int, mean_new: float, std_new: float) -> tuple[float, float]:
    """DCPO's cumulative statistics after one more step (lime-RL/DCPO ``get_mean_std``), each step one unit:

        t = 0:  (mu_new, sigma_new)
        t > 0:  mu = (t mu_old + mu_new) / (t + 1),
                sigma^2 = (t sigma_old^2 + sigma_new^2 + t / (t + 1) (mu_new - mu_old)^2) / (t + 1)
    (the pooled moments of t + 1 equally weighted steps), t = the steps counted so far.
    """
    if times < 0:
        raise ValueError(f"times: must be >= 0, got {times!r}")
    if times == 0:
        return float(mean_new), float(std_new)
    t = float(times)
    mean = (t * mean_old + mean_new) / (t + 1.0)
    var = (t * std_old**2 + std_new**2 + t / (t + 1.0) * (mean_new - mean_old) ** 2) / (t + 1.0)
    return float(mean), math.sqrt(var)


def dcpo_smooth_advantages(
    r: Tensor, mean_new: float, std_new: float, mean_cum: float, std_cum: float, n: int
) -> Tensor:
    """DCPO's smooth advantage standardisation (SAS, arXiv 2509.02333) of one group's rewards.

    z_new = (r - mu_new) / sigma_new and z_cum = (r - mu_cum) / sigma_cum (0 where the std is 0),
    n = the number of steps the prompt was sampled in, this one included:
        SA_new = (n - 1)/n z_new + 1/n z_cum,   SA_cum = 1/n z_new + (n - 1)/n z_cum,
        A = SA_new if |SA_new| < |SA_cum| else SA_cum.
    At n = 1 A is the plain z-score; a group of equal rewards seen before gets z_cum / n, not 0.
    """
    if n < 1:
        raise ValueError(f"n: must be >= 1, got {n!r}")
    r = torch.as_tensor(r, dtype=torch.float64)
    z_new = (r - mean_new) / std_new if std_new > 0 else torch.zeros_like(r)
    z_cum = (r - mean_cum) / std_cum if std_cum > 0 else torch.zeros_like(r)
    sa_new = z_cum / n + (1.0 - 1.0 / n) * z_new
    sa_cum = z_new / n + (1.0 - 1.0 / n) * z_cum
    return torch.where(sa_new.abs() < sa_cum.abs(), sa_new, sa_cum)


def _smooth_column(
    r: Tensor, valid: Tensor, group_ids: Tensor, cfg: AdvantageConfig, tracker: SmoothStatTracker,
    prompt_keys: Sequence[Hashable],
) -> tuple[Tensor, GroupStats]:
    """DCPO advantages of one reward column: each group against its step statistics and its prompt's
    cumulative ones (:func:`dcpo_smooth_advantages`); the tracker then holds the merged statistics.
    Groups are taken in group-id order (a prompt sampled twice in one step is merged twice, in order)."""
    gs = group_stats(r, group_ids, valid, unbiased=cfg.std_unbiased, zero_std_tol=cfg.zero_std_tol)
    adv = torch.zeros_like(r)
    for g in range(gs.num_groups):
        rows = ((gs.index == g) & valid).nonzero().flatten()
        if rows.numel() == 0:
            continue
        keys = {prompt_keys[i] for i in rows.tolist()}
        if len(keys) != 1:
            raise ValueError(f"prompt_keys: the rows of a group must share one prompt key, got {sorted(map(str, keys))}")
        key = keys.pop()
        mean_new, std_new = float(gs.mean[rows[0]]), float(gs.std[rows[0]])
        mean_old, std_old, times = tracker.get(key)
        mean_cum, std_cum = dcpo_merge_stats(mean_old, std_old, times, mean_new, std_new)
        adv[rows] = dcpo_smooth_advantages(r[rows], mean_new, std_new, mean_cum, std_cum, times + 1).to(adv.device)
        tracker.set(key, mean_cum, std_cum, times + 1)
    return adv, gs


def mixed_var_advantages(r: Tensor, group_ids: Tensor, valid: Tensor, cfg: AdvantageConfig) -> Tensor:
    """RiskPO's mixed value-at-risk advantage (arXiv 2510.00911; RTkenny/RiskPO
    ``compute_grpo_bundle_rvar_outcome_advantage_quantile_tracking``).

    Groups, in group-id order, form bundles of ``risk_bundle``; the k-th "paper" of a bundle takes
    the k-th valid completion of each of its groups (k < the smallest valid count) and scores
    S_k = the sum of their rewards. With q_a, q_b the alpha / beta quantiles of the bundle's S
    (linear interpolation) and eps = ``cfg.eps``:
        RVaR_k = ((S_k - q_a)^+ - (S_k - q_b)^+ + q_a - q_b) / (beta - alpha + eps)   (= (clamp(S_k, q_a, q_b) - q_b) / ...)
        CVaR_k = -(q_a - S_k)^+ / (alpha + eps)
        A_k = (w CVaR_k + RVaR_k) / (w + 1),  w = ``risk_mix``;  then / (std(S) + eps) with scale 'group'
    (std Bessel-corrected; 1 for a bundle of one paper). Each completion of paper k gets A_k, or with
    ``risk_credit='std'`` A_k / (sigma_g + eps), sigma_g its group's reward std (1 if below 1e-3 or
    undefined). Every A <= 0: the worse papers are pushed down, those at or above q_b get 0. Completions
    outside every paper (invalid, or beyond the smallest count) get 0. Returned in float64.
    """
    v = torch.as_tensor(r).detach().to(torch.float64)
    index, num_groups = _group_index(group_ids, v.shape[0])
    ok = valid.to(torch.bool) & torch.isfinite(v)
    members = [(index == g).logical_and(ok).nonzero().flatten() for g in range(num_groups)]
    adv = torch.zeros_like(v)
    eps, a, b, w = cfg.eps, cfg.risk_alpha, cfg.risk_beta, cfg.risk_mix
    for start in range(0, num_groups, cfg.risk_bundle):
        groups = members[start:start + cfg.risk_bundle]
        n_papers = min(int(m.numel()) for m in groups)
        if n_papers == 0:
            continue
        papers = torch.stack([m[:n_papers] for m in groups], dim=1)  # [papers, groups]: row indices
        s = v[papers].sum(1)
        if n_papers == 1:
            q_a = q_b = s[0]
            sd = torch.ones((), dtype=torch.float64)
        else:
            q_a, q_b = torch.quantile(s, a), torch.quantile(s, b)
            sd = s.std()
        rvar = (torch.minimum(torch.maximum(s, q_a), q_b) - q_b) / (b - a + eps)  # = (S - q_a)^+ - (S - q_b)^+ + q_a - q_b
        cvar = -(q_a - s).clamp(min=0) / (a + eps)
        a_paper = (w * cvar + rvar) / (w + 1.0)
        if cfg.scale == "group" and bool(sd + eps > 0):  # (equal scores with eps 0: every A_k is 0 already)
            a_paper = a_paper / (sd + eps)
        for j, m in enumerate(groups):
            credit = 1.0
            if cfg.risk_credit == "std":
                g_sd = v[m].std() if m.numel() > 1 else torch.tensor(float("nan"), dtype=torch.float64)
                credit = 1.0 / ((g_sd if bool(g_sd > 1e-3) else 1.0) + eps)
            adv[papers[:, j]] = a_paper * credit
    return adv


def max_variance_subset(values: Tensor, k: int) -> Tensor:
    """The k of n values whose (population or sample) variance is largest, as a bool mask.

    Such a subset always consists of the j largest and the k - j smallest values for some j (the
    spread sum (x - mean)^2 is convex in each chosen value, so a chosen value with unchosen ones on
    both sides can be swapped for one of them without loss), so the k + 1 candidates are tried;
    ties go to the smallest j. D3S's sample-level selection (arXiv 2509.22115).
    """
    v = torch.as_tensor(values).detach().to(torch.float64).reshape(-1)
    n = v.shape[0]
    if not (isinstance(k, int) and 0 <= k):
        raise ValueError(f"k: must be an int >= 0, got {k!r}")
    chosen = torch.zeros(n, dtype=torch.bool, device=v.device)
    if k >= n:
        return ~chosen
    order = torch.argsort(v, stable=True)
    s = v[order]
    best_j, best = 0, -1.0
    for j in range(k + 1):
        sub = torch.cat([s[:k - j], s[n - j:]])
        spread = float(((sub - sub.mean()) ** 2).sum()) if k else 0.0
        if spread > best:
            best_j, best = j, spread
    chosen[order[:k - best_j]] = True
    chosen[order[n - best_j:]] = True
    return chosen


def variance_downsample(
    advantages: Tensor, group_ids: Tensor, eligible: Tensor, fraction: float, scope: str = "batch"
) -> Tensor:
    """D3S's sample-level down-sampling (arXiv 2509.22115): among the ``eligible`` rows, keep the subset
    that maximises Var(A) (:func:`max_variance_subset`), of size k = max(min(n, 2), floor(fraction n + 1/2))
    over the whole batch (``scope='batch'``) or within each group (``'group'``, the paper's D3S-I).
    Returns a bool ``[N]`` mask of the kept rows."""
    check_number("fraction", fraction, gt=0, le=1)
    if scope not in KEEP_SCOPES:
        raise ValueError(f"scope: must be one of {KEEP_SCOPES}, got {scope!r}")
    adv = torch.as_tensor(advantages).detach().to(torch.float64).reshape(-1)
    index, num = _group_index(group_ids, adv.shape[0])
    units = torch.zeros_like(index) if scope == "batch" else index
    elig = eligible.to(torch.bool).to(adv.device)
    keep = torch.zeros_like(elig)
    for u in torch.unique(units[elig]).tolist():
        rows = ((units == u) & elig).nonzero().flatten()
        n = rows.numel()
        k = max(min(n, 2), int(math.floor(fraction * n + 0.5)))
        keep[rows[max_variance_subset(adv[rows], k)]] = True
    return keep
# 2025 variants: the unlikeliness reward (He et al.) and dynamic reward weights (Lu et al.)
# --------------------------------------------------------------------------------------------


def unlikeliness_ranks(seq_logps: Tensor, group_ids: Tensor) -> Tensor:
    """rank_i / G_g: each row's likelihood rank within its group over the group's size (float64 ``[N]``).

    rank 0 is the group's least likely row (smallest ``seq_logps``), G - 1 its most likely; ties keep
    row order (a stable sort; upstream's ``argsort(argsort(x))`` leaves their order unspecified).
    He, Fried, Welleck, "Rewarding the Unlikely" (arXiv 2506.02355).
    """
    lp = torch.as_tensor(seq_logps).detach().to(torch.float64)
    if lp.ndim != 1:
        raise ValueError(f"seq_logps: must have shape [N], got {tuple(lp.shape)}")
    n = lp.shape[0]
    if not bool(torch.isfinite(lp).all()):
        raise ValueError("seq_logps: must be finite (a row's mean token log-prob under the sampling policy)")
    index, num_groups = _group_index(group_ids, n)
    index = index.to(lp.device)
    by_lp = torch.sort(lp, stable=True).indices
    order = by_lp[torch.sort(index[by_lp], stable=True).indices]  # rows by group, then by likelihood
    size = torch.zeros(num_groups, dtype=torch.long, device=lp.device).index_add_(0, index, torch.ones_like(index))
    start = torch.cumsum(size, 0) - size
    rank = torch.empty(n, dtype=torch.long, device=lp.device)
    rank[order] = torch.arange(n, device=lp.device) - start[index[order]]
    return rank.to(torch.float64) / size[index].to(torch.float64)


def unlikeliness_rewards(rewards: Tensor, seq_logps: Tensor, group_ids: Tensor, penalty: float) -> Tensor:
    """The unlikeliness reward (He, Fried, Welleck, arXiv 2506.02355): r_i <- r_i (1 - penalty * rank_i / G).

    ``rank_i / G`` from :func:`unlikeliness_ranks` (0 for the least likely member of a group). With
    0/1 rewards only correct samples change: the more likely a correct sample was under the sampling
    policy, the less it earns. Every reward column is scaled (a weighted sum is scaled the same way);
    NaN stays NaN. Returned in float64, the shape of ``rewards``.
    """
    check_number("penalty", penalty, ge=0)
    r = torch.as_tensor(rewards).detach().to(torch.float64)
    if r.ndim not in (1, 2) or r.shape[0] != torch.as_tensor(seq_logps).shape[0]:
        raise ValueError(f"rewards: must have shape [N] or [N, R] with N = len(seq_logps), got {tuple(r.shape)}")
    factor = 1.0 - penalty * unlikeliness_ranks(seq_logps, group_ids).to(r.device)
    return r * (factor if r.ndim == 1 else factor.unsqueeze(1))


def unlikely_advantages(
    rewards: Tensor,
    seq_logps: Tensor,
    group_ids: Tensor,
    cfg: AdvantageConfig,
    tracker: PerPromptStatTracker | None = None,
    prompt_keys: Sequence[Hashable] | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """:func:`compute_advantages` of the unlikeliness rewards (:func:`unlikeliness_rewards`, ``cfg.unlikely_penalty``).

    As the authors' trainer (``_compute_advantages``, ``verl/trainer/ppo/ray_lean_trainer.py``) the
    group statistics are those of the penalised rewards, while the zero-variance filter
    (``filter_zero_std``, upstream ``advantage_threshold``) judges the raw rewards: a group that is
    all correct is dropped although its penalised rewards differ.
    """
    cfg = cfg.validate()
    plain = dataclasses.replace(cfg, unlikely_penalty=0.0)
    penalised = unlikeliness_rewards(rewards, seq_logps, group_ids, cfg.unlikely_penalty)
    adv, stats = compute_advantages(penalised, group_ids, dataclasses.replace(plain, filter_zero_std=False),
                                    tracker=tracker, prompt_keys=prompt_keys)
    if cfg.filter_zero_std:
        _, raw = compute_advantages(torch.as_tensor(rewards).detach().to(torch.float64), group_ids, plain)
        filtered = stats["keep"] & ~raw["keep"]
        adv = torch.where(filtered, torch.zeros_like(adv), adv)
        stats = {**stats, "keep": stats["keep"] & ~filtered, "filtered_count": int(filtered.sum()),
                 "zero_std_count": raw["zero_std_count"], "zero_std_frac": raw["zero_std_frac"]}
    out_dtype = rewards.dtype if torch.as_tensor(rewards).is_floating_point() else torch.float32
    return adv.to(out_dtype), stats


def gradient_influence(grads: Sequence[Tensor]) -> Tensor:
    """s_k = sum_j <g_k, g_j>: how much reward k's policy gradient agrees with all of them (float64 ``[K]``).

    The row sums of the Gram matrix G G^T of the per-reward gradients (Lu et al., "Learning to
    Optimize Multi-Objective Alignment Through Dynamic Reward Weighting", arXiv 2509.11452;
    ``scores_mat.sum(dim=-1)`` in ``verl/trainer/ppo/ray_trainer_optimization.py``). Computed as
    <g_k, sum_j g_j> in float64, one gradient at a time.
    """
    if len(grads) == 0:
        raise ValueError("grads: need at least one gradient")
    flat = [torch.as_tensor(g).detach().reshape(-1) for g in grads]
    if any(f.shape != flat[0].shape for f in flat):
        raise ValueError("grads: every gradient must have the same number of elements")
    total = torch.zeros_like(flat[0], dtype=torch.float64)
    for f in flat:
        total += f.to(torch.float64)
    return torch.stack([torch.dot(f.to(torch.float64), total) for f in flat]).cpu()


def reward_weight_update(weights: Tensor, influence: Tensor, lr: float, reg: float) -> Tensor:
    """w <- softmax(log w + lr * s / reg): the multiplicative weight update of Lu et al. (arXiv 2509.11452).

    ``s`` from :func:`gradient_influence`, ``lr`` the policy's current learning rate, ``reg`` the
    regularisation (upstream ``regularization_factor``). Weights stay positive and sum to 1.
    """
    w = torch.as_tensor(weights, dtype=torch.float64)
    s = torch.as_tensor(influence, dtype=torch.float64)
    if w.ndim != 1 or s.shape != w.shape:
        raise ValueError(f"influence: must have the weights' shape {tuple(w.shape)}, got {tuple(s.shape)}")
    if not bool((w > 0).all()):
        raise ValueError("weights: must all be > 0 (their logarithm is taken)")
    check_number("lr", lr, ge=0)
    check_number("reg", reg, gt=0)
    return torch.softmax(torch.log(w) + lr * s / reg, dim=0)


class DynamicRewardWeights:
    """Reward weights updated online from the per-reward policy gradients (arXiv 2509.11452).

    Each step the caller computes, for every reward k alone, the advantages and the clipped policy
    gradient g_k, and calls :meth:`step` with them and the learning rate; the influences
    s_k = sum_j <g_k, g_j> are accumulated and, every ``every`` steps, averaged and applied with
    :func:`reward_weight_update`. The initial weights are normalised to sum 1 (upstream requires it).
    State is plain Python for an exact resume (:meth:`state_dict`).
    """

    def __init__(self, names: Sequence[str], weights: Sequence[float], reg: float, every: int = 1) -> None:
        if len(names) != len(weights) or len(names) < 2:
            raise ValueError(f"weights: need one weight per reward and at least two rewards, got {dict(zip(names, weights))}")
        if not all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in weights):
            raise ValueError(f"weights: dynamic reward weights start from positive weights, got {list(weights)}")
        check_number("reg", reg, gt=0)
        if not (isinstance(every, int) and every >= 1):
            raise ValueError(f"every: must be an int >= 1, got {every!r}")
        self.names = list(names)
        total = float(sum(weights))
        self.weights = [float(x) / total for x in weights]
        self.reg = float(reg)
        self.every = every
        self.count = 0
        self.influence = [0.0] * len(self.names)

    def weights_for(self, names: Sequence[str]) -> tuple[float, ...]:
        """The current weights in the order of ``names`` (the reward columns)."""
        if sorted(names) != sorted(self.names):
            raise ValueError(f"names: the rewards {list(names)} are not the weighted ones {self.names}")
        return tuple(self.weights[self.names.index(n)] for n in names)

    def step(self, names: Sequence[str], grads: Sequence[Tensor], lr: float) -> tuple[float, ...]:
        """Add this step's influences (``grads[k]``: reward ``names[k]``'s gradient); every ``every``
        calls update the weights. Returns the influences of this step, in ``names`` order."""
        if len(names) != len(grads):
            raise ValueError(f"grads: {len(grads)} gradients for {len(names)} rewards")
        s = gradient_influence(grads).tolist()
        for n, v in zip(names, s):
            self.influence[self.names.index(n)] += v
        self.count += 1
        if self.count % self.every == 0:
            mean = torch.tensor(self.influence, dtype=torch.float64) / self.every
            self.weights = reward_weight_update(torch.tensor(self.weights, dtype=torch.float64), mean, lr, self.reg).tolist()
            self.influence = [0.0] * len(self.names)
        return tuple(s)

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state for an exact resume."""
        return {"names": list(self.names), "weights": list(self.weights), "reg": self.reg, "every": self.every,
                "count": self.count, "influence": list(self.influence)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        for name in ("names", "weights", "count", "influence"):
            if name not in state:
                raise ValueError(f"state: missing entry {name!r}")
        if list(state["names"]) != self.names:
            raise ValueError(f"state: saved for the rewards {state['names']}, this run has {self.names}")
        self.weights = [float(x) for x in state["weights"]]
        self.count = int(state["count"])
        self.influence = [float(x) for x in state["influence"]]
