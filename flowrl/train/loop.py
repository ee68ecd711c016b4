"""The one training loop for both paths: rollout -> score -> advantages -> K inner updates ->
log -> maybe evaluate -> maybe checkpoint (:meth:`Trainer.train_step` reads as that list).

Processes (accelerate). ``sample.prompts_per_step`` prompts make one step's global batch; the
choice of prompts, the plan and every sample's noise derive from (seed, step, prompt) only, each a
named stream of :mod:`flowrl.core.rng`, so a prompt's group is the same whichever process samples
it. Minibatch m of an inner epoch is the contiguous block m of the step's prompts, split evenly
over processes (:func:`flowrl.train.data.local_layout`). Rewards are gathered from all processes
before advantages are computed and the loss normaliser counts the whole optimizer batch, so neither
the advantages nor the updated weights depend on the number of processes
(:mod:`flowrl.train.processes` holds the collectives and the gradient averaging under DDP; FSDP and
other wrappers are called as they are, ``backward(loss, last)`` synchronising on a minibatch's last
pass).

Singular sweeps (``plan.singular.choice: all``) give each prompt K advantage groups, one per branch
step; :func:`minibatch_split` decides how minibatches cut them (G²RPO: one optimizer step per
branch step, in step order; TempFlow-GRPO, ``plan.singular.sweep_split: prompt``: blocks of prompts).

Robustness (:mod:`flowrl.train.guard`). Invalid samples (a NaN/inf reward, a failed remote batch)
get advantage 0, are masked out of the loss and counted; a NaN/inf loss or gradient skips the
optimizer step; every optimizer step is followed by a weight check; ``train.max_bad_steps`` bad
steps in a row stop the run, naming the last good checkpoint. Checkpoints are atomic and verified
(:mod:`flowrl.train.checkpoint`); all randomness is a function of (seed, step), so a resumed run
repeats exactly the steps after its checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from torch.nn.parallel import DistributedDataParallel

from flowrl.config import ConfigError, RunConfig, dump, flat_dict, load_run_config, to_dict
from flowrl.core import rng
from flowrl.core.advantages import (
    DynamicRewardWeights, PerPromptStatTracker, SmoothStatTracker, compute_advantages, multi_granularity_advantages,
    unlikely_advantages,
)
from flowrl.core.budgets import RolloutBudget, spo_advantages
from flowrl.core.losses import AdaptiveKLController, kl_coefficient, loss_normalizers, teacher_coefficient
from flowrl.core.objectives import old_decay
from flowrl.core.shadow import DecayedCopy
from flowrl.inputs import UsageError, writable_dir
from flowrl.train.checkpoint import (
    capture_rng, latest_checkpoint, list_checkpoints, load_checkpoint, restore_rng, save_checkpoint,
    verify_checkpoint,
)
from flowrl.train.data import choose_prompts, load_records, local_layout
from flowrl.train.guard import (
    GracefulStop, RunLock, apply_optimizer_settings, check_resume_config, check_update, weight_norm,
)
from flowrl.train.lora import load_trainable_state_dict, trainable_state_dict
from flowrl.train.metrics import mean, reward_metrics, update_metrics
from flowrl.train.optim import warmup_scheduler
from flowrl.train.preflight import preflight_warnings
from flowrl.train.processes import Processes, check_requested_backend
from flowrl.train.report import write_report
from flowrl.train.runfolder import append_jsonl, atomic_write
from flowrl.train.tasks import build_task
from scorers._text import bound_log_messages

log = logging.getLogger("flowrl.train")


class TrainingStopped(RuntimeError):
    """Raised when the run cannot go on (too many non-finite steps in a row)."""


@dataclasses.dataclass
class _StepPrompts:
    """This process's prompts of one step, in minibatch-block order."""

    records: List[Dict[str, Any]]  # the prompt records
    keys: List[Tuple[int, int]]  # (record index, position) of each prompt: with the step, the keys of its noise
    positions: List[int]  # position of each in the step's global prompt list
    record_index: List[int]  # index of each in the training records
    per_block: int  # prompts per minibatch block on this process
    sizes: List[int]  # the group size of each (budget: they may differ)
    chosen: List[int]  # the record of every position of the step (all processes)
    step_sizes: List[int]  # the group size of every position of the step (all processes)


@dataclasses.dataclass
class _RowGroups:
    """Per rollout row: advantage group, tracker key, minibatch prompt block and branch block."""

    group: torch.Tensor
    key: torch.Tensor
    block: torch.Tensor
    branch_block: torch.Tensor


