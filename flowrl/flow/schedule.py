"""Sigma schedules of rectified-flow pipelines (SD3/3.5, FLUX.1), reproduced without diffusers.

Each function returns exactly the ``sigmas`` tensor that diffusers' ``FlowMatchEulerDiscreteScheduler``
holds after the pipeline's ``set_timesteps`` call: float32, length ``num_steps + 1``, decreasing from
1 (noise) to a final appended 0 (data).

* SD3 / SD3.5: linear spacing, shifted by ``sigma = shift t / (1 + (shift - 1) t)`` (Esser et al.,
  SD3, arXiv 2403.03206, section 5.3.2; ``shift`` 3.0);
* FLUX.1: the resolution-dependent shift ``sigma = e^mu / (e^mu + (1/t - 1))`` with
  ``mu = flux_mu(image_seq_len)``, SD3's shift with ``shift = e^mu``;
* FLUX.2 (dev, klein): the same shift with an empirical ``mu = flux2_mu(image_seq_len, num_steps)``
  that depends on the step count too.

The transformers are conditioned on ``timestep = sigma * num_train_timesteps``
(:func:`sigma_to_timestep`). How the arithmetic follows the scheduler's: docs/methods.md ("Sigma
schedules").
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = [
    "shift_sigmas",
    "unshift_sigmas",
    "time_shift",
    "sd3_sigmas",
    "flux_mu",
    "flux_sigmas",
    "flux2_mu",
    "sigmas_for_scheduler",
    "z_image_pipeline_sigmas",
    "sigma_to_timestep",
    "SUPPORTED_SCHEDULERS",
]

#: diffusers scheduler classes whose sigma schedule :func:`sigmas_for_scheduler` reproduces.
SUPPORTED_SCHEDULERS: tuple[str, ...] = ("FlowMatchEulerDiscreteScheduler",)

# Defaults of diffusers' FlowMatchEulerDiscreteScheduler.__init__ (used for keys a config lacks).
_SCHEDULER_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "invert_sigmas": False,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "time_shift_type": "exponential",
    "stochastic_sampling": False,
}


def shift_sigmas(sigmas: Tensor, shift: float) -> Tensor:
    """SD3's timestep shift ``sigma' = shift * sigma / (1 + (shift - 1) * sigma)``.

    Esser et al., "Scaling Rectified Flow Transformers", arXiv 2403.03206, section 5.3.2
    (``shift = sqrt(m / n)`` for resolution ratio); ``shift > 1`` spends more steps at high noise.
    Keeps the dtype of ``sigmas``; the operation order is the scheduler's.
    """
    if not shift > 0:
        raise ValueError(f"shift must be positive, got {shift!r}")
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def unshift_sigmas(sigmas: Tensor, shift: float) -> Tensor:
    """Inverse of :func:`shift_sigmas`: ``t = sigma / (shift - (shift - 1) * sigma)``.

    Solving ``sigma (1 + (shift - 1) t) = shift t`` for ``t`` (arXiv 2403.03206 shift, inverted).
    """
    if not shift > 0:
        raise ValueError(f"shift must be positive, got {shift!r}")
    return sigmas / (shift - (shift - 1) * sigmas)


def time_shift(sigmas: Tensor, mu: float, kind: Literal["exponential", "linear"] = "exponential") -> Tensor:
    """Resolution-dependent time shift of diffusers' flow scheduler (FLUX.1; SD3 paper's shift form).

    * ``"exponential"``: ``sigma' = e^mu / (e^mu + (1/sigma - 1))`` (= :func:`shift_sigmas` with
      ``shift = e^mu``; used by FLUX.1, Black Forest Labs, following arXiv 2403.03206 section 5.3.2);
    * ``"linear"``: ``sigma' = mu / (mu + (1/sigma - 1))``.

    Computed in the dtype of ``sigmas`` with the scheduler's operation order.
    """
    # A 0-dim tensor numerator: torch evaluates ``python_scalar / tensor`` via a reciprocal, which can
    # differ from numpy's true division by one ulp.
    if kind == "exponential":
        e = torch.tensor(math.exp(mu), dtype=sigmas.dtype, device=sigmas.device)
        return e / (e + (1 / sigmas - 1))
    if kind == "linear":
        m = torch.tensor(mu, dtype=sigmas.dtype, device=sigmas.device)
        return m / (m + (1 / sigmas - 1))
    raise ValueError(f"time_shift kind must be 'exponential' or 'linear', got {kind!r}")


def _np_linspace(start: float, stop: float, num: int) -> Tensor:
    """float64 linspace with numpy's algorithm (``start + i * step``, last point set to ``stop``)."""
    if num == 1:
        return torch.tensor([start], dtype=torch.float64)
    step = (stop - start) / (num - 1)
    out = torch.arange(num, dtype=torch.float64) * step + start
    out[-1] = stop
    return out


