"""The training loop on a CUDA device: a few steps of the shipped demo configs with ``model.device=cuda``.

Rewards (and so the per-sample keep mask) come back on the CPU while rollouts live on the GPU; this
caught a device mismatch in the loop that no CPU run can show. Skipped where no GPU is present (CI);
run it by hand on a GPU machine (README, "Scaling out").
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from flowrl.cli import main

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("config", [
    "configs/demo.yaml",                         # every step SDE and trained, ratio normalisation
    "configs/methods/flow_grpo_fast.yaml",       # a window of SDE steps
    "configs/methods/window_tree_guard.yaml",    # a tree inside a sliding window
    "configs/llm_demo.yaml",                     # the text path
])
def test_demo_configs_train_on_cuda(config, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    rc = main(["train", config, f"output_dir={out}", "model.device=cuda", "max_steps=2", "eval_every=2",
               "eval.num_prompts=4", "eval.seeds=[0]", "train.progress=false", "train.tracker=none"])
    assert rc == 0, capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]  # one line per training step, each with a finite update
    for m in metrics:
        assert math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) and m["skipped_optimizer_steps"] == 0, m
