"""The ``shapes_edit`` scorer: the demo's instruction-editing reward, checked from pixels.

Wraps :func:`flowrl.demo.shapes_edit.check_edit`: each edited image is scored against its instruction
(the prompt) applied to its source image, which the scorer receives as the ``image`` column (a path,
PIL image or [3, H, W] tensor per row), as training and evaluation give a record's columns.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence

import torch

from flowrl.demo.shapes import CheckerConfig
from flowrl.demo.shapes_edit import KINDS, check_edit, parse_instruction
from scorers.base import Scorer
from scorers.registry import register

logger = logging.getLogger(__name__)


class ShapesEditScorer(Scorer):
    """Partial credit (``reward="partial"``) or strict 0/1 correctness (``reward="strict"``) of an edit.
    ``on_invalid``: ``"raise"`` (default) or ``"nan"`` for an instruction outside the grammar, a missing
    source image, or a source without the named object."""

    name = "shapes_edit"

    def __init__(self, batch_size: int = 64, reward: str = "partial", on_invalid: str = "raise",
                 cfg: Optional[CheckerConfig] = None):
        super().__init__(device="cpu", dtype=torch.float32, batch_size=batch_size, differentiable=False)
        if reward not in ("partial", "strict"):
            raise ValueError(f"reward must be 'partial' or 'strict', got {reward!r}")
        if on_invalid not in ("raise", "nan"):
            raise ValueError(f"on_invalid must be 'raise' or 'nan', got {on_invalid!r}")
        self.reward, self.on_invalid, self.cfg = reward, on_invalid, cfg or CheckerConfig()

    def score_batch(self, images: torch.Tensor, prompts: List[str], **metadata) -> torch.Tensor:
        sources = metadata.get("image")
        if sources is None or len(sources) != len(prompts):
            raise ValueError("shapes_edit: needs each row's source image (the 'image' column of the prompt records)")
        out = torch.empty(images.shape[0], dtype=torch.float32)
        imgs = images.detach().to("cpu", torch.float32).clamp(0, 1)
        for k, (p, src) in enumerate(zip(prompts, sources)):
            try:
                r = check_edit(imgs[k], p, src, self.cfg)
            except ValueError as e:
                if self.on_invalid == "raise":
                    raise
                logger.warning("shapes_edit: scored NaN: %s", e)
                out[k] = float("nan")
                continue
            out[k] = r.score if self.reward == "partial" else float(r.correct)
        return out

    def evaluate(self, images: Any, prompts_: Sequence[str], image: Optional[Sequence[Any]] = None) -> Dict[str, float]:
        """Accuracy (strict correctness) overall and per kind; needs the source images (``image``)."""
        if image is None:
            raise ValueError("shapes_edit: evaluate needs the source images (image=...)")
        ok: Dict[str, List[float]] = {k: [] for k in KINDS}
        for k, (p, src) in enumerate(zip(prompts_, image)):
            ok[parse_instruction(p).kind].append(float(check_edit(images[k], p, src, self.cfg).correct))
        flat = [v for vs in ok.values() for v in vs]
        res = {"accuracy": sum(flat) / max(1, len(flat))}
        res.update({f"accuracy/{k}": sum(v) / len(v) for k, v in ok.items() if v})
        return res


@register("shapes_edit")
def make_shapes_edit_scorer(device="cpu", dtype=torch.float32, checkpoint=None, batch_size: int = 64,
                            differentiable: bool = False, reward: str = "partial", on_invalid: str = "raise",
                            **options) -> ShapesEditScorer:
    """Factory of the ``shapes_edit`` scorer (no weights, CPU, not differentiable); ``options`` are
    :class:`flowrl.demo.shapes.CheckerConfig` fields."""
    if checkpoint is not None:
        raise ValueError(f"shapes_edit: checkpoint must be None (the checker has no weights), got {checkpoint!r}")
    if differentiable:
        raise ValueError("shapes_edit: differentiable=True is not supported (image analysis, not a network)")
    known = set(CheckerConfig.__dataclass_fields__)
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"shapes_edit: unknown option(s) {unknown} (known: {sorted(known) + ['reward', 'on_invalid']})")
    return ShapesEditScorer(batch_size=batch_size, reward=reward, on_invalid=on_invalid, cfg=CheckerConfig(**options))
