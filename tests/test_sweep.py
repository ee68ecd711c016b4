"""Singular sweeps (``plan.singular.choice: all``: every eligible step branches each iteration, G²RPO's
``eta_step_list`` loop and TempFlow-GRPO's per-step branches) and absolute noise-aware step weights
(``plan.step_weight_scale``, TempFlow-GRPO's ``2.25 * s_j``).

* plan: a sweep marks every eligible step and is flagged ``sweep``; ``singular_at(k)`` is the plain
  singular plan of one branch;
* sampler (an analytic Gaussian policy and the tiny SD3 pipeline): ``P·K·G`` rows, one stochastic and
  trained transition per row at its branch step, every branch of a prompt starting from the state
  a plain all-ODE Euler run reaches at that step (exactly), independent SDE noise per branch step,
  granular continuations, row layout and group ids, a prompt's rows independent of the batch;
* the training loop: advantages normalised within (prompt, branch step) groups, multi-granularity
  rewards, minibatches of whole branch steps in step order, and a 2-step tiny SD3 run that moves
  the weights;
* step weights: ``scale * s`` exactly, the loss and gradient linear in the scale, null = ``s / mean s``;
* validation: a sweep without ``sample.same_noise``, an unknown choice, an impossible minibatch split.
"""
from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from flowrl.config import ConfigError, load_run_config
from flowrl.core.losses import LossConfig, loss_normalizers, noise_aware_weights
from flowrl.flow.learner import FlowLearner, scaled_noise_weights
from flowrl.flow.plan import PlanConfig, build_plan, eval_plan, granular_sigmas, plan_generator
from flowrl.flow.sampler import Rollout, sample
from flowrl.flow.steps import ode_step, sde_step
from plans import plan_config
from toy_policies import GaussianPolicy

H = W = 32
PROMPTS = ["a red cube", "two green dogs on a hill"]
MSL = 8


# ---------------------------------------------------------------------------------------------
# an analytic, batch-invariant policy with the sampler's protocol
# ---------------------------------------------------------------------------------------------


# GaussianPolicy (tests/toy_policies.py): v = E[eps - x0 | x_t] row-wise, so any batching gives bitwise the same rows


@pytest.fixture(scope="module")
def sd3():
    from flowrl.flow.policy import FlowPolicy
    from flowrl.demo.tiny_image import build_tiny_sd3_pipeline

    return FlowPolicy.from_pipeline(build_tiny_sd3_pipeline(seed=0), max_sequence_length=MSL)


@pytest.fixture(params=["toy", "sd3"])
def policy(request):
    return GaussianPolicy() if request.param == "toy" else request.getfixturevalue("sd3")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _sweep_plan(S: int, steps, **kw):
    return build_plan(plan_config(kind="singular", singular=dict(choice="all", steps=list(steps)), **kw), S, 0)


def _sweep(policy, plan, G, *, seed=0, generator=None, prompts=PROMPTS, guidance=3.0) -> Rollout:
    return sample(policy, list(prompts), plan, group_size=G, height=H, width=W, guidance_scale=guidance,
                  generator=_gen(seed) if generator is None else generator, same_noise=True)


# ---------------------------------------------------------------------------------------------
# (1) plan
# ---------------------------------------------------------------------------------------------


