"""Scorers that run in another process, reached over HTTP with the flowrl scorer protocol (no pickle).

Users run a large reward model as a server (``flowrl serve-scorer NAME``, :mod:`scorers.server`) and
train against it with the ``remote`` scorer defined here. The protocol ``flowrl-scorer/2`` carries
only JSON and PNG (version 2 adds, to version 1, the optional ``source_images`` of editing rewards and
videos as frames; servers still accept version 1):

* ``GET /health`` -> ``{"status": "ok", "protocol": "flowrl-scorer/2", "scorer": NAME,
  "max_request_bytes": N}``;
* ``POST /score`` with a JSON body ``{"protocol": 1, "prompts": [B strings], "images": [B base64
  PNGs], "metadata": {...}}`` (and with ``"protocol": 2`` optionally ``"source_images": [B base64 PNGs
  or null]``: each row's source image, which an editing reward judges the edit against; the server
  passes them to its scorer as the ``image`` column, as PIL images) -> ``{"scores": [B numbers]}`` or ``{"scores": {name: [B numbers]}}``
  (non-finite scores as ``null``, read back as NaN); errors are 4xx/5xx with ``{"error": message}``.

Protocol 2 (``flowrl-scorer/2``) adds videos: ``{"protocol": 2, "frames": F, "prompts": [B strings],
"images": [B * F base64 PNGs], "metadata": {...}}``, the frames of each sample in order (frame f of sample b at
``b * F + f``), scored by a server whose scorer takes videos ``[B, 3, F, H, W]`` (``video_input``, e.g.
``temporal_consistency``); a server of an image scorer refuses it (400): image scorers get a video's frames
as images (protocol 1 requests, the frame mean of :mod:`scorers.video`). A client sends protocol 1 for
images, so it still works with servers of protocol 1; a protocol-2 server accepts both.

A client retries 408, 429, 502, 503, 504 and connection failures (honouring ``Retry-After``), never
the other 4xx nor 500. A float batch travels as the 8-bit PNGs of :func:`quantize_uint8`, so its
remote score is the in-process score of those uint8 pixels. The full protocol, its error codes and
why it is JSON + PNG are in docs/methods.md ("The remote scorer protocol").
"""
from __future__ import annotations

import base64
import email.utils
import http.client
import io
import json
import logging
import math
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from scorers._preprocess import is_pil_or_uint8
from scorers._text import short
from scorers.base import Scorer, as_8bit_batch, as_image_tensor
from scorers.registry import register

log = logging.getLogger(__name__)

PROTOCOL = "flowrl-scorer/2"
PROTOCOL_VERSION = 2  # what a server speaks: 1 (images) and 2 (images with source images, or videos with "frames")
IMAGE_PROTOCOL_VERSION = 1  # what a client sends for images without source images (servers of protocol 1 understand it)
SUPPORTED_VERSIONS = (1, 2)
# zlib level for PNGs sent over the wire: level 1 is several times faster than PIL's default (6) and
# only slightly larger; the encoding is lossless at every level.
PNG_COMPRESS_LEVEL = 1
MAX_BACKOFF_S = 60.0
# HTTP statuses worth another try: the server or a proxy in front of it is busy or restarting.
RETRY_STATUSES = frozenset({408, 429, 502, 503, 504})
ON_ERROR_CHOICES = ("raise", "invalid")


class RemoteScorerError(RuntimeError):
    """A request to a scorer server failed; the message names the URL and the cause.

    Attributes: ``url``, ``cause`` (one line), ``status`` (HTTP status or None), ``attempts``.
    """

    def __init__(self, what: str, url: str, cause: str, status: Optional[int] = None, attempts: int = 1):
        self.url = url
        self.cause = cause
        self.status = status
        self.attempts = attempts
        tries = f" (after {attempts} attempts)" if attempts > 1 else ""
        super().__init__(f"{what} {url}: {cause}{tries}")


# ----------------------------------------------------------------------------------------------
# images and JSON
# ----------------------------------------------------------------------------------------------


