"""The two things the training loop can train: a flow image policy or a causal LM.

A task owns the model and what is specific to its path; the loop (:mod:`flowrl.train.loop`) owns
everything they share: prompts per step, processes, advantages, the optimizer, checkpoints, the
evaluation schedule, logging. :class:`Task` is what a path provides.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple

import torch
from torch import Tensor

from flowrl.core.advantages import tree_transition_advantages
from flowrl.core.budgets import spo_kl_rho
from flowrl.flow.forward import ForwardLearner
from flowrl.flow.learner import FlowLearner, reference_transformer
from flowrl.core import rng
from flowrl.flow.plan import build_plan, plan_generator
from flowrl.flow.sampler import concat_rollouts, sample as sample_rollout
from flowrl.inputs import UsageError, torch_dtype
from flowrl.text.learner import TextLearner
from flowrl.text.rewards import resolve_reward, score_completions
from flowrl.text.rollout import completion_mask_from_ids, concat_text_rollouts, rollout_from_tokens
from flowrl.train.data import record_images
from flowrl.train.evaluate import eval_settings, evaluate_policy
from flowrl.train.lora import add_lora_to_transformer, lora_config, lora_targets_present, save_diffusers_lora
from flowrl.train.model import apply_video_settings, build_flow_policy, load_lm, lora_meta
from flowrl.train.runfolder import (
    EVAL_DIR, EVAL_LOG, FIRST_EVAL, SAMPLES_NAME, append_jsonl, atomic_write, before_after_dir, eval_dir,
    load_eval_result, save_eval, save_eval_result, write_comparison,
)
from scorers.multi import MultiReward
from scorers.registry import get_factory

log = logging.getLogger(__name__)



class Task(Protocol):
    """What the loop needs from a path (an image policy, a causal LM)."""

    module: torch.nn.Module  # the trainable model (diffusers transformer or causal LM)

    def set_forward_module(self, m) -> None:
        """Route training forward passes through accelerate's wrapper ``m`` (None: the module)."""

    def sample(self, records: Sequence[Dict], keys: Sequence[Tuple[int, int]], step: int,
               sizes: Optional[Sequence[int]] = None):
        """Sample ``group_size`` completions per record (no grad) of one prompt sub-batch, or ``sizes[i]``
        for record i (per-prompt budgets); ``keys`` (record index, position) and ``step`` name each
        prompt's noise stream (:mod:`flowrl.core.rng`), so a prompt's samples do not depend on the
        sub-batch. Rows prompt-major. The part can be scored (:meth:`score`)."""

    def join(self, parts: Sequence):
        """The step's batch from its sub-batches in order (:meth:`sample`); it has ``prompt_index``,
        ``groups_per_prompt`` and ``select(rows)``. ``rollout`` = ``join([sample(...)])``."""

    def score(self, batch, records: Sequence[Dict]) -> Tuple[Tensor, List[str], Dict[str, Any]]:
        """Rewards ``[N, R]`` (NaN: invalid), their names, ``{"issues": [...]}`` of a sub-batch
        (:meth:`sample`) or a batch; ``records`` are its prompts. May run in a worker thread while
        the next sub-batch samples (``sample.overlap_rewards``)."""

    def tree_advantages(self, batch, total: Tensor, adv_cfg) -> Optional[Tuple[Tensor, Tensor]]:
        """``(advantages [N, T], valid [N])`` within each prompt's tree, or None for a batch of flat
        groups (the loop then normalises rewards over all processes)."""

    def action_mask(self, batch, advantages: Tensor, keep: Tensor) -> Tensor:
        """``[N, T]`` bool: the trained actions (denoising steps, completion tokens, or one per sample
        for a forward-process objective) of the rows ``keep`` (valid samples)."""

    def mask_actions(self, batch, mask: Tensor) -> None:
        """Restrict the actions the loss sees to ``mask`` (invalid samples masked out)."""

    def fill_old(self, batch, rows: Tensor) -> None:
        """Before the first optimizer step: store the sampling policy's log-probs of ``rows`` where the
        rollout did not (text: the rows after the first minibatch; flow: sampling stored them all)."""

    def minibatch_gradient(self, batch, advantages: Tensor, *, normalizer, beta, backward, epoch: int,
                           on_policy: bool) -> Dict[str, float]:
        """Accumulate the policy loss's gradient of a minibatch (of inner epoch ``epoch``); its statistics.
        ``on_policy``: the weights are still those that sampled the batch (first optimizer step)."""

    def nfe(self, batch) -> int:
        """Model evaluations of the rollout (generated tokens for text)."""

    def evaluate(self, records: Sequence[Dict], seeds: Sequence[int]):
        """Held-out evaluation (deterministic sampler or greedy decoding)."""

    def save_eval(self, run_dir: Path, step: int, res) -> Dict[str, Any]:
        """Write an evaluation into the run folder; ``{"means", "details"}``."""

    def checkpoint_meta(self) -> Dict[str, Any]:
        """What a checkpoint must record to be loaded again (the LoRA config of an image policy)."""

    def save_result(self, out_dir: Path) -> Path:
        """The final LoRA / model in the format diffusers or transformers loads."""


