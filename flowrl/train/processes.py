"""What the training loop does across processes (accelerate), in one place: gathers and sums, the
votes every process must agree on, gradient averaging, and per-minibatch loss statistics over all
processes. With one process every operation is the identity (no collective is called).

Gradients under DDP. The loop does not call the DDP wrapper: each process computes its share of a
minibatch's gradient on the model itself and :meth:`Processes.average_gradients` averages them with
one all-reduce per bucket. DDP's reducer synchronises inside backward, which needs every process to
run the same number of backward passes; the flow learner's number depends on the data (which rows
train which step, invalid samples, chunks), and a DDP forward run by the main process alone
(evaluation) blocks on its buffer broadcast.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Sequence

import torch

from flowrl.inputs import UsageError

# per-minibatch loss statistics averaged over processes, weighted by each process's ``num_actions``
MEAN_STATS = ("clip_frac", "clip_frac_low", "clip_frac_high", "approx_kl", "kl", "ratio_mean")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


DEEPSPEED_REFUSAL = (
    "the accelerate config asks for DeepSpeed, which flowrl's loop does not run: DeepSpeed's engine takes the "
    "optimizer step inside backward (and ZeRO-3 partitions the weights that the loop's update check, EMA and "
    "checkpoints read), while a flowrl minibatch runs a data-dependent number of backward passes before one "
    "checked step. Shard with FSDP2 instead: configs/accelerate/fsdp_<family>.yaml (fsdp_reshard_after_forward: "
    "true shards as ZeRO-3, false as ZeRO-2)")


def check_requested_backend(accelerator=None) -> None:
    """Refuse (UsageError, one line) a distributed backend the accelerate config asks for that this run would not
    get or that the loop cannot drive: DeepSpeed (see :data:`DEEPSPEED_REFUSAL`); FSDP where accelerate does not
    run it (accelerate 1.x runs FSDP on accelerators only: on CPUs the same launch silently becomes plain data
    parallel); FSDP version 1 (the loop's gradient and checkpoint handling is written for FSDP2's DTensors).
    Called before the Accelerator is built (``accelerator`` None: the environment ``accelerate launch`` sets)
    and after (its distributed type)."""
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        raise UsageError(DEEPSPEED_REFUSAL)
    if accelerator is None:
        return
    kind = str(getattr(accelerator, "distributed_type", "")).split(".")[-1]
    if kind == "DEEPSPEED":
        raise UsageError(DEEPSPEED_REFUSAL)
    if _env_flag("ACCELERATE_USE_FSDP") and kind != "FSDP":
        raise UsageError(f"the accelerate config asks for FSDP, but accelerate runs this process as {kind} "
                         f"(device {accelerator.device}): accelerate shards with FSDP on GPUs (and other accelerators) "
                         "only, so this run would be plain data parallel. Run it on GPUs, or launch without the FSDP config")
    if kind == "FSDP" and not getattr(accelerator, "is_fsdp2", False):
        raise UsageError("the accelerate config asks for FSDP version 1; flowrl's loop runs FSDP2 only: set "
                         "fsdp_config.fsdp_version: 2 (as configs/accelerate/fsdp_<family>.yaml)")


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` whole: an FSDP2 parameter (a sharded DTensor) gathered from every process (a collective: every
    process must call it), any other tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") and hasattr(t, "placements") else t


class Processes:
    """The process group of a run, seen from one process (``accelerator`` = accelerate's)."""

    def __init__(self, accelerator):
        self.acc = accelerator
        self.world = accelerator.num_processes
        self.rank = accelerator.process_index
        self.main = accelerator.is_main_process
        self.device = accelerator.device

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Rows of ``t`` from every process, in rank order, on the CPU. Processes may hold different
        numbers of rows (per-prompt group sizes, ``budget``): each pads to the largest, the padding
        is dropped after the gather."""
        if self.world == 1:
            return t
        counts = self.row_counts(t.shape[0])
        if len(set(counts)) == 1:
            return self.acc.gather(t.to(self.device)).cpu()
        m = max(counts)
        pad = torch.zeros((m - t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
        g = self.acc.gather(torch.cat([t, pad]).to(self.device)).cpu()
        return torch.cat([g[r * m:r * m + c] for r, c in enumerate(counts)])

    def gather_objects(self, items: Sequence[Any]) -> List[Any]:
        """Picklable ``items`` of every process, joined in rank order."""
        if self.world == 1:
            return list(items)
        from accelerate.utils import gather_object

        return list(gather_object(list(items)))

    def row_counts(self, n: int) -> List[int]:
        """Every process's ``n`` (its number of rows), in rank order."""
        if self.world == 1:
            return [int(n)]
        return self.acc.gather(torch.tensor([int(n)], dtype=torch.long, device=self.device)).cpu().tolist()

    def row_offset(self, n: int) -> int:
        """Where this process's ``n`` rows start in a :meth:`gather` of all processes' rows."""
        return sum(self.row_counts(n)[:self.rank])

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Elementwise sum over processes, on the CPU."""
        return self.acc.reduce(t.to(self.device), "sum").cpu() if self.world > 1 else t

    def sum_int(self, n: int) -> int:
        return int(self.sum(torch.tensor(n, dtype=torch.long))) if self.world > 1 else int(n)

    def all_true(self, flag: bool) -> bool:
        """True only if ``flag`` is true on every process (a decision the replicas must share)."""
        if self.world == 1:
            return bool(flag)
        return float(self.sum(torch.tensor([0.0 if flag else 1.0])).sum()) == 0.0

    def any_true(self, flag: bool) -> bool:
        """True if ``flag`` is true on some process."""
        if self.world == 1:
            return bool(flag)
        return float(self.sum(torch.tensor([1.0 if flag else 0.0])).sum()) > 0

    def average_gradients(self, params: Sequence[torch.nn.Parameter], bucket_numel: int = 1 << 24) -> None:
        """Average ``.grad`` over processes (what DDP's reducer does), one all-reduce per bucket of
        at most ``bucket_numel`` elements of one dtype. A parameter without a gradient on every
        process keeps none (as in a 1-process run); one with a gradient somewhere gets zeros where
        it has none before averaging."""
        present = self.sum(torch.tensor([p.grad is not None for p in params], dtype=torch.float32))
        grads: Dict[torch.dtype, List[torch.Tensor]] = {}
        for p, n in zip(params, present.tolist()):
            if n == 0:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.setdefault(p.grad.dtype, []).append(p.grad)

        def flush(bucket: List[torch.Tensor]) -> None:
            flat = self.acc.reduce(torch.cat([g.reshape(-1) for g in bucket]), "mean")
            off = 0
            for g in bucket:
                g.copy_(flat[off:off + g.numel()].view_as(g))
                off += g.numel()

        for group in grads.values():
            bucket, size = [], 0
            for g in group:
                if bucket and size + g.numel() > bucket_numel:
                    flush(bucket)
                    bucket, size = [], 0
                bucket.append(g)
                size += g.numel()
            if bucket:
                flush(bucket)

    def global_stats(self, loss_stats: List[Dict[str, float]]) -> List[Dict[str, float]]:
        """Per-minibatch loss statistics over all processes (one process: unchanged): the means in
        :data:`MEAN_STATS` weighted by each process's ``num_actions``, ``ratio_min``/``ratio_max``
        the min/max over processes. The adaptive KL controller is fed from these, so every process
        keeps the same beta; ``loss``/``policy_loss`` stay this process's share."""
        if self.world == 1 or not loss_stats:
            return loss_stats
        keys = MEAN_STATS
        w = [float(s.get("num_actions", 1.0)) for s in loss_stats]
        sums = self.sum(torch.tensor([[float(s.get(k, 0.0)) * wi for k in keys] + [wi] for s, wi in zip(loss_stats, w)],
                                     dtype=torch.float64))
        lo = torch.tensor([float(s.get("ratio_min", math.inf)) for s in loss_stats], dtype=torch.float64)
        hi = torch.tensor([float(s.get("ratio_max", -math.inf)) for s in loss_stats], dtype=torch.float64)
        lo = -self.acc.reduce(-lo.to(self.device), "max").cpu()
        hi = self.acc.reduce(hi.to(self.device), "max").cpu()
        out = []
        for i, s in enumerate(loss_stats):
            s = dict(s)
            total = float(sums[i, -1])
            for j, k in enumerate(keys):
                if k in s:
                    s[k] = float(sums[i, j]) / total if total > 0 else float("nan")
            if "ratio_min" in s:
                s["ratio_min"], s["ratio_max"] = float(lo[i]), float(hi[i])
            s["num_actions"] = total
            out.append(s)
        return out
