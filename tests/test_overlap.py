"""Rewards overlap sampling (issue 19): a step's prompts sampled in sub-batches (``sample.rollout_chunks``),
each scored on its own, in a worker thread while the next samples (``sample.overlap_rewards``).

* the sub-batches' rollouts joined (``concat_rollouts``) equal one sampling call of all the prompts, field by
  field, for every plan kind (an analytic, batch-invariant policy: bitwise), trees up to node numbering
  (their transition advantages are equal); text sub-batches join with their padding and index shifts;
* in the loop, overlap on and off give bit-identical rewards, advantages and trained weights after 2 steps
  (images and text); a scorer that raises in the worker surfaces as the very exception it raised, as
  without overlap, and leaves no thread behind; ``rollout_chunks: 1`` samples the step in one call;
* the keys are checked (``sample.rollout_chunks`` named).
"""
from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest
import torch

from flowrl.core.advantages import AdvantageConfig, tree_transition_advantages
from flowrl.flow.plan import build_plan, plan_generator
from flowrl.flow.sampler import Rollout, concat_rollouts, sample
from plans import plan_config
from toy_policies import GaussianPolicy

PROMPTS = ["a red cube", "two green dogs on a hill", "one blue ball"]

KINDS = {
    "full": dict(kind="full"),
    "random_subset": dict(kind="random_subset", sde="dance_sde", noise_level=0.3),
    "window_flash": dict(kind="window", window=dict(size=2), ode_solver="dpm2m", tail=dict(ratio=0.4)),
    "singular_granularities": dict(kind="singular", granularities=[1, 2]),
    "sweep": dict(kind="singular", singular=dict(choice="all")),
    "tree": dict(kind="tree", tree=dict(branch_factors=[2, 2], branch_noise=[0.9, 0.6])),
}
NODE = ("node_parent", "node_step", "node_prompt", "leaf_path", "step_node")


def _sample(policy, plan, prompts, first, *, same_noise):
    """One sampling call for ``prompts`` (positions ``first`` ..), each prompt's noise from its own generator."""
    gens = [torch.Generator().manual_seed(1000 + first + i) for i in range(len(prompts))]
    return sample(policy, list(prompts), plan, group_size=4, height=16, width=16, guidance_scale=1.0,
                  generator=gens, same_noise=same_noise)


@pytest.mark.parametrize("name", list(KINDS))
def test_joined_sub_batches_equal_one_call(name):
    pol = GaussianPolicy()  # a row's velocity depends on that row only: any batching is bitwise equal
    plan = build_plan(plan_config(**KINDS[name]), 5, 2, plan_generator(0, 2))
    same = name == "sweep"
    whole = _sample(pol, plan, PROMPTS, 0, same_noise=same)
    joined = concat_rollouts([_sample(pol, plan, PROMPTS[:2], 0, same_noise=same),
                              _sample(pol, plan, PROMPTS[2:], 2, same_noise=same)])
    assert joined.prompts == whole.prompts and joined.nfe == whole.nfe and joined.velocity_calls == 2 * whole.velocity_calls
    for f in dataclasses.fields(Rollout):
        a, b = getattr(joined, f.name), getattr(whole, f.name)
        if f.name in NODE or f.name in ("nfe", "velocity_calls"):
            continue
        if f.name == "embeds":
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        elif isinstance(a, torch.Tensor):
            assert torch.equal(a, b), f.name
        else:
            assert a == b, f.name
    if whole.node_parent is None:
        assert all(getattr(joined, n) is None for n in NODE)
        return
    # one call numbers nodes level by level over all prompts, the join part by part: the same trees
    assert joined.node_parent.shape == whole.node_parent.shape
    for ro in (joined, whole):
        path = ro.leaf_path
        assert torch.equal(ro.node_parent[path[:, 1:]], path[:, :-1])  # each level's parent is the level above
        assert (ro.node_parent[ro.node_parent[path[:, 0]]] == -1).all()  # above the first level: the roots
    for f in ("node_step", "node_prompt"):
        assert torch.equal(getattr(joined, f)[joined.leaf_path], getattr(whole, f)[whole.leaf_path]), f
    assert torch.equal(joined.step_node == -1, whole.step_node == -1)
    total = torch.randn(whole.num_samples, generator=torch.Generator().manual_seed(0))
    adv = [tree_transition_advantages(r.node_parent, r.leaf_path[:, -1], r.step_node, total, AdvantageConfig())
           for r in (joined, whole)]
    assert torch.equal(adv[0][0], adv[1][0]) and torch.equal(adv[0][1], adv[1][1])
    assert adv[1][0].abs().sum() > 0  # siblings differ: a comparison that could fail


