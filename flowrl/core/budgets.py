"""How many rollouts each prompt gets, and which prompts a step draws (torch only).

GRPO gives every prompt the same group of ``G`` samples. The methods here spend a step's rollouts
otherwise, from what earlier steps saw of each prompt (its success rate, or a Beta posterior of it):

* ``knapsack`` (Knapsack RL, arXiv 2509.25849): per-prompt group sizes that maximise the summed value
  ``V(n, p) = (1 - p^n - (1 - p)^n) p (1 - p)^2`` under the step's total (:func:`knapsack_allocation`).
* ``gvm`` (GVM-RAFT, arXiv 2505.02391): sizes proportional to ``G_i / sqrt(p_i + a / p_i^(b - 1))``
  (:func:`gvm_allocation`).
* ``vade`` (VADE, arXiv 2511.18902): the prompts whose Thompson-sampled success probability has the
  largest information gain ``p~(1 - p~)``, from decayed Beta posteriors (:class:`BetaTracker`).
* ``mmr1`` (MMR1 variance-aware sampling, arXiv 2509.21268): a mix of prompts drawn in proportion to
  their min-max scaled ``p(1 - p)`` and prompts of the usual epoch walk (:func:`mmr1_weights`).
* ``single_stream`` (SPO, arXiv 2509.13232): one sample per prompt, the baseline a persistent per-prompt
  value ``p^ = a / (a + b)``, advantages normalised over the batch (:func:`spo_advantages`); prompts
  drawn with weights ``sqrt(p^(1 - p^)) + 0.05``.

Each method's upstream file and commit, and where flowrl differs: ``docs/methods.md`` ("Rollout budgets
per prompt"). :class:`RolloutBudget` is the stateful part the training loop holds: ``choose(step, walk)``
gives the step's prompts and their group sizes (the same on every process: a function of the seed,
the step and statistics gathered from every process), ``observe`` feeds it the step's rewards, and
``state_dict`` round-trips exactly through JSON (checkpoints). A sample succeeds when its weighted total
reward is at least ``budget.success_threshold``.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from flowrl.core import rng
from flowrl.core.checks import check_number

__all__ = [
    "BUDGET_KINDS", "BetaTracker", "BudgetConfig", "RolloutBudget", "SuccessHistory", "gvm_allocation",
    "gvm_weights", "information_gain", "knapsack_allocation", "knapsack_value", "mmr1_weights",
    "round_preserving_sum", "sample_beta", "spo_advantages", "spo_kl_rho", "spo_prompt_weights",
]

BUDGET_KINDS = ("uniform", "knapsack", "gvm", "vade", "mmr1", "single_stream")


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------


@dataclass
class KnapsackConfig:
    min_size: int = 2  # rollouts of a prompt with a known success rate (min_n = negative_n = positive_n upstream)
    max_size: int = 128  # at most this many rollouts for one prompt from the knapsack (max_n)
    cost: str = "probability"  # the fallback's cost estimate: "probability" (log(1-c)/log(max(p,1-p))) or "expectation" (1/(p(1-p)) - 1)
    confidence: float = 0.9  # c of the "probability" cost (upstream alpha)
    fallback: bool = True  # budget the knapsack cannot use well goes to prompts never solved (allow_fallback)

    def validate(self) -> None:
        if self.min_size < 1:
            raise ValueError(f"min_size: must be >= 1 (every drawn prompt gets a rollout), got {self.min_size}")
        if self.max_size < self.min_size:
            raise ValueError(f"max_size: must be >= min_size ({self.min_size}), got {self.max_size}")
        if self.cost not in ("probability", "expectation"):
            raise ValueError(f"cost: must be 'probability' or 'expectation', got {self.cost!r}")
        check_number("confidence", self.confidence, gt=0, lt=1)


@dataclass
class GvmConfig:
    alpha: float = 1e-3  # a of n_i ~ G_i / sqrt(p_i + a / p_i^(b - 1)) (GVM stage_2_calc_sample_size.py)
    beta: float = 2.0  # b of the same formula
    min_size: int = 1  # rollouts of a prompt with a known success rate before the proportional share
    filter_threshold: float = 0.0  # > 0: prompts with p above it get no proportional share (upstream filter_threshold)
    grad_norms: str = "none"  # none (every G_i = 1) | embedding (G_i: mean gradient norm of -log pi(y) on the input
    # embeddings over the prompt's successes, upstream act_params=embed_tokens; causal LMs only, one extra backward)

    def validate(self) -> None:
        if self.grad_norms not in ("none", "embedding"):
            raise ValueError(f"grad_norms: must be 'none' or 'embedding', got {self.grad_norms!r}")
        check_number("alpha", self.alpha, ge=0)
        check_number("beta", self.beta)
        if self.min_size < 1:
            raise ValueError(f"min_size: must be >= 1 (every drawn prompt gets a rollout), got {self.min_size}")
        check_number("filter_threshold", self.filter_threshold, ge=0, le=1)


@dataclass
class VadeConfig:
    prior: Tuple[float, float] = (1.0, 1.0)  # Beta(a0, b0) of a prompt never seen
    visit_decay: float = 0.5  # a visit's old pseudo-counts decay toward the prior by this factor before the new ones add
    step_decay: float = 0.99  # and by this factor per step since the prompt's last visit (the policy moved meanwhile)

    def validate(self) -> None:
        for i, v in enumerate(self.prior):
            check_number("prior", v, gt=0, why=f"item {i}")
        check_number("visit_decay", self.visit_decay, ge=0, le=1)
        check_number("step_decay", self.step_decay, ge=0, le=1)


@dataclass
class Mmr1Config:
    mix: float = 0.5  # fraction of a step's prompts drawn by weight (curriculum_mixture_ratio); the rest from the epoch walk
    update_every: int = 4  # steps between recomputations of the weights (curriculum_update_freq)

    def validate(self) -> None:
        check_number("mix", self.mix, ge=0, le=1)
        if self.update_every < 1:
            raise ValueError(f"update_every: must be >= 1, got {self.update_every}")


@dataclass
class SingleStreamConfig:
    rho: float = 0.875  # decay of a prompt's value tracker per visit: a <- rho a + r, b <- rho b + (1 - r) (rho.type constant)
    rho_type: str = "constant"  # constant (rho) | kl: rho = clip(2^(-D / kl_half), rho_clip), D the drift of the
    # prompt's previous response's token log-probs (upstream rho.type kl; causal LMs only, two extra forward passes)
    rho_clip: Tuple[float, float] = (0.875, 0.96)  # kl: (rho.clip_lower, upstream's fixed upper 0.96)
    kl_half: float = 0.06  # kl: the drift D that halves rho (upstream D_half)
    explore: float = 0.05  # prompt weight sqrt(p(1-p)) + this (EXPLORATION_EPSILON)
    prior: Tuple[float, float] = (0.5, 0.5)  # (a, b) of a prompt never seen (upstream offline_N = 0)

    def validate(self) -> None:
        if self.rho_type not in ("constant", "kl"):
            raise ValueError(f"rho_type: must be 'constant' or 'kl', got {self.rho_type!r}")
        if not 0 < self.rho_clip[0] <= self.rho_clip[1] <= 1:
            raise ValueError(f"rho_clip: need 0 < low <= high <= 1, got {tuple(self.rho_clip)}")
        check_number("kl_half", self.kl_half, gt=0)
        check_number("rho", self.rho, gt=0, le=1)
        check_number("explore", self.explore, ge=0)
        for i, v in enumerate(self.prior):
            check_number("prior", v, gt=0, why=f"item {i}")


@dataclass
class BudgetConfig:
    """``budget:``: how many rollouts each prompt gets and which prompts a step draws."""

    kind: str = "uniform"  # uniform (sample.group_size each) | knapsack | gvm (group sizes) | vade | mmr1 (which prompts) | single_stream (SPO)
    success_threshold: float = 1.0  # a sample succeeds when its weighted total reward is >= this (exact match: 1)
    history: int = 16  # outcomes per prompt kept for its success rate (KnapsackRL reward_buffer_length)
    min_history: int = 8  # a prompt with fewer recorded outcomes gets sample.group_size (min_buffer_length)
    knapsack: KnapsackConfig = field(default_factory=KnapsackConfig)  # kind knapsack
    gvm: GvmConfig = field(default_factory=GvmConfig)  # kind gvm
    vade: VadeConfig = field(default_factory=VadeConfig)  # kind vade
    mmr1: Mmr1Config = field(default_factory=Mmr1Config)  # kind mmr1
    single_stream: SingleStreamConfig = field(default_factory=SingleStreamConfig)  # kind single_stream

    @property
    def variable_sizes(self) -> bool:
        """Whether the prompts of a step may get different group sizes."""
        return self.kind in ("knapsack", "gvm")

    def validate(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise ValueError(f"kind: must be one of {', '.join(BUDGET_KINDS)}, got {self.kind!r}")
        check_number("success_threshold", self.success_threshold)
        if self.history < 1:
            raise ValueError(f"history: must be >= 1, got {self.history}")
        if self.min_history < 0:
            raise ValueError(f"min_history: must be >= 0, got {self.min_history}")


# --------------------------------------------------------------------------------------------
# Knapsack RL
# --------------------------------------------------------------------------------------------


def knapsack_value(p: Tensor, n: Tensor) -> Tensor:
    """``V(n, p) = (1 - p^n - (1 - p)^n) p (1 - p)^2``: the probability that a group of ``n`` samples
    is not all-equal (so its gradient is not zero) times the value of a prompt of success rate ``p``
    (Knapsack RL, arXiv 2509.25849; ``exploration_utils.py`` ``value_gain``). Float64."""
    p = torch.as_tensor(p, dtype=torch.float64)
    n = torch.as_tensor(n, dtype=torch.float64)
    return (1 - p.pow(n) - (1 - p).pow(n)) * p * (1 - p) ** 2


def _even_share(amount: int, idx: Sequence[int]) -> Dict[int, int]:
    """``amount`` split over ``idx``: ``amount // len`` each and one more for the first ``amount % len``."""
    base, rem = divmod(int(amount), len(idx))
    return {i: base + (1 if j < rem else 0) for j, i in enumerate(idx)}


