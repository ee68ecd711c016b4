"""One sampling step of a rectified-flow model, as pure tensor functions.

Conventions (rectified flow, as in diffusers' ``FlowMatchEulerDiscreteScheduler``):

* interpolation ``x_sigma = (1 - sigma) * x0 + sigma * eps``; ``sigma = 1`` is pure noise;
* the model predicts the velocity ``v ~ eps - x0``;
* sampling moves from ``sigma`` to ``sigma_next < sigma``; ``dt = sigma_next - sigma`` is negative;
* derived estimates ``x0_hat = x - sigma * v`` and ``x1_hat = x + (1 - sigma) * v`` (noise estimate).

``sigma``, ``sigma_next`` and ``noise_level`` may be numbers, 0-dim or ``[B]`` tensors, broadcast
against ``x`` (``[B, C, H, W]`` SD3 latents or packed ``[B, L, D]`` Flux). Computation is in float32
(float64 for float64 input); samples come back in ``x``'s dtype. The SDE steps are Flow-GRPO's
(arXiv 2505.05470), DanceGRPO's (arXiv 2505.07818) and CPS (arXiv 2509.05952); the ODE solvers
are Euler, Heun (EDM, arXiv 2206.00364) and DPM-Solver++ (arXiv 2211.01095). See docs/methods.md
("Sampling steps").
"""

from __future__ import annotations

import logging
import math
import numbers
from typing import Callable, Literal, NamedTuple

import torch
from torch import Tensor

from flowrl.flow.schedule import shift_sigmas, unshift_sigmas

logger = logging.getLogger(__name__)

__all__ = [
    "SDE_KINDS",
    "REDUCTIONS",
    "SDEStep",
    "ode_step",
    "sde_step",
    "sde_mean_std",
    "gaussian_log_prob",
    "x0_from_velocity",
    "noise_from_velocity",
    "heun_step",
    "dpm_solver_2m_step",
    "compressed_sigmas",
    "cps_log_ratio_scale",
]

SigmaLike = float | int | Tensor
SDEKind = Literal["flow_sde", "dance_sde", "cps", "ode"]
Reduction = Literal["mean", "sum"]

#: The transition kinds understood by :func:`sde_step` / :func:`sde_mean_std`.
SDE_KINDS: tuple[str, ...] = ("flow_sde", "dance_sde", "cps", "ode")
#: The reductions understood by :func:`gaussian_log_prob`.
REDUCTIONS: tuple[str, ...] = ("mean", "sum")

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


class SDEStep(NamedTuple):
    """Result of one stochastic step ``x -> x'``."""

    prev_sample: Tensor
    """x' (the next, less noisy sample), same shape and dtype as x."""
    log_prob: Tensor
    """[B] Gaussian log-density of the transition x -> x' (reduced over non-batch dims)."""
    mean: Tensor
    """mu, same shape as x, in the compute dtype (float32 or float64)."""
    std: Tensor
    """Transition std s, broadcastable to x: shape [B, 1, ..., 1] or a 0-dim tensor."""


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any given tensor is float64, else float32 (never lower than float32)."""
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def _check_x(x: Tensor, name: str = "x") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 1:
        raise ValueError(f"{name} must have a batch dimension (ndim >= 1), got a 0-dim tensor")
    if not (x.is_floating_point()):
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def _check_same_shape(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if not isinstance(b, Tensor):
        raise TypeError(f"{name_b} must be a torch.Tensor, got {type(b).__name__}")
    if a.shape != b.shape:
        raise ValueError(
            f"{name_b} must have the same shape as {name_a}: got {tuple(b.shape)} vs {tuple(a.shape)}"
        )


def _per_sample(value: SigmaLike, name: str, x: Tensor, dtype: torch.dtype) -> Tensor:
    """Turn a float / 0-dim / [B] value into a tensor broadcastable to ``x`` ([B,1,...,1] or 0-dim)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number or a tensor, got bool")
    if isinstance(value, numbers.Real):
        # torch.full fills on the device: no host-to-device copy, no synchronisation
        return torch.full((), float(value), dtype=dtype, device=x.device)
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a float, a 0-dim tensor or a [B] tensor, got {type(value).__name__}")
    batch = x.shape[0]
    trailing = [1] * (x.ndim - 1)
    if value.ndim == 0:
        return value.to(device=x.device, dtype=dtype)
    if value.ndim == 1 and value.shape[0] in (1, batch):
        return value.to(device=x.device, dtype=dtype).reshape(value.shape[0], *trailing)
    if value.ndim == x.ndim and value.shape[0] in (1, batch) and all(d == 1 for d in value.shape[1:]):
        return value.to(device=x.device, dtype=dtype)
    raise ValueError(
        f"{name} must be a float, a 0-dim tensor or a [B] tensor with B = x.shape[0] = {batch} "
        f"(or already shaped [B, 1, ..., 1]); got shape {tuple(value.shape)} for x of shape {tuple(x.shape)}"
    )


