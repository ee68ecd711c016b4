"""Process-count invariance of the training loop: 2 CPU processes (gloo, launched with torchrun)
give the same advantages, the same logged rewards and the same updated weights as 1 process with
the same global batch, for the text path and the flow path.

Why it can hold (see :mod:`flowrl.train.loop`): prompts, plans and noise derive from
(seed, step, prompt); rewards are gathered before advantages; minibatch m is block m of the step's
prompts whichever the number of processes; the loss normaliser counts the whole optimizer batch.
What is left to float rounding: DDP sums the two halves' gradients in another order than one
process does, and (images) a transformer run on 2 rows instead of 4 may round differently.

Each run goes through ``flowrl.cli.main`` inside a small driver that records, per process, the
advantages of every step (a wrapper around ``Trainer._advantages``) and the final trainable
weights and KL coefficient of every replica.

The runs use ``accelerate``'s own process-group set-up from torchrun's environment (``--standalone``:
local rendezvous, no network). Note: ``accelerate launch --cpu --num_processes 2`` without a
config file runs ONE process, so it cannot be used here.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import torch
import yaml

PLUGIN = "flowrl_disttest_plugin"
PLUGIN_SRC = textwrap.dedent(
    '''
    """Rewards for tests/test_distributed.py (named by dotted path)."""


    def digit_fraction(prompts, completions, **_):
        """Text reward: the fraction of a completion's characters that are digits."""
        return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


    def length_bonus(prompts, completions, **_):
        """Text reward: completion length / 6 (a second reward column)."""
        return [len(c) / 6.0 for c in completions]


    def parity_digits(prompts, completions, **_):
        """Text reward: 1 for prompts whose character codes sum to an odd number (always solved), plus
        half the completion's digit fraction (spread within a group)."""
        return [float(sum(map(ord, p)) % 2) + 0.5 * sum(ch.isdigit() for ch in c) / max(1, len(c))
                for p, c in zip(prompts, completions)]


    def make_patch_brightness(device=None, dtype=None, checkpoint=None, **_):
        """Image scorer factory: mean pixel value of the top-left 8x8 patch (on the tiny random
        model it spreads about 20 times more over a group than the whole image's mean, so float
        rounding moves the normalised advantages less)."""
        def score(images, prompts, **meta):
            return images[:, :, :8, :8].float().mean(dim=(1, 2, 3)).cpu()
        return score
    '''
)

DRIVER_SRC = textwrap.dedent(
    '''
    """Runs ``flowrl.cli.main(argv)`` and records what tests/test_distributed.py compares."""
    import json
    import os
    import sys


    def main():
        out, argv = sys.argv[1], sys.argv[2:]
        os.makedirs(out, exist_ok=True)
        from flowrl.train import loop

        orig_adv, orig_finish = loop.Trainer._advantages, loop.Trainer.finish

        def advantages(self, rewards, batch, row_group, row_key):
            adv, stats = orig_adv(self, rewards, batch, row_group, row_key)
            with open(os.path.join(out, f"adv-rank{self.procs.rank}.jsonl"), "a") as f:
                f.write(json.dumps({"step": self.step, "groups": row_group.tolist(), "adv": adv.tolist(),
                                    "rewards": rewards.tolist()}) + "\\n")
            return adv, stats

        def finish(self):
            from safetensors.torch import save_file
            from flowrl.train.lora import trainable_state_dict

            save_file({k: v.contiguous().cpu() for k, v in trainable_state_dict(self.task.module).items()},
                      os.path.join(out, f"final-rank{self.procs.rank}.safetensors"))
            with open(os.path.join(out, f"beta-rank{self.procs.rank}.json"), "w") as f:
                json.dump({"beta": self._beta(), "world": self.procs.world}, f)
            return orig_finish(self)

        loop.Trainer._advantages, loop.Trainer.finish = advantages, finish
        from flowrl.cli import main as cli

        rc = cli(argv)
        with open(os.path.join(out, f"rc-rank{os.environ.get('RANK', '0')}"), "w") as f:
            f.write(str(rc))
        sys.exit(rc)


    if __name__ == "__main__":
        main()
    '''
)


@pytest.fixture(scope="module")
def support(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("dist_support")
    (d / f"{PLUGIN}.py").write_text(PLUGIN_SRC, encoding="utf-8")
    (d / "driver.py").write_text(DRIVER_SRC, encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    from flowrl.demo.tiny_text import save_tiny_lm

    return save_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory) -> Path:
    from flowrl.demo.tiny_image import save_tiny

    return Path(save_tiny("sd3", tmp_path_factory.mktemp("tiny_sd3")))


def _env(support: Path) -> Dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                TOKENIZERS_PARALLELISM="false",
                PYTHONPATH=os.pathsep.join([str(support), os.environ.get("PYTHONPATH", "")]))


def launch(support: Path, nproc: int, config: Path, out: Path, overrides: List[str] = ()) -> subprocess.Popen:
    """Start ``flowrl train config`` on ``nproc`` CPU processes (torchrun for 2+)."""
    argv = ["train", str(config), f"output_dir={out}", *overrides]
    driver = [str(support / "driver.py"), str(out / "probe"), *argv]
    if nproc == 1:
        cmd = [sys.executable, *driver]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *driver]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(support))


def wait(p: subprocess.Popen, what: str, timeout: float = 540) -> Tuple[int, str]:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        pytest.fail(f"{what}: timed out after {timeout} s (a collective waiting forever?)\n{err[-3000:]}")
    return p.returncode, err


def run_one_and_two(support: Path, config: Path, tmp_path: Path) -> None:
    """Train ``config`` on 1 and on 2 processes side by side (run folders ``one`` and ``two``); both succeed."""
    p1 = launch(support, 1, config, tmp_path / "one")
    p2 = launch(support, 2, config, tmp_path / "two")
    rc2, err2 = wait(p2, "2 processes")
    rc1, err1 = wait(p1, "1 process")
    assert rc1 == 0, err1[-3000:]
    assert rc2 == 0, err2[-3000:]


def advantages(probe: Path) -> Dict[Tuple[int, int, int], Tuple[float, List[float]]]:
    """(step, global group position, member) -> (advantage, reward columns), over every process's records."""
    out: Dict[Tuple[int, int, int], Tuple[float, List[float]]] = {}
    for f in sorted(probe.glob("adv-rank*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            member: Dict[int, int] = {}
            for g, a, r in zip(rec["groups"], rec["adv"], rec["rewards"]):
                j = member.get(g, 0)
                member[g] = j + 1
                key = (rec["step"], g, j)
                assert key not in out, f"two processes trained group {g} of step {rec['step']}"
                out[key] = (a, r)
    return out


def metrics(run: Path) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def compare_runs(one: Path, two: Path, *, r_atol: float, adv_atol: float, w_atol: float,
                 likelihood: bool = True) -> Dict[str, float]:
    """Assert that the 1- and 2-process runs agree; returns the measured differences. ``likelihood``:
    the run trains log-prob ratios (a forward-process objective has none; its old policy is compared)."""
    from safetensors.torch import load_file

    a1, a2 = advantages(one / "probe"), advantages(two / "probe")
    assert set(a1) == set(a2), "the two runs trained different (step, group, member) rows"
    r_diff = max(abs(x - y) for k in a1 for x, y in zip(a1[k][1], a2[k][1]))
    assert r_diff <= r_atol, r_diff
    adv_diff = max(abs(a1[k][0] - a2[k][0]) for k in a1)
    assert adv_diff <= adv_atol, adv_diff
    assert any(abs(v[0]) > 0.1 for v in a1.values()), "degenerate test: all advantages are zero"

    steps = sorted(p.name for p in (one / "checkpoints").iterdir() if p.name.startswith("step-"))[-1]
    w1 = load_file(str(one / "checkpoints" / steps / "weights.safetensors"))
    w2 = load_file(str(two / "checkpoints" / steps / "weights.safetensors"))
    assert set(w1) == set(w2)
    w_diff = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    moved = max(float(v.abs().max()) for k, v in w1.items() if "lora_B" in k)  # B starts at 0
    assert moved > 10 * w_atol, "degenerate test: the weights hardly moved"
    assert w_diff <= w_atol, (w_diff, moved)
    # DDP keeps the replicas identical: rank 1's weights are rank 0's, bit for bit (every rank applies the
    # same all-reduced gradient with the same ops, in one run on one machine)
    r0 = load_file(str(two / "probe" / "final-rank0.safetensors"))
    r1 = load_file(str(two / "probe" / "final-rank1.safetensors"))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    b = [json.loads((two / "probe" / f"beta-rank{r}.json").read_text())["beta"] for r in (0, 1)]
    assert b[0] == b[1], f"the processes ended with different KL coefficients {b}"
    b1 = json.loads((one / "probe" / "beta-rank0.json").read_text())["beta"]
    assert b1 == pytest.approx(b[0], rel=1e-6, abs=1e-12)

    m1, m2 = metrics(one), metrics(two)
    assert [m["step"] for m in m1] == [m["step"] for m in m2]
    reward_keys = [k for k in m1[0] if k.startswith("reward/")]
    assert len(reward_keys) >= 4
    for x, y in zip(m1, m2):
        for k in reward_keys:
            assert y[k] == pytest.approx(x[k], abs=1e-5), (x["step"], k)
        assert y["invalid_samples"] == x["invalid_samples"]
        assert y["zero_std_frac"] == pytest.approx(x["zero_std_frac"], nan_ok=True)  # (NaN without groups: SPO)
        assert y["nfe"] == x["nfe"]
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
        assert y["beta"] == pytest.approx(x["beta"], rel=1e-6, abs=1e-12)
        assert y["lr"] == pytest.approx(x["lr"], rel=1e-12)
        if not likelihood:  # no ratios; its loss value is each process's share (Processes.global_stats)
            continue
        # loss statistics are taken over all processes (action-weighted means, global min/max)
        assert y["ratio_mean"] == pytest.approx(x["ratio_mean"], abs=1e-6)
        for k in ("ratio_min", "ratio_max", "clip_frac"):
            assert y[k] == pytest.approx(x[k], abs=1e-5), (x["step"], k)
        for k in ("kl", "approx_kl"):
            assert y[k] == pytest.approx(x[k], rel=1e-3, abs=1e-9), (x["step"], k)
        for m in (x, y):  # exactly 1 needs train batch = sample batch (tests/test_train_loop.py)
            assert m["ratio_first_min"] == pytest.approx(1.0, abs=1e-5)
            assert m["ratio_first_max"] == pytest.approx(1.0, abs=1e-5)
    s1 = json.loads((one / "summary.json").read_text())
    s2 = json.loads((two / "summary.json").read_text())
    assert (s1["processes"], s2["processes"]) == (1, 2)
    assert s1["nfe"] == s2["nfe"]
    return {"rewards": r_diff, "adv": adv_diff, "weights": w_diff, "moved": moved}


def write_config(cfg: Dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


COMMON_TRAIN = {"learning_rate": 3e-4, "weight_decay": 0.0, "warmup_steps": 6, "num_iterations": 2,
                "num_minibatches": 2, "progress": False, "tracker": "none", "keep_last": 1}
STAT_TRACKING = {"stat_tracking": True, "stat_min_count": 0}  # advantage.*


def _text_run(lm_dir: Path) -> Dict[str, Any]:
    """What the text runs share: the tiny LM, 4 prompts x 4 completions of 6 tokens, 2 steps, no checkpoint before the end."""
    return {"max_steps": 2, "checkpoint_every": 100, "eval_every": 100, "resume": "none",
            "model": {"family": "lm", "path": str(lm_dir)}, "sample": {"group_size": 4, "prompts_per_step": 4},
            "text": {"max_new_tokens": 6}, "data": {"train": "arithmetic:train", "eval": "arithmetic:test"},
            "eval": {"num_prompts": 2, "at_start": False}}


@pytest.mark.parametrize("overlap", [False, True], ids=["one_call", "sub_batches_overlapped"])
def test_text_two_processes_equal_one(overlap, support, lm_dir, tmp_path):
    """Causal LM: 4 prompts x 4 completions per step, 2 minibatches (each split over the
    processes), 2 inner epochs, LR warm-up, per-prompt stat tracking, two reward columns and an
    adaptive KL coefficient against the adapter-disabled reference. ``overlap``: each process samples
    its prompts in 2 sub-batches and scores one while the next samples (``sample.rollout_chunks``,
    ``sample.overlap_rewards``)."""
    chunks = {"rollout_chunks": 2, "overlap_rewards": True} if overlap else {}
    cfg = {
        **_text_run(lm_dir), "seed": 3,
        "time_budget_s": 1.0e6, "eval_every_s": 1.0e6,  # decisions on time, all-reduced each step (never reached)
        "rewards": {f"{PLUGIN}:digit_fraction": 1.0, f"{PLUGIN}:length_bonus": 0.5},
        "sample": {"group_size": 4, "prompts_per_step": 4, **chunks},
        # kl_target near the measured KL of step 1 (about 1.3e-5), so the controller's error is not clipped
        "loss": {"beta": 0.05, "beta_schedule": "adaptive", "kl_target": 1.2e-5, "kl_horizon": 5},
        "train": COMMON_TRAIN,
        "advantage": STAT_TRACKING,
    }
    config = write_config(cfg, tmp_path / "text.yaml")
    run_one_and_two(support, config, tmp_path)
    # r_atol=0: the text rewards are Python functions of the sampled strings (per-row seeded), not float kernels
    d = compare_runs(tmp_path / "one", tmp_path / "two", r_atol=0.0, adv_atol=1e-6, w_atol=1e-6)
    m = metrics(tmp_path / "one")
    change = m[1]["beta"] / m[0]["beta"] - 1.0  # the controller's step: err / horizon, |err| <= 0.2
    assert m[0]["beta"] == 0.05 and 0 < abs(change) < 0.2 / 5, "the KL controller's error was 0 or clipped: weak test"
    print(f"text: max |reward diff| {d['rewards']:.3g}, max |adv diff| {d['adv']:.3g}, "
          f"max |weight diff| {d['weights']:.3g} (largest LoRA B {d['moved']:.3g})")


def test_text_budget_two_processes_equal_one(support, lm_dir, tmp_path):
    """Per-prompt group sizes (``budget.kind: knapsack``, issue 20): the 4 training prompts, three always
    solved and one never, get 4 rollouts each at step 1 and 2, 2, 2 and 10 at step 2, so in one minibatch
    the two processes hold 10 and 2 rows (gathers pad, gradients average with the global normaliser)."""
    from flowrl.train.data import load_records

    cfg = {
        "seed": 3, "max_steps": 2, "checkpoint_every": 100, "eval_every": 100, "resume": "none",
        "rewards": {f"{PLUGIN}:parity_digits": 1.0},
        "model": {"family": "lm", "path": str(lm_dir)},
        "sample": {"group_size": 4, "prompts_per_step": 4},
        "text": {"max_new_tokens": 6},
        "data": {"train": "arithmetic:train", "eval": "arithmetic:test", "max_train_prompts": 4},
        "eval": {"num_prompts": 2, "at_start": False},
        "budget": {"kind": "knapsack", "min_history": 1},
        "train": COMMON_TRAIN,
    }
    odd = [sum(map(ord, r["prompt"])) % 2 for r in load_records("arithmetic:train", limit=4, seed=3)]
    assert sorted(odd) == [0, 1, 1, 1], "the test needs one unsolved prompt among the four"
    config = write_config(cfg, tmp_path / "budget.yaml")
    run_one_and_two(support, config, tmp_path)
    d = compare_runs(tmp_path / "one", tmp_path / "two", r_atol=0.0, adv_atol=1e-6, w_atol=1e-6)
    m = metrics(tmp_path / "two")
    assert [(x["budget/min_size"], x["budget/max_size"]) for x in m] == [(4, 4), (2, 10)]
    rows = [len(json.loads(line)["adv"]) for r in (0, 1)
            for line in (tmp_path / "two" / "probe" / f"adv-rank{r}.jsonl").read_text().splitlines()[1:]]
    assert sorted(rows) == [4, 12], rows  # step 2: one process holds 10 + 2 rows, the other 2 + 2
    print(f"text budget: max |reward diff| {d['rewards']:.3g}, max |adv diff| {d['adv']:.3g}, "
          f"max |weight diff| {d['weights']:.3g} (largest LoRA B {d['moved']:.3g})")


def test_text_spo_kl_two_processes_equal_one(support, lm_dir, tmp_path):
    """SPO with the adaptive decay (``budget.single_stream.rho_type: kl``): every prompt every step, so steps
    2 and 3 score each prompt's previous completion (held by whichever process sampled it, gathered to all)
    with the updated policy; decays, drifts, advantages and weights equal one process's."""
    cfg = {
        **_text_run(lm_dir), "seed": 3, "max_steps": 3,
        "rewards": {f"{PLUGIN}:digit_fraction": 1.0},
        "sample": {"group_size": 1, "prompts_per_step": 8},
        "data": {"train": "arithmetic:train", "eval": "arithmetic:test", "max_train_prompts": 8},
        "budget": {"kind": "single_stream", "single_stream": {"rho_type": "kl"}},
        "train": {**COMMON_TRAIN, "learning_rate": 3e-3},  # drifts large enough to move rho off its clip
    }
    config = write_config(cfg, tmp_path / "spo.yaml")
    run_one_and_two(support, config, tmp_path)
    d = compare_runs(tmp_path / "one", tmp_path / "two", r_atol=0.0, adv_atol=1e-6, w_atol=1e-6)
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    # every prompt seen for the first time: rho 0.96 each (their mean: the summation order may round the last bits)
    assert m1[0]["budget/spo_rho"] == pytest.approx(0.96, rel=1e-15) and m2[0]["budget/spo_rho"] == pytest.approx(0.96, rel=1e-15)
    for x, y in zip(m1[1:], m2[1:]):
        assert x["budget/spo_drift"] > 0
        assert y["budget/spo_drift"] == pytest.approx(x["budget/spo_drift"], rel=1e-4)
        assert y["budget/spo_rho"] == pytest.approx(x["budget/spo_rho"], rel=1e-5)
    print(f"text SPO kl: max |reward diff| {d['rewards']:.3g}, max |adv diff| {d['adv']:.3g}, "
          f"max |weight diff| {d['weights']:.3g}, drift {[x['budget/spo_drift'] for x in m1]}")


def test_text_variants_two_processes_equal_one(support, lm_dir, tmp_path):
    """DisCO (its log-sum-exp over a group's negatives, its KL hinge over the whole optimizer batch: summed
    over the processes) with dynamic reward weights (one gradient per reward, averaged over the processes):
    4 prompts x 4 completions, 2 minibatches (each split over the processes), 2 inner epochs."""
    cfg = {
        **_text_run(lm_dir), "seed": 5,
        "rewards": {f"{PLUGIN}:digit_fraction": 1.0, f"{PLUGIN}:length_bonus": 1.0},
        "loss": {"surrogate": "disco", "disco_tau": 2.0, "disco_delta": 1e-7, "disco_beta": 1e3, "disco_kl": "k3"},
        "train": COMMON_TRAIN,
        "advantage": {"dynamic_weights": True, "dynamic_weights_reg": 1e-4},
    }
    config = write_config(cfg, tmp_path / "variants.yaml")
    run_one_and_two(support, config, tmp_path)
    d = compare_runs(tmp_path / "one", tmp_path / "two", r_atol=0.0, adv_atol=1e-5, w_atol=1e-6)
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert m1[-1]["clip_frac"] > 0, "degenerate test: the KL hinge never acted"  # (DisCO: KL > disco_delta)
    for x, y in zip(m1, m2):
        for k in (k for k in x if k.startswith("reward_weight/")):
            # the float32 gradients are summed in another order: influences agree to ~1e-7 relative
            assert y[k] == pytest.approx(x[k], abs=1e-6), (x["step"], k)
    assert m1[-1]["reward_weight/flowrl_disttest_plugin:digit_fraction"] != 0.5, "degenerate test: fixed weights"
    print(f"text variants: max |adv diff| {d['adv']:.3g}, max |weight diff| {d['weights']:.3g}")


def test_flow_two_processes_equal_one(support, sd3_dir, tmp_path):
    """SD3 flow policy (LoRA): 4 prompts x 4 images per step, 2 minibatches, 2 inner epochs,
    LR warm-up, per-prompt stat tracking, CFG, DanceGRPO-style per-sample random subsets of
    trained steps (so the processes run different numbers of backward passes), an evaluation at
    the end (on the main process only) and a checkpoint."""
    cfg = {
        "seed": 3, "max_steps": 2, "checkpoint_every": 100, "eval_every": 2, "resume": "none",
        "rewards": {f"{PLUGIN}:make_patch_brightness": 1.0},
        "model": {"family": "sd3", "path": str(sd3_dir)},
        "sample": {"height": 32, "width": 32, "num_steps": 4, "eval_num_steps": 3, "guidance_scale": 2.0,
                   "group_size": 4, "prompts_per_step": 4},
        "plan": {"kind": "random_subset", "subset": {"fraction": 0.5, "per_sample": True}},
        "data": {"train": "shapes:train", "eval": "shapes:test"},
        "eval": {"num_prompts": 2, "seeds": [0], "at_start": False},
        "train": COMMON_TRAIN,
        "advantage": STAT_TRACKING,
        "lora": {"rank": 4, "alpha": 8},
    }
    config = write_config(cfg, tmp_path / "flow.yaml")
    run_one_and_two(support, config, tmp_path)
    d = compare_runs(tmp_path / "one", tmp_path / "two", r_atol=1e-6, adv_atol=1e-4, w_atol=1e-5)
    print(f"flow: max |reward diff| {d['rewards']:.3g}, max |adv diff| {d['adv']:.3g}, "
          f"max |weight diff| {d['weights']:.3g} (largest LoRA B {d['moved']:.3g})")


def test_prompts_not_divisible_over_processes(support, lm_dir, tmp_path):
    """2 prompts in 2 minibatches cannot be split over 2 processes: every process prints one
    'flowrl: error:' line naming the fix and exits with status 2, before any work."""
    cfg = {"max_steps": 1, "rewards": {"exact_match": 1.0}, "model": {"family": "lm", "path": str(lm_dir)},
           "sample": {"prompts_per_step": 2}, "data": {"train": "arithmetic:train", "eval": "arithmetic:test"},
           "train": {"num_minibatches": 2, "progress": False, "tracker": "none"}}
    config = write_config(cfg, tmp_path / "bad.yaml")
    rc, err = wait(launch(support, 2, config, tmp_path / "run"), "2 processes")
    assert rc != 0
    # one message per process (the two may share a line of the launcher's merged stderr)
    message = "flowrl: error: each minibatch's 1 prompts cannot be split evenly over 2 processes"
    assert err.count(message) == 2, err[-3000:]
    # no traceback through flowrl's code (torchrun itself prints one for the failed children)
    assert not [x for x in err.splitlines() if x.strip().startswith('File "') and "/flowrl/" in x], err[-3000:]
    for r in (0, 1):
        assert (tmp_path / "run" / "probe" / f"rc-rank{r}").read_text() == "2"
    assert not (tmp_path / "run" / "checkpoints").exists()


FORWARD = {  # the objectives of flowrl.core.objectives, each with the draws it shares (sample, group, batch)
    "nft": {"kind": "nft", "num_timesteps": 2, "kl_beta": 1e-2, "old": {"decay_rate": 0.3, "sample_from": 0}},
    "awm": {"kind": "awm", "timesteps": "stratified", "num_timesteps": 2, "timestep_share": "batch",
            "kl_beta": 1e-3, "old_kl_beta": 1.0, "old": {"decay_rate": 0.2, "decay_max": 0.3}},
    "dgpo": {"kind": "dgpo", "beta": 100.0, "num_timesteps": 2, "timestep_share": "batch", "noise_share": "group",
             "kl_beta": 0.02, "clip_range": 0.01, "old": {"decay_rate": 0.3, "decay_max": 0.3, "sample_from": 1}},
    "dpo": {"kind": "dpo", "beta": 100.0, "timesteps": "logit_normal", "num_timesteps": 2, "timestep_share": "group",
            "noise_share": "group"},
}


@pytest.mark.parametrize("objective", sorted(FORWARD))
def test_forward_objective_two_processes_equal_one(objective, support, sd3_dir, tmp_path):
    """Each forward-process objective: ODE rollouts, 4 prompts x 4 images, 2 minibatches (each split over
    the processes), 2 inner epochs; its timesteps and noise are keyed by (step, epoch, sample or group),
    so the processes draw what one process draws; the old policy ends equal too."""
    cfg = {  # one step (4 optimizer steps): the old policy follows once; the likelihood tests cover two steps
        "seed": 3, "max_steps": 1, "checkpoint_every": 100, "eval_every": 100, "resume": "none",
        "rewards": {f"{PLUGIN}:make_patch_brightness": 1.0},
        "model": {"family": "sd3", "path": str(sd3_dir)},
        "sample": {"height": 32, "width": 32, "num_steps": 4, "eval_num_steps": 2, "guidance_scale": 2.0,
                   "group_size": 4, "prompts_per_step": 4},
        "plan": {"kind": "ode", "ode_solver": "dpm2m"},
        "objective": FORWARD[objective],
        "data": {"train": "shapes:train", "eval": "shapes:test"},
        "eval": {"num_prompts": 1, "seeds": [0], "at_start": False},
        "train": COMMON_TRAIN,
        "lora": {"rank": 4, "alpha": 8},
    }
    config = write_config(cfg, tmp_path / "flow.yaml")
    run_one_and_two(support, config, tmp_path)
    d = compare_runs(tmp_path / "one", tmp_path / "two", r_atol=1e-6, adv_atol=1e-4, w_atol=1e-5, likelihood=False)
    if objective != "dpo":
        from flowrl.train.checkpoint import load_checkpoint

        step = sorted(p.name for p in (tmp_path / "one" / "checkpoints").iterdir() if p.name.startswith("step-"))[-1]
        o1 = load_checkpoint(tmp_path / "one" / "checkpoints" / step)["tensor_state"]["old_policy"]
        o2 = load_checkpoint(tmp_path / "two" / "checkpoints" / step)["tensor_state"]["old_policy"]
        assert max(float((o1[k] - o2[k]).abs().max()) for k in o1) <= 1e-5
    print(f"{objective}: max |reward diff| {d['rewards']:.3g}, max |adv diff| {d['adv']:.3g}, "
          f"max |weight diff| {d['weights']:.3g} (largest LoRA B {d['moved']:.3g})")
