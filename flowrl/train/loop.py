"""The one training loop for both paths: rollout -> score -> advantages -> K inner updates ->
log -> maybe evaluate -> maybe checkpoint.

Processes (accelerate). ``sample.prompts_per_step`` prompts make one step's global batch; the
choice of prompts, the plan, and every sample's noise derive from (seed, step, prompt) only, so a
prompt's group is the same whichever process samples it. Minibatch m of an inner epoch is the
contiguous block m of the step's prompts, split evenly over processes
(:func:`flowrl.train.data.local_layout`). Singular sweeps (``plan.singular_choice: all``) give each
prompt K advantage groups, one per branch step (:mod:`flowrl.flow.sampler`); the loop reads each
row's prompt and group from the batch (``prompt_index``, ``group_id``, ``groups_per_prompt``), and
:func:`minibatch_split` splits the branch steps first: ``num_minibatches`` dividing K gives blocks
of whole branch steps over all prompts, taken in step order (G²RPO: one optimizer step per k, in k
order, against the pre-update old log-probs); a multiple of K splits each step's prompts further;
with ``train.sweep_split: prompt`` minibatches are blocks of prompts with all their branch steps
(TempFlow-GRPO).
Rewards are gathered from all processes before advantages
are computed (a group's statistics see the whole group; batch statistics the whole batch), and the
loss normaliser is the count over the whole optimizer batch (all processes), so neither the
advantages nor the updated weights depend on the number of processes.

Gradients under DDP. The loop does not call the DDP wrapper: each process computes its share of a
minibatch's gradient on the model itself and the gradients are averaged with one all-reduce per
optimizer step (:meth:`Trainer._average_gradients`). DDP's reducer synchronises inside backward,
which needs every process to run the same number of backward passes; the flow learner's number
depends on the data (which rows train which step, invalid samples, chunks), and a DDP forward run
by the main process alone (evaluation) blocks on its buffer broadcast. Other wrappers (FSDP) are
called as they are, with ``backward(loss, last)`` synchronising on the minibatch's last pass.

Robustness. Invalid samples (a scorer's NaN/inf, a failed remote batch) get advantage 0 and are
masked out of the loss, and counted. A NaN/inf loss or gradient skips the optimizer step (logged);
``train.max_bad_steps`` of them in a row stop the run with a clear message, the last good
checkpoint intact. Checkpoints are atomic (:mod:`flowrl.train.checkpoint`); ``resume=auto``
continues from the newest complete one. All randomness is a function of (seed, step), so a resumed
run repeats exactly the steps after its checkpoint and ends with the same weights.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from flowrl.config import RunConfig, dump, to_dict
from flowrl.inputs import UsageError
from flowrl.train.checkpoint import (
    CheckpointError, capture_rng, latest_checkpoint, list_checkpoints, load_checkpoint, restore_rng, save_checkpoint,
    verify_checkpoint,
)
from flowrl.train.data import choose_prompts, load_records, local_layout, step_generator

log = logging.getLogger("flowrl.train")


class TrainingStopped(RuntimeError):
    """Raised when the run cannot go on (too many non-finite steps in a row)."""


def _mean(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else float("nan")


class Trainer:
    """Holds the run's state; :meth:`run` executes ``max_steps`` steps (resuming if asked)."""

    def __init__(self, cfg: RunConfig, accelerator=None):
        from accelerate import Accelerator

        from flowrl.inputs import writable_dir

        self.cfg = cfg
        self.run_dir = writable_dir(cfg.output_dir, "output_dir")  # before accelerate or a model touches it
        tc = cfg.train
        if tc.deterministic:
            torch.use_deterministic_algorithms(True)
        if accelerator is None:
            from accelerate.utils import ProjectConfiguration

            log_with = None if tc.tracker == "none" else tc.tracker
            project = ProjectConfiguration(project_dir=str(self.run_dir), logging_dir=str(self.run_dir / "logs"))
            accelerator = Accelerator(cpu=cfg.model.device == "cpu", mixed_precision=tc.mixed_precision,
                                      log_with=log_with, project_config=project)
        self.acc = accelerator
        self.world = accelerator.num_processes
        self.rank = accelerator.process_index
        self.main = accelerator.is_main_process
        self._lock = None
        try:
            self._claim_run_dir()
            self._setup(cfg, accelerator)
        except BaseException:
            self.close()
            raise

    def _setup(self, cfg: RunConfig, accelerator) -> None:
        tc = cfg.train
        # advantage groups per prompt (K branch steps of a sweep, else 1) and how minibatches split them
        self.groups_per_prompt = cfg.plan.groups_per_prompt(cfg.sample.num_steps) if cfg.model.family != "lm" else 1
        self.mb_prompts, self.mb_branches = minibatch_split(tc.num_minibatches, self.groups_per_prompt, tc.sweep_split)
        local_layout(cfg.sample.prompts_per_step, self.mb_prompts, self.world, self.rank)  # validate early
        self.train_records = load_records(cfg.data.train, limit=cfg.data.max_train_prompts, seed=cfg.seed)
        self.eval_records = load_records(cfg.data.eval, limit=cfg.eval.num_prompts, seed=cfg.seed)
        if self.main:  # settings that would silently do nothing: said once, before the model loads
            from flowrl.train.preflight import preflight_warnings

            for line in preflight_warnings(cfg, train_prompts=[r["prompt"] for r in self.train_records],
                                           eval_prompts=[r["prompt"] for r in self.eval_records]):
                log.warning("%s", line)

        from flowrl.train.tasks import build_task

        from accelerate.utils import set_seed

        set_seed(cfg.seed)  # Python, numpy and torch: the whole RNG state is a function of the seed
        self.task = build_task(cfg, accelerator.device)
        params = [p for p in self.task.module.parameters() if p.requires_grad]
        if not params:
            raise UsageError("nothing to train: the model has no trainable parameters")
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=tc.learning_rate, betas=tuple(tc.adam_betas),
                                           eps=tc.adam_eps, weight_decay=tc.weight_decay)
        warm = tc.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        # The LR scheduler is deliberately not prepared: accelerate's AcceleratedScheduler steps the
        # wrapped scheduler num_processes times per optimizer step (it assumes a per-process
        # dataloader split), which would make the LR (warm-up) depend on the number of processes.
        wrapped, self.optimizer = accelerator.prepare(self.task.module, self.optimizer)
        self.wrapped = wrapped
        from torch.nn.parallel import DistributedDataParallel

        self.local_grads = self.world > 1 and isinstance(wrapped, DistributedDataParallel)  # see module doc
        self.task.set_forward_module(None if (wrapped is self.task.module or self.local_grads) else wrapped)
        self.ema = None
        if tc.ema:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(params, decay=tc.ema_decay, use_ema_warmup=False)
        from flowrl.core.advantages import PerPromptStatTracker
        from flowrl.core.losses import AdaptiveKLController

        self.tracker = (PerPromptStatTracker(tc.stat_buffer_size, tc.stat_min_count)
                        if tc.per_prompt_stat_tracking else None)
        self.kl_ctl = AdaptiveKLController.from_config(cfg.loss) if cfg.loss.beta_schedule == "adaptive" else None
        self.step = 0
        self.optimizer_steps = 0
        self.bad_in_row = 0
        self.invalid_in_row = 0  # consecutive steps in which no sample had a finite reward
        self.total_nfe = 0
        self.train_time = 0.0  # seconds of training (no evaluation) in this segment, for time_budget_s
        self.wall_before = 0.0  # wall clock of earlier (resumed) segments
        self.first_eval: Optional[Dict[str, float]] = None
        self.last_eval: Optional[Dict[str, float]] = None

    # ------------------------------------------------------------------------------ checkpoints
    def _trainable_state(self) -> Dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.task.module.named_parameters() if p.requires_grad}

    def save(self) -> Path:
        from flowrl.train.model import lora_meta

        tensor_state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        if self.ema is not None:
            tensor_state["ema"] = self.ema.state_dict()
        meta = {
            "lora": lora_meta(self.task.module) if self.cfg.train.lora and self.task.kind == "flow" else None,
            "optimizer_steps": self.optimizer_steps, "bad_in_row": self.bad_in_row, "invalid_in_row": self.invalid_in_row,
            "total_nfe": self.total_nfe,
            "wall_clock_s": self.wall_before + (time.time() - self._t0), "first_eval": self.first_eval,
            "last_eval": self.last_eval, "tracker": self.tracker.state_dict() if self.tracker else None,
            "kl_ctl": self.kl_ctl.state_dict() if self.kl_ctl else None, "config": to_dict(self.cfg),
        }
        path = None
        weights = self._trainable_state()
        if not all(bool(torch.isfinite(w).all()) for w in weights.values()):  # the update check should have stopped earlier
            raise TrainingStopped(f"step {self.step}: non-finite weights are never checkpointed. {self._last_good()}")
        if self.main:
            try:
                path = save_checkpoint(self.run_dir, self.step, weights=weights, tensor_state=tensor_state,
                                       meta=meta, rng=capture_rng(), keep_last=self.cfg.train.keep_last)
            except OSError as e:  # a full disk, a quota, a folder gone: stop with the earlier checkpoints intact
                raise TrainingStopped(f"could not write the checkpoint of step {self.step} into {self.run_dir / 'checkpoints'} "
                                      f"({e.strerror or e}). {self._last_good()}") from None
        self.acc.wait_for_everyone()
        return path

    def _claim_run_dir(self) -> None:
        """Before any model is loaded: the run folder is writable and this run owns it (a lock),
        ``resume=none`` does not overwrite an earlier run, and a checkpoint to resume from verifies
        and was trained with a compatible config (:mod:`flowrl.train.guard`)."""
        from flowrl.train.guard import RunLock, check_resume_config

        cfg = self.cfg
        if self.main:
            self._lock = RunLock(self.run_dir)
            done = list_checkpoints(self.run_dir)
            if cfg.resume == "none" and done:
                raise UsageError(f"output_dir {self.run_dir} already holds a run (checkpoints up to {done[-1].name}); "
                                 f"resume=none would mix two runs in one folder: use resume=auto to continue it, "
                                 f"or choose another output_dir")
        self.resume_from = self._resume_path()
        self.resume_changes = []
        if self.resume_from is not None:
            saved = json.loads((self.resume_from / "meta.json").read_text(encoding="utf-8")).get("config")
            self.resume_changes = check_resume_config(saved, to_dict(cfg), self.resume_from)

    def close(self) -> None:
        """Release the run folder (its lock)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _resume_path(self) -> Optional[Path]:
        r = self.cfg.resume
        if r == "none":
            return None
        if r == "auto":
            return latest_checkpoint(self.run_dir)
        p = Path(r)
        if not p.is_dir():
            raise UsageError(f"resume: checkpoint folder not found: {p}")
        verify_checkpoint(p)
        return p

    def _set_aside_newer(self, step: int) -> None:
        """Checkpoints newer than the one resumed from (damaged ones skipped by ``resume=auto``, or
        the later steps of a run resumed from an earlier checkpoint) are renamed ``.stale-step-*``:
        kept for inspection, never resumed from or counted by ``keep_last``."""
        for p in list_checkpoints(self.run_dir, complete_only=False):
            if int(p.name[5:]) > step:
                dest = p.with_name(f".stale-{p.name}-{int(time.time())}")
                os.rename(p, dest)
                log.warning("set aside %s (newer than the resumed step %d) as %s", p.name, step, dest.name)

    def maybe_resume(self) -> None:
        from flowrl.train.lora import load_trainable_state_dict

        path = self.resume_from
        if path is None:
            if self.main:  # a fresh start: drop what an earlier attempt in this folder logged before its first checkpoint
                self._set_aside_newer(0)
                _truncate_jsonl(self.run_dir / "metrics.jsonl", -1)
                _truncate_jsonl(self.run_dir / "eval.jsonl", -1)
            log.info("no checkpoint to resume from (resume=%s): training from step 0", self.cfg.resume)
            return
        ck = load_checkpoint(path)
        load_trainable_state_dict(self.task.module, ck["weights"], source=f"checkpoint {path}")
        self.optimizer.load_state_dict(ck["tensor_state"]["optimizer"])
        self.scheduler.load_state_dict(ck["tensor_state"]["scheduler"])
        changed = {k for k, _, _ in self.resume_changes}
        if changed & {"train.learning_rate", "train.weight_decay"}:
            from flowrl.train.guard import apply_optimizer_settings

            apply_optimizer_settings(self.optimizer, self.scheduler, self.cfg.train.learning_rate, self.cfg.train.weight_decay)
        for k, old, new in self.resume_changes:
            if k not in ("resume", "output_dir"):
                log.info("resume: %s changed from %r to %r (applied)", k, old, new)
        if self.ema is not None and "ema" in ck["tensor_state"]:
            self.ema.load_state_dict(ck["tensor_state"]["ema"])
        m = ck["meta"]
        self.step = int(m["step"])
        self.optimizer_steps = int(m.get("optimizer_steps", 0))
        self.bad_in_row = int(m.get("bad_in_row", 0))
        self.invalid_in_row = int(m.get("invalid_in_row", 0))
        self.total_nfe = int(m.get("total_nfe", 0))
        self.wall_before = float(m.get("wall_clock_s", 0.0))
        self.first_eval, self.last_eval = m.get("first_eval"), m.get("last_eval")
        if self.tracker is not None and m.get("tracker"):
            self.tracker.load_state_dict(m["tracker"])
        if self.kl_ctl is not None and m.get("kl_ctl"):
            self.kl_ctl.load_state_dict(m["kl_ctl"])
        restore_rng(ck["rng"])
        if self.main:
            if path.parent == self.run_dir / "checkpoints":
                self._set_aside_newer(self.step)
            _truncate_jsonl(self.run_dir / "metrics.jsonl", self.step)
            _truncate_jsonl(self.run_dir / "eval.jsonl", self.step)
        log.info("resumed from %s at step %d", path, self.step)

    # -------------------------------------------------------------------------------- one step
    def _beta(self) -> float:
        from flowrl.core.losses import kl_coefficient

        if self.kl_ctl is not None:
            return float(self.kl_ctl.value)
        return kl_coefficient(self.optimizer_steps, self.cfg.loss)

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        return self.acc.gather(t.to(self.acc.device)).cpu() if self.world > 1 else t

    def _advantages(self, rewards, batch, row_group: torch.Tensor, row_key: torch.Tensor):
        """Advantages for the local rows. Flat groups: rewards are gathered from all processes
        and normalised globally. Trees: node values and sibling comparisons stay within a
        prompt's tree, which never spans processes."""
        from flowrl.core.advantages import compute_advantages, multi_granularity_advantages

        import dataclasses

        cfg = self.cfg
        n_local = rewards.shape[0]
        adv_cfg = cfg.advantage
        if adv_cfg.reward_weights is None:  # the run's reward weights, in the order of the reward columns
            adv_cfg = dataclasses.replace(adv_cfg, reward_weights=tuple(float(cfg.rewards[n]) for n in self._reward_names))
        if getattr(batch, "node_parent", None) is not None:
            w = torch.tensor([cfg.rewards[n] for n in self._reward_names], dtype=torch.float64)
            total = (rewards.double() * w).sum(-1)
            adv, valid = self.task.tree_advantages(batch, total, adv_cfg)
            return adv.float(), {"keep": valid, "invalid_count": int((~valid).sum())}
        g_rewards = self._gather(rewards.float())
        g_groups = self._gather(row_group)
        if rewards.ndim == 3:  # multi-granularity [N, K, R]
            adv, stats = multi_granularity_advantages(g_rewards, g_groups, adv_cfg)
        else:
            keys = self._gather(row_key).tolist() if self.tracker is not None else None
            adv, stats = compute_advantages(g_rewards, g_groups, adv_cfg, tracker=self.tracker, prompt_keys=keys)
        # this process's rows are the rank-th slice of the gathered tensors
        start = self.rank * n_local
        sl = slice(start, start + n_local)
        stats = dict(stats)
        keep = stats.pop("keep")
        stats["keep"] = keep[sl]
        return adv[sl].float(), stats

    def _average_gradients(self, bucket_numel: int = 1 << 24) -> None:
        """Average ``.grad`` over processes (what DDP's reducer does), one all-reduce per bucket of
        at most ``bucket_numel`` elements of one dtype. A parameter without a gradient on every
        process keeps none (as in a 1-process run); one with a gradient somewhere gets zeros where
        it has none before averaging."""
        present = torch.tensor([p.grad is not None for p in self.params], dtype=torch.float32, device=self.acc.device)
        present = self.acc.reduce(present, "sum").cpu()
        grads: Dict[torch.dtype, List[torch.Tensor]] = {}
        for p, n in zip(self.params, present.tolist()):
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

    _MEAN_STATS = ("clip_frac", "clip_frac_low", "clip_frac_high", "approx_kl", "kl", "ratio_mean")

    def _global_stats(self, loss_stats: List[Dict[str, float]]) -> List[Dict[str, float]]:
        """Per-minibatch loss statistics over all processes (one process: unchanged): the means
        in ``_MEAN_STATS`` weighted by each process's ``num_actions``, ``ratio_min``/``ratio_max``
        the min/max over processes. The adaptive KL controller is fed from these, so every
        process keeps the same beta; ``loss``/``policy_loss`` stay this process's share."""
        if self.world == 1 or not loss_stats:
            return loss_stats
        keys = self._MEAN_STATS
        w = [float(s.get("num_actions", 1.0)) for s in loss_stats]
        sums = torch.tensor([[float(s.get(k, 0.0)) * wi for k in keys] + [wi] for s, wi in zip(loss_stats, w)],
                            dtype=torch.float64, device=self.acc.device)
        sums = self.acc.reduce(sums, "sum").cpu()
        dev = self.acc.device
        lo = torch.tensor([float(s.get("ratio_min", math.inf)) for s in loss_stats], dtype=torch.float64, device=dev)
        hi = torch.tensor([float(s.get("ratio_max", -math.inf)) for s in loss_stats], dtype=torch.float64, device=dev)
        lo = -self.acc.reduce(-lo, "max").cpu()
        hi = self.acc.reduce(hi, "max").cpu()
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

    def train_step(self) -> Dict[str, Any]:
        cfg, tc = self.cfg, self.cfg.train
        t_start = time.time()
        P = cfg.sample.prompts_per_step
        chosen = choose_prompts(len(self.train_records), P, cfg.seed, self.step)  # global, same on all ranks
        layout = local_layout(P, self.mb_prompts, self.world, self.rank)
        positions = [pos for mb in layout for pos in mb]
        records = [self.train_records[chosen[pos]] for pos in positions]
        keys = [chosen[pos] * 1_000_003 + pos for pos in positions]  # prompt identity at this step
        self.task.module.eval()
        batch = self.task.rollout(records, keys, self.step)
        t_sample = time.time()
        rewards, names, info = self.task.score(batch, records)
        self._reward_names = names
        nonfinite = ~torch.isfinite(rewards)
        if bool(nonfinite.any()):  # NaN, +inf and -inf alike: that sample is invalid (advantage 0, masked)
            n_inf = int(torch.isinf(rewards.reshape(rewards.shape[0], -1)).any(dim=1).sum())
            if n_inf:
                log.warning("step %d: %d sample(s) got an infinite reward; they count as invalid", self.step, n_inf)
            rewards = torch.where(nonfinite, torch.full_like(rewards, float("nan")), rewards)
        t_score = time.time()
        G = cfg.sample.group_size
        K = self.groups_per_prompt
        row_prompt, row_branch = _row_groups(batch, len(positions), G, K)
        # global group id = position in the step (x K + branch); tracker key = the prompt's identity (x K + branch)
        row_group = torch.tensor(positions, dtype=torch.long)[row_prompt] * K + row_branch
        row_key = torch.tensor([chosen[pos] for pos in positions], dtype=torch.long)[row_prompt] * K + row_branch
        adv, adv_stats = self._advantages(rewards, batch, row_group, row_key)
        keep = adv_stats["keep"]

        mask = self.task.action_mask(batch).bool()
        mask_all = mask & keep.to(mask.device).unsqueeze(1)  # rewards (and so ``keep``) come back on the CPU
        beta = self._beta()
        from flowrl.core.losses import loss_normalizers

        mode = cfg.loss.aggregation
        per_rank_groups = len(layout[0])
        row_block = row_prompt // per_rank_groups  # the prompt block (local_layout's minibatch) of each row
        row_kblock = row_branch // (K // self.mb_branches)  # its block of branch steps (0 but for sweeps)
        loss_stats: List[Dict[str, float]] = []
        grad_norms, skipped, update_ratios = [], 0, []
        from flowrl.train.guard import check_update, weight_norm

        for epoch in range(tc.num_iterations):
            perm = torch.randperm(self.mb_prompts, generator=step_generator(cfg.seed, self.step, f"epoch{epoch}")).tolist()
            order = [(b, c) for c in range(self.mb_branches) for b in perm]  # branch blocks in step order
            for b, c in order:
                rows = ((row_block == b) & (row_kblock == c)).nonzero().flatten()
                sub = self.task.select(batch, rows)
                sub_mask = mask_all[rows]
                norm = loss_normalizers(sub_mask, mode, world_size=self.world,
                                        reduce_fn=(lambda x: self.acc.reduce(x.to(self.acc.device), "sum").cpu()) if self.world > 1 else None)
                _apply_mask(sub, sub_mask, self.task.kind)
                self.optimizer.zero_grad(set_to_none=True)

                def backward(loss, last=True, _w=self.wrapped):
                    # ``last``: the minibatch's final backward, the one a wrapper that synchronises in
                    # backward (FSDP) must not skip; a learner that does not say (``backward(loss)``)
                    # gets a synchronised backward every time: correct, only slower. Under DDP the
                    # gradients are averaged after the minibatch instead (module doc).
                    ctx = (contextlib.nullcontext() if (last or self.world == 1 or self.local_grads)
                           else self.acc.no_sync(_w))
                    with ctx:
                        self.acc.backward(loss)

                with self.acc.autocast():
                    st = self.task.minibatch_gradient(sub, adv[rows], normalizer=norm, beta=beta, backward=backward)
                if self.local_grads:
                    self._average_gradients()
                gn = self.acc.clip_grad_norm_(self.params, tc.max_grad_norm)
                gn = float(gn) if gn is not None else float("nan")
                finite = math.isfinite(gn) and math.isfinite(st.get("loss", 0.0))
                if self.world > 1:  # every process must take the same decision, or the replicas drift apart
                    flag = torch.tensor([0.0 if finite else 1.0], device=self.acc.device)
                    finite = float(self.acc.reduce(flag, "sum").sum()) == 0.0
                if not finite:
                    skipped += 1
                    self.optimizer.zero_grad(set_to_none=True)
                    log.warning("step %d: non-finite loss or gradient (grad norm %s); optimizer step skipped", self.step, gn)
                    continue
                norm_before = weight_norm(self.params)
                self.optimizer.step()
                ratio, problem = check_update(norm_before, self.params, tc.max_update_ratio)
                update_ratios.append(ratio)
                if problem is not None:
                    raise TrainingStopped(f"step {self.step + 1}: {problem}; these weights are not checkpointed. "
                                          f"{self._last_good()} (lower train.learning_rate or train.max_grad_norm)")
                self.scheduler.step()
                self.optimizer_steps += 1
                if self.ema is not None and self.optimizer_steps % tc.ema_every == 0:
                    self.ema.step(self.params)
                grad_norms.append(gn)
                loss_stats.append(st)
        self.bad_in_row = self.bad_in_row + 1 if skipped else 0
        loss_stats = self._global_stats(loss_stats)
        if self.kl_ctl is not None and loss_stats:
            self.kl_ctl.update(_mean([s.get("kl") for s in loss_stats]))
        nfe = self.task.nfe(batch)  # this process's evaluations (generated tokens for text): sum them
        if self.world > 1:
            nfe = int(self.acc.reduce(torch.tensor(nfe, dtype=torch.long, device=self.acc.device), "sum"))
        self.total_nfe += nfe
        t_end = time.time()

        metrics: Dict[str, Any] = {"step": self.step + 1}
        w = torch.tensor([cfg.rewards[n] for n in names])
        flat = rewards if rewards.ndim == 2 else rewards[:, 0]
        total = (flat * w).sum(1)
        g_total = self._gather(total)
        metrics["reward/total"] = float(torch.nanmean(g_total))
        metrics["reward/total_std"] = float(g_total[torch.isfinite(g_total)].std()) if torch.isfinite(g_total).sum() > 1 else 0.0
        for i, n in enumerate(names):
            col = self._gather(flat[:, i].contiguous())
            metrics[f"reward/{n}"] = float(torch.nanmean(col))
            metrics[f"reward/{n}_std"] = float(col[torch.isfinite(col)].std()) if torch.isfinite(col).sum() > 1 else 0.0
        metrics["invalid_samples"] = int(self._gather((~torch.isfinite(total)).long()).sum())
        metrics["zero_std_frac"] = float(adv_stats.get("zero_std_frac", float("nan")))
        metrics["filtered_samples"] = int(adv_stats.get("filtered_count", 0))
        for key in ("clip_frac", "clip_frac_low", "clip_frac_high", "approx_kl", "kl", "ratio_mean", "policy_loss", "loss"):
            metrics[key] = _mean([s.get(key) for s in loss_stats])
        metrics["ratio_min"] = min([s["ratio_min"] for s in loss_stats if "ratio_min" in s], default=float("nan"))
        metrics["ratio_max"] = max([s["ratio_max"] for s in loss_stats if "ratio_max" in s], default=float("nan"))
        if loss_stats and "ratio_min" in loss_stats[0]:
            metrics["ratio_first_min"] = loss_stats[0]["ratio_min"]  # on-policy first pass: exactly 1
            metrics["ratio_first_max"] = loss_stats[0]["ratio_max"]
        metrics["grad_norm"] = _mean(grad_norms)
        metrics["update_ratio"] = max(update_ratios, default=float("nan"))
        metrics["skipped_optimizer_steps"] = skipped
        metrics["beta"] = beta
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        metrics["nfe"] = nfe
        metrics["time/sampling"] = t_sample - t_start
        metrics["time/scoring"] = t_score - t_sample
        metrics["time/update"] = t_end - t_score
        metrics["time/step"] = t_end - t_start
        if info.get("issues"):
            for issue in info["issues"]:
                log.warning("step %d: reward issue: %s", self.step, issue)
        self.step += 1
        n_rows = int(g_total.numel())
        self.invalid_in_row = self.invalid_in_row + 1 if metrics["invalid_samples"] == n_rows else 0
        return metrics

    def _check_going_on(self) -> None:
        """Stop (:class:`TrainingStopped`) after ``train.max_bad_steps`` steps in a row without an
        update (non-finite loss or gradient) or without a single valid sample."""
        cfg, limit = self.cfg, self.cfg.train.max_bad_steps
        if self.bad_in_row >= limit:
            raise TrainingStopped(
                f"{self.bad_in_row} steps in a row had a non-finite loss or gradient; stopping. "
                f"{self._last_good()} (lower train.learning_rate or train.max_grad_norm, or check the rewards)"
            )
        if self.invalid_in_row >= limit:
            raise TrainingStopped(
                f"{self.invalid_in_row} steps in a row had no valid sample (every reward NaN or infinite: "
                f"can the rewards {sorted(cfg.rewards)} score prompts from {cfg.data.train!r}?); stopping. {self._last_good()}"
            )

    def _last_good(self) -> str:
        """Where the run can be continued from, for a stop message: the newest checkpoint that
        verifies (every checkpoint written passed the weight check)."""
        ck = latest_checkpoint(self.run_dir)
        return f"The last good checkpoint is {ck}" if ck is not None else "No checkpoint was written yet"

    # ------------------------------------------------------------------------------ evaluation
    @contextlib.contextmanager
    def _ema_weights(self):
        if self.ema is None:
            yield
            return
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            yield
        finally:
            self.ema.restore(self.params)

    def evaluate(self) -> Dict[str, Any]:
        """Held-out evaluation (deterministic sampler or greedy decoding, fixed seeds) on the main
        process: ``{"means": reward name -> mean, "details": per-category numbers}``."""
        out: Dict[str, Any] = {}
        if self.main:
            self.task.module.eval()
            with self._ema_weights(), torch.no_grad():
                res = self.task.evaluate(self.eval_records, self.cfg.eval.seeds)
            out = self.task.save_eval(self.run_dir, self.step, res)
        self.acc.wait_for_everyone()
        return out

    # ---------------------------------------------------------------------------------- driver
    def run(self) -> Dict[str, Any]:
        """Resume or start, train to ``max_steps`` (or the time budget), save, summarise. A SIGTERM
        or SIGINT ends the step in progress, writes a checkpoint and returns early with
        ``{"stopped_by": signal name, "checkpoint": path}`` (a second SIGINT interrupts at once)."""
        from flowrl.train.guard import GracefulStop

        cfg = self.cfg
        self._t0 = time.time()
        stop = GracefulStop()
        try:
            with stop:
                if self.main:
                    dump(cfg, self.run_dir / "config.yaml")
                self.maybe_resume()
                if cfg.train.tracker != "none":
                    self.acc.init_trackers("flowrl", config=_flat_config(cfg))
                if self.first_eval is None and cfg.eval.at_start and self.step == 0:
                    self.first_eval = self.last_eval = self.evaluate()
                self._loop(stop)
                if stop.signal_name is not None:
                    ck = latest_checkpoint(self.run_dir)
                    log.info("stopped by %s after step %d; checkpoint %s", stop.signal_name, self.step, ck)
                    return {"steps": self.step, "stopped_by": stop.signal_name, "checkpoint": str(ck) if ck else None,
                            "wall_clock_s": round(self.wall_before + (time.time() - self._t0), 3)}
                if self.step == cfg.max_steps and not (self.run_dir / "checkpoints" / f"step-{self.step:08d}").is_dir():
                    self.save()
                summary = self.finish()
                if cfg.train.tracker != "none":
                    self.acc.end_training()
                return summary
        finally:
            self.close()

    def _stop_requested(self, stop) -> bool:
        """Whether any process got SIGTERM/SIGINT (all processes must stop at the same step)."""
        flag = stop.signal_name is not None
        if self.world > 1:
            t = torch.tensor([1.0 if flag else 0.0], device=self.acc.device)
            flag = float(self.acc.reduce(t, "sum").sum()) > 0
            if flag and stop.signal_name is None:
                stop.signal_name = "SIGTERM"
        return flag

    def _loop(self, stop) -> None:
        """Steps until ``max_steps``, the time budget, or a signal (then a checkpoint is written)."""
        cfg = self.cfg
        bar = None
        if self.main and cfg.train.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.max_steps, initial=self.step, desc="flowrl train", dynamic_ncols=True)
        try:
            self._steps(bar, stop)
        finally:
            if bar is not None:
                bar.close()

    def _steps(self, bar, stop) -> None:
        cfg = self.cfg
        while self.step < cfg.max_steps and not self._stop_requested(stop):
            metrics = self.train_step()
            self.train_time += metrics["time/step"]
            out_of_time = cfg.time_budget_s is not None and self.train_time >= cfg.time_budget_s
            if out_of_time:
                log.info("time budget of %.0f s of training reached at step %d", cfg.time_budget_s, self.step)
            if self.step % cfg.eval_every == 0 or self.step == cfg.max_steps or out_of_time:
                ev = self.evaluate()
                if self.main:
                    self.last_eval = ev
                    if self.first_eval is None:
                        self.first_eval = ev
                    metrics.update({f"eval/{k}": v for k, v in ev.get("means", {}).items()})
            if self.main:
                _append_jsonl(self.run_dir / "metrics.jsonl", metrics)
            self._check_going_on()
            if cfg.train.tracker != "none":
                self.acc.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=self.step)
            if bar is not None:
                bar.set_postfix(reward=f"{metrics['reward/total']:.3f}", kl=f"{metrics['approx_kl']:.2e}",
                                clip=f"{metrics['clip_frac']:.2f}", s_step=f"{metrics['time/step']:.1f}")
                bar.update(1)
            stopping = self._stop_requested(stop)
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps or out_of_time or stopping:
                self.save()
            if out_of_time or stopping:
                break

    def finish(self) -> Dict[str, Any]:
        first, last = self.first_eval or {}, self.last_eval or {}
        summary = {
            "steps": self.step,
            "wall_clock_s": round(self.wall_before + (time.time() - self._t0), 3),
            "nfe": self.total_nfe,
            "first_eval": first.get("means", {}),
            "last_eval": last.get("means", {}),
            "first_eval_details": first.get("details", {}),
            "last_eval_details": last.get("details", {}),
            "processes": self.world,
        }
        if self.main:
            with self._ema_weights():
                result = self.task.save_result(self.run_dir)
            summary["result"] = str(result)
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
            try:
                from flowrl.train.report import write_report

                write_report(self.run_dir)
            except Exception as e:  # the report is a convenience; never lose a finished run over it
                log.warning("could not write report.html: %s", e)
        self.acc.wait_for_everyone()
        return summary


