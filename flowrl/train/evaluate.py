"""Held-out evaluation of a flow policy: sample fixed prompts and seeds, score them, summarise.

Evaluation follows Flow-GRPO's protocol (Liu et al., arXiv 2505.05470; research notes, flow_anchors
§1.3): a deterministic ODE sampler (:func:`flowrl.flow.plan.eval_plan`) with more steps than
training ("denoising reduction": train 10, evaluate 40), fixed seeds, and every configured reward
scored on the held-out prompts, with GenEval-style per-category numbers where the scorer offers
them (GenEval, arXiv 2310.11513).

Seeds. Image ``(prompt p, seed s)`` starts from the noise of its own CPU generator
``torch.Generator().manual_seed(s)``, exactly the noise a diffusers pipeline draws for one image
with ``generator=torch.Generator().manual_seed(s)`` (so not a :mod:`flowrl.core.rng` stream: an
evaluation seed means what it means in diffusers, and a reported image can be redrawn there). The
noise of a row therefore does not depend on which other rows share its batch, so evaluations with
different batch sizes (or on different machines) start from identical latents; every prompt sees
the same ``S`` starting points, which makes base-vs-tuned comparisons paired. A prompt listed more
than once (a category with fewer held-out prompts than its share of a balanced draw) gets new seeds
for every repeat (:func:`prompt_seeds`), so its repeats are new images rather than copies.

Rows of every result are prompt-major: row ``p * S + s`` is prompt ``p`` with seed
``prompt_seeds(prompts, seeds)[p][s]`` (``seeds[s]`` for a prompt's first occurrence). Grids are
drawn by :mod:`flowrl.train.grids`, written to a run folder by :mod:`flowrl.train.runfolder`;
``flowrl sample`` and ``flowrl grid`` live in :mod:`flowrl.commands`.
"""
from __future__ import annotations

import contextlib
import logging
import inspect
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from flowrl.inputs import UsageError

logger = logging.getLogger(__name__)

__all__ = [
    "EvalResult",
    "evaluate_policy",
    "evaluate_from_config",
    "eval_settings",
    "eval_prompts",
    "prompt_source",
    "prompt_seeds",
    "reward_from_config",
    "load_policy",
    "build_policy",
    "sample_batches",
    "masked_mean",
]

