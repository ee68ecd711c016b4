"""The sampler's step loop reads no tensor on the host: on an accelerator every such read (``.item()``,
``bool(t)``, ``float(t)``, ``.tolist()``) waits for the device to finish its queue, once per step.

On this CPU-only machine "on an accelerator" is simulated where flowrl decides it: ``flow.steps.host_values``
(the one test of "can this value be checked without a device sync") answers None, as it does for a CUDA
tensor. Reads are counted by a ``TorchFunctionMode`` when the calling frame is flowrl's own code (diffusers'
transformers are not ours to change). The count must not grow with the number of steps; the rollout must be
bit-for-bit the one of the checked path (the checks only raise, they never change a value)."""
from __future__ import annotations

import sys
from collections import Counter

import pytest
import torch
from torch.overrides import TorchFunctionMode

from flowrl.flow import steps
from flowrl.flow.plan import PlanConfig, build_plan
from flowrl.flow.policy import FlowPolicy
from flowrl.flow.sampler import sample

READS = {"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy"}
PROMPTS = ["a red cube", "two green dogs"]


class HostReads(TorchFunctionMode):
    """Counts host reads of tensors made from flowrl's code, by (function, line)."""

    def __init__(self):
        super().__init__()
        self.sites: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in READS:
            f = sys._getframe(1)
            while f is not None and "/torch/" in f.f_code.co_filename:
                f = f.f_back
            if f is not None and "/flowrl/" in f.f_code.co_filename.replace("\\", "/"):
                self.sites[(f.f_code.co_name, f.f_lineno)] += 1
        return func(*args, **(kwargs or {}))


def _policy(family):
    if family == "sd3":
        from flowrl.demo.tiny_image import build_tiny_sd3_pipeline

        return FlowPolicy.from_pipeline(build_tiny_sd3_pipeline(seed=0), max_sequence_length=8)
    from flowrl.demo.tiny_qwen_image import build_tiny_qwen_image_pipeline

    return FlowPolicy.from_pipeline(build_tiny_qwen_image_pipeline(seed=0), max_sequence_length=16)


def _rollout(policy, num_steps, kind="full"):
    plan = build_plan(PlanConfig(kind=kind), num_steps, 0)
    # prompts of different lengths (Qwen-Image: padded rows with a mask, the case that needs one read per mask)
    return sample(policy, PROMPTS, plan, group_size=2, height=32, width=32, guidance_scale=3.0,
                  generator=torch.Generator().manual_seed(0), decode=False, progress=False)


def _count(policy, num_steps, monkeypatch):
    monkeypatch.setattr(steps, "host_values", lambda value: None)  # every value is "on the device"
    policy.encode_prompts(PROMPTS, negative_prompt="")  # the prompt cache: the text encoders run before the loop
    with HostReads() as mode:
        _rollout(policy, num_steps)
    return mode.sites


@pytest.mark.parametrize("family", ["sd3", "qwen_image"])
def test_no_host_read_per_sampling_step(family, monkeypatch):
    policy = _policy(family)
    short, long = _count(policy, 2, monkeypatch), _count(policy, 6, monkeypatch)
    # reads before the loop (plan flags, the sigma check, row selection) are there once whatever the steps
    assert short == long, {k: (short.get(k), long.get(k)) for k in set(short) | set(long) if short.get(k) != long.get(k)}


@pytest.mark.parametrize("family", ["sd3", "qwen_image"])
def test_the_unchecked_path_samples_the_same_rollout(family, monkeypatch):
    policy = _policy(family)
    checked = _rollout(policy, 4)
    monkeypatch.setattr(steps, "host_values", lambda value: None)
    unchecked = _rollout(policy, 4)
    for name in ("latents", "log_probs", "means", "final_latents"):
        assert torch.equal(getattr(checked, name), getattr(unchecked, name)), name


def test_qwen_mask_extent_is_read_once_per_mask_and_follows_in_place_changes():
    from collections import OrderedDict

    from flowrl.flow.models.qwen_image import mask_extent

    memo = OrderedDict()
    m = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert mask_extent(m, memo) == (3, False)  # longest row 3 tokens; row 2 still padded in the first 3
    with HostReads() as mode:
        assert mask_extent(m, memo) == (3, False)
    assert not mode.sites  # remembered: no read
    m[1, 2] = 1  # in place: the version changes, the extent is read again
    assert mask_extent(m, memo) == (3, True)
    assert mask_extent(torch.ones(2, 5, dtype=torch.long), memo) == (5, True)
    assert mask_extent(torch.tensor([[1, 0, 0], [1, 1, 0]]), memo) == (2, False)


def test_velocity_still_refuses_a_sigma_it_can_check_without_a_sync():
    policy = _policy("sd3")
    emb = policy.encode_prompts(["a cat"])
    x = torch.zeros(1, *policy.latent_shape(32, 32))
    for bad in (1.5, torch.tensor([-0.1]), float("nan")):
        with pytest.raises(ValueError, match=r"sigma must lie in \[0, 1\]"):
            policy.velocity(x, bad, emb, 1.0)
