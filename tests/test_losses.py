"""Tests for flowrl.core.losses: hand values, gradients, micro-batch invariance, RatioNorm identity."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowrl.core.losses import (
    AGGREGATIONS,
    AdaptiveKLController,
    LossConfig,
    StepTerms,
    aggregate,
    clipped_surrogate,
    dt_reweight,
    gaussian_mean_kl,
    kl_coefficient,
    kl_penalty,
    log_importance_weights,
    loss_normalizers,
    loss_preset,
    mean_sq_diff,
    noise_aware_weights,
    policy_loss,
    ratio_normalized_log_ratio,
    sapo_surrogate,
)

F64 = torch.float64


def _t(x, dtype=F64):
    return torch.tensor(x, dtype=dtype)


def _ragged_batch(n=6, t=5, seed=0, noise=0.3):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (n,), generator=gen)
    lengths[0] = 0 if n > 2 else lengths[0]  # one empty row
    mask = torch.arange(t)[None, :] < lengths[:, None]
    logps = (-torch.rand(n, t, generator=gen, dtype=F64) * 3).requires_grad_(True)
    old = logps.detach() + noise * torch.randn(n, t, generator=gen, dtype=F64)
    ref = logps.detach() + noise * torch.randn(n, t, generator=gen, dtype=F64)
    adv = torch.randn(n, generator=gen, dtype=F64)
    return logps, old, ref, mask, adv


# ------------------------------------------------------------------------------ hand values


def test_clipped_surrogate_hand_values():
    w = _t([0.5, 1.0, 1.5, 0.5, 1.0, 1.5, 5.0])
    a = _t([1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0])
    got = clipped_surrogate(w, a, 0.2, 0.2)
    torch.testing.assert_close(got, _t([-0.5, -1.0, -1.2, 0.8, 1.0, 1.5, 5.0]))
    # DAPO clip-higher
    assert clipped_surrogate(_t([1.5]), _t([1.0]), 0.2, 0.28).item() == pytest.approx(-1.28)
    # TRL two-sided delta caps the unclipped ratio (matters for A < 0)
    got = clipped_surrogate(w, a, 0.2, 0.2, delta=1.4)
    torch.testing.assert_close(got, _t([-0.5, -1.0, -1.2, 0.8, 1.0, 1.4, 1.4]))
    # dual clip c = 3 bounds the A < 0 loss by -c*A
    got = clipped_surrogate(w, a, 0.2, 0.2, dual_clip=3.0)
    torch.testing.assert_close(got, _t([-0.5, -1.0, -1.2, 0.8, 1.0, 1.5, 3.0]))


def test_sapo_and_kl_estimator_hand_values():
    w = _t([1.0, 1.5])
    a = _t([2.0, -1.0])
    got = sapo_surrogate(w, a, 1.0, 1.05)
    want = [-4 * 0.5 * 2.0, -(4 / 1.05) / (1 + math.exp(-1.05 * 0.5)) * -1.0]
    torch.testing.assert_close(got, _t(want))
    lp = _t([-1.0, -2.0, -0.5])
    ref = _t([-1.5, -1.0, -0.5])
    d = ref - lp  # (-0.5, 1.0, 0)
    torch.testing.assert_close(kl_penalty(lp, ref, "k1"), -d)
    torch.testing.assert_close(kl_penalty(lp, ref, "k2"), 0.5 * d * d)
    torch.testing.assert_close(kl_penalty(lp, ref, "k3"), _t([math.exp(-0.5) + 0.5 - 1, math.e - 2, 0.0]))
    torch.testing.assert_close(kl_penalty(lp, ref, "k3", clamp=0.5), _t([math.exp(-0.5) - 0.5, 0.5, 0.0]))
    with pytest.raises(ValueError, match="^estimator:"):
        kl_penalty(lp, ref, "k4")


def test_kl_estimators_are_unbiased_for_categoricals():
    # E_{a ~ pi}[k1] = E_{a ~ pi}[k3] = KL(pi || pi_ref) exactly, for any two categoricals
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(7, generator=gen, dtype=F64), 0)
    q = torch.softmax(torch.randn(7, generator=gen, dtype=F64), 0)
    kl = (p * (p.log() - q.log())).sum()
    for est in ("k1", "k3"):
        e = (p * kl_penalty(p.log(), q.log(), est)).sum()
        torch.testing.assert_close(e, kl)
    assert (kl_penalty(p.log(), q.log(), "k3") >= 0).all()


def test_aggregation_hand_values_and_normalizers():
    per = _t([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [float("nan"), float("inf"), 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    n_tok = loss_normalizers(mask, "token-mean")
    assert n_tok.item() == 4.0
    assert aggregate(per, mask, "token-mean", n_tok).item() == pytest.approx(10 / 4)
    n_seq = loss_normalizers(mask, "seq-mean-token-mean")
    assert n_seq.item() == 3.0  # TRL counts every row, empty ones included
    assert loss_normalizers(mask, "seq-mean-token-mean", count_empty_rows=False).item() == 2.0  # verl
    assert aggregate(per, mask, "seq-mean-token-mean", n_seq).item() == pytest.approx((2.0 + 4.0 + 0.0) / 3)
    assert aggregate(per, mask, "seq-mean-token-sum", n_seq).item() == pytest.approx(10 / 3)
    n_c = loss_normalizers(mask, "constant", max_len=8)
    assert n_c.item() == 24.0
    assert aggregate(per, mask, "constant", n_c).item() == pytest.approx(10 / 24)
    assert aggregate(per, mask, "token-sum", loss_normalizers(mask, "token-sum")).item() == pytest.approx(10.0)
    # data parallel: counts are summed over processes, then divided by the world size
    two = loss_normalizers(mask, "token-mean", world_size=2, reduce_fn=lambda x: x * 2)
    assert two.item() == 4.0
    assert loss_normalizers(mask, "token-sum", world_size=4).item() == 0.25
    with pytest.raises(ValueError, match="^mode:"):
        loss_normalizers(mask, "sum")
    with pytest.raises(ValueError, match="^mask:"):
        loss_normalizers(mask[0], "token-mean")


def test_policy_loss_hand_value_with_kl_and_stats():
    logps = _t([[math.log(0.5), math.log(0.5)], [math.log(0.9), 0.0]]).requires_grad_(True)
    old = _t([[math.log(0.25), math.log(0.5)], [math.log(1.0), 0.0]])  # ratios 2, 1, 0.9
    ref = _t([[math.log(0.5), math.log(0.25)], [math.log(0.9), 0.0]])
    mask = torch.tensor([[True, True], [True, False]])
    adv = _t([1.0, -1.0])
    cfg = LossConfig(eps_low=0.2, aggregation="token-mean", beta=0.1, kl_estimator="k3")
    loss, st = policy_loss(logps, old, adv, mask, cfg, normalizer=3.0, ref_logps=ref)
    # policy: token (2, A=1) -> -1.2 ; (1, A=1) -> -1 ; (0.9, A=-1) -> 0.9
    k3 = math.exp(math.log(0.25) - math.log(0.5)) - (math.log(0.25) - math.log(0.5)) - 1  # 0.5 + log 2 - 1
    pol = (-1.2 - 1.0 + 0.9) / 3
    kl = k3 / 3
    assert st["policy_loss"].item() == pytest.approx(pol)
    assert st["kl_loss"].item() == pytest.approx(kl)
    assert loss.item() == pytest.approx(pol + 0.1 * kl)
    assert st["clip_frac_high"].item() == pytest.approx(1 / 3)
    assert st["clip_frac_low"].item() == 0.0  # 0.9 is inside [0.8, 1.2]
    assert st["ratio_max"].item() == pytest.approx(2.0) and st["ratio_min"].item() == pytest.approx(0.9)
    assert st["ratio_mean"].item() == pytest.approx(3.9 / 3)
    lr = [math.log(2.0), 0.0, math.log(0.9)]
    assert st["approx_kl"].item() == pytest.approx(sum(0.5 * x * x for x in lr) / 3)
    assert st["approx_kl_k3"].item() == pytest.approx(sum(math.exp(x) - 1 - x for x in lr) / 3)
    assert st["kl"].item() == pytest.approx(k3 / 3)
    assert st["num_actions"].item() == 3


def test_kl_ratio_weighting_and_velocity_kl():
    logps, old, ref, mask, adv = _ragged_batch(seed=4)
    base = dict(aggregation="token-mean", beta=0.5, eps_low=10.0 / 11, eps_high=100.0)  # no clipping
    n = loss_normalizers(mask, "token-mean")
    l_none, s0 = policy_loss(logps, old, adv, mask, LossConfig(**base), normalizer=n, ref_logps=ref)
    l_w, s1 = policy_loss(logps, old, adv, mask, LossConfig(**base, kl_ratio_weighted="token"), normalizer=n,
                          ref_logps=ref)
    ratio = torch.exp(torch.where(mask, logps.detach() - old, torch.zeros_like(old)))
    k3 = torch.where(mask, kl_penalty(logps.detach(), ref), torch.zeros_like(old))
    assert s0["kl_loss"].item() == pytest.approx((k3.sum() / n).item())
    assert s1["kl_loss"].item() == pytest.approx(((k3 * ratio).sum() / n).item())
    # velocity KL: beta * aggregated mean-square velocity difference, not reweighted
    vsq = torch.rand(logps.shape, dtype=F64)
    cfg = LossConfig(aggregation="token-mean", beta=0.3, kl_estimator="velocity")
    w = torch.rand(logps.shape[1], dtype=F64) + 0.5
    loss, st = policy_loss(logps, old, adv, mask, cfg, normalizer=n, step_terms=StepTerms(v_ref_delta_sq=vsq),
                           step_weights=w)
    pol_plain, _ = policy_loss(logps, old, adv, mask, LossConfig(aggregation="token-mean"), normalizer=n)
    assert st["kl_loss"].item() == pytest.approx((torch.where(mask, vsq, 0 * vsq).sum() / n).item())
    assert st["policy_loss"].item() != pytest.approx(pol_plain.item())  # weights act on the policy term
    per = clipped_surrogate(torch.exp(torch.where(mask, logps.detach() - old, 0 * old)), adv[:, None], 0.2, 0.2) * w
    assert st["policy_loss"].item() == pytest.approx((torch.where(mask, per, 0 * per).sum() / n).item())
    assert loss.item() == pytest.approx(st["policy_loss"].item() + 0.3 * st["kl_loss"].item())


# ------------------------------------------------------------------------------ gradients


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_ratio_one_gradient_is_reinforce(mode):
    """At w = 1 the gradient is -A * d log pi, aggregated with the mode's weights."""
    logps, _, _, mask, adv = _ragged_batch(seed=1)
    old = logps.detach()
    n = loss_normalizers(mask, mode, max_len=9)
    loss, st = policy_loss(logps, old, adv, mask, LossConfig(aggregation=mode), normalizer=n)
    (g,) = torch.autograd.grad(loss, logps)
    m = mask.to(F64)
    if mode == "seq-mean-token-mean":
        want = -adv[:, None] * m / m.sum(-1, keepdim=True).clamp(min=1) / n
    else:
        want = -adv[:, None] * m / n
    torch.testing.assert_close(g, want)
    assert st["ratio_mean"].item() == 1.0 and st["clip_frac"].item() == 0.0


