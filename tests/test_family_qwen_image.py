"""Qwen-Image (``QwenImagePipeline``) behind the FlowPolicy interface, on a tiny random-weight model in the real format.

* parity: flowrl's all-ODE Euler loop (the policy's ``sigmas`` / ``velocity`` / ``decode``) gives the latents and images
  of the pipeline's own ``__call__`` from the same seed, with and without true CFG, square and not, for two prompts of
  different token lengths (so the padding mask is exercised);
* rows do not depend on their batch (padding masked): velocity alone vs beside another prompt, and the sampler's SDE
  plans one row per call vs all rows together;
* a LoRA saved by flowrl loads into a fresh pipeline with ``load_lora_weights`` (alpha intact, same velocity);
* ``flowrl train configs/tiny_qwen_image.yaml`` runs (likelihood objective, 2 steps; DGPO forward objective, 1 step);
* gradient checkpointing gives the gradient computed without it;
* ``flowrl make-tiny qwen_image DIR`` writes a folder that ``FlowPolicy.from_pretrained`` maps to QwenImagePolicy.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from flowrl.cli import main as flowrl_main
from flowrl.demo.tiny_qwen_image import build_tiny_qwen_image_pipeline, tiny_qwen2_tokenizer
from flowrl.flow.models.qwen_image import QwenImagePolicy
from flowrl.flow.policy import FlowPolicy, PromptEmbeds

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red cube left of a blue ball", "two green dogs"]  # different token counts
NEG = " "


def _euler_ode(policy, x, embeds, sigmas, guidance, **kw):
    for i in range(len(sigmas) - 1):
        x = x + (sigmas[i + 1] - sigmas[i]) * policy.velocity(x, sigmas[i], embeds, guidance, **kw)
    return x


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: these GEMMs are tiny, and two OpenMP threads on a shared 2-core machine spend most of
    their time waiting for each other (a 128x32 @ 32x192 product measured 48 ms with 2 threads, 0.23 ms with 1)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def qwen() -> QwenImagePolicy:
    return FlowPolicy.from_pipeline(build_tiny_qwen_image_pipeline(seed=0))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("qwen_image") / "tiny"
    assert flowrl_main(["make-tiny", "qwen_image", str(d), "--seed", "3"]) == 0
    return d


# ----------------------------------------------------------------------------------------------
# the tiny model and its tokenizer
# ----------------------------------------------------------------------------------------------


def test_tiny_tokenizer_drops_exactly_the_template_prefix(qwen):
    """The template's system prefix is prompt_template_encode_start_idx tokens, as with Qwen's vocabulary, so the
    pipeline keeps exactly the user's prompt and the assistant turn."""
    pipe = qwen.pipeline
    tok = tiny_qwen2_tokenizer()
    template, drop = pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx
    prefix = tok(template.split("{}")[0]).input_ids
    assert drop == 34 and len(prefix) == drop
    ids = tok(template.format("a red cat")).input_ids
    assert ids[:drop] == prefix
    assert tok.decode(ids[drop:]) == "a red cat<|im_end|>\n<|im_start|>assistant\n"
    for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert len(tok(t).input_ids) == 1, f"{t} must be one special token"
    assert tok.pad_token == "<|endoftext|>" and tok.get_vocab() == pipe.tokenizer.get_vocab()


def test_tiny_pipeline_is_deterministic_small_and_in_the_released_layout(qwen):
    pipe = qwen.pipeline
    rng = torch.get_rng_state()
    again = build_tiny_qwen_image_pipeline(seed=0)
    other = build_tiny_qwen_image_pipeline(seed=1)
    assert torch.equal(torch.get_rng_state(), rng), "the builder must not consume the caller's RNG"
    for name in ("transformer", "vae", "text_encoder"):
        a, b = getattr(pipe, name).state_dict(), getattr(again, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} differs between two seed-0 builds"
        n = sum(p.numel() for p in getattr(pipe, name).parameters())
        assert 1_000 < n < 1_000_000, f"{name} has {n} params"
    sa, so = pipe.transformer.state_dict(), other.transformer.state_dict()
    assert any(not torch.equal(sa[k], so[k]) for k in sa), "seed 1 must give other weights"
    cfg = pipe.transformer.config
    assert cfg.in_channels == 4 * pipe.vae.config.z_dim and cfg.joint_attention_dim == pipe.text_encoder.config.text_config.hidden_size
    assert sum(cfg.axes_dims_rope) == cfg.attention_head_dim and not cfg.guidance_embeds
    assert pipe.scheduler.config.use_dynamic_shifting and pipe.scheduler.config.shift_terminal == 0.02


