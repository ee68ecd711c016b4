"""Smoke tests of the shipped demos and of the method comparison, so that none of them rots.

* The README's main command, ``flowrl train configs/demo.yaml`` (the image demo on the shipped
  ``assets/demo_sd3`` model), runs here exactly as shipped except for fewer steps and a smaller
  evaluation: it trains, evaluates before and after, and writes ``summary.json`` and the before/after grid.
* ``flowrl train configs/llm_demo.yaml`` (the text demo on ``assets/demo_lm``) likewise.
* ``bench/methods.py`` runs two presets side by side on a tiny budget and prints its table and curves.

They check the plumbing, not the alignment (a few steps move no reward); the alignment figures are
measured by the full commands and reported in the README.
"""
from __future__ import annotations

import json
import math
import statistics
import runpy
import sys
from pathlib import Path

import pytest

from flowrl.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _run_demo(config: str, out: Path, overrides, capsys) -> dict:
    rc = main(["train", str(ROOT / config), f"output_dir={out}", "train.progress=false", *overrides])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    summary = json.loads((out / "summary.json").read_text())
    assert "held-out" in printed and str(out) in printed
    return summary


def test_image_demo_config_runs_as_shipped_with_fewer_steps(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the config names assets/demo_sd3 relative to the repository
    out = tmp_path / "demo"
    s = _run_demo("configs/demo.yaml", out, ["max_steps=2", "eval_every=2", "eval.num_prompts=3", "eval.seeds=[0]"],
                  capsys)
    assert s["steps"] == 2
    for key in ("first_eval", "last_eval"):
        assert 0.0 <= s[key]["shapes"] <= 1.0, s
    # Per-category GenEval-style numbers and the before/after grids of the same prompts and seeds.
    assert any(k.startswith("shapes/score/") for k in s["last_eval_details"]), s["last_eval_details"]
    evals = [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2]
    assert (out / "eval" / "step-00000000" / "grid.png").is_file()
    assert (out / "eval" / "step-00000002" / "grid.png").is_file()
    rows = (out / "before_after" / "scores.csv").read_text().splitlines()
    assert rows[0].startswith("prompt,seed,base/shapes") and len(rows) == 1 + 3  # 3 prompts x 1 seed
    assert (out / "before_after" / "grid.png").stat().st_size > 1000
    assert (out / "lora").is_dir() or (out / "transformer").is_dir()


def test_text_demo_config_runs_as_shipped_with_fewer_steps(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "llm_demo"
    s = _run_demo("configs/llm_demo.yaml", out, ["max_steps=2", "eval_every=2", "eval.num_prompts=16"], capsys)
    assert s["steps"] == 2
    for key in ("first_eval", "last_eval"):
        assert 0.0 <= s[key]["total"] <= 1.0, s


def test_methods_bench_runs_on_a_tiny_budget_and_reuses_its_runs(tmp_path, capsys, monkeypatch):
    """One tiny table (2 methods, 2 jobs), then the same command with --reuse reads every run instead of
    training it, and --reference-from takes the reference's runs from the first table (one training run
    serves the three checks: the suite's time)."""
    bench_path = ROOT / "bench" / "methods.py"
    out = tmp_path / "methods"
    base = ["bench/methods.py", "--budget", "1", "--eval-every", "1", "--jobs", "2", "--threads", "1",
            "eval.num_prompts=2", "eval.seeds=[0]", "sample.prompts_per_step=1", "sample.eval_num_steps=4"]

    def bench(*extra, code=0, argv=base):
        monkeypatch.setattr(sys, "argv", argv + list(extra))
        with pytest.raises(SystemExit) as e:
            runpy.run_path(str(bench_path), run_name="__main__")
        assert e.value.code == code
        return capsys.readouterr().out

    printed = bench("--out", str(out), "--methods", "flow_grpo", "window_tree_guard")
    assert "flow_grpo" in printed and "window_tree_guard" in printed and "x ref time" in printed
    assert "reused" not in printed
    first = json.loads((out / "methods.json").read_text())
    assert set(first) == {"flow_grpo", "window_tree_guard"}
    for curves in first.values():
        (c,) = curves
        assert c["steps"] >= 1 and len(c["time"]) == len(c["reward"]) >= 2
        assert c["time"] == sorted(c["time"]) and c["time"][0] == 0.0
    assert (out / "methods.png").stat().st_size > 1000
    record = json.loads((out / "flow_grpo-seed0" / "bench_run.json").read_text())
    assert record["wall_s"] == first["flow_grpo"][0]["wall_s"] and "seed=0" in record["command"]

    # read, not trained; an override typed after --methods is still an override (same command as before)
    printed = bench("--out", str(out), "--reuse", "--methods", "flow_grpo", "window_tree_guard", base[-1], argv=base[:-1])
    assert printed.count("reused") == 2
    again = json.loads((out / "methods.json").read_text())
    for m in first:
        assert again[m][0]["reward"] == first[m][0]["reward"] and again[m][0]["wall_s"] == first[m][0]["wall_s"]
    # another budget is another command: not a finished run of it
    mod = runpy.run_path(str(bench_path), run_name="bench_methods")
    preset = ROOT / "configs" / "methods" / "flow_grpo.yaml"
    overrides = base[base.index("eval.num_prompts=2"):]
    same = mod["run_command"](preset, 0, 1.0, 1, out / "flow_grpo-seed0", overrides)
    other = mod["run_command"](preset, 0, 2.0, 1, out / "flow_grpo-seed0", overrides)
    assert mod["finished_run"](out / "flow_grpo-seed0", same) == record["wall_s"]
    assert mod["finished_run"](out / "flow_grpo-seed0", other) is None

    # the reference read from the first table: not trained again, and the table still compares with it
    printed = bench("--out", str(out), "--methods", "window_tree_guard", "--reuse",
                    "--reference-from", str(out / "methods.json"))
    assert printed.count("reused") == 1 and "x ref time" in printed
    assert json.loads((out / "methods.json").read_text())["flow_grpo"] == first["flow_grpo"]
    bench("--out", str(out), "--methods", "flow_grpo", "--reference-from", str(out / "methods.json"),
          code="--reference-from reads 'flow_grpo': leave it out of --methods")


def test_text_methods_bench_reads_text_evaluations(tmp_path, capsys, monkeypatch):
    """bench/text_methods.py: the text presets on a tiny LM (1 s each); the reference is grpo and the
    curve's rows are the held-out completions' exact match (samples.jsonl)."""
    from flowrl.demo.tiny_text import save_tiny_lm

    lm = save_tiny_lm(tmp_path / "lm", seed=0)
    out = tmp_path / "text_methods"
    monkeypatch.setattr(sys, "argv", ["bench/text_methods.py", "--budget", "1", "--eval-every", "1", "--threads", "1",
                                      "--methods", "grpo",  # the reference alone: every preset took 6 minutes
                                      "--out", str(out), f"model.path={lm}", "eval.num_prompts=4",
                                      "sample.prompts_per_step=2", "train.num_minibatches=1"])  # (disco: 4 of 32)
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / "bench" / "text_methods.py"), run_name="__main__")
    assert e.value.code == 0
    printed = capsys.readouterr().out
    assert "grpo" in printed and "x ref time" in printed
    (c,) = json.loads((out / "methods.json").read_text())["grpo"]
    assert c["eval_images"] == 4 and all(0.0 <= r <= 1.0 for r in c["reward"])