def _knapsack_dp(p: Tensor, budget: int, base: int, max_extra: int) -> Tuple[List[int], int]:
    """Extra rollouts ``k_i in [0, max_extra]`` for items of success rate ``p`` (each already holding
    ``base``) that maximise ``sum_i [k_i > 0] V(base + k_i, p_i)`` with ``sum_i k_i = W``, W the largest
    reachable total <= ``budget``. Exact dynamic programming over (item, total), vectorised over the
    total; on ties the smaller ``k`` wins, as upstream's strict ``>``. Returns ``(k, W)``."""
    n = int(p.numel())
    neg = -math.inf
    dp = torch.full((budget + 1,), neg, dtype=torch.float64)
    dp[0] = 0.0
    choice = torch.zeros((n, budget + 1), dtype=torch.long)
    for i in range(n):
        best = dp.clone()  # k = 0: the item gets nothing (value 0)
        pick = torch.zeros(budget + 1, dtype=torch.long)
        for k in range(1, min(max_extra, budget) + 1):
            cand = torch.full_like(dp, neg)
            cand[k:] = dp[:-k] + knapsack_value(p[i], base + k)
            better = cand > best
            best = torch.where(better, cand, best)
            pick = torch.where(better, torch.full_like(pick, k), pick)
        dp, choice[i] = best, pick
    reach = int(torch.nonzero(dp > neg).max())
    ks, w = [0] * n, reach
    for i in range(n - 1, -1, -1):
        ks[i] = int(choice[i, w])
        w -= ks[i]
    return ks, reach


