"""Settings that load and validate but would do nothing, said once before a run starts.

:func:`preflight_warnings` looks at a validated :class:`flowrl.config.RunConfig` and returns one
line per silent no-op, which the training loop logs as a warning at start (nothing here changes the
config or stops the run): ``max_steps: 0``; a group-relative advantage with one sample per group
and nothing else giving it a baseline; every reward weight 0; ``train.per_prompt_stat_tracking``
with a plan that does not use it; a ``model.device`` this machine lacks (accelerate then trains on
the CPU); the ``shapes`` reward with prompts outside its grammar.

What would fail later is refused earlier: impossible combinations are ``ConfigError`` lines from
:func:`flowrl.config.load_run_config`, and :func:`preflight_errors` gives the problems that make
``flowrl sample`` and ``flowrl grid`` (which load the model on ``model.device`` themselves) fail.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from flowrl.train.data import load_records
from scorers._text import short

__all__ = ["preflight_errors", "preflight_warnings"]


def _device_problem(device: str) -> Optional[str]:
    """Why ``device`` cannot be used on this machine (None: it can, or it cannot be told)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        return f"{device!r} is not a torch device"
    if dev.type == "cpu":
        return None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return "torch.cuda.is_available() is False"
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return f"this machine has {torch.cuda.device_count()} CUDA device(s)"
        return None
    if dev.type == "mps":
        return None if torch.backends.mps.is_available() else "torch.backends.mps.is_available() is False"
    check = getattr(getattr(torch, dev.type, None), "is_available", None)
    if callable(check) and not check():
        return f"torch.{dev.type}.is_available() is False"
    return None


def preflight_errors(cfg) -> List[str]:
    """One line per problem that makes loading the model on ``cfg.model.device`` fail (what
    ``flowrl sample`` and ``flowrl grid`` do; ``flowrl train`` lets accelerate choose the device and
    only warns, see :func:`preflight_warnings`). Empty when there is none."""
    why = _device_problem(cfg.model.device)
    if why is None:
        return []
    return [f"model.device: {cfg.model.device!r} cannot be used here ({why}); set model.device=cpu "
            "or run on a machine that has it"]


def _effective_weights(cfg) -> List[float]:
    """The reward weights the advantages are computed with (the loop's rule)."""
    tree = cfg.model.family != "lm" and cfg.plan.kind == "tree"
    if cfg.advantage.reward_weights is not None and not tree:
        return [float(w) for w in cfg.advantage.reward_weights]
    return [float(w) for w in cfg.rewards.values()]


def _prompts_of(source: str, limit: Optional[int], seed: int) -> Optional[List[str]]:
    """The prompts of a prompt source, or None when it cannot be read (the loop reports that)."""
    try:
        return [r["prompt"] for r in load_records(source, limit=limit, seed=seed)]
    except Exception:  # a missing or malformed source is the loop's error to report, not ours
        return None


def _shapes_warning(cfg, which: str, prompts: Optional[Sequence[str]]) -> Optional[str]:
    source = cfg.data.train if which == "train" else cfg.data.eval
    kind, _, rest = source.partition(":")
    if kind == "shapes" and rest in ("train", "test"):
        return None
    if prompts is None:
        limit = cfg.data.max_train_prompts if which == "train" else cfg.eval.num_prompts
        prompts = _prompts_of(source, limit, cfg.seed)
        if prompts is None:
            return None
    from flowrl.demo.shapes import parse  # lazy: demo imports the library (and shapes pulls in scipy)

    bad = []
    for p in prompts:
        try:
            parse(p)
        except ValueError:
            bad.append(p)
    if not bad:
        return None
    n, k = len(prompts), len(bad)
    head = (f"data.{which}: {short(source, 120, quote=True)} holds " +
            ("no prompt of the shapes grammar" if k == n else f"{k} of {n} prompts outside the shapes grammar") +
            f" (e.g. {short(bad[0], 60, quote=True)}), which the shapes reward verifies (the prompts of "
            "'shapes:train' / 'shapes:test')")
    masks_only_them = (cfg.reward_options.get("shapes") or {}).get("on_invalid_prompt", "raise") == "nan"
    if which == "eval":
        what = ("every held-out score will be NaN" if k == n else "their held-out scores will be NaN" if masks_only_them
                else "the held-out scores of every batch holding one will be NaN (the scorer raises on it)")
    elif k == n:
        what = "every sample will be invalid (NaN reward) and nothing will be trained"
    elif masks_only_them:
        what = "their samples will be invalid (NaN reward)"
    else:
        what = ("a step that draws one loses its whole batch (the scorer raises on it; "
                "reward_options: {shapes: {on_invalid_prompt: nan}} loses only that prompt's samples)")
    return f"{head}: {what}"