def test_concat_refuses_what_does_not_join():
    pol = GaussianPolicy()
    a = _sample(pol, build_plan(plan_config(kind="full"), 4, 0), PROMPTS[:1], 0, same_noise=False)
    b = _sample(pol, build_plan(plan_config(kind="window", window=dict(size=2, start=1)), 4, 0), PROMPTS[1:2], 1,
                same_noise=False)
    with pytest.raises(ValueError, match="step_index of part 1"):
        concat_rollouts([a, b])
    with pytest.raises(ValueError, match="no rollout"):
        concat_rollouts([])
    with pytest.raises(ValueError, match="means is set in some parts"):
        concat_rollouts([a, dataclasses.replace(a, means=None)])
    assert concat_rollouts([a]) is a


def test_text_sub_batches_join_with_padding():
    from flowrl.demo.tiny_text import build_tiny_lm
    from flowrl.text.rollout import concat_text_rollouts, generate, token_logps

    model, tok = build_tiny_lm()
    tok.padding_side = "left"
    prompts = ["1+2=", "12+34=", "7="]  # three lengths: the parts pad differently from one batch
    parts = [generate(model, tok, prompts[:2], group_size=2, max_new_tokens=5, seed=0, prompt_keys=[(0, 0), (0, 1)]),
             generate(model, tok, prompts[2:], group_size=2, max_new_tokens=3, seed=0, prompt_keys=[(0, 2)])]
    ro = concat_text_rollouts(parts, tok.pad_token_id)
    assert ro.prompt_index.tolist() == [0, 0, 1, 1, 2, 2] and ro.completions == parts[0].completions + parts[1].completions
    assert ro.prompt_ids.shape[1] == parts[0].prompt_ids.shape[1] and ro.completion_ids.shape[1] == 5
    n0 = parts[0].num_samples
    for part, rows in ((parts[0], slice(0, n0)), (parts[1], slice(n0, None))):
        for i, j in zip(range(part.num_samples), range(*rows.indices(ro.num_samples))):
            # the real tokens are unchanged; the padding is left of prompts and right of completions, masked
            p, c = ro.prompt_mask[j].bool(), ro.completion_mask[j].bool()
            assert torch.equal(ro.prompt_ids[j][p], part.prompt_ids[i][part.prompt_mask[i].bool()])
            assert torch.equal(ro.completion_ids[j][c], part.completion_ids[i][part.completion_mask[i].bool()])
            assert not ro.prompt_mask[j, : ro.prompt_ids.shape[1] - part.prompt_ids.shape[1]].any()
            assert not ro.completion_mask[j, part.completion_ids.shape[1]:].any()
    # the padding moves no token: each completion's log-probs are its part's, to float32 rounding
    with torch.no_grad():
        whole = token_logps(model, ro.input_ids(), ro.attention_mask(), ro.completion_ids.shape[1])
        alone = token_logps(model, parts[1].input_ids(), parts[1].attention_mask(), parts[1].completion_ids.shape[1])
    m = parts[1].completion_mask.bool()
    # another padding changes the attention's summation length only: float32 rounding (|logp| ~ 4 here)
    torch.testing.assert_close(whole[n0:, :3][m], alone[m], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="old_logps is set in some parts"):
        concat_text_rollouts([dataclasses.replace(parts[0], old_logps=torch.zeros(4, 5)), parts[1]], tok.pad_token_id)


# ------------------------------------------------------------------------------------- the loop

# the loop tests' plugin (dotted-path rewards), run-isolation fixture and tiny models
from test_train_loop import PLUGIN, _isolated, lm_dir, plugin_dir, sd3_dir  # noqa: E402,F401


def _overrides(path, kind, model: Path, out: Path, *extra):
    common = [f"output_dir={out}", "max_steps=2", "eval_every=100", "checkpoint_every=100", "eval.at_start=false",
              "eval.num_prompts=1", "eval.seeds=[0]", "train.tracker=none", "train.progress=false", "resume=none",
              "train.weight_decay=0.0", "sample.group_size=4", "sample.prompts_per_step=3", "lora.rank=4", "lora.alpha=8"]
    if path == "image":
        return common + [f"model.path={model}", "sample.height=32", "sample.width=32", "sample.num_steps=3",
                         "sample.eval_num_steps=3", "sample.guidance_scale=1.0", f"rewards={{{PLUGIN}:make_brightness: 1.0}}",
                         f"plan.kind={kind}", *extra]
    return common + ["model.family=lm", f"model.path={model}", "text.max_new_tokens=6", "data.train=arithmetic:train",
                     "data.eval=arithmetic:test", f"rewards={{{PLUGIN}:digit_fraction: 1.0}}", *extra]


def _trainer(path, kind, model, out, *extra):
    from flowrl.config import load_run_config
    from flowrl.train.loop import Trainer

    return Trainer(load_run_config(None, _overrides(path, kind, model, out, *extra)))


def _run_recording(trainer):
    """Run; every step's rewards and advantages (as the loop computed them) and the trained weights."""
    seen = []
    advantages = trainer._advantages

    def record(rewards, batch, group, key):
        adv, stats = advantages(rewards, batch, group, key)
        seen.append((rewards.clone(), adv.clone()))
        return adv, stats

    trainer._advantages = record
    trainer.run()
    weights = {n: p.detach().clone() for n, p in trainer.task.module.named_parameters() if p.requires_grad}
    return seen, weights