def minibatch_split(num_minibatches: int, groups_per_prompt: int, split: str = "branch") -> tuple:
    """``(prompt blocks, branch blocks)``: how a step's ``num_minibatches`` minibatches cut its
    groups when every prompt has ``groups_per_prompt`` = K of them (a singular sweep's branch steps).

    K = 1 or ``split="prompt"``: ``(num_minibatches, 1)``, prompt blocks as always, each with all its
    branch steps (TempFlow-GRPO: an optimizer step covers every branch step of its trunks). With
    ``split="branch"`` the branch steps are split first: M dividing K gives ``(1, M)`` (minibatch c =
    branch steps ``[c·K/M, (c+1)·K/M)`` of every prompt; M = K is G²RPO's one optimizer step per k);
    M a multiple of K gives ``(M/K, K)`` (one branch step and a block of the prompts per minibatch).
    Any other M is a usage error.
    """
    M, K = int(num_minibatches), int(groups_per_prompt)
    if K <= 1 or split == "prompt":
        return M, 1
    if K % M == 0:
        return 1, M
    if M % K == 0:
        return M // K, K
    raise UsageError(f"train.num_minibatches={M} with a sweep of {K} branch steps (plan.singular_choice: all): "
                     f"must divide {K} (minibatches of whole branch steps) or be a multiple of it "
                     f"(each branch step's prompts split further)")