def _check_num_steps(num_steps: int) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")


def _scheduler_sigmas(
    num_steps: int,
    *,
    num_train_timesteps: int = 1000,
    shift: float = 1.0,
    use_dynamic_shifting: bool = False,
    mu: float | None = None,
    time_shift_type: str = "exponential",
    shift_terminal: float | None = None,
    pipeline_sigmas: Tensor | None = None,
) -> Tensor:
    """Replays ``FlowMatchEulerDiscreteScheduler(...).set_timesteps(num_steps, sigmas=..., mu=...)``."""
    _check_num_steps(num_steps)
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be a positive int, got {num_train_timesteps!r}")
    n_train = num_train_timesteps
    if pipeline_sigmas is None:
        # __init__: training sigmas t/N (float32), statically shifted unless dynamic shifting is on.
        train = torch.tensor([float(n_train), 1.0], dtype=torch.float32) / n_train  # [sigma_max, sigma_min]
        if not use_dynamic_shifting:
            train = shift_sigmas(train, shift)
        sigma_max, sigma_min = float(train[0]), float(train[1])
        # set_timesteps: np.linspace(sigma_max * N, sigma_min * N, n) / N in float64.
        sigmas = _np_linspace(sigma_max * n_train, sigma_min * n_train, num_steps) / n_train
    else:
        if pipeline_sigmas.ndim != 1 or pipeline_sigmas.numel() != num_steps:
            raise ValueError(f"pipeline_sigmas must be 1-D with num_steps={num_steps} entries")
        sigmas = pipeline_sigmas.to(torch.float32)  # the scheduler does np.array(sigmas).astype(float32)
    if use_dynamic_shifting:
        if mu is None:
            raise ValueError("mu must be given when use_dynamic_shifting is True")
        sigmas = time_shift(sigmas, mu, time_shift_type)  # type: ignore[arg-type]
    else:
        sigmas = shift_sigmas(sigmas, shift)
    if shift_terminal:
        one_minus = 1 - sigmas
        if float(one_minus[-1]) == 0.0:
            raise ValueError(
                "shift_terminal cannot stretch a schedule whose last sigma is 1 (num_steps=1); "
                "diffusers would return NaN here"
            )
        scale = one_minus[-1] / (1 - shift_terminal)
        sigmas = 1 - one_minus / scale
    sigmas = sigmas.to(torch.float32)
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float32)])


def sd3_sigmas(num_steps: int, shift: float = 3.0, *, num_train_timesteps: int = 1000) -> Tensor:
    """Sigmas of ``StableDiffusion3Pipeline`` with ``FlowMatchEulerDiscreteScheduler(shift=shift)``.

    ``sigma_min = shift(1 / N)`` (N = ``num_train_timesteps`` = 1000, shifted in float32 as the
    scheduler's ``__init__`` does), ``t_i = linspace(1, sigma_min, num_steps)`` (float64), then
    ``sigma_i = shift t_i / (1 + (shift - 1) t_i)`` (arXiv 2403.03206, section 5.3.2), cast to float32,
    with a final 0 appended. Note the double shift of the smallest sigma: this is what diffusers does.
    Returns a float32 tensor of length ``num_steps + 1``.
    """
    return _scheduler_sigmas(num_steps, num_train_timesteps=num_train_timesteps, shift=shift)


