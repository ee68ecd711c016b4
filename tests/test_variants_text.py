"""Advantage and loss variants of issue 20 (part A): DCPO, GTPO, D3S, RiskPO.

Each formula against a small case computed by hand (float64), the pieces the text learner adds
(token entropies, token weights), the config errors, and each preset of ``configs/methods_text``
training two steps of the tiny text model.
"""
import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from flowrl.config import ConfigError, load_run_config
from flowrl.core.advantages import (
    AdvantageConfig, SmoothStatTracker, compute_advantages, dcpo_merge_stats, dcpo_smooth_advantages,
    max_variance_subset, variance_downsample,
)
from flowrl.core.losses import (
    LossConfig, dcpo_clip_bounds, gtpo_conflict_weights, gtpo_entropy_advantages, linear_ramp, loss_normalizers,
    loss_preset, mean_token_entropy, policy_loss, top_fraction_mask,
)
from flowrl.demo.tiny_text import build_tiny_lm, save_tiny_lm
from flowrl.text.learner import TextLearner
from flowrl.text.rollout import token_logps

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64
TOL = dict(rtol=1e-12, atol=1e-12)  # float64 arithmetic on a handful of operations: far below 1e-12


# ----------------------------------------------------------------------------------------------- DCPO


def test_dcpo_bounds_by_hand():
    q = torch.tensor([1.0, 0.5, 0.01, 0.001], dtype=F64)
    lo, hi = dcpo_clip_bounds(q.log(), eps_low=0.1, eps_high=0.28, cap=10.0)
    # lo = 1/2 + 1/2 sqrt(max(1 - 0.4/q, 0)); hi = 1/2 + 1/2 sqrt(1 + 1.12/q), capped at 10
    exp_lo = [0.5 + 0.5 * math.sqrt(0.6), 0.5 + 0.5 * math.sqrt(0.2), 0.5, 0.5]
    exp_hi = [0.5 + 0.5 * math.sqrt(2.12), 0.5 + 0.5 * 1.8, 0.5 + 0.5 * math.sqrt(113.0), 10.0]
    torch.testing.assert_close(lo, torch.tensor(exp_lo, dtype=F64), **TOL)
    torch.testing.assert_close(hi, torch.tensor(exp_hi, dtype=F64), **TOL)


def test_dcpo_loss_clips_at_the_token_bounds_by_hand():
    # q = 1/2 for both tokens, eps 0.1 / 0.28: bounds [0.7236.., 1.4]; A = +1
    old = torch.full((1, 2), math.log(0.5), dtype=F64)
    logps = (old + torch.tensor([[math.log(1.5), math.log(0.6)]], dtype=F64)).requires_grad_(True)
    cfg = LossConfig(clip_bounds="dcpo", eps_low=0.1, eps_high=0.28, aggregation="seq-mean-token-mean")
    loss, st = policy_loss(logps, old, torch.ones(1, dtype=F64), torch.ones(1, 2, dtype=torch.bool), cfg, normalizer=1.0)
    # token 1: w = 1.5 > 1.4 -> -1.4 (no gradient); token 2: w = 0.6, A > 0 -> -0.6 (unclipped); mean over 2
    assert float(loss.detach()) == pytest.approx(-1.0, abs=1e-12)
    (g,) = torch.autograd.grad(loss, logps)
    torch.testing.assert_close(g, torch.tensor([[0.0, -0.3]], dtype=F64), **TOL)  # d(-w/2)/dlogp = -w/2
    assert float(st["clip_frac_high"]) == 0.5 and float(st["clip_frac_low"]) == 0.0
    # A < 0 with a huge ratio: the dual clip caps the loss at -c A = 10 (fixed bounds would give w = 20)
    big = (old + math.log(20.0)).requires_grad_(True)
    cfg_neg = LossConfig(clip_bounds="dcpo", eps_low=0.1, eps_high=0.28, dual_clip=10.0, aggregation="token-mean")
    loss, _ = policy_loss(big, old, -torch.ones(1, dtype=F64), torch.ones(1, 2, dtype=torch.bool), cfg_neg, normalizer=2.0)
    assert float(loss.detach()) == pytest.approx(10.0, abs=1e-12)


