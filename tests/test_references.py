"""Behaviour that each method's reference code defines, pinned as our own expectations.

Every expectation below was checked against the upstream file and commit named beside it (read and
run on small inputs in float64; the comparison scripts are not part of the project). The numbers
are written out here, not computed by the code under test, so a change of meaning fails.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from flowrl.core.advantages import advantage_preset, compute_advantages
from flowrl.flow.plan import PlanConfig, TailConfig, WindowConfig, build_plan, granular_sigmas, plan_generator
from flowrl.flow.sampler import sample
from flowrl.flow.schedule import shift_sigmas
from flowrl.flow.steps import compressed_sigmas, dpm_solver_2m_step, ode_step, x0_from_velocity


def _steps(mask: torch.Tensor) -> list[int]:
    return torch.nonzero(mask).flatten().tolist()


# ---------------------------------------------------------------------------------------------
# MixGRPO: Tencent-Hunyuan/MixGRPO e5cdd6a, fastvideo/utils/grpo_states.py + train_grpo_flux.py
# ---------------------------------------------------------------------------------------------

S, WINDOW = 25, 4  # the MixGRPO recipe: 25 sampling steps, window ("group_size") 4
MAX_T = S - 2  # max_timesteps: caps the window and bounds the start


def _upstream_progressive(iterations: int, tau: int, stride: int = 1, roll_back: bool = True):
    """MixGRPO's progressive state machine as its training loop drives it: read the window
    range(cur, min(cur + G, max_timesteps)), then update (after tau iterations cur += stride; past
    max_timesteps roll back to 0 or clip to it)."""
    cur, count, out = 0, 0, []
    for _ in range(iterations):
        out.append(list(range(cur, min(cur + WINDOW, MAX_T))))
        count += 1
        if count == tau:
            count, cur = 0, cur + stride
            if cur > MAX_T:
                cur = 0 if roll_back else MAX_T
    return out


def _window(it: int, **kw) -> list[int]:
    cfg = PlanConfig(kind="window", window=WindowConfig(size=WINDOW, **kw))
    p = build_plan(cfg, S, it, plan_generator(0, it))
    assert _steps(p.sde) == _steps(p.trained)  # MixGRPO trains exactly its SDE steps
    return _steps(p.trained)


def test_mixgrpo_window_at_every_start_position():
    # each start position s (tau = 1): 4 steps for s <= 19, then cut before step 23: [20, 21, 22],
    # [21, 22], [22]; upstream's start 23 trains nothing (its loop raises UnboundLocalError), flowrl
    # rolls back after 22
    got = [_window(it, shift_interval=1) for it in range(24)]
    expected = [list(range(s, min(s + 4, 23))) for s in range(23)] + [[0, 1, 2, 3]]
    assert got == expected
    assert got[19] == [19, 20, 21, 22] and got[20:23] == [[20, 21, 22], [21, 22], [22]]


def test_mixgrpo_progressive_recipe_matches_upstream_until_its_empty_window():
    tau = 25  # iters_per_group of finetune_flux_grpo_MixGRPO.sh
    up = _upstream_progressive(1200, tau)
    got = [_window(it, shift_interval=tau) for it in range(1200)]
    first_empty = up.index([])
    assert first_empty == 23 * tau  # iteration 575: start 23
    assert got[:first_empty] == up[:first_empty]
    assert got[first_empty] == [0, 1, 2, 3]  # flowrl's pass is 23 starts long
    assert got[first_empty:2 * first_empty] == got[:first_empty]
    # without roll-back upstream clips at 23 (empty); flowrl stays on the last start that trains
    up_nb = _upstream_progressive(700, tau, roll_back=False)
    got_nb = [_window(it, shift_interval=tau, roll_back=False) for it in range(700)]
    assert got_nb[:575] == up_nb[:575] and all(w == [22] for w in got_nb[575:])


def test_mixgrpo_random_start_range():
    # integers(0, max_timesteps - G + 1): starts 0..19, always 4 steps; iteration 0 reads the initial
    # window (start 0) before the first random update
    starts = [_window(it, schedule="random")[0] for it in range(600)]
    assert starts[0] == 0
    assert set(starts[1:]) == set(range(20))
    assert all(len(_window(it, schedule="random")) == 4 for it in range(0, 600, 7))


def test_mixgrpo_decay_with_upstream_defaults():
    # decay: tau(cur) = max(min_it, int(max_it (1 - cur/23) + min_it cur/23)), max_iters_per_group 10,
    # min_iters_per_group 1 (flowrl: shift_interval 10, min_shift_interval default 1)
    def tau(s):
        return max(1, int(10 * (1 - s / MAX_T) + 1 * s / MAX_T))

    up, cur, count = [], 0, 0
    for _ in range(121):  # one pass: sum of tau over starts 0..22 = 121 - tau(23) = 120
        up.append(cur)
        count += 1
        if count == tau(cur):
            count, cur = 0, cur + 1
    got = [_window(it, schedule="decay", shift_interval=10)[0] for it in range(120)]
    assert got == up[:120]
    assert sum(tau(s) for s in range(23)) == 120


def test_mixgrpo_advantages():
    # per reward model and group: (r - mean) / (torch.std (Bessel) + 1e-8); weighted by w / sum(w);
    # summed; clamped to +-5 (train_grpo_flux.py advantage_aggr)
    g = torch.Generator().manual_seed(0)
    r = torch.rand(24, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 0.01, 3.0], dtype=torch.float64)
    groups = torch.arange(2).repeat_interleave(12)
    w = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)
    expected = torch.zeros(24, dtype=torch.float64)
    for k in range(3):
        for gid in range(2):
            m = groups == gid
            col = r[m, k]
            expected[m] += (w[k] / w.sum()) * (col - col.mean()) / (col.std() + 1e-8)
    cfg = advantage_preset("mixgrpo", reward_weights=tuple(w.tolist()))
    adv, _ = compute_advantages(r, groups, cfg)
    torch.testing.assert_close(adv, expected.clamp(-5, 5), rtol=0, atol=1e-12)  # float64 throughout


# ---------------------------------------------------------------------------------------------
# MixGRPO-Flash: fastvideo/utils/sampling_utils.py (e5cdd6a)
# ---------------------------------------------------------------------------------------------

# Tail steps after a window starting at w = 0..22 (25 steps, ratio 0.4), as upstream's
# int(max((S - L) * r, 1)) points after the last SDE step L give them; upstream has none from w = 18
# on (it stops above sigma 0), flowrl takes one step to 0 there.
UPSTREAM_FLASH_TAIL = [7, 7, 7, 6, 6, 5, 5, 5, 4, 4, 3, 3, 3, 2, 2, 1, 1, 1, 0, 0, 0, 0, 0]


def _sigmas(n: int, shift: float = 3.0) -> torch.Tensor:
    return shift_sigmas(torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64), shift)


def test_flash_tail_step_count_and_spacing():
    sig = _sigmas(S)
    for w, up in enumerate(UPSTREAM_FLASH_TAIL):
        last = min(w + WINDOW, MAX_T) - 1
        tail = compressed_sigmas(sig[last + 1:], 0.4, shift=3.0)
        assert tail.numel() - 1 == max(1, up), w
        # spacing: a linspace in unshifted time from t_{L+1} to 0, then the shift (upstream L47-49)
        t = torch.linspace(1 - (last + 1) / S, 0.0, tail.numel(), dtype=torch.float64)
        torch.testing.assert_close(tail, shift_sigmas(t, 3.0), rtol=0, atol=1e-12)
    # Flash*: ratio 0.2, window frozen at [0, 3]: 3 tail steps
    assert compressed_sigmas(sig[4:], 0.2, shift=3.0).numel() - 1 == 3


@dataclass
class _Embeds:
    mu: torch.Tensor

    def select(self, index):
        return _Embeds(self.mu[torch.as_tensor(index, dtype=torch.long)])

    def tensors(self):
        return {"mu": self.mu}


class _LinearFlow:
    """A toy policy whose velocity v = x - mu(prompt) + sigma depends on its row only."""

    def encode_prompts(self, prompts, negative_prompt=""):
        return _Embeds(torch.tensor([0.3 * (i + 1) for i in range(len(prompts))]))

    def latent_shape(self, height, width):
        return (2, height // 8, width // 8)

    def initial_noise(self, batch, height, width, generator=None):
        return torch.randn((batch, *self.latent_shape(height, width)), generator=generator)

    def sigmas(self, num_steps, height, width):
        return _sigmas(num_steps).float()

    def velocity(self, x, sigma, embeds, guidance_scale):
        s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1)
        return x - embeds.mu.reshape(-1, 1, 1, 1) + s

    def decode(self, x):
        return torch.sigmoid(x.mean(1, keepdim=True)).expand(-1, 3, -1, -1)


def test_flash_solver_orders_euler_head_second_order_after_the_window():
    pol = _LinearFlow()
    cfg = PlanConfig(kind="window", window=WindowConfig(size=WINDOW, start=5, shift_interval=10**6),
                     ode_solver="dpm2m", head_solver="euler", tail=TailConfig(ratio=0.4))
    plan = build_plan(cfg, S, 0)
    assert _steps(plan.sde) == [5, 6, 7, 8]
    ro = sample(pol, ["p"], plan, group_size=2, height=16, width=16, guidance_scale=1.0,
                generator=torch.Generator().manual_seed(0), same_noise=True)
    sig = pol.sigmas(S, 16, 16)
    emb = pol.encode_prompts(["p"]).select([0, 0])
    # the head: plain Euler from the initial noise to the window's first state
    x = pol.initial_noise(1, 16, 16, torch.Generator().manual_seed(0)).expand(2, -1, -1, -1)
    for i in range(5):
        x = ode_step(x, pol.velocity(x, sig[i], emb, 1.0), sig[i], sig[i + 1])
    torch.testing.assert_close(ro.latents[:, 0], x, rtol=0, atol=1e-6)  # float32, five steps
    # the tail: DPM-Solver++(2M) whose first step already uses the x0 prediction of the last SDE step
    x_l = ro.latents[:, -2].float()
    hist_l = (x0_from_velocity(x_l, pol.velocity(x_l, sig[8], emb, 1.0), sig[8]), sig[8])
    hist = hist_l
    tail = compressed_sigmas(sig[9:], 0.4, shift=3.0)
    assert tail.numel() - 1 == UPSTREAM_FLASH_TAIL[5]
    x = ro.latents[:, -1].float()
    for j in range(tail.numel() - 1):
        x0 = x0_from_velocity(x, pol.velocity(x, tail[j], emb, 1.0), tail[j])
        x, hist = dpm_solver_2m_step(x, x0, tail[j], tail[j + 1], *hist), (x0, tail[j])
    torch.testing.assert_close(ro.final_latents[:, 0].float(), x, rtol=0, atol=1e-5)  # float32
    # a first-order first tail step (history reset after the window, flowrl before this fix) differs
    x = ro.latents[:, -1].float()
    x0 = x0_from_velocity(x, pol.velocity(x, tail[0], emb, 1.0), tail[0])
    first_order = dpm_solver_2m_step(x, x0, tail[0], tail[1])
    second_order = dpm_solver_2m_step(x, x0, tail[0], tail[1], *hist_l)
    assert (first_order - second_order).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# G2RPO: bcmi/Granular-GRPO ef6ec9f, fastvideo/train_g2rpo_hps.py (run_ode_sample_step)
# ---------------------------------------------------------------------------------------------


def _g2rpo_upstream_path(k: int, g: int, n: int = 16) -> list[int]:
    """Indices of the sigmas a continuation after the SDE step k passes through: upstream keeps
    sigmas[:k+2] + sigmas[k+2::g], evaluates from k+1 to the second-to-last kept point and decodes
    the x0 prediction there (an Euler step to sigma 0 = index n)."""
    kept = list(range(k + 2)) + list(range(k + 2, n + 1, g))
    return kept[k + 1:-1] + [n]


@pytest.mark.parametrize("g", [1, 2, 3])
def test_g2rpo_continuation_sigmas_end_as_upstream(g):
    sig = _sigmas(16)  # 16 steps, shift 3 (finetune_g2rpo_hps.sh)
    for k in range(8):  # eta_step_list 0..7
        got = granular_sigmas(sig[k + 1:], g)
        want = sig[_g2rpo_upstream_path(k, g)]
        assert torch.equal(got, want), (k, g)  # a selection of the same float64 values
    # the pairs where the stride skips sigma 0 (upstream jumps to 0 from the last evaluated point)
    assert _g2rpo_upstream_path(1, 2) == [2, 3, 5, 7, 9, 11, 13, 16]
    assert _g2rpo_upstream_path(0, 3) == [1, 2, 5, 8, 11, 16]


# ---------------------------------------------------------------------------------------------
# DanceGRPO / MixGRPO / G2RPO on Flux: sd3_time_shift(3, linspace(1, 0, n + 1))
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [16, 25])
def test_flux_recipes_use_the_fixed_shift_schedule(n, tmp_path):
    from flowrl.flow.policy import FlowPolicy
    from flowrl.demo.tiny_image import save_tiny
    from flowrl.train.model import set_fixed_shift

    pol = FlowPolicy.from_pretrained(save_tiny("flux", tmp_path / "flux"), max_sequence_length=8)
    set_fixed_shift(pol, 3.0)  # what model.shift: 3.0 in the Flux recipes does
    t = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)
    upstream = 3 * t / (1 + 2 * t)  # DanceGRPO 15cc71d train_grpo_flux.py sd3_time_shift
    got = pol.sigmas(n, 720, 720).double()
    # upstream builds its linspace in float32, diffusers in float64 then casts: one float32 ulp apart
    torch.testing.assert_close(got, upstream, rtol=0, atol=2 ** -23)
    assert float(got[0]) == 1.0 and float(got[-1]) == 0.0


# ---------------------------------------------------------------------------------------------
# GRPO-Guard: flow_grpo 9745241 scripts/train_sd3_GRPO_Guard.py (RatioNorm)
# ---------------------------------------------------------------------------------------------


def test_grpo_guard_bias_is_per_sample_where_upstream_averages_the_batch():
    """Upstream's ``mean(dim=tuple(range(1, ndim)))`` on a 1-D log-prob is ``mean(dim=())``, which
    reduces over the whole batch; the paper (and flowrl) remove each sample's own bias."""
    from flowrl.core.losses import ratio_normalized_log_ratio

    g = torch.Generator().manual_seed(0)
    n, d = 4, 16
    mean_new = torch.randn(n, d, generator=g, dtype=torch.float64)
    mean_old = mean_new + 0.01 * torch.randn(n, d, generator=g, dtype=torch.float64) * torch.arange(1, n + 1).unsqueeze(1)
    x = mean_old + 0.1 * torch.randn(n, d, generator=g, dtype=torch.float64)
    s = torch.full((n,), 0.1, dtype=torch.float64)
    lp_new = -((x - mean_new) ** 2).mean(1) / (2 * s**2)
    lp_old = -((x - mean_old) ** 2).mean(1) / (2 * s**2)
    bias = ((mean_new - mean_old) ** 2).mean(1) / (2 * s**2)
    got = ratio_normalized_log_ratio(lp_new - lp_old, ((mean_new - mean_old) ** 2).mean(1), s)
    per_sample = (lp_new - lp_old + bias) * s
    batch_mean = (lp_new - lp_old + bias.mean()) * s
    torch.testing.assert_close(got, per_sample, rtol=0, atol=1e-15)
    assert (got - batch_mean).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------
