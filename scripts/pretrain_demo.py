#!/usr/bin/env python
"""Pretrain the shipped demo model (``assets/demo_sd3``) from scratch on CPU.

A small Stable Diffusion 3 pipeline in diffusers' own format (MMDiT, ``AutoencoderKL``, two random
CLIP text encoders with whole-word tokenizers, no T5) is trained on synthetic scenes of
``flowrl.demo.shapes`` with deliberate caption noise, then evaluated on held-out prompts with the
``shapes`` checker (the code is ``flowrl/demo/pretrain_image.py``; what it does step by step is in
docs/demo.md). It loads with the same code that loads SD3.5 from the hub::

    from diffusers import StableDiffusion3Pipeline
    pipe = StableDiffusion3Pipeline.from_pretrained("assets/demo_sd3", text_encoder_3=None, tokenizer_3=None)
    image = pipe("a red circle above a blue square", guidance_scale=4.5, max_sequence_length=1).images[0]

Checkpoints go to ``--work-dir``; rerunning the same command resumes and gives the same weights as an
uninterrupted run. ``assets/demo_sd3`` was made with (its README.md records the exact command)::

    python scripts/pretrain_demo.py --output-dir assets/demo_sd3 --work-dir runs/pretrain_demo --threads 2
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from dataclasses import fields

from flowrl.demo.pretrain_image import PretrainConfig, format_evaluation, pretrain, write_model_card

_HELP = {
    "output_dir": "folder the finished pipeline is saved to",
    "work_dir": "checkpoints, training log, evaluation grid, summary.json",
    "seed": "seed of the weights, the data and all noise",
    "threads": "torch CPU threads",
    "device": "torch device (cpu, cuda)",
    "image_size": "image side in pixels",
    "latent_channels": "VAE latent channels",
    "vae_blocks": "VAE resolution levels (downsampling 2**(n-1))",
    "num_layers": "MMDiT blocks",
    "num_heads": "attention heads",
    "head_dim": "width of one attention head",
    "dual_attention": "SD3.5-style dual attention in the first block (0/1)",
    "tokenizer": "'words' (one token per word of the shapes grammar) or 'chars' (one per character)",
    "clip_max_length": "CLIP tokenizer length (tokens + 2; 'chars' needs 48)",
    "max_sequence_length": "zero 'T5' tokens appended to the CLIP tokens (use the same value when sampling)",
    "shift": "scheduler shift used for sampling",
    "vae_steps": "VAE optimizer steps",
    "vae_batch_size": "scenes per VAE step",
    "vae_lr": "VAE peak learning rate",
    "kl_weight": "per-pixel KL weight of the VAE loss",
    "num_scenes": "rendered training scenes for the transformer",
    "steps": "transformer optimizer steps",
    "batch_size": "scenes per transformer step",
    "lr": "transformer peak learning rate",
    "weight_decay": "AdamW weight decay of the transformer",
    "warmup_steps": "linear warmup steps (both phases)",
    "grad_clip": "gradient-norm clip",
    "prompt_dropout": "fraction of empty prompts during training (for CFG)",
    "faded": "fraction of training scenes washed out (objects blended towards the background)",
    "fade_contrast": "contrast left in a washed-out scene",
    "caption_noise": "fraction of training scenes that contradict their prompt in one attribute (web-caption noise)",
    "attribute_noise": "fraction of training scenes with one object in another colour (or shape)",
    "timestep_sampling": "logit_normal or uniform",
    "logit_mean": "logit-normal location",
    "logit_std": "logit-normal scale",
    "ema_decay": "EMA decay of the saved transformer weights",
    "checkpoint_every": "steps between checkpoints",
    "eval_prompts": "held-out prompts in the final evaluation (0: skip it)",
    "eval_steps": "Euler steps when evaluating",
    "guidance_scale": "CFG scale when evaluating",
    "eval_batch_size": "images per pipeline call when evaluating",
}


def build_parser() -> argparse.ArgumentParser:
    """Flags ``--<field-name>`` for every field of :class:`PretrainConfig` (defaults: the shipped model's)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = PretrainConfig()
    for f in fields(PretrainConfig):
        if f.name in ("progress", "command"):
            continue
        flag = "--" + f.name.replace("_", "-")
        value = getattr(defaults, f.name)
        kind = type(value)
        if kind is bool:
            p.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=value, help=_HELP.get(f.name, ""))
        else:
            p.add_argument(flag, type=kind, default=value, help=_HELP.get(f.name, ""))
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kw = {f.name: getattr(args, f.name) for f in fields(PretrainConfig) if f.name not in ("progress", "command")}
    cfg = PretrainConfig(**kw, progress=not args.no_progress,
                         command=" ".join(["python scripts/pretrain_demo.py", *map(shlex.quote, argv)]))
    try:
        cfg.validate()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    summary = pretrain(cfg)
    write_model_card(summary, cfg.output_dir)
    print(format_evaluation(summary))
    t = summary["timings_s"]
    print(
        f"\nsaved {cfg.output_dir} ({summary['output_bytes'] / 2**20:.1f} MiB); parameters {json.dumps(summary['parameters'])}\n"
        f"wall clock {time.time() - t0:.0f} s (VAE {t['vae_s']:.0f} s, data {t['data_s']:.0f} s, "
        f"transformer {t['transformer_s']:.0f} s, evaluation {t['eval_s']:.0f} s) on {summary['torch_threads']} thread(s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