DEFAULT_REWARDS: Dict[str, float] = {"shapes": 1.0}
DEFAULT_EVAL_PROMPTS = "shapes:test"

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
    sources: Optional[List[Any]] = None  # one source image per prompt (editing runs), else None

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
        return [f"{p}\nseed {s}, {key} {format_score(float(values[i]))}"
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


def format_score(x: float) -> str:
    """A score as captions and pages show it: 3 decimals, 4 significant digits from 1000 on."""
    if not math.isfinite(x):
        return "nan"
    return f"{x:.3f}" if abs(x) < 1000 else f"{x:.4g}"


def format_delta(x: float) -> str:
    """A change of a score, signed, as :func:`format_score`."""
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


def check_prompts(prompts: Sequence[str]) -> List[str]:
    """``prompts`` as a list (non-empty, strings only); ValueError otherwise."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts: must be a non-empty list of strings")
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts: every prompt must be a string")
    return list(prompts)


def check_seeds(seeds: Union[int, Sequence[int]]) -> List[int]:
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


def _score(reward: RewardLike, images: Tensor, prompts: List[str],
           sources: Optional[List[Any]] = None) -> Tuple[Dict[str, Tensor], Tensor, Tensor, Dict[str, float]]:
    """(components, total, valid, weights) of a :class:`scorers.multi.MultiReward` (anything returning
    a ``Rewards``) or of a plain scorer callable returning ``[N]`` scores (one component, weight 1,
    named by its ``name`` attribute). ``sources``: each row's source image (editing), given to the
    reward as the ``image`` column, as training gives a record's columns."""
    out = reward(images, prompts) if sources is None else reward(images, prompts, image=sources)
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


def _details(reward: RewardLike, images: Tensor, prompts: List[str], sources: Optional[List[Any]] = None) -> Dict[str, float]:
    """``"<scorer>/<key>"`` → number, from every scorer of ``reward`` that has an evaluator (given each
    row's source image as ``image=`` when there are sources and the evaluator takes them)."""
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
            takes_sources = sources is not None and "image" in inspect.signature(fn).parameters
            summary = fn(images, prompts, image=sources) if takes_sources else fn(images, prompts)
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
    video = getattr(cfg, "video", None)
    frames = {"score_frames": video.score_frames, "every_k": video.every_k} if video is not None else {}
    try:
        return MultiReward(weights, device=device, options=options, **frames)
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


def sample_batches(policy: Any, prompts: List[str], seeds: List[int], reward: RewardLike, *, num_steps: int,
                   height: int, width: int, guidance_scale: float, negative_prompt: str, batch_size: int,
                   chunk_size: Optional[int], bar: Any = None, sources: Optional[List[Any]] = None) -> Iterator[_Batch]:
    """Sample and score ``prompts × seeds`` in batches of whole prompts (about ``batch_size`` rows);
    ``sources``: one source image per prompt (editing models)."""
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
            row_sources = None if sources is None else [im for im in sources[a:a + per_batch] for _ in seeds]
            # every row is its own "prompt" with its own generator (the sampler takes one generator
            # per prompt): the noise of (prompt, seed) is manual_seed(seed)'s, whatever the batch
            gens = [torch.Generator("cpu").manual_seed(s) for s in row_seeds]
            r = sample(policy, row_prompts, plan, group_size=1, height=height, width=width,
                       guidance_scale=guidance_scale, generator=gens, negative_prompt=negative_prompt,
                       store_means=False, chunk_size=min(chunk_size or rows_per_call, rows_per_call), progress=False,
                       **({} if row_sources is None else {"images": row_sources}))
            images = r.images.detach().to("cpu", torch.float32)
            comps, total, valid, weights = _score(reward, images, row_prompts, row_sources)
            if bar is not None:
                bar.update(len(row_prompts))
            yield _Batch(a * S, row_prompts, row_seeds, images, comps, total, valid,
                         weights, int(r.nfe))


def progress_bar(total: int, desc: str, progress: Optional[bool]):
    """A tqdm bar over ``total`` images (None: when stderr is a terminal), else None."""
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
    images: Optional[Sequence[Any]] = None,
) -> EvalResult:
    """Sample every ``(prompt, seed)`` with the deterministic ``num_steps``-step ODE plan and score it.

    ``seeds``: a list of seeds, or a count N (seeds 0..N-1); image ``(p, s)`` starts from
    ``torch.Generator().manual_seed(s)`` noise (module doc), so the result does not depend on
    ``batch_size`` (rows per sampling call, rounded to whole prompts) or ``chunk_size`` (rows per
    transformer call) beyond float rounding. ``reward``: a :class:`scorers.multi.MultiReward` or any
    scorer callable ``(images, prompts) -> [N]``. The transformer runs in eval mode (its previous
    mode is restored). ``progress``: tqdm bar over images (None: when stderr is a terminal).
    ``images`` (editing models): one source image per prompt; kept in the result's ``sources``.
    """
    prompts = check_prompts(prompts)
    if images is not None and (isinstance(images, (str, bytes)) or len(images) != len(prompts)):
        raise ValueError(f"images: give one source image per prompt ({len(prompts)})")
    seeds = check_seeds(seeds)
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps: must be an int >= 1, got {num_steps!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: must be an int >= 1, got {batch_size!r}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size: must be >= 1 or None, got {chunk_size!r}")
    t0 = time.perf_counter()
    images_src = images
    bar = progress_bar(len(prompts) * len(seeds), "evaluating", progress)
    parts: List[_Batch] = []
    try:
        for b in sample_batches(policy, prompts, seeds, reward, num_steps=num_steps, height=height, width=width,
                          guidance_scale=float(guidance_scale), negative_prompt=negative_prompt,
                          batch_size=batch_size, chunk_size=chunk_size, bar=bar,
                          sources=None if images is None else list(images)):
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
    row_sources = None if images_src is None else [im for im in images_src for _ in seeds]
    details = _details(reward, images, row_prompts, row_sources)
    return EvalResult(
        prompts=prompts, seeds=seeds, images=images, scores=scores, total=total, valid=valid,
        weights=dict(parts[0].weights), means=means, details=details, nfe=sum(b.nfe for b in parts),
        num_steps=num_steps, guidance_scale=float(guidance_scale), height=int(images.shape[-2]),
        width=int(images.shape[-1]), wall_clock_s=time.perf_counter() - t0,
        sources=None if images_src is None else list(images_src),
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


def check_image_model(cfg: Any) -> None:
    """UsageError unless ``cfg.model`` is an image model (sampling and grids need one)."""
    from flowrl.flow.models import FAMILIES  # the image families (cheap: no diffusers import)

    family = getattr(cfg.model, "family", "sd3")
    if family not in FAMILIES:
        raise UsageError(f"model.family is {family!r}: image sampling needs an image model ({', '.join(FAMILIES)})")


def load_policy(cfg: Any, checkpoint: Optional[Union[str, Path]] = None):
    """The flow policy of ``cfg.model``, with ``checkpoint`` loaded when given (checked before the
    model is built, so a wrong path or a damaged checkpoint fails fast)."""
    from flowrl.train.model import check_checkpoint

    check_image_model(cfg)
    if checkpoint is not None:
        check_checkpoint(checkpoint)
    return build_policy(cfg, checkpoint)


def build_policy(cfg: Any, checkpoint: Optional[Union[str, Path]] = None):
    """The flow policy of ``cfg.model`` with ``checkpoint`` applied, unchecked (:func:`load_policy` checks)."""
    from flowrl.train.model import apply_checkpoint, apply_video_settings, build_flow_policy

    policy = build_flow_policy(cfg.model)
    apply_video_settings(policy, getattr(cfg, "video", None))
    if checkpoint is not None:
        logger.info("loaded %s", apply_checkpoint(policy, checkpoint))
    return policy


def _first_line(e: BaseException) -> str:
    """An exception's first line, cut to 300 characters (it may quote a prompt of any length)."""
    from scorers._text import short

    text = str(e)
    return short(text.splitlines()[0], 300) if text else ""