def host_values(value: SigmaLike | None) -> Tensor | None:
    """The value as a CPU float64 tensor if that needs no device synchronisation, else None."""
    if value is None:
        return None
    if isinstance(value, Tensor):
        return value.detach().to(torch.float64).reshape(-1) if value.device.type == "cpu" else None
    return torch.tensor([float(value)], dtype=torch.float64)


def _check_sigma_pair(sigma: SigmaLike, sigma_next: SigmaLike) -> None:
    """Require 0 <= sigma_next < sigma <= 1 (for values that can be checked without a device sync)."""
    s = host_values(sigma)
    sn = host_values(sigma_next)
    if s is not None and (bool(torch.any(s > 1.0)) or bool(torch.any(s <= 0.0)) or bool(torch.any(s.isnan()))):
        raise ValueError(f"sigma must lie in (0, 1], got {sigma}")
    if sn is not None and (bool(torch.any(sn < 0.0)) or bool(torch.any(sn.isnan()))):
        raise ValueError(f"sigma_next must be >= 0, got {sigma_next}")
    if s is not None and sn is not None:
        try:
            smaller = bool(torch.all(sn < s))
        except RuntimeError as err:  # shapes that do not broadcast are reported by _per_sample
            raise ValueError(
                f"sigma and sigma_next have incompatible shapes: {tuple(s.shape)}, {tuple(sn.shape)}"
            ) from err
        if not smaller:
            raise ValueError(
                f"sigma_next must be smaller than sigma (sampling runs from noise to data), "
                f"got sigma={sigma}, sigma_next={sigma_next}"
            )


def _check_kind(kind: str) -> None:
    if kind not in SDE_KINDS:
        raise ValueError(f"kind must be one of {SDE_KINDS}, got {kind!r}")


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


# ----------------------------------------------------------------------------------------------
# estimates from a velocity
# ----------------------------------------------------------------------------------------------


def x0_from_velocity(x: Tensor, velocity: Tensor, sigma: SigmaLike) -> Tensor:
    """Data estimate ``x0_hat = x - sigma * v``.

    From ``x = (1 - sigma) x0 + sigma eps`` and ``v = eps - x0``: ``x - sigma v = x0``
    (rectified flow, Liu et al. arXiv 2209.03003; SD3 arXiv 2403.03206). Computed in float32 and
    returned in ``x``'s dtype.
    """
    _check_x(x)
    _check_same_shape(x, velocity, "x", "velocity")
    dtype = _compute_dtype(x, velocity)
    s = _per_sample(sigma, "sigma", x, dtype)
    return (x.to(dtype) - s * velocity.to(dtype)).to(x.dtype)


