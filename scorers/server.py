"""``flowrl serve-scorer NAME``: serve any registered scorer over HTTP with the ``flowrl-scorer/1``
protocol (specified in :mod:`scorers.remote`; JSON and PNG only, never pickle).

Built on the standard library's :class:`http.server.ThreadingHTTPServer` (no extra dependency). One
thread per connection answers ``/health`` at once; calls into the scorer are serialised by a lock,
since a model is rarely safe to call from two threads. The server binds 127.0.0.1 unless told
otherwise and has no authentication: bind another address only on a trusted network.

Images reach the scorer as the PNG files hold them: a :class:`scorers.base.Scorer` (every
registered scorer) gets the decoded PIL images, in their own mode (RGB, RGBA, L, ...), so a learned
scorer runs its model's official PIL preprocessing on them (:attr:`scorers.base.Scorer.pil_input`;
the others convert them to float [B, 3, H, W] in [0, 1] as before), and a plain callable gets that
float tensor (RGB). A float batch sent by the ``remote`` client arrives as its 8-bit quantisation
``round(255 · clamp(x, 0, 1))``, so its remote score is the in-process score of that uint8 image
(see :mod:`scorers.remote`). Images of one request must share one size unless the scorer sets
``pil_input``.

Every bad request gets a 4xx with ``{"error": "..."}`` and the server keeps serving: a body over
``max_request_bytes`` (413; the body is read and dropped when it is at most 4x the limit, so the
client sees the reply, otherwise the connection is closed at once), no Content-Length (411), a content
type other than JSON (415), bad JSON or fields, a non-PNG or oversized image (400). A scorer that
raises gives 500 with the exception's type and message. Each connection has a socket timeout, so a
stalled client cannot hold a thread forever.

Python use::

    with ScorerServer("pickscore", port=0, device="cuda") as srv:   # port 0: any free port
        ...  # srv.url is the address for the ``remote`` scorer
"""
from __future__ import annotations

import argparse
import base64
import binascii
import io
import ipaddress
import json
import logging
import math
import socket
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch

from scorers.base import Scorer, pil_to_tensor, takes_8bit_images
from scorers.remote import PROTOCOL, PROTOCOL_VERSION

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 18090
DEFAULT_MAX_REQUEST_BYTES = 256 * 2**20  # 256 MiB: 64 images of 1024x1024 as PNG fit comfortably
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
DEFAULT_REQUEST_TIMEOUT_S = 120.0
_DRAIN_FACTOR = 4  # an oversized body up to this many times the limit is read and dropped before 413
_DRAIN_CHUNK = 1 << 16


class BadRequest(Exception):
    """A client error: becomes an HTTP ``status`` reply with ``{"error": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _decode_png(s: Any, i: int, max_pixels: int):
    """``images[i]``: base64 text -> the PIL image as loaded, in the PNG's own mode (400 on anything
    else). Not converted to RGB: the official pipelines convert after resizing (matters for RGBA)."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(s, str):
        raise BadRequest(400, f"images[{i}] must be a base64 string, got {type(s).__name__}")
    try:
        raw = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(400, f"images[{i}] is not valid base64") from None
    try:
        im = Image.open(io.BytesIO(raw), formats=["PNG"])
    except (UnidentifiedImageError, OSError, ValueError):
        raise BadRequest(400, f"images[{i}] is not a PNG file") from None
    w, h = im.size
    if w * h > max_pixels:
        raise BadRequest(400, f"images[{i}] is {w}x{h}, over the server's limit of {max_pixels} pixels")
    try:
        im.load()
    except (OSError, ValueError, SyntaxError) as e:
        raise BadRequest(400, f"images[{i}] is a broken PNG ({e})") from None
    return im