@pytest.mark.parametrize("path,kind", [("image", "full"), ("text", None)])
def test_overlap_on_and_off_train_the_same_weights(path, kind, sd3_dir, lm_dir, tmp_path):
    model = sd3_dir if path == "image" else lm_dir
    runs = {}
    for overlap in (False, True):
        t = _trainer(path, kind, model, tmp_path / f"run_{overlap}", "sample.rollout_chunks=2",
                     f"sample.overlap_rewards={str(overlap).lower()}")
        threads, score = set(), t.task.score
        t.task.score = lambda *a: threads.add(threading.current_thread().name) or score(*a)
        runs[overlap] = _run_recording(t)
        assert any(n.startswith("flowrl-score") for n in threads) == overlap, threads
    (seen_off, w_off), (seen_on, w_on) = runs[False], runs[True]
    assert len(seen_off) == len(seen_on) == 2
    for (r0, a0), (r1, a1) in zip(seen_off, seen_on):
        assert r0.shape[0] == 12 and torch.equal(r0, r1) and torch.equal(a0, a1)
        assert a0.abs().sum() > 0  # the rewards differ within groups: the update moved something
    assert w_off.keys() == w_on.keys() and all(torch.equal(w_off[k], w_on[k]) for k in w_off)
    assert not any(t.name.startswith("flowrl-score") for t in threading.enumerate())


def test_one_chunk_samples_the_step_in_one_call(sd3_dir, tmp_path, monkeypatch):
    """``rollout_chunks: 1`` (the default) is one sampling call of the step's prompts, as before the
    option; two sub-batches are two calls whose rows carry the same noise keys."""
    from flowrl.train import tasks

    calls = []
    real = tasks.sample_rollout

    def counting(policy, prompts, plan, **kw):
        calls.append(list(prompts))
        return real(policy, prompts, plan, **kw)

    monkeypatch.setattr(tasks, "sample_rollout", counting)
    rewards, prompts = {}, {}
    for chunks in (1, 2):
        calls.clear()
        t = _trainer("image", "full", sd3_dir, tmp_path / f"c{chunks}", f"sample.rollout_chunks={chunks}", "max_steps=1")
        seen, _ = _run_recording(t)
        assert [len(c) for c in calls] == ([3] if chunks == 1 else [2, 1])
        rewards[chunks], prompts[chunks] = seen[0][0], sum(calls, [])
    assert prompts[1] == prompts[2]
    # the same prompts and noise streams: the same images up to the float32 rounding of batched calls
    # (rewards are mean pixel values in [0, 1])
    torch.testing.assert_close(rewards[2], rewards[1], rtol=0, atol=1e-5)


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize("overlap", [False, True])
def test_a_scorer_error_surfaces_as_raised(overlap, sd3_dir, tmp_path):
    t = _trainer("image", "full", sd3_dir, tmp_path / "run", "sample.rollout_chunks=3",
                 f"sample.overlap_rewards={str(overlap).lower()}", "max_steps=1")
    raised, sampled, scored = [], [], []
    score, sample_part = t.task.score, t.task.sample

    def failing(part, records):
        scored.append(1)
        if len(scored) == 2:  # the second sub-batch (sub-batches are scored in order, one at a time)
            raised.append(_Boom("scorer failed on sub-batch 2"))
            raise raised[-1]
        return score(part, records)

    t.task.score = failing
    t.task.sample = lambda *a: sampled.append(1) or sample_part(*a)
    with pytest.raises(_Boom, match="sub-batch 2") as info:
        t.train_step()
    assert info.value is raised[0] and t.step == 0
    assert len(sampled) == 3 or (overlap and len(sampled) == 2)  # with overlap: seen between sub-batches
    assert len(scored) == 2  # the third sub-batch is never scored
    assert not any(th.name.startswith("flowrl-score") for th in threading.enumerate())
    t.close()


def test_keys_are_checked():
    from flowrl.config import ConfigError, load_run_config
    from flowrl.inputs import UsageError
    from flowrl.train.loop import chunk_bounds

    with pytest.raises(ConfigError, match="sample.rollout_chunks"):
        load_run_config(None, ["sample.rollout_chunks=0"])
    with pytest.raises(ConfigError, match="sample.rollout_chunks: 3 sub-batches of 2 prompts"):
        load_run_config(None, ["sample.rollout_chunks=3", "sample.prompts_per_step=2"])
    assert chunk_bounds(5, 2) == [(0, 3), (3, 5)] and chunk_bounds(3, 3) == [(0, 1), (1, 2), (2, 3)]
    assert chunk_bounds(4, 1) == [(0, 4)]
    with pytest.raises(UsageError, match="sample.rollout_chunks=3: this process samples 2 prompt"):
        chunk_bounds(2, 3)