def noise_from_velocity(x: Tensor, velocity: Tensor, sigma: SigmaLike) -> Tensor:
    """Noise estimate ``x1_hat = x + (1 - sigma) * v``.

    From ``x = (1 - sigma) x0 + sigma eps`` and ``v = eps - x0``: ``x + (1 - sigma) v = eps``
    (rectified flow, arXiv 2209.03003; used as "x1" by CPS, arXiv 2509.05952). Computed in float32 and
    returned in ``x``'s dtype.
    """
    _check_x(x)
    _check_same_shape(x, velocity, "x", "velocity")
    dtype = _compute_dtype(x, velocity)
    s = _per_sample(sigma, "sigma", x, dtype)
    return (x.to(dtype) + (1.0 - s) * velocity.to(dtype)).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# deterministic steps
# ----------------------------------------------------------------------------------------------


def ode_step(x: Tensor, velocity: Tensor, sigma: SigmaLike, sigma_next: SigmaLike) -> Tensor:
    """Euler step of the probability-flow ODE ``dx/dsigma = v``: ``x' = x + v * (sigma_next - sigma)``.

    This is exactly diffusers' ``FlowMatchEulerDiscreteScheduler.step`` (rectified flow,
    arXiv 2209.03003; SD3 arXiv 2403.03206). Computed in float32, returned in ``x``'s dtype.
    """
    _check_x(x)
    _check_same_shape(x, velocity, "x", "velocity")
    dtype = _compute_dtype(x, velocity)
    s = _per_sample(sigma, "sigma", x, dtype)
    sn = _per_sample(sigma_next, "sigma_next", x, dtype)
    _check_sigma_pair(sigma, sigma_next)
    return (x.to(dtype) + velocity.to(dtype) * (sn - s)).to(x.dtype)


def heun_step(
    x: Tensor,
    velocity: Tensor,
    sigma: SigmaLike,
    sigma_next: SigmaLike,
    velocity_fn: Callable[[Tensor, SigmaLike], Tensor],
    *,
    euler_at_zero: bool = True,
) -> Tensor:
    """Heun's 2nd-order step (explicit trapezoid) for ``dx/dsigma = v``; 2 NFE per step.

    ``x_e = x + v(x, sigma) dt``;  ``x' = x + (v(x, sigma) + v(x_e, sigma_next)) / 2 * dt``
    (Karras et al., EDM, arXiv 2206.00364, Algorithm 1). ``velocity`` is ``v(x, sigma)`` (already
    computed by the caller); ``velocity_fn(x_e, sigma_next)`` is called once for the corrector, with
    ``x_e`` in ``x``'s dtype and ``sigma_next`` exactly as passed here.

    As in EDM and diffusers' ``FlowMatchHeunDiscreteScheduler``, the final step to ``sigma_next == 0``
    is a plain Euler step (1 NFE) when ``euler_at_zero`` (the network is rarely trained at sigma = 0),
    so ``n`` steps cost ``2n - 1`` NFE; elements of a ``[B]`` ``sigma_next`` that are 0 get the Euler
    result (deciding whether all are 0 reads an accelerator tensor ``sigma_next`` back to the host).
    Computed in float32, returned in ``x``'s dtype.
    """
    _check_x(x)
    _check_same_shape(x, velocity, "x", "velocity")
    if not callable(velocity_fn):
        raise TypeError("velocity_fn must be callable as velocity_fn(x, sigma) -> velocity")
    dtype = _compute_dtype(x, velocity)
    s = _per_sample(sigma, "sigma", x, dtype)
    sn = _per_sample(sigma_next, "sigma_next", x, dtype)
    _check_sigma_pair(sigma, sigma_next)
    dt = sn - s
    x32 = x.to(dtype)
    v32 = velocity.to(dtype)
    x_euler = x32 + v32 * dt
    at_zero = sn == 0
    sn_host = host_values(sigma_next)
    all_zero = bool(torch.all(sn_host == 0)) if sn_host is not None else bool(torch.all(at_zero))
    if euler_at_zero and all_zero:
        return x_euler.to(x.dtype)
    v2 = velocity_fn(x_euler.to(x.dtype), sigma_next)
    _check_same_shape(x, v2, "x", "velocity_fn(x, sigma_next)")
    x_heun = x32 + 0.5 * (v32 + v2.to(dtype)) * dt
    if euler_at_zero:
        x_heun = torch.where(at_zero, x_euler, x_heun)
    return x_heun.to(x.dtype)


