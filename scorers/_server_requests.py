"""The scorer server's requests: a ``POST /score`` body read and checked against the limits from
the PNG headers before anything is decoded, the scorer's input, and its scores as JSON replies.

Part of :mod:`scorers.server` (protocol: :mod:`scorers.remote`)."""
import base64
import binascii
import io
import json
import math
import struct
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from PIL import Image, UnidentifiedImageError

from scorers.base import Scorer, pil_to_tensor, takes_8bit_images
from scorers.remote import PROTOCOL, SUPPORTED_VERSIONS

DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class BadRequest(Exception):
    """A client error: becomes an HTTP ``status`` reply with ``{"error": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _png_size(s: Any, i: int) -> Tuple[int, int]:
    """(width, height) of ``images[i]`` from its PNG header (the first 24 bytes; nothing decoded)."""
    if not isinstance(s, str):
        raise BadRequest(400, f"images[{i}] must be a base64 string, got {type(s).__name__}")
    try:
        head = base64.b64decode(s[:32], validate=True)  # 32 base64 characters = the first 24 bytes
    except (binascii.Error, ValueError):
        raise BadRequest(400, f"images[{i}] is not valid base64") from None
    if len(head) < 24 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise BadRequest(400, f"images[{i}] is not a PNG file")
    w, h = struct.unpack(">II", head[16:24])
    return w, h


def _decode_png(s: str, i: int):
    """``images[i]`` -> the PIL image as loaded, in the PNG's own mode (400 on anything else). Not
    converted to RGB: the official pipelines convert after resizing (matters for RGBA)."""
    try:
        raw = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(400, f"images[{i}] is not valid base64") from None
    try:
        im = Image.open(io.BytesIO(raw), formats=["PNG"])
    except Image.DecompressionBombError as e:
        raise BadRequest(400, f"images[{i}] is refused by Pillow: {e}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise BadRequest(400, f"images[{i}] is not a PNG file") from None
    try:
        im.load()
    except Image.DecompressionBombError as e:
        raise BadRequest(400, f"images[{i}] is refused by Pillow: {e}") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise BadRequest(400, f"images[{i}] is a broken PNG ({e})") from None
    return im


class ScoreRequest:
    """A ``POST /score`` body, checked (fields, PNG headers, pixel limits) but not decoded yet.

    ``pixels``: the sum of width x height of its images; ``size``: their one size, or None when
    they may differ."""

    def __init__(self, prompts: List[str], metadata: Dict[str, Any], images: List[str], sizes: List[Tuple[int, int]],
                 frames: Optional[int] = None, sources: Optional[List[Optional[str]]] = None):
        self.prompts = prompts
        self.metadata = metadata
        self.images = images
        self.sources = sources  # protocol 2: each row's source image (base64 PNG or None), or None
        self.sizes = sizes
        self.frames = frames  # protocol 2 videos: frames per sample (images holds len(prompts) * frames PNGs)
        self.pixels = sum(w * h for w, h in sizes)

    def decode(self) -> List[Any]:
        """The PIL images as loaded (400 for a broken PNG)."""
        return [_decode_png(s, i) for i, s in enumerate(self.images)]

    def decode_sources(self) -> Optional[List[Any]]:
        """The source images as RGB PIL images (None rows stay None), or None without sources."""
        if self.sources is None:
            return None
        return [None if s is None else _decode_png(s, i).convert("RGB") for i, s in enumerate(self.sources)]


def read_score_request(
    body: bytes,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    same_size: bool = True,
    max_request_pixels: Optional[int] = None,
) -> ScoreRequest:
    """JSON body of ``POST /score`` -> :class:`ScoreRequest`, every limit checked from the PNG headers
    (``max_pixels`` per image, ``max_request_pixels`` in all, one size when ``same_size``). Raises
    :class:`BadRequest` (400) naming the offending field."""
    try:
        req = json.loads(body)
    except (UnicodeDecodeError, ValueError) as e:
        raise BadRequest(400, f"body is not valid JSON ({e})") from None
    if not isinstance(req, dict):
        raise BadRequest(400, f"body must be a JSON object, got {type(req).__name__}")
    version = req.get("protocol", 1)
    if version not in SUPPORTED_VERSIONS or isinstance(version, bool):
        raise BadRequest(400, f"protocol {version!r} is not supported; this server speaks {PROTOCOL} "
                         f"(protocol: {' or '.join(map(str, SUPPORTED_VERSIONS))})")
    fields = {"protocol", "prompts", "images", "metadata"} | ({"frames", "source_images"} if version >= 2 else set())
    unknown = sorted(set(req) - fields)
    if unknown:
        raise BadRequest(400, f"unknown field(s) {unknown}; expected {', '.join(sorted(fields - {'protocol'}))}")
    prompts, images, metadata = req.get("prompts"), req.get("images"), req.get("metadata", {})
    frames = req.get("frames")
    if frames is not None and (isinstance(frames, bool) or not isinstance(frames, int) or frames < 1):
        raise BadRequest(400, f"'frames' must be a positive integer (frames per video), got {frames!r}")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise BadRequest(400, "'prompts' must be a list of strings")
    if not isinstance(images, list):
        raise BadRequest(400, "'images' must be a list of base64 PNG strings")
    if len(images) != len(prompts) * (frames or 1):
        if frames:
            raise BadRequest(400, f"got {len(images)} frames for {len(prompts)} prompts of {frames} frames each")
        raise BadRequest(400, f"got {len(images)} images but {len(prompts)} prompts")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise BadRequest(400, f"'metadata' must be a JSON object, got {type(metadata).__name__}")
    for k, v in metadata.items():
        if isinstance(v, list) and len(v) != len(prompts):
            raise BadRequest(400, f"metadata[{k!r}] has {len(v)} entries for {len(prompts)} images")
    sizes = []
    for i, s in enumerate(images):
        w, h = _png_size(s, i)
        if w * h > max_pixels:
            raise BadRequest(400, f"images[{i}] is {w}x{h}, over the server's limit of {max_pixels} pixels")
        sizes.append((w, h))
    sources = req.get("source_images")
    if sources is not None:
        if not isinstance(sources, list) or len(sources) != len(prompts):
            raise BadRequest(400, f"'source_images' must be a list of {len(prompts)} base64 PNGs or nulls (one per prompt)")
        if "image" in metadata:
            raise BadRequest(400, "give source images either as 'source_images' or as metadata['image'], not both")
        for i, s in enumerate(sources):
            if s is None:
                continue
            w, h = _png_size(s, i)
            if w * h > max_pixels:
                raise BadRequest(400, f"source_images[{i}] is {w}x{h}, over the server's limit of {max_pixels} pixels")
    out = ScoreRequest(prompts, metadata, images, sizes, frames=frames, sources=sources)
    if max_request_pixels is not None and out.pixels > max_request_pixels:
        raise BadRequest(
            400, f"the request's {len(sizes)} images hold {out.pixels} pixels, over the server's limit of "
            f"{max_request_pixels} pixels per request; send smaller batches (batch_size)"
        )
    if (same_size or frames) and len(set(sizes)) > 1:
        raise BadRequest(400, f"images must share one size, got {sorted(set(sizes))}")
    return out


def scorer_input(scorer: Callable, pil: List[Any], frames: Optional[int] = None):
    """What ``scorer`` is called with for the decoded images ``pil``: the PIL list itself for a
    :class:`scorers.base.Scorer` or anything with ``pil_input = True`` (a learned scorer then
    preprocesses them as its official package does; the base class converts them to float for the
    others), else float32 [B, 3, H, W] in [0, 1] of their RGB pixels (one size). With ``frames``
    (protocol 2 videos), float32 ``[B, 3, frames, H, W]`` for a scorer that takes videos (``video_input``);
    400 for an image scorer."""
    if frames is not None:
        if not getattr(scorer, "video_input", False):
            raise BadRequest(400, "this server's scorer takes images, not videos: send a video's frames as images "
                             "(protocol 1; flowrl's MultiReward does, with video.score_frames)")
        x = pil_to_tensor(pil)
        return x.reshape(-1, frames, *x.shape[1:]).permute(0, 2, 1, 3, 4).contiguous()
    if isinstance(scorer, Scorer) or takes_8bit_images(scorer):
        return pil
    return pil_to_tensor(pil) if pil else torch.zeros(0, 3, 1, 1)


def _json_scores(values: Any, n: int, label: str) -> List[Optional[float]]:
    """Scores (tensor, array or list) -> n JSON numbers, non-finite ones as None."""
    if isinstance(values, (list, tuple)):
        vals = [math.nan if v is None else float(v) for v in values]
    else:
        vals = torch.as_tensor(values).detach().to("cpu", torch.float64).reshape(-1).tolist()
    if len(vals) != n:
        raise RuntimeError(f"{label} returned {len(vals)} scores for {n} images")
    return [v if math.isfinite(v) else None for v in vals]


def split_scores(out: Any, sizes: Sequence[int]) -> List[Dict[str, Any]]:
    """The output of one scorer call on requests of ``sizes`` images, concatenated -> one JSON reply
    object per request."""
    total, starts = 0, []
    for n in sizes:
        starts.append(total)
        total += n
    if isinstance(out, Mapping):
        comps = {str(k): _json_scores(v, total, f"component {k!r}") for k, v in out.items()}
        return [{"scores": {k: v[a:a + n] for k, v in comps.items()}} for a, n in zip(starts, sizes)]
    vals = _json_scores(out, total, "the scorer")
    return [{"scores": vals[a:a + n]} for a, n in zip(starts, sizes)]
