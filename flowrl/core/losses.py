"""The policy-loss core shared by the flow (image) path and the LLM (text) path (torch only).

Both paths call :func:`policy_loss` with per-action tensors ``[N, T]`` (text: tokens of a
completion; flow: trained denoising steps of a trajectory, with a :class:`StepTerms` bundle)::

    log w  = log pi - log pi_old                 (per token; GSPO: masked mean over t)
    l      = -min(w A, clip(w, 1 - eps_lo, 1 + eps_hi) A) + beta KL
    loss   = sum_{i,t} m l / normalizer

PPO clipping (Schulman et al., arXiv 1707.06347) as in GRPO (Shao et al., arXiv 2402.03300), with
the variants DAPO, Dr. GRPO, GSPO, CISPO, SAPO and GRPO-Guard's RatioNorm as options. The
normaliser is an explicit argument: compute it once per optimizer step with
:func:`loss_normalizers` over the whole optimizer batch, so micro-batch losses sum to the full-batch
loss exactly. :func:`loss_preset` names TRL 1.16's presets. The full pipeline and why the normaliser
is explicit are in docs/methods.md ("The policy-loss pipeline").
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import torch
from torch import Tensor

from flowrl.core.checks import check_number

logger = logging.getLogger(__name__)

__all__ = [
    "AdaptiveKLController",
    "LossConfig",
    "StepTerms",
    "aggregate",
    "check_keep_schedule",
    "cispo_surrogate",
    "clipped_surrogate",
    "dcpo_clip_bounds",
    "disco_loss",
    "disco_objective",
    "dt_reweight",
    "gaussian_mean_kl",
    "gtpo_conflict_weights",
    "gtpo_entropy_advantages",
    "kl_coefficient",
    "kl_penalty",
    "linear_ramp",
    "log_importance_weights",
    "loss_normalizers",
    "loss_preset",
    "mean_sq_diff",
    "mean_token_entropy",
    "noise_aware_weights",
    "policy_loss",
    "ratio_normalized_log_ratio",
    "sapo_surrogate",
    "top_fraction_mask",
    "sequence_scores",
    "squared_hinge_penalty",
    "teacher_coefficient",
    "velocity_kl",
]

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "constant", "token-sum")
_SURROGATES = ("clip", "cispo", "sapo", "disco")
_RATIO_LEVELS = ("token", "sequence")
_KL_ESTIMATORS = ("k1", "k2", "k3", "latent", "velocity")
_KL_RATIO = ("none", "token", "importance")
_BETA_SCHEDULES = ("constant", "linear", "adaptive")
_SCOPES = ("optimizer_batch", "micro_batch")
_CLIP_BOUNDS = ("fixed", "dcpo")
KEEP_SCOPES = ("batch", "group")
_DISCO_SCORES = ("log_likelihood", "likelihood_ratio")


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------


@dataclass
class LossConfig:
    """Options of :func:`policy_loss`. Every field has a default; ``validate()`` checks them."""

    surrogate: str = "clip"  # "clip" (PPO/GRPO), "cispo" (MiniMax-M1 2506.13585), "sapo" (2511.20347)
    eps_low: float = 0.2  # lower clip: ratio >= 1 - eps_low (Flow-GRPO uses 1e-4, GRPO-Guard 2e-6)
    eps_high: float | None = None  # ratio <= 1 + eps_high; None = eps_low (DAPO clip-higher: 0.28); CISPO: absolute cap
    delta: float | None = None  # two-sided clip (INTELLECT-2, TRL `delta`): unclipped ratio capped at delta
    dual_clip: float | None = None  # dual-clip c (verl clip_ratio_c, arXiv 1912.09729): for A<0, loss <= -c*A
    ratio_level: str = "token"  # "token" or "sequence" (GSPO 2507.18071: exp(masked mean of log-ratios))
    log_ratio_clamp: float | None = None  # clamp log-ratios to +-value before exp (verl uses 20); None = no clamp
    ratio_norm: bool = False  # GRPO-Guard (2510.22319) RatioNorm: needs StepTerms(std, delta_sq)
    ratio_norm_reweight: bool = True  # with ratio_norm: divide each step's policy loss by |dt| (needs StepTerms.dt_abs)
    sapo_tau_pos: float = 1.0  # SAPO temperature for A > 0
    sapo_tau_neg: float = 1.05  # SAPO temperature for A <= 0
    aggregation: str = "seq-mean-token-mean"  # one of AGGREGATIONS (names as in verl)
    normalizer_scope: str = "optimizer_batch"  # mask given to loss_normalizers ("micro_batch" = TRL bnpo)
    beta: float = 0.0  # KL coefficient (initial value for the schedules)
    kl_estimator: str = "k3"  # "k1", "k2", "k3" (= verl low_var_kl), "latent" (Gaussian means), "velocity"
    kl_ratio_weighted: str = "none"  # KL x ratio: "token" (per-token w), "importance" (surrogate's w, TRL 1.16)
    kl_clamp: float | None = None  # clamp the k-estimator value to +-value (verl clamps k3 to 10)
    kl_drop_dt: bool = True  # latent KL: multiply the exact KL by |dt| (Flow-GRPO divides by std_t^2, not std_t^2 |dt|)
    beta_schedule: str = "constant"  # "constant", "linear" (GRPO-D-style ramp), "adaptive" (controller)
    beta_end: float | None = None  # "linear": value reached after beta_steps
    beta_steps: int = 0  # "linear": ramp length in optimizer steps
    kl_target: float | None = None  # "adaptive": target KL per step
    kl_horizon: int = 10000  # "adaptive": controller horizon (Ziegler et al. 1909.08593)
    # token-level variants of the text path (need token probabilities, ids or entropies: text only)
    clip_bounds: str = "fixed"  # "fixed": [1 - eps_low, 1 + eps_high]; "dcpo": DCPO (2509.02333) bounds from pi_old(token)
    conflict_weight: float | None = None  # GTPO (2508.03772): weight of conflict tokens in A>0 completions (0 in A<0 ones); None: off
    entropy_max: float | None = None  # GTPO: a completion whose mean token entropy exceeds this gets A = 0; None: off
    entropy_scale: float = 0.0  # GTPO: A <- A - entropy_scale * the completion's mean token entropy
    token_keep: float | None = None  # D3S (2509.22115): fraction of tokens kept by |A| * entropy at step 0; None: all
    token_keep_end: float | None = None  # D3S: the fraction reached after token_keep_steps training steps (linear); None: token_keep
    token_keep_steps: int = 0  # D3S: length of that ramp in training steps
    token_keep_scope: str = "batch"  # D3S: tokens ranked over this process's minibatch ("batch") or within each group ("group")
    # -- DisCO (2505.12366; surrogate "disco", text only): its own group loss, see disco_loss --
    disco_score: str = "log_likelihood"  # s(o): "log_likelihood" (mean token log pi, upstream logL) or "likelihood_ratio" (mean token w, Lratio)
    disco_tau: float | None = 10.0  # temperature of the log-sum-exp over a group's negatives; None: their plain mean (DisCO-b)
    disco_delta: float = 1e-4  # KL budget delta of the constraint KL(pi_old || pi_theta) <= delta
    disco_beta: float = 1e3  # squared-hinge penalty weight: beta/2 * max(KL - delta, 0)^2
    disco_kl: str = "k1"  # estimator of the constraint's KL: "k1" (upstream ppo_kl_type 'kl') or "k3" ('low_var_kl')
    # -- KDRL (2506.02208, text only): a reverse KL to a teacher model beside the reference KL --
    teacher_beta: float = 0.0  # coefficient of KL(pi_theta || pi_teacher) (model.teacher); 0: off
    teacher_kl_estimator: str = "k2"  # "k1", "k2" (KDRL's choice) or "k3", on the student's own samples
    teacher_beta_end: float | None = None  # anneal teacher_beta linearly to this over teacher_beta_steps optimizer steps; None: constant
    teacher_beta_steps: int = 0  # length of that ramp in optimizer steps

    @property
    def eps_high_value(self) -> float:
        """``eps_high`` with its default (= ``eps_low``) resolved."""
        return self.eps_low if self.eps_high is None else self.eps_high

    def validate(self) -> "LossConfig":
        """Raise ``ValueError("<field>: <reason>")`` on the first invalid field; return self."""
        if self.surrogate not in _SURROGATES:
            raise ValueError(f"surrogate: must be one of {_SURROGATES}, got {self.surrogate!r}")
        if not (self.eps_low >= 0 and math.isfinite(self.eps_low)):
            raise ValueError(f"eps_low: must be a finite number >= 0, got {self.eps_low!r}")
        if self.surrogate == "clip" and self.eps_low >= 1:
            raise ValueError(f"eps_low: must be < 1 for the clipped surrogate, got {self.eps_low!r}")
        if self.eps_high is not None and not (self.eps_high >= 0 and math.isfinite(self.eps_high)):
            raise ValueError(f"eps_high: must be None or a finite number >= 0, got {self.eps_high!r}")
        check_number("delta", self.delta, gt=1, none_ok=True)
        check_number("dual_clip", self.dual_clip, gt=1, none_ok=True)
        if self.ratio_level not in _RATIO_LEVELS:
            raise ValueError(f"ratio_level: must be one of {_RATIO_LEVELS}, got {self.ratio_level!r}")
        check_number("log_ratio_clamp", self.log_ratio_clamp, gt=0, none_ok=True)
        check_number("sapo_tau_pos", self.sapo_tau_pos, gt=0)
        check_number("sapo_tau_neg", self.sapo_tau_neg, gt=0)
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation: must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.normalizer_scope not in _SCOPES:
            raise ValueError(f"normalizer_scope: must be one of {_SCOPES}, got {self.normalizer_scope!r}")
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise ValueError(f"beta: must be a finite number >= 0, got {self.beta!r}")
        if self.kl_estimator not in _KL_ESTIMATORS:
            raise ValueError(f"kl_estimator: must be one of {_KL_ESTIMATORS}, got {self.kl_estimator!r}")
        if self.kl_ratio_weighted not in _KL_RATIO:
            raise ValueError(f"kl_ratio_weighted: must be one of {_KL_RATIO}, got {self.kl_ratio_weighted!r}")
        if self.kl_ratio_weighted != "none" and self.kl_estimator in ("latent", "velocity"):
            raise ValueError("kl_ratio_weighted: only for the sampled estimators k1/k2/k3")
        check_number("kl_clamp", self.kl_clamp, gt=0, none_ok=True)
        check_number("beta_end", self.beta_end, ge=0, none_ok=True)
        check_number("kl_target", self.kl_target, gt=0, none_ok=True)
        if self.beta_schedule not in _BETA_SCHEDULES:
            raise ValueError(f"beta_schedule: must be one of {_BETA_SCHEDULES}, got {self.beta_schedule!r}")
        if self.beta_schedule == "linear":
            if self.beta_end is None or not (self.beta_end >= 0):
                raise ValueError("beta_end: required (>= 0) for beta_schedule='linear'")
            if not (isinstance(self.beta_steps, int) and self.beta_steps >= 1):
                raise ValueError("beta_steps: must be an int >= 1 for beta_schedule='linear'")
        if self.beta_schedule == "adaptive":
            if self.kl_target is None or not (self.kl_target > 0):
                raise ValueError("kl_target: required (> 0) for beta_schedule='adaptive'")
            if not (isinstance(self.kl_horizon, int) and self.kl_horizon >= 1):
                raise ValueError("kl_horizon: must be an int >= 1")
        self._validate_text_variants()
        self._validate_disco_and_teacher()
        return self

    def _validate_text_variants(self) -> None:
        """The DCPO / GTPO / D3S fields (their ``ValueError("<field>: ...")``)."""
        if self.clip_bounds not in _CLIP_BOUNDS:
            raise ValueError(f"clip_bounds: must be one of {_CLIP_BOUNDS}, got {self.clip_bounds!r}")
        if self.clip_bounds == "dcpo" and (self.surrogate != "clip" or self.ratio_level != "token"):
            raise ValueError("clip_bounds: 'dcpo' bounds each token's ratio: needs surrogate 'clip' and ratio_level 'token'")
        check_number("conflict_weight", self.conflict_weight, ge=0, none_ok=True, why="null: no conflict weighting")
        check_number("entropy_max", self.entropy_max, ge=0, none_ok=True, why="null: no entropy filter")
        check_number("entropy_scale", self.entropy_scale, ge=0)
        check_keep_schedule("token_keep", self.token_keep, self.token_keep_end, self.token_keep_steps,
                            self.token_keep_scope)

    @property
    def needs_entropy(self) -> bool:
        """Whether the loss needs per-token entropies of the policy (GTPO's filter, D3S's token selection)."""
        return self.entropy_max is not None or self.entropy_scale != 0 or self.token_keep is not None

    def text_only_keys(self) -> list[str]:
        """The set fields that need token probabilities, ids or entropies (the text path only)."""
        keys = ["clip_bounds"] if self.clip_bounds != "fixed" else []
        keys += [k for k in ("conflict_weight", "entropy_max", "token_keep") if getattr(self, k) is not None]
        return keys + (["entropy_scale"] if self.entropy_scale != 0 else [])

    def _validate_disco_and_teacher(self) -> None:
        """The fields of DisCO and KDRL."""
        if self.disco_score not in _DISCO_SCORES:
            raise ValueError(f"disco_score: must be one of {_DISCO_SCORES}, got {self.disco_score!r}")
        check_number("disco_tau", self.disco_tau, gt=0, none_ok=True, why="null: mean over the negatives (DisCO-b)")
        check_number("disco_delta", self.disco_delta, ge=0)
        check_number("disco_beta", self.disco_beta, ge=0)
        if self.disco_kl not in ("k1", "k3"):
            raise ValueError(f"disco_kl: must be 'k1' or 'k3', got {self.disco_kl!r}")
        if self.surrogate == "disco" and (self.beta != 0 or self.beta_schedule != "constant"):
            raise ValueError("beta: DisCO bounds KL(pi_old || pi_theta) with its own squared hinge (disco_delta, "
                             "disco_beta) and runs without a reference KL, as upstream; set beta to 0")
        check_number("teacher_beta", self.teacher_beta, ge=0)
        if self.teacher_kl_estimator not in ("k1", "k2", "k3"):
            raise ValueError(f"teacher_kl_estimator: must be 'k1', 'k2' or 'k3', got {self.teacher_kl_estimator!r}")
        check_number("teacher_beta_end", self.teacher_beta_end, ge=0, none_ok=True, why="null: constant teacher_beta")
        if self.teacher_beta_end is not None and not (isinstance(self.teacher_beta_steps, int) and self.teacher_beta_steps >= 1):
            raise ValueError("teacher_beta_steps: must be an int >= 1 when teacher_beta_end is set")
        if self.surrogate == "disco" and self.teacher_beta > 0:
            raise ValueError("teacher_beta: the teacher KL (KDRL) is a term of the clipped-surrogate losses, not of DisCO")


def loss_preset(name: str, **overrides: Any) -> LossConfig:
    """Loss configurations named as users know them, with TRL 1.16 ``GRPOTrainer`` semantics.

    ============  =====================================================================
    name          TRL 1.16 ``loss_type`` / settings reproduced
    ============  =====================================================================
    ``grpo``      ``grpo``: clip surrogate, seq-mean-token-mean
    ``bnpo``      ``bnpo``: token-mean with the *micro-batch* token count (scope micro_batch)
    ``dr_grpo``   ``dr_grpo``: sum / (N * L_max) (Dr. GRPO 2503.20783; pair with ``scale='none'``)
    ``dapo``      ``dapo``: token-mean over the whole optimizer batch, eps_high 0.28 (DAPO 2503.14476)
    ``gspo``      ``grpo`` + ``importance_sampling_level='sequence'``, eps 3e-4 / 4e-4, beta 0 (TRL docs)
    ``cispo``     ``cispo``: -sg(min(w, eps_high)) A log pi, token-mean global, eps_high 5.0 (ScaleRL)
    ``luspo``     ``luspo``: sequence ratio, seq-mean-token-sum (2602.05261)
    ``sapo``      ``sapo``: soft gate, seq-mean-token-mean (2511.20347)
    ============  =====================================================================

    Where these match TRL exactly and where (and why) they differ: docs/methods.md ("Loss presets
    against TRL 1.16").
    """
    base: dict[str, dict[str, Any]] = {
        "grpo": {"aggregation": "seq-mean-token-mean"},
        "bnpo": {"aggregation": "token-mean", "normalizer_scope": "micro_batch"},
        "dr_grpo": {"aggregation": "constant"},
        "dapo": {"aggregation": "token-mean", "eps_high": 0.28},
        "gspo": {"aggregation": "seq-mean-token-mean", "ratio_level": "sequence", "eps_low": 3e-4, "eps_high": 4e-4},
        "cispo": {"surrogate": "cispo", "aggregation": "token-mean", "eps_high": 5.0},
        "luspo": {"aggregation": "seq-mean-token-sum", "ratio_level": "sequence"},
        "sapo": {"surrogate": "sapo", "aggregation": "seq-mean-token-mean"},
    }
    if name not in base:
        raise ValueError(f"name: unknown loss preset {name!r}; choose from {sorted(base)}")
    known = {f.name for f in fields(LossConfig)}
    for key in overrides:
        if key not in known:
            raise ValueError(f"{key}: not a field of LossConfig")
    values = {"kl_estimator": "k3", "kl_ratio_weighted": "importance", **base[name], **overrides}
    return LossConfig(**values).validate()


class StepTerms(NamedTuple):
    """Per-step quantities the flow learner passes for one Gaussian transition per (sample, step).

    All tensors broadcast against ``[N, T]``. Build the mean-square terms with :func:`mean_sq_diff`
    on the latents of each step (they must carry the gradient of mu_theta / v_theta).
    """

    std: Tensor | float | None = None  # s: std of the transition x' ~ N(mu, s^2 I) (Flow-SDE: std_t*sqrt|dt|)
    dt_abs: Tensor | float | None = None  # |dt| of the step (sigma_i - sigma_{i+1})
    delta_sq: Tensor | None = None  # mean_d (mu_theta - mu_old)^2 (RatioNorm bias)
    ref_delta_sq: Tensor | None = None  # mean_d (mu_theta - mu_ref)^2 (latent KL)
    v_ref_delta_sq: Tensor | None = None  # mean_d (v_theta - v_ref)^2 (velocity KL)
    logp_scale: Tensor | float = 1.0  # kappa: given logps = kappa x true Gaussian log-probs (CPS code: 2 s^2)


# --------------------------------------------------------------------------------------------
# pure building blocks
# --------------------------------------------------------------------------------------------


def _broadcast(x: Tensor, shape: torch.Size) -> Tensor:
    """``x`` expanded to ``shape`` (itself if it has that shape already)."""
    return x.expand(shape) if x.shape != shape else x


def _row_mean(x: Tensor, m: Tensor) -> Tensor:
    """Masked mean of each row, ``[N, T] -> [N, 1]``: sum_t x_it / max(1, sum_t m_it) (x is 0 where masked)."""
    return x.sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1).to(x.dtype)


def mean_sq_diff(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample mean over all non-batch dimensions of (a - b)^2: ``[N, ...] -> [N]``.

    The reduction DanceGRPO/Flow-GRPO use for Gaussian log-probs and KLs in latent space.
    """
    if a.shape != b.shape:
        raise ValueError(f"b: shape {tuple(b.shape)} differs from a's {tuple(a.shape)}")
    d = (a - b) ** 2
    return d.reshape(d.shape[0], -1).mean(1)


def log_importance_weights(
    logps: Tensor, old_logps: Tensor, mask: Tensor, level: str = "token", clamp: float | None = None
) -> Tensor:
    """Log importance weights (PPO 1707.06347; GSPO 2507.18071).

    token:    log w_it = log pi_theta(a_it) - log pi_old(a_it)                       -> [N, T]
    sequence: log w_i  = sum_t m_it log w_it / max(1, sum_t m_it)                     -> [N, 1]
    Masked positions are set to 0 (never NaN). ``clamp`` bounds the per-token log-ratio.
    """
    m = mask.to(torch.bool)
    lr = torch.where(m, logps - old_logps, torch.zeros_like(logps))
    if clamp is not None:
        lr = lr.clamp(-clamp, clamp)
    if level == "token":
        return lr
    if level == "sequence":
        return _row_mean(lr, m)
    raise ValueError(f"level: must be 'token' or 'sequence', got {level!r}")


def ratio_normalized_log_ratio(
    log_ratio: Tensor, delta_sq: Tensor, std: Tensor | float, logp_scale: Tensor | float = 1.0
) -> Tensor:
    """GRPO-Guard RatioNorm (arXiv 2510.22319), per sample and per step.

    For one Gaussian step x' = mu_old + s*eps with std s, delta = mu_theta - mu_old and log-probs
    averaged over the D latent elements, the log-ratio is
        Delta = mean(delta*eps)/s - mean(delta^2)/(2 s^2),
    whose expectation -mean(delta^2)/(2 s^2) < 0 and whose 1/s scale change from step to step.
    RatioNorm removes the bias and the scale:
        log w~ = s * (Delta + mean(delta^2)/(2 s^2)) = mean(delta*eps).
    ``logp_scale`` kappa covers log-prob conventions that rescale the true one (the CPS code
    returns -mean (x'-mu)^2, i.e. kappa = 2 s^2): Delta = log_ratio / kappa. Computed per sample
    (the reference script averages the bias over the whole batch by accident; we don't).
    """
    s = torch.as_tensor(std, dtype=log_ratio.dtype, device=log_ratio.device)
    kappa = torch.as_tensor(logp_scale, dtype=log_ratio.dtype, device=log_ratio.device)
    return s * (log_ratio / kappa + delta_sq / (2.0 * s * s))


def clipped_surrogate(
    ratio: Tensor,
    advantages: Tensor,
    eps_low: float,
    eps_high: float,
    delta: float | None = None,
    dual_clip: float | None = None,
) -> Tensor:
    """Per-action clipped surrogate loss (PPO 1707.06347; asymmetric clip DAPO 2503.14476).

    l = -min( min(w, delta) * A, clip(w, 1 - eps_low, 1 + eps_high) * A )
    The ``min(w, delta)`` cap (INTELLECT-2 2505.07291, TRL ``delta``) bounds the unclipped
    branch for A < 0. Dual-clip (Ye et al. 1912.09729, verl ``clip_ratio_c``): for A < 0,
    l <- min(l, -c * A).
    """
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    unclipped = ratio if delta is None else ratio.clamp(max=delta)
    loss = -torch.min(unclipped * advantages, clipped * advantages)
    if dual_clip is not None:
        loss = torch.where(advantages < 0, torch.min(loss, -dual_clip * advantages), loss)
    return loss


def cispo_surrogate(ratio: Tensor, advantages: Tensor, logps: Tensor, eps_high: float) -> Tensor:
    """CISPO (MiniMax-M1, arXiv 2506.13585), as in TRL 1.16: l = -sg(min(w, eps_high)) * A * log pi.

    ``eps_high`` is an absolute cap on the importance weight (ScaleRL recommends 5.0).
    """
    return -ratio.clamp(max=eps_high).detach() * advantages * logps


def sapo_surrogate(ratio: Tensor, advantages: Tensor, tau_pos: float = 1.0, tau_neg: float = 1.05) -> Tensor:
    """SAPO soft gate (arXiv 2511.20347), as in TRL 1.16: l = -(4/tau) sigmoid(tau (w - 1)) * A,
    tau = tau_pos where A > 0 else tau_neg."""
    tau = torch.where(advantages > 0, torch.as_tensor(tau_pos), torch.as_tensor(tau_neg)).to(ratio.dtype)
    return -torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau * advantages


def kl_penalty(logps: Tensor, ref_logps: Tensor, estimator: str = "k3", clamp: float | None = None) -> Tensor:
    """Sampled estimators of KL(pi_theta || pi_ref) (Schulman, "Approximating KL divergence", 2020).

    With d = log pi_ref - log pi_theta:
      k1 = -d                       (unbiased, high variance; verl "kl")
      k2 = d^2 / 2                  (verl "mse")
      k3 = exp(d) - d - 1 >= 0      (unbiased, low variance; TRL's KL, verl "low_var_kl"); computed as
                                    expm1(d) - d, which keeps its value for the |d| ~ 1e-4 of flow steps
    ``clamp`` bounds the value to [-clamp, clamp] (verl clamps k3 to 10; TRL does not clamp).
    """
    d = ref_logps - logps
    if estimator == "k1":
        kl = -d
    elif estimator == "k2":
        kl = 0.5 * d * d
    elif estimator == "k3":
        kl = torch.expm1(d) - d
    else:
        raise ValueError(f"estimator: must be 'k1', 'k2' or 'k3', got {estimator!r}")
    if clamp is not None:
        kl = kl.clamp(-clamp, clamp)
    return kl


def gaussian_mean_kl(
    ref_delta_sq: Tensor, std: Tensor | float, dt_abs: Tensor | float | None = None, drop_dt: bool = False
) -> Tensor:
    """Closed-form KL between two Gaussian transitions with equal std s, per latent element.

    KL(N(mu_theta, s^2) || N(mu_ref, s^2)) / D = mean_d (mu_theta - mu_ref)^2 / (2 s^2).
    Flow-GRPO (arXiv 2505.05470) divides by std_t^2 instead of s^2 = std_t^2 |dt|, i.e. drops the
    |dt| factor on purpose so that late (large-|dt|) steps are not under-weighted (flow_grpo #22):
    ``drop_dt=True`` returns the exact KL times |dt| (needs ``dt_abs``).
    """
    s = torch.as_tensor(std, dtype=ref_delta_sq.dtype, device=ref_delta_sq.device)
    kl = ref_delta_sq / (2.0 * s * s)
    if drop_dt:
        if dt_abs is None:
            raise ValueError("dt_abs: required when drop_dt=True")
        kl = kl * torch.as_tensor(dt_abs, dtype=kl.dtype, device=kl.device)
    return kl


def velocity_kl(v_ref_delta_sq: Tensor) -> Tensor:
    """Velocity-space KL surrogate: mean_d (v_theta - v_ref)^2 (Flow-GRPO issue #198, DiffusionNFT 2509.16117).

    Proportional to the latent KL of an ODE/SDE step with the same dt, without the step's
    dt^2/(2 s^2) factor, hence uniform across noise levels.
    """
    return v_ref_delta_sq


def dt_reweight(dt_abs: Tensor | float) -> Tensor:
    """GRPO-Guard gradient reweighting (arXiv 2510.22319): per-step weight 1/|dt|.

    d mu_theta / d theta carries a factor dt, so after RatioNorm the step's gradient scales with
    |dt|; dividing the clipped loss by |dt| evens out the steps (the reference script divides
    by ``sqrt_dt.mean()**2``).
    """
    d = torch.as_tensor(dt_abs)
    if d.device.type == "cpu" and bool((d <= 0).any()):  # value check on CPU only (no device sync)
        raise ValueError("dt_abs: must be > 0 for the 1/|dt| reweighting")
    return 1.0 / d


def noise_aware_weights(std: Tensor, normalize: bool = True) -> Tensor:
    """Noise-aware per-step weights in the spirit of TempFlow-GRPO (arXiv 2508.04324).

    w_t = s_t (the step's transition std sigma_t sqrt|dt|, its "exploration potential"),
    normalised to mean 1 over the given steps if ``normalize``. The paper's exact formula was
    not available to us (no code released); this is the reading of its description that
    weights high-noise steps more. Pass the result as ``step_weights`` to :func:`policy_loss`.
    """
    s = torch.as_tensor(std)
    if (s < 0).any():
        raise ValueError("std: must be >= 0")
    if not normalize:
        return s
    mean = s.mean()
    if mean <= 0:
        raise ValueError("std: all zero, cannot normalise")
    return s / mean


def loss_normalizers(
    mask: Tensor,
    mode: str,
    *,
    max_len: int | None = None,
    world_size: int = 1,
    reduce_fn: Callable[[Tensor], Tensor] | None = None,
    count_empty_rows: bool = True,
) -> Tensor:
    """The aggregation normaliser of one optimizer step; call it BEFORE micro-batching.

    ``mask`` is the ``[N, T]`` mask of the whole local optimizer batch (all micro-batches of this
    process). ``reduce_fn`` sums a count across processes (e.g. ``accelerator.reduce(x, "sum")``
    or ``torch.distributed.all_reduce``); the result is divided by ``world_size`` because data
    parallelism averages gradients over processes.

    mode                 count (global)                 loss = ...
    token-mean           sum m                          sum m l / count         (DAPO, verl token-mean)
    seq-mean-token-mean  N rows                         sum_i (sum_t m l / sum_t m) / count  (GRPO)
    seq-mean-token-sum   N rows                         sum m l / count         (LUSPO)
    constant             N rows * max_len               sum m l / count         (Dr. GRPO; max_len = L_max)
    token-sum            1 (not reduced)                sum m l                 (verl token-sum)

    ``count_empty_rows=False`` counts only rows with at least one unmasked action (verl);
    TRL counts every row. ``max_len`` defaults to ``mask.shape[1]`` (TRL uses
    ``max_completion_length``). Counts are clamped to >= 1.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"mode: must be one of {AGGREGATIONS}, got {mode!r}")
    if mask.ndim != 2:
        raise ValueError(f"mask: must have shape [N, T], got {tuple(mask.shape)}")
    if not (isinstance(world_size, int) and world_size >= 1):
        raise ValueError(f"world_size: must be an int >= 1, got {world_size!r}")
    m = mask.to(torch.bool)
    if mode == "token-sum":
        return torch.tensor(1.0 / world_size, dtype=torch.float64, device=mask.device)
    if mode == "token-mean":
        count = m.sum().to(torch.float64)
    else:
        if count_empty_rows:
            count = torch.tensor(float(m.shape[0]), dtype=torch.float64, device=mask.device)
        else:
            count = m.any(-1).sum().to(torch.float64)
        if mode == "constant":
            length = mask.shape[1] if max_len is None else max_len
            if not (isinstance(length, int) and length >= 1):
                raise ValueError(f"max_len: must be an int >= 1, got {max_len!r}")
            count = count * length
    if reduce_fn is not None:
        count = reduce_fn(count)
    return count.clamp(min=1.0) / world_size


def aggregate(per_action: Tensor, mask: Tensor, mode: str, normalizer: Tensor | float) -> Tensor:
    """Reduce a per-action loss ``[N, T]`` to a scalar with an explicit normaliser.

    seq-mean-token-mean:  sum_i ( sum_t m_it l_it / max(1, sum_t m_it) ) / normalizer
    every other mode:     sum_{i,t} m_it l_it / normalizer
    (token-mean, seq-mean-token-sum, constant and token-sum differ only in the normaliser, see
    :func:`loss_normalizers`.) Masked entries contribute exactly 0, even if they hold NaN/inf.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"mode: must be one of {AGGREGATIONS}, got {mode!r}")
    m = mask.to(torch.bool)
    per_action = _broadcast(per_action, m.shape)
    x = torch.where(m, per_action, torch.zeros_like(per_action))
    norm = torch.as_tensor(normalizer, dtype=x.dtype, device=x.device)
    if mode == "seq-mean-token-mean":
        return _row_mean(x, m).sum() / norm
    return x.sum() / norm


