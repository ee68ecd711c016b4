"""Text variants B (issue 20): Rewarding the unlikely, DisCO, KDRL, dynamic reward weighting.

Each formula against a small case computed by hand, and against a float64 transcription of the
upstream code where there is one (repository and commit in each preset's header,
configs/methods_text/); then each preset trains two steps on the tiny text model.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import List

import pytest
import torch

from flowrl.config import ConfigError, load_run_config
from flowrl.core.advantages import (
    AdvantageConfig, DynamicRewardWeights, compute_advantages, gradient_influence, reward_weight_update,
    unlikeliness_ranks, unlikeliness_rewards, unlikely_advantages,
)
from flowrl.core.losses import (
    LossConfig, disco_loss, disco_objective, kl_penalty, loss_normalizers, loss_preset, policy_loss, sequence_scores,
    squared_hinge_penalty, teacher_coefficient,
)
from flowrl.demo.tiny_text import build_tiny_lm, char_tokenizer, save_tiny_lm
from flowrl.inputs import UsageError
from flowrl.text.learner import TextLearner
from flowrl.text.rewards import integer_format, register_reward
from flowrl.text.rollout import token_logps

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ROOT / "configs" / "methods_text"
F64 = torch.float64
# float64 recomputations of the same formula in another order agree to a few ulps of the values (~1)
TOL64 = dict(atol=1e-12, rtol=1e-10)


@register_reward("test_b_digits")
def _digits(prompts, completions, **_) -> List[float]:
    """Fraction of digits in a completion: random tiny-LM completions differ in it (reward spread)."""
    return [sum(c.isdigit() for c in s) / max(1, len(s)) for s in completions]


@register_reward("test_b_short")
def _short(prompts, completions, **_) -> List[float]:
    """1 / (1 + length): a second reward that disagrees with the first now and then."""
    return [1.0 / (1.0 + len(s)) for s in completions]


@register_reward("test_b_digits_copy")
def _digits_copy(prompts, completions, **kw) -> List[float]:
    return _digits(prompts, completions, **kw)


@register_reward("test_b_constant")
def _constant(prompts, completions, **_) -> List[float]:
    return [1.0] * len(completions)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(student folder, teacher folder): the tiny LM built with seeds 0 and 1 (one tokenizer)."""
    root = tmp_path_factory.mktemp("variants_b")
    return str(save_tiny_lm(root / "lm", seed=0)), str(save_tiny_lm(root / "teacher", seed=1))


# ------------------------------------------------------------------------------------------------
# Rewarding the unlikely (He, Fried, Welleck, arXiv 2506.02355)
# ------------------------------------------------------------------------------------------------


def test_unlikeliness_reward_by_hand():
    lp = torch.tensor([-1.0, -3.0, -2.0, -0.5])  # ranks 2, 0, 1, 3 of G = 4
    r = torch.tensor([1.0, 1.0, 0.0, 1.0])
    g = torch.zeros(4, dtype=torch.long)
    assert unlikeliness_ranks(lp, g).tolist() == [0.5, 0.0, 0.25, 0.75]
    pen = unlikeliness_rewards(r, lp, g, 0.25)
    assert pen.tolist() == [0.875, 1.0, 0.0, 0.8125]  # 1 - 0.25 * rank / G, exact in binary
    adv, _ = unlikely_advantages(r, lp, g, AdvantageConfig(eps=1e-6, unlikely_penalty=0.25))
    mean = (0.875 + 1.0 + 0.0 + 0.8125) / 4
    std = math.sqrt(sum((x - mean) ** 2 for x in (0.875, 1.0, 0.0, 0.8125)) / 3)
    want = [(x - mean) / (std + 1e-6) for x in (0.875, 1.0, 0.0, 0.8125)]
    torch.testing.assert_close(adv.double(), torch.tensor(want, dtype=F64), atol=1e-6, rtol=1e-6)  # float32 output
    # the least likely correct sample now has the largest advantage
    assert int(adv.argmax()) == 1


