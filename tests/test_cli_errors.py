"""Every bad path given to the ``flowrl`` CLI is one ``error:`` line on stderr and exit status 2,
never a traceback, and (where the input can be judged without the model) before any model loads.

Covered: damaged or half-written checkpoints and diffusers LoRA folders (``sample``, ``grid``);
checkpoints of another model (a tiny SD3 LoRA on a tiny Flux or on an SD3 of other sizes, as flowrl
checkpoints, diffusers LoRA folders and full weights); output folders that are files or cannot be
written (``sample``, ``grid``, ``make-tiny``, ``score --output``); non-UTF-8 or missing prompt
files; bad ``--images`` folders; unknown scorers; bad run folders for ``report``; missing arguments.
Everything runs in-process through :func:`flowrl.cli.main` on tiny models shared by the module.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from flowrl.cli import main
from flowrl.inputs import UsageError, writable_dir, writable_file

UNWRITABLE = Path("/proc/flowrl-test")  # cannot be created, even by root
H = W = 32


@pytest.fixture(scope="module", autouse=True)
def _quiet_progress_bars():
    """diffusers / transformers draw loading bars on stderr; the tests count stderr lines."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    was = [(log, log.is_progress_bar_enabled()) for log in (dlog, tlog)]
    for log, _ in was:
        log.disable_progress_bar()
    yield
    for log, on in was:
        if on:
            log.enable_progress_bar()


# --------------------------------------------------------------------------------------------------
# fixtures: tiny models, configs, checkpoints
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli_errors")


def _config(work: Path, name: str, family: str, model: Path) -> Path:
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"family": family, "path": str(model)},
        "sample": {"height": H, "width": W, "eval_num_steps": 2, "guidance_scale": 1.0,
                   "prompts_per_step": 1, "group_size": 2},
        "rewards": {"jpeg_compressibility": 1.0},
    }), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def models(work):
    """Config files of a tiny SD3, a tiny Flux and an SD3 of other sizes (3 layers, head_dim 8)."""
    from flowrl.demo.tiny_image import build_tiny_sd3_pipeline, save_tiny

    sd3 = save_tiny("sd3", work / "sd3", seed=0)
    flux = save_tiny("flux", work / "flux", seed=0)
    small = work / "sd3_small"
    build_tiny_sd3_pipeline(seed=1, num_layers=3, head_dim=8).save_pretrained(small, safe_serialization=True)
    return {"sd3": _config(work, "sd3", "sd3", sd3), "flux": _config(work, "flux", "flux", flux),
            "small": _config(work, "small", "sd3", small), "sd3_dir": sd3, "flux_dir": flux, "small_dir": small}


@pytest.fixture(scope="module")
def ckpts(work, models):
    """A LoRA of the tiny SD3 as a flowrl checkpoint and as a diffusers LoRA folder, and the SD3's full
    weights as a flowrl checkpoint."""
    from diffusers import StableDiffusion3Pipeline

    from flowrl.config import load_run_config
    from flowrl.train.checkpoint import save_checkpoint
    from flowrl.train.lora import add_lora_to_transformer, lora_config, save_diffusers_lora, trainable_state_dict
    from flowrl.train.model import build_flow_policy, lora_meta

    policy = build_flow_policy(load_run_config(models["sd3"], []).model)
    full = save_checkpoint(work / "full_run", 2, weights=dict(policy.transformer.named_parameters()),
                           meta={"lora": None}, keep_last=None)
    add_lora_to_transformer(policy.transformer, lora_config("sd3", rank=2, alpha=2))
    lora = save_checkpoint(work / "lora_run", 1, weights=trainable_state_dict(policy.transformer),
                           meta={"lora": lora_meta(policy.transformer)}, keep_last=None)
    diffusers_lora = save_diffusers_lora(StableDiffusion3Pipeline, policy.transformer, work / "diffusers_lora")
    return {"lora": lora, "full": full, "diffusers": diffusers_lora}


@pytest.fixture(scope="module")
def prompts(work) -> Path:
    p = work / "prompts.txt"
    p.write_text("a red circle\n", encoding="utf-8")
    return p