def knapsack_allocation(success_rates: Tensor, valid: Tensor, total: int, default_size: int, *, min_size: int = 2,
                        max_size: int = 128, cost: str = "probability", confidence: float = 0.9,
                        fallback: bool = True) -> Tensor:
    """Per-prompt group sizes ``[P]`` (int64, summing to ``total``) by Knapsack RL (arXiv 2509.25849),
    as ``sampling_budget_by_knapsack`` (liziniu/KnapsackRL ca5d5f5 ``verl/trainer/ppo/exploration_utils.py``)
    with ``min_n = negative_n = positive_n = min_size``, ``max_n = max_size``, ``n = default_size``:

    1. a prompt without a valid estimate gets ``default_size``; one with ``p = 0`` or ``p = 1`` gets
       ``min_size``; one with ``0 < p < 1`` gets ``min_size`` and joins the knapsack;
    2. no knapsack item and budget left: the rest is split evenly over the ``p = 0`` prompts (over all
       prompts, when none has ``p = 0``);
    3. otherwise, with ``fallback``: if the items' estimated costs ``sum_i int(min(max_size, c_i))``
       (``c = log(1 - confidence) / log(max(p, 1 - p))`` or ``1/(p(1-p)) - 1``) are below the budget
       left, the difference goes evenly to the prompts outside the knapsack with ``p = 0`` or no
       estimate (to every prompt outside it, when there is none);
    4. the knapsack: extra ``k_i <= max_size - min_size`` maximising ``sum V(min_size + k_i, p_i)``
       (:func:`knapsack_value`, a prompt given no extra adds 0); what it cannot place is split evenly
       over its items (this may pass ``max_size``, as upstream).

    Differences, documented in docs/methods.md: values are float64 (upstream float32 ``p``); step 3 is
    skipped when every prompt is a knapsack item (upstream divides by zero there).
    """
    p = torch.as_tensor(success_rates, dtype=torch.float64).reshape(-1)
    ok = torch.as_tensor(valid, dtype=torch.bool).reshape(-1)
    P = int(p.numel())
    if ok.numel() != P:
        raise ValueError(f"valid: one flag per prompt ({P}), got {ok.numel()}")
    if not 1 <= min_size <= default_size <= max_size:
        raise ValueError(f"sizes: need 1 <= min_size ({min_size}) <= default_size ({default_size}) <= max_size ({max_size})")
    if cost not in ("probability", "expectation"):
        raise ValueError(f"cost: must be 'probability' or 'expectation', got {cost!r}")
    if total < P * default_size:
        raise ValueError(f"total: {total} rollouts cannot give {P} prompts their default {default_size}")
    sizes = [default_size if not bool(ok[i]) else min_size for i in range(P)]
    items = [i for i in range(P) if bool(ok[i]) and 0.0 < float(p[i]) < 1.0]
    zero = [i for i in range(P) if (not bool(ok[i]) or float(p[i]) == 0.0) and i not in items]  # upstream's p array is 0 there too
    left = total - sum(sizes)
    if left > 0 and not items:
        for i, extra in _even_share(left, zero or list(range(P))).items():
            sizes[i] += extra
        return torch.tensor(sizes, dtype=torch.long)
    if fallback and items:
        costs = []
        for i in items:
            q = float(p[i])
            c = (math.log(1 - confidence) / math.log(max(q, 1 - q)) if cost == "probability" else 1.0 / (q * (1 - q)) - 1.0)
            costs.append(int(min(max_size, c)))
        estimated = sum(costs)
        outside = zero or [i for i in range(P) if i not in items]
        if estimated < left and outside:
            for i, extra in _even_share(left - estimated, outside).items():
                sizes[i] += extra
            left = estimated
    if left > 0 and items:
        ks, used = _knapsack_dp(p[items], left, min_size, max_size - min_size)
        for i, k in zip(items, ks):
            sizes[i] += k
        if left > used:
            for i, extra in _even_share(left - used, items).items():
                sizes[i] += extra
    return torch.tensor(sizes, dtype=torch.long)