def _upstream_unlikely(scores, old_log_probs, eos_mask, index, rank_penalty, epsilon=1e-6):
    """Float64 transcription of RayLeanTrainer._compute_advantages (rewarding-unlikely-release @ ca1cff0)."""
    old = (old_log_probs * eos_mask).sum(-1) / eos_mask.sum(-1)  # verl masked_mean over the response
    scores = scores.clone()
    modified = scores.clone()
    groups = {}
    for i in range(scores.shape[0]):
        groups.setdefault(index[i], []).append(i)
    for idx, indices in groups.items():
        gi = torch.tensor(indices)
        gs, glp = scores[gi], old[gi]
        ranks = torch.argsort(torch.argsort(glp)).to(F64) / len(indices)  # (upstream: float32 division)
        gs = gs * (1 - ranks * rank_penalty)
        modified[gi] = gs
        mean, std = (torch.tensor(0.0, dtype=F64), torch.tensor(1.0, dtype=F64)) if len(indices) == 1 else (gs.mean(), gs.std())
        for i in indices:
            scores[i] = (modified[i] - mean) / (std + epsilon)
    return scores


def test_unlikely_advantages_match_upstream_in_float64():
    gen = torch.Generator().manual_seed(3)
    n, g, t = 24, 6, 7
    logps = -torch.rand(n, t, generator=gen, dtype=F64) * 3
    mask = (torch.rand(n, t, generator=gen) < 0.8).to(F64)
    mask[:, 0] = 1
    rewards = (torch.rand(n, generator=gen) < 0.5).to(F64)
    rewards[:g] = 1.0  # one all-correct group: its penalised rewards still differ
    group = torch.arange(n) // g
    want = _upstream_unlikely(rewards, logps, mask, group.tolist(), 0.25)
    seq = (logps * mask).sum(-1) / mask.sum(-1)
    got, stats = unlikely_advantages(rewards, seq, group, AdvantageConfig(eps=1e-6, unlikely_penalty=0.25))
    torch.testing.assert_close(got, want, **TOL64)
    assert got[:g].abs().sum() > 0 and stats["filtered_count"] == 0
    # with the zero-spread filter (upstream advantage_threshold) the all-correct group is judged on its raw rewards
    filt, fst = unlikely_advantages(rewards, seq, group, AdvantageConfig(eps=1e-6, unlikely_penalty=0.25, filter_zero_std=True))
    assert filt[:g].abs().sum() == 0 and not fst["keep"][:g].any() and fst["filtered_count"] >= g
    torch.testing.assert_close(filt[g:][fst["keep"][g:]], want[g:][fst["keep"][g:]], **TOL64)


def test_unlikeliness_ties_keep_row_order_and_bad_inputs_are_refused():
    lp = torch.tensor([-1.0, -1.0, -1.0, -2.0])
    assert unlikeliness_ranks(lp, torch.zeros(4, dtype=torch.long)).tolist() == [0.25, 0.5, 0.75, 0.0]
    with pytest.raises(ValueError, match="seq_logps: must be finite"):
        unlikeliness_ranks(torch.tensor([0.0, float("nan")]), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="unlikely_penalty: needs"):
        compute_advantages(torch.ones(2), torch.zeros(2, dtype=torch.long), AdvantageConfig(unlikely_penalty=0.1))
    with pytest.raises(ValueError, match="unlikely_penalty"):
        AdvantageConfig(unlikely_penalty=1.5).validate()
    with pytest.raises(ConfigError, match="advantage.unlikely_penalty: .*causal LMs"):
        load_run_config(ROOT / "configs" / "tiny_sd3.yaml", ["advantage.unlikely_penalty=0.25"])


