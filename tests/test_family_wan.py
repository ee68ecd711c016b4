"""The Wan family (``WanPipeline``, Wan2.1 / Wan2.2 text-to-video) behind the FlowPolicy interface.

* parity: flowrl's all-ODE Euler loop (policy ``sigmas`` / ``velocity`` / ``decode``) gives the frames of
  the pipeline's own ``__call__`` (tiny random-weight model built with a FlowMatchEuler scheduler, see
  :mod:`flowrl.demo.tiny_wan`), with and without CFG, square and not, one and two experts (Wan2.2);
* the LoRA round trip through ``save_diffusers_lora`` and ``WanPipeline.load_lora_weights``;
* a 2-step ``flowrl train configs/tiny_wan.yaml`` (likelihood objective) with an image reward through the
  frame mean and the temporal-consistency video reward, and a 1-step forward-objective run (DGPO);
* gradient checkpointing, ``flowrl make-tiny wan`` + ``FlowPolicy.from_pretrained``, the video scorers.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from flowrl.cli import main as flowrl_main
from flowrl.demo.tiny_wan import build_tiny_wan22_pipeline, build_tiny_wan_pipeline
from flowrl.flow.models.wan import WanPolicy, unipc_flow_sigmas
from flowrl.flow.policy import FlowPolicy, PromptEmbeds

ROOT = Path(__file__).resolve().parents[1]
MSL = 16  # UMT5 tokens: both prompts fit; the zero padding to it is part of what the transformer sees
FRAMES = 5  # (5 - 1) / 4 + 1 = 2 latent frames
PROMPTS = ["a red cube left of a blue ball", "two dogs"]  # different lengths (different padding)


@pytest.fixture(scope="module")
def wan() -> WanPolicy:
    return FlowPolicy.from_pipeline(build_tiny_wan_pipeline(seed=0), max_sequence_length=MSL, num_frames=FRAMES)


@pytest.fixture(scope="module")
def wan22() -> WanPolicy:
    return FlowPolicy.from_pipeline(build_tiny_wan22_pipeline(seed=1), max_sequence_length=MSL, num_frames=FRAMES)


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("tiny_wan") / "wan"
    assert flowrl_main(["make-tiny", "wan", str(d)]) == 0
    return str(d)


def _euler_ode(policy, x, embeds, sigmas, guidance):
    for i in range(len(sigmas) - 1):
        x = x + (sigmas[i + 1] - sigmas[i]) * policy.velocity(x, sigmas[i], embeds, guidance)
    return x


# ----------------------------------------------------------------------------------------------
# parity with WanPipeline.__call__
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which,guidance,hw", [("wan", 5.0, (32, 32)), ("wan", 1.0, (32, 48)),
                                                ("wan22", 4.0, (48, 32))])
def test_ode_loop_reproduces_pipeline_call(which, guidance, hw, request):
    policy = request.getfixturevalue(which)
    pipe = policy.pipeline
    h, w = hw
    steps = 4
    noise = policy.initial_noise(2, h, w, generator=torch.Generator().manual_seed(3))
    fr = (FRAMES - 1) // 4 + 1
    assert noise.shape == (2, 16, fr, h // 8, w // 8) and noise.dtype == torch.float32
    g2 = 2.0 if which == "wan22" else None
    policy.guidance_scale_2 = g2
    finals = []

    def keep_latents(pipe_, i, t, kw):  # the pipeline's latents after its last step (before decoding)
        finals.append(kw["latents"].clone())
        return {}

    try:
        with torch.no_grad():
            embeds = policy.encode_prompts(PROMPTS)
            sig = policy.sigmas(steps, h, w)
            lat = _euler_ode(policy, noise.clone(), embeds, sig, guidance)
            video = policy.decode(lat)
            ref = pipe(PROMPTS, latents=noise.clone(), output_type="pt", num_inference_steps=steps,
                       guidance_scale=guidance, height=h, width=w, num_frames=FRAMES, max_sequence_length=MSL,
                       guidance_scale_2=g2, callback_on_step_end=keep_latents).frames  # [B, F, 3, H, W]
            # the pipeline drawing its own latents from the same generator starts where initial_noise does
            drawn = pipe.prepare_latents(2, 16, h, w, FRAMES, torch.float32, "cpu", torch.Generator().manual_seed(3))
    finally:
        policy.guidance_scale_2 = None
    ref_lat = finals[-1]
    assert len(finals) == steps
    torch.testing.assert_close(drawn, noise, rtol=0, atol=0)
    # the scheduler's sigmas are the policy's (the pipeline just ran set_timesteps)
    torch.testing.assert_close(pipe.scheduler.sigmas.float(), sig, rtol=0, atol=0)
    assert video.shape == (2, 3, FRAMES, h, w) and video.dtype == torch.float32
    assert 0.0 <= float(video.min()) and float(video.max()) <= 1.0 and float(video.std()) > 0.01
    # float32 throughout and the same operations in the same order (timesteps 1000 sigma, two-pass CFG
    # v_u + g (v_c - v_u), Euler x + (s' - s) v as the scheduler's step, the VAE's x / (1 / std) + mean): only
    # kernel-level rounding may differ, so 1e-5 on latents of unit scale and on [0, 1] frames is ~100 float32 ulps,
    # far below what a wrong convention gives (a timestep off by one changes the velocity by ~1e-3 here).
    diff_lat = float((lat - ref_lat).abs().max())
    diff_img = float((video - ref.permute(0, 2, 1, 3, 4)).abs().max())
    print(f"\n{which} g={guidance} {h}x{w}: max |latent diff| {diff_lat:.2e}, max |frame diff| {diff_img:.2e}")
    assert diff_lat <= 1e-5 and diff_img <= 1e-5
    assert not torch.allclose(video[0], video[1], atol=1e-3), "the two prompts must give different videos"


def test_prompt_padding_and_row_independence(wan):
    """Embeddings are cut to the prompt's tokens and zero-padded to max_sequence_length (no mask needed: every row
    has the same length), and a row's velocity does not depend on the other rows of the batch."""
    e = wan.encode_prompts(PROMPTS)
    assert e.prompt_embeds.shape[1] == MSL and e.prompt_mask is None and e.negative_prompt_embeds is not None
    n0 = len(wan.pipeline.tokenizer(PROMPTS[1]).input_ids)
    assert float(e.prompt_embeds[1, n0:].abs().max()) == 0 and float(e.prompt_embeds[1, n0 - 1].abs().max()) > 0
    x = wan.initial_noise(2, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        both = wan.velocity(x, torch.tensor([0.8, 0.3]), e, 5.0)
        one = wan.velocity(x[1:], torch.tensor([0.3]), e.select([1]), 5.0)
    torch.testing.assert_close(both[1:], one, rtol=1e-5, atol=1e-6)


def test_wan22_routes_rows_by_boundary(wan22):
    """Rows above the boundary use the high-noise expert, rows below the low-noise one (with guidance_scale_2),
    in one batch; the trained expert can be switched to transformer_2."""
    e = wan22.encode_prompts(PROMPTS)
    x = wan22.initial_noise(2, 32, 32, generator=torch.Generator().manual_seed(0))
    hi, lo = 0.95, 0.5  # boundary 0.875
    with torch.no_grad():
        mixed = wan22.velocity(x, torch.tensor([hi, lo]), e, 4.0, guidance_scale_2=2.0)
        t = torch.tensor([hi * 1000, lo * 1000])
        ref_hi = wan22._expert_call(wan22.pipeline.transformer, x[:1], t[:1], e.select([0]), 4.0)
        ref_lo = wan22._expert_call(wan22.pipeline.transformer_2, x[1:], t[1:], e.select([1]), 2.0)
        wrong = wan22._expert_call(wan22.pipeline.transformer, x[1:], t[1:], e.select([1]), 2.0)
    torch.testing.assert_close(mixed, torch.cat([ref_hi, ref_lo]), rtol=1e-5, atol=1e-6)
    assert (wrong - ref_lo).abs().max() > 1e-3
    assert wan22.transformer is wan22.pipeline.transformer and "transformer_2" in wan22.frozen_modules()
    pol = WanPolicy(build_tiny_wan22_pipeline(seed=1), max_sequence_length=MSL, num_frames=FRAMES)
    pol.set_expert("transformer_2")
    assert pol.transformer is pol.pipeline.transformer_2 and "transformer" in pol.frozen_modules()
    with pytest.raises(ValueError, match="transformer_2"):
        WanPolicy(build_tiny_wan_pipeline(seed=0), num_frames=FRAMES).set_expert("transformer_2")


def test_geometry_schedules_and_errors(wan):
    assert wan.latent_shape(32, 48) == (16, 2, 4, 6) and wan.image_seq_len(32, 48) == 2 * 2 * 3
    with pytest.raises(ValueError, match="divisible by 16"):
        wan.latent_shape(40, 32)
    with pytest.raises(ValueError, match="num_frames"):
        wan.num_frames = 6
    with pytest.raises(ValueError, match=r"\[B, C, F, h, w\]"):
        wan.velocity(torch.zeros(1, 16, 4, 4), 0.5, wan.encode_prompts(["a"]), 1.0)
    with pytest.raises(ValueError, match="negative"):
        e = wan.encode_prompts(["a"])
        wan.velocity(torch.zeros(1, 16, 2, 4, 4), 0.5, PromptEmbeds(prompt_embeds=e.prompt_embeds), 5.0)
    # the released checkpoints' UniPC flow sigmas
    from diffusers import UniPCMultistepScheduler

    s = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    s.set_timesteps(7)
    torch.testing.assert_close(unipc_flow_sigmas(7, 3.0), s.sigmas.float(), rtol=0, atol=0)
    old = wan.pipeline.scheduler
    try:
        wan.pipeline.scheduler = s
        torch.testing.assert_close(wan.sigmas(7, 32, 32), s.sigmas.float(), rtol=0, atol=0)
        from flowrl.train.model import set_fixed_shift

        set_fixed_shift(wan, 5.0)  # model.shift: UniPC calls it flow_shift
        assert wan.pipeline.scheduler.config.flow_shift == 5.0
        torch.testing.assert_close(wan.sigmas(7, 32, 32), unipc_flow_sigmas(7, 5.0), rtol=0, atol=0)
    finally:
        wan.pipeline.scheduler = old


# ----------------------------------------------------------------------------------------------
# LoRA round trip, gradient checkpointing
# ----------------------------------------------------------------------------------------------


def test_lora_round_trip_through_load_lora_weights(wan_dir, tmp_path):
    from diffusers import WanPipeline
    from peft.utils import get_peft_model_state_dict

    from flowrl.train.lora import add_lora_to_transformer, lora_config, lora_targets_present, save_diffusers_lora

    rank, alpha = 4, 16
    policy = WanPolicy.from_pretrained(wan_dir, max_sequence_length=MSL)
    policy.num_frames = FRAMES
    lc = lora_config("wan", rank=rank, alpha=alpha)
    assert set(lora_targets_present(policy.transformer, sorted(lc.target_modules))) == set(lc.target_modules)
    add_lora_to_transformer(policy.transformer, lc)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in policy.transformer.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    x = policy.initial_noise(2, 32, 32, generator=torch.Generator().manual_seed(1))
    e = policy.encode_prompts(PROMPTS)
    with torch.no_grad():
        v = policy.velocity(x, 0.7, e, 1.0)

    def diffusers_velocity(pipe):
        pe, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, max_sequence_length=MSL, device="cpu")
        with torch.no_grad():
            return pipe.transformer(hidden_states=x, timestep=torch.full((2,), 700.0), encoder_hidden_states=pe,
                                    return_dict=False)[0]

    def scalings(m):
        return {float(s) for mod in m.modules() for s in (getattr(mod, "scaling", None) or {}).values()
                if isinstance(getattr(mod, "scaling", None), dict)}

    save_diffusers_lora(WanPipeline, policy.transformer, tmp_path / "lora")
    fresh = WanPipeline.from_pretrained(wan_dir)
    fresh.load_lora_weights(str(tmp_path / "lora"))
    assert scalings(fresh.transformer) == {alpha / rank}
    v_diff = diffusers_velocity(fresh)
    torch.testing.assert_close(v_diff, v, rtol=1e-5, atol=1e-5)
    policy.transformer.disable_adapters()
    with torch.no_grad():
        base = policy.velocity(x, 0.7, e, 1.0)
    policy.transformer.enable_adapters()
    assert (base - v).abs().max() > 1e-2, "the LoRA must change the velocity (else the test is vacuous)"
    # negative control: without the adapter metadata diffusers assumes alpha = rank
    (tmp_path / "nometa").mkdir()
    WanPipeline.save_lora_weights(tmp_path / "nometa", transformer_lora_layers=get_peft_model_state_dict(policy.transformer),
                                  safe_serialization=True)
    wrong = WanPipeline.from_pretrained(wan_dir)
    wrong.load_lora_weights(str(tmp_path / "nometa"))
    assert scalings(wrong.transformer) == {1.0}
    assert (diffusers_velocity(wrong) - v).abs().max() > 1e-3


