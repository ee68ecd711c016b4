"""Real-size flow models on one GPU: rollout images/s against the diffusers pipeline, training throughput and
MFU, memory per trained sample, the largest micro-batch that fits an 80 GB GPU, and the measured effect of
each speed or memory option, side by side.

GPU (random bf16 weights at the published sizes, nothing downloaded):
    python bench/scale.py --model flux1dev --device cuda --out scale_flux1dev.json
    bash bench/gpu_check.sh            # every model, each part bounded, about 8 minutes on one H100
CPU (``--scale tiny``, the default off CUDA: the tiny builder of the same family, the same code path):
    OMP_NUM_THREADS=1 python bench/scale.py --model sd35m

What is measured (each a median of ``--repeats`` after a warm-up; CUDA timings synchronise first):

* rollout: ``flowrl.flow.sampler.sample`` with an all-ODE plan against the pipeline's ``__call__`` at the same
  NFE, rows (prompts x group), resolution and guidance, both from the same cached prompt embeddings and both
  decoding with the VAE; images/s and their ratio (target >= 0.97).
* training: ``FlowLearner.minibatch_gradient`` on a rollout whose first ``--train-steps`` steps are trained
  (LoRA of the recipe's rank, fp32 LoRA weights beside a bf16 base, bf16 autocast): trained transitions/s and
  samples/s; the FLOPs of one transformer forward+backward counted by ``torch.utils.flop_counter`` give the
  MFU against the device's dense bf16 peak (:data:`PEAK_BF16`; unknown device: not reported), both for a
  bare forward+backward and for the learner.
* memory (CUDA only): peak ``max_memory_allocated`` of a training forward+backward at two micro-batch sizes;
  the growth per row and the largest micro-batch under 80 GiB are extrapolated linearly from the two points
  (said so in the table), with and without gradient checkpointing, text encoders offloaded.
* options, each measured off and on: the precision (bf16 base + fp32 LoRA + bf16 autocast vs the fp32 base the
  fp32 recipes load), SDPA's fused kernels vs its math kernel, CFG as one batched call (qwen_image, wan),
  VAE decode in chunks of one row, text encoders offloaded after encoding, ``torch.compile`` of the
  transformer (``--compile``), and host synchronisations per sampling step (CUDA: ``set_sync_debug_mode``).

The published configurations (transformer, VAE, text encoders) are in :data:`SPECS`, each naming its source;
tokenizers are flowrl.demo's offline ones (prompt lengths differ from the released tokenizers; the padded
lengths the transformers see are the pipelines' own).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
GIB = 2.0**30
TARGET_MEMORY = 80 * GIB  # "one 80 GB GPU" (H100 / A100 80GB)

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, by a substring of torch.cuda.get_device_name(); first match
# wins. NVIDIA data sheets: H100 SXM 989.4 TF, H100 PCIe 756 TF, H100 NVL 835 TF, H200 989 TF (as H100 SXM),
# A100 312 TF, L40S 362 TF, B200 2.25 PF.
PEAK_BF16 = (("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12),
             ("L40S", 362e12), ("B200", 2250e12))


def peak_bf16(device_name: str) -> Optional[float]:
    """The dense bf16 peak of a device by its name (:data:`PEAK_BF16`), None when unknown."""
    for key, flops in PEAK_BF16:
        if key.lower() in device_name.lower():
            return flops
    return None


# --------------------------------------------------------------------------------------------------
# The published configurations
# --------------------------------------------------------------------------------------------------

_AUTOENCODER_KL = dict(  # SD3.5 / FLUX.1 vae/config.json (16-channel AutoencoderKL, no quant convs)
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=16, norm_num_groups=32,
    sample_size=1024, force_upcast=True, use_quant_conv=False, use_post_quant_conv=False,
)
# text encoders: (transformers model class, config class, config); token ids are the tokenizer's (filled in later)
_CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
_CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
               max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")
_T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
               relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
               is_encoder_decoder=False, use_cache=False)
_UMT5_XXL = dict(_T5_XXL, vocab_size=256384)
_QWEN25_VL_7B = dict(
    text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                     use_cache=False),
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31]),
)


@dataclass(frozen=True)
class Spec:
    """One model at its published size, and the run the GPU check measures it at."""

    family: str  # flowrl.flow.models family
    title: str
    pipeline: str  # diffusers pipeline class
    transformer: tuple[str, dict]  # diffusers class, config
    vae: tuple[str, dict]
    text_encoders: tuple[tuple[str, str, str, str, dict], ...]  # (attribute, tokenizer, model class, config class, config)
    scheduler: tuple[str, dict]
    recipe: str  # configs/<recipe>.yaml: group size, resolution, steps, guidance, LoRA rank
    source: str
    max_sequence_length: int
    run: dict = field(default_factory=dict)  # GPU run: height, width, steps, prompts, group, frames (bounded time)


SPECS: dict[str, Spec] = {
    # stabilityai/stable-diffusion-3.5-medium: transformer/config.json as transcribed in public code (24 layers,
    # 24 heads x 64, caption projection 1536, pos_embed_max_size 384, dual attention in blocks 0-12, QK RMS-norm);
    # diffusers scripts/convert_sd3_to_diffusers.py (commit 58eb52c) derives the same from the checkpoint and
    # gives the VAE's factors 1.5305 / 0.0609; text encoders CLIP-L, OpenCLIP bigG, T5-v1.1-XXL.
    "sd35m": Spec(
        family="sd3", title="SD3.5-medium (2.5B MMDiT-X)", pipeline="StableDiffusion3Pipeline",
        transformer=("SD3Transformer2DModel", dict(
            sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
            joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
            pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")),
        vae=("AutoencoderKL", dict(_AUTOENCODER_KL, scaling_factor=1.5305, shift_factor=0.0609)),
        text_encoders=(("text_encoder", "clip", "CLIPTextModelWithProjection", "CLIPTextConfig", _CLIP_L),
                       ("text_encoder_2", "clip", "CLIPTextModelWithProjection", "CLIPTextConfig", _CLIP_G),
                       ("text_encoder_3", "t5", "T5EncoderModel", "T5Config", _T5_XXL)),
        scheduler=("FlowMatchEulerDiscreteScheduler", dict(num_train_timesteps=1000, shift=3.0)),
        recipe="flow_grpo_sd35m_pickscore", source="stabilityai/stable-diffusion-3.5-medium", max_sequence_length=256,
        run=dict(height=512, width=512, steps=10, prompts=2, group=4),
    ),
    # black-forest-labs/FLUX.1-dev: diffusers scripts/convert_flux_to_diffusers.py (commit 58eb52c): 19 double and
    # 38 single blocks, 24 heads x 128, guidance embedding for dev, VAE factors 0.3611 / 0.1159; the rest are
    # FluxTransformer2DModel's defaults (joint dim 4096, pooled 768, RoPE axes 16/56/56); CLIP-L + T5-v1.1-XXL.
    "flux1dev": Spec(
        family="flux", title="FLUX.1-dev (12B MMDiT)", pipeline="FluxPipeline",
        transformer=("FluxTransformer2DModel", dict(
            patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56))),
        vae=("AutoencoderKL", dict(_AUTOENCODER_KL, scaling_factor=0.3611, shift_factor=0.1159)),
        text_encoders=(("text_encoder", "clip", "CLIPTextModel", "CLIPTextConfig", _CLIP_L),
                       ("text_encoder_2", "t5", "T5EncoderModel", "T5Config", _T5_XXL)),
        scheduler=("FlowMatchEulerDiscreteScheduler", dict(
            num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096)),
        recipe="awm_flux1", source="black-forest-labs/FLUX.1-dev", max_sequence_length=512,
        run=dict(height=512, width=512, steps=8, prompts=2, group=2),
    ),
    # Qwen/Qwen-Image: transformer/config.json (60 layers, 24 heads x 128, joint dim 3584, RoPE 16/56/56), the
    # 3-D VAE (base 96, z 16, dim_mult 1/2/4/4; diffusers' AutoencoderKLQwenImage defaults are that config),
    # text encoder Qwen2.5-VL-7B-Instruct (28 layers, 3584 wide, 4 KV heads, mrope 16/24/24; vision tower 32 blocks).
    "qwen_image": Spec(
        family="qwen_image", title="Qwen-Image (20B MMDiT)", pipeline="QwenImagePipeline",
        transformer=("QwenImageTransformer2DModel", dict(
            patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128, num_attention_heads=24,
            joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56))),
        vae=("AutoencoderKLQwenImage", dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                            attn_scales=[], temperal_downsample=[False, True, True])),
        text_encoders=(("text_encoder", "qwen", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig",
                        _QWEN25_VL_7B),),
        scheduler=("FlowMatchEulerDiscreteScheduler", {}),  # flowrl.demo.tiny_qwen_image.QWEN_IMAGE_SCHEDULER
        recipe="flow_grpo_qwen_image", source="Qwen/Qwen-Image", max_sequence_length=512,
        run=dict(height=512, width=512, steps=8, prompts=2, group=2),
    ),
    # Wan-AI/Wan2.1-T2V-14B-Diffusers: diffusers scripts/convert_wan_to_diffusers.py (commit 58eb52c),
    # get_transformer_config("Wan-T2V-14B"): 40 layers, 40 heads x 128, FFN 13824, text dim 4096; its VAE is
    # AutoencoderKLWan() (defaults) and its text encoder google/umt5-xxl. The recipe's scheduler is replaced by an
    # Euler flow scheduler (shift 3, the released flow_shift), as flowrl's Wan training samples with Euler.
    "wan": Spec(
        family="wan", title="Wan2.1-T2V-14B", pipeline="WanPipeline",
        transformer=("WanTransformer3DModel", dict(
            patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
            text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6)),
        vae=("AutoencoderKLWan", {}),
        text_encoders=(("text_encoder", "t5", "UMT5EncoderModel", "UMT5Config", _UMT5_XXL),),
        scheduler=("FlowMatchEulerDiscreteScheduler", dict(num_train_timesteps=1000, shift=3.0)),
        recipe="flow_grpo_wan21", source="Wan-AI/Wan2.1-T2V-14B-Diffusers", max_sequence_length=512,
        run=dict(height=256, width=256, steps=10, prompts=2, group=2, frames=5),
    ),
}

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers: the same script, get_transformer_config("Wan-T2V-1.3B"): 30 layers, 12 heads x 128,
# FFN 8960; the rest as the 14B. Measured at the 14B recipe's video size.
SPECS["wan_1.3b"] = replace(
    SPECS["wan"], title="Wan2.1-T2V-1.3B", source="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    transformer=("WanTransformer3DModel", dict(SPECS["wan"].transformer[1], num_attention_heads=12, ffn_dim=8960,
                                               num_layers=30)))

TINY_RUN = dict(height=32, width=32, steps=4, prompts=2, group=2, frames=5)  # --scale tiny (CPU, seconds)
PROMPTS = ["a red cube left of a blue ball", "two green dogs on a yellow sofa", "a photo of a cat",
           "a watercolor of a lighthouse at dusk"]


# --------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def materialised_on(device: torch.device, dtype: torch.dtype):
    """Modules built inside are created directly on ``device`` in ``dtype`` (torch's default-device context and
    default dtype): random init runs there, and no fp32 CPU copy of a 12B model ever exists."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(prev)


