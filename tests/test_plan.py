"""Tests of flowrl.flow.plan: step patterns of every plan kind, MixGRPO's window schedules,
Flow-GRPO-Fast's random window, process agreement through plan_generator, and validation errors."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from plans import plan_config

from flowrl.flow.plan import (
    PLAN_KINDS,
    PlanConfig,
    WindowConfig,
    build_plan,
    eval_plan,
    granular_sigmas,
    plan_generator,
    scheduled_window_start,
    shift_interval_at,
)


def _steps(mask: torch.Tensor) -> list[int]:
    return torch.nonzero(mask).flatten().tolist()


def _plan(num_steps: int = 10, iteration: int = 0, seed: int = 0, **kw):
    return build_plan(plan_config(**kw), num_steps, iteration, plan_generator(seed, iteration))


# ---------------------------------------------------------------------------------------------
# patterns of each kind
# ---------------------------------------------------------------------------------------------


def test_full_is_all_sde_and_never_trains_the_last_step():
    p = _plan(10, kind="full", noise_level=0.7)
    assert _steps(p.sde) == list(range(10))
    assert _steps(p.trained) == list(range(9))  # Flow-GRPO: timestep_fraction 0.99 -> 9 of 10
    assert torch.allclose(p.noise_level, torch.full((10,), 0.7))
    assert p.leaves == 1 and not p.is_tree
    q = _plan(10, kind="full", train_last_step=True)
    assert _steps(q.trained) == list(range(10))


def test_random_subset_per_sample_draws_its_own_subset():
    p = _plan(16, kind="random_subset", subset=dict(fraction=0.6), noise_level=0.3, sde="dance_sde")
    assert _steps(p.sde) == list(range(16)) and p.sde_kind == "dance_sde"
    assert _steps(p.trained) == list(range(15))  # eligible: all but the last
    assert p.subset_size == int(15 * 0.6) == 9  # DanceGRPO: about 9 of 15 steps
    g = torch.Generator().manual_seed(1)
    m = p.trained_mask(12, g)
    assert m.shape == (12, 16)
    assert (m.sum(1) == 9).all()
    assert not m[:, 15].any()  # never the last step
    assert len({tuple(r.tolist()) for r in m}) > 1  # rows differ
    again = p.trained_mask(12, torch.Generator().manual_seed(1))
    assert torch.equal(m, again)


def test_random_subset_shared_per_iteration():
    p = _plan(16, iteration=5, kind="random_subset", subset=dict(fraction=0.5, per_sample=False))
    assert p.subset_size == 0
    assert int(p.trained.sum()) == int(15 * 0.5)
    assert not bool(p.trained[15])
    m = p.trained_mask(4)
    assert (m == p.trained).all()
    q = _plan(16, iteration=5, kind="random_subset", subset=dict(fraction=0.5, per_sample=False))
    assert torch.equal(p.trained, q.trained)


def test_window_pattern_sde_inside_ode_outside():
    p = _plan(10, iteration=0, kind="window", window=dict(size=4, shift_interval=5, stride=1))
    assert _steps(p.sde) == [0, 1, 2, 3] == _steps(p.trained)
    assert (p.noise_level[~p.sde] == 0).all() and (p.noise_level[p.sde] == 0.7).all()
    p = _plan(10, iteration=5 * 6, kind="window", window=dict(size=4, shift_interval=5, stride=1))
    assert _steps(p.sde) == [6, 7]  # cut before num_steps - 2 = 8 (MixGRPO's max_timesteps)
    p = _plan(10, iteration=5 * 7, kind="window", window=dict(size=4, shift_interval=5, stride=1))
    assert _steps(p.sde) == [7]  # the last start that trains a step
    p = _plan(10, iteration=5 * 8, kind="window", window=dict(size=4, shift_interval=5, stride=1))
    assert _steps(p.sde) == [0, 1, 2, 3]  # past the last start: rolled back


def test_mixgrpo_flash_fields_pass_through():
    p = _plan(25, kind="window", window=dict(size=4, shift_interval=20), ode_solver="dpm2m", tail=dict(ratio=0.4))
    assert p.ode_solver == "dpm2m" and p.compress_ratio == 0.4 and p.compress_shift == 3.0
    frozen = [_steps(_plan(25, iteration=it, kind="window", window=dict(size=4, stride=0)).sde) for it in (0, 30, 500)]
    assert frozen == [[0, 1, 2, 3]] * 3  # Flash*: stride 0 keeps the window at the start


def test_random_window_lies_in_first_half_and_covers_it():
    starts = set()
    for it in range(300):
        p = _plan(10, iteration=it, kind="random_window", window=dict(size=3), sde="cps", noise_level=0.8)
        s = _steps(p.sde)
        assert s == list(range(s[0], s[0] + 3))
        assert 0 <= s[0] and s[-1] < 10 // 2  # Flow-GRPO-Fast: window in [0, num_steps // 2)
        assert s == _steps(p.trained)
        starts.add(s[0])
    assert starts == {0, 1, 2}  # every admissible start is drawn
    custom = {tuple(_steps(_plan(12, iteration=i, kind="random_window", window=dict(size=2, range=[3, 7])).sde))
              for i in range(200)}
    assert custom == {(3, 4), (4, 5), (5, 6)}


def test_singular_one_sde_step_from_eligible():
    seen = set()
    for it in range(200):
        p = _plan(16, iteration=it, kind="singular", granularities=[1, 2])
        s = _steps(p.sde)
        assert len(s) == 1 and s == _steps(p.trained)
        assert 0 <= s[0] < 8  # G²RPO: steps 0..7 of 16
        seen.add(s[0])
        assert p.granularities == (1, 2)
    assert seen == set(range(8))
    cyc = [_steps(_plan(16, iteration=it, kind="singular", singular=dict(steps=[2, 5, 9], choice="cycle")).sde)[0]
           for it in range(6)]
    assert cyc == [2, 5, 9, 2, 5, 9]


def test_tree_fixed_branch_steps_and_noise_per_depth():
    p = _plan(10, kind="tree", tree=dict(branch_factors=[3, 2], branch_steps=[1, 4], branch_noise=[0.9, 0.5]))
    assert _steps(p.sde) == [1, 4] == _steps(p.trained)
    assert p.branch.tolist() == [1, 3, 1, 1, 2, 1, 1, 1, 1, 1]
    assert p.leaves == 6 and p.is_tree and p.depth == 2
    assert p.noise_level[1].item() == pytest.approx(0.9) and p.noise_level[4].item() == pytest.approx(0.5)
    assert (p.noise_level[~p.sde] == 0).all()


def test_tree_sliding_window_keeps_full_depth():
    depth = 3
    for it in range(0, 200, 7):
        p = _plan(8, iteration=it, kind="tree", tree=dict(branch_factors=[2, 2, 2]), window=dict(shift_interval=4, stride=1))
        s = _steps(p.sde)
        assert len(s) == depth and s == list(range(s[0], s[0] + depth))
        assert s[-1] <= 6  # never the last step (7)
        assert p.leaves == 8


@pytest.mark.parametrize("kind", PLAN_KINDS)
def test_last_step_never_trained_unless_asked(kind):
    extra = {"window": dict(size=3)} if "window" in kind else {}
    for it in range(0, 120, 3):
        p = _plan(8, iteration=it, kind=kind, **extra)
        assert not bool(p.trained[-1]), (kind, it)
        assert bool((p.trained <= p.sde).all())  # trained steps are stochastic
        m = p.trained_mask(5, torch.Generator().manual_seed(it))
        assert not m[:, -1].any()
    assert bool(_plan(8, kind="full", train_last_step=True).trained[-1])  # unless asked
    # MixGRPO's window ends before its last start (max_timesteps), so even with train_last_step it never
    # reaches the last step; it does reach the one before
    reached = {s for it in range(20) for s in _steps(_plan(8, iteration=it, kind="window", window=dict(size=2, shift_interval=1),
                                                             train_last_step=True).trained)}
    assert max(reached) == 6


def test_eval_plan_is_all_ode():
    p = eval_plan(40)
    assert p.num_steps == 40 and not p.sde.any() and not p.trained.any() and p.leaves == 1
    assert p.first_sde is None and p.ode_solver == "euler"
    with pytest.raises(ValueError, match="ode_solver"):
        eval_plan(4, ode_solver="rk4")


# ---------------------------------------------------------------------------------------------
# MixGRPO window schedules
# ---------------------------------------------------------------------------------------------


def _reference_starts(n_iter, *, max_start, stride, tau, roll_back, first=0):
    """MixGRPO's state machine stepped one iteration at a time: read the start, then count the
    iteration; after tau(start) iterations move by stride; beyond max_start roll back (or clip)."""
    cur, in_group, out = first, 0, []
    for _ in range(n_iter):
        out.append(cur)
        in_group += 1
        if in_group >= tau(cur):
            in_group = 0
            cur += stride
        if cur > max_start:
            if roll_back:
                cur, in_group = first, 0
            else:
                cur = max_start
    return out


def test_progressive_hand_values():
    # num_steps 10 -> last start 8; tau = 2, stride 1
    got = [scheduled_window_start(t, max_start=8, stride=1, shift_interval=2) for t in range(20)]
    assert got == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 0, 0]
    # no overlap (stride = window = 4), no roll-back: clip at the last start
    got = [scheduled_window_start(t, max_start=8, stride=4, shift_interval=3, roll_back=False) for t in range(12)]
    assert got == [0, 0, 0, 4, 4, 4, 8, 8, 8, 8, 8, 8]
    got = [scheduled_window_start(t, max_start=7, stride=3, shift_interval=1, roll_back=False) for t in range(5)]
    assert got == [0, 3, 6, 7, 7]  # 9 > 7 is clipped to 7


def test_shift_interval_formulas():
    # exp_decay: ceil(25 exp(-0.1 relu(t - 13)))
    assert shift_interval_at(0, schedule="exp_decay", shift_interval=25, max_start=23) == 25
    assert shift_interval_at(13, schedule="exp_decay", shift_interval=25, max_start=23) == 25
    assert shift_interval_at(14, schedule="exp_decay", shift_interval=25, max_start=23) == math.ceil(25 * math.exp(-0.1))
    assert shift_interval_at(20, schedule="exp_decay", shift_interval=25, max_start=23) == 13  # ceil(12.41)
    # decay: linear from tau_max at 0 to tau_min at max_start
    assert shift_interval_at(0, schedule="decay", shift_interval=20, max_start=10) == 20
    assert shift_interval_at(10, schedule="decay", shift_interval=20, max_start=10) == 1  # MixGRPO's min default 1
    assert shift_interval_at(5, schedule="decay", shift_interval=20, max_start=10, min_shift_interval=4) == 12
    assert shift_interval_at(3, schedule="progressive", shift_interval=7, max_start=10) == 7


@pytest.mark.parametrize("schedule", ["progressive", "decay", "exp_decay"])
@pytest.mark.parametrize("stride,roll_back,first", [(1, True, 0), (2, True, 1), (3, False, 0), (1, False, 2)])
def test_window_schedules_match_the_state_machine(schedule, stride, roll_back, first):
    max_start, tau0 = 23, 6  # 25 steps as MixGRPO's recipe (last start 23)

    def tau(s):
        return shift_interval_at(s, schedule=schedule, shift_interval=tau0, max_start=max_start, exp_threshold=5)

    ref = _reference_starts(600, max_start=max_start, stride=stride, tau=tau, roll_back=roll_back, first=first)
    got = [scheduled_window_start(t, max_start=max_start, stride=stride, shift_interval=tau0, schedule=schedule,
                                  roll_back=roll_back, first=first, exp_threshold=5) for t in range(600)]
    assert got == ref
    if schedule != "progressive" and roll_back:  # later positions are visited for fewer iterations
        assert ref.count(first) > ref.count(max(ref))


def test_build_plan_window_follows_schedule():
    cfg = dict(kind="window", window=dict(size=4, shift_interval=25, stride=1, schedule="exp_decay"))
    for it in (0, 24, 25, 400, 1234):
        p = _plan(25, iteration=it, **cfg)
        start = scheduled_window_start(it, max_start=23, stride=1, shift_interval=25, schedule="exp_decay",
                                       last_start=22)
        assert _steps(p.sde) == list(range(start, min(start + 4, 23)))


def test_random_schedule_window_fits():
    for it in range(100):
        s = _steps(_plan(10, iteration=it, kind="window", window=dict(size=4, schedule="random")).sde)
        assert len(s) == 4 and s[-1] <= 8


# ---------------------------------------------------------------------------------------------
# agreement across processes
# ---------------------------------------------------------------------------------------------


def _plan_tensors(p):
    return (p.sde, p.trained, p.noise_level, p.branch)


@pytest.mark.parametrize("kind", ["random_subset", "window", "random_window", "singular", "tree"])
def test_same_seed_and_iteration_give_the_same_plan(kind):
    cfg = plan_config(kind=kind, window=dict(size=3, schedule="random"), subset=dict(per_sample=False))
    for it in range(20):
        a = build_plan(cfg, 12, it, plan_generator(7, it))
        b = build_plan(cfg, 12, it, plan_generator(7, it))  # "another process"
        assert all(torch.equal(x, y) for x, y in zip(_plan_tensors(a), _plan_tensors(b)))
    plans = {tuple(build_plan(cfg, 12, it, plan_generator(7, it)).trained.tolist()) for it in range(20)}
    assert len(plans) > 1  # iterations differ from each other


def test_plan_generator_streams():
    a = torch.rand(4, generator=plan_generator(0, 0))
    assert torch.equal(a, torch.rand(4, generator=plan_generator(0, 0)))
    assert not torch.equal(a, torch.rand(4, generator=plan_generator(0, 1)))
    assert not torch.equal(a, torch.rand(4, generator=plan_generator(1, 0)))
    assert plan_generator(0, 0).device.type == "cpu"
    with pytest.raises(ValueError, match="iteration"):
        plan_generator(0, -1)


# ---------------------------------------------------------------------------------------------
# granularities
# ---------------------------------------------------------------------------------------------


def test_granular_sigmas():
    """G2RPO (bcmi/Granular-GRPO fastvideo/train_g2rpo_hps.py, checked at ef6ec9f) visits
    sigmas[:k+2] + sigmas[k+2::g] but never evaluates the last kept sigma: it decodes the x0
    prediction at the one before, i.e. jumps from there to 0."""
    tail = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.0])  # 6 steps
    assert torch.equal(granular_sigmas(tail, 1), tail)
    assert granular_sigmas(tail, 2).tolist() == pytest.approx([0.9, 0.8, 0.6, 0.0])  # 0.4 kept last -> 0
    assert granular_sigmas(tail, 3).tolist() == pytest.approx([0.9, 0.8, 0.0])  # 0.5 kept last -> 0
    assert granular_sigmas(tail, 5).tolist() == pytest.approx([0.9, 0.8, 0.0])  # 1 + 5 = 6 is the last
    assert granular_sigmas(tail, 6).tolist() == pytest.approx([0.9, 0.0])  # only 0.8 kept: x0 from 0.9
    assert granular_sigmas(tail[:-1], 2).tolist() == pytest.approx([0.9, 0.8, 0.6, 0.4])
    for g in range(1, 8):
        s = granular_sigmas(tail, g)
        assert s[0] == tail[0] and s[-1] == tail[-1] and bool((s[1:] < s[:-1]).all())
        if g < tail.numel() - 2:
            assert s[1] == tail[1]  # one fine step first, then every g-th sigma


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, num_steps, field",
    [
        (dict(kind="windows"), 10, "kind"),
        (dict(sde="ddim"), 10, "sde"),
        (dict(noise_level=-0.1), 10, "noise_level"),
        (dict(noise_level=1.5, sde="cps"), 10, "noise_level"),
        (dict(subset=dict(fraction=0.0)), 10, "subset.fraction"),
        (dict(kind="window", window=dict(size=10)), 10, "window.size"),  # larger than the 9 trainable steps
        (dict(kind="window", window=dict(size=0)), 10, "window.size"),
        (dict(window=dict(stride=-1)), 10, "window.stride"),
        (dict(window=dict(shift_interval=0)), 10, "window.shift_interval"),
        (dict(kind="random_window", window=dict(size=3, range=[2, 4])), 10, "window.range"),
        (dict(kind="random_window", window=dict(size=2, range=[0, 10])), 10, "window.range"),  # reaches the last step
        (dict(kind="random_window", window=dict(size=6)), 10, "window.size"),  # 6 > 10 // 2
        (dict(ode_solver="rk4"), 10, "ode_solver"),
        (dict(tail=dict(ratio=1.5)), 10, "tail.ratio"),
        (dict(tail=dict(ratio=0.4), granularities=[1, 2]), 10, "tail.ratio"),
        (dict(granularities=[]), 10, "granularities"),
        (dict(granularities=[0]), 10, "granularities"),
        (dict(kind="singular", singular=dict(steps=[3, 9])), 10, "singular.steps"),  # 9 is the last step
        (dict(singular=dict(steps=[])), 10, "singular.steps"),
        (dict(kind="tree", tree=dict(branch_factors=[2, 0])), 10, "tree.branch_factors"),
        (dict(kind="tree", tree=dict(branch_factors=[2, 2], branch_steps=[3])), 10, "tree.branch_steps"),
        (dict(kind="tree", tree=dict(branch_factors=[2, 2], branch_steps=[4, 2])), 10, "tree.branch_steps"),
        (dict(kind="tree", tree=dict(branch_factors=[2] * 10)), 10, "tree.branch_factors"),
        (dict(kind="tree", tree=dict(branch_noise=[0.5])), 10, "tree.branch_noise"),
        (dict(kind="tree", tree=dict(branch_noise=[0.5, 0.0])), 10, "tree.branch_noise"),
        (dict(kind="full"), 1, "train_last_step"),
        (dict(window=dict(schedule="cosine")), 10, "window.schedule"),
        (dict(kind="window", window=dict(start=9)), 10, "window.start"),
        (dict(step_weight_scale=2.0), 10, "step_weight_scale"),  # only with step_weighting: noise_aware
    ],
)
def test_validate_errors_name_the_field(kw, num_steps, field):
    cfg = plan_config(**kw)
    with pytest.raises(ValueError) as ei:
        cfg.validate(num_steps)
    assert str(ei.value).startswith(f"{field}:"), str(ei.value)
    with pytest.raises(ValueError):
        build_plan(cfg, num_steps, 0, plan_generator(0, 0))


@dataclasses.dataclass
class _Sample:
    num_steps: int = 6


@dataclasses.dataclass
class _Root:
    sample: _Sample = dataclasses.field(default_factory=_Sample)
    plan: PlanConfig = dataclasses.field(default_factory=PlanConfig)


def test_defaults_are_valid_and_nest_into_a_run_config():
    from flowrl import config as C

    for kind in PLAN_KINDS:
        PlanConfig(kind=kind, window=WindowConfig(size=3)).validate(10)

    cfg = C.from_dict(_Root, {"plan": {"kind": "window", "window": {"size": 3}, "granularities": [1, 2]}})
    C.validate(cfg)  # validate() receives the root and reads sample.num_steps
    bad = C.from_dict(_Root, {"sample": {"num_steps": 3}, "plan": {"kind": "window", "window": {"size": 3}}})
    with pytest.raises(C.ConfigError) as ei:
        C.validate(bad)
    assert ei.value.key == "plan.window.size"
    bad = C.from_dict(_Root, {"plan": {"window": {"size": 0}}})  # a section's own check: its dotted key
    with pytest.raises(C.ConfigError) as ei:
        C.validate(bad)
    assert ei.value.key == "plan.window.size"
    with pytest.raises(C.ConfigError) as ei:
        C.from_dict(_Root, {"plan": {"kind": "tre"}})
    assert "did you mean 'tree'" in str(ei.value)
