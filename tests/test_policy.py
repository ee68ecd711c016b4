"""Tests of flowrl.flow.policy (SD3/Flux policy adapters) and flowrl.demo.tiny_image (tiny pipelines).

The strongest check is the equivalence test: an all-ODE Euler loop written with the policy's
``sigmas``/``velocity``/``decode`` reproduces the diffusers pipeline's own ``__call__`` image from the
same initial latents, which pins down timestep conventions, CFG, packing and VAE scaling at once.
"""

from __future__ import annotations

import math

import pytest
import torch

from flowrl.demo.tiny_image import (
    build_tiny_flux_pipeline,
    build_tiny_sd3_pipeline,
    count_params,
    save_tiny,
    tiny_clip_tokenizer,
    tiny_t5_tokenizer,
)
from flowrl.flow.policy import FlowPolicy, FluxPolicy, PromptEmbeds, SD3Policy

MSL = 8  # T5 sequence length used in the tests (pipeline default 256/512 is slower and irrelevant)
PROMPTS = ["a red cube left of a blue ball", "two green dogs"]

BUILDERS = {"sd3": build_tiny_sd3_pipeline, "flux": build_tiny_flux_pipeline}
COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _policy(kind: str, seed: int = 0, **kw) -> FlowPolicy:
    return FlowPolicy.from_pipeline(BUILDERS[kind](seed=seed), max_sequence_length=MSL, **kw)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    return {k: str(save_tiny(k, root / k)) for k in ("sd3", "flux")}


@pytest.fixture(scope="module")
def sd3() -> SD3Policy:
    return _policy("sd3")


@pytest.fixture(scope="module")
def flux() -> FluxPolicy:
    return _policy("flux")


# ----------------------------------------------------------------------------------------------
# tiny builders and tokenizers
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_tiny_pipelines_are_deterministic_small_and_leave_global_rng(kind):
    rng_before = torch.get_rng_state()
    a, b, c = BUILDERS[kind](seed=0), BUILDERS[kind](seed=0), BUILDERS[kind](seed=1)
    assert torch.equal(torch.get_rng_state(), rng_before), "builders must not consume the caller's RNG"
    for name in COMPONENTS:
        sa, sb = _state(getattr(a, name)), _state(getattr(b, name))
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), f"{name} differs between two seed-0 builds"
        n = count_params(getattr(a, name))
        assert 1_000 < n < 1_000_000, f"{name} has {n} params"
    sc = _state(c.transformer)
    sa = _state(a.transformer)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa), "seed 1 must give different transformer weights"
    assert count_params(a.transformer) > 50_000


def test_tiny_architectures_match_the_released_families():
    s = build_tiny_sd3_pipeline()
    cfg = s.transformer.config
    assert s.text_encoder_3 is None and s.tokenizer_3 is None
    assert cfg.qk_norm == "rms_norm" and tuple(cfg.dual_attention_layers) == (0,)  # SD3.5-Medium features
    assert cfg.in_channels == s.vae.config.latent_channels == 16
    # pooled = concat of both CLIP projections; CLIP hidden states are zero-padded to the T5 width
    assert cfg.pooled_projection_dim == s.text_encoder.config.projection_dim + s.text_encoder_2.config.projection_dim
    assert cfg.joint_attention_dim >= s.text_encoder.config.hidden_size + s.text_encoder_2.config.hidden_size
    assert s.scheduler.config.shift == 3.0 and not s.scheduler.config.use_dynamic_shifting
    assert (s.vae.config.scaling_factor, s.vae.config.shift_factor) == (1.5305, 0.0609)

    f = build_tiny_flux_pipeline()
    fc = f.transformer.config
    assert fc.guidance_embeds and fc.in_channels == 4 * f.vae.config.latent_channels
    assert sum(fc.axes_dims_rope) == fc.attention_head_dim
    assert fc.joint_attention_dim == f.text_encoder_2.config.d_model
    assert fc.pooled_projection_dim == f.text_encoder.config.hidden_size
    assert f.scheduler.config.use_dynamic_shifting
    assert (f.vae.config.scaling_factor, f.vae.config.shift_factor) == (0.3611, 0.1159)


