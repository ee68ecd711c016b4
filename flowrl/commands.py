"""The code of ``flowrl sample`` and ``flowrl grid`` (:mod:`flowrl.cli` parses and dispatches).

``flowrl sample`` writes one PNG per ``(prompt, seed)`` and ``scores.csv`` with the config's
evaluation settings; ``flowrl grid`` evaluates the config's model before and after loading a
checkpoint on the same prompts and seeds and writes the side-by-side grid, an HTML page and the
scores. Both check their inputs (checkpoint, output folder) before any model loads.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from flowrl.config import load_run_config
from flowrl.inputs import ArgumentParser, UsageError, read_prompts, writable_dir
from flowrl.train.evaluate import (
    RewardLike,
    build_policy,
    check_image_model,
    check_prompts,
    check_seeds,
    eval_settings,
    evaluate_policy,
    format_score,
    load_policy,
    masked_mean,
    progress_bar,
    reward_from_config,
    sample_batches,
)
from flowrl.train.grids import to_pil
from flowrl.train.model import apply_checkpoint, check_checkpoint, check_checkpoint_fits
from flowrl.train.runfolder import SCORES_NAME, csv_value, save_png, write_comparison, write_scores_csv

logger = logging.getLogger(__name__)

__all__ = ["sample_file_name", "sample_to_dir", "add_grid_arguments", "run_grid", "grid_command"]


# --------------------------------------------------------------------------------------------------
# flowrl sample
# --------------------------------------------------------------------------------------------------


def _slug(text: str, limit: int = 40) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:limit].rstrip("-") or "prompt"


def sample_file_name(index: int, prompt: str, seed: int, num_prompts: int) -> str:
    """``<index>-<prompt slug>-s<seed>.png``: the index zero-padded (at least 4 digits) so that names
    sort in prompt order, the slug lower-case ASCII (at most 40 characters)."""
    width = max(4, len(str(max(0, num_prompts - 1))))
    return f"{index:0{width}d}-{_slug(prompt)}-s{seed}.png"


def read_prompt_file(path: Union[str, Path]) -> Tuple[List[str], Optional[List[Any]]]:
    """``(prompts, source images or None)`` of ``--prompts``: a text file (one prompt per line) or a
    ``.jsonl`` of records whose ``image`` column holds each prompt's source image (editing models)."""
    if str(path).endswith(".jsonl"):
        from flowrl.train.data import load_records, record_images

        records = load_records(str(path))
        return [r["prompt"] for r in records], record_images(records)
    return read_prompts(path), None


def sample_to_dir(cfg: Any, prompts: Sequence[str], out: Union[str, Path], seeds: Union[int, Sequence[int]] = 1,
                  checkpoint: Optional[Union[str, Path]] = None, *, reward: Optional[RewardLike] = None,
                  batch_size: Optional[int] = None, progress: Optional[bool] = None,
                  images: Optional[Sequence[Any]] = None) -> Path:
    """Sample every ``(prompt, seed)`` with the config's evaluation settings (:func:`eval_settings`)
    and write one PNG each (:func:`sample_file_name`) and ``scores.csv`` (prompt, seed, file, every
    configured reward, total) to ``out``. ``seeds``: a count N (seeds 0..N-1) or a list. Images are
    written batch by batch (memory stays bounded for long prompt lists); a progress bar runs when
    stderr is a terminal. ``images``: one source image per prompt (editing models). Returns ``out``."""
    try:
        prompts = check_prompts(prompts)
        seeds = check_seeds(seeds)
    except ValueError as e:
        raise UsageError(str(e)) from None
    check_image_model(cfg)
    if checkpoint is not None:
        check_checkpoint(checkpoint)
    out = writable_dir(out, "output folder")
    reward = reward if reward is not None else reward_from_config(cfg)
    policy = build_policy(cfg, checkpoint)
    settings = eval_settings(cfg)
    if batch_size is not None:
        settings["batch_size"] = int(batch_size)
    bar = progress_bar(len(prompts) * len(seeds), "sampling", progress)
    rows: List[Dict[str, Any]] = []
    names: List[str] = []
    totals, valids = [], []
    comp_parts: Dict[str, List[Tensor]] = {}
    try:
        for b in sample_batches(policy, prompts, seeds, reward, bar=bar, sources=None if images is None else list(images),
                                **settings):
            names = list(b.scores)
            for j, (p, s) in enumerate(zip(b.prompts, b.seeds)):
                idx = (b.start + j) // len(seeds)
                fname = sample_file_name(idx, p, s, len(prompts))
                save_png(to_pil(b.images[j]), out / fname)
                row = {"prompt": p, "seed": s, "file": fname, "total": csv_value(float(b.total[j]))}
                row.update({k: csv_value(float(v[j])) for k, v in b.scores.items()})
                rows.append(row)
            totals.append(b.total)
            valids.append(b.valid)
            for k, v in b.scores.items():
                comp_parts.setdefault(k, []).append(v)
    finally:
        if bar is not None:
            bar.close()
    write_scores_csv(out / SCORES_NAME, rows, ["prompt", "seed", "file", *names, "total"])
    valid = torch.cat(valids)
    means = {k: masked_mean(torch.cat(v), valid) for k, v in comp_parts.items()}
    means["total"] = masked_mean(torch.cat(totals), valid)
    logger.info("mean scores over %d valid of %d images: %s", int(valid.sum()), valid.numel(),
                ", ".join(f"{k} {format_score(v)}" for k, v in means.items()))
    return out


