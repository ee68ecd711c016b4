"""The ``shapes`` scorer: the image demo's verifiable reward, a GenEval-style check of synthetic scenes.

The scene grammar, renderer and checker live in :mod:`flowrl.demo.shapes`; this module only registers
:func:`flowrl.demo.shapes.check` as a scorer (partial-credit score, or GenEval's strict 0/1 correctness
with ``reward="strict"``), whose ``evaluate`` gives the per-category accuracies of evaluation reports.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence

import torch

from flowrl.demo.shapes import CheckerConfig, _as_spec, check, evaluate
from scorers.base import Scorer
from scorers.registry import register

logger = logging.getLogger(__name__)


class ShapesScorer(Scorer):
    """The ``shapes`` reward: :func:`check` per image, returning the partial-credit score
    (``reward="partial"``, default) or GenEval's strict correctness as 0/1 (``reward="strict"``).

    ``on_invalid_prompt``: ``"raise"`` (default) raises ValueError for a prompt outside the grammar;
    ``"nan"`` returns NaN for it, so the caller marks that sample invalid.
    """

    name = "shapes"

    def __init__(
        self, batch_size: int = 64, reward: str = "partial", on_invalid_prompt: str = "raise", cfg: Optional[CheckerConfig] = None
    ):
        super().__init__(device="cpu", dtype=torch.float32, batch_size=batch_size, differentiable=False)
        if reward not in ("partial", "strict"):
            raise ValueError(f"reward must be 'partial' or 'strict', got {reward!r}")
        if on_invalid_prompt not in ("raise", "nan"):
            raise ValueError(f"on_invalid_prompt must be 'raise' or 'nan', got {on_invalid_prompt!r}")
        self.reward = reward
        self.on_invalid_prompt = on_invalid_prompt
        self.cfg = cfg or CheckerConfig()

    def score_batch(self, images: torch.Tensor, prompts: List[str], **metadata) -> torch.Tensor:
        out = torch.empty(images.shape[0], dtype=torch.float32)
        arr = images.detach().to("cpu", torch.float64).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        for k, p in enumerate(prompts):
            try:
                spec = _as_spec(p)
            except ValueError as e:
                if self.on_invalid_prompt == "raise":
                    raise
                logger.warning("shapes: prompt outside the grammar, scored NaN: %s", e)
                out[k] = float("nan")
                continue
            r = check(arr[k], spec, self.cfg)
            out[k] = r.score if self.reward == "partial" else float(r.correct)
        return out

    def evaluate(self, images: Any, prompts_: Sequence[str]) -> Dict[str, float]:
        """Evaluation summary with per-GenEval-category accuracy (see :func:`evaluate`)."""
        return evaluate(images, prompts_, self.cfg)


@register("shapes")
def make_shapes_scorer(
    device="cpu",
    dtype=torch.float32,
    checkpoint=None,
    batch_size: int = 64,
    differentiable: bool = False,
    reward: str = "partial",
    on_invalid_prompt: str = "raise",
    **options,
) -> ShapesScorer:
    """Factory of the ``shapes`` scorer. It has no weights (``checkpoint`` must be None), runs on CPU
    whatever ``device`` says, and is not differentiable. ``options`` are :class:`CheckerConfig` fields."""
    if checkpoint is not None:
        raise ValueError(f"shapes: checkpoint must be None (the checker has no weights), got {checkpoint!r}")
    if differentiable:
        raise ValueError("shapes: differentiable=True is not supported (the checker is image analysis, not a network)")
    known = set(CheckerConfig.__dataclass_fields__)
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"shapes: unknown option(s) {unknown} (known: {sorted(known) + ['reward', 'on_invalid_prompt']})")
    return ShapesScorer(batch_size=batch_size, reward=reward, on_invalid_prompt=on_invalid_prompt, cfg=CheckerConfig(**options))