def test_tiny_tokenizers_offline_round_trip():
    clip = tiny_clip_tokenizer(16)
    ids = clip("A red cat!", padding="max_length", max_length=16).input_ids
    assert len(ids) == 16 and ids[0] == clip.bos_token_id
    n_real = ids.index(clip.eos_token_id)
    assert n_real == 1 + len("a") + len("red") + len("cat") + len("!")  # character level, no merges
    assert all(i == clip.pad_token_id for i in ids[n_real:])
    assert clip.decode(ids, skip_special_tokens=True) == "a red cat !"
    t5 = tiny_t5_tokenizer()
    tids = t5("A red cat").input_ids
    assert tids[-1] == t5.eos_token_id == 1 and t5.pad_token_id == 0
    assert t5.unk_token_id not in tids
    assert t5.decode(tids, skip_special_tokens=True) == "A red cat"


# ----------------------------------------------------------------------------------------------
# equivalence with the diffusers pipelines
# ----------------------------------------------------------------------------------------------


def _euler_ode(policy: FlowPolicy, x: torch.Tensor, embeds, sigmas, guidance: float) -> torch.Tensor:
    for i in range(len(sigmas) - 1):
        v = policy.velocity(x, sigmas[i], embeds, guidance)
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


@pytest.mark.parametrize(
    "kind,guidance,hw",
    [("sd3", 4.5, (32, 32)), ("sd3", 1.0, (32, 32)), ("sd3", 3.0, (32, 48)), ("flux", 3.5, (32, 32)),
     ("flux", 2.0, (32, 48))],
)
def test_ode_loop_reproduces_pipeline_call(kind, guidance, hw, request):
    policy = request.getfixturevalue(kind)
    pipe = policy.pipeline
    h, w = hw
    steps = 4
    noise = policy.initial_noise(2, h, w, generator=torch.Generator().manual_seed(3))
    assert noise.dtype == torch.float32 and noise.shape == (2, *policy.latent_shape(h, w))
    with torch.no_grad():
        embeds = policy.encode_prompts(PROMPTS)
        sig = policy.sigmas(steps, h, w)
        img = policy.decode(_euler_ode(policy, noise.clone(), embeds, sig, guidance))
        common = dict(num_inference_steps=steps, guidance_scale=guidance, height=h, width=w,
                      output_type="pt", max_sequence_length=MSL)
        ref = pipe(PROMPTS, latents=noise.clone(), **common).images
        # the pipeline drawing its own latents from the same generator gives the same start
        ref_gen = pipe(PROMPTS, generator=torch.Generator().manual_seed(3), **common).images
    # the sigmas the pipeline's scheduler used are the policy's
    torch.testing.assert_close(pipe.scheduler.sigmas.float(), sig, rtol=0, atol=1e-7)
    assert img.shape == (2, 3, h, w) and img.dtype == torch.float32
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    assert float(img.std()) > 0.01  # a non-degenerate image
    torch.testing.assert_close(img, ref, rtol=0, atol=2e-5)
    torch.testing.assert_close(ref_gen, ref, rtol=0, atol=0)
    assert not torch.allclose(img[0], img[1], atol=1e-3), "the two prompts must give different images"


def test_flux_pack_unpack_match_pipeline(flux):
    lat = torch.randn(2, 16, 8, 12)
    packed = FluxPolicy.pack(lat)
    assert torch.equal(packed, flux.pipeline._pack_latents(lat, 2, 16, 8, 12))
    assert torch.equal(FluxPolicy.unpack(packed, (4, 6)), lat)
    assert torch.equal(flux.pipeline._unpack_latents(packed, 16, 24, flux.vae_scale_factor), lat)