# --------------------------------------------------------------------------------------------
# GVM-RAFT
# --------------------------------------------------------------------------------------------


def gvm_weights(success_rates: Tensor, grad_norms: Optional[Tensor] = None, *, alpha: float = 1e-3,
                beta: float = 2.0) -> Tensor:
    """``w_i = G_i / sqrt(p_i + alpha / p_i^(beta - 1))`` and 0 where ``G_i = 0`` or ``p_i = 0``: the
    sample share that minimises the gradient variance (GVM-RAFT, arXiv 2505.02391; RLHFlow/GVM d640a75
    ``em/stage_2_calc_sample_size.py`` ``calc_sample_ratio``, before normalisation). ``grad_norms``
    None: every ``G_i = 1``. Float64 ``[P]``."""
    p = torch.as_tensor(success_rates, dtype=torch.float64).reshape(-1)
    g = torch.ones_like(p) if grad_norms is None else torch.as_tensor(grad_norms, dtype=torch.float64).reshape(-1)
    if g.shape != p.shape:
        raise ValueError(f"grad_norms: one per prompt ({p.numel()}), got {g.numel()}")
    live = (p > 0) & (g != 0)
    safe = torch.where(live, p, torch.ones_like(p))
    w = g / torch.sqrt(safe + alpha / safe.pow(beta - 1.0))
    return torch.where(live, w, torch.zeros_like(w))


def round_preserving_sum(shares: Tensor, total: int) -> Tensor:
    """Integers summing to ``total`` from fractions ``shares`` (summing to 1): ``round(share x total)``
    (half to even, as numpy), then the ``|error|`` entries with the largest residual ``x - round(x)`` get
    +1 (or, when over, those with the smallest get -1) (GVM ``float_to_int_preserve_sum``; a stable sort
    breaks ties by position, where numpy's quicksort order is unspecified)."""
    x = torch.as_tensor(shares, dtype=torch.float64).reshape(-1) * int(total)
    out = torch.round(x).to(torch.long)
    error = int(total) - int(out.sum())
    if error:
        resid = x - out.to(torch.float64)
        order = torch.sort(-resid if error > 0 else resid, stable=True).indices[:abs(error)]
        out[order] += 1 if error > 0 else -1
    return out


def gvm_allocation(success_rates: Tensor, valid: Tensor, total: int, default_size: int, *, min_size: int = 1,
                   alpha: float = 1e-3, beta: float = 2.0, filter_threshold: float = 0.0,
                   grad_norms: Optional[Tensor] = None) -> Tensor:
    """Per-prompt group sizes ``[P]`` summing to ``total``: a prompt without a valid estimate gets
    ``default_size``, the others ``min_size`` plus their share of the rest by :func:`gvm_weights`
    (``filter_threshold > 0``: prompts with ``p`` above it get no share), rounded by
    :func:`round_preserving_sum`; when no prompt has a positive weight the rest is split evenly over the
    estimated prompts (over all, when none is). Upstream gives a prompt its whole count from the weights
    (p = 0 prompts get none and are dropped); a drawn prompt here keeps at least ``min_size``."""
    p = torch.as_tensor(success_rates, dtype=torch.float64).reshape(-1)
    ok = torch.as_tensor(valid, dtype=torch.bool).reshape(-1)
    P = int(p.numel())
    if ok.numel() != P:
        raise ValueError(f"valid: one flag per prompt ({P}), got {ok.numel()}")
    if not 1 <= min_size <= default_size:
        raise ValueError(f"sizes: need 1 <= min_size ({min_size}) <= default_size ({default_size})")
    if total < P * default_size:
        raise ValueError(f"total: {total} rollouts cannot give {P} prompts their default {default_size}")
    sizes = torch.where(ok, torch.full((P,), min_size), torch.full((P,), default_size)).to(torch.long)
    left = int(total) - int(sizes.sum())
    if left <= 0:
        return sizes
    w = gvm_weights(p, grad_norms, alpha=alpha, beta=beta)
    w = torch.where(ok, w, torch.zeros_like(w))
    if filter_threshold > 0:
        w = torch.where(p <= filter_threshold, w, torch.zeros_like(w))
    if float(w.sum()) > 0:
        return sizes + round_preserving_sum(w / w.sum(), left)
    idx = [i for i in range(P) if bool(ok[i])] or list(range(P))
    for i, extra in _even_share(left, idx).items():
        sizes[i] += extra
    return sizes


# --------------------------------------------------------------------------------------------
# Beta posteriors: VADE and SPO
# --------------------------------------------------------------------------------------------


