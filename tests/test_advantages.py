"""Tests for flowrl.core.advantages: hand-computed values, invariants, trees, tracker state."""

from __future__ import annotations

import json
import math

import pytest
import torch

from flowrl.core.advantages import (
    AdvantageConfig,
    PerPromptStatTracker,
    advantage_preset,
    compute_advantages,
    group_stats,
    multi_granularity_advantages,
    tree_node_advantages,
    tree_node_values,
    tree_transition_advantages,
)

F64 = torch.float64


def _t(x, dtype=F64):
    return torch.tensor(x, dtype=dtype)


# ------------------------------------------------------------------------------ hand values


def test_group_zscore_hand_values_unbiased_std():
    r = _t([1.0, 2.0, 3.0, 4.0, 10.0, 20.0])
    g = torch.tensor([0, 0, 0, 0, 7, 7])
    adv, st = compute_advantages(r, g)  # TRL default: group mean, Bessel std, eps 1e-4
    s1 = math.sqrt(5.0 / 3.0)  # std of 1..4 with ddof=1
    s2 = math.sqrt(50.0)  # std of (10, 20) with ddof=1
    want = [(-1.5) / (s1 + 1e-4), -0.5 / (s1 + 1e-4), 0.5 / (s1 + 1e-4), 1.5 / (s1 + 1e-4),
            -5.0 / (s2 + 1e-4), 5.0 / (s2 + 1e-4)]
    torch.testing.assert_close(adv, _t(want), rtol=1e-12, atol=1e-12)
    assert adv.dtype == F64
    assert st["num_groups"] == 2 and st["zero_std_count"] == 0 and st["invalid_count"] == 0
    assert st["keep"].all()
    assert st["reward_std_mean"] == pytest.approx((s1 + s2) / 2)


def test_population_std_flow_grpo_and_clip():
    r = _t([1.0, 2.0, 3.0, 4.0])
    g = torch.zeros(4, dtype=torch.long)
    adv, _ = compute_advantages(r, g, advantage_preset("flow_grpo"))
    s = math.sqrt(1.25)  # np.std (ddof=0) of 1..4
    torch.testing.assert_close(adv, (r - 2.5) / (s + 1e-4))
    # clip at 5: one success among 50 gives a z-score of about 7
    r = torch.zeros(50, dtype=F64)
    r[0] = 1.0
    adv, st = compute_advantages(r, torch.zeros(50, dtype=torch.long), AdvantageConfig(clip=5.0))
    raw, _ = compute_advantages(r, torch.zeros(50, dtype=torch.long))
    assert raw[0] > 5.0 and adv[0] == 5.0 and st["clipped_count"] == 1
    torch.testing.assert_close(adv[1:], raw[1:])


def test_scale_none_and_batch_and_global_center():
    r = _t([1.0, 3.0, 10.0, 14.0])
    g = torch.tensor([0, 0, 1, 1])
    adv, _ = compute_advantages(r, g, advantage_preset("dr_grpo"))
    torch.testing.assert_close(adv, _t([-1.0, 1.0, -2.0, 2.0]))
    batch_std = r.std()  # Bessel over the batch
    adv, _ = compute_advantages(r, g, AdvantageConfig(scale="batch"))
    torch.testing.assert_close(adv, _t([-1.0, 1.0, -2.0, 2.0]) / (batch_std + 1e-4))
    adv, _ = compute_advantages(r, g, AdvantageConfig(center="batch", scale="batch", eps=0.0))
    torch.testing.assert_close(adv, (r - r.mean()) / batch_std)
    assert abs(adv.mean().item()) < 1e-12 and adv.std().item() == pytest.approx(1.0)


