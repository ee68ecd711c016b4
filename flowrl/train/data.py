"""Prompt sources and the per-step choice of prompts, identical on every process.

A source string is one of:

* ``shapes:train`` / ``shapes:test``: the demo's scene grammar (:mod:`flowrl.demo.shapes`);
* ``arithmetic:train`` / ``arithmetic:test`` (optionally ``arithmetic:train:3`` for 3-digit
  operands): verifiable problems with an ``answer`` column (:mod:`flowrl.demo.arithmetic`);
* ``shapes_edit:train`` / ``shapes_edit:test`` (optionally ``shapes_edit:train:32`` for 32-px source
  images; default 64): the demo's editing task (:mod:`flowrl.demo.shapes_edit`): an instruction, a
  rendered source scene (``image``, a PNG path) and the target scene;
* a ``.jsonl`` file: one JSON object per line with a ``prompt`` key and any other columns
  (passed to reward functions); an ``image`` column is the prompt's source image for editing
  models (a path, relative to the file's folder or absolute), checked when the file is read;
* any other file: UTF-8 text, one prompt per line.

Every record is a dict with at least ``prompt``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from flowrl.core import rng
from flowrl.inputs import UsageError, read_prompts

Record = Dict[str, str]


def load_records(source: str, *, limit: Optional[int] = None, seed: int = 0) -> List[Record]:
    """The records of ``source`` (see module doc); at most ``limit`` of them."""
    if not isinstance(source, str) or not source:
        raise UsageError("prompt source is empty: give a prompt file, 'shapes:<split>' or 'arithmetic:<split>'")
    if limit is not None and limit < 1:
        raise UsageError(f"the number of prompts must be >= 1, got {limit}")
    kind, _, rest = source.partition(":")
    if kind in ("shapes", "arithmetic") and rest.split(":")[0] not in ("train", "test") and not Path(source).exists():
        raise UsageError(f"prompt source {source!r}: the {kind} split must be 'train' or 'test'")
    if kind == "shapes_edit" and not Path(source).exists():
        from flowrl.demo.shapes_edit import edit_records  # lazy: demo imports the library

        parts = rest.split(":")
        if parts[0] not in ("train", "test") or len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
            raise UsageError(f"prompt source {source!r}: expected shapes_edit:<train|test>[:<image side in px>]")
        size = int(parts[1]) if len(parts) == 2 else 64
        if size < 16:
            raise UsageError(f"prompt source {source!r}: the image side must be >= 16 px, got {size}")
        records = edit_records(parts[0], limit or 512, seed=seed, size=size)
    elif kind == "shapes" and rest in ("train", "test"):
        from flowrl.demo import shapes  # lazy: demo imports the library, not the other way round

        # Balanced over the GenEval categories, like the held-out draw: the category pools differ in
        # size by 300x (2 single-object vs 691 position strings), so all of the strings would make
        # training almost all position prompts. Unlimited: every string of the largest pool once and
        # those of the smaller pools repeated to the same count per category.
        n = limit or len(shapes.CATEGORIES) * max(len(shapes.all_prompts(rest, c)) for c in shapes.CATEGORIES)
        chosen = shapes.prompts(rest, n, seed)
        records = [{"prompt": p} for p in chosen]
    elif kind == "arithmetic" and rest.split(":")[0] in ("train", "test"):
        from flowrl.demo.arithmetic import arithmetic_records  # lazy: demo imports the library

        parts = rest.split(":")
        digits = int(parts[1]) if len(parts) > 1 else 2
        records = arithmetic_records(parts[0], limit or 512, seed=seed, digits=digits)
    else:
        path = Path(source)
        if path.suffix == ".jsonl":
            records = _read_jsonl(path)
        else:
            records = [{"prompt": p} for p in read_prompts(path)]
    if limit is not None:
        records = records[:limit]
    if not records:
        raise UsageError(f"prompt source {source!r} holds no prompts")
    return records


def _read_jsonl(path: Path) -> List[Record]:
    if not path.is_file():
        raise UsageError(f"prompt file not found: {path}")
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UsageError(f"prompt file {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
            raise UsageError(f"{path}:{i}: each line must be an object with a string 'prompt'")
        if "image" in rec:
            rec["image"] = _source_image(path, i, rec["image"])
        out.append(rec)
    return out


def _source_image(path: Path, line: int, value) -> str:
    """The absolute path of a record's source image (relative paths from the JSONL's folder), checked
    to exist and open as an image: a missing or unreadable one is one UsageError line naming it."""
    if not isinstance(value, str) or not value:
        raise UsageError(f"{path}:{line}: 'image' must be a path to the prompt's source image, got {value!r}")
    p = Path(value).expanduser()
    p = p if p.is_absolute() else (path.parent / p)
    if not p.is_file():
        raise UsageError(f"{path}:{line}: source image not found: {value}")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(p) as im:
            im.verify()
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
        raise UsageError(f"{path}:{line}: source image {value} is not a readable image ({type(e).__name__})") from None
    return str(p.resolve())


def record_images(records) -> Optional[List[str]]:
    """The source image of each record (editing data), or None when no record has one; a mix of
    records with and without ``image`` is a UsageError."""
    has = [r.get("image") is not None for r in records]
    if not any(has):
        return None
    if not all(has):
        raise UsageError(f"{has.count(False)} of {len(records)} prompts have no source image ('image'): "
                         "an editing run needs one for every prompt")
    return [r["image"] for r in records]


def choose_prompts(num_records: int, count: int, seed: int, step: int) -> List[int]:
    """Indices of the ``count`` prompts of training step ``step``: a walk through a seeded
    permutation of all records (an epoch order), so every prompt is seen once per epoch and the
    choice depends only on (seed, step): epoch e's order is drawn from
    ``flowrl.core.rng.generator(seed, "prompts", e)``."""
    if num_records < 1:
        raise ValueError("no records to choose from")
    out: List[int] = []
    start = step * count
    while len(out) < count:
        epoch, pos = divmod(start + len(out), num_records)
        perm = torch.randperm(num_records, generator=rng.generator(seed, "prompts", epoch)).tolist()
        take = min(count - len(out), num_records - pos)
        out.extend(perm[pos:pos + take])
    return out


def local_layout(num_prompts: int, num_minibatches: int, world_size: int, rank: int,
                 sizes: Optional[Sequence[int]] = None) -> List[List[int]]:
    """Which of a step's global prompt positions this process samples, per minibatch.

    Minibatch m holds the contiguous block m of the step's prompts; inside it, process r takes
    sub-block r. So every process trains the same number of groups in every minibatch, and the
    union over processes of minibatch m is the same set of groups whatever the number of
    processes: the gradient of an optimizer step does not depend on it.

    ``sizes`` (each position's group size, when they differ: ``budget.kind`` knapsack or gvm): every
    process still takes the same number of a block's prompts, whole, but dealt to even out the rows: the
    block's prompts by size, largest first (ties: lower position), go to processes 0..W-1, then W-1..0,
    and so on (a snake draft); each process keeps its prompts in position order. Equal sizes give the
    contiguous sub-blocks above."""
    per_mb, rem = divmod(num_prompts, num_minibatches)
    if rem:
        raise UsageError(f"sample.prompts_per_step={num_prompts} is not divisible by train.num_minibatches={num_minibatches}")
    per_rank, rem = divmod(per_mb, world_size)
    if rem:
        raise UsageError(f"each minibatch's {per_mb} prompts cannot be split evenly over {world_size} processes "
                         f"(make sample.prompts_per_step a multiple of num_minibatches x processes)")
    if sizes is None or len(set(sizes)) <= 1 or world_size == 1:
        return [[m * per_mb + rank * per_rank + j for j in range(per_rank)] for m in range(num_minibatches)]
    if len(sizes) != num_prompts:
        raise ValueError(f"sizes: one group size per prompt ({num_prompts}), got {len(sizes)}")
    out = []
    for m in range(num_minibatches):
        block = sorted(range(m * per_mb, (m + 1) * per_mb), key=lambda i: (-int(sizes[i]), i))
        mine = [pos for j, pos in enumerate(block)
                if (j % world_size if (j // world_size) % 2 == 0 else world_size - 1 - j % world_size) == rank]
        out.append(sorted(mine))
    return out