def kl_coefficient(step: int, cfg: LossConfig) -> float:
    """KL coefficient at an optimizer step for the stateless schedules.

    constant: beta.
    linear:   beta + (beta_end - beta) * min(step / beta_steps, 1).
    The linear ramp is our reading of GRPO-D (OThink-MR1, arXiv 2503.16081): a KL weight that is
    small early (exploration) and grows later (exploitation), "inspired by epsilon-greedy". We
    could not verify the paper's exact rule; this documented linear ramp stands in for it.
    For ``adaptive`` use :class:`AdaptiveKLController` (stateful) instead.
    """
    cfg.validate()
    if step < 0:
        raise ValueError(f"step: must be >= 0, got {step!r}")
    if cfg.beta_schedule == "constant":
        return cfg.beta
    if cfg.beta_schedule == "linear":
        assert cfg.beta_end is not None
        frac = min(step / cfg.beta_steps, 1.0)
        return cfg.beta + (cfg.beta_end - cfg.beta) * frac
    raise ValueError("beta_schedule: 'adaptive' is stateful, use AdaptiveKLController")


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al., arXiv 1909.08593, as in verl/TRL PPO).

    After each optimizer step with measured KL k:  e = clip(k / target - 1, -0.2, 0.2),
    beta <- beta * (1 + e * n_steps / horizon). beta grows when the policy drifts beyond the
    target, shrinks when it stays inside. This is the documented stand-in for a "dynamic" KL
    when GRPO-D's exact schedule is not wanted or not known.
    """

    def __init__(self, init_beta: float, target: float, horizon: int = 10000) -> None:
        if not (init_beta >= 0 and math.isfinite(init_beta)):
            raise ValueError(f"init_beta: must be a finite number >= 0, got {init_beta!r}")
        if not (target > 0):
            raise ValueError(f"target: must be > 0, got {target!r}")
        if not (isinstance(horizon, int) and horizon >= 1):
            raise ValueError(f"horizon: must be an int >= 1, got {horizon!r}")
        self.value = float(init_beta)
        self.target = float(target)
        self.horizon = horizon

    @classmethod
    def from_config(cls, cfg: LossConfig) -> "AdaptiveKLController":
        """Build from a ``LossConfig`` with ``beta_schedule='adaptive'``."""
        cfg.validate()
        if cfg.beta_schedule != "adaptive":
            raise ValueError("beta_schedule: must be 'adaptive' to build an AdaptiveKLController")
        assert cfg.kl_target is not None
        return cls(cfg.beta, cfg.kl_target, cfg.kl_horizon)

    def update(self, current_kl: float, n_steps: int = 1) -> float:
        """Update with the KL measured over the last ``n_steps`` steps; return the new beta."""
        if not math.isfinite(current_kl):
            raise ValueError(f"current_kl: must be finite, got {current_kl!r}")
        err = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state for exact resume."""
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state returned by :meth:`state_dict`."""
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = int(state["horizon"])


# --------------------------------------------------------------------------------------------
# the phases of policy_loss (tensors in, tensors out)
# --------------------------------------------------------------------------------------------


def _masked_stats(x: Tensor, m: Tensor) -> dict[str, Tensor]:
    """mean / population std / min / max of x over m (float64, 0 if empty); no host sync."""
    xd = x.detach().to(torch.float64)
    cnt = m.sum().to(torch.float64)
    safe = cnt.clamp(min=1.0)
    mean = torch.where(m, xd, torch.zeros_like(xd)).sum() / safe
    var = torch.where(m, (xd - mean) ** 2, torch.zeros_like(xd)).sum() / safe
    inf = torch.full_like(xd, float("inf"))
    mn = torch.where(m, xd, inf).amin()
    mx = torch.where(m, xd, -inf).amax()
    empty = cnt == 0
    zero = torch.zeros_like(mean)
    return {
        "mean": mean,
        "std": var.sqrt(),
        "min": torch.where(empty, zero, mn),
        "max": torch.where(empty, zero, mx),
    }


def _masked_mean(x: Tensor, m: Tensor) -> Tensor:
    """Mean of x over m (float64, 0 if empty); no host sync."""
    xd = x.detach().to(torch.float64)
    m = _broadcast(m, xd.shape)
    return torch.where(m, xd, torch.zeros_like(xd)).sum() / m.sum().clamp(min=1).to(torch.float64)


def _masked_fill(x: Tensor | float | None, m: Tensor, fill: float) -> Tensor | float | None:
    """Broadcast ``x`` to the mask's shape and put ``fill`` at masked entries (tensors only)."""
    if x is None or not isinstance(x, Tensor):
        return x
    xb = _broadcast(x, m.shape)
    return torch.where(m, xb, torch.full_like(xb, fill))