def flux_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX.1's resolution-dependent shift ``mu`` (diffusers' ``calculate_shift``).

    Linear in the number of image tokens: ``m = (max_shift - base_shift) / (max_seq_len - base_seq_len)``,
    ``mu = base_shift + m * (image_seq_len - base_seq_len)``; the effective SD3-style shift is ``e^mu``
    (arXiv 2403.03206 section 5.3.2 motivates shifting with resolution). For FLUX.1 the packed latent
    has ``image_seq_len = (H / 16) * (W / 16)`` tokens, e.g. 1024 at 512x512 and 4096 at 1024x1024.
    """
    if isinstance(image_seq_len, bool) or not isinstance(image_seq_len, int) or image_seq_len < 1:
        raise ValueError(f"image_seq_len must be a positive int, got {image_seq_len!r}")
    if max_seq_len == base_seq_len:
        raise ValueError("max_seq_len must differ from base_seq_len")
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def flux_sigmas(
    num_steps: int,
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> Tensor:
    """Sigmas of ``FluxPipeline`` (scheduler with ``use_dynamic_shifting=True``, exponential shift).

    The pipeline passes ``t = linspace(1, 1/num_steps, num_steps)`` (cast to float32 by the scheduler)
    and ``mu = flux_mu(image_seq_len, ...)``; the scheduler returns
    ``sigma = e^mu / (e^mu + (1/t - 1))`` in float32, with a final 0 appended.
    Returns a float32 tensor of length ``num_steps + 1``.
    """
    _check_num_steps(num_steps)
    mu = flux_mu(image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift)
    return _scheduler_sigmas(
        num_steps,
        use_dynamic_shifting=True,
        mu=mu,
        time_shift_type="exponential",
        pipeline_sigmas=_np_linspace(1.0, 1.0 / num_steps, num_steps),
    )


def z_image_pipeline_sigmas(num_steps: int) -> Tensor:
    """The sigmas ZImagePipeline hands its scheduler: ``torch.linspace(1, 1/n, n)`` in float32 (before
    the scheduler's shift), the points of :func:`flux_sigmas` but rounded as torch's float32 linspace
    rounds them."""
    _check_num_steps(num_steps)
    return torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float32)


def flux2_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's empirical shift ``mu`` (diffusers' ``compute_empirical_mu`` in pipeline_flux2.py, from
    Black Forest Labs' flux2 sampling code).

    Two lines fitted in the image token count L, at 10 and at 200 steps:
    ``mu_10 = 8.73809524e-05 L + 1.89833333`` and ``mu_200 = 0.00016927 L + 0.45666666``; ``mu`` is
    linear in ``num_steps`` through both, ``mu = a n + b`` with ``a = (mu_200 - mu_10) / 190`` and
    ``b = mu_200 - 200 a``; above L = 4300 tokens ``mu = mu_200`` whatever the step count. Python
    floats with the pipeline's operation order, so the value is bit-identical.
    """
    if isinstance(image_seq_len, bool) or not isinstance(image_seq_len, int) or image_seq_len < 1:
        raise ValueError(f"image_seq_len must be a positive int, got {image_seq_len!r}")
    _check_num_steps(num_steps)
    mu_200 = 0.00016927 * image_seq_len + 0.45666666
    if image_seq_len > 4300:
        return float(mu_200)
    mu_10 = 8.73809524e-05 * image_seq_len + 1.89833333
    slope = (mu_200 - mu_10) / 190.0
    return float(slope * num_steps + (mu_200 - 200.0 * slope))


def sigmas_for_scheduler(
    scheduler_config: Mapping[str, Any],
    num_steps: int,
    image_seq_len: int | None = None,
    *,
    pipeline: Literal["auto", "sd3", "flux", "flux2", "z_image"] = "auto",
) -> Tensor:
    """The sigma schedule a diffusers pipeline would use, from its scheduler's config dict.

    Reads ``shift``, ``use_dynamic_shifting``, ``base_shift``/``max_shift``,
    ``base_image_seq_len``/``max_image_seq_len``, ``time_shift_type`` (``"exponential"`` or
    ``"linear"``), ``shift_terminal`` and ``num_train_timesteps``; missing keys take the defaults of
    ``FlowMatchEulerDiscreteScheduler``. ``pipeline`` says which sigmas the pipeline feeds the
    scheduler: ``"flux"`` feeds ``linspace(1, 1/n, n)`` (FluxPipeline), ``"sd3"`` lets the scheduler
    space its own timesteps (StableDiffusion3Pipeline), ``"z_image"`` feeds the same points computed by
    ``torch.linspace`` in float32 (ZImagePipeline; they can differ from numpy's float64 points in the last
    bit), ``"flux2"`` feeds FluxPipeline's sigmas with FLUX.2's ``mu = flux2_mu(image_seq_len, num_steps)``
    (Flux2Pipeline, Flux2KleinPipeline); ``"auto"`` picks ``"flux"`` when
    ``use_dynamic_shifting`` is on and ``"sd3"`` otherwise. ``image_seq_len`` (the number of latent
    tokens, ``(H/16)*(W/16)``) is required with dynamic shifting.

    Raises ValueError for schedulers other than ``FlowMatchEulerDiscreteScheduler`` (by
    ``_class_name``) and for settings whose schedules are not reproduced here: ``use_karras_sigmas``,
    ``use_exponential_sigmas``, ``use_beta_sigmas``, ``invert_sigmas``. ``stochastic_sampling`` only
    changes the scheduler's own ``step`` (which flowrl replaces), so it is ignored with a warning.
    Note: StableDiffusion3Pipeline falls back to ``max_shift=1.16`` when the key is absent from the
    config, FluxPipeline to 1.15; diffusers always writes the key, and here the scheduler default 1.15
    is used.
    """
    if not isinstance(scheduler_config, Mapping):
        raise ValueError(
            f"scheduler_config must be a mapping (e.g. pipe.scheduler.config), got {type(scheduler_config).__name__}"
        )
    cfg = dict(_SCHEDULER_DEFAULTS)
    cfg.update({k: v for k, v in scheduler_config.items() if v is not None})
    class_name = scheduler_config.get("_class_name")
    if class_name is not None and class_name not in SUPPORTED_SCHEDULERS:
        raise ValueError(
            f"scheduler_config['_class_name']={class_name!r} is not supported; "
            f"sigmas are reproduced for {SUPPORTED_SCHEDULERS}"
        )
    for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas"):
        if cfg.get(key):
            raise ValueError(f"scheduler_config[{key!r}]=True is not supported by flowrl's sigma schedules")
    if cfg.get("stochastic_sampling"):
        logger.warning("scheduler_config['stochastic_sampling'] is ignored: flowrl.flow.steps does the stepping")
    time_shift_type = cfg["time_shift_type"]
    if time_shift_type not in ("exponential", "linear"):
        raise ValueError(
            f"scheduler_config['time_shift_type'] must be 'exponential' or 'linear', got {time_shift_type!r}"
        )
    if pipeline not in ("auto", "sd3", "flux", "flux2", "z_image"):
        raise ValueError(f"pipeline must be 'auto', 'sd3', 'flux', 'flux2' or 'z_image', got {pipeline!r}")
    _check_num_steps(num_steps)
    dynamic = bool(cfg["use_dynamic_shifting"])
    if pipeline == "auto":
        pipeline = "flux" if dynamic else "sd3"
    mu = None
    if dynamic:
        if image_seq_len is None:
            raise ValueError(
                "image_seq_len is required when scheduler_config['use_dynamic_shifting'] is True "
                "(number of latent tokens, (H/16)*(W/16))"
            )
        mu = flux2_mu(image_seq_len, num_steps) if pipeline == "flux2" else flux_mu(
            image_seq_len,
            int(cfg["base_image_seq_len"]),
            int(cfg["max_image_seq_len"]),
            float(cfg["base_shift"]),
            float(cfg["max_shift"]),
        )
    shift = float(cfg["shift"])
    if not shift > 0:
        raise ValueError(f"scheduler_config['shift'] must be positive, got {shift!r}")
    shift_terminal = cfg.get("shift_terminal")
    if shift_terminal is not None and not (0 <= float(shift_terminal) < 1):
        raise ValueError(f"scheduler_config['shift_terminal'] must lie in [0, 1), got {shift_terminal!r}")
    pipeline_sigmas = None
    if pipeline in ("flux", "flux2"):
        pipeline_sigmas = _np_linspace(1.0, 1.0 / num_steps, num_steps)
    elif pipeline == "z_image":
        pipeline_sigmas = z_image_pipeline_sigmas(num_steps)
    return _scheduler_sigmas(
        num_steps,
        num_train_timesteps=int(cfg["num_train_timesteps"]),
        shift=shift,
        use_dynamic_shifting=dynamic,
        mu=mu,
        time_shift_type=time_shift_type,
        shift_terminal=float(shift_terminal) if shift_terminal else None,
        pipeline_sigmas=pipeline_sigmas,
    )


def sigma_to_timestep(sigma: float | Tensor, num_train_timesteps: int = 1000) -> float | Tensor:
    """Timestep the transformers are conditioned on: ``t = sigma * num_train_timesteps`` (= 1000).

    This is ``FlowMatchEulerDiscreteScheduler.timesteps``. ``SD3Transformer2DModel`` takes it as is
    (StableDiffusion3Pipeline passes ``timestep = t``); ``FluxTransformer2DModel`` is called by
    FluxPipeline with ``timestep = t / 1000`` (= sigma) and multiplies by 1000 inside. Floats give
    floats; tensors keep their dtype and shape.
    """
    if isinstance(sigma, bool):
        raise ValueError("sigma must be a number or a tensor, got bool")
    return sigma * num_train_timesteps