# DiffusionNFT: NVlabs/DiffusionNFT 24af5554898d85e93efa492f42b5e9cdf4156e9b,
# flow_grpo/diffusers_patch/solver.py (solver="dpm2", deterministic): its rollouts
# ---------------------------------------------------------------------------------------------


def _upstream_dpm2(z: torch.Tensor, sigmas: torch.Tensor, velocity) -> torch.Tensor:
    """solver.py's deterministic dpm2 sampling in float64: a DDIM (first-order) update at the first and
    the last step, the multistep DPM-Solver++(2M) update with D1 = (x0_i - x0_{i-1}) / r0 elsewhere."""
    lam = lambda s: torch.log(1 - s) - torch.log(s)  # noqa: E731  (-inf at sigma = 1)
    x0_prev = None
    n = sigmas.numel() - 1
    for i in range(n):
        s, sn = sigmas[i], sigmas[i + 1]
        x0 = z - s * velocity(z, float(s))
        if i == 0 or i == n - 1:
            z = x0 if sn == 0 else (1 - sn) * x0 + sn * (z - (1 - s) * x0) / s
        else:
            h = lam(sn) - lam(s)
            r0 = (lam(s) - lam(sigmas[i - 1])) / h
            d1 = (x0 - x0_prev) / r0 if torch.isfinite(r0) else torch.zeros_like(x0)
            a = 1 - sn
            z = (sn / s) * z - a * (torch.exp(-h) - 1) * x0 - 0.5 * a * (torch.exp(-h) - 1) * d1
        x0_prev = x0
    return z


