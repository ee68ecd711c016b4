"""Held-out evaluation of a flow policy, captioned image grids, ``flowrl sample`` and ``flowrl grid``.

Evaluation follows Flow-GRPO's protocol (Liu et al., arXiv 2505.05470; research notes, flow_anchors
§1.3): a deterministic ODE sampler (:func:`flowrl.flow.plan.eval_plan`) with more steps than
training ("denoising reduction": train 10, evaluate 40), fixed seeds, and every configured reward
scored on the held-out prompts, with GenEval-style per-category numbers where the scorer offers
them (GenEval, arXiv 2310.11513).

Seeds. Image ``(prompt p, seed s)`` starts from the noise of its own CPU generator
``torch.Generator().manual_seed(s)``, exactly the noise a diffusers pipeline draws for one image
with ``generator=torch.Generator().manual_seed(s)``. The noise of a row therefore does not depend on
which other rows share its batch, so evaluations with different batch sizes (or on different
machines) start from identical latents; every prompt sees the same ``S`` starting points, which
makes base-vs-tuned comparisons paired. A prompt listed more than once (a category with fewer
held-out prompts than its share of a balanced draw) gets new seeds for every repeat
(:func:`prompt_seeds`), so its repeats are new images rather than copies.

Layout of a run folder's evaluations (written by :func:`save_eval`, read by
:mod:`flowrl.train.report`)::

    <run>/eval.jsonl                        one JSON object per evaluation (see EvalResult.summary)
    <run>/eval/step-00000050/grid.png       the captioned grid of that evaluation
    <run>/eval/step-00000050/scores.csv     prompt, seed, every reward, total

Rows of every result are prompt-major: row ``p * S + s`` is prompt ``p`` with seed
``prompt_seeds(prompts, seeds)[p][s]`` (``seeds[s]`` for a prompt's first occurrence).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import html
import json
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from flowrl.inputs import ArgumentParser, UsageError, read_prompts, writable_dir

logger = logging.getLogger(__name__)

__all__ = [
    "EvalResult",
    "evaluate_policy",
    "evaluate_from_config",
    "eval_settings",
    "eval_prompts",
    "prompt_source",
    "reward_from_config",
    "load_policy",
    "image_grid",
    "side_by_side",
    "save_eval",
    "eval_dir",
    "sample_to_dir",
    "write_comparison",
    "add_grid_arguments",
    "run_grid",
    "grid_command",
    "EVAL_DIR",
    "EVAL_LOG",
    "GRID_NAME",
]

EVAL_DIR = "eval"  # <run>/eval/step-XXXXXXXX/
EVAL_LOG = "eval.jsonl"  # <run>/eval.jsonl
GRID_NAME = "grid.png"
SCORES_NAME = "scores.csv"
DEFAULT_REWARDS: Dict[str, float] = {"shapes": 1.0}
DEFAULT_EVAL_PROMPTS = "shapes:test"

PAD = 4  # pixels around every image of a grid
MIN_SIDE = 128  # images whose longer side is smaller are upscaled (NEAREST, integer factor) to at least this
MAX_SIDE = 512  # images whose longer side is larger are downscaled to this
CAPTION_LINES = 3  # text lines under each image of a grid
BACKGROUND = (255, 255, 255)
TEXT_COLOR = (20, 20, 20)
ELLIPSIS = "..."

RewardLike = Union[Callable[..., Any], Any]


# --------------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------------


def _finite_or_none(x: float) -> Optional[float]:
    return float(x) if x is not None and math.isfinite(float(x)) else None


@dataclass
class EvalResult:
    """One evaluation: ``P`` prompts × ``S`` seeds, rows prompt-major (row ``p*S + s``).

    ``scores``: reward name → ``[P*S]`` raw scores (NaN where that scorer failed); ``total``: the
    weighted sum (NaN where not ``valid``); ``means``: reward name (and ``"total"``) → mean over the
    valid samples; ``details``: ``"<reward>/<key>"`` → value from the scorer's ``evaluate`` (e.g.
    ``"shapes/accuracy/position"``); ``nfe``: velocity evaluations over all images (a CFG pair
    counts once, as in :class:`flowrl.flow.sampler.Rollout`).
    """

    prompts: List[str]
    seeds: List[int]
    images: Tensor  # [P*S, 3, H, W] float32 in [0, 1], on CPU
    scores: Dict[str, Tensor]
    total: Tensor
    valid: Tensor
    weights: Dict[str, float]
    means: Dict[str, float]
    details: Dict[str, float] = field(default_factory=dict)
    nfe: int = 0
    num_steps: int = 0
    guidance_scale: float = 0.0
    height: int = 0
    width: int = 0
    wall_clock_s: float = 0.0

    @property
    def num_images(self) -> int:
        return len(self.prompts) * len(self.seeds)

    @property
    def nfe_per_image(self) -> float:
        return self.nfe / max(1, self.num_images)

    def row_prompts(self) -> List[str]:
        """The prompt of every row."""
        return [p for p in self.prompts for _ in self.seeds]

    def row_seeds(self) -> List[int]:
        """The seed of every row (:func:`prompt_seeds`)."""
        return [s for ss in prompt_seeds(self.prompts, self.seeds) for s in ss]

    def headline(self) -> Tuple[str, Tensor]:
        """The score shown in captions: ``("total", total)``, or the one reward's own name and scores."""
        return ("total", self.total) if len(self.scores) != 1 else next(iter(self.scores.items()))

    def captions(self) -> List[str]:
        """Grid captions ``"<prompt>\nseed 3, total 0.512"``: the score line is kept whole when the
        prompt is trimmed (:func:`caption_lines`)."""
        key, values = self.headline()
        return [f"{p}\nseed {s}, {key} {_fmt(float(values[i]))}"
                for i, (p, s) in enumerate(zip(self.row_prompts(), self.row_seeds()))]

    def summary(self) -> Dict[str, Any]:
        """JSON-able record of this evaluation (no images; NaN written as null)."""
        return {
            "means": {k: _finite_or_none(v) for k, v in self.means.items()},
            "details": {k: _finite_or_none(v) for k, v in self.details.items()},
            "weights": dict(self.weights),
            "num_prompts": len(self.prompts),
            "seeds": list(self.seeds),
            "num_images": self.num_images,
            "num_invalid": int((~self.valid).sum()),
            "nfe": int(self.nfe),
            "nfe_per_image": self.nfe_per_image,
            "num_steps": self.num_steps,
            "guidance_scale": self.guidance_scale,
            "height": self.height,
            "width": self.width,
            "wall_clock_s": self.wall_clock_s,
        }


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return "nan"
    return f"{x:.3f}" if abs(x) < 1000 else f"{x:.4g}"