def preflight_warnings(cfg, *, train_prompts: Optional[Sequence[str]] = None,
                       eval_prompts: Optional[Sequence[str]] = None) -> List[str]:
    """One-line warnings for the settings of ``cfg`` (a validated :class:`flowrl.config.RunConfig`)
    that would silently do nothing (module docstring); empty when there is none.

    Pure apart from reading the prompt sources: ``train_prompts`` / ``eval_prompts`` (the prompts of
    ``data.train`` / ``data.eval``, as the loop loaded them) spare that; when None and the source is a
    file, it is read (a source that cannot be read gives no warning: the loop reports it)."""
    out: List[str] = []
    adv = cfg.advantage
    image = cfg.model.family != "lm"
    tree = image and cfg.plan.kind == "tree"
    if cfg.max_steps == 0:
        out.append("max_steps: 0: no training step will run, so nothing will be trained")

    tracker_used = adv.stat_tracking and cfg.stat_tracker_applies
    if adv.stat_tracking and not cfg.stat_tracker_applies:
        why = ("plan.kind: tree compares each node with its siblings" if tree else
               f"plan.granularities: {list(cfg.plan.granularities)} normalises each granularity within its group")
        out.append(f"advantage.stat_tracking: true is not used: {why}; the per-prompt reward history "
                   "is never consulted")
    if cfg.sample.group_size == 1:
        if tree:
            out.append("sample.group_size: 1 with plan.kind: tree: a one-leaf tree has no siblings to compare, so "
                       "every advantage is 0 and nothing will be learned")
        elif adv.center == "group" and adv.ngrpo_max_reward is None and not tracker_used and cfg.budget.kind != "single_stream":
            out.append("sample.group_size: 1 with advantage.center: group: each group holds one sample, which is its "
                       "own baseline, so every advantage is 0 and nothing will be learned (use group_size >= 2, "
                       "advantage.stat_tracking: true, or advantage.center: batch)")

    weights = _effective_weights(cfg)
    if weights and all(w == 0 for w in weights):
        src = "advantage.reward_weights" if (adv.reward_weights is not None and not tree) else "rewards"
        out.append(f"{src}: every reward weight is 0: the total reward of every sample is 0, so every advantage "
                   "is 0 and nothing will be learned")

    why = _device_problem(cfg.model.device)
    if why is not None:
        out.append(f"model.device: {cfg.model.device!r} cannot be used here ({why}): flowrl train lets accelerate "
                   "pick the device and falls back to the CPU (slow); flowrl sample and flowrl grid, which load "
                   "the model on model.device, will fail")
    else:
        try:
            dev = torch.device(cfg.model.device)
        except (RuntimeError, ValueError, TypeError):  # pragma: no cover - validate() refuses it
            dev = torch.device("cpu")
        if dev.type != "cpu" and dev.index is not None:
            out.append(f"model.device: the index in {cfg.model.device!r} is not used by flowrl train: accelerate "
                       f"runs a single process on the current {dev.type} device ({dev.type}:0 unless set "
                       f"otherwise); choose the GPU with CUDA_VISIBLE_DEVICES={dev.index} instead")

    if image and "shapes" in cfg.rewards:
        for which, given in (("train", train_prompts), ("eval", eval_prompts)):
            w = _shapes_warning(cfg, which, given)
            if w is not None:
                out.append(w)
    return out
