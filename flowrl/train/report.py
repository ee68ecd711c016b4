"""The run report: one static, offline-readable ``report.html`` that leads with the result.

:func:`write_report` reads a run folder (``metrics.jsonl``, ``summary.json``, ``eval.jsonl``, the
evaluation and before/after grids, ``config.yaml``), draws ``<run>/plots/*.png`` with matplotlib's
Agg canvas and writes ``<run>/report.html``: the held-out result in one line, the before/after grid,
the held-out table (first vs last evaluation per reward, then per category), the run's size, the
curves, the config. Series that are zero or constant throughout are named instead of plotted.
Images are linked relative to the run folder, so a copied folder still reads offline. The folder
layout and the rules in full: docs/methods.md, ``flowrl.train.report``.
"""
from __future__ import annotations

import html
import io
import json
import logging
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from flowrl.inputs import ArgumentParser, UsageError, writable_dir
from flowrl.train.runfolder import BEFORE_AFTER, EVAL_DIR, EVAL_LOG, GRID_NAME, atomic_write

logger = logging.getLogger(__name__)

__all__ = ["read_jsonl", "load_evals", "eval_grids", "series", "running_mean", "split_flat", "plot_panels",
           "write_report", "main"]

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
REPORT = "report.html"
PLOTS = "plots"
MAX_PANELS = 12
_STEP_DIR = re.compile(r"^step-(\d{8})$")


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def read_jsonl(path: Union[str, Path]) -> List[Dict[str, Any]]:
    """The JSON objects of a JSONL file, one per line; blank lines are ignored and lines that are not
    a JSON object (e.g. torn by a crash) are skipped with a warning. A missing file gives []."""
    p = Path(path)
    if not p.is_file():
        return []
    out: List[Dict[str, Any]] = []
    for i, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("%s:%d: not JSON, skipped", p, i)
            continue
        if isinstance(obj, dict):
            out.append(obj)
        else:
            logger.warning("%s:%d: not a JSON object, skipped", p, i)
    return out


def _number(x: Any) -> Optional[float]:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(float(x)) else None


def load_evals(run_dir: Union[str, Path]) -> List[Dict[str, Any]]:
    """Records of ``eval.jsonl`` sorted by step, the last one kept for a step logged twice."""
    by_step: Dict[int, Dict[str, Any]] = {}
    for rec in read_jsonl(Path(run_dir) / EVAL_LOG):
        step = rec.get("step")
        if isinstance(step, int) and not isinstance(step, bool):
            by_step[step] = rec
    return [by_step[s] for s in sorted(by_step)]


def eval_grids(run_dir: Union[str, Path]) -> List[Tuple[int, Path]]:
    """(step, path) of every ``eval/step-XXXXXXXX/grid.png`` that exists, by step."""
    root = Path(run_dir) / EVAL_DIR
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and (d / GRID_NAME).is_file():
            out.append((int(m.group(1)), d / GRID_NAME))
    return sorted(out)