def dpm_solver_2m_step(
    x: Tensor,
    x0_pred: Tensor,
    sigma: SigmaLike,
    sigma_next: SigmaLike,
    x0_pred_prev: Tensor | None = None,
    sigma_prev: SigmaLike | None = None,
) -> Tensor:
    """DPM-Solver++(2M) step in data-prediction form for rectified flow (1 NFE per step).

    Lu et al., DPM-Solver++, arXiv 2211.01095, Algorithm 2, with the rectified-flow noise schedule
    ``alpha(sigma) = 1 - sigma`` and ``sigma``; ``lambda = log(alpha / sigma)`` (half log-SNR) and
    ``h = lambda(sigma_next) - lambda(sigma)``:

    ``x' = (sigma_next / sigma) x - alpha_next (e^{-h} - 1) D``
         ``= (sigma_next / sigma) x + (alpha_next - sigma_next * alpha / sigma) D``

    * first order (``x0_pred_prev is None``; the DPM-Solver++(1) / DDIM step): ``D = x0_pred``;
    * second order: ``r = h_prev / h`` with ``h_prev = lambda(sigma) - lambda(sigma_prev)`` and
      ``D = x0_pred + (x0_pred - x0_pred_prev) / (2 r)``. ``sigma_prev`` is the (larger) sigma at
      which ``x0_pred_prev`` was predicted, i.e. the start of the previous step.

    Limits handled in closed form (no inf/NaN): ``sigma = 1`` (alpha = 0, lambda = -inf) gives
    ``x' = sigma_next x + alpha_next D``; ``sigma_prev = 1`` gives ``h_prev = inf`` and the correction
    vanishes (the step is first order, as in diffusers' multistep solver); the final step to
    ``sigma_next = 0`` returns ``x0_pred`` (first order, "lower order final"). Computed in float32,
    returned in ``x``'s dtype. ``x0_pred`` can come from :func:`x0_from_velocity`.
    """
    _check_x(x)
    _check_same_shape(x, x0_pred, "x", "x0_pred")
    if (x0_pred_prev is None) != (sigma_prev is None):
        raise ValueError("x0_pred_prev and sigma_prev must be given together (or both left None)")
    dtype = _compute_dtype(x, x0_pred, x0_pred_prev)
    s = _per_sample(sigma, "sigma", x, dtype)
    sn = _per_sample(sigma_next, "sigma_next", x, dtype)
    _check_sigma_pair(sigma, sigma_next)
    alpha = 1.0 - s
    alpha_n = 1.0 - sn
    coef_x = sn / s
    coef_d = alpha_n - sn * alpha / s  # == -alpha_n * (exp(-h) - 1)
    x0 = x0_pred.to(dtype)
    d = x0
    if x0_pred_prev is not None:
        _check_same_shape(x, x0_pred_prev, "x", "x0_pred_prev")
        sp = _per_sample(sigma_prev, "sigma_prev", x, dtype)  # type: ignore[arg-type]
        sp_host, s_host = host_values(sigma_prev), host_values(sigma)
        if sp_host is not None and s_host is not None and bool(torch.any(sp_host <= s_host)):
            raise ValueError(f"sigma_prev must be larger than sigma, got sigma_prev={sigma_prev}, sigma={sigma}")
        lam = torch.log(alpha) - torch.log(s)
        lam_n = torch.log(alpha_n) - torch.log(sn)
        lam_p = torch.log(1.0 - sp) - torch.log(sp)
        h = lam_n - lam
        h_prev = lam - lam_p
        ok = torch.isfinite(h) & torch.isfinite(h_prev) & (h_prev > 0)
        inv_r = torch.where(ok, h / torch.where(ok, h_prev, torch.ones_like(h_prev)), torch.zeros_like(h))
        d = x0 + 0.5 * inv_r * (x0 - x0_pred_prev.to(dtype))
    out = coef_x * x.to(dtype) + coef_d * d
    out = torch.where(sn == 0, x0, out)
    return out.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# stochastic steps
