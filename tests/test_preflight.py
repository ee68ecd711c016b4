"""flowrl.train.preflight: one-line warnings for settings that would silently do nothing."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flowrl.config import load_run_config
from flowrl.train.preflight import preflight_errors, preflight_warnings

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "configs" / "methods").glob("*.yaml"))


def _warn(*overrides, **kw):
    ws = preflight_warnings(load_run_config(None, list(overrides)), **kw)
    assert all("\n" not in w for w in ws)
    return ws


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_have_nothing_to_warn_about(path, no_cuda):
    cfg = load_run_config(path)
    assert preflight_warnings(cfg) == []


def test_defaults_have_nothing_to_warn_about(no_cuda):
    assert _warn() == [] and preflight_errors(load_run_config(None)) == []


def test_max_steps_zero_trains_nothing():
    (w,) = _warn("max_steps=0")
    assert w.startswith("max_steps: 0") and "nothing will be trained" in w


def test_group_size_one_with_a_group_baseline():
    (w,) = _warn("sample.group_size=1")
    assert w.startswith("sample.group_size: 1") and "every advantage is 0" in w
    (w,) = _warn("sample.group_size=1", "advantage_preset=flow_grpo")  # any group scale
    assert "every advantage is 0" in w
    # a text run groups completions the same way
    (w,) = _warn("sample.group_size=1", "model.family=lm", "rewards={exact_match: 1}", "data.train=arithmetic:train",
                 "data.eval=arithmetic:test")
    assert w.startswith("sample.group_size: 1")


@pytest.mark.parametrize("baseline", [
    ["advantage.stat_tracking=true"],  # the prompt's reward history is the baseline
    ["advantage.center=batch"],
    ["advantage.center=none", "advantage.scale=none"],
    ["advantage_preset=ngrpo"],  # virtual maximum-reward samples join each group
])
def test_group_size_one_is_fine_with_another_baseline(baseline):
    assert _warn("sample.group_size=1", *baseline) == []


def test_group_size_one_and_the_tracker_of_a_plan_that_ignores_it():
    ws = _warn("sample.group_size=1", "advantage.stat_tracking=true", "plan.granularities=[1, 2]")
    assert [w.split(":")[0] for w in ws] == ["advantage.stat_tracking", "sample.group_size"]
    ws = _warn("plan.kind=tree", "plan.tree.branch_factors=[1]", "sample.group_size=1")
    assert len(ws) == 1 and "one-leaf tree" in ws[0]


def test_tracker_unused_by_trees_and_granularities():
    (w,) = _warn("plan.kind=tree", "advantage.stat_tracking=true")
    assert w.startswith("advantage.stat_tracking: true is not used") and "plan.kind: tree" in w
    (w,) = _warn("plan.granularities=[1, 2]", "advantage.stat_tracking=true")
    assert "plan.granularities" in w
    assert _warn("advantage.stat_tracking=true") == []


def test_all_reward_weights_zero():
    (w,) = _warn("rewards={shapes: 0}")
    assert w.startswith("rewards: every reward weight is 0") and "nothing will be learned" in w
    (w,) = _warn("advantage.reward_weights=[0]")  # the weights the advantages use
    assert w.startswith("advantage.reward_weights: every reward weight is 0")
    assert _warn("rewards={shapes: 0}", "advantage.reward_weights=[1]") == []
    assert _warn("rewards={shapes: 0, jpeg: 0.5}") == []
    # trees weigh the rewards with 'rewards' whatever advantage.reward_weights says
    (w,) = _warn("rewards={shapes: 0}", "advantage.reward_weights=[1]", "plan.kind=tree")
    assert w.startswith("rewards:")


def test_a_device_this_machine_lacks(no_cuda):
    (w,) = _warn("model.device=cuda")
    assert w.startswith("model.device: 'cuda' cannot be used here (torch.cuda.is_available() is False)")
    assert "falls back to the CPU" in w and "flowrl sample and flowrl grid" in w and "will fail" in w
    (e,) = preflight_errors(load_run_config(None, ["model.device=cuda"]))
    assert e.startswith("model.device: 'cuda' cannot be used here") and "model.device=cpu" in e
    assert preflight_errors(load_run_config(None, ["model.device=cpu"])) == []


def test_what_accelerate_does_with_a_missing_cuda(no_cuda):
    """The claim of the warning: with model.device naming CUDA and none there, the loop's
    Accelerator(cpu=False) runs on the CPU."""
    from accelerate import Accelerator

    assert Accelerator(cpu=False).device.type in ("cpu", "mps")


def test_a_gpu_index_is_not_used_by_train(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert _warn("model.device=cuda") == [] and preflight_errors(load_run_config(None, ["model.device=cuda"])) == []
    (w,) = _warn("model.device=cuda:1")
    assert "is not used by flowrl train" in w and "CUDA_VISIBLE_DEVICES=1" in w
    (w,) = _warn("model.device=cuda:2")
    assert "this machine has 2 CUDA device(s)" in w
    assert preflight_errors(load_run_config(None, ["model.device=cuda:2"]))


def test_shapes_reward_marks_free_text_invalid():
    """What the warning below says: the shapes scorer cannot verify free text, so those samples are
    invalid (the whole batch with its default on_invalid_prompt: raise)."""
    from scorers.multi import MultiReward

    images = torch.full((2, 3, 32, 32), 0.5)
    out = MultiReward({"shapes": 1.0})(images, ["a cat on a mat", "a red circle"])
    assert not out.valid.any()
    out = MultiReward({"shapes": 1.0}, options={"shapes": {"on_invalid_prompt": "nan"}})(images, ["a cat", "a red circle"])
    assert out.valid.tolist() == [False, True]


def test_shapes_reward_with_prompts_outside_its_grammar(tmp_path):
    free = tmp_path / "free.txt"
    free.write_text("a cat on a mat\na photo of a city at night\n")
    mixed = tmp_path / "mixed.txt"
    mixed.write_text("a cat on a mat\na red circle\n")
    (w,) = _warn(f"data.train={free}")
    assert w.startswith("data.train:") and "no prompt of the shapes grammar" in w
    assert "every sample will be invalid" in w and "nothing will be trained" in w
    (w,) = _warn(f"data.train={mixed}")
    assert "1 of 2 prompts outside the shapes grammar" in w and "'a cat on a mat'" in w and "whole batch" in w
    (w,) = _warn(f"data.train={mixed}", "reward_options={shapes: {on_invalid_prompt: nan}}")
    assert "their samples will be invalid" in w
    (w,) = _warn("data.train=arithmetic:train")
    assert "every sample will be invalid" in w
    (w,) = _warn(f"data.eval={free}")
    assert w.startswith("data.eval:") and "every held-out score will be NaN" in w
    # prompts the loop already loaded are used as they are; no file is read then
    assert _warn(f"data.train={free}", train_prompts=["a red circle"]) == []
    assert _warn(train_prompts=["a cat"]) == []  # a 'shapes:<split>' source holds grammar prompts only
    assert _warn(f"data.train={tmp_path / 'missing.txt'}") == []  # the loop reports a missing file
    assert _warn(f"data.train={tmp_path / 'free.txt'}", "rewards={pickscore: 1}") == []  # no shapes reward


def test_shapes_warning_quotes_a_long_prompt_cut(tmp_path):
    long = tmp_path / "long.txt"
    long.write_text("q" * 1_000_000 + "\n")
    (w,) = _warn(f"data.train={long}")
    assert len(w) < 1000 and "(1000000 chars)" in w