def test_methods_report_gives_standard_errors_and_who_reached_the_reference(tmp_path, capsys):
    """The table's figures on made-up curves: mean ± standard error over seeds, how many seeds reached the
    reference's final mean and when (mean over those), and the ratio to the reference's time."""
    bench = runpy.run_path(str(ROOT / "bench" / "methods.py"), run_name="bench_methods")

    def c(times, rewards, se=0.01):
        return {"time": times, "reward": rewards, "steps": len(times), "s_per_step": 1.0, "nfe_per_step": 10.0,
                "eval_se": se, "budget_s": 100.0}

    results = {  # reference final mean 0.6; it reaches it at 80 s and 100 s
        "flow_grpo": [c([0, 50, 80, 100], [0.5, 0.55, 0.6, 0.6]), c([0, 50, 100], [0.5, 0.55, 0.6]),
                      c([0, 50, 100], [0.5, 0.58, 0.6])],
        "fast": [c([0, 10, 100], [0.5, 0.6, 0.7]), c([0, 20, 100], [0.5, 0.61, 0.7]), c([0, 50, 100], [0.5, 0.55, 0.58])],
    }
    assert bench["report"](results, "flow_grpo", tmp_path, 100.0) == 0
    out = capsys.readouterr().out
    fast = next(line for line in out.splitlines() if line.startswith("fast "))
    se = statistics.stdev([0.7, 0.7, 0.58]) / math.sqrt(3)
    assert f"0.660 ± {se:.3f}" in fast
    assert "15 s (2/3)" in fast  # seeds 0 and 1 reached 0.6 at 10 s and 20 s; seed 2 never
    ref_time = (80 + 100 + 100) / 3
    assert f"{15 / ref_time:.2f}x" in fast
    assert (tmp_path / "methods.png").stat().st_size > 1000
    mu, s = bench["mean_curve"](results["fast"], [0.0, 15.0, 100.0])
    assert mu == pytest.approx([0.5, (0.6 + 0.5 + 0.5) / 3, 0.66]) and s[0] == 0.0