def _fmt_delta(x: float) -> str:
    if not math.isfinite(x):
        return "nan"
    return f"{x:+.3f}" if abs(x) < 1000 else f"{x:+.4g}"


def masked_mean(x: Tensor, mask: Tensor) -> float:
    """``Σ_i m_i x_i / Σ_i m_i`` in float64 over the samples with ``m_i`` true and ``x_i`` finite;
    NaN when none is left."""
    x = x.detach().to("cpu", torch.float64).reshape(-1)
    keep = mask.detach().cpu().reshape(-1).bool() & torch.isfinite(x)
    return float(x[keep].mean()) if bool(keep.any()) else math.nan


# --------------------------------------------------------------------------------------------------
# Checks and rewards
# --------------------------------------------------------------------------------------------------


def _check_prompts(prompts: Sequence[str]) -> List[str]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts: must be a non-empty list of strings")
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts: every prompt must be a string")
    return list(prompts)


def _check_seeds(seeds: Union[int, Sequence[int]]) -> List[int]:
    """``N`` → seeds ``0..N-1``; a list → itself (non-empty, distinct, non-negative ints)."""
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds < 1:
            raise ValueError(f"seeds: need at least one seed, got {seeds}")
        return list(range(seeds))
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence) or len(seeds) == 0:
        raise ValueError(f"seeds: must be a count >= 1 or a non-empty list of ints, got {seeds!r}")
    out = []
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ValueError(f"seeds: every seed must be an int >= 0, got {s!r}")
        out.append(int(s))
    if len(set(out)) != len(out):
        raise ValueError(f"seeds: seeds must be distinct, got {out}")
    return out


def _score(reward: RewardLike, images: Tensor, prompts: List[str]) -> Tuple[Dict[str, Tensor], Tensor, Tensor, Dict[str, float]]:
    """(components, total, valid, weights) of a :class:`scorers.multi.MultiReward` (anything returning
    a ``Rewards``) or of a plain scorer callable returning ``[N]`` scores (one component, weight 1,
    named by its ``name`` attribute)."""
    out = reward(images, prompts)
    n = len(prompts)
    if hasattr(out, "components") and hasattr(out, "total") and hasattr(out, "valid"):
        comps = {k: v.detach().to("cpu", torch.float32).reshape(-1) for k, v in out.components.items()}
        weights = dict(getattr(out, "weights", None) or {k: 1.0 for k in comps})
        return comps, out.total.detach().to("cpu", torch.float32).reshape(-1), out.valid.detach().cpu().reshape(-1).bool(), weights
    t = torch.as_tensor(out).detach().to("cpu", torch.float32).reshape(-1)
    if t.numel() != n:
        raise ValueError(f"reward: returned {t.numel()} scores for {n} images")
    name = str(getattr(reward, "name", None) or "reward")
    valid = torch.isfinite(t)
    return {name: t}, torch.where(valid, t, torch.full_like(t, math.nan)), valid, {name: 1.0}


def _evaluator_of(scorer: Any) -> Optional[Callable[[Any, List[str]], Mapping[str, Any]]]:
    """The per-category summary function of a scorer: its ``evaluate(images, prompts)`` method
    (the ``shapes`` scorer has one), or None."""
    fn = getattr(scorer, "evaluate", None)
    return fn if callable(fn) else None


def _details(reward: RewardLike, images: Tensor, prompts: List[str]) -> Dict[str, float]:
    """``"<scorer>/<key>"`` → number, from every scorer of ``reward`` that has an evaluator."""
    scorers = getattr(reward, "scorers", None)
    if isinstance(scorers, Mapping):
        items = list(scorers.items())
    else:
        items = [(str(getattr(reward, "name", None) or "reward"), reward)]
    out: Dict[str, float] = {}
    for name, scorer in items:
        fn = _evaluator_of(scorer)
        if fn is None:
            continue
        try:
            summary = fn(images, prompts)
        except (ValueError, TypeError, RuntimeError) as e:
            logger.warning("%s: no per-category numbers (%s: %s)", name, type(e).__name__, _first_line(e))
            continue
        for k, v in dict(summary).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"{name}/{k}"] = float(v)
    return out


