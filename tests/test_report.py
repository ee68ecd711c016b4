"""Tests of flowrl.train.report and of the run-folder side of flowrl.train.evaluate (save_eval):
a synthetic run folder (metrics.jsonl with a torn last line, summary.json, evaluations saved with
save_eval, one step saved twice) gives a report.html whose every image exists and whose tables hold
the first-vs-last numbers; bad run folders raise one-line UsageErrors.
"""
from __future__ import annotations

import csv
import json
import math
from html.parser import HTMLParser

import pytest
import torch
from PIL import Image

from flowrl.inputs import UsageError
from flowrl.train.evaluate import EvalResult, eval_dir, save_eval
from flowrl.train.report import load_evals, main, read_jsonl, running_mean, series, write_report

PROMPTS = ["a red circle", "two <blue> squares & more"]


def fake_eval(shift: float, seed: int = 0) -> EvalResult:
    """An evaluation of 2 prompts x 2 seeds with random 32 px images and known scores."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(4, 3, 32, 32, generator=g)
    a = torch.tensor([0.1, 0.2, 0.3, 0.4]) + shift
    b = torch.tensor([-1.0, -2.0, float("nan"), -4.0])
    valid = torch.isfinite(b)
    total = torch.where(valid, a + 0.5 * b, torch.full_like(a, math.nan))
    means = {"shapes": float(a[valid].double().mean()), "jpeg<kb>": float(b[valid].double().mean()),
             "total": float(total[valid].double().mean())}
    return EvalResult(prompts=PROMPTS, seeds=[0, 1], images=images, scores={"shapes": a, "jpeg<kb>": b},
                      total=total, valid=valid, weights={"shapes": 1.0, "jpeg<kb>": 0.5}, means=means,
                      details={"shapes/accuracy/colors": 0.25 + shift}, nfe=16, num_steps=4, guidance_scale=4.5,
                      height=32, width=32, wall_clock_s=0.5)


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = []
    for s in range(1, 31):
        rec = {"step": s, "reward/total": 0.01 * s, "reward/shapes": 0.02 * s, "kl": 1e-3 * s,
               "clip_frac": 0.1, "time/sampling": 1.5, "note": "text is not plotted"}
        if s == 7:
            rec["kl"] = float("nan")
        lines.append(json.dumps(rec))
    lines.append('{"step": 31, "reward/to')  # a line torn by a crash
    (run / "metrics.jsonl").write_text("\n".join(lines), encoding="utf-8")
    save_eval(run, 0, fake_eval(0.0, seed=0))
    save_eval(run, 10, fake_eval(5.0, seed=1))  # replaced below (a resumed run re-evaluates step 10)
    save_eval(run, 10, fake_eval(0.1, seed=2))
    save_eval(run, 30, fake_eval(0.3, seed=3))
    first, last = fake_eval(0.0).means, fake_eval(0.3).means
    (run / "summary.json").write_text(json.dumps({
        "steps": 30, "wall_clock_s": 3725.0, "nfe": 123456, "first_eval": first, "last_eval": last,
        "method": "flow_grpo"}), encoding="utf-8")
    (run / "config.yaml").write_text("seed: 0\nmodel:\n  path: <tiny>\n", encoding="utf-8")
    return run


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.tables, self._table, self._row, self._cell = [], {}, None, None, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a["src"])
        elif tag == "table":
            self._table = self.tables.setdefault(a.get("id"), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._row is not None and self._cell is not None:
            self._row.append(self._cell.strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def test_save_eval_layout(run_dir):
    d = eval_dir(run_dir, 10)
    assert d == run_dir / "eval" / "step-00000010"
    assert Image.open(d / "grid.png").size[0] > 0
    with open(d / "scores.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    r = fake_eval(0.1, seed=2)
    assert [(x["prompt"], int(x["seed"])) for x in rows] == list(zip(r.row_prompts(), r.row_seeds()))
    assert [float(x["shapes"]) for x in rows] == pytest.approx(r.scores["shapes"].tolist())
    assert rows[2]["total"] == "nan"
    records = read_jsonl(run_dir / "eval.jsonl")
    assert [x["step"] for x in records] == [0, 10, 10, 30]  # appended, never rewritten
    evals = load_evals(run_dir)
    assert [x["step"] for x in evals] == [0, 10, 30]
    assert evals[1]["means"]["shapes"] == pytest.approx(r.means["shapes"])  # the later record of step 10 wins
    assert evals[1]["grid"] == "eval/step-00000010/grid.png"
    assert evals[0]["num_invalid"] == 1 and evals[0]["nfe"] == 16


def test_report_references_existing_pngs_and_tables(run_dir):
    out = write_report(run_dir)
    assert out == run_dir / "report.html"
    text = out.read_text(encoding="utf-8")
    page = _Page()
    page.feed(text)
    assert page.imgs, "no images in the report"
    for src in page.imgs:
        assert not src.startswith(("/", "http:", "https:", "file:")), src  # relative: readable offline
        p = run_dir / src
        assert p.is_file(), src
        Image.open(p).verify()
    assert "plots/reward_train.png" in page.imgs and "plots/reward_eval.png" in page.imgs
    assert "plots/train_metrics.png" in page.imgs
    # first and last evaluation grids, not the middle one
    assert "eval/step-00000000/grid.png" in page.imgs and "eval/step-00000030/grid.png" in page.imgs
    assert "eval/step-00000010/grid.png" not in page.imgs
    # summary table: first vs last eval per reward, with the change
    first, last = fake_eval(0.0).means, fake_eval(0.3).means
    rows = {r[0]: r[1:] for r in page.tables["evals"][1:]}
    assert set(rows) == {"shapes", "jpeg<kb>", "total"}  # a reward name with '<' is escaped, not markup
    for k in rows:
        assert rows[k] == [f"{first[k]:.4f}", f"{last[k]:.4f}", f"{last[k] - first[k]:+.4f}"]
    run = {r[0]: r[1] for r in page.tables["run"]}
    assert run["steps"] == "30" and run["NFE"] == "123,456" and run["method"] == "flow_grpo"
    assert run["wall clock"].startswith("1h 02m 05s")
    details = {r[0]: r[1:] for r in page.tables["details"][1:]}
    assert details["shapes/accuracy/colors"] == ["0.2500", "0.5500", "+0.3000"]
    assert "&lt;tiny&gt;" in text  # config.yaml shown, escaped
    assert "<blue>" not in text


def test_plot_data():
    recs = [{"step": 2, "a": 1.0}, {"step": 4, "a": float("nan")}, {"a": 3.0, "b": "x"}, {"step": 9, "a": None}]
    assert series(recs, ["a", "b"]) == {"a": ([2.0, 3.0], [1.0, 3.0])}  # NaN, None, text skipped; no step -> position
    assert running_mean([1, 2, 3, 4, 5], 2) == [1.0, 1.5, 2.5, 3.5, 4.5]
    assert running_mean([2, 4], 5) == [2.0, 3.0]
    with pytest.raises(ValueError, match="window"):
        running_mean([1.0], 0)


def test_report_from_metrics_only(tmp_path):
    """No evaluations and no summary: the page still renders, with the training curves only; held-out
    means logged into metrics.jsonl as eval/<name> are plotted as the eval curve."""
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(
        json.dumps({"step": s, "reward/total": s * 0.1, **({"eval/total": s * 0.2} if s % 5 == 0 else {})})
        for s in range(1, 11)), encoding="utf-8")
    page = _Page()
    page.feed(write_report(run).read_text(encoding="utf-8"))
    assert page.imgs == ["plots/reward_train.png", "plots/reward_eval.png"]
    assert all((run / s).is_file() for s in page.imgs)
    assert "evals" not in page.tables
    assert main([str(run), "--title", "again"]) == 0


def test_bad_run_folders(tmp_path):
    with pytest.raises(UsageError, match="run folder not found") as e:
        write_report(tmp_path / "missing")
    assert "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="not a flowrl run folder") as e:
        write_report(tmp_path / "empty")
    assert "\n" not in str(e.value)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "summary.json").write_text("{not json\n", encoding="utf-8")
    with pytest.raises(UsageError, match="summary.json is not JSON") as e:
        write_report(bad)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="step"):
        eval_dir(tmp_path, -1)
