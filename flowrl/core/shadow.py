"""A decayed copy of trained weights that can be swapped in: the old policy of forward-process objectives.

``theta_old <- d theta_old + (1 - d) theta`` after each training step (DiffusionNFT's second LoRA
adapter "old", AWM's KL adapter, DGPO's ``ema_ref``). Swapping the copy into the live parameters
(and back) serves any model the same way, LoRA or full fine-tuning, without a second adapter.
diffusers' ``EMAModel`` fixes its decay rule to ``(1 + s) / (10 + s)`` capped at a constant; the
objectives' schedules (:func:`flowrl.core.objectives.old_decay`) are passed in per update instead.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["DecayedCopy"]


class DecayedCopy:
    """Shadow tensors of ``params`` (the same dtypes and devices), initialised to their values and bound to
    those parameters; ``names`` (default ``"0", "1", ...``) key them in :meth:`state_dict`."""

    def __init__(self, params: Sequence[torch.nn.Parameter], names: Optional[Sequence[str]] = None):
        self.params = list(params)
        self.shadow: List[Tensor] = [p.detach().clone() for p in self.params]
        self.names = [str(i) for i in range(len(self.shadow))] if names is None else list(names)
        if len(self.names) != len(self.shadow) or len(set(self.names)) != len(self.names):
            raise ValueError(f"names: {len(self.shadow)} distinct names needed, got {len(self.names)}")

    @torch.no_grad()
    def update(self, decay: float) -> None:
        """``shadow <- decay shadow + (1 - decay) param`` (``decay = 0`` copies the parameters exactly)."""
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay: must lie in [0, 1], got {decay!r}")
        for s, p in zip(self.shadow, self.params):
            if decay == 0.0:
                s.copy_(p)
            else:
                s.mul_(decay).add_(p.detach(), alpha=1.0 - decay)

    def _exchange(self) -> None:
        """Swap each parameter's storage with its shadow's (no copy)."""
        for i, p in enumerate(self.params):
            p.data, self.shadow[i] = self.shadow[i], p.data

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Inside the block the parameters hold the shadow values; their own values come back after it
        (also on an exception). The storages are exchanged, not copied."""
        self._exchange()
        try:
            yield
        finally:
            self._exchange()

    def state_dict(self) -> Dict[str, Tensor]:
        return dict(zip(self.names, self.shadow))

    def load_state_dict(self, state: Dict[str, Tensor]) -> None:
        if set(state) != set(self.names):
            missing, extra = sorted(set(self.names) - set(state)), sorted(set(state) - set(self.names))
            raise ValueError(f"old policy: the checkpoint's tensors do not match the model's (missing {missing[:3]}, "
                             f"unexpected {extra[:3]})")
        for n, s in zip(self.names, self.shadow):
            v = state[n]
            if v.shape != s.shape:
                raise ValueError(f"old policy: {n} has shape {tuple(v.shape)}, expected {tuple(s.shape)}")
            s.copy_(v)
