"""``bench/scale.py``: the whole bench runs at tiny scale on CPU (so it never rots); the published configurations
it builds have the published parameter counts (built on the meta device: no memory); the memory fit and the
peak table are what they say."""
from __future__ import annotations

import json
import os
import runpy
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    return runpy.run_path(str(ROOT / "bench" / "scale.py"), run_name="bench_scale")


def test_tiny_scale_runs_every_part_and_writes_json(bench, tmp_path, capsys):
    out = tmp_path / "scale.json"
    assert bench["main"](["--model", "qwen_image", "--device", "cpu", "--repeats", "1", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["scale"] == "tiny" and res["run"]["group"] == 2 and res["recipe"] == "flow_grpo_qwen_image"
    ro = res["rollout"]
    assert ro["rows"] == 4 and ro["ratio"] == pytest.approx(ro["pipeline_s"] / ro["flowrl_s"])
    tr = res["training"]
    assert tr["flops_per_transition"] > 0 and tr["transitions_per_s"] == pytest.approx(2 * tr["samples_per_s"])
    assert "mfu_fwd_bwd" not in tr  # no peak known for a CPU
    assert res["lora_params"] > 0 and res["batched_cfg"]["speedup"] > 0
    assert set(res["precision"]) == {"bf16_base", "fp32_base"} and res["memory"]["note"].startswith("n/a")
    for line in ("rollout", "training", "precision", "attention", "CFG", "VAE decode", "TE offload", "host syncs"):
        assert line in table, line


def test_the_sd3_and_video_families_run_their_rollout_against_the_pipeline(bench, tmp_path):
    for model in ("sd35m", "wan"):
        out = tmp_path / f"{model}.json"
        argv = ["--model", model, "--device", "cpu", "--repeats", "1", "--out", str(out),
                "--skip", "attention", "decode_chunks", "precision", "training"]
        assert bench["main"](argv) == 0
        res = json.loads(out.read_text())
        assert res["rollout"]["flowrl_images_per_s"] > 0 and res["training"] == "skipped (--skip)"
    assert "n/a" in res["batched_cfg"] or "speedup" in res["batched_cfg"]


# (transformer, VAE, text encoders) parameters of each published config. Published sizes: FLUX.1-dev 11.9B,
# Qwen-Image 20B (20.43B), Wan2.1 14B / 1.3B, Qwen2.5-VL-7B 8.29B, T5-v1.1-XXL encoder 4.76B, CLIP-L text 123M
# (with projection 124M), OpenCLIP bigG text 695M; SD3.5-medium's MMDiT-X is 2.24B in diffusers' layout.
COUNTS = {
    "sd35m": (2_243_171_520, [123_650_304, 694_659_840, 4_762_310_656]),
    "flux1dev": (11_901_408_320, [123_060_480, 4_762_310_656]),
    "qwen_image": (20_430_401_088, [8_292_166_656]),
    "wan": (14_288_491_584, [5_680_910_336]),
    "wan_1.3b": (1_418_996_800, [5_680_910_336]),
}


@pytest.mark.parametrize("model", sorted(COUNTS))
def test_published_configs_build_at_their_size_on_the_meta_device(bench, model):
    import diffusers
    import transformers

    spec = bench["SPECS"][model]
    count = bench["count_params"]
    with bench["materialised_on"](torch.device("meta"), torch.bfloat16):
        t = getattr(diffusers, spec.transformer[0])(**spec.transformer[1])
        tes = []
        for _attr, tok_kind, model_cls, config_cls, config in spec.text_encoders:
            tok = bench["_tokenizer"](tok_kind, spec.max_sequence_length)
            tes.append(count(getattr(transformers, model_cls)(bench["_text_config"](config_cls, config, tok))))
    assert next(t.parameters()).dtype == torch.bfloat16 and next(t.parameters()).device.type == "meta"
    assert (count(t), tes) == COUNTS[model]
    assert torch.get_default_dtype() == torch.float32  # the context restores the default


def test_memory_fit_is_linear_and_checked(bench):
    fit, fits = bench["linear_fit"], bench["rows_that_fit"]
    gib = 2.0**30
    # peaks 30 GiB at 1 row and 40 GiB at 3 rows: 5 GiB per row, 25 GiB fixed -> (80 - 25) / 5 = 11 rows
    assert fit([(1, 30 * gib), (3, 40 * gib)]) == pytest.approx((5 * gib, 25 * gib))
    assert fits([(1, 30 * gib), (3, 40 * gib)]) == 11
    assert fits([(1, 90 * gib), (2, 95 * gib)]) == 0  # not even one row
    assert fits([(1, 30 * gib), (2, 30 * gib)]) is None  # no growth: nothing to extrapolate
    with pytest.raises(ValueError, match="two different row counts"):
        fit([(2, 1.0), (2, 2.0)])


def test_peak_table_by_device_name(bench):
    peak = bench["peak_bf16"]
    assert peak("NVIDIA H100 80GB HBM3") == 989e12  # SXM
    assert peak("NVIDIA H100 PCIe") == 756e12 and peak("NVIDIA H100 NVL") == 835e12
    assert peak("NVIDIA H200") == 989e12 and peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak("NVIDIA GeForce RTX 4090") is None  # unknown: MFU not reported


def test_arguments_are_checked(bench):
    for bad in (["--scale", "real", "--device", "cpu"], ["--memory-rows", "2", "2"], ["--repeats", "0"],
                ["--model", "sdxl"]):
        with pytest.raises(SystemExit):
            bench["main"](bad)


def test_gpu_check_script_runs_in_tiny_mode_on_cpu(tmp_path):
    env = dict(os.environ, DEVICE="cpu", SCALE="tiny", MODELS="sd35m", LIMIT_FACTOR="10", OMP_NUM_THREADS="1",
               EXTRA="--repeats 1 --skip attention decode_chunks precision training")
    out = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path)], env=env, capture_output=True,
                         text=True, timeout=1500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "== scale_sd35m: exit 0" in out.stdout and "== deepspeed: exit 0" in out.stdout
    assert "asks for DeepSpeed" in out.stdout  # the loop's one-line refusal
    assert json.loads((tmp_path / "scale_sd35m.json").read_text())["rollout"]["rows"] == 4
