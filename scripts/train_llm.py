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
import json
import sys
from pathlib import Path

FAMILY = "lm"
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "llm_grpo.yaml"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG), help="YAML recipe (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. max_steps=10 model.path=DIR")
    args = parser.parse_args(argv)

    from flowrl.config import ConfigError, load_run_config
    from flowrl.inputs import UsageError
    from flowrl.train.loop import TrainingStopped, train

    try:
        cfg = load_run_config(args.config, args.overrides)
        if cfg.model.family != FAMILY:
            raise UsageError(f"model.family is {cfg.model.family!r}; this script trains {FAMILY!r} "
                             f"(use scripts/train_{'llm' if cfg.model.family == 'lm' else cfg.model.family}.py)")
        summary = train(cfg)
    except (ConfigError, UsageError) as e:
        print(f"{Path(__file__).stem}: error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"{Path(__file__).stem}: stopped: {e}", file=sys.stderr)
        return 3
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
