"""The forward-process objectives' pure functions (flowrl.core.objectives, flowrl.core.shadow) in float64.

Hand-computed cases and independent recomputations: DiffusionNFT with r = 1 is flow matching towards
the positive policy; AWM with equal advantages has zero gradient after group normalisation; DGPO and
DPO on two-sample groups against numbers worked out by hand (the values below were computed
independently from the reference codes' formulas, see docs/methods.md); the old policy's decay
schedules at given steps; the timestep draws; the old policy's swap.
"""
from __future__ import annotations

import math

import pytest
import torch

from flowrl.core.advantages import AdvantageConfig, compute_advantages
from flowrl.core.losses import mean_sq_diff as matching_error  # the matching error e = mean_d (v - u)^2
from flowrl.core.objectives import (
    ObjectiveConfig, awm_log_prob, awm_loss, best_worst_pairs, dgpo_loss, dpo_loss, dsm_clip_mask,
    nft_loss, nft_reward_weight, old_decay,
)
from flowrl.core.shadow import DecayedCopy
from flowrl.flow.forward import timestep_indices

D = torch.float64


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


# ---------------------------------------------------------------------------------------- DiffusionNFT

def test_nft_reward_weight_maps_clipped_advantage_to_unit_interval():
    a = torch.tensor([-10.0, -5.0, -2.5, 0.0, 1.0, 5.0, 7.0], dtype=D)
    assert nft_reward_weight(a, 5.0).tolist() == pytest.approx([0.0, 0.0, 0.25, 0.5, 0.6, 1.0, 1.0], abs=0, rel=1e-15)


