"""flowrl's text path against TRL's ``GRPOTrainer`` on the same work per step, side by side.

Both train the shipped demo LM (``assets/demo_lm``) on the arithmetic task with the text demo's
settings (``configs/llm_demo.yaml``): 32 prompts x 8 completions per step, 4 new tokens,
temperature 1, the ``grpo`` loss, beta 0, one AdamW step per generation batch (lr 3e-4, no weight
decay, gradient norm clipped at 1, constant schedule), full fine-tuning, no vLLM. Each framework
runs in its own subprocess for the same training time (``--budget`` seconds, evaluation excluded);
the two run in lockstep (one training step of flowrl, then one of TRL, the other process waiting),
so that both see the same machine load. The table gives, per
thread count, the median seconds per training step (first step dropped), their ratio, the peak
resident memory of each process and the held-out exact-match accuracy (greedy, the first
``--eval-prompts`` test problems, one evaluation function for both) after the equal time.

    python bench/text_vs_trl.py [--threads 1 2] [--budget 120] [--repeats 1] [--out table.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "llm_demo.yaml"


def demo_settings(model: str) -> dict:
    """The text demo's settings both frameworks run (from configs/llm_demo.yaml)."""
    import yaml

    d = yaml.safe_load(DEMO.read_text(encoding="utf-8"))
    return {
        "model": model, "prompts_per_step": d["sample"]["prompts_per_step"], "group_size": d["sample"]["group_size"],
        "max_new_tokens": d["text"]["max_new_tokens"], "temperature": d["text"]["temperature"],
        "lr": d["train"]["learning_rate"], "weight_decay": d["train"]["weight_decay"],
        "max_grad_norm": d["train"]["max_grad_norm"], "train": d["data"]["train"], "eval": d["data"]["eval"],
        "max_train_prompts": d["data"]["max_train_prompts"], "seed": d["seed"],
    }


def accuracy(model, tok, records, max_new_tokens: int) -> float:
    """Greedy exact match on ``records`` (flowrl's text evaluation: one batch, EOS-terminated)."""
    import torch

    from flowrl.text.rewards import exact_match
    from flowrl.text.rollout import completion_mask_from_ids

    tok.padding_side = "left"
    prompts = [r["prompt"] for r in records]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    model.eval()
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    comp = out[:, enc["input_ids"].shape[1]:]
    mask, _ = completion_mask_from_ids(comp, tok.eos_token_id)
    texts = tok.batch_decode(comp * mask + tok.pad_token_id * (1 - mask), skip_special_tokens=True)
    return float(sum(exact_match(prompts, texts, answer=[r["answer"] for r in records])) / len(records))


class Gate:
    """Lockstep with the other framework: wait for the parent's turn before a training step, say
    when it is done (two pipe ends inherited from the parent)."""

    def __init__(self, spec: str):
        self.r, self.w = (int(x) for x in spec.split(","))

    def wait(self) -> None:
        if os.read(self.r, 1) != b"g":
            raise RuntimeError("lockstep: the parent went away")

    def done(self) -> None:
        os.write(self.w, b"d")

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def run_flowrl(s: dict, budget: float, work: Path, gate: Gate) -> dict:
    from flowrl.config import load_run_config
    from flowrl.train.loop import Trainer, train

    step = Trainer.train_step

    def gated(self):
        gate.wait()
        try:
            return step(self)
        finally:
            gate.done()

    Trainer.train_step = gated

    out = work / "flowrl"
    cfg = load_run_config(str(DEMO), [
        f"model.path={s['model']}", f"output_dir={out}", "max_steps=1000000", f"time_budget_s={budget}",
        "eval.at_start=false", "eval_every=1000000", "checkpoint_every=1000000", "eval.num_prompts=1",
        "train.tracker=none", "train.progress=false", "resume=none",
    ])
    train(cfg)
    gate.close()
    peak = peak_rss_mib()
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"step_s": [r["time/step"] for r in recs], "peak_rss_mib": peak, "model_dir": str(out / "model")}


def run_trl(s: dict, budget: float, work: Path, gate: Gate) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from flowrl.text.rewards import exact_match
    from flowrl.train.data import load_records

    records = load_records(s["train"], limit=s["max_train_prompts"], seed=s["seed"])

    def exact(prompts, completions, answer, **_):
        return exact_match(prompts, completions, answer=answer)

    class Budget(TrainerCallback):
        """Per-step wall time; stop after the step at which training time exceeds the budget."""

        def __init__(self):
            self.times, self.t0 = [], None

        def on_step_begin(self, args, state, control, **kw):
            gate.wait()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)
            gate.done()
            if sum(self.times) > budget:
                control.should_training_stop = True

    n = s["prompts_per_step"] * s["group_size"]
    args = GRPOConfig(
        output_dir=str(work / "trl"), use_cpu=True, report_to="none", save_strategy="no", logging_strategy="no",
        per_device_train_batch_size=n, num_generations=s["group_size"], gradient_accumulation_steps=1,
        num_iterations=1, max_completion_length=s["max_new_tokens"], temperature=s["temperature"], top_p=1.0,
        beta=0.0, loss_type="grpo", learning_rate=s["lr"], weight_decay=s["weight_decay"],
        max_grad_norm=s["max_grad_norm"], lr_scheduler_type="constant", warmup_steps=0, max_steps=1000000,
        seed=s["seed"], bf16=False, fp16=False, dataloader_num_workers=0,
        gradient_checkpointing=False,  # TRL 1.16 defaults to True; the demo (and flowrl by default) does not checkpoint
    )
    budget_cb = Budget()
    trainer = GRPOTrainer(model=s["model"], reward_funcs=[exact], args=args,
                          train_dataset=Dataset.from_list([dict(r) for r in records]), callbacks=[budget_cb])
    trainer.train()
    gate.close()
    peak = peak_rss_mib()
    out = work / "trl_model"
    trainer.model.save_pretrained(out)
    trainer.processing_class.save_pretrained(out)
    del trainer
    return {"step_s": budget_cb.times, "peak_rss_mib": peak, "model_dir": str(out)}


