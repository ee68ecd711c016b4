"""Sampling benchmark: flowrl's sampler against the plain diffusers pipeline, and NFE per plan.

Run: ``OMP_NUM_THREADS=1 python bench/sampling.py`` (CPU, tiny models built offline).

(1) Overhead. The same tiny pipeline, prompts, steps, batch and image size are sampled (a) by the
    pipeline's own ``__call__`` (output_type="pt") and (b) by ``flowrl.flow.sampler.sample`` with an
    all-ODE plan (decode included; the prompt-embedding cache is cleared before every flowrl run so
    both sides encode the prompts). Repeats are interleaved (A B, B A, ...) after a warm-up; the
    reported ratio is median(flowrl) / median(pipeline). Target: <= 1.05.
(2) NFE per sample and per trained transition for the plans of each method, measured by running the
    sampler (velocity evaluations per sample row, CFG counted once; a tree counts each node once).
    "train NFE" is the number of trained transitions per sample (one forward with grad each).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import diffusers
import torch
import transformers

from flowrl.config import from_dict
from flowrl.demo.tiny_image import build_tiny_flux_pipeline, build_tiny_sd3_pipeline
from flowrl.flow.plan import PlanConfig, build_plan, eval_plan, plan_generator
from flowrl.flow.policy import FlowPolicy
from flowrl.flow.sampler import sample

PROMPTS = ["a red cube left of a blue ball", "two green dogs", "a yellow triangle", "a photo of a cat"]


def _pipeline_call(policy, prompts, steps, group, height, width, guidance, seed, msl):
    pipe = policy.pipeline
    kwargs = dict(prompt=prompts, num_inference_steps=steps, guidance_scale=guidance, height=height, width=width,
                  num_images_per_prompt=group, output_type="pt", generator=torch.Generator().manual_seed(seed),
                  max_sequence_length=msl)  # the policy's T5 length (SD3 without T5 pads zeros to it)
    with torch.no_grad():
        return pipe(**kwargs).images


def _flowrl_call(policy, prompts, steps, group, height, width, guidance, seed):
    policy.clear_prompt_cache()
    return sample(policy, prompts, eval_plan(steps), group_size=group, height=height, width=width,
                  guidance_scale=guidance, generator=torch.Generator().manual_seed(seed), progress=False).images


def overhead(kind: str, args) -> tuple[float, float, float]:
    build = build_tiny_sd3_pipeline if kind == "sd3" else build_tiny_flux_pipeline
    policy = FlowPolicy.from_pipeline(build(seed=0), max_sequence_length=args.msl)
    prompts = PROMPTS[: args.prompts]
    call_args = (policy, prompts, args.steps, args.group, args.size, args.size, args.guidance)
    a = _pipeline_call(*call_args, 0, args.msl)
    b = _flowrl_call(*call_args, 0)
    # the same images (both sides draw the initial noise the same way from the same seed)
    same = (a.shape == b.shape) and torch.allclose(a.float(), b.float(), atol=1e-4)
    t_pipe, t_ours = [], []
    for rep in range(args.repeats):
        order = (0, 1) if rep % 2 == 0 else (1, 0)
        for which in order:
            t0 = time.perf_counter()
            if which == 0:
                _pipeline_call(*call_args, rep, args.msl)
                t_pipe.append(time.perf_counter() - t0)
            else:
                _flowrl_call(*call_args, rep)
                t_ours.append(time.perf_counter() - t0)
    mp, mo = statistics.median(t_pipe), statistics.median(t_ours)
    print(f"{kind:5s} pipeline {mp * 1e3:8.1f} ms   flowrl {mo * 1e3:8.1f} ms   ratio {mo / mp:5.3f}   "
          f"same images: {same}   ({args.prompts} prompts x {args.group}, {args.steps} steps, "
          f"{args.size}px, CFG {args.guidance}, {args.repeats} interleaved repeats, median)")
    return mp, mo, mo / mp


PLANS = [
    # name, PlanConfig as a dict (flowrl.config.from_dict), num_steps, group_size, same_noise
    ("Flow-GRPO (full)", dict(kind="full"), 10, 24, False),
    ("Flow-GRPO-Fast (window 3 in [0,5))", dict(kind="random_window", window=dict(size=3), sde="cps", noise_level=0.8), 10, 24, False),
    ("Flow-GRPO-Fast + shared prefix", dict(kind="random_window", window=dict(size=3), sde="cps", noise_level=0.8), 10, 24, True),
    ("DanceGRPO (60% subset)", dict(kind="random_subset", sde="dance_sde", noise_level=0.3), 16, 12, True),
    ("MixGRPO (window 4)", dict(kind="window", window=dict(size=4, shift_interval=25)), 25, 12, True),
    ("MixGRPO-Flash (dpm2m, 0.4)", dict(kind="window", window=dict(size=4), ode_solver="dpm2m", tail=dict(ratio=0.4)), 25, 12, True),
    ("G2RPO (singular, g=[1,2])", dict(kind="singular", granularities=[1, 2]), 16, 12, True),
    ("G2RPO (singular, g=[1])", dict(kind="singular"), 16, 12, True),
    ("Tree 2x2x2 (window of 3)", dict(kind="tree", tree=dict(branch_factors=[2, 2, 2])), 10, 8, False),
    ("Tree 3x2 at steps [1,4]", dict(kind="tree", tree=dict(branch_factors=[3, 2], branch_steps=[1, 4])), 10, 12, False),
]


def nfe_table(args) -> None:
    policy = FlowPolicy.from_pipeline(build_tiny_sd3_pipeline(seed=0), max_sequence_length=args.msl)
    prompts = PROMPTS[:2]
    print(f"\n{'plan':38s} {'steps':>5s} {'G':>3s} {'sampling NFE/sample':>20s} {'train NFE/sample':>17s} "
          f"{'total':>7s}  plan")
    for name, kw, steps, group, same_noise in PLANS:
        it = 30
        plan = build_plan(from_dict(PlanConfig, kw), steps, it, plan_generator(0, it))
        r = sample(policy, prompts, plan, group_size=group, height=32, width=32, guidance_scale=4.5,
                   generator=torch.Generator().manual_seed(0), same_noise=same_noise, decode=False, progress=False)
        per = r.nfe / r.num_samples
        train = r.trained.sum().item() / r.num_samples
        print(f"{name:38s} {steps:5d} {group:3d} {per:20.2f} {train:17.2f} {per + train:7.2f}  {plan.describe()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--guidance", type=float, default=4.5)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--msl", type=int, default=16, help="T5 sequence length (Flux)")
    ap.add_argument("--models", default="sd3,flux")
    ap.add_argument("--skip-nfe", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()  # the tiny tokenizers truncate prompts; that is expected
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    diffusers.utils.logging.set_verbosity_error()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for kind in args.models.split(","):
        overhead(kind.strip(), args)
    if not args.skip_nfe:
        nfe_table(args)


if __name__ == "__main__":
    main()
