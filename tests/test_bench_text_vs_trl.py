"""``bench/text_vs_trl.py`` runs end to end at a tiny size (so the bench never rots): flowrl and TRL's
GRPOTrainer train the tiny LM in lockstep for a one-second budget each, and the table has both."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_runs_both_frameworks_in_lockstep(tmp_path):
    from flowrl.demo.tiny_text import save_tiny_lm

    model = save_tiny_lm(tmp_path / "lm", seed=0)
    out = tmp_path / "table.json"
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "text_vs_trl.py"), "--threads", "1", "--budget", "1",
                        "--model", str(model), "--eval-prompts", "8", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    for name in ("flowrl", "trl"):
        r = row[name]
        assert sum(r["steps"]) >= 1 and r["s_per_step"] > 0 and r["peak_rss_mib"] > 0, r
        assert 0.0 <= r["accuracy"] <= 1.0
    assert row["time_ratio"] == row["flowrl"]["s_per_step"] / row["trl"]["s_per_step"]
    assert "flowrl vs TRL" in p.stdout and "threads" in p.stdout