# ----------------------------------------------------------------------------------------------


def sde_mean_std(
    x: Tensor,
    velocity: Tensor,
    sigma: SigmaLike,
    sigma_next: SigmaLike,
    noise_level: SigmaLike,
    kind: SDEKind = "flow_sde",
) -> tuple[Tensor, Tensor]:
    """Mean ``mu`` and std ``s`` of the Gaussian transition ``x' ~ N(mu, s^2 I)`` of one step.

    With ``dt = sigma_next - sigma < 0``, ``a = noise_level``:

    * ``"flow_sde"`` (Flow-GRPO, arXiv 2505.05470, "ODE-to-SDE conversion"): Euler-Maruyama of the
      reverse SDE ``dx = [v + g^2/(2 sigma) (x + (1 - sigma) v)] dt + g dw`` with
      ``g = std_t = a * sqrt(sigma / (1 - sigma))``:
      ``mu = x + [v + std_t^2 / (2 sigma) * (x + (1 - sigma) v)] * dt``, ``s = std_t * sqrt(|dt|)``.
      At the ``sigma = 1`` endpoint the denominator ``1 - sigma`` is replaced by ``1 - sigma_next``
      (Flow-GRPO replaces sigma = 1 by the schedule's second sigma, which is ``sigma_next`` at the
      first step), so the first step is finite: ``std_t = a / sqrt(1 - sigma_next)``.
      At the final step to ``sigma_next = 0`` the std is finite, ``s = a * sigma / sqrt(1 - sigma)``
      (a = 0.7: 0.0063 for SD3's last sigma 0.0089 at 10 steps/shift 3, but 0.22 for Flux's last
      sigma 0.273 at 6 steps and 512x512): that step adds noise to the output and is normally neither
      stochastic nor trained (Flow-GRPO's ``timestep_fraction = 0.99``).
    * ``"dance_sde"`` (DanceGRPO, arXiv 2505.07818): the same drift with a constant diffusion
      ``std_t = a`` (eta, 0.3 in its Flux recipes): ``s = a * sqrt(|dt|)``.
    * ``"cps"`` (Coefficients-Preserving Sampling, arXiv 2509.05952): ``s = sigma_next * sin(a pi/2)``,
      ``mu = (1 - sigma_next) x0_hat + sqrt(sigma_next^2 - s^2) x1_hat`` (the square root is computed
      as ``sigma_next * cos(a pi/2)``, the same number without a rounding-induced negative radicand).
      Requires ``0 <= a <= 1``; ``s = 0`` at ``sigma_next = 0``.
    * ``"ode"``: the Euler step ``mu = x + v dt`` with ``s = 0`` for any ``noise_level``.

    ``noise_level = 0`` gives the deterministic Euler mean (flow/dance) or DDIM mean (cps, which for
    rectified flow is again the Euler step) with ``s = 0``. Computed in float32 (or float64); ``mu``
    has ``x``'s shape, ``s`` is ``[B,1,...,1]`` or 0-dim. Gradients flow from ``mu`` to ``velocity``.

    How the three SDEs' marginals compare (measured): docs/methods.md ("Sampling steps").
    """
    _check_x(x)
    _check_same_shape(x, velocity, "x", "velocity")
    _check_kind(kind)
    dtype = _compute_dtype(x, velocity)
    s = _per_sample(sigma, "sigma", x, dtype)
    sn = _per_sample(sigma_next, "sigma_next", x, dtype)
    a = _per_sample(noise_level, "noise_level", x, dtype)
    _check_sigma_pair(sigma, sigma_next)
    a_host = host_values(noise_level)
    if a_host is not None:
        if bool(torch.any(a_host < 0)) or bool(torch.any(a_host.isnan())):
            raise ValueError(f"noise_level must be >= 0, got {noise_level}")
        if kind == "cps" and bool(torch.any(a_host > 1)):
            raise ValueError(f"noise_level must lie in [0, 1] for kind='cps', got {noise_level}")
    x = x.to(dtype)
    v = velocity.to(dtype)
    dt = sn - s

    if kind == "ode":
        mean = x + v * dt
        std = torch.zeros_like(dt + a)  # broadcast shape of the scalars, all zero
        return mean, std

    if kind == "cps":
        theta = a * (math.pi / 2.0)
        std = sn * torch.sin(theta)
        x0_hat = x - s * v
        x1_hat = x + (1.0 - s) * v
        mean = (1.0 - sn) * x0_hat + (sn * torch.cos(theta)) * x1_hat
        return mean, std

    if kind == "flow_sde":
        denom_sigma = torch.where(s >= 1.0, sn, s)
        std_t = a * torch.sqrt(s / (1.0 - denom_sigma))
    else:  # dance_sde
        std_t = a
    mean = x + (v + (std_t**2 / (2.0 * s)) * (x + (1.0 - s) * v)) * dt
    std = std_t * torch.sqrt(-dt)
    return mean, std


