"""Captioned image grids: one evaluation's grid, and base vs tuned side by side with its HTML page.

Images are quantised as ``round(255 x)`` (DDPO's rule); small images are upscaled by an integer
factor (NEAREST) and large ones downscaled so that a grid stays readable (:func:`cell_size`). Each
caption keeps its last line (the scores) whole and trims the prompt above it with '...'
(:func:`caption_lines`). Files are written by :mod:`flowrl.train.runfolder`.
"""
from __future__ import annotations

import html
import json
import math
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from flowrl.train.evaluate import EvalResult, format_delta, format_score

__all__ = ["to_pil", "cell_size", "line_height", "caption_lines", "image_grid", "side_by_side", "comparison_html",
           "PAD"]

PAD = 4  # pixels around every image of a grid
MIN_SIDE = 128  # images whose longer side is smaller are upscaled (NEAREST, integer factor) to at least this
MAX_SIDE = 512  # images whose longer side is larger are downscaled to this
CAPTION_LINES = 3  # text lines under each image of a grid
BACKGROUND = (255, 255, 255)
TEXT_COLOR = (20, 20, 20)
ELLIPSIS = "..."


# --------------------------------------------------------------------------------------------------
# Grids
# --------------------------------------------------------------------------------------------------


def to_pil(image: Tensor):
    """[3, H, W] float in [0, 1] → RGB PIL image, quantised as ``round(x · 255)`` (DDPO's rule); a video
    [3, F, H, W] gives the strip of its frames (:func:`frame_strip`)."""
    from PIL import Image

    if image.ndim == 4:
        image = frame_strip(image.unsqueeze(0))[0]
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image: expected [3, H, W], got shape {tuple(image.shape)}")
    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, mode="RGB")


def frame_strip(videos: Tensor) -> Tensor:
    """Videos ``[N, 3, F, H, W]`` -> images ``[N, 3, H, F * W]``: each video's frames side by side, left to
    right (how a grid shows a video sample)."""
    if videos.ndim != 5 or videos.shape[1] != 3:
        raise ValueError(f"videos: expected [N, 3, F, H, W], got shape {tuple(videos.shape)}")
    n, c, f, h, w = videos.shape
    return videos.permute(0, 1, 3, 2, 4).reshape(n, c, h, f * w)


def _pil_list(images: Any) -> List[Any]:
    if isinstance(images, Tensor):
        if images.ndim == 5:  # videos: a strip of frames per sample
            images = frame_strip(images)
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected [N, 3, H, W], got shape {tuple(images.shape)}")
        return [to_pil(x) for x in images]
    out = [im.convert("RGB") if hasattr(im, "convert") else None for im in images]
    if any(o is None for o in out):
        raise ValueError("images: expected a [N, 3, H, W] tensor or a list of PIL images")
    return out