def test_ratio_one_gradient_sequence_level_gspo():
    logps, _, _, mask, adv = _ragged_batch(seed=2)
    cfg = loss_preset("gspo")
    n = loss_normalizers(mask, cfg.aggregation)
    loss, _ = policy_loss(logps, logps.detach(), adv, mask, cfg, normalizer=n)
    (g,) = torch.autograd.grad(loss, logps)
    m = mask.to(F64)
    # w_i = exp(mean_t log ratio) -> dw/dlogp_t = 1/|o_i| ; row loss = -A_i w_i
    want = -adv[:, None] * m / m.sum(-1, keepdim=True).clamp(min=1) / n
    torch.testing.assert_close(g, want)


def test_clipped_elements_get_zero_gradient():
    logps = torch.zeros(1, 6, dtype=F64, requires_grad=True)
    lr = _t([[0.5, -0.5, 0.5, -0.5, 0.05, 1.0]])  # log ratios: w = e^.5 (>1.2), e^-.5 (<0.8), ...
    old = logps.detach() - lr
    adv = _t([[1.0, -1.0, -1.0, 1.0, 1.0, -1.0]])
    mask = torch.ones(1, 6, dtype=torch.bool)
    cfg = LossConfig(aggregation="token-sum", eps_low=0.2)
    loss, st = policy_loss(logps, old, adv, mask, cfg, normalizer=1.0)
    (g,) = torch.autograd.grad(loss, logps)
    w = torch.exp(lr)
    # clipped: (w>1.2, A>0) and (w<0.8, A<0) -> 0 ; the others keep -A w
    want = -adv * w
    want[0, 0] = 0.0
    want[0, 1] = 0.0
    torch.testing.assert_close(g, want)
    assert st["clip_frac_high"].item() == pytest.approx(1 / 6) and st["clip_frac_low"].item() == pytest.approx(1 / 6)
    # without delta, A<0 with w > 1+eps is NOT clipped (PPO's pessimistic min keeps w A)
    assert g[0, 2] != 0.0 and g[0, 5] != 0.0
    # with delta = 1.5 the A<0 elements with w = e^.5, e^1 (> delta) are clipped too
    loss, _ = policy_loss(logps, old, adv, mask, LossConfig(aggregation="token-sum", delta=1.5), normalizer=1.0)
    (g2,) = torch.autograd.grad(loss, logps)
    want2 = want.clone()
    want2[0, 2] = 0.0
    want2[0, 5] = 0.0
    torch.testing.assert_close(g2, want2)