def _sanitize_step_terms(terms: StepTerms, m: Tensor) -> StepTerms:
    """Finite values at masked entries: std, |dt| and kappa -> 1, mean-square terms -> 0."""
    return StepTerms(
        std=_masked_fill(terms.std, m, 1.0),
        dt_abs=_masked_fill(terms.dt_abs, m, 1.0),
        delta_sq=_masked_fill(terms.delta_sq, m, 0.0),
        ref_delta_sq=_masked_fill(terms.ref_delta_sq, m, 0.0),
        v_ref_delta_sq=_masked_fill(terms.v_ref_delta_sq, m, 0.0),
        logp_scale=_masked_fill(terms.logp_scale, m, 1.0),  # type: ignore[arg-type]
    )


def _checked_inputs(
    logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, normalizer: Tensor | float,
    beta: float | None, cfg: LossConfig,
) -> tuple[Tensor, Tensor, Tensor, float]:
    """Check shapes and scalars; return ``(A [N, 1] or [N, T] detached, normalizer, bool mask, beta)``."""
    if logps.ndim != 2:
        raise ValueError(f"logps: must have shape [N, T], got {tuple(logps.shape)}")
    shape = logps.shape
    if old_logps.shape != shape:
        raise ValueError(f"old_logps: shape {tuple(old_logps.shape)} differs from logps {tuple(shape)}")
    if mask.shape != shape:
        raise ValueError(f"mask: shape {tuple(mask.shape)} differs from logps {tuple(shape)}")
    if advantages.ndim == 1 and advantages.shape[0] == shape[0]:
        adv = advantages.unsqueeze(1)
    elif advantages.shape == shape or (advantages.ndim == 2 and advantages.shape == (shape[0], 1)):
        adv = advantages
    else:
        raise ValueError(
            f"advantages: must have shape [N] or [N, T] = {tuple(shape)}, got {tuple(advantages.shape)}"
        )
    adv = adv.detach().to(logps.dtype)
    norm = torch.as_tensor(normalizer, dtype=logps.dtype, device=logps.device)
    if norm.ndim != 0 or (norm.device.type == "cpu" and not bool(norm > 0)):  # no sync on accelerators
        raise ValueError(f"normalizer: must be a positive scalar, got {normalizer!r}")
    beta_now = cfg.beta if beta is None else float(beta)
    if not (math.isfinite(beta_now) and beta_now >= 0):
        raise ValueError(f"beta: must be a finite number >= 0, got {beta!r}")
    return adv, norm, mask.to(torch.bool), beta_now