def _standard_gamma(shape: Tensor, generator: torch.Generator) -> Tensor:
    """Gamma(shape, 1) draws, float64, from ``generator`` only: Marsaglia and Tsang's method (ACM TOMS
    26(3), 2000) for ``shape >= 1``, ``Gamma(shape + 1) U^(1/shape)`` below 1. Rejections are redrawn in
    rounds over the rows not yet accepted (torch's own sampler takes no generator)."""
    a = torch.as_tensor(shape, dtype=torch.float64).reshape(-1)
    boost = a < 1
    d = torch.where(boost, a + 1, a) - 1.0 / 3.0
    c = 1.0 / torch.sqrt(9.0 * d)
    out = torch.empty_like(a)
    todo = torch.arange(a.numel())
    while todo.numel():
        x = torch.randn(todo.numel(), generator=generator, dtype=torch.float64)
        u = torch.rand(todo.numel(), generator=generator, dtype=torch.float64)
        v = (1 + c[todo] * x) ** 3
        ok = (v > 0) & (torch.log(u) < 0.5 * x * x + d[todo] - d[todo] * v + d[todo] * torch.log(v.clamp(min=1e-300)))
        out[todo[ok]] = (d[todo] * v)[ok]
        todo = todo[~ok]
    if bool(boost.any()):
        u = torch.rand(a.numel(), generator=generator, dtype=torch.float64)
        out = torch.where(boost, out * u.pow(1.0 / a), out)
    return out


def sample_beta(alpha: Tensor, beta: Tensor, generator: torch.Generator) -> Tensor:
    """Draws of ``Beta(alpha_i, beta_i)`` as ``X / (X + Y)`` with ``X ~ Gamma(alpha)``, ``Y ~ Gamma(beta)``
    (:func:`_standard_gamma`, ``generator`` only). Float64 ``[P]``."""
    x = _standard_gamma(alpha, generator)
    y = _standard_gamma(beta, generator)
    return x / (x + y)


def information_gain(p: Tensor) -> Tensor:
    """``p (1 - p)``: the variance of a Bernoulli outcome of success probability ``p``, VADE's
    information-gain score of a prompt (arXiv 2511.18902) and MMR1's outcome variance score."""
    p = torch.as_tensor(p, dtype=torch.float64)
    return p * (1 - p)