def test_dcpo_smooth_standardisation_by_hand():
    cfg = AdvantageConfig(smooth_tracking=True)
    tracker = SmoothStatTracker()
    groups, keys = torch.zeros(4, dtype=torch.long), [7] * 4
    # step 1: the plain z-score with the Bessel std sqrt(1/3)
    a1, _ = compute_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=F64), groups, cfg, tracker, keys)
    z = 0.5 / math.sqrt(1 / 3)
    torch.testing.assert_close(a1, torch.tensor([z, -z, -z, z], dtype=F64), **TOL)
    assert tracker.get(7) == (0.5, pytest.approx(math.sqrt(1 / 3), abs=1e-15), 1)
    # step 2: all rewards 1 (z_new = 0); cumulative mean 0.75, var (1/3 + 0 + 1/2 * 0.25) / 2; n = 2
    a2, _ = compute_advantages(torch.ones(4, dtype=F64), groups, cfg, tracker, keys)
    sd = math.sqrt((1 / 3 + 0.125) / 2)
    torch.testing.assert_close(a2, torch.full((4,), 0.25 / sd / 2, dtype=F64), **TOL)  # min(|z_cum/2|, |z_cum/2|)
    mean, std, times = tracker.get(7)
    assert (mean, times) == (0.75, 2) and std == pytest.approx(sd, abs=1e-15)
    # the state survives a checkpoint exactly
    again = SmoothStatTracker()
    again.load_state_dict(json.loads(json.dumps(tracker.state_dict())))
    assert again.get(7) == tracker.get(7)


def test_dcpo_smooth_mixes_pick_the_smaller_one():
    # n = 3, z_new = 1, z_cum = -3: SA_new = -1 + 2/3 = -1/3, SA_cum = 1/3 - 2 = -5/3 -> -1/3
    a = dcpo_smooth_advantages(torch.tensor([1.0], dtype=F64), 0.0, 1.0, 4.0, 1.0, 3)
    torch.testing.assert_close(a, torch.tensor([-1.0 / 3.0], dtype=F64), **TOL)
    # merging: 2 steps (mean 1, std 1) then one (mean 4, std 2): mean 2, var (2 + 4 + 2/3 * 9) / 3 = 4
    assert dcpo_merge_stats(1.0, 1.0, 2, 4.0, 2.0) == pytest.approx((2.0, 2.0), abs=1e-15)


def test_dcpo_needs_its_tracker_and_group_statistics():
    with pytest.raises(ValueError, match="SmoothStatTracker"):
        compute_advantages(torch.ones(4), torch.zeros(4, dtype=torch.long), AdvantageConfig(smooth_tracking=True))
    with pytest.raises(ValueError, match="smooth_tracking"):
        AdvantageConfig(smooth_tracking=True, scale="none").validate()
    with pytest.raises(ValueError, match="clip_bounds"):
        LossConfig(clip_bounds="dcpo", ratio_level="sequence").validate()


# ----------------------------------------------------------------------------------------------- GTPO

PAD = 0


def _group():
    """Three completions of one prompt (token ids, right-padded with 0; EOS = 1)."""
    ids = torch.tensor([[5, 6, 7, 9, 1],     # A > 0
                        [5, 8, 9, 1, PAD],   # A < 0
                        [5, 6, 7, 9, 1]])    # A = 0
    return ids, ids != PAD, torch.tensor([1.0, -1.0, 0.0], dtype=F64)


