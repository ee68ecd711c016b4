#!/usr/bin/env python
"""Train Stable Diffusion 3 / 3.5 with a flowrl recipe (Flow-GRPO and its descendants).

    python scripts/train_sd3.py                                         # Flow-GRPO, SD3.5-M, PickScore
    python scripts/train_sd3.py configs/flow_grpo_fast_sd35m.yaml max_steps=200 output_dir=runs/fast
    accelerate launch --num_processes 8 scripts/train_sd3.py configs/grpo_guard_sd35m.yaml
    python scripts/train_sd3.py configs/tiny_sd3.yaml model.path=runs/tiny_sd3   # after: flowrl make-tiny sd3 runs/tiny_sd3

Any config key can be overridden as ``dotted.key=value``. The run folder (``output_dir``) gets
``config.yaml``, ``metrics.jsonl``, checkpoints, evaluation grids, ``summary.json`` and ``report.html``;
``resume=auto`` (the default) continues an interrupted run from its last checkpoint.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

FAMILY = "sd3"
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "flow_grpo_sd35m_pickscore.yaml"


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
