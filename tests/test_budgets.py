"""Rollout budgets per prompt (``flowrl.core.budgets``, ``budget:``): hand-computed small cases of every
allocation, tracker and advantage (float64), the knapsack against brute force, the process layout of
groups of different sizes, the sampler and the text rollout with one group size per prompt, the config
checks, and the loop: uniform equals today's run bit for bit, every kind trains on the tiny text model,
knapsack on the tiny image model, and a run resumed from a checkpoint equals an uninterrupted one."""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from flowrl.config import ConfigError, load_run_config
from flowrl.core.budgets import (
    BetaTracker, BudgetConfig, RolloutBudget, SuccessHistory, gvm_allocation, gvm_weights, information_gain,
    knapsack_allocation, knapsack_value, mmr1_weights, round_preserving_sum, sample_beta, spo_advantages,
    spo_kl_rho, spo_prompt_weights,
)
from flowrl.core.budgets import _knapsack_dp
from flowrl.text.rewards import register_reward
from flowrl.train.data import choose_prompts, local_layout
from scorers.registry import register as register_scorer

ROOT = Path(__file__).resolve().parents[1]
F64_EPS = torch.finfo(torch.float64).eps


def parity(prompt: str) -> float:
    """1 for prompts whose character codes sum to an odd number, else 0: a per-prompt success that makes
    some prompts always solved and others never (their success rates 1 and 0)."""
    return float(sum(map(ord, prompt)) % 2)


@register_reward("test_budget_parity")
def parity_reward(prompts, completions, **_):
    """The prompt's parity plus a little digit fraction of the completion (spread within a group)."""
    return [parity(p) + 0.5 * sum(ch.isdigit() for ch in c) / max(1, len(c)) for p, c in zip(prompts, completions)]


def long_prompt(prompt: str) -> float:
    """1 for scene prompts of more than three words, else 0 (the image test's always / never solved)."""
    return float(len(prompt.split()) > 3)


@register_scorer("test_budget_long")
def long_prompt_scorer(device="cpu", dtype=torch.float32, checkpoint=None, **_):
    """:func:`long_prompt` plus a thousandth of the image's mean pixel (spread within a group)."""
    def score(images, prompts, **meta):
        return torch.tensor([long_prompt(p) for p in prompts]) + 1e-3 * images.detach().float().mean(dim=(1, 2, 3)).cpu()
    return score


# --------------------------------------------------------------------------------------------------
# Knapsack RL
# --------------------------------------------------------------------------------------------------


def test_knapsack_value_by_hand():
    # p = 0.5, n = 2: (1 - 0.25 - 0.25) * 0.5 * 0.25
    assert float(knapsack_value(0.5, 2)) == 0.0625
    # p = 0.1, n = 3: (1 - 0.001 - 0.729) * 0.1 * 0.81 = 0.27 * 0.081
    assert float(knapsack_value(0.1, 3)) == pytest.approx(0.27 * 0.081, rel=4 * F64_EPS)
    assert float(knapsack_value(0.0, 5)) == 0.0 and float(knapsack_value(1.0, 5)) == 0.0


def test_knapsack_allocation_by_hand():
    """p = [0.5, 0 (valid), unknown], default 4, 12 rollouts, min 2, max 6. Start [2, 2, 4], 4 left. The
    item's cost log(0.1)/log(0.5) = 3.32 -> 3 < 4: the 1 over it goes to the p = 0 / unknown prompts
    (the first: prompt 1). The knapsack places 3 on prompt 0 (V grows with n). -> [5, 3, 4]."""
    sizes = knapsack_allocation(torch.tensor([0.5, 0.0, 0.3]), torch.tensor([True, True, False]), 12, 4,
                                min_size=2, max_size=6)
    assert sizes.tolist() == [5, 3, 4]
    # without the fallback all 4 go to the knapsack: the item's extra is capped at max - min = 4
    sizes = knapsack_allocation(torch.tensor([0.5, 0.0, 0.3]), torch.tensor([True, True, False]), 12, 4,
                                min_size=2, max_size=6, fallback=False)
    assert sizes.tolist() == [6, 2, 4]
    # no knapsack item: the budget left goes evenly to p = 0 prompts (p = 1 ones keep min_size)
    sizes = knapsack_allocation(torch.tensor([1.0, 0.0, 0.0]), torch.ones(3, dtype=torch.bool), 12, 4, min_size=2)
    assert sizes.tolist() == [2, 5, 5]
    # every prompt solved: split evenly over all (back to 4 each)
    sizes = knapsack_allocation(torch.ones(3), torch.ones(3, dtype=torch.bool), 12, 4, min_size=2)
    assert sizes.tolist() == [4, 4, 4]
    # nothing known yet: the default for everyone (uniform)
    sizes = knapsack_allocation(torch.zeros(3), torch.zeros(3, dtype=torch.bool), 12, 4)
    assert sizes.tolist() == [4, 4, 4]


