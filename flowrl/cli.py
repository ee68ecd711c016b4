"""`flowrl` command line: `flowrl sample|make-tiny|score|serve-scorer ...`.

Every user error (a bad config key or value, a missing or unwritable path, a damaged checkpoint or
one of another model, an unknown scorer, a missing argument) is printed as one line on stderr and
exits with status 2, never with a traceback.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from flowrl.config import ConfigError
from flowrl.demo import TINY_BUILDERS
from flowrl.inputs import ArgumentParser, UsageError
from scorers.registry import UnknownScorerError

log = logging.getLogger("flowrl")


def _cmd_make_tiny(args) -> int:
    from pathlib import Path

    d = Path(args.dir)
    if d.is_dir() and any(d.iterdir()):
        raise UsageError(f"make-tiny: {d} exists and is not empty: give a new or empty folder")
    if args.kind == "lm":
        from flowrl.demo.tiny_text import save_tiny_lm

        out = save_tiny_lm(args.dir, seed=args.seed)
    else:
        from flowrl.demo.tiny_image import save_tiny

        out = save_tiny(args.kind, args.dir, seed=args.seed)
    print(f"wrote a tiny {args.kind} model to {out}")
    return 0


def _cmd_train(args) -> int:
    from flowrl.train.loop import train_command

    return train_command(args.config, args.overrides)


def _cmd_sample(args) -> int:
    from flowrl.commands import read_prompt_file
    from flowrl.config import load_run_config

    cfg = load_run_config(args.config, args.overrides)
    prompts, images = read_prompt_file(args.prompts)  # a .jsonl may give editing records with source images
    if args.seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {args.seeds}")
    from flowrl.commands import sample_to_dir

    # sample_to_dir checks the checkpoint and that --out can be written before any model loads
    out = sample_to_dir(cfg, prompts, args.out, seeds=args.seeds, checkpoint=args.checkpoint, images=images)
    print(f"wrote {len(prompts) * args.seeds} images to {out}")
    return 0


def _passthrough(module: str, func: str = "main"):
    """Subcommands whose own parser lives with their code (``scorers``): the rest of the command
    line goes to that module's ``main(argv)`` (or ``func``)."""

    def run(argv: List[str]) -> int:
        import importlib

        return int(getattr(importlib.import_module(module), func)(argv) or 0)

    return run


PASSTHROUGH = {
    "score": (_passthrough("scorers.cli"), "score a folder of images with a registered scorer"),
    "serve-scorer": (_passthrough("scorers.server"), "serve a registered scorer over HTTP (flowrl remote protocol)"),
    "grid": (_passthrough("flowrl.commands", "grid_command"), "side-by-side grid of the base model vs a checkpoint (PNG + HTML)"),
    "report": (_passthrough("flowrl.train.report"), "write plots and report.html for a run folder"),
}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="flowrl", description="Online RL for flow-matching image models and causal LMs.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("train", help="train a flow model or a causal LM with online RL (GRPO family)")
    s.add_argument("config", help="YAML run config (configs/*.yaml)")
    s.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. max_steps=10 model.path=DIR")
    s.set_defaults(func=_cmd_train)

    s = sub.add_parser("make-tiny", help="write a tiny randomly initialised model folder in the real format")
    s.add_argument("kind", choices=[*TINY_BUILDERS, "lm"])
    s.add_argument("dir")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_make_tiny)

    s = sub.add_parser("sample", help="sample images from a config's model with the deterministic sampler")
    s.add_argument("config", help="YAML run config")
    s.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    s.add_argument("--prompts", required=True, help="text file, one prompt per line, or a .jsonl with 'prompt' "
                   "(and, for editing models, 'image') columns")
    s.add_argument("--out", required=True, help="output folder for PNGs and scores.csv")
    s.add_argument("--seeds", type=int, default=1, help="images per prompt (seeds 0..N-1)")
    s.add_argument("--checkpoint", default=None, help="a checkpoint folder to load (LoRA or full weights)")
    s.set_defaults(func=_cmd_sample)

    for name, (_, helptext) in PASSTHROUGH.items():
        sub.add_parser(name, help=helptext + " (see: flowrl %s --help)" % name, add_help=False)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from scorers._text import bound_log_messages

    bound_log_messages()  # a prompt of any length never floods stderr, whoever logs it
    try:
        if argv and argv[0] in PASSTHROUGH:
            logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
            return PASSTHROUGH[argv[0]][0](argv[1:])
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        return int(args.func(args) or 0)
    except (ConfigError, UsageError, UnknownScorerError) as e:
        print(f"flowrl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flowrl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
