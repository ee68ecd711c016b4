"""Every text method preset on the demo LM, under the same wall-clock budget and seeds.

The text counterpart of ``bench/methods.py`` (same runs, table, curves and options): each preset in
``configs/methods_text/`` (overlays of ``configs/llm_demo.yaml``) trains the shipped demo LM on the
arithmetic task for ``--budget`` seconds of training time per seed; the table gives the held-out exact
match at the budget (mean ± standard error over seeds), each seed's time to reach vanilla GRPO's final
accuracy (``grpo``), s/step and generated tokens per step; the curves go to ``--out``/methods.png. The number
compared is the ``exact_match`` reward (``--metric``), also for presets that train on several rewards.

    python bench/text_methods.py --budget 300 --seeds 0 1 2 --jobs 2 --threads 1 --eval-every 30s
    python bench/text_methods.py --methods dcpo gtpo --budget 300 --seeds 0 1 2   # grpo is always run
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    methods = runpy.run_path(str(ROOT / "bench" / "methods.py"), run_name="bench_methods")
    sys.exit(methods["main"](
        methods_dir=ROOT / "configs" / "methods_text", reference="grpo", out="runs/text_methods",
        labels={"what": "held-out exact match", "title": "Every text method on equal compute (demo LM, CPU)"},
        description=__doc__.splitlines()[0], metric="exact_match",  # presets with several rewards: their accuracy
    ))
