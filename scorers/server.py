"""``flowrl serve-scorer NAME``: serve any registered scorer over HTTP with the ``flowrl-scorer/2``
protocol (specified in :mod:`scorers.remote`; JSON and PNG only, never pickle).

Built on FastAPI and uvicorn (the ``serve`` extra: ``pip install "flowrl[serve]"``). Requests that
arrive while the scorer is busy are merged into one scorer call (``max_batch_images``,
``batch_wait_ms``) and its scores split back per request. Body bytes, pixels per image and per
request (read from the PNG headers before decoding) and decoded pixels in flight are limited (413,
400, 503 with ``Retry-After``). Binds 127.0.0.1 unless told otherwise; no authentication. Design:
docs/architecture.md ("The scorer server"); batching and limits: docs/methods.md. Reading and
checking requests: :mod:`scorers._server_requests`; batching: :mod:`scorers._server_batching`.

Python use::

    with ScorerServer("pickscore", port=0, device="cuda") as srv:   # port 0: any free port
        ...  # srv.url is the address for the ``remote`` scorer
"""
# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations (Request), which
# are imported lazily inside ScorerServer._build_app.
import argparse
import asyncio
import ipaddress
import json
import logging
import math
import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, Callable, Dict, Optional, Sequence, Union

import torch

from scorers._server_batching import _Batcher, _batch_key, _Failure, _Job
from scorers._server_requests import DEFAULT_MAX_IMAGE_PIXELS, BadRequest, ScoreRequest, read_score_request, scorer_input
from scorers.base import takes_8bit_images
from scorers.registry import UnknownScorerError, get
from scorers.remote import PROTOCOL

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 18090
DEFAULT_MAX_REQUEST_BYTES = 256 * 2**20  # 256 MiB: 64 images of 1024x1024 as PNG fit comfortably
DEFAULT_MAX_REQUEST_PIXELS = 32 * 2**20  # 32 images of 1024x1024; 96 MiB as 8-bit RGB
DEFAULT_MAX_INFLIGHT_PIXELS = 64 * 2**20  # decoded pixels of all requests being decoded, queued or scored
DEFAULT_MAX_BATCH_IMAGES = 64
DEFAULT_BATCH_WAIT_MS = 5.0
DEFAULT_REQUEST_TIMEOUT_S = 120.0
RETRY_AFTER_S = 1  # the Retry-After of a 503 (whole seconds, as HTTP wants)
LISTEN_BACKLOG = 2048
SERVE_INSTALL_HINT = 'pip install "flowrl[serve]"'
_DRAIN_FACTOR = 4  # an oversized body up to this many times the limit is read and dropped before 413
_RETRY = {"Retry-After": str(RETRY_AFTER_S)}
_GRACE_S = 5  # Ctrl-C: requests in flight get this long; 1 s before its end, waiting ones get a 503


class ServeDependencyError(ImportError):
    """fastapi or uvicorn is missing (the ``serve`` extra)."""


def _serving_libs():
    try:
        import fastapi  # noqa: F401  (optional: the ``serve`` extra)
        import uvicorn
    except ImportError as e:
        raise ServeDependencyError(
            f"the scorer server needs fastapi and uvicorn ({e}); install them with: {SERVE_INSTALL_HINT}"
        ) from None
    return fastapi, uvicorn


# ----------------------------------------------------------------------------------------------
# HTTP: the app, the uvicorn protocol, the server object
# ----------------------------------------------------------------------------------------------


class _ClientGone(Exception):
    """The client disconnected, or stalled past the request timeout, while sending its body."""

    def __init__(self, timed_out: bool = False):
        super().__init__("timed out" if timed_out else "disconnected")
        self.timed_out = timed_out


def _json_response(status: int, obj: Dict[str, Any], close: bool = False, headers: Optional[Dict[str, str]] = None):
    from starlette.responses import Response  # optional: the ``serve`` extra (fastapi's starlette)

    hdrs = dict(headers or {})
    if close:
        hdrs["Connection"] = "close"
    return Response(json.dumps(obj, allow_nan=False).encode("utf-8"), status, hdrs, media_type="application/json")


