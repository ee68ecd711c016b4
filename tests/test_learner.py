"""Tests of flowrl.flow.learner on the tiny SD3 and Flux pipelines (random weights, CPU).

The references are written here independently of the learner: the loss of all trained steps is
built in ONE autograd graph (every step's log-prob stacked into ``[N, T]``, one ``policy_loss`` call,
one backward), and the learner's step-by-step accumulated gradient must match it for every
aggregation, KL estimator, GRPO-Guard, noise-aware weights, per-step advantages and the
sequence-level ratio. At ratio 1 the gradient is also checked against the closed form
``-sum_it m_it A_it grad log pi_it / (c_i Z)``.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from flowrl.core.losses import LossConfig, StepTerms, loss_normalizers, mean_sq_diff, noise_aware_weights, policy_loss
from flowrl.flow.learner import (
    FlowLearner,
    has_adapters,
    reference_transformer,
    seq_mean_row_counts,
    shared_state_runs,
)
from flowrl.flow.plan import build_plan
from flowrl.flow.policy import FlowPolicy, PromptEmbeds
from flowrl.flow.sampler import Rollout, sample
from flowrl.flow.steps import sde_step
from plans import plan_config

H = W = 32
PROMPTS = ["a red cube", "two green dogs"]
MSL = 8
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "constant", "token-sum")


# ---------------------------------------------------------------------------------------------
# fixtures and helpers
# ---------------------------------------------------------------------------------------------


def _sd3(seed: int = 0) -> FlowPolicy:
    from flowrl.demo.tiny_image import build_tiny_sd3_pipeline

    return FlowPolicy.from_pipeline(build_tiny_sd3_pipeline(seed=seed), max_sequence_length=MSL)


def _flux(seed: int = 0) -> FlowPolicy:
    from flowrl.demo.tiny_image import build_tiny_flux_pipeline

    return FlowPolicy.from_pipeline(build_tiny_flux_pipeline(seed=seed), max_sequence_length=MSL)


@pytest.fixture(scope="module")
def sd3() -> FlowPolicy:
    return _sd3()


@pytest.fixture(scope="module")
def flux() -> FlowPolicy:
    return _flux()


def _rollout(policy, plan_cfg: dict, *, steps: int = 4, group: int = 4, seed: int = 0, same_noise=False,
             guidance: float = 4.5) -> Rollout:
    plan = build_plan(plan_config(**plan_cfg), steps, 0)
    return sample(policy, PROMPTS, plan, group_size=group, height=H, width=W, guidance_scale=guidance,
                  generator=torch.Generator().manual_seed(seed), same_noise=same_noise)


def _params(policy) -> list[torch.nn.Parameter]:
    return [p for p in policy.transformer.parameters() if p.requires_grad]


def _zero(policy) -> None:
    for p in policy.transformer.parameters():
        p.grad = None


def _grads(policy) -> list[torch.Tensor]:
    out = []
    for p in _params(policy):
        out.append(torch.zeros_like(p) if p.grad is None else p.grad.detach().clone())
    return out


def _learner_grad(policy, r, adv, cfg, **kw):
    call = {k: kw.pop(k) for k in ("beta", "step_weights", "on_policy") if k in kw}
    learner = FlowLearner(policy, cfg, **kw)
    _zero(policy)
    stats = learner.minibatch_gradient(r, adv, normalizer=loss_normalizers(r.trained, cfg.aggregation), **call)
    g = _grads(policy)
    _zero(policy)
    return g, stats


def _assert_close(a: list[torch.Tensor], b: list[torch.Tensor], rtol=1e-5, atol_frac=1e-6):
    scale = max(float(x.abs().max()) for x in b)
    assert scale > 0, "reference gradient is zero: the test would be vacuous"
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol_frac * scale)


def _perturb(policy, scale: float, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in _params(policy):
            p.add_(scale * torch.randn(p.shape, generator=g) * (p.abs().mean() + 1e-3))


def _one_graph_loss(policy, r: Rollout, adv, cfg: LossConfig, *, ref_policy=None, beta=None, step_weights=None):
    """The whole minibatch loss in one autograd graph (independent of the learner's code paths):
    every trained transition recomputed (a step's trained rows in one batch, so the forward values
    are bit-identical to the learner's and only the gradient summation order differs), scattered
    into [N, T] with the graph kept, then one policy_loss call over all steps."""
    n, steps = r.trained.shape
    emb_all = PromptEmbeds.from_tensors(r.embeds)
    cols = {k: [] for k in ("logps", "std", "dt", "dsq", "ref_logps", "ref_dsq", "v_ref_dsq")}

    def put(name, rows, value):
        cols[name].append(torch.zeros(n, dtype=value.dtype).index_put((rows,), value))

    for t in range(steps):
        rows = r.trained[:, t].nonzero().flatten()
        if rows.numel() == 0:  # an untrained step: a column of (masked) zeros
            for k in cols if ref_policy is not None else ("logps", "std", "dt", "dsq"):
                cols[k].append(torch.zeros(n))
            continue
        x, xn = r.latents[rows, t].float(), r.latents[rows, t + 1].float()
        args = (r.sigmas[rows, t], r.sigma_next[rows, t], r.noise_levels[rows, t])
        emb = emb_all.select(r.prompt_index[rows])
        v = policy.velocity(x, r.sigmas[rows, t], emb, r.guidance_scale)
        st = sde_step(x, v, *args, prev_sample=xn, kind=r.sde_kind, reduction=r.reduction)
        put("logps", rows, st.log_prob)
        put("std", rows, st.std.reshape(-1).expand(rows.numel()))
        put("dt", rows, args[0] - args[1])
        put("dsq", rows, mean_sq_diff(st.mean, r.means[rows, t].float()))
        if ref_policy is not None:
            with torch.no_grad():
                v_ref = ref_policy.velocity(x, r.sigmas[rows, t], emb, r.guidance_scale)
                ref = sde_step(x, v_ref, *args, prev_sample=xn, kind=r.sde_kind, reduction=r.reduction)
            put("ref_logps", rows, ref.log_prob)
            put("ref_dsq", rows, mean_sq_diff(st.mean, ref.mean))
            put("v_ref_dsq", rows, mean_sq_diff(v, v_ref))
    S = {k: torch.stack(v, dim=1) for k, v in cols.items() if v}
    terms = StepTerms(std=S["std"], dt_abs=S["dt"], delta_sq=S["dsq"], ref_delta_sq=S.get("ref_dsq"),
                      v_ref_delta_sq=S.get("v_ref_dsq"))
    return policy_loss(S["logps"], r.log_probs, adv, r.trained, cfg,
                       normalizer=loss_normalizers(r.trained, cfg.aggregation), ref_logps=S.get("ref_logps"),
                       step_terms=terms, step_weights=step_weights, beta=beta)


def _one_graph_grad(policy, r, adv, cfg, **kw):
    _zero(policy)
    loss, stats = _one_graph_loss(policy, r, adv, cfg, **kw)
    loss.backward()
    g = _grads(policy)
    _zero(policy)
    return g, stats


# rows train different numbers of the 3 trainable steps of a 4-step full plan (never the last step)
MIXED_MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [1, 1, 1, 0],
                           [0, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)


# ---------------------------------------------------------------------------------------------
# on-policy: every ratio exactly 1, for every SDE kind and plan kind, with and without GRPO-Guard
# ---------------------------------------------------------------------------------------------

PLANS = {
    "full": dict(kind="full"),
    "window": dict(kind="window", window=dict(size=2, start=1, stride=0)),
    "tree": dict(kind="tree", tree=dict(branch_factors=[2, 2], branch_steps=[0, 2])),
}
NOISE = {"flow_sde": 0.7, "dance_sde": 0.3, "cps": 0.8}


@pytest.mark.parametrize("model", ["sd3", "flux"])
@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("sde", list(NOISE))
def test_first_pass_is_exactly_on_policy(request, model, plan, sde):
    policy = request.getfixturevalue(model)
    r = _rollout(policy, dict(PLANS[plan], sde=sde, noise_level=NOISE[sde]), guidance=4.5 if model == "sd3" else 3.5)
    adv = torch.linspace(-1.0, 1.0, r.num_samples)
    for ratio_norm in (False, True):  # GRPO-Guard runs for every kind and is exactly 1 on-policy too
        cfg = LossConfig(eps_low=1e-5, ratio_norm=ratio_norm)
        grads, st = _learner_grad(policy, r, adv, cfg)
        assert st["ratio_min"] == 1.0 and st["ratio_max"] == 1.0, (plan, sde, ratio_norm, st)
        assert st["ratio_std"] == 0.0 and st["clip_frac"] == 0.0 and st["approx_kl"] == 0.0
        assert st["num_actions"] == float(r.trained.sum())
        assert all(torch.isfinite(g).all() for g in grads) and any(bool(g.abs().sum() > 0) for g in grads)
    if plan == "tree":  # shared parents evaluated once: exactly the sampler's node count at trained steps
        rows = [len({(int(r.prompt_index[n]), r.latents[n, t].numpy().tobytes())
                     for n in r.trained[:, t].nonzero().flatten().tolist()})
                for t in range(r.num_stored_steps)]
        assert st["num_velocity_rows"] == sum(rows) < st["num_actions"]


# ---------------------------------------------------------------------------------------------
# the gradient at ratio 1 is the advantage-weighted log-prob gradient
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("aggregation", ["seq-mean-token-mean", "token-mean"])
def test_gradient_at_ratio_one_is_advantage_weighted_logprob_gradient(sd3, aggregation):
    # a deduplicated tree: exactly on-policy, and rows train different numbers of steps
    r = _rollout(sd3, PLANS["tree"])
    assert sorted(set(r.trained.sum(1).tolist())) == [1, 2]
    adv = torch.tensor([1.5, -0.5, 0.25, -2.0, 0.75, 1.0, -1.0, 0.5])
    cfg = LossConfig(eps_low=1e-4, aggregation=aggregation)
    got, st = _learner_grad(sd3, r, adv, cfg)
    assert st["ratio_min"] == st["ratio_max"] == 1.0
    # closed form: d/dtheta of -sum_it m_it A_i log pi_it / (c_i Z), c_i = 1 unless seq-mean
    emb = PromptEmbeds.from_tensors(r.embeds).select(r.prompt_index)
    z = loss_normalizers(r.trained, aggregation)
    c = r.trained.sum(1).clamp(min=1).float() if aggregation == "seq-mean-token-mean" else torch.ones(8)
    _zero(sd3)
    for t in range(r.num_stored_steps):
        x = r.latents[:, t].float()
        v = sd3.velocity(x, r.sigmas[:, t], emb, r.guidance_scale)
        lp = sde_step(x, v, r.sigmas[:, t], r.sigma_next[:, t], r.noise_levels[:, t],
                      prev_sample=r.latents[:, t + 1].float(), kind=r.sde_kind).log_prob
        (-(r.trained[:, t].float() * adv / c * lp).sum() / z).backward()
    want = _grads(sd3)
    _zero(sd3)
    _assert_close(got, want, rtol=1e-4, atol_frac=1e-5)  # all rows per batch here: forward rounding differs


# ---------------------------------------------------------------------------------------------
# step-by-step accumulation == one graph over all steps, for every aggregation and loss variant
# ---------------------------------------------------------------------------------------------

VARIANTS = {
    "plain": dict(eps_low=1e-4),
    "k3": dict(eps_low=2e-4, beta=0.05, kl_estimator="k3", kl_ratio_weighted="importance"),
    "guard_latent_noise_aware": dict(eps_low=2e-4, ratio_norm=True, beta=0.05, kl_estimator="latent"),
}
EXTRA = {
    "velocity_dual_clip": dict(eps_low=2e-4, eps_high=3e-4, dual_clip=3.0, beta=0.2, kl_estimator="velocity"),
    "k1_delta": dict(eps_low=2e-4, delta=1.0005, beta=0.05, kl_estimator="k1"),
    "gspo": dict(eps_low=2e-4, ratio_level="sequence", beta=0.05, kl_estimator="k3"),
    "gspo_guard_latent": dict(eps_low=2e-4, ratio_level="sequence", ratio_norm=True, beta=0.05, kl_estimator="latent"),
    "cispo": dict(surrogate="cispo", eps_high=1.0001),
    "sapo": dict(surrogate="sapo"),
}


@pytest.fixture(scope="module")
def offpolicy():
    """A full-fine-tuning SD3 policy moved away from its rollout (ratios != 1), its frozen reference,
    and a rollout whose rows train different numbers of steps."""
    policy = _sd3(seed=3)
    r = _rollout(policy, dict(kind="full"))
    r = replace(r, trained=MIXED_MASK.clone())
    ref = reference_transformer(policy.transformer, LossConfig(beta=0.1))  # frozen copy of the sampling weights
    ref_policy = _sd3(seed=3)  # the same weights again, for the independent one-graph reference
    _perturb(policy, 0.02)
    return policy, r, ref, ref_policy


def _check_equivalence(offpolicy, cfg_kwargs, aggregation, per_step_adv=False, noise_aware=False, zero_adv=False):
    policy, r, ref, ref_policy = offpolicy
    cfg = LossConfig(aggregation=aggregation, **cfg_kwargs)
    g = torch.Generator().manual_seed(5)
    adv = torch.randn((r.num_samples, r.num_stored_steps) if per_step_adv else (r.num_samples,), generator=g)
    if zero_adv:
        adv = torch.zeros_like(adv)
    weights = None
    if noise_aware:
        weights = torch.zeros(r.trained.shape)
        weights[r.trained] = noise_aware_weights(r.stds[r.trained])
    want, st_ref = _one_graph_grad(policy, r, adv, cfg, ref_policy=ref_policy if cfg.beta > 0 else None,
                                   step_weights=weights)
    got, st = _learner_grad(policy, r, adv, cfg, ref_transformer=ref if cfg.beta > 0 else None,
                            step_weighting="noise_aware" if noise_aware else "none")
    _assert_close(got, want)
    for k in ("loss", "policy_loss", "kl_loss", "ratio_min", "ratio_max", "ratio_mean", "clip_frac", "kl"):
        assert st[k] == pytest.approx(float(st_ref[k]), rel=1e-4, abs=1e-7), k
    assert st["ratio_std"] == pytest.approx(float(st_ref["ratio_std"]), rel=1e-3, abs=1e-9)
    return st


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_step_by_step_equals_one_graph(offpolicy, aggregation, variant):
    special = variant == "guard_latent_noise_aware"
    st = _check_equivalence(offpolicy, VARIANTS[variant], aggregation, per_step_adv=special, noise_aware=special)
    assert st["ratio_min"] < 1.0 < st["ratio_max"]  # genuinely off-policy
    if variant == "plain":
        assert 0.0 < st["clip_frac"] < 1.0  # both branches of the clipped surrogate are exercised
    if VARIANTS[variant].get("kl_estimator") == "latent":
        assert st["kl_loss"] > 0.0


@pytest.mark.parametrize("aggregation", ["seq-mean-token-mean", "token-mean"])
@pytest.mark.parametrize("variant", list(EXTRA))
def test_step_by_step_equals_one_graph_other_losses(offpolicy, aggregation, variant):
    _check_equivalence(offpolicy, EXTRA[variant], aggregation)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "latent", "velocity"])
def test_kl_gradient_alone_equals_one_graph(offpolicy, estimator):
    """Zero advantages: the whole gradient is the KL's (the policy term would otherwise dwarf it)."""
    st = _check_equivalence(offpolicy, dict(beta=0.5, kl_estimator=estimator), "seq-mean-token-mean", zero_adv=True)
    assert st["policy_loss"] == 0.0


def test_tree_rollout_with_per_step_advantages_matches_one_graph(flux):
    """Tree/granular advantages arrive as [N, T]; tree dedup gives rows different step counts."""
    r = _rollout(flux, dict(kind="tree", tree=dict(branch_factors=[2, 2], branch_steps=[0, 2])), guidance=3.5)
    assert len(set(r.trained.sum(1).tolist())) > 1  # rows train different numbers of steps
    adv = torch.randn(r.num_samples, r.num_stored_steps, generator=torch.Generator().manual_seed(2))
    policy = copy.deepcopy(flux)
    _perturb(policy, 0.05)
    for aggregation in ("seq-mean-token-mean", "token-mean"):
        cfg = LossConfig(eps_low=1e-3, aggregation=aggregation)
        want, _ = _one_graph_grad(policy, r, adv, cfg)
        got, st = _learner_grad(policy, r, adv, cfg)
        _assert_close(got, want)
        assert st["ratio_min"] != 1.0 or st["ratio_max"] != 1.0


# ---------------------------------------------------------------------------------------------
# on_policy=True: ratio exactly 1 whatever the batching; log-prob reduction "sum" with GRPO-Guard
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_on_policy_flag_gives_ratio_one_for_any_batching(sd3, ratio_level):
    r = replace(_rollout(sd3, dict(kind="full")), trained=MIXED_MASK.clone())  # trained subsets: other batches
    adv = torch.linspace(-1, 1, r.num_samples)
    cfg = LossConfig(eps_low=1e-5, ratio_norm=True, ratio_level=ratio_level)
    plain, st_plain = _learner_grad(sd3, r, adv, cfg, chunk_size=3)
    got, st = _learner_grad(sd3, replace(r, means=None), adv, cfg, chunk_size=3, on_policy=True)
    assert st["ratio_min"] == st["ratio_max"] == 1.0 and st["clip_frac"] == 0.0
    assert 0.0 <= st["stored_ratio_dev_max"] < 1e-5  # the stored old log-probs agree up to float rounding
    _assert_close(got, plain, rtol=1e-3, atol_frac=1e-4)


def test_ratio_norm_with_sum_reduction_equals_mean_reduction(flux):
    """GRPO-Guard removes the log-prob scale: "sum" (D x "mean") must give the same normalised ratios."""
    policy = copy.deepcopy(flux)
    stats = {}
    for reduction in ("mean", "sum"):
        r = _rollout(flux, dict(kind="full", reduction=reduction), guidance=3.5)
        if reduction == "sum":
            assert torch.equal(r.latents, stats["mean"][0].latents)  # same samples, only the log-probs differ
            assert torch.allclose(r.log_probs, stats["mean"][0].log_probs * r.latents[0, 0].numel(), rtol=1e-5)
        stats[reduction] = (r, None)
    _perturb(policy, 0.05)
    cfg = LossConfig(eps_low=1e-3, ratio_norm=True)
    adv = torch.linspace(-1, 1, 8)
    out = {k: _learner_grad(policy, v[0], adv, cfg)[1] for k, v in stats.items()}
    raw = _learner_grad(policy, stats["sum"][0], adv, LossConfig(eps_low=1e-3))[1]
    for k in ("ratio_min", "ratio_max", "ratio_mean"):
        assert out["sum"][k] == pytest.approx(out["mean"][k], rel=1e-5), k
    assert raw["ratio_max"] - 1 > 10 * (out["sum"]["ratio_max"] - 1)  # unnormalised "sum" ratios are far wider


# ---------------------------------------------------------------------------------------------
# chunking and shared-state evaluation do not change the gradient
# ---------------------------------------------------------------------------------------------


def test_chunking_and_dedup_do_not_change_the_gradient(offpolicy):
    policy, r, ref, _ = offpolicy
    cfg = LossConfig(eps_low=2e-4, beta=0.05, kl_estimator="k3", aggregation="seq-mean-token-mean")
    adv = torch.linspace(-1, 1, r.num_samples)
    base, st0 = _learner_grad(policy, r, adv, cfg, ref_transformer=ref)
    calls: list[int] = []
    for chunk in (1, 3):
        learner = FlowLearner(policy, cfg, chunk_size=chunk, ref_transformer=ref)
        _zero(policy)
        calls.clear()

        def backward(loss, last=False):  # the loop's DDP-aware form: only the final call synchronises
            calls.append(last)
            loss.backward()

        st = learner.minibatch_gradient(r, adv, normalizer=loss_normalizers(r.trained, cfg.aggregation),
                                        backward=backward)
        got = _grads(policy)
        _assert_close(got, base, rtol=1e-4, atol_frac=1e-5)  # other batches: forward rounding differs (~1e-7)
        per_step = r.trained.sum(0)
        assert len(calls) == st["num_backward"] == int(sum((c + chunk - 1) // chunk for c in per_step.tolist()))
        assert calls == [False] * (len(calls) - 1) + [True]
        assert st["ratio_min"] == pytest.approx(st0["ratio_min"], rel=1e-6)
        assert st["loss"] == pytest.approx(st0["loss"], abs=1e-7)  # sum of A (w - 1) terms, w - 1 ~ 1e-4


def test_sampler_chunking_reproduced_exactly(flux):
    """With the sampler's chunk_size the learner runs the transformer on the sampler's batches
    (chunks count distinct states, runs of siblings are never cut): ratios exactly 1."""
    plan = build_plan(plan_config(kind="tree", tree=dict(branch_factors=[3, 2], branch_steps=[0, 2])), 4, 0)
    r = sample(flux, PROMPTS, plan, group_size=6, height=H, width=W, guidance_scale=3.5,
               generator=torch.Generator().manual_seed(0), chunk_size=4)
    seen: list[int] = []
    hook = flux.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append(int(kw["hidden_states"].shape[0])), with_kwargs=True)
    try:
        _, st = _learner_grad(flux, r, torch.linspace(-1, 1, r.num_samples), LossConfig(eps_low=1e-6), chunk_size=4)
    finally:
        hook.remove()
    assert st["ratio_min"] == st["ratio_max"] == 1.0
    # step 0: 2 roots (one call); step 2: 6 parents in calls of at most 4 states, as the sampler did
    assert seen == [2, 4, 2], seen


def test_shared_states_are_evaluated_once_with_the_same_gradient(flux):
    r = _rollout(flux, dict(kind="singular", singular=dict(steps=[1])), same_noise=True, guidance=3.5)
    policy = copy.deepcopy(flux)
    _perturb(policy, 0.05)
    cfg = LossConfig(eps_low=1e-3)
    adv = torch.linspace(-1, 1, r.num_samples)
    a, st_a = _learner_grad(policy, r, adv, cfg)
    b, st_b = _learner_grad(policy, r, adv, cfg, dedup=False)
    _assert_close(a, b, rtol=1e-4, atol_frac=1e-5)  # other batches: forward rounding differs
    assert st_a["num_velocity_rows"] == len(PROMPTS) and st_b["num_velocity_rows"] == r.num_samples


def test_shared_state_runs():
    x = torch.tensor([[1.0, 2], [1, 2], [3, 4], [1, 2], [1, 2], [1, 2]])
    key = torch.tensor([0, 0, 0, 0, 1, 1])
    keep, inv = shared_state_runs(x, key)
    assert keep.tolist() == [True, False, True, True, True, False]
    assert inv.tolist() == [0, 0, 1, 2, 3, 3]
    assert torch.equal(x[keep][inv], x)
    assert seq_mean_row_counts(torch.tensor([[1, 0, 1], [0, 0, 0]], dtype=torch.bool)).tolist() == [2, 1]


# ---------------------------------------------------------------------------------------------
# memory: the graph of one step is freed before the next (saved-tensor bytes flat in T)
# ---------------------------------------------------------------------------------------------


class _SavedBytes:
    """Live bytes of tensors saved for backward (a box per saved tensor, counted down when the
    graph that holds it is freed); ``peak`` is the high-water mark."""

    def __init__(self):
        self.live = 0
        self.peak = 0

    def pack(self, t):
        n = t.numel() * t.element_size()
        self.live += n
        self.peak = max(self.peak, self.live)
        return _Box([t], self, n)

    @staticmethod
    def unpack(box):
        return box.payload[0]


class _Box:
    def __init__(self, payload, tracker=None, n=0):
        self.payload, self.tracker, self.n = payload, tracker, n

    def __del__(self):
        if self.tracker is not None:
            self.tracker.live -= self.n


def test_saved_activation_memory_is_flat_in_the_number_of_trained_steps(sd3):
    r = _rollout(sd3, dict(kind="full"), steps=6, group=2)
    cfg = LossConfig(eps_low=1e-4)
    adv = torch.linspace(-1, 1, r.num_samples)
    peaks = {}
    for k in (1, 5):
        mask = torch.zeros_like(r.trained)
        mask[:, :k] = True
        rk = replace(r, trained=mask)
        tracker = _SavedBytes()
        learner = FlowLearner(sd3, cfg)
        _zero(sd3)
        with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
            st = learner.minibatch_gradient(rk, adv, normalizer=loss_normalizers(mask, cfg.aggregation))
        _zero(sd3)
        assert st["num_backward"] == k
        assert tracker.live == 0  # every graph was freed
        peaks[k] = tracker.peak
    assert peaks[1] > 0
    assert peaks[5] <= 1.01 * peaks[1], peaks  # one graph at a time
    # the tracker does see growth: the same 5 steps held in one graph take about 5x
    tracker = _SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
        loss, _ = _one_graph_loss(sd3, rk, adv, cfg)
        loss.backward()
    _zero(sd3)
    assert tracker.peak > 4 * peaks[5], (tracker.peak, peaks)


# ---------------------------------------------------------------------------------------------
# KL reference: LoRA adapter disabled (no copy); full fine-tuning keeps a frozen copy only with KL
# ---------------------------------------------------------------------------------------------


def test_lora_reference_is_the_base_model_and_kl_grows_after_an_update():
    from flowrl.train.lora import add_lora_to_transformer, lora_config

    base = _sd3(seed=7)
    policy = _sd3(seed=7)
    add_lora_to_transformer(policy.transformer, lora_config("sd3", rank=4, alpha=8, init="gaussian"))
    assert has_adapters(policy.transformer) and not has_adapters(base.transformer)
    r = _rollout(policy, dict(kind="full"), group=2)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    for est in ("k3", "latent", "velocity"):
        cfg = LossConfig(eps_low=1e-4, beta=0.1, kl_estimator=est)
        assert reference_transformer(policy.transformer, cfg) is None  # no second copy of the weights
        learner = FlowLearner(policy, cfg)
        # the reference forward is the base model's forward, bit for bit
        emb = PromptEmbeds.from_tensors(r.embeds).select(r.prompt_index)
        x, sig = r.latents[:, 0].float(), r.sigmas[:, 0]
        with torch.no_grad(), learner._reference():
            v_ref = policy.velocity(x, sig, emb, r.guidance_scale)
        with torch.no_grad():  # exact: the same layers, bit-identical weights, the same inputs and shapes
            assert torch.equal(v_ref, base.velocity(x, sig, emb, r.guidance_scale))
        # a fresh LoRA (B = 0) is the base model: KL exactly 0 and the KL adds no gradient
        g_kl, st = _learner_grad(policy, r, adv, cfg)
        g_no, _ = _learner_grad(policy, r, adv, replace(cfg, beta=0.0))
        assert st["kl"] == 0.0 and st["kl_loss"] == 0.0
        _assert_close(g_kl, g_no, rtol=1e-6, atol_frac=1e-7)
    # one SGD step on the LoRA weights: the policy leaves the base model, KL > 0
    g_no, _ = _learner_grad(policy, r, adv, LossConfig(eps_low=1e-4))
    with torch.no_grad():
        for p, g in zip(_params(policy), g_no):
            p.sub_(50.0 * g)
    for est in ("k3", "latent", "velocity"):
        _, st = _learner_grad(policy, r, adv, LossConfig(eps_low=1e-4, beta=0.1, kl_estimator=est))
        assert st["kl"] > 0.0 and st["kl_loss"] > 0.0, est


def test_full_finetuning_keeps_a_frozen_reference_only_with_kl():
    policy = _sd3(seed=8)
    assert reference_transformer(policy.transformer, LossConfig(beta=0.0)) is None
    with pytest.raises(ValueError, match="ref_transformer"):
        FlowLearner(policy, LossConfig(beta=0.05))  # KL on, no adapter, no reference
    cfg = LossConfig(eps_low=1e-4, beta=0.05, kl_estimator="k3")
    ref = reference_transformer(policy.transformer, cfg)
    assert ref is not None and ref is not policy.transformer
    assert not any(p.requires_grad for p in ref.parameters()) and all(p.requires_grad for p in _params(policy))
    r = _rollout(policy, dict(kind="full"), group=2)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    g, st = _learner_grad(policy, r, adv, cfg, ref_transformer=ref)
    assert st["kl"] == 0.0  # the copy is the policy, exactly
    assert policy.transformer is not ref  # the swap was undone
    assert all(p.grad is None for p in ref.parameters())
    # with beta = 0 the reference forward is skipped entirely
    calls = []
    hook = ref.register_forward_pre_hook(lambda *a: calls.append(1))
    _learner_grad(policy, r, adv, cfg, ref_transformer=ref, beta=0.0)
    assert calls == []
    _learner_grad(policy, r, adv, cfg, ref_transformer=ref)
    assert len(calls) == int(r.trained.any(0).sum())  # one reference forward per trained step
    hook.remove()


# ---------------------------------------------------------------------------------------------
# two inner epochs on one rollout: on-policy, then off-policy with the clip active
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["sd3", "flux"])
def test_two_inner_epochs(model):
    policy = _sd3(seed=4) if model == "sd3" else _flux(seed=4)
    r = _rollout(policy, dict(kind="full"), guidance=4.5 if model == "sd3" else 3.5)
    adv = torch.linspace(-1.5, 1.5, r.num_samples)
    cfg = LossConfig(eps_low=1e-6)  # a tiny clip range (GRPO-Guard uses 2e-6)
    learner = FlowLearner(policy, cfg)
    opt = torch.optim.AdamW(_params(policy), lr=1e-3)
    norm = loss_normalizers(r.trained, cfg.aggregation)
    opt.zero_grad()
    first = learner.minibatch_gradient(r, adv, normalizer=norm)
    assert first["ratio_min"] == first["ratio_max"] == 1.0 and first["clip_frac"] == 0.0
    opt.step()
    opt.zero_grad()
    second = learner.minibatch_gradient(r, adv, normalizer=norm)
    assert second["ratio_min"] != 1.0 or second["ratio_max"] != 1.0
    assert second["ratio_std"] > 0 and second["clip_frac"] > 0.0
    assert second["approx_kl"] > 0.0


# ---------------------------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------------------------


def test_bad_arguments_name_the_argument(sd3):
    r = _rollout(sd3, dict(kind="full"), group=2)
    cfg = LossConfig()
    learner = FlowLearner(sd3, cfg)
    norm = loss_normalizers(r.trained, cfg.aggregation)
    with pytest.raises(ValueError, match="advantages"):
        learner.minibatch_gradient(r, torch.zeros(3), normalizer=norm)
    with pytest.raises(ValueError, match="advantages"):
        learner.minibatch_gradient(r, torch.full((r.num_samples,), float("nan")), normalizer=norm)
    with pytest.raises(ValueError, match="step_weights"):
        learner.minibatch_gradient(r, torch.zeros(r.num_samples), normalizer=norm, step_weights=torch.ones(2, 2))
    with pytest.raises(ValueError, match="beta"):
        learner.minibatch_gradient(r, torch.zeros(r.num_samples), normalizer=norm, beta=-1.0)
    with pytest.raises(ValueError, match="ratio_norm"):
        FlowLearner(sd3, LossConfig(ratio_norm=True)).minibatch_gradient(
            replace(r, means=None), torch.zeros(r.num_samples), normalizer=norm)
    with pytest.raises(ValueError, match="step_weighting"):
        FlowLearner(sd3, cfg, step_weighting="tempflow")
    with pytest.raises(ValueError, match="chunk_size"):
        FlowLearner(sd3, cfg, chunk_size=0)
    with pytest.raises(ValueError, match="rollout"):
        bad = r.trained.clone()
        learner.minibatch_gradient(replace(r, trained=bad, stochastic=torch.zeros_like(bad)),
                                   torch.zeros(r.num_samples), normalizer=norm)
