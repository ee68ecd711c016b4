"""The demo's verifiable reward: a GenEval-style scene grammar, a renderer and an image checker.

GenEval (Ghosh et al., 2023, arXiv:2310.11513) scores text-to-image alignment with an object
detector on prompts from six templates; this module is the same idea for simple synthetic scenes,
scored by image analysis only (no learned weights):

* grammar: colours ``red orange yellow green blue purple``, shapes ``circle square triangle``,
  relations ``left of, right of, above, below``, counts ``two three four``, in GenEval's six
  categories (single_object, two_object, counting, colors, position, color_attr; :func:`parse`);
* :func:`render` draws a matching scene on light grey, :func:`corrupt` one that contradicts the
  prompt in the attribute its category tests;
* :func:`check` segments the image by palette colour, classifies each component's shape
  (:func:`classify_shape`) and scores the prompt: partial credit in [0, 1] and GenEval's strict
  correctness (:func:`score_objects`); :func:`evaluate` gives per-category accuracies;
* :func:`prompts` samples disjoint train / held-out pools (:func:`split_of`).

The scorer ``shapes`` (:class:`scorers.shapes.ShapesScorer`) wraps :func:`check`. Details of the
grammar, renderer and checker are in docs/demo.md ("The shapes reward").
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from scorers._text import short
from scorers.base import as_image_tensor

# ----------------------------------------------------------------------------------------------
# Vocabulary
# ----------------------------------------------------------------------------------------------

#: Palette (sRGB, 0..255). Chosen far apart: the closest pair (orange/yellow) is 85 levels apart.
COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 130, 20),
    "yellow": (235, 215, 25),
    "green": (35, 165, 60),
    "blue": (35, 85, 215),
    "purple": (135, 55, 185),
}
SHAPES: Tuple[str, ...] = ("circle", "square", "triangle")
PLURALS: Dict[str, str] = {s: s + "s" for s in SHAPES}
RELATIONS: Tuple[str, ...] = ("left of", "right of", "above", "below")
NUMBERS: Dict[str, int] = {"two": 2, "three": 3, "four": 4}
NUMBER_WORDS: Dict[int, str] = {v: k for k, v in NUMBERS.items()}
CATEGORIES: Tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
#: Plain light-grey background (sRGB).
BACKGROUND: Tuple[int, int, int] = (240, 240, 240)
#: GenEval's default position threshold (``position_threshold`` option of its evaluator).
POSITION_THRESHOLD = 0.1
#: Fraction of each category's prompt strings held out for evaluation.
TEST_FRACTION = 0.2

_COLOR_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[c] for c in _COLOR_NAMES], dtype=np.float64) / 255.0


# ----------------------------------------------------------------------------------------------
# Scene specs and the grammar
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectSpec:
    """One object group of a prompt: ``count`` objects of ``shape``, coloured ``color`` (None = any)."""

    color: Optional[str]
    shape: str
    count: int = 1

    def __post_init__(self) -> None:
        if self.color is not None and self.color not in COLORS:
            raise ValueError(f"color must be one of {sorted(COLORS)} or None, got {self.color!r}")
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {list(SHAPES)}, got {self.shape!r}")
        if not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"count must be a positive int, got {self.count!r}")


@dataclass(frozen=True)
class SceneSpec:
    """A parsed prompt: its GenEval category, its object groups and (position only) the relation.

    For ``position`` the relation reads ``objects[0] <relation> objects[1]``.
    """

    category: str
    objects: Tuple[ObjectSpec, ...]
    relation: Optional[str] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))
        cat, objs = self.category, self.objects
        if cat not in CATEGORIES:
            raise ValueError(f"category must be one of {list(CATEGORIES)}, got {cat!r}")
        n_expected = 1 if cat in ("single_object", "counting", "colors") else 2
        if len(objs) != n_expected:
            raise ValueError(f"a {cat} scene has {n_expected} object group(s), got {len(objs)}")
        if len({o.shape for o in objs}) != len(objs):
            raise ValueError(f"objects of one scene must have distinct shapes, got {[o.shape for o in objs]}")
        if (self.relation is not None) != (cat == "position"):
            raise ValueError(
                f"relation is required for position scenes and only for them (category={cat!r}, relation={self.relation!r})"
            )
        if self.relation is not None and self.relation not in RELATIONS:
            raise ValueError(f"relation must be one of {list(RELATIONS)}, got {self.relation!r}")
        counts = [o.count for o in objs]
        if cat == "counting":
            if counts[0] not in NUMBER_WORDS:
                raise ValueError(f"counting scenes have count in {sorted(NUMBER_WORDS)}, got {counts[0]}")
        elif any(c != 1 for c in counts):
            raise ValueError(f"a {cat} scene has one object per group, got counts {counts}")
        colored = [o.color is not None for o in objs]
        if cat in ("single_object", "two_object") and any(colored):
            raise ValueError(f"{cat} prompts name no colour (use 'colors' / 'color_attr'), got {objs}")
        if cat in ("colors", "color_attr") and not all(colored):
            raise ValueError(f"{cat} prompts give every object a colour, got {objs}")

    @property
    def prompt(self) -> str:
        """The canonical prompt string of this scene (``parse(spec.prompt) == spec``)."""
        return format_prompt(self)

    @property
    def n_objects(self) -> int:
        """Total number of objects the scene requires."""
        return sum(o.count for o in self.objects)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(o: ObjectSpec) -> str:
    words = ([o.color] if o.color else []) + [o.shape]
    return f"{_article(words[0])} {' '.join(words)}"


def format_prompt(spec: SceneSpec) -> str:
    """Canonical English prompt of ``spec`` (plain GenEval templates, correct a/an)."""
    o = spec.objects
    if spec.category in ("single_object", "colors"):
        return _noun_phrase(o[0])
    if spec.category == "counting":
        words = [NUMBER_WORDS[o[0].count]] + ([o[0].color] if o[0].color else []) + [PLURALS[o[0].shape]]
        return " ".join(words)
    if spec.category == "position":
        return f"{_noun_phrase(o[0])} {spec.relation} {_noun_phrase(o[1])}"
    return f"{_noun_phrase(o[0])} and {_noun_phrase(o[1])}"


_PLURAL_TO_SHAPE = {v: k for k, v in PLURALS.items()}
_REL_PATTERNS = [
    ("to the left of", "left of"),
    ("to the right of", "right of"),
    ("left of", "left of"),
    ("right of", "right of"),
    ("above", "above"),
    ("below", "below"),
]


def _q(text: str) -> str:
    """A prompt (or a word of one) quoted for an error message, cut at 80 characters."""
    return short(text, 80, quote=True)


def _parse_object(words: List[str], prompt: str) -> ObjectSpec:
    """``("a"|"an") [colour] shape`` -> ObjectSpec."""
    if len(words) not in (2, 3) or words[0] not in ("a", "an"):
        raise ValueError(f"prompt {_q(prompt)}: expected 'a [colour] shape', got {_q(' '.join(words))}")
    color = words[1] if len(words) == 3 else None
    shape = words[-1]
    if color is not None and color not in COLORS:
        raise ValueError(f"prompt {_q(prompt)}: unknown colour {_q(color)} (known: {', '.join(COLORS)})")
    if shape not in SHAPES:
        raise ValueError(f"prompt {_q(prompt)}: unknown shape {_q(shape)} (known: {', '.join(SHAPES)})")
    return ObjectSpec(color, shape, 1)


def parse(prompt: str) -> SceneSpec:
    """Parse a prompt of the scene grammar (module docstring) into a :class:`SceneSpec`.

    Case, surrounding spaces, repeated spaces, a final period, a leading ``"a photo of"``
    (GenEval's prefix) and ``"to the left/right of"`` are accepted. Anything else outside the
    grammar raises ``ValueError`` naming the prompt and the problem.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
    text = " ".join(prompt.lower().strip().rstrip(".").split())
    if text.startswith("a photo of "):
        text = text[len("a photo of "):]
    if not text:
        raise ValueError(f"prompt {_q(prompt)} is empty")
    padded = f" {text} "
    for pattern, relation in _REL_PATTERNS:
        key = f" {pattern} "
        if key in padded:
            left, _, right = padded.partition(key)
            if f" {pattern} " in f" {right} ":
                raise ValueError(f"prompt {_q(prompt)}: more than one relation")
            a = _parse_object(left.split(), prompt)
            b = _parse_object(right.split(), prompt)
            return _make_spec(prompt, "position", (a, b), relation)
    words = text.split()
    if words[0] in NUMBERS:
        if len(words) not in (2, 3):
            raise ValueError(f"prompt {_q(prompt)}: expected '<number> [colour] shapes'")
        color = words[1] if len(words) == 3 else None
        if color is not None and color not in COLORS:
            raise ValueError(f"prompt {_q(prompt)}: unknown colour {_q(color)} (known: {', '.join(COLORS)})")
        if words[-1] not in _PLURAL_TO_SHAPE:
            raise ValueError(f"prompt {_q(prompt)}: expected a plural shape ({', '.join(PLURALS.values())}), got {_q(words[-1])}")
        return _make_spec(prompt, "counting", (ObjectSpec(color, _PLURAL_TO_SHAPE[words[-1]], NUMBERS[words[0]]),), None)
    if "and" in words:
        i = words.index("and")
        a = _parse_object(words[:i], prompt)
        b = _parse_object(words[i + 1:], prompt)
        if (a.color is None) != (b.color is None):
            raise ValueError(f"prompt {_q(prompt)}: give both objects a colour or neither")
        return _make_spec(prompt, "two_object" if a.color is None else "color_attr", (a, b), None)
    o = _parse_object(words, prompt)
    return _make_spec(prompt, "single_object" if o.color is None else "colors", (o,), None)


def _make_spec(prompt: str, category: str, objects: Tuple[ObjectSpec, ...], relation: Optional[str]) -> SceneSpec:
    try:
        return SceneSpec(category, objects, relation)
    except ValueError as e:
        raise ValueError(f"prompt {_q(prompt)}: {e}") from None


_parse_cached = functools.lru_cache(maxsize=4096)(parse)


def _as_spec(spec: Union[SceneSpec, str]) -> SceneSpec:
    if isinstance(spec, SceneSpec):
        return spec
    if isinstance(spec, str):
        return _parse_cached(spec)
    raise ValueError(f"spec must be a SceneSpec or a prompt string, got {type(spec).__name__}")


# ----------------------------------------------------------------------------------------------
# Prompt pools and the train / held-out split
# ----------------------------------------------------------------------------------------------


def _enumerate_specs(category: str) -> List[SceneSpec]:
    shape_pairs = list(itertools.permutations(SHAPES, 2))
    if category == "single_object":
        return [SceneSpec(category, (ObjectSpec(None, s),)) for s in SHAPES]
    if category == "two_object":
        return [SceneSpec(category, (ObjectSpec(None, a), ObjectSpec(None, b))) for a, b in shape_pairs]
    if category == "counting":
        return [SceneSpec(category, (ObjectSpec(c, s, n),)) for n in NUMBER_WORDS for c in COLORS for s in SHAPES]
    if category == "colors":
        return [SceneSpec(category, (ObjectSpec(c, s),)) for c in COLORS for s in SHAPES]
    if category == "position":
        return [
            SceneSpec(category, (ObjectSpec(ca, a), ObjectSpec(cb, b)), rel)
            for a, b in shape_pairs
            for ca in COLORS
            for cb in COLORS
            for rel in RELATIONS
        ]
    if category == "color_attr":
        return [
            SceneSpec(category, (ObjectSpec(ca, a), ObjectSpec(cb, b)))
            for a, b in shape_pairs
            for ca, cb in itertools.permutations(COLORS, 2)
        ]
    raise ValueError(f"category must be one of {list(CATEGORIES)}, got {category!r}")


def _digest(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


@functools.lru_cache(maxsize=None)
def _pools() -> Dict[str, Dict[str, Tuple[str, ...]]]:
    """category -> {"train": prompts, "test": prompts}; the split rule of :func:`split_of`."""
    pools: Dict[str, Dict[str, Tuple[str, ...]]] = {}
    for cat in CATEGORIES:
        strings = sorted({s.prompt for s in _enumerate_specs(cat)}, key=_digest)
        n_test = min(max(1, math.ceil(TEST_FRACTION * len(strings))), len(strings) - 1)
        pools[cat] = {"test": tuple(sorted(strings[:n_test])), "train": tuple(sorted(strings[n_test:]))}
    return pools


def all_prompts(split: Optional[str] = None, category: Optional[str] = None) -> List[str]:
    """Every canonical prompt of the grammar (sorted), optionally of one split and/or category."""
    if split not in (None, "train", "test"):
        raise ValueError(f"split must be 'train', 'test' or None, got {split!r}")
    if category is not None and category not in CATEGORIES:
        raise ValueError(f"category must be one of {list(CATEGORIES)} or None, got {category!r}")
    out: List[str] = []
    for cat in CATEGORIES if category is None else (category,):
        for sp in ("train", "test") if split is None else (split,):
            out.extend(_pools()[cat][sp])
    return sorted(out)


def vocabulary() -> List[str]:
    """Every word of every prompt of the grammar (both splits), sorted: the whole-word vocabulary of
    the demo model's tokenizers (:func:`flowrl.demo.tiny_image.tiny_clip_tokenizer`)."""
    return sorted({w for p in all_prompts() for w in p.split()})


def split_of(prompt: str) -> str:
    """``"train"`` or ``"test"`` for a prompt of the grammar.

    Rule: within each category, the canonical prompt strings are ordered by the SHA-256 of their
    UTF-8 bytes; the first ``ceil(0.2 * n)`` (at least 1, at most ``n - 1``) are held out (``test``),
    the rest are ``train``. The rule depends only on the strings, so it is the same on every machine
    and Python version. A non-canonical spelling is canonicalised by :func:`parse` first.
    """
    spec = _as_spec(prompt)
    return "test" if spec.prompt in _pools()[spec.category]["test"] else "train"


def prompts(split: str, n: int, seed: int = 0, categories: Optional[Sequence[str]] = None) -> List[str]:
    """``n`` prompts from the ``split`` pool ("train" or "test"), balanced over ``categories``.

    The ``n`` draws are spread over the categories as evenly as possible (the remainder goes to
    categories chosen at random), the prompts of each category are drawn uniformly from its pool
    (without replacement until the pool is used up, then again), and the list is shuffled.
    Deterministic in ``(split, n, seed, categories)``. Train and test pools never share a string.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    cats = list(CATEGORIES if categories is None else categories)
    for c in cats:
        if c not in CATEGORIES:
            raise ValueError(f"categories: unknown category {c!r} (known: {', '.join(CATEGORIES)})")
    if not cats:
        raise ValueError("categories must not be empty")
    rng = np.random.default_rng(seed)
    per = [n // len(cats)] * len(cats)
    for i in rng.choice(len(cats), size=n % len(cats), replace=False):
        per[int(i)] += 1
    out: List[str] = []
    for cat, k in zip(cats, per):
        pool = _pools()[cat][split]
        while k > 0:
            take = min(k, len(pool))
            out.extend(pool[int(i)] for i in rng.permutation(len(pool))[:take])
            k -= take
    order = rng.permutation(len(out))
    return [out[int(i)] for i in order]


# ----------------------------------------------------------------------------------------------
# Objects, relations
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneObject:
    """An object in an image (drawn by the renderer or found by the checker).

    ``bbox`` is ``(x0, y0, x1, y1)`` in pixels, the box spanning ``[x0, x1) x [y0, y1)`` (y down).
    ``color``/``shape`` may be None when the checker cannot tell. ``area`` is in pixels,
    ``shape_iou`` the overlap of the object with its shape's template (1 for drawn objects).
    """

    color: Optional[str]
    shape: Optional[str]
    bbox: Tuple[float, float, float, float]
    area: float = 0.0
    shape_iou: float = 1.0

    @property
    def center(self) -> Tuple[float, float]:
        x0, y0, x1, y1 = self.bbox
        return ((x0 + x1) / 2.0, (y0 + y1) / 2.0)

    @property
    def dims(self) -> Tuple[float, float]:
        x0, y0, x1, y1 = self.bbox
        return (x1 - x0, y1 - y0)


def relative_position(a_bbox: Sequence[float], b_bbox: Sequence[float], threshold: float = POSITION_THRESHOLD) -> set:
    """The relations that hold for box A relative to box B, by GenEval's rule (arXiv:2310.11513).

    With centres ``c_A, c_B``, sizes ``d_A, d_B`` (width, height) and ``o = c_A - c_B`` (y down)::

        o' = sign(o) * max(|o| - threshold * (d_A + d_B), 0)        (per axis)
        u  = o' / ||o||
        "left of" if u_x < -0.5, "right of" if u_x > 0.5, "above" if u_y < -0.5, "below" if u_y > 0.5

    and no relation at all when ``|o'| < 1e-3`` on both axes.
    """
    a = np.asarray(a_bbox, dtype=np.float64).reshape(2, 2)
    b = np.asarray(b_bbox, dtype=np.float64).reshape(2, 2)
    offset = a.mean(0) - b.mean(0)
    dims = np.abs(a[1] - a[0]) + np.abs(b[1] - b[0])
    revised = np.maximum(np.abs(offset) - threshold * dims, 0.0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


# ----------------------------------------------------------------------------------------------
# Renderer
# ----------------------------------------------------------------------------------------------


RngLike = Union[None, int, np.random.Generator]


def _as_rng(rng: RngLike) -> np.random.Generator:
    if rng is None or isinstance(rng, (int, np.integer)):
        return np.random.default_rng(rng)
    if isinstance(rng, np.random.Generator):
        return rng
    raise ValueError(f"rng must be None, an int seed or a numpy Generator, got {type(rng).__name__}")


def _size_range(n_objects: int) -> Tuple[float, float]:
    """Object side as a fraction of the image side, by how many objects share the image."""
    if n_objects == 1:
        return (0.25, 0.5)
    if n_objects == 2:
        return (0.2, 0.36)
    return (0.16, 0.26)


def _boxes_apart(a: Sequence[float], b: Sequence[float], gap: float) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _relation_with_margin(a: Sequence[float], b: Sequence[float], relation: str, gap: float) -> bool:
    """A lies wholly on the ``relation`` side of B with ``gap`` between them, and the offset along the
    other axis is at most half the offset along the relation's axis (so GenEval's rule holds with a
    wide margin)."""
    (ax, ay), (bx, by) = ((a[0] + a[2]) / 2, (a[1] + a[3]) / 2), ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2)
    if relation == "above":
        ok, main, other = a[3] + gap <= b[1], by - ay, abs(ax - bx)
    elif relation == "below":
        ok, main, other = b[3] + gap <= a[1], ay - by, abs(ax - bx)
    elif relation == "left of":
        ok, main, other = a[2] + gap <= b[0], bx - ax, abs(ay - by)
    elif relation == "right of":
        ok, main, other = b[2] + gap <= a[0], ax - bx, abs(ay - by)
    else:
        raise ValueError(f"relation must be one of {list(RELATIONS)}, got {relation!r}")
    return ok and other <= 0.5 * main


def sample_layout(spec: Union[SceneSpec, str], size: int = 64, rng: RngLike = None) -> List[SceneObject]:
    """Random layout of ``spec`` on a ``size`` x ``size`` canvas (a list of :class:`SceneObject`).

    Every object is a square box (circle diameter, square side, triangle width = height) with side
    drawn uniformly from a range that depends on the number of objects (1: 25-50 % of the image side,
    2: 20-36 %, 3-4: 16-26 %), placed uniformly at random at least ``max(2, 3 %)`` of the side away from
    the border; boxes keep a gap of ``max(3, 6 %)`` of the side between them; for ``position`` scenes
    the relation holds as in :func:`_relation_with_margin`. Colourless objects get a random colour.
    Placement is by rejection; after 200 failed tries the sizes shrink by 10 % and sampling restarts.
    """
    spec = _as_spec(spec)
    if not isinstance(size, int) or size < 16:
        raise ValueError(f"size must be an int >= 16, got {size!r}")
    rng = _as_rng(rng)
    border = max(2.0, 0.03 * size)
    gap = max(3.0, 0.06 * size)
    items: List[Tuple[str, str]] = []
    for o in spec.objects:
        color = o.color if o.color is not None else _COLOR_NAMES[int(rng.integers(len(_COLOR_NAMES)))]
        items.extend([(color, o.shape)] * o.count)
    lo, hi = _size_range(len(items))
    sides = rng.uniform(lo, hi, size=len(items)) * size
    for _attempt in range(50):
        for _try in range(200):
            boxes = []
            for s in sides:
                x0 = rng.uniform(border, size - border - s)
                y0 = rng.uniform(border, size - border - s)
                boxes.append((x0, y0, x0 + s, y0 + s))
            if not all(_boxes_apart(a, b, gap) for a, b in itertools.combinations(boxes, 2)):
                continue
            if spec.relation is not None and not _relation_with_margin(boxes[0], boxes[1], spec.relation, gap):
                continue
            return [
                SceneObject(c, s, tuple(float(v) for v in box), area=_shape_area(s, box[2] - box[0]))
                for (c, s), box in zip(items, boxes)
            ]
        sides = sides * 0.9
    raise RuntimeError(f"could not place {spec.prompt!r} on a {size}px canvas")  # pragma: no cover


def _shape_area(shape: str, side: float) -> float:
    return {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}[shape] * side * side


def draw(
    layout: Sequence[SceneObject], size: int = 64, background: Tuple[int, int, int] = BACKGROUND, supersample: int = 4
) -> Image.Image:
    """Draw ``layout`` on a plain ``background``; anti-aliased by drawing at ``supersample`` times the
    size and box-filtering down (each output pixel = the covered fraction of its area)."""
    if supersample < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    big = size * supersample
    im = Image.new("RGB", (big, big), tuple(background))
    d = ImageDraw.Draw(im)
    for o in layout:
        if o.color not in COLORS or o.shape not in SHAPES:
            raise ValueError(f"layout object needs a palette colour and a known shape, got {o}")
        x0, y0, x1, y1 = (v * supersample for v in o.bbox)
        fill = COLORS[o.color]
        # PIL fills the closed box [x0, x1 - 1]; convert the half-open box to that convention.
        if o.shape == "circle":
            d.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
        elif o.shape == "square":
            d.rectangle([round(x0), round(y0), round(x1) - 1, round(y1) - 1], fill=fill)
        else:
            d.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return im if supersample == 1 else im.resize((size, size), Image.BOX)


def render(spec: Union[SceneSpec, str], size: int = 64, rng: RngLike = None) -> Image.Image:
    """A random ``size`` x ``size`` image of ``spec`` (a SceneSpec or a prompt): ``draw(sample_layout(...))``."""
    return draw(sample_layout(spec, size, rng), size)


def _draw_other(g: np.random.Generator, options: Sequence, exclude: Sequence):
    """One of ``options`` not in ``exclude``, drawn uniformly with ``g`` (keeps the options' order)."""
    rest = [x for x in options if x not in exclude]
    return rest[int(g.integers(len(rest)))]


_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def corrupt(spec: Union[SceneSpec, str], rng: RngLike = None) -> SceneSpec:
    """A scene that contradicts ``spec`` in one attribute: the error GenEval counts for its category.

    The caption noise of web-scale image-text data, which is why real text-to-image models follow
    prompts imperfectly (and what the demo model is pretrained with, ``caption_noise``):

    ==============  ==========================================================
    single_object   another shape
    two_object      one of the two objects missing
    counting        another count (2..4)
    colors          another colour
    position        the opposite relation (the two objects swapped)
    color_attr      the two colours swapped between the objects (attribute binding)
    ==============  ==========================================================

    Every result fails :func:`check` of the original prompt when rendered (the checker's strict test).
    """
    spec = _as_spec(spec)
    g = _as_rng(rng)
    o = spec.objects
    cat = spec.category
    if cat == "single_object":
        return SceneSpec(cat, (ObjectSpec(None, _draw_other(g, SHAPES, [o[0].shape])),))
    if cat == "two_object":
        return SceneSpec("single_object", (o[int(g.integers(2))],))
    if cat == "counting":
        return SceneSpec(cat, (ObjectSpec(o[0].color, o[0].shape, _draw_other(g, sorted(NUMBER_WORDS), [o[0].count])),))
    if cat == "colors":
        return SceneSpec(cat, (ObjectSpec(_draw_other(g, _COLOR_NAMES, [o[0].color]), o[0].shape),))
    if cat == "position":
        return SceneSpec(cat, o, _OPPOSITE[spec.relation])
    return SceneSpec(cat, (ObjectSpec(o[1].color, o[0].shape), ObjectSpec(o[0].color, o[1].shape)))


def misattribute(spec: Union[SceneSpec, str], rng: RngLike = None) -> SceneSpec:
    """A scene with one object group drawn wrong in appearance: another colour when the prompt names
    one, else a shape the scene does not hold (the group is drawn at random). Layout, counts and
    relations are kept.

    The attribute errors that text-to-image models make in every category (GenEval's "colour" and
    "attribute binding" failures); the demo model is pretrained with a fraction of them
    (``attribute_noise``). Every result fails :func:`check` of the original prompt when rendered.
    """
    spec = _as_spec(spec)
    g = _as_rng(rng)
    objs = list(spec.objects)
    k = int(g.integers(len(objs)))
    o = objs[k]
    if o.color is not None:
        objs[k] = ObjectSpec(_draw_other(g, _COLOR_NAMES, [o.color]), o.shape, o.count)
    else:  # a shape the scene does not hold yet (the objects of a scene have distinct shapes)
        objs[k] = ObjectSpec(None, _draw_other(g, SHAPES, [x.shape for x in objs]), o.count)
    return SceneSpec(spec.category, tuple(objs), spec.relation)


# ----------------------------------------------------------------------------------------------
# Checker: detection
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckerConfig:
    """Thresholds of the checker (fractions are of the image area or of the 0..1 colour range).

    min_area_frac: components smaller than this fraction of the image (at least 6 px) are dropped
        (0.005 = 20 px at 64x64; the renderer's smallest object covers about 50 px).
    fg_alpha: a pixel is foreground when its blend weight towards its best palette colour is at least
        this (0.5 = the half-coverage contour of a soft edge).
    fg_distance: ... or when it is this far (Euclidean RGB, 0..1) from the background (off-palette ink).
    color_tol: a foreground pixel whose distance to its colour's blend line exceeds this is "unknown".
    color_majority: an object gets the majority colour of its known pixels if they are at least this
        fraction of its area; otherwise its colour is None.
    min_shape_iou: best template IoU below this gives shape None.
    min_aspect: bounding boxes thinner than this (short side / long side) give shape None.
    max_objects: at most this many (largest) components are kept.
    position_threshold: GenEval's threshold in :func:`relative_position`.
    """

    min_area_frac: float = 0.005
    fg_alpha: float = 0.5
    fg_distance: float = 0.45
    color_tol: float = 0.3
    color_majority: float = 0.5
    min_shape_iou: float = 0.6
    min_aspect: float = 0.6
    max_objects: int = 32
    position_threshold: float = POSITION_THRESHOLD


def image_to_array(image: Any) -> np.ndarray:
    """PIL image, uint8/float HxWx3 array, or float [3, H, W] tensor in [0, 1] -> float64 HxWx3 in [0, 1]."""
    if isinstance(image, torch.Tensor):
        t = image.detach().to("cpu", torch.float64)
        if t.ndim != 3 or t.shape[0] != 3:
            raise ValueError(f"image tensor must be [3, H, W], got {tuple(t.shape)}")
        return t.permute(1, 2, 0).numpy().clip(0.0, 1.0)
    if hasattr(image, "convert"):
        return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image array must be HxWx3, got {image.shape}")
        if image.dtype == np.uint8:
            return image.astype(np.float64) / 255.0
        return np.clip(image.astype(np.float64), 0.0, 1.0)
    raise ValueError(f"image must be a PIL image, an HxWx3 array or a [3, H, W] tensor, got {type(image).__name__}")


def classify_pixels(
    rgb: np.ndarray, background: Tuple[int, int, int] = BACKGROUND, cfg: CheckerConfig = CheckerConfig()
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-pixel foreground mask, palette label (-1 = unknown) and soft coverage, by a
    background-blend model.

    A soft edge or a blurred object mixes an ink colour ``c`` with the background ``g``:
    ``p = g + a (c - g)``. For each palette colour, ``a_c = clip(<p - g, c - g> / |c - g|^2, 0, 1.25)``
    and the residual ``r_c = |p - g - a_c (c - g)|``; the pixel's colour is ``c* = argmin_c r_c``.
    It is foreground if ``a_c* >= fg_alpha`` or ``|p - g| >= fg_distance``; its label is unknown (-1)
    if ``r_c* > color_tol`` or ``a_c* < fg_alpha``. The coverage is ``clip(a_c*, 0, 1)`` where the
    blend model fits (``r_c* <= color_tol``) and ``clip(|p - g| / (2 fg_distance), 0, 1)`` elsewhere
    (off-palette ink).
    """
    g = np.asarray(background, dtype=np.float64) / 255.0
    d = rgb - g  # H, W, 3
    cg = _PALETTE - g  # K, 3
    dots = d @ cg.T  # H, W, K
    alpha = np.clip(dots / (cg * cg).sum(1), 0.0, 1.25)
    resid = np.linalg.norm(d[..., None, :] - alpha[..., None] * cg, axis=-1)  # H, W, K
    best = resid.argmin(-1)
    a_best = np.take_along_axis(alpha, best[..., None], -1)[..., 0]
    r_best = np.take_along_axis(resid, best[..., None], -1)[..., 0]
    dist = np.linalg.norm(d, axis=-1)
    fits = r_best <= cfg.color_tol
    fg = (a_best >= cfg.fg_alpha) | (dist >= cfg.fg_distance)
    label = np.where(fits & (a_best >= cfg.fg_alpha), best, -1)
    coverage = np.where(fits, np.clip(a_best, 0.0, 1.0), np.clip(dist / (2.0 * cfg.fg_distance), 0.0, 1.0))
    return fg, label, coverage


def _soft_template(shape: str, cx: float, cy: float, w: float, h: float, hw: Tuple[int, int], ss: int = 4) -> np.ndarray:
    """Anti-aliased coverage (``ss`` x ``ss`` samples per pixel) of ``shape`` with centroid ``(cx, cy)``
    and box ``w`` x ``h``, on a window of ``hw`` pixels (pixel (i, j) spans [j, j+1) x [i, i+1))."""
    H, W = hw
    ys = (np.arange(H * ss, dtype=np.float64) + 0.5) / ss
    xs = (np.arange(W * ss, dtype=np.float64) + 0.5) / ss
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    if shape == "circle":
        m = ((xx - cx) / (w / 2.0)) ** 2 + ((yy - cy) / (h / 2.0)) ** 2 <= 1.0
    elif shape == "square":
        m = (np.abs(xx - cx) <= w / 2.0) & (np.abs(yy - cy) <= h / 2.0)
    elif shape == "triangle":
        top = cy - 2.0 * h / 3.0  # an upright triangle's centroid lies 2/3 of the way down
        depth = (yy - top) / h
        m = (depth >= 0) & (depth <= 1) & (np.abs(xx - cx) <= (w / 2.0) * depth)
    else:  # pragma: no cover - internal
        raise ValueError(shape)
    return m.reshape(H, ss, W, ss).mean(axis=(1, 3))


# Box width (height) of each shape from its standard deviation along x (y) for a uniform fill:
# ellipse w = 4 sigma; box w = sqrt(12) sigma; upright triangle with apex on top w = sqrt(24) sigma_x,
# h = sqrt(18) sigma_y (second moments of the uniform shapes).
_MOMENT_TO_BOX = {
    "circle": (4.0, 4.0),
    "square": (math.sqrt(12.0), math.sqrt(12.0)),
    "triangle": (math.sqrt(24.0), math.sqrt(18.0)),
}


def classify_shape(alpha: np.ndarray, cfg: CheckerConfig = CheckerConfig()) -> Tuple[Optional[str], float]:
    """Shape of one object from its soft coverage map ``alpha`` (values in [0, 1], zero outside it).

    For each hypothesis (ellipse, axis-aligned box, upright triangle) the template is fit by moment
    matching, i.e. centred on the coverage centroid with width and height from the coverage's standard
    deviations (:data:`_MOMENT_TO_BOX`), rendered anti-aliased, and compared by soft IoU
    ``sum(min(alpha, T)) / sum(max(alpha, T))``; the best hypothesis wins. For the rendered shapes the
    right template has IoU near 1 and the others fall well below it (bounding-box fill ratios 1, pi/4
    and 1/2 tell the three apart; working on the soft coverage keeps that true for objects of ~10 px).
    Returns ``(None, iou)`` if the best IoU is below ``min_shape_iou`` or the fitted box is thinner
    than ``min_aspect``.
    """
    a = np.clip(alpha, 0.0, 1.0)
    mass = a.sum()
    if mass <= 0:
        return None, 0.0
    ii, jj = np.mgrid[0 : a.shape[0], 0 : a.shape[1]].astype(np.float64) + 0.5
    cy, cx = (a * ii).sum() / mass, (a * jj).sum() / mass
    sy = math.sqrt(max((a * (ii - cy) ** 2).sum() / mass, 1e-6))
    sx = math.sqrt(max((a * (jj - cx) ** 2).sum() / mass, 1e-6))
    best_name, best_iou, best_wh = None, 0.0, (1.0, 1.0)
    for name, (kx, ky) in _MOMENT_TO_BOX.items():
        w, h = kx * sx, ky * sy
        t = _soft_template(name, cx, cy, w, h, a.shape)
        iou = float(np.minimum(a, t).sum() / np.maximum(a, t).sum())
        if iou > best_iou:
            best_name, best_iou, best_wh = name, iou, (w, h)
    if best_iou < cfg.min_shape_iou or min(best_wh) < cfg.min_aspect * max(best_wh):
        return None, best_iou
    return best_name, best_iou


def detect(image: Any, cfg: CheckerConfig = CheckerConfig(), background: Tuple[int, int, int] = BACKGROUND) -> List[SceneObject]:
    """Find the objects in ``image``: classify pixels (:func:`classify_pixels`), fill holes, label
    4-connected foreground components, drop those below ``min_area_frac`` of the image, then give each
    its majority palette colour and its shape (:func:`classify_shape`). Largest objects first."""
    rgb = image_to_array(image)
    H, W = rgb.shape[:2]
    fg, label, coverage = classify_pixels(rgb, background, cfg)
    fg = ndimage.binary_fill_holes(fg)
    comps, n = ndimage.label(fg)
    if n == 0:
        return []
    areas = np.bincount(comps.ravel(), minlength=n + 1)
    min_area = max(6.0, cfg.min_area_frac * H * W)
    keep = [i for i in range(1, n + 1) if areas[i] >= min_area]
    keep = sorted(keep, key=lambda i: -areas[i])[: cfg.max_objects]
    slices = ndimage.find_objects(comps)
    pad = 2
    out = []
    for i in keep:
        sl = slices[i - 1]
        mask = comps[sl] == i
        labs = label[sl][mask]
        labs = labs[labs >= 0]
        color = None
        if labs.size >= cfg.color_majority * mask.sum():
            counts = np.bincount(labs, minlength=len(_COLOR_NAMES))
            color = _COLOR_NAMES[int(counts.argmax())]
        # Soft coverage in the component's box grown by `pad` px, restricted to the component grown by
        # `pad` px and to pixels of no other component (objects are farther apart than that).
        y0, x0 = sl[0].start, sl[1].start
        wy0, wx0 = max(y0 - pad, 0), max(x0 - pad, 0)
        wy1, wx1 = min(sl[0].stop + pad, H), min(sl[1].stop + pad, W)
        win = comps[wy0:wy1, wx0:wx1]
        region = ndimage.binary_dilation(win == i, iterations=pad) & ((win == 0) | (win == i))
        shape, iou = classify_shape(np.where(region, coverage[wy0:wy1, wx0:wx1], 0.0), cfg)
        bbox = (float(x0), float(y0), float(sl[1].stop), float(sl[0].stop))
        out.append(SceneObject(color, shape, bbox, area=float(areas[i]), shape_iou=iou))
    return out


# ----------------------------------------------------------------------------------------------
# Checker: scoring
# ----------------------------------------------------------------------------------------------

#: Score divisor per extra object: score = base / (1 + EXTRA_PENALTY * n_extra).
EXTRA_PENALTY = 0.5


@dataclass
class CheckResult:
    """Outcome of checking one image against one scene spec.

    score: partial credit in [0, 1] (see :func:`score_objects`).
    correct: GenEval's strict correctness for the spec's category.
    category: the spec's category.
    objects: the objects found (or given).
    details: ``credit`` (per required object), ``relation`` (bool or None), ``n_extra``,
        ``assignment`` (index of the object matched to each required object, -1 = none).
    """

    score: float
    correct: bool
    category: str
    objects: List[SceneObject]
    details: Dict[str, Any] = field(default_factory=dict)


def _credit(req: ObjectSpec, obj: SceneObject) -> float:
    """Credit of ``obj`` for a required object: 1 for the right shape (and colour, if one is named);
    with a named colour, 0.5 each for the right shape and the right colour."""
    shape_ok = obj.shape == req.shape
    if req.color is None:
        return 1.0 if shape_ok else 0.0
    return 0.5 * shape_ok + 0.5 * (obj.color == req.color)


def score_objects(
    objects: Sequence[SceneObject], spec: Union[SceneSpec, str], position_threshold: float = POSITION_THRESHOLD
) -> CheckResult:
    """Score a list of objects against ``spec``: partial credit and GenEval's strict correctness.

    **Partial credit.** Expand the spec into its ``K`` required objects (a counting group of n gives n
    copies). Match found objects to required ones one-to-one (as many pairs as possible:
    ``min(N, K)``), maximising the summed credit ``c_k`` (:func:`_credit`: 1 for a full match; with a
    named colour 0.5 for the shape and 0.5 for the colour). For ``position`` the relation term
    ``rel * (c_A + c_B) / 2`` is added, ``rel`` = 1 if the two matched objects stand in the named
    relation (GenEval's rule, :func:`relative_position`), so the relation earns only as much as the
    objects it relates are right. With ``E = N - min(N, K)`` found objects left unmatched::

        base  = sum_k c_k / K                                   (position: (c_A + c_B + rel (c_A + c_B) / 2) / 3)
        score = base / (1 + 0.5 E)

    So an image with exactly the prompt's objects scores 1, a swapped colour binding scores 0.5, one
    extra object divides the score by 1.5, and an empty image scores 0.

    **Strict correctness** (GenEval, arXiv:2310.11513, its image evaluation): every required
    object is found with its shape (and colour when named); counting additionally needs *exactly* n
    objects of that shape (and colour); position needs the relation to hold. Other extra objects do
    not matter (GenEval checks only the named classes).
    """
    spec = _as_spec(spec)
    objects = list(objects)
    reqs = [o for o in spec.objects for _ in range(o.count)]
    K, N = len(reqs), len(objects)
    credit = np.array([[_credit(r, o) for o in objects] for r in reqs], dtype=np.float64).reshape(K, N)
    relation_ok: Optional[bool] = None
    if spec.category == "position":
        # Brute force over one-to-one assignments of the two required objects (-1 = none left to
        # match); every assignment matches min(N, 2) objects, so E is fixed and the best assignment
        # is the one with the largest credit + relation term.
        if N >= 2:
            candidates = [(i, j) for i in range(N) for j in range(N) if i != j]
        elif N == 1:
            candidates = [(0, -1), (-1, 0)]
        else:
            candidates = [(-1, -1)]
        best = (-1.0, -1, -1, False)
        for i, j in candidates:
            rel = i >= 0 and j >= 0 and spec.relation in relative_position(objects[i].bbox, objects[j].bbox, position_threshold)
            ca = credit[0, i] if i >= 0 else 0.0
            cb = credit[1, j] if j >= 0 else 0.0
            total = ca + cb + rel * (ca + cb) / 2.0
            if total > best[0] + 1e-12:
                best = (total, i, j, rel)
        total, i, j, rel = best
        assignment = [i, j]
        relation_ok = bool(rel)
        n_matched = (i >= 0) + (j >= 0)
        base = total / (K + 1)
        per_credit = [float(credit[0, i]) if i >= 0 else 0.0, float(credit[1, j]) if j >= 0 else 0.0]
    else:
        assignment = [-1] * K
        per_credit = [0.0] * K
        if N > 0:
            rows, cols = linear_sum_assignment(credit, maximize=True)
            for r, c in zip(rows, cols):
                assignment[int(r)] = int(c)
                per_credit[int(r)] = float(credit[r, c])
        n_matched = sum(a >= 0 for a in assignment)
        base = sum(per_credit) / K
    n_extra = N - n_matched
    score = float(base / (1.0 + EXTRA_PENALTY * n_extra))

    # GenEval strict correctness.
    correct = True
    for req in spec.objects:
        n_found = sum(1 for o in objects if _credit(req, o) == 1.0)
        if n_found < req.count or (spec.category == "counting" and n_found != req.count):
            correct = False
    if spec.category == "position":
        a_cands = [o for o in objects if _credit(spec.objects[0], o) == 1.0]
        b_cands = [o for o in objects if _credit(spec.objects[1], o) == 1.0]
        # GenEval compares the most confident detection of each class; ours: the largest.
        if a_cands and b_cands:
            a = max(a_cands, key=lambda o: o.area)
            b = max(b_cands, key=lambda o: o.area)
            correct = correct and spec.relation in relative_position(a.bbox, b.bbox, position_threshold)
        else:
            correct = False
    details = {"credit": per_credit, "relation": relation_ok, "n_extra": int(n_extra), "assignment": assignment}
    score = min(max(score, 0.0), 1.0)
    return CheckResult(score=score, correct=bool(correct), category=spec.category, objects=objects, details=details)


def check(image: Any, spec: Union[SceneSpec, str], cfg: CheckerConfig = CheckerConfig()) -> CheckResult:
    """Check ``image`` (PIL, HxWx3 array or [3, H, W] tensor in [0, 1]) against ``spec`` (or a prompt):
    :func:`detect`, then :func:`score_objects`."""
    spec = _as_spec(spec)
    return score_objects(detect(image, cfg), spec, cfg.position_threshold)


def _iter_images(images: Any) -> List[Any]:
    if isinstance(images, torch.Tensor):
        x = as_image_tensor(images)
        return [x[i] for i in range(x.shape[0])]
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return [images[i] for i in range(images.shape[0])]
    return list(images)


def evaluate(images: Any, prompts: Sequence[str], cfg: CheckerConfig = CheckerConfig()) -> Dict[str, float]:
    """Evaluation summary of images against their prompts (flat dict of floats, for loggers).

    Keys: ``score`` (mean partial credit), ``accuracy`` (strict correctness over all images),
    ``geneval`` (mean over the categories present of their strict accuracy: GenEval's overall score),
    and per category present ``accuracy/<cat>``, ``score/<cat>``, ``n/<cat>``.
    """
    ims = _iter_images(images)
    prompts = list(prompts)
    if len(ims) != len(prompts):
        raise ValueError(f"evaluate: got {len(ims)} images but {len(prompts)} prompts")
    if not ims:
        raise ValueError("evaluate: no images")
    per: Dict[str, List[Tuple[float, bool]]] = {}
    for im, p in zip(ims, prompts):
        r = check(im, p, cfg)
        per.setdefault(r.category, []).append((r.score, r.correct))
    allr = [x for v in per.values() for x in v]
    out: Dict[str, float] = {
        "score": float(np.mean([s for s, _ in allr])),
        "accuracy": float(np.mean([c for _, c in allr])),
    }
    accs = []
    for cat in CATEGORIES:
        if cat in per:
            acc = float(np.mean([c for _, c in per[cat]]))
            accs.append(acc)
            out[f"accuracy/{cat}"] = acc
            out[f"score/{cat}"] = float(np.mean([s for s, _ in per[cat]]))
            out[f"n/{cat}"] = float(len(per[cat]))
    out["geneval"] = float(np.mean(accs))
    return out
