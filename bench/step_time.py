"""Training-step time split (sampling / scoring / update) for the Flow-GRPO, MixGRPO and tree settings,
and (``--overlap``) the step time with rewards overlapping sampling, off and on.

Default mode: runs ``flowrl train`` for a few steps per setting on one tiny SD3-format model (the same
model, prompts, group size and seed for every setting, in one process), reads ``metrics.jsonl`` and
prints, per setting, the median seconds of each phase, the NFE per step, and each phase as a ratio of
Flow-GRPO's total step time. Absolute times on a shared CPU mean little; the ratios measured side by
side are the result.

``--overlap``: the step's prompts sampled in ``--chunks`` sub-batches (``sample.rollout_chunks``) with
``sample.overlap_rewards`` off and on, for (a) an in-process scorer that does a fixed amount of torch
work per image (on a CPU it competes with sampling for the cores) and (b) a ``remote`` scorer served by
another process (``bench/server.py --serve``: a model that sleeps per image, like a reward model on its
own GPU). The scorer's cost per image is calibrated so that scoring takes about as long as sampling
(``--score-ms auto``). One training loop per scorer, its model loaded once, runs a warm-up step and
then ``--steps`` steps with overlap off and as many with it on, alternated (off on on off ...). Printed
per case and mode, medians over those steps: sampling s, scoring s (the scorer's own time), the wait for
scores after sampling, rollout+score s (sampling start to rewards ready), update s, step s, and the
ratio rollout+score / max(sampling, scoring) with both measured with overlap off (target: 1.1 or
less with overlap on; with C sub-batches the last one's scoring cannot overlap, so the bound is
1 + min/max / C). Figures and command: docs/methods.md ("Rewards overlap sampling").

    python bench/step_time.py [--steps 4] [--model DIR]
    python bench/step_time.py --overlap [--steps 6] [--chunks 8] [--threads 1] [--score-ms auto]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SETTINGS = {
    "Flow-GRPO (full, 10 SDE steps)": ["plan.kind=full"],
    "MixGRPO (window 4)": ["plan.kind=window", "plan.window.size=4", "plan.window.shift_interval=1"],
    "MixGRPO-Flash (window 4, dpm2m tail 0.4)": ["plan.kind=window", "plan.window.size=4", "plan.window.shift_interval=1",
                                                 "plan.ode_solver=dpm2m", "plan.tail.ratio=0.4"],
    "Tree 2x2 (Dynamic-TreeRPO window)": ["plan.kind=tree", "plan.tree.branch_factors=[2, 2]"],
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4, help="training steps per setting (the first is dropped as warm-up); "
                    "--overlap: steps per mode and scorer (after one warm-up step)")
    ap.add_argument("--model", default=None, help="an SD3-format model folder (default: a fresh tiny one)")
    ap.add_argument("--overlap", action="store_true", help="the overlap table: rewards overlapping sampling, off and on")
    ap.add_argument("--chunks", type=int, default=8, help="--overlap: prompt sub-batches per step (= prompts per step)")
    ap.add_argument("--threads", type=int, default=1, help="--overlap: torch threads (sampling and an in-process scorer each)")
    ap.add_argument("--score-ms", default="auto", help="--overlap: scorer cost per image in ms, or 'auto' (scoring ~ sampling)")
    ap.add_argument("--cases", default="inprocess,remote", help="--overlap: which scorers, comma-separated")
    ap.add_argument("--tiny", action="store_true", help="--overlap: a few seconds' run (tests)")
    args = ap.parse_args(argv)
    if args.overlap:
        return overlap_main(args)

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


# ------------------------------------------------------------------------------------------- --overlap

class BusyScorer:
    """An in-process scorer with a fixed amount of torch work per image (``mm_per_image`` products of
    256x256 matrices: on a shared CPU its wall time grows with contention, as a real model's would);
    score = mean pixel value."""

    def __init__(self, mm_per_image: int = 0, **_):
        self.mm_per_image = int(mm_per_image)
        self.a = torch_randn(256)

    def __call__(self, images, prompts, **_):
        import torch

        x = self.a
        for _ in range(self.mm_per_image * len(images)):
            x = torch.mm(self.a, x).clamp_(-1, 1)
        return images.float().mean(dim=(1, 2, 3)).cpu()


def torch_randn(n: int):
    import torch

    return torch.randn(n, n, generator=torch.Generator().manual_seed(0)) / n ** 0.5


def mm_seconds(repeats: int = 5) -> float:
    """Seconds of one 256x256 matrix product (the best of ``repeats`` timings of 50)."""
    import torch

    a = torch_randn(256)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x = a
        for _ in range(50):
            x = torch.mm(a, x).clamp_(-1, 1)
        best = min(best, (time.perf_counter() - t) / 50)
    return best


def start_remote(image_ms: float, threads: int):
    """A scorer server subprocess (``bench/server.py --serve``: sleeps ``image_ms`` per image); ``(proc, url)``."""
    cmd = [sys.executable, str(ROOT / "bench" / "server.py"), "--serve", "--call-ms", "0", "--image-ms", f"{image_ms:.3f}",
           "--max-batch-images", "0"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    line = proc.stdout.readline()
    if not line.startswith("URL "):
        stop_remote(proc)
        raise RuntimeError(f"the scorer server did not start: {line!r}")
    return proc, line.split()[1]


def stop_remote(proc) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


OVERLAP_KEYS = ("time/sampling", "time/scoring", "time/scoring_total", "time/update", "time/step")


def trainer(work: Path, name: str, overrides, rewards, options):
    """A training loop in this process (its model loaded once); the bench calls its ``train_step``."""
    from flowrl.config import load_run_config
    from flowrl.train.loop import Trainer

    cfg = load_run_config(None, list(overrides) + [f"output_dir={work / name}"])
    cfg.rewards, cfg.reward_options = dict(rewards), {k: dict(v) for k, v in options.items()}
    cfg.validate()
    return Trainer(cfg)


def alternate(trainer, steps: int) -> dict:
    """``steps`` training steps with overlap off and as many with it on, in the order off on on off
    off on ... (a drift of the machine's load hits both alike); ``{"off": [metrics], "on": [metrics]}``."""
    out = {"off": [], "on": []}
    for k in range(2 * steps):
        mode = ("off", "on", "on", "off")[k % 4]
        trainer.cfg.sample.overlap_rewards = mode == "on"  # read by every train_step
        out[mode].append(trainer.train_step())
    return out


def overlap_medians(recs) -> dict:
    """Medians of the phases; ``rollout_score`` = sampling + the wait for scores (start to rewards ready)."""
    med = {k: statistics.median(r[k] for r in recs) for k in OVERLAP_KEYS}
    med["rollout_score"] = statistics.median(r["time/sampling"] + r["time/scoring"] for r in recs)
    return med


def overlap_ratio(on_or_off: dict, off: dict) -> float:
    """rollout+score / max(sampling, scoring), the phases measured with overlap off (side by side)."""
    return on_or_off["rollout_score"] / max(off["time/sampling"], off["time/scoring_total"])


def format_overlap_table(rows, chunks: int) -> str:
    """``rows``: ``[(case, {"off": medians, "on": medians})]`` -> the printed table."""
    head = (f"{'scorer':34s} {'overlap':>7s} {'sampling s':>10s} {'scoring s':>9s} {'wait s':>7s} "
            f"{'rollout+score s':>15s} {'update s':>8s} {'step s':>7s} {'/ max(samp, score)':>18s}")
    lines = [head]
    for case, m in rows:
        off = m["off"]
        for mode in ("off", "on"):
            r = m[mode]
            lines.append(f"{case:34s} {mode:>7s} {r['time/sampling']:10.3f} {r['time/scoring_total']:9.3f} "
                         f"{r['time/scoring']:7.3f} {r['rollout_score']:15.3f} {r['time/update']:8.3f} "
                         f"{r['time/step']:7.3f} {overlap_ratio(r, off):18.2f}")
    for case, m in rows:
        off, on = m["off"], m["on"]
        lo, hi = sorted((off["time/sampling"], off["time/scoring_total"]))
        lines.append(f"{case}: rollout+score with overlap / without: {on['rollout_score'] / off['rollout_score']:.2f}; "
                     f"bound with {chunks} sub-batches 1 + min/max / C = {1 + lo / hi / chunks:.2f}; target <= 1.1")
    return "\n".join(lines)


def overlap_main(args) -> int:
    import torch

    from flowrl.demo.tiny_image import save_tiny
    from scorers.registry import register

    torch.set_num_threads(args.threads)
    register("bench_busy")(BusyScorer)
    tiny = args.tiny
    steps = 1 if tiny else args.steps
    P = 2 if tiny else args.chunks  # one prompt (4 rows) per sub-batch
    size, num_steps = (16, 4) if tiny else (32, 10)
    work = Path(tempfile.mkdtemp(prefix="flowrl-bench-overlap-"))
    model = args.model or str(save_tiny("sd3", work / "tiny_sd3", seed=0))
    base = [
        f"model.path={model}", f"sample.height={size}", f"sample.width={size}", f"sample.num_steps={num_steps}",
        "sample.eval_num_steps=2", "sample.group_size=4", f"sample.prompts_per_step={P}", f"sample.rollout_chunks={P}",
        "plan.kind=window", "plan.window.size=2", "rewards={shapes: 1.0}", "eval.at_start=false", "max_steps=1000000",
        "train.tracker=none", "train.progress=false", "resume=none", "lora.rank=4",
    ]
    inproc = trainer(work, "inprocess", base, {"bench_busy": 1.0}, {})
    inproc.train_step()  # warm-up
    if args.score_ms == "auto":  # scoring ~ sampling: the sampling time of a step, per image (the scorer is free now)
        ms = 1000 * statistics.median(inproc.train_step()["time/sampling"] for _ in range(1 if tiny else 3)) / (4 * P)
    else:
        ms = float(args.score_ms)
    per_mm = mm_seconds()
    busy = inproc.task.reward_model().scorers["bench_busy"]
    busy.mm_per_image = max(0, round(ms / 1000 / per_mm))
    print(f"tiny SD3 {size}x{size}, {num_steps} steps (window of 2 SDE steps), {P} prompts x 4 per step in {P} "
          f"sub-batches; torch threads {args.threads}; scorer cost {ms:.1f} ms per image (in-process: "
          f"{busy.mm_per_image} products of 256x256 at {per_mm * 1000:.2f} ms; remote: sleep); medians of {steps} "
          f"step(s) per mode, modes alternated (off on on off ...), after a warm-up step")
    table = []
    for case in [c.strip() for c in args.cases.split(",") if c.strip()]:
        if case == "inprocess":
            table.append(("in-process (torch work per image)", alternate(inproc, steps)))
        elif case == "remote":
            proc, url = start_remote(ms, args.threads)
            try:
                t = trainer(work, "remote", base, {"remote": 1.0}, {"remote": {"url": url, "batch_size": 64}})
                try:
                    t.train_step()  # warm-up
                    table.append(("remote server (sleep per image)", alternate(t, steps)))
                finally:
                    t.close()
            finally:
                stop_remote(proc)
        else:
            raise SystemExit(f"--cases: unknown case {case!r} (inprocess, remote)")
    inproc.close()
    print(format_overlap_table([(name, {m: overlap_medians(r) for m, r in recs.items()}) for name, recs in table], P))
    return 0


if __name__ == "__main__":
    sys.exit(main())