def worker(args) -> int:
    import torch

    torch.set_num_threads(args.threads[0])
    s = demo_settings(args.model)
    work = Path(tempfile.mkdtemp(prefix=f"flowrl-vs-trl-{args.worker}-"))
    res = (run_flowrl if args.worker == "flowrl" else run_trl)(s, args.budget, work, Gate(args.gate))

    from flowrl.train.data import load_records
    from flowrl.train.model import load_lm

    model, tok = load_lm(res.pop("model_dir"))
    held_out = load_records(s["eval"], limit=args.eval_prompts, seed=s["seed"])
    res["accuracy"] = accuracy(model, tok, held_out[:args.eval_prompts], s["max_new_tokens"])
    res["steps"] = len(res["step_s"])
    res["train_s"] = sum(res["step_s"])
    Path(args.result).write_text(json.dumps(res))
    return 0


def lockstep(args, threads: int) -> dict:
    """Run the flowrl and TRL workers side by side, one training step at a time each; their results."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    procs = {}
    for name in ("flowrl", "trl"):
        go_r, go_w = os.pipe()
        done_r, done_w = os.pipe()
        result = Path(tempfile.mkdtemp(prefix="flowrl-vs-trl-")) / "result.json"
        cmd = [sys.executable, __file__, "--worker", name, "--threads", str(threads), "--budget", str(args.budget),
               "--model", args.model, "--eval-prompts", str(args.eval_prompts), "--result", str(result),
               "--gate", f"{go_r},{done_w}"]
        p = subprocess.Popen(cmd, env=env, cwd=REPO, pass_fds=(go_r, done_w))
        os.close(go_r)
        os.close(done_w)
        procs[name] = (p, go_w, done_r, result)
    live = list(procs)
    while live:
        for name in list(live):
            p, go_w, done_r, _ = procs[name]
            try:
                os.write(go_w, b"g")
                ok = os.read(done_r, 1) == b"d"
            except BrokenPipeError:
                ok = False
            if not ok:  # its training is over (pipe closed): it evaluates on its own now
                live.remove(name)
                os.close(go_w)
                os.close(done_r)
    out = {}
    for name, (p, _, _, result) in procs.items():
        if p.wait() != 0:
            raise SystemExit(f"the {name} worker failed (exit {p.returncode})")
        out[name] = json.loads(result.read_text())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch intra-op threads (one table row each)")
    ap.add_argument("--budget", type=float, default=120.0, help="training seconds per run (evaluation excluded)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per framework and thread count (alternating)")
    ap.add_argument("--model", default=str(REPO / "assets" / "demo_lm"), help="a causal LM folder (default: the demo LM)")
    ap.add_argument("--eval-prompts", type=int, default=512, help="held-out problems for the accuracy column")
    ap.add_argument("--out", default=None, help="also write the table as JSON here")
    ap.add_argument("--worker", choices=["flowrl", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--gate", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)

    rows = []
    for threads in args.threads:
        runs = {"flowrl": [], "trl": []}
        for _ in range(args.repeats):
            for name, res in lockstep(args, threads).items():
                runs[name].append(res)
        row = {"threads": threads}
        for name, rs in runs.items():
            times = [t for r in rs for t in r["step_s"][1:]] or [t for r in rs for t in r["step_s"]]
            row[name] = {"s_per_step": statistics.median(times), "steps": [r["steps"] for r in rs],
                         "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
                         "accuracy": statistics.mean(r["accuracy"] for r in rs)}
        row["time_ratio"] = row["flowrl"]["s_per_step"] / row["trl"]["s_per_step"]
        row["memory_ratio"] = row["flowrl"]["peak_rss_mib"] / row["trl"]["peak_rss_mib"]
        rows.append(row)

    print(f"\nflowrl vs TRL {__import__('trl').__version__} GRPOTrainer, {args.budget:.0f} s of training each, "
          f"{args.repeats} run(s) per cell")
    print(f"{'threads':>7s} {'flowrl s/step':>13s} {'TRL s/step':>10s} {'ratio':>6s} {'flowrl MiB':>10s} {'TRL MiB':>8s} "
          f"{'mem ratio':>9s} {'flowrl acc':>10s} {'TRL acc':>8s} {'steps f/T':>10s}")
    for r in rows:
        f, t = r["flowrl"], r["trl"]
        print(f"{r['threads']:7d} {f['s_per_step']:13.3f} {t['s_per_step']:10.3f} {r['time_ratio']:6.2f} "
              f"{f['peak_rss_mib']:10.0f} {t['peak_rss_mib']:8.0f} {r['memory_ratio']:9.2f} {f['accuracy']:10.3f} "
              f"{t['accuracy']:8.3f} {sum(f['steps']):>5d}/{sum(t['steps']):<4d}")
    if args.out:
        Path(args.out).write_text(json.dumps({"budget_s": args.budget, "repeats": args.repeats, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