def parse_score_request(body: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, same_size: bool = True):
    """JSON body of ``POST /score`` -> (images: list of PIL images as decoded, prompts, metadata).

    ``same_size``: all images must have one size (400 otherwise). Raises :class:`BadRequest`
    (status 400) naming the offending field. :func:`scorer_input` turns the images into what a
    scorer takes.
    """
    try:
        req = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise BadRequest(400, f"body is not valid JSON ({e})") from None
    if not isinstance(req, dict):
        raise BadRequest(400, f"body must be a JSON object, got {type(req).__name__}")
    version = req.get("protocol", PROTOCOL_VERSION)
    if version != PROTOCOL_VERSION:
        raise BadRequest(400, f"protocol {version!r} is not supported; this server speaks {PROTOCOL} (protocol: 1)")
    unknown = sorted(set(req) - {"protocol", "prompts", "images", "metadata"})
    if unknown:
        raise BadRequest(400, f"unknown field(s) {unknown}; expected prompts, images, metadata")
    prompts, images, metadata = req.get("prompts"), req.get("images"), req.get("metadata", {})
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise BadRequest(400, "'prompts' must be a list of strings")
    if not isinstance(images, list):
        raise BadRequest(400, "'images' must be a list of base64 PNG strings")
    if len(images) != len(prompts):
        raise BadRequest(400, f"got {len(images)} images but {len(prompts)} prompts")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise BadRequest(400, f"'metadata' must be a JSON object, got {type(metadata).__name__}")
    for k, v in metadata.items():
        if isinstance(v, list) and len(v) != len(prompts):
            raise BadRequest(400, f"metadata[{k!r}] has {len(v)} entries for {len(prompts)} images")
    pil = [_decode_png(s, i, max_pixels) for i, s in enumerate(images)]
    if same_size and len({im.size for im in pil}) > 1:
        raise BadRequest(400, f"images must share one size, got {sorted({im.size for im in pil})}")
    return pil, prompts, metadata


def scorer_input(scorer: Callable, pil: List[Any]):
    """What ``scorer`` is called with for the decoded images ``pil``: the PIL list itself for a
    :class:`scorers.base.Scorer` or anything with ``pil_input = True`` (a learned scorer then
    preprocesses them as its official package does; the base class converts them to float for the
    others), else float32 [B, 3, H, W] in [0, 1] of their RGB pixels (one size)."""
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


def format_scores(out: Any, n: int) -> Dict[str, Any]:
    """Scorer output (tensor [n], or a mapping name -> tensor [n]) -> the JSON reply object.

    Non-finite scores become ``null``."""
    if isinstance(out, Mapping):
        return {"scores": {str(k): _json_scores(v, n, f"component {k!r}") for k, v in out.items()}}
    return {"scores": _json_scores(out, n, "the scorer")}


class ScorerHTTPServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer holding one scorer and the request limits."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address,
        scorer: Callable,
        scorer_name: str,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S,
    ):
        self.scorer = scorer
        self.scorer_name = scorer_name
        self.max_request_bytes = int(max_request_bytes)
        self.max_image_pixels = int(max_image_pixels)
        self.request_timeout = float(request_timeout)
        self.score_lock = threading.Lock()
        self.requests_served = 0  # batches the scorer has returned scores for
        if ":" in str(address[0]):  # an IPv6 literal such as ::1
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}"