class FlowTask:
    """SD3 / Flux policy trained with a sampling plan (:mod:`flowrl.flow`)."""

    def __init__(self, cfg, device):
        self.cfg = cfg
        for name in cfg.rewards:  # an unknown scorer is a usage error: report it before loading the model
            get_factory(name)
        self.policy = build_flow_policy(cfg.model, device=str(device))
        apply_video_settings(self.policy, getattr(cfg, "video", None))
        self.device = device
        self._setup_trainable()

        if cfg.objective.forward:
            self.learner = ForwardLearner(
                self.policy, cfg.objective, seed=cfg.seed, group_size=cfg.sample.group_size, chunk_size=cfg.sample.chunk_size,
                ref_transformer=reference_transformer(self.policy.transformer, cfg.loss, needed=cfg.objective.needs_reference))
        else:
            self.learner = FlowLearner(self.policy, cfg.loss, guidance_scale=cfg.sample.guidance_scale,
                                       chunk_size=cfg.sample.chunk_size, step_weighting=cfg.plan.step_weighting,
                                       step_weight_scale=cfg.plan.step_weight_scale,
                                       ref_transformer=reference_transformer(self.policy.transformer, cfg.loss))
        self._reward = None
        self._first_eval = None  # (step, EvalResult) of the first evaluation, for before_after/

    # -- model ------------------------------------------------------------------------------------
    def _setup_trainable(self) -> None:
        t = self.policy.transformer
        tc, lo = self.cfg.train, self.cfg.lora
        if lo.enabled:
            lc = lora_config(self.cfg.model.family, lo.rank, lo.alpha, lo.targets, lo.init)
            present = lora_targets_present(t, sorted(lc.target_modules))
            if not present:
                raise UsageError(f"lora.targets: none of {sorted(lc.target_modules)} matches a module of the transformer")
            lc.target_modules = set(present)
            with torch.random.fork_rng():
                # the same LoRA init on every process. peft takes no generator, so its init draws from the
                # global RNG, seeded in a forked RNG with the plain seed (what torch.manual_seed(seed) gives a
                # peft user), not a flowrl.core.rng stream
                torch.manual_seed(self.cfg.seed)
                add_lora_to_transformer(t, lc)
            if t.dtype != torch.float32:  # LoRA weights train in fp32 beside a half-precision base
                from diffusers.training_utils import cast_training_params  # heavy: diffusers, only for half-precision LoRA

                cast_training_params(t, dtype=torch.float32)
        else:
            t.requires_grad_(True)
        if tc.gradient_checkpointing and hasattr(t, "enable_gradient_checkpointing"):
            t.enable_gradient_checkpointing()

    @property
    def module(self) -> torch.nn.Module:
        return self.policy.transformer

    def set_forward_module(self, m) -> None:
        self.policy.forward_module = m

    def set_old_policy(self, old) -> None:
        """The old policy's weights (:class:`flowrl.core.shadow.DecayedCopy`) for the objective's ``v_old``."""
        self.learner.set_old(old)

    # -- rollout / reward ---------------------------------------------------------------------------
    def rollout(self, records: Sequence[Dict], keys: Sequence[Tuple[int, int]], step: int,
                sizes: Optional[Sequence[int]] = None):
        """One sampling call for all ``records`` (:meth:`sample`)."""
        return self.join([self.sample(records, keys, step, sizes)])

    def join(self, parts: Sequence):
        """Sub-batch rollouts as one (:func:`flowrl.flow.sampler.concat_rollouts`)."""
        return concat_rollouts(parts)

    def sample(self, records: Sequence[Dict], keys: Sequence[Tuple[int, int]], step: int,
               sizes: Optional[Sequence[int]] = None):
        """Sample ``group_size`` trajectories for each record (``sizes[i]`` for record i when given). The
        randomness of the prompt with keys ``(record, position)`` comes from ``rng.generator(seed, "sample",
        step, record, position)``, so a prompt's samples do not depend on which process samples it or what
        else is in the batch."""
        c = self.cfg
        plan = build_plan(c.plan, c.sample.num_steps, step, plan_generator(c.seed, step))
        gens = [rng.generator(c.seed, "sample", step, *k) for k in keys]
        group = c.sample.group_size if sizes is None else [int(g) for g in sizes]
        ro = sample_rollout(self.policy, [r["prompt"] for r in records], plan, group_size=group,
                    height=c.sample.height, width=c.sample.width, guidance_scale=c.sample.guidance_scale,
                    generator=gens, same_noise=c.sample.same_noise, negative_prompt=c.sample.negative_prompt,
                    store_dtype=torch_dtype(c.sample.store_dtype), chunk_size=c.sample.chunk_size,
                    decode_chunk_size=c.sample.decode_chunk_size, progress=False,
                    store_means=self.learner.trains_steps, images=record_images(records))
        per = [ro.num_samples // len(keys)] * len(keys) if sizes is None else group  # each row's stream keys
        ro.row_keys = torch.tensor([[step, *k, j] for k, g in zip(keys, per) for j in range(g)], dtype=torch.long)
        return ro

    def reward_model(self):
        if self._reward is None:
            v = self.cfg.video
            self._reward = MultiReward(self.cfg.rewards, device=self.device, options=self.cfg.reward_options,
                                       score_frames=v.score_frames, every_k=v.every_k)
        return self._reward

    def score(self, ro, records: Sequence[Dict]) -> Tuple[Tensor, List[str], Dict[str, Any]]:
        """Rewards ``[N, R]`` (NaN = invalid) of the rollout's images (every granularity for
        multi-granularity plans: ``[N, K, R]``)."""
        rm = self.reward_model()
        names = list(rm.weights)
        prompts = [ro.prompts[i] for i in ro.prompt_index.tolist()]
        meta = _row_metadata(records, ro.prompt_index)
        imgs = ro.images_per_granularity if ro.images_per_granularity is not None else ro.images.unsqueeze(1)
        cols, issues = [], []
        for k in range(imgs.shape[1]):
            res = rm(imgs[:, k], prompts, **meta)
            cols.append(torch.stack([res.components[n] for n in names], dim=1))
            issues.extend(str(i) for i in res.issues)
        r = torch.stack(cols, dim=1)  # [N, K, R]
        return (r[:, 0] if r.shape[1] == 1 else r), names, {"issues": issues}

    def tree_advantages(self, ro, total: Tensor, adv_cfg) -> Optional[Tuple[Tensor, Tensor]]:
        """Per-transition advantages of a tree rollout (TempFlow-GRPO, Dynamic-TreeRPO:
        :func:`flowrl.core.advantages.tree_transition_advantages`); None for flat groups."""
        if ro.node_parent is None or not self.learner.trains_steps:  # forward objectives: a prompt's leaves are one group
            return None
        adv, valid = tree_transition_advantages(ro.node_parent, ro.leaf_path[:, -1], ro.step_node, total, adv_cfg)
        return adv.float(), valid

    # -- update -------------------------------------------------------------------------------------
    def action_mask(self, ro, advantages: Tensor, keep: Tensor) -> Tensor:
        return self.learner.action_mask(ro, advantages, keep)

    def mask_actions(self, ro, mask: Tensor) -> None:
        self.learner.mask_actions(ro, mask)

    def select(self, ro, rows: Tensor):
        return ro.select(rows)

    def fill_old(self, ro, rows: Tensor) -> None:
        pass  # the sampler stores every trained transition's log-prob as it samples

    def minibatch_gradient(self, ro, advantages: Tensor, *, normalizer, beta, backward, epoch: int,
                           on_policy: bool = False) -> Dict[str, float]:
        # the stored log-probs stay the old ones even on-policy (as Flow-GRPO): they are free, and the
        # learner's on_policy mode would change today's numerics by the sampler/learner float drift
        return self.learner.minibatch_gradient(ro, advantages, normalizer=normalizer, beta=beta, backward=backward,
                                               epoch=epoch)

    def nfe(self, ro) -> int:
        return int(ro.nfe)

    # -- evaluation / saving ------------------------------------------------------------------------
    def evaluate(self, records: Sequence[Dict], seeds: Sequence[int]):
        """The held-out evaluation with the settings ``flowrl sample`` uses (:func:`eval_settings`:
        evaluation steps, guidance, rows per call, ``sample.chunk_size``)."""
        return evaluate_policy(self.policy, [r["prompt"] for r in records], list(seeds), reward=self.reward_model(),
                               images=record_images(records), **eval_settings(self.cfg))

    def save_eval(self, run_dir: Path, step: int, res) -> Dict[str, Any]:
        """Grid + scores under ``eval/``, and the before/after comparison ``before_after/`` (grid.png,
        index.html, scores.csv: this process's first evaluation, normally the base model, next to this
        one, same prompts and seeds); returns the means and per-category details."""
        save_eval(run_dir, step, res)
        kept = before_after_dir(run_dir) / FIRST_EVAL  # the first evaluation, kept across resumes
        if self._first_eval is None and kept.is_file():
            first_step, first = load_eval_result(kept)
            if first_step < step:  # a resumed run: its "before" is the run's first evaluation
                self._first_eval = (first_step, first)
        if self._first_eval is None:
            self._first_eval = (step, res)
            save_eval_result(kept, step, res)
        elif self._first_eval[0] != step and (self._first_eval[1].prompts, self._first_eval[1].seeds) == (
                res.prompts, res.seeds):  # (evaluations between the first and last may hold fewer prompts)
            first_step, first = self._first_eval
            write_comparison(before_after_dir(run_dir), first, res,
                             labels=(f"step {first_step}", f"step {step}"), title="flowrl: before / after")
        s = res.summary()
        return {"means": s["means"], "details": s["details"]}

    def checkpoint_meta(self) -> Dict[str, Any]:
        """The LoRA config (None: full weights), which ``flowrl sample --checkpoint`` rebuilds."""
        return {"lora": lora_meta(self.module) if self.cfg.lora.enabled else None}

    def save_result(self, out_dir: Path) -> Path:
        out_dir = Path(out_dir)
        if self.cfg.lora.enabled:
            return save_diffusers_lora(type(self.policy.pipeline), self.policy.transformer, out_dir / "lora")
        self.policy.transformer.save_pretrained(out_dir / "transformer")
        return out_dir / "transformer"


def _row_metadata(records: Sequence[Dict], prompt_index: Tensor) -> Dict[str, List]:
    """Dataset columns other than the prompt, one entry per rollout row."""
    keys = sorted({k for r in records for k in r if k != "prompt"})
    idx = prompt_index.tolist()
    return {k: [records[i].get(k) for i in idx] for k in keys}


class TextTask:
    """A transformers causal LM trained with GRPO (:mod:`flowrl.text`)."""

    def __init__(self, cfg, device):
        self.cfg = cfg
        self.device = device
        try:  # before loading the model: an unknown reward is reported at once
            self.reward_fns = {name: resolve_reward(name) for name in cfg.rewards}
        except KeyError as e:
            raise UsageError(str(e.args[0])) from None
        model, tok = load_lm(cfg.model.path, dtype=torch_dtype(cfg.model.dtype), device=str(device))
        self.model = self._setup_trainable(model)
        self.tokenizer = tok
        tc = cfg.text
        ref = None
        if not cfg.lora.enabled and (cfg.loss.beta > 0 or cfg.loss.beta_schedule != "constant"):
            ref, _ = load_lm(cfg.model.path, dtype=torch_dtype(cfg.model.dtype), device=str(device))
        self.learner = TextLearner(self.model, tok, cfg.loss, max_new_tokens=tc.max_new_tokens, temperature=tc.temperature,
                                   top_k=tc.top_k, top_p=tc.top_p, chunk_size=tc.chunk_size, ref_model=ref,
                                   teacher_model=self._load_teacher(tok))

    def _load_teacher(self, tok):
        """KDRL's teacher (``model.teacher``), frozen, or None. Its token log-probs are compared with
        the student's token by token, so it must share the tokenizer: same vocabulary, same ids."""
        path = self.cfg.model.teacher
        if not path:
            return None
        teacher, t_tok = load_lm(path, dtype=torch_dtype(self.cfg.model.dtype), device=str(self.device), key="model.teacher")
        same = t_tok.get_vocab() == tok.get_vocab() and (t_tok.eos_token_id, t_tok.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
        if not same:
            raise UsageError(f"model.teacher: {path!r} has another tokenizer than model.path {self.cfg.model.path!r} "
                             f"({len(t_tok.get_vocab())} vs {len(tok.get_vocab())} tokens, or other ids); KDRL compares "
                             "token log-probs, so the teacher must share the student's tokenizer")
        n_out = teacher.get_output_embeddings().weight.shape[0]
        if n_out < len(tok):
            raise UsageError(f"model.teacher: its output layer has {n_out} rows for a tokenizer of {len(tok)} tokens")
        return teacher

    def _setup_trainable(self, model):
        from peft import get_peft_model  # heavy: peft (imports transformers), only for LM LoRA runs

        tc, lo = self.cfg.train, self.cfg.lora
        if lo.enabled:
            lc = lora_config("lm", lo.rank, lo.alpha, lo.targets, lo.init)
            with torch.random.fork_rng():
                torch.manual_seed(self.cfg.seed)  # as FlowTask: peft draws its init from the global RNG
                model = get_peft_model(model, lc)
        else:
            model.requires_grad_(True)
        if tc.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model.eval()  # no dropout: on-policy log-probs must match the rollout's exactly
        return model

    @property
    def module(self) -> torch.nn.Module:
        return self.model

    def set_forward_module(self, m) -> None:
        self.learner.forward_model = m

    def set_processes(self, reduce_fn, world: int) -> None:
        """The loop's sum over processes and their number (DisCO's batch-wide counts)."""
        self.learner.reduce_fn, self.learner.world = reduce_fn, int(world)

    def sequence_logps(self, ro) -> Tensor:
        """``[N]`` each completion's mean token log-prob under the sampling policy (Rewarding the unlikely)."""
        return self.learner.sequence_logps(ro)

    def spo_drift(self, ro, previous: Sequence[Optional[Tuple[List[int], List[int], List[float]]]]):
        """SPO rho kl, after the step's update: ``(rho [N], D [N], entries)``. ``D`` is the drift of each row's
        prompt's previous response (``previous[i]``: prompt tokens, response tokens, their log-probs after that
        visit's update) under the policy now, by :func:`flowrl.core.budgets.spo_kl_rho`; a prompt without one
        compares this row's response with itself (upstream: ``D = 0``). ``entries``: each row's (prompt
        tokens, response tokens, log-probs now), what the next visit compares."""
        s = self.cfg.budget.single_stream
        pad = self.tokenizer.pad_token_id
        now = self.learner.policy_logps(ro)
        entries = []
        for i in range(ro.num_samples):
            pm, cm = ro.prompt_mask[i].bool(), ro.completion_mask[i].bool()
            entries.append((ro.prompt_ids[i][pm].tolist(), ro.completion_ids[i][cm].tolist(), now[i][cm].tolist()))
        seen = [i for i, p in enumerate(previous) if p is not None]
        old = new = mask = torch.zeros((ro.num_samples, 1), dtype=torch.float64)  # D = 0 where no previous response
        if seen:
            past = rollout_from_tokens([previous[i][0] for i in seen], [previous[i][1] for i in seen], pad)
            old = torch.zeros((ro.num_samples, past.completion_ids.shape[1]), dtype=torch.float64)
            new, mask = old.clone(), old.clone()
            for i in seen:
                old[i, :len(previous[i][2])] = torch.tensor(previous[i][2], dtype=torch.float64)
            new[seen] = self.learner.policy_logps(past).double()
            mask[seen] = past.completion_mask.double()
        rho, D = spo_kl_rho(old, new, mask, half=s.kl_half, clip=s.rho_clip)
        return rho, D, entries

    def embedding_grad_norms(self, ro, rows: Tensor) -> Tensor:
        """``[len(rows)]`` GVM's per-sample gradient norms of those rows (``budget.gvm.grad_norms``)."""
        return self.learner.embedding_grad_norms(ro, rows)

    def rollout(self, records: Sequence[Dict], keys: Sequence[Tuple[int, int]], step: int,
                sizes: Optional[Sequence[int]] = None):
        """One generation for all ``records`` (:meth:`sample`, :meth:`join`)."""
        return self.join([self.sample(records, keys, step, sizes)])

    def sample(self, records: Sequence[Dict], keys: Sequence[Tuple[int, int]], step: int,
               sizes: Optional[Sequence[int]] = None):
        """The completions (no log-probs: :meth:`join`), ``sizes[i]`` for record i when given. Row j of
        the prompt with keys ``(record, position)``: ``rng.generator(seed, "sample", step, record, position, j)``."""
        group = self.cfg.sample.group_size if sizes is None else [int(g) for g in sizes]
        ro = self.learner.generate([r["prompt"] for r in records], group_size=group,
                                   seed=self.cfg.seed, prompt_keys=[(step, *k) for k in keys])
        ro.step = step
        return ro

    def join(self, parts: Sequence):
        """The sub-batches as one rollout (:func:`flowrl.text.rollout.concat_text_rollouts`) with the
        reference's log-probs of all its rows when KL is on; the old ones are left to :meth:`fill_old`."""
        return self.learner.complete(concat_text_rollouts(parts, self.tokenizer.pad_token_id), old_logps=False)

    def score(self, ro, records: Sequence[Dict]):
        prompts = [records[i]["prompt"] for i in ro.prompt_index.tolist()]
        r, names = score_completions(self.reward_fns, prompts, ro.completions, _row_metadata(records, ro.prompt_index))
        return r, names, {"issues": []}

    def tree_advantages(self, ro, total: Tensor, adv_cfg) -> None:
        return None  # completions are flat groups

    def action_mask(self, ro, advantages: Tensor, keep: Tensor) -> Tensor:
        return ro.completion_mask.bool() & keep.to(torch.bool).to(ro.completion_mask.device).unsqueeze(1)

    def mask_actions(self, ro, mask: Tensor) -> None:
        ro.completion_mask = ro.completion_mask * mask.long()

    def checkpoint_meta(self) -> Dict[str, Any]:
        return {"lora": None}  # a peft LoRA is restored from the config (lora.*)

    def select(self, ro, rows: Tensor):
        return ro.select(rows)

    def fill_old(self, ro, rows: Tensor) -> None:
        """The rollout skipped the old log-prob pass (TRL's shortcut with one update per generation
        batch): compute it now for the rows that are trained after the first optimizer step."""
        self.learner.fill_old_logps(ro, rows)

    def minibatch_gradient(self, ro, advantages: Tensor, *, normalizer, beta, backward, epoch: int,
                           on_policy: bool = False, teacher_beta: Optional[float] = None) -> Dict[str, float]:
        return self.learner.minibatch_gradient(ro, advantages, normalizer=normalizer, beta=beta, backward=backward,
                                               on_policy=on_policy, teacher_beta=teacher_beta)

    def nfe(self, ro) -> int:
        return int(ro.completion_mask.sum())  # generated tokens

    def evaluate(self, records: Sequence[Dict], seeds: Sequence[int]):
        """Greedy completions of the held-out prompts; the mean of each reward (e.g. exact-match
        accuracy)."""
        tok, model = self.tokenizer, self.model
        prompts = [r["prompt"] for r in records]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(input_ids=enc["input_ids"].to(self.device), attention_mask=enc["attention_mask"].to(self.device),
                                 do_sample=False, max_new_tokens=self.cfg.text.max_new_tokens,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        comp = out[:, enc["input_ids"].shape[1]:].cpu()
        mask, _ = completion_mask_from_ids(comp, tok.eos_token_id)
        texts = tok.batch_decode(comp * mask + tok.pad_token_id * (1 - mask), skip_special_tokens=True)
        r, names = score_completions(self.reward_fns, prompts, texts, _row_metadata(records, torch.arange(len(records))))
        means = {n: float(torch.nanmean(r[:, i])) for i, n in enumerate(names)}
        w = torch.tensor([self.cfg.rewards[n] for n in names])
        means["total"] = float(torch.nanmean((r * w).sum(1)))
        samples = [{"prompt": p, "completion": t, **{n: float(r[i, j]) for j, n in enumerate(names)}}
                   for i, (p, t) in enumerate(zip(prompts, texts))]
        return {"means": means, "samples": samples}

    def save_eval(self, run_dir: Path, step: int, res) -> Dict[str, Any]:
        """Completions under ``eval/step-N/samples.jsonl`` and a record in ``eval.jsonl``."""
        d = eval_dir(run_dir, step)
        atomic_write(d / SAMPLES_NAME, "".join(json.dumps(x) + "\n" for x in res["samples"]))
        append_jsonl(Path(run_dir) / EVAL_LOG, {"step": int(step), "means": res["means"], "details": {},
                                                "samples": f"{EVAL_DIR}/{d.name}/{SAMPLES_NAME}"})
        return {"means": res["means"], "details": {}}

    def save_result(self, out_dir: Path) -> Path:
        out = Path(out_dir) / ("lora" if self.cfg.lora.enabled else "model")
        self.model.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        return out


def build_task(cfg, device):
    """The task for ``cfg.model.family``."""
    if cfg.model.family == "lm":
        return TextTask(cfg, device)
    return FlowTask(cfg, device)