def test_normalisation_invariants_random_groups():
    gen = torch.Generator().manual_seed(3)
    g = torch.randint(0, 5, (60,), generator=gen)
    r = torch.randn(60, generator=gen, dtype=F64)
    cfg = AdvantageConfig(eps=0.0)
    adv, _ = compute_advantages(r, g, cfg)
    for k in g.unique():
        a = adv[g == k]
        if a.numel() >= 2:
            assert abs(a.mean().item()) < 1e-12
            assert a.std().item() == pytest.approx(1.0, rel=1e-12)
    # shift/scale invariance of the z-score; scale equivariance without std
    adv2, _ = compute_advantages(3.5 * r - 7.0, g, cfg)
    torch.testing.assert_close(adv2, adv, rtol=1e-10, atol=1e-10)
    a_none, _ = compute_advantages(r, g, AdvantageConfig(scale="none"))
    a_none2, _ = compute_advantages(2.0 * r + 5.0, g, AdvantageConfig(scale="none"))
    torch.testing.assert_close(a_none2, 2.0 * a_none, rtol=1e-10, atol=1e-10)
    # permutation equivariance and independence from the id values
    perm = torch.randperm(60, generator=gen)
    adv_p, _ = compute_advantages(r[perm], g[perm] * 13 + 1000, cfg)
    torch.testing.assert_close(adv_p, adv[perm])


def test_zero_variance_groups_counted_and_filtered():
    r = _t([0.5, 0.5, 0.5, 1.0, 2.0, 3.0, 7.0, 7.0])
    g = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    adv, st = compute_advantages(r, g)
    assert torch.equal(adv[[0, 1, 2, 6, 7]], torch.zeros(5, dtype=F64))  # exact zeros
    assert st["zero_std_count"] == 2 and st["zero_std_frac"] == pytest.approx(2 / 3)
    assert st["filtered_count"] == 0 and st["keep"].all()
    adv_f, st_f = compute_advantages(r, g, advantage_preset("dapo"))
    assert st_f["filtered_count"] == 5
    assert st_f["keep"].tolist() == [False, False, False, True, True, True, False, False]
    torch.testing.assert_close(adv_f, adv)
    # tolerance: values within zero_std_tol count as constant
    r2 = _t([1.0, 1.0 + 1e-9, 1.0])
    _, st2 = compute_advantages(r2, torch.zeros(3, dtype=torch.long), AdvantageConfig(zero_std_tol=1e-6))
    assert st2["zero_std_count"] == 1


def test_nan_rewards_are_excluded_not_averaged():
    r = _t([1.0, float("nan"), 3.0, 5.0, 2.0, 4.0])
    g = torch.tensor([0, 0, 0, 0, 1, 1])
    adv, st = compute_advantages(r, g)
    ref, _ = compute_advantages(r[[0, 2, 3, 4, 5]], g[[0, 2, 3, 4, 5]])
    assert adv[1] == 0.0 and not st["keep"][1] and st["invalid_count"] == 1
    torch.testing.assert_close(adv[[0, 2, 3, 4, 5]], ref)
    assert st["reward_mean"] == pytest.approx(3.0)
    # multi-reward: "any" invalidates on one NaN, "all" (TRL) only if every reward is NaN
    rr = _t([[1.0, 0.0], [float("nan"), 1.0], [3.0, 0.0], [float("nan"), float("nan")]])
    gg = torch.zeros(4, dtype=torch.long)
    a_any, s_any = compute_advantages(rr, gg, AdvantageConfig(nan_policy="any"))
    assert s_any["keep"].tolist() == [True, False, True, False]
    a_all, s_all = compute_advantages(rr, gg, AdvantageConfig(nan_policy="all"))
    assert s_all["keep"].tolist() == [True, True, True, False]
    # "all": the NaN column is skipped in the sum -> row 1 totals 1.0, stats over (1, 1, 3)
    tot = _t([1.0, 1.0, 3.0])
    torch.testing.assert_close(a_all[:3], (tot - tot.mean()) / (tot.std() + 1e-4))
    assert a_all[3] == 0.0