def test_sequence_logps_are_the_masked_mean_and_computed_when_the_rollout_skipped_them():
    model, tok = build_tiny_lm(seed=0)
    learner = TextLearner(model, tok, loss_preset("grpo"), max_new_tokens=5)
    ro = learner.rollout(["1+2=", "13+4="], group_size=3, seed=0)
    m = ro.completion_mask.bool()
    want = torch.tensor([ro.old_logps[i][m[i]].double().mean().item() for i in range(ro.num_samples)], dtype=F64)
    torch.testing.assert_close(learner.sequence_logps(ro), want, **TOL64)
    old = ro.old_logps
    ro.old_logps = None  # a rollout whose first update is on-policy may skip the pass
    torch.testing.assert_close(learner.sequence_logps(ro), want, **TOL64)
    assert torch.equal(ro.old_logps, old)  # the same chunking as the rollout: the same values


# ------------------------------------------------------------------------------------------------
# DisCO (Li et al., arXiv 2505.12366)
# ------------------------------------------------------------------------------------------------


def test_disco_objective_by_hand():
    s = torch.tensor([0.5, -0.2, 0.1, -1.0, 0.3, 0.4], dtype=F64)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 0.0, 0.0])  # group 1: no negatives -> not counted
    grp = torch.tensor([0, 0, 0, 0, 1, 1])
    j, valid = disco_objective(s, adv, grp, tau=1.0)
    want = 0.3 - math.log((math.exp(-0.2) + math.exp(-1.0)) / 2)
    assert valid.tolist() == [True, False]
    assert abs(j[0].item() - want) < 1e-14 and j[1].item() == 0.0
    jb, _ = disco_objective(s, adv, grp, tau=None)  # DisCO-b: mean of the negatives
    assert abs(jb[0].item() - (0.3 - (-0.6))) < 1e-14
    cfg = LossConfig(surrogate="disco", disco_tau=1.0, disco_delta=0.1, disco_beta=10.0)
    loss, st = disco_loss(s, torch.tensor(0.3, dtype=F64), adv, grp, cfg, num_groups=2)
    assert abs(loss.item() - (-want / 2 + 0.5 * 10.0 * 0.2 ** 2)) < 1e-14
    assert st["disco_valid_groups"].item() == 1 and st["clip_frac"].item() == 1.0
    assert squared_hinge_penalty(torch.tensor(0.05), 0.1, 10.0).item() == 0.0  # inside the budget


def _upstream_disco(old_log_prob, log_prob, eos_mask, uid, rewards, delta, beta, tau, score, kl_type):
    """Float64 transcription of compute_policy_loss_disco_logL (tau) / discob_logL (tau None) and their
    Lratio versions (DisCO @ bd2b078, verl/verl/trainer/ppo/core_algos.py), one process."""
    def masked_mean(x, m):
        return (x * m).sum() / m.sum()

    nakl = log_prob - old_log_prob
    ratio = torch.exp(nakl)
    ppo_kl = masked_mean(-nakl + ratio - 1, eos_mask) if kl_type == "low_var_kl" else masked_mean(-nakl, eos_mask)
    x = log_prob if score == "log_likelihood" else ratio
    scores = (x * eos_mask).sum(dim=1) / eos_mask.sum(dim=1)
    _, indices = uid.sort()
    nq = uid.unique().numel()
    gs = scores[indices].view(nq, -1)
    gr = rewards[indices].view(nq, -1)
    pos, neg = gr == 1, gr == 0
    valid = (pos.sum(1) != 0) & (neg.sum(1) != 0)
    gs, pos, neg = gs[valid], pos[valid], neg[valid]
    if tau is None:
        neg_term = (gs * neg).sum(1, keepdim=True) / neg.sum(1, keepdim=True)
    else:
        nsm = (gs / tau).masked_fill(~neg, float("-inf"))
        nmax, _ = nsm.max(dim=-1, keepdim=True)
        nmax = torch.where(nmax == float("-inf"), torch.zeros_like(nmax), nmax)
        nexp = torch.exp(((gs / tau) - nmax.detach()) * neg) * neg
        nsum = nexp.sum(dim=-1, keepdim=True)
        neg_term = tau * nsum / (nsum.detach() + torch.finfo(nsum.dtype).eps)
    pg = (((gs - neg_term) * pos).sum(1, keepdim=True) / pos.sum(1, keepdim=True)).sum() / nq
    constraint = torch.maximum(beta * (ppo_kl - delta), torch.zeros_like(ppo_kl)).detach() * ppo_kl
    return -pg + constraint