def _brute_force(p, budget, base, max_extra):
    """max over k in [0, max_extra]^n with sum k = the largest reachable total <= budget of sum [k>0] V."""
    n = len(p)
    reach = min(budget, n * max_extra)
    best = -math.inf
    for ks in itertools.product(range(max_extra + 1), repeat=n):
        if sum(ks) == reach:
            best = max(best, sum(float(knapsack_value(p[i], base + k)) for i, k in enumerate(ks) if k > 0))
    return best, reach


@pytest.mark.parametrize("seed", range(6))
def test_knapsack_dp_is_optimal(seed):
    """The dynamic programme reaches the brute-force optimum on random small cases (float64)."""
    g = torch.Generator().manual_seed(seed)
    n = 2 + seed % 3
    p = torch.rand(n, generator=g, dtype=torch.float64) * 0.98 + 0.01
    budget, base, max_extra = 3 + seed, 2, 3
    ks, used = _knapsack_dp(p, budget, base, max_extra)
    best, reach = _brute_force(p.tolist(), budget, base, max_extra)
    got = sum(float(knapsack_value(p[i], base + k)) for i, k in enumerate(ks) if k > 0)
    assert used == reach == sum(ks) and all(0 <= k <= max_extra for k in ks)
    assert got == pytest.approx(best, rel=8 * n * F64_EPS)  # n sums of exactly the same float64 terms


def test_knapsack_allocation_sums_to_total_and_respects_bounds():
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        P = 8
        p = torch.rand(P, generator=g, dtype=torch.float64)
        p[:2] = torch.tensor([0.0, 1.0])
        valid = torch.rand(P, generator=g) < 0.8
        sizes = knapsack_allocation(p, valid, P * 8, 8, min_size=2, max_size=32)
        assert int(sizes.sum()) == P * 8 and int(sizes.min()) >= 2


# --------------------------------------------------------------------------------------------------
# GVM-RAFT
# --------------------------------------------------------------------------------------------------


def test_gvm_weights_and_rounding_by_hand():
    w = gvm_weights(torch.tensor([0.25, 0.0, 0.5], dtype=torch.float64), torch.tensor([1.0, 1.0, 0.0]))
    assert w.tolist() == [1 / math.sqrt(0.25 + 1e-3 / 0.25), 0.0, 0.0]  # p = 0 and G = 0 get nothing
    assert round_preserving_sum(torch.tensor([0.5, 0.3, 0.2]), 7).tolist() == [4, 2, 1]  # 3.5 -> 4 (half to even), 2.1, 1.4
    assert round_preserving_sum(torch.tensor([1 / 3] * 3), 10).tolist() == [4, 3, 3]  # one short: the first of the tied residuals


def test_gvm_allocation_by_hand():
    """p = [0.5, 0.25, unknown], default 4, 12 rollouts, min 1: start [1, 1, 4], 6 left, shared in the
    ratio 1/sqrt(0.502) : 1/sqrt(0.254) = 0.4157 : 0.5843 -> 2.49, 3.51 -> [2, 4] -> [3, 5, 4]."""
    sizes = gvm_allocation(torch.tensor([0.5, 0.25, 0.9]), torch.tensor([True, True, False]), 12, 4, min_size=1)
    assert sizes.tolist() == [3, 5, 4]
    # p above filter_threshold gets no share
    sizes = gvm_allocation(torch.tensor([0.5, 0.25, 0.9]), torch.tensor([True, True, False]), 12, 4, min_size=1,
                           filter_threshold=0.4)
    assert sizes.tolist() == [1, 7, 4]


# --------------------------------------------------------------------------------------------------
# Beta trackers, SPO, MMR1, the success history
# --------------------------------------------------------------------------------------------------


def test_vade_beta_tracker_by_hand():
    """Prior Beta(1, 1), visit decay 0.5, step decay 0.9. A visit at step 0 with 2 of 3 right: (3, 2).
    Read at step 2: 1 + 0.81 (3 - 1) = 2.62, 1 + 0.81 (2 - 1) = 1.81. A visit at step 2 with 0 of 4:
    d = 0.5 x 0.81 -> (1 + 0.405 x 2, 1 + 0.405 x 1 + 4) = (1.81, 5.405)."""
    b = BetaTracker((1.0, 1.0), visit_decay=0.5, step_decay=0.9)
    b.observe(3, 2, 1, step=0)
    a, bb = b.params([3, 7], step=2)
    assert a.tolist() == pytest.approx([2.62, 1.0], rel=4 * F64_EPS) and bb.tolist() == pytest.approx([1.81, 1.0], rel=4 * F64_EPS)
    b.observe(3, 0, 4, step=2)
    a, bb = b.params([3], step=2)
    assert float(a) == pytest.approx(1.81, rel=4 * F64_EPS) and float(bb) == pytest.approx(5.405, rel=4 * F64_EPS)
    state = json.loads(json.dumps(b.state_dict()))  # what a checkpoint's meta.json holds
    c = BetaTracker((1.0, 1.0), visit_decay=0.5, step_decay=0.9)
    c.load_state_dict(state)
    assert c.params([3], 5) == b.params([3], 5)