def _zero_masked(
    m: Tensor, logps: Tensor, old_logps: Tensor, adv: Tensor, step_terms: StepTerms | None,
    step_weights: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, StepTerms | None, Tensor | None]:
    """Finite zeros (std, |dt|, kappa: ones) at masked entries, which may hold padding, -inf or NaN.

    Done once, so that neither values nor gradients (0 * NaN = NaN in backward) leak out of the mask.
    """
    zeros = torch.zeros_like(logps)
    logps = torch.where(m, logps, zeros)
    old_logps = torch.where(m, old_logps.to(logps.dtype), zeros)
    if adv.shape == logps.shape:
        adv = torch.where(m, adv, zeros)
    if step_terms is not None:
        step_terms = _sanitize_step_terms(step_terms, m)
    if step_weights is not None:
        step_weights = _masked_fill(step_weights, m, 0.0)
    return logps, old_logps, adv, step_terms, step_weights


def _ratio_norm(
    log_ratio: Tensor, m: Tensor, cfg: LossConfig, terms: StepTerms | None
) -> tuple[Tensor, Tensor | float | None]:
    """GRPO-Guard (arXiv 2510.22319): ``(RatioNorm log-ratio, |dt| for the 1/|dt| reweighting or None)``.

    Without ``cfg.ratio_norm`` the log-ratio passes through and there is no reweighting.
    """
    if not cfg.ratio_norm:
        return log_ratio, None
    if terms is None or terms.std is None or terms.delta_sq is None:
        raise ValueError("step_terms: ratio_norm needs StepTerms with std and delta_sq")
    lr = ratio_normalized_log_ratio(log_ratio, terms.delta_sq, terms.std, terms.logp_scale)
    lr = torch.where(m, lr, torch.zeros_like(lr))
    if not cfg.ratio_norm_reweight:
        return lr, None
    if terms.dt_abs is None:
        raise ValueError("step_terms: ratio_norm_reweight needs StepTerms.dt_abs")
    return lr, terms.dt_abs


