#!/usr/bin/env python
"""Train FLUX.1 with a flowrl recipe (DanceGRPO, MixGRPO, G2RPO, Dynamic-TreeRPO).

    python scripts/train_flux.py                                        # MixGRPO, FLUX.1-dev, 3 rewards
    python scripts/train_flux.py configs/g2rpo_flux.yaml max_steps=100 output_dir=runs/g2rpo
    accelerate launch --config_file fsdp.yaml scripts/train_flux.py configs/dance_grpo_flux.yaml  # fsdp.yaml: from `accelerate config`
    python scripts/train_flux.py configs/tiny_flux.yaml model.path=runs/tiny_flux  # after: flowrl make-tiny flux runs/tiny_flux

Any config key can be overridden as ``dotted.key=value``. The run folder (``output_dir``) gets
``config.yaml``, ``metrics.jsonl``, checkpoints, evaluation grids, ``summary.json`` and ``report.html``;
``resume=auto`` (the default) continues an interrupted run from its last checkpoint.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

FAMILY = "flux"
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mixgrpo_flux.yaml"


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
