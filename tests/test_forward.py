"""The forward-process objectives in the training loop, on tiny SD3 and Flux models (CPU, offline).

For each objective (DiffusionNFT, AWM, DGPO, DPO) and family: a few steps give finite losses and move the
weights; the checkpoint holds the old policy (where the objective keeps one), and it has followed the
weights by its decay schedule; a run stopped after one step and resumed continues bit-identically to an
uninterrupted run (same process, same machine: our own promise, so exact). The learner's draws depend on
(step, epoch, sample) only: splitting the rollout into minibatches changes no gradient beyond float
rounding of the sum.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict

import pytest
import torch
import yaml

from flowrl.core.objectives import old_decay

PLUGIN = "flowrl_forwardtest_plugin"
PLUGIN_SRC = '''
def make_brightness(device=None, dtype=None, checkpoint=None, **_):
    """Mean pixel value: a reward that differs between the samples of a random model."""
    def score(images, prompts, **meta):
        return images.float().mean(dim=(1, 2, 3)).cpu()
    return score
'''

OBJECTIVES: Dict[str, Dict[str, Any]] = {
    "nft": {"kind": "nft", "num_timesteps": 2, "kl_beta": 1e-2,
            "old": {"decay_rate": 0.3, "decay_max": 0.5, "sample_from": 0}},
    "awm": {"kind": "awm", "timesteps": "stratified", "num_timesteps": 2, "timestep_first": 1, "timestep_fraction": 1.0,
            "timestep_share": "batch", "clip_range": 1.0, "kl_beta": 1e-3, "old_kl_beta": 1.0,
            "old": {"decay_rate": 0.2, "decay_max": 0.3}},
    "dgpo": {"kind": "dgpo", "beta": 100.0, "num_timesteps": 2, "timestep_fraction": 0.75, "timestep_share": "batch",
             "noise_share": "group", "kl_beta": 0.02, "clip_range": 0.01,
             "old": {"decay_rate": 0.3, "decay_max": 0.3, "sample_from": 1}},
    "dpo": {"kind": "dpo", "beta": 100.0, "timesteps": "logit_normal", "num_timesteps": 2, "timestep_share": "group",
            "noise_share": "group"},
}


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("plugin")
    (d / f"{PLUGIN}.py").write_text(PLUGIN_SRC, encoding="utf-8")
    return d


@pytest.fixture(autouse=True)
def _isolated(plugin_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin_dir))
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Dict[str, Path]:
    from flowrl.demo.tiny_image import save_tiny

    d = tmp_path_factory.mktemp("tiny")
    return {f: Path(save_tiny(f, d / f)) for f in ("sd3", "flux")}


def config(family: str, model: Path, out: Path, objective: str, **over) -> Dict[str, Any]:
    obj = json.loads(json.dumps(OBJECTIVES[objective]))
    if family == "flux":
        obj["guidance_scale"] = 3.5  # FLUX.1-dev's embedded guidance, as its rollouts
    cfg = {
        "output_dir": str(out), "seed": 1, "max_steps": 2, "resume": "auto", "checkpoint_every": 1, "eval_every": 100,
        "rewards": {f"{PLUGIN}:make_brightness": 1.0},
        "model": {"family": family, "path": str(model)},
        "sample": {"height": 32, "width": 32, "num_steps": 4, "eval_num_steps": 2,
                   "guidance_scale": 1.0 if family == "sd3" else 3.5, "group_size": 4, "prompts_per_step": 2},
        "plan": {"kind": "ode", "ode_solver": "dpm2m"},
        "objective": obj,
        "data": {"train": "shapes:train", "eval": "shapes:test"},
        "eval": {"num_prompts": 1, "seeds": [0], "at_start": False},
        "train": {"learning_rate": 1e-2, "weight_decay": 0.0, "progress": False, "tracker": "none", "keep_last": 10,
                  "deterministic": True},
        "lora": {"rank": 4, "alpha": 8},
    }
    cfg.update(over)
    return cfg


def run(cfg: Dict[str, Any], path: Path) -> Dict[str, Any]:
    from flowrl.config import load_run_config
    from flowrl.train.loop import train

    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return train(load_run_config(path))


def checkpoint(run_dir: Path, step: int):
    from flowrl.train.checkpoint import load_checkpoint

    return load_checkpoint(run_dir / "checkpoints" / f"step-{step:08d}")


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_objective_trains_keeps_its_old_policy_and_resumes_exactly(objective, family, models, tmp_path):
    """(Flux: the two steps and the old policy; the resume, which is family-independent code, on SD3.)"""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(config(family, models[family], straight, objective), tmp_path / "a.yaml")

    metrics = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert math.isfinite(m["loss"]) and m["grad_norm"] > 0 and m["skipped_optimizer_steps"] == 0, m
    c1, c2 = checkpoint(straight, 1), checkpoint(straight, 2)
    b = {k: v for k, v in c1["weights"].items() if "lora_B" in k}
    assert b and sum(float(v.abs().max()) > 0 for v in b.values()) > len(b) // 2, "LoRA B (zero at init) did not move"
    assert any(not torch.equal(c1["weights"][k], c2["weights"][k]) for k in c1["weights"])

    keeps_old = objective != "dpo"
    assert ("old_policy" in c2["tensor_state"]) == keeps_old
    if keeps_old:
        # after step s (one optimizer step each): old_s = d old_{s-1} + (1 - d) theta_s with d = old_decay(s)
        o = OBJECTIVES[objective]["old"]
        d2 = old_decay(2, 0, o["decay_rate"], o["decay_max"])
        old1, old2 = c1["tensor_state"]["old_policy"], c2["tensor_state"]["old_policy"]
        assert set(old2) == set(c2["weights"])  # keyed by the trainable parameters' names
        for n in old2:
            expect = d2 * old1[n] + (1 - d2) * c2["weights"][n]
            assert torch.allclose(old2[n], expect, rtol=1e-6, atol=1e-7), n
        assert any(not torch.equal(old2[n], c2["weights"][n]) for n in old2), "decay 0?"

    if family != "sd3":
        return
    # resumed after step 1 == uninterrupted: weights, optimizer, old policy and every logged number
    run(config(family, models[family], resumed, objective, max_steps=1), tmp_path / "b.yaml")
    run(config(family, models[family], resumed, objective), tmp_path / "c.yaml")
    r2 = checkpoint(resumed, 2)
    assert all(torch.equal(c2["weights"][k], r2["weights"][k]) for k in c2["weights"])
    if keeps_old:
        o2, q2 = c2["tensor_state"]["old_policy"], r2["tensor_state"]["old_policy"]
        assert all(torch.equal(o2[k], q2[k]) for k in o2)
    # (the interrupted run also evaluated at its last step, 1: eval/ keys differ by design)
    strip = lambda m: {k: v for k, v in m.items() if not k.startswith(("time/", "eval/"))}  # noqa: E731
    again = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    same = lambda ms: [json.dumps(strip(m), sort_keys=True) for m in ms]  # noqa: E731  (NaN compares as text)
    assert same(again) == same(metrics)


def test_minibatch_split_changes_no_draw(models, tmp_path):
    """The same rollout trained as 1 or 2 minibatches of the same optimizer batch: equal gradients (the
    timesteps and noise are keyed by sample, not by position in a minibatch)."""
    from flowrl.config import load_run_config
    from flowrl.core.shadow import DecayedCopy
    from flowrl.train.tasks import build_task

    for objective in ("nft", "dgpo"):
        cfg_path = tmp_path / f"{objective}.yaml"
        cfg_path.write_text(yaml.safe_dump(config("sd3", models["sd3"], tmp_path / "x", objective)), encoding="utf-8")
        cfg = load_run_config(cfg_path)
        task = build_task(cfg, torch.device("cpu"))
        params = [p for p in task.module.parameters() if p.requires_grad]
        with torch.no_grad():  # give LoRA B a value, so the old policy and the reference differ from the policy
            for p in params:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.05)
        old = DecayedCopy(params)
        with torch.no_grad():
            for p in params:
                p.mul_(1.1)
        task.set_old_policy(old)
        ro = task.rollout([{"prompt": "a red circle"}, {"prompt": "two blue squares"}], [(5, 0), (9, 1)], 0)
        adv = torch.tensor([1.0, -1.0, 2.0, -2.0, 0.5, -0.5, 1.5, -1.5])
        keep = torch.ones(8, dtype=torch.bool)
        mask = task.action_mask(ro, adv, keep)
        grads = []
        for parts in ([torch.arange(8)], [torch.arange(4), torch.arange(4, 8)]):
            for p in params:
                p.grad = None
            for rows in parts:
                sub = ro.select(rows)
                task.mask_actions(sub, mask[rows])
                task.minibatch_gradient(sub, adv[rows], normalizer=8.0, beta=0.0, backward=lambda l, last=True: l.backward(),
                                        epoch=0)
            grads.append(torch.cat([p.grad.flatten() for p in params]))
        scale = float(grads[0].abs().max())
        assert scale > 0
        # float32 sums in a different order: a few ulp of the largest entry
        assert float((grads[0] - grads[1]).abs().max()) <= 1e-5 * scale, objective


def test_learner_assembles_the_nft_loss_from_its_draws(tmp_path):
    """The learner's NFT gradient on a toy flow (velocity = theta x the exact Gaussian velocity) equals the
    sum over rows and timestep slots of nft_loss at x_t = (1 - sigma) x0 + sigma eps, divided by Z k, with
    the old policy's velocity taken at the old theta: the wiring around the pure function."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from toy_policies import GaussianPolicy, ToyEmbeds

    from flowrl.core import rng
    from flowrl.core.objectives import ObjectiveConfig, OldPolicyConfig, nft_loss
    from flowrl.core.shadow import DecayedCopy
    from flowrl.flow.forward import ForwardLearner, timestep_indices
    from flowrl.flow.plan import PlanConfig, build_plan
    from flowrl.flow.sampler import sample

    class Theta(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.theta = torch.nn.Parameter(torch.tensor([1.3]))

    class Toy(GaussianPolicy):
        def __init__(self):
            super().__init__()
            self.transformer = Theta()

        def velocity(self, x, sigma, embeds, guidance_scale):
            return self.transformer.theta * super().velocity(x, sigma, embeds, guidance_scale)

        def embeds_from_tensors(self, d):
            return ToyEmbeds(d["mu"])

    policy = Toy()
    cfg = ObjectiveConfig(kind="nft", beta=0.7, num_timesteps=3, old=OldPolicyConfig(sample_from=0))
    with torch.no_grad():
        ro = sample(policy, ["a", "abc"], build_plan(PlanConfig(kind="ode"), 6, 0), group_size=3, height=16, width=16,
                    guidance_scale=1.0, generator=torch.Generator().manual_seed(0), progress=False, store_means=False)
    ro.row_keys = torch.tensor([[4, r, p, j] for r, p in ((11, 0), (7, 1)) for j in range(3)])
    adv = torch.tensor([1.5, -0.5, -1.0, 3.0, -2.0, -1.0])
    old = DecayedCopy([policy.transformer.theta])
    with torch.no_grad():
        policy.transformer.theta.fill_(0.9)  # the policy moved away from the old one
    learner = ForwardLearner(policy, cfg, seed=5, group_size=3, old=old)
    keep = torch.tensor([True, True, False, True, True, True])  # row 2 invalid: no loss
    learner.mask_actions(ro, learner.action_mask(ro, adv, keep))
    learner.minibatch_gradient(ro, adv, normalizer=5.0, epoch=2)
    got = policy.transformer.theta.grad.clone()

    theta = policy.transformer.theta.detach().clone().requires_grad_(True)
    sched = policy.sigmas(6, 16, 16)
    total = 0.0
    for i in (0, 1, 3, 4, 5):
        key = ro.row_keys[i].tolist()
        idx = timestep_indices(cfg, 6, rng.generator(5, "forward-t", 2, *key))
        x0 = ro.final_latents[i:i + 1, 0]
        emb = policy.encode_prompts(["a", "abc"]).select([int(ro.prompt_index[i])])
        for j in range(3):
            eps = torch.randn(x0.shape[1:], generator=rng.generator(5, "forward-eps", 2, j, *key)).unsqueeze(0)
            s = sched[idx[j]].reshape(1)
            x_t = (1 - s) * x0 + s * eps
            v_base = GaussianPolicy.velocity(policy, x_t, s, emb, 1.0)
            total = total + nft_loss(theta * v_base, 1.3 * v_base, x_t, x0, s, adv[i:i + 1], 0.7, 5.0).sum()
    expect, = torch.autograd.grad(total / (5.0 * 3), theta)
    assert float(got.abs()) > 0
    assert torch.allclose(got, expect.float(), rtol=1e-5, atol=0)
    assert float(policy.transformer.theta.detach()) == pytest.approx(0.9)  # the old weights were swapped back
