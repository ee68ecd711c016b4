"""Qwen-Image-Edit (``QwenImageEditPipeline``) behind the FlowPolicy interface, on a tiny random-weight model in the
real format (``flowrl make-tiny qwen_image_edit DIR``).

* parity: flowrl's all-ODE Euler loop gives the latents and images of the pipeline's own ``__call__`` (same source
  images, noise, steps, true CFG on and off, a non-square output, two prompts of different token lengths) and its
  sigmas are the scheduler's; the source-image size rule is the pipeline's;
* a row's velocity does not depend on the other rows; the source image changes both the prompt embedding (the VL
  encoder reads it) and the velocity;
* LoRA: saved with ``save_diffusers_lora``, loaded by the pipeline's ``load_lora_weights`` (alpha intact);
* gradient checkpointing gives the gradient of the plain forward;
* ``flowrl train configs/tiny_qwen_image_edit.yaml`` runs (likelihood objective, 2 steps on ``shapes_edit``; DGPO, 1 step);
* ``flowrl make-tiny qwen_image_edit DIR`` loads as QwenImageEditPolicy from model_index.json.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from flowrl.cli import main as flowrl_main
from flowrl.flow.policy import FlowPolicy

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["make the circle red", "add a blue square left of the triangle"]  # different token counts
RANK, ALPHA = 4, 16
SMALL_AREA = 32 * 64  # the pipeline's ~1 MP source-image area, shrunk for the tiny model (see _small_area)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: the tiny model's ops are small, and on a loaded 2-core machine the threads'
    synchronisation dominates them."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("qwen_edit") / "model"
    assert flowrl_main(["make-tiny", "qwen_image_edit", str(d)]) == 0
    return d


@pytest.fixture(scope="module")
def policy(tiny_dir):
    return FlowPolicy.from_pretrained(tiny_dir)


@pytest.fixture
def _small_area(monkeypatch):
    """The pipeline resizes every source image to calculate_dimensions(1024 * 1024, aspect) (~1 MP: 262144 tokens on
    the tiny 2x VAE); both the pipeline and the policy (condition_image_size "auto") call the module's function, so
    shrinking its target area keeps the very same rule at a size the tiny model runs in a second."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit

    orig = edit.calculate_dimensions
    monkeypatch.setattr(edit, "calculate_dimensions", lambda area, ratio: orig(SMALL_AREA, ratio))


def _sources(size=(32, 64)):
    """Two different rendered shapes scenes as PIL images of (height, width) ``size``."""
    from flowrl.demo.shapes import draw
    from flowrl.demo.shapes_edit import make_edit

    h, w = size
    return [draw(make_edit(PROMPTS[k], 64, rng=k)[0], 64).resize((w, h)) for k in range(2)]


def _euler(policy, x, embeds, sigmas, guidance, **kw):
    for i in range(len(sigmas) - 1):
        x = x + (sigmas[i + 1] - sigmas[i]) * policy.velocity(x, sigmas[i], embeds, guidance, **kw)
    return x


def test_make_tiny_gives_the_edit_policy(tiny_dir, policy):
    from flowrl.flow.models.qwen_image_edit import QwenImageEditPolicy

    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImageEditPipeline" and index["processor"][1] == "Qwen2VLProcessor"
    assert type(policy) is QwenImageEditPolicy and policy.family == "qwen_image_edit" and policy._prompt_sees_image
    n = sum(p.numel() for p in policy.transformer.parameters())
    assert n < 300_000, n


def test_tiny_builder_is_deterministic_per_seed(policy):
    """Same seed, same weights (the make-tiny folder is seed 0); another seed, other weights; every component."""
    from flowrl.demo.tiny_qwen_image_edit import build_tiny_qwen_image_edit_pipeline

    same, other = build_tiny_qwen_image_edit_pipeline(seed=0), build_tiny_qwen_image_edit_pipeline(seed=1)
    for name in ("transformer", "text_encoder", "vae"):
        ref = getattr(policy.pipeline, name).state_dict()
        a, b = getattr(same, name).state_dict(), getattr(other, name).state_dict()
        assert all(torch.equal(a[k], ref[k]) for k in ref), name
        assert any(not torch.equal(b[k], ref[k]) for k in ref if ref[k].is_floating_point()), name