def _protocol_class(request_timeout: float):
    """uvicorn's h11 protocol with three changes: malformed HTTP gets a JSON 400 (or, during a request,
    the connection closes after its reply); a client that half-closes its socket after sending still
    gets its reply (a short body is then a 400 saying so); a connection that sends no request within
    ``request_timeout`` s is closed."""
    import h11  # optional: the ``serve`` extra (uvicorn's h11)
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class ScorerProtocol(H11Protocol):
        _timer = None
        _timer_cycle = None

        def _arm(self) -> None:
            self._disarm()
            self._timer_cycle = self.cycle
            self._timer = self.loop.call_later(request_timeout, self._idle_timeout)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _idle_timeout(self) -> None:
            self._timer = None
            if self.cycle is self._timer_cycle and not self.transport.is_closing():
                log.info("closing a connection from %s that sent no request in %g s", self.client, request_timeout)
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def eof_received(self):
            cycle = self.cycle
            if cycle is None or cycle.response_complete:
                return None  # nothing in flight: close
            cycle.keep_alive = False
            if cycle.more_body:  # the body ends here, short of its Content-Length
                cycle.more_body = False
                cycle.message_event.set()
            return True  # keep the socket open to send the reply

        def send_400_response(self, msg: str) -> None:
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                # bad bytes after (or inside) a request being answered: the app answers it, then close
                cycle.keep_alive = False
                if cycle.more_body:
                    cycle.more_body = False
                    cycle.message_event.set()
                return
            err = sys.exc_info()[1]  # called from uvicorn's `except h11.RemoteProtocolError`
            detail = f"invalid HTTP request ({err})" if isinstance(err, h11.RemoteProtocolError) and str(err) else msg
            data = json.dumps({"error": detail}).encode("utf-8")
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                       (b"connection", b"close")]
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=data),
                          h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

    return ScorerProtocol


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class ScorerServer:
    """A scorer server you can start in a background thread (tests, notebooks) or run in the
    foreground (:meth:`serve_forever`). ``scorer`` is a registered name or dotted path (built with
    ``scorer_kwargs``) or an already built callable ``(images, prompts, **metadata) -> scores``.
    ``port=0`` picks a free port; read it back from :attr:`url`. ``batching=False`` or
    ``max_batch_images=0``: one scorer call per request. Unset, ``max_request_pixels`` is at least
    ``max_image_pixels`` (at most ``max_inflight_pixels``) and ``max_inflight_pixels`` at least
    ``max_request_pixels``."""

    def __init__(
        self,
        scorer: Union[str, Callable],
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S,
        *,
        max_request_pixels: Optional[int] = None,
        max_inflight_pixels: Optional[int] = None,
        max_batch_images: int = DEFAULT_MAX_BATCH_IMAGES,
        batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS,
        batching: bool = True,
        decode_threads: Optional[int] = None,
        **scorer_kwargs: Any,
    ):
        _positive_int(max_request_bytes, "max_request_bytes")
        _positive_int(max_image_pixels, "max_image_pixels")
        if max_request_pixels is None:
            max_request_pixels = max(DEFAULT_MAX_REQUEST_PIXELS, max_image_pixels)
            if max_inflight_pixels is not None:
                max_request_pixels = min(max_request_pixels, _positive_int(max_inflight_pixels, "max_inflight_pixels"))
        _positive_int(max_request_pixels, "max_request_pixels")
        if max_inflight_pixels is None:
            max_inflight_pixels = max(DEFAULT_MAX_INFLIGHT_PIXELS, max_request_pixels)
        _positive_int(max_inflight_pixels, "max_inflight_pixels")
        if max_inflight_pixels < max_request_pixels:
            raise ValueError(f"max_inflight_pixels ({max_inflight_pixels}) must be >= max_request_pixels ({max_request_pixels})")
        if isinstance(max_batch_images, bool) or not isinstance(max_batch_images, int) or max_batch_images < 0:
            raise ValueError(f"max_batch_images must be an integer >= 0 (0: no batching), got {max_batch_images!r}")
        if not (isinstance(batch_wait_ms, (int, float)) and 0 <= batch_wait_ms < math.inf):
            raise ValueError(f"batch_wait_ms must be a number >= 0, got {batch_wait_ms!r}")
        if not (isinstance(port, int) and 0 <= port <= 65535):
            raise ValueError(f"port must be an integer in 0..65535, got {port!r}")
        if not (isinstance(request_timeout, (int, float)) and request_timeout > 0):
            raise ValueError(f"request_timeout must be a positive number of seconds, got {request_timeout!r}")
        _, uvicorn = _serving_libs()  # before building a model: a missing extra fails fast
        if isinstance(scorer, str):
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
        self.scorer = fn
        self.scorer_name = str(name)
        self.max_request_bytes = max_request_bytes
        self.max_image_pixels = max_image_pixels
        self.max_request_pixels = max_request_pixels
        self.max_inflight_pixels = max_inflight_pixels
        self.request_timeout = float(request_timeout)
        self.any_size = takes_8bit_images(fn)  # a PIL-input scorer takes mixed sizes in one call
        self.inflight_pixels = 0
        self.rejected_busy = 0  # 503s
        self._batcher = _Batcher(fn, self.scorer_name, max_batch_images if batching else 0, batch_wait_ms / 1000.0)
        threads = decode_threads or min(4, os.cpu_count() or 1)
        self._decode_pool = ThreadPoolExecutor(threads, thread_name_prefix="flowrl-decode")
        self._sock = self._bind(host, port)
        config = uvicorn.Config(
            self._build_app(), http=_protocol_class(self.request_timeout), lifespan="on", log_config=None,
            access_log=False, proxy_headers=False, server_header=False, headers=[("server", PROTOCOL)],
            backlog=LISTEN_BACKLOG, timeout_keep_alive=5, timeout_graceful_shutdown=_GRACE_S,
        )
        owner = self

        class Server(uvicorn.Server):
            async def shutdown(self, sockets=None):
                owner._stopping = True
                timer = owner._loop.call_later(_GRACE_S - 1, owner._fail_pending) if owner._loop else None
                try:
                    await super().shutdown(sockets)
                finally:
                    if timer is not None:
                        timer.cancel()

        self._server = Server(config)
        self._stopping = False
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._error_exc: Optional[BaseException] = None

    # -- counters ------------------------------------------------------------------------------

    @property
    def requests_served(self) -> int:
        """Requests the scorer returned scores for."""
        return self._batcher.requests_served

    @property
    def scorer_calls(self) -> int:
        """Calls into the scorer (fewer than requests when requests were merged)."""
        return self._batcher.calls

    # -- socket and app ------------------------------------------------------------------------

    @staticmethod
    def _bind(host: str, port: int) -> socket.socket:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(LISTEN_BACKLOG)
        except OSError:
            sock.close()
            raise
        return sock

    @property
    def url(self) -> str:
        host, port = self._sock.getsockname()[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}"

    def _build_app(self):
        from fastapi import FastAPI, Request  # optional: the ``serve`` extra
        from starlette.exceptions import HTTPException

        @asynccontextmanager
        async def lifespan(app):
            self._loop = asyncio.get_running_loop()
            task = asyncio.create_task(self._batcher.run())
            try:
                yield
            finally:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass

        app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)

        async def health(request: Request):
            return _json_response(200, {
                "status": "ok", "protocol": PROTOCOL, "scorer": self.scorer_name,
                "max_request_bytes": self.max_request_bytes,
            })

        async def score(request: Request):
            return await self._score(request)

        async def other(request: Request):
            # Any other path (and /health/, /score/ with a trailing slash, as before).
            route = request.url.path.rstrip("/") or "/"
            if request.method == "GET" and route in ("/health", "/"):
                return await health(request)
            if request.method == "POST" and route == "/score":
                return await score(request)
            shown = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            if request.method == "POST":
                close = not await self._drain_if_small(request)
                return self._error(404, f"no such path {shown!r}; use POST /score", close=close)
            return self._error(404, f"no such path {shown!r}; use GET /health or POST /score")

        async def http_error(request: Request, exc: HTTPException):
            if exc.status_code == 405:  # a method this server has no route for, as http.server said
                return self._error(501, f"Unsupported method ({request.method!r})", close=True)
            return self._error(exc.status_code, str(exc.detail), close=True)

        async def internal_error(request: Request, exc: Exception):
            return self._error(500, f"internal server error: {type(exc).__name__}: {exc}", close=True)

        app.add_api_route("/health", health, methods=["GET"])
        app.add_api_route("/", health, methods=["GET"])
        app.add_api_route("/score", score, methods=["POST"])
        app.add_api_route("/{path:path}", other, methods=["GET", "POST"])
        app.add_exception_handler(HTTPException, http_error)
        app.add_exception_handler(Exception, internal_error)
        return app

    # -- request handling (in the event loop) --------------------------------------------------

    def _error(self, status: int, message: str, close: bool = False, headers: Optional[Dict[str, str]] = None):
        (log.error if status == 500 else log.info)("-> %d: %s", status, message)
        return _json_response(status, {"error": message}, close=close, headers=headers)

    async def _receive(self, request) -> Dict[str, Any]:
        try:
            msg = await asyncio.wait_for(request.receive(), self.request_timeout)
        except asyncio.TimeoutError:
            raise _ClientGone(timed_out=True) from None
        if msg["type"] == "http.disconnect":
            raise _ClientGone()
        return msg

    async def _read_body(self, request, n: int, keep: bool = True) -> bytes:
        """The body (``n`` bytes by Content-Length), or b"" after dropping it when not ``keep``."""
        chunks, got = [], 0
        while True:
            msg = await self._receive(request)
            chunk = msg.get("body", b"")
            got += len(chunk)
            if keep and chunk:
                chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        if got != n:
            raise BadRequest(400, f"body ended after {got} of {n} bytes")
        return b"".join(chunks)

    async def _drain_if_small(self, request) -> bool:
        """Read and drop a body of at most max_request_bytes; True when the body is gone."""
        try:
            n = int(request.headers.get("content-length", "0"))
        except ValueError:
            return False
        if n > self.max_request_bytes:
            return False
        try:
            await self._read_body(request, n, keep=False)
        except (_ClientGone, BadRequest):
            return False
        return True

    async def _score(self, request):
        try:
            return await self._score_unchecked(request)
        except _ClientGone as e:
            if e.timed_out:
                return self._error(408, f"the request body did not arrive within {self.request_timeout:g} s", close=True)
            log.info("client %s disconnected before its request was read", request.client)
            return _json_response(400, {"error": "client disconnected"}, close=True)  # nobody reads it
        except BadRequest as e:
            return self._error(e.status, e.message, close=True)
        except Exception as e:  # a bug here must not end the server
            log.exception("internal error on POST /score")
            return self._error(500, f"internal server error: {type(e).__name__}: {e}", close=True)

    async def _score_unchecked(self, request):
        loop = asyncio.get_running_loop()
        headers = request.headers
        if headers.get("transfer-encoding", "").lower() not in ("", "identity"):
            raise BadRequest(411, "chunked bodies are not supported: send a Content-Length")
        raw = headers.get("content-length")
        if raw is None:
            raise BadRequest(411, "Content-Length header is required")
        try:
            n = int(raw)
            if n < 0:
                raise ValueError
        except ValueError:
            raise BadRequest(400, f"bad Content-Length {raw!r}") from None
        limit = self.max_request_bytes
        if n > limit:
            if n <= _DRAIN_FACTOR * limit:  # read and drop it, so that the client sees the reply
                await self._read_body(request, n, keep=False)
            raise BadRequest(
                413, f"request body of {n} bytes is over this server's limit of {limit} bytes; send smaller "
                "batches (batch_size) or restart the server with a larger --max-request-bytes"
            )
        ctype = headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if ctype != "application/json":
            await self._read_body(request, n, keep=False)
            raise BadRequest(415, f"Content-Type must be application/json, got {ctype!r}")
        body = await self._read_body(request, n)

        # JSON and PNG headers in a thread: every limit is checked before any pixel is decoded
        req = await loop.run_in_executor(
            self._decode_pool, read_score_request, body, self.max_image_pixels, not self.any_size, self.max_request_pixels
        )
        del body
        if not req.prompts:
            return _json_response(200, {"scores": []})
        if self.inflight_pixels and self.inflight_pixels + req.pixels > self.max_inflight_pixels:
            self.rejected_busy += 1
            return self._error(
                503, f"server busy: {self.inflight_pixels} decoded pixels in flight, {req.pixels} more would pass "
                f"its limit of {self.max_inflight_pixels}; retry after {RETRY_AFTER_S} s",
                headers=_RETRY,
            )
        pixels = req.pixels
        self.inflight_pixels += pixels
        try:
            inputs = await loop.run_in_executor(self._decode_pool, self._prepare, req)
            if await request.is_disconnected():
                log.info("client %s disconnected; its request is not scored", request.client)
                return _json_response(400, {"error": "client disconnected"})
            size = None if self.any_size else req.sizes[0]
            if req.frames is not None:  # videos merge only with videos of as many frames
                size = (req.sizes[0], req.frames)
            job = _Job(inputs, req.prompts, req.metadata, _batch_key(size, req.metadata), loop.create_future(), loop.time())
            del req, inputs
            if self._stopping:
                return self._error(503, "server is shutting down", headers=_RETRY)
            self._batcher.submit(job)
            result = await job.future
        finally:
            self.inflight_pixels -= pixels
        if isinstance(result, _Failure):
            return self._error(result.status, result.message, headers=_RETRY if result.status == 503 else None)
        return _json_response(200, result)

    def _prepare(self, req: ScoreRequest):
        """In a decode thread: the scorer's input for ``req`` (see :func:`scorer_input`); protocol 2's
        source images become the ``image`` metadata column (PIL images)."""
        inputs = scorer_input(self.scorer, req.decode(), req.frames)
        sources = req.decode_sources()
        if sources is not None:
            req.metadata["image"] = sources
        return inputs

    # -- running -------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._server.run(sockets=[self._sock])
        except BaseException as e:  # noqa: B036 (uvicorn ends a failed start with SystemExit)
            self._error_exc = e
            log.error("scorer server stopped: %s: %s", type(e).__name__, e)

    def start(self, timeout: float = 30.0) -> "ScorerServer":
        """Serve in a daemon thread; returns self once the server accepts requests."""
        if self._thread is not None:
            raise RuntimeError("server already started")
        self._error_exc = None
        self._thread = threading.Thread(target=self._run, name=f"flowrl-serve-{self.scorer_name}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"scorer server did not start ({self._error_exc!r})")
            time.sleep(0.01)
        log.info("serving scorer %s on %s", self.scorer_name, self.url)
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until interrupted (Ctrl-C: a graceful stop, then KeyboardInterrupt)."""
        try:
            self._server.run(sockets=[self._sock])
        finally:
            self._close()

    def _fail_pending(self) -> None:
        self._stopping = True
        self._batcher.fail_all(_Failure("server is shutting down", 503))

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and close the socket; requests still waiting for the scorer get a 503 (which
        clients retry). Waits for the serving thread at most ~2x ``timeout`` s."""
        if self._thread is not None:
            self._server.should_exit = True
            if self._loop is not None:
                try:
                    self._loop.call_soon_threadsafe(self._fail_pending)
                except RuntimeError:  # the loop has ended already
                    pass
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._server.force_exit = True
                self._thread.join(timeout)
            self._thread = None
        self._close()

    def _close(self) -> None:
        self._sock.close()
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        self._batcher.pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> "ScorerServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def serve(
    name: Union[str, Callable],
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    *,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_request_pixels: Optional[int] = None,
    max_inflight_pixels: Optional[int] = None,
    max_batch_images: int = DEFAULT_MAX_BATCH_IMAGES,
    batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS,
    **scorer_kwargs: Any,
) -> None:
    """Build scorer ``name`` with ``scorer_kwargs`` and serve it on ``host:port`` until interrupted."""
    srv = ScorerServer(
        name, host=host, port=port, max_request_bytes=max_request_bytes, max_image_pixels=max_image_pixels,
        max_request_pixels=max_request_pixels, max_inflight_pixels=max_inflight_pixels,
        max_batch_images=max_batch_images, batch_wait_ms=batch_wait_ms, **scorer_kwargs,
    )
    log.info("serving scorer %s on %s (protocol %s; Ctrl-C stops)", srv.scorer_name, srv.url, PROTOCOL)
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
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS, help="largest accepted image (width x height)")
    p.add_argument("--max-request-pixels", type=int, default=None,
                   help=f"pixels of all images of one request (default {DEFAULT_MAX_REQUEST_PIXELS})")
    p.add_argument("--max-inflight-pixels", type=int, default=None,
                   help=f"decoded pixels of all requests in flight; past it: 503 (default {DEFAULT_MAX_INFLIGHT_PIXELS})")
    p.add_argument("--max-batch-images", type=int, default=DEFAULT_MAX_BATCH_IMAGES,
                   help=f"images of concurrent requests merged into one scorer call (default {DEFAULT_MAX_BATCH_IMAGES}; 0: no merging)")
    p.add_argument("--batch-wait-ms", type=float, default=DEFAULT_BATCH_WAIT_MS,
                   help=f"how long a request waits for others to merge with (default {DEFAULT_BATCH_WAIT_MS:g})")
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
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_arg_parser().parse_args(list(argv) if argv is not None else None)
    try:
        _serving_libs()
        kw = scorer_kwargs_from_args(args)
        srv = ScorerServer(
            args.name, host=args.host, port=args.port, max_request_bytes=args.max_request_bytes,
            max_image_pixels=args.max_image_pixels, max_request_pixels=args.max_request_pixels,
            max_inflight_pixels=args.max_inflight_pixels, max_batch_images=args.max_batch_images,
            batch_wait_ms=args.batch_wait_ms, **kw,
        )
    except (ServeDependencyError, UnknownScorerError, ValueError, TypeError) as e:
        print(f"flowrl serve-scorer: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # address in use, no permission to bind
        print(f"flowrl serve-scorer: error: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"serving scorer {srv.scorer_name} on {srv.url} ({PROTOCOL}); Ctrl-C stops", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