def _row_groups(batch, num_prompts: int, group_size: int, groups_per_prompt: int):
    """``(local prompt, branch)`` of every row of a rollout: its ``prompt_index`` and, for a batch
    with K > 1 groups per prompt (sweeps: ``group_id = prompt_index·K + branch``), its branch."""
    K = int(groups_per_prompt)
    got = int(getattr(batch, "groups_per_prompt", 1))
    if got != K:
        raise RuntimeError(f"rollout: {got} advantage groups per prompt, the run expects {K}")
    prompt = batch.prompt_index.detach().cpu().to(torch.long)
    if prompt.numel() != num_prompts * group_size * K:
        raise RuntimeError(f"rollout: {prompt.numel()} rows, expected {num_prompts} prompts x {K} groups x {group_size}")
    if K == 1:
        return prompt, torch.zeros_like(prompt)
    branch = batch.group_id.detach().cpu().to(torch.long) - prompt * K
    if bool(((branch < 0) | (branch >= K)).any()):
        raise RuntimeError("rollout: group_id is not prompt_index * groups_per_prompt + branch")
    return prompt, branch


def _apply_mask(batch, mask: torch.Tensor, kind: str) -> None:
    """Restrict the actions the loss sees to ``mask`` (invalid samples masked out)."""
    if kind == "flow":
        batch.trained = mask
    else:
        batch.completion_mask = batch.completion_mask * mask.long()


