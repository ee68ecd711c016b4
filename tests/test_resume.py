"""Exact resume after SIGKILL (slow): a run killed at random moments and restarted with
``resume=auto`` ends bit-identical to an uninterrupted run with the same seed (CPU,
``train.deterministic=true``), and every restart repeats at most the steps done since the newest
complete checkpoint.

The kill moments are drawn from a seeded RNG (``FLOWRL_RESUME_SEED``, default 20261124): the first
kill lands before the first checkpoint (just after step 1 or 2 is logged), the second within 20 ms
of a checkpoint step being logged (when its checkpoint is being written), the third within 10 ms
after a checkpoint is complete (so the restart repeats nothing, and prompts seen before the
checkpoint are seen again after it: the prompt cache of the new process is built in another
order), the fourth is a SIGTERM a random fraction of a step after a step is logged (the run must
finish that step, checkpoint it and exit 0, and the restart redoes nothing), later ones SIGKILL a
random fraction of a step after one of the next few steps, or during start-up when no step is left
to aim at; so they fall in rollouts, updates, evaluations, checkpoint writes and model loading.
The test prints what it did (for each segment: the kill, the checkpoint it resumed from, the steps
it had to redo) and the max |weight difference| (must be 0).

Compared at the end, bit for bit: the final checkpoint's trainable weights, optimizer / scheduler /
EMA state, RNG states and loop state (stat tracker, KL controller, counters), and every logged
metric except wall-clock timings.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
import yaml

pytestmark = pytest.mark.slow

PLUGIN = "flowrl_resumetest_plugin"
PLUGIN_SRC = textwrap.dedent(
    '''
    """Rewards for tests/test_resume.py (named by dotted path)."""


    def digit_fraction(prompts, completions, **_):
        """Text reward: the fraction of a completion's characters that are digits."""
        return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


    def make_patch_brightness(device=None, dtype=None, checkpoint=None, **_):
        """Image scorer factory: mean pixel value of the top-left 8x8 patch."""
        def score(images, prompts, **meta):
            return images[:, :, :8, :8].float().mean(dim=(1, 2, 3)).cpu()
        return score
    '''
)

MAX_STEPS = 12
CKPT_EVERY = 3
N_KILLS = 6
RESUMED = re.compile(r"resumed from (\S+) at step (\d+)")


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("resume_plugin")
    (d / f"{PLUGIN}.py").write_text(PLUGIN_SRC, encoding="utf-8")
    return d


def _config(kind: str, tmp: Path) -> Dict[str, Any]:
    common_train = {"learning_rate": 3e-4, "weight_decay": 1e-4, "warmup_steps": 3, "num_iterations": 2,
                    "num_minibatches": 2, "deterministic": True, "keep_last": 2, "progress": False, "tracker": "none"}
    base = {"seed": 11, "max_steps": MAX_STEPS, "checkpoint_every": CKPT_EVERY, "eval_every": 4, "resume": "auto",
            "advantage": {"stat_tracking": True, "stat_min_count": 2}, "ema": {"enabled": True, "decay": 0.8}}
    if kind == "text":
        from flowrl.demo.tiny_text import save_tiny_lm

        model = save_tiny_lm(tmp / "tiny_lm")
        return {**base,
                "rewards": {f"{PLUGIN}:digit_fraction": 1.0},
                "model": {"family": "lm", "path": str(model)},
                "sample": {"group_size": 4, "prompts_per_step": 4},
                "text": {"max_new_tokens": 6},
                "data": {"train": "arithmetic:train", "eval": "arithmetic:test", "max_train_prompts": 10},
                "eval": {"num_prompts": 4},
                "loss": {"beta": 0.02, "beta_schedule": "adaptive", "kl_target": 1e-5, "kl_horizon": 10},
                "train": common_train}
    from flowrl.demo.tiny_image import save_tiny

    model = save_tiny("sd3", tmp / "tiny_sd3")
    return {**base,
            "rewards": {f"{PLUGIN}:make_patch_brightness": 1.0},
            "model": {"family": "sd3", "path": str(model)},
            "sample": {"height": 32, "width": 32, "num_steps": 4, "eval_num_steps": 3, "guidance_scale": 2.0,
                       "group_size": 4, "prompts_per_step": 2},
            "plan": {"kind": "random_subset", "subset": {"fraction": 0.5, "per_sample": True}},
            # 5 prompts, 2 per step: an epoch ends inside a step, so the killed and the resumed process
            # encode some prompts beside different others (with the batched prompt encoding of before
            # issue 15 this test failed here: after a resume approx_kl differed in its 3rd digit, the eval reward by 5e-8)
            "data": {"train": "shapes:train", "eval": "shapes:test", "max_train_prompts": 5},
            "eval": {"num_prompts": 2, "seeds": [0]},
            "train": common_train, "lora": {"rank": 4, "alpha": 8}}


# ------------------------------------------------------------------------------------- run folder

def logged_steps(run: Path) -> List[int]:
    """Steps in metrics.jsonl (a line torn by the kill is skipped, as the loop does)."""
    f = run / "metrics.jsonl"
    if not f.is_file():
        return []
    out = []
    for line in f.read_text(encoding="utf-8").splitlines():
        try:
            out.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError, json.JSONDecodeError):
            pass
    return out


def newest_checkpoint(run: Path) -> int:
    steps = [int(p.name[5:]) for p in (run / "checkpoints").glob("step-*") if (p / "COMPLETE").is_file()]
    return max(steps, default=0)


def half_written(run: Path) -> List[str]:
    d = run / "checkpoints"
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir() if p.name.startswith(".") or not (p / "COMPLETE").is_file())


# ------------------------------------------------------------------------------------- processes

def _env(plugin_dir: Path) -> Dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                TOKENIZERS_PARALLELISM="false",
                PYTHONPATH=os.pathsep.join([str(plugin_dir), os.environ.get("PYTHONPATH", "")]))


def start(config: Path, run: Path, log: Path, env: Dict[str, str]) -> subprocess.Popen:
    """``flowrl train config`` in a new process, its stderr (the log) to ``log``."""
    with open(log, "w") as err:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", "flowrl.cli", "train", str(config), f"output_dir={run}"],
                                stdout=subprocess.DEVNULL, stderr=err, env=env)


def wait_until(p: subprocess.Popen, done, what: str, timeout: float = 600, poll: float = 0.002) -> bool:
    """Poll ``done()`` until true; False if the process ended first; fail after ``timeout``."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if done():
            return True
        if p.poll() is not None:
            return False
        time.sleep(poll)
    p.kill()
    pytest.fail(f"{what} not within {timeout} s")


def wait_for_step(p: subprocess.Popen, run: Path, step: int) -> bool:
    return wait_until(p, lambda: step in logged_steps(run), f"step {step} logged")


def wait_for_checkpoint(p: subprocess.Popen, run: Path, step: int) -> bool:
    """Until checkpoint ``step`` is complete (its marker written)."""
    return wait_until(p, lambda: newest_checkpoint(run) >= step, f"checkpoint {step} written")


def kill_and_resume(config: Path, run: Path, logs: Path, env: Dict[str, str], rng: random.Random,
                    n_kills: int) -> List[Dict[str, Any]]:
    """Run to the end, killing the run ``n_kills`` times; returns one record per segment."""
    segments: List[Dict[str, Any]] = []
    step_time = 0.5
    while True:
        seg = {"index": len(segments), "ckpt_before": newest_checkpoint(run),
               "done_before": max(logged_steps(run), default=0), "half_written_before": half_written(run)}
        log = logs / f"segment-{seg['index']}.log"
        t0 = time.time()
        p = start(config, run, log, env)
        kills_done = sum(1 for s in segments if s["killed"])
        seg["killed"] = False
        if kills_done < n_kills:
            done = seg["done_before"]
            next_ckpt = (done // CKPT_EVERY + 1) * CKPT_EVERY
            sig = signal.SIGKILL
            if kills_done == 0:  # just after step 1 or 2 is logged: before the first checkpoint
                target, delay = rng.randint(1, CKPT_EVERY - 1), rng.uniform(0.0, 0.05)
            elif kills_done == 1 and next_ckpt < MAX_STEPS:  # aimed at a checkpoint being written
                target, delay = next_ckpt, rng.uniform(0.0, 0.02)
            elif kills_done == 2 and next_ckpt < MAX_STEPS:  # right after a checkpoint is complete
                delay = rng.uniform(0.0, 0.01)
                if wait_for_checkpoint(p, run, next_ckpt):
                    time.sleep(delay)
                    if p.poll() is None:
                        os.kill(p.pid, sig)
                        seg.update(killed=True, kill_after_checkpoint=next_ckpt, kill_delay_s=round(delay, 3))
                target = "done"
            elif kills_done == 3 and done + 1 <= MAX_STEPS - 1:  # SIGTERM mid-step: a graceful stop
                target, delay, sig = done + 1, rng.uniform(0.1, 0.9) * step_time, signal.SIGTERM
            elif done + 1 <= MAX_STEPS - 1:  # a random moment after one of the next few steps
                target = rng.randint(done + 1, min(done + CKPT_EVERY + 1, MAX_STEPS - 1))
                delay = rng.uniform(0.0, 1.5) * step_time
            else:  # nothing left to aim at: a random moment of the start-up
                target, delay = None, rng.uniform(0.2, 3.0)
            if target != "done" and (target is None or wait_for_step(p, run, target)):
                time.sleep(delay)
                if p.poll() is None:
                    os.kill(p.pid, sig)
                    seg.update(killed=True, kill_after_step=target, kill_delay_s=round(delay, 3))
            seg["signal"] = signal.Signals(sig).name
        rc = p.wait()
        seg["seconds"] = round(time.time() - t0, 1)
        seg["rc"] = rc
        seg["done_after"] = max(logged_steps(run), default=0)
        seg["ckpt_after"] = newest_checkpoint(run)
        seg["half_written_after"] = half_written(run)
        text = log.read_text(encoding="utf-8", errors="replace")
        m = RESUMED.search(text)
        seg["resumed_at"] = int(m.group(2)) if m else 0
        seg["resume_logged"] = bool(m) or "training from step 0" in text
        segments.append(seg)
        if not seg["killed"]:
            assert rc == 0, f"segment {seg['index']} failed (status {rc}):\n{text[-3000:]}"
            break
        if seg["signal"] == "SIGTERM":  # finished its step, checkpointed it, exit 0 naming it
            assert rc == 0, f"SIGTERM segment {seg['index']} ended with status {rc}:\n{text[-3000:]}"
            assert seg["ckpt_after"] == seg["done_after"], seg
            assert f"stopped by SIGTERM after step {seg['done_after']}; checkpoint: " in text, text[-2000:]
        else:
            assert rc == -signal.SIGKILL
        times = []  # seconds per step so far (the loop logs them), to spread the next kill over a step
        lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if (run / "metrics.jsonl").is_file() else []
        for line in lines:
            try:
                times.append(float(json.loads(line)["time/step"]))
            except (ValueError, KeyError, json.JSONDecodeError):
                pass
        if times:
            step_time = sorted(times)[len(times) // 2]
    return segments


def _strip_times(m: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in m.items() if not k.startswith("time/")}


def _assert_same_nested(a: Any, b: Any, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for k in a:
            _assert_same_nested(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_nested(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.parametrize("kind", ["text", "flow"])
def test_sigkill_and_resume_is_exact(kind, plugin_dir, tmp_path):
    from safetensors.torch import load_file

    from flowrl.train.checkpoint import load_checkpoint

    seed = int(os.environ.get("FLOWRL_RESUME_SEED", "20261124")) + (0 if kind == "text" else 1)
    rng = random.Random(seed)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_config(kind, tmp_path)), encoding="utf-8")
    env = _env(plugin_dir)
    logs = tmp_path / "logs"
    logs.mkdir()

    ref_run, run = tmp_path / "reference", tmp_path / "killed"
    ref = start(config, ref_run, logs / "reference.log", env)
    segments = kill_and_resume(config, run, logs, env, rng, n_kills=N_KILLS)
    assert ref.wait(timeout=900) == 0, (logs / "reference.log").read_text()[-3000:]

    # every restart resumed from the newest complete checkpoint and redid only the steps after it
    kills = [s for s in segments if s["killed"]]
    assert len(kills) == N_KILLS, f"the run finished before all kills landed: {segments}"
    for seg in segments[1:]:
        if seg["resume_logged"] or not seg["killed"]:
            assert seg["resumed_at"] == seg["ckpt_before"], seg  # (0: a fresh start, no "resumed" line)
        else:  # killed during start-up, before the resume point: nothing was touched
            assert seg["done_after"] == seg["done_before"] and seg["ckpt_after"] == seg["ckpt_before"], seg
        assert 0 <= seg["done_before"] - seg["ckpt_before"] <= CKPT_EVERY, seg  # the steps it had to redo
    assert any(s["ckpt_before"] == 0 and s["done_before"] >= 1 for s in segments), \
        "no restart had logged steps but no checkpoint yet (the first kill aims there)"
    after_ckpt = [s for s in segments if "kill_after_checkpoint" in s]
    assert after_ckpt, f"no kill landed right after a checkpoint: {segments}"
    sigterm = [s for s in segments if s.get("signal") == "SIGTERM" and s["killed"]]
    assert sigterm, f"no SIGTERM landed: {segments}"
    for s in after_ckpt + sigterm:  # the next segment that got going resumed exactly where this one left off
        # (a restart killed during its start-up, before the resume point, touched nothing: line 292; on a
        # loaded machine the start-up kill aimed at the end of the run can land there)
        later = segments[s["index"] + 1:]
        nxt = next(x for x in later if x["resume_logged"] or not x["killed"])
        assert nxt["ckpt_before"] == s["ckpt_after"] and nxt["resumed_at"] == s["ckpt_after"], (s, nxt)
    # prompts of the steps after that checkpoint were also used before it (in the killed process)
    from flowrl.train.data import choose_prompts

    cfg = yaml.safe_load(config.read_text(encoding="utf-8"))
    n_prompts, per_step = cfg["data"]["max_train_prompts"], cfg["sample"]["prompts_per_step"]
    k = after_ckpt[0]["ckpt_after"]
    before = {i for st in range(k) for i in choose_prompts(n_prompts, per_step, cfg["seed"], st)}
    after = {i for st in range(k, MAX_STEPS) for i in choose_prompts(n_prompts, per_step, cfg["seed"], st)}
    assert before & after, "no prompt repeats across the checkpoint"

    # the surviving logs: each step exactly once, in order, equal to the reference's (timings aside)
    steps = logged_steps(run)
    assert steps == list(range(1, MAX_STEPS + 1)), steps
    got = [json.loads(x) for x in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    want = [json.loads(x) for x in (ref_run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    for g, w in zip(got, want):
        assert _strip_times(g) == _strip_times(w), g["step"]
    ev_got = [json.loads(x)["step"] for x in (run / "eval.jsonl").read_text(encoding="utf-8").splitlines()] \
        if (run / "eval.jsonl").is_file() else None
    if ev_got is not None:
        ev_want = [json.loads(x)["step"] for x in (ref_run / "eval.jsonl").read_text(encoding="utf-8").splitlines()]
        assert ev_got == ev_want
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    ref_summary = json.loads((ref_run / "summary.json").read_text(encoding="utf-8"))
    assert summary["steps"] == MAX_STEPS
    for k in ("nfe", "first_eval", "last_eval"):
        assert summary[k] == ref_summary[k], k

    # the final checkpoints: bit-identical weights and state
    final = f"checkpoints/step-{MAX_STEPS:08d}"
    a, b = load_checkpoint(run / final), load_checkpoint(ref_run / final)
    diff = max(float((a["weights"][k] - b["weights"][k]).abs().max()) for k in b["weights"])
    assert set(a["weights"]) == set(b["weights"])
    for k in b["weights"]:
        assert torch.equal(a["weights"][k], b["weights"][k]), k
    _assert_same_nested(a["tensor_state"], b["tensor_state"], "state.pt")
    _assert_same_nested(a["rng"], b["rng"], "rng.json")
    ma = {k: v for k, v in a["meta"].items() if k not in ("wall_clock_s", "config")}
    mb = {k: v for k, v in b["meta"].items() if k not in ("wall_clock_s", "config")}
    _assert_same_nested(ma, mb, "meta.json")
    # the saved result (EMA weights) as well
    res = "lora/adapter_model.safetensors" if kind == "text" else "lora/pytorch_lora_weights.safetensors"
    ra, rb = load_file(str(run / res)), load_file(str(ref_run / res))
    assert set(ra) == set(rb) and all(torch.equal(ra[k], rb[k]) for k in rb)

    report = {"kind": kind, "seed": seed, "max_abs_weight_diff": diff, "segments": segments}
    print("\nRESUME-REPORT " + json.dumps(report))
    (tmp_path / "report.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