def test_ngrpo_virtual_max_reward_calibration():
    r = _t([0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    g = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    adv, _ = compute_advantages(r, g, advantage_preset("ngrpo"))
    # group 0: stats over (0,0,0,1): mean .25, unbiased std .5 -> A = -.25/(.5 + 1e-6)
    assert adv[:3].tolist() == pytest.approx([-0.25 / (0.5 + 1e-6)] * 3)
    # all-correct group: mean 1, A = 0 ; mixed group (0, 1, +1): mean 2/3, std sqrt(1/3)
    assert adv[3:6].tolist() == pytest.approx([0.0] * 3, abs=1e-12)
    s = math.sqrt(1.0 / 3.0)
    assert adv[6:].tolist() == pytest.approx([(-2 / 3) / (s + 1e-6), (1 / 3) / (s + 1e-6)])
    # plain GRPO gives the all-wrong group no signal; NGRPO pushes it down
    plain, _ = compute_advantages(r, g, advantage_preset("verl"))
    assert plain[:3].abs().max() == 0.0 and (adv[:3] < 0).all()
    gs = group_stats(r, g, virtual_value=1.0, num_virtual=2)
    assert gs.mean[0].item() == pytest.approx(0.4)  # (0+0+0+1+1)/5


def test_multi_reward_modes():
    gen = torch.Generator().manual_seed(1)
    r = torch.randn(12, 2, generator=gen, dtype=F64)
    r[:, 1] = r[:, 1] * 10 + 3
    g = torch.arange(12) // 4
    w = (1.0, 0.5)
    a_sum, _ = compute_advantages(r, g, AdvantageConfig(reward_weights=w))
    a_ref, _ = compute_advantages(r[:, 0] + 0.5 * r[:, 1], g)
    torch.testing.assert_close(a_sum, a_ref)
    a_nts, _ = compute_advantages(r, g, AdvantageConfig(multi_reward="normalize_then_sum", reward_weights=w))
    z0, _ = compute_advantages(r[:, 0], g)
    z1, _ = compute_advantages(r[:, 1], g)
    torch.testing.assert_close(a_nts, z0 + 0.5 * z1)
    # GDPO / TRL normalize_then_sum: then a batch z-score
    a_gdpo, _ = compute_advantages(r, g, advantage_preset("gdpo", reward_weights=w))
    s = z0 + 0.5 * z1
    torch.testing.assert_close(a_gdpo, (s - s.mean()) / (s.std() + 1e-4))
    with pytest.raises(ValueError, match="reward_weights"):
        compute_advantages(r, g, AdvantageConfig(reward_weights=(1.0,)))


def test_output_dtypes_and_input_errors():
    adv, _ = compute_advantages(torch.tensor([1, 2, 3, 4]), torch.tensor([0, 0, 1, 1]))
    assert adv.dtype == torch.float32
    adv, _ = compute_advantages(torch.tensor([1.0, 2.0], dtype=torch.bfloat16), torch.tensor([0, 0]))
    assert adv.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="group_ids"):
        compute_advantages(_t([1.0, 2.0]), torch.tensor([0, 0, 0]))
    with pytest.raises(ValueError, match="group_ids"):
        compute_advantages(_t([1.0, 2.0]), _t([0.0, 0.0]))
    with pytest.raises(ValueError, match="rewards"):
        compute_advantages(torch.zeros(2, 2, 2), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="prompt_keys"):
        compute_advantages(_t([1.0, 2.0]), torch.tensor([0, 0]), tracker=PerPromptStatTracker())


@pytest.mark.parametrize(
    "field, value",
    [
        ("center", "median"),
        ("scale", "mad"),
        ("eps", -1.0),
        ("multi_reward", "max"),
        ("post_norm", "group"),
        ("nan_policy", "some"),
        ("ngrpo_num_virtual", 0),
        ("zero_std_tol", -0.1),
        ("clip", 0.0),
        ("reward_weights", ()),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}:"):
        AdvantageConfig(**{field: value}).validate()


def test_config_cross_field_validation():
    with pytest.raises(ValueError, match="^post_norm:"):
        AdvantageConfig(post_norm="batch").validate()
    with pytest.raises(ValueError, match="^ngrpo_max_reward:"):
        AdvantageConfig(center="batch", ngrpo_max_reward=1.0).validate()
    with pytest.raises(ValueError, match="^name:"):
        advantage_preset("nope")
    with pytest.raises(ValueError, match="^bogus:"):
        advantage_preset("grpo", bogus=1)


# ------------------------------------------------------------------------------ stat tracker


def test_tracker_keeps_history_across_steps():
    tr = PerPromptStatTracker()
    cfg = AdvantageConfig(std_unbiased=False)
    a1, st1 = compute_advantages(_t([1.0, 2.0, 5.0, 9.0]), torch.tensor([0, 0, 1, 1]), cfg, tr, ["a", "a", "b", "b"])
    torch.testing.assert_close(a1[:2], _t([-0.5, 0.5]) / (0.5 + 1e-4))
    assert st1["tracked_prompts"] == 2
    # step 2: prompt "a" again; its baseline uses the history (1, 2, 3, 4)
    a2, _ = compute_advantages(_t([3.0, 4.0]), torch.tensor([0, 0]), cfg, tr, ["a", "a"])
    hist = _t([1.0, 2.0, 3.0, 4.0])
    sd = hist.std(unbiased=False).item()
    torch.testing.assert_close(a2, (_t([3.0, 4.0]) - 2.5) / (sd + 1e-4))
    assert tr.history("a") == [1.0, 2.0, 3.0, 4.0]
    # clear (Flow-GRPO: once per epoch) forgets the history
    tr.clear()
    a3, _ = compute_advantages(_t([3.0, 4.0]), torch.tensor([0, 0]), cfg, tr, ["a", "a"])
    torch.testing.assert_close(a3, _t([-0.5, 0.5]) / (0.5 + 1e-4))


def test_tracker_buffer_min_count_and_global_std():
    tr = PerPromptStatTracker(buffer_size=3, min_count=3)
    cfg = AdvantageConfig()
    r = _t([1.0, 2.0, 10.0, 20.0])
    keys = ["a", "a", "b", "b"]
    a, _ = compute_advantages(r, torch.tensor([0, 0, 1, 1]), cfg, tr, keys)
    # fewer than min_count in history -> batch statistics (DDPO rule)
    torch.testing.assert_close(a, (r - r.mean()) / (r.std() + 1e-4))
    a, _ = compute_advantages(_t([3.0, 4.0]), torch.tensor([0, 0]), cfg, tr, ["a", "a"])
    assert tr.history("a") == [2.0, 3.0, 4.0]  # buffer keeps the 3 most recent
    torch.testing.assert_close(a, (_t([3.0, 4.0]) - 3.0) / (1.0 + 1e-4))
    # Flow-GRPO global_std: per-prompt mean, std of the current batch
    tr2 = PerPromptStatTracker()
    a, _ = compute_advantages(r, torch.tensor([0, 0, 1, 1]), AdvantageConfig(scale="batch"), tr2, keys)
    torch.testing.assert_close(a, (r - _t([1.5, 1.5, 15.0, 15.0])) / (r.std() + 1e-4))


def test_tracker_state_dict_round_trip_is_exact():
    gen = torch.Generator().manual_seed(5)
    tr = PerPromptStatTracker(buffer_size=7)
    keys = ["p0", "p1", "p2"] * 4
    g = torch.tensor([0, 1, 2] * 4)
    for _ in range(3):
        compute_advantages(torch.randn(12, generator=gen, dtype=F64), g, tracker=tr, prompt_keys=keys)
    state = json.loads(json.dumps(tr.state_dict()))  # plain lists survive JSON
    tr2 = PerPromptStatTracker()
    tr2.load_state_dict(state)
    nxt = torch.randn(12, generator=gen, dtype=F64)
    a1, _ = compute_advantages(nxt, g, tracker=tr, prompt_keys=keys)
    a2, _ = compute_advantages(nxt, g, tracker=tr2, prompt_keys=keys)
    assert torch.equal(a1, a2)
    assert tr2.buffer_size == 7 and tr.state_dict() == tr2.state_dict()
    bad = PerPromptStatTracker()
    bad.update([("tuple", 1)], _t([1.0]))
    with pytest.raises(ValueError, match="^keys:"):
        bad.state_dict()
    with pytest.raises(ValueError, match="^state:"):
        tr2.load_state_dict({"keys": []})


def test_tracker_with_nan_and_unsupported_combinations():
    tr = PerPromptStatTracker()
    a, st = compute_advantages(_t([1.0, float("nan"), 3.0]), torch.tensor([0, 0, 0]), tracker=tr,
                               prompt_keys=["a", "a", "a"])
    assert tr.history("a") == [1.0, 3.0] and a[1] == 0.0 and not st["keep"][1]
    with pytest.raises(ValueError, match="^tracker:"):
        compute_advantages(torch.ones(2, 2), torch.tensor([0, 0]), AdvantageConfig(multi_reward="normalize_then_sum"),
                           tr, ["a", "a"])
    with pytest.raises(ValueError, match="^rewards:"):
        tr.update(["a"], _t([float("nan")]))


# ------------------------------------------------------------------------------ trees


def _tree():
    #            0 (root, step 0)
    #         /          \
    #   1 (step 2)      2 (step 2)
    #    /    \        /    |    \
    #  3(5)  4(5)   5(5)  6(5)  7(5)
    parent = torch.tensor([-1, 0, 0, 1, 1, 2, 2, 2])
    step = torch.tensor([0, 2, 2, 5, 5, 5, 5, 5])
    nan = float("nan")
    rewards = _t([nan, nan, nan, 1.0, 3.0, 6.0, 2.0, 4.0])
    return parent, step, rewards


def test_tree_node_values_are_leaf_means():
    parent, _, rewards = _tree()
    v = tree_node_values(parent, rewards)
    # root = mean of all 5 leaves (3.2), not the mean of its children's means (3.0)
    torch.testing.assert_close(v, _t([3.2, 2.0, 4.0, 1.0, 3.0, 6.0, 2.0, 4.0]))
    # a NaN leaf is dropped from its ancestors' means
    r2 = rewards.clone()
    r2[5] = float("nan")
    v2 = tree_node_values(parent, r2)
    assert v2[2].item() == pytest.approx(3.0) and v2[0].item() == pytest.approx(2.5) and math.isnan(v2[5])


def test_tree_node_advantages_against_siblings():
    parent, _, rewards = _tree()
    a = tree_node_advantages(parent, tree_node_values(parent, rewards))
    r2 = math.sqrt(2.0)
    want = [0.0, -1 / (r2 + 1e-4), 1 / (r2 + 1e-4), -1 / (r2 + 1e-4), 1 / (r2 + 1e-4),
            2 / (2 + 1e-4), -2 / (2 + 1e-4), 0.0]
    torch.testing.assert_close(a, _t(want))
    # Dr. GRPO flavour: no std
    a_none = tree_node_advantages(parent, tree_node_values(parent, rewards), AdvantageConfig(scale="none"))
    torch.testing.assert_close(a_none, _t([0.0, -1.0, 1.0, -1.0, 1.0, 2.0, -2.0, 0.0]))


def test_tree_transitions_get_the_advantage_of_the_node_they_create():
    parent, step, rewards = _tree()
    leaves = torch.tensor([3, 4, 5, 6, 7])
    branch = parent[leaves]
    step_node = torch.full((5, 8), -1)
    step_node[:, 2] = branch  # the transition at step 2 creates the leaf's branch node
    step_node[:, 5] = leaves  # the one at step 5 creates the leaf
    adv, valid = tree_transition_advantages(parent, leaves, step_node, rewards[leaves], AdvantageConfig(scale="none"))
    # V1 = 2, V2 = 4: A1 = -1, A2 = +1; leaves against their siblings: 1-2, 3-2, 6-4, 2-4, 4-4
    assert adv[:, 2].tolist() == [-1, -1, 1, 1, 1]
    assert adv[:, 5].tolist() == [-1, 1, 2, -2, 0]
    assert (adv[:, [0, 1, 3, 4, 6, 7]] == 0).all() and valid.all()
    assert adv.dtype == F64 and adv.shape == (5, 8)


def test_tree_only_child_inherits_and_invalid_rows_are_zero():
    #        0
    #      /   \
    #     1     2        (step 1)
    #     |    / \
    #     3   6   7      (3: an only child at step 2; 6, 7 leaves at step 3)
    #    / \
    #   4   5            (step 3)
    parent = torch.tensor([-1, 0, 0, 1, 3, 3, 2, 2])
    leaves = torch.tensor([4, 5, 6, 7])
    step_node = torch.tensor([[-1, 1, 3, 4], [-1, 1, 3, 5], [-1, 2, -1, 6], [-1, 2, -1, 7]])
    total = _t([1.0, 3.0, 5.0, 7.0])
    adv, valid = tree_transition_advantages(parent, leaves, step_node, total, AdvantageConfig(scale="none"))
    # V1 = V3 = 2, V2 = 6: A1 = -2 and node 3 (no sibling) inherits it; leaves -1, +1, -1, +1
    assert adv.tolist() == [[0, -2, -2, -1], [0, -2, -2, 1], [0, 2, 0, -1], [0, 2, 0, 1]]
    for bad in (float("nan"), float("inf"), float("-inf")):  # an invalid row: zeros, out of every statistic
        t = total.clone()
        t[3] = bad
        adv, valid = tree_transition_advantages(parent, leaves, step_node, t, AdvantageConfig(scale="none"))
        assert valid.tolist() == [True, True, True, False] and (adv[3] == 0).all()
        # V2 = 5 (leaf 6 only): A1 = 2 - 3.5, A2 = +1.5; leaf 6 has no valid sibling: 0
        assert adv[2].tolist() == [0, 1.5, 0, 0] and adv[0].tolist() == [0, -1.5, -1.5, -1]


def test_tree_flat_group_is_plain_grpo():
    # a root with G leaf children = one GRPO group; the transition creating each leaf gets A_i
    rewards = _t([1.0, 2.0, 4.0, 9.0])
    parent = torch.tensor([-1, 0, 0, 0, 0])
    leaves = torch.tensor([1, 2, 3, 4])
    step_node = torch.tensor([[-1, 1, -1], [-1, 2, -1], [-1, 3, -1], [-1, 4, -1]])
    adv, _ = tree_transition_advantages(parent, leaves, step_node, rewards)
    a, _ = compute_advantages(rewards, torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(adv[:, 1], a)
    assert (adv[:, [0, 2]] == 0).all()


def test_tree_validation():
    with pytest.raises(ValueError, match="cycle"):
        tree_node_values(torch.tensor([1, 2, 0]), _t([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="^parent:"):
        tree_node_values(torch.tensor([-1, 5]), _t([1.0, 2.0]))
    with pytest.raises(ValueError, match="^parent: nodes must be numbered parents first"):
        tree_transition_advantages(torch.tensor([2, -1, 1]), torch.tensor([0]), torch.tensor([[0]]), _t([1.0]))


def test_multi_granularity_sum_and_mean():
    gen = torch.Generator().manual_seed(2)
    r = torch.randn(8, 2, generator=gen, dtype=F64)  # [N, K granularities]
    g = torch.arange(8) // 4
    a1, _ = compute_advantages(r[:, 0], g)
    a2, _ = compute_advantages(r[:, 1], g)
    s, st = multi_granularity_advantages(r, g, reduce="sum")
    torch.testing.assert_close(s, a1 + a2)
    m, _ = multi_granularity_advantages(r, g, reduce="mean")
    torch.testing.assert_close(m, (a1 + a2) / 2)
    assert len(st["per_granularity"]) == 2 and st["keep"].all()
    # [N, K, R] with per-reward normalisation (G2RPO sums over granularities and rewards)
    rr = torch.randn(8, 2, 3, generator=gen, dtype=F64)
    cfg = AdvantageConfig(multi_reward="normalize_then_sum")
    got, _ = multi_granularity_advantages(rr, g, cfg)
    want = sum(compute_advantages(rr[:, k, j], g)[0] for k in range(2) for j in range(3))
    torch.testing.assert_close(got, want)
    # clip is applied after the sum; a NaN in one granularity invalidates the sample
    rr2 = r.clone()
    rr2[0, 1] = float("nan")
    c, stc = multi_granularity_advantages(rr2, g, AdvantageConfig(clip=0.5))
    assert c.abs().max() <= 0.5 and c[0] == 0.0 and not stc["keep"][0]
    with pytest.raises(ValueError, match="^reduce:"):
        multi_granularity_advantages(r, g, reduce="max")


# ------------------------------------------------------------------------------ +-inf rewards = NaN


_BAD = [float("inf"), float("-inf"), float("nan")]


@pytest.mark.parametrize("cfg", [
    AdvantageConfig(),
    advantage_preset("flow_grpo"),
    AdvantageConfig(scale="batch"),
    AdvantageConfig(center="batch", scale="batch"),
    AdvantageConfig(center="none", scale="none", clip=0.5),
    advantage_preset("dapo"),
    advantage_preset("ngrpo"),
], ids=["trl", "flow_grpo", "batch_std", "batch", "none_clip", "dapo", "ngrpo"])
@pytest.mark.parametrize("bad", _BAD, ids=["+inf", "-inf", "nan"])
def test_infinite_reward_is_invalid_exactly_as_nan(cfg, bad):
    r = _t([0.5, 0.0, 2.0, 1.0, 3.0, 3.0, 4.0, -1.0])
    g = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    ref_r = r.clone()
    ref_r[1] = float("nan")
    got_r = r.clone()
    got_r[1] = bad
    ref, ref_st = compute_advantages(ref_r, g, cfg)
    got, st = compute_advantages(got_r, g, cfg)
    assert torch.equal(got, ref)  # the other members: bit for bit what a NaN gives
    assert got[1] == 0.0 and not st["keep"][1]
    assert torch.equal(st["keep"], ref_st["keep"])
    assert st["invalid_count"] == ref_st["invalid_count"] == 1
    for key in ("reward_mean", "reward_std", "reward_std_mean", "zero_std_count", "filtered_count", "clipped_count"):
        assert st[key] == ref_st[key], key
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("multi", ["sum_then_normalize", "normalize_then_sum"])
@pytest.mark.parametrize("policy", ["any", "all"])
@pytest.mark.parametrize("bad", _BAD, ids=["+inf", "-inf", "nan"])
def test_infinite_reward_column_is_invalid_exactly_as_nan(multi, policy, bad):
    gen = torch.Generator().manual_seed(5)
    r = torch.randn(8, 2, generator=gen, dtype=F64)
    g = torch.arange(8) // 4
    cfg = AdvantageConfig(multi_reward=multi, nan_policy=policy, reward_weights=(1.0, 0.5))
    ref_r, got_r = r.clone(), r.clone()
    ref_r[2, 1], got_r[2, 1] = float("nan"), bad  # one reward of sample 2
    ref_r[5], got_r[5] = float("nan"), bad  # every reward of sample 5
    ref, ref_st = compute_advantages(ref_r, g, cfg)
    got, st = compute_advantages(got_r, g, cfg)
    assert torch.equal(got, ref) and torch.equal(st["keep"], ref_st["keep"])
    assert st["invalid_count"] == ref_st["invalid_count"] == (2 if policy == "any" else 1)
    assert got[5] == 0.0 and not st["keep"][5]
    assert (got[2] == 0.0 and not st["keep"][2]) if policy == "any" else bool(st["keep"][2])


@pytest.mark.parametrize("bad", _BAD, ids=["+inf", "-inf", "nan"])
def test_infinite_reward_with_a_tracker_is_left_out_of_the_history(bad):
    r = _t([1.0, 2.0, 0.0, 4.0])
    keys = ["a", "a", "b", "b"]
    g = torch.tensor([0, 0, 1, 1])
    cfg = AdvantageConfig()
    ref_r, got_r = r.clone(), r.clone()
    ref_r[0], got_r[0] = float("nan"), bad
    t_ref, t_got = PerPromptStatTracker(), PerPromptStatTracker()
    ref, ref_st = compute_advantages(ref_r, g, cfg, tracker=t_ref, prompt_keys=keys)
    got, st = compute_advantages(got_r, g, cfg, tracker=t_got, prompt_keys=keys)
    assert torch.equal(got, ref) and got[0] == 0.0 and not st["keep"][0]
    assert t_got.state_dict() == t_ref.state_dict() and t_got.history("a") == [2.0]
    with pytest.raises(ValueError, match="^rewards:"):
        PerPromptStatTracker().update(["a"], _t([bad]))


@pytest.mark.parametrize("bad", _BAD, ids=["+inf", "-inf", "nan"])
def test_infinite_reward_in_group_stats_granularities_and_trees(bad):
    v = _t([1.0, bad, 3.0, 5.0])
    gs = group_stats(v, torch.zeros(4, dtype=torch.long))
    assert gs.count[0] == 3 and gs.mean[0] == 3.0 and gs.std[0] == 2.0
    # multi-granularity: one granularity's non-finite reward invalidates the sample, as NaN does
    gen = torch.Generator().manual_seed(3)
    r = torch.randn(8, 2, generator=gen, dtype=F64)
    g = torch.arange(8) // 4
    ref_r, got_r = r.clone(), r.clone()
    ref_r[1, 1], got_r[1, 1] = float("nan"), bad
    ref, ref_st = multi_granularity_advantages(ref_r, g)
    got, st = multi_granularity_advantages(got_r, g)
    assert torch.equal(got, ref) and got[1] == 0.0 and not st["keep"][1] and st["invalid_count"] == 1
    # trees: a non-finite leaf is left out of its ancestors' values and gets advantage 0
    parent, step, rewards = _tree()
    ref_l, got_l = rewards.clone(), rewards.clone()
    ref_l[3], got_l[3] = float("nan"), bad
    torch.testing.assert_close(tree_node_values(parent, got_l), tree_node_values(parent, ref_l), equal_nan=True)
    a_ref = tree_node_advantages(parent, tree_node_values(parent, ref_l))
    a_got = tree_node_advantages(parent, tree_node_values(parent, got_l))
    assert torch.equal(a_got, a_ref) and a_got[3] == 0.0
    node_values = tree_node_values(parent, rewards)
    node_values[4] = bad  # a non-finite node value: 0, and out of its siblings' statistics
    ref_v = node_values.clone()
    ref_v[4] = float("nan")
    assert torch.equal(tree_node_advantages(parent, node_values), tree_node_advantages(parent, ref_v))
    leaves = torch.tensor([3, 4, 5, 6, 7])
    step_node = torch.stack([parent[leaves], leaves], dim=1)
    t_ref, v_ref = tree_transition_advantages(parent, leaves, step_node, ref_l[leaves])
    t_got, v_got = tree_transition_advantages(parent, leaves, step_node, got_l[leaves])
    assert torch.equal(t_got, t_ref) and torch.equal(v_got, v_ref) and not v_got[0]