class Trainer:
    """Holds the run's state; :meth:`run` executes ``max_steps`` steps (resuming if asked)."""

    def __init__(self, cfg: RunConfig, accelerator=None):
        self.cfg = cfg
        self.run_dir = writable_dir(cfg.output_dir, "output_dir")  # before accelerate or a model touches it
        tc = cfg.train
        if tc.deterministic:
            torch.use_deterministic_algorithms(True)
        check_requested_backend()  # before accelerate reads its plugins from the environment
        if accelerator is None:
            log_with = None if tc.tracker == "none" else tc.tracker
            project = ProjectConfiguration(project_dir=str(self.run_dir), logging_dir=str(self.run_dir / "logs"))
            accelerator = Accelerator(cpu=cfg.model.device == "cpu", mixed_precision=tc.mixed_precision,
                                      log_with=log_with, project_config=project)
        check_requested_backend(accelerator)
        self.acc = accelerator
        self.procs = Processes(accelerator)
        self._lock = None
        self._t0 = time.time()  # this segment's start (run() sets it again when training starts)
        self._reward_names: List[str] = []  # the task's reward names, known after the first scoring
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
        self.mb_prompts, self.mb_branches = minibatch_split(tc.num_minibatches, self.groups_per_prompt, cfg.plan.singular.sweep_split)
        layout = local_layout(cfg.sample.prompts_per_step, self.mb_prompts, self.procs.world, self.procs.rank)  # validate early
        chunk_bounds(sum(len(mb) for mb in layout), cfg.sample.rollout_chunks)  # every sub-batch holds a prompt
        self.train_records = load_records(cfg.data.train, limit=cfg.data.max_train_prompts, seed=cfg.seed)
        # which prompts each step draws and how many rollouts each gets (uniform: the epoch walk, group_size each)
        self.budget = RolloutBudget(cfg.budget, num_records=len(self.train_records), prompts_per_step=cfg.sample.prompts_per_step,
                                    group_size=cfg.sample.group_size, seed=cfg.seed)
        self._spo_pending = None  # SPO rho kl: (keys, totals) of the step, observed after its update
        # the first and last evaluations' prompts; those in between are the first eval.num_prompts of them
        self.eval_records = load_records(cfg.data.eval, limit=cfg.eval.ends_num_prompts or cfg.eval.num_prompts,
                                         seed=cfg.seed)
        if self.procs.main:  # settings that would silently do nothing: said once, before the model loads
            for line in preflight_warnings(cfg, train_prompts=[r["prompt"] for r in self.train_records],
                                           eval_prompts=[r["prompt"] for r in self.eval_records]):
                log.warning("%s", line)

        # Python, numpy and torch global state: a function of the seed for whatever library code draws
        # from it (none of our streams does: those are flowrl.core.rng's); checkpoints save and restore it
        set_seed(cfg.seed)
        self.task = build_task(cfg, accelerator.device)
        params = [p for p in self.task.module.parameters() if p.requires_grad]
        if not params:
            raise UsageError("nothing to train: the model has no trainable parameters")
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=tc.learning_rate, betas=tuple(tc.adam_betas),
                                           eps=tc.adam_eps, weight_decay=tc.weight_decay)
        self.scheduler = warmup_scheduler(self.optimizer, tc.warmup_steps)
        # The LR scheduler is deliberately not prepared: accelerate's AcceleratedScheduler steps the
        # wrapped scheduler num_processes times per optimizer step (it assumes a per-process
        # dataloader split), which would make the LR (warm-up) depend on the number of processes.
        wrapped, self.optimizer = accelerator.prepare(self.task.module, self.optimizer)
        self.wrapped = wrapped
        # FSDP2 shards in place, replacing each parameter by a DTensor parameter: read them again
        self.params = [p for p in self.task.module.parameters() if p.requires_grad]
        self.local_grads = self.procs.world > 1 and isinstance(wrapped, DistributedDataParallel)  # see flowrl.train.processes
        self.task.set_forward_module(None if (wrapped is self.task.module or self.local_grads) else wrapped)
        self.ema = None
        if cfg.ema.enabled:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(params, decay=cfg.ema.decay, use_ema_warmup=False)
        self.old = None  # the forward objectives' old policy: a decayed copy of the trained weights
        if cfg.objective.needs_old:
            self.old = DecayedCopy(params, [n for n, p in self.task.module.named_parameters() if p.requires_grad])
            self.task.set_old_policy(self.old)
        self.tracker = (PerPromptStatTracker(cfg.advantage.stat_buffer_size, cfg.advantage.stat_min_count)
                        if cfg.advantage.stat_tracking else None)
        if cfg.advantage.smooth_tracking:  # DCPO: each prompt's cumulative reward statistics
            self.tracker = SmoothStatTracker()
        self.kl_ctl = AdaptiveKLController.from_config(cfg.loss) if cfg.loss.beta_schedule == "adaptive" else None
        self._setup_variants(cfg)
        self.step = 0
        self.optimizer_steps = 0
        self.bad_in_row = 0
        self.invalid_in_row = 0  # consecutive steps in which no sample had a finite reward
        self.total_nfe = 0
        self.train_time = 0.0  # seconds of training (no evaluation) in this segment, for time_budget_s
        self.wall_before = 0.0  # wall clock of earlier (resumed) segments
        self.first_eval: Optional[Dict[str, float]] = None
        self.last_eval: Optional[Dict[str, float]] = None

    def _setup_variants(self, cfg: RunConfig) -> None:
        """Dynamic reward weights (their state is checkpointed) and the processes a task's loss may
        need to sum over (DisCO's batch-wide KL and group count)."""
        adv = cfg.advantage
        self.reward_weights = (DynamicRewardWeights(list(cfg.rewards), list(cfg.rewards.values()), adv.dynamic_weights_reg,
                                                    adv.dynamic_weights_every) if adv.dynamic_weights else None)
        if hasattr(self.task, "set_processes"):
            self.task.set_processes(self.procs.sum if self.procs.world > 1 else None, self.procs.world)

    # ------------------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        tensor_state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        budget_tensors = self.budget.tensor_state()
        if budget_tensors is not None:
            tensor_state["budget"] = budget_tensors
        if self.ema is not None:
            tensor_state["ema"] = self.ema.state_dict()
        if self.old is not None:
            tensor_state["old_policy"] = self.old.state_dict()
        meta = {
            **self.task.checkpoint_meta(),
            "optimizer_steps": self.optimizer_steps, "bad_in_row": self.bad_in_row, "invalid_in_row": self.invalid_in_row,
            "total_nfe": self.total_nfe,
            "wall_clock_s": self.wall_before + (time.time() - self._t0), "first_eval": self.first_eval,
            "last_eval": self.last_eval, "tracker": self.tracker.state_dict() if self.tracker else None,
            "kl_ctl": self.kl_ctl.state_dict() if self.kl_ctl else None, "config": to_dict(self.cfg),
            "budget": self.budget.state_dict() if self.cfg.budget.kind != "uniform" else None,  # (+ tensor_state)
            "reward_weights": self.reward_weights.state_dict() if self.reward_weights else None,
        }
        path = None
        weights = trainable_state_dict(self.task.module)
        if not all(bool(torch.isfinite(w).all()) for w in weights.values()):  # the update check should have stopped earlier
            raise TrainingStopped(f"step {self.step}: non-finite weights are never checkpointed. {self._last_good()}")
        if self.procs.main:
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
        cfg = self.cfg
        if self.procs.main:
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
        path = self.resume_from
        if path is None:
            if self.procs.main:  # a fresh start: drop what an earlier attempt in this folder logged before its first checkpoint
                self._set_aside_newer(0)
                _truncate_jsonl(self.run_dir / "metrics.jsonl", -1)
                _truncate_jsonl(self.run_dir / "eval.jsonl", -1)
            log.info("no checkpoint to resume from (resume=%s): training from step 0", self.cfg.resume)
            return
        ck = load_checkpoint(path, verify=False)  # _resume_path verified it (a second checksum pass would re-read it all)
        load_trainable_state_dict(self.task.module, ck["weights"], source=f"checkpoint {path}")
        self.optimizer.load_state_dict(ck["tensor_state"]["optimizer"])
        self.scheduler.load_state_dict(ck["tensor_state"]["scheduler"])
        changed = {k for k, _, _ in self.resume_changes}
        if changed & {"train.learning_rate", "train.weight_decay"}:
            apply_optimizer_settings(self.optimizer, self.scheduler, self.cfg.train.learning_rate, self.cfg.train.weight_decay)
        for k, old, new in self.resume_changes:
            if k not in ("resume", "output_dir"):
                log.info("resume: %s changed from %r to %r (applied)", k, old, new)
        if self.ema is not None and "ema" in ck["tensor_state"]:
            self.ema.load_state_dict(ck["tensor_state"]["ema"])
        if self.old is not None:
            if "old_policy" not in ck["tensor_state"]:
                raise UsageError(f"checkpoint {path} holds no old policy; objective.kind={self.cfg.objective.kind} needs one")
            self.old.load_state_dict(ck["tensor_state"]["old_policy"])
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
        if m.get("budget"):
            self.budget.load_state_dict(m["budget"])
        if self.budget.spo_kl and "budget" in ck["tensor_state"]:
            self.budget.load_tensor_state(ck["tensor_state"]["budget"])
        if self.reward_weights is not None and m.get("reward_weights"):
            self.reward_weights.load_state_dict(m["reward_weights"])
        restore_rng(ck["rng"])
        if self.procs.main:
            if path.parent == self.run_dir / "checkpoints":
                self._set_aside_newer(self.step)
            _truncate_jsonl(self.run_dir / "metrics.jsonl", self.step)
            _truncate_jsonl(self.run_dir / "eval.jsonl", self.step)
        log.info("resumed from %s at step %d", path, self.step)

    # -------------------------------------------------------------------------------- one step
    def _beta(self) -> float:
        if self.kl_ctl is not None:
            return float(self.kl_ctl.value)
        return kl_coefficient(self.optimizer_steps, self.cfg.loss)

    def _teacher_beta(self) -> Dict[str, float]:
        """``{"teacher_beta": value}`` at this optimizer step when a teacher is set (KDRL), else ``{}``."""
        if not self.cfg.model.teacher:
            return {}
        return {"teacher_beta": teacher_coefficient(self.optimizer_steps, self.cfg.loss)}

    def _update_reward_weights(self, batch, rewards: torch.Tensor, row_group: torch.Tensor, beta: float,
                               on_policy: bool) -> Dict[str, float]:
        """Dynamic reward weighting (Lu et al., arXiv 2509.11452, gradient-based): for each reward alone,
        its advantages and the policy gradient of the step's whole batch at the current weights,
        clipped to ``train.max_grad_norm``; the weights then follow the gradients' influences
        (:class:`flowrl.core.advantages.DynamicRewardWeights`). One extra backward pass per reward
        and step; nothing is applied to the model. Returns the step's weights and influences."""
        if self.reward_weights is None:
            return {}
        cfg, names = self.cfg, list(self._reward_names)
        n_local = rewards.shape[0]
        g_rewards, g_groups = self.procs.gather(rewards.float()), self.procs.gather(row_group)
        start = self.procs.row_offset(n_local)  # this process's rows (processes may hold different numbers)
        sl = slice(start, start + n_local)
        single = dataclasses.replace(cfg.advantage, reward_weights=None, dynamic_weights=False)
        reduce_fn = self.procs.sum if self.procs.world > 1 else None
        rows = torch.arange(n_local)
        if not on_policy:  # sampled by other weights (an old policy): the gradients need the old log-probs
            self.task.fill_old(batch, rows)
        grads = []
        for k in range(len(names)):
            adv_k, st = compute_advantages(g_rewards[:, k], g_groups, single)
            adv_k, keep = adv_k[sl].float(), st["keep"][sl]
            mask = self.task.action_mask(batch, adv_k, keep).bool()
            sub = self.task.select(batch, rows)
            norm = loss_normalizers(mask, cfg.loss.aggregation, world_size=self.procs.world, reduce_fn=reduce_fn)
            self.task.mask_actions(sub, mask)
            self._gradient(sub, adv_k, norm, beta, 0, on_policy=on_policy)
            self.acc.clip_grad_norm_(self.params, cfg.train.max_grad_norm)  # upstream clips each gradient too
            grads.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).float()
                                    for p in self.params]))
        self.optimizer.zero_grad(set_to_none=True)
        if not self.procs.all_true(all(bool(torch.isfinite(g).all()) for g in grads)):
            log.warning("step %d: a reward's gradient is not finite; the reward weights are not updated", self.step)
            influence = [float("nan")] * len(names)
        else:
            influence = self.reward_weights.step(names, grads, self.scheduler.get_last_lr()[0])
        weights = self.reward_weights.weights_for(names)
        return {**{f"reward_weight/{n}": w for n, w in zip(names, weights)},
                **{f"reward_influence/{n}": s for n, s in zip(names, influence)}}

    # -------------------------------------------------------------------------------- one step
    def train_step(self) -> Dict[str, Any]:
        """One step of the algorithm: rollout (no grad) -> rewards -> advantages -> K inner epochs
        of minibatch updates -> metrics. Returns the step's metrics (:mod:`flowrl.train.metrics`)."""
        t_start = time.time()
        step = self._step_prompts()
        self.task.module.eval()
        weights = self._rollout_weights()
        batch, (rewards, names, issues), t_sample, scoring_busy = self._sample_and_score(step, weights)
        t_score = time.time()
        groups = self._groups(batch, step)
        beta, teacher_beta = self._beta(), self._teacher_beta()  # (the teacher's: at the step's first update)
        weight_metrics = self._update_reward_weights(batch, rewards, groups.group, beta, on_policy=weights is _NO_SWAP)
        adv, adv_stats = self._advantages(rewards, batch, groups.group, groups.key)
        update = self._inner_updates(batch, adv, adv_stats["keep"], groups, beta, on_policy=weights is _NO_SWAP)
        update.update(self._spo_after_update(batch, groups))
        self._update_old()
        nfe = self.procs.sum_int(self.task.nfe(batch))  # model evaluations (generated tokens for text)
        self.total_nfe += nfe
        t_end = time.time()

        rew, rows = reward_metrics(rewards, names, [self.cfg.rewards[n] for n in names], self.procs.gather)
        metrics: Dict[str, Any] = {
            "step": self.step + 1, **rew,
            "zero_std_frac": float(adv_stats.get("zero_std_frac", float("nan"))),
            "filtered_samples": int(adv_stats.get("filtered_count", 0)),
            "downsampled_samples": int(adv_stats.get("downsampled_count", 0)),
            **update, "beta": beta, **teacher_beta, **weight_metrics, "lr": self.scheduler.get_last_lr()[0], "nfe": nfe,
            "time/sampling": t_sample - t_start, "time/scoring": t_score - t_sample, "time/scoring_total": scoring_busy,
            "time/update": t_end - t_score, "time/step": t_end - t_start,
        }
        if self.cfg.budget.kind != "uniform":  # the step's rollout budget over all processes
            metrics.update({"budget/min_size": min(step.step_sizes), "budget/max_size": max(step.step_sizes),
                            "budget/distinct_prompts": len(set(step.chosen))})
        for issue in issues:
            log.warning("step %d: reward issue: %s", self.step, issue)
        self.step += 1
        self.invalid_in_row = self.invalid_in_row + 1 if rew["invalid_samples"] == rows else 0
        return metrics

    def _step_prompts(self) -> "_StepPrompts":
        """This step's prompts on this process: the step's global choice (a function of seed and
        step), this process's share of it in minibatch blocks (:func:`local_layout`), and each
        prompt's identity key at this step (its record index and position)."""
        cfg = self.cfg
        P, n = cfg.sample.prompts_per_step, len(self.train_records)
        # the same on every process: a function of the seed, the step and (budgets) gathered rewards
        chosen, sizes = self.budget.choose(self.step, lambda count, step: choose_prompts(n, count, cfg.seed, step))
        layout = local_layout(P, self.mb_prompts, self.procs.world, self.procs.rank, sizes=sizes)
        positions = [pos for mb in layout for pos in mb]
        return _StepPrompts(
            records=[self.train_records[chosen[pos]] for pos in positions],
            keys=[(chosen[pos], pos) for pos in positions],
            positions=positions, record_index=[chosen[pos] for pos in positions], per_block=len(layout[0]),
            sizes=[sizes[pos] for pos in positions], chosen=list(chosen), step_sizes=list(sizes),
        )

    def _sample_and_score(self, step: "_StepPrompts", weights):
        """The step's batch and its rewards: ``(batch, (rewards, names, issues), t_sampled, scoring_s)``.

        The prompts are sampled in ``sample.rollout_chunks`` contiguous sub-batches (:func:`chunk_bounds`),
        one sampling call each, and joined into one batch (``task.join``); each sub-batch is scored on
        its own, so the rewards are the same numbers whether scoring overlaps sampling or not. With
        ``sample.overlap_rewards`` a sub-batch is scored in a worker thread while the next one samples
        (a remote scorer's requests are in flight meanwhile); without, every sub-batch is scored after
        sampling ended. ``t_sampled``: when sampling (and the join) ended; ``scoring_s``: the seconds the
        scorer worked (``time/scoring_total``; ``time/scoring`` is the wait after sampling). An error
        of the scorer is raised as it is, as soon as the loop sees it (between sub-batches)."""
        bounds = chunk_bounds(len(step.records), self.cfg.sample.rollout_chunks)
        G = self.cfg.sample.group_size
        busy = [0.0]

        def score(part, records):
            t = time.perf_counter()
            try:
                return self.task.score(part, records)
            finally:
                busy[0] += time.perf_counter() - t

        pool = _ScoringWorker() if self.cfg.sample.overlap_rewards else None
        try:
            parts, pending = [], []
            with weights:  # the weights that sample (:meth:`_rollout_weights`)
                for a, b in bounds:  # per-prompt sizes only when they differ from group_size (else today's call)
                    sizes = None if all(g == G for g in step.sizes) else step.sizes[a:b]
                    part = self.task.sample(step.records[a:b], step.keys[a:b], self.step, sizes)
                    parts.append(part)
                    if pool is not None:
                        pending.append(pool.submit(score, part, step.records[a:b]))
                        pool.raise_failed(pending)
                batch = self.task.join(parts)
            t_sampled = time.time()
            if pool is not None:
                scored = [f.result() for f in pending]
            else:
                scored = [score(part, step.records[a:b]) for part, (a, b) in zip(parts, bounds)]
        finally:
            if pool is not None:
                pool.close()
        return batch, self._combine_scores(scored), t_sampled, busy[0]

    def _combine_scores(self, scored):
        """The sub-batches' ``task.score`` results as the step's: rewards ``[N, R]`` (``[N, K, R]`` for
        granularities) with every non-finite value (NaN, +inf, -inf) as NaN: that sample is invalid
        (advantage 0, masked); names; reward issues."""
        names = scored[0][1]
        for _, other, _ in scored[1:]:
            if list(other) != list(names):
                raise RuntimeError(f"task.score: reward names {list(other)} of a sub-batch differ from {list(names)}")
        rewards = torch.cat([r for r, _, _ in scored], dim=0)
        info = {"issues": [i for _, _, inf in scored for i in (inf.get("issues") or [])]}
        self._reward_names = names
        nonfinite = ~torch.isfinite(rewards)
        if bool(nonfinite.any()):
            n_inf = int(torch.isinf(rewards.reshape(rewards.shape[0], -1)).any(dim=1).sum())
            if n_inf:
                log.warning("step %d: %d sample(s) got an infinite reward; they count as invalid", self.step, n_inf)
            rewards = torch.where(nonfinite, torch.full_like(rewards, float("nan")), rewards)
        return rewards, names, list(info.get("issues") or [])

    def _groups(self, batch, step: "_StepPrompts") -> "_RowGroups":
        """Each row's advantage group (global: position in the step x K + branch), its tracker key
        (the prompt's identity x K + branch), and its minibatch block (prompt block, branch block)."""
        K = self.groups_per_prompt
        prompt, branch = _row_groups(batch, step.sizes, K)
        return _RowGroups(
            group=torch.tensor(step.positions, dtype=torch.long)[prompt] * K + branch,
            key=torch.tensor(step.record_index, dtype=torch.long)[prompt] * K + branch,
            block=prompt // step.per_block, branch_block=branch // (K // self.mb_branches),
        )

    def _inner_updates(self, batch, adv: torch.Tensor, keep: torch.Tensor, groups: "_RowGroups", beta: float,
                       on_policy: bool = True) -> Dict[str, Any]:
        """``train.num_iterations`` epochs over the rollout, each ``num_minibatches`` optimizer
        steps on blocks of rows in a seeded order (branch blocks in step order for sweeps); returns
        :func:`update_metrics`. ``on_policy``: the trained weights sampled the batch, so the first
        optimizer step needs no separate old log-prob pass (:meth:`Task.fill_old` skips its rows)."""
        cfg, tc = self.cfg, self.cfg.train
        mask = self.task.action_mask(batch, adv, keep).bool()
        reduce_fn = self.procs.sum if self.procs.world > 1 else None
        # a forward-process objective's actions are its samples (dpo: pairs): the loss is their mean
        agg = "token-mean" if cfg.objective.forward else cfg.loss.aggregation
        loss_stats: List[Dict[str, float]] = []
        grad_norms: List[float] = []
        update_ratios: List[float] = []
        skipped = 0
        blocks = []  # (epoch, rows) of each optimizer step, in order
        for epoch in range(tc.num_iterations):
            perm = torch.randperm(self.mb_prompts, generator=rng.generator(cfg.seed, "minibatch", self.step, epoch)).tolist()
            for c in range(self.mb_branches):  # branch blocks in step order
                for b in perm:
                    blocks.append((epoch, ((groups.block == b) & (groups.branch_block == c)).nonzero().flatten()))
        later = [rows for _, rows in blocks[1 if on_policy else 0:]]  # rows trained after the first optimizer step
        self.task.fill_old(batch, torch.cat(later).unique() if later else torch.zeros(0, dtype=torch.long))
        for i, (epoch, rows) in enumerate(blocks):
            sub = self.task.select(batch, rows)
            norm = loss_normalizers(mask[rows], agg, world_size=self.procs.world, reduce_fn=reduce_fn)
            self.task.mask_actions(sub, mask[rows])
            out = self._optimizer_step(sub, adv[rows], norm, beta, epoch, on_policy=on_policy and i == 0)
            if out is None:
                skipped += 1
                continue
            st, gn, ratio = out
            loss_stats.append(st)
            grad_norms.append(gn)
            update_ratios.append(ratio)
        self.bad_in_row = self.bad_in_row + 1 if skipped else 0
        loss_stats = self.procs.global_stats(loss_stats)
        if self.kl_ctl is not None and loss_stats:
            self.kl_ctl.update(mean([s.get("kl") for s in loss_stats]))
        return update_metrics(loss_stats, grad_norms, update_ratios, skipped)

    def _advantages(self, rewards, batch, row_group: torch.Tensor, row_key: torch.Tensor):
        """Advantages for the local rows. Flat groups: rewards are gathered from all processes
        and normalised globally. Trees: node values and sibling comparisons stay within a
        prompt's tree, which never spans processes."""
        cfg = self.cfg
        n_local = rewards.shape[0]
        adv_cfg = cfg.advantage
        if self.reward_weights is not None:  # dynamic reward weighting: the weights as updated this step
            adv_cfg = dataclasses.replace(adv_cfg, reward_weights=self.reward_weights.weights_for(self._reward_names))
        elif adv_cfg.reward_weights is None:  # the run's reward weights, in the order of the reward columns
            adv_cfg = dataclasses.replace(adv_cfg, reward_weights=tuple(float(cfg.rewards[n]) for n in self._reward_names))
        w = torch.tensor([cfg.rewards[n] for n in self._reward_names], dtype=torch.float64)
        tree = self.task.tree_advantages(batch, (rewards.double() * w).sum(-1), adv_cfg)
        if tree is not None:
            adv, valid = tree
            return adv.float(), {"keep": valid, "invalid_count": int((~valid).sum())}
        g_rewards = self.procs.gather(rewards.float())
        g_groups = self.procs.gather(row_group)
        budget = cfg.budget.kind != "uniform"  # a rollout budget reads each row's prompt (row_key: K = 1)
        keys = self.procs.gather(row_key).tolist() if (self.tracker is not None or budget) else None
        g_total = (g_rewards.double() * w).sum(-1) if budget else None  # each row's weighted total (flat groups)
        if rewards.ndim == 3:  # multi-granularity [N, K, R]
            adv, stats = multi_granularity_advantages(g_rewards, g_groups, adv_cfg)
        elif cfg.budget.kind == "single_stream":  # SPO: the prompt's tracked value is the baseline
            valid = torch.isfinite(g_total)
            adv = spo_advantages(g_total, self.budget.baseline(keys, self.step), valid)
            stats = {"keep": valid, "invalid_count": int((~valid).sum()), "filtered_count": 0}
        else:
            tracked = keys if self.tracker is not None else None
            if adv_cfg.unlikely_penalty > 0:  # Rewarding the unlikely: ranks by the sampling policy's likelihoods
                seq = self.procs.gather(self.task.sequence_logps(batch).double())
                adv, stats = unlikely_advantages(g_rewards, seq, g_groups, adv_cfg, tracker=self.tracker, prompt_keys=tracked)
            else:
                adv, stats = compute_advantages(g_rewards, g_groups, adv_cfg, tracker=self.tracker, prompt_keys=tracked,
                                                step=self.step)
        if self.budget.spo_kl:  # SPO rho kl: observed after the update (_spo_after_update), whose drift sets rho
            self._spo_pending = (keys, g_total)
        elif budget:
            self.budget.observe(self.step, keys, g_total, grad_norms=self._gvm_grad_norms(rewards, w, batch))
        # this process's rows are its slice of the gathered tensors (processes may hold different numbers of rows)
        start = self.procs.row_offset(n_local)
        sl = slice(start, start + n_local)
        stats = dict(stats)
        stats["keep"] = stats.pop("keep")[sl]
        return adv[sl].float(), stats

    def _spo_after_update(self, batch, groups: "_RowGroups") -> Dict[str, float]:
        """SPO with ``rho_type: kl`` (verl-recipe ``_get_spo_rho``, after the actor update): each prompt's
        previous response is scored by the updated policy, its drift sets the prompt's decay, then the
        step's rewards are observed and its responses remembered. Returns the step's mean rho and drift."""
        if not self.budget.spo_kl:
            return {}
        keys, totals = self._spo_pending
        self._spo_pending = None
        local = groups.key.tolist()
        rho, drift, entries = self.task.spo_drift(batch, [self.budget.responses.get(k) for k in local])
        rho, drift = self.procs.gather(rho), self.procs.gather(drift)
        decays = dict(zip(keys, rho.tolist()))  # a prompt drawn twice: its last row's
        self.budget.observe(self.step, keys, totals, decays=decays)
        self.budget.remember(keys, self.procs.gather_objects(entries))
        return {"budget/spo_rho": float(rho.mean()), "budget/spo_drift": float(drift.mean())}

    def _gvm_grad_norms(self, rewards, w: torch.Tensor, batch) -> Optional[torch.Tensor]:
        """GVM's per-row gradient norms (``budget.gvm.grad_norms``) of this step's successes, gathered over
        processes (NaN on the other rows); None when the run does not use them."""
        b = self.cfg.budget
        if b.kind != "gvm" or b.gvm.grad_norms == "none":
            return None
        total = (rewards.double() * w).sum(-1)
        rows = (total >= b.success_threshold).nonzero().flatten()
        local = torch.full((total.shape[0],), float("nan"), dtype=torch.float64)
        local[rows] = self.task.embedding_grad_norms(batch, rows)
        return self.procs.gather(local)

    def _gradient(self, sub, adv: torch.Tensor, normalizer, beta: float, epoch: int,
                  on_policy: bool = False) -> Dict[str, float]:
        """The minibatch's gradient in ``.grad`` (zeroed first), averaged over processes under DDP;
        returns the task's loss statistics. ``on_policy``: the weights still are those that sampled it."""
        self.optimizer.zero_grad(set_to_none=True)

        def backward(loss, last=True, _w=self.wrapped):
            # ``last``: the minibatch's final backward, the one a wrapper that synchronises in backward
            # (FSDP) must not skip; a learner that does not say (``backward(loss)``) gets a synchronised
            # backward every time: correct, only slower. Under DDP the gradients are averaged after the
            # minibatch instead (:mod:`flowrl.train.processes`).
            ctx = contextlib.nullcontext() if (last or self.procs.world == 1 or self.local_grads) else self.acc.no_sync(_w)
            with ctx:
                self.acc.backward(loss)

        with self.acc.autocast():
            st = self.task.minibatch_gradient(sub, adv, normalizer=normalizer, beta=beta, backward=backward, epoch=epoch,
                                              on_policy=on_policy, **self._teacher_beta())
        if self.local_grads:
            self.procs.average_gradients(self.params)
        return st

    def _optimizer_step(self, sub, adv: torch.Tensor, normalizer, beta: float, epoch: int, on_policy: bool = False):
        """One minibatch: gradient, (DDP) averaging, clipping; then, if every process's loss and
        gradient are finite, the optimizer step, the weight check, the LR schedule and EMA.
        Returns ``(loss stats, grad norm, update ratio)``, or None when the step was skipped."""
        tc = self.cfg.train
        st = self._gradient(sub, adv, normalizer, beta, epoch, on_policy=on_policy)
        gn = self.acc.clip_grad_norm_(self.params, tc.max_grad_norm)
        gn = float(gn) if gn is not None else float("nan")
        # every process must take the same decision, or the replicas drift apart
        if not self.procs.all_true(math.isfinite(gn) and math.isfinite(st.get("loss", 0.0))):
            self.optimizer.zero_grad(set_to_none=True)
            log.warning("step %d: non-finite loss or gradient (grad norm %s); optimizer step skipped", self.step, gn)
            return None
        norm_before = weight_norm(self.params)
        self.optimizer.step()
        ratio, problem = check_update(norm_before, self.params, tc.max_update_ratio)
        if problem is not None:
            raise TrainingStopped(f"step {self.step + 1}: {problem}; these weights are not checkpointed. "
                                  f"{self._last_good()} (lower train.learning_rate or train.max_grad_norm)")
        self.scheduler.step()
        self.optimizer_steps += 1
        if self.ema is not None and self.optimizer_steps % self.cfg.ema.every == 0:
            self.ema.step(self.params)
        return st, gn, ratio

    def _rollout_weights(self):
        """The weights that sample this step: the old policy from ``objective.old.sample_from``
        optimizer steps on (DiffusionNFT: always; DGPO: after its switch step), else the trained ones."""
        start = self.cfg.objective.old.sample_from
        if self.old is None or start is None or self.optimizer_steps < start:
            return _NO_SWAP
        return self.old.swapped()

    def _update_old(self) -> None:
        """``theta_old <- d theta_old + (1 - d) theta`` after the step's updates, ``d`` at the optimizer
        step count (:func:`flowrl.core.objectives.old_decay`)."""
        if self.old is None:
            return
        o = self.cfg.objective.old
        self.old.update(old_decay(self.optimizer_steps, o.decay_flat, o.decay_rate, o.decay_max))

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

    def evaluate(self, ends: bool = False) -> Dict[str, Any]:
        """Held-out evaluation (deterministic sampler or greedy decoding, fixed seeds) on the main
        process: ``{"means": reward name -> mean, "details": per-category numbers}``. ``ends``: the
        first or last evaluation of the run, on all ``eval.ends_num_prompts`` prompts; the others
        use the first ``eval.num_prompts`` of them."""
        out: Dict[str, Any] = {}
        if self.procs.main:
            self.task.module.eval()
            records = self.eval_records if ends else self.eval_records[:self.cfg.eval.num_prompts]
            with self._ema_weights(), torch.no_grad():
                res = self.task.evaluate(records, self.cfg.eval.seeds)
            out = self.task.save_eval(self.run_dir, self.step, res)
        self.acc.wait_for_everyone()
        return out

    # ---------------------------------------------------------------------------------- driver
    def run(self) -> Dict[str, Any]:
        """Resume or start, train to ``max_steps`` (or the time budget), save, summarise. A SIGTERM
        or SIGINT ends the step in progress, writes a checkpoint and returns early with
        ``{"stopped_by": signal name, "checkpoint": path}`` (a second SIGINT interrupts at once)."""
        cfg = self.cfg
        self._t0 = time.time()
        stop = GracefulStop()
        try:
            with stop:
                if self.procs.main:
                    dump(cfg, self.run_dir / "config.yaml")
                self.maybe_resume()
                if cfg.train.tracker != "none":
                    self.acc.init_trackers("flowrl", config=flat_dict(to_dict(cfg), sep="/", scalars_only=True))
                if self.first_eval is None and cfg.eval.at_start and self.step == 0:
                    self.first_eval = self.last_eval = self.evaluate(ends=True)
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
        flag = self.procs.any_true(stop.signal_name is not None)
        if flag and stop.signal_name is None:  # another process was signalled
            stop.signal_name = "SIGTERM"
        return flag

    def _loop(self, stop) -> None:
        """Steps until ``max_steps``, the time budget, or a signal (then a checkpoint is written)."""
        cfg = self.cfg
        bar = None
        if self.procs.main and cfg.train.progress:
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
            before, self.train_time = self.train_time, self.train_time + metrics["time/step"]
            # each process times its own step: a decision taken on time is shared (any process's), or one
            # process would stop or evaluate while the others go on and their collectives would mismatch
            out_of_time = cfg.time_budget_s is not None and self.procs.any_true(self.train_time >= cfg.time_budget_s)
            if out_of_time:
                log.info("time budget of %.0f s of training reached at step %d", cfg.time_budget_s, self.step)
            last = self.step == cfg.max_steps or out_of_time
            timed = cfg.eval_every_s is not None and self.procs.any_true(
                passed_multiple(before, self.train_time, cfg.eval_every_s))
            if self.step % cfg.eval_every == 0 or last or timed:
                ev = self.evaluate(ends=last)
                if self.procs.main:
                    self.last_eval = ev
                    if self.first_eval is None:
                        self.first_eval = ev
                    metrics.update({f"eval/{k}": v for k, v in ev.get("means", {}).items()})
            if self.procs.main:
                append_jsonl(self.run_dir / "metrics.jsonl", metrics)
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
            "processes": self.procs.world,
        }
        if self.procs.main:
            with self._ema_weights():
                result = self.task.save_result(self.run_dir)
            summary["result"] = str(result)
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
            try:
                write_report(self.run_dir)
            except Exception as e:  # the report is a convenience; never lose a finished run over it
                log.warning("could not write report.html: %s", e)
        self.acc.wait_for_everyone()
        return summary