def test_gtpo_conflict_weights_by_hand():
    ids, mask, adv = _group()
    delta, n = gtpo_conflict_weights(ids, mask, adv, torch.zeros(3, dtype=torch.long), weight=2.0)
    # prefix: token 5 at position 0 is in both signs (then 6 vs 8 ends the run); suffix, aligned from
    # each completion's end: EOS then 9 are shared, 7 vs 8 ends it. A > 0 row: x2 there; A < 0 row: 0.
    assert delta.tolist() == [[2, 1, 1, 2, 2], [0, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert n.tolist() == [2, 2, 0]  # max(prefix run 1, suffix run 2); rows with A = 0: none
    # a token in both runs gets the weight twice (upstream multiplies the two directions)
    d2, n2 = gtpo_conflict_weights(torch.tensor([[5, 1], [5, 1]]), torch.ones(2, 2, dtype=torch.bool),
                                   torch.tensor([0.5, -0.5]), torch.zeros(2, dtype=torch.long))
    assert d2.tolist() == [[4, 4], [0, 0]] and n2.tolist() == [2, 2]
    # groups are separate: the same tokens in another group's A < 0 row are no conflict
    d3, n3 = gtpo_conflict_weights(ids[:2], mask[:2], adv[:2], torch.tensor([0, 1]))
    assert d3.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]] and n3.tolist() == [1, 1]


def test_gtpo_entropy_filter_and_penalty_by_hand():
    adv = torch.tensor([1.0, -1.0, 0.0], dtype=F64)
    out = gtpo_entropy_advantages(adv, torch.tensor([0.5, 0.8, 0.2], dtype=F64), 0.7, 0.1)
    torch.testing.assert_close(out, torch.tensor([0.95, 0.0, -0.02], dtype=F64), **TOL)
    ent = torch.tensor([[1.0, 3.0, 9.0]], dtype=F64)
    assert mean_token_entropy(ent, torch.tensor([[True, True, False]])).tolist() == [2.0]


def test_gtpo_token_weights_enter_the_loss():
    """The learner's weights are delta / n_conflict on the policy term: the gradient of each token is
    -A delta / (|o| n) at ratio 1 (upstream's exp(logp - sg(logp)) loss)."""
    ids, mask, adv = _group()
    delta, n = gtpo_conflict_weights(ids, mask, adv, torch.zeros(3, dtype=torch.long))
    w = delta / n.clamp(min=1).unsqueeze(1)
    logps = torch.full((3, 5), -1.0, dtype=F64, requires_grad=True)
    loss, _ = policy_loss(logps, logps.detach(), adv, mask, LossConfig(aggregation="seq-mean-token-mean"),
                          normalizer=1.0, step_weights=w)
    (g,) = torch.autograd.grad(loss, logps)
    expect = -adv.unsqueeze(1) * w / mask.sum(1, keepdim=True)
    torch.testing.assert_close(g, torch.where(mask, expect, torch.zeros_like(expect)), **TOL)


# ------------------------------------------------------------------------------------------------ D3S


def test_max_variance_subset_by_hand_and_by_brute_force():
    v = torch.tensor([2.0, 10.0, 0.0, 1.0], dtype=F64)
    assert max_variance_subset(v, 2).tolist() == [False, True, True, False]  # {0, 10}
    assert max_variance_subset(v, 3).tolist() == [False, True, True, True]  # {0, 1, 10}: 60.67 > 56 > 48.67
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        n = int(torch.randint(1, 8, (), generator=gen))
        x = torch.randn(n, dtype=F64, generator=gen)
        for k in range(n + 1):
            ss = lambda idx: float(((x[list(idx)] - x[list(idx)].mean()) ** 2).sum()) if idx else 0.0  # noqa: E731
            best = max(ss(c) for c in itertools.combinations(range(n), k))
            got = max_variance_subset(x, k)
            assert int(got.sum()) == k and ss(got.nonzero().flatten().tolist()) == pytest.approx(best, abs=1e-12)