def test_sigma_and_guidance_conventions(sd3, flux):
    """Velocity depends on the prompt, sigma and (Flux) the guidance embedding; SD3's CFG combination
    equals v_u + g (v_c - v_u) computed from two separate no-CFG calls (CFG batch split right)."""
    with torch.no_grad():
        e = sd3.encode_prompts(PROMPTS)
        x = sd3.initial_noise(2, 32, 32, generator=torch.Generator().manual_seed(0))
        v_c = sd3.velocity(x, 0.7, e, 1.0)
        neg = PromptEmbeds(prompt_embeds=e.negative_prompt_embeds, pooled=e.negative_pooled)
        v_u = sd3.velocity(x, 0.7, neg, 1.0)
        v_g = sd3.velocity(x, 0.7, e, 5.0)
        torch.testing.assert_close(v_g, v_u + 5.0 * (v_c - v_u), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(v_c[0], v_c[1], atol=1e-4)
        v_s = sd3.velocity(x, torch.tensor([0.7, 0.2]), e, 1.0)
        torch.testing.assert_close(v_s[0], v_c[0], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(v_s[1], v_c[1], atol=1e-4)

        fe = flux.encode_prompts(PROMPTS)
        fx = flux.initial_noise(2, 32, 32, generator=torch.Generator().manual_seed(0))
        a = flux.velocity(fx, 0.5, fe, 1.0)
        b = flux.velocity(fx, 0.5, fe, 3.5)
        assert not torch.allclose(a, b, atol=1e-5), "guidance embedding must change the velocity"
        assert fe.negative_prompt_embeds is None


# ----------------------------------------------------------------------------------------------
# save / reload
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_save_reload_gives_identical_velocity(kind, saved, request):
    mem = request.getfixturevalue(kind)
    loaded = FlowPolicy.from_pretrained(saved[kind], max_sequence_length=MSL)
    assert type(loaded) is type(mem)
    if kind == "sd3":
        assert loaded.pipeline.text_encoder_3 is None
    # weights read from safetensors may sit at any 8-byte offset; the policy re-allocates them as torch
    # aligns its own storage, since a CPU GEMM can round differently on a misaligned operand
    for m in [loaded.transformer, *loaded.frozen_modules().values()]:
        assert all(t.data_ptr() % 64 == 0 for t in [*m.parameters(), *m.buffers()])
    h, w = 32, 32
    x = mem.initial_noise(2, h, w, generator=torch.Generator().manual_seed(5))
    loaded.latent_shape(h, w)
    with torch.no_grad():
        e_mem, e_load = mem.encode_prompts(PROMPTS), loaded.encode_prompts(PROMPTS)
        for k, t in e_mem.tensors().items():
            assert torch.equal(t, e_load.tensors()[k]), k
        g = 4.5 if kind == "sd3" else 3.5
        assert torch.equal(mem.velocity(x, 0.6, e_mem, g), loaded.velocity(x, 0.6, e_load, g))
        assert torch.equal(mem.decode(x), loaded.decode(x))
    # the subclass loads too, and refuses the other family's folder
    other = "flux" if kind == "sd3" else "sd3"
    cls = type(mem)
    assert type(cls.from_pretrained(saved[kind], max_sequence_length=MSL)) is cls
    with pytest.raises(ValueError, match=cls.pipeline_class_name):
        cls.from_pretrained(saved[other])


def test_from_pretrained_frozen_dtype(saved):
    pol = FlowPolicy.from_pretrained(saved["sd3"], frozen_dtype=torch.bfloat16, max_sequence_length=MSL)
    assert pol.dtype == torch.float32 and pol.transformer.dtype == torch.float32
    for name, m in pol.frozen_modules().items():
        assert all(p.dtype == torch.bfloat16 for p in m.parameters()), name
    with torch.no_grad():
        e = pol.encode_prompts(PROMPTS)
        assert e.prompt_embeds.dtype == torch.float32
        x = pol.initial_noise(2, 32, 32, generator=torch.Generator().manual_seed(0))
        v = pol.velocity(x, 0.5, e, 4.5)
        img = pol.decode(x)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
    assert img.dtype == torch.float32 and 0 <= float(img.min()) <= float(img.max()) <= 1


def test_missing_model_path_is_a_clear_error(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        FlowPolicy.from_pretrained(missing)
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        SD3Policy.from_pretrained(str(missing))
    # a hub id that is not available offline (conftest sets HF_HUB_OFFLINE=1): an OSError naming it
    with pytest.raises(OSError, match="flowrl-test/not-a-model"):
        FlowPolicy.from_pretrained("flowrl-test/not-a-model")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        FlowPolicy.from_pretrained(empty)


# ----------------------------------------------------------------------------------------------
# training-facing behaviour
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,guidance", [("sd3", 4.5), ("sd3", 1.0), ("flux", 3.5)])
def test_only_transformer_trains_and_gradients_reach_it(kind, guidance):
    pol = _policy(kind)
    trainable = {id(p) for p in pol.transformer.parameters()}
    for name, m in pol.frozen_modules().items():
        assert not any(p.requires_grad for p in m.parameters()), f"{name} must be frozen"
    for p in pol.pipeline.components.values():
        if isinstance(p, torch.nn.Module):
            for q in p.parameters():
                assert not q.requires_grad or id(q) in trainable
    assert all(p.requires_grad for p in pol.transformer.parameters())
    e = pol.encode_prompts(PROMPTS)
    assert not e.prompt_embeds.requires_grad
    x = pol.initial_noise(2, 32, 32, generator=torch.Generator().manual_seed(0))
    v = pol.velocity(x, 0.8, e, guidance)
    assert v.requires_grad
    v.pow(2).mean().backward()
    grads = [p.grad for p in pol.transformer.parameters()]
    with_grad = sum(g is not None and bool(g.abs().sum() > 0) for g in grads)
    assert with_grad / len(grads) > 0.9, f"only {with_grad}/{len(grads)} transformer tensors got gradient"
    for m in pol.frozen_modules().values():
        assert all(p.grad is None for p in m.parameters())


def test_prompt_cache_reuses_embeddings_without_reencoding(monkeypatch):
    pol = _policy("sd3", cache_size=3)
    with torch.no_grad():  # reference: the pipeline's own, uncached encoding
        pe, _, pooled, _ = pol.pipeline.encode_prompt(
            ["p one"], None, None, do_classifier_free_guidance=False, max_sequence_length=MSL
        )
    calls = {"n": 0, "rows": 0}
    enc = pol.pipeline.text_encoder
    orig = enc.forward

    def counting(input_ids=None, *a, **k):
        calls["n"] += 1
        calls["rows"] += input_ids.shape[0]
        return orig(input_ids, *a, **k)

    monkeypatch.setattr(enc, "forward", counting)
    first = pol.encode_prompts(["p one", "p two"])
    assert calls == {"n": 3, "rows": 3}  # one call per prompt: the two prompts and the negative ""
    again = pol.encode_prompts(["p two", "p one", "p one"])
    assert calls["n"] == 3 and pol.num_encoded == 3
    assert torch.equal(again.prompt_embeds[0], first.prompt_embeds[1])
    assert torch.equal(again.prompt_embeds[1], first.prompt_embeds[0])
    assert torch.equal(again.pooled[2], first.pooled[0])
    assert torch.equal(again.negative_prompt_embeds, first.negative_prompt_embeds[[0, 0, 0]])
    # cached rows equal a fresh, uncached encoding by the pipeline itself
    torch.testing.assert_close(first.prompt_embeds[:1], pe, rtol=0, atol=1e-6)
    torch.testing.assert_close(first.pooled[:1], pooled, rtol=0, atol=1e-6)
    # LRU with 3 entries ("p one", "p two", ""): a new prompt evicts the least recently used ("p two")
    pol.encode_prompts(["p three"])
    assert calls["n"] == 4
    pol.encode_prompts(["p one"])
    assert calls["n"] == 4
    pol.encode_prompts(["p two"])
    assert calls["n"] == 5


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_prompt_embedding_does_not_depend_on_its_batch(kind):
    """A prompt's cached embedding is a function of the prompt alone: encoded beside other prompts or
    alone, in this process, it is bit-identical (a batched GEMM may round differently on some CPUs,
    which made resumed runs and reloaded policies differ in the last bits)."""
    together, alone = _policy(kind), _policy(kind)
    with torch.no_grad():
        a = together.encode_prompts(["a red cube left of a blue ball", "two green dogs", "", "x y z"])
        b = alone.encode_prompts(["x y z"])
    for k, t in b.tensors().items():
        assert torch.equal(a.tensors()[k][3:], t), k


def test_nfe_counts_one_per_velocity_call(sd3):
    sd3.nfe = 0
    e = sd3.encode_prompts(PROMPTS[:1])
    x = sd3.initial_noise(1, 32, 32)
    with torch.no_grad():
        sd3.velocity(x, 0.5, e, 4.5)
        sd3.velocity(x, 0.5, e, 1.0)
    assert sd3.nfe == 2
    sd3.nfe = 0
    assert sd3.nfe == 0


def test_prompt_embeds_select_to_and_storage(sd3, flux):
    e = sd3.encode_prompts(PROMPTS)
    idx = torch.arange(2).repeat_interleave(3)
    g = e.select(idx)
    assert len(g) == 6
    for k, t in g.tensors().items():
        assert torch.equal(t[4], e.tensors()[k][1]), k
    m = e.select(torch.tensor([False, True]))
    assert torch.equal(m.pooled, e.pooled[1:])
    assert torch.equal(e.select([1, 0]).prompt_embeds, e.prompt_embeds.flip(0))
    with pytest.raises(ValueError, match="out of range"):
        e.select(torch.tensor([2]))
    half = e.to(dtype=torch.float16)
    assert half.prompt_embeds.dtype == torch.float16 and half.negative_pooled.dtype == torch.float16
    back = PromptEmbeds.from_tensors(e.tensors())
    assert back.tensors().keys() == e.tensors().keys()
    assert all(torch.equal(back.tensors()[k], t) for k, t in e.tensors().items())
    with pytest.raises(ValueError, match="pooled_embeds"):
        PromptEmbeds.from_tensors({**e.tensors(), "pooled_embeds": e.pooled})
    both = PromptEmbeds.cat([e, e.select([1])])
    assert len(both) == 3 and torch.equal(both.prompt_embeds[2], e.prompt_embeds[1])
    fe = flux.encode_prompts(PROMPTS).select(torch.tensor([1, 1]))
    assert fe.text_ids.shape[0] == 2 and fe.negative_prompt_embeds is None
    with pytest.raises(ValueError, match="batch"):
        PromptEmbeds(prompt_embeds=e.prompt_embeds, pooled=e.pooled[:1])


def test_prompt_embeds_of_different_lengths_are_padded_with_their_masks():
    """Families whose prompts keep their own lengths (Qwen-Image, Wan): rows are padded with zeros to the
    longest, the mask's zeros marking the padding; no pooled embedding is needed. Without a mask, rows
    of different lengths are an error."""
    from flowrl.flow.policy import pad_rows

    a, b = torch.randn(2, 4), torch.randn(5, 4)
    rows = [{"prompt_embeds": a, "prompt_mask": torch.ones(2, dtype=torch.long)},
            {"prompt_embeds": b, "prompt_mask": torch.ones(5, dtype=torch.long)}]
    e = PromptEmbeds(**pad_rows(rows))
    assert e.pooled is None and e.prompt_embeds.shape == (2, 5, 4)
    assert torch.equal(e.prompt_embeds[0, :2], a) and not e.prompt_embeds[0, 2:].any()
    assert e.prompt_mask.tolist() == [[1, 1, 0, 0, 0], [1] * 5]
    one = PromptEmbeds(**pad_rows(rows[:1]))
    both = PromptEmbeds.cat([one, e.select([1])])
    assert torch.equal(both.prompt_embeds, e.prompt_embeds) and torch.equal(both.prompt_mask, e.prompt_mask)
    with pytest.raises(ValueError, match="no mask to pad"):
        pad_rows([{"prompt_embeds": a}, {"prompt_embeds": b}])
    with pytest.raises(ValueError, match="prompt_mask must be"):
        PromptEmbeds(prompt_embeds=e.prompt_embeds, prompt_mask=e.prompt_mask[:, :3])


def test_bad_inputs_raise_clear_errors(sd3, flux):
    e = sd3.encode_prompts(PROMPTS)
    x = sd3.initial_noise(2, 32, 32)
    with pytest.raises(ValueError, match="height"):
        sd3.latent_shape(30, 32)
    with pytest.raises(ValueError, match="sigma"):
        sd3.velocity(x, torch.ones(3), e, 1.0)
    with pytest.raises(ValueError, match="sigma"):
        sd3.velocity(x, 1.5, e, 1.0)
    with pytest.raises(ValueError, match="rows"):
        sd3.velocity(x, 0.5, e.select([0]), 1.0)
    no_neg = PromptEmbeds(prompt_embeds=e.prompt_embeds, pooled=e.pooled)
    with pytest.raises(ValueError, match="negative"):
        sd3.velocity(x, 0.5, no_neg, 4.5)
    with pytest.raises(ValueError, match="prompts"):
        sd3.encode_prompts("a single string")
    with pytest.raises(ValueError, match="x must"):
        flux.velocity(x, 0.5, e, 1.0)
    with pytest.raises(ValueError, match="num_steps"):
        sd3.sigmas(0, 32, 32)
    # a non-square flux grid is found from latent_shape; explicit sizes must agree with x
    fe = flux.encode_prompts(PROMPTS)
    fx = flux.initial_noise(2, 32, 48)
    assert fx.shape[1] == (32 // 4) * (48 // 4)
    with pytest.raises(ValueError, match="tokens"):
        flux.velocity(fx, 0.5, fe, 3.5, height=32, width=32)
    with pytest.raises(TypeError, match="abstract"):
        FlowPolicy(sd3.pipeline)
    assert math.isclose(float(sd3.sigmas(3, 32, 32)[0]), 1.0) and float(sd3.sigmas(3, 32, 32)[-1]) == 0.0
