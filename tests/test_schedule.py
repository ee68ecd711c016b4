"""Sigma schedules against diffusers' own FlowMatchEulerDiscreteScheduler and pipeline helpers.

The references are diffusers' real scheduler, driven the way each pipeline drives it:
* StableDiffusion3Pipeline: ``retrieve_timesteps(scheduler, n, sigmas=None)`` (no ``mu`` when
  ``use_dynamic_shifting`` is off);
* FluxPipeline: ``sigmas = np.linspace(1.0, 1 / n, n)``, ``mu = calculate_shift(image_seq_len, ...)``,
  ``retrieve_timesteps(scheduler, n, sigmas=sigmas, mu=mu)``.

Tolerance: ``atol = 2**-24`` (6e-8, at most one float32 ulp for values in [0.5, 1], and several ulps
below) with ``rtol = 0``; in practice the values agree bit for bit.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps as flux_retrieve_timesteps
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
    retrieve_timesteps as sd3_retrieve_timesteps,
)

from flowrl.flow.schedule import (
    flux_mu,
    flux_sigmas,
    shift_sigmas,
    sd3_sigmas,
    sigma_to_timestep,
    sigmas_for_scheduler,
    time_shift,
    unshift_sigmas,
)

ATOL = 2.0**-24

# Scheduler configs as published with the models (scheduler/scheduler_config.json).
SD35_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
FLUX1_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}


def _scheduler_from(config: dict) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(**{k: v for k, v in config.items() if not k.startswith("_")})


def _sd3_reference(num_steps: int, shift: float) -> FlowMatchEulerDiscreteScheduler:
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sd3_retrieve_timesteps(sched, num_steps, "cpu", sigmas=None)
    return sched


def _flux_reference(num_steps: int, image_seq_len: int, config: dict = FLUX1_CONFIG) -> FlowMatchEulerDiscreteScheduler:
    sched = _scheduler_from(config)
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps)  # FluxPipeline.__call__, step 5
    mu = calculate_shift(
        image_seq_len,
        sched.config.get("base_image_seq_len", 256),
        sched.config.get("max_image_seq_len", 4096),
        sched.config.get("base_shift", 0.5),
        sched.config.get("max_shift", 1.15),
    )
    flux_retrieve_timesteps(sched, num_steps, "cpu", sigmas=sigmas, mu=mu)
    return sched


@pytest.mark.parametrize("shift", [1.0, 2.5, 3.0, 6.0])
@pytest.mark.parametrize("num_steps", [1, 2, 5, 10, 28, 40, 50])
def test_sd3_sigmas_match_diffusers(num_steps: int, shift: float) -> None:
    ref = _sd3_reference(num_steps, shift)
    ours = sd3_sigmas(num_steps, shift)
    assert ours.dtype == torch.float32
    assert ours.shape == (num_steps + 1,)
    assert ours[-1].item() == 0.0 and ours[0].item() == 1.0
    torch.testing.assert_close(ours, ref.sigmas, rtol=0, atol=ATOL)
    # what the transformer is fed: scheduler.timesteps = sigma * 1000
    torch.testing.assert_close(sigma_to_timestep(ours[:-1]), ref.timesteps, rtol=0, atol=1000 * ATOL)


def test_sd3_smallest_sigma_is_double_shifted() -> None:
    """diffusers spaces to shift(1/1000) and shifts again: check against the closed form in float64."""
    shift, n = 3.0, 10
    t_min = shift * 0.001 / (1 + (shift - 1) * 0.001)  # already-shifted smallest training sigma
    expected_last = shift * t_min / (1 + (shift - 1) * t_min)
    assert abs(sd3_sigmas(n, shift)[-2].item() - expected_last) < 1e-7
    assert sd3_sigmas(n, shift)[-2].item() > t_min  # i.e. not the single shift


@pytest.mark.parametrize("image_seq_len", [16, 256, 1024, 2025, 4096, 8192])
@pytest.mark.parametrize("num_steps", [1, 6, 16, 28, 50])
def test_flux_sigmas_match_diffusers(num_steps: int, image_seq_len: int) -> None:
    ref = _flux_reference(num_steps, image_seq_len)
    ours = flux_sigmas(num_steps, image_seq_len)
    assert ours.dtype == torch.float32 and ours.shape == (num_steps + 1,)
    assert ours[-1].item() == 0.0
    torch.testing.assert_close(ours, ref.sigmas, rtol=0, atol=ATOL)
    torch.testing.assert_close(sigma_to_timestep(ours[:-1]), ref.timesteps, rtol=0, atol=1000 * ATOL)


@pytest.mark.parametrize("image_seq_len", [1, 256, 1024, 3000, 4096, 10000])
def test_flux_mu_matches_calculate_shift(image_seq_len: int) -> None:
    assert flux_mu(image_seq_len) == pytest.approx(calculate_shift(image_seq_len), rel=1e-15, abs=1e-15)
    kwargs = dict(base_seq_len=64, max_seq_len=1024, base_shift=0.3, max_shift=1.4)
    assert flux_mu(image_seq_len, **kwargs) == pytest.approx(
        calculate_shift(image_seq_len, 64, 1024, 0.3, 1.4), rel=1e-15, abs=1e-15
    )
    # endpoints of the line
    assert flux_mu(256) == pytest.approx(0.5) and flux_mu(4096) == pytest.approx(1.15)


def test_exponential_time_shift_equals_sd3_shift_with_e_mu() -> None:
    t = torch.linspace(1.0, 0.01, 50, dtype=torch.float64)
    mu = 0.87
    torch.testing.assert_close(time_shift(t, mu), shift_sigmas(t, math.exp(mu)), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(unshift_sigmas(shift_sigmas(t, 3.0), 3.0), t, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("num_steps", [1, 4, 10, 28])
def test_sigmas_for_scheduler_sd35_config(num_steps: int) -> None:
    ref = _sd3_reference(num_steps, 3.0)
    torch.testing.assert_close(sigmas_for_scheduler(SD35_CONFIG, num_steps), ref.sigmas, rtol=0, atol=ATOL)
    # the full config dict of a real scheduler (FrozenDict) works too, image_seq_len is ignored
    sched = _scheduler_from(SD35_CONFIG)
    torch.testing.assert_close(
        sigmas_for_scheduler(sched.config, num_steps, image_seq_len=4096), ref.sigmas, rtol=0, atol=ATOL
    )


@pytest.mark.parametrize("image_seq_len", [256, 1024, 4096])
@pytest.mark.parametrize("num_steps", [6, 28])
def test_sigmas_for_scheduler_flux_config(num_steps: int, image_seq_len: int) -> None:
    ref = _flux_reference(num_steps, image_seq_len)
    ours = sigmas_for_scheduler(FLUX1_CONFIG, num_steps, image_seq_len)
    torch.testing.assert_close(ours, ref.sigmas, rtol=0, atol=ATOL)
    torch.testing.assert_close(ours, flux_sigmas(num_steps, image_seq_len), rtol=0, atol=0)


@pytest.mark.parametrize(
    "extra",
    [
        {"time_shift_type": "linear"},
        {"shift_terminal": 0.1},
        {"base_shift": 0.3, "max_shift": 1.5, "base_image_seq_len": 128, "max_image_seq_len": 2048},
        {"num_train_timesteps": 500},
    ],
)
def test_sigmas_for_scheduler_other_dynamic_settings(extra: dict) -> None:
    config = {**FLUX1_CONFIG, **extra}
    n, seq = 12, 1600
    ref = _flux_reference(n, seq, config)
    torch.testing.assert_close(sigmas_for_scheduler(config, n, seq), ref.sigmas, rtol=0, atol=ATOL)


@pytest.mark.parametrize("extra", [{}, {"time_shift_type": "linear"}, {"shift_terminal": 0.05}])
def test_sigmas_for_scheduler_dynamic_with_sd3_pipeline(extra: dict) -> None:
    """SD3 pipeline with a dynamic-shifting scheduler: the scheduler spaces its own timesteps."""
    config = {**FLUX1_CONFIG, **extra}
    n, seq = 9, 1024
    sched = _scheduler_from(config)
    mu = calculate_shift(seq, 256, 4096, 0.5, 1.15)
    sd3_retrieve_timesteps(sched, n, "cpu", sigmas=None, mu=mu)
    ours = sigmas_for_scheduler(config, n, seq, pipeline="sd3")
    torch.testing.assert_close(ours, sched.sigmas, rtol=0, atol=ATOL)


def test_sigmas_for_scheduler_static_shift_terminal() -> None:
    config = {"shift": 3.0, "shift_terminal": 0.02}
    sched = _scheduler_from(config)
    sd3_retrieve_timesteps(sched, 15, "cpu", sigmas=None)
    torch.testing.assert_close(sigmas_for_scheduler(config, 15), sched.sigmas, rtol=0, atol=ATOL)
    assert sigmas_for_scheduler(config, 15)[-2].item() == pytest.approx(0.02, abs=1e-6)


def test_sigmas_for_scheduler_defaults_for_missing_keys() -> None:
    sched = FlowMatchEulerDiscreteScheduler()  # shift 1.0
    sd3_retrieve_timesteps(sched, 7, "cpu", sigmas=None)
    torch.testing.assert_close(sigmas_for_scheduler({}, 7), sched.sigmas, rtol=0, atol=ATOL)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"use_karras_sigmas": True}, "use_karras_sigmas"),
        ({"use_exponential_sigmas": True}, "use_exponential_sigmas"),
        ({"use_beta_sigmas": True}, "use_beta_sigmas"),
        ({"invert_sigmas": True}, "invert_sigmas"),
        ({"time_shift_type": "cosine"}, "time_shift_type"),
        ({"_class_name": "DPMSolverMultistepScheduler"}, "_class_name"),
        ({"shift": 0.0}, "shift"),
    ],
)
def test_sigmas_for_scheduler_rejects_unsupported(bad: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sigmas_for_scheduler({**SD35_CONFIG, **bad}, 10)


def test_sigmas_for_scheduler_needs_image_seq_len_for_dynamic_shifting() -> None:
    with pytest.raises(ValueError, match="image_seq_len"):
        sigmas_for_scheduler(FLUX1_CONFIG, 10)
    with pytest.raises(ValueError, match="pipeline"):
        sigmas_for_scheduler(FLUX1_CONFIG, 10, 1024, pipeline="flux3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scheduler_config"):
        sigmas_for_scheduler([("shift", 3.0)], 10)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_num_steps(bad) -> None:
    with pytest.raises(ValueError, match="num_steps"):
        sd3_sigmas(bad)
    with pytest.raises(ValueError, match="num_steps"):
        flux_sigmas(bad, 1024)


def test_bad_image_seq_len_and_shift() -> None:
    with pytest.raises(ValueError, match="image_seq_len"):
        flux_mu(0)
    with pytest.raises(ValueError, match="shift"):
        sd3_sigmas(10, shift=-1.0)


def test_sigma_to_timestep_scalar_and_tensor() -> None:
    assert sigma_to_timestep(0.25) == 250.0
    t = sigma_to_timestep(torch.tensor([1.0, 0.5], dtype=torch.bfloat16))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16
    assert t.tolist() == [1000.0, 500.0]


def test_sigmas_for_scheduler_flux_pipeline_with_static_shift() -> None:
    """FluxPipeline feeding linspace(1, 1/n, n) to a static-shift scheduler (mu is then ignored)."""
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    n = 8
    flux_retrieve_timesteps(sched, n, "cpu", sigmas=np.linspace(1.0, 1 / n, n), mu=0.8)
    ours = sigmas_for_scheduler({"shift": 3.0}, n, pipeline="flux")
    torch.testing.assert_close(ours, sched.sigmas, rtol=0, atol=ATOL)
    assert not torch.allclose(ours, sd3_sigmas(n, 3.0))  # the two pipelines really differ