@pytest.mark.parametrize("tau", [10.0, 1.0, None])
@pytest.mark.parametrize("score", ["log_likelihood", "likelihood_ratio"])
@pytest.mark.parametrize("kl", ["k1", "k3"])
def test_disco_gradient_matches_upstream_in_float64(tau, score, kl):
    gen = torch.Generator().manual_seed(7)
    n, g, t = 12, 4, 6
    old = -torch.rand(n, t, generator=gen, dtype=F64) * 2
    new = (old + 0.05 * torch.randn(n, t, generator=gen, dtype=F64)).requires_grad_(True)
    mask = torch.ones(n, t, dtype=F64)
    mask[::3, 4:] = 0
    rewards = torch.tensor([1, 0, 1, 0, 1, 1, 0, 0, 1, 1, 1, 1], dtype=F64)  # the third group: all correct
    uid = torch.arange(n) // g
    cfg = LossConfig(surrogate="disco", disco_tau=tau, disco_score=score, disco_kl=kl, disco_delta=1e-4, disco_beta=1e3)
    want = _upstream_disco(old, new, mask, uid, rewards, 1e-4, 1e3, tau, score, "kl" if kl == "k1" else "low_var_kl")
    (g_want,) = torch.autograd.grad(want, new)
    # ours: advantages from the rewards (group z-scores: their sign splits positives and negatives)
    adv, _ = compute_advantages(rewards, uid, AdvantageConfig())
    m = mask.bool()
    kl_tok = kl_penalty(torch.where(m, old, 0.0), torch.where(m, new, 0.0), kl)
    k = (kl_tok * mask).sum() / mask.sum()
    assert k.item() > 1e-4  # the hinge is active
    loss, _ = disco_loss(sequence_scores(new, old, mask, score), k, adv, uid, cfg, num_groups=3)
    (g_got,) = torch.autograd.grad(loss, new)
    # upstream's log-sum-exp divides by sg(S) + float eps (2.2e-16 in float64): relative 1e-16
    torch.testing.assert_close(g_got, g_want, **TOL64)


def _disco_learner(model, tok, chunk):
    cfg = LossConfig(surrogate="disco", disco_tau=2.0, disco_delta=1e-6, disco_beta=50.0)
    return TextLearner(model, tok, cfg, max_new_tokens=5, chunk_size=chunk)


