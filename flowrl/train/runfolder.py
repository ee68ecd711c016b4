"""The run folder's file format: where evaluations go, and how every file of it is written.

Every file is written whole with :func:`atomic_write` (a temporary file in the same folder, fsync,
``os.replace``), so a reader or a crash sees the old file or the new one, never half of one. The
JSONL logs are the exception: :func:`append_jsonl` adds one line per record (see there why).

Layout of a run folder's evaluations (written by :func:`save_eval`, read by
:mod:`flowrl.train.report`)::

    <run>/eval.jsonl                        one JSON object per evaluation (see EvalResult.summary)
    <run>/eval/step-00000050/grid.png       the captioned grid of that evaluation
    <run>/eval/step-00000050/scores.csv     prompt, seed, every reward, total
    <run>/eval/step-00000050/samples.jsonl  text runs: prompt, completion, every reward
    <run>/before_after/                     image runs: grid.png, index.html, scores.csv of the first
                                            evaluation beside the latest (:func:`write_comparison`),
                                            first.safetensors the first evaluation (:func:`save_eval_result`)
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple, Union

from flowrl.inputs import writable_dir

if TYPE_CHECKING:
    from flowrl.train.evaluate import EvalResult

__all__ = [
    "atomic_write",
    "append_jsonl",
    "save_png",
    "write_scores_csv",
    "eval_dir",
    "before_after_dir",
    "save_eval",
    "save_eval_result",
    "load_eval_result",
    "write_comparison",
    "EVAL_DIR",
    "EVAL_LOG",
    "GRID_NAME",
    "SCORES_NAME",
    "SAMPLES_NAME",
    "BEFORE_AFTER",
    "FIRST_EVAL",
]

EVAL_DIR = "eval"  # <run>/eval/step-XXXXXXXX/
EVAL_LOG = "eval.jsonl"  # <run>/eval.jsonl
GRID_NAME = "grid.png"
SCORES_NAME = "scores.csv"
SAMPLES_NAME = "samples.jsonl"
BEFORE_AFTER = "before_after"  # <run>/before_after/
FIRST_EVAL = "first.safetensors"  # <run>/before_after/first.safetensors


# --------------------------------------------------------------------------------------------------
# Writing files
# --------------------------------------------------------------------------------------------------


def atomic_write(path: Union[str, Path], data: Union[bytes, str]) -> Path:
    """Write ``data`` (text as UTF-8, newlines as given) to ``path`` atomically: a temporary file in
    the same folder, flushed and fsync'd, then ``os.replace``; the temporary file is removed when
    anything fails, and the old file, if any, is left as it was. Creates the folder. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, an interrupt: no temporary file left behind
        tmp.unlink(missing_ok=True)
        raise
    return path


def append_jsonl(path: Union[str, Path], record: Dict[str, Any], *, allow_nan: bool = True) -> None:
    """Add ``record`` as one line to a JSONL log, flushed and fsync'd.

    Appended, not rewritten with :func:`atomic_write`: a log grows by one line a step, and rewriting
    it whole every step would cost O(steps²). A crash can at most cut the last line: readers skip a
    line that does not parse (:func:`flowrl.train.report.read_jsonl`), and a resume rewrites the log
    without it (``flowrl.train.loop``'s ``_truncate_jsonl``)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, allow_nan=allow_nan) + "\n")
        f.flush()
        os.fsync(f.fileno())


def save_png(image: Any, path: Path) -> Path:
    """Write a PIL image as PNG (:func:`atomic_write`)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return atomic_write(path, buf.getvalue())


def csv_value(x: float) -> str:
    """A score as written to ``scores.csv``: 6 significant digits, ``nan`` when not finite."""
    return f"{x:.6g}" if math.isfinite(x) else "nan"


def write_scores_csv(path: Path, rows: List[Dict[str, Any]], columns: List[str]) -> Path:
    """``scores.csv``: a header of ``columns``, then ``rows`` (:func:`atomic_write`)."""
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=columns)
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return atomic_write(path, buf.getvalue())


# --------------------------------------------------------------------------------------------------
# Evaluations in a run folder
# --------------------------------------------------------------------------------------------------


def eval_dir(run_dir: Union[str, Path], step: int) -> Path:
    """``<run>/eval/step-XXXXXXXX`` (8 digits, as checkpoints)."""
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step: must be an int >= 0, got {step!r}")
    return Path(run_dir) / EVAL_DIR / f"step-{step:08d}"


def before_after_dir(run_dir: Union[str, Path]) -> Path:
    """``<run>/before_after``: the first evaluation beside the latest (image runs)."""
    return Path(run_dir) / BEFORE_AFTER