def gaussian_log_prob(sample: Tensor, mean: Tensor, std: Tensor, reduction: Reduction = "mean") -> Tensor:
    """Log-density of ``sample`` under ``N(mean, std^2 I)``, reduced per batch element -> ``[B]``.

    Per element: ``log N(x'; mu, s^2) = -(x' - mu)^2 / (2 s^2) - log s - log sqrt(2 pi)``, then over all
    non-batch dims (D elements):

    * ``"mean"``: the per-element average (the convention of Flow-GRPO arXiv 2505.05470, DanceGRPO,
      MixGRPO). The importance ratio ``exp(logp - logp_old)`` is then the *geometric mean* of the D
      per-element ratios, ``rho_mean = rho_sum^(1/D)``: its deviation from 1 is ~D times smaller, which
      is why Flow-GRPO clip ranges are ~1e-4. A KL estimated from these log-probs is the per-element
      KL, ``KL_sum / D``.
    * ``"sum"``: the true joint log-density of the transition. Log-ratios and KLs are D times those of
      ``"mean"``; a clip range ``eps`` tuned for ``"mean"`` corresponds to about ``D * eps`` on the
      log-ratio here (``log(1 + eps) ~ eps``), and a KL weight ``beta`` to ``beta / D``.

    Elements with ``std == 0`` (deterministic transitions: ``kind="ode"``, ``noise_level = 0``, CPS at
    ``sigma_next = 0``) contribute 0 by convention (a delta density has no finite log-density); the
    zero stays attached to the autograd graph, so a backward gives zero gradients, not an error or NaN.
    ``std`` must be broadcastable to ``sample`` (``[B,1,...,1]``, 0-dim, or full shape) and ``>= 0``.
    Computed in float32 (or float64).
    """
    _check_x(sample, "sample")
    _check_same_shape(sample, mean, "sample", "mean")
    _check_reduction(reduction)
    if not isinstance(std, Tensor):
        std = torch.tensor(float(std), device=sample.device)
    try:
        shape = torch.broadcast_shapes(std.shape, sample.shape)
    except RuntimeError as err:
        raise ValueError(
            f"std of shape {tuple(std.shape)} is not broadcastable to sample of shape {tuple(sample.shape)}"
        ) from err
    if shape != sample.shape:
        raise ValueError(
            f"std of shape {tuple(std.shape)} is not broadcastable to sample of shape {tuple(sample.shape)}"
        )
    dtype = _compute_dtype(sample, mean, std)
    sample = sample.to(dtype)
    mean = mean.to(dtype)
    std = std.to(dtype)
    std_host = host_values(std)
    if std_host is not None and (bool(torch.any(std_host < 0)) or bool(torch.any(std_host.isnan()))):
        raise ValueError("std must be >= 0")
    deterministic = std == 0
    safe_std = torch.where(deterministic, torch.ones_like(std), std)
    elem = -((sample - mean) ** 2) / (2.0 * safe_std**2) - torch.log(safe_std) - _HALF_LOG_2PI
    elem = torch.where(deterministic, torch.zeros_like(elem), elem)
    flat = elem.reshape(sample.shape[0], -1)
    return flat.mean(dim=1) if reduction == "mean" else flat.sum(dim=1)


