"""configs/accelerate/: every config parses with accelerate's own ``launch`` parser into the environment its
processes get, and the loop refuses in one line what it cannot run on this machine.

* FSDP (every fsdp_*.yaml is FSDP2): accelerate 1.x runs FSDP on accelerators only; launched on CPUs the same
  processes become plain data parallel (MULTI_CPU), so a 2-process CPU equality run would test DDP, not FSDP
  (tests/test_distributed.py covers DDP). The loop refuses an FSDP request it would not get; the FSDP2 run itself
  is checked on a GPU by bench/gpu_check.sh (configs/accelerate/fsdp2_sd3_1gpu.yaml against a plain run).
* DeepSpeed (deepspeed_zero2/3.yaml): the loop refuses it (flowrl.train.processes.DEEPSPEED_REFUSAL), whether or
  not deepspeed is installed, before any model is built.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))


def launch_env(path: Path) -> dict:
    """The environment ``accelerate launch --config_file path`` gives its processes (accelerate's own code)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


def test_the_configs_are_there():
    names = {p.name for p in CONFIGS}
    assert {"deepspeed_zero2.yaml", "deepspeed_zero3.yaml", "fsdp2_sd3_1gpu.yaml", "ddp_8gpu.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_parses_into_the_launch_environment(path):
    raw = yaml.safe_load(path.read_text())
    env = launch_env(path)
    kind = raw["distributed_type"]
    if kind == "FSDP":
        assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"  # the loop runs FSDP2 only
        assert env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == raw["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"]
    elif kind == "DEEPSPEED":
        assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
        assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == str(raw["deepspeed_config"]["zero_stage"])
    else:
        assert kind == "MULTI_GPU" and "ACCELERATE_USE_FSDP" not in env


def _train(tmp_path, env_extra):
    """``flowrl train`` (1 CPU process) under the environment of an accelerate config; the model path does not
    exist: a refusal must come before the model is loaded."""
    cfg = {"max_steps": 1, "output_dir": str(tmp_path / "run"), "rewards": {"jpeg_compressibility": 1.0},
           "model": {"family": "sd3", "path": str(tmp_path / "no_model")}, "train": {"tracker": "none"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", **env_extra)
    return subprocess.run([sys.executable, "-m", "flowrl.cli", "train", str(tmp_path / "c.yaml")],
                          env=env, capture_output=True, text=True, timeout=300)


def test_loop_refuses_fsdp_where_accelerate_would_run_plain_data_parallel(tmp_path):
    env = {k: v for k, v in launch_env(ROOT / "configs/accelerate/fsdp2_sd3_1gpu.yaml").items()
           if k.startswith(("ACCELERATE_USE_FSDP", "FSDP_"))}
    out = _train(tmp_path, env)
    assert out.returncode == 2, out.stderr[-2000:]
    err = [ln for ln in out.stderr.splitlines() if ln.startswith("flowrl: error:")]
    assert len(err) == 1 and "asks for FSDP" in err[0] and "plain data parallel" in err[0], out.stderr[-2000:]


@pytest.mark.parametrize("name", ["deepspeed_zero2", "deepspeed_zero3"])
def test_loop_refuses_deepspeed_in_one_line(name, tmp_path):
    env = {k: v for k, v in launch_env(ROOT / f"configs/accelerate/{name}.yaml").items() if k.startswith("ACCELERATE_")}
    out = _train(tmp_path, env)
    assert out.returncode == 2, out.stderr[-2000:]
    err = [ln for ln in out.stderr.splitlines() if ln.startswith("flowrl: error:")]
    assert len(err) == 1 and "asks for DeepSpeed" in err[0] and "FSDP2" in err[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
