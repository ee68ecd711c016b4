"""``flowrl score``: score a folder of images against their prompts with one or more scorers.

    flowrl score --scorer NAME [--checkpoint PATH] --images DIR --prompts FILE
                 [--output scores.csv] [--device cpu] [--dtype float32] [--batch-size 16]
                 [--option KEY=VALUE ...]

The images of DIR, sorted by file name, are paired with the lines of FILE in order (one prompt for
all images if FILE holds one line), and passed to the scorers as PIL images as loaded, so learned
scorers preprocess them as their official packages do. ``--scorer`` may be repeated (one column
each; ``--option NAME.KEY=VALUE`` targets one). Prints a table and each scorer's mean ± std and
writes ``scores.csv`` (``image, prompt, <scorer>...``). Returns 0, or 2 on a usage or input error
(one line on stderr). The pairing rules in full: docs/methods.md ("flowrl score").
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import sys
from typing import Dict, List, Optional, Sequence, TextIO

import torch
from PIL import Image

import scorers
from flowrl.inputs import DTYPE_NAMES, ArgumentParser, UsageError, torch_dtype, writable_file  # UsageError: bad input, exit status 2

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="flowrl score",
        description="Score images against prompts. The i-th line of --prompts goes with the i-th image "
        "of --images in file-name order (one prompt for all images if the file has one line).",
    )
    p.add_argument("--scorer", action="append", required=True, help="scorer name or dotted path (repeatable)")
    p.add_argument("--checkpoint", default=None, help="checkpoint (file, folder, URL or hub id) for a single scorer")
    p.add_argument("--images", required=True, help="folder of images (.png .jpg .jpeg .webp .bmp)")
    p.add_argument("--prompts", required=True, help="text file, one prompt per line, in image file-name order")
    p.add_argument("--output", default="scores.csv", help="CSV file to write (default: scores.csv)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPE_NAMES))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--option", action="append", default=[], metavar="[NAME.]KEY=VALUE",
                   help="extra scorer option (value parsed as JSON when possible); repeatable")
    return p


def list_images(folder: str) -> List[str]:
    """Image files directly in ``folder``, sorted by file name (string order)."""
    if not os.path.isdir(folder):
        raise UsageError(f"--images: not a folder: {folder}")
    try:
        names = sorted(f for f in os.listdir(folder)
                       if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, f)))
    except OSError as e:
        raise UsageError(f"--images: cannot list {folder} ({e.strerror or type(e).__name__})") from None
    if not names:
        raise UsageError(f"--images: no image files ({' '.join(IMAGE_EXTENSIONS)}) in {folder}")
    return [os.path.join(folder, f) for f in names]


def read_prompts(path: str, n_images: int) -> List[str]:
    """One prompt per line (line breaks removed); a single prompt is repeated for all images."""
    if not os.path.isfile(path):
        raise UsageError(f"--prompts: file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as e:
        raise UsageError(f"--prompts: {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise UsageError(f"--prompts: cannot read {path} ({e.strerror or type(e).__name__})") from None
    if len(lines) == 1:
        return lines * n_images
    if len(lines) != n_images:
        raise UsageError(
            f"--prompts: {path} has {len(lines)} lines but --images has {n_images} images; "
            "give one prompt per image (or a single prompt for all)"
        )
    return lines


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_options(items: Sequence[str], scorer_names: Sequence[str]) -> Dict[str, Dict[str, object]]:
    """``KEY=VALUE`` (all scorers) and ``NAME.KEY=VALUE`` (one scorer) → per-scorer option dicts."""
    per: Dict[str, Dict[str, object]] = {n: {} for n in scorer_names}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--option {item!r}: expected KEY=VALUE")
        target, dot, k = key.rpartition(".")
        if dot and target in per:
            per[target][k] = _parse_value(value)
        elif dot:
            raise UsageError(f"--option {item!r}: {target!r} is not one of the scorers {list(scorer_names)}")
        else:
            for n in per:
                per[n][key] = _parse_value(value)
    return per


def _load_groups(paths: List[str]):
    """Open the images as they are (no mode conversion: the official pipelines convert to RGB
    themselves, some after resizing); group indices by size (scorers without an official PIL
    pipeline batch images of one size)."""
    images, groups = [], {}
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                im.load()  # read the pixels now; the file is closed on leaving the block
        except Exception as e:
            raise UsageError(f"--images: cannot read {p}: {e}") from e
        images.append(im)
        groups.setdefault(im.size, []).append(i)
    return images, groups


def _fmt(x: float) -> str:
    return f"{x:.4f}" if math.isfinite(x) else str(x)


def main(argv: Optional[Sequence[str]] = None, stdout: Optional[TextIO] = None) -> int:
    """Entry point of ``flowrl score`` (see the module docstring). Returns the exit status."""
    out = stdout or sys.stdout

    try:
        args = build_parser().parse_args(argv)
        names = list(dict.fromkeys(args.scorer))
        if args.checkpoint is not None and len(names) > 1:
            raise UsageError("--checkpoint needs a single --scorer; use --option NAME.checkpoint=PATH")
        if args.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
        options = parse_options(args.option, names)
        paths = list_images(args.images)
        prompts = read_prompts(args.prompts, len(paths))
        writable_file(args.output, "--output")  # its folder is created when missing, as for --out
        images, groups = _load_groups(paths)
    except UsageError as e:
        print(f"flowrl score: error: {e}", file=sys.stderr)
        return 2

    results: Dict[str, torch.Tensor] = {}
    for name in names:
        kw = {"device": args.device, "dtype": torch_dtype(args.dtype), "batch_size": args.batch_size, **options[name]}
        if args.checkpoint is not None:
            kw["checkpoint"] = args.checkpoint
        try:
            scorer = scorers.get(name, **kw)
        except (scorers.UnknownScorerError, ValueError, TypeError, OSError) as e:
            print(f"flowrl score: error: scorer {name!r}: {e}", file=sys.stderr)
            return 2
        col = torch.full((len(paths),), float("nan"))
        for idx in groups.values():
            s = scorer([images[i] for i in idx], [prompts[i] for i in idx])
            col[torch.tensor(idx)] = s.detach().float().cpu()
        results[name] = col

    with open(args.output, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "prompt", *names])
        for i, p in enumerate(paths):
            w.writerow([os.path.basename(p), prompts[i], *(repr(float(results[n][i])) for n in names)])

    width = max(len("image"), *(len(os.path.basename(p)) for p in paths))
    colw = [max(10, len(n)) for n in names]
    header = f"{'image':<{width}}  " + "  ".join(f"{n:>{c}}" for n, c in zip(names, colw)) + "  prompt"
    print(header, file=out)
    print("-" * len(header), file=out)
    for i, p in enumerate(paths):
        prompt = prompts[i] if len(prompts[i]) <= 60 else prompts[i][:57] + "..."
        vals = "  ".join(f"{_fmt(float(results[n][i])):>{c}}" for n, c in zip(names, colw))
        print(f"{os.path.basename(p):<{width}}  {vals}  {prompt}", file=out)
    print("-" * len(header), file=out)
    for n in names:
        v = results[n][torch.isfinite(results[n])]
        bad = len(paths) - v.numel()
        std = float(v.std()) if v.numel() > 1 else 0.0
        mean = float(v.mean()) if v.numel() else float("nan")
        extra = f" ({bad} non-finite)" if bad else ""
        print(f"{n}: mean {_fmt(mean)} ± {_fmt(std)} over {v.numel()} images{extra}", file=out)
    print(f"wrote {args.output}", file=out)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
