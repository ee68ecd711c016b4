"""A LoRA that flowrl trains loads, unchanged, where users load LoRAs.

Images: a LoRA with rank != alpha (r=4, alpha=16, so peft's scale alpha/r = 4) and non-zero B weights
is added to a tiny SD3 / FLUX.1 transformer, saved with :func:`flowrl.train.lora.save_diffusers_lora`,
and loaded into a FRESH diffusers pipeline (``from_pretrained`` of the base folder, then
``pipe.load_lora_weights(dir)``). The diffusers transformer, called the way the diffusers pipeline
calls it (its own ``encode_prompt``), must predict the same velocity as flowrl's adapted policy on the
same input. Negative control: the same weights saved WITHOUT the adapter metadata load with
diffusers' assumption alpha = rank (scale 1 instead of 4) and predict a different velocity -- the
silent rescaling the metadata prevents, and proof that the comparison can fail.

Text: a peft LoRA on the tiny causal LM, saved with ``save_pretrained``, loads with
``PeftModel.from_pretrained`` on a fresh base model and gives identical logits; with the saved
alpha changed to the rank the logits differ.
"""
from __future__ import annotations

import json

import pytest
import torch

from flowrl.train.lora import add_lora_to_transformer, lora_config, lora_targets_present, save_diffusers_lora

RANK, ALPHA = 4, 16
MSL = 8  # T5 / text sequence length (the pipelines' 256 / 512 default is only slower)
PROMPTS = ["a red circle above a blue square", "two green triangles"]


def _randomize_lora_b(module: torch.nn.Module, seed: int = 0) -> int:
    """Give every lora_B weight (zero after peft's init) random values; returns how many."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
                n += 1
    return n


def _add_lora(transformer: torch.nn.Module, family: str) -> None:
    lc = lora_config(family, rank=RANK, alpha=ALPHA)
    lc.target_modules = set(lora_targets_present(transformer, sorted(lc.target_modules)))
    assert lc.target_modules, "no LoRA target matches the tiny transformer"
    add_lora_to_transformer(transformer, lc)
    assert _randomize_lora_b(transformer) > 0


def _scalings(transformer: torch.nn.Module) -> set:
    """The distinct LoRA scales (alpha / r) of the transformer's LoRA layers."""
    out = set()
    for m in transformer.modules():
        s = getattr(m, "scaling", None)
        if isinstance(s, dict) and s:
            out.update(float(v) for v in s.values())
    return out


class _off:
    """Adapters disabled inside the block (diffusers' PEFT integration)."""

    def __init__(self, module):
        self.module = module

    def __enter__(self):
        self.module.disable_adapters()

    def __exit__(self, *exc):
        self.module.enable_adapters()


def _save_without_metadata(pipeline_cls, transformer, out_dir) -> None:
    """What a LoRA saver that forgets the adapter config writes: the weights only."""
    from peft.utils import get_peft_model_state_dict

    out_dir.mkdir(parents=True, exist_ok=True)
    pipeline_cls.save_lora_weights(out_dir, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                   safe_serialization=True)


# --------------------------------------------------------------------------------------------------
# SD3
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    from flowrl.demo.tiny_image import save_tiny

    return save_tiny("sd3", tmp_path_factory.mktemp("sd3_base"), seed=3)


def _load_sd3(path):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)


def _diffusers_sd3_velocity(pipe, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """v = transformer(x, t = sigma * 1000, conditioning) as StableDiffusion3Pipeline.__call__ does (no CFG)."""
    pe, _, pooled, _ = pipe.encode_prompt(prompt=PROMPTS, prompt_2=None, prompt_3=None, device="cpu",
                                          do_classifier_free_guidance=False, max_sequence_length=MSL)
    t = torch.full((x.shape[0],), sigma * pipe.scheduler.config.num_train_timesteps)
    with torch.no_grad():
        return pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=pe, pooled_projections=pooled,
                                return_dict=False)[0]


