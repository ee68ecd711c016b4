"""What keeps a run folder and its weights safe: one run per folder (a lock), which config keys
may change when a run is resumed, a graceful stop on SIGTERM/SIGINT, and the check of the weights
after every optimizer step. The training loop (:mod:`flowrl.train.loop`) uses all four; the rules
they enforce are listed in the README ("Checkpoints and resume").
"""
from __future__ import annotations

import math
import os
import signal
import threading
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from flowrl.config import flat_dict, upgrade_keys
from flowrl.inputs import UsageError
from scorers._text import short

LOCK_NAME = ".flowrl.lock"

# Keys a resumed run may change (dotted prefixes). Everything else must equal the checkpoint's
# config: it decides what the saved weights, optimizer state, prompt order and noise mean.
RESUMABLE = (
    "output_dir", "resume", "max_steps", "time_budget_s", "checkpoint_every", "eval_every", "eval_every_s",
    "train.keep_last", "train.progress", "train.tracker", "train.max_bad_steps", "train.max_update_ratio",
    "train.learning_rate", "train.weight_decay", "train.max_grad_norm",  # applied to the restored optimizer
    "train.gradient_checkpointing", "sample.chunk_size", "sample.decode_chunk_size", "text.chunk_size",  # memory only
    "model.offload_text_encoders",
    "sample.rollout_chunks", "sample.overlap_rewards",  # speed only (sub-batches: float rounding of batched calls)
    "model.device", "reward_options", "eval.", "data.eval",
)


# ------------------------------------------------------------------------------------ the folder

class RunLock:
    """An exclusive ``flock`` on ``<run>/.flowrl.lock`` for the life of a run: a second process
    training into the same folder gets one UsageError line naming the holder's pid. The kernel
    drops the lock when the process dies, so a killed run never leaves a stale lock."""

    def __init__(self, run_dir: Path):
        import fcntl  # POSIX only: imported where the lock is taken

        self.path = Path(run_dir) / LOCK_NAME
        self._f = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._f.seek(0)
            holder = self._f.read().strip() or "?"
            self._f.close()
            raise UsageError(f"output_dir {run_dir} is in use by another flowrl run (pid {holder}); "
                             f"one run owns a folder: wait for it, or choose another output_dir") from None
        self._f.seek(0)
        self._f.truncate()
        self._f.write(str(os.getpid()))
        self._f.flush()

    def release(self) -> None:
        if not self._f.closed:
            self._f.close()  # closing the descriptor releases the flock


# ----------------------------------------------------------------------------- resume vs config

def _resumable(key: str) -> bool:
    return any(key == k or key.startswith(k if k.endswith(".") else k + ".") for k in RESUMABLE)


def config_changes(saved: Dict[str, Any], current: Dict[str, Any]) -> Tuple[List[tuple], List[tuple]]:
    """``(allowed, refused)``: the ``(key, saved value, current value)`` of every leaf that differs
    between a checkpoint's config and the current one, split by :data:`RESUMABLE`. ``rewards``
    (name -> weight) is compared as a whole; keys an earlier version saved are read under their new
    names (:func:`flowrl.config.upgrade_keys`)."""
    a, b = upgrade_keys(flat_dict(saved, whole=("rewards",))), flat_dict(current, whole=("rewards",))
    allowed, refused = [], []
    for key in sorted(set(a) | set(b)):
        old, new = a.get(key, "<unset>"), b.get(key, "<unset>")
        if old == new:
            continue
        (allowed if _resumable(key) else refused).append((key, old, new))
    return allowed, refused


def check_resume_config(saved: Optional[Dict[str, Any]], current: Dict[str, Any], checkpoint: Path) -> List[tuple]:
    """Refuse (UsageError, one line naming the key and both values) a resume whose config differs
    from the checkpoint's in a key outside :data:`RESUMABLE`; returns the allowed changes."""
    if not saved:
        return []
    allowed, refused = config_changes(saved, current)
    if refused:
        key, old, new = refused[0]
        more = f" (and {len(refused) - 1} more: {', '.join(k for k, _, _ in refused[1:4])})" if len(refused) > 1 else ""
        raise UsageError(f"resume: {key} is {short(repr(old), 60)} in checkpoint {checkpoint} and {short(repr(new), 60)} now{more}; "
                         f"a resumed run cannot change it: set it back, or start a new run in another output_dir")
    return allowed


def apply_optimizer_settings(optimizer, scheduler, lr: float, weight_decay: float) -> None:
    """After restoring optimizer and LR scheduler state, make the run's current learning rate and
    weight decay the ones in effect (the restored state carries the saved ones): the scheduler's
    base rates, each group's ``initial_lr`` and its current ``lr`` = lr x the schedule's factor
    (:func:`flowrl.train.optim.lr_factor`, through the scheduler's own lambdas)."""
    scheduler.base_lrs = [float(lr)] * len(optimizer.param_groups)
    for group, fn in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = float(lr)
        group["lr"] = float(lr) * fn(scheduler.last_epoch)
        group["weight_decay"] = float(weight_decay)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


# ------------------------------------------------------------------------------- graceful stop

class GracefulStop:
    """While active, the first SIGTERM or SIGINT only sets :attr:`signal_name`; the loop finishes
    the step it is in, writes a checkpoint and exits 0. A second SIGINT interrupts at once.
    Outside the main thread (where Python cannot install handlers) it does nothing."""

    SIGNALS = ("SIGTERM", "SIGINT")

    def __init__(self):
        self.signal_name: Optional[str] = None
        self._old: Dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


# ------------------------------------------------------------------------------ weight check

def weight_norm(params: Sequence[torch.Tensor]) -> float:
    """L2 norm of all ``params`` together, accumulated in float32 (inf/nan when any weight is);
    one device synchronisation."""
    with torch.no_grad():
        norms = [torch.linalg.vector_norm(p.detach(), dtype=torch.float32) for p in params]
        # an FSDP2 shard's norm is a DTensor reduced over the processes: its value, replicated
        norms = [n.full_tensor() if hasattr(n, "full_tensor") else n for n in norms]
        return float(torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))) if norms else 0.0


def check_update(before: float, params: Iterable[torch.Tensor], max_ratio: Optional[float]) -> Tuple[float, Optional[str]]:
    """``(ratio, problem)`` after an optimizer step: ``ratio = |‖w'‖ − ‖w‖| / ‖w‖``, ``problem`` a
    short reason when a weight is non-finite or ``ratio > max_ratio``, else None. The ratio is a
    lower bound of ``‖Δw‖ / ‖w‖`` that needs no copy of the weights: small for ordinary steps
    (their change is nearly orthogonal to the weights), about ``‖Δw‖ / ‖w‖`` once the update
    dominates the weights, which is what an exploding step does."""
    params = list(params)
    after = weight_norm(params)
    if not math.isfinite(after):
        return float("nan"), "the weights are not finite after the update"
    ratio = abs(after - before) / before if before > 0 else (0.0 if after == 0 else math.inf)
    if max_ratio is not None and ratio > max_ratio:
        return ratio, (f"the update changed the weights' norm by {ratio:.3g}x of their size "
                       f"(> train.max_update_ratio={max_ratio:g}): the update exploded")
    return ratio, None
