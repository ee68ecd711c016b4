"""Peak memory of one flow-GRPO training step against one forward + backward of the same model.

Run: ``OMP_NUM_THREADS=1 python bench/memory.py`` (CPU, tiny SD3 built offline; about a minute), or
``python bench/memory.py --model wan`` (a tiny Wan2.1 T2V, ``--frames`` 17 at 64x64 by default: video latents
``[rows, 16, 5, 8, 8]``).

Cases, each in a fresh subprocess after a warm-up: ``fwd+bwd`` (one forward with grad of
``policy.velocity`` and a backward, the unit cost), ``learner k`` (``FlowLearner.minibatch_gradient``
training k = 2, 5, 10 steps), ``learner k +KL`` (with a reference forward) and ``one graph k`` (all k
steps in one autograd graph, the naive way); with ``--model wan`` also ``decode`` (the VAE decode of
the rollout's final latents, all rows at once, no grad) and ``decode_rows_1`` (one row per decode call,
as the sampler's ``chunk_size=1`` decodes). The table shows, per case, the median over
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
VIDEO_CASES = ["decode", "decode_rows_1"]  # video only: the decode step against the training step
MODELS = ("sd3", "wan")
DEFAULT_HEAD_DIM = {"sd3": 32, "wan": 24}  # Wan's 3-D RoPE needs a multiple of 6


def cases_for(model: str) -> list[str]:
    """The measured cases of ``model`` (calibration first)."""
    if model not in MODELS:
        raise ValueError(f"model: unknown model {model!r}; choose from {MODELS}")
    return CASES + (VIDEO_CASES if model == "wan" else [])


def is_case(case: str, model: str) -> bool:
    """Whether ``case`` can be measured for ``model``: one of :func:`cases_for`, or a learner / one-graph case
    with another number of trained steps k >= 1 (``--child`` only; a rollout has ``--steps`` >= k)."""
    return case in cases_for(model) or re.fullmatch(r"(learner_[1-9]\d*(_kl)?|one_graph_[1-9]\d*)", case) is not None


def build_policy(args):
    """The tiny policy of ``args.model`` with a rank-8 LoRA on its transformer, built offline (seed 0)."""
    from flowrl.flow.policy import FlowPolicy
    from flowrl.train.lora import add_lora_to_transformer, lora_config

    if args.model == "sd3":
        from flowrl.demo.tiny_image import build_tiny_sd3_pipeline

        pipe = build_tiny_sd3_pipeline(seed=0, num_layers=args.layers, head_dim=args.head_dim,
                                       sample_size=args.size // 2)
        policy = FlowPolicy.from_pipeline(pipe, max_sequence_length=8)
    elif args.model == "wan":
        from flowrl.demo.tiny_wan import build_tiny_wan_pipeline

        pipe = build_tiny_wan_pipeline(seed=0, num_layers=args.layers, head_dim=args.head_dim)
        policy = FlowPolicy.from_pipeline(pipe, max_sequence_length=8, num_frames=args.frames)
    else:
        raise ValueError(f"model: unknown model {args.model!r}; choose from {MODELS}")
    add_lora_to_transformer(policy.transformer, lora_config(args.model, rank=8, alpha=16))
    return policy


def decode_rows(policy, x, chunk):
    """``policy.decode`` of rows ``x`` in calls of at most ``chunk`` rows (None: all at once), concatenated."""
    import torch  # in the measuring child only (see _child)

    if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk: must be an int >= 1 or None, got {chunk!r}")
    rows = x.shape[0]
    step = chunk or rows
    return torch.cat([policy.decode(x[a:a + step]) for a in range(0, rows, step)], dim=0)


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
    from flowrl.flow.policy import PromptEmbeds
    from flowrl.flow.sampler import sample
    from flowrl.flow.steps import sde_step

    if not is_case(case, args.model):
        raise ValueError(f"case: unknown case {case!r} for model {args.model!r}; choose from {cases_for(args.model)} "
                         "(any k >= 1 for learner_k, learner_k_kl, one_graph_k)")
    torch.manual_seed(0)
    if case == "calibration":
        def run():
            torch.ones(64 * 2**20 // 4).add_(1.0)  # 64 MiB written (every page touched), then freed
    else:
        policy = build_policy(args)
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
        else:  # decode, decode_rows_1 (wan)
            final = r.final_latents[:, 0].float()  # what the sampler decodes (first granularity)
            chunk = 1 if case == "decode_rows_1" else None

            def run():
                with torch.no_grad():
                    decode_rows(policy, final, chunk)
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
    cmd = [sys.executable, os.path.abspath(__file__), "--child", case, "--model", args.model, "--rows", str(args.rows),
           "--steps", str(args.steps), "--size", str(args.size), "--layers", str(args.layers), "--head-dim",
           str(args.head_dim), "--frames", str(args.frames)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{out.stderr[-3000:]}")
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1]
    return int(json.loads(line)["growth"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=MODELS, default="sd3", help="tiny SD3 (images) or tiny Wan2.1 (video)")
    ap.add_argument("--rows", type=int, default=8, help="samples in the rollout (= rows per forward)")
    ap.add_argument("--steps", type=int, default=10, help="denoising steps of the rollout (>= 10)")
    ap.add_argument("--size", type=int, default=64,
                    help="image / frame side in pixels (latent side: size / 2 for the tiny SD3, size / 8 for Wan)")
    ap.add_argument("--layers", type=int, default=4, help="transformer layers of the tiny model")
    ap.add_argument("--head-dim", type=int, default=None,
                    help="attention head dim of the tiny model, 2 heads (default 32 for sd3, 24 for wan)")
    ap.add_argument("--frames", type=int, default=17, help="video frames (wan only; (frames - 1) divisible by 4)")
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per case (median reported)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.head_dim is None:
        args.head_dim = DEFAULT_HEAD_DIM[args.model]
    if args.model == "wan" and (args.head_dim % 6 or (args.frames - 1) % 4 or args.frames < 1 or args.size % 16):
        ap.error("--model wan needs --head-dim a multiple of 6, (--frames - 1) divisible by 4 and --size "
                 f"a multiple of 16; got {args.head_dim}, {args.frames}, {args.size}")
    if args.child:
        print(json.dumps(_child(args.child, args)))
        return 0
    if args.steps < 10:
        ap.error("--steps must be >= 10 (the largest case trains 10 steps)")
    if not os.path.exists("/proc/self/clear_refs"):
        ap.error("needs Linux /proc/self/clear_refs to reset the RSS high-water mark")
    med: dict[str, float] = {}
    for case in cases_for(args.model):
        vals = [_measure(case, args) for _ in range(args.repeats)]
        med[case] = statistics.median(vals)
    print(format_table(med, args))
    return 0 if learner_summary(med)[0] <= 1.1 else 1


def learner_summary(med: dict[str, float]) -> tuple[float, float]:
    """(worst learner ratio to fwd+bwd, learner 10 / learner 2) from the median growths."""
    unit = med["fwd_bwd"]
    if not unit > 0:
        raise ValueError(f"fwd_bwd: the unit cost must be positive, got {unit}")
    learner = [med[f"learner_{k}"] for k in (2, 5, 10)]
    return max(learner) / unit, med["learner_10"] / med["learner_2"]


def format_table(med: dict[str, float], args) -> str:
    """The printed table: a header naming the model, the calibration, one line per case, the summary."""
    unit = med["fwd_bwd"]
    mib = 2.0**20
    if args.model == "wan":
        what = (f"tiny Wan2.1 T2V ({args.layers} layers, head dim {args.head_dim}), {args.frames} frames of "
                f"{args.size}x{args.size} px")
    else:
        what = f"tiny SD3 ({args.layers} layers, head dim {args.head_dim}), {args.size}x{args.size} px"
    lines = [f"{what}, {args.rows} rows, CFG 4.5, LoRA r=8; median of {args.repeats} fresh processes",
             f"calibration: a 64 MiB tensor reads {med['calibration'] / mib:.1f} MiB",
             f"{'case':<16}{'peak growth (MiB)':>20}{'/ fwd+bwd':>12}"]
    for case in cases_for(args.model)[1:]:
        lines.append(f"{case:<16}{med[case] / mib:>20.1f}{med[case] / unit:>12.3f}")
    worst, spread = learner_summary(med)
    lines.append(f"learner worst ratio {worst:.3f} (target <= 1.1); learner 10 / learner 2 = {spread:.3f} (flat = 1)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