def series(records: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> Dict[str, Tuple[List[float], List[float]]]:
    """key → (steps, values) over the records that hold a finite number for it; a record's step is
    its ``step`` field, else its 1-based position."""
    out: Dict[str, Tuple[List[float], List[float]]] = {}
    for k in keys:
        xs, ys = [], []
        for i, rec in enumerate(records):
            y = _number(rec.get(k))
            if y is None:
                continue
            step = _number(rec.get("step"))
            xs.append(step if step is not None else float(i + 1))
            ys.append(y)
        if xs:
            out[k] = (xs, ys)
    return out


def running_mean(values: Sequence[float], window: int) -> List[float]:
    """Trailing mean ``m_i = mean(v_{max(0, i-w+1)} .. v_i)`` (the first points average what exists)."""
    if window < 1:
        raise ValueError(f"window: must be >= 1, got {window}")
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------


def plot_panels(data: Mapping[str, Tuple[Sequence[float], Sequence[float]]], path: Union[str, Path], *,
                title: str = "", xlabel: str = "step", smooth: bool = True, markers: bool = False) -> Optional[Path]:
    """One panel per series (at most ``MAX_PANELS``, 3 per row) saved as a PNG with matplotlib's Agg
    canvas. ``smooth``: draw the raw values faintly with a trailing running mean (window n/20) over
    them when a series has at least 20 points. Returns the path, or None when ``data`` is empty."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    items = list(data.items())[:MAX_PANELS]
    if not items:
        return None
    ncols = min(3, len(items))
    nrows = math.ceil(len(items) / ncols)
    width, height = 4.2 * ncols, 2.9 * nrows
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    # fixed margins in inches (tick labels, panel titles, the x label): matplotlib's constrained layout
    # measured every text's extent and took most of a report's time (seconds per run on 2 CPU cores)
    top = 0.35 + (0.3 if title else 0.0)
    fig.subplots_adjust(left=0.6 / width, right=1 - 0.15 / width, bottom=0.45 / height, top=1 - top / height,
                        wspace=0.28, hspace=0.5)
    for ax in axes.flat[len(items):]:
        ax.set_visible(False)
    for ax, (name, (xs, ys)) in zip(axes.flat, items):
        if smooth and len(ys) >= 20:
            ax.plot(xs, ys, color="tab:blue", alpha=0.3, linewidth=0.8)
            ax.plot(xs, running_mean(list(ys), max(2, len(ys) // 20)), color="tab:blue", linewidth=1.6)
        else:
            ax.plot(xs, ys, color="tab:blue", linewidth=1.4, marker="o" if markers else None, markersize=3)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=11)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write(path, buf.getvalue())


# --------------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------------


def _fmt(x: Any) -> str:
    """A table cell: ints with thousands separators, floats with 4 decimals, None/NaN as a dash."""
    if x is None:
        return "&ndash;"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return html.escape(str(x))
    if isinstance(x, int):
        return f"{x:,}"
    if not math.isfinite(x):
        return "&ndash;"
    return f"{x:.4f}" if abs(x) < 1000 else f"{x:,.1f}"


def _delta(a: Any, b: Any) -> str:
    x, y = _number(a), _number(b)
    if x is None or y is None:
        return "&ndash;"
    return f"{y - x:+.4f}"


def _duration(seconds: Any) -> str:
    s = _number(seconds)
    if s is None:
        return "&ndash;"
    h, rem = divmod(int(round(s)), 3600)
    m, sec = divmod(rem, 60)
    text = f"{h}h {m:02d}m {sec:02d}s" if h else f"{m}m {sec:02d}s"
    return f"{text} ({s:,.1f} s)"


def _first_last_table(first: Mapping[str, Any], last: Mapping[str, Any], label: str, table_id: str,
                      steps: Tuple[Optional[int], Optional[int]] = (None, None)) -> str:
    names = list(dict.fromkeys([*last.keys(), *first.keys()]))
    if not names:
        return ""
    heads = [f"{side} eval" + (f" (step {s})" if s is not None else "") for side, s in zip(("first", "last"), steps)]
    rows = "\n".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{_fmt(first.get(k))}</td><td>{_fmt(last.get(k))}</td>"
        f"<td>{_delta(first.get(k), last.get(k))}</td></tr>"
        for k in names
    )
    return (f'<table id="{table_id}"><tr><th>{html.escape(label)}</th><th>{heads[0]}</th><th>{heads[1]}</th>'
            f"<th>change</th></tr>\n{rows}\n</table>")


def _is_count_key(key: str) -> bool:
    """A per-category image count in an evaluation's details (``<reward>/n/<category>``), not a score."""
    return "n" in key.split("/")[1:]


def _as_int(x: Any) -> Any:
    """A whole float (a count read back from JSON as 32.0) as an int; anything else as it is."""
    return int(x) if isinstance(x, float) and x.is_integer() else x


def _short(x: float) -> str:
    """A constant in a sentence: a whole number in full (``320``, ``1``), else 4 significant digits."""
    return _fmt(int(x)) if float(x).is_integer() else f"{x:.4g}"


def _rel(path: Path, root: Path) -> str:
    return html.escape(path.relative_to(root).as_posix(), quote=True)


def _read_summary(root: Path) -> Dict[str, Any]:
    if not (root / SUMMARY).is_file():
        return {}
    try:
        loaded = json.loads((root / SUMMARY).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UsageError(f"{root / SUMMARY} is not JSON (line {e.lineno}: {e.msg})") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{root / SUMMARY} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise UsageError(f"cannot read {root / SUMMARY} ({e.strerror or type(e).__name__})") from None
    if not isinstance(loaded, dict):
        raise UsageError(f"{root / SUMMARY} must hold a JSON object")
    return loaded


def split_flat(data: Mapping[str, Tuple[Sequence[float], Sequence[float]]], requested: Sequence[str] = ()
               ) -> Tuple[Dict[str, Tuple[Sequence[float], Sequence[float]]], List[str], Dict[str, float]]:
    """``(shown, zero, constant)``: the series worth a plot; the names of those that are 0 at every
    point (a counter such as ``invalid_samples`` that never counted, a KL with no KL term) or, for a
    name in ``requested`` that :func:`series` dropped, have no finite value (all NaN); and name ->
    value of those that hold one other value at every one of at least two points (a constant learning
    rate, an on-policy ratio of exactly 1), which a line states better than a flat plot."""
    shown: Dict[str, Tuple[Sequence[float], Sequence[float]]] = {}
    zero: List[str] = []
    constant: Dict[str, float] = {}
    for k, (xs, ys) in data.items():
        if all(y == 0 for y in ys):
            zero.append(k)
        elif len(ys) >= 2 and all(y == ys[0] for y in ys):
            constant[k] = ys[0]
        else:
            shown[k] = (xs, ys)
    return shown, zero + [k for k in requested if k not in data], constant


def _plot_pages(data: Mapping[str, Tuple[Sequence[float], Sequence[float]]], root: Path, stem: str, title: str,
                **kw: Any) -> List[Tuple[Path, List[str]]]:
    """:func:`plot_panels` in pages of ``MAX_PANELS``: ``plots/<stem>.png``, ``plots/<stem>_2.png``, ...
    (pages left by an earlier report and not written now are removed); returns (path, panel names) per page."""
    items = list(data.items())
    pages = []
    for i in range(0, len(items), MAX_PANELS):
        chunk = dict(items[i:i + MAX_PANELS])
        name = f"{stem}.png" if i == 0 else f"{stem}_{i // MAX_PANELS + 1}.png"
        p = plot_panels(chunk, root / PLOTS / name, title=title, **kw)
        if p is not None:
            pages.append((p, list(chunk)))
    written = {p.name for p, _ in pages}
    for old in (root / PLOTS).glob(f"{stem}*.png"):  # pages an earlier report wrote and this one does not
        if old.name not in written and re.fullmatch(rf"{re.escape(stem)}(_\d+)?\.png", old.name):
            old.unlink(missing_ok=True)
    return pages


def _numeric_keys(records: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> List[str]:
    """The keys that hold a number (NaN included) in at least one record: text fields are not metrics."""
    return [k for k in keys
            if any(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) for r in records)]


def _curves(root: Path, metrics: Sequence[Mapping[str, Any]], evals: Sequence[Mapping[str, Any]]
            ) -> Tuple[List[Tuple[Path, str]], List[str], Dict[str, float]]:
    """Draw the plots: held-out reward per evaluation, training reward per step, the other per-step
    metrics. Returns ((path, caption) per image, in page order; the names of the series that are zero or
    NaN throughout; name -> value of the constant ones), the last two not plotted (:func:`split_flat`)."""
    keys = list(dict.fromkeys(k for rec in metrics for k in rec))
    if evals:
        names = list(dict.fromkeys(k for rec in evals for k in (rec.get("means") or {})))
        names.sort(key=lambda k: (k != "total", k))
        eval_rows = [{"step": rec["step"], **(rec.get("means") or {})} for rec in evals]
    else:  # a loop that logs held-out means into metrics.jsonl as eval/<name>
        names, eval_rows = sorted(k for k in keys if k.startswith("eval/")), list(metrics)
    reward_keys = sorted((k for k in keys if k.startswith("reward/")), key=lambda k: (k != "reward/total", k))
    other = sorted(k for k in _numeric_keys(metrics, keys) if k != "step" and not k.startswith(("reward/", "eval/")))

    groups = (
        (eval_rows, names, "reward_eval", "held-out reward (per evaluation)", "Held-out mean reward at each evaluation",
         {"smooth": False, "markers": True}),
        (metrics, reward_keys, "reward_train", "training reward (per step)",
         "Training reward per step (faint: raw; solid: running mean)", {}),
        (metrics, other, "train_metrics", "training metrics (per step)", "Other training metrics per step", {}),
    )
    figs: List[Tuple[Path, str]] = []
    zero: List[str] = []
    constant: Dict[str, float] = {}
    for rows, wanted, stem, title, caption, kw in groups:
        shown, flat, const = split_flat(series(rows, wanted), wanted)
        zero += flat
        constant.update(const)
        for p, panels in _plot_pages(shown, root, stem, title, **kw):
            figs.append((p, f"{caption}: {', '.join(panels)}."))
    return figs, zero, constant


def _lead_figure(root: Path, evals: Sequence[Mapping[str, Any]]) -> Tuple[str, str]:
    """(heading, HTML) of the page's first figure: ``before_after/grid.png`` (the first evaluation next
    to the latest, same prompts and seeds) when the run wrote it, else the first and last evaluation grids."""
    ba = root / BEFORE_AFTER / GRID_NAME
    if ba.is_file():
        caption = ("First evaluation (left of each pair) and the latest (right), same held-out prompts and seeds; "
                   "each image is captioned with its score.")
        if (root / BEFORE_AFTER / "index.html").is_file():
            caption += f' Per-image scores: <a href="{BEFORE_AFTER}/index.html">{BEFORE_AFTER}/index.html</a>.'
        return "Before / after", (f'<figure><img class="grid" src="{_rel(ba, root)}" alt="before and after">'
                                  f"<figcaption>{caption}</figcaption></figure>")
    grids = eval_grids(root)
    shown = grids[:1] + grids[-1:] if len(grids) > 1 else grids
    if not shown:
        return "", ""
    body = "\n".join(
        f'<figure><img class="grid" src="{_rel(p, root)}" alt="evaluation grid at step {s}">'
        f"<figcaption>{'first' if i == 0 and len(shown) > 1 else 'last'} evaluation, step {s}</figcaption></figure>"
        for i, (s, p) in enumerate(shown))
    return ("First and last evaluation" if len(shown) > 1 else "Evaluation grid"), body


def _eval_note(root: Path, evals: Sequence[Mapping[str, Any]]) -> str:
    """Which steps were evaluated and how: images, sampling steps and seeds (image runs), links to the
    first and last completions (text runs: ``samples`` of an eval.jsonl record)."""
    esc, last = html.escape, evals[-1]
    text = f"Evaluations at steps {esc(', '.join(str(r['step']) for r in evals))}"
    if "num_images" in last:
        text += (f"; {_fmt(last['num_images'])} images each ({esc(str(last.get('num_steps', '?')))} ODE steps, "
                 f"seeds {esc(str(last.get('seeds', '?')))})")
    links = [r["samples"] for r in (evals[:1] + evals[-1:] if len(evals) > 1 else evals)
             if isinstance(r.get("samples"), str) and not Path(r["samples"]).is_absolute()
             and ".." not in Path(r["samples"]).parts and (root / r["samples"]).is_file()]
    if links:
        text += "; completions: " + ", ".join(f'<a href="{esc(x, quote=True)}">{esc(x)}</a>' for x in links)
    return f"<p>{text}.</p>"


def _headline(first: Mapping[str, Any], last: Mapping[str, Any], steps: Tuple[Optional[int], Optional[int]]) -> str:
    """One sentence with the held-out result: the ``total`` reward (else the first one), first -> last."""
    key = "total" if "total" in last else next(iter(last), None)
    a, b = _number(first.get(key)) if key else None, _number(last.get(key)) if key else None
    if a is None or b is None:
        return ""
    where = f" from step {steps[0]} to step {steps[1]}" if None not in steps else ""
    return (f'<p class="lead">Held-out reward ({html.escape(str(key))}): {a:.4f} &rarr; {b:.4f} '
            f"({b - a:+.4f}){where}.</p>")


@dataclass
class _Run:
    """What a run folder holds: which of the three logs exist, and their records."""

    root: Path
    have: List[str]
    metrics: List[Dict[str, Any]]
    evals: List[Dict[str, Any]]
    summary: Dict[str, Any]


def _read_run(run_dir: Union[str, Path]) -> _Run:
    """Read the run folder; UsageError when it is missing, not a folder, holds none of metrics.jsonl,
    summary.json and eval.jsonl (or only empty ones), cannot be read, or cannot be written."""
    root = Path(run_dir)
    if not root.exists():
        raise UsageError(f"run folder not found: {root}")
    if not root.is_dir():
        raise UsageError(f"run folder {root} is a file, not a folder")
    have = [n for n in (METRICS, SUMMARY, EVAL_LOG) if (root / n).is_file()]
    if not have:
        raise UsageError(f"{root} holds no {METRICS}, {SUMMARY} or {EVAL_LOG}: not a flowrl run folder")
    try:
        metrics = read_jsonl(root / METRICS)
        evals = load_evals(root)
    except OSError as e:
        raise UsageError(f"cannot read the run folder {root} ({e.strerror or type(e).__name__}: {e.filename})") from None
    summary = _read_summary(root)
    if not metrics and not evals and not summary:
        raise UsageError(f"{root} holds no metrics: {', '.join(have)} {'is' if len(have) == 1 else 'are'} empty")
    writable_dir(root, "run folder")  # plots/ and report.html go into it
    return _Run(root, have, metrics, evals, summary)


def _first_last(run: _Run) -> Tuple[Mapping[str, Any], Mapping[str, Any], Tuple[Optional[int], Optional[int]]]:
    """(first, last, (first step, last step)): the held-out means of the first and last evaluation,
    from summary.json, else from eval.jsonl."""
    evals, summary = run.evals, run.summary
    first = summary.get("first_eval") or (evals[0].get("means") if evals else {}) or {}
    last = summary.get("last_eval") or (evals[-1].get("means") if evals else {}) or {}
    return first, last, ((evals[0]["step"], evals[-1]["step"]) if evals else (None, None))


def _result_header(run: _Run, first: Mapping[str, Any], last: Mapping[str, Any],
                   steps: Tuple[Optional[int], Optional[int]]) -> str:
    """The logs this folder lacks (if any), then the held-out result in one line."""
    missing = [n for n in (METRICS, SUMMARY, EVAL_LOG) if n not in run.have]
    missing_note = (f"<p class=\"note\">Not found in this run folder: {html.escape(', '.join(missing))}.</p>"
                    if missing else "")
    return f"{missing_note}\n{_headline(first, last, steps)}"


def _before_after_section(run: _Run) -> str:
    """The lead figure under its heading (:func:`_lead_figure`), or nothing."""
    heading, body = _lead_figure(run.root, run.evals)
    return f"<h2>{html.escape(heading)}</h2>\n{body}" if body else ""


def _held_out_section(run: _Run, first: Mapping[str, Any], last: Mapping[str, Any],
                      steps: Tuple[Optional[int], Optional[int]]) -> str:
    """First vs last evaluation per reward, then per category (image counts as a note), then which
    steps were evaluated and how."""
    table = _first_last_table(first, last, "held-out reward", "evals", steps) or "<p>No evaluation.</p>"
    details = counts_note = eval_note = ""
    if run.evals:
        d0, d1 = run.evals[0].get("details") or {}, run.evals[-1].get("details") or {}
        keys = list(dict.fromkeys([*d1, *d0]))
        scores = [k for k in keys if not _is_count_key(k)]
        details = _first_last_table({k: d0.get(k) for k in scores if k in d0},
                                    {k: d1.get(k) for k in scores if k in d1}, "per category", "details", steps)
        counts = {k: d1.get(k, d0.get(k)) for k in keys if _is_count_key(k)}
        if counts:
            listed = ", ".join(f"{html.escape(k.rsplit('/', 1)[-1])} {_fmt(_as_int(v))}" for k, v in counts.items())
            counts_note = f"<p>Images per category: {listed}.</p>"
        eval_note = _eval_note(run.root, run.evals)
    return "\n".join((table, details, counts_note, eval_note))


def _run_section(run: _Run) -> str:
    """The run's size: steps, wall clock, NFE, then the other scalars of summary.json."""
    summary, metrics = run.summary, run.metrics
    rows = [("steps", _fmt(summary.get("steps", metrics[-1].get("step") if metrics else None))),
            ("wall clock", _duration(summary.get("wall_clock_s"))),
            ("NFE", _fmt(summary.get("nfe")))]
    rows += [(k, _fmt(v)) for k, v in summary.items()
             if k not in ("steps", "wall_clock_s", "nfe", "first_eval", "last_eval") and not isinstance(v, (dict, list))]
    return "<table id=\"run\">\n" + "\n".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{v}</td></tr>" for k, v in rows) + "\n</table>"


def _curves_section(run: _Run) -> str:
    """The plots (:func:`_curves`), then the series not plotted: zero (or NaN) throughout, or constant."""
    esc = html.escape
    curves, zero, constant = _curves(run.root, run.metrics, run.evals)
    figs = "\n".join(f'<figure><img src="{_rel(p, run.root)}" alt="{esc(c)}"><figcaption>{esc(c)}</figcaption></figure>'
                     for p, c in curves)
    note = (f'<p class="note" id="hidden">Not plotted, zero (or NaN) throughout: {esc(", ".join(zero))}.</p>'
            if zero else "")
    if constant:
        listed = ", ".join(f"{esc(k)} {_short(v)}" for k, v in constant.items())
        note += f'\n<p class="note" id="constant">Not plotted, the same throughout: {listed}.</p>'
    return f"{figs or '<p>No numeric metrics to plot.</p>'}\n{note}"


def _config_section(root: Path) -> str:
    """config.yaml, folded (nothing when the run folder has none)."""
    if not (root / "config.yaml").is_file():
        return ""
    text = (root / "config.yaml").read_text(encoding="utf-8", errors="replace")
    return f"<details><summary>config.yaml</summary><pre>{html.escape(text)}</pre></details>"


def _page(title: str, body: str) -> str:
    """The HTML document: its title, a small stylesheet, and ``body``."""
    esc = html.escape
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>body{{font-family:sans-serif;margin:1.5em;color:#222;max-width:1400px}}
table{{border-collapse:collapse;margin:.8em 0}}td,th{{border:1px solid #ccc;padding:.25em .6em;text-align:right}}
td:first-child,th:first-child{{text-align:left}}figure{{margin:1em 0}}img{{max-width:100%}}
img.grid{{image-rendering:pixelated}}.note{{color:#a60}}.lead{{font-size:1.15em}}
pre{{background:#f6f6f6;padding:.6em}}</style></head><body>
<h1>{esc(title)}</h1>
{body}
</body></html>
"""


def write_report(run_dir: Union[str, Path], title: Optional[str] = None) -> Path:
    """Draw the plots and write ``<run>/report.html`` (see the module doc); returns its path.

    Raises UsageError when ``run_dir`` is not a folder or holds none of metrics.jsonl, summary.json
    and eval.jsonl."""
    run = _read_run(run_dir)
    first, last, steps = _first_last(run)
    body = [_result_header(run, first, last, steps), _before_after_section(run),
            "<h2>Held-out reward</h2>", _held_out_section(run, first, last, steps),
            "<h2>Run</h2>", _run_section(run),
            "<h2>Curves</h2>", _curves_section(run), _config_section(run.root)]
    title = title or f"flowrl run: {run.root.resolve().name}"
    return atomic_write(run.root / REPORT, _page(title, "\n".join(body)))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``flowrl report RUN_DIR``: (re)write a run folder's plots and report.html."""
    p = ArgumentParser(prog="flowrl report", description="Write plots and report.html for a run folder.")
    p.add_argument("run_dir", help="the run folder (output_dir of the run)")
    p.add_argument("--title", default=None, help="page title (default: the folder name)")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    out = write_report(args.run_dir, args.title)
    logger.info("wrote %s", out)
    return 0


if __name__ == "__main__":  # pragma: no cover
    from flowrl.cli import main as _cli_main

    sys.exit(_cli_main(["report", *sys.argv[1:]]))