def test_spo_tracker_and_advantages_by_hand():
    """SPO: prior (0.5, 0.5), rho 0.875; a reward of 1 gives (0.4375 + 1, 0.4375), p^ = 1.4375/1.875.
    Advantages r - p^ = [0.5, -0.5, 0.75], centred [0.25, -0.75, 0.5], over Bessel std sqrt(0.875/2) + 1e-8."""
    t = BetaTracker((0.5, 0.5), visit_decay=0.875, anchor="zero")
    t.observe(1, 1.0, 0.0, step=0)
    a, b = t.params([1, 2], step=4)
    assert a.tolist() == [1.4375, 0.5] and b.tolist() == [0.4375, 0.5]
    adv = spo_advantages(torch.tensor([1.0, 0.0, 1.0, float("nan")]), torch.tensor([0.5, 0.5, 0.25, 0.5]),
                         torch.tensor([True, True, True, False]))
    std = math.sqrt(0.875 / 2) + 1e-8  # + eps, as upstream
    assert adv.tolist() == pytest.approx([0.25 / std, -0.75 / std, 0.5 / std, 0.0], rel=8 * F64_EPS)
    assert spo_prompt_weights(torch.tensor([0.5, 1.0], dtype=torch.float64)).tolist() == pytest.approx([0.55, 0.05], rel=4 * F64_EPS)


def test_spo_kl_rho_by_hand():
    """D = masked mean |old - new|: row 0 (3 tokens, changes 0.03, 0.06, 0.09) D = 0.06, rho = 2^-1 = 0.5 -> 0.875;
    row 1 (1 token, change 0.006) D = 0.006, rho = 2^-0.1 = 0.933; row 2 unchanged: rho 1 -> 0.96. A visit's
    decay replaces visit_decay: (0.5, 0.5) -> (0.933 x 0.5 + 1, 0.933 x 0.5)."""
    old = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, 7.0, 7.0], [-0.2, -0.3, 0.0]], dtype=torch.float64)
    new = old - torch.tensor([[0.03, -0.06, 0.09], [0.006, 1.0, 1.0], [0.0, 0.0, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]])
    rho, D = spo_kl_rho(old, new, mask)
    assert D.tolist() == pytest.approx([0.06, 0.006, 0.0], rel=16 * F64_EPS, abs=F64_EPS)
    assert rho.tolist() == pytest.approx([0.875, 2 ** -0.1, 0.96], rel=16 * F64_EPS)
    t = BetaTracker((0.5, 0.5), visit_decay=0.875, anchor="zero")
    t.observe(1, 1.0, 0.0, step=0, decay=float(rho[1]))
    a, b = t.params([1], step=1)
    assert a.tolist() == pytest.approx([2 ** -0.1 * 0.5 + 1], rel=4 * F64_EPS) and b.tolist() == pytest.approx([2 ** -0.1 * 0.5], rel=4 * F64_EPS)


def test_mmr1_weights_and_information_gain_by_hand():
    assert information_gain(torch.tensor([0.5, 0.1], dtype=torch.float64)).tolist() == pytest.approx([0.25, 0.09], rel=4 * F64_EPS)
    # learnability [0.25, 0, 0.1875], min-max scaled with eps 1e-8 in the denominator
    w = mmr1_weights(torch.tensor([0.5, 0.0, 0.25], dtype=torch.float64))
    assert w.tolist() == pytest.approx([0.25 / (0.25 + 1e-8), 0.0, 0.1875 / (0.25 + 1e-8)], rel=4 * F64_EPS)


def test_success_history_as_knapsack_rl_estimates():
    """history 4, min_history 3: a visit shorter than the history averages the last 4 outcomes; a visit
    of at least 4 outcomes is its own estimate; valid from 3 recorded outcomes on."""
    h = SuccessHistory(history=4, min_history=3)
    h.observe(5, [1.0, 0.0])
    valid, rate = h.rates([5, 6])
    assert valid.tolist() == [False, False] and rate.tolist() == [0.5, 0.0]
    h.observe(5, [1.0, 1.0, 1.0, 1.0])
    assert h.rates([5])[1].tolist() == [1.0] and h.rates([5])[0].tolist() == [True]
    h.observe(5, [0.0])  # the last 4: 1, 1, 1, 0
    assert h.rates([5])[1].tolist() == [0.75]
    assert SuccessHistory(4, 0).rates([9])[0].tolist() == [True]  # min_history 0: valid (rate 0) before any visit


def test_beta_draws_follow_the_beta_moments():
    """Marsaglia-Tsang Gamma draws from a torch.Generator: 40000 draws of Beta(2, 5) and Beta(0.5, 0.5)
    have the Beta mean within 5 standard errors; the same generator seed gives the same draws."""
    n = 40000
    for a, b in ((2.0, 5.0), (0.5, 0.5)):
        x = sample_beta(torch.full((n,), a), torch.full((n,), b), torch.Generator().manual_seed(0))
        mean, var = a / (a + b), a * b / ((a + b) ** 2 * (a + b + 1))
        assert abs(float(x.mean()) - mean) < 5 * math.sqrt(var / n)
        assert float(x.var()) == pytest.approx(var, rel=0.05)  # the variance's relative SE here is < 1 %
        assert bool(((x > 0) & (x < 1)).all())
    y1 = sample_beta(torch.tensor([2.0, 0.3]), torch.tensor([1.0, 4.0]), torch.Generator().manual_seed(7))
    y2 = sample_beta(torch.tensor([2.0, 0.3]), torch.tensor([1.0, 4.0]), torch.Generator().manual_seed(7))
    assert torch.equal(y1, y2)