def _ratio_bounds(cfg: LossConfig, old_logps: Tensor) -> tuple[Tensor | float, Tensor | float]:
    """``(lower, upper)`` bounds of the clipped ratio: ``1 - eps_low, 1 + eps_high``, or DCPO's per-token
    bounds from pi_old (:func:`dcpo_clip_bounds`, capped at ``max(dual_clip, 10)`` as upstream)."""
    if cfg.clip_bounds == "dcpo":
        return dcpo_clip_bounds(old_logps, cfg.eps_low, cfg.eps_high_value, max(cfg.dual_clip or 0.0, 10.0))
    return 1.0 - cfg.eps_low, 1.0 + cfg.eps_high_value


def _surrogate(
    w: Tensor, adv: Tensor, logps: Tensor, cfg: LossConfig, bounds: tuple[Tensor | float, Tensor | float],
) -> Tensor:
    """The per-action policy term of ``cfg.surrogate``, broadcast to ``logps``' shape.

    clip:  -min(min(w, delta) A, clip(w, 1 - eps_low, 1 + eps_high) A)   (:func:`clipped_surrogate`;
           ``clip_bounds='dcpo'``: clip(w, lo_t, hi_t) with DCPO's ``bounds``)
    cispo: -sg(min(w, eps_high)) A log pi                                (:func:`cispo_surrogate`)
    sapo:  -(4/tau) sigmoid(tau (w - 1)) A                               (:func:`sapo_surrogate`)
    """
    if cfg.surrogate == "clip" and cfg.clip_bounds == "dcpo":
        lo, hi = bounds
        pol = clipped_surrogate(w, adv, 1.0 - lo, hi - 1.0, cfg.delta, cfg.dual_clip)  # exact: lo in [1/2, 1], hi >= 1
    elif cfg.surrogate == "clip":
        pol = clipped_surrogate(w, adv, cfg.eps_low, cfg.eps_high_value, cfg.delta, cfg.dual_clip)
    elif cfg.surrogate == "cispo":
        pol = cispo_surrogate(w, adv, logps, cfg.eps_high_value)
    else:
        pol = sapo_surrogate(w, adv, cfg.sapo_tau_pos, cfg.sapo_tau_neg)
    return _broadcast(pol, logps.shape)


def _reweight_steps(pol: Tensor, step_weights: Tensor | None, dt_abs: Tensor | float | None) -> Tensor:
    """l <- l * omega_t (e.g. :func:`noise_aware_weights`) * 1/|dt| (GRPO-Guard, :func:`dt_reweight`)."""
    if step_weights is not None:
        pol = pol * torch.as_tensor(step_weights, dtype=pol.dtype, device=pol.device)
    if dt_abs is not None:
        pol = pol * dt_reweight(torch.as_tensor(dt_abs, dtype=pol.dtype, device=pol.device))
    return pol


def _reference_kl(
    cfg: LossConfig, logps: Tensor, ref_logps: Tensor | None, m: Tensor, log_ratio: Tensor, w: Tensor,
    terms: StepTerms | None, beta: float,
) -> Tensor | None:
    """Per-action KL to the reference by ``cfg.kl_estimator`` ([N, T]), or None without its inputs.

    k1/k2/k3: :func:`kl_penalty` of log pi and log pi_ref, times exp(log w_t) (``kl_ratio_weighted
    ='token'``) or the surrogate's w (``'importance'``, TRL 1.16); latent: :func:`gaussian_mean_kl`;
    velocity: :func:`velocity_kl`. Missing inputs are an error only when beta != 0.
    """
    est = cfg.kl_estimator
    kl = None
    if est in ("k1", "k2", "k3"):
        if ref_logps is not None:
            if ref_logps.shape != logps.shape:
                raise ValueError(f"ref_logps: shape {tuple(ref_logps.shape)} differs from logps {tuple(logps.shape)}")
            safe_ref = torch.where(m, ref_logps.to(logps.dtype), torch.zeros_like(logps))
            kl = kl_penalty(logps, safe_ref, est, cfg.kl_clamp)
            if cfg.kl_ratio_weighted == "token":
                kl = kl * torch.exp(log_ratio)
            elif cfg.kl_ratio_weighted == "importance":
                kl = kl * w
        elif beta != 0:
            raise ValueError(f"ref_logps: required for kl_estimator={est!r} with beta != 0")
    elif est == "latent":
        if terms is not None and terms.ref_delta_sq is not None:
            if terms.std is None:
                raise ValueError("step_terms: the latent KL needs StepTerms.std")
            kl = gaussian_mean_kl(terms.ref_delta_sq, terms.std, terms.dt_abs, cfg.kl_drop_dt)
        elif beta != 0:
            raise ValueError("step_terms: kl_estimator='latent' with beta != 0 needs StepTerms.ref_delta_sq")
    elif terms is not None and terms.v_ref_delta_sq is not None:
        kl = velocity_kl(terms.v_ref_delta_sq)
    elif beta != 0:
        raise ValueError("step_terms: kl_estimator='velocity' with beta != 0 needs StepTerms.v_ref_delta_sq")
    return None if kl is None else _broadcast(kl, logps.shape)