def cell_size(height: int, width: int, min_side: int = MIN_SIDE, max_side: int = MAX_SIDE) -> Tuple[int, int]:
    """Displayed (height, width) of an image in a grid: an integer NEAREST upscale ``k = ⌈min_side /
    max(h, w)⌉`` when the longer side is below ``min_side`` (32 px → ×4 = 128 px), a downscale to
    ``max_side`` when it is above, else unchanged."""
    long = max(height, width)
    if long < min_side:
        k = -(-min_side // long)
        return height * k, width * k
    if long > max_side:
        f = max_side / long
        return max(1, round(height * f)), max(1, round(width * f))
    return height, width


def _font(font: Any = None):
    from PIL import ImageFont

    return font if font is not None else ImageFont.load_default()


def line_height(font: Any = None) -> int:
    """Pixels per caption line of ``font`` (the PIL default font when None)."""
    f = _font(font)
    box = f.getbbox("Agjy|")
    return int(box[3] - min(0, box[1])) + 2


def _text_width(font: Any, text: str) -> float:
    box = font.getbbox(text)
    return box[2] - box[0] if text else 0


def _wrap(text: str, font: Any, width: int) -> List[str]:
    """Greedy word wrap to ``width`` pixels; words longer than a line are cut by characters."""
    lines: List[str] = []
    line = ""
    for word in text.split():
        cand = f"{line} {word}" if line else word
        if _text_width(font, cand) <= width:
            line = cand
            continue
        if line:
            lines.append(line)
        while _text_width(font, word) > width and len(word) > 1:  # hard-break an over-long word
            cut = len(word) - 1
            while cut > 1 and _text_width(font, word[:cut]) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        line = word
    if line:
        lines.append(line)
    return lines


def _fit(line: str, font: Any, width: int) -> str:
    """``line`` shortened to end with '...' within ``width`` pixels."""
    while line and _text_width(font, line + ELLIPSIS) > width:
        line = line[:-1]
    return line.rstrip() + ELLIPSIS


def caption_lines(caption: str, font: Any, width: int, max_lines: int) -> List[str]:
    """The lines drawn for ``caption`` in a cell ``width`` pixels wide: its last paragraph (after the
    last newline: the scores) is kept, the text before it wrapped and trimmed with '...' into the
    lines left."""
    if max_lines < 1:
        return []
    head, sep, tail = caption.rpartition("\n")
    if not sep:
        head, tail = tail, ""
    tail_lines = _wrap(tail, font, width)[:max_lines] if tail else []
    room = max_lines - len(tail_lines)
    head_lines = _wrap(head, font, width)
    if len(head_lines) > room:
        head_lines = head_lines[:room]
        if head_lines:
            head_lines[-1] = _fit(head_lines[-1], font, width)
    return head_lines + tail_lines


def image_grid(
    images: Any,
    captions: Optional[Sequence[str]] = None,
    ncols: Optional[int] = None,
    *,
    min_side: int = MIN_SIDE,
    max_side: int = MAX_SIDE,
    lines: int = CAPTION_LINES,
    font: Any = None,
):
    """A PIL grid of ``images`` (a [N, 3, H, W] tensor in [0, 1] or PIL images of one size; videos
    [N, 3, F, H, W] show as strips of their frames, :func:`frame_strip`), row-major
    in ``ncols`` columns (default ⌈√N⌉), each with its caption under it (``lines`` lines, see
    :func:`caption_lines`).

    Every cell is ``(w' + 2·PAD) × (PAD + h' + PAD + lines·line_height + PAD)`` pixels, with
    ``(h', w') = cell_size(H, W)``; without captions the caption band is left out.
    """
    from PIL import Image, ImageDraw

    ims = _pil_list(images)
    n = len(ims)
    if n == 0:
        raise ValueError("images: need at least one image")
    sizes = {im.size for im in ims}
    if len(sizes) != 1:
        raise ValueError(f"images: all images of a grid must share one size, got {sorted(sizes)}")
    if captions is not None and len(captions) != n:
        raise ValueError(f"captions: got {len(captions)} captions for {n} images")
    if ncols is None:
        ncols = math.ceil(math.sqrt(n))
    if not isinstance(ncols, int) or ncols < 1:
        raise ValueError(f"ncols: must be an int >= 1, got {ncols!r}")
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    w, h = ims[0].size
    ch, cw = cell_size(h, w, min_side, max_side)
    f = _font(font)
    lh = line_height(f)
    band = (lines * lh + PAD) if captions is not None and lines > 0 else 0
    cell_w, cell_h = cw + 2 * PAD, ch + 2 * PAD + band
    grid = Image.new("RGB", (ncols * cell_w, nrows * cell_h), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    resample = Image.NEAREST if ch >= h else Image.LANCZOS
    for i, im in enumerate(ims):
        r, c = divmod(i, ncols)
        x0, y0 = c * cell_w, r * cell_h
        grid.paste(im if (ch, cw) == (h, w) else im.resize((cw, ch), resample), (x0 + PAD, y0 + PAD))
        if band:
            y = y0 + PAD + ch + PAD
            for line in caption_lines(captions[i], f, cw, lines):
                draw.text((x0 + PAD, y), line, fill=TEXT_COLOR, font=f)
                y += lh
    return grid


def side_by_side(base: EvalResult, tuned: EvalResult, labels: Tuple[str, str] = ("base", "tuned"),
                 pairs_per_row: Optional[int] = None, font: Any = None):
    """Grid of image pairs, base left and tuned right, for the same prompts and seeds; captions give
    the prompt, the seed and each side's score (the tuned side with its change), and a header names
    the two sides over every column. An editing evaluation (``sources``: a source image per prompt)
    gets triples source | base | tuned."""
    from PIL import Image, ImageDraw

    if base.prompts != tuned.prompts or base.seeds != tuned.seeds:
        raise ValueError("base and tuned: must be evaluations of the same prompts and seeds")
    if base.images.shape != tuned.images.shape:
        raise ValueError(f"base and tuned: image shapes differ ({tuple(base.images.shape)} vs {tuple(tuned.images.shape)})")
    n = base.num_images
    pairs_per_row = min(n, 4) if pairs_per_row is None else pairs_per_row
    if not isinstance(pairs_per_row, int) or pairs_per_row < 1:
        raise ValueError(f"pairs_per_row: must be an int >= 1, got {pairs_per_row!r}")
    pairs_per_row = min(pairs_per_row, n)
    key, b_vals = base.headline()
    t_vals = tuned.total if key == "total" else tuned.scores[key]
    sources = source_images(tuned.sources or base.sources, len(base.seeds), base.images.shape[-2:])
    k = 2 if sources is None else 3
    names = tuple(labels) if sources is None else ("source", *labels)
    images, captions = [], []
    for i, (p, s) in enumerate(zip(base.row_prompts(), base.row_seeds())):
        b, t = float(b_vals[i]), float(t_vals[i])
        if sources is not None:
            images.append(sources[i])
            captions.append(f"{p}\nseed {s}")
        images += [base.images[i], tuned.images[i]]
        captions.append(f"{p}\nseed {s}, {key} {format_score(b)}")
        captions.append(f"{p}\n{key} {format_score(t)} ({format_delta(t - b)})")
    grid = image_grid(torch.stack(images), captions, ncols=k * pairs_per_row, font=font)
    f = _font(font)
    header = line_height(f) + 2 * PAD
    out = Image.new("RGB", (grid.width, grid.height + header), BACKGROUND)
    out.paste(grid, (0, header))
    draw = ImageDraw.Draw(out)
    cell_w = grid.width // (k * pairs_per_row)
    for c in range(k * pairs_per_row):
        text = names[c % k]
        tw = _text_width(f, text)
        if tw > cell_w - 2 * PAD:
            text = _fit(text, f, cell_w - 2 * PAD)
            tw = _text_width(f, text)
        draw.text((c * cell_w + (cell_w - tw) / 2, PAD), text, fill=TEXT_COLOR, font=f)
    return out


def source_images(sources: Optional[Sequence[Any]], per_prompt: int, hw: Sequence[int]) -> Optional[Tensor]:
    """Each row's source image (``sources``: one per prompt, repeated over its ``per_prompt`` seeds) as a
    [N, 3, H, W] tensor in [0, 1] resized to the grid's ``hw``; None when there are none."""
    if not sources:
        return None
    from PIL import Image

    from flowrl.flow.policy import load_image

    h, w = int(hw[0]), int(hw[1])
    rows = []
    for src in sources:
        im = load_image(src)
        if isinstance(im, Tensor):
            t = torch.nn.functional.interpolate(im.float().clamp(0, 1), size=(h, w), mode="bilinear", align_corners=False)[0]
        else:
            arr = torch.frombuffer(bytearray(im.resize((w, h), Image.BILINEAR).tobytes()), dtype=torch.uint8)
            t = arr.reshape(h, w, 3).permute(2, 0, 1).float() / 255
        rows += [t] * per_prompt
    return torch.stack(rows)


# --------------------------------------------------------------------------------------------------
# The comparison page
# --------------------------------------------------------------------------------------------------


def _table_rows(base: EvalResult, tuned: EvalResult) -> List[Tuple[str, float, float]]:
    keys = list(base.means)
    rows = [(k, base.means[k], tuned.means.get(k, math.nan)) for k in keys]
    for k in base.details:
        if k in tuned.details:
            rows.append((k, base.details[k], tuned.details[k]))
    return rows


def comparison_html(base: EvalResult, tuned: EvalResult, grid_file: str, labels: Tuple[str, str] = ("base", "tuned"),
                    title: str = "flowrl grid") -> str:
    """A static HTML page: the grid PNG by relative path and the table of mean scores (and
    per-category numbers), base vs tuned with the change."""
    esc = html.escape
    rows = []
    for k, b, t in _table_rows(base, tuned):
        rows.append(f"<tr><td>{esc(k)}</td><td>{format_score(b)}</td><td>{format_score(t)}</td>"
                    f"<td>{format_delta(t - b)}</td></tr>")
    settings = (f"{len(base.prompts)} prompts &times; {len(base.seeds)} seeds (seeds {esc(str(base.seeds))}), "
                f"{base.num_steps} ODE steps, guidance {base.guidance_scale:g}, {base.height}&times;{base.width} px, "
                f"{base.nfe_per_image:g} NFE per image; weights {esc(json.dumps(base.weights))}")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>body{{font-family:sans-serif;margin:1.5em;color:#222}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:.25em .6em;text-align:right}}td:first-child,th:first-child{{text-align:left}}
img{{max-width:100%;image-rendering:pixelated}}</style></head><body>
<h1>{esc(title)}</h1>
<p>{settings}</p>
<table id="means"><tr><th>score</th><th>{esc(labels[0])}</th><th>{esc(labels[1])}</th><th>change</th></tr>
{chr(10).join(rows)}
</table>
<p>Means over valid samples (invalid: {int((~base.valid).sum())} {esc(labels[0])}, {int((~tuned.valid).sum())} {esc(labels[1])}).</p>
<img src="{esc(grid_file, quote=True)}" alt="{esc(labels[0])} vs {esc(labels[1])}">
</body></html>
"""

