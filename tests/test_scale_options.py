"""The speed and memory options bench/scale.py measures, as library behaviour: CFG in one batched call gives the
two-call velocity (Qwen-Image with prompts of different lengths, Wan); offloaded text encoders come to the
device only for prompts missing from the cache and encode the same embeddings; a rollout decoded in chunks of
rows gives the same images; the config keys reach the policy and are refused where they mean nothing."""
from __future__ import annotations

import pytest
import torch

from flowrl.flow.plan import eval_plan
from flowrl.flow.policy import FlowPolicy
from flowrl.flow.sampler import sample

PROMPTS = ["a red cube", "two green dogs on a sofa"]  # different lengths: Qwen-Image pads one row with a mask


def _qwen():
    from flowrl.demo.tiny_qwen_image import build_tiny_qwen_image_pipeline

    return FlowPolicy.from_pipeline(build_tiny_qwen_image_pipeline(seed=0), max_sequence_length=32)


def _wan():
    from flowrl.demo.tiny_wan import build_tiny_wan_pipeline

    return FlowPolicy.from_pipeline(build_tiny_wan_pipeline(seed=0), max_sequence_length=16, num_frames=5)


@pytest.mark.parametrize("build", [_qwen, _wan], ids=["qwen_image", "wan"])
def test_batched_cfg_gives_the_two_call_velocity(build):
    policy = build()
    emb = policy.encode_prompts(PROMPTS, negative_prompt="")
    if policy.family == "qwen_image":  # the negative prompt is shorter than both: three lengths in one batch
        assert emb.prompt_mask is not None and not bool(emb.prompt_mask.all())
    x = policy.initial_noise(2, 32, 32, generator=torch.Generator().manual_seed(0))
    sig = torch.tensor([0.9, 0.4])
    with torch.no_grad():
        two = policy.velocity(x, sig, emb, 4.0)
        policy.batched_cfg = True
        one = policy.velocity(x, sig, emb, 4.0)
        cond = policy.velocity(x, sig, emb, 1.0)  # no CFG: one call either way
    assert two.abs().mean() > 0.01 and not torch.allclose(two, cond, atol=1e-3)  # CFG moved the velocity
    # float32, 2B rows against B: the GEMMs may round differently (measured max |diff| ~1e-6 on this CPU)
    torch.testing.assert_close(one, two, rtol=1e-4, atol=1e-5)


def test_offloaded_text_encoders_move_only_for_missing_prompts():
    from flowrl.demo.tiny_image import build_tiny_sd3_pipeline

    policy = FlowPolicy.from_pipeline(build_tiny_sd3_pipeline(seed=0), max_sequence_length=8)
    reference = policy.encode_prompts(PROMPTS).prompt_embeds.clone()
    policy.clear_prompt_cache()
    moves = []
    for name, m in policy.text_encoders().items():
        original = m.to

        def spy(*a, _name=name, _to=original, **k):
            moves.append((_name, str(a[0] if a else k.get("device"))))
            return _to(*a, **k)
        m.to = spy
    assert set(policy.text_encoders()) == {"text_encoder", "text_encoder_2"}  # the VAE is not a text encoder
    home = torch.device("cpu", 0)  # a "device" other than the policy's (cpu) that this machine has
    policy.offload_text_encoders(home)
    assert policy.text_encoder_home == home and moves == [("text_encoder", "cpu:0"), ("text_encoder_2", "cpu:0")]
    moves.clear()
    got = policy.encode_prompts(PROMPTS).prompt_embeds
    # one round trip for the batch of two missing prompts: to the policy's device, then home again
    assert moves == [("text_encoder", "cpu"), ("text_encoder_2", "cpu"), ("text_encoder", "cpu:0"),
                     ("text_encoder_2", "cpu:0")]
    assert torch.equal(got, reference)
    moves.clear()
    policy.encode_prompts(PROMPTS)  # cached: the encoders stay home
    assert moves == []
    policy.offload_text_encoders(None)
    assert policy.text_encoder_home is None


def test_rollout_decoded_in_chunks_gives_the_same_images():
    policy = _wan()
    kw = dict(group_size=2, height=32, width=32, guidance_scale=5.0, progress=False)
    whole = sample(policy, PROMPTS, eval_plan(2), generator=torch.Generator().manual_seed(0), **kw)
    chunked = sample(policy, PROMPTS, eval_plan(2), generator=torch.Generator().manual_seed(0), decode_chunk_size=1, **kw)
    assert whole.images.shape == (4, 3, 5, 32, 32)
    # the video VAE's convolutions may sum in another order for another batch (tests/test_bench_memory.py: 7e-6)
    torch.testing.assert_close(chunked.images, whole.images, rtol=0, atol=2e-5)
    with pytest.raises(ValueError, match="decode_chunk_size"):
        sample(policy, PROMPTS, eval_plan(2), generator=torch.Generator(), decode_chunk_size=0, **kw)


def test_config_keys_reach_the_policy(tmp_path):
    from flowrl.config import ModelConfig, RunConfig, from_dict, validate
    from flowrl.demo.tiny_image import save_tiny
    from flowrl.inputs import UsageError
    from flowrl.demo.tiny_qwen_image import build_tiny_qwen_image_pipeline
    from flowrl.train.model import build_flow_policy

    qdir = tmp_path / "qwen"
    build_tiny_qwen_image_pipeline(seed=0).save_pretrained(qdir)
    policy = build_flow_policy(ModelConfig(family="qwen_image", path=str(qdir), batched_cfg=True,
                                           offload_text_encoders=True))
    assert policy.batched_cfg is True and policy.text_encoder_home is None  # cpu -> cpu: nothing to move
    sd3 = save_tiny("sd3", tmp_path / "sd3")
    with pytest.raises(UsageError, match="model.batched_cfg: model family 'sd3'"):
        build_flow_policy(ModelConfig(family="sd3", path=str(sd3), batched_cfg=True))
    with pytest.raises(ValueError, match="decode_chunk_size"):
        validate(from_dict(RunConfig, {"sample": {"decode_chunk_size": 0}}))