def reward_from_config(cfg: Any, weights: Optional[Mapping[str, float]] = None,
                       options: Optional[Mapping[str, Mapping[str, Any]]] = None, device: Optional[str] = None):
    """The :class:`scorers.multi.MultiReward` of a run config: ``weights`` (else ``cfg.rewards``, else
    ``{"shapes": 1.0}``) and ``options`` (else ``cfg.reward_options``) on ``device`` (else
    ``cfg.model.device``). A prompt outside the ``shapes`` grammar scores NaN (that sample is marked
    invalid) instead of failing its batch, unless ``options["shapes"]`` says otherwise."""
    from scorers.multi import MultiReward

    weights = dict(weights if weights is not None else (getattr(cfg, "rewards", None) or DEFAULT_REWARDS))
    options = {k: dict(v) for k, v in dict(options if options is not None else (getattr(cfg, "reward_options", None) or {})).items()}
    if "shapes" in weights:
        options.setdefault("shapes", {}).setdefault("on_invalid_prompt", "nan")
    device = device or getattr(getattr(cfg, "model", None), "device", None) or "cpu"
    try:
        return MultiReward(weights, device=device, options=options)
    except (ValueError, TypeError) as e:
        raise UsageError(f"rewards: {_first_line(e)}") from None


# --------------------------------------------------------------------------------------------------
# Sampling and scoring in batches
# --------------------------------------------------------------------------------------------------


def prompt_seeds(prompts: Sequence[str], seeds: Sequence[int]) -> List[List[int]]:
    """The seeds of each prompt: ``seeds`` for a prompt's first occurrence, and for its ``j``-th repeat
    ``seeds`` shifted by ``j * (max(seeds) + 1)``, so that a repeated prompt is sampled from new noise.

    >>> prompt_seeds(["a", "b", "a"], [0, 1])
    [[0, 1], [0, 1], [2, 3]]
    """
    stride = max(seeds) + 1
    seen: Dict[str, int] = {}
    out = []
    for p in prompts:
        j = seen.get(p, 0)
        seen[p] = j + 1
        out.append([s + j * stride for s in seeds])
    return out