def _damaged(src: Path, dst_root: Path, edit) -> Path:
    """A copy of checkpoint folder ``src`` (same folder name) changed by ``edit(folder)``."""
    dst = dst_root / src.name
    shutil.copytree(src, dst)
    edit(dst)
    return dst


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def one_error_line(capsys, *argv, names=()) -> str:
    """Run ``flowrl ARGV`` in-process: exit status 2, exactly one ``error:`` line on stderr naming
    every item of ``names``, no traceback; returns that line."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, f"exit status {rc}, stderr:\n{err}"
    assert "Traceback" not in err, err
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("flowrl") and "error: " in lines[0], lines[0]
    for n in names:
        assert str(n) in lines[0], f"{n} not named in: {lines[0]}"
    return lines[0]


def _no_model_load(monkeypatch):
    """Fail the test if a flow model gets built."""
    import flowrl.train.model as model

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(model, "build_flow_policy", refuse)


# --------------------------------------------------------------------------------------------------
# 1. damaged and half-written checkpoints: one line, before any model loads
# --------------------------------------------------------------------------------------------------


def _garbage_weights(d: Path) -> None:
    (d / "weights.safetensors").write_bytes(b"not a safetensors file" * 10)


def _legacy_marker_garbage_weights(d: Path) -> None:
    """Garbage weights under a marker without a manifest (as written before manifests existed)."""
    _garbage_weights(d)
    (d / "COMPLETE").write_text(json.dumps({"step": 1}), encoding="utf-8")


@pytest.mark.parametrize("command", ["sample", "grid"])
@pytest.mark.parametrize("damage", ["no COMPLETE", "garbage weights", "garbage weights, no manifest", "truncated"])
def test_damaged_checkpoint_one_line_before_any_model(command, damage, models, ckpts, prompts, tmp_path, capsys,
                                                      monkeypatch):
    edits = {
        "no COMPLETE": lambda d: (d / "COMPLETE").unlink(),
        "garbage weights": _garbage_weights,
        "garbage weights, no manifest": _legacy_marker_garbage_weights,
        "truncated": lambda d: (d / "weights.safetensors").write_bytes((d / "weights.safetensors").read_bytes()[:-50]),
    }
    bad = _damaged(ckpts["lora"], tmp_path, edits[damage])
    _no_model_load(monkeypatch)
    out = tmp_path / "out"
    one_error_line(capsys, command, models["sd3"], "--prompts", prompts, "--out", out, "--checkpoint", bad, names=[bad])
    assert not out.exists()


@pytest.mark.parametrize("command", ["sample", "grid"])
def test_garbage_diffusers_lora_one_line(command, models, ckpts, prompts, tmp_path, capsys, monkeypatch):
    bad = tmp_path / "lora"
    shutil.copytree(ckpts["diffusers"], bad)
    (bad / "pytorch_lora_weights.safetensors").write_bytes(b"\x00" * 100)
    _no_model_load(monkeypatch)
    line = one_error_line(capsys, command, models["sd3"], "--prompts", prompts, "--out", tmp_path / "out",
                          "--checkpoint", bad, names=[bad])
    assert "pytorch_lora_weights.safetensors" in line


def test_checkpoint_that_is_not_one(models, prompts, tmp_path, capsys, monkeypatch):
    _no_model_load(monkeypatch)
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("x")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    base = ["sample", models["sd3"], "--prompts", prompts, "--out", tmp_path / "out", "--checkpoint"]
    assert "neither" in one_error_line(capsys, *base, tmp_path / "stuff", names=[tmp_path / "stuff"])
    one_error_line(capsys, *base, a_file, names=[a_file])
    one_error_line(capsys, *base, tmp_path / "missing", names=[tmp_path / "missing"])


# --------------------------------------------------------------------------------------------------
# 2. checkpoints of another model
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ckpt, onto, detail", [
    ("lora", "flux", "weights missing"),
    ("lora", "small", "weights missing"),
    ("diffusers", "flux", "layers the model does not have"),
    ("diffusers", "small", "shape mismatch"),
    ("full", "small", "weights"),
])
def test_checkpoint_of_another_model_sample(ckpt, onto, detail, models, ckpts, prompts, tmp_path, capsys):
    out = tmp_path / "out"
    line = one_error_line(capsys, "sample", models[onto], "--prompts", prompts, "--out", out,
                          "--checkpoint", ckpts[ckpt], names=[ckpts[ckpt], models[f"{onto}_dir"]])
    assert "does not fit" in line and detail in line, line
    assert not list(out.glob("*.png"))


@pytest.mark.parametrize("ckpt", ["lora", "diffusers"])
def test_checkpoint_of_another_model_grid_fails_before_sampling(ckpt, models, ckpts, prompts, tmp_path, capsys,
                                                                monkeypatch):
    import flowrl.commands as commands

    def refuse(*a, **k):
        raise AssertionError("the base model was sampled before the checkpoint was checked")

    monkeypatch.setattr(commands, "evaluate_policy", refuse)
    line = one_error_line(capsys, "grid", models["flux"], "--checkpoint", ckpts[ckpt], "--prompts", prompts,
                          "--out", tmp_path / "out", names=[ckpts[ckpt], models["flux_dir"]])
    assert "does not fit" in line


def test_load_trainable_state_dict_mismatch_is_a_usage_error():
    """What a resumed training run sees when its checkpoint is of another model."""
    from flowrl.train.lora import WeightsMismatchError, load_trainable_state_dict

    module = torch.nn.Linear(3, 2)
    w = module.weight.detach().clone()
    with pytest.raises(WeightsMismatchError, match=r"does not fit .*1 of 2 weights missing \(e.g. bias\)") as e:
        load_trainable_state_dict(module, {"weight": torch.zeros(2, 3)}, source="checkpoint C", target="model M")
    assert isinstance(e.value, UsageError) and "\n" not in str(e.value)
    assert "checkpoint C does not fit model M" in str(e.value)
    with pytest.raises(WeightsMismatchError, match=r"shape mismatch at weight: saved \(2, 4\), model \(2, 3\)"):
        load_trainable_state_dict(module, {"weight": torch.zeros(2, 4), "bias": torch.zeros(2)})
    with pytest.raises(WeightsMismatchError, match=r"1 of its 3 weights not in the model \(e.g. extra\)"):
        load_trainable_state_dict(module, {"weight": torch.zeros(2, 3), "bias": torch.zeros(2), "extra": torch.zeros(1)})
    assert torch.equal(module.weight, w)  # nothing copied
    load_trainable_state_dict(module, {"weight": torch.ones(2, 3), "bias": torch.ones(2)})
    assert torch.equal(module.weight, torch.ones(2, 3))


def test_a_fitting_checkpoint_still_loads(models, ckpts, prompts, tmp_path, capsys):
    """The good path is unchanged: the SD3 LoRA samples on the SD3 it was made for."""
    for name in ("lora", "diffusers"):
        out = tmp_path / name
        assert main(["sample", str(models["sd3"]), "--prompts", str(prompts), "--out", str(out),
                     "--checkpoint", str(ckpts[name])]) == 0
        assert len(list(out.glob("*.png"))) == 1 and (out / "scores.csv").is_file()


# --------------------------------------------------------------------------------------------------
# 3. output folders that are files or cannot be written
# --------------------------------------------------------------------------------------------------


def _a_file(tmp_path: Path) -> Path:
    f = tmp_path / "a_file"
    f.write_text("x")
    return f


@pytest.mark.parametrize("where", ["file", "unwritable", "under a file"])
def test_sample_and_grid_out_not_writable(where, models, ckpts, prompts, tmp_path, capsys, monkeypatch):
    _no_model_load(monkeypatch)
    out = {"file": _a_file(tmp_path), "unwritable": UNWRITABLE, "under a file": _a_file(tmp_path) / "sub"}[where]
    one_error_line(capsys, "sample", models["sd3"], "--prompts", prompts, "--out", out, names=[out])
    one_error_line(capsys, "sample", models["sd3"], "--prompts", prompts, "--out", out, "--checkpoint", ckpts["lora"],
                   names=[out])
    one_error_line(capsys, "grid", models["sd3"], "--checkpoint", ckpts["lora"], "--prompts", prompts, "--out", out,
                   names=[out])


@pytest.mark.parametrize("kind", ["sd3", "flux", "lm"])
def test_make_tiny_bad_folders(kind, tmp_path, capsys):
    one_error_line(capsys, "make-tiny", kind, UNWRITABLE, names=[UNWRITABLE])
    f = _a_file(tmp_path)
    one_error_line(capsys, "make-tiny", kind, f, names=[f])
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert "not empty" in one_error_line(capsys, "make-tiny", kind, full, names=[full])
    assert [p.name for p in full.iterdir()] == ["keep.txt"]


def test_writable_dir_and_file(tmp_path):
    d = writable_dir(tmp_path / "a" / "b")
    assert d.is_dir() and list(d.iterdir()) == []  # created, and the write test left nothing
    assert writable_dir(d) == d
    f = _a_file(tmp_path)
    for bad, why in ((f, "existing file"), (f / "x", "cannot be created"), (UNWRITABLE, "cannot be created")):
        with pytest.raises(UsageError, match=why) as e:
            writable_dir(bad, "--out")
        assert str(e.value).startswith(f"--out {bad}") and "\n" not in str(e.value)
    assert writable_file(tmp_path / "new" / "s.csv") == tmp_path / "new" / "s.csv"
    assert (tmp_path / "new").is_dir()
    with pytest.raises(UsageError, match="is a folder"):
        writable_file(tmp_path)
    with pytest.raises(UsageError, match=str(UNWRITABLE)):
        writable_file(UNWRITABLE / "s.csv")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes whatever the permission bits")
def test_writable_dir_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(UsageError, match="is not writable"):
            writable_dir(ro, "--out")
        with pytest.raises(UsageError, match="cannot be created"):
            writable_dir(ro / "sub", "--out")
    finally:
        ro.chmod(0o700)


# --------------------------------------------------------------------------------------------------
# 4. flowrl score
# --------------------------------------------------------------------------------------------------


@pytest.fixture()
def images(tmp_path) -> Path:
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(2):
        Image.new("RGB", (16, 16), (40 * i, 80, 120)).save(d / f"{i:03d}.png")
    return d


def test_score_bad_inputs(images, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\n", encoding="utf-8")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("un caf\u00e9\nune table\n".encode("latin-1"))
    base = ["score", "--scorer", "jpeg_compressibility"]
    csv_out = tmp_path / "o.csv"
    line = one_error_line(capsys, *base, "--images", images, "--prompts", latin1, "--output", csv_out, names=[latin1])
    assert "UTF-8" in line
    missing = tmp_path / "missing.txt"
    one_error_line(capsys, *base, "--images", images, "--prompts", missing, "--output", csv_out, names=[missing])
    one_error_line(capsys, *base, "--images", prompts, "--prompts", prompts, "--output", csv_out, names=[prompts])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no image files" in one_error_line(capsys, *base, "--images", empty, "--prompts", prompts, names=[empty])
    one_error_line(capsys, *base, "--images", images, "--prompts", prompts, "--output", UNWRITABLE / "s.csv",
                   names=[UNWRITABLE])
    one_error_line(capsys, *base, "--images", images, "--prompts", prompts, "--output", tmp_path, names=[tmp_path])
    f = _a_file(tmp_path)
    one_error_line(capsys, *base, "--images", images, "--prompts", prompts, "--output", f / "s.csv", names=[f])
    assert "no_such_scorer" in one_error_line(capsys, "score", "--scorer", "no_such_scorer", "--images", images,
                                              "--prompts", prompts, "--output", csv_out)
    assert "--images" in one_error_line(capsys, *base, "--prompts", prompts)
    assert not csv_out.exists()


def test_score_output_into_a_missing_folder_creates_it(images, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\n", encoding="utf-8")
    out = tmp_path / "new" / "deeper" / "scores.csv"
    assert main(["score", "--scorer", "jpeg_compressibility", "--images", str(images), "--prompts", str(prompts),
                 "--output", str(out)]) == 0
    assert out.is_file() and len(out.read_text(encoding="utf-8").splitlines()) == 3


# --------------------------------------------------------------------------------------------------
# 5. the other subcommands
# --------------------------------------------------------------------------------------------------


def test_report_bad_run_folders(tmp_path, capsys):
    one_error_line(capsys, "report", tmp_path / "missing", names=[tmp_path / "missing"])
    empty = tmp_path / "empty"
    empty.mkdir()
    one_error_line(capsys, "report", empty, names=[empty])
    f = _a_file(tmp_path)
    one_error_line(capsys, "report", f, names=[f])
    no_metrics = tmp_path / "no_metrics"
    no_metrics.mkdir()
    (no_metrics / "metrics.jsonl").write_text("", encoding="utf-8")
    assert "holds no metrics" in one_error_line(capsys, "report", no_metrics, names=[no_metrics])
    bad_summary = tmp_path / "bad_summary"
    bad_summary.mkdir()
    (bad_summary / "summary.json").write_bytes(b'{"steps": "\xff"}')
    one_error_line(capsys, "report", bad_summary, names=[bad_summary / "summary.json"])
    assert "--bogus" in one_error_line(capsys, "report", empty, "--bogus")
    assert not (empty / "plots").exists()


def test_missing_arguments_and_inputs(models, ckpts, prompts, tmp_path, capsys, monkeypatch):
    _no_model_load(monkeypatch)
    line = one_error_line(capsys, "grid", models["sd3"])
    assert "--checkpoint" in line and "flowrl grid --help" in line
    assert "--prompts" in one_error_line(capsys, "sample", models["sd3"], "--out", tmp_path / "o")
    missing = tmp_path / "missing.txt"
    one_error_line(capsys, "sample", models["sd3"], "--prompts", missing, "--out", tmp_path / "o", names=[missing])
    one_error_line(capsys, "grid", models["sd3"], "--checkpoint", ckpts["lora"], "--prompts", missing,
                   "--out", tmp_path / "o", names=[missing])
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("un caf\u00e9\n".encode("latin-1"))
    one_error_line(capsys, "sample", models["sd3"], "--prompts", latin1, "--out", tmp_path / "o", names=[latin1])
    one_error_line(capsys, "sample", models["sd3"], "--prompts", prompts, "--out", tmp_path / "o", "--seeds", "x")
    one_error_line(capsys, "make-tiny", "sdxl", tmp_path / "m")
    one_error_line(capsys)  # no subcommand
    assert not (tmp_path / "o").exists() and not (tmp_path / "m").exists()