class _Handler(BaseHTTPRequestHandler):
    server: ScorerHTTPServer
    server_version = "flowrl-scorer/1"
    # HTTP/1.0: one request per connection, then close (simple and robust for large bodies).

    def setup(self) -> None:
        self.timeout = self.server.request_timeout  # StreamRequestHandler applies it to the socket
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        log.debug("%s - %s", self.address_string(), format % args)

    def _reply(self, status: int, obj: Dict[str, Any]) -> None:
        data = json.dumps(obj, allow_nan=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        self.close_connection = True

    def _error(self, status: int, message: str) -> None:
        if status >= 500:
            log.error("%s %s -> %d: %s", self.command, self.path, status, message)
        else:
            log.info("%s %s -> %d: %s", self.command, self.path, status, message)
        self._reply(status, {"error": message})

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        # http.server's own errors (unknown method, header parse failures) also answer in JSON, with
        # a status line even when the request line was too broken to read its HTTP version.
        if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":
            self.request_version = "HTTP/1.0"
        try:
            self._reply(code, {"error": message or HTTPStatus(code).phrase})
        except Exception:  # the socket may already be gone
            self.close_connection = True

    def _route(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/") or "/"

    def do_GET(self) -> None:
        if self._route() in ("/health", "/"):
            self._reply(200, {
                "status": "ok", "protocol": PROTOCOL, "scorer": self.server.scorer_name,
                "max_request_bytes": self.server.max_request_bytes,
            })
        else:
            self._error(404, f"no such path {self.path!r}; use GET /health or POST /score")

    def _drain(self, n: int) -> None:
        left = n
        try:
            while left > 0:
                chunk = self.rfile.read(min(_DRAIN_CHUNK, left))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() not in ("", "identity"):
            raise BadRequest(411, "chunked bodies are not supported: send a Content-Length")
        raw = self.headers.get("Content-Length")
        if raw is None:
            raise BadRequest(411, "Content-Length header is required")
        try:
            n = int(raw)
            if n < 0:
                raise ValueError
        except ValueError:
            raise BadRequest(400, f"bad Content-Length {raw!r}") from None
        limit = self.server.max_request_bytes
        if n > limit:
            if n <= _DRAIN_FACTOR * limit:
                self._drain(n)
            raise BadRequest(
                413, f"request body of {n} bytes is over this server's limit of {limit} bytes; send smaller "
                "batches (batch_size) or restart the server with a larger --max-request-bytes"
            )
        ctype = self.headers.get("Content-Type", "application/json").split(";")[0].strip().lower()
        if ctype != "application/json":
            self._drain(n)
            raise BadRequest(415, f"Content-Type must be application/json, got {ctype!r}")
        body = self.rfile.read(n)
        if len(body) != n:
            raise BadRequest(400, f"body ended after {len(body)} of {n} bytes")
        return body

    def do_POST(self) -> None:
        try:
            if self._route() != "/score":
                self._drain_if_small()
                raise BadRequest(404, f"no such path {self.path!r}; use POST /score")
            body = self._read_body()
            scorer = self.server.scorer
            pil, prompts, metadata = parse_score_request(
                body, self.server.max_image_pixels, same_size=not takes_8bit_images(scorer)
            )
            n = len(prompts)
            if n == 0:
                self._reply(200, {"scores": []})
                return
            try:
                with self.server.score_lock:
                    out = scorer(scorer_input(scorer, pil), prompts, **metadata)
                    self.server.requests_served += 1
                reply = format_scores(out, n)
            except Exception as e:  # the scorer's failure is the client's 500, never the server's end
                log.exception("scorer %s failed on a batch of %d", self.server.scorer_name, n)
                self._error(500, f"scorer {self.server.scorer_name!r} raised {type(e).__name__}: {e}")
                return
            self._reply(200, reply)
        except BadRequest as e:
            self._error(e.status, e.message)
        except (TimeoutError, ConnectionError) as e:
            log.info("connection from %s dropped: %s", self.address_string(), e)
            self.close_connection = True
        except Exception as e:  # a bug here must not end the server
            log.exception("internal error on %s %s", self.command, self.path)
            try:
                self._error(500, f"internal server error: {type(e).__name__}: {e}")
            except OSError:
                self.close_connection = True

    def _drain_if_small(self) -> None:
        try:
            n = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            return
        if 0 < n <= self.server.max_request_bytes:
            self._drain(n)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ScorerServer:
    """A scorer server you can start in a background thread (tests, notebooks) or run in the
    foreground (:meth:`serve_forever`). ``scorer`` is a registered name or dotted path (built with
    ``scorer_kwargs``) or an already built callable ``(images, prompts, **metadata) -> scores``.
    ``port=0`` picks a free port; read it back from :attr:`url`."""

    def __init__(
        self,
        scorer: Union[str, Callable],
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S,
        **scorer_kwargs: Any,
    ):
        if not isinstance(max_request_bytes, int) or max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be a positive integer, got {max_request_bytes!r}")
        if not isinstance(max_image_pixels, int) or max_image_pixels < 1:
            raise ValueError(f"max_image_pixels must be a positive integer, got {max_image_pixels!r}")
        if not (isinstance(port, int) and 0 <= port <= 65535):
            raise ValueError(f"port must be an integer in 0..65535, got {port!r}")
        if not (isinstance(request_timeout, (int, float)) and request_timeout > 0):
            raise ValueError(f"request_timeout must be a positive number of seconds, got {request_timeout!r}")
        if isinstance(scorer, str):
            from scorers.registry import get

            name, fn = scorer, get(scorer, **scorer_kwargs)
        else:
            if scorer_kwargs:
                raise ValueError(f"scorer options {sorted(scorer_kwargs)} given with an already built scorer")
            if not callable(scorer):
                raise ValueError(f"scorer must be a registered name or a callable, got {type(scorer).__name__}")
            name = getattr(scorer, "name", None) or getattr(scorer, "__name__", None) or type(scorer).__name__
            fn = scorer
        if not _is_loopback(host):
            log.warning("serving scorer %s on %s: anyone who can reach this address can use it (no authentication)", name, host)
        self.httpd = ScorerHTTPServer(
            (host, port), fn, name, max_request_bytes=max_request_bytes, max_image_pixels=max_image_pixels,
            request_timeout=request_timeout,
        )
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        return self.httpd.url

    def start(self) -> "ScorerServer":
        """Serve in a daemon thread; returns self."""
        if self._thread is not None:
            raise RuntimeError("server already started")
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        log.info("serving scorer %s on %s", self.httpd.scorer_name, self.url)
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until interrupted (Ctrl-C)."""
        try:
            self.httpd.serve_forever()
        finally:
            self.httpd.server_close()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and close the socket (waits for the serving thread at most ``timeout`` s)."""
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(timeout)
            self._thread = None
        self.httpd.server_close()

    def __enter__(self) -> "ScorerServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def serve(
    name: Union[str, Callable],
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    **scorer_kwargs: Any,
) -> None:
    """Build scorer ``name`` with ``scorer_kwargs`` and serve it on ``host:port`` until interrupted."""
    srv = ScorerServer(name, host=host, port=port, max_request_bytes=max_request_bytes, **scorer_kwargs)
    log.info("serving scorer %s on %s (protocol %s; Ctrl-C stops)", srv.httpd.scorer_name, srv.url, PROTOCOL)
    srv.serve_forever()


def _parse_option(text: str):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--option takes KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)  # numbers, true/false, null, lists, objects
    except ValueError:
        return key, value  # a plain string


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flowrl serve-scorer",
        description=f"Serve a registered scorer over HTTP ({PROTOCOL}: POST /score, GET /health).",
    )
    p.add_argument("name", help="registered scorer name, or a dotted path to a factory")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}; no authentication!)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 = any free port)")
    p.add_argument("--checkpoint", default=None, help="hub id or local path of the scorer's weights")
    p.add_argument("--device", default=None, help="device for the model, e.g. cuda:0 (default: the scorer's)")
    p.add_argument("--dtype", default=None, help="model dtype: float32, bfloat16 or float16")
    p.add_argument("--batch-size", type=int, default=None, help="images per forward pass")
    p.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES, help="largest accepted body")
    p.add_argument("--option", action="append", type=_parse_option, default=[], metavar="KEY=VALUE",
                   help="scorer option (value parsed as JSON when it can be), repeatable")
    return p


