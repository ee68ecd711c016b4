"""Tests of the demo-model pretraining (flowrl/demo/pretrain_image.py, scripts/pretrain_demo.py).

The math helpers are checked against closed forms and float64 recomputations; the whole pipeline is
run at a tiny size (a few steps per phase) to check that losses are finite and fall, that the saved
folder loads with the plain diffusers SD3 loader, and that a run resumed from checkpoints gives
bit-identical weights to an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from flowrl.demo import pretrain_image as D


def _tiny_cfg(tmp: Path, **kw) -> D.PretrainConfig:
    base = dict(
        output_dir=str(tmp / "model"),
        work_dir=str(tmp / "work"),
        seed=3,
        threads=1,
        image_size=32,
        latent_channels=4,
        vae_blocks=3,
        num_layers=1,
        num_heads=2,
        head_dim=8,
        clip_max_length=48,
        max_sequence_length=2,
        vae_steps=12,
        vae_batch_size=4,
        vae_lr=3e-3,
        num_scenes=48,
        steps=12,
        batch_size=8,
        lr=3e-3,
        warmup_steps=2,
        checkpoint_every=4,
        eval_prompts=6,
        eval_steps=2,
        eval_batch_size=6,
        progress=False,
    )
    base.update(kw)
    return D.PretrainConfig(**base)


# ------------------------------------------------------------------------------------------------
# Pure math
# ------------------------------------------------------------------------------------------------


def test_logit_normal_sigmas_match_the_sd3_density():
    g = torch.Generator().manual_seed(0)
    t = D.sample_sigmas(40000, "logit_normal", mean=0.0, std=1.0, generator=g).double()
    assert t.dtype == torch.float64 and bool(((t > 0) & (t < 1)).all())
    # P(t <= sigmoid(z)) = Phi(z) for u ~ N(0, 1): check three quantiles (4 sigma of a binomial ~ 0.01).
    for z in (-1.0, 0.0, 1.5):
        phi = 0.5 * (1 + math.erf(z / math.sqrt(2)))
        frac = float((t <= 1 / (1 + math.exp(-z))).double().mean())
        assert abs(frac - phi) < 0.01, (z, frac, phi)
    # Shifted location and scale: the median is sigmoid(mean).
    t2 = D.sample_sigmas(40000, "logit_normal", mean=1.0, std=0.5, generator=g)
    assert abs(float(t2.median()) - 1 / (1 + math.exp(-1.0))) < 0.01
    u = D.sample_sigmas(40000, "uniform", generator=g).double()
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005
    with pytest.raises(ValueError, match="mode"):
        D.sample_sigmas(4, "cosine")
    with pytest.raises(ValueError, match="n must"):
        D.sample_sigmas(0)


def test_flow_matching_pair_is_the_straight_path_and_its_velocity():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 4, 6, 6, generator=g, dtype=torch.float64)
    eps = torch.randn(5, 4, 6, 6, generator=g, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0, 0.25, 0.5, 0.9], dtype=torch.float64)
    xt, target = D.flow_matching_pair(x0, eps, t)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[1], eps[1])  # exact: weights 0 and 1 at the endpoints
    torch.testing.assert_close(xt[2], 0.75 * x0[2] + 0.25 * eps[2])
    # The target is d x_t / d t (the path is linear, so a finite difference is exact up to rounding).
    h = 1e-3
    xt_h, _ = D.flow_matching_pair(x0, eps, t + h)
    torch.testing.assert_close((xt_h - xt) / h, target, atol=1e-9, rtol=1e-9)
    with pytest.raises(ValueError, match="sigmas"):
        D.flow_matching_pair(x0, eps, t[:3])
    with pytest.raises(ValueError, match="same shape"):
        D.flow_matching_pair(x0, eps[:, :2], t)


def test_latent_normalization_inverts_like_the_sd3_pipeline():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(64, 4, 8, 8, generator=g) * 3.0 + 1.25
    scaling, shift = D.latent_normalization(z)
    zn = (z.double() - shift) * scaling
    assert abs(float(zn.mean())) < 1e-9 and abs(float(zn.std()) - 1.0) < 1e-9
    assert abs(scaling - 1 / 3.0) < 0.01 and abs(shift - 1.25) < 0.05
    # StableDiffusion3Pipeline decodes with latents / scaling_factor + shift_factor.
    torch.testing.assert_close(zn / scaling + shift, z.double())
    with pytest.raises(ValueError, match="zero spread"):
        D.latent_normalization(torch.ones(10))
    with pytest.raises(ValueError, match="finite"):
        D.latent_normalization(torch.tensor([1.0, float("nan")]))


def test_ema_update_closed_form():
    m = torch.nn.Linear(3, 2)
    ema = {n: torch.zeros_like(p) for n, p in m.named_parameters()}
    d0 = D.ema_update(ema, m, step=0, decay=0.999)
    assert d0 == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    torch.testing.assert_close(ema["weight"], 0.9 * m.weight.detach())
    d = D.ema_update(ema, m, step=10**6, decay=0.5)
    assert d == 0.5
    torch.testing.assert_close(ema["weight"], 0.5 * 0.9 * m.weight.detach() + 0.5 * m.weight.detach())


def test_vae_loss_parts_match_a_float64_recomputation():
    cfg = _tiny_cfg(Path("/nonexistent"))
    pipe = D.build_demo_pipeline(cfg)
    vae = pipe.vae
    x = D.render_batch(["a red circle", "two blue squares"], 32, 0).float() / 127.5 - 1
    loss, parts = D.vae_loss(vae, x, kl_weight=0.5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(0))
        recon = vae.decode(z).sample
    mu, logvar = post.mean.double(), post.logvar.double()
    kl = (0.5 * (mu**2 + logvar.exp() - 1 - logvar)).flatten(1).sum(1).mean() / x[0].numel()
    mse = ((recon.double() - x.double()) ** 2).mean()
    assert parts["kl"] == pytest.approx(float(kl), rel=1e-4)
    assert parts["mse"] == pytest.approx(float(mse), rel=1e-4)
    assert float(loss.detach()) == pytest.approx(float(mse + 0.5 * kl), rel=1e-4)


def test_flow_matching_loss_is_zero_at_the_pipelines_own_velocity():
    """One Euler step of ``StableDiffusion3Pipeline.__call__`` from sigma=1 to 0 gives
    ``x_out = eps - v(eps, t=1000 | c)``. With ``x0 = x_out`` the flow-matching target at t=1 is
    exactly that velocity, so the loss must vanish: the loss conditions the transformer (timestep
    scale, prompt embeddings, pooled vectors) the way sampling does."""
    cfg = _tiny_cfg(Path("/nonexistent"), shift=1.0)
    pipe = D.build_demo_pipeline(cfg)
    prompts = ["a red circle", "three green triangles"]
    eps = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = pipe(prompt=prompts, height=32, width=32, num_inference_steps=1, guidance_scale=1.0,
                   latents=eps.clone(), max_sequence_length=cfg.max_sequence_length, output_type="latent").images
        pe, pooled = D.encode_prompt_table(pipe, prompts, cfg.max_sequence_length)
        sig = torch.ones(2)
        loss = D.flow_matching_loss(pipe.transformer, out, eps, sig, pe, pooled)
        other = D.flow_matching_loss(pipe.transformer, out, eps, sig, pe.flip(0), pooled.flip(0))
    assert float(loss) < 1e-10
    assert float(other) > 1e-6  # swapping the prompts changes the velocity: the loss sees the text


def test_evaluation_is_the_rl_evaluation_and_the_empty_prompt_reference_ignores_the_prompt():
    from flowrl.flow.policy import FlowPolicy
    from flowrl.train.evaluate import evaluate_policy
    from scorers.shapes import ShapesScorer

    cfg = _tiny_cfg(Path("/nonexistent"))
    pipe = D.build_demo_pipeline(cfg)
    prompts = ["a red circle", "two blue squares", "a red circle"]
    kw = dict(seeds=2, num_steps=2, guidance_scale=3.0, max_sequence_length=cfg.max_sequence_length, batch_size=4)
    summary, images = D.evaluate_model(pipe, prompts, **kw)
    ref = evaluate_policy(FlowPolicy.from_pipeline(pipe, max_sequence_length=cfg.max_sequence_length), prompts, 2,
                          num_steps=2, height=32, width=32, guidance_scale=3.0, reward=ShapesScorer(), batch_size=4)
    assert torch.equal(images, ref.images) and images.shape == (6, 3, 32, 32)
    assert summary == {k[len("shapes/"):]: v for k, v in ref.details.items()} and 0.0 <= summary["score"] <= 1.0
    # the empty-prompt reference: rows of one seed are the same image whatever the prompt, scored against it
    blind, blind_images = D.evaluate_model(pipe, prompts, ignore_prompt=True, **{**kw, "guidance_scale": 1.0})
    assert torch.equal(blind_images[0], blind_images[2]) and torch.equal(blind_images[1], blind_images[3])
    assert not torch.equal(blind_images[0], blind_images[1])  # seeds 0 and 1
    assert set(blind) == set(summary)


def test_random_text_encoders_separate_all_prompts():
    from flowrl.demo.shapes import all_prompts

    cfg = _tiny_cfg(Path("/nonexistent"))
    pipe = D.build_demo_pipeline(cfg)
    ps = all_prompts()
    pe, pooled = D.encode_prompt_table(pipe, ps, cfg.max_sequence_length)
    assert pe.shape == (len(ps), cfg.clip_max_length + cfg.max_sequence_length, 160)
    sep_pool = D.embedding_separation(pooled)
    sep_seq = D.embedding_separation(pe[:, : cfg.clip_max_length])
    # Every prompt has its own pooled and sequence embedding, far above float32 rounding.
    assert sep_pool["min_nn"] > 1e-2 * sep_pool["median"], sep_pool
    assert sep_seq["min_nn"] > 1e-2 * sep_seq["median"], sep_seq
    # The zero "T5" tokens carry nothing.
    assert torch.count_nonzero(pe[:, cfg.clip_max_length:]) == 0


def test_word_tokenizer_gives_every_grammar_word_one_token_and_survives_a_reload(tmp_path):
    from transformers import CLIPTokenizer

    from flowrl.demo.shapes import all_prompts, vocabulary
    from flowrl.demo.tiny_image import tiny_clip_tokenizer

    words = vocabulary()
    assert {"a", "an", "and", "circle", "triangles", "purple", "left", "of", "four"} <= set(words)
    tok = tiny_clip_tokenizer(16, words)
    for w in words:  # one token per word (the merges of overlapping words do not pre-empt each other)
        assert tok.convert_ids_to_tokens(tok(w)["input_ids"]) == ["<|startoftext|>", w + "</w>", "<|endoftext|>"], w
    tok.save_pretrained(tmp_path)
    again = CLIPTokenizer.from_pretrained(tmp_path)
    longest = 0
    for p in all_prompts():
        ids = tok(p)["input_ids"]
        assert again(p)["input_ids"] == ids
        assert len(ids) == len(p.split()) + 2, p  # bos, one token per word, eos
        longest = max(longest, len(ids))
    assert longest <= D.PretrainConfig.clip_max_length  # the default length holds every prompt
    # A word outside the vocabulary falls back to characters; bad vocabulary words are refused.
    assert tok.convert_ids_to_tokens(tok("hexagon")["input_ids"])[1:-1] == list("hexago") + ["n</w>"]
    with pytest.raises(ValueError, match="words"):
        tiny_clip_tokenizer(16, ["Circle"])


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="image_size"):
        D.PretrainConfig(image_size=60).validate()
    with pytest.raises(ValueError, match="prompt_dropout"):
        D.PretrainConfig(prompt_dropout=1.0).validate()
    with pytest.raises(ValueError, match="timestep_sampling"):
        D.PretrainConfig(timestep_sampling="cosmap").validate()
    with pytest.raises(ValueError, match="steps"):
        D.PretrainConfig(steps=-1).validate()


# ------------------------------------------------------------------------------------------------
# The whole run at a tiny size
# ------------------------------------------------------------------------------------------------


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            out[f"{f.parent.name}/{k}"] = v
    return out


def test_pretrain_smoke_loads_with_diffusers_and_resumes_bit_exactly(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from flowrl.demo.shapes import CATEGORIES

    cfg = _tiny_cfg(tmp_path / "a")
    summary = D.pretrain(cfg)
    card = D.write_model_card(summary, cfg.output_dir)

    # Losses: finite and falling in both phases.
    log = [json.loads(line) for line in (Path(cfg.work_dir) / "train_log.jsonl").read_text().splitlines()]
    for phase, n in (("vae", cfg.vae_steps), ("transformer", cfg.steps)):
        losses = [r["loss"] for r in log if r["phase"] == phase]
        assert len(losses) == n and all(math.isfinite(v) for v in losses), (phase, losses)
        assert np.mean(losses[-3:]) < np.mean(losses[:3]), (phase, losses)

    # The folder loads with the plain SD3 loader and samples images of the configured size.
    out = Path(cfg.output_dir)
    pipe = StableDiffusion3Pipeline.from_pretrained(out, text_encoder_3=None, tokenizer_3=None)
    assert pipe.transformer.config.sample_size * pipe.vae_scale_factor == cfg.image_size
    assert pipe.scheduler.config.shift == cfg.shift
    assert pipe.vae.config.scaling_factor == pytest.approx(summary["vae_scaling_factor"])
    assert pipe.vae.config.shift_factor == pytest.approx(summary["vae_shift_factor"])
    img = pipe("a red circle", num_inference_steps=2, guidance_scale=3.0, max_sequence_length=cfg.max_sequence_length,
               output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 3, cfg.image_size, cfg.image_size) and torch.isfinite(img).all()

    # flowrl's own loader takes the same folder (it passes text_encoder_3=None itself).
    from flowrl.flow.policy import FlowPolicy, SD3Policy

    policy = FlowPolicy.from_pretrained(out, max_sequence_length=cfg.max_sequence_length)
    assert isinstance(policy, SD3Policy)
    emb = policy.encode_prompts(["a red circle", "two blue squares"])
    pe_ref, _ = D.encode_prompt_table(pipe, ["a red circle", "two blue squares"], cfg.max_sequence_length)
    torch.testing.assert_close(emb.prompt_embeds, pe_ref)

    # The saved transformer is the EMA of the last checkpoint.
    ck = _tensors(Path(cfg.work_dir) / "transformer" / "checkpoints" / f"step-{cfg.steps:08d}")
    saved = _tensors(out / "transformer")
    ema = {k.split("/", 1)[1][len("ema."):]: v for k, v in ck.items() if "/ema." in k}
    saved = {k.split("/", 1)[1]: v for k, v in saved.items()}
    assert set(saved) - set(ema) == {"pos_embed.pos_embed"}  # the one buffer (fixed sin-cos table)
    for k, v in ema.items():
        assert torch.equal(saved[k], v), k  # a copy of the tensors

    # Evaluation per GenEval category, references included, and the model card.
    ev = summary["evaluation"]
    assert ev["renderer"]["score"] > 0.9  # the checker recognises the renderer's scenes at 32 px
    for row in ("model", "empty_prompt", "random_scene"):
        assert 0.0 <= ev[row]["score"] <= 1.0
    assert ev["seeds"] == [0] and len(ev["prompts"]) == cfg.eval_prompts
    assert any(f"score/{c}" in ev["model"] for c in CATEGORIES)
    text = card.read_text()
    assert "max_sequence_length=2" in text and "| model |" in text

    # Crash simulation: drop the final VAE weights, the newest checkpoints of both phases and the model;
    # rerunning resumes mid-phase and must reproduce the same weights bit for bit.
    b = tmp_path / "b"
    shutil.copytree(tmp_path / "a" / "work", b / "work")
    (b / "work" / "vae_final.safetensors").unlink()
    for phase, n in (("vae", cfg.vae_steps), ("transformer", cfg.steps)):
        shutil.rmtree(b / "work" / phase / "checkpoints" / f"step-{n:08d}")
    (b / "work" / "train_log.jsonl").unlink()
    cfg_b = _tiny_cfg(b, eval_prompts=0)
    summary_b = D.pretrain(cfg_b)
    log_b = [json.loads(line) for line in (b / "work" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_b if r["phase"] == "vae"] == list(range(9, cfg.vae_steps + 1))
    assert [r["step"] for r in log_b if r["phase"] == "transformer"] == list(range(9, cfg.steps + 1))
    first, second = _tensors(out), _tensors(Path(cfg_b.output_dir))
    assert set(first) == set(second) and len(first) > 0
    for k in first:
        assert torch.equal(first[k], second[k]), k
    assert summary_b["vae_scaling_factor"] == summary["vae_scaling_factor"]


def test_script_flags_mirror_the_config():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "pretrain_demo.py"
    spec = importlib.util.spec_from_file_location("pretrain_demo_script", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    args = mod.build_parser().parse_args(["--steps", "7", "--dual-attention", "0", "--shift", "2.5"])
    assert args.steps == 7 and args.dual_attention is False and args.shift == 2.5
    assert args.output_dir == D.PretrainConfig().output_dir
    assert mod.main(["--image-size", "60", "--no-progress"]) == 2  # invalid: not divisible by 8


def test_caption_noise_and_washed_out_scenes():
    from flowrl.demo.shapes import BACKGROUND, SceneSpec, check, prompts

    ps = prompts("train", 400, seed=1)
    assert D.noisy_scenes(ps, 0.0, 5) == ps
    scenes = D.noisy_scenes(ps, 0.45, 5)
    assert scenes == D.noisy_scenes(ps, 0.45, 5)  # deterministic in the seed
    flipped = [isinstance(s, SceneSpec) for s in scenes]
    assert 0.35 < np.mean(flipped) < 0.55
    assert all(s == p for s, p in zip(scenes, ps) if isinstance(s, str))
    # attribute noise: its own random stream (the caption noise above is unchanged), the given rate
    both = D.noisy_scenes(ps, 0.45, 5, attribute_noise=0.4)
    attr_only = D.noisy_scenes(ps, 0.0, 5, attribute_noise=0.4)
    assert 0.3 < np.mean([isinstance(s, SceneSpec) for s in attr_only]) < 0.5
    assert [isinstance(s, SceneSpec) for s in both] != flipped  # some scenes get both kinds of noise
    assert all(b == s for b, s, a in zip(both, scenes, attr_only) if isinstance(a, str))

    images = D.render_batch(ps[:64], 64, 0)
    assert D.wash_out(images, 0.0, 0.4, 1) is images
    out = D.wash_out(images, 0.5, 0.4, 1)
    changed = (out != images).flatten(1).any(1)
    assert 0.3 < changed.float().mean() < 0.7
    g = torch.tensor(BACKGROUND, dtype=torch.float32).view(3, 1, 1)
    i = int(changed.nonzero()[0])
    # x' = g + 0.4 (x - g), to uint8 rounding; exact: wash_out's own float32 elementwise ops (correctly rounded
    # on any CPU) in the same order
    torch.testing.assert_close(out[i].float(), (g + 0.4 * (images[i].float() - g)).round(), atol=0, rtol=0)
    # the checker finds nothing right in a washed-out scene; the untouched ones keep their score
    for j in range(16):
        r = check(out[j].permute(1, 2, 0).numpy(), ps[j]).score
        assert (r < 0.25) if changed[j] else (r == check(images[j].permute(1, 2, 0).numpy(), ps[j]).score)
    with pytest.raises(ValueError, match="faded"):
        D.PretrainConfig(faded=1.0).validate()
    with pytest.raises(ValueError, match="caption_noise"):
        D.PretrainConfig(caption_noise=-0.1).validate()