def test_variance_downsample_by_scope_and_schedule():
    adv = torch.tensor([0.1, -0.1, 2.0, -2.0, 0.5, -0.5, 0.0, 0.0], dtype=F64)
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    eligible = torch.ones(8, dtype=torch.bool)
    # batch: 4 of 8 -> the two largest and two smallest
    assert variance_downsample(adv, groups, eligible, 0.5, "batch").nonzero().flatten().tolist() == [2, 3, 4, 5]
    # group: 2 of each 4
    assert variance_downsample(adv, groups, eligible, 0.5, "group").nonzero().flatten().tolist() == [2, 3, 4, 5]
    # group 0 alone keeps its extremes; rows not eligible are never kept
    eligible[2] = False
    assert variance_downsample(adv, groups, eligible, 0.5, "group").nonzero().flatten().tolist() == [0, 3, 4, 5]
    # through compute_advantages, with the linear schedule 0.5 -> 1 over 2 steps
    cfg = AdvantageConfig(scale="none", sample_keep=0.5, sample_keep_end=1.0, sample_keep_steps=2)
    r = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=F64)
    for step, kept in ((0, [0, 3]), (1, [0, 1, 3]), (2, [0, 1, 2, 3]), (9, [0, 1, 2, 3])):  # 1: a tie, fewer large
        a, st = compute_advantages(r, torch.zeros(4, dtype=torch.long), cfg, step=step)
        assert st["keep"].nonzero().flatten().tolist() == kept and st["downsampled_count"] == 4 - len(kept)
        assert a[~st["keep"]].abs().sum() == 0  # dropped: advantage 0
    assert linear_ramp(1, 0.5, 1.0, 2) == 0.75 and linear_ramp(5, 0.5, None, 0) == 0.5


def test_top_fraction_mask_by_hand():
    scores = torch.tensor([[3.0, 1.0, 2.0], [0.5, 4.0, 9.0]], dtype=F64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    # 5 tokens, 0.4 -> floor(2.5) = 2: the scores 4 and 3 (9 is masked)
    assert top_fraction_mask(scores, mask, 0.4).tolist() == [[True, False, False], [False, True, False]]
    # per group (one row each): row 0 keeps floor(1.7) = 1, row 1 floor(1.3) = 1
    assert top_fraction_mask(scores, mask, 0.4, torch.tensor([0, 1])).tolist() == \
        [[True, False, False], [False, True, False]]
    assert top_fraction_mask(scores, mask, 1.0).tolist() == mask.tolist()


# --------------------------------------------------------------------------------------------- RiskPO


def test_riskpo_mixed_var_by_hand():
    # one bundle of two prompts x 3 completions; papers = (r_0k, r_1k): S = [1, 0, 2]
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0], dtype=F64)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    cfg = AdvantageConfig(risk="mvar", risk_alpha=0.2, risk_beta=0.9, risk_mix=1.5, risk_bundle=5, eps=0.0,
                          risk_credit="uniform")
    a, _ = compute_advantages(r, groups, cfg)
    # quantiles (linear): q_0.2 = 0.4, q_0.9 = 1.8. RVaR = (clamp(S, .4, 1.8) - 1.8) / 0.7 = [-8/7, -2, 0];
    # CVaR = -(0.4 - S)^+ / 0.2 = [0, -2, 0]; A = (1.5 CVaR + RVaR) / 2.5; std(S) = 1
    paper = torch.tensor([-8 / 7 / 2.5, (-3.0 - 2.0) / 2.5, 0.0], dtype=F64)
    torch.testing.assert_close(a, paper.repeat(2), **TOL)
    # credit 'std': each prompt's rewards have std sqrt(1/3)
    a_std, _ = compute_advantages(r, groups, AdvantageConfig(**{**cfg.__dict__, "risk_credit": "std"}))
    torch.testing.assert_close(a_std, paper.repeat(2) * math.sqrt(3.0), **TOL)
    assert bool((a <= 0).all())
    # bundles of one prompt: each prompt's papers are its own completions
    a_one, _ = compute_advantages(r, groups, AdvantageConfig(**{**cfg.__dict__, "risk_bundle": 1}))
    # prompt 0: S = [1, 0, 1], q_0.2 = 0.4, q_0.9 = 1 -> RVaR [0, -0.6/0.7, 0], CVaR [0, -2, 0], std(S) = sqrt(1/3)
    p0 = torch.tensor([0.0, (-3.0 - 0.6 / 0.7) / 2.5, 0.0], dtype=F64) * math.sqrt(3.0)
    torch.testing.assert_close(a_one[:3], p0, **TOL)