def test_tiny_tokenizer_drops_exactly_the_template_prefix(policy):
    """The edit template's system prefix is prompt_template_encode_start_idx (64) tokens, as with Qwen's vocabulary:
    the pipeline keeps the vision tokens, the instruction and the assistant turn."""
    pipe = policy.pipeline
    tok = pipe.tokenizer
    template, drop = pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx
    prefix = tok(template.split("<|vision_start|>")[0]).input_ids
    assert drop == 64 and len(prefix) == drop
    ids = tok(template.format("make the circle red")).input_ids
    assert tok.decode(ids[drop:]) == ("<|vision_start|><|image_pad|><|vision_end|>make the circle red<|im_end|>\n"
                                      "<|im_start|>assistant\n")


def test_edit_plus_pipeline_is_not_taken_for_the_edit_policy(policy):
    """QwenImageEditPlusPipeline (several source images, another template) is a different pipeline: unsupported."""
    from diffusers import QwenImageEditPlusPipeline

    plus = QwenImageEditPlusPipeline(**policy.pipeline.components)
    with pytest.raises(ValueError, match="unsupported pipeline class 'QwenImageEditPlusPipeline'"):
        FlowPolicy.from_pipeline(plus)


@pytest.mark.parametrize("true_cfg,hw", [(1.0, (32, 32)), (3.0, (32, 48))])
def test_ode_loop_reproduces_the_pipeline_call(policy, _small_area, true_cfg, hw):
    pipe = policy.pipeline
    h, w = hw
    steps = 4
    images = _sources()
    assert policy.condition_size(32, 64) == (32, 64)  # the size the pipeline keeps: no resampling on either side
    noise = policy.initial_noise(2, h, w, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        embeds = policy.encode_prompts(PROMPTS, images=images, negative_prompt=" ")
        lengths = embeds.prompt_mask.sum(1).tolist()
        assert lengths[0] < lengths[1] and embeds.image_latents.shape == (2, 128, 64)
        sig = policy.sigmas(steps, h, w)
        x = _euler(policy, noise.clone(), embeds, sig, true_cfg, height=h, width=w)
        img = policy.decode(x, height=h, width=w)
        seen = {}

        def grab(p, i, t, kw):
            seen["latents"] = kw["latents"]
            return {}

        common = dict(image=images, prompt=PROMPTS, num_inference_steps=steps, height=h, width=w, output_type="pt",
                      true_cfg_scale=true_cfg, negative_prompt=[" "] * 2 if true_cfg > 1 else None)
        ref = pipe(latents=noise.clone(), callback_on_step_end=grab, **common).images
        ref_gen = pipe(generator=torch.Generator().manual_seed(5), **common).images if true_cfg == 1.0 else ref
    torch.testing.assert_close(pipe.scheduler.sigmas.float(), sig, rtol=0, atol=1e-7)  # the scheduler's sigmas
    assert img.shape == (2, 3, h, w) and float(img.std()) > 0.01
    # float32 throughout; the differences are the order of float operations (each row's prompt and image encoded
    # alone here, a padded batch of two in the pipeline; the Euler update written out here, the scheduler's step
    # there): a few ulp (float32 eps 1.2e-7 x latents of magnitude ~5) per step over 4 steps. Measured max |diff|
    # 4.8e-7 / 9.5e-7 (latents, |x| <= 4.7) and 4.2e-7 / 3.6e-7 (images) for the two cases; 2e-5 leaves room for
    # other CPUs' kernels and still fails on any real convention error (those move the latents by > 1e-2).
    torch.testing.assert_close(x, seen["latents"].float(), rtol=0, atol=2e-5)
    torch.testing.assert_close(img, ref, rtol=0, atol=2e-5)
    torch.testing.assert_close(ref_gen, ref, rtol=0, atol=0)  # the pipeline's own draw is the policy's noise
    assert not torch.allclose(img[0], img[1], atol=1e-3)


def test_source_image_conditions_prompt_and_velocity_per_row(policy, _small_area):
    a, b = _sources()
    with torch.no_grad():
        e2 = policy.encode_prompts(PROMPTS, images=[a, b])
        assert e2.has_negative and e2.negative_prompt_mask is not None  # true CFG: the negative reads the image too
        x = policy.initial_noise(2, 32, 32, generator=torch.Generator().manual_seed(0))
        v2 = policy.velocity(x, 0.6, e2, 4.0)
        v1 = policy.velocity(x[1:], 0.6, e2.select([1]), 4.0)
        # padding masked: the row alone is the same up to float32 rounding (the batch pads the shorter prompt; the
        # GEMMs and softmax see other shapes); measured 1.4e-6 at velocities of magnitude ~5 (a few ulp)
        torch.testing.assert_close(v1[0], v2[1], rtol=0, atol=1e-5)
        swapped = policy.encode_prompts(PROMPTS, images=[b, a])
        n = int(e2.prompt_mask[0].sum())
        assert not torch.allclose(swapped.prompt_embeds[0, :n], e2.prompt_embeds[0, :n], atol=1e-4), \
            "the VL encoder must read the source image"
        assert not torch.allclose(policy.velocity(x, 0.6, swapped, 4.0)[0], v2[0], atol=1e-4)
        assert bool((e2.image_ids[..., 0] == 1).all()) and e2.image_ids[0, -1].tolist() == [1, 7, 15]
    with pytest.raises(ValueError, match="one source image per prompt"):
        policy.encode_prompts(PROMPTS, images=[a])
    with pytest.raises(ValueError, match="needs a source image per prompt"):
        policy.encode_prompts(PROMPTS)  # the template's image placeholder needs an image
    with pytest.raises(ValueError, match="guidance_scale must be finite"):
        policy.velocity(x, 0.5, e2, float("nan"))


def test_tensor_source_image_encodes_as_its_pil_image(policy, _small_area):
    """A [3, H, W] tensor in [0, 1] holding an 8-bit image encodes exactly as that PIL image (the VL processor
    takes 8-bit pixels: tensors are converted first)."""
    import numpy as np

    a = _sources()[0]
    t = torch.from_numpy(np.asarray(a, dtype=np.float32) / 255).permute(2, 0, 1)
    with torch.no_grad():
        e_pil = policy.encode_prompts(PROMPTS[:1], images=[a]).tensors()
        e_t = policy.encode_prompts(PROMPTS[:1], images=[t]).tensors()
    assert e_pil.keys() == e_t.keys()
    for k in e_pil:
        torch.testing.assert_close(e_t[k], e_pil[k], rtol=0, atol=0)


def test_condition_size_follows_the_pipeline(policy):
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

    old = policy.condition_image_size
    try:
        policy.condition_image_size = "auto"
        for h, w in ((32, 48), (512, 512), (300, 1000)):
            cw, ch, _ = calculate_dimensions(1024 * 1024, w / h)
            assert policy.condition_size(h, w) == (ch, cw)
        assert policy.condition_size(32, 48) == (832, 1248)
        policy.condition_image_size = None
        assert policy.condition_size(34, 47) == (32, 44)  # own size, down to a multiple of 2 x vae_scale_factor
        policy.condition_image_size = 24
        assert policy.condition_size(100, 60) == (24, 24)
        policy.condition_image_size = "big"
        with pytest.raises(ValueError, match="condition_image_size"):
            policy.condition_size(32, 32)
    finally:
        policy.condition_image_size = old


def test_lora_round_trip_through_load_lora_weights(tiny_dir, tmp_path):
    """A LoRA with alpha != rank saved by flowrl loads into a fresh QwenImageEditPipeline with the same scale and
    gives the same velocity; saved without the adapter metadata it loads with alpha = rank (a different velocity)."""
    from diffusers import QwenImageEditPipeline
    from peft.utils import get_peft_model_state_dict

    from flowrl.train.lora import DEFAULTS, add_lora_to_transformer, lora_config, lora_targets_present, save_diffusers_lora

    pol = FlowPolicy.from_pretrained(tiny_dir)
    pol.condition_image_size = None
    targets = DEFAULTS["qwen_image_edit"]["targets"]
    assert lora_targets_present(pol.transformer, targets) == targets, "every default target must match a module"
    add_lora_to_transformer(pol.transformer, lora_config("qwen_image_edit", rank=RANK, alpha=ALPHA))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pol.transformer.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    out = save_diffusers_lora(QwenImageEditPipeline, pol.transformer, tmp_path / "lora")
    bare = tmp_path / "bare"
    bare.mkdir()
    QwenImageEditPipeline.save_lora_weights(bare, transformer_lora_layers=get_peft_model_state_dict(pol.transformer),
                                            safe_serialization=True)
    with torch.no_grad():
        e = pol.encode_prompts(PROMPTS, images=_sources((32, 32)))
        x = pol.initial_noise(2, 32, 32, generator=torch.Generator().manual_seed(1))
        v_ours = pol.velocity(x, 0.7, e, 4.0)
        pol.transformer.disable_adapters()
        v_base = pol.velocity(x, 0.7, e, 4.0)
        pol.transformer.enable_adapters()
    assert (v_ours - v_base).abs().max() > 1e-2, "the LoRA does not change the velocity: the test would be vacuous"

    def loaded_velocity(folder):
        pipe = QwenImageEditPipeline.from_pretrained(tiny_dir)
        pipe.load_lora_weights(folder)
        scales = {float(v) for m in pipe.transformer.modules() for v in (getattr(m, "scaling", None) or {}).values()}
        q = FlowPolicy.from_pipeline(pipe)
        with torch.no_grad():
            return scales, q.velocity(x, 0.7, e, 4.0)

    scales, v = loaded_velocity(out)
    assert scales == {ALPHA / RANK}
    # float32; reloaded weights may sit at other alignments (last-bit GEMM rounding); the wrong scale moves v by > 1e-3
    torch.testing.assert_close(v, v_ours, rtol=1e-5, atol=1e-5)
    scales, v_bare = loaded_velocity(bare)
    assert scales == {1.0} and (v_bare - v_ours).abs().max() > 1e-3


def test_gradient_checkpointing_gives_the_same_gradient(policy):
    t = policy.transformer
    old = policy.condition_image_size
    policy.condition_image_size = None
    try:
        e = policy.encode_prompts(PROMPTS, images=_sources((32, 32)))
    finally:
        policy.condition_image_size = old
    x = policy.initial_noise(2, 32, 32, generator=torch.Generator().manual_seed(2))
    params = list(t.parameters())
    was = [p.requires_grad for p in params]

    def grads():
        t.zero_grad(set_to_none=True)
        for p in params:
            p.requires_grad_(True)
        (policy.velocity(x, 0.4, e, 4.0) ** 2).mean().backward()
        return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]

    calls = []
    try:
        plain = grads()
        t.enable_gradient_checkpointing()
        inner = t._gradient_checkpointing_func
        t._gradient_checkpointing_func = lambda *a, **k: (calls.append(1), inner(*a, **k))[1]
        ckpt = grads()
    finally:
        t.disable_gradient_checkpointing()
        t.zero_grad(set_to_none=True)
        for p, r in zip(params, was):
            p.requires_grad_(r)
    assert calls, "gradient checkpointing was not used"
    assert any(float(a.abs().max()) > 0 for a in plain)
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_fsdp_config_names_the_block_class(policy):
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / "accelerate" / "fsdp_qwen_image_edit.yaml").read_text())
    names = cfg["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"].split(",")
    present = {type(m).__name__ for m in policy.transformer.modules()}
    assert names == ["QwenImageTransformerBlock"] and set(names) <= present


