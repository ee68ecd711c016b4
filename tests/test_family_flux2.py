"""FLUX.2 (dev: Flux2Pipeline, klein: Flux2KleinPipeline) behind the FlowPolicy interface.

On tiny random-weight models in the real format (``flowrl make-tiny flux2 / flux2_klein``): flowrl's all-ODE
sampling reproduces the pipeline's own ``__call__`` (latents, images, sigmas), a LoRA saved by flowrl loads into
the pipeline with ``load_lora_weights`` unchanged, gradient checkpointing gives the same gradient, and
``flowrl train configs/tiny_flux2.yaml`` runs (a likelihood objective and a forward one).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from flowrl.cli import main as flowrl_main
from flowrl.flow.policy import FlowPolicy, PromptEmbeds
from flowrl.flow.schedule import flux2_mu, sigmas_for_scheduler

MSL = 64  # text tokens (prompts are padded to it): the tiny system message + chat markup + prompt fit
PROMPTS = ["a red circle above a blue square", "two green triangles"]  # of different token lengths
RANK, ALPHA = 4, 16


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread for this module: the tiny models gain nothing from two, and on a loaded 2-core machine
    OpenMP's spinning threads made every small GEMM ~10x slower (test_pretrain_demo_lm does the same)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict:
    """``flowrl make-tiny`` folders of both pipelines (the command users run)."""
    d = tmp_path_factory.mktemp("flux2_tiny")
    out = {}
    for kind in ("flux2", "flux2_klein"):
        assert flowrl_main(["make-tiny", kind, str(d / kind)]) == 0
        out[kind] = str(d / kind)
    return out


@pytest.fixture(scope="module")
def dev(dirs):
    return FlowPolicy.from_pretrained(dirs["flux2"], max_sequence_length=MSL)


@pytest.fixture(scope="module")
def klein(dirs):
    return FlowPolicy.from_pretrained(dirs["flux2_klein"], max_sequence_length=MSL)


def test_make_tiny_folders_pick_their_policy_class(dirs, dev, klein):
    from flowrl.flow.models.flux2 import Flux2KleinPolicy, Flux2Policy

    for kind, policy, cls, pipe in (("flux2", dev, Flux2Policy, "Flux2Pipeline"),
                                    ("flux2_klein", klein, Flux2KleinPolicy, "Flux2KleinPipeline")):
        index = json.loads(Path(dirs[kind], "model_index.json").read_text())
        assert index["_class_name"] == pipe and type(policy) is cls and policy.family == kind
        assert type(policy.pipeline).__name__ == pipe
        assert type(policy.pipeline.vae).__name__ == "AutoencoderKLFlux2"
        assert type(policy.transformer).__name__ == "Flux2Transformer2DModel"
        assert sum(p.numel() for p in policy.transformer.parameters()) < 200_000
        # the VAE's latent batch-norm statistics are not the identity (decoding must undo them)
        assert float(policy.pipeline.vae.bn.running_mean.abs().max()) > 0.05
    assert type(dev.pipeline.text_encoder).__name__ == "Mistral3ForConditionalGeneration"
    assert type(dev.pipeline.tokenizer).__name__ == "PixtralProcessor"
    assert type(klein.pipeline.text_encoder).__name__ == "Qwen3ForCausalLM"
    assert dev.transformer.config.guidance_embeds and not klein.transformer.config.guidance_embeds
    assert not klein.is_distilled and klein._uses_negative and not dev._uses_negative
    with pytest.raises(ValueError, match="holds a Flux2KleinPipeline, but Flux2Policy needs a Flux2Pipeline"):
        Flux2Policy.from_pretrained(dirs["flux2_klein"])  # model.family flux2 on a klein folder: a clear error
    # the prompt is not truncated away: the two prompts' embeddings differ, both padded to MSL
    e = dev.encode_prompts(PROMPTS)
    assert e.prompt_embeds.shape[1] == MSL and e.text_ids.shape == (2, MSL, 4) and e.prompt_mask is None
    assert not torch.allclose(e.prompt_embeds[0], e.prompt_embeds[1])
    tok = dev.pipeline.tokenizer.tokenizer
    n_sys = len(tok(dev.pipeline.system_message)["input_ids"])
    assert n_sys + len(tok(PROMPTS[0])["input_ids"]) + 5 < MSL


def test_flux2_mu_and_sigmas_are_the_pipelines():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    for seq in (1, 64, 256, 1024, 4096, 4300, 4301, 16384):
        for n in (1, 4, 10, 28, 50):
            assert flux2_mu(seq, n) == compute_empirical_mu(seq, n)  # bit-identical
    cfg = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
               base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential")
    sched = FlowMatchEulerDiscreteScheduler(**cfg)
    for seq, n in ((64, 4), (1024, 10), (4096, 28), (6000, 8)):
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=compute_empirical_mu(seq, n))
        ours = sigmas_for_scheduler(dict(sched.config), n, image_seq_len=seq, pipeline="flux2")
        torch.testing.assert_close(ours, sched.sigmas.float(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="image_seq_len"):
        flux2_mu(0, 4)
    with pytest.raises(ValueError, match="pipeline must be"):
        sigmas_for_scheduler(cfg, 4, 64, pipeline="flux3")


def _euler_ode(policy, x, embeds, sigmas, guidance, h, w):
    for i in range(len(sigmas) - 1):
        x = x + (sigmas[i + 1] - sigmas[i]) * policy.velocity(x, sigmas[i], embeds, guidance, height=h, width=w)
    return x


# float32 throughout. flowrl encodes each prompt alone and (klein) runs CFG as one [uncond; cond] call, the
# pipeline encodes the batch together and calls the transformer twice: the same arithmetic on other GEMM
# shapes, which on CPU may round differently in the last bits (~1e-7 relative per op). Measured on this machine
# (one thread): latents and images identical for dev and for klein without CFG, 2e-6 (latents of magnitude ~4.5)
# and 1e-6 (images) for klein with CFG; 2e-5 leaves room for other CPUs' kernels, while a wrong convention
# (timestep scale, shift, id layout, bn statistics, CFG sign) moves them by >1e-2.
ATOL = 2e-5


@pytest.mark.parametrize("kind,guidance,hw", [("dev", 4.0, (32, 32)), ("dev", 2.5, (32, 48)),
                                              ("klein", 4.0, (32, 48)), ("klein", 1.0, (48, 32))])
def test_ode_loop_reproduces_pipeline_call(kind, guidance, hw, request):
    policy = request.getfixturevalue(kind)
    pipe = policy.pipeline
    h, w = hw
    steps = 4
    noise = policy.initial_noise(2, h, w, generator=torch.Generator().manual_seed(3))
    assert noise.dtype == torch.float32 and noise.shape == (2, *policy.latent_shape(h, w))
    grid = (h // (2 * policy.vae_scale_factor), w // (2 * policy.vae_scale_factor))
    final = {}

    def keep_latents(_pipe, i, t, kw):
        final["x"] = kw["latents"].clone()
        return {}

    with torch.no_grad():
        embeds = policy.encode_prompts(PROMPTS)
        sig = policy.sigmas(steps, h, w)
        x = _euler_ode(policy, noise.clone(), embeds, sig, guidance, h, w)
        img = policy.decode(x, height=h, width=w)
        common = dict(num_inference_steps=steps, guidance_scale=guidance, height=h, width=w, output_type="pt",
                      max_sequence_length=MSL)
        # the pipeline takes unpacked latents [B, 4C, h, w] and packs them itself
        ref = pipe(prompt=PROMPTS, latents=policy.unpack(noise.clone(), grid), callback_on_step_end=keep_latents,
                   **common).images
        ref_gen = pipe(prompt=PROMPTS, generator=torch.Generator().manual_seed(3), **common).images
    torch.testing.assert_close(pipe.scheduler.sigmas.float(), sig, rtol=0, atol=0)
    assert img.shape == (2, 3, h, w) and img.dtype == torch.float32
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0 and float(img.std()) > 0.01
    torch.testing.assert_close(x, final["x"], rtol=0, atol=ATOL)
    torch.testing.assert_close(img, ref, rtol=0, atol=ATOL)
    torch.testing.assert_close(ref_gen, ref, rtol=0, atol=0)  # the pipeline's own draw is initial_noise's
    assert not torch.allclose(img[0], img[1], atol=1e-3), "the two prompts must give different images"


def test_unpack_is_the_pipelines_and_decode_undoes_the_bn_normalisation(dev):
    pipe = dev.pipeline
    lat = torch.randn(2, dev.transformer.config.in_channels, 4, 6)
    packed = pipe._pack_latents(lat)
    ids = dev.image_ids((4, 6))
    assert ids.shape == (24, 4) and ids[:, 0].eq(0).all() and ids[:, 3].eq(0).all()
    torch.testing.assert_close(dev.unpack(packed, (4, 6)), lat, rtol=0, atol=0)
    torch.testing.assert_close(pipe._unpack_latents_with_ids(packed, ids.expand(2, -1, -1)), lat, rtol=0, atol=0)
    with pytest.raises(ValueError, match="cannot unpack"):
        dev.unpack(packed, (5, 6))


def test_velocity_conventions_and_batch_independence(dev, klein):
    h, w = 32, 48
    with torch.no_grad():
        for policy in (dev, klein):
            e = policy.encode_prompts(PROMPTS)
            x = policy.initial_noise(2, h, w, generator=torch.Generator().manual_seed(0))
            g = 3.0
            both = policy.velocity(x, 0.6, e, g, height=h, width=w)
            alone = policy.velocity(x[:1], 0.6, e.select([0]), g, height=h, width=w)
            torch.testing.assert_close(alone, both[:1], rtol=0, atol=1e-6)  # a row does not see the others
            other_sigma = policy.velocity(x, torch.tensor([0.6, 0.2]), e, g, height=h, width=w)
            torch.testing.assert_close(other_sigma[0], both[0], rtol=0, atol=1e-6)
            assert not torch.allclose(other_sigma[1], both[1], atol=1e-4)
        # dev: guidance is an embedding, no negative branch
        e = dev.encode_prompts(PROMPTS)
        x = dev.initial_noise(2, h, w, generator=torch.Generator().manual_seed(0))
        assert e.negative_prompt_embeds is None
        assert not torch.allclose(dev.velocity(x, 0.5, e, 1.0), dev.velocity(x, 0.5, e, 4.0), atol=1e-5)
        # klein: true CFG with the empty prompt, v = v_u + g (v_c - v_u)
        e = klein.encode_prompts(PROMPTS)
        x = klein.initial_noise(2, h, w, generator=torch.Generator().manual_seed(0))
        v_c = klein.velocity(x, 0.5, e, 1.0)
        v_u = klein.velocity(x, 0.5, PromptEmbeds(prompt_embeds=e.negative_prompt_embeds, text_ids=e.text_ids), 1.0)
        torch.testing.assert_close(klein.velocity(x, 0.5, e, 4.0), v_u + 4.0 * (v_c - v_u), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(v_c, v_u, atol=1e-4)
        with pytest.raises(ValueError, match="negative"):
            klein.velocity(x, 0.5, PromptEmbeds(prompt_embeds=e.prompt_embeds, text_ids=e.text_ids), 4.0)
        with pytest.raises(ValueError, match="tokens"):
            klein.velocity(x, 0.5, e, 1.0, height=32, width=32)
        with pytest.raises(ValueError, match="packed"):
            dev.velocity(x[0], 0.5, e, 1.0)
        with pytest.raises(ValueError, match="sigma"):
            dev.velocity(x, 1.5, e, 1.0)


def test_distilled_klein_has_no_negative_branch_and_ignores_guidance(klein):
    from flowrl.demo.tiny_flux2 import build_tiny_flux2_klein_pipeline

    rng = torch.get_rng_state()
    pipe = build_tiny_flux2_klein_pipeline(seed=1, is_distilled=True)
    again = build_tiny_flux2_klein_pipeline(seed=1, is_distilled=True)
    assert torch.equal(torch.get_rng_state(), rng), "the builder must not touch the global RNG"
    for name in ("transformer", "text_encoder", "vae"):  # same seed, same weights; another seed, other weights
        a, b, c = (dict(getattr(p, name).state_dict()) for p in (pipe, again, klein.pipeline))
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point() and a[k].numel() > 1)
    policy = FlowPolicy.from_pipeline(pipe, max_sequence_length=MSL)
    assert policy.family == "flux2_klein" and policy.is_distilled
    with torch.no_grad():
        e = policy.encode_prompts(PROMPTS)
        x = policy.initial_noise(2, 32, 32, generator=torch.Generator().manual_seed(0))
        assert not e.has_negative
        torch.testing.assert_close(policy.velocity(x, 0.5, e, 4.0), policy.velocity(x, 0.5, e, 1.0), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# LoRA round trip, gradient checkpointing
# ------------------------------------------------------------------------------------------------


def _scalings(transformer) -> set:
    return {float(v) for m in transformer.modules() if isinstance(getattr(m, "scaling", None), dict)
            for v in m.scaling.values()}


def _pipeline_velocity(pipe, x, sigma, guidance, grid):
    """v as Flux2Pipeline / Flux2KleinPipeline.__call__ computes it (conditional branch, timestep t / 1000)."""
    pe, text_ids = pipe.encode_prompt(prompt=PROMPTS, device="cpu", max_sequence_length=MSL)
    ids = pipe._prepare_latent_ids(torch.empty(x.shape[0], 0, *grid))
    b = x.shape[0]
    g = torch.full((b,), guidance) if pipe.transformer.config.guidance_embeds else None
    with torch.no_grad():
        return pipe.transformer(hidden_states=x, timestep=torch.full((b,), sigma * 1000) / 1000, guidance=g,
                                encoder_hidden_states=pe, txt_ids=text_ids, img_ids=ids, return_dict=False)[0]


@pytest.mark.parametrize("kind", ["flux2", "flux2_klein"])
def test_lora_loads_into_a_fresh_pipeline_with_the_same_velocity(kind, dirs, tmp_path):
    from peft.utils import get_peft_model_state_dict

    from flowrl.train.lora import DEFAULTS, add_lora_to_transformer, lora_config, lora_targets_present, \
        save_diffusers_lora

    policy = FlowPolicy.from_pretrained(dirs[kind], max_sequence_length=MSL)
    cls = type(policy.pipeline)
    targets = DEFAULTS[kind]["targets"]
    assert lora_targets_present(policy.transformer, targets) == targets, "a default target matches no module"
    add_lora_to_transformer(policy.transformer, lora_config(kind, rank=RANK, alpha=ALPHA))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in policy.transformer.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    assert _scalings(policy.transformer) == {ALPHA / RANK}
    h, w = 32, 48
    grid = (h // 4, w // 4)
    x = torch.randn(len(PROMPTS), *policy.latent_shape(h, w), generator=torch.Generator().manual_seed(2))
    sigma, guid = 0.6, 1.0 if kind == "flux2_klein" else 3.5
    with torch.no_grad():
        v_flowrl = policy.velocity(x, sigma, policy.encode_prompts(PROMPTS), guid, height=h, width=w)
        policy.transformer.disable_adapters()
        v_base = policy.velocity(x, sigma, policy.encode_prompts(PROMPTS), guid, height=h, width=w)
        policy.transformer.enable_adapters()
    assert (v_flowrl - v_base).abs().max() > 1e-2, "the LoRA does not change the velocity: the test would be vacuous"

    save_diffusers_lora(cls, policy.transformer, tmp_path / "lora")
    fresh = cls.from_pretrained(dirs[kind])
    fresh.load_lora_weights(str(tmp_path / "lora"))
    assert _scalings(fresh.transformer) == {ALPHA / RANK}
    torch.testing.assert_close(_pipeline_velocity(fresh, x, sigma, guid, grid), v_flowrl, rtol=1e-5, atol=1e-5)

    # negative control: without the adapter metadata diffusers assumes alpha = rank (scale 1, not 4)
    (tmp_path / "nometa").mkdir()
    cls.save_lora_weights(tmp_path / "nometa", transformer_lora_layers=get_peft_model_state_dict(policy.transformer),
                          safe_serialization=True)
    fresh.unload_lora_weights()  # back to the base weights
    torch.testing.assert_close(_pipeline_velocity(fresh, x, sigma, guid, grid), v_base, rtol=1e-5, atol=1e-5)
    fresh.load_lora_weights(str(tmp_path / "nometa"))
    assert _scalings(fresh.transformer) == {1.0}
    assert (_pipeline_velocity(fresh, x, sigma, guid, grid) - v_flowrl).abs().max() > 1e-3


def test_gradient_checkpointing_gives_the_same_gradient(dev):
    t = dev.transformer
    assert t._supports_gradient_checkpointing
    x = dev.initial_noise(2, 32, 32, generator=torch.Generator().manual_seed(5))
    e = dev.encode_prompts(PROMPTS)

    def grads():
        t.zero_grad(set_to_none=True)
        (dev.velocity(x, 0.7, e, 4.0) ** 2).mean().backward()
        return {n: p.grad.clone() for n, p in t.named_parameters() if p.grad is not None}

    t.requires_grad_(True)
    try:
        plain = grads()
        t.enable_gradient_checkpointing()
        assert t.gradient_checkpointing
        ckpt = grads()
    finally:
        t.disable_gradient_checkpointing()
        t.requires_grad_(False)
        t.zero_grad(set_to_none=True)
    assert plain.keys() == ckpt.keys() and len(plain) == len(list(t.parameters()))
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-7, msg=n)


# ------------------------------------------------------------------------------------------------
# flowrl train configs/tiny_flux2.yaml
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def no_report(monkeypatch):
    """Skip report.html (matplotlib plots: most of a tiny run's time here; tests/test_train_loop.py covers it)."""
    monkeypatch.setattr("flowrl.train.loop.write_report", lambda run_dir: None)


def _train(config_dir, out, *extra):
    args = ["train", "configs/tiny_flux2.yaml", f"model.path={config_dir}", f"output_dir={out}", "train.tracker=none",
            "train.progress=false", "resume=none", "sample.eval_num_steps=2", "eval.num_prompts=1", "eval.seeds=[0]",
            "eval.at_start=false", "rewards={jpeg_compressibility: 1.0}", *extra]
    assert flowrl_main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, metrics


def test_flowrl_train_two_steps_likelihood_objective_lora(dirs, tmp_path, no_report):
    summary, metrics = _train(dirs["flux2"], tmp_path / "run", "max_steps=2")
    assert summary["steps"] == 2 and len(metrics) == 2
    for m in metrics:
        assert math.isfinite(m["loss"]) and m["grad_norm"] > 0 and m["skipped_optimizer_steps"] == 0
    assert abs(metrics[0]["ratio_first_min"] - 1) < 1e-4 and abs(metrics[0]["ratio_first_max"] - 1) < 1e-4


def test_flowrl_train_forward_objective_full_finetuning_klein(dirs, tmp_path, no_report):
    summary, metrics = _train(dirs["flux2_klein"], tmp_path / "run", "model.family=flux2_klein", "max_steps=1",
                              "objective.kind=dgpo", "objective.timestep_share=group", "plan.kind=ode",
                              "lora.enabled=false",
                              "train.gradient_checkpointing=true")
    assert summary["steps"] == 1 and math.isfinite(metrics[0]["loss"]) and metrics[0]["grad_norm"] > 0