class BetaTracker:
    """Per-prompt ``Beta(a, b)`` pseudo-counts of success, decayed at each visit, then incremented:

        anchor "prior" (VADE):  a <- a0 + d (a - a0) + s,   b <- b0 + d (b - b0) + f
        anchor "zero" (SPO):    a <- d a + s,               b <- d b + f

    with ``s``/``f`` the visit's successes/failures (``s`` may be fractional: SPO adds the reward ``r`` and
    ``1 - r``) and ``d = visit_decay x step_decay^(t - t_last)``, ``t`` the step. :meth:`params` reads
    the posterior at a step with the step decay applied. A prompt never seen is ``Beta(a0, b0)``. State is
    plain Python (JSON-exact for checkpoints)."""

    def __init__(self, prior: Tuple[float, float] = (1.0, 1.0), *, visit_decay: float = 1.0, step_decay: float = 1.0,
                 anchor: str = "prior"):
        if anchor not in ("prior", "zero"):
            raise ValueError(f"anchor: must be 'prior' or 'zero', got {anchor!r}")
        self.prior = (float(prior[0]), float(prior[1]))
        self.visit_decay, self.step_decay, self.anchor = float(visit_decay), float(step_decay), anchor
        self._state: Dict[int, List[float]] = {}  # key -> [a, b, step of the last visit]

    def _decayed(self, key: int, step: int, extra: float) -> Tuple[float, float]:
        a0, b0 = self.prior
        if key not in self._state:  # the prior itself: decayed by a visit when anchored at zero (SPO)
            return (extra * a0, extra * b0) if self.anchor == "zero" else (a0, b0)
        a, b, last = self._state[key]
        d = extra * self.step_decay ** max(0, int(step) - int(last))
        if self.anchor == "zero":
            return d * a, d * b
        return a0 + d * (a - a0), b0 + d * (b - b0)

    def params(self, keys: Sequence[int], step: int) -> Tuple[Tensor, Tensor]:
        """``(a, b)`` float64 ``[len(keys)]`` at ``step`` (step decay since each key's last visit)."""
        ab = [self._decayed(int(k), step, 1.0) for k in keys]
        t = torch.tensor(ab, dtype=torch.float64).reshape(len(ab), 2)
        return t[:, 0], t[:, 1]

    def observe(self, key: int, successes: float, failures: float, step: int, decay: Optional[float] = None) -> None:
        """One visit of prompt ``key`` at ``step`` (``decay``: this visit's instead of ``visit_decay``)."""
        a, b = self._decayed(int(key), step, self.visit_decay if decay is None else float(decay))
        self._state[int(key)] = [a + float(successes), b + float(failures), int(step)]

    def state_dict(self) -> Dict[str, Any]:
        return {"keys": list(self._state), "values": [list(v) for v in self._state.values()]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._state = {int(k): [float(v[0]), float(v[1]), int(v[2])] for k, v in zip(state["keys"], state["values"])}


def spo_advantages(rewards: Tensor, baseline: Tensor, valid: Tensor, eps: float = 1e-8) -> Tensor:
    """Single-stream policy optimisation (SPO, arXiv 2509.13232; verl-recipe 48ea0a7
    ``spo/spo_ray_trainer.py``): ``A_i = r_i - p^_i`` with ``p^`` the prompt's tracked value before this
    step's update, then ``(A - mean(A)) / (std(A) + eps)`` over the valid samples (Bessel std, torch's
    default as upstream); invalid samples get 0. Float64 ``[N]``."""
    r = torch.as_tensor(rewards, dtype=torch.float64)
    ok = torch.as_tensor(valid, dtype=torch.bool) & torch.isfinite(r)
    a = torch.where(ok, r - torch.as_tensor(baseline, dtype=torch.float64), torch.zeros_like(r))
    x = a[ok]
    if x.numel() == 0:
        return torch.zeros_like(r)
    std = x.std() if x.numel() > 1 else torch.zeros((), dtype=torch.float64)
    return torch.where(ok, (a - x.mean()) / (std + eps), torch.zeros_like(r))


def spo_kl_rho(old_logps: Tensor, new_logps: Tensor, mask: Tensor, *, half: float = 0.06,
               clip: Tuple[float, float] = (0.875, 0.96)) -> Tuple[Tensor, Tensor]:
    """SPO's adaptive decay (verl-recipe 48ea0a7 ``spo/spo_ray_trainer.py`` ``_get_spo_rho``, ``rho.type kl``):
    the drift ``D = mean_t |log pi_old(y_t) - log pi_new(y_t)|`` over the response tokens of the prompt's
    previous response (``old``: stored after that visit's update, ``new``: the policy now), and
    ``rho = clip(2^(-D / half), clip)``. ``[M, L]`` inputs; returns ``(rho, D)`` float64 ``[M]``."""
    m = torch.as_tensor(mask).to(torch.float64)
    diff = (torch.as_tensor(old_logps, dtype=torch.float64) - torch.as_tensor(new_logps, dtype=torch.float64)).abs()
    D = (diff * m).sum(-1) / m.sum(-1).clamp(min=1.0)
    rho = torch.pow(torch.tensor(2.0, dtype=torch.float64), -D / float(half)).clamp(float(clip[0]), float(clip[1]))
    return rho, D


def spo_prompt_weights(p_hat: Tensor, explore: float = 0.05) -> Tensor:
    """SPO's prompt-sampling weights ``sqrt(p^(1 - p^)) + explore`` (``EXPLORATION_EPSILON = 0.05``)."""
    return information_gain(p_hat).clamp(min=0).sqrt() + float(explore)


def mmr1_weights(p: Tensor, eps: float = 1e-8) -> Tensor:
    """MMR1's curriculum weights (LengSicong/MMR1 d8161a0 ``verl/trainer/ray_trainer.py``
    ``_compute_curriculum_weights`` with the shipped ``curriculum_metrics: [learnability]``, weight 1):
    the learnability ``p (1 - p)`` min-max scaled, ``(w - min) / (max - min + eps)``. Float64."""
    w = information_gain(p)
    return (w - w.min()) / (w.max() - w.min() + eps)


# --------------------------------------------------------------------------------------------
# success history (Knapsack RL's estimate, used by knapsack, gvm and mmr1)
# --------------------------------------------------------------------------------------------


class SuccessHistory:
    """Each prompt's success rate as KnapsackRL estimates it (``rl_dataset.py`` ``update_sample_state``
    with ``epoch_estimation`` and ``robust_epoch_estimation`` on): after a visit with outcomes ``o``, the
    rate is ``mean(o)`` when ``len(o) >= history``, else the mean of the prompt's last ``history``
    outcomes; the estimate is valid once ``min_history`` outcomes were recorded. Only the last
    ``history`` outcomes are kept (all the estimate reads).

    ``values`` (optional, one per outcome, NaN where none): a per-sample quantity averaged over the
    same outcomes as the rate, successes only (GVM's ``G_i``: 0 when none of them succeeded)."""

    def __init__(self, history: int = 16, min_history: int = 8):
        self.history, self.min_history = int(history), int(min_history)
        # key -> [count, rate, deque of recent outcomes, value mean, deque of recent values]
        self._state: Dict[int, List[Any]] = {}

    def observe(self, key: int, outcomes: Sequence[float], values: Optional[Sequence[float]] = None) -> None:
        outs = [float(o) for o in outcomes]
        if not outs:
            return
        vals = [float("nan")] * len(outs) if values is None else [float(v) for v in values]
        if len(vals) != len(outs):
            raise ValueError(f"values: one per outcome ({len(outs)}), got {len(vals)}")
        count, _, recent, _, recent_v = self._state.get(
            int(key), [0, 0.0, deque(maxlen=self.history), 0.0, deque(maxlen=self.history)])
        recent.extend(outs)
        recent_v.extend(vals)
        window = (outs, vals) if len(outs) >= self.history else (list(recent), list(recent_v))
        rate = sum(window[0]) / len(window[0])
        won = [v for o, v in zip(*window) if o > 0 and math.isfinite(v)]
        self._state[int(key)] = [count + len(outs), rate, recent, sum(won) / len(won) if won else 0.0, recent_v]

    def values(self, keys: Sequence[int]) -> Tensor:
        """``[P]`` float64: each prompt's value mean over its successes (0 for a prompt never seen)."""
        return torch.tensor([float(self._state[int(k)][3]) if int(k) in self._state else 0.0 for k in keys],
                            dtype=torch.float64)

    def rates(self, keys: Sequence[int]) -> Tuple[Tensor, Tensor]:
        """``(valid [P] bool, rate [P] float64)``; a prompt never seen has rate 0."""
        valid, rate = [], []
        for k in keys:
            count, r = self._state.get(int(k), [0, 0.0])[:2]
            valid.append(count >= self.min_history)
            rate.append(r)
        return torch.tensor(valid, dtype=torch.bool), torch.tensor(rate, dtype=torch.float64)

    def state_dict(self) -> Dict[str, Any]:
        return {"keys": list(self._state),
                "values": [[c, r, list(q), g, list(qv)] for c, r, q, g, qv in self._state.values()]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        def entry(c, r, q, g=0.0, qv=None):  # checkpoints before per-sample values: none recorded
            qv = [float("nan")] * len(q) if qv is None else qv
            return [int(c), float(r), deque((float(x) for x in q), maxlen=self.history), float(g),
                    deque((float(x) for x in qv), maxlen=self.history)]
        self._state = {int(k): entry(*v) for k, v in zip(state["keys"], state["values"])}


# --------------------------------------------------------------------------------------------
# the loop's budget
# --------------------------------------------------------------------------------------------

Walk = Callable[[int, int], List[int]]  # (count, step) -> record indices of the epoch walk


class RolloutBudget:
    """The step's prompts and their group sizes (:meth:`choose`), from statistics of earlier steps
    (:meth:`observe`). Every process holds an identical copy: its inputs are the seed, the step and the
    gathered rewards. ``walk(count, step)`` is the usual epoch walk (``flowrl.train.data.choose_prompts``)."""

    def __init__(self, cfg: BudgetConfig, *, num_records: int, prompts_per_step: int, group_size: int, seed: int):
        self.cfg, self.num_records, self.P, self.G, self.seed = cfg, int(num_records), int(prompts_per_step), int(group_size), int(seed)
        k = cfg.kind
        self.history = SuccessHistory(cfg.history, cfg.min_history) if k in ("knapsack", "gvm", "mmr1") else None
        if k == "vade":
            v = cfg.vade
            self.beta = BetaTracker(v.prior, visit_decay=v.visit_decay, step_decay=v.step_decay, anchor="prior")
        elif k == "single_stream":
            s = cfg.single_stream
            self.beta = BetaTracker(s.prior, visit_decay=s.rho, anchor="zero")
        else:
            self.beta = None
        self.mmr1_weights: Optional[List[float]] = None  # the weights in use (recomputed every update_every steps)
        # SPO rho kl: each prompt's last response (prompt tokens, response tokens, their log-probs after that
        # visit's update), the same on every process; checkpointed as tensors (:meth:`tensor_state`)
        self.responses: Dict[int, Tuple[List[int], List[int], List[float]]] = {}

    @property
    def spo_kl(self) -> bool:
        """SPO with the adaptive decay: the loop scores each prompt's previous response after the update."""
        return self.cfg.kind == "single_stream" and self.cfg.single_stream.rho_type == "kl"

    # -- the step's choice -----------------------------------------------------------------------
    def choose(self, step: int, walk: Walk) -> Tuple[List[int], List[int]]:
        """``(record index per position, group size per position)`` of step ``step``."""
        k, P, G = self.cfg.kind, self.P, self.G
        if k == "vade":
            return self._vade(step), [G] * P
        if k == "mmr1":
            return self._mmr1(step, walk), [G] * P
        if k == "single_stream":
            return self._spo(step), [1] * P
        chosen = walk(P, step)
        if k == "uniform":
            return chosen, [G] * P
        valid, p = self.history.rates(chosen)
        if k == "knapsack":
            c = self.cfg.knapsack
            sizes = knapsack_allocation(p, valid, P * G, G, min_size=c.min_size, max_size=c.max_size, cost=c.cost,
                                        confidence=c.confidence, fallback=c.fallback)
        else:
            c = self.cfg.gvm
            g = self.history.values(chosen) if c.grad_norms != "none" else None
            sizes = gvm_allocation(p, valid, P * G, G, min_size=c.min_size, alpha=c.alpha, beta=c.beta,
                                   filter_threshold=c.filter_threshold, grad_norms=g)
        return chosen, [int(s) for s in sizes]

    def _generator(self, step: int) -> torch.Generator:
        return rng.generator(self.seed, "budget", self.cfg.kind, step)

    def _vade(self, step: int) -> List[int]:
        """The ``P`` prompts of largest ``p~(1 - p~)``, ``p~ ~ Beta(a_i, b_i)`` drawn for every record
        (ties: the lower index)."""
        a, b = self.beta.params(range(self.num_records), step)
        gain = information_gain(sample_beta(a, b, self._generator(step)))
        order = torch.sort(-gain, stable=True).indices
        return order[:self.P].tolist() if self.P <= self.num_records else [int(order[i % self.num_records]) for i in range(self.P)]

    def _mmr1(self, step: int, walk: Walk) -> List[int]:
        """``int(P x mix)`` records drawn with replacement by :func:`mmr1_weights` (uniform when all are
        0), interleaved with the epoch walk's ``P - int(P x mix)`` (weighted first), as
        ``MixedCurriculumSampler``. A prompt never seen counts as ``p = 0.5``."""
        c = self.cfg.mmr1
        if self.mmr1_weights is None or step % c.update_every == 0:
            valid, p = self.history.rates(range(self.num_records))
            self.mmr1_weights = mmr1_weights(torch.where(valid, p, torch.full_like(p, 0.5))).tolist()
        n_w = int(self.P * c.mix)
        w = torch.tensor(self.mmr1_weights, dtype=torch.float64)
        if float(w.sum()) <= 0:
            w = torch.ones_like(w)
        weighted = torch.multinomial(w, n_w, replacement=True, generator=self._generator(step)).tolist() if n_w else []
        rand = walk(self.P - n_w, step) if self.P > n_w else []
        out = []
        for i in range(max(len(weighted), len(rand))):
            out += weighted[i:i + 1] + rand[i:i + 1]
        return out

    def _spo(self, step: int) -> List[int]:
        """``P`` records drawn by :func:`spo_prompt_weights` of their values, without replacement when
        there are enough records (upstream ``np.random.choice(..., replace=P > M)``)."""
        a, b = self.beta.params(range(self.num_records), step)
        w = spo_prompt_weights(a / (a + b), self.cfg.single_stream.explore)
        if float(w.sum()) <= 0:
            w = torch.ones_like(w)
        return torch.multinomial(w, self.P, replacement=self.P > self.num_records, generator=self._generator(step)).tolist()

    # -- what the step saw -----------------------------------------------------------------------
    def baseline(self, records: Sequence[int], step: int) -> Tensor:
        """SPO's ``p^ = a / (a + b)`` of each row's prompt before this step's update (float64)."""
        a, b = self.beta.params(records, step)
        return a / (a + b)

    def observe(self, step: int, records: Sequence[int], totals: Tensor, grad_norms: Optional[Tensor] = None,
                decays: Optional[Dict[int, float]] = None) -> None:
        """The step's rows (all processes): each row's record index and weighted total reward (NaN:
        invalid, skipped). One visit per record, its rows in order. ``grad_norms`` (gvm with
        ``grad_norms: embedding``): each row's gradient norm, NaN where not computed. ``decays`` (SPO rho
        kl): each record's decay of this visit."""
        t = torch.as_tensor(totals, dtype=torch.float64).reshape(-1).tolist()
        gn = [float("nan")] * len(t) if grad_norms is None else \
            torch.as_tensor(grad_norms, dtype=torch.float64).reshape(-1).tolist()
        per: Dict[int, List[float]] = {}
        per_g: Dict[int, List[float]] = {}
        for r, v, g in zip(records, t, gn):
            if math.isfinite(v):
                per.setdefault(int(r), []).append(v)
                per_g.setdefault(int(r), []).append(g)
        thr = self.cfg.success_threshold
        for r, vals in per.items():
            if self.history is not None:
                self.history.observe(r, [1.0 if v >= thr else 0.0 for v in vals], per_g[r])
            elif self.cfg.kind == "vade":
                s = sum(1 for v in vals if v >= thr)
                self.beta.observe(r, s, len(vals) - s, step)
            elif self.cfg.kind == "single_stream":
                self.beta.observe(r, sum(vals), sum(1.0 - v for v in vals), step,
                                  decay=None if decays is None else decays[r])

    def remember(self, records: Sequence[int], entries: Sequence[Tuple[List[int], List[int], List[float]]]) -> None:
        """SPO rho kl: each record's response of this step (the last one when a record has several)."""
        for r, e in zip(records, entries):
            self.responses[int(r)] = (list(map(int, e[0])), list(map(int, e[1])), list(map(float, e[2])))

    def tensor_state(self) -> Optional[Dict[str, Tensor]]:
        """The remembered responses as flat tensors (their size grows with the prompts seen), or None."""
        if not self.spo_kl:
            return None
        keys = list(self.responses)
        vals = [self.responses[k] for k in keys]
        return {"keys": torch.tensor(keys, dtype=torch.long),
                "prompt_lens": torch.tensor([len(v[0]) for v in vals], dtype=torch.long),
                "response_lens": torch.tensor([len(v[1]) for v in vals], dtype=torch.long),
                "prompt_ids": torch.tensor([t for v in vals for t in v[0]], dtype=torch.long),
                "response_ids": torch.tensor([t for v in vals for t in v[1]], dtype=torch.long),
                "logps": torch.tensor([x for v in vals for x in v[2]], dtype=torch.float32)}

    def load_tensor_state(self, state: Dict[str, Tensor]) -> None:
        pl, rl = state["prompt_lens"].tolist(), state["response_lens"].tolist()
        pids = state["prompt_ids"].split(pl) if pl else []
        rids = state["response_ids"].split(rl) if rl else []
        lps = state["logps"].split(rl) if rl else []
        self.responses = {int(k): (p.tolist(), r.tolist(), lp.tolist())
                          for k, p, r, lp in zip(state["keys"].tolist(), pids, rids, lps)}

    def state_dict(self) -> Dict[str, Any]:
        return {"kind": self.cfg.kind,
                "history": self.history.state_dict() if self.history is not None else None,
                "beta": self.beta.state_dict() if self.beta is not None else None,
                "mmr1_weights": self.mmr1_weights}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("kind") != self.cfg.kind:
            raise ValueError(f"state: saved for budget.kind {state.get('kind')!r}, the run has {self.cfg.kind!r}")
        if self.history is not None:
            self.history.load_state_dict(state["history"])
        if self.beta is not None:
            self.beta.load_state_dict(state["beta"])
        self.mmr1_weights = state.get("mmr1_weights")
