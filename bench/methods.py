"""Every method preset on the demo, under the same wall-clock budget and seeds.

For each preset in ``configs/methods/`` and each seed, train the demo model for ``--budget`` seconds of
training time (sampling + scoring + updates; evaluation time is not charged to the method), evaluating on
the held-out prompts every ``--eval-every`` steps. Prints one table:

    method | NFE/step | s/step | held-out reward at the budget (mean ± spread over seeds) | time to reach
    vanilla Flow-GRPO's final reward

and saves the reward-versus-training-time curves as one PNG (``--out``/methods.png), plus the raw
numbers as JSON. All methods run in this one process, one after the other, on the same machine state.

    python bench/methods.py --budget 240 --seeds 0 1 [--methods flow_grpo mixgrpo ...] [--out runs/methods]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
METHODS_DIR = ROOT / "configs" / "methods"
REFERENCE = "flow_grpo"


def curve(run_dir: Path) -> Dict[str, List[float]]:
    """(training seconds, held-out total reward) at every evaluation of a run, plus per-step figures."""
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    evals = [json.loads(x) for x in (run_dir / "eval.jsonl").read_text().splitlines() if x.strip()]
    t_at = {0: 0.0}
    t = 0.0
    for m in steps:
        t += float(m["time/step"])
        t_at[int(m["step"])] = t
    by_step = {}
    for e in evals:  # the last record of a step wins (re-evaluation after a resume)
        by_step[int(e["step"])] = float(e["means"]["total"])
    xs = sorted(by_step)
    return {
        "time": [t_at.get(s, t) for s in xs],
        "reward": [by_step[s] for s in xs],
        "steps": len(steps),
        "s_per_step": statistics.median(float(m["time/step"]) for m in steps) if steps else float("nan"),
        "nfe_per_step": statistics.median(float(m["nfe"]) for m in steps) if steps else float("nan"),
    }


def time_to_reach(c: Dict[str, List[float]], target: float) -> float:
    """First training time at which the held-out reward reaches ``target`` (inf if never)."""
    for t, r in zip(c["time"], c["reward"]):
        if r >= target:
            return t
    return math.inf


def run_one(method: str, seed: int, budget: float, eval_every: int, out: Path, extra: List[str]) -> Dict:
    from flowrl.config import load_run_config
    from flowrl.train.loop import train

    run_dir = out / f"{method}-seed{seed}"
    cfg = load_run_config(METHODS_DIR / f"{method}.yaml", [
        f"seed={seed}", f"output_dir={run_dir}", f"time_budget_s={budget}", "max_steps=100000",
        f"eval_every={eval_every}", "checkpoint_every=100000", "train.tracker=none", "train.progress=false",
        "resume=none", *extra,
    ])
    train(cfg)
    return curve(run_dir)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=240.0, help="training seconds per method and seed")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--methods", nargs="*", default=None, help="preset names (default: every configs/methods/*.yaml)")
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--out", default="runs/methods")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value applied to every method (e.g. eval.num_prompts=12)")
    args = ap.parse_args(argv)
    methods = args.methods or sorted(p.stem for p in METHODS_DIR.glob("*.yaml"))
    if REFERENCE not in methods:
        methods = [REFERENCE] + methods
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    results: Dict[str, List[Dict]] = {}
    for m in methods:
        results[m] = [run_one(m, s, args.budget, args.eval_every, out, args.overrides) for s in args.seeds]
        (out / "methods.json").write_text(json.dumps(results, indent=1))

    ref_final = statistics.mean(c["reward"][-1] for c in results[REFERENCE])
    ref_time = statistics.mean(time_to_reach(c, ref_final) for c in results[REFERENCE])
    print(f"budget {args.budget:.0f} s of training per run, seeds {args.seeds}; Flow-GRPO final reward {ref_final:.3f}")
    print(f"{'method':20s} {'NFE/step':>9s} {'s/step':>7s} {'start':>6s} {'final (mean±sd)':>17s} "
          f"{'t to FG final':>14s} {'x FG time':>10s}")
    rows = []
    for m, cs in results.items():
        finals = [c["reward"][-1] for c in cs]
        mean = statistics.mean(finals)
        sd = statistics.stdev(finals) if len(finals) > 1 else 0.0
        reach = [time_to_reach(c, ref_final) for c in cs]
        t_reach = statistics.mean(reach) if all(math.isfinite(x) for x in reach) else math.inf
        rows.append((m, mean, t_reach))
        ratio = t_reach / ref_time if math.isfinite(t_reach) and ref_time > 0 else math.inf
        print(f"{m:20s} {statistics.mean(c['nfe_per_step'] for c in cs):9.0f} {statistics.mean(c['s_per_step'] for c in cs):7.2f} "
              f"{statistics.mean(c['reward'][0] for c in cs):6.3f} {mean:8.3f} ± {sd:5.3f}   {t_reach:12.0f} s {ratio:9.2f}x")
    best = min(rows, key=lambda r: (r[2], -r[1]))
    print(f"fastest to Flow-GRPO's final reward: {best[0]} ({best[2]:.0f} s vs {ref_time:.0f} s)")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for m, cs in results.items():
        for i, c in enumerate(cs):
            ax.plot(c["time"], c["reward"], label=m if i == 0 else None, lw=2.2 if m == REFERENCE else 1.2,
                    color=f"C{list(results).index(m) % 10}", alpha=0.9)
    ax.axhline(ref_final, color="k", ls=":", lw=1)
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("held-out shapes reward")
    ax.set_title("Every method on equal compute (demo model, CPU)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "methods.png", dpi=120)
    print(f"curves: {out / 'methods.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
