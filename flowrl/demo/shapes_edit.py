"""The ``shapes`` demo's instruction-editing task: an instruction over a rendered source scene, verified
from pixels with the ``shapes`` detector (:func:`flowrl.demo.shapes.detect`).

Instructions (:func:`parse_instruction`):

* recolour: ``make the <shape> <colour>``: that object takes the colour, everything else stays;
* add: ``add a <colour> <shape> <relation> the <shape>``: a new object on that side of the named one
  (GenEval's relation rule, :func:`flowrl.demo.shapes.relative_position`), everything else stays;
* remove: ``remove the <shape>``: that object is gone, everything else stays.

:func:`check_edit` detects the objects of the source and of the edited image (boxes in fractions of the
image side, so the two may differ in size) and builds the expected scene: each kept object must be found
with its shape and colour within ``position_tol`` of its source centre; a recoloured object with its new
colour at its place; an added object gets 0.5 for being there (shape and colour) and 0.5 for the relation.
The score is the mean credit divided by ``1 + 0.5 n_extra`` (unmatched objects), as
:func:`flowrl.demo.shapes.score_objects`; ``correct`` needs every credit and no extra object.

:func:`edit_records` is the ``shapes_edit:<split>`` prompt source: instruction strings split into train
and held-out pools by the SHA-256 rule of :func:`flowrl.demo.shapes.split_of`, a random source scene per
record rendered to a PNG (``image``) in ``$FLOWRL_CACHE/shapes_edit`` (default ``~/.cache/flowrl``), and
the target scene as a prompt of the scene grammar (``target``).
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from flowrl.demo.shapes import (
    COLORS, EXTRA_PENALTY, RELATIONS, SHAPES, CheckerConfig, ObjectSpec, SceneObject, SceneSpec, detect, draw,
    relative_position, sample_layout,
)

__all__ = ["EditSpec", "EditResult", "KINDS", "parse_instruction", "format_instruction", "all_instructions",
           "split_of_instruction", "make_edit", "check_edit", "edit_records", "cache_dir"]

KINDS: Tuple[str, ...] = ("recolor", "add", "remove")
#: Largest distance (fraction of the image side) between a kept object's centre and its source centre.
POSITION_TOL = 0.12
TEST_FRACTION = 0.2


@dataclass(frozen=True)
class EditSpec:
    """A parsed instruction: ``kind`` with the object ``shape`` (and ``color`` for recolour / add,
    ``relation`` and the reference ``ref`` shape for add)."""

    kind: str
    shape: str
    color: Optional[str] = None
    relation: Optional[str] = None
    ref: Optional[str] = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got {self.kind!r}")
        if self.shape not in SHAPES or (self.ref is not None and self.ref not in SHAPES):
            raise ValueError(f"shapes must be among {list(SHAPES)}, got {self.shape!r} / {self.ref!r}")
        if (self.color is None) != (self.kind == "remove") or (self.color is not None and self.color not in COLORS):
            raise ValueError(f"a {self.kind} instruction {'takes no' if self.kind == 'remove' else 'needs a'} colour "
                             f"(one of {list(COLORS)}), got {self.color!r}")
        if (self.relation is not None or self.ref is not None) != (self.kind == "add"):
            raise ValueError("relation and ref belong to 'add' instructions only")
        if self.kind == "add" and (self.relation not in RELATIONS or self.ref == self.shape):
            raise ValueError(f"add: relation must be one of {list(RELATIONS)} and ref another shape, "
                             f"got {self.relation!r} / {self.ref!r}")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def format_instruction(spec: EditSpec) -> str:
    """The canonical instruction text of ``spec``."""
    if spec.kind == "recolor":
        return f"make the {spec.shape} {spec.color}"
    if spec.kind == "remove":
        return f"remove the {spec.shape}"
    return f"add {_article(spec.color)} {spec.color} {spec.shape} {spec.relation} the {spec.ref}"


def parse_instruction(text: str) -> EditSpec:
    """An instruction of the grammar (module doc; case, spaces and a final period are free) -> EditSpec;
    ValueError naming the instruction otherwise."""
    if not isinstance(text, str):
        raise ValueError(f"instruction must be a str, got {type(text).__name__}")
    w = " ".join(text.lower().strip().rstrip(".").split()).split()
    try:
        if len(w) == 4 and w[:2] == ["make", "the"]:
            return EditSpec("recolor", w[2], color=w[3])
        if len(w) == 3 and w[:2] == ["remove", "the"]:
            return EditSpec("remove", w[2])
        if len(w) >= 7 and w[0] == "add" and w[1] in ("a", "an") and w[-2] == "the":
            relation = " ".join(w[4:-2])
            return EditSpec("add", w[3], color=w[2], relation=relation, ref=w[-1])
    except ValueError as e:
        raise ValueError(f"instruction {text!r}: {e}") from None
    raise ValueError(f"instruction {text!r} is outside the editing grammar ('make the <shape> <colour>', "
                     "'add a <colour> <shape> <relation> the <shape>', 'remove the <shape>')")


def all_instructions(split: Optional[str] = None) -> List[str]:
    """Every instruction of the grammar (sorted), optionally of one split (:func:`split_of_instruction`)."""
    out = [format_instruction(EditSpec("recolor", s, color=c)) for s in SHAPES for c in COLORS]
    out += [format_instruction(EditSpec("remove", s)) for s in SHAPES]
    out += [format_instruction(EditSpec("add", s, color=c, relation=r, ref=ref))
            for s, ref in itertools.permutations(SHAPES, 2) for c in COLORS for r in RELATIONS]
    if split is None:
        return sorted(out)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train', 'test' or None, got {split!r}")
    return sorted(t for t in out if split_of_instruction(t) == split)


@functools.lru_cache(maxsize=None)
def _pools() -> Dict[str, Dict[str, List[str]]]:
    pools: Dict[str, Dict[str, List[str]]] = {}
    for kind in KINDS:
        strings = sorted((t for t in all_instructions() if parse_instruction(t).kind == kind),
                         key=lambda t: hashlib.sha256(t.encode("utf-8")).hexdigest())
        n_test = min(max(1, math.ceil(TEST_FRACTION * len(strings))), len(strings) - 1)
        pools[kind] = {"test": sorted(strings[:n_test]), "train": sorted(strings[n_test:])}
    return pools


def split_of_instruction(text: str) -> str:
    """``"train"`` or ``"test"``: per kind, instructions ordered by the SHA-256 of their text, the first
    ``ceil(20 %)`` held out (the rule of :func:`flowrl.demo.shapes.split_of`)."""
    canon = format_instruction(parse_instruction(text))
    return "test" if canon in _pools()[parse_instruction(canon).kind]["test"] else "train"


# ----------------------------------------------------------------------------------------------
# Source and target scenes
# ----------------------------------------------------------------------------------------------


def make_edit(instruction: str, size: int = 64, rng: Any = None) -> Tuple[List[SceneObject], List[SceneObject]]:
    """A random ``(source, target)`` layout pair for ``instruction`` on a ``size`` px canvas: both are drawn
    from one two-object layout of :func:`flowrl.demo.shapes.sample_layout` (for add, a position scene
    whose first object is the added one)."""
    e = parse_instruction(instruction)
    g = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    colors = list(COLORS)
    if e.kind == "add":
        ref_color = colors[int(g.integers(len(colors)))]
        spec = SceneSpec("position", (ObjectSpec(e.color, e.shape), ObjectSpec(ref_color, e.ref)), e.relation)
        target = sample_layout(spec, size, g)
        return [target[1]], target
    other = [s for s in SHAPES if s != e.shape][int(g.integers(len(SHAPES) - 1))]
    old = [c for c in colors if c != e.color][int(g.integers(len(colors) - 1))] if e.kind == "recolor" else \
        colors[int(g.integers(len(colors)))]
    source = sample_layout(SceneSpec("color_attr", (ObjectSpec(old, e.shape), ObjectSpec(colors[int(g.integers(len(colors)))], other))),
                           size, g)
    if e.kind == "remove":
        return source, [o for o in source if o.shape != e.shape]
    return source, [replace(o, color=e.color) if o.shape == e.shape else o for o in source]


def target_prompt(target: Sequence[SceneObject]) -> str:
    """The target scene as a prompt of the scene grammar ("a red circle" / "a red circle and a blue square")."""
    return " and ".join(f"{_article(o.color)} {o.color} {o.shape}" for o in target)


# ----------------------------------------------------------------------------------------------
# The checker
# ----------------------------------------------------------------------------------------------


@dataclass
class EditResult:
    """score in [0, 1], strict ``correct``, and ``details`` (credits, n_extra, the objects found)."""

    score: float
    correct: bool
    kind: str
    details: Dict[str, Any] = field(default_factory=dict)


def _normalised(image: Any, cfg: CheckerConfig) -> List[SceneObject]:
    from flowrl.demo.shapes import image_to_array

    rgb = image_to_array(image)
    h, w = rgb.shape[:2]
    return [replace(o, bbox=(o.bbox[0] / w, o.bbox[1] / h, o.bbox[2] / w, o.bbox[3] / h)) for o in detect(rgb, cfg)]


def _load(image: Any) -> Any:
    if isinstance(image, (str, os.PathLike)):
        from flowrl.flow.policy import load_image

        return load_image(image)
    return image


def check_edit(edited: Any, instruction: str, source: Any, cfg: CheckerConfig = CheckerConfig(),
               position_tol: float = POSITION_TOL) -> EditResult:
    """Check ``edited`` against ``instruction`` applied to ``source`` (images: PIL, HxWx3 array,
    [3, H, W] tensor in [0, 1], or a path); see the module doc. ValueError when the source does not
    hold the object the instruction names."""
    e = parse_instruction(instruction)
    src = _normalised(_load(source), cfg)
    out = _normalised(_load(edited), cfg)
    named = [o for o in src if o.shape == (e.ref if e.kind == "add" else e.shape)]
    if len(named) != 1:
        raise ValueError(f"instruction {instruction!r}: the source image holds {len(named)} "
                         f"{e.ref if e.kind == 'add' else e.shape}(s), expected 1")
    expected = [o for o in src if not (e.kind == "remove" and o.shape == e.shape)]
    if e.kind == "recolor":
        expected = [replace(o, color=e.color) if o.shape == e.shape else o for o in expected]
    used: set = set()
    credits: List[float] = []
    ref_found: Optional[SceneObject] = None
    for want in expected:
        match = None
        for j, o in enumerate(out):
            if j in used or o.shape != want.shape or o.color != want.color:
                continue
            if math.dist(o.center, want.center) <= position_tol:
                match = j
                break
        credits.append(1.0 if match is not None else 0.0)
        if match is not None:
            used.add(match)
            if e.kind == "add" and want.shape == e.ref:
                ref_found = out[match]
    if e.kind == "add":
        ref = ref_found or named[0]
        best = 0.0
        for j, o in enumerate(out):
            if j in used or o.shape != e.shape or o.color != e.color:
                continue
            c = 0.5 + 0.5 * (e.relation in relative_position(o.bbox, ref.bbox, cfg.position_threshold))
            if c > best:
                best, pick = c, j
        if best > 0:
            used.add(pick)
        credits.append(best)
    n_extra = len(out) - len(used)
    base = float(np.mean(credits)) if credits else 1.0
    score = base / (1.0 + EXTRA_PENALTY * n_extra)
    correct = all(c == 1.0 for c in credits) and n_extra == 0
    return EditResult(score, correct, e.kind, {"credits": credits, "n_extra": n_extra, "objects": out})


# ----------------------------------------------------------------------------------------------
# The prompt source
# ----------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where source images are written: ``$FLOWRL_CACHE/shapes_edit`` (default ``~/.cache/flowrl``)."""
    root = os.environ.get("FLOWRL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "flowrl")
    return Path(root) / "shapes_edit"


def edit_records(split: str, n: int, seed: int = 0, size: int = 64) -> List[Dict[str, str]]:
    """``n`` records ``{"prompt": instruction, "image": source PNG path, "target": target scene prompt,
    "kind": ...}`` from the ``split`` pool, balanced over the three kinds, each with its own random source
    scene (deterministic in ``(split, n, seed, size)``; a PNG is written once, named by its content key)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    g = np.random.default_rng([seed, 0 if split == "train" else 1, size])
    pools = _pools()
    out_dir = cache_dir() / f"{split}-{size}px"
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        pool = pools[kind][split]
        text = pool[int(g.integers(len(pool)))]
        scene_seed = int(g.integers(2**31))
        source, target = make_edit(text, size, scene_seed)
        key = hashlib.sha256(f"{text}|{size}|{scene_seed}".encode()).hexdigest()[:16]
        path = out_dir / f"{key}.png"
        if not path.is_file():
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            draw(source, size).save(tmp, format="PNG")
            os.replace(tmp, path)
        records.append({"prompt": text, "image": str(path), "target": target_prompt(target), "kind": kind})
    order = g.permutation(n)
    return [records[int(i)] for i in order]