def test_cispo_gradient_uses_capped_detached_weight():
    logps, old, _, mask, adv = _ragged_batch(seed=3, noise=1.0)
    cfg = loss_preset("cispo", eps_high=1.3)
    n = loss_normalizers(mask, cfg.aggregation)
    loss, _ = policy_loss(logps, old, adv, mask, cfg, normalizer=n)
    (g,) = torch.autograd.grad(loss, logps)
    w = torch.exp(torch.where(mask, logps.detach() - old, torch.zeros_like(old))).clamp(max=1.3)
    torch.testing.assert_close(g, -w * adv[:, None] * mask / n)


def test_masked_nan_and_inf_do_not_leak():
    logps, old, ref, mask, adv = _ragged_batch(seed=6)
    lp = logps.detach().clone()
    lp[~mask] = float("nan")
    lp.requires_grad_(True)
    o = old.clone()
    o[~mask] = float("-inf")
    r = ref.clone()
    r[~mask] = float("inf")
    for cfg in (loss_preset("grpo", beta=0.1), loss_preset("cispo", beta=0.1), loss_preset("gspo", beta=0.1)):
        n = loss_normalizers(mask, cfg.aggregation)
        loss, st = policy_loss(lp, o, adv, mask, cfg, normalizer=n, ref_logps=r)
        (g,) = torch.autograd.grad(loss, lp)
        assert torch.isfinite(loss) and torch.isfinite(g).all()
        assert (g[~mask] == 0).all()
        assert all(torch.isfinite(v).all() for v in st.values())
    # flow path: per-step advantages and step terms that are garbage at untrained steps
    adv_t = adv[:, None].expand(mask.shape).clone()
    adv_t[~mask] = float("nan")
    bad = torch.rand(mask.shape, dtype=F64) + 0.1
    bad_std, bad_dt, bad_d2 = bad.clone(), bad.clone(), bad.clone()
    bad_std[~mask], bad_dt[~mask], bad_d2[~mask] = 0.0, float("nan"), float("inf")
    terms = StepTerms(std=bad_std, dt_abs=bad_dt, delta_sq=bad_d2, ref_delta_sq=bad_d2)
    for level in ("token", "sequence"):
        cfg = LossConfig(ratio_norm=True, ratio_level=level, beta=0.1, kl_estimator="latent", kl_drop_dt=True)
        n = loss_normalizers(mask, cfg.aggregation)
        loss, st = policy_loss(lp, o, adv_t, mask, cfg, normalizer=n, step_terms=terms, step_weights=bad_dt)
        (g,) = torch.autograd.grad(loss, lp)
        assert torch.isfinite(loss) and torch.isfinite(g).all() and (g[~mask] == 0).all()
        assert all(torch.isfinite(v).all() for v in st.values())