# ----------------------------------------------------------------------------------------------
# parity with QwenImagePipeline.__call__
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("guidance,hw", [(4.0, (32, 32)), (1.0, (32, 48)), (2.5, (48, 32))])
def test_ode_loop_reproduces_pipeline_call(qwen, guidance, hw):
    pipe = qwen.pipeline
    h, w = hw
    steps = 4
    noise = qwen.initial_noise(2, h, w, generator=torch.Generator().manual_seed(3))
    assert noise.dtype == torch.float32 and noise.shape == (2, *qwen.latent_shape(h, w))
    with torch.no_grad():
        embeds = qwen.encode_prompts(PROMPTS, negative_prompt=NEG)
        assert embeds.prompt_mask is not None and not bool(embeds.prompt_mask.all()), "prompts must differ in length"
        sig = qwen.sigmas(steps, h, w)
        x = _euler_ode(qwen, noise.clone(), embeds, sig, guidance)
        img = qwen.decode(x)
        common = dict(num_inference_steps=steps, true_cfg_scale=guidance, height=h, width=w,
                      negative_prompt=[NEG] * 2 if guidance > 1 else None)
        ref_x = pipe(PROMPTS, latents=noise.clone(), output_type="latent", **common).images
        ref = pipe(PROMPTS, latents=noise.clone(), output_type="pt", **common).images
        ref_gen = pipe(PROMPTS, generator=torch.Generator().manual_seed(3), output_type="pt", **common).images
    # the sigmas the pipeline's scheduler used (dynamic shift of the packed token count, shift_terminal) are the policy's
    torch.testing.assert_close(pipe.scheduler.sigmas.float(), sig, rtol=0, atol=1e-7)
    assert img.shape == (2, 3, h, w) and img.dtype == torch.float32
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0 and float(img.std()) > 0.01
    # float32 throughout. The only computations that differ: the text encoder runs each prompt alone here and the two
    # padded together in the pipeline (another GEMM shape: last-bit rounding, ~1e-7 relative), then 4 steps x (1-2)
    # transformer calls carry it. Measured max differences are ~1e-6 (latents) and ~1e-7 (images); 2e-5 is ~100x
    # float32 eps at these magnitudes (|x| <~ 5), while any convention error (timestep scale, CFG rescale, mask, mean/std,
    # sigma shift) moves them by > 1e-2.
    torch.testing.assert_close(x, ref_x.float(), rtol=0, atol=2e-5)
    torch.testing.assert_close(img, ref, rtol=0, atol=2e-5)
    torch.testing.assert_close(ref_gen, ref, rtol=0, atol=0)  # initial_noise draws what prepare_latents draws
    assert not torch.allclose(img[0], img[1], atol=1e-3), "the two prompts must give different images"


