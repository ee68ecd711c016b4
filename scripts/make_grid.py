"""Compare a checkpoint with its base model: the same prompts and seeds side by side, with scores.

    python scripts/make_grid.py configs/tiny_sd3.yaml \\
        --checkpoint runs/tiny_sd3_run/checkpoints/step-00000100 \\
        --prompts assets/prompts/demo.txt --out runs/tiny_grid --seeds 2

writes ``grid.png`` (base | tuned pairs, each captioned with prompt, seed and score), ``index.html``
(the grid and a table of mean scores base vs tuned) and ``scores.csv``. It is ``flowrl grid``
spelled out step by step: copy it and change what you need (other seeds, another reward, two
checkpoints instead of base vs tuned).
"""
import argparse
import sys

from flowrl.config import ConfigError, load_run_config
from flowrl.inputs import UsageError, existing_dir, read_prompts
from flowrl.train.evaluate import eval_settings, evaluate_policy, load_policy, reward_from_config
from flowrl.train.model import apply_checkpoint
from flowrl.train.runfolder import write_comparison
from scorers.registry import UnknownScorerError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="YAML run config (model, sample and rewards sections are used)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. sample.eval_num_steps=28")
    p.add_argument("--checkpoint", required=True, help="flowrl checkpoint folder or diffusers LoRA folder")
    p.add_argument("--prompts", required=True, help="text file, one prompt per line")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seeds", type=int, default=1, help="images per prompt (seeds 0..N-1)")
    args = p.parse_args(argv)

    cfg = load_run_config(args.config, args.overrides)  # the run's config: model, image size, steps, rewards
    prompts = read_prompts(args.prompts)
    checkpoint = existing_dir(args.checkpoint, "checkpoint")  # fail before any sampling
    seeds = list(range(args.seeds))
    settings = eval_settings(cfg)  # eval_num_steps ODE steps, guidance, size, batch size

    policy = load_policy(cfg)  # the base model
    reward = reward_from_config(cfg)  # every reward of cfg.rewards, kept separately
    base = evaluate_policy(policy, prompts, seeds, reward=reward, **settings)

    apply_checkpoint(policy, checkpoint)  # LoRA (or full) weights on top of the same model
    tuned = evaluate_policy(policy, prompts, seeds, reward=reward, **settings)

    png, page = write_comparison(args.out, base, tuned, labels=("base", "tuned"))
    for name in base.means:
        print(f"{name:>24}: base {base.means[name]:.4f}  tuned {tuned.means[name]:.4f}")
    print(f"wrote {png} and {page}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ConfigError, UsageError, UnknownScorerError) as e:
        print(f"make_grid: error: {e}", file=sys.stderr)
        sys.exit(2)
