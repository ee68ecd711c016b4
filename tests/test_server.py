"""The scorer server under abuse and load: PNG bombs, pixel limits, 200 concurrent clients,
disconnecting clients, micro-batching, a missing `serve` extra. All on 127.0.0.1, port 0, bounded waits.
"""
import base64
import http.client
import json
import logging
import socket
import struct
import sys
import threading
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from scorers.base import pil_to_tensor
from scorers.remote import RemoteScorer, build_score_request
from scorers.server import ScorerServer, ServeDependencyError, main as server_main
from test_remote import quantized_images, raw_request, raw_socket_request

J = {"Content-Type": "application/json"}


def png_declaring(w: int, h: int, rows: int = 2) -> bytes:
    """A PNG whose header says w x h (8-bit grey) and whose data holds only its first ``rows`` rows:
    decoding it would allocate all w x h pixels (what a PNG bomb makes a server do) before finding
    it truncated."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * ((w + 1) * rows))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def body_of(pngs, prompts=None, **fields) -> bytes:
    obj = {"prompts": prompts or [f"p{i}" for i in range(len(pngs))], "images": [base64.b64encode(p).decode() for p in pngs]}
    obj.update(fields)
    return json.dumps(obj).encode()


def mean_scorer(images, prompts, **meta):
    return images.mean(dim=(1, 2, 3))


def post(url: str, body: bytes, timeout: float = 30.0):
    """(status, headers dict, JSON reply) of one POST /score."""
    host, port = url.rsplit("//", 1)[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("POST", "/score", body=body, headers=J)
        resp = conn.getresponse()
        return resp.status, resp.headers, json.loads(resp.read())  # headers: case-insensitive
    finally:
        conn.close()


def run_concurrently(fn, n: int, timeout: float = 60.0):
    """fn(i) for i < n in n threads released together; returns the results (exceptions as values)."""
    barrier = threading.Barrier(n)
    out = [None] * n

    def go(i):
        try:
            barrier.wait(timeout)
            out[i] = fn(i)
        except Exception as e:  # noqa: BLE001 (the test inspects it)
            out[i] = e

    threads = [threading.Thread(target=go, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "clients still running"
    return out


def still_serving(srv) -> None:
    assert raw_request(srv.url, "GET", "/health")[0] == 200
    x = quantized_images(2, size=4)
    got = RemoteScorer(srv.url, retries=0, timeout=10)(x, ["a", "b"])
    torch.testing.assert_close(got, x.mean(dim=(1, 2, 3)), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# limits read from the PNG headers
# ---------------------------------------------------------------------------------------------


def test_png_bomb_is_a_one_line_400_and_the_server_keeps_serving():
    bomb = body_of([png_declaring(30000, 30000)])
    with ScorerServer(mean_scorer, port=0) as srv:  # default limits
        status, _, reply = post(srv.url, bomb)
        assert status == 400 and "\n" not in reply["error"]
        assert reply["error"] == f"images[0] is 30000x30000, over the server's limit of {4096 * 4096} pixels"
        still_serving(srv)
    # limits raised past Pillow's own bomb check: Pillow's DecompressionBombError is a 400 too (was a 500)
    with ScorerServer(mean_scorer, port=0, max_image_pixels=10**9, max_request_pixels=10**9) as srv:
        status, _, reply = post(srv.url, bomb)
        assert status == 400 and "\n" not in reply["error"]
        assert reply["error"].startswith("images[0] is refused by Pillow: Image size (900000000 pixels) exceeds limit")
        still_serving(srv)


def test_request_pixel_limit_is_checked_from_png_headers_before_decoding(monkeypatch):
    """Three 64x64 PNGs whose pixel data is garbage: over the per-request limit they get that 400 (had
    any been decoded, the garbage would have said "broken PNG"); within it they do get "broken PNG"."""
    from PIL import ImageFile

    loads = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.size) or real_load(self))
    garbage = bytearray(png_declaring(64, 64))
    garbage[41:45] = b"\xff\xff\xff\xff"  # inside the IDAT stream, CRC left wrong as well
    garbage = bytes(garbage)
    with ScorerServer(mean_scorer, port=0, max_image_pixels=64 * 64, max_request_pixels=2 * 64 * 64) as srv:
        status, _, reply = post(srv.url, body_of([garbage] * 3))
        assert (status, reply) == (400, {"error": (
            "the request's 3 images hold 12288 pixels, over the server's limit of 8192 pixels per request; "
            "send smaller batches (batch_size)")})
        assert loads == []  # nothing was decoded
        status, _, reply = post(srv.url, body_of([garbage] * 2))
        assert status == 400 and reply["error"].startswith("images[0] is a broken PNG"), reply
        assert loads == [(64, 64)]
        assert srv.inflight_pixels == 0
        still_serving(srv)


def test_inflight_pixel_budget_gives_503_with_retry_after_and_health_answers_while_busy():
    entered, release = threading.Event(), threading.Event()

    def blocking(images, prompts, **meta):
        entered.set()
        release.wait(20)
        return images.mean(dim=(1, 2, 3))

    x = quantized_images(2, size=8)
    body = build_score_request(x, ["a", "b"])
    with ScorerServer(blocking, port=0, max_request_pixels=128, max_inflight_pixels=128) as srv:
        first = []
        t = threading.Thread(target=lambda: first.append(post(srv.url, body)), daemon=True)
        t.start()
        assert entered.wait(20)
        t0 = time.monotonic()
        assert raw_request(srv.url, "GET", "/health")[0] == 200  # the event loop is not blocked
        assert time.monotonic() - t0 < 2.0
        status, headers, reply = post(srv.url, body)
        assert status == 503 and headers.get("Retry-After") == "1"
        assert reply["error"].startswith("server busy: 128 decoded pixels in flight, 128 more would pass its limit of 128")
        release.set()
        t.join(20)
        assert first[0][0] == 200 and srv.inflight_pixels == 0 and srv.rejected_busy == 1
    torch.testing.assert_close(torch.tensor(first[0][2]["scores"]), x.mean(dim=(1, 2, 3)), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# load and disconnects
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow  # about 7 s: the retried clients honour Retry-After (1 s)
def test_200_concurrent_clients_are_served_or_told_to_retry():
    """200 clients at once against a budget of 80 requests in flight: each gets a 200 with its scores
    or a 503 with Retry-After, no connection is reset; then 200 `remote` clients, retrying, all end
    with their correct scores."""
    n = 200

    def cheap(images, prompts, **meta):
        time.sleep(0.002)
        return images.mean(dim=(1, 2, 3))

    xs = [quantized_images(2, size=8, seed=i) for i in range(n)]
    bodies = [build_score_request(x, ["a", "b"]) for x in xs]
    with ScorerServer(cheap, port=0, max_request_pixels=128, max_inflight_pixels=80 * 128) as srv:
        replies = run_concurrently(lambda i: post(srv.url, bodies[i]), n)
        errors = [r for r in replies if isinstance(r, Exception)]
        assert errors == []  # no reset, no timeout
        statuses = [r[0] for r in replies]
        assert set(statuses) <= {200, 503} and statuses.count(200) >= 1
        for (status, headers, reply), x in zip(replies, xs):
            if status == 503:
                assert headers.get("Retry-After") == "1" and reply["error"].startswith("server busy")
            else:
                torch.testing.assert_close(torch.tensor(reply["scores"]), x.mean(dim=(1, 2, 3)), rtol=1e-6, atol=1e-6)
        assert srv.rejected_busy == statuses.count(503)

        got = run_concurrently(lambda i: RemoteScorer(srv.url, retries=30, backoff=0.05, timeout=30)(xs[i], ["a", "b"]), n)
        assert [g for g in got if isinstance(g, Exception)] == []
        for g, x in zip(got, xs):
            torch.testing.assert_close(g, x.mean(dim=(1, 2, 3)), rtol=1e-6, atol=1e-6)
        assert srv.inflight_pixels == 0
        assert srv.scorer_calls < srv.requests_served  # they were merged


def test_client_disconnects_leave_no_traceback(caplog, capfd):
    entered, release = threading.Event(), threading.Event()

    def slow(images, prompts, **meta):
        entered.set()
        release.wait(20)
        return images.mean(dim=(1, 2, 3))

    body = build_score_request(quantized_images(2, size=8), ["a", "b"])
    head = f"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()

    def connect(url):
        host, port = url.rsplit("//", 1)[1].split(":")
        s = socket.create_connection((host, int(port)), timeout=5)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = reset
        return s

    with caplog.at_level(logging.DEBUG):
        with ScorerServer(slow, port=0, request_timeout=5.0) as srv:
            a = connect(srv.url)  # 1. leaves in the middle of its body
            a.sendall(head + body[:50])
            time.sleep(0.1)
            a.close()
            b = connect(srv.url)  # 2. sends a whole request, leaves while it is being scored
            b.sendall(head + body)
            assert entered.wait(20)
            b.close()
            c = connect(srv.url)  # 3. sends a whole request, leaves while it waits for the scorer
            c.sendall(head + body)
            time.sleep(0.2)
            c.close()
            d = connect(srv.url)  # 4. leaves in the middle of its headers
            d.sendall(head[:20])
            d.close()
            time.sleep(0.2)
            release.set()
            time.sleep(0.3)  # the replies to b (and c, if it was queued) go to closed sockets
            still_serving(srv)
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
    out, err = capfd.readouterr()
    assert "Traceback" not in err and "BrokenPipe" not in err and "ConnectionReset" not in err


def test_stalled_clients_time_out():
    with ScorerServer(mean_scorer, port=0, request_timeout=0.5) as srv:
        t0 = time.monotonic()
        reply = raw_socket_request(srv.url, b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{}")
        assert reply.startswith(b"HTTP/1.1 408") and b"did not arrive within 0.5 s" in reply
        assert raw_socket_request(srv.url, b"") == b""  # sent nothing: closed
        assert time.monotonic() - t0 < 5.0
        still_serving(srv)


# ---------------------------------------------------------------------------------------------
# micro-batching
# ---------------------------------------------------------------------------------------------


class Recorder:
    """A callable scorer that sleeps per call and records what each call got; it accepts only one
    image size and one ``bias`` per call (what the server must guarantee when it merges)."""

    def __init__(self, pil_input: bool = False, delay: float = 0.05):
        self.calls = []
        self.delay = delay
        if pil_input:
            self.pil_input = True

    def __call__(self, images, prompts, offset=None, bias=0.0, **meta):
        assert isinstance(bias, float)
        if isinstance(images, list):  # PIL input, any sizes
            self.calls.append((len(images), sorted({im.size for im in images})))
            x = torch.stack([pil_to_tensor([im]).mean(dim=(1, 2, 3))[0] for im in images])
        else:
            self.calls.append((len(images), [tuple(images.shape[2:])]))
            x = images.mean(dim=(1, 2, 3))
        time.sleep(self.delay)
        return {"score": x + torch.tensor(offset) + bias, "len": torch.tensor([len(p) for p in prompts], dtype=torch.float32)}


def _requests(n: int, pil: bool = False):
    """n request bodies: 2 images each, two sizes, two scalar biases, per-sample offsets and prompts."""
    out = []
    for i in range(n):
        size = 8 if i % 2 else 6
        g = np.random.default_rng(i)
        ims = [Image.fromarray(g.integers(0, 256, (size + (k if pil else 0), size, 3), dtype=np.uint8)) for k in range(2)]
        meta = {"offset": [0.1 * i, -0.1 * i], "bias": 1.0 if i % 3 else 2.0}
        out.append(build_score_request(ims, [f"prompt {i}", "x" * i], meta))
    return out


@pytest.mark.parametrize("pil", [False, True], ids=["float-input", "pil-input"])
def test_batching_merges_concurrent_requests_with_the_one_by_one_scores(pil):
    n = 24
    bodies = _requests(n, pil)
    merged, alone = Recorder(pil), Recorder(pil)
    with ScorerServer(merged, port=0) as srv:
        got = run_concurrently(lambda i: post(srv.url, bodies[i]), n)
        calls, served = srv.scorer_calls, srv.requests_served
    with ScorerServer(alone, port=0, max_batch_images=0) as srv:
        want = [post(srv.url, b) for b in bodies]
        assert srv.scorer_calls == n
    assert [r[0] for r in got] == [200] * n, got
    assert [r[2] for r in got] == [r[2] for r in want]  # the same JSON numbers, exactly
    assert served == n and calls == len(merged.calls) < n
    assert max(k for k, _ in merged.calls) > 2  # some call scored several requests
    if pil:  # a PIL-input scorer takes mixed sizes in one call
        assert max(len(sizes) for _, sizes in merged.calls) > 1
    else:
        assert all(len(sizes) == 1 for _, sizes in merged.calls)


def test_a_failing_merged_batch_is_retried_one_by_one(caplog):
    def picky(images, prompts, **meta):
        time.sleep(0.05)
        if "explode" in prompts:
            raise RuntimeError("boom")
        return images.mean(dim=(1, 2, 3))

    n = 8
    xs = [quantized_images(2, size=4, seed=i) for i in range(n)]
    bodies = [build_score_request(x, ["explode" if i == 5 else "a", "b"]) for i, x in enumerate(xs)]
    with ScorerServer(picky, port=0) as srv:
        got = run_concurrently(lambda i: post(srv.url, bodies[i]), n)
    assert got[5][0] == 500 and got[5][2] == {"error": "scorer 'picky' raised RuntimeError: boom"}
    for i, (status, _, reply) in enumerate(got):
        if i != 5:
            assert status == 200
            torch.testing.assert_close(torch.tensor(reply["scores"]), xs[i].mean(dim=(1, 2, 3)), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# the `serve` extra
# ---------------------------------------------------------------------------------------------


def test_serve_scorer_without_fastapi_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # `import fastapi` raises ImportError
    assert server_main(["jpeg_compressibility", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "flowrl[serve]"' in err
    with pytest.raises(ServeDependencyError, match=r'pip install "flowrl\[serve\]"'):
        ScorerServer(mean_scorer, port=0)
    from flowrl.cli import main as flowrl_main

    assert flowrl_main(["serve-scorer", "jpeg_compressibility", "--port", "0"]) == 2
    assert 'pip install "flowrl[serve]"' in capsys.readouterr().err