def test_disco_two_pass_gradient_equals_the_loss_gradient_for_any_chunking():
    model, tok = build_tiny_lm(seed=2)
    ro = _disco_learner(model, tok, 4).rollout(["3+4=", "9+9=", "12+1="], group_size=4, seed=0)
    ro.old_logps = ro.old_logps + 0.05 * torch.randn(ro.old_logps.shape)  # off-policy: the hinge acts
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 1.0, 1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    params = [p for p in model.parameters()]
    # the loss itself, one forward pass with grad over all rows
    model.zero_grad()
    lp = token_logps(model, ro.input_ids(), ro.attention_mask(), ro.completion_ids.shape[1])
    m = ro.completion_mask.bool()
    cfg = _disco_learner(model, tok, 1).loss
    k = (kl_penalty(torch.where(m, ro.old_logps, 0.0), torch.where(m, lp, 0.0), "k1") * m).sum() / m.sum()
    loss, _ = disco_loss(sequence_scores(lp, ro.old_logps, m, cfg.disco_score), k, adv, ro.prompt_index, cfg, num_groups=3)
    loss.backward()
    want = torch.cat([p.grad.flatten() for p in params])
    assert k.item() > cfg.disco_delta and want.abs().sum() > 0
    for chunk in (12, 5, 1):
        model.zero_grad()
        st = _disco_learner(model, tok, chunk).minibatch_gradient(ro, adv, normalizer=1.0)
        got = torch.cat([p.grad.flatten() for p in params])
        # float32 model: the chunked passes round differently, ~1e-7 relative per element
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
        assert abs(st["loss"] - loss.item()) < 1e-5 and st["disco_valid_groups"] == 2.0
    # two identical processes (sums doubled): the averaged gradient is the one-process gradient
    model.zero_grad()
    learner = _disco_learner(model, tok, 5)
    learner.reduce_fn, learner.world = (lambda t: 2 * t), 2
    learner.minibatch_gradient(ro, adv, normalizer=1.0)
    torch.testing.assert_close(torch.cat([p.grad.flatten() for p in params]), want, atol=1e-6, rtol=1e-4)
    # the on-policy first update (the rollout may skip old log-probs) is scored against the current policy
    learner = _disco_learner(model, tok, 5)
    grads = []
    with torch.no_grad():
        current = token_logps(model, ro.input_ids(), ro.attention_mask(), ro.completion_ids.shape[1], chunk_size=5)
    for old in (None, current):
        ro.old_logps = old
        model.zero_grad()
        st = learner.minibatch_gradient(ro, adv, normalizer=1.0, on_policy=old is None)
        grads.append(torch.cat([p.grad.flatten() for p in params]))
        assert st["kl"] == 0.0 and st["ratio_min"] == st["ratio_max"] == 1.0
    assert torch.equal(grads[0], grads[1])


def test_disco_refuses_what_it_does_not_combine_with():
    with pytest.raises(ValueError, match="beta: DisCO"):
        LossConfig(surrogate="disco", beta=0.04).validate()
    with pytest.raises(ValueError, match="teacher_beta"):
        LossConfig(surrogate="disco", teacher_beta=0.01).validate()
    with pytest.raises(ValueError, match="surrogate: 'disco' is a loss over groups"):
        policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1), torch.ones(1, 2), LossConfig(surrogate="disco"),
                    normalizer=1.0)
    with pytest.raises(ConfigError, match="loss.surrogate: 'disco'.*causal LMs"):
        load_run_config(ROOT / "configs" / "tiny_sd3.yaml", ["loss.surrogate=disco"])


# ------------------------------------------------------------------------------------------------
# KDRL (Xu et al., arXiv 2506.02208)
# ------------------------------------------------------------------------------------------------