# --------------------------------------------------------------------------------------------------
# RolloutBudget: choices and state
# --------------------------------------------------------------------------------------------------


def _walk(n, seed):
    return lambda count, step: choose_prompts(n, count, seed, step)


@pytest.mark.parametrize("kind", ["uniform", "knapsack", "gvm", "vade", "mmr1", "single_stream"])
def test_budget_state_round_trips_and_choices_repeat(kind):
    """Steps 0-3 observed, the state saved through JSON, a fresh budget loaded: steps 4-7 choose the same
    prompts and sizes in both; the total is always prompts x group_size (single_stream: one each)."""
    cfg = BudgetConfig(kind=kind, min_history=2, success_threshold=0.5)
    G, P, N = 1 if kind == "single_stream" else 4, 6, 10
    make = lambda: RolloutBudget(cfg, num_records=N, prompts_per_step=P, group_size=G, seed=3)  # noqa: E731
    a = make()
    g = torch.Generator().manual_seed(0)
    for step in range(4):
        chosen, sizes = a.choose(step, _walk(N, 3))
        assert len(chosen) == P and sum(sizes) == P * G and all(0 <= c < N for c in chosen)
        rows = [c for c, s in zip(chosen, sizes) for _ in range(s)]
        a.observe(step, rows, torch.rand(len(rows), generator=g, dtype=torch.float64))
    b = make()
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for step in range(4, 8):
        ca, cb = a.choose(step, _walk(N, 3)), b.choose(step, _walk(N, 3))
        assert ca == cb
        rows = [c for c, s in zip(*ca) for _ in range(s)]
        r = torch.rand(len(rows), generator=g, dtype=torch.float64)
        a.observe(step, rows, r)
        b.observe(step, rows, r)
    if kind == "uniform":
        assert a.choose(9, _walk(N, 3)) == (choose_prompts(N, P, 3, 9), [G] * P)


def test_knapsack_budget_gives_solved_prompts_the_minimum():
    """After one visit each (success rates 0 or 1), solved prompts get min_size and the rest is shared
    by the unsolved ones."""
    cfg = BudgetConfig(kind="knapsack", min_history=1)
    b = RolloutBudget(cfg, num_records=4, prompts_per_step=4, group_size=4, seed=0)
    chosen, sizes = b.choose(0, _walk(4, 0))
    assert sizes == [4] * 4
    rows = [c for c in chosen for _ in range(4)]
    b.observe(0, rows, torch.tensor([1.0 if c % 2 else 0.0 for c in rows], dtype=torch.float64))
    chosen, sizes = b.choose(1, _walk(4, 0))
    assert sorted(zip(chosen, sizes)) == [(0, 6), (1, 2), (2, 6), (3, 2)]


def test_vade_prefers_uncertain_prompts():
    """Records seen 40 times all right or all wrong are drawn far less often than never-seen ones."""
    cfg = BudgetConfig(kind="vade")
    b = RolloutBudget(cfg, num_records=20, prompts_per_step=5, group_size=4, seed=0)
    for r in range(10):  # records 0-9: 40 outcomes each, all the same
        b.observe(0, [r] * 40, torch.full((40,), float(r % 2), dtype=torch.float64))
    picked = [c for step in range(1, 11) for c in b.choose(step, _walk(20, 0))[0]]
    assert sum(c < 10 for c in picked) <= 5 and len(picked) == 50


def test_success_history_values_average_the_successes_of_the_rate_window():
    """history 4: a visit of 2 reads the last 4 outcomes (rate and values); a visit of 4 reads itself;
    values of failures and NaN values are not averaged; no success in the window gives 0."""
    h = SuccessHistory(history=4, min_history=1)
    h.observe(0, [1, 0], [2.0, 9.0])
    h.observe(0, [1, 1], [4.0, float("nan")])
    valid, rate = h.rates([0, 1])
    assert valid.tolist() == [True, False] and rate.tolist() == [0.75, 0.0]
    assert h.values([0, 1]).tolist() == [3.0, 0.0]  # (2 + 4) / 2; record 1 never seen
    h.observe(0, [0, 1, 1, 0], [1.0, 5.0, 7.0, 1.0])  # a whole window: the visit alone
    assert h.rates([0])[1].tolist() == [0.5] and h.values([0]).tolist() == [6.0]
    h.observe(0, [0, 0, 0, 0])
    assert h.values([0]).tolist() == [0.0]
    g = SuccessHistory(history=4)
    g.load_state_dict(json.loads(json.dumps(h.state_dict())))
    assert g.values([0]).tolist() == [0.0] and g.rates([0])[1].tolist() == [0.0]
    with pytest.raises(ValueError, match="values: one per outcome"):
        h.observe(1, [1, 0], [1.0])