def test_methods_report_when_the_reference_starts_at_its_final(tmp_path, capsys):
    """A reference that barely improves (mean 0.5 -> 0.51) with seeds starting at 0.52 and 0.50: those
    starting above its final mean reach it at 0 s, so the table gives times but no ratio (once a division
    by zero)."""
    bench = runpy.run_path(str(ROOT / "bench" / "methods.py"), run_name="bench_methods")

    def c(times, rewards):
        return {"time": times, "reward": rewards, "steps": len(times), "s_per_step": 1.0, "nfe_per_step": 10.0,
                "eval_se": 0.01, "budget_s": 100.0}

    results = {"flow_grpo": [c([0, 100], [0.52, 0.52]), c([0, 100], [0.52, 0.51]), c([0, 100], [0.46, 0.5])],
               "other": [c([0, 50, 100], [0.52, 0.55, 0.6]), c([0, 50, 100], [0.52, 0.53, 0.6]),
                         c([0, 50, 100], [0.46, 0.56, 0.6])]}
    assert bench["report"](results, "flow_grpo", tmp_path, 100.0) == 0
    out = capsys.readouterr().out
    assert "reached its final mean at their first evaluation, so no time ratio is given" in out
    other = next(line for line in out.splitlines() if line.startswith("other "))
    assert "17 s (3/3)" in other and other.rstrip().endswith("-")  # (0 + 0 + 50) / 3


def test_methods_curve_reads_the_rows_every_evaluation_shares(tmp_path):
    """With eval.ends_num_prompts the first and last evaluations hold more images than those between: the
    curve reads the shared (first) rows of each, start and final all rows of theirs."""
    bench = runpy.run_path(str(ROOT / "bench" / "methods.py"), run_name="bench_methods")
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "time/step": 10.0, "nfe": 4}) + "\n"
                                               for s in (1, 2)))
    evals = {0: [0.5, 0.6, 0.1, 0.2], 1: [0.7, 0.8], 2: [0.9, 1.0, 0.3, 0.3]}
    (run / "eval.jsonl").write_text("".join(json.dumps({"step": s, "means": {"total": statistics.mean(v)}}) + "\n"
                                            for s, v in evals.items()))
    for s, v in evals.items():
        d = run / "eval" / f"step-{s:08d}"
        d.mkdir()
        (d / "scores.csv").write_text("prompt,seed,total\n" + "".join(f"p{i},0,{x}\n" for i, x in enumerate(v)))
    c = bench["curve"](run)
    assert c["time"] == [0.0, 10.0, 20.0]
    assert c["reward"] == pytest.approx([0.55, 0.75, 0.95])  # the first two rows of every evaluation
    assert (c["start"], c["final"]) == pytest.approx((0.35, 0.625)) and (c["eval_images"], c["curve_images"]) == (4, 2)
    assert c["eval_se"] == pytest.approx(statistics.stdev(evals[2]) / 2)


def test_methods_bench_adds_seeds_where_the_standard_error_is_above_target():
    bench = runpy.run_path(str(ROOT / "bench" / "methods.py"), run_name="bench_methods")

    def runs(*finals):
        return [{"seed": i, "final": f, "reward": [0.5, f]} for i, f in enumerate(finals)]

    results = {"steady": runs(0.60, 0.61, 0.60), "spread": runs(0.50, 0.60, 0.55), "one": runs(0.5),
               "full": runs(0.4, 0.6)}
    # standard errors 0.0033, 0.029, none (one seed), 0.1; a method at --max-seeds gets no more
    assert bench["seeds_to_add"](results, 0.01, 4) == {"spread": 3, "one": 1, "full": 2}
    assert bench["seeds_to_add"](results, 0.01, 3) == {"one": 1, "full": 2}
    assert bench["seeds_to_add"](results, 0.01, 2) == {"one": 1}
    assert bench["seeds_to_add"](results, None, 8) == {}