# --------------------------------------------------------------------------------------------------
# flowrl grid
# --------------------------------------------------------------------------------------------------


def add_grid_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of ``flowrl grid``."""
    p.add_argument("config", help="YAML run config")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (flowrl checkpoint or diffusers LoRA)")
    p.add_argument("--prompts", required=True, help="text file, one prompt per line, or a .jsonl with 'prompt' "
                   "(and, for editing models, 'image') columns")
    p.add_argument("--out", required=True, help="output folder for grid.png, index.html, scores.csv")
    p.add_argument("--seeds", type=int, default=1, help="images per prompt (seeds 0..N-1)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per sampling call (default: prompts_per_step x group_size)")
    p.add_argument("--pairs-per-row", type=int, default=None, help="base/tuned pairs per grid row (default: up to 4)")
    return p


def run_grid(args: argparse.Namespace) -> Tuple[Path, Path]:
    """``flowrl grid``: evaluate the config's model before and after loading ``--checkpoint`` on the
    same prompts and seeds, and write the side-by-side grid, the HTML page and the scores."""
    cfg = load_run_config(args.config, args.overrides)
    prompts, images = read_prompt_file(args.prompts)  # editing records give source | base | tuned
    if args.seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {args.seeds}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.pairs_per_row is not None and args.pairs_per_row < 1:
        raise UsageError(f"--pairs-per-row must be >= 1, got {args.pairs_per_row}")
    check_image_model(cfg)
    ckpt = check_checkpoint(args.checkpoint)  # a damaged or half-written checkpoint fails before any model loads
    out = writable_dir(args.out, "--out")
    reward = reward_from_config(cfg)
    policy = load_policy(cfg)
    check_checkpoint_fits(policy, ckpt)  # a checkpoint of another model fails before the base is sampled
    settings = eval_settings(cfg)
    if args.batch_size is not None:
        settings["batch_size"] = args.batch_size
    seeds = list(range(args.seeds))
    base = evaluate_policy(policy, prompts, seeds, reward=reward, images=images, **settings)
    logger.info("loaded %s", apply_checkpoint(policy, ckpt))
    tuned = evaluate_policy(policy, prompts, seeds, reward=reward, images=images, **settings)
    return write_comparison(out, base, tuned, labels=("base", f"tuned: {ckpt.name}"),
                            title=f"{ckpt.name} vs base", pairs_per_row=args.pairs_per_row)


def grid_command(argv: Optional[Sequence[str]] = None) -> int:
    """``flowrl grid CONFIG [overrides] --checkpoint DIR --prompts FILE --out DIR [--seeds N]``."""
    p = add_grid_arguments(ArgumentParser(
        prog="flowrl grid", description="Side-by-side grid of the base model and a checkpoint (PNG + HTML)."))
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    png, page = run_grid(args)
    logger.info("wrote %s and %s", png, page)
    return 0