@dataclass
class _Batch:
    start: int  # first row
    prompts: List[str]  # one per row
    seeds: List[int]  # one per row
    images: Tensor
    scores: Dict[str, Tensor]
    total: Tensor
    valid: Tensor
    weights: Dict[str, float]
    nfe: int


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """``module.eval()`` inside the block, its previous mode restored after it."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _batches(policy: Any, prompts: List[str], seeds: List[int], reward: RewardLike, *, num_steps: int, height: int,
             width: int, guidance_scale: float, negative_prompt: str, batch_size: int, chunk_size: Optional[int],
             bar: Any = None) -> Iterator[_Batch]:
    """Sample and score ``prompts × seeds`` in batches of whole prompts (about ``batch_size`` rows)."""
    from flowrl.flow.plan import eval_plan
    from flowrl.flow.sampler import sample

    plan = eval_plan(num_steps)
    S = len(seeds)
    per_batch = max(1, batch_size // S)
    rows_per_call = min(batch_size, per_batch * S)
    transformer = getattr(policy, "transformer", None)
    ctx = _eval_mode(transformer) if isinstance(transformer, torch.nn.Module) else contextlib.nullcontext()
    all_seeds = prompt_seeds(prompts, seeds)
    with ctx:
        for a in range(0, len(prompts), per_batch):
            chunk = prompts[a:a + per_batch]
            row_prompts = [p for p in chunk for _ in seeds]
            row_seeds = [s for ss in all_seeds[a:a + per_batch] for s in ss]
            # every row is its own "prompt" with its own generator (the sampler takes one generator
            # per prompt): the noise of (prompt, seed) is manual_seed(seed)'s, whatever the batch
            gens = [torch.Generator("cpu").manual_seed(s) for s in row_seeds]
            r = sample(policy, row_prompts, plan, group_size=1, height=height, width=width,
                       guidance_scale=guidance_scale, generator=gens, negative_prompt=negative_prompt,
                       store_means=False, chunk_size=min(chunk_size or rows_per_call, rows_per_call), progress=False)
            images = r.images.detach().to("cpu", torch.float32)
            comps, total, valid, weights = _score(reward, images, row_prompts)
            if bar is not None:
                bar.update(len(row_prompts))
            yield _Batch(a * S, row_prompts, row_seeds, images, comps, total, valid,
                         weights, int(r.nfe))


def _progress(total: int, desc: str, progress: Optional[bool]):
    enabled = sys.stderr.isatty() if progress is None else bool(progress)
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", leave=False)


def evaluate_policy(
    policy: Any,
    prompts: Sequence[str],
    seeds: Union[int, Sequence[int]],
    *,
    num_steps: int,
    height: int,
    width: int,
    guidance_scale: float,
    negative_prompt: str = "",
    reward: RewardLike,
    batch_size: int = 16,
    chunk_size: Optional[int] = None,
    progress: Optional[bool] = None,
) -> EvalResult:
    """Sample every ``(prompt, seed)`` with the deterministic ``num_steps``-step ODE plan and score it.

    ``seeds``: a list of seeds, or a count N (seeds 0..N-1); image ``(p, s)`` starts from
    ``torch.Generator().manual_seed(s)`` noise (module doc), so the result does not depend on
    ``batch_size`` (rows per sampling call, rounded to whole prompts) or ``chunk_size`` (rows per
    transformer call) beyond float rounding. ``reward``: a :class:`scorers.multi.MultiReward` or any
    scorer callable ``(images, prompts) -> [N]``. The transformer runs in eval mode (its previous
    mode is restored). ``progress``: tqdm bar over images (None: when stderr is a terminal).
    """
    prompts = _check_prompts(prompts)
    seeds = _check_seeds(seeds)
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps: must be an int >= 1, got {num_steps!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: must be an int >= 1, got {batch_size!r}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size: must be >= 1 or None, got {chunk_size!r}")
    t0 = time.perf_counter()
    bar = _progress(len(prompts) * len(seeds), "evaluating", progress)
    parts: List[_Batch] = []
    try:
        for b in _batches(policy, prompts, seeds, reward, num_steps=num_steps, height=height, width=width,
                          guidance_scale=float(guidance_scale), negative_prompt=negative_prompt,
                          batch_size=batch_size, chunk_size=chunk_size, bar=bar):
            parts.append(b)
    finally:
        if bar is not None:
            bar.close()
    names = list(parts[0].scores)
    scores = {k: torch.cat([b.scores[k] for b in parts]) for k in names}
    total = torch.cat([b.total for b in parts])
    valid = torch.cat([b.valid for b in parts])
    images = torch.cat([b.images for b in parts])
    means = {k: masked_mean(v, valid) for k, v in scores.items()}
    means["total"] = masked_mean(total, valid)
    row_prompts = [p for b in parts for p in b.prompts]
    details = _details(reward, images, row_prompts)
    return EvalResult(
        prompts=prompts, seeds=seeds, images=images, scores=scores, total=total, valid=valid,
        weights=dict(parts[0].weights), means=means, details=details, nfe=sum(b.nfe for b in parts),
        num_steps=num_steps, guidance_scale=float(guidance_scale), height=int(images.shape[-2]),
        width=int(images.shape[-1]), wall_clock_s=time.perf_counter() - t0,
    )


# --------------------------------------------------------------------------------------------------
# From a run config
# --------------------------------------------------------------------------------------------------


def prompt_source(source: str, num_prompts: Optional[int] = None, seed: int = 0) -> List[str]:
    """The prompts of a prompt source (see :func:`flowrl.train.data.load_records`: ``shapes:<split>``,
    ``arithmetic:<split>``, a ``.jsonl`` or a text file), at most ``num_prompts`` of them."""
    from flowrl.train.data import load_records

    return [r["prompt"] for r in load_records(source, limit=num_prompts, seed=seed)]


def eval_prompts(cfg: Any) -> List[str]:
    """The held-out prompts of a run config: ``cfg.eval.prompts`` or ``cfg.data.eval`` (default
    ``"shapes:test"``), ``cfg.eval.num_prompts`` of them, drawn with ``cfg.seed``."""
    ev = getattr(cfg, "eval", None)
    source = getattr(ev, "prompts", None) or getattr(getattr(cfg, "data", None), "eval", None) or DEFAULT_EVAL_PROMPTS
    return prompt_source(source, getattr(ev, "num_prompts", None), int(getattr(cfg, "seed", 0)))


def eval_settings(cfg: Any) -> Dict[str, Any]:
    """Keyword arguments of :func:`evaluate_policy` from a run config: ``sample.eval_num_steps``,
    ``sample.height/width``, ``eval.guidance_scale`` (None → ``sample.guidance_scale``),
    ``sample.negative_prompt``, ``batch_size = prompts_per_step × group_size`` (a training rollout's
    rows, which fit in memory), ``chunk_size = sample.chunk_size``."""
    s = cfg.sample
    gs = getattr(getattr(cfg, "eval", None), "guidance_scale", None)
    return dict(
        num_steps=int(s.eval_num_steps),
        height=int(s.height),
        width=int(s.width),
        guidance_scale=float(s.guidance_scale if gs is None else gs),
        negative_prompt=str(getattr(s, "negative_prompt", "") or ""),
        batch_size=max(1, int(getattr(s, "prompts_per_step", 1)) * int(getattr(s, "group_size", 1))),
        chunk_size=getattr(s, "chunk_size", None),
    )


def evaluate_from_config(policy: Any, cfg: Any, reward: Optional[RewardLike] = None,
                         prompts: Optional[Sequence[str]] = None, progress: Optional[bool] = None) -> EvalResult:
    """:func:`evaluate_policy` with everything taken from the run config (what the training loop
    calls every ``eval_every`` steps): :func:`eval_prompts`, ``cfg.eval.seeds`` (default [0]),
    :func:`eval_settings`, and :func:`reward_from_config` unless ``reward`` is given."""
    seeds = list(getattr(getattr(cfg, "eval", None), "seeds", None) or [0])
    return evaluate_policy(policy, list(prompts) if prompts is not None else eval_prompts(cfg), seeds,
                           reward=reward if reward is not None else reward_from_config(cfg),
                           progress=progress, **eval_settings(cfg))


def _check_image_model(cfg: Any) -> None:
    family = getattr(cfg.model, "family", "sd3")
    if family not in ("sd3", "flux"):
        raise UsageError(f"model.family is {family!r}: image sampling needs an image model ('sd3' or 'flux')")


def load_policy(cfg: Any, checkpoint: Optional[Union[str, Path]] = None):
    """The flow policy of ``cfg.model``, with ``checkpoint`` loaded when given (checked before the
    model is built, so a wrong path or a damaged checkpoint fails fast)."""
    from flowrl.train.model import check_checkpoint

    _check_image_model(cfg)
    if checkpoint is not None:
        check_checkpoint(checkpoint)
    return _build_policy(cfg, checkpoint)


def _build_policy(cfg: Any, checkpoint: Optional[Union[str, Path]] = None):
    from flowrl.train.model import apply_checkpoint, build_flow_policy

    policy = build_flow_policy(cfg.model)
    if checkpoint is not None:
        logger.info("loaded %s", apply_checkpoint(policy, checkpoint))
    return policy


# --------------------------------------------------------------------------------------------------
# Images and grids
# --------------------------------------------------------------------------------------------------


def to_pil(image: Tensor):
    """[3, H, W] float in [0, 1] → RGB PIL image, quantised as ``round(x · 255)`` (DDPO's rule)."""
    from PIL import Image

    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image: expected [3, H, W], got shape {tuple(image.shape)}")
    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, mode="RGB")


