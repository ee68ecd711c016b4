"""Z-Image (``ZImagePipeline``) behind the FlowPolicy interface, on the tiny real-format model.

* parity: an all-ODE Euler loop written with the policy's ``sigmas`` / ``initial_noise`` /
  ``velocity`` / ``decode`` gives the latents and images of the pipeline's own ``__call__``
  (two prompts of different caption lengths, CFG on and off, non-square sizes, the pipeline's
  cfg_truncation / cfg_normalization), and its sigmas are the scheduler's (static and dynamic shift);
* a row's velocity does not depend on the batch; CFG is ``pos + g (pos - neg)`` with ``v = -out``;
* a LoRA saved by ``save_diffusers_lora`` loads into a fresh pipeline with ``load_lora_weights``,
  alpha intact, same velocity (negative control: without metadata, alpha = rank, another velocity);
* gradient checkpointing: the same gradient, and the checkpointed path is taken;
* ``flowrl make-tiny z_image DIR`` and ``FlowPolicy.from_pretrained(DIR)`` pick :class:`ZImagePolicy`;
* ``flowrl train configs/tiny_z_image.yaml``: two likelihood (GRPO) steps with LoRA, one DGPO step
  (forward objective, ODE plan) with full fine-tuning.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from flowrl.cli import main as flowrl_main
from flowrl.flow.models.z_image import ZImagePolicy
from flowrl.flow.policy import FlowPolicy, PromptEmbeds

ROOT = Path(__file__).resolve().parents[1]
MSL = 64  # Qwen3 tokens; the pipeline's 512 only pads more (the features are cut to the prompt's tokens)
# caption lengths differ (the transformer masks); a tuple: ZImagePipeline.encode_prompt rewrites a list it is given
PROMPTS = ("a red cube left of a blue ball", "two dogs")
RANK, ALPHA = 4, 16


def _euler_ode(policy, x, embeds, sigmas, guidance):
    for i in range(len(sigmas) - 1):
        x = x + (sigmas[i + 1] - sigmas[i]) * policy.velocity(x, sigmas[i], embeds, guidance)
    return x


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread while this module runs: on the tiny model every op is small, and on a loaded 2-core
    machine the threads' synchronisation dominates (a velocity call measured 1.7 s with 2 threads, 0.06 s with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    """The tiny model written by ``flowrl make-tiny z_image DIR``."""
    d = tmp_path_factory.mktemp("z_image") / "tiny"
    assert flowrl_main(["make-tiny", "z_image", str(d)]) == 0
    return str(d)


@pytest.fixture(scope="module")
def policy(tiny_dir) -> ZImagePolicy:
    return FlowPolicy.from_pretrained(tiny_dir, max_sequence_length=MSL)


def test_make_tiny_folder_loads_as_z_image_policy(tiny_dir, policy):
    index = json.loads((Path(tiny_dir) / "model_index.json").read_text())
    assert index["_class_name"] == "ZImagePipeline"
    assert type(policy) is ZImagePolicy and policy.family == "z_image"
    assert type(policy.pipeline.text_encoder).__name__ == "Qwen3Model"
    assert policy.pipeline.tokenizer.chat_template  # the chat template survives save / reload
    n = sum(p.numel() for p in policy.transformer.parameters())
    assert 50_000 < n < 2_000_000, f"the tiny transformer has {n} parameters"
    with pytest.raises(ValueError, match="needs a FluxPipeline"):
        from flowrl.flow.models.flux import FluxPolicy

        FluxPolicy.from_pretrained(tiny_dir)


def test_tiny_builder_is_deterministic_and_leaves_the_global_rng():
    from flowrl.demo.tiny_z_image import build_tiny_z_image_pipeline

    rng = torch.get_rng_state()
    a, b, c = (build_tiny_z_image_pipeline(seed=s) for s in (0, 0, 1))
    assert torch.equal(torch.get_rng_state(), rng), "the builder must not consume the caller's RNG"
    for name in ("transformer", "text_encoder", "vae"):
        sa, sb, sc = (getattr(p, name).state_dict() for p in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa), f"{name} differs between two seed-0 builds"
        assert any(not torch.equal(sa[k], sc[k]) for k in sa), f"{name}: seed 1 gives the same weights"


def test_tiny_tokenizer_writes_the_qwen3_chat_turn(policy):
    tok = policy.pipeline.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "a cat"}], tokenize=False, add_generation_prompt=True,
                                   enable_thinking=True)
    assert text == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text).input_ids
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and len(ids) == 3 + len("user\na cat") + 1 + len("assistant\n")
    assert tok.decode(ids) == text and tok.padding_side == "right"


def test_prompt_rows_have_their_own_lengths(policy):
    e = policy.encode_prompts(PROMPTS)
    lengths = e.prompt_mask.sum(1).tolist()
    assert lengths[0] > lengths[1] and e.prompt_embeds.shape[1] == lengths[0]
    feats, _ = policy.pipeline.encode_prompt(list(PROMPTS), device="cpu", do_classifier_free_guidance=False,
                                             max_sequence_length=MSL)
    for i, f in enumerate(feats):  # the pipeline's own per-prompt features (encoded two at a time), unpadded
        torch.testing.assert_close(e.prompt_embeds[i, : lengths[i]], f, rtol=0, atol=1e-6)
        assert not e.prompt_embeds[i, lengths[i]:].any()
    assert e.has_negative and e.negative_prompt_mask.all()


@pytest.mark.parametrize(
    "guidance,hw,trunc,norm",
    [(4.0, (32, 48), 1.0, 0.0), (0.0, (48, 32), 1.0, 0.0), (4.0, (32, 32), 0.2, 1.0)],
    ids=["cfg-32x48", "nocfg-48x32", "cfg-trunc-norm"],
)
def test_ode_loop_reproduces_pipeline_call(policy, guidance, hw, trunc, norm):
    pipe = policy.pipeline
    h, w = hw
    steps = 4
    policy.cfg_truncation, policy.cfg_normalization = trunc, norm
    try:
        noise = policy.initial_noise(2, h, w, generator=torch.Generator().manual_seed(3))
        assert noise.shape == (2, *policy.latent_shape(h, w)) and noise.dtype == torch.float32
        with torch.no_grad():
            e = policy.encode_prompts(PROMPTS)
            sig = policy.sigmas(steps, h, w)
            lat = _euler_ode(policy, noise.clone(), e, sig, guidance)
            img = policy.decode(lat)
            common = dict(num_inference_steps=steps, guidance_scale=guidance, height=h, width=w,
                          max_sequence_length=MSL, cfg_truncation=trunc, cfg_normalization=norm)
            ref_lat = pipe(list(PROMPTS), latents=noise.clone(), output_type="latent", **common).images
            ref_img = pipe(list(PROMPTS), latents=noise.clone(), output_type="pt", **common).images
            gen_lat = pipe(list(PROMPTS), generator=torch.Generator().manual_seed(3), output_type="latent", **common).images
    finally:
        policy.cfg_truncation, policy.cfg_normalization = 1.0, 0.0
    torch.testing.assert_close(pipe.scheduler.sigmas, sig, rtol=0, atol=0)  # the scheduler's own sigmas
    torch.testing.assert_close(gen_lat, ref_lat, rtol=0, atol=0)  # initial_noise draws as prepare_latents
    # float32 throughout and the same transformer calls (same rows, order and masks) as the pipeline: only the
    # batching of ops can move the last bits (the policy encodes prompts one at a time, the pipeline two at once);
    # latents of magnitude ~5 after 4 steps within 1e-5, images (through the VAE decoder) within 2e-5, the
    # tolerance of the SD3 / Flux parity tests. Measured here: 0 (bitwise equal) in all three cases.
    torch.testing.assert_close(lat, ref_lat, rtol=0, atol=1e-5)
    torch.testing.assert_close(img, ref_img, rtol=0, atol=2e-5)
    assert img.shape == (2, 3, h, w) and 0 <= float(img.min()) and float(img.max()) <= 1
    assert not torch.allclose(img[0], img[1], atol=1e-3), "the two prompts must give different images"


def test_sigmas_follow_the_scheduler_with_dynamic_shift(policy):
    """With dynamic shifting on, the pipeline's mu depends on the image token count: so do the sigmas."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas

    old = policy.pipeline.scheduler
    sched = FlowMatchEulerDiscreteScheduler.from_config(old.config, use_dynamic_shifting=True)
    policy.pipeline.scheduler = sched
    try:
        got = {}
        for steps, (h, w) in ((7, (32, 32)), (7, (256, 384)), (3, (64, 32))):
            seq = policy.image_seq_len(h, w)
            sched.set_timesteps(sigmas=get_default_z_image_sigmas(steps), mu=calculate_shift(seq))
            got[(h, w)] = policy.sigmas(steps, h, w)
            torch.testing.assert_close(got[(h, w)], sched.sigmas, rtol=0, atol=0)
        assert not torch.allclose(got[(32, 32)], got[(256, 384)])
    finally:
        policy.pipeline.scheduler = old