def _append_jsonl(path: Path, obj: Dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _truncate_jsonl(path: Path, step: int) -> None:
    """Drop records of steps after ``step`` (they will be repeated after a resume)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if int(json.loads(line).get("step", 0)) <= step:
                keep.append(line)
        except (ValueError, json.JSONDecodeError):
            continue
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(x + "\n" for x in keep), encoding="utf-8")
    os.replace(tmp, path)


def _flat_config(cfg) -> Dict[str, Any]:
    out = {}

    def walk(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}/")
            elif isinstance(v, (int, float, str, bool)):
                out[f"{prefix}{k}"] = v
            else:
                out[f"{prefix}{k}"] = str(v)

    walk(to_dict(cfg))
    return out


def train(cfg: RunConfig) -> Dict[str, Any]:
    """Run the training loop for a validated config; returns ``summary.json``'s content."""
    return Trainer(cfg).run()


def train_command(config: Optional[str], overrides=(), *, family: Optional[str] = None, prog: str = "flowrl") -> int:
    """What ``flowrl train`` and the ``scripts/train_*.py`` entry points do: load the config with its
    overrides, check the model family (scripts are per family), train, print the held-out
    before/after numbers. Config and usage errors print one line and return 2; a run stopped for
    non-finite steps returns 3."""
    import sys

    from flowrl.config import ConfigError, load_run_config
    from scorers._text import bound_log_messages

    bound_log_messages()  # scripts/train_*.py come here without flowrl.cli
    try:
        cfg = load_run_config(config, overrides)
        if family is not None and cfg.model.family != family:
            other = "llm" if cfg.model.family == "lm" else cfg.model.family
            raise UsageError(f"model.family is {cfg.model.family!r}; this script trains {family!r} (use scripts/train_{other}.py)")
        summary = train(cfg)
    except (ConfigError, UsageError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"{prog}: stopped: {e}", file=sys.stderr)
        return 3
    if summary.get("stopped_by"):
        where = summary["checkpoint"] or "no checkpoint yet"
        print(f"{prog}: stopped by {summary['stopped_by']} after step {summary['steps']}; checkpoint: {where} "
              f"(run the same command again to continue: resume=auto)", file=sys.stderr)
        return 0
    first, last = summary.get("first_eval") or {}, summary.get("last_eval") or {}
    print(f"done: {summary['steps']} steps in {summary['wall_clock_s']:.0f} s; run folder {cfg.output_dir}")
    for k in sorted(set(first) | set(last)):
        print(f"  held-out {k}: {_fmt(first.get(k))} -> {_fmt(last.get(k))}")
    print(json.dumps(summary, indent=2))
    return 0


def _fmt(v) -> str:
    """A held-out number for the summary lines: 4 decimals, or 'n/a' (no evaluation, or every
    evaluated sample invalid)."""
    return f"{v:.4f}" if isinstance(v, (int, float)) and math.isfinite(v) else "n/a"