def _pil_list(images: Any) -> List[Any]:
    if isinstance(images, Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected [N, 3, H, W], got shape {tuple(images.shape)}")
        return [to_pil(x) for x in images]
    out = [im.convert("RGB") if hasattr(im, "convert") else None for im in images]
    if any(o is None for o in out):
        raise ValueError("images: expected a [N, 3, H, W] tensor or a list of PIL images")
    return out


def cell_size(height: int, width: int, min_side: int = MIN_SIDE, max_side: int = MAX_SIDE) -> Tuple[int, int]:
    """Displayed (height, width) of an image in a grid: an integer NEAREST upscale ``k = ⌈min_side /
    max(h, w)⌉`` when the longer side is below ``min_side`` (32 px → ×4 = 128 px), a downscale to
    ``max_side`` when it is above, else unchanged."""
    long = max(height, width)
    if long < min_side:
        k = -(-min_side // long)
        return height * k, width * k
    if long > max_side:
        f = max_side / long
        return max(1, round(height * f)), max(1, round(width * f))
    return height, width


def _font(font: Any = None):
    from PIL import ImageFont

    return font if font is not None else ImageFont.load_default()


def line_height(font: Any = None) -> int:
    """Pixels per caption line of ``font`` (the PIL default font when None)."""
    f = _font(font)
    box = f.getbbox("Agjy|")
    return int(box[3] - min(0, box[1])) + 2


def _text_width(font: Any, text: str) -> float:
    box = font.getbbox(text)
    return box[2] - box[0] if text else 0


def _wrap(text: str, font: Any, width: int) -> List[str]:
    """Greedy word wrap to ``width`` pixels; words longer than a line are cut by characters."""
    lines: List[str] = []
    line = ""
    for word in text.split():
        cand = f"{line} {word}" if line else word
        if _text_width(font, cand) <= width:
            line = cand
            continue
        if line:
            lines.append(line)
        while _text_width(font, word) > width and len(word) > 1:  # hard-break an over-long word
            cut = len(word) - 1
            while cut > 1 and _text_width(font, word[:cut]) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        line = word
    if line:
        lines.append(line)
    return lines


def _fit(line: str, font: Any, width: int) -> str:
    """``line`` shortened to end with '...' within ``width`` pixels."""
    while line and _text_width(font, line + ELLIPSIS) > width:
        line = line[:-1]
    return line.rstrip() + ELLIPSIS


def caption_lines(caption: str, font: Any, width: int, max_lines: int) -> List[str]:
    """The lines drawn for ``caption`` in a cell ``width`` pixels wide: its last paragraph (after the
    last newline: the scores) is kept, the text before it wrapped and trimmed with '...' into the
    lines left."""
    if max_lines < 1:
        return []
    head, sep, tail = caption.rpartition("\n")
    if not sep:
        head, tail = tail, ""
    tail_lines = _wrap(tail, font, width)[:max_lines] if tail else []
    room = max_lines - len(tail_lines)
    head_lines = _wrap(head, font, width)
    if len(head_lines) > room:
        head_lines = head_lines[:room]
        if head_lines:
            head_lines[-1] = _fit(head_lines[-1], font, width)
    return head_lines + tail_lines


def image_grid(
    images: Any,
    captions: Optional[Sequence[str]] = None,
    ncols: Optional[int] = None,
    *,
    min_side: int = MIN_SIDE,
    max_side: int = MAX_SIDE,
    lines: int = CAPTION_LINES,
    font: Any = None,
):
    """A PIL grid of ``images`` (a [N, 3, H, W] tensor in [0, 1] or PIL images of one size), row-major
    in ``ncols`` columns (default ⌈√N⌉), each with its caption under it (``lines`` lines, see
    :func:`caption_lines`).

    Every cell is ``(w' + 2·PAD) × (PAD + h' + PAD + lines·line_height + PAD)`` pixels, with
    ``(h', w') = cell_size(H, W)``; without captions the caption band is left out.
    """
    from PIL import Image, ImageDraw

    ims = _pil_list(images)
    n = len(ims)
    if n == 0:
        raise ValueError("images: need at least one image")
    sizes = {im.size for im in ims}
    if len(sizes) != 1:
        raise ValueError(f"images: all images of a grid must share one size, got {sorted(sizes)}")
    if captions is not None and len(captions) != n:
        raise ValueError(f"captions: got {len(captions)} captions for {n} images")
    if ncols is None:
        ncols = math.ceil(math.sqrt(n))
    if not isinstance(ncols, int) or ncols < 1:
        raise ValueError(f"ncols: must be an int >= 1, got {ncols!r}")
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    w, h = ims[0].size
    ch, cw = cell_size(h, w, min_side, max_side)
    f = _font(font)
    lh = line_height(f)
    band = (lines * lh + PAD) if captions is not None and lines > 0 else 0
    cell_w, cell_h = cw + 2 * PAD, ch + 2 * PAD + band
    grid = Image.new("RGB", (ncols * cell_w, nrows * cell_h), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    resample = Image.NEAREST if ch >= h else Image.LANCZOS
    for i, im in enumerate(ims):
        r, c = divmod(i, ncols)
        x0, y0 = c * cell_w, r * cell_h
        grid.paste(im if (ch, cw) == (h, w) else im.resize((cw, ch), resample), (x0 + PAD, y0 + PAD))
        if band:
            y = y0 + PAD + ch + PAD
            for line in caption_lines(captions[i], f, cw, lines):
                draw.text((x0 + PAD, y), line, fill=TEXT_COLOR, font=f)
                y += lh
    return grid


def side_by_side(base: EvalResult, tuned: EvalResult, labels: Tuple[str, str] = ("base", "tuned"),
                 pairs_per_row: Optional[int] = None, font: Any = None):
    """Grid of image pairs, base left and tuned right, for the same prompts and seeds; captions give
    the prompt, the seed and each side's score (the tuned side with its change), and a header names
    the two sides over every column."""
    from PIL import Image, ImageDraw

    if base.prompts != tuned.prompts or base.seeds != tuned.seeds:
        raise ValueError("base and tuned: must be evaluations of the same prompts and seeds")
    if base.images.shape != tuned.images.shape:
        raise ValueError(f"base and tuned: image shapes differ ({tuple(base.images.shape)} vs {tuple(tuned.images.shape)})")
    n = base.num_images
    pairs_per_row = min(n, 4) if pairs_per_row is None else pairs_per_row
    if not isinstance(pairs_per_row, int) or pairs_per_row < 1:
        raise ValueError(f"pairs_per_row: must be an int >= 1, got {pairs_per_row!r}")
    pairs_per_row = min(pairs_per_row, n)
    key, b_vals = base.headline()
    t_vals = tuned.total if key == "total" else tuned.scores[key]
    images = torch.stack([x for i in range(n) for x in (base.images[i], tuned.images[i])])
    captions = []
    for i, (p, s) in enumerate(zip(base.row_prompts(), base.row_seeds())):
        b, t = float(b_vals[i]), float(t_vals[i])
        captions.append(f"{p}\nseed {s}, {key} {_fmt(b)}")
        captions.append(f"{p}\n{key} {_fmt(t)} ({_fmt_delta(t - b)})")
    grid = image_grid(images, captions, ncols=2 * pairs_per_row, font=font)
    f = _font(font)
    header = line_height(f) + 2 * PAD
    out = Image.new("RGB", (grid.width, grid.height + header), BACKGROUND)
    out.paste(grid, (0, header))
    draw = ImageDraw.Draw(out)
    cell_w = grid.width // (2 * pairs_per_row)
    for c in range(2 * pairs_per_row):
        text = labels[c % 2]
        tw = _text_width(f, text)
        if tw > cell_w - 2 * PAD:
            text = _fit(text, f, cell_w - 2 * PAD)
            tw = _text_width(f, text)
        draw.text((c * cell_w + (cell_w - tw) / 2, PAD), text, fill=TEXT_COLOR, font=f)
    return out


def _save_png(image: Any, path: Path) -> Path:
    """Write a PNG atomically (temporary name, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def _write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def _csv_value(x: float) -> str:
    return f"{x:.6g}" if math.isfinite(x) else "nan"


def _write_scores_csv(path: Path, rows: List[Dict[str, Any]], columns: List[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow(r)
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------------
# In a run folder
# --------------------------------------------------------------------------------------------------


def eval_dir(run_dir: Union[str, Path], step: int) -> Path:
    """``<run>/eval/step-XXXXXXXX`` (8 digits, as checkpoints)."""
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step: must be an int >= 0, got {step!r}")
    return Path(run_dir) / EVAL_DIR / f"step-{step:08d}"


def save_eval(run_dir: Union[str, Path], step: int, result: EvalResult, ncols: Optional[int] = None) -> Path:
    """Write ``eval/step-XXXXXXXX/grid.png`` and ``scores.csv`` for ``result`` and append its
    :meth:`EvalResult.summary` (with ``step`` and the grid's path relative to the run) to
    ``<run>/eval.jsonl``. Returns the step's folder. Re-saving a step (after a resume) replaces its
    files; readers keep the last line of a step."""
    d = eval_dir(run_dir, step)
    ncols = ncols or min(result.num_images, max(len(result.seeds), math.ceil(math.sqrt(result.num_images))))
    _save_png(image_grid(result.images, result.captions(), ncols), d / GRID_NAME)
    columns = ["prompt", "seed", *result.scores, "total"]
    rows = []
    for i, (p, s) in enumerate(zip(result.row_prompts(), result.row_seeds())):
        row = {"prompt": p, "seed": s, "total": _csv_value(float(result.total[i]))}
        row.update({k: _csv_value(float(v[i])) for k, v in result.scores.items()})
        rows.append(row)
    _write_scores_csv(d / SCORES_NAME, rows, columns)
    record = {"step": int(step), **result.summary(), "grid": f"{EVAL_DIR}/{d.name}/{GRID_NAME}"}
    log_path = Path(run_dir) / EVAL_LOG
    with open(log_path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, allow_nan=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return d


def save_eval_result(path: Union[str, Path], step: int, result: EvalResult) -> Path:
    """Keep an evaluation for later comparison (the run's first one, for ``before_after/`` after a
    resume): images as 8-bit (what every grid shows: ``round(255 x)``), scores and the rest as
    safetensors metadata. Written atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"images": (result.images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).contiguous(),
               "total": result.total.detach().cpu().contiguous(), "valid": result.valid.detach().cpu().contiguous()}
    tensors.update({f"score/{k}": v.detach().cpu().contiguous() for k, v in result.scores.items()})
    meta = {"step": int(step), "prompts": result.prompts, "seeds": list(result.seeds), "weights": result.weights,
            "means": result.means, "details": result.details, "nfe": result.nfe, "num_steps": result.num_steps,
            "guidance_scale": result.guidance_scale, "height": result.height, "width": result.width,
            "wall_clock_s": result.wall_clock_s, "scores": list(result.scores)}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"flowrl_eval": json.dumps(meta)})
    os.replace(tmp, path)
    return path


def load_eval_result(path: Union[str, Path]) -> Tuple[int, EvalResult]:
    """``(step, result)`` written by :func:`save_eval_result` (images back in [0, 1])."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["flowrl_eval"])
        t = {k: f.get_tensor(k) for k in f.keys()}
    result = EvalResult(
        prompts=meta["prompts"], seeds=meta["seeds"], images=t["images"].float() / 255,
        scores={k: t[f"score/{k}"] for k in meta["scores"]}, total=t["total"], valid=t["valid"],
        weights=meta["weights"], means=meta["means"], details=meta["details"], nfe=meta["nfe"],
        num_steps=meta["num_steps"], guidance_scale=meta["guidance_scale"], height=meta["height"],
        width=meta["width"], wall_clock_s=meta["wall_clock_s"])
    return int(meta["step"]), result


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


def sample_to_dir(cfg: Any, prompts: Sequence[str], out: Union[str, Path], seeds: Union[int, Sequence[int]] = 1,
                  checkpoint: Optional[Union[str, Path]] = None, *, reward: Optional[RewardLike] = None,
                  batch_size: Optional[int] = None, progress: Optional[bool] = None) -> Path:
    """Sample every ``(prompt, seed)`` with the config's evaluation settings (:func:`eval_settings`)
    and write one PNG each (:func:`sample_file_name`) and ``scores.csv`` (prompt, seed, file, every
    configured reward, total) to ``out``. ``seeds``: a count N (seeds 0..N-1) or a list. Images are
    written batch by batch (memory stays bounded for long prompt lists); a progress bar runs when
    stderr is a terminal. Returns ``out``."""
    from flowrl.train.model import check_checkpoint

    try:
        prompts = _check_prompts(prompts)
        seeds = _check_seeds(seeds)
    except ValueError as e:
        raise UsageError(str(e)) from None
    _check_image_model(cfg)
    if checkpoint is not None:
        check_checkpoint(checkpoint)
    out = writable_dir(out, "output folder")
    reward = reward if reward is not None else reward_from_config(cfg)
    policy = _build_policy(cfg, checkpoint)
    settings = eval_settings(cfg)
    if batch_size is not None:
        settings["batch_size"] = int(batch_size)
    bar = _progress(len(prompts) * len(seeds), "sampling", progress)
    rows: List[Dict[str, Any]] = []
    names: List[str] = []
    totals, valids = [], []
    comp_parts: Dict[str, List[Tensor]] = {}
    try:
        for b in _batches(policy, prompts, seeds, reward, bar=bar, **settings):
            names = list(b.scores)
            for j, (p, s) in enumerate(zip(b.prompts, b.seeds)):
                idx = (b.start + j) // len(seeds)
                fname = sample_file_name(idx, p, s, len(prompts))
                _save_png(to_pil(b.images[j]), out / fname)
                row = {"prompt": p, "seed": s, "file": fname, "total": _csv_value(float(b.total[j]))}
                row.update({k: _csv_value(float(v[j])) for k, v in b.scores.items()})
                rows.append(row)
            totals.append(b.total)
            valids.append(b.valid)
            for k, v in b.scores.items():
                comp_parts.setdefault(k, []).append(v)
    finally:
        if bar is not None:
            bar.close()
    _write_scores_csv(out / SCORES_NAME, rows, ["prompt", "seed", "file", *names, "total"])
    valid = torch.cat(valids)
    means = {k: masked_mean(torch.cat(v), valid) for k, v in comp_parts.items()}
    means["total"] = masked_mean(torch.cat(totals), valid)
    logger.info("mean scores over %d valid of %d images: %s", int(valid.sum()), valid.numel(),
                ", ".join(f"{k} {_fmt(v)}" for k, v in means.items()))
    return out


# --------------------------------------------------------------------------------------------------
# flowrl grid
# --------------------------------------------------------------------------------------------------


def _table_rows(base: EvalResult, tuned: EvalResult) -> List[Tuple[str, float, float]]:
    keys = list(base.means)
    rows = [(k, base.means[k], tuned.means.get(k, math.nan)) for k in keys]
    for k in base.details:
        if k in tuned.details:
            rows.append((k, base.details[k], tuned.details[k]))
    return rows


def comparison_html(base: EvalResult, tuned: EvalResult, grid_file: str, labels: Tuple[str, str] = ("base", "tuned"),
                    title: str = "flowrl grid") -> str:
    """A static HTML page: the grid PNG by relative path and the table of mean scores (and
    per-category numbers), base vs tuned with the change."""
    esc = html.escape
    rows = []
    for k, b, t in _table_rows(base, tuned):
        rows.append(f"<tr><td>{esc(k)}</td><td>{_fmt(b)}</td><td>{_fmt(t)}</td><td>{_fmt_delta(t - b)}</td></tr>")
    settings = (f"{len(base.prompts)} prompts &times; {len(base.seeds)} seeds (seeds {esc(str(base.seeds))}), "
                f"{base.num_steps} ODE steps, guidance {base.guidance_scale:g}, {base.height}&times;{base.width} px, "
                f"{base.nfe_per_image:g} NFE per image; weights {esc(json.dumps(base.weights))}")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>body{{font-family:sans-serif;margin:1.5em;color:#222}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:.25em .6em;text-align:right}}td:first-child,th:first-child{{text-align:left}}
img{{max-width:100%;image-rendering:pixelated}}</style></head><body>
<h1>{esc(title)}</h1>
<p>{settings}</p>
<table id="means"><tr><th>score</th><th>{esc(labels[0])}</th><th>{esc(labels[1])}</th><th>change</th></tr>
{chr(10).join(rows)}
</table>
<p>Means over valid samples (invalid: {int((~base.valid).sum())} {esc(labels[0])}, {int((~tuned.valid).sum())} {esc(labels[1])}).</p>
<img src="{esc(grid_file, quote=True)}" alt="{esc(labels[0])} vs {esc(labels[1])}">
</body></html>
"""


def write_comparison(out: Union[str, Path], base: EvalResult, tuned: EvalResult,
                     labels: Tuple[str, str] = ("base", "tuned"), title: str = "flowrl grid",
                     pairs_per_row: Optional[int] = None) -> Tuple[Path, Path]:
    """Write ``grid.png`` (:func:`side_by_side`), ``index.html`` (:func:`comparison_html`) and
    ``scores.csv`` (prompt, seed, every reward and total for both sides) to ``out``; returns
    (png, html)."""
    out = writable_dir(out, "output folder")
    png = _save_png(side_by_side(base, tuned, labels, pairs_per_row), out / GRID_NAME)
    page = _write_text(out / "index.html", comparison_html(base, tuned, GRID_NAME, labels, title))
    keys = [*base.scores, "total"]
    columns = ["prompt", "seed"] + [f"{side}/{k}" for side in ("base", "tuned") for k in keys]
    rows = []
    for i, (p, s) in enumerate(zip(base.row_prompts(), base.row_seeds())):
        row: Dict[str, Any] = {"prompt": p, "seed": s}
        for side, r in (("base", base), ("tuned", tuned)):
            for k in keys:
                v = r.total if k == "total" else r.scores.get(k)
                row[f"{side}/{k}"] = _csv_value(float(v[i])) if v is not None else "nan"
        rows.append(row)
    _write_scores_csv(out / SCORES_NAME, rows, columns)
    return png, page


def add_grid_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of ``flowrl grid``."""
    p.add_argument("config", help="YAML run config")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (flowrl checkpoint or diffusers LoRA)")
    p.add_argument("--prompts", required=True, help="text file, one prompt per line")
    p.add_argument("--out", required=True, help="output folder for grid.png, index.html, scores.csv")
    p.add_argument("--seeds", type=int, default=1, help="images per prompt (seeds 0..N-1)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per sampling call (default: prompts_per_step x group_size)")
    p.add_argument("--pairs-per-row", type=int, default=None, help="base/tuned pairs per grid row (default: up to 4)")
    return p


def run_grid(args: argparse.Namespace) -> Tuple[Path, Path]:
    """``flowrl grid``: evaluate the config's model before and after loading ``--checkpoint`` on the
    same prompts and seeds, and write the side-by-side grid, the HTML page and the scores."""
    from flowrl.config import load_run_config
    from flowrl.train.model import apply_checkpoint, check_checkpoint, check_checkpoint_fits

    cfg = load_run_config(args.config, args.overrides)
    prompts = read_prompts(args.prompts)
    if args.seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {args.seeds}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.pairs_per_row is not None and args.pairs_per_row < 1:
        raise UsageError(f"--pairs-per-row must be >= 1, got {args.pairs_per_row}")
    _check_image_model(cfg)
    ckpt = check_checkpoint(args.checkpoint)  # a damaged or half-written checkpoint fails before any model loads
    out = writable_dir(args.out, "--out")
    reward = reward_from_config(cfg)
    policy = load_policy(cfg)
    check_checkpoint_fits(policy, ckpt)  # a checkpoint of another model fails before the base is sampled
    settings = eval_settings(cfg)
    if args.batch_size is not None:
        settings["batch_size"] = args.batch_size
    seeds = list(range(args.seeds))
    base = evaluate_policy(policy, prompts, seeds, reward=reward, **settings)
    logger.info("loaded %s", apply_checkpoint(policy, ckpt))
    tuned = evaluate_policy(policy, prompts, seeds, reward=reward, **settings)
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


main = grid_command  # `flowrl grid` through the CLI's pass-through table, or `python -m flowrl.train.evaluate`


def _first_line(e: BaseException) -> str:
    """An exception's first line, cut to 300 characters (it may quote a prompt of any length)."""
    from scorers._text import short

    text = str(e)
    return short(text.splitlines()[0], 300) if text else ""


if __name__ == "__main__":  # pragma: no cover
    from flowrl.cli import main as _cli_main

    sys.exit(_cli_main(["grid", *sys.argv[1:]]))