def sde_step(
    x: Tensor,
    velocity: Tensor,
    sigma: SigmaLike,
    sigma_next: SigmaLike,
    noise_level: SigmaLike,
    generator: torch.Generator | None = None,
    prev_sample: Tensor | None = None,
    *,
    kind: SDEKind = "flow_sde",
    reduction: Reduction = "mean",
    noise: Tensor | None = None,
) -> SDEStep:
    """One stochastic step ``x -> x' ~ N(mu, s^2 I)`` with its Gaussian log-probability.

    ``(mu, s)`` come from :func:`sde_mean_std` (``kind``: Flow-GRPO's ``"flow_sde"`` arXiv 2505.05470,
    DanceGRPO's ``"dance_sde"`` arXiv 2505.07818, ``"cps"`` arXiv 2509.05952, or ``"ode"``).

    * Sampling (``prev_sample is None``): ``x' = mu + s * n`` with ``n = noise`` if given, else
      ``n = torch.randn(x.shape, generator=generator)`` drawn on the generator's device (so a CPU
      generator gives the same noise whatever ``x``'s device) in the compute dtype. ``x'`` is returned
      in ``x``'s dtype and the log-prob is computed on that *stored* value (dtype round trip), so
      re-scoring it later reproduces the log-prob bit for bit.
    * Scoring (``prev_sample`` given): no noise is drawn; the transition ``x -> prev_sample`` is
      scored under the current ``velocity`` (what the learner recomputes with grad).

    The log-prob (:func:`gaussian_log_prob`, ``reduction`` ``"mean"`` or ``"sum"``) treats ``x'`` as
    data (detached): its gradient flows to ``velocity`` through ``mu`` only, the policy-gradient
    (score-function) form used by Flow-GRPO. Deterministic transitions (``kind="ode"``,
    ``noise_level = 0``, CPS at ``sigma_next = 0``) have ``s = 0``, ``x' = mu`` and log-prob 0.

    For ``kind="cps"`` this is the TRUE Gaussian log-density. Flow-GRPO's CPS code instead uses
    ``logp_fg = -mean_d (x' - mu)^2`` (constants and the ``1/(2 s^2)`` factor dropped), so
    ``log ratio_fg = 2 s^2 * log ratio_ours`` (reduction ``"mean"``), per step with
    ``s = sigma_next sin(a pi / 2)``; a Flow-GRPO CPS clip range ``eps_fg`` (1e-5 in its configs)
    corresponds here to ``eps_ours ~ eps_fg / (2 s^2)`` at that step (see :func:`cps_log_ratio_scale`).
    """
    _check_x(x)
    _check_reduction(reduction)
    mean, std = sde_mean_std(x, velocity, sigma, sigma_next, noise_level, kind=kind)
    if prev_sample is None:
        if noise is None:
            device = generator.device if generator is not None else x.device
            noise = torch.randn(x.shape, generator=generator, device=device, dtype=mean.dtype).to(x.device)
        else:
            _check_same_shape(x, noise, "x", "noise")
            noise = noise.to(device=x.device, dtype=mean.dtype)
        prev_sample = (mean + std * noise).to(x.dtype)
    else:
        _check_same_shape(x, prev_sample, "x", "prev_sample")
        if noise is not None:
            raise ValueError("pass either prev_sample (to score a stored transition) or noise, not both")
    log_prob = gaussian_log_prob(prev_sample.detach().to(mean.dtype), mean, std, reduction=reduction)
    return SDEStep(prev_sample=prev_sample, log_prob=log_prob, mean=mean, std=std)