# ------------------------------------------------------------------------------------------------
# training runs
# ------------------------------------------------------------------------------------------------


def _train(tiny_dir, out, *extra):
    return flowrl_main(["train", str(ROOT / "configs" / "tiny_qwen_image_edit.yaml"), f"model.path={tiny_dir}",
                        f"output_dir={out}", "train.tracker=none", "train.progress=false", "resume=none",
                        "sample.eval_num_steps=2", "eval.num_prompts=1", "eval.seeds=[0]", "sample.group_size=2",
                        "data.max_train_prompts=4",
                        # random weights score 0 on shapes_edit for every sample: a second reward gives the groups spread
                        "rewards={shapes_edit: 1.0, jpeg_compressibility: 1.0}", *extra])


def test_flowrl_train_runs_the_tiny_qwen_image_edit_config(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWRL_CACHE", str(tmp_path / "cache"))
    # the HTML report (matplotlib curves) is not under test here and costs more than the two training steps
    monkeypatch.setattr("flowrl.train.loop.write_report", lambda run_dir: None)
    out = tmp_path / "run"
    assert _train(tiny_dir, out, "max_steps=2") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and "shapes_edit" in summary["last_eval"]
    m = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(m) == 2 and all(math.isfinite(r["loss"]) and r["skipped_optimizer_steps"] == 0 for r in m)
    assert m[0]["grad_norm"] > 0
    assert abs(m[0]["ratio_first_min"] - 1) < 1e-4 and abs(m[0]["ratio_first_max"] - 1) < 1e-4  # on-policy
    forward = tmp_path / "dgpo"
    assert _train(tiny_dir, forward, "max_steps=1", "objective.kind=dgpo", "objective.timestep_share=group",
                  "plan.kind=ode", "eval.at_start=false") == 0
    fm = json.loads((forward / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isfinite(fm["loss"]) and fm["grad_norm"] > 0


def test_published_recipe_trains_one_step_on_the_tiny_model(tiny_dir, tmp_path, monkeypatch):
    """flow_grpo's Qwen-Image-Edit recipe (Flow-SDE on steps 0..8 of 10, all 9 trained, true CFG 4) at tiny sizes on the
    editing task: the first pass is on-policy (ratio 1) and the LoRA gets a gradient."""
    monkeypatch.setenv("FLOWRL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("flowrl.train.loop.write_report", lambda run_dir: None)
    out = tmp_path / "recipe"
    assert flowrl_main([
        "train", str(ROOT / "configs" / "flow_grpo_qwen_image_edit.yaml"), f"model.path={tiny_dir}", f"output_dir={out}",
        "resume=none", "model.dtype=float32", "model.frozen_dtype=null", "train.mixed_precision='no'",
        "model.condition_image_size=0", "sample.height=32", "sample.width=32", "sample.eval_num_steps=2",
        "sample.group_size=2", "sample.prompts_per_step=2", "sample.chunk_size=null", "data.train=shapes_edit:train:32",
        "data.eval=shapes_edit:test:32", "data.max_train_prompts=4", "eval.num_prompts=1", "eval.at_start=false",
        "rewards={jpeg_compressibility: 1.0}", "reward_options={}", "max_steps=1", "train.tracker=none",
        "train.progress=false"]) == 0
    m = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(m["ratio_first_min"] - 1) < 1e-4 and abs(m["ratio_first_max"] - 1) < 1e-4
    assert m["grad_norm"] > 0 and m["skipped_optimizer_steps"] == 0
