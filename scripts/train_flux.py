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
import sys
from pathlib import Path

FAMILY = "flux"
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mixgrpo_flux.yaml"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG), help="YAML recipe (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. max_steps=10 model.path=DIR")
    args = parser.parse_args(argv)

    from flowrl.train.loop import train_command

    return train_command(args.config, args.overrides, family=FAMILY, prog=Path(__file__).stem)


if __name__ == "__main__":
    sys.exit(main())