def test_plan_sweep_marks_every_eligible_step():
    S = 10
    cfg = plan_config(kind="singular", singular=dict(choice="all", steps=[4, 1, 2]))
    for it in (0, 7):  # deterministic: every iteration sweeps the same steps
        plan = build_plan(cfg, S, it, plan_generator(3, it))
        assert plan.sweep and plan.kind == "singular"
        assert plan.sde_steps == [1, 2, 4] and plan.trained_steps == [1, 2, 4]
        assert plan.noise_level[[1, 2, 4]].tolist() == pytest.approx([cfg.noise_level] * 3)
        assert float(plan.noise_level.sum()) == pytest.approx(3 * cfg.noise_level)
        assert "sweep" in plan.describe()
    assert cfg.groups_per_prompt(S) == 3 and cfg.is_sweep
    # default eligible steps: [0, S // 2)
    dflt = plan_config(kind="singular", singular=dict(choice="all"))
    assert build_plan(dflt, S, 0).sde_steps == list(range(5)) and dflt.groups_per_prompt(S) == 5
    # one branch: the plain singular plan of that step
    one = build_plan(cfg, S, 0).singular_at(2)
    assert one.sde_steps == [2] and one.trained_steps == [2] and not one.sweep
    assert float(one.noise_level.sum()) == pytest.approx(cfg.noise_level)
    with pytest.raises(ValueError, match="step"):
        build_plan(cfg, S, 0).singular_at(3)
    # other choices are not sweeps; random / cycle still pick one step
    for choice in ("random", "cycle"):
        c = plan_config(kind="singular", singular=dict(choice=choice, steps=[1, 2, 4]))
        p = build_plan(c, S, 5, plan_generator(0, 5))
        assert not p.sweep and len(p.sde_steps) == 1 and c.groups_per_prompt(S) == 1
    assert plan_config(kind="full", singular=dict(choice="all")).groups_per_prompt(S) == 1


# ---------------------------------------------------------------------------------------------
# (2) sampler
# ---------------------------------------------------------------------------------------------


def _euler_trunk(policy, x, S, guidance, P):
    """The states x_0 .. x_S of a plain all-ODE Euler run from ``x`` (P rows, one per prompt),
    making the sampler's velocity calls (same rows, same inputs)."""
    emb = policy.encode_prompts(PROMPTS).select(torch.arange(P))
    sig = policy.sigmas(S, H, W)
    states = [x]
    for i in range(S):
        v = policy.velocity(x, sig[i].expand(P).contiguous(), emb, guidance)
        x = x + v * (sig[i + 1] - sig[i])
        states.append(x)
    return states