def _loss_stats(
    cfg: LossConfig, m: Tensor, w: Tensor, adv: Tensor, log_ratio: Tensor, kl: Tensor | None, beta: float,
    bounds: tuple[Tensor | float, Tensor | float],
) -> dict[str, Tensor]:
    """Detached float64 statistics over the unmasked actions (sequence ratio: non-empty rows).

    clip_frac_low: w < lower bound (1 - eps_low) and A < 0; clip_frac_high: w > upper bound (1 + eps_high) and A > 0 (sequence
    ratio: A = the row's mean advantage); approx_kl: mean (log w)^2 / 2 (as Flow-GRPO logs);
    approx_kl_k3: mean w - 1 - log w; ratio_mean/std/min/max of w.
    """
    with torch.no_grad():
        wb = w.detach()
        ab = _broadcast(adv, m.shape)
        smask = m
        if cfg.ratio_level == "sequence":
            ab = _row_mean(torch.where(m, ab, torch.zeros_like(ab)), m)
            smask = m.any(-1, keepdim=True)
        low = (wb < bounds[0]) & (ab < 0)
        high = (wb > bounds[1]) & (ab > 0)
        rs = _masked_stats(wb, smask)
        lr = log_ratio.detach()
        dev = w.device
        return {
            "kl": _masked_mean(kl, m) if kl is not None else torch.zeros((), dtype=torch.float64, device=dev),
            "clip_frac_low": _masked_mean(low.to(torch.float64), smask),
            "clip_frac_high": _masked_mean(high.to(torch.float64), smask),
            "clip_frac": _masked_mean((low | high).to(torch.float64), smask),
            "approx_kl": _masked_mean(0.5 * lr**2, m),
            "approx_kl_k3": _masked_mean(torch.exp(lr) - 1.0 - lr, m),
            "ratio_mean": rs["mean"],
            "ratio_std": rs["std"],
            "ratio_min": rs["min"],
            "ratio_max": rs["max"],
            "num_actions": m.sum().to(torch.float64),
            "beta": torch.tensor(beta, dtype=torch.float64, device=dev),
        }


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------