def test_riskpo_invalid_rewards_leave_their_paper():
    r = torch.tensor([1.0, float("nan"), 0.5, 0.0, 0.0, 1.0], dtype=F64)
    cfg = AdvantageConfig(risk="mvar", risk_credit="uniform", eps=0.0)
    a, st = compute_advantages(r, torch.tensor([0, 0, 0, 1, 1, 1]), cfg)
    # prompt 0 has 2 valid completions: papers (r0, r3) and (r2, r4) score 1 and 0.5; row 5 is in no paper
    assert a[1] == 0 and a[5] == 0 and not st["keep"][1] and st["keep"][5]
    assert a[0] == a[3] == 0 and a[2] == a[4] < 0
    # equal paper scores with eps 0: advantage 0, not 0/0
    a_eq, _ = compute_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=F64), torch.tensor([0, 0, 1, 1]), cfg)
    assert a_eq.tolist() == [0.0] * 4


# ------------------------------------------------------------------------------------- the text learner


def test_token_entropy_comes_from_the_same_logits():
    model, tok = build_tiny_lm(seed=0)
    learner = TextLearner(model, tok, loss_preset("grpo"), max_new_tokens=4)
    ro = learner.rollout(["1+2=", "30+4="], group_size=2, seed=0)
    args = (model, ro.input_ids(), ro.attention_mask(), ro.completion_ids.shape[1])
    with torch.no_grad():
        lp, ent = token_logps(*args, temperature=0.7, with_entropy=True)
        lp_only = token_logps(*args, temperature=0.7)
        logits = model(input_ids=ro.input_ids(), attention_mask=ro.attention_mask(),
                       position_ids=(ro.attention_mask().cumsum(-1) - 1).clamp(min=0)).logits
    assert torch.equal(lp, lp_only)
    p = torch.softmax(logits[:, -ro.completion_ids.shape[1] - 1:-1].double() / 0.7, -1)
    torch.testing.assert_close(ent.double(), -(p * p.log()).sum(-1), rtol=1e-5, atol=1e-5)  # float32 logits


def test_learner_token_weights_gtpo_and_d3s():
    model, tok = build_tiny_lm(seed=0)
    ro = TextLearner(model, tok, loss_preset("grpo"), max_new_tokens=5).rollout(["1+2=", "7+8="], group_size=3, seed=0)
    adv = torch.tensor([1.0, -1.0, 0.5, 0.0, 2.0, -2.0])
    gtpo = TextLearner(model, tok, LossConfig(conflict_weight=2.0), max_new_tokens=5)
    w = gtpo.token_weights(ro, adv)
    delta, n = gtpo_conflict_weights(ro.completion_ids, ro.completion_mask.bool(), adv, ro.prompt_index)
    torch.testing.assert_close(w, delta / n.clamp(min=1).unsqueeze(1).double(), **TOL)
    d3s = TextLearner(model, tok, LossConfig(token_keep=0.5, token_keep_end=1.0, token_keep_steps=4), max_new_tokens=5)
    keep = d3s.token_weights(ro, adv)
    n_tok = int(ro.completion_mask.sum())
    assert int(keep.sum()) == math.floor(0.5 * n_tok + 0.5) and bool((keep[~ro.completion_mask.bool()] == 0).all())
    assert not bool(keep[3].any())  # A = 0: |A| x H = 0, never above the others
    ro.step = 4  # the end of the ramp: every token
    assert d3s.token_weights(ro, adv) is None
    # the weights reach the gradient: with every other token dropped the gradient changes
    model.zero_grad()
    ro.step = 0
    d3s.minibatch_gradient(ro, adv, normalizer=loss_normalizers(ro.completion_mask, "seq-mean-token-mean"))
    g_d3s = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad()
    TextLearner(model, tok, LossConfig(), max_new_tokens=5).minibatch_gradient(
        ro, adv, normalizer=loss_normalizers(ro.completion_mask, "seq-mean-token-mean"))
    assert not torch.allclose(g_d3s, torch.cat([p.grad.flatten() for p in model.parameters()]))


# ------------------------------------------------------------------------------------ configs, presets


