#!/usr/bin/env python
"""Pretrain the text demo's tiny LM and write it to ``assets/demo_lm/``.

A tiny Qwen2 (char tokenizer) learns 2-digit addition ("37+58=" -> "95<eos>") by next-token
prediction and stops as soon as its greedy exact-match accuracy on a validation set (train-split
problems it never trains on) reaches the target, 25 % by default: right sometimes but not often,
so that GRPO (``flowrl train configs/llm_demo.yaml``) has something to improve. The script then
reports the held-out (test-split) greedy accuracy and pass@k at temperature 1, writes the model
folder with its tokenizer files and ``pretrain.json``, and with ``--rl-check`` runs a short GRPO
run on the saved model (reloaded from the folder) to show that RL lifts it.

    python scripts/pretrain_demo_lm.py                    # writes assets/demo_lm (about 1 minute on 1 core)
    python scripts/pretrain_demo_lm.py --rl-check         # ... then a few minutes of GRPO as a check
    python scripts/pretrain_demo_lm.py --out /tmp/lm --target-accuracy 0.3 --hidden-size 96

Every field of :class:`flowrl.demo.pretrain_text.PretrainConfig` is a flag (``--learning-rate``), and
every field of :class:`flowrl.demo.pretrain_text.RLCheckConfig` one with an ``--rl-`` prefix.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import typing
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from flowrl.demo.pretrain_text import (  # noqa: E402
    PretrainConfig,
    RLCheckConfig,
    greedy_accuracy,
    pass_at_k,
    pretrain,
    rl_check,
    save_demo_lm,
    task_records,
)

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "assets" / "demo_lm"


def _add_fields(parser: argparse.ArgumentParser, cls, prefix: str = "") -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + prefix + f.name.replace("_", "-")
        dest = prefix.replace("-", "_") + f.name
        default = f.default
        typ = hints[f.name]
        if f.name == "ops":
            parser.add_argument(flag, dest=dest, nargs="+", default=list(default), choices=["+", "-"],
                                help=f"operators (default: {' '.join(default)})")
            continue
        origin = typing.get_origin(typ)
        if origin is typing.Union:  # Optional[X]
            typ = next(a for a in typing.get_args(typ) if a is not type(None))
        parser.add_argument(flag, dest=dest, type=typ, default=default, help=f"default: {default}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"model folder to write (default: {DEFAULT_OUT})")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: deterministic, shares the CPU)")
    p.add_argument("--pass-k", type=int, default=8, help="k of the reported pass@k at temperature 1 (default 8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--rl-check", action="store_true", help="after saving, run a short GRPO check on the saved model")
    p.add_argument("--rl-out", type=Path, default=None, help="write the GRPO check's record (JSON) here")
    _add_fields(p, PretrainConfig)
    _add_fields(p, RLCheckConfig, prefix="rl-")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(max(1, args.threads))
    names = {f.name for f in dataclasses.fields(PretrainConfig)}
    cfg = PretrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    cfg.ops = tuple(cfg.ops)
    cfg.validate()
    progress = not args.no_progress

    result = pretrain(cfg, progress=progress)
    _, _, test = task_records(cfg)
    test_acc = greedy_accuracy(result.model, result.tokenizer, test)
    sampled = pass_at_k(result.model, result.tokenizer, test, k=args.pass_k, temperature=1.0, seed=cfg.seed)
    metrics = {"test_greedy_accuracy": test_acc, "num_test": len(test), f"test_pass_at_{args.pass_k}": sampled["pass_at_k"],
               "test_sample_accuracy_t1": sampled["sample_acc"], f"test_mixed_group_frac_{args.pass_k}": sampled["mixed_frac"],
               "parameters": sum(p.numel() for p in result.model.parameters())}
    out = save_demo_lm(result, cfg, args.out, metrics)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"pretraining: {result.steps} steps in {result.wall_clock_s:.1f} s; validation greedy accuracy "
          f"{result.val_accuracy:.3f} (target {cfg.target_accuracy}, reached: {result.reached_target})")
    print(f"held-out greedy exact-match accuracy: {test_acc:.3f} on {len(test)} test problems; "
          f"pass@{args.pass_k} at T=1: {sampled['pass_at_k']:.3f}; sample accuracy at T=1: {sampled['sample_acc']:.3f}; "
          f"groups with right and wrong answers: {sampled['mixed_frac']:.3f}")
    print(f"wrote {out} ({size / 1e6:.2f} MB, {metrics['parameters']} parameters)")

    if args.rl_check:
        from flowrl.train.model import load_lm  # only for --rl-check

        rl_names = {f.name for f in dataclasses.fields(RLCheckConfig)}
        rl_cfg = RLCheckConfig(**{k[3:]: v for k, v in vars(args).items() if k.startswith("rl_") and k[3:] in rl_names})
        model, tok = load_lm(str(out))  # the saved folder, as the RL demo loads it
        rec = rl_check(model, tok, rl_cfg, progress=progress)
        print(f"GRPO check: held-out greedy accuracy {rec['before']:.3f} -> {rec['after']:.3f} "
              f"in {rec['steps']} steps, {rec['wall_clock_s']:.0f} s")
        for h in rec["history"]:
            tr = "   -" if h["train_reward"] is None else f"{h['train_reward']:.3f}"
            print(f"  step {h['step']:4d}  {h['wall_s']:7.1f} s  test acc {h['test_accuracy']:.3f}  train reward {tr}")
        if args.rl_out is not None:
            args.rl_out.parent.mkdir(parents=True, exist_ok=True)
            args.rl_out.write_text(json.dumps(rec, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
