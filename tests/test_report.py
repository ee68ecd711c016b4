"""Tests of flowrl.train.report and of the run-folder format (flowrl.train.runfolder: save_eval):
a synthetic run folder (metrics.jsonl with a torn last line, summary.json, evaluations saved with
save_eval, one step saved twice) gives a report.html whose every image exists and whose tables hold
the first-vs-last numbers; the page leads with the before/after grid and the held-out table, then
the curves; series that are zero (or NaN) throughout are not plotted but named; bad run folders
raise one-line UsageErrors.
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
from flowrl.train.evaluate import EvalResult
from flowrl.train.report import load_evals, main, read_jsonl, running_mean, series, split_flat, write_report
from flowrl.train.runfolder import eval_dir, save_eval, write_comparison

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
                      details={"shapes/accuracy/colors": 0.25 + shift, "shapes/n/colors": 2.0}, nfe=16, num_steps=4, guidance_scale=4.5,
                      height=32, width=32, wall_clock_s=0.5)


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = []
    for s in range(1, 31):
        rec = {"step": s, "reward/total": 0.01 * s, "reward/shapes": 0.02 * s, "kl": 1e-3 * s,
               "clip_frac": 0.1, "time/sampling": 1.5, "note": "text is not plotted",
               # counters: one that never counted (not plotted), one that counted once (plotted)
               "invalid_samples": 0, "skipped_optimizer_steps": int(s == 12), "beta": 0.0, "no_value": math.nan}
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
        self.order = []  # ("h2", text) / ("img", src) / ("table", id) / ("p", id) in page order
        self.captions, self.notes, self._text, self._pid = {}, {}, None, None  # img src / <p> id -> text

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ("h2", "figcaption", "p"):
            self._text = ""
        if tag == "p" and a.get("id"):
            self._pid = a["id"]
            self.order.append(("p", a["id"]))
        if tag == "img":
            self.imgs.append(a["src"])
            self.order.append(("img", a["src"]))
        elif tag == "table":
            self._table = self.tables.setdefault(a.get("id"), [])
            self.order.append(("table", a.get("id")))
        elif tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ""

    def handle_endtag(self, tag):
        if tag == "h2":
            self.order.append(("h2", self._text))
        elif tag == "figcaption":
            self.captions[self.imgs[-1]] = self._text
        elif tag == "p" and self._pid:
            self.notes[self._pid], self._pid = self._text, None
        if tag in ("td", "th") and self._row is not None and self._cell is not None:
            self._row.append(self._cell.strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        if self._text is not None:
            self._text += data


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


def test_report_leads_with_before_after_and_held_out_table(run_dir):
    """Order: the before/after grid, the held-out table (first vs last evaluation), the per-category
    table, the run, then the curves (held-out first). With before_after/ present the separate first
    and last evaluation grids are not repeated; without it they take its place (previous test)."""
    write_comparison(run_dir / "before_after", fake_eval(0.0, seed=0), fake_eval(0.3, seed=3),
                     labels=("step 0", "step 30"))
    text = write_report(run_dir).read_text(encoding="utf-8")
    page = _Page()
    page.feed(text)
    order = [x for x in page.order if x[0] != "p"]
    assert order[:5] == [("h2", "Before / after"), ("img", "before_after/grid.png"), ("h2", "Held-out reward"),
                         ("table", "evals"), ("table", "details")]
    assert order[5:8] == [("h2", "Run"), ("table", "run"), ("h2", "Curves")]
    assert [src for kind, src in order[8:] if kind == "img"] == [
        "plots/reward_eval.png", "plots/reward_train.png", "plots/train_metrics.png"]
    assert not any(src.startswith("eval/") for src in page.imgs)
    assert 'href="before_after/index.html"' in text
    assert page.tables["evals"][0] == ["held-out reward", "first eval (step 0)", "last eval (step 30)", "change"]
    first, last = fake_eval(0.0).means["total"], fake_eval(0.3).means["total"]
    assert f"{first:.4f} &rarr; {last:.4f} ({last - first:+.4f}) from step 0 to step 30" in text  # one-line result
    # an image count per category is a note under the table, not a row with a change of +0
    assert "shapes/n/colors" not in {r[0] for r in page.tables["details"]}
    assert "Images per category: colors 2." in text


def test_report_hides_flat_plots(run_dir):
    """A metric that is 0 at every step (invalid_samples, beta) or never finite is not plotted and is
    named in one line; one that holds another single value (clip_frac 0.1, time/sampling 1.5) is stated
    with its value instead of plotted; a counter that counted once (skipped_optimizer_steps) and a
    varying metric (kl) are plotted; text fields are neither."""
    text = write_report(run_dir).read_text(encoding="utf-8")
    page = _Page()
    page.feed(text)
    assert "jpeg&lt;kb&gt; -2.333" in text
    panels = page.captions["plots/train_metrics.png"]
    assert panels == "Other training metrics per step: kl, skipped_optimizer_steps."
    zero, constant = page.notes["hidden"], page.notes["constant"]
    assert zero.endswith("zero (or NaN) throughout: beta, invalid_samples, no_value.")
    # the held-out jpeg<kb> mean is the same at every evaluation of the fixture: stated, escaped
    assert constant.endswith("the same throughout: jpeg<kb> -2.333, clip_frac 0.1, time/sampling 1.5.")
    assert "note" not in zero + constant and "skipped_optimizer_steps" not in zero + constant
    assert page.order.index(("p", "hidden")) > page.order.index(("h2", "Curves"))
    # split_flat alone: a series dropped by series() (no finite value) is named too, in request order;
    # a single point is plotted, not called constant
    data = series([{"step": 1, "a": 0, "b": math.nan, "c": 0.0, "d": 2.5, "e": 7}, {"step": 2, "a": 0, "c": 2.0, "d": 2.5}],
                  ["a", "b", "c", "d", "e"])
    shown, flat, const = split_flat(data, ["a", "b", "c", "d", "e"])
    assert list(shown) == ["c", "e"] and flat == ["a", "b"] and const == {"d": 2.5}


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
    assert page.imgs == ["plots/reward_eval.png", "plots/reward_train.png"]  # held-out curve first
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