def _tokenizer(kind: str, max_sequence_length: int):
    from flowrl.demo.tiny_image import tiny_clip_tokenizer, tiny_t5_tokenizer
    from flowrl.demo.tiny_qwen_image import tiny_qwen2_tokenizer

    if kind == "clip":
        return tiny_clip_tokenizer(77)
    if kind == "t5":
        return tiny_t5_tokenizer(max_sequence_length)
    if kind == "qwen":
        return tiny_qwen2_tokenizer()
    raise ValueError(f"tokenizer: unknown kind {kind!r}")


def _text_config(config_cls: str, config: dict, tok):
    """The published text-encoder config with the offline tokenizer's special-token ids."""
    import transformers

    cfg = dict(config)
    if config_cls == "CLIPTextConfig":
        cfg.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    elif config_cls in ("T5Config", "UMT5Config"):
        cfg.update(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id)
    elif config_cls == "Qwen2_5_VLConfig":
        from flowrl.demo.tiny_qwen_image import QWEN_SPECIAL_TOKENS

        ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
        cfg["text_config"] = dict(cfg["text_config"], bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                                  pad_token_id=ids["<|endoftext|>"])
        cfg.update(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                   vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    return getattr(transformers, config_cls)(**cfg)


def build_real_pipeline(spec: Spec, device: torch.device, dtype: torch.dtype):
    """The pipeline of ``spec`` at its published size with random weights, built on ``device`` in ``dtype``."""
    import diffusers
    import transformers

    components: dict[str, Any] = {}
    with materialised_on(device, dtype):
        components["transformer"] = getattr(diffusers, spec.transformer[0])(**spec.transformer[1]).eval()
        components["vae"] = getattr(diffusers, spec.vae[0])(**spec.vae[1]).eval()
        for attr, tok_kind, model_cls, config_cls, config in spec.text_encoders:
            tok = _tokenizer(tok_kind, spec.max_sequence_length)
            components[attr.replace("text_encoder", "tokenizer")] = tok
            components[attr] = getattr(transformers, model_cls)(_text_config(config_cls, config, tok)).eval()
    sched_cfg = spec.scheduler[1]
    if spec.family == "qwen_image":
        from flowrl.demo.tiny_qwen_image import QWEN_IMAGE_SCHEDULER

        sched_cfg = QWEN_IMAGE_SCHEDULER
    components["scheduler"] = getattr(diffusers, spec.scheduler[0])(**sched_cfg)
    pipe = getattr(diffusers, spec.pipeline)(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_pipeline(spec: Spec):
    """flowrl.demo's tiny builder of the same family (seed 0)."""
    import importlib

    from flowrl.demo import TINY_BUILDERS

    module, name = TINY_BUILDERS[spec.family].split(":")
    return getattr(importlib.import_module(module), name)(seed=0)


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls after one warm-up."""
    fn()
    out = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def interleaved(fa: Callable[[], Any], fb: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, float]:
    """Median seconds of two functions timed in alternating order (A B, B A, ...) after a warm-up of each."""
    fa()
    fb()
    ta, tb = [], []
    for r in range(repeats):
        for which in ((0, 1) if r % 2 == 0 else (1, 0)):
            _sync(device)
            t0 = time.perf_counter()
            (fa if which == 0 else fb)()
            _sync(device)
            (ta if which == 0 else tb).append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def peak_memory(fn: Callable[[], Any], device: torch.device) -> Optional[tuple[int, int]]:
    """(allocated before, peak allocated during) ``fn`` on a CUDA device, in bytes; None elsewhere."""
    if device.type != "cuda":
        fn()
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return before, torch.cuda.max_memory_allocated(device)


def linear_fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """``(slope, intercept)`` of the line through two ``(rows, bytes)`` points (least squares for more)."""
    if len(points) < 2 or len({r for r, _ in points}) < 2:
        raise ValueError(f"points: need two different row counts, got {points}")
    n = len(points)
    mx = sum(r for r, _ in points) / n
    my = sum(b for _, b in points) / n
    slope = sum((r - mx) * (b - my) for r, b in points) / sum((r - mx) ** 2 for r, _ in points)
    return slope, my - slope * mx


def rows_that_fit(points: list[tuple[int, float]], budget: float = TARGET_MEMORY) -> Optional[int]:
    """The largest row count whose linearly extrapolated peak stays within ``budget`` (None: the growth is not
    positive, nothing to extrapolate; 0: not even one row)."""
    slope, intercept = linear_fit(points)
    if slope <= 0:
        return None
    return max(0, int(math.floor((budget - intercept) / slope)))


# --------------------------------------------------------------------------------------------------
# The measured pieces
# --------------------------------------------------------------------------------------------------


@dataclass
class Bench:
    """The policy under test and the run's sizes."""

    name: str
    spec: Spec
    policy: Any
    device: torch.device
    height: int
    width: int
    steps: int
    prompts: list[str]
    group: int
    guidance: float
    repeats: int
    recipe: Any  # the RunConfig of the recipe

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.group

    def generator(self, seed: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(seed)


def pipeline_call(b: Bench, seed: int = 0):
    """The diffusers pipeline's own call on ``b``'s rows (each prompt's embedding repeated ``group`` times, what
    flowrl samples) from the cached prompt embeddings, returning tensors (``output_type="pt"``)."""
    pol, fam = b.policy, b.spec.family
    e = pol.encode_prompts(b.prompts, negative_prompt="").select(torch.arange(len(b.prompts)).repeat_interleave(b.group))
    kw: dict[str, Any] = dict(num_inference_steps=b.steps, height=b.height, width=b.width, output_type="pt",
                              generator=b.generator(seed), prompt_embeds=e.prompt_embeds)
    if fam == "sd3":
        kw.update(pooled_prompt_embeds=e.pooled, negative_prompt_embeds=e.negative_prompt_embeds,
                  negative_pooled_prompt_embeds=e.negative_pooled, guidance_scale=b.guidance,
                  num_images_per_prompt=1, max_sequence_length=pol.max_sequence_length)
    elif fam == "flux":
        kw.update(pooled_prompt_embeds=e.pooled, guidance_scale=b.guidance, num_images_per_prompt=1,
                  max_sequence_length=pol.max_sequence_length)
    elif fam == "qwen_image":
        kw.update(prompt_embeds_mask=e.prompt_mask, negative_prompt_embeds=e.negative_prompt_embeds,
                  negative_prompt_embeds_mask=e.negative_prompt_mask, true_cfg_scale=b.guidance,
                  num_images_per_prompt=1, max_sequence_length=pol.max_sequence_length)
    elif fam == "wan":
        kw.update(negative_prompt_embeds=e.negative_prompt_embeds, guidance_scale=b.guidance,
                  num_videos_per_prompt=1, num_frames=pol.num_frames, max_sequence_length=pol.max_sequence_length)
    else:
        raise ValueError(f"family: no pipeline call for {fam!r}")
    with torch.no_grad():
        out = pol.pipeline(**kw)
    return out.frames if fam == "wan" else out.images


def flowrl_rollout(b: Bench, plan=None, seed: int = 0, decode: bool = True, **kw):
    from flowrl.flow.plan import eval_plan
    from flowrl.flow.sampler import sample

    return sample(b.policy, b.prompts, plan or eval_plan(b.steps), group_size=b.group, height=b.height, width=b.width,
                  guidance_scale=b.guidance, generator=b.generator(seed), decode=decode, progress=False, **kw)


def measure_rollout(b: Bench) -> dict:
    """Images/s of flowrl's sampler and of the pipeline at equal NFE, rows, size and guidance."""
    t_pipe, t_ours = interleaved(lambda: pipeline_call(b), lambda: flowrl_rollout(b), b.device, b.repeats)
    return {"rows": b.rows, "steps": b.steps, "pipeline_s": t_pipe, "flowrl_s": t_ours,
            "pipeline_images_per_s": b.rows / t_pipe, "flowrl_images_per_s": b.rows / t_ours,
            "ratio": t_pipe / t_ours}


def host_syncs_per_step(b: Bench) -> Optional[float]:
    """CUDA synchronisations per sampling step of a rollout (``torch.cuda.set_sync_debug_mode("warn")`` counts
    them, diffusers' transformer included), from rollouts of ``steps`` and ``2 steps``; None off CUDA."""
    if b.device.type != "cuda":
        return None
    from flowrl.flow.plan import eval_plan

    def count(steps: int) -> int:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                flowrl_rollout(b, plan=eval_plan(steps), decode=False)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message).lower() for w in caught)

    flowrl_rollout(b, plan=eval_plan(2), decode=False)  # warm-up
    n1, n2 = count(b.steps), count(2 * b.steps)
    return (n2 - n1) / b.steps


def add_lora(b: Bench) -> int:
    """The recipe's LoRA on the transformer, its weights in fp32 beside the base; returns the trained parameter count."""
    from flowrl.train.lora import add_lora_to_transformer, lora_config

    lo = b.recipe.lora
    t = b.policy.transformer
    cfg = lora_config(b.spec.family, lo.rank if lo.enabled else None, lo.alpha if lo.enabled else None,
                      lo.targets if lo.enabled else None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        add_lora_to_transformer(t, cfg)
    for p in t.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return sum(p.numel() for p in t.parameters() if p.requires_grad)


def _autocast(b: Bench, enabled: bool = True):
    return torch.autocast(b.device.type, dtype=torch.bfloat16, enabled=enabled)


def training_rollout(b: Bench, rows_per_prompt: int, train_steps: int):
    """A rollout of ``len(prompts) * rows_per_prompt`` rows whose first ``train_steps`` steps are trained."""
    from flowrl.flow.plan import PlanConfig, build_plan

    plan = build_plan(PlanConfig(kind="full", train_last_step=True), b.steps, 0)
    ro = flowrl_rollout(replace(b, group=rows_per_prompt), plan=plan, decode=False)
    mask = torch.zeros_like(ro.trained)
    mask[:, :train_steps] = True
    return replace(ro, trained=mask)


def fwd_bwd(b: Bench, ro, rows: int):
    """One velocity forward with grad on ``rows`` rows of ``ro``'s first state, and its backward."""
    from flowrl.flow.policy import PromptEmbeds

    emb = PromptEmbeds.from_tensors(ro.embeds).select(ro.prompt_index[:rows])
    x, sig = ro.latents[:rows, 0].float(), ro.sigmas[:rows, 0]

    def run():
        with _autocast(b):
            v = b.policy.velocity(x, sig, emb, ro.guidance_scale)
        v.float().square().mean().backward()
    return run


def count_flops(run: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        run()
    return int(counter.get_total_flops())


def measure_training(b: Bench, train_steps: int, peak: Optional[float]) -> dict:
    """Learner throughput and MFU (bf16 base, fp32 LoRA, bf16 autocast) on ``b.rows`` rows, ``train_steps`` each."""
    from flowrl.core.losses import LossConfig, loss_normalizers
    from flowrl.flow.learner import FlowLearner

    ro = training_rollout(b, b.group, train_steps)
    cfg = LossConfig()
    learner = FlowLearner(b.policy, cfg, chunk_size=b.rows)
    adv = torch.linspace(-1, 1, ro.num_samples)
    norm = loss_normalizers(ro.trained, cfg.aggregation)
    params = [p for p in b.policy.transformer.parameters() if p.requires_grad]

    def learner_step():
        with _autocast(b):
            learner.minibatch_gradient(ro, adv, normalizer=norm)
        for p in params:
            p.grad = None

    unit = fwd_bwd(b, ro, b.rows)

    def unit_step():
        unit()
        for p in params:
            p.grad = None

    flops = count_flops(unit_step) / b.rows  # per row: one transition's forward + backward (CFG included)
    t_unit = timed(unit_step, b.device, b.repeats)
    t_learn = timed(learner_step, b.device, b.repeats)
    transitions = int(ro.trained.sum())
    out = {"rows": b.rows, "train_steps": train_steps, "flops_per_transition": flops,
           "fwd_bwd_s": t_unit, "learner_s": t_learn, "transitions_per_s": transitions / t_learn,
           "samples_per_s": ro.num_samples / t_learn}
    if peak:
        out["mfu_fwd_bwd"] = flops * b.rows / t_unit / peak
        out["mfu_learner"] = flops * transitions / t_learn / peak
    return out


def measure_memory(b: Bench, row_counts: tuple[int, int]) -> dict:
    """Peak memory of a training forward+backward at two micro-batch sizes, with and without gradient
    checkpointing; the growth per row and the rows that fit 80 GiB, extrapolated linearly."""
    t = b.policy.transformer
    out: dict[str, Any] = {"row_counts": list(row_counts)}
    if b.device.type != "cuda":
        return {"note": "n/a: peak memory is measured on CUDA only"}
    ro = training_rollout(b, max(row_counts) // len(b.prompts) or 1, 1)
    for ckpt in (False, True):
        if ckpt:
            t.enable_gradient_checkpointing()
        points = []
        for rows in row_counts:
            run = fwd_bwd(b, ro, rows)
            run()  # warm-up
            for p in t.parameters():
                p.grad = None
            before, top = peak_memory(run, b.device)
            for p in t.parameters():
                p.grad = None
            points.append((rows, float(top)))
        slope, intercept = linear_fit(points)
        key = "checkpointing" if ckpt else "no_checkpointing"
        out[key] = {"peaks_gib": [p / GIB for _, p in points], "per_row_gib": slope / GIB,
                    "fixed_gib": intercept / GIB, "rows_in_80gib": rows_that_fit(points),
                    "weights_gib": before / GIB}
        if ckpt:
            t.disable_gradient_checkpointing()
    return out


def _grads_off(b: Bench) -> None:
    for p in b.policy.transformer.parameters():
        p.grad = None


def option_precision(b: Bench, train_steps: int) -> dict:
    """bf16 base + fp32 LoRA + bf16 autocast (as measured above) against an fp32 base with bf16 autocast (the fp32
    recipes' model.dtype float32): fwd+bwd seconds and peak memory. Skipped when the fp32 base would not fit."""
    t = b.policy.transformer
    need = count_params(t) * 4 * 1.5
    if b.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(b.device)
        if need > free:
            return {"skipped": f"an fp32 copy needs ~{need / GIB:.0f} GiB, {free / GIB:.0f} GiB free"}
    ro = training_rollout(b, b.group, 1)
    run = fwd_bwd(b, ro, b.rows)

    def step():
        run()
        _grads_off(b)

    res = {}
    for name in ("bf16_base", "fp32_base"):
        if name == "fp32_base":
            t.float()
        mem = peak_memory(step, b.device)
        res[name] = {"fwd_bwd_s": timed(step, b.device, b.repeats),
                     "peak_gib": None if mem is None else mem[1] / GIB}
    t.to(torch.bfloat16)  # bf16 -> fp32 -> bf16 is exact; LoRA weights back to fp32
    for p in t.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return res


def option_attention(b: Bench) -> dict:
    """A no-grad velocity call on ``b.rows`` rows with SDPA's fused kernels (flash / memory-efficient / cuDNN, what
    diffusers' attention calls by default) against SDPA's math kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    ro = training_rollout(b, b.group, 1)
    from flowrl.flow.policy import PromptEmbeds

    emb = PromptEmbeds.from_tensors(ro.embeds).select(ro.prompt_index)
    x, sig = ro.latents[:, 0].float(), ro.sigmas[:, 0]

    def call():
        with torch.no_grad(), _autocast(b):
            b.policy.velocity(x, sig, emb, b.guidance)

    def math_call():
        with sdpa_kernel([SDPBackend.MATH]):
            call()

    fused, math_only = interleaved(call, math_call, b.device, b.repeats)
    return {"fused_s": fused, "math_s": math_only, "speedup": math_only / fused}


def option_batched_cfg(b: Bench) -> dict:
    """CFG's two branches as two transformer calls (the pipeline's) against one batched call, sampling."""
    pol = b.policy
    if not hasattr(pol, "batched_cfg"):
        return {"n/a": "sd3 batches its CFG always; flux has no CFG branch (guidance-distilled)"}
    if b.guidance <= 1:
        return {"n/a": "guidance <= 1: no CFG branch"}

    def run(flag):
        def go():
            pol.batched_cfg = flag
            return flowrl_rollout(b, decode=False)
        return go

    two, one = interleaved(run(False), run(True), b.device, b.repeats)
    a = run(False)().final_latents.float()
    c = run(True)().final_latents.float()
    pol.batched_cfg = False
    return {"two_calls_s": two, "batched_s": one, "speedup": two / one,
            "max_abs_diff_final_latents": float((a - c).abs().max())}


def option_decode_chunks(b: Bench) -> dict:
    """VAE decode of the rollout's rows at once against one row per call: seconds and peak memory."""
    ro = flowrl_rollout(b, decode=False)
    x = ro.final_latents[:, 0].float()

    def decode(chunk):
        def go():
            with torch.no_grad():
                for a in range(0, x.shape[0], chunk):
                    b.policy.decode(x[a:a + chunk])
        return go

    res = {}
    for name, chunk in (("all_rows", x.shape[0]), ("one_row", 1)):
        mem = peak_memory(decode(chunk), b.device)
        res[name] = {"s": timed(decode(chunk), b.device, b.repeats),
                     "peak_growth_gib": None if mem is None else (mem[1] - mem[0]) / GIB}
    return res


def option_te_offload(b: Bench) -> dict:
    """Device memory held with the text encoders on the device against offloaded to the CPU after encoding."""
    pol = b.policy
    n = sum(count_params(m) for m in pol.text_encoders().values())
    res: dict[str, Any] = {"text_encoder_params": n}
    if b.device.type != "cuda":
        res["note"] = "n/a off CUDA (the encoders already live in host memory)"
        return res
    pol.offload_text_encoders(None)
    _sync(b.device)
    on = torch.cuda.memory_allocated(b.device)
    pol.offload_text_encoders("cpu")
    _sync(b.device)
    off = torch.cuda.memory_allocated(b.device)
    res.update(on_device_gib=on / GIB, offloaded_gib=off / GIB, saved_gib=(on - off) / GIB)
    return res


def option_compile(b: Bench) -> dict:
    """A no-grad velocity call eager against ``torch.compile`` of the transformer (compile time excluded)."""
    ro = training_rollout(b, b.group, 1)
    from flowrl.flow.policy import PromptEmbeds

    emb = PromptEmbeds.from_tensors(ro.embeds).select(ro.prompt_index)
    x, sig = ro.latents[:, 0].float(), ro.sigmas[:, 0]
    pol = b.policy

    def call():
        with torch.no_grad(), _autocast(b):
            pol.velocity(x, sig, emb, b.guidance)

    eager = timed(call, b.device, b.repeats)
    pol.forward_module = torch.compile(pol.transformer)
    t0 = time.perf_counter()
    call()
    call()
    _sync(b.device)
    compile_s = time.perf_counter() - t0
    compiled = timed(call, b.device, b.repeats)
    pol.forward_module = None
    return {"eager_s": eager, "compiled_s": compiled, "speedup": eager / compiled, "compile_s": compile_s}


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def setup(args) -> Bench:
    """Build the model (real or tiny), wrap it as a policy, encode the prompts and offload the text encoders."""
    from flowrl.config import load_run_config
    from flowrl.flow.policy import FlowPolicy

    spec = SPECS[args.model]
    device = torch.device(args.device)
    recipe = load_run_config(str(ROOT / "configs" / f"{args.recipe or spec.recipe}.yaml"))
    dtype = torch.bfloat16
    run = dict(TINY_RUN if args.scale == "tiny" else spec.run)
    for k in ("height", "width", "steps", "prompts", "group", "frames"):
        if getattr(args, k, None) is not None:
            run[k] = getattr(args, k)
    if args.scale == "real":
        pipe = build_real_pipeline(spec, device, dtype)
        msl = spec.max_sequence_length
    else:
        pipe = build_tiny_pipeline(spec)
        msl = 16
    kw = {"num_frames": run.get("frames", 5)} if spec.family == "wan" else {}
    policy = FlowPolicy.from_pipeline(pipe, device=device, dtype=dtype, frozen_dtype=dtype, max_sequence_length=msl, **kw)
    prompts = (PROMPTS * 4)[: run["prompts"]]
    policy.encode_prompts(prompts, negative_prompt="")
    policy.offload_text_encoders("cpu" if device.type != "cpu" else None)
    guidance = args.guidance if args.guidance is not None else float(recipe.sample.guidance_scale)
    return Bench(name=args.model, spec=spec, policy=policy, device=device, height=run["height"], width=run["width"],
                 steps=run["steps"], prompts=prompts, group=run["group"], guidance=guidance, repeats=args.repeats,
                 recipe=recipe)


def run_bench(args) -> dict:
    b = setup(args)
    pol = b.policy
    name = torch.cuda.get_device_name(b.device) if b.device.type == "cuda" else "cpu"
    peak = peak_bf16(name) if b.device.type == "cuda" else None
    res: dict[str, Any] = {
        "model": args.model, "title": b.spec.title, "source": b.spec.source, "scale": args.scale, "device": name,
        "peak_bf16_flops": peak, "torch": torch.__version__,
        "transformer_params": count_params(pol.transformer), "recipe": args.recipe or b.spec.recipe,
        "recipe_group_size": b.recipe.sample.group_size,
        "run": {"height": b.height, "width": b.width, "steps": b.steps, "prompts": len(b.prompts), "group": b.group,
                "guidance": b.guidance, **({"frames": pol.num_frames} if b.spec.family == "wan" else {})},
    }
    parts: list[tuple[str, Callable[[], Any]]] = [
        ("rollout", lambda: measure_rollout(b)),
        ("host_syncs_per_step", lambda: host_syncs_per_step(b)),
        ("te_offload", lambda: option_te_offload(b)),
        ("batched_cfg", lambda: option_batched_cfg(b)),
        ("attention", lambda: option_attention(b)),
        ("decode_chunks", lambda: option_decode_chunks(b)),
        ("lora_params", lambda: add_lora(b)),
        ("training", lambda: measure_training(b, args.train_steps, peak)),
        ("memory", lambda: measure_memory(b, tuple(args.memory_rows))),
        ("precision", lambda: option_precision(b, args.train_steps)),
    ]
    if args.compile:
        parts.append(("compile", lambda: option_compile(b)))
    skip = set(args.skip or ())
    for key, fn in parts:
        if key in skip:
            res[key] = "skipped (--skip)"
            continue
        t0 = time.perf_counter()
        try:
            res[key] = fn()
        except torch.cuda.OutOfMemoryError as e:  # a part that does not fit is a result, not a crash of the table
            res[key] = {"error": f"out of memory: {str(e).splitlines()[0]}"}
            torch.cuda.empty_cache()
        log(f"{key}: {time.perf_counter() - t0:.1f} s")
    return res


def log(msg: str) -> None:
    print(f"[scale] {msg}", file=sys.stderr, flush=True)


def _f(v: Any, fmt: str = ".3g") -> str:
    return "n/a" if v is None else (format(v, fmt) if isinstance(v, (int, float)) else str(v))


def format_table(r: dict) -> str:
    """The printed table of one model's results (the JSON holds every number)."""
    run = r["run"]
    size = f"{run['height']}x{run['width']}" + (f"x{run['frames']} frames" if "frames" in run else "")
    lines = [f"{r['title']} [{r['scale']}] on {r['device']}, torch {r['torch']}: transformer "
             f"{r['transformer_params'] / 1e9:.3g}B params; {run['prompts']} prompts x {run['group']} at {size}, "
             f"{run['steps']} steps, guidance {run['guidance']}; recipe {r['recipe']} (group {r['recipe_group_size']})"]
    ro = r.get("rollout")
    if isinstance(ro, dict):
        lines.append(f"  rollout   pipeline {ro['pipeline_images_per_s']:.3g} img/s   flowrl {ro['flowrl_images_per_s']:.3g} "
                     f"img/s   flowrl/pipeline {ro['ratio']:.3f} (target >= 0.97)")
    tr = r.get("training")
    if isinstance(tr, dict) and "learner_s" in tr:
        mfu = (f"MFU fwd+bwd {_f(tr.get('mfu_fwd_bwd'), '.1%')}, learner {_f(tr.get('mfu_learner'), '.1%')}"
               if "mfu_fwd_bwd" in tr else "MFU n/a (no peak for this device)")
        lines.append(f"  training  {tr['transitions_per_s']:.3g} transitions/s, {tr['samples_per_s']:.3g} samples/s "
                     f"({tr['train_steps']} trained steps each); {tr['flops_per_transition'] / 1e12:.3g} TFLOP per "
                     f"transition; {mfu}")
    mem = r.get("memory")
    if isinstance(mem, dict):
        if "note" in mem:
            lines.append(f"  memory    {mem['note']}")
        for key in ("no_checkpointing", "checkpointing"):
            m = mem.get(key)
            if isinstance(m, dict):
                lines.append(f"  memory    {key:16s} {m['per_row_gib']:.3g} GiB per trained row, fixed {m['fixed_gib']:.3g} "
                             f"GiB; rows per fwd+bwd in 80 GiB: {_f(m['rows_in_80gib'])} (linear from peaks at rows "
                             f"{mem['row_counts']}: {', '.join(f'{p:.3g}' for p in m['peaks_gib'])} GiB)")
    lines.append("  options (off -> on):")
    pr = r.get("precision")
    if isinstance(pr, dict) and "bf16_base" in pr:
        a, c = pr["fp32_base"], pr["bf16_base"]
        lines.append(f"    precision  fp32 base {a['fwd_bwd_s'] * 1e3:.1f} ms, {_f(a['peak_gib'])} GiB -> bf16 base + fp32 LoRA "
                     f"{c['fwd_bwd_s'] * 1e3:.1f} ms, {_f(c['peak_gib'])} GiB (fwd+bwd, bf16 autocast)")
    elif pr is not None:
        lines.append(f"    precision  {pr}")
    at = r.get("attention")
    if isinstance(at, dict):
        lines.append(f"    attention  SDPA math {at['math_s'] * 1e3:.1f} ms -> fused {at['fused_s'] * 1e3:.1f} ms "
                     f"({at['speedup']:.2f}x, one velocity call)")
    bc = r.get("batched_cfg")
    if isinstance(bc, dict) and "speedup" in bc:
        lines.append(f"    CFG        two calls {bc['two_calls_s'] * 1e3:.1f} ms -> one batched call {bc['batched_s'] * 1e3:.1f} "
                     f"ms ({bc['speedup']:.2f}x, rollout; max |diff| of final latents {bc['max_abs_diff_final_latents']:.2g})")
    elif bc is not None:
        lines.append(f"    CFG        {bc}")
    dc = r.get("decode_chunks")
    if isinstance(dc, dict):
        a, c = dc["all_rows"], dc["one_row"]
        lines.append(f"    VAE decode all rows {a['s'] * 1e3:.1f} ms, +{_f(a['peak_growth_gib'])} GiB -> one row per call "
                     f"{c['s'] * 1e3:.1f} ms, +{_f(c['peak_growth_gib'])} GiB")
    te = r.get("te_offload")
    if isinstance(te, dict):
        if "saved_gib" in te:
            lines.append(f"    TE offload {te['on_device_gib']:.3g} GiB held -> {te['offloaded_gib']:.3g} GiB "
                         f"({te['saved_gib']:.3g} GiB of text encoders, {te['text_encoder_params'] / 1e9:.3g}B params)")
        else:
            lines.append(f"    TE offload {te.get('note')}")
    co = r.get("compile")
    if isinstance(co, dict):
        lines.append(f"    compile    eager {co['eager_s'] * 1e3:.1f} ms -> compiled {co['compiled_s'] * 1e3:.1f} ms "
                     f"({co['speedup']:.2f}x; compiling took {co['compile_s']:.0f} s)")
    hs = r.get("host_syncs_per_step")
    lines.append(f"    host syncs per sampling step: {_f(hs, '.3g') if hs is not None else 'n/a off CUDA'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(SPECS), default="sd35m")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--scale", choices=("real", "tiny"), default=None,
                    help="real: the published sizes (CUDA); tiny: flowrl.demo's tiny builder (default off CUDA)")
    ap.add_argument("--recipe", default=None, help="configs/<name>.yaml for the group size and LoRA (default: the model's)")
    for k in ("height", "width", "steps", "prompts", "group", "frames"):
        ap.add_argument(f"--{k}", type=int, default=None, help=f"override the run's {k}")
    ap.add_argument("--guidance", type=float, default=None, help="default: the recipe's sample.guidance_scale")
    ap.add_argument("--train-steps", type=int, default=2, help="trained steps per row in the training measure")
    ap.add_argument("--memory-rows", type=int, nargs=2, default=(1, 2), help="two micro-batch sizes for the memory fit")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the transformer")
    ap.add_argument("--skip", nargs="*", default=(), help="parts to leave out (rollout, training, memory, ...)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.scale is None:
        args.scale = "real" if torch.device(args.device).type == "cuda" else "tiny"
    if args.scale == "real" and torch.device(args.device).type != "cuda":
        ap.error("--scale real needs a CUDA device (a 12B model in host memory is not what this measures)")
    if args.memory_rows[0] == args.memory_rows[1] or min(args.memory_rows) < 1:
        ap.error("--memory-rows: two different row counts >= 1")
    if args.repeats < 1 or args.train_steps < 1:
        ap.error("--repeats and --train-steps must be >= 1")
    import diffusers
    import transformers

    # quiet libraries while it runs, their levels restored after (main also runs in-process: tests)
    levels = (diffusers.utils.logging.get_verbosity(), transformers.logging.get_verbosity())
    diffusers.utils.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    try:
        res = run_bench(args)
    finally:
        diffusers.utils.logging.set_verbosity(levels[0])
        transformers.logging.set_verbosity(levels[1])
    print(format_table(res))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