def test_nft_with_r_one_is_flow_matching_towards_the_positive_policy():
    """A >= c gives r = 1: l = c/beta mean_d (x_t - sigma v+ - x0)^2 / sg(mean_d |.|), v+ = beta v + (1-beta) v_old."""
    B, beta, c = 3, 0.3, 5.0
    x0, eps, v_old = _rand(B, 2, 3, 3, seed=1), _rand(B, 2, 3, 3, seed=2), _rand(B, 2, 3, 3, seed=3)
    sigma = torch.tensor([0.9, 0.5, 0.1], dtype=D)
    s = sigma.view(-1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * eps
    v = _rand(B, 2, 3, 3, seed=4).requires_grad_(True)
    loss = nft_loss(v, v_old, x_t, x0, sigma, torch.full((B,), 9.0, dtype=D), beta, c).sum()
    g, = torch.autograd.grad(loss, v)

    v2 = v.detach().clone().requires_grad_(True)
    err = x_t - s * (beta * v2 + (1 - beta) * v_old) - x0
    w = err.detach().abs().mean((1, 2, 3), keepdim=True)
    direct = (c / beta * (err ** 2 / w).mean((1, 2, 3))).sum()
    g2, = torch.autograd.grad(direct, v2)
    assert torch.allclose(loss, direct, rtol=1e-14, atol=0)
    assert torch.allclose(g, g2, rtol=1e-13, atol=1e-15)
    # at beta = 1, v+ = v: the gradient is that of plain flow matching of x0-predictions through v
    v3 = v.detach().clone().requires_grad_(True)
    l1 = nft_loss(v3, v_old, x_t, x0, sigma, torch.full((B,), 9.0, dtype=D), 1.0, c).sum()
    g3, = torch.autograd.grad(l1, v3)
    e = (eps - x0) - v3.detach()  # x_t - sigma v - x0 = sigma (eps - x0 - v)
    w3 = (s * e).abs().mean((1, 2, 3), keepdim=True)
    expect = c * (-2 * s * s * e) / (w3 * e[0].numel())
    assert torch.allclose(g3, expect, rtol=1e-12, atol=1e-15)


def test_nft_gradient_at_the_old_policy_is_proportional_to_the_clipped_advantage():
    """At v = v_old both branches share their error and weight: grad ∝ c (2r - 1) = clip(A)."""
    B, c = 4, 5.0
    x0, eps, v_old = _rand(B, 3, 2, 2, seed=5), _rand(B, 3, 2, 2, seed=6), _rand(B, 3, 2, 2, seed=7)
    sigma = torch.full((B,), 0.6, dtype=D)
    s = sigma.view(-1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * eps
    adv = torch.tensor([-7.0, -1.0, 0.0, 2.0], dtype=D)
    grads = []
    for beta in (1.0, 0.1):
        v = v_old.clone().requires_grad_(True)
        g, = torch.autograd.grad(nft_loss(v, v_old, x_t, x0, sigma, adv, beta, c).sum(), v)
        grads.append(g)
        err = x_t - s * v_old - x0
        w = err.abs().mean((1, 2, 3), keepdim=True)
        plain = 2 * err * (-s) / (w * err[0].numel())  # grad of mean(err^2)/w through v at beta = 1
        a = adv.clamp(-c, c).view(-1, 1, 1, 1)
        assert torch.allclose(g, a * plain, rtol=1e-12, atol=1e-15)
    assert torch.allclose(grads[0], grads[1], rtol=1e-12, atol=1e-15)  # beta cancels to first order
    assert torch.count_nonzero(grads[0][2]) == 0  # A = 0


# ---------------------------------------------------------------------------------------- AWM

def test_awm_log_prob_weightings():
    v, u = _rand(3, 4, seed=8), _rand(3, 4, seed=9)
    sigma = torch.tensor([1.0, 0.5, 0.25], dtype=D)
    e = ((v - u) ** 2).mean(1)
    assert torch.equal(awm_log_prob(v, u, sigma, "uniform"), -e)
    assert torch.allclose(awm_log_prob(v, u, sigma, "t"), -sigma * e, rtol=1e-15)
    assert torch.allclose(awm_log_prob(v, u, sigma, "t2"), -sigma ** 2 * e, rtol=1e-15)
    p = 0.25
    gh = -sigma * ((e + 1e-10) ** p - 1e-10 ** p) / p
    assert torch.allclose(awm_log_prob(v, u, sigma, "ghuber", p), gh, rtol=1e-14)
    assert float(awm_log_prob(u, u, sigma, "ghuber", p).abs().max()) == 0.0  # zero error: log-prob 0


def test_awm_equal_advantages_give_zero_gradient_after_group_normalisation():
    rewards = torch.full((6, 1), 0.7)
    adv, _ = compute_advantages(rewards, torch.tensor([0, 0, 0, 1, 1, 1]), AdvantageConfig(scale="batch", std_unbiased=False))
    assert torch.count_nonzero(adv) == 0
    v = _rand(6, 5, seed=10).requires_grad_(True)
    lp = awm_log_prob(v, _rand(6, 5, seed=11), torch.full((6,), 0.5, dtype=D))
    g, = torch.autograd.grad(awm_loss(lp, lp.detach(), adv.double(), 5.0, 1.0).sum(), v)
    assert torch.count_nonzero(g) == 0


def test_awm_on_policy_gradient_is_minus_weighted_log_prob_gradient():
    """On-policy (logp_old = sg(logp)) the ratio is 1, the clip is inactive: grad = -clip(A)/c grad logp."""
    v = _rand(4, 6, seed=12).requires_grad_(True)
    u = _rand(4, 6, seed=13)
    sigma = torch.tensor([0.9, 0.7, 0.4, 0.2], dtype=D)
    adv = torch.tensor([3.0, -8.0, 0.5, -1.0], dtype=D)
    for clip_range in (None, 1.0, 1e-5):
        lp = awm_log_prob(v, u, sigma)
        g, = torch.autograd.grad(awm_loss(lp, lp.detach(), adv, 5.0, clip_range).sum(), v)
        lp2 = awm_log_prob(v, u, sigma)
        g2, = torch.autograd.grad((-(adv.clamp(-5, 5) / 5) * lp2).sum(), v)
        assert torch.allclose(g, g2, rtol=1e-13, atol=1e-16), clip_range
    # off-policy, a ratio beyond the clip on the side that matters gets no gradient
    lp = awm_log_prob(v, u, sigma)
    old = lp.detach() - torch.tensor([0.5, 0.0, 0.0, 0.0], dtype=D)  # row 0: w = e^0.5 > 1 + eps, A > 0
    g, = torch.autograd.grad(awm_loss(lp, old, adv, 5.0, 0.2).sum(), v)
    assert torch.count_nonzero(g[0]) == 0 and torch.count_nonzero(g[1]) > 0


# ---------------------------------------------------------------------------------------- DGPO and DPO

TARGET = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=D)
V_THETA = torch.tensor([[0.0, 0.0], [0.8, 0.4]], dtype=D)  # e = [0.50, 0.40]
V_REF = torch.tensor([[0.0, 0.2], [0.9, 0.1]], dtype=D)  # e_ref = [0.52, 0.41]


def test_dgpo_two_sample_group_by_hand():
    """S = 100/2 (1 (0.50 - 0.52) - 1 (0.40 - 0.41)) = -0.5, w = sigmoid(-0.5), L = mean(w A e)."""
    v = V_THETA.clone().requires_grad_(True)
    e, e_ref = matching_error(v, TARGET), matching_error(V_REF, TARGET)
    assert e.tolist() == pytest.approx([0.5, 0.4], rel=1e-15) and e_ref.tolist() == pytest.approx([0.52, 0.41], rel=1e-15)
    adv = torch.tensor([1.0, -1.0], dtype=D)
    per = dgpo_loss(e, e_ref, adv, torch.tensor([7, 7]), beta=100.0, group_size=2)
    w = 1 / (1 + math.exp(0.5))
    assert w == pytest.approx(0.3775406687981454, rel=1e-15)
    assert float(per.detach().mean()) == pytest.approx(0.018877033439907223, rel=1e-14)
    g, = torch.autograd.grad(per.mean(), v)
    expect = torch.tensor([[-0.18877033439907234, 0.0], [-0.1510162675192579, -0.07550813375962895]], dtype=D)
    assert torch.allclose(g, expect, rtol=1e-13, atol=0)
    # the surrogate's gradient is G / (beta B) times that of softplus(S) with S not detached
    v2 = V_THETA.clone().requires_grad_(True)
    e2 = matching_error(v2, TARGET)
    S = (adv * 100.0 * (e2 - e_ref) / 2).sum()
    g2, = torch.autograd.grad(torch.nn.functional.softplus(S), v2)
    assert torch.allclose(g, g2 * 2 / (100.0 * 2), rtol=1e-13, atol=0)


def test_dgpo_clip_detaches_clipped_samples_only():
    v = V_THETA.clone().requires_grad_(True)
    e, e_ref = matching_error(v, TARGET), matching_error(V_REF, TARGET)
    adv = torch.tensor([1.0, -1.0], dtype=D)
    clipped = dsm_clip_mask(e, e_ref, adv, 0.01)  # old = ref: row 0 ratio e^0.02 > 1.01 with A > 0
    assert clipped.tolist() == [True, False]
    per = dgpo_loss(e, e_ref, adv, torch.tensor([0, 0]), 100.0, 2, clipped)
    assert float(per.detach().mean()) == pytest.approx(0.018877033439907223, rel=1e-14)
    g, = torch.autograd.grad(per.mean(), v)
    assert torch.count_nonzero(g[0]) == 0
    assert torch.allclose(g[1], torch.tensor([-0.1510162675192579, -0.07550813375962895], dtype=D), rtol=1e-13)


def test_dgpo_groups_are_separate_and_use_the_configured_group_size():
    """Two groups (G = 3 configured, one group of 2 present): S per group over its members."""
    e = torch.tensor([0.30, 0.25, 0.20, 0.50, 0.40], dtype=D, requires_grad=True)
    e_ref = torch.tensor([0.31, 0.25, 0.22, 0.52, 0.41], dtype=D)
    r = torch.tensor([1.0, 2.0, 4.0], dtype=D)
    a0 = (r - r.mean()) / (r.std(unbiased=False) + 1e-4)
    adv = torch.cat([a0, torch.tensor([1.0, -1.0], dtype=D)])
    per = dgpo_loss(e, e_ref, adv, torch.tensor([3, 3, 3, 9, 9]), beta=10.0, group_size=3)
    S0 = float((a0 * 10 * (e.detach()[:3] - e_ref[:3]) / 3).sum())
    S1 = 10 * (1 * (0.50 - 0.52) - 1 * (0.40 - 0.41)) / 3
    assert S0 == pytest.approx(-0.05344796301179314, rel=1e-12)
    w = torch.tensor([1 / (1 + math.exp(-S0))] * 3 + [1 / (1 + math.exp(-S1))] * 2, dtype=D)
    assert torch.allclose(per, w * adv * e.detach(), rtol=1e-13)
    assert float(per.detach().mean()) == pytest.approx(-0.0018711423637722048, rel=1e-10)


def test_dpo_pair_by_hand_and_equals_dgpo_softplus_for_two_members():
    vw = V_THETA[0:1].clone().requires_grad_(True)
    vl = V_THETA[1:2].clone().requires_grad_(True)
    e_w, e_l = matching_error(vw, TARGET[0:1]), matching_error(vl, TARGET[1:2])
    r_w, r_l = matching_error(V_REF[0:1], TARGET[0:1]), matching_error(V_REF[1:2], TARGET[1:2])
    loss = dpo_loss(e_w, e_l, r_w, r_l, beta=100.0)
    assert float(loss.detach()) == pytest.approx(math.log1p(math.exp(-0.5)), rel=1e-15)
    assert float(loss.detach()) == pytest.approx(0.47407698418010547, rel=1e-14)
    gw, gl = torch.autograd.grad(loss.sum(), (vw, vl))
    assert torch.allclose(gw, torch.tensor([[-18.877033439907233, 0.0]], dtype=D), rtol=1e-13)
    assert torch.allclose(gl, torch.tensor([[-15.101626751925787, -7.5508133759628935]], dtype=D), rtol=1e-13)


def test_best_worst_pairs():
    adv = torch.tensor([0.1, 0.9, -0.5, 0.0, 0.0, 0.0, 2.0, 1.0, 5.0], dtype=D)
    group = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    valid = torch.tensor([True] * 8 + [False])
    pairs = best_worst_pairs(adv, group, valid)
    assert pairs.tolist() == [[1, 2], [6, 7]]  # group 1 has no spread; row 8 is invalid
    assert best_worst_pairs(adv, group, torch.zeros(9, dtype=torch.bool)).shape == (0, 2)


# ---------------------------------------------------------------------------------------- old policy

@pytest.mark.parametrize("params,expect", [
    ((0, 0.001, 0.5), [0.0, 0.001, 0.01, 0.1, 0.5, 0.5]),  # DiffusionNFT decay_type 1
    ((75, 0.0075, 0.999), [0.0, 0.0, 0.0, 0.1875, 0.999, 0.999]),  # decay_type 2
    ((0, 0.001, 0.3), [0.0, 0.001, 0.01, 0.1, 0.3, 0.3]),  # AWM's KL adapter, DGPO's ema_ref
    ((0, 0.0, 0.0), [0.0] * 6),  # decay_type 0
])
def test_old_decay_schedules(params, expect):
    got = [old_decay(s, *params) for s in (0, 1, 10, 100, 500, 1000)]
    assert got == pytest.approx(expect, rel=1e-12, abs=1e-15)


def test_decayed_copy_update_swap_and_state():
    p = [torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=D)), torch.nn.Parameter(torch.tensor([[3.0]], dtype=D))]
    old = DecayedCopy(p)
    with torch.no_grad():
        p[0].add_(1.0)
        p[1].mul_(2.0)
    old.update(0.25)  # 0.25 old + 0.75 new
    assert old.shadow[0].tolist() == [1.75, 2.75] and old.shadow[1].tolist() == [[5.25]]
    with pytest.raises(RuntimeError):
        with old.swapped():
            assert p[0].tolist() == [1.75, 2.75]
            raise RuntimeError("inside")
    assert p[0].tolist() == [2.0, 3.0] and p[1].tolist() == [[6.0]]  # restored after the exception
    old.update(0.0)
    assert torch.equal(old.shadow[0], p[0].detach())
    other = DecayedCopy([torch.nn.Parameter(torch.zeros(2, dtype=D)), torch.nn.Parameter(torch.zeros(1, 1, dtype=D))])
    other.load_state_dict(old.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other.shadow, old.shadow))
    with pytest.raises(ValueError, match="shape"):
        DecayedCopy([torch.nn.Parameter(torch.zeros(3))]).load_state_dict({"0": torch.zeros(2)})
    named = DecayedCopy(p, ["a.weight", "b.weight"])
    assert list(named.state_dict()) == ["a.weight", "b.weight"]
    with pytest.raises(ValueError, match="missing"):
        named.load_state_dict({"a.weight": torch.zeros(2, dtype=D)})