def test_gvm_budget_shares_by_the_gradient_norms_of_successes():
    """Two prompts, both right half the time (p = 0.5); the successes of prompt 0 have gradient norm 1 and
    those of prompt 1 norm 3: with grad_norms the 8 rollouts beyond the minimum go 1 : 3 (2 and 6), without
    them evenly (4 and 4)."""
    sizes = {}
    for mode in ("none", "embedding"):
        cfg = BudgetConfig(kind="gvm", min_history=1)
        cfg.gvm.grad_norms = mode
        b = RolloutBudget(cfg, num_records=2, prompts_per_step=2, group_size=5, seed=0)
        chosen, first = b.choose(0, _walk(2, 0))
        assert first == [5, 5]
        rows = [c for c in chosen for _ in range(4)]
        ok = torch.tensor([1.0, 0.0] * 4, dtype=torch.float64)
        norms = torch.tensor([1.0 + 2 * r if o else 50.0 for r, o in zip(rows, ok.tolist())], dtype=torch.float64)
        b.observe(0, rows, ok, grad_norms=norms)  # failures' norms (50) are not read
        chosen, got = b.choose(1, _walk(2, 0))
        sizes[mode] = dict(zip(chosen, got))
    assert sizes["none"] == {0: 5, 1: 5} and sizes["embedding"] == {0: 3, 1: 7}