def test_sweep_rollout_rows_trunk_and_noise(policy):
    S, G, steps = 5, 3, [0, 1, 3]
    K, P = len(steps), len(PROMPTS)
    plan = _sweep_plan(S, steps, granularities=[1, 2])
    r = _sweep(policy, plan, G)
    N = P * K * G
    assert r.num_samples == N and r.num_stored_steps == 1 and r.groups_per_prompt == K
    assert r.latents.shape[:2] == (N, 2) and r.means.shape[:2] == (N, 1)
    assert r.step_index.tolist() == [-1]
    # every row: exactly one transition, stochastic and trained, at its branch step
    assert r.stochastic.all() and r.trained.all() and (r.stds > 0).all() and torch.isfinite(r.log_probs).all()
    # layout: prompt-major, then branch step in step order, then member; one group per (prompt, step)
    rows = [(p, j, g) for p in range(P) for j in range(K) for g in range(G)]
    assert r.prompt_index.tolist() == [p for p, _, _ in rows]
    assert r.branch_step.tolist() == [steps[j] for _, j, _ in rows]
    assert r.group_id.tolist() == [p * K + j for p, j, _ in rows]
    sig = policy.sigmas(S, H, W)
    assert torch.equal(r.sigmas[:, 0], sig[r.branch_step])
    assert torch.equal(r.sigma_next[:, 0], sig[r.branch_step + 1])
    assert (r.noise_levels == plan.noise_level[steps[0]]).all()

    # the trunk: the prompt's one initial noise through a plain Euler run; exact in this process
    trunk = _euler_trunk(policy, policy.initial_noise(P, H, W, _gen(0)).float(), S, 3.0, P)
    for n, (p, j, _) in enumerate(rows):
        assert torch.equal(r.latents[n, 0].float(), trunk[steps[j]][p]), (n, p, steps[j])

    # the stored transition is re-scored exactly, and its noise differs between members and branch steps
    emb = policy.encode_prompts(PROMPTS).select(r.prompt_index)
    x = r.latents[:, 0].float()
    v = policy.velocity(x, r.sigmas[:, 0], emb, 3.0)
    scored = sde_step(x, v, r.sigmas[:, 0], r.sigma_next[:, 0], r.noise_levels[:, 0], prev_sample=r.latents[:, 1].float(),
                      kind=r.sde_kind, reduction=r.reduction)
    torch.testing.assert_close(scored.log_prob, r.log_probs[:, 0], rtol=1e-5, atol=1e-5)
    eps = (r.latents[:, 1].float() - scored.mean) / scored.std.reshape(-1, 1, 1, 1)
    flat = eps.reshape(N, -1)
    for a in range(N):
        for b in range(a + 1, N):
            assert not torch.allclose(flat[a], flat[b], atol=1e-3), ("same SDE noise", rows[a], rows[b])

    # granular continuations: one final per granularity, the fine one differs from the coarse one
    assert r.final_latents.shape[:2] == (N, 2) and r.images_per_granularity.shape[:3] == (N, 2, 3)
    assert torch.equal(r.images, r.images_per_granularity[:, 0])
    assert not torch.equal(r.final_latents[:, 0], r.final_latents[:, 1])

    # deterministic, and a new seed changes it
    again = _sweep(policy, plan, G)
    for name in Rollout._ROW_FIELDS:
        a, b = getattr(r, name), getattr(again, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    assert not torch.equal(_sweep(policy, plan, G, seed=1).final_latents, r.final_latents)


def test_sweep_continuations_and_nfe_on_the_gaussian_flow():
    """The tail after the branch step is the plain ODE continuation at each granularity (exact), and
    the NFE is the K singular samplings': (k + 1)·P trunk rows + G·P rows per tail step."""
    pol = GaussianPolicy()
    S, G, steps, grans = 7, 2, [0, 2, 3], [1, 2]
    P = len(PROMPTS)
    plan = _sweep_plan(S, steps, granularities=grans)
    pol.calls.clear()
    r = _sweep(pol, plan, G)
    sig = pol.sigmas(S, H, W)
    emb = pol.encode_prompts(PROMPTS).select(r.prompt_index)
    for gi, g in enumerate(grans):
        for n in range(r.num_samples):
            k = int(r.branch_step[n])
            x = r.latents[n:n + 1, 1].float()
            tail = granular_sigmas(sig[k + 1:], g)
            for j in range(tail.numel() - 1):
                v = pol.velocity(x, tail[j].reshape(1), emb.select([n]), 3.0)
                x = ode_step(x, v, tail[j], tail[j + 1])
            assert torch.equal(r.final_latents[n, gi].float(), x[0]), (n, g)
    tails = sum(granular_sigmas(sig[k + 1:], g).numel() - 1 for k in steps for g in grans)
    assert r.nfe == P * sum(k + 1 for k in steps) + G * P * tails


def test_sweep_prompt_independent_of_batch_with_per_prompt_generators():
    pol = GaussianPolicy()
    plan = _sweep_plan(5, [0, 2])
    both = _sweep(pol, plan, 2, generator=[_gen(10), _gen(11)])
    alone = _sweep(pol, plan, 2, generator=[_gen(11)], prompts=PROMPTS[1:])
    rows = (both.prompt_index == 1).nonzero().flatten()
    for name in ("latents", "log_probs", "final_latents", "branch_step"):
        assert torch.equal(getattr(both, name)[rows], getattr(alone, name)), name
    # per-prompt generators also give each branch step its own noise
    assert not torch.equal(both.latents[0, 1], both.latents[2, 1])


def test_sweep_rows_feed_group_advantages():
    """Group ids of a sweep keep (prompt, step) groups apart: per-group offsets of the reward do
    not change the advantages, and every group's advantages have mean 0."""
    from flowrl.core.advantages import AdvantageConfig, compute_advantages, multi_granularity_advantages

    pol = GaussianPolicy()
    r = _sweep(pol, _sweep_plan(5, [0, 1, 2], granularities=[1, 2]), 4)
    base = r.final_latents.float().mean(dim=(2, 3, 4))  # [N, 2]: a reward per granularity
    offset = 100.0 * r.group_id.float().unsqueeze(1)  # wildly different per (prompt, step)
    for cfg in (AdvantageConfig(), AdvantageConfig(std_unbiased=False, eps=1e-4)):
        a, _ = compute_advantages(base[:, 0], r.group_id, cfg)
        b, _ = compute_advantages(base[:, 0] + offset[:, 0], r.group_id, cfg)
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
        for gid in r.group_id.unique():
            assert abs(float(a[r.group_id == gid].mean())) < 1e-5
        m, _ = multi_granularity_advantages((base + offset).unsqueeze(-1), r.group_id, cfg)
        for gid in r.group_id.unique():
            assert abs(float(m[r.group_id == gid].mean())) < 1e-5


# ---------------------------------------------------------------------------------------------
# (3) + (4) the training loop on the tiny SD3 model
# ---------------------------------------------------------------------------------------------

PLUGIN = "flowrl_sweeptest_plugin"
PLUGIN_SRC = textwrap.dedent(
    '''
    def make_brightness(device=None, dtype=None, checkpoint=None, **_):
        def score(images, prompts, **meta):
            return images.float().mean(dim=(1, 2, 3)).cpu()
        return score
    '''
)
LR = 3e-4


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory) -> Path:
    from flowrl.demo.tiny_image import save_tiny

    return Path(save_tiny("sd3", tmp_path_factory.mktemp("tiny_sd3")))