# ---------------------------------------------------------------------------------------- timesteps

def test_timestep_draws():
    g = torch.Generator().manual_seed(0)
    nft = ObjectiveConfig(kind="nft", num_timesteps=9)
    for _ in range(20):
        idx = timestep_indices(nft, 10, g)
        assert len(set(idx.tolist())) == 9 and 0 <= int(idx.min()) and int(idx.max()) <= 9
    awm = ObjectiveConfig(kind="awm", timesteps="stratified", num_timesteps=6, timestep_first=1, timestep_fraction=0.9)
    strata = [(1, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 12)]  # linspace(1, 12, 7).long() over 14 steps
    seen = set()
    for _ in range(200):
        idx = timestep_indices(awm, 14, g).tolist()
        assert all(lo <= i < hi for i, (lo, hi) in zip(idx, strata))
        seen.update(idx)
    assert seen == set(range(1, 12))
    dgpo = ObjectiveConfig(kind="dgpo", num_timesteps=4, timestep_fraction=0.7, timestep_share="batch")
    assert set(timestep_indices(dgpo, 10, g).tolist()) <= set(range(7))
    dpo = ObjectiveConfig(kind="dpo", timesteps="logit_normal", num_timesteps=39, timestep_share="group")
    idx = timestep_indices(dpo, 10, g)
    assert idx.shape == (39,) and 0 <= int(idx.min()) and int(idx.max()) <= 999
    with pytest.raises(ValueError, match="num_timesteps: the rollout"):
        timestep_indices(ObjectiveConfig(kind="nft", num_timesteps=5, timestep_fraction=0.4), 10, g)