def test_teacher_kl_term_by_hand():
    logps = torch.tensor([[-1.0, -2.0]], dtype=F64, requires_grad=True)
    teacher = torch.tensor([[-1.5, -1.0]], dtype=F64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    adv = torch.zeros(1, dtype=F64)
    cfg = LossConfig(aggregation="token-mean", teacher_beta=0.1)
    loss, st = policy_loss(logps, logps.detach(), adv, mask, cfg, normalizer=2.0, teacher_logps=teacher)
    # k2 = (log pi - log pi_T)^2 / 2 = 0.125 and 0.5; token-mean 0.3125; the policy term is 0 (A = 0)
    assert abs(st["teacher_kl"].item() - 0.3125) < 1e-15 and abs(loss.item() - 0.03125) < 1e-15
    (g,) = torch.autograd.grad(loss, logps)
    torch.testing.assert_close(g, 0.1 * (logps.detach() - teacher) / 2, **TOL64)
    loss2, _ = policy_loss(logps, logps.detach(), adv, mask, cfg, normalizer=2.0, teacher_logps=teacher, teacher_beta=0.0)
    assert loss2.item() == 0.0
    with pytest.raises(ValueError, match="teacher_logps: required"):
        policy_loss(logps, logps.detach(), adv, mask, cfg, normalizer=2.0)


def test_teacher_coefficient_anneals_linearly():
    cfg = LossConfig(teacher_beta=5e-3, teacher_beta_end=1e-3, teacher_beta_steps=500)
    assert teacher_coefficient(0, cfg) == 5e-3
    assert abs(teacher_coefficient(250, cfg) - 3e-3) < 1e-18
    assert teacher_coefficient(500, cfg) == teacher_coefficient(10_000, cfg) == 1e-3
    assert teacher_coefficient(7, LossConfig(teacher_beta=0.2)) == 0.2
    with pytest.raises(ValueError, match="teacher_beta_steps"):
        LossConfig(teacher_beta=1e-3, teacher_beta_end=0.0).validate()


def test_rollout_stores_the_teachers_logps_and_a_foreign_tokenizer_is_refused(tiny, tmp_path):
    student, tok = build_tiny_lm(seed=0)
    teacher, _ = build_tiny_lm(seed=1)
    learner = TextLearner(student, tok, LossConfig(teacher_beta=0.01), max_new_tokens=4, teacher_model=teacher)
    ro = learner.rollout(["2+2="], group_size=3, seed=0)
    want = token_logps(teacher, ro.input_ids(), ro.attention_mask(), ro.completion_ids.shape[1], chunk_size=16)
    assert torch.equal(ro.teacher_logps, want) and not torch.equal(ro.teacher_logps, ro.old_logps)
    assert torch.equal(ro.select(torch.tensor([2, 0])).teacher_logps, ro.teacher_logps[[2, 0]])
    # a teacher with another vocabulary: one line naming model.teacher
    other = save_tiny_lm(tmp_path / "other", seed=1, tokenizer=char_tokenizer("0123456789+=abc"))
    from flowrl.train.tasks import TextTask

    cfg = load_run_config(ROOT / "configs" / "tiny_llm.yaml", [f"model.path={tiny[0]}", f"model.teacher={other}",
                                                                "loss.teacher_beta=0.01"])
    with pytest.raises(UsageError, match="model.teacher: .* another tokenizer"):
        TextTask(cfg, "cpu")
    with pytest.raises(ConfigError, match="model.teacher: KDRL needs both"):
        load_run_config(ROOT / "configs" / "tiny_llm.yaml", [f"model.teacher={tiny[1]}"])
    with pytest.raises(ConfigError, match="model.teacher: a teacher model"):
        load_run_config(ROOT / "configs" / "tiny_sd3.yaml", [f"model.teacher={tiny[1]}", "loss.teacher_beta=0.1"])


# ------------------------------------------------------------------------------------------------
# Dynamic reward weighting (Lu et al., arXiv 2509.11452)
# ------------------------------------------------------------------------------------------------


def test_weight_update_by_hand():
    s = gradient_influence([torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])])  # Gram [[1, 1], [1, 2]]
    assert s.tolist() == [2.0, 3.0]
    w = reward_weight_update(torch.tensor([0.5, 0.5]), s, lr=1e-6, reg=1e-5)  # log w + 0.1 s
    e = [math.exp(0.2), math.exp(0.3)]
    torch.testing.assert_close(w, torch.tensor([e[0] / sum(e), e[1] / sum(e)], dtype=F64), **TOL64)