def passed_multiple(before: float, after: float, every: Optional[float]) -> bool:
    """Whether ``(before, after]`` holds a multiple of ``every`` (None: never): a step that carried
    training time past the next ``eval_every_s`` mark."""
    return every is not None and math.floor(after / every) > math.floor(before / every)


_NO_SWAP = contextlib.nullcontext()  # the rollout is sampled by the trained weights themselves


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
    raise UsageError(f"train.num_minibatches={M} with a sweep of {K} branch steps (plan.singular.choice: all): "
                     f"must divide {K} (minibatches of whole branch steps) or be a multiple of it "
                     f"(each branch step's prompts split further)")


def chunk_bounds(n: int, chunks: int) -> List[Tuple[int, int]]:
    """``[(start, stop), ...]``: ``n`` items in ``chunks`` contiguous sub-batches, sizes as even as
    possible, the larger first (``torch.tensor_split``'s rule); a usage error when a sub-batch would
    be empty (``sample.rollout_chunks`` above this process's prompts)."""
    if chunks < 1 or chunks > n:
        raise UsageError(f"sample.rollout_chunks={chunks}: this process samples {n} prompt(s) per step "
                         f"(sample.prompts_per_step over the processes); use at most {n}")
    q, r = divmod(n, chunks)
    out, a = [], 0
    for i in range(chunks):
        b = a + q + (1 if i < r else 0)
        out.append((a, b))
        a = b
    return out