def quantize_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] -> uint8 with ``q = round(255 * clamp(x, 0, 1))`` (what PNG stores)."""
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or inf; they cannot be encoded as PNG")
    return (images.detach().float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def encode_png(image: torch.Tensor, compress_level: int = PNG_COMPRESS_LEVEL) -> bytes:
    """One image [3, H, W] (float in [0, 1]) -> the bytes of an 8-bit RGB PNG (lossless after
    :func:`quantize_uint8`)."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be [3, H, W], got shape {tuple(image.shape)}")
    arr = quantize_uint8(image).permute(1, 2, 0).contiguous().cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def encode_png_b64(image: torch.Tensor) -> str:
    """One image [3, H, W] in [0, 1] -> standard base64 (ASCII) of its PNG."""
    return base64.b64encode(encode_png(image)).decode("ascii")


# PIL modes a PNG stores losslessly and Pillow reads back in the same mode (8 bits per channel).
PNG_PIL_MODES = ("1", "L", "LA", "P", "RGB", "RGBA")


def encode_pil_png(image: Any, compress_level: int = PNG_COMPRESS_LEVEL) -> bytes:
    """A PIL image -> PNG bytes of the image as it is (mode, size, palette and transparency kept) when
    its mode is one of :data:`PNG_PIL_MODES`; any other mode is converted to RGB first. The server
    decodes the same image, so the official pipelines see what the caller passed."""
    im = image if image.mode in PNG_PIL_MODES else image.convert("RGB")
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def encode_uint8_png(image: torch.Tensor, compress_level: int = PNG_COMPRESS_LEVEL) -> bytes:
    """One uint8 image [3, H, W] -> the bytes of an 8-bit RGB PNG of exactly these levels."""
    if image.ndim != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
        raise ValueError(f"image must be uint8 [3, H, W], got {image.dtype} of shape {tuple(image.shape)}")
    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).contiguous().cpu().numpy(), "RGB").save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def video_frames(video: torch.Tensor) -> torch.Tensor:
    """Videos ``[B, 3, F, H, W]`` -> their frames ``[B * F, 3, H, W]``, sample-major (frame f of sample b at b F + f)."""
    if video.ndim != 5 or video.shape[1] != 3:
        raise ValueError(f"videos must be [B, 3, F, H, W], got shape {tuple(video.shape)}")
    return video.permute(0, 2, 1, 3, 4).reshape(-1, 3, *video.shape[3:])


def encode_images_b64(images: Any) -> List[str]:
    """A batch -> base64 PNGs: float [B, 3, H, W] in [0, 1] quantised (:func:`encode_png`), a uint8
    tensor as its levels, PIL images as they are (:func:`encode_pil_png`); videos [B, 3, F, H, W] as
    their B * F frames (:func:`video_frames`)."""
    if isinstance(images, torch.Tensor) and images.ndim == 5:
        images = video_frames(images)
    if is_pil_or_uint8(images):
        batch = as_8bit_batch(images)
        if isinstance(batch, torch.Tensor):
            return [_b64(encode_uint8_png(img)) for img in batch]
        return [_b64(encode_pil_png(im)) for im in batch]
    return [encode_png_b64(img) for img in as_image_tensor(images)]