def test_gradient_checkpointing_gives_the_same_gradient(wan):
    t = wan.transformer
    assert t._supports_gradient_checkpointing
    x = wan.initial_noise(2, 32, 32, generator=torch.Generator().manual_seed(2))
    e = wan.encode_prompts(PROMPTS)

    def grads():
        t.zero_grad(set_to_none=True)
        wan.velocity(x, 0.6, e, 1.0).pow(2).mean().backward()
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
    assert plain.keys() == ckpt.keys() and len(plain) > 10
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-7, msg=n)


# ----------------------------------------------------------------------------------------------
# make-tiny, training runs
# ----------------------------------------------------------------------------------------------


def test_make_tiny_then_from_pretrained_picks_wan(wan_dir):
    index = json.loads((Path(wan_dir) / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline" and index["transformer_2"] in (None, [None, None])
    p = FlowPolicy.from_pretrained(wan_dir)
    assert type(p) is WanPolicy and p.max_sequence_length == 512 and p.num_frames == 81
    assert type(p.pipeline.text_encoder).__name__ == "UMT5EncoderModel"
    assert type(p.pipeline.vae).__name__ == "AutoencoderKLWan"
    # deterministic per seed
    a, b = build_tiny_wan_pipeline(seed=0), build_tiny_wan_pipeline(seed=0)
    assert all(torch.equal(u, v) for u, v in zip(a.transformer.state_dict().values(), b.transformer.state_dict().values()))


def _train(wan_dir, out, *extra):
    return flowrl_main(["train", str(ROOT / "configs" / "tiny_wan.yaml"), f"model.path={wan_dir}", f"output_dir={out}",
                        "train.tracker=none", "train.progress=false", "resume=none", "sample.eval_num_steps=2",
                        "eval.num_prompts=1", "eval.seeds=[0]", "sample.group_size=2", "sample.prompts_per_step=1",
                        *extra])


def test_flowrl_train_two_steps_with_a_video_reward(wan_dir, tmp_path):
    out = tmp_path / "run"
    assert _train(wan_dir, out, "max_steps=2", "sample.num_steps=2", "eval_every=2", "checkpoint_every=2",
                  "eval.at_start=false") == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows) and rows[0]["grad_norm"] > 0
    ev = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()][-1]
    assert math.isfinite(ev["means"]["temporal_consistency"]) and math.isfinite(ev["means"]["jpeg_compressibility"])
    from PIL import Image

    grid = Image.open(out / ev["grid"])
    assert grid.width > grid.height  # a strip of 5 frames per sample
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file() and (out / "report.html").is_file()


