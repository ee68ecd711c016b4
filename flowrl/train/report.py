"""The run report: reward curves as PNG plots and one static, offline-readable ``report.html``.

It reads what a training run leaves in its folder::

    <run>/metrics.jsonl        one JSON object per training step: step, reward/total, reward/<name>,
                               kl, clip_frac, time/sampling, ... (written by the training loop)
    <run>/summary.json         steps, wall_clock_s, nfe, first_eval, last_eval (reward -> held-out mean)
    <run>/eval.jsonl           one record per evaluation (flowrl.train.evaluate.save_eval)
    <run>/eval/step-XXXXXXXX/grid.png
    <run>/config.yaml          the resolved config (shown folded at the end of the page)

and writes::

    <run>/plots/reward_train.png    training reward per step, one panel per reward/* key
    <run>/plots/reward_eval.png     held-out mean per evaluation step, one panel per reward
    <run>/plots/train_metrics.png   the other numeric per-step metrics (KL, clip fraction, timings, ...)
    <run>/report.html               summary table (first vs last evaluation), curves, first and last grids

Every image is referenced by a path relative to the run folder, so the folder can be copied or
archived and the page still reads offline. Lines of a JSONL file that do not parse (a line torn by a
crash) are skipped with a warning; for an evaluation step logged twice (after a resume) the last
record wins. Plots use matplotlib's Agg canvas directly (no pyplot state, no display needed).
"""
from __future__ import annotations

import html
import json
import logging
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from flowrl.inputs import ArgumentParser, UsageError, writable_dir

logger = logging.getLogger(__name__)

__all__ = ["read_jsonl", "load_evals", "eval_grids", "series", "running_mean", "plot_panels", "write_report", "main"]

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
    from flowrl.train.evaluate import EVAL_LOG

    by_step: Dict[int, Dict[str, Any]] = {}
    for rec in read_jsonl(Path(run_dir) / EVAL_LOG):
        step = rec.get("step")
        if isinstance(step, int) and not isinstance(step, bool):
            by_step[step] = rec
    return [by_step[s] for s in sorted(by_step)]


def eval_grids(run_dir: Union[str, Path]) -> List[Tuple[int, Path]]:
    """(step, path) of every ``eval/step-XXXXXXXX/grid.png`` that exists, by step."""
    from flowrl.train.evaluate import EVAL_DIR, GRID_NAME

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
    fig = Figure(figsize=(4.2 * ncols, 2.9 * nrows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
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
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format="png")
    os.replace(tmp, p)
    return p


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


def _first_last_table(first: Mapping[str, Any], last: Mapping[str, Any], label: str, table_id: str) -> str:
    names = list(dict.fromkeys([*last.keys(), *first.keys()]))
    if not names:
        return ""
    rows = "\n".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{_fmt(first.get(k))}</td><td>{_fmt(last.get(k))}</td>"
        f"<td>{_delta(first.get(k), last.get(k))}</td></tr>"
        for k in names
    )
    return (f'<table id="{table_id}"><tr><th>{html.escape(label)}</th><th>first eval</th><th>last eval</th>'
            f"<th>change</th></tr>\n{rows}\n</table>")


def _rel(path: Path, root: Path) -> str:
    return html.escape(path.relative_to(root).as_posix(), quote=True)


