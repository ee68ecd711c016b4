"""Every method preset on the demo, under the same wall-clock budget and seeds.

For each preset in ``configs/methods/`` and each seed, train the demo model for ``--budget`` seconds of
training time (sampling + scoring + updates; evaluation time is not charged to the method), evaluating on
the held-out prompts every ``--eval-every`` steps (or training seconds). Prints one table (method, NFE/step, s/step, held-out
reward at the budget over seeds, time to reach vanilla Flow-GRPO's final reward) and saves the
reward-versus-training-time curves as ``--out``/methods.png, plus the raw numbers as JSON.

    python bench/methods.py --budget 240 --seeds 0 1 [--methods flow_grpo mixgrpo ...] [--out runs/methods]
    python bench/methods.py --jobs 12 --threads 1 --methods-dir my_presets/   # any folder of overlays
    python bench/methods.py --budget 240 --seeds 0 1 2 --reuse   # add seeds; finished runs are read, not retrained
    python bench/methods.py --budget 150 --seeds 0 1 2 --eval-every 30s eval.ends_num_prompts=200
        # every method evaluated at the same training times, the start and the end on 200 prompts (800 images)
    python bench/methods.py --report-only --merge a/methods.json b/methods.json --out ab   # one table of both
    python bench/methods.py ... --reuse --target-se 0.01   # more seeds where a method's final mean is not yet
        # known to +-0.01 (its standard error over seeds), up to --max-seeds
    python bench/methods.py --budget 60 --eval-every 7.5s --methods dgpo awm --reference-from table/methods.json
        # a fine early curve of the fast methods against the reference's final from a full-length table
        # (add --speed-from table/methods.json if the machine was shared: steps x each method's s/step there)

A method is the stem of a YAML file in ``--methods-dir`` (default ``configs/methods/``); the reference
(``flow_grpo``) is always run, unless ``--reference-from`` reads its runs from an earlier table. ``--jobs``/``--threads``: docs/methods.md ("How bench/methods.py runs").
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
METHODS_DIR = ROOT / "configs" / "methods"
REFERENCE = "flow_grpo"


def curve(run_dir: Path, metric: str = "total") -> Dict[str, List[float]]:
    """(training seconds, held-out total reward) at every evaluation of a run, plus per-step figures.

    ``reward`` is each evaluation's mean over the rows every evaluation of the run shares: with
    ``eval.ends_num_prompts`` the first and last evaluations hold more prompts than those between, whose
    prompts are their first ones (rows are prompt-major), so the curve reads the same images throughout.
    ``final`` and ``start`` are the first and last evaluations' means over all their rows."""
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    evals = [json.loads(x) for x in (run_dir / "eval.jsonl").read_text().splitlines() if x.strip()]
    t_at = {0: 0.0}
    t = 0.0
    for m in steps:
        t += float(m["time/step"])
        t_at[int(m["step"])] = t
    by_step = {}
    for e in evals:  # the last record of a step wins (re-evaluation after a resume)
        by_step[int(e["step"])] = float(e["means"][metric])
    xs = sorted(by_step)
    rows = {s: eval_rows(run_dir, s, metric) for s in xs}
    shared = min((len(r) for r in rows.values() if r), default=0)
    return {
        "time": [t_at.get(s, t) for s in xs],
        "eval_steps": xs,
        "reward": [statistics.mean(rows[s][:shared]) if shared and rows[s] else by_step[s] for s in xs],
        "start": by_step[xs[0]] if xs else float("nan"),
        "final": by_step[xs[-1]] if xs else float("nan"),
        "eval_se": _se(rows[xs[-1]]) if xs and len(rows[xs[-1]]) > 1 else float("nan"),
        "eval_images": len(rows[xs[-1]]) if xs else 0,
        "curve_images": shared,
        "steps": len(steps),
        "s_per_step": statistics.median(float(m["time/step"]) for m in steps) if steps else float("nan"),
        "nfe_per_step": statistics.median(float(m["nfe"]) for m in steps) if steps else float("nan"),
    }


