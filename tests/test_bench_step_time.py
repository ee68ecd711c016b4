"""``bench/step_time.py --overlap``: its cases run at a tiny size on CPU (an in-process scorer and a scorer
server subprocess, overlap off and on), so the bench never rots; the table's ratios follow the medians as
documented (docs/methods.md, "Rewards overlap sampling")."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    return runpy.run_path(str(ROOT / "bench" / "step_time.py"), run_name="bench_step_time")


def test_overlap_cases_run_at_a_tiny_size(bench, capsys):
    threads = torch.get_num_threads()
    try:
        assert bench["main"](["--overlap", "--tiny", "--score-ms", "2"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    table = out[out.index("scorer "):].splitlines()
    rows = [line for line in table if line.startswith(("in-process", "remote")) and line.split()[-8] in ("off", "on")]
    assert len(rows) == 4, out
    for line in rows:
        values = [float(v) for v in line.split()[-7:]]
        assert all(v > 0 for v in values[:2] + values[3:]), line  # sampling, scoring, rollout+score, update, step, ratio
    assert "bound with 2 sub-batches" in out


def test_ratios_follow_the_medians(bench):
    recs = [{"time/sampling": s, "time/scoring": w, "time/scoring_total": r, "time/update": 1.0, "time/step": s + w + 1}
            for s, w, r in ((2.0, 2.0, 2.0), (4.0, 2.0, 2.5), (3.0, 2.0, 2.0))]
    off = bench["overlap_medians"](recs)
    assert off["time/sampling"] == 3.0 and off["time/scoring_total"] == 2.0 and off["rollout_score"] == 5.0
    on = dict(off, rollout_score=3.3)
    assert bench["overlap_ratio"](off, off) == pytest.approx(5.0 / 3.0)
    assert bench["overlap_ratio"](on, off) == pytest.approx(1.1)
    text = bench["format_overlap_table"]([("remote", {"off": off, "on": on})], 4)
    assert "1.67" in text and "1.10" in text and "1 + min/max / C = 1.17" in text and "without: 0.66" in text


def test_busy_scorer_scores_the_mean_pixel_and_costs_work(bench):
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    s = bench["BusyScorer"](mm_per_image=2)
    torch.testing.assert_close(s(images, ["p"] * 3), images.mean(dim=(1, 2, 3)), rtol=0, atol=0)
    assert bench["mm_seconds"](repeats=1) > 0
