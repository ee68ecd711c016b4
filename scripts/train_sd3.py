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
import sys
from pathlib import Path

FAMILY = "sd3"
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "flow_grpo_sd35m_pickscore.yaml"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG), help="YAML recipe (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. max_steps=10 model.path=DIR")
    args = parser.parse_args(argv)

    from flowrl.train.loop import train_command

    return train_command(args.config, args.overrides, family=FAMILY, prog=Path(__file__).stem)


if __name__ == "__main__":
    sys.exit(main())