def test_nft_rollouts_follow_upstream_dpm2_solver():
    """flowrl's ODE plan with ode_solver dpm2m is DiffusionNFT's rollout solver: the final latents of
    the Gaussian toy flow agree with a float64 run of the upstream update to float32 precision."""
    from toy_policies import GaussianPolicy

    policy = GaussianPolicy()
    prompts = ["a", "abcd"]
    plan = build_plan(PlanConfig(kind="ode", ode_solver="dpm2m"), 10, 0)
    ro = sample(policy, prompts, plan, group_size=2, height=16, width=16, guidance_scale=1.0,
                generator=torch.Generator().manual_seed(0), progress=False)
    z0 = policy.initial_noise(4, 16, 16, generator=torch.Generator().manual_seed(0)).double()
    sig = policy.sigmas(10, 16, 16).double()
    mu = torch.tensor([0.1 * len(p) - 1.0 for p in prompts], dtype=torch.float64).repeat_interleave(2).view(-1, 1, 1, 1)

    def v64(x, s):
        var = (1 - s) ** 2 * policy.s0 ** 2 + s ** 2
        c = x - (1 - s) * mu
        return s / var * c - (mu + (1 - s) * policy.s0 ** 2 / var * c)

    ref = _upstream_dpm2(z0, sig, v64)
    got = ro.final_latents[:, 0].double()
    assert torch.allclose(got, ref, rtol=0, atol=2e-5 * float(ref.abs().max()))  # float32 sampler vs float64
    # not vacuous: Euler's rollout of the same noise is far from it
    euler = sample(policy, prompts, build_plan(PlanConfig(kind="ode"), 10, 0), group_size=2, height=16, width=16,
                   guidance_scale=1.0, generator=torch.Generator().manual_seed(0), progress=False)
    assert float((euler.final_latents[:, 0].double() - ref).abs().max()) > 1e3 * 2e-5 * float(ref.abs().max())