def test_velocity_rows_and_cfg_convention(policy):
    with torch.no_grad():
        e = policy.encode_prompts(PROMPTS)
        x = policy.initial_noise(2, 32, 32, generator=torch.Generator().manual_seed(0))
        v = policy.velocity(x, 0.7, e, 4.0)
        for i in range(2):  # a row's velocity does not depend on the other row (caption lengths differ)
            torch.testing.assert_close(policy.velocity(x[i:i + 1], 0.7, e.select([i]), 4.0), v[i:i + 1],
                                       rtol=0, atol=1e-5)
        pos = -policy.velocity(x, 0.7, e, 0.0)
        neg_e = PromptEmbeds(prompt_embeds=e.negative_prompt_embeds, prompt_mask=e.negative_prompt_mask)
        neg = -policy.velocity(x, 0.7, neg_e, 0.0)
        torch.testing.assert_close(v, -(pos + 4.0 * (pos - neg)), rtol=1e-4, atol=1e-5)
        v_s = policy.velocity(x, torch.tensor([0.7, 0.2]), e, 0.0)
        torch.testing.assert_close(v_s[0], -pos[0], rtol=0, atol=1e-5)
        assert not torch.allclose(v_s[1], -pos[1], atol=1e-4)
    with pytest.raises(ValueError, match="guidance_scale"):
        policy.velocity(x, 0.7, e, -1.0)
    with pytest.raises(ValueError, match="negative embeddings"):
        policy.velocity(x, 0.7, PromptEmbeds(prompt_embeds=e.prompt_embeds, prompt_mask=e.prompt_mask), 4.0)
    with pytest.raises(ValueError, match="divisible by 4"):
        policy.latent_shape(30, 32)


