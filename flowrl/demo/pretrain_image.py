"""From-scratch pretraining of the shipped demo model (``assets/demo_sd3``): a small SD3-format
text-to-image model of ``shapes`` scenes.

:func:`pretrain` builds a ``StableDiffusion3Pipeline`` (:func:`flowrl.demo.tiny_image.build_tiny_sd3_pipeline`),
trains its VAE on rendered scenes (:func:`train_vae`), normalises its latents the SD3 way
(:func:`latent_normalization`), trains the MMDiT with rectified-flow matching (:func:`train_transformer`) on
deliberately imperfect scenes (:func:`noisy_scenes`, :func:`wash_out`), saves the EMA weights, and evaluates
them on held-out prompts with the RL evaluation (:func:`evaluate_model`). Every step's data and noise derive
from ``(seed, phase, step)`` (the stream ``(seed, "pretrain", phase, step)`` of :mod:`flowrl.core.rng`),
so a run resumed from its checkpoints in ``work_dir`` equals an uninterrupted
one. ``scripts/pretrain_demo.py`` is the command line; ``docs/demo.md`` describes the method.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from flowrl.core.rng import generator as stream_generator, stream_seed
from flowrl.demo.shapes import BACKGROUND, CATEGORIES, corrupt, evaluate, misattribute, render, vocabulary
from flowrl.demo.shapes import prompts as shape_prompts
from flowrl.demo.tiny_image import build_tiny_sd3_pipeline
from flowrl.flow.policy import FlowPolicy
from flowrl.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from flowrl.train.evaluate import evaluate_policy, reward_from_config
from flowrl.train.optim import lr_factor
from flowrl.train.runfolder import atomic_write

logger = logging.getLogger(__name__)

__all__ = [
    "PretrainConfig",
    "build_demo_pipeline",
    "render_batch",
    "noisy_scenes",
    "wash_out",
    "sample_sigmas",
    "flow_matching_pair",
    "flow_matching_loss",
    "vae_loss",
    "latent_normalization",
    "ema_update",
    "embedding_separation",
    "encode_prompt_table",
    "encode_latents",
    "train_vae",
    "train_transformer",
    "evaluate_model",
    "reference_scores",
    "save_pipeline",
    "PhaseResult",
    "SceneData",
    "pretrain",
    "format_evaluation",
    "write_model_card",
]

# every random draw is a flowrl.core.rng stream (seed, "pretrain", phase, step or index)
_PHASE_VAE = "vae"
_PHASE_DIT = "transformer"
_PHASE_DATA = "data"
_PHASE_EVAL = "eval"
_FINAL_LR_FRACTION = 0.1  # both phases: warm-up, then cosine decay to 10 % of the peak learning rate
_CARD_SAMPLES = 24  # images of the first held-out prompts shown in the model card (samples.png)


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------


@dataclass
class PretrainConfig:
    """Everything :func:`pretrain` needs; the script's flags mirror these fields."""

    output_dir: str = "assets/demo_sd3"  # where the finished pipeline is saved (save_pretrained)
    work_dir: str = "runs/pretrain_demo"  # checkpoints, latent cache, sample grid, log
    seed: int = 0  # seeds the weights, the data and every noise draw
    threads: int = 1  # torch CPU threads (1 is fastest on a busy shared CPU)
    device: str = "cpu"  # torch device for training and evaluation
    # --- model sizes ---
    image_size: int = 64  # image side in pixels
    latent_channels: int = 4  # VAE latent channels (SD3 has 16)
    vae_blocks: int = 3  # VAE resolution levels: downsampling factor 2 ** (vae_blocks - 1)
    num_layers: int = 4  # MMDiT blocks
    num_heads: int = 2  # attention heads
    head_dim: int = 32  # width of one head (transformer width = num_heads * head_dim)
    dual_attention: bool = True  # SD3.5-style dual attention in the first block
    tokenizer: str = "words"  # "words": every word of the shapes grammar is one token; "chars": one token per character
    clip_max_length: int = 16  # CLIP tokens ("words": the longest prompt has 8 words + bos/eos; "chars" needs 48)
    max_sequence_length: int = 1  # "T5" tokens: zeros appended to the CLIP tokens (the model has no T5)
    shift: float = 1.5  # FlowMatchEulerDiscreteScheduler shift used for sampling
    # --- VAE training ---
    vae_steps: int = 1500  # optimizer steps
    vae_batch_size: int = 8  # scenes per step
    vae_lr: float = 2e-3  # peak AdamW learning rate (warmup, then cosine to 10 %)
    kl_weight: float = 1e-4  # weight of the per-pixel KL term
    # --- transformer training ---
    num_scenes: int = 16384  # rendered training scenes (latents computed once)
    steps: int = 6000  # optimizer steps
    batch_size: int = 32  # scenes per step
    lr: float = 2e-3  # peak AdamW learning rate (warmup, then cosine to 10 %)
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 200  # linear warmup of both phases
    grad_clip: float = 1.0  # gradient-norm clip
    prompt_dropout: float = 0.1  # fraction of samples trained with the empty prompt (for CFG)
    caption_noise: float = 0.45  # fraction of training scenes that contradict their prompt in one attribute (flowrl.demo.shapes.corrupt)
    attribute_noise: float = 0.0  # fraction (drawn independently) with one object in another colour/shape (flowrl.demo.shapes.misattribute)
    faded: float = 0.35  # fraction of training scenes washed out (objects blended towards the background)
    fade_contrast: float = 0.4  # contrast left in a washed-out scene (1: none removed)
    timestep_sampling: str = "logit_normal"  # "logit_normal" (SD3) or "uniform"
    logit_mean: float = 0.0  # logit-normal location
    logit_std: float = 1.0  # logit-normal scale
    ema_decay: float = 0.999  # EMA of the transformer weights (the saved weights)
    # --- bookkeeping ---
    checkpoint_every: int = 500  # steps between checkpoints (both phases)
    eval_prompts: int = 240  # held-out prompts for the final evaluation (balanced over categories)
    eval_seeds: int = 1  # seeds per held-out prompt, 0..N-1, as the RL evaluation's eval.seeds (a repeated prompt gets new ones)
    eval_steps: int = 40  # Euler steps of evaluation sampling
    guidance_scale: float = 4.5  # CFG scale of evaluation sampling
    eval_batch_size: int = 40  # images per pipeline call during evaluation
    progress: bool = True  # tqdm progress bars
    command: str = ""  # the command line that produced the run (recorded in the model card)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        positive = (
            "threads", "image_size", "latent_channels", "vae_blocks", "num_layers", "num_heads", "head_dim",
            "clip_max_length", "max_sequence_length", "vae_batch_size", "num_scenes", "batch_size",
            "checkpoint_every", "eval_seeds", "eval_steps", "eval_batch_size",
        )
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("vae_steps", "steps", "warmup_steps", "eval_prompts"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        factor = 2 ** (self.vae_blocks - 1)
        if self.image_size % (2 * factor) or self.image_size < 16:
            raise ValueError(
                f"image_size must be >= 16 and divisible by {2 * factor} (VAE factor {factor} x patch 2), got {self.image_size}"
            )
        if self.tokenizer not in ("words", "chars"):
            raise ValueError(f"tokenizer must be 'words' or 'chars', got {self.tokenizer!r}")
        if self.clip_max_length < 3:
            raise ValueError(f"clip_max_length must be >= 3, got {self.clip_max_length}")
        for name in ("vae_lr", "lr", "grad_clip", "logit_std"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive finite number, got {v!r}")
        for name in ("kl_weight", "weight_decay"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a non-negative finite number, got {v!r}")
        for name in ("prompt_dropout", "caption_noise", "attribute_noise", "faded"):  # fractions of the training samples
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {v}")
        if not 0.0 <= self.fade_contrast <= 1.0:
            raise ValueError(f"fade_contrast must lie in [0, 1], got {self.fade_contrast}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if self.timestep_sampling not in ("logit_normal", "uniform"):
            raise ValueError(f"timestep_sampling must be 'logit_normal' or 'uniform', got {self.timestep_sampling!r}")
        if not (math.isfinite(self.shift) and self.shift > 0):
            raise ValueError(f"shift must be a positive finite number, got {self.shift}")
        if not math.isfinite(self.guidance_scale):
            raise ValueError(f"guidance_scale must be finite, got {self.guidance_scale}")

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along a side: ``2 ** (vae_blocks - 1)``."""
        return 2 ** (self.vae_blocks - 1)

    @property
    def latent_size(self) -> int:
        """Latent side: ``image_size / vae_scale_factor``."""
        return self.image_size // self.vae_scale_factor


# ------------------------------------------------------------------------------------------------
# Pure math
# ------------------------------------------------------------------------------------------------


def sample_sigmas(
    n: int,
    mode: str = "logit_normal",
    *,
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Training noise levels ``t in (0, 1)`` (``t = 1`` pure noise), float32 ``[n]``.

    ``logit_normal``: ``t = sigmoid(u)``, ``u ~ N(mean, std^2)`` -- SD3's default timestep density
    ``pi_ln(t; m, s) = 1 / (s sqrt(2 pi)) * 1 / (t (1 - t)) * exp(-(logit(t) - m)^2 / (2 s^2))``
    (Esser et al., arXiv 2403.03206, eq. 19). ``uniform``: ``t ~ U(0, 1)`` (rectified flow,
    arXiv 2209.03003).
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if mode == "logit_normal":
        if not (math.isfinite(std) and std > 0):
            raise ValueError(f"std must be positive, got {std}")
        u = torch.randn(n, generator=generator) * std + mean
        return torch.sigmoid(u)
    if mode == "uniform":
        return torch.rand(n, generator=generator)
    raise ValueError(f"mode must be 'logit_normal' or 'uniform', got {mode!r}")


def flow_matching_pair(x0: Tensor, noise: Tensor, sigmas: Tensor) -> tuple[Tensor, Tensor]:
    """Noisy input and regression target of rectified-flow matching.

    ``x_t = (1 - t) x_0 + t eps`` and ``v* = eps - x_0`` (the velocity ``dx_t / dt``), as in SD3
    (arXiv 2403.03206, section 2) and rectified flow (arXiv 2209.03003). ``sigmas`` ``[B]`` holds ``t``.
    """
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must have the same shape")
    if sigmas.dim() != 1 or sigmas.shape[0] != x0.shape[0]:
        raise ValueError(f"sigmas must be a [{x0.shape[0]}] tensor, got {tuple(sigmas.shape)}")
    t = sigmas.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return (1.0 - t) * x0 + t * noise, noise - x0


def flow_matching_loss(
    transformer: torch.nn.Module,
    x0: Tensor,
    noise: Tensor,
    sigmas: Tensor,
    prompt_embeds: Tensor,
    pooled: Tensor,
    num_train_timesteps: int = 1000,
) -> Tensor:
    """Mean squared error ``E || v_theta(x_t, t, c) - (eps - x_0) ||^2`` of an SD3 transformer.

    The transformer receives ``timestep = t * num_train_timesteps`` exactly as
    ``StableDiffusion3Pipeline.__call__`` gives it (arXiv 2403.03206, rectified-flow loss with unit
    weighting).
    """
    xt, target = flow_matching_pair(x0, noise, sigmas)
    pred = transformer(
        hidden_states=xt,
        timestep=sigmas * num_train_timesteps,
        encoder_hidden_states=prompt_embeds,
        pooled_projections=pooled,
        return_dict=False,
    )[0]
    return torch.mean((pred.float() - target.float()) ** 2)


def vae_loss(
    vae: torch.nn.Module, x: Tensor, kl_weight: float, generator: torch.Generator | None = None
) -> tuple[Tensor, dict[str, float]]:
    """VAE objective ``MSE(D(z), x) + kl_weight * KL(q(z|x) || N(0, I)) / numel(x_i)``, ``z ~ q(z|x)``.

    The reconstruction term is the per-pixel mean squared error (images in [-1, 1]); the KL of the
    diagonal Gaussian posterior (Kingma & Welling, arXiv 1312.6114) is summed over latent elements and
    divided by the pixel count of one image, so ``kl_weight`` is a per-pixel weight as in latent
    diffusion (arXiv 2112.10752). Returns the loss and its two parts as floats.
    """
    post = vae.encode(x).latent_dist
    z = post.sample(generator=generator)
    recon = vae.decode(z).sample
    mse = torch.mean((recon - x) ** 2)
    kl = post.kl().mean() / x[0].numel()
    loss = mse + kl_weight * kl
    return loss, {"mse": float(mse.detach()), "kl": float(kl.detach())}


def latent_normalization(latents: Tensor) -> tuple[float, float]:
    """``(scaling_factor, shift_factor)`` with ``(z - shift) * scaling`` of zero mean and unit std.

    SD3's VAE convention (``StableDiffusion3Pipeline``: ``latents = (z - shift_factor) * scaling_factor``
    on encoding, the inverse on decoding; arXiv 2403.03206): ``shift = mean(z)``, ``scaling = 1 / std(z)``
    over all elements, computed in float64.
    """
    z = latents.detach().double().flatten()
    if z.numel() < 2 or not torch.isfinite(z).all():
        raise ValueError("latents must hold at least two finite values")
    std = float(z.std())
    if std <= 0:
        raise ValueError("latents have zero spread: cannot normalise")
    return 1.0 / std, float(z.mean())


@torch.no_grad()
def ema_update(ema: dict[str, Tensor], model: torch.nn.Module, step: int, decay: float) -> float:
    """In place ``ema <- d * ema + (1 - d) * theta`` with ``d = min(decay, (1 + step) / (10 + step))``
    (the warmed-up EMA of Polyak averaging as used for diffusion models, e.g. arXiv 2006.11239).
    Returns ``d``."""
    d = min(decay, (1.0 + step) / (10.0 + step))
    for name, p in model.named_parameters():
        ema[name].mul_(d).add_(p.detach().float(), alpha=1.0 - d)
    return d


def embedding_separation(vectors: Tensor) -> dict[str, float]:
    """Nearest-neighbour and median pairwise Euclidean distances between rows of ``vectors``
    (flattened per row); ``min_nn > 0`` means that no two rows coincide."""
    v = vectors.detach().double().flatten(1)
    if v.shape[0] < 2:
        raise ValueError("need at least two rows")
    d = torch.cdist(v, v)
    off = ~torch.eye(v.shape[0], dtype=torch.bool)
    dd = d.masked_fill(~off, float("inf"))
    return {"min_nn": float(dd.min(1).values.min()), "median_nn": float(dd.min(1).values.median()),
            "median": float(d[off].median())}


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


def render_batch(prompts: Sequence[Any], size: int, rng: np.random.Generator | int | None) -> Tensor:
    """Rendered scenes of ``prompts`` (strings or ``SceneSpec``) as a uint8 ``[B, 3, size, size]`` tensor
    (``flowrl.demo.shapes.render``)."""
    if isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of strings")
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    arr = np.stack([np.asarray(render(p, size, rng), dtype=np.uint8) for p in prompts])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def noisy_scenes(prompts: Sequence[str], noise: float, seed: int, attribute_noise: float = 0.0) -> list[Any]:
    """What to render for each caption: the caption itself, or with probability ``noise`` a scene that
    contradicts it in one attribute (``flowrl.demo.shapes.corrupt``: another colour, count or shape, a
    missing object, swapped colours or positions), and independently with probability
    ``attribute_noise`` a scene with one object group in another colour (or shape, when the caption
    names no colour): ``flowrl.demo.shapes.misattribute``.

    Web captions describe their images imperfectly; a model trained on them follows prompts
    imperfectly in these same ways, which is what RL against a verifiable reward then corrects.
    Zero fractions draw nothing (``noise=0, attribute_noise=0`` returns ``prompts`` unchanged).
    """
    scenes: list[Any] = list(prompts)
    if noise > 0:
        rng = np.random.default_rng(seed)
        flip = rng.random(len(prompts)) < noise
        scenes = [corrupt(p, rng) if f else p for p, f in zip(prompts, flip)]
    if attribute_noise > 0:
        rng = np.random.default_rng(stream_seed(seed, "attribute_noise"))  # its own stream: the caption noise above is unchanged
        flip = rng.random(len(prompts)) < attribute_noise
        scenes = [misattribute(p, rng) if f else p for p, f in zip(scenes, flip)]
    return scenes


def wash_out(images_u8: Tensor, fraction: float, contrast: float, seed: int) -> Tensor:
    """Blend a random ``fraction`` of the scenes towards the background colour:
    ``x' = g + contrast * (x - g)`` (``g`` = ``flowrl.demo.shapes.BACKGROUND``), the washed-out,
    low-contrast images that a web-scale training set also holds. At ``contrast = 0.4`` the ``shapes``
    checker finds no object in them. ``fraction=0`` returns ``images_u8`` itself (and draws nothing).
    """
    if fraction <= 0:
        return images_u8
    pick = torch.from_numpy(np.random.default_rng(seed).random(images_u8.shape[0]) < fraction)
    g = torch.tensor(BACKGROUND, dtype=torch.float32).view(1, 3, 1, 1)
    out = images_u8.clone()
    out[pick] = (g + contrast * (images_u8[pick].float() - g)).round().clamp(0, 255).to(torch.uint8)
    return out


def _to_model_range(images_u8: Tensor) -> Tensor:
    """uint8 [0, 255] -> float32 [-1, 1] (the VAE's input range)."""
    return images_u8.float() / 127.5 - 1.0


def _vae_batch(cfg: PretrainConfig, step: int) -> Tensor:
    """The VAE training batch of ``step``: scenes of balanced train prompts, in [-1, 1]."""
    s = stream_seed(cfg.seed, "pretrain", _PHASE_VAE, step)
    ps = shape_prompts("train", cfg.vae_batch_size, seed=s % (2**32))
    return _to_model_range(render_batch(ps, cfg.image_size, np.random.default_rng(s)))


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------


def build_demo_pipeline(cfg: PretrainConfig):
    """A randomly initialised ``StableDiffusion3Pipeline`` of the demo's sizes (no T5).

    Built with :func:`flowrl.demo.tiny_image.build_tiny_sd3_pipeline`; the scheduler is replaced by
    ``FlowMatchEulerDiscreteScheduler(shift=cfg.shift)``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg.validate()
    pipe = build_tiny_sd3_pipeline(
        seed=cfg.seed,
        sample_size=cfg.latent_size,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        head_dim=cfg.head_dim,
        latent_channels=cfg.latent_channels,
        clip_max_length=cfg.clip_max_length,
        vae_blocks=cfg.vae_blocks,
        dual_attention=cfg.dual_attention,
        clip_words=vocabulary() if cfg.tokenizer == "words" else (),
    )
    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=float(cfg.shift))
    pipe.register_modules(scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------------------
# Checkpoint helpers
# ------------------------------------------------------------------------------------------------


def _resume(run_dir: Path) -> dict[str, Any] | None:
    ck = latest_checkpoint(run_dir)
    if ck is None:
        return None
    logger.info("resuming from %s", ck)
    return load_checkpoint(ck)


def _save(run_dir: Path, step: int, weights: dict[str, Tensor], opt: torch.optim.Optimizer, meta: dict[str, Any]) -> None:
    save_checkpoint(run_dir, step, weights=weights, tensor_state={"optimizer": opt.state_dict()}, meta=meta, keep_last=2)


def _progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True, mininterval=1.0)


@dataclass
class PhaseResult:
    """Outcome of one training phase: the losses of the steps run by this call, the step it started
    (resumed) from, and the phase's wall-clock seconds summed over every call that worked on it."""

    losses: list[float]
    start_step: int
    elapsed_s: float


# ------------------------------------------------------------------------------------------------
# Phase 1: the VAE
# ------------------------------------------------------------------------------------------------


def train_vae(vae: torch.nn.Module, cfg: PretrainConfig, run_dir: str | Path, log: Callable[[dict], None] | None = None) -> PhaseResult:
    """Train ``vae`` in place for ``cfg.vae_steps`` steps (resuming from ``run_dir/checkpoints``).

    Each step renders ``vae_batch_size`` scenes of balanced train prompts (seeded by the step) and
    takes one AdamW step on :func:`vae_loss`. Returns the losses of this call's steps, the step it
    resumed from and the phase's wall-clock time over all calls.
    """
    run_dir = Path(run_dir)
    device = torch.device(cfg.device)
    vae.to(device).train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    start, elapsed0, t0 = 0, 0.0, time.time()
    state = _resume(run_dir)
    if state is not None:
        vae.load_state_dict(state["weights"])
        opt.load_state_dict(state["tensor_state"]["optimizer"])
        start = int(state["meta"]["step"])
        elapsed0 = float(state["meta"].get("elapsed_s", 0.0))
    losses: list[float] = []
    bar = _progress(cfg.vae_steps, start, "VAE", cfg.progress)
    for step in range(start, cfg.vae_steps):
        lr = cfg.vae_lr * lr_factor(step, cfg.warmup_steps, cfg.vae_steps, _FINAL_LR_FRACTION)
        for g in opt.param_groups:
            g["lr"] = lr
        x = _vae_batch(cfg, step).to(device)
        loss, parts = vae_loss(vae, x, cfg.kl_weight, generator=stream_generator(cfg.seed, "pretrain", _PHASE_VAE, step))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"VAE loss is not finite at step {step}: {parts}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(mse=f"{parts['mse']:.4f}", kl=f"{parts['kl']:.3f}")
        if log is not None:
            log({"phase": "vae", "step": step + 1, "loss": losses[-1], **parts, "lr": lr})
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.vae_steps:
            _save(run_dir, step + 1, dict(vae.state_dict()), opt,
                  {"phase": "vae", "elapsed_s": elapsed0 + time.time() - t0})
    bar.close()
    vae.eval().requires_grad_(False)
    return PhaseResult(losses, start, elapsed0 + time.time() - t0)


@torch.no_grad()
def encode_latents(vae: torch.nn.Module, images_u8: Tensor, batch_size: int = 64) -> Tensor:
    """Posterior means ``E[z | x]`` of uint8 images ``[N, 3, H, W]`` (un-normalised VAE latents, float32)."""
    out = []
    dev = next(vae.parameters()).device
    for i in range(0, images_u8.shape[0], batch_size):
        x = _to_model_range(images_u8[i : i + batch_size]).to(dev)
        out.append(vae.encode(x).latent_dist.mean.float().cpu())
    return torch.cat(out)


@torch.no_grad()
def encode_prompt_table(pipe: Any, prompts: Sequence[str], max_sequence_length: int, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """``(prompt_embeds [P, S, D], pooled [P, D_pool])`` of ``prompts`` through the pipeline's own
    ``encode_prompt`` (CLIP-L and CLIP-G, zero "T5" tokens), exactly what sampling feeds the transformer."""
    pes, pools = [], []
    dev = pipe.transformer.device
    for i in range(0, len(prompts), batch_size):
        pe, _, pooled, _ = pipe.encode_prompt(
            prompt=list(prompts[i : i + batch_size]),
            prompt_2=None,
            prompt_3=None,
            device=dev,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
        )
        pes.append(pe.float().cpu())
        pools.append(pooled.float().cpu())
    return torch.cat(pes), torch.cat(pools)


# ------------------------------------------------------------------------------------------------
# Phase 2: the transformer
# ------------------------------------------------------------------------------------------------


def train_transformer(
    transformer: torch.nn.Module,
    latents: Tensor,
    prompt_index: Tensor,
    prompt_embeds: Tensor,
    pooled: Tensor,
    empty_index: int,
    cfg: PretrainConfig,
    run_dir: str | Path,
    log: Callable[[dict], None] | None = None,
) -> tuple[dict[str, Tensor], PhaseResult]:
    """Train ``transformer`` with :func:`flow_matching_loss` for ``cfg.steps`` steps (resuming).

    ``latents`` ``[N, C, h, w]`` are the normalised latents of the training scenes, ``prompt_index``
    ``[N]`` the row of each scene's prompt in the embedding table ``(prompt_embeds, pooled)``, whose
    row ``empty_index`` is the empty prompt (used for a fraction ``cfg.prompt_dropout`` of the
    samples). Returns the EMA weights (float32) and the :class:`PhaseResult`.
    """
    run_dir = Path(run_dir)
    device = torch.device(cfg.device)
    transformer.to(device).train().requires_grad_(True)
    opt = torch.optim.AdamW(transformer.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    ema = {n: p.detach().float().clone() for n, p in transformer.named_parameters()}
    start, elapsed0, t0 = 0, 0.0, time.time()
    state = _resume(run_dir)
    if state is not None:
        elapsed0 = float(state["meta"].get("elapsed_s", 0.0))
        w = state["weights"]
        transformer.load_state_dict({k[len("model."):]: v for k, v in w.items() if k.startswith("model.")})
        ema = {k[len("ema."):]: v.float().clone() for k, v in w.items() if k.startswith("ema.")}
        opt.load_state_dict(state["tensor_state"]["optimizer"])
        start = int(state["meta"]["step"])
    n = latents.shape[0]
    num_t = 1000
    losses: list[float] = []
    bar = _progress(cfg.steps, start, "transformer", cfg.progress)
    for step in range(start, cfg.steps):
        lr = cfg.lr * lr_factor(step, cfg.warmup_steps, cfg.steps, _FINAL_LR_FRACTION)
        for g in opt.param_groups:
            g["lr"] = lr
        gen = stream_generator(cfg.seed, "pretrain", _PHASE_DIT, step)
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)
        rows = prompt_index[idx].clone()
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.prompt_dropout
        rows[drop] = empty_index
        x0 = latents[idx].to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        sig = sample_sigmas(cfg.batch_size, cfg.timestep_sampling, mean=cfg.logit_mean, std=cfg.logit_std, generator=gen)
        loss = flow_matching_loss(
            transformer, x0, noise, sig.to(device), prompt_embeds[rows].to(device), pooled[rows].to(device), num_t
        )
        if not torch.isfinite(loss):
            raise FloatingPointError(f"flow-matching loss is not finite at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(transformer.parameters(), cfg.grad_clip)
        opt.step()
        ema_update(ema, transformer, step, cfg.ema_decay)
        losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if log is not None:
            log({"phase": "transformer", "step": step + 1, "loss": losses[-1], "grad_norm": float(gnorm), "lr": lr})
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            weights = {f"model.{k}": v for k, v in transformer.state_dict().items()}
            weights.update({f"ema.{k}": v for k, v in ema.items()})
            _save(run_dir, step + 1, weights, opt, {"phase": "transformer", "elapsed_s": elapsed0 + time.time() - t0})
    bar.close()
    transformer.eval().requires_grad_(False)
    return ema, PhaseResult(losses, start, elapsed0 + time.time() - t0)


# ------------------------------------------------------------------------------------------------
# Sampling and evaluation
# ------------------------------------------------------------------------------------------------


class _EmptyPromptPolicy:
    """A policy that is given the empty prompt whatever it is asked for: the reference of a model
    that ignores the prompt (its images are scored against the prompts asked for)."""

    def __init__(self, policy: Any):
        self._policy = policy

    def __getattr__(self, name: str) -> Any:
        return getattr(self._policy, name)

    def encode_prompts(self, prompts: Sequence[str], negative_prompt: str = ""):
        return self._policy.encode_prompts([""] * len(prompts), negative_prompt)


def evaluate_model(
    pipe: Any,
    prompts: Sequence[str],
    *,
    seeds: int | Sequence[int],
    num_steps: int,
    guidance_scale: float,
    max_sequence_length: int,
    batch_size: int = 40,
    device: str = "cpu",
    ignore_prompt: bool = False,
) -> tuple[dict[str, float], Tensor]:
    """The RL evaluation (:func:`flowrl.train.evaluate.evaluate_policy` of the pipeline's policy: every
    prompt with ``seeds``, a list or a count N for 0 .. N-1; the deterministic ODE sampler; ``manual_seed(s)``
    noise) scored by the ``shapes`` reward. Returns ``flowrl.demo.shapes.evaluate``'s summary (mean partial-credit
    ``score``, strict ``accuracy``, ``geneval``, per category ``score/<cat>``, ``accuracy/<cat>``) and the
    images, rows prompt-major. ``ignore_prompt``: sample with the empty prompt, score against ``prompts``.
    """
    policy = FlowPolicy.from_pipeline(pipe, device=device, max_sequence_length=max_sequence_length)
    size = int(pipe.transformer.config.sample_size) * int(pipe.vae_scale_factor)
    res = evaluate_policy(_EmptyPromptPolicy(policy) if ignore_prompt else policy, prompts, seeds,
                          num_steps=num_steps, height=size, width=size, guidance_scale=guidance_scale,
                          reward=reward_from_config(None, {"shapes": 1.0}), batch_size=batch_size, progress=False)
    prefix = "shapes/"
    return {k[len(prefix):]: v for k, v in res.details.items() if k.startswith(prefix)}, res.images


def reference_scores(prompts: Sequence[str], size: int, seed: int) -> dict[str, dict[str, float]]:
    """Scores of two references on ``prompts``: ``renderer`` (scenes drawn for the prompts themselves:
    the checker's ceiling) and ``random_scene`` (perfect scenes of random *train* prompts: an ideal
    model that ignores the prompt)."""
    rng = np.random.default_rng(seed)
    own = render_batch(list(prompts), size, rng).float() / 255.0
    other = render_batch(shape_prompts("train", len(prompts), seed=stream_seed(seed, "random_scene") % (2**32)), size, rng).float() / 255.0
    return {"renderer": evaluate(own, list(prompts)), "random_scene": evaluate(other, list(prompts))}


def save_pipeline(pipe: Any, out_dir: str | Path) -> Path:
    """``pipe.save_pretrained`` (safetensors) into a temporary sibling folder, then swap it into place,
    so ``out_dir`` always holds either the previous model or the complete new one."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp, safe_serialization=True)
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
    return out


def _save_grid(images: Tensor, path: Path, nrow: int = 12) -> None:
    from torchvision.utils import save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, str(path), nrow=nrow, padding=2, pad_value=1.0)


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ------------------------------------------------------------------------------------------------
# The whole run
# ------------------------------------------------------------------------------------------------


def _phase_vae(pipe: Any, cfg: PretrainConfig, work: Path, log: Callable[[dict], None]) -> PhaseResult:
    """Train the VAE, or load it when ``work/vae_final.safetensors`` says the phase is done."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save

    final = work / "vae_final.safetensors"
    if final.is_file():
        pipe.vae.load_state_dict(load_file(str(final)))
        pipe.vae.to(cfg.device).eval().requires_grad_(False)
        with safe_open(str(final), framework="pt") as f:
            meta = f.metadata() or {}
        return PhaseResult([], cfg.vae_steps, float(meta.get("elapsed_s", "nan")))
    res = train_vae(pipe.vae, cfg, work / "vae", log)
    atomic_write(final, save({k: v.detach().contiguous().cpu() for k, v in pipe.vae.state_dict().items()},
                             metadata={"elapsed_s": repr(res.elapsed_s), "steps": str(cfg.vae_steps)}))
    return res


def _evaluate(pipe: Any, cfg: PretrainConfig, work: Path) -> dict[str, Any]:
    """The held-out evaluation of the finished model (:func:`evaluate_model`, with CFG and with the
    empty prompt) next to :func:`reference_scores`; writes the evaluation grid and the model card's
    ``samples.png``. Empty when ``cfg.eval_prompts`` is 0."""
    if not cfg.eval_prompts:
        return {}
    ev_prompts = shape_prompts("test", cfg.eval_prompts, seed=stream_seed(cfg.seed, "pretrain", _PHASE_EVAL, 0) % (2**32))
    ref_seed = stream_seed(cfg.seed, "pretrain", _PHASE_EVAL, 1) % (2**31)
    kw = dict(seeds=cfg.eval_seeds, num_steps=cfg.eval_steps, max_sequence_length=cfg.max_sequence_length,
              batch_size=cfg.eval_batch_size, device=cfg.device)
    model, imgs = evaluate_model(pipe, ev_prompts, guidance_scale=cfg.guidance_scale, **kw)
    uncond, _ = evaluate_model(pipe, ev_prompts, guidance_scale=1.0, ignore_prompt=True, **kw)
    rows = [p for p in ev_prompts for _ in range(cfg.eval_seeds)]
    _save_grid(imgs[:48], work / "eval_grid.png")
    (work / "eval_grid_prompts.txt").write_text("\n".join(rows[:48]) + "\n", encoding="utf-8")
    _save_grid(imgs[:_CARD_SAMPLES], Path(cfg.output_dir) / "samples.png")
    return {"model": model, "empty_prompt": uncond, **reference_scores(ev_prompts, cfg.image_size, ref_seed),
            "prompts": ev_prompts, "seeds": list(range(cfg.eval_seeds)), "num_steps": cfg.eval_steps,
            "guidance_scale": cfg.guidance_scale, "reference_seed": ref_seed}


@dataclass
class SceneData:
    """The transformer's training data: normalised latents of the training scenes ``[N, C, h, w]``,
    each scene's row ``prompt_index`` in the embedding table ``(prompt_embeds, pooled)`` whose row
    ``empty_index`` is the empty prompt, the VAE's SD3 normalisation and the table's separation."""

    latents: Tensor
    prompt_index: Tensor
    prompt_embeds: Tensor
    pooled: Tensor
    empty_index: int
    scaling: float
    shift: float
    separation: dict[str, dict[str, float]]


def _scene_data(pipe: Any, cfg: PretrainConfig) -> SceneData:
    """Render the (noisy, partly washed-out) training scenes, encode them once with the trained VAE, set
    the VAE's SD3 latent normalisation (``scaling_factor``, ``shift_factor``) and encode the prompt table."""
    ds_seed = stream_seed(cfg.seed, "pretrain", _PHASE_DATA, 0)
    scene_prompts = shape_prompts("train", cfg.num_scenes, seed=ds_seed % (2**32))
    images = render_batch(noisy_scenes(scene_prompts, cfg.caption_noise, stream_seed(cfg.seed, "pretrain", _PHASE_DATA, 1),
                                       cfg.attribute_noise),
                          cfg.image_size, np.random.default_rng(ds_seed))
    images = wash_out(images, cfg.faded, cfg.fade_contrast, stream_seed(cfg.seed, "pretrain", _PHASE_DATA, 2))
    raw = encode_latents(pipe.vae, images)
    del images
    scaling, shift = latent_normalization(raw)
    pipe.vae.register_to_config(scaling_factor=scaling, shift_factor=shift)
    latents = ((raw - shift) * scaling).contiguous()
    del raw
    table_prompts = sorted(set(scene_prompts)) + [""]
    row_of = {p: i for i, p in enumerate(table_prompts)}
    prompt_index = torch.tensor([row_of[p] for p in scene_prompts], dtype=torch.long)
    pe, pooled = encode_prompt_table(pipe, table_prompts, cfg.max_sequence_length)
    separation = {
        "pooled": embedding_separation(pooled[:-1]),
        "sequence": embedding_separation(pe[:-1, : cfg.clip_max_length]),
    }
    return SceneData(latents, prompt_index, pe, pooled, len(table_prompts) - 1, scaling, shift, separation)


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Run both phases (resuming from ``cfg.work_dir`` when checkpoints are there), save the pipeline
    to ``cfg.output_dir``, evaluate it, and return a summary (also written to ``work_dir/summary.json``
    and ``output_dir/pretrain_summary.json``).

    Timings: ``vae_s`` and ``transformer_s`` are the phases' wall-clock seconds summed over every
    invocation that worked on them; ``data_s`` and ``eval_s`` are this invocation's.
    """
    cfg.validate()
    torch.set_num_threads(cfg.threads)
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / "train_log.jsonl"

    def log(rec: dict) -> None:
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")

    pipe = build_demo_pipeline(cfg)
    dev = torch.device(cfg.device)
    for name in ("text_encoder", "text_encoder_2"):
        getattr(pipe, name).to(dev).requires_grad_(False).eval()
    pipe.transformer.to(dev)
    params = {n: _count(getattr(pipe, n)) for n in ("transformer", "vae", "text_encoder", "text_encoder_2")}
    logger.info("parameters: %s", params)

    # Phase 1: the VAE.
    vae_res = _phase_vae(pipe, cfg, work, log)

    t0 = time.time()
    data = _scene_data(pipe, cfg)
    data_s = time.time() - t0

    # Phase 2: the transformer; the saved weights are the EMA.
    ema, dit_res = train_transformer(pipe.transformer, data.latents, data.prompt_index, data.prompt_embeds, data.pooled,
                                     data.empty_index, cfg, work / "transformer", log)
    dtypes = {n: p.dtype for n, p in pipe.transformer.named_parameters()}
    pipe.transformer.load_state_dict({k: v.to(dtypes[k]) for k, v in ema.items()}, strict=False)
    pipe.transformer.eval()
    save_pipeline(pipe, cfg.output_dir)

    t0 = time.time()
    evaluation = _evaluate(pipe, cfg, work)
    eval_s = time.time() - t0

    summary: dict[str, Any] = {
        "config": asdict(cfg),
        "parameters": params,
        "vae_scaling_factor": data.scaling,
        "vae_shift_factor": data.shift,
        "embedding_separation": data.separation,
        "timings_s": {"vae_s": vae_res.elapsed_s, "data_s": data_s, "transformer_s": dit_res.elapsed_s, "eval_s": eval_s},
        "final_losses": {
            "vae": float(np.mean(vae_res.losses[-50:])) if vae_res.losses else None,
            "transformer": float(np.mean(dit_res.losses[-100:])) if dit_res.losses else None,
        },
        "evaluation": evaluation,
        "torch_threads": torch.get_num_threads(),
    }
    summary["timings_s"]["total_s"] = sum(v for v in summary["timings_s"].values() if math.isfinite(v))
    text = json.dumps(summary, indent=2)
    (work / "summary.json").write_text(text, encoding="utf-8")
    out = Path(cfg.output_dir)
    (out / "pretrain_summary.json").write_text(text, encoding="utf-8")
    summary["output_bytes"] = _folder_bytes(out)
    return summary


def format_evaluation(summary: dict[str, Any]) -> str:
    """A plain-text table of the evaluation in ``summary``: partial-credit ``shapes`` score per GenEval
    category, its mean, and GenEval's strict overall accuracy."""
    ev = summary.get("evaluation") or {}
    if not ev:
        return "(no evaluation)"
    rows = [("model", ev["model"]), ("empty prompt", ev["empty_prompt"]),
            ("random scene", ev["random_scene"]), ("renderer", ev["renderer"])]
    head = "| " + " | ".join(["", *CATEGORIES, "mean score", "GenEval (strict)"]) + " |"
    lines = [
        f"{len(ev['prompts'])} held-out prompts x {len(ev.get('seeds', [0]))} seed(s), {ev['num_steps']} Euler steps, "
        f"CFG {ev['guidance_scale']} "
        "(empty prompt: CFG 1); partial-credit `shapes` score per GenEval category:",
        "",
        head,
        "|" + "---|" * (len(CATEGORIES) + 3),
    ]
    for name, r in rows:
        cells = [f"{r.get(f'score/{c}', float('nan')):.3f}" for c in CATEGORIES]
        lines.append("| " + " | ".join([name, *cells, f"{r['score']:.3f}", f"{r['geneval']:.3f}"]) + " |")
    return "\n".join(lines)


def write_model_card(summary: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``out_dir/README.md``: what the model is, how to load and sample it, the command that
    produced it, how long each phase took, and the held-out evaluation."""
    cfg = summary["config"]
    t = summary["timings_s"]
    p = summary["parameters"]
    size = cfg["image_size"]
    ev = summary.get("evaluation") or {}
    samples = ""
    if ev and (Path(out_dir) / "samples.png").is_file():
        shown = [q for q in ev["prompts"] for _ in ev.get("seeds", [0])][:_CARD_SAMPLES]
        samples = (
            f"\n![samples](samples.png)\n\n`samples.png`: the model's first {len(shown)} images of the held-out "
            "evaluation (row by row, the table's prompts and seeds): " + "; ".join(f"{i + 1}. {q}" for i, q in enumerate(shown)) + "\n"
        )
    attr = (f", {cfg['attribute_noise']:.0%} (drawn independently) show one object in another colour or shape "
            f"(`flowrl.demo.shapes.misattribute`)") if cfg.get("attribute_noise", 0.0) > 0 else ""
    card = f"""# flowrl demo model (SD3 format)

A small Stable Diffusion 3 pipeline in diffusers' own format, trained from scratch on CPU on synthetic
`shapes` scenes (`flowrl/demo/shapes.py`) by `scripts/pretrain_demo.py`. It is the base model of the
flowrl image demo: it follows prompts only imperfectly, so that RL has something to align.

Its training data is deliberately imperfect, as web-scale image-text data is: {cfg.get('caption_noise', 0.0):.0%} of the
{cfg['num_scenes']} training scenes contradict their caption in one attribute (another colour, count or shape, a
missing object, swapped colours or positions: `flowrl.demo.shapes.corrupt`){attr} and {cfg.get('faded', 0.0):.0%} are washed out
(objects blended towards the background, contrast {cfg.get('fade_contrast', 1.0)}: `flowrl.demo.pretrain_image.wash_out`).

- transformer: `SD3Transformer2DModel`, {p['transformer']:,} parameters ({cfg['num_layers']} MMDiT blocks,
  width {cfg['num_heads'] * cfg['head_dim']}, patch 2, {'dual attention in block 0, ' if cfg['dual_attention'] else ''}QK RMS-norm)
- VAE: `AutoencoderKL`, {p['vae']:,} parameters, {cfg['latent_channels']} latent channels, downsampling
  x{2 ** (cfg['vae_blocks'] - 1)} ({size} px images, {size // 2 ** (cfg['vae_blocks'] - 1)}x{size // 2 ** (cfg['vae_blocks'] - 1)} latents),
  scaling_factor {summary['vae_scaling_factor']:.4f}, shift_factor {summary['vae_shift_factor']:.4f}
- text: two random (untrained) CLIP text encoders ({p['text_encoder']:,} and {p['text_encoder_2']:,} parameters)
  with {'whole-word' if cfg.get('tokenizer', 'chars') == 'words' else 'character-level'} tokenizers of length {cfg['clip_max_length']}; no T5
- scheduler: `FlowMatchEulerDiscreteScheduler(shift={cfg['shift']})`

```python
from diffusers import StableDiffusion3Pipeline
pipe = StableDiffusion3Pipeline.from_pretrained("{out_dir}", text_encoder_3=None, tokenizer_3=None)
img = pipe("a red circle above a blue square", num_inference_steps={cfg['eval_steps']},
           guidance_scale={cfg['guidance_scale']}, max_sequence_length={cfg['max_sequence_length']}).images[0]
```

The transformer was trained with `max_sequence_length={cfg['max_sequence_length']}`: the number of
zero "T5" tokens SD3 appends to the CLIP tokens when there is no T5. Pass the same value when sampling
(`StableDiffusion3Pipeline` defaults to 256, flowrl's `model.max_sequence_length` to 77): other values
change the attention over those tokens and degrade prompt following.

## How it was made

```
{cfg['command'] or 'python scripts/pretrain_demo.py'}
```

{cfg['threads']} torch thread(s) on a shared 2-core CPU. Wall clock: VAE {t['vae_s'] / 60:.1f} min
({cfg['vae_steps']} steps, batch {cfg['vae_batch_size']}), data {t['data_s'] / 60:.1f} min ({cfg['num_scenes']} scenes),
transformer {t['transformer_s'] / 60:.1f} min ({cfg['steps']} steps, batch {cfg['batch_size']}), evaluation
{t['eval_s'] / 60:.1f} min; total {t['total_s'] / 60:.1f} min.

## Held-out evaluation

{format_evaluation(summary)}

"empty prompt" is this model sampled with the empty prompt and scored against the held-out prompts (a
model that ignores the prompt); "random scene" scores perfect renders of random training prompts; "renderer"
scores the renderer's own scenes of the held-out prompts (the checker's ceiling). The partial-credit score
and GenEval's strict correctness are defined in `flowrl/demo/shapes.py` (`score_objects`).
{samples}"""
    path = Path(out_dir) / "README.md"
    path.write_text(card, encoding="utf-8")
    return path