def test_velocity_of_a_row_does_not_depend_on_its_batch(qwen):
    """Rows are padded to the longest prompt of the batch; the transformer masks the padding out of the joint
    attention, so a row's velocity is the one it has alone, up to float rounding."""
    x = torch.randn(2, *qwen.latent_shape(32, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        both = qwen.encode_prompts(PROMPTS, negative_prompt=NEG)
        v_both = qwen.velocity(x, 0.6, both, 4.0)
        for i, p in enumerate(PROMPTS):
            alone = qwen.encode_prompts([p], negative_prompt=NEG)
            assert alone.prompt_embeds.shape[1] <= both.prompt_embeds.shape[1]
            v_alone = qwen.velocity(x[i:i + 1], 0.6, alone, 4.0)
            torch.testing.assert_close(v_both[i:i + 1], v_alone, rtol=0, atol=1e-5)
        # negative control: without the mask the short row attends to its zero padding and moves
        unmasked = PromptEmbeds(**{**both.tensors(), "prompt_mask": torch.ones_like(both.prompt_mask)})
        short = int(both.prompt_mask.sum(1).argmin())
        assert (qwen.velocity(x, 0.6, unmasked, 1.0)[short] - qwen.velocity(x, 0.6, both, 1.0)[short]).abs().max() > 1e-4


@pytest.mark.parametrize("kind", ["random_window", "tree"])
def test_sampler_rows_do_not_depend_on_their_chunk(qwen, kind):
    """The sampler unchanged on Qwen-Image (SDE window / tree plan, true CFG, non-square): rows sampled one per
    transformer call give the rows sampled together (prompts padded to each other's length) up to rounding."""
    from flowrl.flow.plan import PlanConfig, TreeConfig, WindowConfig, build_plan, plan_generator
    from flowrl.flow.sampler import sample

    cfg = (PlanConfig(kind="random_window", window=WindowConfig(size=2, range=[0, 3])) if kind == "random_window"
           else PlanConfig(kind="tree", tree=TreeConfig(branch_factors=[2], branch_steps=[1])))
    plan = build_plan(cfg, 4, 0, plan_generator(0, 0))
    runs = [sample(qwen, PROMPTS, plan, group_size=2, height=32, width=48, guidance_scale=4.0, negative_prompt=NEG,
                   generator=[torch.Generator().manual_seed(i) for i in range(2)], chunk_size=c, progress=False)
            for c in (None, 1)]
    assert runs[0].images.shape == (4, 3, 32, 48) and bool(torch.isfinite(runs[0].log_probs).all())
    torch.testing.assert_close(runs[1].images, runs[0].images, rtol=0, atol=1e-5)
    torch.testing.assert_close(runs[1].log_probs, runs[0].log_probs, rtol=0, atol=1e-4)


def test_fixed_shift_gives_dance_grpo_schedule():
    """model.shift 3 (DanceGRPO's Qwen-Image script): sigma = 3t / (1 + 2t) on t = linspace(1, 0, n + 1), without the
    dynamic shift and without Qwen-Image's terminal stretch to 0.02."""
    from flowrl.train.model import set_fixed_shift

    policy = QwenImagePolicy.from_pipeline(build_tiny_qwen_image_pipeline(seed=0))
    assert float(policy.sigmas(20, 32, 32)[-2]) == pytest.approx(0.02, abs=1e-6)  # the released config's shift_terminal
    set_fixed_shift(policy, 3.0)
    t = torch.linspace(1, 0, 21, dtype=torch.float64)
    upstream = (3 * t / (1 + 2 * t)).float()
    for hw in ((32, 32), (48, 32)):  # no resolution dependence left
        torch.testing.assert_close(policy.sigmas(20, *hw), upstream, rtol=0, atol=1.2e-7)


def test_bad_inputs_raise_clear_errors(qwen):
    e = qwen.encode_prompts(PROMPTS)
    x = qwen.initial_noise(2, 32, 32)
    with pytest.raises(ValueError, match="packed"):
        qwen.velocity(x.unflatten(1, (8, 8)), 0.5, e, 1.0)
    with pytest.raises(ValueError, match="rows"):
        qwen.velocity(x[:1], 0.5, e, 1.0)
    with pytest.raises(ValueError, match="negative"):
        qwen.velocity(x, 0.5, PromptEmbeds(e.prompt_embeds, prompt_mask=e.prompt_mask), 4.0)
    with pytest.raises(ValueError, match="divisible by 4"):
        qwen.latent_shape(30, 32)
    with pytest.raises(ValueError, match="tokens"):
        qwen.decode(x, height=32, width=48)
    with pytest.raises(ValueError, match="max_sequence_length"):
        QwenImagePolicy(qwen.pipeline, max_sequence_length=2048)


# ----------------------------------------------------------------------------------------------
# LoRA: saved by flowrl, loaded by diffusers
# ----------------------------------------------------------------------------------------------


def _lora_scalings(module):
    return {float(v) for m in module.modules() for v in (getattr(m, "scaling", None) or {}).values()
            if isinstance(getattr(m, "scaling", None), dict)}


def _pipeline_velocity(pipe, x, sigma, h, w):
    """The transformer called as QwenImagePipeline.__call__ calls it (its own encode_prompt, t / 1000, img_shapes)."""
    pe, mask = pipe.encode_prompt(PROMPTS, device="cpu")
    grid = (1, h // pipe.vae_scale_factor // 2, w // pipe.vae_scale_factor // 2)
    t = torch.full((x.shape[0],), sigma) * 1000 / 1000  # scheduler.timesteps (float32 sigma x 1000), then / 1000
    with torch.no_grad():
        return pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=pe, encoder_hidden_states_mask=mask,
                                img_shapes=[[grid]] * x.shape[0], return_dict=False)[0]


def test_lora_loads_into_a_fresh_pipeline_with_the_same_velocity(tiny_dir, tmp_path):
    from diffusers import QwenImagePipeline
    from peft.utils import get_peft_model_state_dict

    from flowrl.train.lora import DEFAULTS, add_lora_to_transformer, lora_config, lora_targets_present, save_diffusers_lora

    rank, alpha = 4, 16
    policy = QwenImagePolicy.from_pretrained(str(tiny_dir))
    targets = DEFAULTS["qwen_image"]["targets"]
    assert lora_targets_present(policy.transformer, targets) == targets, "every default target must match a module"
    lc = lora_config("qwen_image", rank=rank, alpha=alpha)
    add_lora_to_transformer(policy.transformer, lc)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in policy.transformer.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    assert _lora_scalings(policy.transformer) == {alpha / rank}
    h, w, sigma = 32, 48, 0.7
    x = torch.randn(2, *policy.latent_shape(h, w), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        v = policy.velocity(x, sigma, policy.encode_prompts(PROMPTS), 1.0)
        policy.transformer.disable_adapters()
        v_base = policy.velocity(x, sigma, policy.encode_prompts(PROMPTS), 1.0)
        policy.transformer.enable_adapters()
    assert (v - v_base).abs().max() > 1e-2, "the LoRA does not change the velocity: the test would be vacuous"

    save_diffusers_lora(QwenImagePipeline, policy.transformer, tmp_path / "lora")
    fresh = QwenImagePipeline.from_pretrained(str(tiny_dir))
    fresh.load_lora_weights(str(tmp_path / "lora"))
    assert _lora_scalings(fresh.transformer) == {alpha / rank}
    # float32; the reloaded weights may sit at other alignments (last-bit GEMM rounding), the wrong scale below moves v by > 1e-3
    torch.testing.assert_close(_pipeline_velocity(fresh, x, sigma, h, w), v, rtol=1e-5, atol=1e-5)

    # negative control: without the adapter metadata diffusers assumes alpha = rank (scale 1, not 4)
    nometa = tmp_path / "lora_nometa"
    nometa.mkdir()
    QwenImagePipeline.save_lora_weights(nometa, transformer_lora_layers=get_peft_model_state_dict(policy.transformer),
                                        safe_serialization=True)
    wrong = QwenImagePipeline.from_pretrained(str(tiny_dir))
    wrong.load_lora_weights(str(nometa))
    assert _lora_scalings(wrong.transformer) == {1.0}
    assert (_pipeline_velocity(wrong, x, sigma, h, w) - v).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------
# gradient checkpointing, make-tiny, training runs
# ----------------------------------------------------------------------------------------------


def test_gradient_checkpointing_gives_the_same_gradient(qwen):
    t = qwen.transformer
    assert t._supports_gradient_checkpointing
    x = torch.randn(2, *qwen.latent_shape(32, 32), generator=torch.Generator().manual_seed(5))
    e = qwen.encode_prompts(PROMPTS, negative_prompt=NEG)
    grads = []
    assert all(p.requires_grad for p in t.parameters()), "the policy's transformer trains in full"
    try:
        for ckpt in (False, True):
            if ckpt:
                t.enable_gradient_checkpointing()
            t.zero_grad(set_to_none=True)
            qwen.velocity(x, 0.4, e, 4.0).square().mean().backward()
            assert t.gradient_checkpointing == ckpt
            grads.append({n: p.grad.clone() for n, p in t.named_parameters() if p.grad is not None})
    finally:
        t.disable_gradient_checkpointing()
        t.zero_grad(set_to_none=True)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7)


def test_make_tiny_folder_loads_as_qwen_image_policy(tiny_dir):
    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImagePipeline"
    policy = FlowPolicy.from_pretrained(str(tiny_dir))
    assert type(policy) is QwenImagePolicy and policy.family == "qwen_image"
    same = QwenImagePolicy.from_pipeline(build_tiny_qwen_image_pipeline(seed=3))
    x = torch.randn(2, *policy.latent_shape(32, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        v = policy.velocity(x, 0.5, policy.encode_prompts(PROMPTS, negative_prompt=NEG), 4.0)
        v_mem = same.velocity(x, 0.5, same.encode_prompts(PROMPTS, negative_prompt=NEG), 4.0)
    torch.testing.assert_close(v, v_mem, rtol=0, atol=1e-6)  # the saved folder is the seed-3 build


def test_fsdp_config_names_the_block_class():
    import diffusers.models.transformers.transformer_qwenimage as tq
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / "accelerate" / "fsdp_qwen_image.yaml").read_text())
    names = cfg["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"].split(",")
    assert names == tq.QwenImageTransformer2DModel._no_split_modules
    assert all(isinstance(getattr(tq, n), type) for n in names)


def _metrics(run: Path):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


COMMON = ["train.tracker=none", "train.progress=false", "resume=none", "sample.eval_num_steps=2", "eval.num_prompts=1",
          "eval.seeds=[0]", "eval.at_start=false", "rewards={jpeg_compressibility: 1.0}", "checkpoint_every=100"]


@pytest.fixture
def no_report(monkeypatch):
    """Skip report.html (matplotlib pages: most of a tiny run's time, and nothing family-specific; tests/test_report.py
    covers it)."""
    import flowrl.train.loop as loop

    monkeypatch.setattr(loop, "write_report", lambda run_dir: None)


def test_flowrl_train_runs_the_tiny_qwen_image_config(tiny_dir, tmp_path, no_report):
    out = tmp_path / "grpo"
    rc = flowrl_main(["train", str(ROOT / "configs" / "tiny_qwen_image.yaml"), f"model.path={tiny_dir}",
                      f"output_dir={out}", "max_steps=2", *COMMON])
    assert rc == 0 and json.loads((out / "summary.json").read_text())["steps"] == 2
    m = _metrics(out)
    assert len(m) == 2 and all(math.isfinite(r["loss"]) and r["skipped_optimizer_steps"] == 0 for r in m)
    assert m[0]["grad_norm"] > 0
    assert abs(m[0]["ratio_first_min"] - 1) < 1e-4 and abs(m[0]["ratio_first_max"] - 1) < 1e-4  # on-policy


def test_flowrl_train_runs_a_forward_objective_on_qwen_image(tiny_dir, tmp_path, no_report):
    out = tmp_path / "dgpo"
    rc = flowrl_main(["train", str(ROOT / "configs" / "tiny_qwen_image.yaml"), f"model.path={tiny_dir}",
                      f"output_dir={out}", "max_steps=1", "objective.kind=dgpo", "objective.timestep_share=group", "plan.kind=ode", *COMMON])
    assert rc == 0 and json.loads((out / "summary.json").read_text())["steps"] == 1
    m = _metrics(out)[0]
    assert math.isfinite(m["loss"]) and m["grad_norm"] > 0