def scorer_kwargs_from_args(args: argparse.Namespace) -> Dict[str, Any]:
    """Keyword arguments for the scorer factory: only what was given on the command line."""
    kw: Dict[str, Any] = {}
    if args.checkpoint is not None:
        kw["checkpoint"] = args.checkpoint
    if args.device is not None:
        kw["device"] = args.device
    if args.dtype is not None:
        dt = getattr(torch, args.dtype, None)
        if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
            raise ValueError(f"--dtype must be a floating torch dtype (float32, bfloat16, float16), got {args.dtype!r}")
        kw["dtype"] = dt
    if args.batch_size is not None:
        kw["batch_size"] = args.batch_size
    for k, v in args.option:
        if k in kw:
            raise ValueError(f"--option {k}= repeats an argument given already")
        kw[k] = v
    return kw


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``flowrl serve-scorer NAME [--port P] [--host H] [--checkpoint C] ...``; returns the exit status."""
    from scorers.registry import UnknownScorerError

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_arg_parser().parse_args(list(argv) if argv is not None else None)
    try:
        kw = scorer_kwargs_from_args(args)
        srv = ScorerServer(args.name, host=args.host, port=args.port, max_request_bytes=args.max_request_bytes, **kw)
    except (UnknownScorerError, ValueError, TypeError) as e:
        print(f"flowrl serve-scorer: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # address in use, no permission to bind
        print(f"flowrl serve-scorer: error: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"serving scorer {srv.httpd.scorer_name} on {srv.url} ({PROTOCOL}); Ctrl-C stops", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