def write_report(run_dir: Union[str, Path], title: Optional[str] = None) -> Path:
    """Draw the plots and write ``<run>/report.html`` (see the module doc); returns its path.

    Raises UsageError when ``run_dir`` is not a folder or holds none of metrics.jsonl, summary.json
    and eval.jsonl."""
    from flowrl.train.evaluate import EVAL_LOG

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
    summary: Dict[str, Any] = {}
    if (root / SUMMARY).is_file():
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
        summary = loaded
    if not metrics and not evals and not summary:
        raise UsageError(f"{root} holds no metrics: {', '.join(have)} {'is' if len(have) == 1 else 'are'} empty")
    writable_dir(root, "run folder")  # plots/ and report.html go into it

    # ---- plots ----------------------------------------------------------------------------------
    keys = list(dict.fromkeys(k for rec in metrics for k in rec))
    reward_keys = sorted((k for k in keys if k.startswith("reward/")), key=lambda k: (k != "reward/total", k))
    train_plot = plot_panels(series(metrics, reward_keys), root / PLOTS / "reward_train.png",
                             title="training reward (per step)")
    eval_series: Dict[str, Tuple[List[float], List[float]]] = {}
    if evals:
        names = list(dict.fromkeys(k for rec in evals for k in (rec.get("means") or {})))
        names.sort(key=lambda k: (k != "total", k))
        rows = [{"step": rec["step"], **(rec.get("means") or {})} for rec in evals]
        eval_series = series(rows, names)
    else:  # a loop that logs held-out means into metrics.jsonl as eval/<name>
        eval_series = series(metrics, sorted(k for k in keys if k.startswith("eval/")))
    eval_plot = plot_panels(eval_series, root / PLOTS / "reward_eval.png", title="held-out reward (per evaluation)",
                            smooth=False, markers=True)
    other = [k for k in keys if k != "step" and not k.startswith(("reward/", "eval/"))
             and any(_number(rec.get(k)) is not None for rec in metrics)]
    metrics_plot = plot_panels(series(metrics, sorted(other)), root / PLOTS / "train_metrics.png",
                               title="training metrics (per step)")

    # ---- tables ---------------------------------------------------------------------------------
    esc = html.escape
    first_eval = summary.get("first_eval") or (evals[0].get("means") if evals else {}) or {}
    last_eval = summary.get("last_eval") or (evals[-1].get("means") if evals else {}) or {}
    run_rows = [("steps", _fmt(summary.get("steps", metrics[-1].get("step") if metrics else None))),
                ("wall clock", _duration(summary.get("wall_clock_s"))),
                ("NFE", _fmt(summary.get("nfe")))]
    for k, v in summary.items():
        if k in ("steps", "wall_clock_s", "nfe", "first_eval", "last_eval") or isinstance(v, (dict, list)):
            continue
        run_rows.append((k, _fmt(v)))
    run_table = "<table id=\"run\">\n" + "\n".join(
        f"<tr><td>{esc(str(k))}</td><td>{v}</td></tr>" for k, v in run_rows) + "\n</table>"
    eval_table = _first_last_table(first_eval, last_eval, "held-out reward", "evals")
    details_table = ""
    if len(evals) >= 1:
        details_table = _first_last_table(evals[0].get("details") or {}, evals[-1].get("details") or {},
                                          "per category", "details")
    if evals:
        eval_note = (f"<p>Evaluations at steps {esc(', '.join(str(r['step']) for r in evals))}; "
                     f"{evals[-1].get('num_images', '?')} images each ({evals[-1].get('num_steps', '?')} ODE steps, "
                     f"seeds {esc(str(evals[-1].get('seeds', '?')))}).</p>")
    else:
        eval_note = ""

    # ---- figures --------------------------------------------------------------------------------
    figs = []
    for p, caption in ((train_plot, "Training reward per step (faint: raw; solid: running mean)."),
                       (eval_plot, "Held-out mean reward at each evaluation."),
                       (metrics_plot, "Other training metrics per step.")):
        if p is not None:
            figs.append(f'<figure><img src="{_rel(p, root)}" alt="{esc(caption)}"><figcaption>{esc(caption)}'
                        f"</figcaption></figure>")
    grids = eval_grids(root)
    shown = grids[:1] + grids[-1:] if len(grids) > 1 else grids
    grid_html = "\n".join(
        f'<figure><img class="grid" src="{_rel(p, root)}" alt="evaluation grid at step {s}">'
        f"<figcaption>{'first' if i == 0 and len(shown) > 1 else 'last'} evaluation, step {s}</figcaption></figure>"
        for i, (s, p) in enumerate(shown))
    config_html = ""
    if (root / "config.yaml").is_file():
        config_html = ("<details><summary>config.yaml</summary><pre>"
                       f"{esc((root / 'config.yaml').read_text(encoding='utf-8', errors='replace'))}</pre></details>")
    missing = [n for n in (METRICS, SUMMARY, EVAL_LOG) if n not in have]
    missing_note = f"<p class=\"note\">Not found in this run folder: {esc(', '.join(missing))}.</p>" if missing else ""

    title = title or f"flowrl run: {root.resolve().name}"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>body{{font-family:sans-serif;margin:1.5em;color:#222;max-width:1400px}}
table{{border-collapse:collapse;margin:.8em 0}}td,th{{border:1px solid #ccc;padding:.25em .6em;text-align:right}}
td:first-child,th:first-child{{text-align:left}}figure{{margin:1em 0}}img{{max-width:100%}}
img.grid{{image-rendering:pixelated}}.note{{color:#a60}}pre{{background:#f6f6f6;padding:.6em}}</style></head><body>
<h1>{esc(title)}</h1>
{missing_note}
<h2>Summary</h2>
{run_table}
{eval_table}
{details_table}
{eval_note}
<h2>Curves</h2>
{chr(10).join(figs) or '<p>No numeric metrics to plot.</p>'}
<h2>Evaluation grids</h2>
{grid_html or '<p>No evaluation grids.</p>'}
{config_html}
</body></html>
"""
    out = root / REPORT
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out


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
