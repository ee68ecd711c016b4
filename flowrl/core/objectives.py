"""Forward-process objectives: a gradient from clean samples and their advantages (torch only).

``likelihood`` (the default) trains the per-step Gaussian log-probs of stochastic transitions
(:mod:`flowrl.core.losses`). The objectives here need per sample only the clean latent ``x0``, the
prompt and the advantage: a timestep ``sigma``, fresh noise ``eps``, ``x_t = (1 - sigma) x0 +
sigma eps`` and the flow-matching target ``u = eps - x0``, so any sampler (ODE, DPM-Solver, few
steps) and no CFG in training:

* ``nft``: DiffusionNFT (arXiv 2509.16117): flow matching towards an implicit positive policy
  weighted by r, towards a negative one by 1 - r (:func:`nft_loss`);
* ``awm``: Advantage Weighted Matching (arXiv 2509.25050): the advantage-weighted matching loss as a
  PPO-style ratio of "log-probs" -(weighted matching loss) (:func:`awm_loss`);
* ``dgpo``: Direct Group Preference Optimisation (arXiv 2510.08425): a sigmoid of the group's
  advantage-weighted implicit reward (:func:`dgpo_loss`);
* ``dpo``: online Diffusion-DPO (Wallace et al., arXiv 2311.12908) on each group's best/worst pair
  (:func:`dpo_loss`).

The upstream files and commits each formula was checked against: ``docs/methods.md``
("Forward-process objectives").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from flowrl.core.checks import check_number
from flowrl.core.losses import mean_sq_diff

__all__ = [
    "OBJECTIVES",
    "ObjectiveConfig",
    "OldPolicyConfig",
    "awm_log_prob",
    "awm_loss",
    "best_worst_pairs",
    "dgpo_loss",
    "dpo_loss",
    "dsm_clip_mask",
    "nft_loss",
    "nft_reward_weight",
    "old_decay",
]

OBJECTIVES = ("likelihood", "nft", "awm", "dgpo", "dpo")
TIMESTEP_DRAWS = ("permutation", "stratified", "logit_normal")
SHARES = ("sample", "group", "batch")
AWM_WEIGHTINGS = ("uniform", "t", "t2", "ghuber")


@dataclass
class OldPolicyConfig:
    """The old policy: a copy of the trained weights that follows them as
    ``theta_old <- d theta_old + (1 - d) theta`` once per training step, with
    ``d = 0`` for ``decay_flat`` optimizer steps, then ``min((s - flat) decay_rate, decay_max)``
    (:func:`old_decay`; DiffusionNFT's ``return_decay``)."""

    decay_flat: int = 0
    decay_rate: float = 0.001
    decay_max: float = 0.5
    sample_from: Optional[int] = None  # optimizer step from which the old policy samples the rollouts (None: never)

    def validate(self) -> "OldPolicyConfig":
        if isinstance(self.decay_flat, bool) or not isinstance(self.decay_flat, int) or self.decay_flat < 0:
            raise ValueError(f"decay_flat: must be an int >= 0, got {self.decay_flat!r}")
        check_number("decay_rate", self.decay_rate, ge=0.0)
        check_number("decay_max", self.decay_max, ge=0.0, lt=1.0)
        if self.sample_from is not None and (isinstance(self.sample_from, bool) or not isinstance(self.sample_from, int)
                                             or self.sample_from < 0):
            raise ValueError(f"sample_from: must be null or an int >= 0, got {self.sample_from!r}")
        return self


@dataclass
class ObjectiveConfig:
    """How a rollout and its advantages become a gradient. ``likelihood`` ignores every other field."""

    kind: str = "likelihood"  # likelihood | nft | awm | dgpo | dpo
    beta: float = 1.0  # nft: the implicit policies' strength; dgpo, dpo: the preference temperature (100)
    adv_clip: float = 5.0  # advantages clipped to +-adv_clip (nft: r from clip(A)/c; awm: weight clip(A)/c; dgpo: clip(A))
    timesteps: str = "permutation"  # permutation (k distinct steps, random order) | stratified (one per stratum) | logit_normal
    num_timesteps: int = 1  # timesteps trained per sample (each a separate forward and backward)
    timestep_first: int = 0  # eligible rollout steps: [timestep_first, int(num_steps * timestep_fraction))
    timestep_fraction: float = 1.0
    timestep_share: str = "sample"  # one draw per sample | group | batch (every row of the step)
    noise_share: str = "sample"  # eps per sample | group (members share eps at each timestep: dgpo, dpo)
    kl_beta: float = 0.0  # + kl_beta mean_d (v_theta - v_ref)^2, v_ref the base model (adapters disabled)
    old_kl_beta: float = 0.0  # + old_kl_beta mean_d (v_theta - v_old)^2 (AWM's KL to its EMA adapter)
    clip_range: Optional[float] = None  # awm: ratio clip; dgpo: the DSM clip against the old policy (None: off)
    weighting: str = "ghuber"  # awm: the log-prob's weighting of the matching error
    ghuber_power: float = 0.25  # awm: p of the generalised Huber weighting
    guidance_scale: float = 1.0  # the training forward's guidance (1: no CFG on SD3; FLUX: its embedded guidance)
    old: OldPolicyConfig = field(default_factory=OldPolicyConfig)

    @property
    def forward(self) -> bool:
        """Whether this is a forward-process objective (not ``likelihood``)."""
        return self.kind != "likelihood"

    @property
    def old_velocity(self) -> bool:
        """Whether the loss needs the old policy's velocity (nft, ``old_kl_beta``, dgpo's clip)."""
        return self.forward and (self.kind == "nft" or self.old_kl_beta > 0
                                 or (self.kind == "dgpo" and self.clip_range is not None))

    @property
    def needs_old(self) -> bool:
        """Whether the run keeps an old policy (its velocity enters the loss, or it samples)."""
        return self.forward and (self.old_velocity or self.old.sample_from is not None)

    @property
    def needs_reference(self) -> bool:
        return self.forward and (self.kl_beta > 0 or self.kind in ("dgpo", "dpo"))

    def validate(self) -> "ObjectiveConfig":
        if self.kind not in OBJECTIVES:
            raise ValueError(f"kind: unknown objective {self.kind!r}; choose one of {', '.join(OBJECTIVES)}")
        check_number("beta", self.beta, gt=0.0)
        check_number("adv_clip", self.adv_clip, gt=0.0)
        if self.timesteps not in TIMESTEP_DRAWS:
            raise ValueError(f"timesteps: must be one of {TIMESTEP_DRAWS}, got {self.timesteps!r}")
        for name in ("num_timesteps", "timestep_first"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "num_timesteps" else 0):
                raise ValueError(f"{name}: must be an int >= {1 if name == 'num_timesteps' else 0}, got {v!r}")
        check_number("timestep_fraction", self.timestep_fraction, gt=0.0, le=1.0)
        for name in ("timestep_share", "noise_share"):
            if getattr(self, name) not in SHARES:
                raise ValueError(f"{name}: must be one of {SHARES}, got {getattr(self, name)!r}")
        if self.noise_share == "batch":
            raise ValueError("noise_share: 'batch' would give every prompt the same noise; use 'sample' or 'group'")
        check_number("kl_beta", self.kl_beta, ge=0.0)
        check_number("old_kl_beta", self.old_kl_beta, ge=0.0)
        check_number("clip_range", self.clip_range, gt=0.0, none_ok=True)
        if self.weighting not in AWM_WEIGHTINGS:
            raise ValueError(f"weighting: must be one of {AWM_WEIGHTINGS}, got {self.weighting!r}")
        check_number("ghuber_power", self.ghuber_power, gt=0.0)
        check_number("guidance_scale", self.guidance_scale, ge=0.0)
        if self.kind == "dpo" and self.timestep_share == "sample":
            raise ValueError("timestep_share: dpo compares a pair at one timestep; use 'group' or 'batch'")
        if self.kind == "dgpo" and self.timestep_share == "sample":
            raise ValueError("timestep_share: dgpo compares a group at one timestep; use 'group' or 'batch'")
        self.old.validate()
        return self


# --------------------------------------------------------------------------------------------------
# shared pieces
# --------------------------------------------------------------------------------------------------


def old_decay(step: int, flat: int, rate: float, cap: float) -> float:
    """``d(s) = 0`` for ``s < flat``, else ``min((s - flat) rate, cap)``: the old policy's decay at
    optimizer step s (DiffusionNFT ``return_decay``: type 1 = (0, 0.001, 0.5), type 2 = (75, 0.0075,
    0.999); AWM's KL adapter and DGPO's ``ema_ref``: (0, 0.001, 0.3))."""
    if step < flat:
        return 0.0
    return min((step - flat) * rate, cap)


def _col(x: Tensor, like: Tensor) -> Tensor:
    """A per-sample ``[B]`` tensor shaped to broadcast against ``like`` ``[B, ...]``."""
    return x.reshape(-1, *([1] * (like.ndim - 1)))


# --------------------------------------------------------------------------------------------------
# DiffusionNFT
# --------------------------------------------------------------------------------------------------


def nft_reward_weight(adv: Tensor, clip: float) -> Tensor:
    """``r = clamp(clip(A, -c, c) / (2c) + 1/2, 0, 1)`` in [0, 1] (A = 0 gives 1/2)."""
    a = adv.clamp(-clip, clip)
    return (a / clip / 2 + 0.5).clamp(0, 1)


def nft_loss(v_theta: Tensor, v_old: Tensor, x_t: Tensor, x0: Tensor, sigma: Tensor, adv: Tensor,
             beta: float, clip: float) -> Tensor:
    """DiffusionNFT's per-sample loss ``[B]`` (arXiv 2509.16117, Alg. 1).

    With ``r`` = :func:`nft_reward_weight`, the implicit policies ``v+ = beta v + (1 - beta) v_old``,
    ``v- = (1 + beta) v_old - beta v``, their clean estimates ``x0± = x_t - sigma v±``, the
    detached adaptive weights ``w± = max(mean_d |x0± - x0|, 1e-5)`` (float64):
    ``l = c (r mean_d (x0+ - x0)^2 / w+ + (1 - r) mean_d (x0- - x0)^2 / w-) / beta``.
    ``v_old`` is treated as a constant."""
    v_old = v_old.detach()
    s = _col(sigma, x0)
    r = _col(nft_reward_weight(adv, clip), x0).to(torch.float64)
    dims = tuple(range(1, x0.ndim))

    def branch(v: Tensor) -> Tensor:
        err = x_t - s * v - x0
        with torch.no_grad():
            w = err.double().abs().mean(dims, keepdim=True).clamp_min(1e-5)
        return (err ** 2 / w).mean(dims)

    pos = branch(beta * v_theta + (1 - beta) * v_old)
    neg = branch((1 + beta) * v_old - beta * v_theta)
    return clip * (r.reshape(-1) * pos + (1 - r.reshape(-1)) * neg) / beta


# --------------------------------------------------------------------------------------------------
# AWM
# --------------------------------------------------------------------------------------------------


def awm_log_prob(v: Tensor, target: Tensor, sigma: Tensor, weighting: str = "ghuber", power: float = 0.25) -> Tensor:
    """AWM's "log-prob" ``[B]`` (float64): minus the weighted matching error ``e = mean_d (v - u)^2``.

    uniform: ``-e``; t: ``-sigma e``; t2: ``-sigma^2 e``;
    ghuber: ``-sigma ((e + 1e-10)^p - 1e-10^p) / p`` (the reference's default, p = 1/4)."""
    e = mean_sq_diff(v.double(), target.double())
    s = sigma.double().reshape(-1)
    if weighting == "uniform":
        return -e
    if weighting == "t":
        return -s * e
    if weighting == "t2":
        return -(s ** 2) * e
    if weighting == "ghuber":
        eps = torch.tensor(1e-10, dtype=torch.float64)
        return -s * ((e + eps) ** power - eps ** power) / power
    raise ValueError(f"weighting: must be one of {AWM_WEIGHTINGS}, got {weighting!r}")


def awm_loss(logp: Tensor, logp_old: Tensor, adv: Tensor, clip: float, clip_range: Optional[float]) -> Tensor:
    """AWM's per-sample policy loss ``[B]``: ``max(-A w, -A clamp(w, 1 - eps, 1 + eps))`` with
    ``w = exp(logp - logp_old)`` and ``A = clip(adv, -c, c) / c`` (arXiv 2509.25050). On-policy
    (``logp_old = logp.detach()``) ``w = 1`` and the gradient is ``-A grad logp``."""
    a = adv.double().clamp(-clip, clip) / clip
    w = torch.exp(logp - logp_old.detach())
    if clip_range is None:
        return -a * w
    return torch.maximum(-a * w, -a * w.clamp(1 - clip_range, 1 + clip_range))


# --------------------------------------------------------------------------------------------------
# DGPO and DPO
# --------------------------------------------------------------------------------------------------


def dsm_clip_mask(e_theta: Tensor, e_old: Tensor, adv: Tensor, clip_range: float) -> Tensor:
    """DGPO's PPO-style clip on the matching error: with ``w = exp(e_old - e_theta)``, a sample is
    clipped (its error detached) when ``A > 0`` and ``w > 1 + eps``, or ``A <= 0`` and ``w < 1 - eps``."""
    w = torch.exp(e_old.detach() - e_theta.detach())
    return torch.where(adv > 0, w > 1 + clip_range, w < 1 - clip_range)


def dgpo_loss(e_theta: Tensor, e_ref: Tensor, adv: Tensor, group: Tensor, beta: float, group_size: int,
              clipped: Optional[Tensor] = None) -> Tensor:
    """DGPO's per-sample surrogate ``[B]`` (arXiv 2510.08425): ``w_i A_i e_i`` with
    ``S_g = beta / G sum_{i in g} A_i (sg(e_i) - e_ref,i)`` and ``w_i = sg(sigmoid(S_g(i)))``.

    Its gradient is ``G / (beta B)`` times that of ``sum_g softplus(S_g)`` (its value is not that loss
    and can be negative); ``G`` is the configured group size, ``clipped`` samples
    (:func:`dsm_clip_mask`) add to ``S_g`` but get no gradient."""
    e = e_theta if clipped is None else torch.where(clipped, e_theta.detach(), e_theta)
    per = adv * beta * (e_theta.detach() - e_ref.detach()) / group_size
    _, inv = torch.unique(group, return_inverse=True)
    s = torch.zeros(int(inv.max()) + 1 if inv.numel() else 0, dtype=per.dtype, device=per.device).index_add_(0, inv, per)
    w = torch.sigmoid(s)[inv].detach()
    return w * adv * e


def dpo_loss(e_win: Tensor, e_lose: Tensor, e_ref_win: Tensor, e_ref_lose: Tensor, beta: float) -> Tensor:
    """Diffusion-DPO per pair ``[P]``: ``softplus(beta / 2 ((e_w - e_ref,w) - (e_l - e_ref,l)))``
    (arXiv 2311.12908 with flow_grpo's and Flow-Factory's factor 1/2)."""
    return F.softplus(0.5 * beta * ((e_win - e_ref_win.detach()) - (e_lose - e_ref_lose.detach())))


def best_worst_pairs(adv: Tensor, group: Tensor, valid: Tensor) -> Tensor:
    """``[P, 2]`` row indices (winner, loser): per group the highest and the lowest advantage among its
    valid rows (first row on ties); groups with fewer than two valid rows or no spread give no pair."""
    out = []
    for g in torch.unique(group).tolist():
        rows = ((group == g) & valid).nonzero().flatten()
        if rows.numel() < 2:
            continue
        a = adv[rows]
        hi, lo = int(torch.argmax(a)), int(torch.argmin(a))
        if not bool(a[hi] > a[lo]):
            continue
        out.append((int(rows[hi]), int(rows[lo])))
    return torch.tensor(out, dtype=torch.long).reshape(-1, 2)