@pytest.mark.parametrize("tied", [True, False])
def test_embedding_grad_norms_equal_one_backward_per_row(tied, lm_dir):
    """The batched per-row norms (left-padded prompts, completions ending early) against GVM's way: each row
    alone, unpadded, ``autograd.grad(-sum log pi, E)``; float64, so they agree to rounding (tied: the
    output projection's part included)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flowrl.text.rollout import embedding_grad_norms, generate, token_logps

    tok = AutoTokenizer.from_pretrained(lm_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(lm_dir, tie_word_embeddings=tied).double().eval()
    E = model.get_input_embeddings().weight
    assert (model.get_output_embeddings().weight is E) == tied
    ro = generate(model, tok, ["1+2=", "12+34=", "5="], group_size=2, max_new_tokens=4, seed=2)
    ids, am, cm = ro.input_ids(), ro.attention_mask(), ro.completion_mask
    assert (am == 0).any() and (cm.sum(1) < cm.shape[1]).any(), "the case needs padding on both sides"
    got = embedding_grad_norms(model, ids, am, cm, temperature=0.7, chunk_size=4)
    want = []
    for r in range(ids.shape[0]):
        row = ids[r][am[r].bool()][None]
        with torch.enable_grad():
            lp = token_logps(model, row, torch.ones_like(row), int(cm[r].sum()), temperature=0.7)
            (g,) = torch.autograd.grad(-lp.sum(), E)
        want.append(float(torch.linalg.vector_norm(g)))
    assert E.grad is None
    # float64 throughout; the sums run in other orders (padding, chunks): a few ulps per term
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=1e3 * F64_EPS, atol=0)


def test_spo_drift_scores_the_previous_response_with_the_policy_now(lm_dir):
    """TextTask.spo_drift: a row whose prompt has no previous response has D = 0 (rho 0.96); a previous
    response whose stored log-probs are the policy's own has D ~ 0; stored log-probs 0.006 below on each
    token give D = 0.006 (rho = 2^-0.1), whichever prompt the response came from (it is scored as stored)."""
    from flowrl.text.rollout import rollout_from_tokens
    from flowrl.train.tasks import TextTask

    cfg = load_run_config(ROOT / "configs" / "methods_text" / "single_stream.yaml",
                          [f"model.path={lm_dir}", "text.max_new_tokens=4"])
    task = TextTask(cfg, torch.device("cpu"))
    ro = task.learner.generate(["1+2=", "12+34=", "5="], group_size=1, seed=2)
    _, _, entries = task.spo_drift(ro, [None] * 3)
    prompt, response, lps = entries[1]
    assert response == ro.completion_ids[1][ro.completion_mask[1].bool()].tolist() and len(lps) == len(response)
    mine = task.learner.policy_logps(rollout_from_tokens([prompt], [response], task.tokenizer.pad_token_id))[0]
    # float32 log-probs of the same tokens in another padding layout: a few float32 ulps apart
    assert torch.allclose(torch.tensor(lps), mine[:len(lps)], rtol=0, atol=64 * torch.finfo(torch.float32).eps)
    shifted = (prompt, response, [x - 0.006 for x in lps])
    rho, D, again = task.spo_drift(ro, [None, entries[1], shifted])
    assert D[0] == 0.0 and rho[0] == 0.96
    assert float(D[1]) < 1e-5 and float(rho[1]) == 0.96
    assert float(D[2]) == pytest.approx(0.006, abs=1e-5) and float(rho[2]) == pytest.approx(2 ** -0.1, abs=1e-3)
    assert again == entries  # the step's own entries do not depend on the previous ones


# --------------------------------------------------------------------------------------------------
# layout over processes
# --------------------------------------------------------------------------------------------------


def test_layout_of_different_group_sizes_by_hand():
    """8 prompts, 2 minibatches, 2 processes. Block 0 sizes [1, 5, 2, 2]: by size 1, 2, 3, 0 -> process
    0, 1, 1, 0 -> process 0 holds [0, 1] (6 rows), process 1 [2, 3] (4 rows). Block 1 (all 3): 4, 5, 6, 7
    -> 0, 1, 1, 0."""
    sizes = [1, 5, 2, 2, 3, 3, 3, 3]
    assert local_layout(8, 2, 2, 0, sizes=sizes) == [[0, 1], [4, 7]]
    assert local_layout(8, 2, 2, 1, sizes=sizes) == [[2, 3], [5, 6]]
    assert local_layout(8, 2, 2, 0, sizes=[3] * 8) == local_layout(8, 2, 2, 0) == [[0, 1], [4, 5]]
    assert local_layout(8, 2, 1, 0, sizes=sizes) == local_layout(8, 2, 1, 0)
    for world in (2, 4):  # every position once, equal counts per process
        got = [local_layout(8, 2, world, r, sizes=sizes) for r in range(world)]
        assert sorted(p for lay in got for mb in lay for p in mb) == list(range(8))
        assert len({len(mb) for lay in got for mb in lay}) == 1


# --------------------------------------------------------------------------------------------------
# rollouts with one group size per prompt
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    from flowrl.demo.tiny_image import save_tiny

    return Path(save_tiny("sd3", tmp_path_factory.mktemp("tiny_sd3")))


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    from flowrl.demo.tiny_text import save_tiny_lm

    return save_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


def test_flow_sampler_with_one_group_size_per_prompt_equals_one_call_per_size(sd3_dir):
    """Sizes [2, 3, 2]: the rows of prompts 0 and 2 are those of one call on [0, 2] with group 2, the
    rows of prompt 1 those of a call on [1] with group 3 (same generators), bit for bit."""
    from flowrl.config import ModelConfig
    from flowrl.flow.plan import PlanConfig, SubsetConfig, build_plan, plan_generator
    from flowrl.flow.sampler import sample
    from flowrl.train.model import build_flow_policy

    policy = build_flow_policy(ModelConfig(family="sd3", path=str(sd3_dir)), device="cpu")
    # per-sample random subsets of trained steps: drawn from each prompt's generator too
    plan = build_plan(PlanConfig(kind="random_subset", subset=SubsetConfig(fraction=0.5, per_sample=True)), 4, 0,
                      plan_generator(0, 0))
    prompts = ["a red circle", "two blue squares", "a green triangle"]
    gens = lambda idx: [torch.Generator().manual_seed(10 + i) for i in idx]  # noqa: E731
    kw = dict(height=32, width=32, guidance_scale=2.0, progress=False)
    ro = sample(policy, prompts, plan, group_size=[2, 3, 2], generator=gens([0, 1, 2]), **kw)
    even = sample(policy, [prompts[0], prompts[2]], plan, group_size=2, generator=gens([0, 2]), **kw)
    odd = sample(policy, [prompts[1]], plan, group_size=3, generator=gens([1]), **kw)
    assert ro.prompt_index.tolist() == [0, 0, 1, 1, 1, 2, 2] and torch.equal(ro.group_id, ro.prompt_index)
    want = {0: (even, [0, 1]), 1: (odd, [0, 1, 2]), 2: (even, [2, 3])}
    got_rows = {0: [0, 1], 1: [2, 3, 4], 2: [5, 6]}
    for p, (ref, rows) in want.items():
        for name in ("latents", "log_probs", "means", "images", "trained", "final_latents"):
            assert torch.equal(getattr(ro, name)[got_rows[p]], getattr(ref, name)[rows]), (p, name)
    assert ro.nfe == even.nfe + odd.nfe and ro.prompts == prompts
    assert torch.equal(ro.embeds_for([2])["prompt_embeds"], odd.embeds_for([0])["prompt_embeds"])
    with pytest.raises(ValueError, match="generator"):
        sample(policy, prompts, plan, group_size=[2, 3, 2], generator=torch.Generator().manual_seed(0), **kw)
    with pytest.raises(ValueError, match="group_size"):
        sample(policy, prompts, plan, group_size=[2, 0, 2], generator=gens([0, 1, 2]), **kw)


def test_text_rollout_with_one_group_size_per_prompt(lm_dir):
    """Sizes [1, 3]: row j of prompt i draws from its own stream, so the rows equal two separate calls."""
    from flowrl.text.rollout import generate
    from flowrl.train.model import load_lm

    model, tok = load_lm(str(lm_dir), dtype=torch.float32, device="cpu")
    keys = [(0, 5, 0), (0, 7, 1)]
    ro = generate(model, tok, ["12+34=", "56+7="], group_size=[1, 3], max_new_tokens=4, seed=0, prompt_keys=keys)
    a = generate(model, tok, ["12+34="], group_size=1, max_new_tokens=4, seed=0, prompt_keys=keys[:1])
    b = generate(model, tok, ["56+7="], group_size=3, max_new_tokens=4, seed=0, prompt_keys=keys[1:])
    assert ro.prompt_index.tolist() == [0, 1, 1, 1]
    assert ro.completions == a.completions + b.completions


# --------------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides,key", [
    (["budget.kind=knapsak"], "budget.kind"),
    (["budget.kind=single_stream"], "sample.group_size"),
    (["budget.kind=single_stream", "sample.group_size=1", "advantage.stat_tracking=true"], "advantage.stat_tracking"),
    (["budget.kind=knapsack", "budget.knapsack.max_size=4"], "sample.group_size"),
    (["budget.kind=gvm", "budget.gvm.min_size=9"], "budget.gvm.min_size"),
    (["budget.knapsack.cost=linear"], "budget.knapsack.cost"),
    (["budget.vade.visit_decay=1.5"], "budget.vade.visit_decay"),
    (["budget.gvm.grad_norms=lm_head"], "budget.gvm.grad_norms"),
    (["budget.single_stream.rho_type=adaptive"], "budget.single_stream.rho_type"),
    (["budget.single_stream.rho_clip=[0.9, 0.8]"], "budget.single_stream.rho_clip"),
])
def test_budget_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_run_config(ROOT / "configs" / "llm_demo.yaml", overrides)
    assert str(e.value).startswith(key), str(e.value)


def test_gvm_grad_norms_and_spo_kl_rho_are_for_causal_lms():
    with pytest.raises(ConfigError, match="budget.gvm.grad_norms: 'embedding'"):
        load_run_config(ROOT / "configs" / "methods" / "gvm.yaml", ["budget.gvm.grad_norms=embedding"])
    with pytest.raises(ConfigError, match="budget.single_stream.rho_type: 'kl'"):
        load_run_config(ROOT / "configs" / "methods" / "single_stream.yaml", ["budget.single_stream.rho_type=kl"])


def test_budget_needs_flat_groups_on_the_image_path():
    with pytest.raises(ConfigError, match="budget.kind: knapsack needs flat groups"):
        load_run_config(ROOT / "configs" / "methods" / "dynamic_treerpo.yaml", ["budget.kind=knapsack"])


# --------------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_report(monkeypatch):
    """The run report (matplotlib, most of a tiny run's time) is not what these tests check."""
    from flowrl.train import loop

    monkeypatch.setattr(loop, "write_report", lambda run_dir: None)


def _text_run(lm_dir, out, kind, steps, extra=()):
    from flowrl.train.loop import Trainer

    ov = [f"model.path={lm_dir}", f"output_dir={out}", "resume=auto", "train.tracker=none", "train.progress=false",
          f"max_steps={steps}", "eval_every=100", "checkpoint_every=2", "eval.num_prompts=1", "eval.at_start=false",
          "sample.prompts_per_step=4", "sample.group_size=4", "text.max_new_tokens=4", "data.max_train_prompts=6",
          "rewards={test_budget_parity: 1.0}", f"budget.kind={kind}", "budget.min_history=1",
          "train.num_minibatches=2", "train.deterministic=true", "seed=5", *extra]
    if kind == "single_stream":
        ov.append("sample.group_size=1")
    if kind == "gvm_grad":  # GVM with its gradient norms
        ov[ov.index("budget.kind=gvm_grad")] = "budget.kind=gvm"
        ov.append("budget.gvm.grad_norms=embedding")
    if kind == "single_stream_kl":  # SPO with the adaptive decay
        ov[ov.index("budget.kind=single_stream_kl")] = "budget.kind=single_stream"
        ov += ["sample.group_size=1", "budget.single_stream.rho_type=kl"]
    tr = Trainer(load_run_config(ROOT / "configs" / "llm_demo.yaml", ov))
    tr.run()
    return tr


def _metrics(run):
    return [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def test_uniform_equals_a_knapsack_step_without_history(lm_dir, tmp_path):
    """A knapsack run's first step (no success rate known: every prompt its default group) is the uniform
    run's step bit for bit; its second gives solved prompts fewer rollouts."""
    from flowrl.train.lora import trainable_state_dict

    uni = _text_run(lm_dir, tmp_path / "uniform", "uniform", 1)
    kn = _text_run(lm_dir, tmp_path / "knapsack", "knapsack", 1)
    wu, wk = trainable_state_dict(uni.task.module), trainable_state_dict(kn.task.module)
    assert all(torch.equal(wu[k], wk[k]) for k in wu)
    mu, mk = _metrics(tmp_path / "uniform")[0], _metrics(tmp_path / "knapsack")[0]
    assert {k: v for k, v in mk.items() if not k.startswith(("time/", "budget/"))} == \
        {k: v for k, v in mu.items() if not k.startswith("time/")}
    _text_run(lm_dir, tmp_path / "knapsack", "knapsack", 2)  # resumes from step 1 (checkpoint at the end)
    m = _metrics(tmp_path / "knapsack")[1]
    assert m["budget/min_size"] == 2 and m["budget/max_size"] > 4 and math.isfinite(m["loss"])


def test_knapsack_sizes_in_sub_batches_overlapping_rewards(lm_dir, tmp_path):
    """Per-prompt sizes go with their prompts into the rollout's sub-batches (sample.rollout_chunks), and
    scoring them in a worker thread while the next samples trains the same weights as scoring after."""
    from flowrl.train.lora import trainable_state_dict

    w = {}
    for overlap in ("false", "true"):
        out = tmp_path / f"overlap_{overlap}"
        _text_run(lm_dir, out, "knapsack", 2, ["sample.rollout_chunks=2", f"sample.overlap_rewards={overlap}"])
        tr = _text_run(lm_dir, out, "knapsack", 3, ["sample.rollout_chunks=2", f"sample.overlap_rewards={overlap}"])
        w[overlap] = trainable_state_dict(tr.task.module)
        m = _metrics(out)
        assert any(x["budget/min_size"] != x["budget/max_size"] for x in m[1:]), m  # sizes differed in a step
    assert all(torch.equal(w["false"][k], w["true"][k]) for k in w["false"])


@pytest.mark.parametrize("kind", ["knapsack", "gvm", "gvm_grad", "vade", "mmr1", "single_stream", "single_stream_kl"])
def test_resumed_budget_run_equals_an_uninterrupted_one(kind, lm_dir, tmp_path):
    """4 steps straight against 2 steps, then a new Trainer resuming from the step-2 checkpoint for 2
    more: the same weights, bit for bit, and the same logged metrics (the budget's state is in the
    checkpoint; its draws are streams of the seed and step)."""
    from flowrl.train.lora import trainable_state_dict

    ref = _text_run(lm_dir, tmp_path / "ref", kind, 4)
    _text_run(lm_dir, tmp_path / "cut", kind, 2)
    cut = _text_run(lm_dir, tmp_path / "cut", kind, 4)
    wr, wc = trainable_state_dict(ref.task.module), trainable_state_dict(cut.task.module)
    assert all(torch.equal(wr[k], wc[k]) for k in wr)
    # (timings, and the evaluation the shorter run made at its last step)
    strip = lambda ms: [{k: v for k, v in m.items() if not k.startswith(("time/", "eval/"))} for m in ms]  # noqa: E731
    got, want = strip(_metrics(tmp_path / "cut")), strip(_metrics(tmp_path / "ref"))
    assert got == want and len(got) == 4
    assert all(math.isfinite(m["loss"]) for m in got)
    if kind == "knapsack":
        assert any(m["budget/max_size"] > m["budget/min_size"] for m in got), "sizes never differed: weak test"
    if kind == "single_stream_kl":  # step 1 sees every prompt first (rho 0.96); later ones revisit (6 prompts, 4 a step)
        # the step's mean of four rho of exactly 0.96: the summation order may round the last bits
        assert got[0]["budget/spo_rho"] == pytest.approx(0.96, rel=4 * F64_EPS) and got[0]["budget/spo_drift"] == 0.0
        assert any(m["budget/spo_drift"] > 0 for m in got[1:])
        assert len(ref.budget.responses) > 4 and cut.budget.responses == ref.budget.responses


def test_knapsack_trains_the_tiny_image_model(sd3_dir, tmp_path):
    """Two prompts, one always solved, one never: step 2 gives them 2 and 6 of 8 rollouts (different
    sizes through the flow sampler), and the update is finite and moves the LoRA."""
    from flowrl.train.loop import Trainer

    ov = [f"model.path={sd3_dir}", f"output_dir={tmp_path / 'run'}", "resume=none", "model.family=sd3",
          "train.tracker=none", "train.progress=false", "max_steps=2", "eval_every=100", "checkpoint_every=100",
          "eval.num_prompts=1", "eval.seeds=[0]", "eval.at_start=false", "sample.height=32", "sample.width=32",
          "sample.num_steps=4", "sample.eval_num_steps=2", "sample.group_size=4", "sample.prompts_per_step=2",
          "sample.chunk_size=null", "data.max_train_prompts=2", "rewards={test_budget_long: 1.0}",
          "budget.kind=knapsack", "budget.min_history=1", "lora.rank=4", "lora.alpha=8", "ema.enabled=false",
          "time_budget_s=null"]
    cfg = load_run_config(ROOT / "configs" / "methods" / "flow_grpo.yaml", ov)
    from flowrl.train.data import load_records

    prompts = [r["prompt"] for r in load_records("shapes:train", limit=2, seed=cfg.seed)]
    assert sorted(long_prompt(p) for p in prompts) == [0.0, 1.0], "the test needs one prompt of each kind"
    tr = Trainer(cfg)
    tr.run()
    m = _metrics(tmp_path / "run")
    assert [x["budget/max_size"] for x in m] == [4, 6] and m[1]["budget/min_size"] == 2
    assert all(math.isfinite(x["loss"]) and x["grad_norm"] > 0 for x in m)