def cps_log_ratio_scale(sigma_next: SigmaLike, noise_level: SigmaLike) -> Tensor:
    """Factor ``2 s^2`` with ``s = sigma_next sin(a pi / 2)`` (CPS, arXiv 2509.05952).

    Flow-GRPO's CPS "log-prob" is ``-mean_d (x' - mu)^2``; the true mean-reduced Gaussian log-prob is
    ``-mean_d (x' - mu)^2 / (2 s^2) - log s - const`` with ``s`` independent of the parameters, so
    ``log ratio_fg = 2 s^2 * log ratio_true``. A Flow-GRPO CPS clip range ``eps_fg`` corresponds to
    ``eps_fg / (2 s^2)`` on our log-ratio at that step. Returned as a float32 tensor.
    """
    sn = torch.as_tensor(sigma_next, dtype=torch.float32)
    a = torch.as_tensor(noise_level, dtype=torch.float32)
    s = sn * torch.sin(a * (math.pi / 2.0))
    return 2.0 * s**2


# ----------------------------------------------------------------------------------------------
# schedules for the ODE part
# ----------------------------------------------------------------------------------------------


def compressed_sigmas(sigmas_tail: Tensor, ratio: float, *, shift: float = 1.0) -> Tensor:
    """Re-discretise the ODE tail of a schedule into fewer steps (MixGRPO-Flash, arXiv 2507.21802).

    ``sigmas_tail`` holds the ``n + 1`` sigmas of the remaining ODE part, ``sigmas_tail[0]`` (its
    start, e.g. the sigma right after the last SDE step) down to ``sigmas_tail[-1]`` (usually 0).
    It is replaced by ``m + 1`` sigmas with ``m = max(1, int(max((n + 1) * ratio, 1)) - 1)`` steps,
    the same two endpoints, spaced uniformly in the *unshifted* time ``u``:
    ``u = sigma / (shift - (shift - 1) sigma)`` (the inverse of SD3's shift
    ``sigma = shift u / (1 + (shift - 1) u)``), then shifted back. With ``shift = 1`` (the default)
    the spacing is uniform in sigma; pass the schedule's shift (3.0 for SD3/MixGRPO's Flux recipe)
    to reproduce MixGRPO's re-discretisation, which is a linspace in unshifted time followed by the
    shift. The step count is MixGRPO's (its sampling code: ``int(max((S - L) * r, 1))`` points
    after the last SDE step L, where ``S - L = n + 1``), except that where that leaves no step
    (late windows) MixGRPO stops above sigma 0 and decodes a noisy latent, and this takes one step
    to the end. The endpoints are copied exactly; the result has ``sigmas_tail``'s dtype and device. Solve it with
    :func:`dpm_solver_2m_step` (MixGRPO-Flash's DPM-Solver++ 2nd order).
    """
    if not isinstance(sigmas_tail, Tensor) or sigmas_tail.ndim != 1 or sigmas_tail.numel() < 2:
        raise ValueError("sigmas_tail must be a 1-D tensor with at least 2 sigmas (one step)")
    if not (isinstance(ratio, (int, float)) and not isinstance(ratio, bool)) or not ratio > 0:
        raise ValueError(f"ratio must be a positive number, got {ratio!r}")
    if not shift > 0:
        raise ValueError(f"shift must be positive, got {shift!r}")
    tail = sigmas_tail.detach().to("cpu", torch.float64)
    if bool(torch.any(tail[1:] >= tail[:-1])):
        raise ValueError("sigmas_tail must be strictly decreasing")
    n = tail.numel() - 1
    m = max(1, int(max((n + 1) * ratio, 1)) - 1)
    u = unshift_sigmas(tail[[0, -1]], shift)
    grid = torch.linspace(float(u[0]), float(u[1]), m + 1, dtype=torch.float64)
    out = shift_sigmas(grid, shift)
    out[0] = tail[0]
    out[-1] = tail[-1]
    return out.to(device=sigmas_tail.device, dtype=sigmas_tail.dtype)
