#!/usr/bin/env python
"""Train a causal LM with GRPO on a verifiable reward (the same loss core as the image recipes).

    python scripts/train_llm.py                                    # Qwen2.5-0.5B-Instruct, 3-digit addition
    python scripts/train_llm.py configs/llm_grpo.yaml loss_preset=grpo "rewards={exact_match: 1.0}"
    accelerate launch --num_processes 4 scripts/train_llm.py configs/llm_grpo.yaml
    python scripts/train_llm.py configs/tiny_llm.yaml model.path=runs/tiny_lm  # after: flowrl make-tiny lm runs/tiny_lm

Any config key can be overridden as ``dotted.key=value``. The run folder (``output_dir``) gets
``config.yaml``, ``metrics.jsonl``, checkpoints, ``summary.json`` and ``report.html``;
``resume=auto`` (the default) continues an interrupted run from its last checkpoint.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

FAMILY = "lm"
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "llm_grpo.yaml"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG), help="YAML recipe (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. max_steps=10 model.path=DIR")
    args = parser.parse_args(argv)

    from flowrl.train.loop import train_command

    return train_command(args.config, args.overrides, family=FAMILY, prog=Path(__file__).stem)


if __name__ == "__main__":
    sys.exit(main())