def test_flowrl_train_one_step_forward_objective(wan_dir, tmp_path, monkeypatch):
    # the run's HTML report (matplotlib, most of this run's time) is the two-step test's and the report tests' business
    monkeypatch.setattr("flowrl.train.loop.write_report", lambda run_dir: None)
    out = tmp_path / "dgpo"
    assert _train(wan_dir, out, "max_steps=1", "sample.num_steps=2", "objective.kind=dgpo", "plan.kind=ode",
                  "objective.num_timesteps=1", "objective.timestep_share=group", "eval_every=5", "eval.at_start=false",
                  "rewards={jpeg_compressibility: 1.0}") == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and math.isfinite(rows[0]["loss"])


# ----------------------------------------------------------------------------------------------
# video scoring
# ----------------------------------------------------------------------------------------------


def test_image_scorers_score_videos_by_frame_mean():
    from scorers.multi import MultiReward
    from scorers.video import frame_indices, temporal_consistency_scores

    assert frame_indices(9, "all") == list(range(9)) and frame_indices(9, "first_last") == [0, 8]
    assert frame_indices(9, "every_k", 4) == [0, 4, 8] and frame_indices(6, "every_k", 4) == [0, 4, 5]
    with pytest.raises(ValueError, match="score_frames"):
        frame_indices(5, "middle")
    video = torch.rand(3, 3, 5, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = []

    def bright(images, prompts, **meta):
        seen.append((tuple(images.shape), list(prompts), meta["tag"]))
        return images.mean(dim=(1, 2, 3))

    m = MultiReward({"b": 1.0}, scorers={"b": bright}, score_frames="first_last")
    r = m(video, ["p0", "p1", "p2"], tag=["a", "b", "c"])
    expect = video[:, :, [0, 4]].mean(dim=(1, 3, 4)).mean(dim=1)
    torch.testing.assert_close(r.components["b"], expect)
    assert seen[0] == ((6, 3, 8, 8), ["p0", "p0", "p1", "p1", "p2", "p2"], ["a", "a", "b", "b", "c", "c"])
    # temporal consistency: 1 for a static video, lower for independent noise frames
    static = video[:, :, :1].expand(-1, -1, 5, -1, -1)
    tc = MultiReward({"temporal_consistency": 1.0})
    torch.testing.assert_close(tc(static, ["a"] * 3).components["temporal_consistency"], torch.ones(3))
    assert float(temporal_consistency_scores(video).abs().max()) < 0.5
    with pytest.raises(ValueError, match="score_frames"):
        MultiReward({"b": 1.0}, scorers={"b": bright}, score_frames="middle")
    # grids show a video as the strip of its frames, left to right
    from flowrl.train.grids import frame_strip, to_pil

    strip = frame_strip(video)
    assert strip.shape == (3, 3, 8, 40) and torch.equal(strip[2, :, :, 8:16], video[2, :, 1])
    assert to_pil(video[0]).size == (40, 8)


def test_remote_protocol_2_carries_videos():
    """A video scorer served over HTTP scores videos sent whole (protocol 2, frames sample-major) as it does
    in process, on the 8-bit frames the PNGs carry; image requests still go as protocol 1."""
    import json as _json

    from scorers.remote import build_score_request
    from scorers.registry import get
    from scorers.server import ScorerServer

    video = torch.rand(3, 3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    video[1] = video[1, :, :1]  # a static video
    q = (video * 255).round() / 255
    body = _json.loads(build_score_request(video, ["a", "b", "c"]))
    assert body["protocol"] == 2 and body["frames"] == 4 and len(body["images"]) == 12
    assert _json.loads(build_score_request(video[:, :, 0], ["a", "b", "c"]))["protocol"] == 1
    local = get("temporal_consistency")(q, ["a", "b", "c"])
    with ScorerServer("temporal_consistency", port=0) as srv:
        got = get("remote", url=srv.url, video=True, retries=0, batch_size=2)(video, ["a", "b", "c"])
        assert srv.requests_served == 2
        with pytest.raises(ValueError, match="video: true"):
            get("remote", url=srv.url, retries=0)(video, ["a", "b", "c"])
    torch.testing.assert_close(got, local, rtol=1e-5, atol=1e-6)
    assert float(got[1]) == pytest.approx(1.0, abs=1e-5) and float(got[0]) < 0.5