class _ScoringWorker:
    """One worker thread that scores sub-batches in order while the caller samples the next one.

    The thread runs with the caller's CUDA device (its current device is per thread); its scorer
    calls share the device with sampling (one stream per device: kernels interleave, the scorer's
    CPU work, a remote scorer's waiting and a scorer on another device overlap). Errors come back
    from ``result()`` as the scorer raised them; :meth:`raise_failed` raises the first one early."""

    def __init__(self):
        from concurrent.futures import ThreadPoolExecutor

        device = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flowrl-score",
                                        initializer=None if device is None else torch.cuda.set_device,
                                        initargs=() if device is None else (device,))

    def submit(self, fn, *args):
        return self._pool.submit(fn, *args)

    @staticmethod
    def raise_failed(futures) -> None:
        for f in futures:
            if f.done() and f.exception() is not None:
                f.result()  # raises the scorer's exception

    def close(self) -> None:
        """Wait for the sub-batch being scored (a call cannot be interrupted), drop the queued ones."""
        self._pool.shutdown(wait=True, cancel_futures=True)


def _row_groups(batch, sizes: List[int], groups_per_prompt: int):
    """``(local prompt, branch)`` of every row of a rollout: its ``prompt_index`` and, for a batch
    with K > 1 groups per prompt (sweeps: ``group_id = prompt_index·K + branch``), its branch.
    ``sizes``: the group size of each local prompt."""
    K = int(groups_per_prompt)
    got = int(batch.groups_per_prompt)
    if got != K:
        raise RuntimeError(f"rollout: {got} advantage groups per prompt, the run expects {K}")
    prompt = batch.prompt_index.detach().cpu().to(torch.long)
    if prompt.numel() != sum(sizes) * K:
        raise RuntimeError(f"rollout: {prompt.numel()} rows, expected {K} groups x the group sizes {sizes}")
    if K == 1:
        return prompt, torch.zeros_like(prompt)
    branch = batch.group_id.detach().cpu().to(torch.long) - prompt * K
    if bool(((branch < 0) | (branch >= K)).any()):
        raise RuntimeError("rollout: group_id is not prompt_index * groups_per_prompt + branch")
    return prompt, branch


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
    atomic_write(path, "".join(x + "\n" for x in keep))


def train(cfg: RunConfig) -> Dict[str, Any]:
    """Run the training loop for a validated config; returns ``summary.json``'s content."""
    return Trainer(cfg).run()


def train_command(config: Optional[str], overrides=(), *, prog: str = "flowrl") -> int:
    """``flowrl train``: load the config with its overrides, train, print the held-out before/after
    numbers. Config and usage errors print one line and return 2; a run stopped for non-finite steps
    returns 3."""
    bound_log_messages()  # also when called without flowrl.cli (accelerate launch -m flowrl.cli goes through it too)
    try:
        cfg = load_run_config(config, overrides)
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
