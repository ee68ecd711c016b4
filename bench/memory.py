"""Peak memory of one flow-GRPO training step against one forward + backward of the same model.

Run: ``OMP_NUM_THREADS=1 python bench/memory.py`` (CPU, tiny SD3 built offline; about a minute).

Cases, each in a fresh subprocess after a warm-up: ``fwd+bwd`` (one forward with grad of
``policy.velocity`` and a backward, the unit cost), ``learner k`` (``FlowLearner.minibatch_gradient``
training k = 2, 5, 10 steps), ``learner k +KL`` (with a reference forward) and ``one graph k`` (all k
steps in one autograd graph, the naive way). The table shows, per case, the median over
``--repeats`` of (peak RSS growth of the case) / (that of ``fwd+bwd``); the learner's must stay
<= 1.1 and flat in k. How the peak is measured (glibc mmap threshold, VmHWM reset through
/proc/self/clear_refs): docs/methods.md ("How bench/memory.py measures memory").
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from dataclasses import replace

CASES = ["calibration", "fwd_bwd", "learner_2", "learner_5", "learner_10", "learner_10_kl",
         "one_graph_2", "one_graph_5", "one_graph_10"]


def _status() -> dict[str, int]:
    """VmRSS and VmHWM of this process in bytes (from /proc/self/status, kB)."""
    text = open("/proc/self/status").read()
    return {k: 1024 * int(re.search(k + r":\s+(\d+)", text).group(1)) for k in ("VmRSS", "VmHWM")}


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _child(case: str, args) -> dict:
    """Set up, warm up, then measure one case in this (fresh) process."""
    # Imported here, in the measuring child only: the parent just starts children and prints.
    import gc

    import torch

    from flowrl.core.losses import LossConfig, loss_normalizers, policy_loss
    from flowrl.flow.learner import FlowLearner
    from flowrl.flow.plan import PlanConfig, build_plan
    from flowrl.flow.policy import FlowPolicy, PromptEmbeds
    from flowrl.flow.sampler import sample
    from flowrl.flow.steps import sde_step
    from flowrl.demo.tiny_image import build_tiny_sd3_pipeline
    from flowrl.train.lora import add_lora_to_transformer, lora_config

    torch.manual_seed(0)
    if case == "calibration":
        def run():
            torch.ones(64 * 2**20 // 4).add_(1.0)  # 64 MiB written (every page touched), then freed
    else:
        pipe = build_tiny_sd3_pipeline(seed=0, num_layers=args.layers, head_dim=args.head_dim,
                                       sample_size=args.size // 2)
        policy = FlowPolicy.from_pipeline(pipe, max_sequence_length=8)
        add_lora_to_transformer(policy.transformer, lora_config("sd3", rank=8, alpha=16))
        prompts = [f"prompt number {i}" for i in range(args.rows // 2)]
        plan = build_plan(PlanConfig(kind="full", train_last_step=True), args.steps, 0)
        r = sample(policy, prompts, plan, group_size=2, height=args.size, width=args.size, guidance_scale=4.5,
                   generator=torch.Generator().manual_seed(0), decode=False)
        params = [p for p in policy.transformer.parameters() if p.requires_grad]
        adv = torch.linspace(-1, 1, r.num_samples)

        def trained_first(k: int):
            mask = torch.zeros_like(r.trained)
            mask[:, :k] = True
            return replace(r, trained=mask)

        if case == "fwd_bwd":
            emb = PromptEmbeds.from_tensors(r.embeds).select(r.prompt_index)
            x, sig = r.latents[:, 0].float(), r.sigmas[:, 0]

            def run():
                v = policy.velocity(x, sig, emb, r.guidance_scale)
                v.square().mean().backward()
        elif case.startswith("learner_"):
            parts = case.split("_")
            k = int(parts[1])
            beta = 0.05 if case.endswith("_kl") else 0.0
            cfg = LossConfig(eps_low=1e-4, beta=beta, kl_estimator="k3")
            learner = FlowLearner(policy, cfg)
            rk = trained_first(k)
            norm = loss_normalizers(rk.trained, cfg.aggregation)

            def run():
                learner.minibatch_gradient(rk, adv, normalizer=norm)
        elif case.startswith("one_graph_"):
            k = int(case.split("_")[2])
            cfg = LossConfig(eps_low=1e-4)
            rk = trained_first(k)
            emb = PromptEmbeds.from_tensors(r.embeds).select(r.prompt_index)
            norm = loss_normalizers(rk.trained, cfg.aggregation)

            def run():
                cols = []
                for t in range(rk.num_stored_steps):
                    if t >= k:
                        cols.append(torch.zeros(rk.num_samples))
                        continue
                    x = rk.latents[:, t].float()
                    v = policy.velocity(x, rk.sigmas[:, t], emb, rk.guidance_scale)
                    cols.append(sde_step(x, v, rk.sigmas[:, t], rk.sigma_next[:, t], rk.noise_levels[:, t],
                                         prev_sample=rk.latents[:, t + 1].float(), kind=rk.sde_kind).log_prob)
                loss, _ = policy_loss(torch.stack(cols, 1), rk.log_probs, adv, rk.trained, cfg, normalizer=norm)
                loss.backward()
        else:
            raise ValueError(f"case: unknown case {case!r}; choose from {CASES}")
        run()  # warm-up
        for p in params:
            p.grad = None
    gc.collect()
    base = _status()["VmRSS"]
    _reset_peak()
    run()
    peak = _status()["VmHWM"]
    return {"case": case, "growth": peak - base, "rss_before": base}


def _measure(case: str, args) -> int:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", case, "--rows", str(args.rows), "--steps",
           str(args.steps), "--size", str(args.size), "--layers", str(args.layers), "--head-dim", str(args.head_dim)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{out.stderr[-3000:]}")
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1]
    return int(json.loads(line)["growth"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=8, help="samples in the rollout (= rows per forward)")
    ap.add_argument("--steps", type=int, default=10, help="denoising steps of the rollout (>= 10)")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels (latent side = size / 2)")
    ap.add_argument("--layers", type=int, default=4, help="transformer layers of the tiny SD3")
    ap.add_argument("--head-dim", type=int, default=32, help="attention head dim of the tiny SD3 (2 heads)")
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per case (median reported)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args)))
        return 0
    if args.steps < 10:
        ap.error("--steps must be >= 10 (the largest case trains 10 steps)")
    if not os.path.exists("/proc/self/clear_refs"):
        ap.error("needs Linux /proc/self/clear_refs to reset the RSS high-water mark")
    med: dict[str, float] = {}
    for case in CASES:
        vals = [_measure(case, args) for _ in range(args.repeats)]
        med[case] = statistics.median(vals)
    unit = med["fwd_bwd"]
    mib = 2.0**20
    print(f"tiny SD3 ({args.layers} layers, head dim {args.head_dim}), {args.size}x{args.size} px, "
          f"{args.rows} rows, CFG 4.5, LoRA r=8; median of {args.repeats} fresh processes")
    print(f"calibration: a 64 MiB tensor reads {med['calibration'] / mib:.1f} MiB")
    print(f"{'case':<16}{'peak growth (MiB)':>20}{'/ fwd+bwd':>12}")
    for case in CASES[1:]:
        print(f"{case:<16}{med[case] / mib:>20.1f}{med[case] / unit:>12.3f}")
    worst = max(med[f"learner_{k}"] / unit for k in (2, 5, 10))
    spread = max(med[f"learner_{k}"] for k in (2, 5, 10)) / min(med[f"learner_{k}"] for k in (2, 5, 10))
    print(f"learner worst ratio {worst:.3f} (target <= 1.1); learner 10 / learner 2 = {spread:.3f} (flat = 1)")
    return 0 if worst <= 1.1 else 1


if __name__ == "__main__":
    sys.exit(main())