def test_methods_report_warns_when_runs_of_a_seed_saw_other_images():
    """Runs of one seed start from the same base model: different first curve points mean other held-out
    images (e.g. a table joined with runs of another eval.ends_num_prompts), which the report must say."""
    bench = runpy.run_path(str(ROOT / "bench" / "methods.py"), run_name="bench_methods")
    same = {"flow_grpo": [{"seed": 0, "reward": [0.519, 0.53]}], "dgpo": [{"seed": 0, "reward": [0.5192, 0.6]}]}
    assert bench["base_mismatches"](same) == []
    other = {**same, "awm": [{"seed": 0, "reward": [0.492, 0.6]}, {"seed": 1, "reward": [0.5, 0.6]}]}
    (line,) = bench["base_mismatches"](other)
    assert line.startswith("seed 0:") and "awm 0.492" in line and "not comparable" in line


def test_methods_curves_timed_at_the_speed_of_another_table():
    """--speed-from: a run that shared the machine is timed as its steps x the method's median s/step alone."""
    bench = runpy.run_path(str(ROOT / "bench" / "methods.py"), run_name="bench_methods")
    runs = {"dgpo": [{"eval_steps": [0, 1, 3], "time": [0.0, 7.0, 21.0], "s_per_step": 7.0}],
            "flow_grpo": [{"time": [0.0, 30.0], "s_per_step": 4.0}]}
    alone = {"dgpo": [{"s_per_step": 3.0}, {"s_per_step": 3.2}, {"s_per_step": 2.0}]}
    got = bench["at_speed_of"](runs, alone, skip="flow_grpo")
    assert got["dgpo"][0]["time"] == [0.0, 3.0, 9.0] and got["dgpo"][0]["own_s_per_step"] == 7.0
    assert got["flow_grpo"] == runs["flow_grpo"]
    with pytest.raises(SystemExit, match="no 'flow_grpo' runs"):
        bench["at_speed_of"](runs, alone)


def test_methods_merge_joins_the_seeds_of_several_tables():
    bench = runpy.run_path(str(ROOT / "bench" / "methods.py"), run_name="bench_methods")
    a = {"flow_grpo": [{"seed": 0, "final": 0.5}, {"seed": 1, "final": 0.6}], "dgpo": [{"seed": 0, "final": 0.7}]}
    b = {"dgpo": [{"seed": 0, "final": 0.1}, {"seed": 3, "final": 0.8}], "awm": [{"seed": 5, "final": 0.4}]}
    merged = bench["merge_results"]([a, b])
    assert merged == {"flow_grpo": a["flow_grpo"], "dgpo": [{"seed": 0, "final": 0.7}, {"seed": 3, "final": 0.8}],
                      "awm": b["awm"]}


def test_methods_bench_reuse_notices_an_edited_preset(tmp_path):
    """--reuse reads a finished run only if the preset still resolves to the config it was trained with."""
    import shutil

    bench = runpy.run_path(str(ROOT / "bench" / "methods.py"), run_name="bench_methods")
    (tmp_path / "methods").mkdir()
    shutil.copy(ROOT / "configs" / "demo_base.yaml", tmp_path / "demo_base.yaml")
    preset = tmp_path / "methods" / "flow_grpo.yaml"
    shutil.copy(ROOT / "configs" / "methods" / "flow_grpo.yaml", preset)
    run_dir = tmp_path / "runs" / "flow_grpo-seed0"
    run_dir.mkdir(parents=True)
    cmd = bench["run_command"](preset, 0, 1.0, 1, run_dir, [])
    (run_dir / "summary.json").write_text("{}")
    (run_dir / "bench_run.json").write_text(json.dumps({"command": cmd[2:], "wall_s": 12.5,
                                                        "config": bench["resolved_config"](cmd)}))
    assert bench["finished_run"](run_dir, cmd) == 12.5
    preset.write_text(preset.read_text().replace("noise_level: 0.7", "noise_level: 0.6"))
    assert bench["finished_run"](run_dir, cmd) is None  # same command, other preset: trained again