def test_weights_follow_upstream_with_accumulation_in_float64():
    gen = torch.Generator().manual_seed(5)
    names = ["a", "b", "c"]
    dyn = DynamicRewardWeights(names, [1.0, 1.0, 1.0], reg=1e-5, every=2)
    weights = torch.full((3,), 1 / 3, dtype=F64)  # upstream: self.weights, scores_vec
    scores_vec = torch.zeros(3, dtype=F64)
    for step in range(1, 7):
        mat = torch.randn(3, 50, generator=gen, dtype=F64)
        lr = 1e-6 * step
        scores_vec += (mat @ mat.T).sum(dim=-1)
        if step % 2 == 0:
            scores_vec /= 2
            weights = torch.softmax(torch.log(weights) + lr * scores_vec / 1e-5, dim=-1)
            scores_vec.zero_()
        dyn.step(names, list(mat), lr)
        torch.testing.assert_close(torch.tensor(dyn.weights, dtype=F64), weights, **TOL64)
    state = json.loads(json.dumps(dyn.state_dict()))  # what a checkpoint's meta.json keeps
    again = DynamicRewardWeights(names, [1.0, 1.0, 1.0], reg=1e-5, every=2)
    again.load_state_dict(state)
    assert again.state_dict() == dyn.state_dict()
    assert dyn.weights_for(["c", "a", "b"]) == (dyn.weights[2], dyn.weights[0], dyn.weights[1])


def _trainer(preset: Path, out: Path, overrides: List[str]):
    from flowrl.train.loop import Trainer

    base = [f"output_dir={out}", "train.tracker=none", "train.progress=false", "max_steps=2",
            "sample.prompts_per_step=2", "sample.group_size=4", "text.max_new_tokens=3", "eval.num_prompts=1",
            "eval.at_start=false", "checkpoint_every=1", "eval_every=2"]
    return Trainer(load_run_config(preset, base + overrides))