def policy_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cfg: LossConfig,
    *,
    normalizer: Tensor | float,
    ref_logps: Tensor | None = None,
    step_terms: StepTerms | None = None,
    step_weights: Tensor | None = None,
    beta: float | None = None,
    teacher_logps: Tensor | None = None,
    teacher_beta: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO-family policy loss for one micro-batch; see the module docstring for the pipeline.

    Args:
        logps: ``[N, T]`` log-probs of the taken actions under the current policy (with grad).
        old_logps: ``[N, T]`` log-probs under the sampling policy (no grad needed).
        advantages: ``[N]`` (broadcast over T) or ``[N, T]``.
        mask: ``[N, T]`` bool/0-1 mask of the trained actions (tokens or denoising steps).
        cfg: a validated :class:`LossConfig`.
        normalizer: from :func:`loss_normalizers` on the whole optimizer batch (keyword-only,
            required; never computed here from the micro-batch).
        ref_logps: ``[N, T]`` reference log-probs for the k1/k2/k3 KL.
        step_terms: :class:`StepTerms` for RatioNorm and the latent/velocity KL.
        step_weights: ``[N, T]``/``[T]``/``[N, 1]`` weights on the policy term (e.g.
            :func:`noise_aware_weights`); the KL term is not reweighted.
        beta: the current KL coefficient (from a schedule); ``None`` = ``cfg.beta``.
        teacher_logps: ``[N, T]`` a teacher's log-probs of the same tokens: adds
            ``teacher_beta * KL(pi_theta || pi_teacher)`` (KDRL, :func:`_teacher_kl_term`).
        teacher_beta: the current teacher coefficient (:func:`teacher_coefficient`); ``None`` =
            ``cfg.teacher_beta``.

    Returns:
        ``(loss, stats)``: a scalar loss; stats (detached 0-dim tensors, over the unmasked
        actions of this micro-batch): ``policy_loss``, ``kl_loss``, ``kl`` (mean KL),
        ``clip_frac_low`` (w < 1-eps_low and A < 0), ``clip_frac_high`` (w > 1+eps_high and A > 0),
        ``clip_frac`` (either), ``approx_kl`` (1/2 mean (log pi - log pi_old)^2, as Flow-GRPO logs),
        ``approx_kl_k3`` (mean w - 1 - log w), ``ratio_mean/std/min/max``, ``num_actions``.
    """
    cfg.validate()
    if cfg.surrogate == "disco":
        raise ValueError("surrogate: 'disco' is a loss over groups, not per action: use disco_loss")
    adv, norm, m, beta_now = _checked_inputs(logps, old_logps, advantages, mask, normalizer, beta, cfg)
    logps, old_logps, adv, step_terms, step_weights = _zero_masked(
        m, logps, old_logps, adv, step_terms, step_weights
    )
    # importance weight: per-token log-ratio (kept for the KL weighting and logging), RatioNorm, GSPO
    raw_lr = log_importance_weights(logps, old_logps, m, "token", cfg.log_ratio_clamp)
    lr, dt_abs = _ratio_norm(raw_lr, m, cfg, step_terms)
    w = torch.exp(_row_mean(lr, m) if cfg.ratio_level == "sequence" else lr)
    # per-action policy term and KL
    bounds = _ratio_bounds(cfg, old_logps)
    pol = _reweight_steps(_surrogate(w, adv, logps, cfg, bounds), step_weights, dt_abs)
    kl = _reference_kl(cfg, logps, ref_logps, m, raw_lr, w, step_terms, beta_now)
    # aggregation with the explicit normaliser (linear, so the KL part can be reported apart)
    pol_loss = aggregate(pol, m, cfg.aggregation, norm)
    if kl is not None and beta_now != 0:
        kl_loss = aggregate(kl, m, cfg.aggregation, norm)
        loss = pol_loss + beta_now * kl_loss
    else:
        kl_loss = torch.zeros((), dtype=pol_loss.dtype, device=pol_loss.device)
        loss = pol_loss
    loss, teacher_stats = _teacher_kl_term(loss, cfg, logps, teacher_logps, m, norm, teacher_beta)
    totals = {"loss": loss.detach(), "policy_loss": pol_loss.detach(), "kl_loss": kl_loss.detach()}
    return loss, {**totals, **_loss_stats(cfg, m, w, adv, raw_lr, kl, beta_now, bounds), **teacher_stats}


# --------------------------------------------------------------------------------------------
# token-level variants of the text path: DCPO bounds, GTPO conflict tokens and entropy filter,
# D3S token selection (pure functions; the text learner calls them)
# --------------------------------------------------------------------------------------------


def linear_ramp(step: int, start: float, end: float | None, steps: int) -> float:
    """A value that moves linearly from ``start`` (step 0) to ``end`` (step ``steps`` and after).

    v(step) = start + (end - start) * min(step / steps, 1); ``end=None``: constant ``start``.
    """
    if step < 0:
        raise ValueError(f"step: must be >= 0, got {step!r}")
    if end is None:
        return float(start)
    if steps < 1:
        raise ValueError(f"steps: must be >= 1 for a ramp, got {steps!r}")
    return float(start + (end - start) * min(step / steps, 1.0))


def check_keep_schedule(name: str, start: float | None, end: float | None, steps: int, scope: str) -> None:
    """Check a D3S keep-fraction schedule held in the fields ``<name>``, ``<name>_end``, ``<name>_steps`` and
    ``<name>_scope`` (fractions in (0, 1], a ramp needs a start and >= 1 step); ``ValueError("<field>: ...")``."""
    check_number(name, start, gt=0, le=1, none_ok=True, why="null: keep all")
    check_number(f"{name}_end", end, gt=0, le=1, none_ok=True)
    if end is not None and start is None:
        raise ValueError(f"{name}_end: set {name} (the fraction at step 0) as well")
    if not (isinstance(steps, int) and steps >= 0):
        raise ValueError(f"{name}_steps: must be an int >= 0, got {steps!r}")
    if end is not None and steps < 1:
        raise ValueError(f"{name}_steps: must be >= 1 for a ramp to {name}_end")
    if scope not in KEEP_SCOPES:
        raise ValueError(f"{name}_scope: must be one of {KEEP_SCOPES}, got {scope!r}")


def dcpo_clip_bounds(
    old_logps: Tensor, eps_low: float, eps_high: float, cap: float = 10.0
) -> tuple[Tensor, Tensor]:
    """DCPO's dynamic-adaptive ratio bounds (arXiv 2509.02333), per token from q = pi_old(token).

    Bounding |(w - 1) w q| (the token's share of the importance-sampling variance) gives
        lo = 1/2 + 1/2 sqrt(max(1 - 4 eps_low / q, 0)),   hi = min(1/2 + 1/2 sqrt(1 + 4 eps_high / q), cap)
    so rare tokens (small q) may move further than likely ones (lo -> 1 - eps_low, hi -> 1 + eps_high
    as q -> 1 only to first order). lo lies in [1/2, 1]. lime-RL/DCPO ``get_clip_low_high`` caps hi
    at max(clip_ratio_c, 10).
    """
    q = torch.exp(old_logps)
    lo = 0.5 + 0.5 * torch.sqrt((1.0 - 4.0 * eps_low / q).clamp(min=0.0))
    hi = (0.5 + 0.5 * torch.sqrt(1.0 + 4.0 * eps_high / q)).clamp(max=cap)
    return lo, hi


def _runs_from_start(conflict: Tensor) -> Tensor:
    """The leading run of True of each row ([N, T] bool): True up to the first False."""
    return torch.cumprod(conflict.to(torch.int64), dim=1).bool()


def _conflicts_at_same_position(ids: Tensor, valid: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
    """[n, T] bool: token t of row i (valid) also stands at position t of some valid A>0 row and
    of some valid A<0 row of the same group (row i counts itself)."""
    same = (ids.unsqueeze(1) == ids.unsqueeze(0)) & valid.unsqueeze(1) & valid.unsqueeze(0)  # [i, j, t]
    in_pos = (same & pos.view(1, -1, 1)).any(1)
    in_neg = (same & neg.view(1, -1, 1)).any(1)
    return in_pos & in_neg & valid


def gtpo_conflict_weights(
    ids: Tensor, mask: Tensor, advantages: Tensor, group_ids: Tensor, weight: float = 2.0
) -> tuple[Tensor, Tensor]:
    """GTPO's conflict-token weights (arXiv 2508.03772; winstonsmith1897/GTPO ``build_conflict_mask``).

    Within a group, a token of a completion with A != 0 is a conflict token when the same token id
    stands at the same position in an A > 0 and in an A < 0 completion, counting only the run of such
    tokens from the first token on (prefix), and likewise aligned from the end (suffix: the same id at
    the same distance from each completion's last token). Per token
        delta = weight (conflict, A > 0) | 0 (conflict, A < 0) | 1 (otherwise), one factor per direction,
    so a token in both runs of an A > 0 completion gets weight^2, as upstream. Completions with A = 0
    keep delta = 1. n_conflict is what upstream divides each completion's loss by: it ORs the prefix
    run with the suffix run *in end-aligned coordinates*, which counts max(prefix length, suffix
    length) rather than their union; at least 1 for A != 0, 0 for A = 0.

    Args:
        ids: ``[N, T]`` completion token ids (right-padded); mask: ``[N, T]`` its real tokens.
        advantages: ``[N]`` (the sign decides); group_ids: ``[N]`` (a group's rows may sit anywhere).
    Returns:
        ``(delta [N, T] float64 (0 where masked), n_conflict [N] int64)``.
    """
    n, t_len = ids.shape
    if mask.shape != ids.shape:
        raise ValueError(f"mask: shape {tuple(mask.shape)} differs from ids {tuple(ids.shape)}")
    adv = torch.as_tensor(advantages).detach().reshape(-1)
    if adv.shape[0] != n or torch.as_tensor(group_ids).shape != (n,):
        raise ValueError(f"advantages, group_ids: need one value per row ({n})")
    check_number("weight", weight, ge=0)
    m = mask.to(torch.bool)
    delta = m.to(torch.float64)
    n_conf = torch.zeros(n, dtype=torch.int64, device=ids.device)
    lengths = m.sum(1)
    # each row's tokens aligned from its end: column j holds the token j places before the last one
    j = torch.arange(t_len, device=ids.device).unsqueeze(0)
    rev_index = (lengths.unsqueeze(1) - 1 - j).clamp(min=0)
    rev_ids, rev_valid = ids.gather(1, rev_index), j < lengths.unsqueeze(1)
    for g in torch.unique(torch.as_tensor(group_ids)):
        rows = (torch.as_tensor(group_ids) == g).nonzero().flatten().to(ids.device)
        pos, neg = adv[rows] > 0, adv[rows] < 0
        active = pos | neg
        if not active.any():
            continue
        fwd = _runs_from_start(_conflicts_at_same_position(ids[rows], m[rows], pos, neg))
        bwd_rev = _runs_from_start(_conflicts_at_same_position(rev_ids[rows], rev_valid[rows], pos, neg))
        bwd = bwd_rev.gather(1, rev_index[rows]) & m[rows]  # back to positions (t <-> length - 1 - t)
        sign_w = torch.where(pos, weight, 0.0).to(torch.float64).unsqueeze(1)
        d = torch.where(fwd, sign_w, 1.0) * torch.where(bwd, sign_w, 1.0) * m[rows]
        delta[rows] = torch.where(active.unsqueeze(1), d, delta[rows])
        count = torch.maximum(fwd.sum(1), bwd_rev.sum(1)).clamp(min=1)
        n_conf[rows] = torch.where(active, count, torch.zeros_like(count))
    return delta, n_conf


def mean_token_entropy(entropy: Tensor, mask: Tensor) -> Tensor:
    """Each completion's mean token entropy over its real tokens: sum_t m H / max(1, sum_t m) -> ``[N]``."""
    m = mask.to(entropy.dtype)
    return (entropy * m).sum(-1) / m.sum(-1).clamp(min=1.0)


def gtpo_entropy_advantages(
    advantages: Tensor, mean_entropy: Tensor, entropy_max: float | None, scale: float
) -> Tensor:
    """GTPO's entropy filter and penalty on sequence advantages (arXiv 2508.03772):

        A'_i = A_i - scale * H_i   if H_i <= entropy_max (or no threshold)
        A'_i = 0                   otherwise,
    with H_i the completion's mean token entropy. As upstream, a completion with A = 0 and low
    entropy gets A' = -scale * H_i (an entropy-lowering push).
    """
    adv = torch.as_tensor(advantages)
    h = torch.as_tensor(mean_entropy, dtype=adv.dtype, device=adv.device)
    shaped = adv - scale * h
    if entropy_max is None:
        return shaped
    return torch.where(h <= entropy_max, shaped, torch.zeros_like(shaped))


def _top_count(n: Tensor, fraction: float) -> Tensor:
    """k = floor(fraction * n + 1/2), at least 1 where n >= 1 (a count per selection unit)."""
    k = torch.floor(n.to(torch.float64) * fraction + 0.5).to(torch.int64)
    return torch.where(n > 0, k.clamp(min=1), torch.zeros_like(k))


def top_fraction_mask(scores: Tensor, mask: Tensor, fraction: float, group_ids: Tensor | None = None) -> Tensor:
    """D3S token selection (arXiv 2509.22115): keep the ``fraction`` of the unmasked tokens with the
    highest score (D3S: |A_it| * H_it), over all rows or, with ``group_ids``, within each group.

    A unit of n tokens keeps k = floor(fraction n + 1/2) >= 1 of them; ties go to the earlier token
    (row-major order). Returns a bool ``[N, T]`` mask (False where ``mask`` is).
    """
    check_number("fraction", fraction, gt=0, le=1)
    m = mask.to(torch.bool)
    if scores.shape != m.shape:
        raise ValueError(f"scores: shape {tuple(scores.shape)} differs from mask {tuple(m.shape)}")
    units = torch.zeros(m.shape[0], dtype=torch.int64, device=m.device) if group_ids is None else torch.as_tensor(group_ids)
    keep = torch.zeros_like(m)
    flat_keep = keep.view(-1)
    for u in torch.unique(units):
        rows = (units == u).nonzero().flatten()
        sub = m[rows]
        idx = (rows.unsqueeze(1) * m.shape[1] + torch.arange(m.shape[1], device=m.device)).reshape(-1)[sub.reshape(-1)]
        k = int(_top_count(sub.sum(), fraction))
        if k == 0:
            continue
        vals = scores.reshape(-1)[idx].detach().to(torch.float64)
        order = torch.argsort(-vals, stable=True)
        flat_keep[idx[order[:k]]] = True
    return keep
    return loss, {**totals, **_loss_stats(cfg, m, w, adv, raw_lr, kl, beta_now), **teacher_stats}


# --------------------------------------------------------------------------------------------
# 2025 variants: KDRL's teacher KL, DisCO's discriminative objective
# --------------------------------------------------------------------------------------------


def teacher_coefficient(step: int, cfg: LossConfig) -> float:
    """KDRL's teacher coefficient at an optimizer step (Xu et al., arXiv 2506.02208).

    ``teacher_beta``, or with ``teacher_beta_end`` the linear ramp
    teacher_beta + (teacher_beta_end - teacher_beta) * min(step / teacher_beta_steps, 1).
    The paper anneals 5e-3 -> 1e-3; that the ramp is linear is our reading (no code was released).
    """
    cfg.validate()
    if step < 0:
        raise ValueError(f"step: must be >= 0, got {step!r}")
    if cfg.teacher_beta_end is None:
        return cfg.teacher_beta
    frac = min(step / cfg.teacher_beta_steps, 1.0)
    return cfg.teacher_beta + (cfg.teacher_beta_end - cfg.teacher_beta) * frac


def _teacher_kl_term(
    loss: Tensor, cfg: LossConfig, logps: Tensor, teacher_logps: Tensor | None, m: Tensor, norm: Tensor,
    teacher_beta: float | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``loss + tb * aggregate(KL_est(pi_theta || pi_teacher))`` and its statistics (KDRL, arXiv 2506.02208).

    The estimator (:func:`kl_penalty`, ``cfg.teacher_kl_estimator``; KDRL prefers k2 = (log pi -
    log pi_T)^2 / 2, whose gradient is the reverse KL's on the student's own samples) is aggregated
    like the policy term. Beside the reference KL, not instead of it.
    """
    tb = cfg.teacher_beta if teacher_beta is None else float(teacher_beta)
    if not (math.isfinite(tb) and tb >= 0):
        raise ValueError(f"teacher_beta: must be a finite number >= 0, got {teacher_beta!r}")
    if teacher_logps is None:
        if tb != 0:
            raise ValueError("teacher_logps: required with teacher_beta != 0 (KDRL's teacher KL)")
        return loss, {}
    if teacher_logps.shape != logps.shape:
        raise ValueError(f"teacher_logps: shape {tuple(teacher_logps.shape)} differs from logps {tuple(logps.shape)}")
    safe = torch.where(m, teacher_logps.to(logps.dtype), torch.zeros_like(logps))
    kl = kl_penalty(logps, safe, cfg.teacher_kl_estimator)
    t_loss = aggregate(kl, m, cfg.aggregation, norm)
    stats = {"teacher_kl": _masked_mean(kl, m), "teacher_kl_loss": t_loss.detach(),
             "teacher_beta": torch.tensor(tb, dtype=torch.float64, device=logps.device)}
    return (loss + tb * t_loss if tb != 0 else loss), stats


def sequence_scores(logps: Tensor, old_logps: Tensor, mask: Tensor, kind: str = "log_likelihood") -> Tensor:
    """DisCO's score of each completion, ``[N, T] -> [N]`` (Li et al., arXiv 2505.12366).

    log_likelihood:   s_i = sum_t m log pi(o_it) / sum_t m               (upstream ``disco_logL``)
    likelihood_ratio: s_i = sum_t m exp(log pi - log pi_old) / sum_t m    (upstream ``disco_Lratio``)
    Rows without an unmasked token score 0.
    """
    if logps.shape != old_logps.shape or logps.shape != mask.shape or logps.ndim != 2:
        raise ValueError(f"logps, old_logps, mask: must share one shape [N, T], got {tuple(logps.shape)}, "
                         f"{tuple(old_logps.shape)}, {tuple(mask.shape)}")
    m = mask.to(torch.bool)
    if kind == "log_likelihood":
        x = torch.where(m, logps, torch.zeros_like(logps))
    elif kind == "likelihood_ratio":
        lr = torch.where(m, logps - old_logps.to(logps.dtype), torch.zeros_like(logps))
        x = torch.where(m, torch.exp(lr), torch.zeros_like(logps))
    else:
        raise ValueError(f"kind: must be one of {_DISCO_SCORES}, got {kind!r}")
    return _row_mean(x, m).squeeze(1)


def disco_objective(
    scores: Tensor, advantages: Tensor, group_index: Tensor, tau: float | None, num_groups: int | None = None,
) -> tuple[Tensor, Tensor]:
    """DisCO's objective per group (Li et al., arXiv 2505.12366): ``(J [Q], valid [Q])``.

    J_q = mean_{i in q, A_i > 0} s_i - tau log mean_{j in q, A_j < 0} exp(s_j / tau)
    (``tau=None``: minus the plain mean of the negatives' scores, DisCO-b). Positives and negatives
    are the rows above and below their group's mean reward (advantage sign): with 0/1 rewards exactly
    upstream's ``reward == 1`` / ``reward == 0``. A group without both has J = 0, valid False.
    Differentiable in ``scores``. Upstream's ``neg_logmeanexp`` is ``S / sg(S)`` with S the sum of
    exponentials: its value is ~1 (not the log-mean-exp), its gradient the log-mean-exp's; we
    return the log-mean-exp itself, whose gradient is the same.
    """
    s = scores
    a = torch.as_tensor(advantages).detach().to(s.device)
    idx = torch.as_tensor(group_index, dtype=torch.long, device=s.device)
    if s.ndim != 1 or a.shape != s.shape or idx.shape != s.shape:
        raise ValueError(f"scores, advantages, group_index: must each have shape [N], got {tuple(s.shape)}, "
                         f"{tuple(a.shape)}, {tuple(idx.shape)}")
    q = int(idx.max().item()) + 1 if num_groups is None and idx.numel() else int(num_groups or 0)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= q):
        raise ValueError(f"group_index: entries must lie in [0, {q})")
    pos, neg = a > 0, a < 0
    zeros = torch.zeros(q, dtype=s.dtype, device=s.device)
    n_pos = zeros.index_add(0, idx, pos.to(s.dtype))
    n_neg = zeros.index_add(0, idx, neg.to(s.dtype))
    valid = (n_pos > 0) & (n_neg > 0)
    mean_pos = zeros.index_add(0, idx, torch.where(pos, s, torch.zeros_like(s))) / n_pos.clamp(min=1)
    if tau is None:
        neg_term = zeros.index_add(0, idx, torch.where(neg, s, torch.zeros_like(s))) / n_neg.clamp(min=1)
    else:
        z = s / tau
        lowest = torch.full_like(zeros, -torch.finfo(s.dtype).max)
        top = lowest.scatter_reduce(0, idx, torch.where(neg, z, torch.full_like(z, lowest[0])).detach(), reduce="amax")
        top = torch.where(n_neg > 0, top, torch.zeros_like(top))
        e = torch.where(neg, torch.exp(torch.where(neg, z - top[idx], torch.zeros_like(z))), torch.zeros_like(z))
        sum_e = zeros.index_add(0, idx, e)
        sum_e = torch.where(n_neg > 0, sum_e, torch.ones_like(sum_e))
        neg_term = tau * (top + torch.log(sum_e / n_neg.clamp(min=1)))
    j = torch.where(valid, mean_pos - neg_term, torch.zeros_like(mean_pos))
    return j, valid


def squared_hinge_penalty(kl: Tensor, delta: float, beta: float) -> Tensor:
    """DisCO's KL constraint as a penalty: (beta / 2) max(KL - delta, 0)^2 (arXiv 2505.12366).

    Its gradient beta max(KL - delta, 0) grad KL is upstream's ``max(beta (KL - delta), 0).detach() * KL``
    (whose value is not the penalty's).
    """
    return 0.5 * beta * torch.clamp(kl - delta, min=0.0) ** 2


def disco_loss(
    scores: Tensor, kl: Tensor, advantages: Tensor, group_index: Tensor, cfg: LossConfig, *, num_groups: int,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DisCO's loss (Li et al., arXiv 2505.12366; Optimization-AI/DisCO ``compute_policy_loss_disco_*``):

        L = -(1 / num_groups) sum_q J_q  +  (disco_beta / 2) max(KL - disco_delta, 0)^2

    ``scores`` from :func:`sequence_scores`, J_q from :func:`disco_objective` (``cfg.disco_tau``),
    ``kl`` the token mean of KL(pi_old || pi_theta) over the optimizer batch (``cfg.disco_kl``).
    ``num_groups`` counts every group of the optimizer batch, also those without both positives and
    negatives (upstream's ``num_questions``). No clipping. Returns ``(L, stats)``.
    """
    if not (isinstance(num_groups, int) and num_groups >= 1):
        raise ValueError(f"num_groups: must be an int >= 1, got {num_groups!r}")
    j, valid = disco_objective(scores, advantages, group_index, cfg.disco_tau)
    objective = j.sum() / num_groups
    penalty = squared_hinge_penalty(kl, cfg.disco_delta, cfg.disco_beta)
    loss = -objective + penalty
    stats = {"policy_loss": (-objective).detach(), "kl": kl.detach(), "kl_loss": penalty.detach(),
             "disco_valid_groups": valid.sum().detach().to(torch.float64),
             "clip_frac": (kl.detach() > cfg.disco_delta).to(torch.float64)}
    return loss, stats