def save_eval(run_dir: Union[str, Path], step: int, result: EvalResult, ncols: Optional[int] = None) -> Path:
    """Write ``eval/step-XXXXXXXX/grid.png`` and ``scores.csv`` for ``result`` and append its
    :meth:`EvalResult.summary` (with ``step`` and the grid's path relative to the run) to
    ``<run>/eval.jsonl``. Returns the step's folder. Re-saving a step (after a resume) replaces its
    files; readers keep the last line of a step."""
    from flowrl.train.grids import image_grid  # heavy: torch and PIL

    d = eval_dir(run_dir, step)
    ncols = ncols or min(result.num_images, max(len(result.seeds), math.ceil(math.sqrt(result.num_images))))
    save_png(image_grid(result.images, result.captions(), ncols), d / GRID_NAME)
    columns = ["prompt", "seed", *result.scores, "total"]
    rows = []
    for i, (p, s) in enumerate(zip(result.row_prompts(), result.row_seeds())):
        row = {"prompt": p, "seed": s, "total": csv_value(float(result.total[i]))}
        row.update({k: csv_value(float(v[i])) for k, v in result.scores.items()})
        rows.append(row)
    write_scores_csv(d / SCORES_NAME, rows, columns)
    record = {"step": int(step), **result.summary(), "grid": f"{EVAL_DIR}/{d.name}/{GRID_NAME}"}
    append_jsonl(Path(run_dir) / EVAL_LOG, record, allow_nan=False)
    return d


def save_eval_result(path: Union[str, Path], step: int, result: EvalResult) -> Path:
    """Keep an evaluation for later comparison (the run's first one, for ``before_after/`` after a
    resume): images as 8-bit (what every grid shows: ``round(255 x)``), scores and the rest as
    safetensors metadata. Written atomically."""
    import torch  # heavy
    from safetensors.torch import save

    tensors = {"images": (result.images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).contiguous(),
               "total": result.total.detach().cpu().contiguous(), "valid": result.valid.detach().cpu().contiguous()}
    tensors.update({f"score/{k}": v.detach().cpu().contiguous() for k, v in result.scores.items()})
    meta = {"step": int(step), "prompts": result.prompts, "seeds": list(result.seeds), "weights": result.weights,
            "means": result.means, "details": result.details, "nfe": result.nfe, "num_steps": result.num_steps,
            "guidance_scale": result.guidance_scale, "height": result.height, "width": result.width,
            "wall_clock_s": result.wall_clock_s, "scores": list(result.scores)}
    if result.sources is not None and all(isinstance(x, str) for x in result.sources):
        meta["sources"] = list(result.sources)  # editing: the source images' paths
    return atomic_write(path, save(tensors, metadata={"flowrl_eval": json.dumps(meta)}))


def load_eval_result(path: Union[str, Path]) -> Tuple[int, EvalResult]:
    """``(step, result)`` written by :func:`save_eval_result` (images back in [0, 1])."""
    from safetensors import safe_open  # heavy: torch

    from flowrl.train.evaluate import EvalResult

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["flowrl_eval"])
        t = {k: f.get_tensor(k) for k in f.keys()}
    result = EvalResult(
        prompts=meta["prompts"], seeds=meta["seeds"], images=t["images"].float() / 255,
        scores={k: t[f"score/{k}"] for k in meta["scores"]}, total=t["total"], valid=t["valid"],
        weights=meta["weights"], means=meta["means"], details=meta["details"], nfe=meta["nfe"],
        num_steps=meta["num_steps"], guidance_scale=meta["guidance_scale"], height=meta["height"],
        width=meta["width"], wall_clock_s=meta["wall_clock_s"], sources=meta.get("sources"))
    return int(meta["step"]), result


def write_comparison(out: Union[str, Path], base: EvalResult, tuned: EvalResult,
                     labels: Tuple[str, str] = ("base", "tuned"), title: str = "flowrl grid",
                     pairs_per_row: Optional[int] = None) -> Tuple[Path, Path]:
    """Write ``grid.png`` (:func:`flowrl.train.grids.side_by_side`), ``index.html``
    (:func:`flowrl.train.grids.comparison_html`) and ``scores.csv`` (prompt, seed, every reward and
    total for both sides) to ``out`` (``before_after/`` of a run, or ``flowrl grid --out``); returns
    (png, html)."""
    from flowrl.train.grids import comparison_html, side_by_side  # heavy: torch and PIL

    out = writable_dir(out, "output folder")
    png = save_png(side_by_side(base, tuned, labels, pairs_per_row), out / GRID_NAME)
    page = atomic_write(out / "index.html", comparison_html(base, tuned, GRID_NAME, labels, title))
    keys = [*base.scores, "total"]
    columns = ["prompt", "seed"] + [f"{side}/{k}" for side in ("base", "tuned") for k in keys]
    rows = []
    for i, (p, s) in enumerate(zip(base.row_prompts(), base.row_seeds())):
        row: Dict[str, Any] = {"prompt": p, "seed": s}
        for side, r in (("base", base), ("tuned", tuned)):
            for k in keys:
                v = r.total if k == "total" else r.scores.get(k)
                row[f"{side}/{k}"] = csv_value(float(v[i])) if v is not None else "nan"
        rows.append(row)
    write_scores_csv(out / SCORES_NAME, rows, columns)
    return png, page