def eval_rows(run_dir: Path, step: int, metric: str = "total") -> List[float]:
    """The total reward of every image (prompt-major rows) of a run's evaluation at ``step``, read from
    ``eval/step-N/scores.csv``, or of every completion of a text run (``samples.jsonl``, the rewards
    weighted as in its ``config.yaml``); ``metric``: one reward's column instead of the total; empty if missing."""
    import csv

    d = run_dir / "eval" / f"step-{step:08d}"
    if (d / "samples.jsonl").is_file():  # a text run: one record per held-out prompt, one column per reward
        import yaml

        weights = yaml.safe_load((run_dir / "config.yaml").read_text())["rewards"]
        recs = [json.loads(x) for x in (d / "samples.jsonl").read_text().splitlines() if x.strip()]
        if metric != "total":
            return [float(r[metric]) for r in recs]
        return [sum(w * float(r[n]) for n, w in weights.items()) for r in recs]
    path = d / "scores.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [float(r[metric]) for r in csv.DictReader(f)]


def time_to_reach(c: Dict[str, List[float]], target: float) -> float:
    """First training time at which the held-out reward reaches ``target`` (inf if never)."""
    for t, r in zip(c["time"], c["reward"]):
        if r >= target:
            return t
    return math.inf


def preset_path(method: str, methods_dir: Path) -> Path:
    """The YAML file of a method: ``methods_dir/<method>.yaml``, else ``configs/methods/<method>.yaml``."""
    for d in (methods_dir, METHODS_DIR):
        p = d / f"{method}.yaml"
        if p.is_file():
            return p
    raise SystemExit(f"no preset {method!r} in {methods_dir} or {METHODS_DIR}")


def run_command(preset: Path, seed: int, budget: float, eval_every, run_dir: Path, extra: List[str]) -> List[str]:
    """The ``flowrl train`` command line of one (method, seed) run. ``eval_every``: steps (an int) or
    ``"<seconds>s"`` of training time between evaluations."""
    if isinstance(eval_every, str) and eval_every.endswith("s"):
        when = ["eval_every=100000", f"eval_every_s={float(eval_every[:-1])}"]
    else:
        when = [f"eval_every={int(eval_every)}"]
    return [
        sys.executable, "-c", "import sys; from flowrl.cli import main; sys.exit(main())", "train", str(preset),
        f"seed={seed}", f"output_dir={run_dir}", f"time_budget_s={budget}", "max_steps=100000",
        *when, "checkpoint_every=100000", "train.tracker=none", "train.progress=false",
        "resume=none", *extra,
    ]


def resolved_config(cmd: List[str]) -> Dict:
    """The run config ``cmd`` trains (the preset with its includes and the overrides, as ``flowrl train``
    reads them), so that a preset edited since a run is not mistaken for it."""
    from flowrl.config import load_run_config, to_dict

    i = cmd.index("train")
    return to_dict(load_run_config(cmd[i + 1], cmd[i + 2:]))


def finished_run(run_dir: Path, cmd: List[str]) -> Optional[float]:
    """The wall-clock seconds of the run in ``run_dir`` if it ended (``summary.json``) and was started by
    exactly ``cmd`` (same preset, seed, budget, evaluation interval and overrides) with the same resolved
    config (the preset files unchanged), as recorded in its ``bench_run.json``; else None."""
    rec = run_dir / "bench_run.json"
    if not (run_dir / "summary.json").is_file() or not rec.is_file():
        return None
    r = json.loads(rec.read_text())
    same = r.get("command") == cmd[2:] and r.get("config") == json.loads(json.dumps(resolved_config(cmd)))
    return float(r["wall_s"]) if same else None


def run_one(preset: Path, seed: int, budget: float, eval_every: int, out: Path, extra: List[str],
            threads: Optional[int] = None, reuse: bool = False, metric: str = "total") -> Dict:
    """Train one preset with one seed in a subprocess (its log in ``<run>.log``) and return its curve.
    ``reuse``: a finished run of the very same command is read instead of trained again."""
    run_dir = out / f"{preset.stem}-seed{seed}"
    cmd = run_command(preset, seed, budget, eval_every, run_dir, extra)
    wall = finished_run(run_dir, cmd) if reuse else None
    if wall is None:
        wall = _train(cmd, run_dir, out / f"{preset.stem}-seed{seed}.log", threads)
        note = ""
    else:
        note = f" (reused {run_dir})"
    c = curve(run_dir, metric)
    c["wall_s"] = wall
    c["budget_s"] = budget
    print(f"  {preset.stem:22s} seed {seed}: {c['steps']} steps, held-out {_end(c, 'start'):.3f} -> {_end(c, 'final'):.3f}"
          f"{note}", flush=True)
    return c