def test_objective_config_errors():
    with pytest.raises(ValueError, match="kind"):
        ObjectiveConfig(kind="ppo").validate()
    with pytest.raises(ValueError, match="timestep_share"):
        ObjectiveConfig(kind="dpo").validate()
    with pytest.raises(ValueError, match="noise_share"):
        ObjectiveConfig(kind="nft", noise_share="batch").validate()
    with pytest.raises(ValueError, match="decay_max"):
        ObjectiveConfig(kind="nft").__class__(kind="nft", old=type(ObjectiveConfig().old)(decay_max=1.0)).validate()
    assert ObjectiveConfig(kind="nft").needs_old and not ObjectiveConfig(kind="awm").needs_old
    assert ObjectiveConfig(kind="dgpo", timestep_share="batch").needs_reference


def test_checkpoints_from_before_the_objective_section_still_resume():
    """A checkpoint config without ``objective`` ran the likelihood objective: it compares equal to the
    defaults, and differs from a forward objective by name."""
    from flowrl.config import RunConfig, to_dict
    from flowrl.train.guard import config_changes

    old = to_dict(RunConfig())
    old.pop("objective")
    assert config_changes(old, to_dict(RunConfig())) == ([], [])
    now = to_dict(RunConfig())
    now["objective"]["kind"] = "nft"
    assert config_changes(old, now)[1] == [("objective.kind", "likelihood", "nft")]


def test_an_ode_plan_with_shared_noise_is_refused():
    """Deterministic rollouts from one shared initial noise make every group member the same sample."""
    from flowrl.config import ConfigError, load_run_config

    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    with pytest.raises(ConfigError, match="sample.same_noise"):
        load_run_config(root / "configs" / "methods" / "diffusion_nft.yaml", ["sample.same_noise=true"])
    assert not load_run_config(root / "configs" / "methods" / "diffusion_nft.yaml").sample.same_noise