def test_sd3_lora_loads_into_a_fresh_pipeline_with_the_same_velocity(sd3_dir, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from flowrl.flow.models.sd3 import SD3Policy

    policy = SD3Policy.from_pipeline(_load_sd3(sd3_dir), max_sequence_length=MSL)
    _add_lora(policy.transformer, "sd3")
    assert _scalings(policy.transformer) == {ALPHA / RANK}
    x = torch.randn(len(PROMPTS), *policy.latent_shape(32, 32), generator=torch.Generator().manual_seed(1))
    sigma = 0.7
    with torch.no_grad():
        v_flowrl = policy.velocity(x, sigma, policy.encode_prompts(PROMPTS), guidance_scale=1.0)
        with _off(policy.transformer):
            v_base = policy.velocity(x, sigma, policy.encode_prompts(PROMPTS), guidance_scale=1.0)
    assert (v_flowrl - v_base).abs().max() > 1e-2, "the LoRA does not change the velocity: the test would be vacuous"

    save_diffusers_lora(StableDiffusion3Pipeline, policy.transformer, tmp_path / "lora")
    fresh = _load_sd3(sd3_dir)
    fresh.load_lora_weights(str(tmp_path / "lora"))
    assert _scalings(fresh.transformer) == {ALPHA / RANK}
    v_diffusers = _diffusers_sd3_velocity(fresh, x, sigma)
    torch.testing.assert_close(v_diffusers, v_flowrl, rtol=1e-5, atol=1e-5)

    # negative control: no metadata -> diffusers assumes alpha = rank -> scale 1, another velocity
    _save_without_metadata(StableDiffusion3Pipeline, policy.transformer, tmp_path / "lora_nometa")
    wrong = _load_sd3(sd3_dir)
    wrong.load_lora_weights(str(tmp_path / "lora_nometa"))
    assert _scalings(wrong.transformer) == {1.0}
    v_wrong = _diffusers_sd3_velocity(wrong, x, sigma)
    assert (v_wrong - v_flowrl).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------
# FLUX.1
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    from flowrl.demo.tiny_image import save_tiny

    return save_tiny("flux", tmp_path_factory.mktemp("flux_base"), seed=4)


def _load_flux(path):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(path)


def _diffusers_flux_velocity(pipe, x: torch.Tensor, sigma: float, guidance: float, height: int, width: int):
    """v as FluxPipeline.__call__ computes it: packed latents, timestep = sigma (t / 1000), guidance embed."""
    pe, pooled, text_ids = pipe.encode_prompt(prompt=PROMPTS, prompt_2=None, device="cpu", max_sequence_length=MSL)
    gh = height // (pipe.vae_scale_factor * 2)
    gw = width // (pipe.vae_scale_factor * 2)
    img_ids = pipe._prepare_latent_image_ids(x.shape[0], gh, gw, "cpu", x.dtype)
    b = x.shape[0]
    with torch.no_grad():
        return pipe.transformer(hidden_states=x, timestep=torch.full((b,), sigma), guidance=torch.full((b,), guidance),
                                pooled_projections=pooled, encoder_hidden_states=pe, txt_ids=text_ids, img_ids=img_ids,
                                return_dict=False)[0]


def test_flux_lora_loads_into_a_fresh_pipeline_with_the_same_velocity(flux_dir, tmp_path):
    from diffusers import FluxPipeline

    from flowrl.flow.models.flux import FluxPolicy

    policy = FluxPolicy.from_pipeline(_load_flux(flux_dir), max_sequence_length=MSL)
    _add_lora(policy.transformer, "flux")
    assert _scalings(policy.transformer) == {ALPHA / RANK}
    h = w = 32
    x = torch.randn(len(PROMPTS), *policy.latent_shape(h, w), generator=torch.Generator().manual_seed(2))
    sigma, g = 0.6, 3.5
    with torch.no_grad():
        v_flowrl = policy.velocity(x, sigma, policy.encode_prompts(PROMPTS), g, height=h, width=w)
        with _off(policy.transformer):
            v_base = policy.velocity(x, sigma, policy.encode_prompts(PROMPTS), g, height=h, width=w)
    assert (v_flowrl - v_base).abs().max() > 1e-2, "the LoRA does not change the velocity: the test would be vacuous"

    save_diffusers_lora(FluxPipeline, policy.transformer, tmp_path / "lora")
    fresh = _load_flux(flux_dir)
    fresh.load_lora_weights(str(tmp_path / "lora"))
    assert _scalings(fresh.transformer) == {ALPHA / RANK}
    v_diffusers = _diffusers_flux_velocity(fresh, x, sigma, g, h, w)
    torch.testing.assert_close(v_diffusers, v_flowrl, rtol=1e-5, atol=1e-5)

    _save_without_metadata(FluxPipeline, policy.transformer, tmp_path / "lora_nometa")
    wrong = _load_flux(flux_dir)
    wrong.load_lora_weights(str(tmp_path / "lora_nometa"))
    assert _scalings(wrong.transformer) == {1.0}
    assert (_diffusers_flux_velocity(wrong, x, sigma, g, h, w) - v_flowrl).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------
# causal LM (transformers + peft)
# --------------------------------------------------------------------------------------------------


def test_lm_lora_loads_with_peft_and_gives_identical_logits(tmp_path):
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flowrl.demo.tiny_text import save_tiny_lm

    base_dir = save_tiny_lm(tmp_path / "base", seed=5)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), lora_config("lm", rank=RANK, alpha=ALPHA))
    assert _randomize_lora_b(model) > 0
    model.eval()
    tok = AutoTokenizer.from_pretrained(base_dir)
    enc = tok(["12+34=", "7+8="], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**enc).logits
        with model.disable_adapter():
            base_logits = model(**enc).logits
    assert (logits - base_logits).abs().max() > 1e-3, "the LoRA does not change the logits: the test would be vacuous"
    model.save_pretrained(tmp_path / "lora")

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "lora").eval()
    assert loaded.peft_config["default"].r == RANK and loaded.peft_config["default"].lora_alpha == ALPHA
    with torch.no_grad():
        # float32: the reloaded base weights come from safetensors (not all 64-byte aligned), and a CPU GEMM may
        # round differently on them (~1e-7 relative per op); 1e-5 allows that through the layers, while a wrong
        # LoRA scale (the negative control below) moves these logits of magnitude ~1 by more than 1e-1
        torch.testing.assert_close(loaded(**enc).logits, logits, rtol=1e-5, atol=1e-5)

    # negative control: the same weights with alpha = rank in the saved config
    cfg_path = tmp_path / "lora" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["lora_alpha"] = RANK
    cfg_path.write_text(json.dumps(cfg))
    wrong = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "lora").eval()
    with torch.no_grad():
        assert (wrong(**enc).logits - logits).abs().max() > 1e-4
