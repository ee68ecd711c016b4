"""Supervised pretraining of the shipped demo LM (``assets/demo_lm``), its evaluation, and a GRPO check.

:func:`pretrain` trains a tiny Qwen2 (:func:`flowrl.demo.tiny_text.build_tiny_lm`) by next-token
prediction on ``prompt + answer + <eos>`` of multi-digit arithmetic
(:func:`flowrl.demo.arithmetic.arithmetic_records`) until its greedy exact-match accuracy on a
validation set carved out of the *train* split reaches a target: right sometimes but not often,
so that GRPO has groups with both right and wrong answers. The held-out ``test`` split is only
used for reporting (:func:`greedy_accuracy`, :func:`pass_at_k`). :func:`rl_check` runs a short GRPO
run on the saved model through flowrl's own :class:`flowrl.train.loop.Trainer` to confirm that RL
lifts it. ``scripts/pretrain_demo_lm.py`` is the command line.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from flowrl.config import load_run_config
from flowrl.core import rng
from flowrl.demo.arithmetic import arithmetic_records
from flowrl.demo.tiny_text import build_tiny_lm
from flowrl.text.rewards import exact_match
from flowrl.text.rollout import generate
from flowrl.train.optim import lr_factor

log = logging.getLogger(__name__)

Record = Dict[str, str]
IGNORE_INDEX = -100


@dataclass
class PretrainConfig:
    """Settings of :func:`pretrain` (every field has a default; the script exposes them as flags)."""

    digits: int = 2  # operand digits of the arithmetic task (2: 10..99 + 10..99)
    ops: Tuple[str, ...] = ("+",)  # operators ('+', '-'); the RL demo's 'arithmetic:train' uses '+' only
    num_train: int = 4000  # distinct train-split problems used for next-token training
    num_val: int = 256  # further train-split problems (never trained on) that decide when to stop
    num_test: int = 512  # held-out test-split problems for the final report (the RL demo's eval set)
    hidden_size: int = 128  # model width (128 lifts under GRPO much faster than 64)
    layers: int = 2  # transformer blocks
    heads: int = 4  # attention heads
    kv_heads: int = 2  # key/value heads (grouped-query attention)
    intermediate_size: int = 256  # MLP width
    max_positions: int = 64  # longest prompt + completion the model is built for
    batch_size: int = 64  # sequences per optimizer step
    learning_rate: float = 3e-3  # AdamW peak learning rate
    weight_decay: float = 0.01  # AdamW weight decay
    warmup_steps: int = 50  # linear warm-up, then constant
    max_steps: int = 4000  # give up after this many steps (the target was not reached)
    eval_every: int = 20  # steps between validation checks
    target_accuracy: float = 0.25  # stop at the first check whose validation greedy accuracy reaches this
    seed: int = 0  # weights, data order and the problem draw

    def validate(self) -> "PretrainConfig":
        for name in ("digits", "num_train", "num_val", "num_test", "hidden_size", "layers", "heads", "kv_heads",
                     "intermediate_size", "max_positions", "batch_size", "max_steps", "eval_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size: must be divisible by heads={self.heads}, got {self.hidden_size}")
        if self.heads % self.kv_heads:
            raise ValueError(f"kv_heads: must divide heads={self.heads}, got {self.kv_heads}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate: must be > 0, got {self.learning_rate}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        if not 0 < self.target_accuracy <= 1:
            raise ValueError(f"target_accuracy: must be in (0, 1], got {self.target_accuracy}")
        if not self.ops or any(op not in ("+", "-") for op in self.ops):
            raise ValueError(f"ops: must be a non-empty subset of ('+', '-'), got {self.ops!r}")
        return self


# --------------------------------------------------------------------------------------------
# data


def task_records(cfg: PretrainConfig) -> Tuple[List[Record], List[Record], List[Record]]:
    """(train, val, test) records: train and val are disjoint draws of the train split (the first
    ``num_train`` and the next ``num_val`` of one seeded draw), test is the held-out split drawn as
    the RL loop draws ``arithmetic:test`` (``arithmetic_records('test', n, seed)``)."""
    ops = tuple(cfg.ops)
    both = arithmetic_records("train", cfg.num_train + cfg.num_val, seed=cfg.seed, digits=cfg.digits, ops=ops)
    test = arithmetic_records("test", cfg.num_test, seed=cfg.seed, digits=cfg.digits, ops=ops)
    return both[:cfg.num_train], both[cfg.num_train:], test


def sft_batch(tokenizer, records: Sequence[Record]) -> Dict[str, Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` for next-token training on
    ``prompt + answer + <eos>``; ``labels`` is -100 on prompt and padding tokens so only the answer
    and the EOS are learned (the model's own shift aligns position t with token t+1)."""
    if not records:
        raise ValueError("records: empty")
    eos = tokenizer.eos_token_id
    rows, labels = [], []
    for r in records:
        p = tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
        a = tokenizer(str(r["answer"]), add_special_tokens=False)["input_ids"] + [eos]
        rows.append(p + a)
        labels.append([IGNORE_INDEX] * len(p) + a)
    width = max(len(x) for x in rows)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    lab = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(zip(rows, labels)):
        ids[i, :len(x)] = torch.tensor(x)
        lab[i, :len(y)] = torch.tensor(y)
        mask[i, :len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


def answer_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy over the labelled tokens:
    ``-1/|S| sum_{(i,t) in S} log softmax(logits[i, t])[labels[i, t+1]]`` with ``S`` the positions
    whose next label is not -100 (standard causal-LM SFT loss, as in GPT-2's objective)."""
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits/labels: shapes [N, T, V] and [N, T] expected, got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    return torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                                             ignore_index=IGNORE_INDEX)


# --------------------------------------------------------------------------------------------
# evaluation


def max_answer_tokens(records: Sequence[Record], tokenizer) -> int:
    """Tokens needed to write the longest answer plus its EOS."""
    return max(len(tokenizer(str(r["answer"]), add_special_tokens=False)["input_ids"]) for r in records) + 1


@torch.no_grad()
def greedy_completions(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int,
                       batch_size: int = 256) -> List[str]:
    """Greedy completions (``model.generate(do_sample=False)``, left padding), decoded without
    special tokens and cut at the first EOS."""
    tokenizer.padding_side = "left"
    was = model.training
    model.eval()
    out: List[str] = []
    try:
        for s in range(0, len(prompts), batch_size):
            enc = tokenizer(list(prompts[s:s + batch_size]), return_tensors="pt", padding=True, add_special_tokens=False)
            gen = model.generate(**enc, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            out.extend(tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    finally:
        model.train(was)
    return out


def exact_match_rate(completions: Sequence[str], answers: Sequence[str]) -> float:
    """Fraction of completions equal (stripped) to their answer: the mean of
    :func:`flowrl.text.rewards.exact_match`."""
    if len(completions) != len(answers) or not completions:
        raise ValueError(f"completions/answers: need equal non-zero lengths, got {len(completions)} and {len(answers)}")
    return float(sum(exact_match(None, list(completions), answer=list(answers))) / len(completions))


def greedy_accuracy(model, tokenizer, records: Sequence[Record], *, max_new_tokens: Optional[int] = None,
                    batch_size: int = 256) -> float:
    """Greedy exact-match accuracy on ``records``."""
    n_new = max_new_tokens or max_answer_tokens(records, tokenizer)
    comps = greedy_completions(model, tokenizer, [r["prompt"] for r in records], max_new_tokens=n_new,
                               batch_size=batch_size)
    return exact_match_rate(comps, [r["answer"] for r in records])


def pass_at_k(model, tokenizer, records: Sequence[Record], *, k: int = 8, temperature: float = 1.0, seed: int = 0,
              max_new_tokens: Optional[int] = None, prompts_per_batch: int = 64) -> Dict[str, float]:
    """Sampled accuracy with :func:`flowrl.text.rollout.generate` (per-row seeded): ``pass@k`` is
    the fraction of prompts with at least one right answer among ``k`` samples (the empirical
    estimator with n = k, Chen et al. 2021, arXiv 2107.03374), ``sample_acc`` the mean over all
    samples, ``mixed_frac`` the fraction of prompts whose group holds both right and wrong answers
    (the groups that give GRPO a non-zero advantage)."""
    if k < 1:
        raise ValueError(f"k: must be >= 1, got {k}")
    n_new = max_new_tokens or max_answer_tokens(records, tokenizer)
    hits: List[float] = []
    for s in range(0, len(records), prompts_per_batch):
        part = records[s:s + prompts_per_batch]
        ro = generate(model, tokenizer, [r["prompt"] for r in part], group_size=k, max_new_tokens=n_new, seed=seed,
                      temperature=temperature)
        ans = [part[i]["answer"] for i in ro.prompt_index.tolist()]
        hits.extend(1.0 if c.strip() == a else 0.0 for c, a in zip(ro.completions, ans))
    h = torch.tensor(hits).view(len(records), k)
    per = h.sum(1)
    return {"pass_at_k": float((per > 0).float().mean()), "sample_acc": float(h.mean()),
            "mixed_frac": float(((per > 0) & (per < k)).float().mean())}


# --------------------------------------------------------------------------------------------
# pretraining


@dataclass
class PretrainResult:
    """What :func:`pretrain` returns: the model, its tokenizer, and the record of the run."""

    model: Any
    tokenizer: Any
    steps: int
    reached_target: bool
    val_accuracy: float
    wall_clock_s: float
    history: List[Dict[str, Any]] = field(default_factory=list)  # one entry per validation check (loss None at 0)


def pretrain(cfg: PretrainConfig, *, progress: bool = True) -> PretrainResult:
    """Train a fresh tiny Qwen2 on ``cfg``'s arithmetic task until the validation greedy accuracy
    reaches ``cfg.target_accuracy`` (checked every ``eval_every`` steps, and before the first step)
    or ``max_steps`` pass. Deterministic for a given ``cfg`` (seeded weights and data order;
    set ``torch.set_num_threads(1)`` for bit-identical CPU runs)."""
    cfg.validate()
    train, val, _ = task_records(cfg)
    model, tok = build_tiny_lm(hidden_size=cfg.hidden_size, layers=cfg.layers, heads=cfg.heads, kv_heads=cfg.kv_heads,
                               intermediate_size=cfg.intermediate_size, max_positions=cfg.max_positions, seed=cfg.seed)
    data = sft_batch(tok, train)
    n_new = max_answer_tokens(val, tok)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    epoch = 0  # the data order of epoch e: the stream (seed, "pretrain", "order", e) of flowrl.core.rng
    order = torch.randperm(len(train), generator=rng.generator(cfg.seed, "pretrain", "order", epoch))
    pos = 0
    history: List[Dict[str, Any]] = []
    t0 = time.perf_counter()
    acc = greedy_accuracy(model, tok, val, max_new_tokens=n_new)
    history.append({"step": 0, "val_accuracy": acc, "loss": None})  # None: valid JSON, unlike NaN
    reached = acc >= cfg.target_accuracy
    step = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, desc="pretrain demo LM", unit="step")
    running = float("nan")
    model.train()
    try:
        while not reached and step < cfg.max_steps:
            if pos + cfg.batch_size > len(train):
                epoch += 1
                order = torch.randperm(len(train), generator=rng.generator(cfg.seed, "pretrain", "order", epoch))
                pos = 0
            idx = order[pos:pos + cfg.batch_size]
            pos += cfg.batch_size
            for g in opt.param_groups:
                g["lr"] = cfg.learning_rate * lr_factor(step, cfg.warmup_steps)
            am = data["attention_mask"][idx]
            logits = model(input_ids=data["input_ids"][idx], attention_mask=am).logits
            loss = answer_nll(logits, data["labels"][idx])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"pretraining loss is {loss.item()} at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            lv = loss.item()
            running = lv if math.isnan(running) else 0.9 * running + 0.1 * lv
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                acc = greedy_accuracy(model, tok, val, max_new_tokens=n_new)
                history.append({"step": step, "val_accuracy": acc, "loss": running})
                log.debug("step %d loss %.4f val greedy accuracy %.3f", step, running, acc)
                reached = acc >= cfg.target_accuracy
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{running:.3f}", val_acc=f"{history[-1]['val_accuracy']:.3f}")
    finally:
        if bar is not None:
            bar.close()
    model.eval()
    if not reached:
        log.warning("validation accuracy %.3f did not reach the target %.3f in %d steps", acc, cfg.target_accuracy,
                    cfg.max_steps)
    return PretrainResult(model=model, tokenizer=tok, steps=step, reached_target=reached, val_accuracy=acc,
                          wall_clock_s=time.perf_counter() - t0, history=history)


def save_demo_lm(result: PretrainResult, cfg: PretrainConfig, out_dir, metrics: Optional[Dict[str, Any]] = None) -> Path:
    """Write the transformers model folder (safetensors weights, config, generation config,
    tokenizer files) and ``pretrain.json`` (the config, the run record and ``metrics``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result.model.save_pretrained(out)
    result.tokenizer.save_pretrained(out)
    record = {"config": asdict(cfg), "steps": result.steps, "reached_target": result.reached_target,
              "val_accuracy": result.val_accuracy, "wall_clock_s": round(result.wall_clock_s, 1),
              "history": result.history, "metrics": metrics or {}}
    tmp = out / "pretrain.json.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    tmp.replace(out / "pretrain.json")
    return out


# --------------------------------------------------------------------------------------------
# the RL check


@dataclass
class RLCheckConfig:
    """Settings of :func:`rl_check`: GRPO with full fine-tuning on the train split, greedy
    evaluation on the held-out test split (``arithmetic:train`` / ``arithmetic:test``), each field one
    key of the :class:`flowrl.config.RunConfig` it builds (:func:`rl_check_overrides`)."""

    steps: int = 300  # GRPO steps (rollout + one on-policy update each): max_steps
    prompts_per_step: int = 64  # prompts per rollout: sample.prompts_per_step
    group_size: int = 8  # samples per prompt: sample.group_size
    learning_rate: float = 1e-3  # AdamW learning rate (full fine-tuning; LoRA wants ~3e-3)
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping
    temperature: float = 1.0  # sampling temperature
    max_new_tokens: int = 4  # completion length limit (3 answer digits + EOS for 2-digit addition)
    loss: str = "grpo"  # loss_preset (flowrl.core.losses.loss_preset)
    lora: bool = False  # train a LoRA adapter on q/k/v/o instead of all weights
    lora_rank: int = 16  # LoRA rank (the LM family default of flowrl.train.lora)
    lora_alpha: float = 32.0  # LoRA alpha
    num_train_prompts: int = 4000  # train-split prompts drawn: data.max_train_prompts
    eval_every: int = 50  # steps between held-out evaluations
    max_seconds: Optional[float] = None  # stop early after this much training time: time_budget_s
    seed: int = 0  # rollout noise, prompt order and the problem draws
    digits: int = 2  # operand digits (must match the pretrained task)
    num_test: int = 512  # held-out prompts for the greedy evaluation: eval.num_prompts

    def validate(self) -> "RLCheckConfig":
        for name in ("steps", "prompts_per_step", "group_size", "max_new_tokens", "num_train_prompts", "eval_every",
                     "num_test", "digits"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate: must be > 0, got {self.learning_rate}")
        return self


def rl_check_overrides(model_dir, cfg: RLCheckConfig, run_dir, *, progress: bool = True) -> List[str]:
    """The ``flowrl train`` overrides (``key=value``, no config file) of :func:`rl_check`'s run: the
    text demo's setup (``configs/llm_demo.yaml``: family ``lm``, exact-match reward, greedy held-out
    evaluation) with ``cfg``'s sizes, a checkpoint only at the end and no tracker."""
    c = cfg.validate()
    keys = {
        "output_dir": str(run_dir), "seed": c.seed, "max_steps": c.steps, "time_budget_s": c.max_seconds,
        "eval_every": c.eval_every, "checkpoint_every": c.steps, "loss_preset": c.loss, "rewards.exact_match": 1.0,
        "model.family": "lm", "model.path": str(model_dir), "text.max_new_tokens": c.max_new_tokens,
        "text.temperature": c.temperature, "text.chunk_size": c.prompts_per_step * c.group_size,
        "sample.group_size": c.group_size, "sample.prompts_per_step": c.prompts_per_step,
        "data.train": f"arithmetic:train:{c.digits}", "data.eval": f"arithmetic:test:{c.digits}",
        "data.max_train_prompts": c.num_train_prompts, "eval.num_prompts": c.num_test, "eval.seeds": [0],
        "lora.enabled": c.lora, "lora.rank": c.lora_rank, "lora.alpha": c.lora_alpha,
        "train.learning_rate": c.learning_rate, "train.weight_decay": c.weight_decay,
        "train.max_grad_norm": c.max_grad_norm, "train.tracker": "none", "train.progress": progress,
    }
    return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in keys.items()]