def test_token_variants_are_refused_on_the_image_path():
    for key in ("loss.conflict_weight=2.0", "loss.clip_bounds=dcpo", "loss.token_keep=0.5", "loss.entropy_max=0.7"):
        with pytest.raises(ConfigError, match=key.split("=")[0].replace(".", r"\.") + ".*text path"):
            load_run_config(ROOT / "configs" / "demo_base.yaml", [key])
    with pytest.raises(ConfigError, match=r"advantage\.risk.*flat groups"):
        load_run_config(ROOT / "configs" / "methods" / "dynamic_treerpo.yaml", ["advantage.risk=mvar"])
    load_run_config(ROOT / "configs" / "demo_base.yaml", ["advantage.risk=mvar"])  # images: advantages are fine


PRESETS = ["dcpo", "gtpo", "d3s", "riskpo"]


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory):
    return save_tiny_lm(tmp_path_factory.mktemp("lm") / "lm", seed=0)


@pytest.fixture(autouse=True)
def _digits_reward():
    from flowrl.text.rewards import register_reward

    @register_reward("test_variants_digits")
    def digits(prompts, completions, **_):  # reward spread on a random model's completions
        return [sum(c.isdigit() for c in s) / max(1, len(s)) for s in completions]


def _tiny(name, lm_dir, out, *extra):
    """Preset ``name`` on the tiny random LM: 6 prompts x 4 completions, 4 tokens, CPU, no tracker."""
    return load_run_config(ROOT / "configs" / "methods_text" / f"{name}.yaml", [
        f"model.path={lm_dir}", f"output_dir={out}", "resume=none", "max_steps=2", "train.tracker=none",
        "train.progress=false", "eval.num_prompts=1", "eval.at_start=false", "checkpoint_every=2", "eval_every=2",
        "sample.prompts_per_step=6", "sample.group_size=4", "text.max_new_tokens=4", "text.chunk_size=5",
        "rewards={test_variants_digits: 1.0}", "data.max_train_prompts=64",
        # a random model's completions have mean token entropy ~ln(vocab) > 0.7: GTPO's filter would zero every A
        *(["loss.entropy_max=100.0"] if name == "gtpo" else []), *extra,
    ])


@pytest.mark.parametrize("name", PRESETS)
def test_preset_trains_two_steps_on_the_tiny_model(name, tiny_lm_dir, tmp_path):
    from flowrl.train.loop import Trainer

    out = tmp_path / "run"
    tr = Trainer(_tiny(name, tiny_lm_dir, out))
    before = {n: p.detach().clone() for n, p in tr.task.module.named_parameters()}
    summary = tr.run()
    assert summary["steps"] == 2
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(m["loss"]) and m["skipped_optimizer_steps"] == 0 for m in metrics)
    assert sum(not torch.equal(before[n], p.detach()) for n, p in tr.task.module.named_parameters()) > 0
    if name == "dcpo":
        assert len(tr.tracker) > 0 and all(tr.tracker.get(k)[2] >= 1 for k in tr.tracker.state_dict()["keys"])
    if name == "d3s":  # step 0 keeps floor(0.5 x 24 + 0.5) = 12 of 24 samples (the others may be invalid)
        assert metrics[0]["downsampled_samples"] + metrics[0]["invalid_samples"] >= 12


def test_dcpo_statistics_resume_exactly(tiny_lm_dir, tmp_path):
    """The prompts' cumulative statistics are checkpointed: step 2 resumed from step 1 repeats exactly."""
    from flowrl.train.checkpoint import load_checkpoint
    from flowrl.train.loop import Trainer

    out = tmp_path / "run"
    Trainer(_tiny("dcpo", tiny_lm_dir, out, "checkpoint_every=1", "data.max_train_prompts=8")).run()
    first = load_checkpoint(out / "checkpoints" / "step-00000002")
    assert any(times == 2 for _, _, times in first["meta"]["tracker"]["stats"]), "no prompt sampled twice in 2 steps"
    Trainer(_tiny("dcpo", tiny_lm_dir, out, "checkpoint_every=1", "data.max_train_prompts=8",
                  f"resume={out / 'checkpoints' / 'step-00000001'}")).run()
    again = load_checkpoint(out / "checkpoints" / "step-00000002")
    assert again["meta"]["tracker"] == first["meta"]["tracker"]
    assert all(torch.equal(first["weights"][k], again["weights"][k]) for k in first["weights"])
