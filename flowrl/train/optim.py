"""The learning-rate schedule: one pure function for RL training and the demo pretrainings.

:func:`lr_factor` is the multiplier of the peak learning rate at an optimizer step: a linear
warm-up, then constant (RL training, :class:`flowrl.train.loop.Trainer`; the demo LM's
pretraining) or a cosine decay (the demo image model's pretraining). :func:`warmup_scheduler` is
the RL loop's ``LambdaLR`` built on it.
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def lr_factor(step: int, warmup_steps: int, total_steps: Optional[int] = None, final_fraction: float = 1.0) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based).

    Steps ``0 .. warmup_steps - 1``: linear warm-up ``(step + 1) / warmup_steps``. After it: 1 when
    ``total_steps`` is None, else a cosine decay from 1 at ``warmup_steps`` to ``final_fraction`` at
    ``total_steps`` and flat beyond, ``f + (1 - f) (1 + cos(pi p)) / 2`` with ``p`` the fraction of
    the decay done (SGDR's cosine schedule without restarts, Loshchilov & Hutter, arXiv 1608.03983).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps is None:
        return 1.0
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    span = max(total_steps - warmup_steps, 1)
    p = min(max(step - warmup_steps, 0) / span, 1.0)
    return final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * p))


def warmup_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` of :func:`lr_factor` with a linear warm-up over ``warmup_steps``, then constant.

    The factor is a plain function (not a callable object), so ``state_dict()`` saves no state of
    it: a resumed run rebuilds the scheduler here and loads only its step count."""

    def factor(step: int) -> float:
        return lr_factor(step, warmup_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