def _metrics(run: Path) -> List[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_identical_rewards_keep_equal_weights_and_a_constant_reward_loses_weight(tiny, tmp_path):
    common = [f"model.path={tiny[0]}", "resume=none", "max_steps=1"]
    _trainer(PRESETS / "dynamic_weights.yaml", tmp_path / "same",
             common + ["rewards={test_b_digits: 1.0, test_b_digits_copy: 1.0}"]).run()
    m = _metrics(tmp_path / "same")[0]
    assert m["reward_influence/test_b_digits"] > 0
    assert m["reward_influence/test_b_digits"] == m["reward_influence/test_b_digits_copy"]
    assert m["reward_weight/test_b_digits"] == m["reward_weight/test_b_digits_copy"] == 0.5
    _trainer(PRESETS / "dynamic_weights.yaml", tmp_path / "const",
             common + ["rewards={test_b_digits: 1.0, test_b_constant: 1.0}", "loss.beta=0.0"]).run()
    m = _metrics(tmp_path / "const")[0]  # no spread: no gradient, no influence
    assert m["reward_influence/test_b_constant"] == 0.0 and m["reward_influence/test_b_digits"] > 0
    assert m["reward_weight/test_b_digits"] > 0.5 > m["reward_weight/test_b_constant"]


def test_dynamic_weights_resume_exactly(tiny, tmp_path):
    ov = [f"model.path={tiny[0]}", "rewards={test_b_digits: 0.5, test_b_short: 0.5}"]
    straight = _trainer(PRESETS / "dynamic_weights.yaml", tmp_path / "straight", ov + ["resume=none"])
    straight.run()
    first = _trainer(PRESETS / "dynamic_weights.yaml", tmp_path / "resumed", ov + ["resume=none", "max_steps=1"])
    first.run()
    second = _trainer(PRESETS / "dynamic_weights.yaml", tmp_path / "resumed", ov + ["resume=auto"])
    second.run()
    assert second.reward_weights.state_dict() == straight.reward_weights.state_dict()
    assert straight.reward_weights.weights != [0.5, 0.5]
    for (n, a), (_, b) in zip(straight.task.module.named_parameters(), second.task.module.named_parameters()):
        assert torch.equal(a, b), n


def test_dynamic_weights_on_the_image_path(tmp_path):
    from flowrl.demo.tiny_image import save_tiny
    from flowrl.train.loop import Trainer

    sd3 = save_tiny("sd3", tmp_path / "sd3")
    cfg = load_run_config(ROOT / "configs" / "tiny_sd3.yaml", [
        f"model.path={sd3}", f"output_dir={tmp_path / 'run'}", "resume=none", "max_steps=1", "train.tracker=none",
        "train.progress=false", "eval.at_start=false", "eval.num_prompts=1", "eval.seeds=[0]", "sample.eval_num_steps=2",
        "rewards={jpeg_compressibility: 2.0, jpeg_incompressibility: 1.0}", "advantage.dynamic_weights=true"])
    Trainer(cfg).run()
    m = _metrics(tmp_path / "run")[0]
    # opposite rewards: exactly opposite advantages and gradients g and -g, so both influences
    # <g, g - g> are exactly 0 and the weights (2/3, 1/3) stay; the update itself (total r/3) has a gradient
    assert m["reward_influence/jpeg_compressibility"] == m["reward_influence/jpeg_incompressibility"] == 0.0
    assert abs(m["reward_weight/jpeg_compressibility"] - 2 / 3) < 1e-15 and m["grad_norm"] > 0


def test_dynamic_weights_config_errors():
    with pytest.raises(ConfigError, match="advantage.dynamic_weights: weighs several rewards"):
        load_run_config(ROOT / "configs" / "tiny_llm.yaml", ["advantage.dynamic_weights=true"])
    with pytest.raises(ConfigError, match="advantage.dynamic_weights: needs flat groups"):
        load_run_config(ROOT / "configs" / "tiny_sd3.yaml", ["advantage.dynamic_weights=true", "plan.kind=tree",
                                                             "rewards={shapes: 1.0, jpeg_compressibility: 1.0}"])
    with pytest.raises(ConfigError, match="rewards: dynamic reward weights start from positive"):
        load_run_config(ROOT / "configs" / "tiny_llm.yaml", ["advantage.dynamic_weights=true",
                                                             "rewards={digit_accuracy: 1.0, integer_format: 0.0}"])


def test_integer_format_reward():
    assert integer_format([], [" 42", "-7", "4 2", "", "12a"]) == [1.0, 1.0, 0.0, 0.0, 0.0]


# ------------------------------------------------------------------------------------------------
# the presets: two steps on the tiny text model
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["unlikely", "disco", "kdrl", "dynamic_weights"])
def test_preset_trains_two_steps_and_changes_the_weights(name, tiny, tmp_path):
    preset = PRESETS / f"{name}.yaml"
    raw = load_run_config(preset)
    assert raw.model.path == "assets/demo_lm" and raw.data.train.startswith("arithmetic")  # an overlay of the demo
    rewards = "{test_b_digits: 0.5, test_b_short: 0.5}" if name == "dynamic_weights" else "{test_b_digits: 1.0}"
    ov = [f"model.path={tiny[0]}", "resume=none", f"rewards={rewards}"]
    if name == "kdrl":
        ov.append(f"model.teacher={tiny[1]}")
    if name == "disco":
        ov.append("sample.prompts_per_step=4")  # 4 minibatches of 1 prompt
    tr = _trainer(preset, tmp_path / name, ov)
    before = {n: p.detach().clone() for n, p in tr.task.module.named_parameters()}
    summary = tr.run()
    assert summary["steps"] == 2
    ms = _metrics(tmp_path / name)
    assert all(math.isfinite(m["loss"]) and m["skipped_optimizer_steps"] == 0 for m in ms)
    assert abs(ms[0]["ratio_first_min"] - 1) < 1e-6 and abs(ms[0]["ratio_first_max"] - 1) < 1e-6  # on-policy first
    changed = sum(not torch.equal(before[n], p.detach()) for n, p in tr.task.module.named_parameters())
    assert changed > 0
    if name == "kdrl":
        assert all(m["teacher_kl"] > 0 for m in ms) and ms[0]["teacher_beta"] == 5e-3
    if name == "disco":
        assert any(m["disco_valid_groups"] > 0 for m in ms)
    if name == "dynamic_weights":
        assert ms[-1]["reward_weight/test_b_digits"] != 0.5
    if name == "unlikely":
        assert tr.cfg.train.num_iterations == 2
