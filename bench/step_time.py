"""Training-step time split (sampling / scoring / update) for the Flow-GRPO, MixGRPO and tree settings.

Runs ``flowrl train`` for a few steps per setting on one tiny SD3-format model (the same model, prompts,
group size and seed for every setting, in one process), reads ``metrics.jsonl`` and prints, per
setting, the median seconds of each phase, the NFE per step, and each phase as a ratio of Flow-GRPO's
total step time. Absolute times on a shared CPU mean little; the ratios measured side by side are the
result.

    python bench/step_time.py [--steps 4] [--model DIR]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

SETTINGS = {
    "Flow-GRPO (full, 10 SDE steps)": ["plan.kind=full"],
    "MixGRPO (window 4)": ["plan.kind=window", "plan.window.size=4", "plan.window.shift_interval=1"],
    "MixGRPO-Flash (window 4, dpm2m tail 0.4)": ["plan.kind=window", "plan.window.size=4", "plan.window.shift_interval=1",
                                                 "plan.ode_solver=dpm2m", "plan.tail.ratio=0.4"],
    "Tree 2x2 (Dynamic-TreeRPO window)": ["plan.kind=tree", "plan.tree.branch_factors=[2, 2]"],
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4, help="training steps per setting (the first is dropped as warm-up)")
    ap.add_argument("--model", default=None, help="an SD3-format model folder (default: a fresh tiny one)")
    args = ap.parse_args(argv)

    # heavy (torch, diffusers via the tiny model): after argument parsing, so --help is instant
    from flowrl.config import load_run_config
    from flowrl.demo.tiny_image import save_tiny
    from flowrl.train.loop import train

    work = Path(tempfile.mkdtemp(prefix="flowrl-bench-"))
    model = args.model or str(save_tiny("sd3", work / "tiny_sd3", seed=0))
    base = [
        f"model.path={model}", "sample.height=32", "sample.width=32", "sample.num_steps=10", "sample.eval_num_steps=4",
        "sample.group_size=4", "sample.prompts_per_step=2", "rewards={shapes: 1.0}", "eval.at_start=false",
        f"max_steps={args.steps}", f"eval_every={10 * args.steps}", f"checkpoint_every={10 * args.steps}",
        "eval.num_prompts=1", "eval.seeds=[0]", "train.tracker=none", "train.progress=false", "resume=none",
    ]
    rows = []
    for name, extra in SETTINGS.items():
        out = work / name.split(" ")[0].lower().replace("-", "_")
        cfg = load_run_config(None, base + extra + [f"output_dir={out}"])
        train(cfg)
        recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:] or \
            [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        med = {k: statistics.median(r[k] for r in recs) for k in ("time/sampling", "time/scoring", "time/update", "time/step", "nfe")}
        rows.append((name, med))
    ref = rows[0][1]["time/step"]
    print(f"{'setting':44s} {'NFE/step':>9s} {'sample s':>9s} {'score s':>8s} {'update s':>9s} {'step s':>8s} {'step / Flow-GRPO':>17s}")
    for name, m in rows:
        print(f"{name:44s} {m['nfe']:9.0f} {m['time/sampling']:9.3f} {m['time/scoring']:8.3f} {m['time/update']:9.3f} "
              f"{m['time/step']:8.3f} {m['time/step'] / ref:17.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
