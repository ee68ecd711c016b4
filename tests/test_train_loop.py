"""End-to-end runs of the training loop (``flowrl train``) on tiny models, offline, on CPU.

* a two-step run of each path (causal LM, SD3 flow model): finite losses, an on-policy first pass
  (ratio exactly 1), weights that move by exactly one Adam step, checkpoints, ``metrics.jsonl``,
  ``summary.json`` and ``report.html`` with their documented keys; then ``resume=auto`` continues at
  the right step without redoing or rewriting earlier ones;
* bad configs and inputs: the CLI, in a subprocess, prints one ``flowrl: error:`` line and exits 2;
* a scorer that returns NaN for some samples: those samples are counted (``invalid_samples``) and
  take no part in the update;
* NaN gradients / losses: the optimizer step is skipped (weights and Adam state untouched), and
  ``train.max_bad_steps`` bad steps in a row stop the run with exit status 3, the last checkpoint
  intact.

Reward functions and scorers used here live in a small module written to a temporary folder and
named by dotted path, as users name their own.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]

PLUGIN = "flowrl_looptest_plugin"
PLUGIN_SRC = textwrap.dedent(
    '''
    """Rewards for tests/test_train_loop.py (named by dotted path in the run configs)."""
    import torch


    def digit_fraction(prompts, completions, **_):
        """Text reward: the fraction of a completion's characters that are digits (varies on a random LM)."""
        return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


    def digit_fraction_some_none(prompts, completions, **_):
        """digit_fraction, but None (unscorable) for every row i with i % 4 == 1 of each call."""
        return [None if i % 4 == 1 else sum(ch.isdigit() for ch in c) / max(1, len(c))
                for i, c in enumerate(completions)]


    def make_brightness(device=None, dtype=None, checkpoint=None, **_):
        """Image scorer factory: mean pixel value of each image."""
        def score(images, prompts, **meta):
            return images.float().mean(dim=(1, 2, 3)).cpu()
        return score


    def make_brightness_some_nan(device=None, dtype=None, checkpoint=None, **_):
        """Image scorer factory: brightness, NaN for every row i with i % 4 == 1 of each call."""
        def score(images, prompts, **meta):
            out = images.float().mean(dim=(1, 2, 3)).cpu()
            out[1::4] = float("nan")
            return out
        return score
    '''
)

# metrics every step must log (issue 6: what Flow-GRPO users watch)
STEP_KEYS = [
    "step", "reward/total", "reward/total_std", "invalid_samples", "zero_std_frac", "clip_frac",
    "clip_frac_low", "clip_frac_high", "approx_kl", "ratio_mean", "ratio_min", "ratio_max",
    "ratio_first_min", "ratio_first_max", "grad_norm", "loss", "nfe", "lr", "skipped_optimizer_steps",
    "time/sampling", "time/scoring", "time/update", "time/step",
]
SUMMARY_KEYS = ["steps", "wall_clock_s", "nfe", "first_eval", "last_eval"]
LR = 3e-4


# ------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("plugin")
    (d / f"{PLUGIN}.py").write_text(PLUGIN_SRC, encoding="utf-8")
    return d


@pytest.fixture(autouse=True)
def _isolated(plugin_dir, monkeypatch):
    """The plugin importable; process-wide state the loop changes (deterministic mode, accelerate's
    shared state) restored afterwards, so other test files see a clean process."""
    monkeypatch.syspath_prepend(str(plugin_dir))
    det = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(det)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    from flowrl.demo.tiny_text import save_tiny_lm

    return save_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory) -> Path:
    from flowrl.demo.tiny_image import save_tiny

    return Path(save_tiny("sd3", tmp_path_factory.mktemp("tiny_sd3")))


def text_config(model_dir: Path, out: Path, **over) -> Dict[str, Any]:
    cfg: Dict[str, Any] = {
        "output_dir": str(out), "seed": 0, "max_steps": 2, "resume": "auto", "checkpoint_every": 1, "eval_every": 2,
        "rewards": {f"{PLUGIN}:digit_fraction": 1.0},
        "model": {"family": "lm", "path": str(model_dir)},
        "sample": {"group_size": 4, "prompts_per_step": 2},
        "text": {"max_new_tokens": 6},
        "data": {"train": "arithmetic:train", "eval": "arithmetic:test"},
        "eval": {"num_prompts": 4},
        "train": {"learning_rate": LR, "weight_decay": 0.0, "progress": False, "tracker": "none", "keep_last": 10},
    }
    return _merge(cfg, over)


def flow_config(model_dir: Path, out: Path, **over) -> Dict[str, Any]:
    cfg: Dict[str, Any] = {
        "output_dir": str(out), "seed": 0, "max_steps": 2, "resume": "auto", "checkpoint_every": 1, "eval_every": 2,
        "rewards": {f"{PLUGIN}:make_brightness": 1.0},
        "model": {"family": "sd3", "path": str(model_dir)},
        "sample": {"height": 32, "width": 32, "num_steps": 3, "eval_num_steps": 3, "guidance_scale": 1.0,
                   "group_size": 4, "prompts_per_step": 2},
        "plan": {"kind": "full"},
        "data": {"train": "shapes:train", "eval": "shapes:test"},
        "eval": {"num_prompts": 2, "seeds": [0]},
        "train": {"learning_rate": LR, "weight_decay": 0.0, "progress": False, "tracker": "none", "keep_last": 10},
        "lora": {"rank": 4, "alpha": 8},
    }
    return _merge(cfg, over)


def _merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "rewards":
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def write_config(cfg: Dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def run_inprocess(cfg: Dict[str, Any], tmp: Path, name: str = "run.yaml") -> Dict[str, Any]:
    from flowrl.config import load_run_config
    from flowrl.train.loop import train

    return train(load_run_config(write_config(cfg, tmp / name)))


def read_metrics(run: Path) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:08d}"


def ckpt_weights(run: Path, step: int) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(ckpt(run, step) / "weights.safetensors"))


def initial_weights(cfg: Dict[str, Any], tmp: Path) -> Dict[str, torch.Tensor]:
    """The trainable weights the run starts from, built by the same task code (LoRA init seeded)."""
    from flowrl.config import load_run_config
    from flowrl.train.tasks import build_task

    c = load_run_config(write_config(cfg, tmp / "init.yaml"))
    task = build_task(c, torch.device("cpu"))
    return {n: p.detach().clone() for n, p in task.module.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------ checks

def check_run_folder(run: Path, steps: int, reward_names: List[str]) -> None:
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    for m in metrics:
        missing = [k for k in STEP_KEYS if k not in m]
        assert not missing, f"metrics of step {m['step']} lack {missing}"
        for k in ("loss", "grad_norm", "reward/total", "approx_kl", "ratio_mean"):
            assert math.isfinite(m[k]), (m["step"], k, m[k])
        for n in reward_names:
            assert math.isfinite(m[f"reward/{n}"])
        # on-policy first pass: the recomputed log-probs equal the rollout's bit for bit
        assert m["ratio_first_min"] == 1.0 and m["ratio_first_max"] == 1.0, m
        assert m["grad_norm"] > 0
        assert m["skipped_optimizer_steps"] == 0 and m["invalid_samples"] == 0
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    missing = [k for k in SUMMARY_KEYS if k not in summary]
    assert not missing, f"summary.json lacks {missing}"
    assert summary["steps"] == steps
    assert summary["nfe"] == sum(m["nfe"] for m in metrics) > 0
    assert summary["wall_clock_s"] > 0
    for key in ("first_eval", "last_eval"):
        assert set(reward_names) <= set(summary[key]), (key, summary[key])
        assert all(math.isfinite(v) for v in summary[key].values())
    html = (run / "report.html").read_text(encoding="utf-8")
    assert "<html" in html.lower() and len(html) > 200
    assert (run / "config.yaml").is_file()
    for s in range(1, steps + 1):
        assert (ckpt(run, s) / "COMPLETE").is_file(), f"no complete checkpoint for step {s}"


def check_one_adam_step(w0: Dict[str, torch.Tensor], w1: Dict[str, torch.Tensor]) -> None:
    """After one AdamW step (no weight decay) from a LoRA with B = 0: A's gradient is exactly zero
    (dL/dA = B^T (...) = 0), so A is unchanged; every element of B moves by
    lr * g / (|g| + eps) <= lr, the largest ones by almost exactly lr (|g| >> eps)."""
    assert set(w0) == set(w1)
    a_keys = [k for k in w0 if "lora_A" in k]
    b_keys = [k for k in w0 if "lora_B" in k]
    assert a_keys and b_keys and len(a_keys) + len(b_keys) == len(w0)
    for k in b_keys:
        assert torch.count_nonzero(w0[k]) == 0, f"{k}: LoRA B should start at zero"
    for k in a_keys:
        assert torch.equal(w0[k], w1[k]), f"{k} changed although its gradient is zero"
    step = max(float((w1[k] - w0[k]).abs().max()) for k in b_keys)
    assert LR * 0.99 < step <= LR * (1 + 1e-5), step


# ------------------------------------------------------------------------------------------ tests

def test_text_two_steps_and_resume(lm_dir, tmp_path, caplog):
    run = tmp_path / "run"
    name = f"{PLUGIN}:digit_fraction"
    cfg = text_config(lm_dir, run, train={"tracker": "tensorboard"})
    summary = run_inprocess(cfg, tmp_path)
    assert summary["steps"] == 2
    check_run_folder(run, 2, [name])
    assert any((run / "logs").rglob("events.out.tfevents.*")), "no TensorBoard log written"
    w0 = initial_weights(cfg, tmp_path)
    check_one_adam_step(w0, ckpt_weights(run, 1))
    w1, w2 = ckpt_weights(run, 1), ckpt_weights(run, 2)
    assert any(not torch.equal(w1[k], w2[k]) for k in w1), "the second step did not change the weights"
    assert (run / "lora" / "adapter_config.json").is_file()

    # resume: one more step, starting from the step-2 checkpoint
    before = (run / "metrics.jsonl").read_text(encoding="utf-8")
    caplog.set_level("INFO", logger="flowrl.train")
    summary = run_inprocess(text_config(lm_dir, run, max_steps=3), tmp_path, "run3.yaml")
    assert summary["steps"] == 3
    assert any("resumed from" in r.getMessage() and r.getMessage().endswith("at step 2") for r in caplog.records)
    after = (run / "metrics.jsonl").read_text(encoding="utf-8")
    assert after.startswith(before), "resume rewrote the metrics of steps already done"
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3]
    check_run_folder(run, 3, [name])
    assert summary["nfe"] == sum(m["nfe"] for m in read_metrics(run))


@pytest.mark.parametrize("minibatches,epochs,filled_rows", [(1, 1, 0), (2, 1, 4), (1, 2, 8)])
def test_text_skips_the_old_logprob_pass_on_policy(lm_dir, tmp_path, monkeypatch, minibatches, epochs, filled_rows):
    """The rollout computes no old log-probs; the loop fills them only for the rows trained after
    the first optimizer step (a second epoch trains every row again: all are filled). One
    minibatch, one epoch: the same weights, bit for bit (same process), as with a separate old pass
    over every row (the behaviour before)."""
    from flowrl.train.loop import Trainer
    from flowrl.train.tasks import TextTask

    filled = []
    real_fill = TextTask.fill_old
    monkeypatch.setattr(TextTask, "fill_old", lambda self, ro, rows: (filled.append(rows.numel()), real_fill(self, ro, rows)))
    over = dict(checkpoint_every=2, eval_every=10, sample={"prompts_per_step": 2},
                train={"num_minibatches": minibatches, "num_iterations": epochs})
    run_inprocess(text_config(lm_dir, tmp_path / "skip", **over), tmp_path, "skip.yaml")
    assert filled == [filled_rows] * 2  # per step (2 prompts x 4 completions)
    if filled_rows == 0:
        monkeypatch.setattr(TextTask, "fill_old", real_fill)
        full = lambda self, *a, on_policy=True, **k: _inner(self, *a, on_policy=False, **k)  # noqa: E731
        _inner = Trainer._inner_updates
        monkeypatch.setattr(Trainer, "_inner_updates", full)
        run_inprocess(text_config(lm_dir, tmp_path / "full", **over), tmp_path, "full.yaml")
        a, b = ckpt_weights(tmp_path / "skip", 2), ckpt_weights(tmp_path / "full", 2)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_flow_two_steps_and_resume(sd3_dir, tmp_path, caplog):
    run = tmp_path / "run"
    name = f"{PLUGIN}:make_brightness"
    cfg = flow_config(sd3_dir, run)
    summary = run_inprocess(cfg, tmp_path)
    assert summary["steps"] == 2
    check_run_folder(run, 2, [name])
    w0 = initial_weights(cfg, tmp_path)
    check_one_adam_step(w0, ckpt_weights(run, 1))
    w1, w2 = ckpt_weights(run, 1), ckpt_weights(run, 2)
    assert any(not torch.equal(w1[k], w2[k]) for k in w1), "the second step did not change the weights"
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert list((run / "eval").rglob("*.png")), "no evaluation grid written"

    before = (run / "metrics.jsonl").read_text(encoding="utf-8")
    caplog.set_level("INFO", logger="flowrl.train")
    summary = run_inprocess(flow_config(sd3_dir, run, max_steps=3), tmp_path, "run3.yaml")
    assert summary["steps"] == 3
    assert any("resumed from" in r.getMessage() and r.getMessage().endswith("at step 2") for r in caplog.records)
    assert (run / "metrics.jsonl").read_text(encoding="utf-8").startswith(before)
    check_run_folder(run, 3, [name])


@pytest.mark.parametrize("kind", ["text", "flow"])
def test_nan_rewards_are_dropped_and_counted(kind, lm_dir, sd3_dir, tmp_path, monkeypatch):
    """Rows a reward function / scorer cannot score (None or NaN, rows 1 and 5 of each step's 8)
    are counted in ``invalid_samples`` and take no part in the update: advantage 0 and an
    all-false loss mask; the logged reward is the mean of the others."""
    from flowrl.train import tasks

    cls = tasks.TextTask if kind == "text" else tasks.FlowTask
    seen = []
    orig_grad, orig_score = cls.minibatch_gradient, cls.score

    def grad(self, ro, advantages, **kw):
        mask = ro.completion_mask if kind == "text" else ro.trained
        seen.append(("grad", mask.clone().bool(), advantages.clone()))
        return orig_grad(self, ro, advantages, **kw)

    def score(self, ro, records):
        r, names, info = orig_score(self, ro, records)
        seen.append(("score", r.clone(), None))
        return r, names, info

    monkeypatch.setattr(cls, "minibatch_gradient", grad)
    monkeypatch.setattr(cls, "score", score)
    run = tmp_path / "run"
    if kind == "text":
        name = f"{PLUGIN}:digit_fraction_some_none"
        cfg = text_config(lm_dir, run, rewards={name: 1.0}, eval={"at_start": False})
    else:
        name = f"{PLUGIN}:make_brightness_some_nan"
        cfg = flow_config(sd3_dir, run, rewards={name: 1.0}, eval={"at_start": False})
    run_inprocess(cfg, tmp_path)
    metrics = read_metrics(run)
    scores = [x[1] for x in seen if x[0] == "score"]
    grads = [x for x in seen if x[0] == "grad"]
    assert len(scores) == len(grads) == len(metrics) == 2
    for m, r, (_, mask, adv) in zip(metrics, scores, grads):
        bad = ~torch.isfinite(r[:, 0])
        assert bad.tolist() == [i % 4 == 1 for i in range(8)]
        assert m["invalid_samples"] == 2
        assert m["skipped_optimizer_steps"] == 0 and math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])
        assert not mask[bad].any(), "an invalid sample reached the loss"
        assert torch.all(adv[bad] == 0)
        assert mask[~bad].any(1).all()
        assert m[f"reward/{name}"] == pytest.approx(float(r[~bad, 0].mean()), abs=1e-6)
    for k, v in ckpt_weights(run, 2).items():
        assert torch.isfinite(v).all(), k


def test_nan_gradients_skip_steps_then_stop(lm_dir, tmp_path, monkeypatch, capsys):
    """Step 2: NaN gradients; step 3: fine; steps 4 and 5: NaN loss. With max_bad_steps=2 the run
    stops after step 5 (two bad in a row; steps 2 and 3 reset the count) with exit status 3 and
    one message line; skipped steps leave weights and Adam state untouched; the last checkpoint
    is complete and finite."""
    from flowrl.cli import main
    from flowrl.train import tasks

    calls = {"n": 0}
    orig = tasks.TextTask.minibatch_gradient

    def poisoned(self, ro, advantages, **kw):
        st = orig(self, ro, advantages, **kw)
        calls["n"] += 1
        if calls["n"] == 2:
            for p in self.module.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
        elif calls["n"] >= 4:
            st = dict(st, loss=float("nan"))
        return st

    monkeypatch.setattr(tasks.TextTask, "minibatch_gradient", poisoned)
    run = tmp_path / "run"
    cfg = text_config(lm_dir, run, max_steps=8, eval={"at_start": False}, eval_every=100,
                      train={"max_bad_steps": 2})
    rc = main(["train", str(write_config(cfg, tmp_path / "run.yaml"))])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("flowrl:")]
    assert rc == 3
    assert len(err) == 1 and err[0].startswith("flowrl: stopped:") and "2 steps in a row" in err[0], err
    assert calls["n"] == 5
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]  # step 5 is logged, then the run stops
    assert [m["skipped_optimizer_steps"] for m in metrics] == [0, 1, 0, 1, 1]
    assert not ckpt(run, 5).exists()
    w = {s: ckpt_weights(run, s) for s in (1, 2, 3, 4)}
    state = {s: torch.load(ckpt(run, s) / "state.pt", weights_only=True) for s in (1, 2, 3, 4)}

    def adam_steps(s):
        return {int(v["step"]) for v in state[s]["optimizer"]["state"].values()}

    for skipped, prev in ((2, 1), (4, 3)):
        assert all(torch.equal(w[skipped][k], w[prev][k]) for k in w[prev]), f"step {skipped} changed the weights"
        assert adam_steps(skipped) == adam_steps(prev)
    assert any(not torch.equal(w[3][k], w[2][k]) for k in w[2])
    assert adam_steps(1) == {1} and adam_steps(3) == {2}
    assert all(torch.isfinite(v).all() for v in w[4].values())
    meta = json.loads((ckpt(run, 4) / "meta.json").read_text(encoding="utf-8"))
    assert meta["bad_in_row"] == 1 and meta["optimizer_steps"] == 2


# ------------------------------------------------------------------------------------------ CLI errors

def _bad_cases(lm_dir: Path, sd3_dir: Path, tmp: Path):
    empty = tmp / "empty.txt"
    empty.write_text("\n# only a comment\n\n", encoding="utf-8")
    latin1 = tmp / "latin1.txt"
    latin1.write_bytes("a caf\u00e9 on a table\n".encode("latin-1"))
    lm = ["model.family=lm", f"model.path={lm_dir}", "data.train=arithmetic:train", "data.eval=arithmetic:test",
          "rewards={exact_match: 1.0}"]
    sd3 = ["model.family=sd3", f"model.path={sd3_dir}", "rewards={jpeg_compressibility: 1.0}"]
    return {
        "missing LM path": (lm + [f"model.path={tmp / 'no_such_model'}"], ["model.path", "no_such_model"]),
        "missing SD3 path": (sd3 + [f"model.path={tmp / 'no_such_model'}"], ["model.path", "no_such_model"]),
        "empty prompt file": (lm + [f"data.train={empty}"], ["empty.txt", "no prompts"]),
        "non-UTF-8 prompt file": (lm + [f"data.train={latin1}"], ["latin1.txt", "UTF-8"]),
        "unknown text reward": (lm + ["rewards={no_such_reward: 1.0}"], ["no_such_reward"]),
        "unknown image scorer": (sd3 + ["rewards={no_such_scorer: 1.0}"], ["no_such_scorer"]),
        "prompts vs minibatches": (lm + ["sample.prompts_per_step=3", "train.num_minibatches=2"],
                                   ["prompts_per_step", "num_minibatches"]),
        "group vs tree leaves": (sd3 + ["plan.kind=tree", "plan.tree.branch_factors=[2, 2]", "sample.group_size=6"],
                                 ["group_size", "leaves"]),
        "misspelt key": (lm + ["sample.grop_size=4"], ["sample.grop_size", "did you mean"]),
    }


# Runs each CLI case in its own process: the parent imports the CLI's modules once, then forks one
# child per case; the child points file descriptors 1 and 2 at files, runs what the ``flowrl``
# console script runs (``sys.exit(flowrl.cli.main(argv))``, an uncaught exception printing its
# traceback and exiting 1 as Python does), and the parent reads the exit status from waitpid.
FORK_DRIVER = textwrap.dedent(
    """
    import json, os, sys, traceback
    import flowrl.cli, flowrl.train.loop, flowrl.train.tasks  # noqa: F401  (shared by the children)

    cases, out = json.load(open(sys.argv[1])), sys.argv[2]
    pids = {}
    for name, argv in cases.items():
        pid = os.fork()
        if pid == 0:
            for fd, suffix in ((1, "out"), (2, "err")):
                f = os.open(os.path.join(out, name + "." + suffix), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(f, fd)
            try:
                code = flowrl.cli.main(argv)
            except SystemExit as e:
                code = e.code
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(int(code or 0))
        pids[name] = pid
    status = {name: os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for name, pid in pids.items()}
    json.dump(status, open(os.path.join(out, "status.json"), "w"))
    """
)


def _check_one_line(name: str, rc: int, err: str, needles: List[str]) -> List[str]:
    lines = [line for line in err.splitlines() if line.strip()]
    if rc != 2:
        return [f"{name}: exit status {rc}, stderr: {err[-800:]}"]
    if len(lines) != 1 or not lines[0].startswith("flowrl: error: ") or "Traceback" in err:
        return [f"{name}: expected one 'flowrl: error:' line, got {lines}"]
    if not all(n in lines[0] for n in needles):
        return [f"{name}: the message does not name {needles}: {lines[0]}"]
    return []


def test_bad_inputs_one_line_exit_2(lm_dir, sd3_dir, tmp_path, plugin_dir):
    """Each bad config or input: exit status 2 and exactly one line on stderr, no traceback.
    One case runs as a plain ``python -m flowrl.cli`` subprocess; all of them run in forked
    children of one process that imported the CLI once (see FORK_DRIVER)."""
    base = write_config({"output_dir": str(tmp_path / "out"), "max_steps": 1,
                         "train": {"progress": False, "tracker": "none"}, "eval": {"num_prompts": 2}},
                        tmp_path / "base.yaml")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(plugin_dir), os.environ.get("PYTHONPATH", "")]))
    cases = _bad_cases(lm_dir, sd3_dir, tmp_path)
    argvs = {}
    for name, (overrides, _) in cases.items():
        key = name.replace(" ", "_")
        argvs[key] = ["train", str(base), *overrides, f"output_dir={tmp_path / 'out' / key}"]
    (tmp_path / "cases.json").write_text(json.dumps(argvs), encoding="utf-8")
    (tmp_path / "driver.py").write_text(FORK_DRIVER, encoding="utf-8")
    res = tmp_path / "results"
    res.mkdir()
    plain_name = "non-UTF-8 prompt file"
    plain = subprocess.Popen([sys.executable, "-m", "flowrl.cli", *argvs[plain_name.replace(" ", "_")]],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    forked = subprocess.run([sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "cases.json"), str(res)],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert forked.returncode == 0, forked.stderr[-2000:]
    _, plain_err = plain.communicate(timeout=300)
    status = json.loads((res / "status.json").read_text(encoding="utf-8"))
    problems = _check_one_line(f"{plain_name} (plain subprocess)", plain.returncode, plain_err, cases[plain_name][1])
    for name, (_, needles) in cases.items():
        key = name.replace(" ", "_")
        problems += _check_one_line(name, status[key], (res / f"{key}.err").read_text(encoding="utf-8"), needles)
    assert not problems, "\n".join(problems)


def test_passed_multiple():
    from flowrl.train.loop import passed_multiple

    assert passed_multiple(14.0, 16.0, 15.0) and passed_multiple(14.0, 15.0, 15.0) and passed_multiple(29.0, 46.0, 15.0)
    assert not passed_multiple(15.0, 29.9, 15.0) and not passed_multiple(0.0, 1e9, None)


def test_evaluations_by_training_time_and_larger_ends(sd3_dir, tmp_path):
    """eval_every_s evaluates after every step that passes a multiple of it (here: every step); the first and
    last evaluations use eval.ends_num_prompts prompts, those between the first eval.num_prompts of them, and
    before_after/ compares the two ends (same prompts)."""
    import csv

    run = tmp_path / "run"
    run_inprocess(flow_config(sd3_dir, run, eval_every=100, eval_every_s=1e-6, checkpoint_every=100,
                              eval={"num_prompts": 1, "ends_num_prompts": 3}), tmp_path)

    def prompts(path):
        with open(path, newline="", encoding="utf-8") as f:
            return [r["prompt"] for r in csv.DictReader(f)]

    first, mid, last = (prompts(run / "eval" / f"step-{s:08d}" / "scores.csv") for s in (0, 1, 2))
    assert len(first) == 3 and first == last and mid == first[:1]
    assert [json.loads(x)["step"] for x in (run / "eval.jsonl").read_text().splitlines()] == [0, 1, 2]
    assert prompts(run / "before_after" / "scores.csv") == first