@pytest.fixture()
def isolated(tmp_path, monkeypatch):
    (tmp_path / f"{PLUGIN}.py").write_text(PLUGIN_SRC, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    det = torch.are_deterministic_algorithms_enabled()
    yield tmp_path
    torch.use_deterministic_algorithms(det)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _sweep_config(model_dir: Path, out: Path, plan=(), **train) -> dict:
    return {
        "output_dir": str(out), "seed": 0, "max_steps": 2, "resume": "none", "checkpoint_every": 1, "eval_every": 2,
        "rewards": {f"{PLUGIN}:make_brightness": 1.0},
        "model": {"family": "sd3", "path": str(model_dir)},
        "sample": {"height": 32, "width": 32, "num_steps": 3, "eval_num_steps": 3, "guidance_scale": 1.0,
                   "group_size": 3, "prompts_per_step": 2, "same_noise": True},
        "plan": {"kind": "singular", "singular": {"choice": "all", "steps": [0, 1]}, "granularities": [1, 2], **dict(plan)},
        "data": {"train": "shapes:train", "eval": "shapes:test"},
        "eval": {"num_prompts": 1, "seeds": [0], "at_start": False},
        "train": {"learning_rate": LR, "weight_decay": 0.0, "progress": False, "tracker": "none", "keep_last": 10,
                  **train},
        "lora": {"rank": 4, "alpha": 8},
    }


def _write(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def test_sweep_training_run(sd3_dir, isolated, monkeypatch):
    """Two steps of a G²RPO-style sweep (branch steps [0, 1], granularities [1, 2]) with
    ``num_minibatches = K = 2``: each optimizer step holds one branch step of every prompt, in step
    order; the advantages are normalised within (prompt, step) groups; losses are finite and the
    weights move. TempFlow's absolute step weights ride along (passed from the config)."""
    from flowrl.train import tasks
    from flowrl.train.loop import train

    tmp = isolated
    seen = []
    orig_grad, orig_score = tasks.FlowTask.minibatch_gradient, tasks.FlowTask.score

    def grad(self, ro, advantages, **kw):
        seen.append(("grad", ro.branch_step.clone(), ro.group_id.clone(), ro.prompt_index.clone(),
                     advantages.clone(), self.learner.step_weight_scale))
        return orig_grad(self, ro, advantages, **kw)

    def score(self, ro, records):
        r, names, info = orig_score(self, ro, records)
        seen.append(("score", r.clone(), ro.group_id.clone()))
        return r, names, info

    monkeypatch.setattr(tasks.FlowTask, "minibatch_gradient", grad)
    monkeypatch.setattr(tasks.FlowTask, "score", score)
    run = tmp / "run"
    cfg = _sweep_config(sd3_dir, run, plan={"step_weighting": "noise_aware", "step_weight_scale": 2.25}, num_minibatches=2)
    summary = train(load_run_config(_write(cfg, tmp / "run.yaml")))
    assert summary["steps"] == 2

    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        for k in ("loss", "grad_norm", "reward/total", "ratio_mean"):
            assert math.isfinite(m[k]), (m["step"], k, m[k])
        assert m["skipped_optimizer_steps"] == 0 and m["grad_norm"] > 0
        assert abs(m["ratio_first_min"] - 1) < 1e-4 and abs(m["ratio_first_max"] - 1) < 1e-4

    P, K, G = 2, 2, 3
    scores = [s for s in seen if s[0] == "score"]
    grads = [s for s in seen if s[0] == "grad"]
    assert len(scores) == 2 and len(grads) == 4  # 2 steps x 2 minibatches
    for r, gid in [(s[1], s[2]) for s in scores]:
        assert r.shape == (P * K * G, 2, 1)  # rows x granularities x rewards
        assert gid.tolist() == [i // G for i in range(P * K * G)]
    for i, (_, branch, gid, pidx, adv, scale) in enumerate(grads):
        assert scale == 2.25
        # minibatch i % 2 holds branch step i % 2 of both prompts, whole groups of G
        assert branch.tolist() == [i % 2] * (P * G), branch
        assert sorted(pidx.tolist()) == [0] * G + [1] * G
        assert adv.shape == (P * G,) and torch.isfinite(adv).all() and bool((adv != 0).any())
        for g in gid.unique():  # normalised within the group: mean 0 (summed over granularities)
            assert abs(float(adv[gid == g].mean())) < 1e-5

    from safetensors.torch import load_file

    w1 = load_file(str(run / "checkpoints" / "step-00000001" / "weights.safetensors"))
    w2 = load_file(str(run / "checkpoints" / "step-00000002" / "weights.safetensors"))
    assert any(not torch.equal(w1[k], w2[k]) for k in w1), "the second step did not change the weights"
    assert any("lora_B" in k and bool(w1[k].abs().max() > 0) for k in w1), "the first step did not move LoRA B"


# ---------------------------------------------------------------------------------------------
# absolute noise-aware step weights
# ---------------------------------------------------------------------------------------------


def test_scaled_step_weights_are_scale_times_std(sd3):
    S, G = 4, 2
    r = sample(sd3, PROMPTS, build_plan(PlanConfig(kind="full"), S, 0), group_size=G, height=H, width=W,
               guidance_scale=1.0, generator=_gen(0))
    m = r.trained.bool()
    assert m.sum() > 2 and len(set(r.stds[m].tolist())) > 1  # several steps with different stds
    cfg = LossConfig(eps_low=0.2)
    c = 2.25
    learner = FlowLearner(sd3, cfg, step_weighting="noise_aware", step_weight_scale=c)
    w = learner.noise_aware_step_weights(r)
    assert torch.equal(w[m], r.stds[m] * c) and (w[~m] == 0).all()  # exactly scale * s, no normalisation
    assert torch.equal(scaled_noise_weights(r.stds, r.trained, c), w)
    # null: the normalised weights s / mean s, as before
    old = FlowLearner(sd3, cfg, step_weighting="noise_aware").noise_aware_step_weights(r)
    assert torch.equal(old[m], noise_aware_weights(r.stds[m]))

    adv = torch.linspace(-0.5, 1.5, r.num_samples)  # not symmetric: a non-zero loss
    norm = loss_normalizers(r.trained, cfg.aggregation)
    params = [p for p in sd3.transformer.parameters() if p.requires_grad]

    def run(scale):
        for p in params:
            p.grad = None
        lrn = FlowLearner(sd3, cfg, step_weighting="noise_aware", step_weight_scale=scale)
        st = lrn.minibatch_gradient(r, adv, normalizer=norm)
        g = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        for p in params:
            p.grad = None
        return st, g

    st1, g1 = run(1.0)
    st3, g3 = run(3.0)
    assert st1["policy_loss"] != 0
    assert math.isclose(st3["policy_loss"], 3.0 * st1["policy_loss"], rel_tol=1e-5)
    scale_ref = max(float(x.abs().max()) for x in g1)
    assert scale_ref > 0
    for a, b in zip(g3, g1):
        torch.testing.assert_close(a, 3.0 * b, rtol=1e-4, atol=1e-6 * scale_ref)
    # the same as passing the weights explicitly
    st_explicit = FlowLearner(sd3, cfg).minibatch_gradient(r, adv, normalizer=norm, step_weights=r.stds * 3.0 * m)
    for p in params:
        p.grad = None
    assert math.isclose(st_explicit["policy_loss"], st3["policy_loss"], rel_tol=1e-6)


def test_step_weight_scale_validation(sd3):
    with pytest.raises(ValueError, match="step_weight_scale"):
        FlowLearner(sd3, LossConfig(), step_weight_scale=2.25)  # step_weighting none
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="step_weight_scale"):
            FlowLearner(sd3, LossConfig(), step_weighting="noise_aware", step_weight_scale=bad)
    with pytest.raises(ConfigError, match="plan.step_weight_scale"):
        load_run_config(None, ["plan.step_weight_scale=2.25"])
    with pytest.raises(ConfigError, match="plan.step_weight_scale"):
        load_run_config(None, ["plan.step_weighting=noise_aware", "plan.step_weight_scale=0"])
    cfg = load_run_config(None, ["plan.step_weighting=noise_aware", "plan.step_weight_scale=2.25"])
    assert cfg.plan.step_weight_scale == 2.25
    assert load_run_config(None, []).plan.step_weight_scale is None


# ---------------------------------------------------------------------------------------------
# (5) validation
# ---------------------------------------------------------------------------------------------


def test_sweep_validation():
    from flowrl.inputs import UsageError
    from flowrl.train.loop import minibatch_split

    sweep = ["plan.kind=singular", "plan.singular.choice=all", "plan.singular.steps=[0, 1]"]
    with pytest.raises(ConfigError, match=r"^sample\.same_noise: must be true"):
        load_run_config(None, sweep + ["sample.same_noise=false"])
    cfg = load_run_config(None, sweep + ["sample.same_noise=true"])
    assert cfg.plan.is_sweep
    with pytest.raises(ConfigError, match="plan.singular.choice"):
        load_run_config(None, ["plan.kind=singular", "plan.singular.choice=every"])
    with pytest.raises(ValueError, match="singular.choice"):
        plan_config(kind="singular", singular=dict(choice="every")).validate()
    with pytest.raises(ValueError, match="same_noise"):
        sample(GaussianPolicy(), PROMPTS, _sweep_plan(4, [0, 1]), group_size=2, height=H, width=W,
               guidance_scale=1.0, generator=_gen(0), same_noise=False)
    # minibatches: whole branch steps first (M | K), else each step's prompts split (K | M)
    assert minibatch_split(3, 1) == (3, 1)
    assert minibatch_split(1, 8) == (1, 1) and minibatch_split(8, 8) == (1, 8) and minibatch_split(2, 8) == (1, 2)
    assert minibatch_split(16, 8) == (2, 8)
    assert minibatch_split(3, 9, "prompt") == (3, 1)  # TempFlow-GRPO: whole prompts, every branch step
    with pytest.raises(UsageError, match="num_minibatches"):
        minibatch_split(3, 8)


def test_evaluation_plans_are_unaffected():
    plan = eval_plan(6)
    assert not plan.sweep and plan.sde_steps == []