def _jsonable(value: Any, key: str) -> Any:
    """Metadata value -> plain JSON types (tensors and numpy arrays become lists)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, key) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, key) for k, v in value.items()}
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise ValueError(f"metadata[{key!r}] holds a {type(value).__name__}, which cannot be sent as JSON")


def encode_source_b64(image: Any) -> Optional[str]:
    """One source image (a file path, a PIL image, a [3, H, W] float tensor in [0, 1], or None) -> a base64
    PNG (None stays None)."""
    if image is None:
        return None
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        try:
            with Image.open(image) as im:
                return _b64(encode_pil_png(im.convert("RGB")))
        except OSError as e:
            raise ValueError(f"source image {image!r} is not a readable image ({type(e).__name__})") from None
    if isinstance(image, torch.Tensor):
        return encode_png_b64(image.detach().to("cpu", torch.float32))
    if hasattr(image, "convert"):
        return _b64(encode_pil_png(image))
    raise ValueError(f"a source image must be a path, a PIL image or a [3, H, W] tensor, got {type(image).__name__}")


def build_score_request(images: Any, prompts: Sequence[str], metadata: Optional[Mapping[str, Any]] = None) -> bytes:
    """The JSON body of ``POST /score`` for a batch ``images``: float [B, 3, H, W] in [0, 1], uint8
    [B, 3, H, W] or PIL images (see the module docstring for what is sent). A metadata column ``image``
    (each row's source image, editing) travels as ``source_images`` PNGs and videos [B, 3, F, H, W] as their
    frames with ``frames`` (both protocol 2); without either the request is protocol 1."""
    frames = int(images.shape[2]) if isinstance(images, torch.Tensor) and images.ndim == 5 else None
    encoded = encode_images_b64(images)
    prompts = [str(p) for p in prompts]
    if len(prompts) * (frames or 1) != len(encoded):
        what = f"videos of {frames} frames" if frames else "images"
        raise ValueError(f"got {len(encoded) // (frames or 1)} {what} but {len(prompts)} prompts")
    metadata = dict(metadata or {})
    sources = metadata.pop("image", None)
    v2 = frames is not None or sources is not None
    body: Dict[str, Any] = {"protocol": PROTOCOL_VERSION if v2 else IMAGE_PROTOCOL_VERSION}
    if frames is not None:
        body["frames"] = frames
    body.update({
        "prompts": prompts,
        "images": encoded,
        "metadata": {str(k): _jsonable(v, str(k)) for k, v in metadata.items()},
    })
    if sources is not None:
        if isinstance(sources, (str, bytes)) or len(sources) != len(prompts):
            raise ValueError(f"metadata['image']: give one source image per prompt ({len(prompts)})")
        body["source_images"] = [encode_source_b64(s) for s in sources]
    return json.dumps(body).encode("utf-8")


def _as_float(v: Any) -> float:
    if v is None:
        return math.nan
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(type(v).__name__)
    return float(v)


def parse_scores(reply: Any, n: int) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
    """A decoded reply -> float32 tensor [n], or a dict of them for named components.

    ``null`` becomes NaN. Raises ValueError (saying what is wrong) for any other shape.
    """
    scores = reply.get("scores") if isinstance(reply, dict) else reply
    if isinstance(reply, dict) and "scores" not in reply:
        raise ValueError(f"expected a JSON object with key 'scores', got keys {sorted(reply)[:5]}")

    def one(values: Any, label: str) -> torch.Tensor:
        if not isinstance(values, list):
            raise ValueError(f"{label} must be a list of numbers, got {type(values).__name__}")
        if len(values) != n:
            raise ValueError(f"{label} has {len(values)} values for a batch of {n} images")
        try:
            return torch.tensor([_as_float(v) for v in values], dtype=torch.float32)
        except TypeError as e:
            raise ValueError(f"{label} holds a {e} where a number was expected") from None

    if isinstance(scores, dict):
        if not scores:
            raise ValueError("'scores' is an empty object")
        return {str(k): one(v, f"scores[{k!r}]") for k, v in scores.items()}
    return one(scores, "scores")


# ----------------------------------------------------------------------------------------------
# HTTP with timeout, retries and clear errors
# ----------------------------------------------------------------------------------------------


def _opener(trust_env: bool) -> urllib.request.OpenerDirector:
    # Reward servers are local or in-cluster: by default ignore http_proxy & co, which would send a
    # request for 127.0.0.1 to a proxy on many clusters.
    return urllib.request.build_opener() if trust_env else urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _server_message(body: bytes) -> str:
    """The ``error`` field of a JSON error reply, else the start of the body as text."""
    text = body.decode("utf-8", "replace").strip()
    try:
        obj = json.loads(text)
        if isinstance(obj, dict) and "error" in obj:
            err = obj["error"]  # ours: a string; OpenAI-style servers: {"message": ...}
            return short(err.get("message", err) if isinstance(err, dict) else err, 300)  # it may quote a prompt
        if isinstance(obj, dict) and isinstance(obj.get("message"), str):
            return short(obj["message"], 300)
    except ValueError:
        pass
    return text[:300] if text else "(empty body)"


def _describe_os_error(err: BaseException, timeout: float, n_bytes: int) -> str:
    if isinstance(err, (socket.timeout, TimeoutError)):
        return f"timed out after {timeout:g} s"
    if isinstance(err, ConnectionRefusedError):
        return "connection refused (is the server running on this host and port?)"
    if isinstance(err, socket.gaierror):
        return f"cannot resolve the host name ({err})"
    if isinstance(err, (BrokenPipeError, ConnectionResetError)):
        return (
            f"connection closed by the server while sending the request ({n_bytes} bytes); a server "
            "closes early on a request over its size limit (see max_request_bytes at GET /health)"
        )
    if isinstance(err, http.client.RemoteDisconnected):
        return "the server closed the connection without replying"
    if isinstance(err, http.client.HTTPException):
        return f"broken HTTP reply ({type(err).__name__}: {err})"
    return f"{type(err).__name__}: {err}"


def _retry_after_s(headers: Any) -> Optional[float]:
    """Seconds asked for by a ``Retry-After`` header (delay-seconds or an HTTP date), else None."""
    value = headers.get("Retry-After") if headers is not None else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _request_once(
    opener: urllib.request.OpenerDirector, url: str, data: Optional[bytes], headers: Mapping[str, str], timeout: float
) -> Tuple[Optional[int], Optional[bytes], Optional[str], bool, Optional[float]]:
    """One request. Returns (status, body, error cause, retryable, Retry-After seconds or None)."""
    req = urllib.request.Request(url, data=data, headers=dict(headers), method="POST" if data is not None else "GET")
    n = len(data) if data is not None else 0
    try:
        with opener.open(req, timeout=timeout) as resp:
            return resp.status, resp.read(), None, False, None
    except urllib.error.HTTPError as e:
        try:
            msg = _server_message(e.read())
        except (OSError, http.client.HTTPException):
            msg = "(no body)"
        retryable = e.code in RETRY_STATUSES
        return e.code, None, f"HTTP {e.code} {e.reason}: {msg}", retryable, _retry_after_s(e.headers) if retryable else None
    except urllib.error.URLError as e:
        reason = e.reason if isinstance(e.reason, BaseException) else OSError(str(e.reason))
        return None, None, _describe_os_error(reason, timeout, n), True, None
    except (OSError, http.client.HTTPException) as e:  # timeouts and resets while reading the reply
        return None, None, _describe_os_error(e, timeout, n), True, None


def request_json(
    url: str,
    payload: Optional[bytes] = None,
    *,
    timeout: float = 60.0,
    retries: int = 3,
    backoff: float = 1.0,
    headers: Optional[Mapping[str, str]] = None,
    what: str = "remote scorer",
    trust_env: bool = False,
) -> Any:
    """POST ``payload`` (JSON bytes; GET when None) to ``url`` and return the decoded JSON reply.

    Up to ``1 + retries`` attempts; before attempt k+1 it sleeps ``min(backoff * 2**(k-1), 60)`` s.
    Connection failures, timeouts and HTTP 408/429/502/503/504 are retried; other HTTP errors and an
    unreadable reply are not. A retried reply's ``Retry-After`` header (seconds or an HTTP date)
    lengthens that wait to at least what it asks (at most 60 s). Raises :class:`RemoteScorerError` naming ``url`` and the cause.
    ``timeout`` bounds the connection and each wait for reply bytes (seconds).
    """
    hdrs = {"Accept": "application/json"}
    if payload is not None:
        hdrs["Content-Type"] = "application/json"
    hdrs.update(headers or {})
    opener = _opener(trust_env)
    attempts = 0
    while True:
        attempts += 1
        status, body, cause, retryable, retry_after = _request_once(opener, url, payload, hdrs, timeout)
        if cause is None:
            break
        if not retryable or attempts > retries:
            raise RemoteScorerError(what, url, cause, status=status, attempts=attempts)
        delay = min(max(backoff * 2 ** (attempts - 1), retry_after or 0.0), MAX_BACKOFF_S)
        log.warning("%s %s: %s; retrying in %.3g s (attempt %d of %d)", what, url, cause, delay, attempts + 1, retries + 1)
        time.sleep(delay)
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        excerpt = body[:80].decode("utf-8", "replace")
        cause = f"malformed reply: not JSON ({e}); it starts with {excerpt!r}"
        raise RemoteScorerError(what, url, cause, status=status, attempts=attempts) from None


def check_retry_options(timeout: float, retries: int, backoff: float, on_error: str) -> None:
    """ValueError naming the argument unless timeout > 0, retries >= 0 (int), backoff >= 0 and
    on_error is "raise" or "invalid"."""
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if not (isinstance(retries, int) and retries >= 0):
        raise ValueError(f"retries must be an integer >= 0, got {retries!r}")
    if not (isinstance(backoff, (int, float)) and backoff >= 0):
        raise ValueError(f"backoff must be >= 0 seconds, got {backoff!r}")
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")


def check_url(url: Any, example: str = "http://127.0.0.1:18090", arg: str = "url") -> urllib.parse.SplitResult:
    """Split ``url``; ValueError naming ``arg`` unless it is an http(s) URL with a host."""
    if not isinstance(url, str) or not url:
        raise ValueError(f"{arg} is required: the server's address, e.g. {example!r}")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{arg} must be an http:// or https:// URL with a host, got {url!r}")
    return parts


# ----------------------------------------------------------------------------------------------
# the `remote` scorer
# ----------------------------------------------------------------------------------------------


class RemoteScorer(Scorer):
    """Client of a ``flowrl-scorer/2`` (or /1, for images without source images) server (see the module docstring).

    Args:
        url: the server, ``http://host:port`` (``/score`` is appended) or the full score endpoint.
        timeout: seconds to connect and to wait for reply bytes, per attempt.
        retries: further attempts after a retryable failure; ``backoff`` seconds before the first,
            doubling after each.
        on_error: ``"raise"`` raises :class:`RemoteScorerError`; ``"invalid"`` logs a warning and
            returns NaN for the failed batch's samples (the multi-reward combiner counts and skips them).
        component: for a server with named components, the one this scorer returns.
        weights: for a server with named components, return ``sum_k weights[k] * scores[k]`` instead.
        headers: extra HTTP headers (for example an authorisation token of a proxy in front).
        trust_env: honour the ``http_proxy``/``no_proxy`` environment variables (off by default).
        batch_size: images per request.
    """

    name = "remote"
    # PIL images and uint8 tensors are sent as they are (no float round trip), so the server's
    # scorer gets the caller's pixels and mode.
    pil_input = True

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 1.0,
        on_error: str = "raise",
        component: Optional[str] = None,
        weights: Optional[Mapping[str, float]] = None,
        headers: Optional[Mapping[str, str]] = None,
        trust_env: bool = False,
        batch_size: int = 16,
        video: bool = False,
    ):
        super().__init__(device="cpu", dtype=torch.float32, batch_size=batch_size, differentiable=False)
        self.video_input = bool(video)  # send videos whole (protocol 2) to a server whose scorer takes videos
        parts = check_url(url)
        check_retry_options(timeout, retries, backoff, on_error)
        if component is not None and weights is not None:
            raise ValueError("give either component or weights, not both")
        if weights is not None and (not isinstance(weights, Mapping) or not weights):
            raise ValueError(f"weights must be a non-empty mapping of component name to weight, got {weights!r}")
        path = parts.path.rstrip("/")
        base = urllib.parse.urlunsplit((parts.scheme, parts.netloc, "", "", ""))
        if path in ("", "/"):
            self.url = base + "/score"
            self.health_url = base + "/health"
        else:
            self.url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))
            self.health_url = base + (path[: -len("/score")] if path.endswith("/score") else "") + "/health"
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.on_error = on_error
        self.component = component
        self.weights = dict(weights) if weights is not None else None
        self.headers = dict(headers or {})
        self.trust_env = bool(trust_env)
        self.failed_batches = 0
        self.failed_samples = 0
        self._component_names: List[str] = []

    def health(self) -> Dict[str, Any]:
        """``GET /health`` of the server (same timeout and retry rules); raises RemoteScorerError."""
        reply = request_json(
            self.health_url, None, timeout=self.timeout, retries=self.retries, backoff=self.backoff,
            headers=self.headers, what="remote scorer health check", trust_env=self.trust_env,
        )
        if not isinstance(reply, dict):
            raise RemoteScorerError("remote scorer health check", self.health_url, f"malformed reply: {reply!r:.100}")
        return reply

    def _request(self, images: Any, prompts: List[str], metadata: Mapping[str, Any]):
        body = build_score_request(images, prompts, metadata)
        reply = request_json(
            self.url, body, timeout=self.timeout, retries=self.retries, backoff=self.backoff,
            headers=self.headers, trust_env=self.trust_env,
        )
        try:
            out = parse_scores(reply, len(images))
        except ValueError as e:
            raise RemoteScorerError("remote scorer", self.url, f"malformed reply: {e}") from None
        if isinstance(out, dict):
            self._component_names = list(out)
        return out

    def _fail(self, err: RemoteScorerError, n: int) -> None:
        if self.on_error == "raise":
            raise err
        self.failed_batches += 1
        self.failed_samples += n
        log.warning("%s; its %d samples are marked invalid (NaN)", err, n)

    def _select(self, out: Union[torch.Tensor, Dict[str, torch.Tensor]]) -> torch.Tensor:
        if isinstance(out, torch.Tensor):
            if self.component is not None or self.weights is not None:
                raise RemoteScorerError(
                    "remote scorer", self.url, "the server returned one list of scores, but component/weights asks for named components"
                )
            return out
        names = sorted(out)
        if self.weights is not None:
            missing = [k for k in self.weights if k not in out]
            if missing:
                raise RemoteScorerError("remote scorer", self.url, f"the reply has no component(s) {missing}; it has {names}")
            return sum(float(w) * out[k] for k, w in self.weights.items())
        if self.component is not None:
            if self.component not in out:
                raise RemoteScorerError("remote scorer", self.url, f"the reply has no component {self.component!r}; it has {names}")
            return out[self.component]
        if len(out) == 1:
            return next(iter(out.values()))
        raise RemoteScorerError(
            "remote scorer", self.url, f"the server returned named components {names}: set component= or weights="
        )

    def __call__(self, images: Any, prompts: Sequence[str], **metadata) -> torch.Tensor:
        if not (isinstance(images, torch.Tensor) and images.ndim == 5):
            return super().__call__(images, prompts, **metadata)
        if not self.video_input:
            raise ValueError("remote: got videos [B, 3, F, H, W]; set video: true to send them whole to a server whose "
                             "scorer takes videos, or let MultiReward score their frames as images")
        prompts = list(prompts)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"remote: got {images.shape[0]} videos but {len(prompts)} prompts")
        outs = []
        with torch.no_grad():
            for a in range(0, len(prompts), self.batch_size):
                b = a + self.batch_size
                meta = {k: (v[a:b] if isinstance(v, (list, tuple, torch.Tensor)) else v) for k, v in metadata.items()}
                outs.append(self.score_batch(images[a:b].detach().float().cpu(), prompts[a:b], **meta).reshape(-1).float())
        return torch.cat(outs) if outs else torch.zeros(0)

    def score_batch(self, images: Any, prompts: List[str], **metadata) -> torch.Tensor:
        n = len(images)
        try:
            return self._select(self._request(images, prompts, metadata))
        except RemoteScorerError as err:
            self._fail(err, n)
            return torch.full((n,), math.nan)

    def __repr__(self) -> str:
        return f"RemoteScorer(url={self.url!r}, batch_size={self.batch_size}, on_error={self.on_error!r})"


@register("remote")
def make_remote(
    device: Any = "cpu",
    dtype: torch.dtype = torch.float32,
    checkpoint: Optional[str] = None,
    batch_size: int = 16,
    differentiable: bool = False,
    *,
    url: Optional[str] = None,
    timeout: float = 60.0,
    retries: int = 3,
    backoff: float = 1.0,
    on_error: str = "raise",
    component: Optional[str] = None,
    weights: Optional[Mapping[str, float]] = None,
    headers: Optional[Mapping[str, str]] = None,
    trust_env: bool = False,
    video: bool = False,
    **options: Any,
) -> RemoteScorer:
    """Factory of the ``remote`` scorer (see :class:`RemoteScorer`). ``device`` and ``dtype`` are
    accepted for the common signature and unused: the model runs on the server."""
    if options:
        raise ValueError(
            f"remote scorer: unknown option(s) {sorted(options)}; valid: url, timeout, retries, backoff, "
            "on_error, component, weights, headers, trust_env, batch_size, video"
        )
    if checkpoint is not None:
        raise ValueError("remote scorer: checkpoint is chosen on the server (flowrl serve-scorer NAME --checkpoint PATH)")
    if differentiable:
        raise ValueError("remote scorer: differentiable=True is impossible, gradients do not cross HTTP")
    return RemoteScorer(
        url, timeout=timeout, retries=retries, backoff=backoff, on_error=on_error, component=component,
        weights=weights, headers=headers, trust_env=trust_env, batch_size=batch_size, video=video,
    )