# ------------------------------------------------------------------------------ micro-batches


def _grad_full_and_split(cfg, seed, splits, n=8, t=6):
    logps, old, ref, mask, adv = _ragged_batch(n=n, t=t, seed=seed, noise=0.4)
    norm = loss_normalizers(mask, cfg.aggregation, max_len=t + 3)
    loss, _ = policy_loss(logps, old, adv, mask, cfg, normalizer=norm, ref_logps=ref)
    (g_full,) = torch.autograd.grad(loss, logps)
    g_acc = torch.zeros_like(g_full)
    total = 0.0
    start = 0
    for size in splits:
        sl = slice(start, start + size)
        part = logps.detach()[sl].clone().requires_grad_(True)
        l_mb, _ = policy_loss(part, old[sl], adv[sl], mask[sl], cfg, normalizer=norm, ref_logps=ref[sl])
        (g,) = torch.autograd.grad(l_mb, part)
        g_acc[sl] = g
        total += l_mb.item()
        start += size
    return loss.item(), total, g_full, g_acc, (logps, old, ref, mask, adv)


@pytest.mark.parametrize("mode", AGGREGATIONS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_micro_batch_split_gives_full_batch_gradient(mode, level):
    cfg = LossConfig(aggregation=mode, ratio_level=level, beta=0.05, eps_high=0.28, delta=1.6,
                     kl_ratio_weighted="importance")
    full, acc, g_full, g_acc, _ = _grad_full_and_split(cfg, seed=11, splits=[3, 1, 4])
    assert acc == pytest.approx(full, rel=1e-12, abs=1e-12)
    torch.testing.assert_close(g_acc, g_full, rtol=1e-12, atol=1e-14)


def test_micro_batch_normaliser_is_the_bug_class():
    """Normalising each micro-batch by its own token count (the GA bug) changes the gradient."""
    cfg = LossConfig(aggregation="token-mean")
    _, _, g_full, _, (logps, old, _, mask, adv) = _grad_full_and_split(cfg, seed=12, splits=[8])
    g_bad = torch.zeros_like(g_full)
    for sl in (slice(0, 3), slice(3, 8)):
        part = logps.detach()[sl].clone().requires_grad_(True)
        local = loss_normalizers(mask[sl], "token-mean") * 2  # per-micro-batch count x GA
        l_mb, _ = policy_loss(part, old[sl], adv[sl], mask[sl], cfg, normalizer=local)
        g_bad[sl] = torch.autograd.grad(l_mb, part)[0]
    assert not torch.allclose(g_bad, g_full)


def test_data_parallel_average_matches_global_loss():
    cfg = LossConfig(aggregation="token-mean")
    logps, old, _, mask, adv = _ragged_batch(n=8, t=5, seed=13)
    loss, _ = policy_loss(logps, old, adv, mask, cfg, normalizer=loss_normalizers(mask, "token-mean"))
    (g_full,) = torch.autograd.grad(loss, logps)
    shards = [slice(0, 5), slice(5, 8)]  # uneven shards on 2 "processes"
    total = sum(mask[s].sum() for s in shards).to(F64)
    grads = []
    for s in shards:
        part = logps.detach()[s].clone().requires_grad_(True)
        norm = loss_normalizers(mask[s], "token-mean", world_size=2, reduce_fn=lambda _x: total)
        l_p, _ = policy_loss(part, old[s], adv[s], mask[s], cfg, normalizer=norm)
        grads.append(torch.autograd.grad(l_p, part)[0])
    # DDP averages the gradients of the P processes
    torch.testing.assert_close(torch.cat(grads) / 2, g_full)


# ------------------------------------------------------------------------------ property test


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 6),
    t=st.integers(1, 7),
    seed=st.integers(0, 10_000),
    mode=st.sampled_from(AGGREGATIONS),
    level=st.sampled_from(["token", "sequence"]),
    surrogate=st.sampled_from(["clip", "cispo", "sapo"]),
    eps=st.floats(0.01, 0.5),
    beta=st.sampled_from([0.0, 0.04]),
    per_step_adv=st.booleans(),
)
def test_property_random_shapes_and_masks(n, t, seed, mode, level, surrogate, eps, beta, per_step_adv):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, t, generator=gen) < 0.6
    logps = (-torch.rand(n, t, generator=gen, dtype=F64) * 2).requires_grad_(True)
    old = logps.detach() + 0.5 * torch.randn(n, t, generator=gen, dtype=F64)
    ref = logps.detach() + 0.5 * torch.randn(n, t, generator=gen, dtype=F64)
    adv = torch.randn(n, t, generator=gen, dtype=F64) if per_step_adv else torch.randn(n, generator=gen, dtype=F64)
    cfg = LossConfig(surrogate=surrogate, aggregation=mode, ratio_level=level, eps_low=eps,
                     eps_high=eps if surrogate != "cispo" else 3.0, beta=beta)
    norm = loss_normalizers(mask, mode)
    loss, stats = policy_loss(logps, old, adv, mask, cfg, normalizer=norm, ref_logps=ref)
    (g,) = torch.autograd.grad(loss, logps)
    assert loss.ndim == 0 and torch.isfinite(loss) and torch.isfinite(g).all()
    assert (g[~mask] == 0).all()  # masked actions never receive gradient
    for k in ("clip_frac_low", "clip_frac_high", "clip_frac"):
        assert 0.0 <= stats[k].item() <= 1.0
    assert stats["clip_frac"].item() <= stats["clip_frac_low"].item() + stats["clip_frac_high"].item() + 1e-12
    if mask.any():
        assert stats["ratio_min"] <= stats["ratio_mean"] + 1e-12 <= stats["ratio_max"] + 2e-12
        assert stats["ratio_min"] > 0
    assert stats["approx_kl"] >= 0 and stats["approx_kl_k3"] >= -1e-12
    # row permutation invariance
    perm = torch.randperm(n, generator=gen)
    lp2 = logps.detach()[perm].clone().requires_grad_(True)
    loss_p, _ = policy_loss(lp2, old[perm], adv[perm], mask[perm], cfg, normalizer=norm, ref_logps=ref[perm])
    assert loss_p.item() == pytest.approx(loss.item(), rel=1e-10, abs=1e-12)
    # splitting at a random row with the full-batch normaliser reproduces the loss and gradient
    cut = int(torch.randint(0, n + 1, (1,), generator=gen))
    total = torch.zeros((), dtype=F64)
    gs = []
    for sl in (slice(0, cut), slice(cut, n)):
        if sl.start == sl.stop:
            continue
        part = logps.detach()[sl].clone().requires_grad_(True)
        l_mb, _ = policy_loss(part, old[sl], adv[sl], mask[sl], cfg, normalizer=norm, ref_logps=ref[sl])
        gs.append(torch.autograd.grad(l_mb, part)[0])
        total = total + l_mb.detach()
    assert total.item() == pytest.approx(loss.item(), rel=1e-10, abs=1e-12)
    torch.testing.assert_close(torch.cat(gs), g, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------ flow: RatioNorm & KL


def _flow_transition(kind: str, n=5, shape=(2, 4, 4), seed=0, dtype=F64):
    """One Gaussian denoising step of a rectified flow (x_sigma = (1-sigma) x0 + sigma eps), in plain torch.

    Returns mu_old, mu_new (with grad through v_new), s, |dt|, the sampled x', the noise eps and
    log-probs of x' under both means in the dynamics' own convention, plus kappa.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=gen, dtype=dtype)
    v_old = torch.randn(n, *shape, generator=gen, dtype=dtype)
    # per-sample perturbation of different magnitude (so batch-averaging the bias would be wrong)
    scale = torch.linspace(0.02, 0.4, n, dtype=dtype).view(n, 1, 1, 1)
    v_new = (v_old + scale * torch.randn(n, *shape, generator=gen, dtype=dtype)).requires_grad_(True)
    sigma = torch.linspace(0.3, 0.9, n, dtype=dtype).view(n, 1, 1, 1)  # different noise levels per sample
    sigma_next = sigma - torch.linspace(0.05, 0.2, n, dtype=dtype).view(n, 1, 1, 1)
    dt = sigma_next - sigma  # negative
    a = 0.7

    def mean_of(v):
        if kind in ("flow_sde", "dance_sde"):
            std_t = a * torch.sqrt(sigma / (1 - sigma)) if kind == "flow_sde" else torch.full_like(sigma, 0.3)
            return x + (v + std_t**2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt, std_t * torch.sqrt(-dt)
        s = sigma_next * math.sin(a * math.pi / 2)  # CPS
        x0 = x - sigma * v
        x1 = x + (1 - sigma) * v
        return (1 - sigma_next) * x0 + torch.sqrt(sigma_next**2 - s**2) * x1, s

    mu_old, s = mean_of(v_old)
    mu_new, _ = mean_of(v_new)
    eps = torch.randn(n, *shape, generator=gen, dtype=dtype)
    x_next = mu_old + s * eps

    def logp(mu):
        if kind == "cps":  # the CPS code's convention: constants and 1/(2 s^2) dropped
            return -((x_next - mu) ** 2).reshape(n, -1).mean(1)
        return torch.distributions.Normal(mu, s.expand_as(mu)).log_prob(x_next).reshape(n, -1).mean(1)

    s_flat = s.reshape(n)
    kappa = 2 * s_flat**2 if kind == "cps" else torch.ones_like(s_flat)
    return dict(mu_old=mu_old, mu_new=mu_new, v_new=v_new, s=s_flat, dt_abs=(-dt).reshape(n), eps=eps,
                logp_new=logp(mu_new), logp_old=logp(mu_old), kappa=kappa)


@pytest.mark.parametrize("kind", ["flow_sde", "dance_sde", "cps"])
def test_ratio_norm_identity_on_real_gaussian_steps(kind):
    tr = _flow_transition(kind)
    delta = tr["mu_new"] - tr["mu_old"]
    n = delta.shape[0]
    s = tr["s"]
    de = (delta * tr["eps"]).reshape(n, -1).mean(1)
    d2 = mean_sq_diff(tr["mu_new"], tr["mu_old"])
    log_ratio = tr["logp_new"] - tr["logp_old"]
    # the mean-reduced log-ratio of the true Gaussian: mean(delta eps)/s - mean(delta^2)/(2 s^2)
    torch.testing.assert_close(log_ratio / tr["kappa"], de / s - d2 / (2 * s * s), rtol=1e-10, atol=1e-12)
    # RatioNorm turns it into mean(delta * eps), per sample
    rn = ratio_normalized_log_ratio(log_ratio, d2, s, tr["kappa"])
    torch.testing.assert_close(rn, de, rtol=1e-9, atol=1e-12)
    # averaging the bias over the batch (the reference script's accident) gives something else
    wrong = s.mean() * (log_ratio / tr["kappa"] + (d2 / (2 * s * s)).mean())
    assert not torch.allclose(wrong, de, rtol=1e-3, atol=1e-6)
    # the raw log-ratio is biased negative with a 1/s scale; the normalised one is not scaled by 1/s
    assert (log_ratio / tr["kappa"] - de / s).max() < 0


@pytest.mark.parametrize("kind", ["flow_sde", "dance_sde", "cps"])
def test_ratio_norm_policy_loss_value_and_gradient(kind):
    tr = _flow_transition(kind, seed=1)
    n = tr["s"].shape[0]
    # T = 1 trained step per sample; the learner stacks [N, T]
    logps = tr["logp_new"][:, None]
    old = tr["logp_old"][:, None].detach()
    d2 = mean_sq_diff(tr["mu_new"], tr["mu_old"])[:, None]
    terms = StepTerms(std=tr["s"][:, None], dt_abs=tr["dt_abs"][:, None], delta_sq=d2, logp_scale=tr["kappa"][:, None])
    mask = torch.ones(n, 1, dtype=torch.bool)
    adv = torch.linspace(-1.5, 1.5, n, dtype=F64)
    cfg = LossConfig(ratio_norm=True, eps_low=0.05, aggregation="token-mean")
    loss, st = policy_loss(logps, old, adv, mask, cfg, normalizer=float(n), step_terms=terms)
    (g,) = torch.autograd.grad(loss, tr["v_new"], retain_graph=True)
    # independent route: w~ = exp(mean(delta eps)), clipped surrogate, divided by |dt|
    delta = tr["mu_new"] - tr["mu_old"]
    de = (delta * tr["eps"]).reshape(n, -1).mean(1)
    per = clipped_surrogate(torch.exp(de), adv, 0.05, 0.05) / tr["dt_abs"]
    ref_loss = per.sum() / n
    (g_ref,) = torch.autograd.grad(ref_loss, tr["v_new"])
    torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(st["ratio_mean"], torch.exp(de).mean().detach())
    # without the reweighting the |dt| division disappears
    cfg2 = LossConfig(ratio_norm=True, ratio_norm_reweight=False, eps_low=0.05, aggregation="token-mean")
    loss2, _ = policy_loss(logps, old, adv, mask, cfg2, normalizer=float(n), step_terms=terms)
    per2 = clipped_surrogate(torch.exp(de), adv, 0.05, 0.05)
    torch.testing.assert_close(loss2, per2.sum() / n, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="^step_terms:"):
        policy_loss(logps, old, adv, mask, cfg, normalizer=float(n))


@pytest.mark.parametrize("kind", ["flow_sde", "dance_sde", "cps"])
def test_ratio_norm_with_the_package_sde_step(kind):
    """Same identity on transitions produced and re-scored by flowrl.flow.steps.sde_step (true log-probs)."""
    from flowrl.flow import steps
    gen = torch.Generator().manual_seed(7)
    n = 4
    x = torch.randn(n, 3, 8, generator=gen, dtype=F64)
    v_old = torch.randn(n, 3, 8, generator=gen, dtype=F64)
    v_new = (v_old + 0.1 * torch.randn(n, 3, 8, generator=gen, dtype=F64)).requires_grad_(True)
    sigma = torch.tensor([0.9, 0.7, 0.5, 0.3], dtype=F64)
    sigma_next = sigma - 0.1
    noise = torch.randn(n, 3, 8, generator=gen, dtype=F64)
    a = 0.7
    old = steps.sde_step(x, v_old, sigma, sigma_next, a, kind=kind, noise=noise)
    new = steps.sde_step(x, v_new, sigma, sigma_next, a, kind=kind, prev_sample=old.prev_sample)
    s = old.std.reshape(n)
    d2 = mean_sq_diff(new.mean, old.mean)
    rn = ratio_normalized_log_ratio(new.log_prob - old.log_prob, d2, s)
    de = ((new.mean - old.mean) * noise).reshape(n, -1).mean(1)
    torch.testing.assert_close(rn, de, rtol=1e-8, atol=1e-12)
    # and through policy_loss: value and gradient w.r.t. the velocity equal the direct mean(delta*eps) route
    dt_abs = (sigma - sigma_next)[:, None]
    terms = StepTerms(std=s[:, None], dt_abs=dt_abs, delta_sq=d2[:, None])
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=F64)
    cfg = LossConfig(ratio_norm=True, eps_low=0.01, aggregation="token-mean")
    mask = torch.ones(n, 1, dtype=torch.bool)
    loss, _ = policy_loss(new.log_prob[:, None], old.log_prob[:, None].detach(), adv, mask, cfg,
                          normalizer=float(n), step_terms=terms)
    ref = (clipped_surrogate(torch.exp(de), adv, 0.01, 0.01) / dt_abs[:, 0]).sum() / n
    g1 = torch.autograd.grad(loss, v_new, retain_graph=True)[0]
    g2 = torch.autograd.grad(ref, v_new)[0]
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g1, g2, rtol=1e-7, atol=1e-10)


def test_latent_gaussian_kl_matches_torch_distributions():
    tr = _flow_transition("flow_sde", seed=2)
    n = tr["s"].shape[0]
    mu_ref = tr["mu_old"]
    s = tr["s"].view(n, 1, 1, 1)
    p = torch.distributions.Normal(tr["mu_new"].detach(), s.expand_as(mu_ref))
    q = torch.distributions.Normal(mu_ref, s.expand_as(mu_ref))
    exact = torch.distributions.kl_divergence(p, q).reshape(n, -1).mean(1)
    d2 = mean_sq_diff(tr["mu_new"].detach(), mu_ref)
    torch.testing.assert_close(gaussian_mean_kl(d2, tr["s"]), exact)
    # Flow-GRPO: divides by std_t^2 = s^2/|dt| -> exact KL times |dt|
    std_t = tr["s"] / tr["dt_abs"].sqrt()
    flow_grpo = d2 / (2 * std_t**2)
    torch.testing.assert_close(gaussian_mean_kl(d2, tr["s"], tr["dt_abs"], drop_dt=True), flow_grpo)
    # through policy_loss with beta
    logps = tr["logp_new"][:, None].detach()
    terms = StepTerms(std=tr["s"][:, None], dt_abs=tr["dt_abs"][:, None], ref_delta_sq=d2[:, None])
    cfg = LossConfig(aggregation="token-mean", beta=0.04, kl_estimator="latent", kl_drop_dt=False)
    loss, st = policy_loss(logps, logps, torch.zeros(n, dtype=F64), torch.ones(n, 1, dtype=torch.bool), cfg,
                           normalizer=float(n), step_terms=terms)
    assert loss.item() == pytest.approx(0.04 * exact.mean().item())
    with pytest.raises(ValueError, match="^dt_abs:"):
        gaussian_mean_kl(d2, tr["s"], drop_dt=True)
    with pytest.raises(ValueError, match="^step_terms:"):
        policy_loss(logps, logps, torch.zeros(n, dtype=F64), torch.ones(n, 1, dtype=torch.bool), cfg,
                    normalizer=float(n))


def test_step_weights_helpers():
    s = _t([0.5, 0.25, 0.25, 1.0])
    w = noise_aware_weights(s)
    assert w.mean().item() == pytest.approx(1.0)
    torch.testing.assert_close(w / w[0], s / s[0])
    torch.testing.assert_close(noise_aware_weights(s, normalize=False), s)
    torch.testing.assert_close(dt_reweight(_t([0.1, 0.5])), _t([10.0, 2.0]))
    with pytest.raises(ValueError, match="^dt_abs:"):
        dt_reweight(_t([0.0]))
    with pytest.raises(ValueError, match="^std:"):
        noise_aware_weights(torch.zeros(3))
    # per-step weights scale the policy term of each step
    logps, old, _, mask, adv = _ragged_batch(seed=8)
    full = torch.ones_like(mask)
    cfg = LossConfig(aggregation="token-sum")
    base, _ = policy_loss(logps, old, adv, full, cfg, normalizer=1.0)
    tw = torch.zeros(logps.shape[1], dtype=F64)
    tw[2] = 3.0
    one, _ = policy_loss(logps, old, adv, full, cfg, normalizer=1.0, step_weights=tw)
    only2 = torch.zeros_like(full)
    only2[:, 2] = True
    ref, _ = policy_loss(logps, old, adv, only2, cfg, normalizer=1.0)
    assert one.item() == pytest.approx(3.0 * ref.item())
    assert base.item() != pytest.approx(one.item())


# ------------------------------------------------------------------------------ schedules, presets, errors


def test_kl_coefficient_schedules_and_adaptive_controller():
    assert kl_coefficient(100, LossConfig(beta=0.04)) == 0.04
    cfg = LossConfig(beta=0.0, beta_schedule="linear", beta_end=0.1, beta_steps=10)
    assert [kl_coefficient(s, cfg) for s in (0, 5, 10, 50)] == pytest.approx([0.0, 0.05, 0.1, 0.1])
    ctl = AdaptiveKLController.from_config(LossConfig(beta=0.1, beta_schedule="adaptive", kl_target=0.01,
                                                      kl_horizon=100))
    assert ctl.update(0.05, n_steps=10) == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))  # error clipped at +0.2
    v = ctl.value
    assert ctl.update(0.009) == pytest.approx(v * (1 - 0.1 / 100))  # KL below target -> smaller beta
    state = ctl.state_dict()
    ctl2 = AdaptiveKLController(1.0, 1.0)
    ctl2.load_state_dict(state)
    assert ctl2.update(0.02) == ctl.update(0.02)
    with pytest.raises(ValueError, match="^beta_schedule:"):
        kl_coefficient(0, LossConfig(beta_schedule="adaptive", kl_target=0.1))
    with pytest.raises(ValueError, match="^beta_end:"):
        LossConfig(beta_schedule="linear").validate()
    with pytest.raises(ValueError, match="^kl_target:"):
        LossConfig(beta_schedule="adaptive").validate()


def test_presets_follow_trl_semantics():
    assert loss_preset("grpo").aggregation == "seq-mean-token-mean"
    assert loss_preset("bnpo").aggregation == "token-mean" and loss_preset("bnpo").normalizer_scope == "micro_batch"
    assert loss_preset("dr_grpo").aggregation == "constant"
    d = loss_preset("dapo")
    assert d.aggregation == "token-mean" and d.eps_high_value == 0.28 and d.eps_low == 0.2
    g = loss_preset("gspo")
    assert g.ratio_level == "sequence" and (g.eps_low, g.eps_high) == (3e-4, 4e-4) and g.beta == 0.0
    assert loss_preset("cispo").surrogate == "cispo" and loss_preset("cispo").eps_high == 5.0
    assert loss_preset("luspo").aggregation == "seq-mean-token-sum"
    assert loss_preset("grpo").kl_ratio_weighted == "importance"  # TRL 1.16 use_bias_correction_kl=True
    assert loss_preset("grpo", kl_ratio_weighted="none").kl_ratio_weighted == "none"
    with pytest.raises(ValueError, match="^name:"):
        loss_preset("ppo2")
    with pytest.raises(ValueError, match="^epsilon:"):
        loss_preset("grpo", epsilon=0.1)


@pytest.mark.parametrize(
    "field, value",
    [
        ("surrogate", "ppo"),
        ("eps_low", -0.1),
        ("eps_low", 1.0),
        ("eps_high", float("nan")),
        ("delta", 1.0),
        ("dual_clip", 0.5),
        ("ratio_level", "step"),
        ("log_ratio_clamp", 0.0),
        ("aggregation", "mean"),
        ("normalizer_scope", "global"),
        ("beta", -1.0),
        ("kl_estimator", "k4"),
        ("kl_ratio_weighted", "yes"),
        ("kl_clamp", -1.0),
        ("beta_schedule", "cosine"),
    ],
)
def test_loss_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}:"):
        LossConfig(**{field: value}).validate()


def test_policy_loss_input_errors():
    logps, old, ref, mask, adv = _ragged_batch(seed=9)
    cfg = LossConfig()
    with pytest.raises(TypeError):
        policy_loss(logps, old, adv, mask, cfg)  # the normaliser is required
    with pytest.raises(ValueError, match="^normalizer:"):
        policy_loss(logps, old, adv, mask, cfg, normalizer=0.0)
    with pytest.raises(ValueError, match="^old_logps:"):
        policy_loss(logps, old[:, :2], adv, mask, cfg, normalizer=1.0)
    with pytest.raises(ValueError, match="^mask:"):
        policy_loss(logps, old, adv, mask[:2], cfg, normalizer=1.0)
    with pytest.raises(ValueError, match="^advantages:"):
        policy_loss(logps, old, adv[:2], mask, cfg, normalizer=1.0)
    with pytest.raises(ValueError, match="^logps:"):
        policy_loss(logps[0], old[0], adv, mask[0], cfg, normalizer=1.0)
    with pytest.raises(ValueError, match="^ref_logps:"):
        policy_loss(logps, old, adv, mask, LossConfig(beta=0.1), normalizer=1.0)
    with pytest.raises(ValueError, match="^level:"):
        log_importance_weights(logps, old, mask, "step")
    with pytest.raises(ValueError, match="^b:"):
        mean_sq_diff(torch.zeros(2, 3), torch.zeros(2, 4))


def test_k3_keeps_its_value_for_tiny_flow_log_ratios():
    """Flow log-ratios are ~1e-4; exp(d) - d - 1 in float32 rounds to 0 there, expm1(d) - d does not."""
    from flowrl.core.losses import kl_penalty

    d = torch.tensor([1e-4, -3e-4, 2e-3], dtype=torch.float32)
    k3 = kl_penalty(torch.zeros(3), d, "k3")
    exact = (torch.exp(d.double()) - d.double() - 1).float()
    torch.testing.assert_close(k3, exact, rtol=1e-3, atol=0)
    assert (k3 > 0).all()
