"""Faults a long run meets, on tiny models in-process: non-finite rewards, an exploding update,
a changed config on resume, a damaged newest checkpoint, two runs on one folder, ``resume=none``
on an existing run, SIGTERM mid-step, a full disk while checkpointing, rewards that can never be
read, ``max_steps=0``, an output folder that is a file. The process-level kill-and-resume cases
are in ``tests/test_resume.py``.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import textwrap
from pathlib import Path

import pytest
import torch

from test_train_loop import (  # noqa: F401  (fixtures used by name)
    _isolated, ckpt, lm_dir, plugin_dir, read_metrics, run_inprocess, sd3_dir, text_config, flow_config, write_config,
)

FAULTS = "flowrl_faulttest_plugin"
FAULTS_SRC = textwrap.dedent(
    '''
    """Rewards for tests/test_faults.py."""
    import os
    import signal


    def digits(prompts, completions, **_):
        return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


    def digits_sigterm_at_call_2(prompts, completions, **_):
        """digits; its second call sends SIGTERM to this process (a scheduler's notice, mid-step)."""
        digits_sigterm_at_call_2.calls = getattr(digits_sigterm_at_call_2, "calls", 0) + 1
        if digits_sigterm_at_call_2.calls == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return digits(prompts, completions)


    def never(prompts, completions, **_):
        """A reward that can read nothing: every sample invalid."""
        return [None for _ in completions]


    def make_brightness_some_inf(device=None, dtype=None, checkpoint=None, **_):
        """Image scorer: brightness, with +inf, -inf and NaN at rows 1, 2, 3 of each call."""
        def score(images, prompts, **meta):
            out = images.float().mean(dim=(1, 2, 3)).cpu()
            out[1], out[2], out[3] = float("inf"), float("-inf"), float("nan")
            return out
        return score
    '''
)


@pytest.fixture(autouse=True)
def _faults_plugin(tmp_path_factory, monkeypatch):
    d = tmp_path_factory.getbasetemp() / "faults_plugin"
    d.mkdir(exist_ok=True)
    (d / f"{FAULTS}.py").write_text(FAULTS_SRC, encoding="utf-8")
    monkeypatch.syspath_prepend(str(d))


def _text(lm_dir, out, **over):
    base = {"rewards": {f"{FAULTS}:digits": 1.0}, "max_steps": 2, "eval": {"num_prompts": 2}, "eval_every": 100}
    for k, v in over.items():
        base[k] = v
    return text_config(lm_dir, out, **base)


def _weights(path: Path):
    from flowrl.train.checkpoint import load_checkpoint

    return load_checkpoint(path)["weights"]


def test_infinite_and_nan_image_rewards_mark_samples_invalid(sd3_dir, tmp_path):
    """+inf, -inf and NaN from an image scorer: those samples are invalid (counted), the run trains
    on the rest with finite losses instead of stopping with 'advantages: must be finite'."""
    out = tmp_path / "run"
    cfg = flow_config(sd3_dir, out, rewards={f"{FAULTS}:make_brightness_some_inf": 1.0}, eval={"at_start": False})
    summary = run_inprocess(cfg, tmp_path)
    assert summary["steps"] == 2
    for m in read_metrics(out):
        assert m["invalid_samples"] >= 3, m
        assert m["skipped_optimizer_steps"] == 0 and torch.isfinite(torch.tensor(m["loss"]))
    for w in _weights(ckpt(out, 2)).values():
        assert torch.isfinite(w).all()


def test_exploding_update_is_never_checkpointed(lm_dir, tmp_path):
    """Two good steps, then the run is resumed with learning_rate 1.0 (a change resume applies):
    the first update explodes the weights; the run stops naming the step-2 checkpoint, writes no
    checkpoint of those weights, and keep_last=1 has not pruned the good one."""
    from flowrl.config import load_run_config
    from flowrl.train.loop import TrainingStopped, train

    out = tmp_path / "run"
    cfg = _text(lm_dir, out, train={"keep_last": 1, "learning_rate": 1e-4})
    run_inprocess(cfg, tmp_path)
    good = _weights(ckpt(out, 2))
    cfg["max_steps"], cfg["train"]["learning_rate"] = 4, 1.0
    with pytest.raises(TrainingStopped) as e:
        train(load_run_config(write_config(cfg, tmp_path / "hot.yaml")))
    msg = str(e.value)
    assert "step 3" in msg and "exploded" in msg and str(ckpt(out, 2)) in msg, msg
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]
    after = _weights(ckpt(out, 2))
    assert all(torch.equal(good[k], after[k]) for k in good)


def test_resume_refuses_changed_keys_and_applies_the_allowed(lm_dir, tmp_path, caplog):
    from flowrl.config import load_run_config
    from flowrl.inputs import UsageError
    from flowrl.train.loop import Trainer

    out = tmp_path / "run"
    cfg = _text(lm_dir, out)
    run_inprocess(cfg, tmp_path)
    for key, value in [("seed", 5), ("sample.group_size", 2), ("lora.rank", 3), ("model.path", "another_model"),
                       ("rewards", {f"{FAULTS}:never": 1.0})]:
        over = json.loads(json.dumps(cfg))
        node = over
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        old = node.get(leaf)
        node[leaf] = value
        with pytest.raises(UsageError) as e:
            Trainer(load_run_config(write_config(over, tmp_path / "changed.yaml")))
        msg = str(e.value)
        assert msg.startswith(f"resume: {key} is ") and "\n" not in msg and "now" in msg, msg
        if key != "rewards":
            assert repr(value) in msg and repr(old) in msg, msg
    # allowed: a new learning rate and more steps, applied to the restored optimizer and scheduler
    cfg["max_steps"], cfg["train"]["learning_rate"] = 3, 7e-5
    with caplog.at_level("INFO"):
        run_inprocess(cfg, tmp_path)
    assert read_metrics(out)[-1]["lr"] == pytest.approx(7e-5, rel=0, abs=0)
    assert "train.learning_rate changed from 0.0003 to 7e-05 (applied)" in caplog.text


def test_damaged_newest_checkpoint_resumes_from_the_previous(lm_dir, tmp_path, caplog):
    from flowrl.config import load_run_config
    from flowrl.inputs import UsageError
    from flowrl.train.loop import Trainer

    out = tmp_path / "run"
    cfg = _text(lm_dir, out, max_steps=3)
    run_inprocess(cfg, tmp_path)
    w = ckpt(out, 3) / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0x10  # one flipped bit in the tensor data
    w.write_bytes(bytes(data))
    with pytest.raises(UsageError, match="does not match its manifest checksum"):
        Trainer(load_run_config(write_config({**cfg, "resume": str(ckpt(out, 3))}, tmp_path / "explicit.yaml")))
    cfg["max_steps"] = 4
    with caplog.at_level("INFO"):
        summary = run_inprocess(cfg, tmp_path)
    assert summary["steps"] == 4
    assert "falling back to the previous one" in caplog.text and "resumed from" in caplog.text
    assert any("at step 2" in r.getMessage() for r in caplog.records if "resumed from" in r.getMessage())
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4]
    assert any(p.name.startswith(".stale-step-00000003") for p in (out / "checkpoints").iterdir())


def test_one_run_per_folder(lm_dir, tmp_path):
    """A second run on a folder that a live run holds is refused (lock), and resume=none on a
    folder with checkpoints refuses instead of mixing two runs; both before loading any model."""
    from flowrl.config import load_run_config
    from flowrl.inputs import UsageError
    from flowrl.train.guard import RunLock
    from flowrl.train.loop import Trainer

    out = tmp_path / "run"
    out.mkdir()
    cfg = _text(lm_dir, out)
    held = RunLock(out)
    try:
        with pytest.raises(UsageError, match=f"in use by another flowrl run \\(pid {os.getpid()}\\)"):
            Trainer(load_run_config(write_config(cfg, tmp_path / "a.yaml")))
    finally:
        held.release()
    run_inprocess(cfg, tmp_path)
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(UsageError, match="already holds a run .*step-00000002.*resume=auto"):
        Trainer(load_run_config(write_config({**cfg, "resume": "none"}, tmp_path / "b.yaml")))
    assert (out / "metrics.jsonl").read_text() == before
    RunLock(out).release()  # the finished and the refused runs left the folder unlocked


def test_sigterm_mid_step_checkpoints_then_resume_is_exact(lm_dir, tmp_path, capsys):
    """SIGTERM during step 2's scoring: the step finishes, a checkpoint of step 2 is written, the
    command exits 0 with a line naming it; continuing gives the uninterrupted run's weights."""
    from flowrl.train.loop import train_command

    ref = tmp_path / "ref"
    quiet = {"num_prompts": 2, "at_start": False}  # the reward's first call is step 1's scoring
    run_inprocess(_text(lm_dir, ref, max_steps=3, checkpoint_every=10, eval=quiet), tmp_path, "ref.yaml")
    out = tmp_path / "run"
    cfg = _text(lm_dir, out, max_steps=3, checkpoint_every=10, eval=quiet,
                rewards={f"{FAULTS}:digits_sigterm_at_call_2": 1.0})
    rc = train_command(str(write_config(cfg, tmp_path / "term.yaml")))
    err = capsys.readouterr().err
    assert rc == 0
    assert f"stopped by SIGTERM after step 2; checkpoint: {ckpt(out, 2)}" in err, err
    assert [m["step"] for m in read_metrics(out)] == [1, 2]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone with the run
    # continue (the same reward: a changed one is refused on resume; its call counter is past 2 now)
    summary = run_inprocess(cfg, tmp_path, "cont.yaml")
    assert summary["steps"] == 3
    a, b = _weights(ckpt(out, 3)), _weights(ckpt(ref, 3))
    assert all(torch.equal(a[k], b[k]) for k in b)  # same process, same machine: bit-exact


def test_full_disk_while_checkpointing_stops_with_one_line(lm_dir, tmp_path, monkeypatch):
    import flowrl.train.checkpoint as ck
    from flowrl.train.loop import TrainingStopped

    out = tmp_path / "run"
    cfg = _text(lm_dir, out, max_steps=3)
    real = ck.save_file
    calls = {"n": 0}

    def save_file(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(ck, "save_file", save_file)
    with pytest.raises(TrainingStopped) as e:
        run_inprocess(cfg, tmp_path)
    msg = str(e.value)
    assert "No space left on device" in msg and str(ckpt(out, 1)) in msg and "\n" not in msg, msg
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001"]  # no partial folder


def test_rewards_that_are_never_valid_stop_the_run(lm_dir, tmp_path, capsys):
    from flowrl.train.loop import train_command

    out = tmp_path / "run"
    cfg = _text(lm_dir, out, max_steps=10, rewards={f"{FAULTS}:never": 1.0}, train={"max_bad_steps": 2})
    rc = train_command(str(write_config(cfg, tmp_path / "never.yaml")))
    err = capsys.readouterr().err
    assert rc == 3
    assert "2 steps in a row had no valid sample" in err and "No checkpoint was written yet" not in err, err
    assert [m["step"] for m in read_metrics(out)] == [1, 2]


def test_max_steps_zero_and_output_dir_that_is_a_file(lm_dir, tmp_path, capsys):
    from flowrl.train.loop import train_command

    out = tmp_path / "run"
    rc = train_command(str(write_config(_text(lm_dir, out, max_steps=0), tmp_path / "zero.yaml")))
    assert rc == 0, capsys.readouterr().err
    assert "done: 0 steps" in capsys.readouterr().out
    f = tmp_path / "a_file"
    f.write_text("x")
    rc = train_command(str(write_config(_text(lm_dir, f), tmp_path / "file.yaml")))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"flowrl: error: output_dir {f} is an existing file, not a folder"], err


def test_silent_no_op_is_warned_once_at_start(lm_dir, tmp_path, caplog):
    """The loop logs preflight_warnings (flowrl.train.preflight) before any step: here a group of
    one with group-relative advantages."""
    out = tmp_path / "run"
    cfg = _text(lm_dir, out, max_steps=1, sample={"group_size": 1, "prompts_per_step": 2})
    with caplog.at_level("WARNING"):
        run_inprocess(cfg, tmp_path)
    hits = [r.getMessage() for r in caplog.records if "sample.group_size: 1" in r.getMessage()]
    assert len(hits) == 1 and "nothing will be learned" in hits[0], hits


def test_lock_held_by_another_process_and_dropped_when_it_is_killed(lm_dir, tmp_path):
    """Another process holding the run folder: a run on it is refused naming that pid; once the
    holder is SIGKILLed the folder is free again (no stale lock to clean up by hand)."""
    import subprocess
    import sys

    from flowrl.config import load_run_config
    from flowrl.inputs import UsageError
    from flowrl.train.guard import RunLock
    from flowrl.train.loop import Trainer

    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from flowrl.train.guard import RunLock; "
                               f"lock = RunLock({str(out)!r}); print('locked', flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UsageError, match=f"in use by another flowrl run \\(pid {holder.pid}\\)"):
            Trainer(load_run_config(write_config(_text(lm_dir, out), tmp_path / "a.yaml")))
    finally:
        holder.kill()
        holder.wait()
    RunLock(out).release()  # free once its holder is gone, however it ended


def test_before_after_compares_with_the_first_evaluation_across_a_resume(sd3_dir, tmp_path):
    """before_after/ shows the run's first evaluation beside the latest; a resumed process keeps that
    "before" (kept in before_after/first.safetensors) instead of its own first evaluation: the grid of
    a stopped-and-resumed run equals the uninterrupted run's, byte for byte (same process)."""
    ref, out = tmp_path / "ref", tmp_path / "run"
    run_inprocess(flow_config(sd3_dir, ref, max_steps=3, eval_every=1), tmp_path, "ref.yaml")
    run_inprocess(flow_config(sd3_dir, out, max_steps=1, eval_every=1), tmp_path, "a.yaml")
    run_inprocess(flow_config(sd3_dir, out, max_steps=3, eval_every=1), tmp_path, "b.yaml")
    page = (out / "before_after" / "index.html").read_text(encoding="utf-8")
    assert "step 0" in page and "step 3" in page
    for name in ("grid.png", "scores.csv"):
        assert (out / "before_after" / name).read_bytes() == (ref / "before_after" / name).read_bytes(), name