# ----------------------------------------------------------------------------------------------
# LoRA round trip, gradient checkpointing
# ----------------------------------------------------------------------------------------------


def _scalings(transformer) -> set:
    out = set()
    for m in transformer.modules():
        s = getattr(m, "scaling", None)
        if isinstance(s, dict) and s:
            out.update(float(v) for v in s.values())
    return out


def _pipeline_velocity(pipe, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The velocity as ZImagePipeline.__call__ computes it without CFG: its own encode_prompt, a list of
    [C, 1, h, w] latents, timestep (1000 - sigma N) / 1000, the output negated."""
    feats, _ = pipe.encode_prompt(list(PROMPTS), device="cpu", do_classifier_free_guidance=False,
                                  max_sequence_length=MSL)
    t = torch.full((x.shape[0],), sigma) * pipe.scheduler.config.num_train_timesteps
    with torch.no_grad():
        out = pipe.transformer(list(x.unsqueeze(2).unbind(0)), (1000 - t) / 1000, feats, return_dict=False)[0]
    return -torch.stack([o.float() for o in out]).squeeze(2)


def test_lora_loads_into_a_fresh_pipeline_with_the_same_velocity(tiny_dir, tmp_path):
    from diffusers import ZImagePipeline
    from peft.utils import get_peft_model_state_dict

    from flowrl.train.lora import DEFAULTS, add_lora_to_transformer, lora_config, lora_targets_present, save_diffusers_lora

    pol = FlowPolicy.from_pretrained(tiny_dir, max_sequence_length=MSL)
    lc = lora_config("z_image", rank=RANK, alpha=ALPHA)
    assert lora_targets_present(pol.transformer, sorted(lc.target_modules)) == sorted(DEFAULTS["z_image"]["targets"])
    add_lora_to_transformer(pol.transformer, lc)
    n_lora = {n.split(".lora_")[0] for n, _ in pol.transformer.named_parameters() if "lora_A" in n}
    assert any(n.startswith("context_refiner.") for n in n_lora) and any(n.startswith("layers.") for n in n_lora)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in pol.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    assert _scalings(pol.transformer) == {ALPHA / RANK}
    x = torch.randn(2, *pol.latent_shape(32, 32), generator=torch.Generator().manual_seed(1))
    sigma = 0.7
    with torch.no_grad():
        e = pol.encode_prompts(PROMPTS)
        v = pol.velocity(x, sigma, e, 0.0)
        pol.transformer.disable_adapters()
        v_base = pol.velocity(x, sigma, e, 0.0)
        pol.transformer.enable_adapters()
    assert (v - v_base).abs().max() > 1e-2, "the LoRA does not change the velocity: the test would be vacuous"

    save_diffusers_lora(ZImagePipeline, pol.transformer, tmp_path / "lora")
    fresh = ZImagePipeline.from_pretrained(tiny_dir)
    fresh.load_lora_weights(str(tmp_path / "lora"))
    assert _scalings(fresh.transformer) == {ALPHA / RANK}
    # float32, the same calls; reloaded weights may sit differently aligned (a CPU GEMM's last bits)
    torch.testing.assert_close(_pipeline_velocity(fresh, x, sigma), v, rtol=1e-5, atol=1e-5)

    # negative control: the weights without the adapter metadata load with alpha = rank (scale 1)
    (tmp_path / "nometa").mkdir()
    ZImagePipeline.save_lora_weights(tmp_path / "nometa", transformer_lora_layers=get_peft_model_state_dict(pol.transformer),
                                     safe_serialization=True)
    wrong = ZImagePipeline.from_pretrained(tiny_dir)
    wrong.load_lora_weights(str(tmp_path / "nometa"))
    assert _scalings(wrong.transformer) == {1.0}
    assert (_pipeline_velocity(wrong, x, sigma) - v).abs().max() > 1e-3


def test_gradient_checkpointing_gives_the_same_gradient(tiny_dir):
    pol = FlowPolicy.from_pretrained(tiny_dir, max_sequence_length=MSL)
    t = pol.transformer
    t.requires_grad_(True)
    with torch.no_grad():
        e = pol.encode_prompts(PROMPTS)
    x = torch.randn(2, *pol.latent_shape(32, 32), generator=torch.Generator().manual_seed(2))

    def grads():
        t.zero_grad(set_to_none=True)
        pol.velocity(x, torch.tensor([0.8, 0.3]), e, 4.0).square().mean().backward()
        return {n: p.grad.clone() for n, p in t.named_parameters() if p.grad is not None}

    plain = grads()
    assert t._supports_gradient_checkpointing
    t.enable_gradient_checkpointing()
    calls = []
    inner = t._gradient_checkpointing_func
    t._gradient_checkpointing_func = lambda *a, **k: calls.append(1) or inner(*a, **k)
    ckpt = grads()
    assert len(calls) == len(t.layers) + len(t.noise_refiner) + len(t.context_refiner), "checkpointing not used"
    assert plain.keys() == ckpt.keys() and len(plain) > 10
    for n in plain:  # recomputation repeats the same float32 ops: equal up to rounding
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-7, msg=n)


# ----------------------------------------------------------------------------------------------
# flowrl train on the tiny model
# ----------------------------------------------------------------------------------------------


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


_COMMON = ["train.tracker=none", "train.progress=false", "resume=none", "sample.eval_num_steps=2",
           "eval.num_prompts=1", "eval.seeds=[0]", "rewards={jpeg_compressibility: 1.0}"]


@pytest.fixture
def no_report(monkeypatch):
    """Skip report.html (matplotlib: most of a tiny run's time; tests/test_report.py covers it)."""
    monkeypatch.setattr("flowrl.train.loop.write_report", lambda run_dir: None)


def test_flowrl_train_two_grpo_steps_with_lora(tiny_dir, tmp_path, no_report):
    out = tmp_path / "grpo"
    rc = flowrl_main(["train", str(ROOT / "configs" / "tiny_z_image.yaml"), f"model.path={tiny_dir}",
                      f"output_dir={out}", "max_steps=2", *_COMMON])
    summary = json.loads((out / "summary.json").read_text())
    assert rc == 0 and summary["steps"] == 2
    ms = _metrics(out)
    assert len(ms) == 2
    for m in ms:
        assert math.isfinite(m["loss"]) and m["grad_norm"] > 0 and m["skipped_optimizer_steps"] == 0
        assert abs(m["ratio_first_min"] - 1) < 1e-4 and abs(m["ratio_first_max"] - 1) < 1e-4  # on-policy
    assert (Path(summary["result"]) / "pytorch_lora_weights.safetensors").is_file()


def test_flowrl_train_one_dgpo_step_full_finetune(tiny_dir, tmp_path, no_report):
    out = tmp_path / "dgpo"
    rc = flowrl_main(["train", str(ROOT / "configs" / "tiny_z_image.yaml"), f"model.path={tiny_dir}",
                      f"output_dir={out}", "max_steps=1", "objective.kind=dgpo", "plan.kind=ode",
                      "objective.guidance_scale=0.0", "objective.timestep_share=group", "objective.noise_share=group", "lora.enabled=false",
                      *_COMMON])
    assert rc == 0 and json.loads((out / "summary.json").read_text())["steps"] == 1
    m = _metrics(out)[0]
    assert math.isfinite(m["loss"]) and m["grad_norm"] > 0 and m["skipped_optimizer_steps"] == 0


def test_fsdp_config_wraps_the_z_image_block():
    """configs/accelerate/fsdp_z_image.yaml wraps the transformer's block class (its _no_split_modules)."""
    import yaml
    from diffusers import ZImageTransformer2DModel

    cfg = yaml.safe_load((ROOT / "configs" / "accelerate" / "fsdp_z_image.yaml").read_text())
    names = cfg["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"].split(",")
    assert cfg["distributed_type"] == "FSDP" and names == list(ZImageTransformer2DModel._no_split_modules)