def _train(cmd: List[str], run_dir: Path, log_path: Path, threads: Optional[int]) -> float:
    """Run ``cmd`` (one ``flowrl train``) with its output in ``log_path``; record it in ``run_dir/bench_run.json``
    for ``--reuse`` and return its wall-clock seconds."""
    if run_dir.exists():  # the bench owns its run folders: a run it trains again starts from an empty one
        shutil.rmtree(run_dir)  # (flowrl train refuses resume=none on a folder that holds a run)
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    if rc != 0:
        tail = log_path.read_text().splitlines()[-15:]
        raise RuntimeError(f"{run_dir.name} failed (exit {rc}); end of {log_path}:\n" + "\n".join(tail))
    wall = time.perf_counter() - t0
    # the command without the interpreter's path, so that --reuse also works from another environment
    (run_dir / "bench_run.json").write_text(json.dumps({"command": cmd[2:], "wall_s": wall,
                                                        "config": resolved_config(cmd)}))
    return wall


def _steps_or_seconds(text: str):
    """``--eval-every``: an int (steps) or ``<number>s`` (training seconds)."""
    try:
        return f"{float(text[:-1])}s" if text.endswith("s") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of steps (20) or of seconds (30s), got {text!r}")


def main(argv=None, *, methods_dir: Path = METHODS_DIR, reference: str = REFERENCE, out: str = "runs/methods",
         labels: Optional[Dict[str, str]] = None, description: Optional[str] = None, metric: str = "total") -> int:
    """The bench's command line; the keywords are another bench's defaults (``bench/text_methods.py``)."""
    ap = argparse.ArgumentParser(description=description or __doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=240.0, help="training seconds per method and seed")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--methods", nargs="*", default=None, help="preset names (default: every configs/methods/*.yaml)")
    ap.add_argument("--eval-every", type=_steps_or_seconds, default=5,
                    help="steps between evaluations, or seconds of training time with an s (30s: every method is "
                         "evaluated at the same times, however long its steps)")
    ap.add_argument("--out", default=out)
    ap.add_argument("--methods-dir", default=str(methods_dir), help="folder of method presets (YAML overlays)")
    ap.add_argument("--reference", default=reference, help="the method whose final reward the others must reach")
    ap.add_argument("--reference-from", default=None, metavar="JSON",
                    help="read the reference's runs from an earlier table's methods.json instead of training it "
                         "(its final reward is the target; e.g. to evaluate the fast methods more often over a "
                         "shorter budget)")
    ap.add_argument("--speed-from", default=None, metavar="JSON",
                    help="time each trained run's curve as its steps x the method's median s/step in an earlier "
                         "table's methods.json (for runs that shared the machine with other work: their own "
                         "step times are not the method's)")
    ap.add_argument("--jobs", type=int, default=1, help="runs side by side (subprocesses)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per run (OMP_NUM_THREADS; default: inherited, or 1 when --jobs > 1)")
    ap.add_argument("--report-only", action="store_true",
                    help="print the table and plot the curves of an earlier run's --out/methods.json (no training)")
    ap.add_argument("--merge", nargs="+", default=[], metavar="JSON",
                    help="with --report-only: the table of several runs' methods.json files together (a method's "
                         "seeds from all of them; a seed in two files counts once, from the first), saved as "
                         "--out/methods.json")
    ap.add_argument("--reuse", action="store_true",
                    help="read (method, seed) runs that --out already holds from the very same command instead of "
                         "training them again (to add seeds or methods to a table)")
    ap.add_argument("--target-se", type=float, default=None,
                    help="after --seeds, add seeds one at a time to each method whose final mean has a standard "
                         "error over seeds above this (e.g. 0.01), up to --max-seeds")
    ap.add_argument("--max-seeds", type=int, default=8, help="the most seeds --target-se gives a method")
    ap.add_argument("--metric", default=metric,
                    help="the held-out number compared: 'total' (the weighted rewards) or one reward's name")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value applied to every method (e.g. eval.num_prompts=12)")
    args = ap.parse_args(argv)
    if args.methods:  # `--methods a b key=value` : argparse gives the trailing overrides to --methods
        args.overrides += [m for m in args.methods if "=" in m]
        args.methods = [m for m in args.methods if "=" not in m]
    if args.jobs < 1:
        ap.error("--jobs must be >= 1")
    methods_dir = Path(args.methods_dir)
    methods = args.methods or sorted(p.stem for p in methods_dir.glob("*.yaml"))
    ref = args.reference
    ref_runs = None
    if args.reference_from:
        ref_runs = json.loads(Path(args.reference_from).read_text()).get(ref)
        if not ref_runs:
            raise SystemExit(f"{args.reference_from}: no {ref!r} runs")
        if ref in methods:
            raise SystemExit(f"--reference-from reads {ref!r}: leave it out of --methods")
    elif ref not in methods:
        methods = [ref] + methods
    presets = {m: preset_path(m, methods_dir) for m in methods}
    threads = args.threads if args.threads is not None else (1 if args.jobs > 1 else None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if args.report_only:
        sources = [Path(f) for f in args.merge] or [out / "methods.json"]
        results = merge_results([json.loads(f.read_text()) for f in sources])
        if ref_runs and ref not in results:
            results = {ref: ref_runs, **results}
        if ref not in results:
            raise SystemExit(f"{', '.join(map(str, sources))}: no {ref!r} runs")
        if args.merge:
            (out / "methods.json").write_text(json.dumps(results, indent=1))
        return report(results, ref, out, args.budget, **(labels or {}))
    jobs = [(m, s) for m in methods for s in args.seeds]
    print(f"{len(jobs)} runs ({len(methods)} methods x {len(args.seeds)} seeds), {args.jobs} at a time, "
          f"{threads or 'default'} thread(s) each, {args.budget:.0f} s of training each", flush=True)
    results: Dict[str, List[Dict]] = {m: [] for m in methods}
    if ref_runs:
        results = {ref: ref_runs, **results}
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        while jobs:
            futures = {(m, s): pool.submit(run_one, presets[m], s, args.budget, args.eval_every, out, args.overrides,
                                           threads, args.reuse, args.metric)
                       for m, s in jobs}
            for (m, s), f in futures.items():
                results[m].append(dict(f.result(), seed=s))
            jobs = [(m, s) for m, s in seeds_to_add(results, args.target_se, args.max_seeds).items()
                    if m in presets]
            if jobs:
                print(f"standard error above {args.target_se}: one more seed of {', '.join(m for m, _ in jobs)}",
                      flush=True)
    if args.speed_from:
        results = at_speed_of(results, json.loads(Path(args.speed_from).read_text()), skip=ref if ref_runs else None)
    (out / "methods.json").write_text(json.dumps(results, indent=1))
    return report(results, ref, out, args.budget, **(labels or {}))


def at_speed_of(results: Dict[str, List[Dict]], table: Dict[str, List[Dict]], skip: Optional[str] = None):
    """``results`` with each run's evaluation times recomputed as (its step) x (the method's median seconds per
    step over ``table``'s runs): the curve as it would have been timed at the speed the method had in that
    table (``skip``: a method left as it is, e.g. a reference read from that table)."""
    out = {}
    for m, cs in results.items():
        if m == skip:
            out[m] = cs
            continue
        if m not in table:
            raise SystemExit(f"--speed-from: no {m!r} runs to take its seconds per step from")
        spm = statistics.median(c["s_per_step"] for c in table[m])
        out[m] = [dict(c, time=[s * spm for s in c["eval_steps"]], s_per_step=spm, own_s_per_step=c["s_per_step"])
                  for c in cs]
    return out


def merge_results(parts: List[Dict[str, List[Dict]]]) -> Dict[str, List[Dict]]:
    """Several tables' curves as one: each method's runs from every part, a seed once (its first)."""
    merged: Dict[str, List[Dict]] = {}
    for part in parts:
        for m, cs in part.items():
            have = {c.get("seed") for c in merged.get(m, [])}
            merged.setdefault(m, []).extend(c for c in cs if c.get("seed") is None or c["seed"] not in have)
    return merged


def seeds_to_add(results: Dict[str, List[Dict]], target_se: Optional[float], max_seeds: int) -> Dict[str, int]:
    """The methods whose final held-out mean has a standard error over seeds above ``target_se`` and fewer
    than ``max_seeds`` seeds, each with its next seed (one past its largest); none if ``target_se`` is None."""
    if target_se is None:
        return {}
    return {m: max(c["seed"] for c in cs) + 1 for m, cs in results.items()
            if len(cs) < max_seeds and (len(cs) < 2 or _se([_end(c, "final") for c in cs]) > target_se)}


def base_mismatches(results: Dict[str, List[Dict]], tol: float = 1e-3) -> List[str]:
    """One line per seed whose runs' first curve points (the base model, before any training) differ by more
    than ``tol`` between methods: those runs were evaluated on other images (another ``eval.num_prompts``
    or ``eval.ends_num_prompts`` draws other held-out prompts), so their curves and times are not comparable."""
    by_seed: Dict[int, Dict[str, float]] = {}
    for m, cs in results.items():
        for c in cs:
            if c.get("seed") is not None:
                by_seed.setdefault(c["seed"], {})[m] = c["reward"][0]
    out = []
    for seed, vals in sorted(by_seed.items()):
        if max(vals.values()) - min(vals.values()) > tol:
            each = ", ".join(f"{m} {v:.3f}" for m, v in vals.items())
            out.append(f"seed {seed}: the evaluations before training differ ({each}): these runs were not evaluated "
                       "on the same images, so their curves and times to reach are not comparable")
    return out


def _end(c: Dict, which: str) -> float:
    """A curve's ``start`` or ``final`` held-out mean over all its images (curves saved before those keys
    existed: the curve's first or last point)."""
    return c.get(which, c["reward"][0 if which == "start" else -1])


def _se(xs: List[float]) -> float:
    """Standard error of the mean of ``xs`` (0 for one value)."""
    return statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0


def mean_curve(cs: List[Dict], grid: List[float]) -> tuple:
    """Mean and standard error over seeds of the held-out reward on ``grid`` (each seed's last
    evaluation at or before each time: its curve as a step function)."""
    def at(c, t):
        r = c["reward"][0]
        for x, y in zip(c["time"], c["reward"]):
            if x <= t:
                r = y
        return r
    vals = [[at(c, t) for c in cs] for t in grid]
    return [statistics.mean(v) for v in vals], [_se(v) for v in vals]


def report(results: Dict[str, List[Dict]], ref: str, out: Path, budget: float,
           what: str = "held-out shapes reward", title: str = "Every method on equal compute (demo model, CPU)") -> int:
    """Print the table of ``results`` (method -> one curve per seed) and save ``out/methods.png``.

    Columns: the held-out reward at the budget as mean ± standard error over seeds, the evaluation's own
    standard error (over its images, mean over seeds), the time each seed first reached the reference's
    final mean (mean over the seeds that reached it, and how many did), and its ratio to the reference's."""
    counts = sorted({len(cs) for cs in results.values()})
    seeds = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    # the budget of the runs trained here (the reference's may come from a longer table: --reference-from)
    budget = next(cs[0] for m, cs in results.items() if m != ref or len(results) == 1).get("budget_s", budget)
    ref_final = statistics.mean(_end(c, "final") for c in results[ref])
    ref_start = statistics.mean(_end(c, "start") for c in results[ref])
    # the target of the time-to-reach columns, on the images the curves share (see curve())
    target = statistics.mean(c["reward"][-1] for c in results[ref])
    curve_start = statistics.mean(c["reward"][0] for c in results[ref])
    # "time to reach the reference's final reward" means something only if the reference improved
    ref_improved = target > curve_start
    ref_reach = [time_to_reach(c, target) for c in results[ref]]
    ref_ok = [t for t in ref_reach if math.isfinite(t)]
    ref_time = statistics.mean(ref_ok) if (ref_improved and ref_ok) else math.nan
    print(f"budget {budget:.0f} s of training per run, {seeds} seed(s); {ref} held-out reward "
          f"{ref_start:.3f} -> {ref_final:.3f} ± {_se([_end(c, 'final') for c in results[ref]]):.3f}")
    if not ref_improved:
        print(f"{ref} did not improve on its start, so the time-to-reach columns are left empty")
    print(f"{'method':20s} {'seeds':>5s} {'NFE/step':>9s} {'s/step':>7s} {'start':>6s} {'final (mean±se)':>17s} {'eval se':>8s} "
          f"{'t to ref final':>16s} {'x ref time':>10s}")
    rows = []
    for m, cs in results.items():
        finals = [_end(c, "final") for c in cs]
        mean, se = statistics.mean(finals), _se(finals)
        eval_se = statistics.mean(c.get("eval_se", float("nan")) for c in cs)
        reach = [time_to_reach(c, target) for c in cs]
        ok = [x for x in reach if math.isfinite(x)]
        t_reach = statistics.mean(ok) if ok else math.inf
        rows.append((m, mean, t_reach if len(ok) == len(reach) else math.inf, se))
        if ref_improved and ok:
            ratio = f"{t_reach / ref_time:9.2f}x" if math.isfinite(ref_time) and ref_time > 0 else f"{'-':>10s}"
            reach_cols = f"{t_reach:8.0f} s ({len(ok)}/{len(reach)}) {ratio}"
        elif ref_improved:
            reach_cols = f"{'never':>16s} {'-':>10s}"
        else:
            reach_cols = f"{'-':>16s} {'-':>10s}"
        print(f"{m:20s} {len(cs):5d} {statistics.mean(c['nfe_per_step'] for c in cs):9.0f} {statistics.mean(c['s_per_step'] for c in cs):7.2f} "
              f"{statistics.mean(_end(c, 'start') for c in cs):6.3f} {mean:8.3f} ± {se:5.3f} {eval_se:8.3f} {reach_cols}")
    worst_se = max(r[3] for r in rows)
    print(f"largest standard error of a method's mean: {worst_se:.3f} ({seeds} seeds)")  # the table's resolution
    ends = sorted({c.get("eval_images", 0) for cs in results.values() for c in cs})
    curve_images = sorted({c.get("curve_images", 0) for cs in results.values() for c in cs})
    if ends[-1] and ends != curve_images:
        print(f"start and final: {'/'.join(map(str, ends))} images each; the curves and the time-to-reach columns: "
              f"the first {'/'.join(map(str, curve_images))} of them, which every evaluation holds ({ref}'s final "
              f"there: {target:.3f})")
    for line in base_mismatches(results):
        print(f"WARNING: {line}")
    if ref_improved:
        best = min(rows, key=lambda r: (r[2], -r[1]))
        if math.isfinite(best[2]) and ref_time > 0:
            print(f"fastest to {ref}'s final reward on every seed: {best[0]} ({best[2]:.0f} s vs {ref_time:.0f} s, "
                  f"{best[2] / ref_time:.2f}x)")
        elif ref_time == 0:  # the reference's seeds started at or above its final mean: no time to compare
            print(f"{ref}'s seeds reached its final mean at their first evaluation, so no time ratio is given")
    best_final = max(rows, key=lambda r: r[1])
    print(f"highest held-out reward at the budget: {best_final[0]} ({best_final[1]:.3f} ± {best_final[3]:.3f})")

    import matplotlib  # heavy: only for the plot at the end

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = max(c["time"][-1] for cs in results.values() for c in cs)
    grid = [end * i / 200 for i in range(201)]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for k, (m, cs) in enumerate(results.items()):  # ten colours, then the same colours dashed
        mu, se = mean_curve(cs, grid)
        color, ls = f"C{k % 10}", "-" if k < 10 else "--"
        ax.plot(grid, mu, label=m, lw=2.4 if m == ref else 1.3, color=color, ls=ls, drawstyle="steps-post")
        ax.fill_between(grid, [a - b for a, b in zip(mu, se)], [a + b for a, b in zip(mu, se)], color=color,
                        alpha=0.15, step="post", lw=0)
    ax.axhline(target, color="k", ls=":", lw=1)
    ax.set_xlabel("training time (s)")
    ax.set_ylabel(f"{what} (mean ± s.e. over {seeds} seeds)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "methods.png", dpi=120)
    print(f"curves: {out / 'methods.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