def rl_check(model_dir, cfg: RLCheckConfig, run_dir, *, progress: bool = True) -> Dict[str, Any]:
    """GRPO on the model folder ``model_dir`` with flowrl's own training loop
    (:class:`flowrl.train.loop.Trainer`, run folder ``run_dir``, settings :func:`rl_check_overrides`):
    the same rollout, exact-match reward, group-normalised advantages, update and greedy held-out
    evaluation as ``flowrl train configs/llm_demo.yaml``. Returns the held-out greedy accuracy curve,
    ``{"history": [{"step", "train_s", "test_accuracy", "train_reward"}...], "before", "after", "steps",
    "wall_clock_s", "run_dir", "config"}`` (``train_reward``: the mean reward of the steps since the
    previous evaluation; ``train_s``: training seconds so far, evaluations excluded). The trained
    model is ``run_dir/model`` (``run_dir/lora`` with ``cfg.lora``)."""
    from flowrl.train.loop import Trainer  # heavy (accelerate, the flow and text stacks): only the check needs it

    summary = Trainer(load_run_config(None, rl_check_overrides(model_dir, cfg, run_dir, progress=progress))).run()
    history = _rl_history(Path(run_dir))
    return {"history": history, "before": history[0]["test_accuracy"], "after": history[-1]["test_accuracy"],
            "steps": summary["steps"], "wall_clock_s": round(summary["wall_clock_s"], 1), "run_dir": str(run_dir),
            "config": asdict(cfg)}


def _rl_history(run_dir: Path) -> List[Dict[str, Any]]:
    """One entry per evaluation of a finished run folder: its step, held-out exact-match accuracy
    (``eval.jsonl``), the training seconds so far and the mean training reward since the previous
    evaluation (``metrics.jsonl``; None at step 0)."""
    evals = [json.loads(x) for x in (run_dir / "eval.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
    out, prev = [], 0
    for ev in evals:
        seen = [m for m in steps if prev < m["step"] <= ev["step"]]
        train_s = float(sum(m["time/step"] for m in steps if m["step"] <= ev["step"]))
        out.append({"step": ev["step"], "train_s": round(train_s, 1), "test_accuracy": ev["means"]["exact_match"],
                    "train_reward": sum(m["reward/exact_match"] for m in seen) / len(seen) if seen else None})
        prev = ev["step"]
    return out
