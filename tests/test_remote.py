"""The `remote` scorer, the scorer server and the flowrl-scorer/1 protocol, on 127.0.0.1.

Every server here runs in a daemon thread on a free port and is shut down by its context manager;
every wait is bounded.
"""
from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

import scorers
from scorers._preprocess import PreprocessSpec, is_pil_or_uint8, pil_pixel_values, preprocess
from scorers.base import Scorer
from scorers.registry import register
from scorers.remote import (
    RemoteScorer,
    RemoteScorerError,
    build_score_request,
    encode_png,
    parse_scores,
    quantize_uint8,
)
from scorers.server import ScorerServer, main as server_main


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


class TinyScorer(Scorer):
    """Deterministic, depends on pixels, prompt and per-sample metadata:
    score = 0.5*mean(R) + 0.3*mean(G) + 0.2*mean(B) + len(prompt)/100 + offset + bias."""

    name = "test_remote_tiny"

    def score_batch(self, images, prompts, offset=None, bias=0.0, **metadata):
        w = torch.tensor([0.5, 0.3, 0.2])
        s = (images.mean(dim=(2, 3)) * w).sum(dim=1)
        s = s + torch.tensor([len(p) / 100.0 for p in prompts])
        if offset is not None:
            s = s + torch.as_tensor(offset, dtype=torch.float32)
        return s + float(bias)


@register("test_remote_tiny")
def make_tiny(device="cpu", dtype=torch.float32, checkpoint=None, batch_size=16, differentiable=False):
    return TinyScorer(device=device, dtype=dtype, batch_size=batch_size, differentiable=differentiable)


def quantized_images(n: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    """Images whose values are k/255 exactly, so PNG transport is lossless."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g).float() / 255.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeServer:
    """A plain HTTP server whose replies come from ``respond(handler, body, k) -> (status, bytes)`` or
    ``(status, bytes, headers)``."""

    def __init__(self, respond):
        outer = self
        self.respond = respond
        self.count = 0
        self.lock = threading.Lock()

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                n = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(n)
                with outer.lock:
                    outer.count += 1
                    k = outer.count
                status, data, *extra = outer.respond(self, body, k)  # (status, body[, headers])
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in (extra[0] if extra else {}).items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout test)
                    pass

            do_GET = do_POST

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self):
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


def raw_request(url: str, method: str, path: str, body: bytes = b"", headers=None, timeout=5.0):
    """(status, decoded JSON) of one request made with http.client (no client-side checks)."""
    host, port = url.rsplit("//", 1)[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read().decode("utf-8"))
    finally:
        conn.close()


def raw_socket_request(url: str, data: bytes, half_close: bool = False, timeout: float = 5.0) -> bytes:
    """Send raw bytes, return the raw reply (for requests http.client would not send)."""
    host, port = url.rsplit("//", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            c = s.recv(65536)
            if not c:
                break
            chunks.append(c)
    return b"".join(chunks)


def score_body(n=2, size=4, **fields) -> bytes:
    x = quantized_images(n, size)
    body = json.loads(build_score_request(x, [f"p{i}" for i in range(n)]))
    body.update(fields)
    return json.dumps(body).encode()


# ---------------------------------------------------------------------------------------------
# remote score == in-process score
# ---------------------------------------------------------------------------------------------


def test_remote_equals_in_process_with_metadata_and_chunking():
    x = quantized_images(7, size=8)
    prompts = ["a cat", "two dogs", "", "a red cube on a blue sphere", "x", "yy", "zzz"]
    offset = [0.1 * i for i in range(7)]
    local = scorers.get("test_remote_tiny")(x, prompts, offset=offset, bias=0.25)
    with ScorerServer("test_remote_tiny", port=0) as srv:
        remote = scorers.get("remote", url=srv.url, batch_size=3, timeout=10, retries=0)
        got = remote(x, prompts, offset=offset, bias=0.25)
        assert srv.requests_served == 3  # 7 images in chunks of 3, 3, 1
        health = remote.health()
    assert got.dtype == torch.float32 and got.shape == (7,)
    # same images, same arithmetic: equal up to float32 summation order
    torch.testing.assert_close(got, local, rtol=1e-6, atol=1e-6)
    assert local.std() > 0.05  # the comparison is not between constants
    assert health["protocol"] == "flowrl-scorer/2" and health["scorer"] == "test_remote_tiny"


def test_remote_jpeg_compressibility_equals_in_process():
    assert "jpeg_compressibility" in scorers.available()  # scorers/jpeg.py registers it
    x = quantized_images(4, size=32, seed=3)
    prompts = ["a"] * 4
    local = scorers.get("jpeg_compressibility")(x, prompts)
    with ScorerServer("jpeg_compressibility", port=0) as srv:
        got = scorers.get("remote", url=srv.url + "/score", retries=0)(x, prompts)
    torch.testing.assert_close(got, local, rtol=1e-6, atol=1e-6)


def test_png_transport_is_the_8bit_quantisation():
    """Unquantised images: the remote score equals the in-process score of round(255x)/255."""
    x = torch.rand(3, 3, 6, 5)
    x[0, 0, 0, 0] = 1.7  # clamped to 1
    x[1, 1, 1, 1] = -0.2  # clamped to 0
    q = quantize_uint8(x)
    decoded = torch.from_numpy(np.stack([np.asarray(Image.open(io.BytesIO(encode_png(img)))) for img in x])).permute(0, 3, 1, 2)
    assert torch.equal(decoded, q)
    assert torch.equal(q, (x.clamp(0, 1) * 255).round().to(torch.uint8))
    local_q = scorers.get("test_remote_tiny")(q.float() / 255.0, ["p"] * 3)
    with ScorerServer("test_remote_tiny", port=0) as srv:
        got = RemoteScorer(srv.url, retries=0)(x, ["p"] * 3)
    torch.testing.assert_close(got, local_q, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="NaN or inf"):
        encode_png(torch.full((3, 2, 2), float("nan")))


def test_nan_score_travels_as_null_and_comes_back_nan():
    def scorer(images, prompts, **meta):
        s = images.mean(dim=(1, 2, 3)).clone()
        s[1] = float("nan")
        s[2] = float("inf")
        return s

    x = quantized_images(3)
    with ScorerServer(scorer, port=0) as srv:
        status, reply = raw_request(srv.url, "POST", "/score", build_score_request(x, ["a", "b", "c"]),
                                    {"Content-Type": "application/json"})
        got = RemoteScorer(srv.url, retries=0)(x, ["a", "b", "c"])
    assert status == 200 and reply["scores"][1] is None and reply["scores"][2] is None
    assert math.isfinite(got[0]) and math.isnan(got[1]) and math.isnan(got[2])


def test_named_components():
    def scorer(images, prompts, **meta):
        m = images.mean(dim=(1, 2, 3))
        return {"a": m, "b": 2 * m + 1}

    x = quantized_images(4)
    m = x.mean(dim=(1, 2, 3))
    with ScorerServer(scorer, port=0) as srv:
        a = RemoteScorer(srv.url, component="a", retries=0)(x, ["p"] * 4)
        w = RemoteScorer(srv.url, weights={"a": 1.0, "b": 0.5}, retries=0)(x, ["p"] * 4)
        with pytest.raises(RemoteScorerError, match=r"named components \['a', 'b'\]: set component= or weights="):
            RemoteScorer(srv.url, retries=0)(x, ["p"] * 4)
        with pytest.raises(RemoteScorerError, match=r"no component 'c'; it has \['a', 'b'\]"):
            RemoteScorer(srv.url, component="c", retries=0)(x, ["p"] * 4)
    torch.testing.assert_close(a, m, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w, m + 0.5 * (2 * m + 1), rtol=1e-6, atol=1e-6)


def test_parse_scores_shapes():
    assert torch.equal(parse_scores({"scores": [1, 2.5]}, 2), torch.tensor([1.0, 2.5]))
    assert torch.equal(parse_scores([1, 2], 2), torch.tensor([1.0, 2.0]))  # a bare list is tolerated
    assert math.isnan(parse_scores({"scores": [None, 1]}, 2)[0])
    with pytest.raises(ValueError, match="has 1 values for a batch of 2"):
        parse_scores({"scores": [1.0]}, 2)
    with pytest.raises(ValueError, match="holds a str"):
        parse_scores({"scores": ["x", 1]}, 2)
    with pytest.raises(ValueError, match="holds a bool"):
        parse_scores({"scores": [True, 1]}, 2)
    with pytest.raises(ValueError, match="key 'scores'"):
        parse_scores({"result": [1, 2]}, 2)


# ---------------------------------------------------------------------------------------------
# failures: each with its clear error
# ---------------------------------------------------------------------------------------------


def test_timeout_names_url_and_cause():
    release = threading.Event()

    def sleepy(handler, body, k):
        release.wait(10)  # bounded; set at the end of the test
        return 200, b'{"scores": [0, 0]}'

    x = quantized_images(2)
    with FakeServer(sleepy) as srv:
        try:
            t0 = time.monotonic()
            with pytest.raises(RemoteScorerError) as ei:
                RemoteScorer(srv.url, timeout=0.3, retries=1, backoff=0.01)(x, ["a", "b"])
            elapsed = time.monotonic() - t0
        finally:
            release.set()
    msg = str(ei.value)
    assert srv.url + "/score" in msg and "timed out after 0.3 s" in msg and "after 2 attempts" in msg
    assert srv.count == 2 and ei.value.attempts == 2
    assert elapsed < 5.0


def test_dead_server_connection_refused_with_retries():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there any more
    t0 = time.monotonic()
    with pytest.raises(RemoteScorerError) as ei:
        scorers.get("remote", url=url, retries=2, backoff=0.02)(quantized_images(1), ["a"])
    msg = str(ei.value)
    assert f"{url}/score" in msg and "connection refused" in msg and "after 3 attempts" in msg
    assert time.monotonic() - t0 >= 0.02 + 0.04  # back-off slept 0.02 then 0.04 s


@pytest.mark.parametrize(
    "reply, expected",
    [
        (b"<html>oops</html>", "malformed reply: not JSON"),
        (b'{"scores": [1.0]}', "malformed reply: scores has 1 values for a batch of 2"),
        (b'{"scores": ["a", "b"]}', "malformed reply: scores holds a str"),
        (b'{"result": [1, 2]}', "malformed reply: expected a JSON object with key 'scores'"),
    ],
)
def test_malformed_reply(reply, expected):
    with FakeServer(lambda h, b, k: (200, reply)) as srv:
        with pytest.raises(RemoteScorerError) as ei:
            RemoteScorer(srv.url, retries=2, backoff=0.01)(quantized_images(2), ["a", "b"])
        assert srv.count == 1  # a malformed reply is not retried
    assert expected in str(ei.value) and srv.url in str(ei.value)


def test_http_errors_retry_only_transient_statuses():
    def flaky(handler, body, k):
        if k <= 2:
            return 503, b'{"error": "warming up"}'
        n = len(json.loads(body)["prompts"])
        return 200, json.dumps({"scores": [0.5] * n}).encode()

    with FakeServer(flaky) as srv:
        got = RemoteScorer(srv.url, retries=2, backoff=0.01)(quantized_images(2), ["a", "b"])
        assert srv.count == 3 and torch.equal(got, torch.tensor([0.5, 0.5]))
    with FakeServer(flaky) as srv:
        with pytest.raises(RemoteScorerError, match=r"HTTP 503 Service Unavailable: warming up \(after 2 attempts\)"):
            RemoteScorer(srv.url, retries=1, backoff=0.01)(quantized_images(2), ["a", "b"])
    with FakeServer(lambda h, b, k: (500, b'{"error": "scorer blew up"}')) as srv:
        with pytest.raises(RemoteScorerError, match="HTTP 500 Internal Server Error: scorer blew up") as ei:
            RemoteScorer(srv.url, retries=3, backoff=0.01)(quantized_images(2), ["a", "b"])
        assert srv.count == 1 and ei.value.status == 500  # 500 repeats for the same batch: no retry


def test_retry_after_of_a_busy_server_is_honoured():
    """A 503 with ``Retry-After: 1`` makes the client wait at least 1 s although its own back-off is
    0.01 s; an HTTP-date Retry-After is read too; a 500's Retry-After changes nothing (no retry)."""
    times = []

    def busy_once(handler, body, k):
        times.append(time.monotonic())
        if k == 1:
            return 503, b'{"error": "server busy"}', {"Retry-After": "1"}
        n = len(json.loads(body)["prompts"])
        return 200, json.dumps({"scores": [0.25] * n}).encode()

    with FakeServer(busy_once) as srv:
        got = RemoteScorer(srv.url, retries=2, backoff=0.01)(quantized_images(2), ["a", "b"])
    assert torch.equal(got, torch.tensor([0.25, 0.25])) and len(times) == 2
    assert 1.0 <= times[1] - times[0] < 5.0
    from email.utils import formatdate

    from scorers.remote import _retry_after_s

    assert _retry_after_s({"Retry-After": "2.5"}) == 2.5 and _retry_after_s({"Retry-After": "soon"}) is None
    assert 8 < _retry_after_s({"Retry-After": formatdate(time.time() + 10, usegmt=True)}) <= 10
    assert _retry_after_s({}) is None
    with FakeServer(lambda h, b, k: (500, b'{"error": "no"}', {"Retry-After": "30"})) as srv:
        t0 = time.monotonic()
        with pytest.raises(RemoteScorerError, match="HTTP 500"):
            RemoteScorer(srv.url, retries=3, backoff=0.01)(quantized_images(2), ["a", "b"])
        assert srv.count == 1 and time.monotonic() - t0 < 5.0


def test_oversized_request_gets_413_and_server_keeps_serving():
    big = torch.rand(4, 3, 32, 32)  # noise: ~3 KB of PNG per image, ~16 KB of JSON in all
    with ScorerServer("test_remote_tiny", port=0, max_request_bytes=6000) as srv:
        client = RemoteScorer(srv.url, retries=2, backoff=0.01)
        with pytest.raises(RemoteScorerError) as ei:
            client(big, ["a"] * 4)
        msg = str(ei.value)
        assert ei.value.status == 413 and ei.value.attempts == 1
        assert "HTTP 413" in msg and "over this server's limit of 6000 bytes" in msg and srv.url in msg
        # far over the limit (> 4x): the server closes without reading; the client's error says why
        with pytest.raises(RemoteScorerError, match="413|connection closed by the server while sending"):
            RemoteScorer(srv.url, retries=0)(torch.rand(8, 3, 64, 64), ["a"] * 8)
        small = quantized_images(2, size=4)
        ok = client(small, ["a", "b"])
        assert client.health()["max_request_bytes"] == 6000
    torch.testing.assert_close(ok, scorers.get("test_remote_tiny")(small, ["a", "b"]), rtol=1e-6, atol=1e-6)


def test_on_error_invalid_marks_failed_batches_nan(caplog):
    def second_fails(handler, body, k):
        if k == 2:
            return 400, b'{"error": "bad batch"}'
        n = len(json.loads(body)["prompts"])
        return 200, json.dumps({"scores": [1.0] * n}).encode()

    with FakeServer(second_fails) as srv:
        client = scorers.get("remote", url=srv.url, batch_size=2, on_error="invalid", retries=0)
        with caplog.at_level(logging.WARNING, logger="scorers.remote"):
            got = client(quantized_images(5), ["p"] * 5)
    assert got[:2].tolist() == [1.0, 1.0] and got[4].item() == 1.0
    assert torch.isnan(got[2:4]).all()
    assert client.failed_batches == 1 and client.failed_samples == 2
    assert any("bad batch" in r.message and "2 samples are marked invalid" in r.message for r in caplog.records)
    dead = RemoteScorer(f"http://127.0.0.1:{free_port()}", on_error="invalid", retries=0)
    assert torch.isnan(dead(quantized_images(3), ["p"] * 3)).all()


# ---------------------------------------------------------------------------------------------
# PNG images reach the scorer as decoded: learned scorers take their official PIL path
# ---------------------------------------------------------------------------------------------

# A small CLIP-style spec (torchvision PIL pipeline: resize, crop, then RGB) keeps these tests fast.
SPEC_32 = PreprocessSpec(resize=32, crop=32)


class OfficialPixelScorer(Scorer):
    """Stands in for a learned scorer: ``pil_input`` set, PIL / uint8 input preprocessed with the
    official PIL pipeline of :data:`SPEC_32`, float input with the torch path; score = a fixed random
    linear function of the model-input pixels (sensitive to every pixel). Records what it received."""

    name = "test_official_pixels"
    pil_input = True

    def __init__(self, **kw):
        super().__init__(**kw)
        self.w = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(0))
        self.seen = []

    def score_batch(self, images, prompts, **metadata):
        if is_pil_or_uint8(images):
            self.seen.append("pil" if isinstance(images, list) else "uint8")
            px = pil_pixel_values(images, SPEC_32)
        else:
            self.seen.append("float")
            px = preprocess(images, SPEC_32)
        return (px * self.w).sum(dim=(1, 2, 3))


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _b64_png(im: Image.Image) -> str:
    return base64.b64encode(_png(im)).decode()


def _mixed_mode_images():
    """RGB, RGBA (alpha varies: PIL resizes it premultiplied, so RGB-then-resize differs), L and P
    images of different sizes."""
    g = np.random.default_rng(5)
    return [
        Image.fromarray(g.integers(0, 256, (40, 50, 3), dtype=np.uint8)),
        Image.fromarray(g.integers(0, 256, (37, 45, 4), dtype=np.uint8), "RGBA"),
        Image.fromarray(g.integers(0, 256, (30, 60), dtype=np.uint8), "L"),
        Image.fromarray(g.integers(0, 256, (44, 44, 3), dtype=np.uint8)).convert("P"),
    ]


def test_server_gives_png_images_to_the_scorer_as_decoded():
    """Hand-made PNG files (four modes, four sizes) POSTed to the server score as the in-process scorer
    scores the decoded images (``Image.open`` of each file): the official PIL path on the file's own
    pixels and mode — identical, the same computation in one process. A scorer without ``pil_input``
    still gets the RGB float tensor, and images of one size."""
    ims = _mixed_mode_images()
    pngs = [_png(im) for im in ims]
    body = json.dumps({"prompts": ["a", "b", "c", "d"], "images": [base64.b64encode(p).decode() for p in pngs]}).encode()
    J = {"Content-Type": "application/json"}
    scorer = OfficialPixelScorer(batch_size=3)
    with ScorerServer(scorer, port=0) as srv:
        status, reply = raw_request(srv.url, "POST", "/score", body, J)
    assert status == 200, reply
    assert scorer.seen == ["pil", "pil"]  # chunks of 3 and 1, as decoded
    decoded = [Image.open(io.BytesIO(p)) for p in pngs]
    assert [im.mode for im in decoded] == ["RGB", "RGBA", "L", "P"]
    want = OfficialPixelScorer(batch_size=3)(decoded, ["a", "b", "c", "d"])
    assert torch.equal(torch.tensor(reply["scores"], dtype=torch.float32), want)
    # converting to RGB before the official pipeline (what the server did before) gives other pixels
    rgb_first = OfficialPixelScorer()([decoded[1].convert("RGB")], ["b"])
    assert abs(float(rgb_first[0]) - reply["scores"][1]) > 1e-3
    # a Scorer without pil_input: RGB floats in [0, 1] of the decoded pixels, one size per request
    same = [Image.fromarray(np.random.default_rng(6).integers(0, 256, (8, 8, 4), dtype=np.uint8), "RGBA"), ims[0].resize((8, 8))]
    body = json.dumps({"prompts": ["p", "q"], "images": [_b64_png(im) for im in same]}).encode()
    mixed = json.dumps({"prompts": ["p", "q"], "images": [_b64_png(im) for im in ims[:2]]}).encode()
    with ScorerServer("test_remote_tiny", port=0) as srv:
        status, reply = raw_request(srv.url, "POST", "/score", body, J)
        assert raw_request(srv.url, "POST", "/score", mixed, J) == (400, {"error": "images must share one size, got [(45, 37), (50, 40)]"})
    assert status == 200, reply
    x = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1) for im in same])
    torch.testing.assert_close(torch.tensor(reply["scores"]), scorers.get("test_remote_tiny")(x, ["p", "q"]), rtol=1e-6, atol=1e-6)


def test_remote_float_images_score_as_the_official_path_on_their_png_pixels():
    """The training loop sends float images; they travel as the 8-bit PNG of ``quantize_uint8(x)`` and
    a ``pil_input`` scorer on the server takes its official path on those pixels: the remote score is
    the in-process score of that uint8 tensor (identical), no longer the float path of
    ``round(255 x) / 255`` (which differs). uint8 tensors and PIL images (any mode, mixed sizes) are
    sent as they are."""
    x = torch.rand(5, 3, 45, 61, generator=torch.Generator().manual_seed(7))
    x[0, 0, 0, 0] = 1.3  # clamped to 1, as PNG stores it
    prompts = ["a", "b", "c", "d", "e"]
    q = quantize_uint8(x)
    local = OfficialPixelScorer(batch_size=2)
    ims = _mixed_mode_images()
    with ScorerServer(OfficialPixelScorer(batch_size=2), port=0) as srv:
        remote = RemoteScorer(srv.url, batch_size=3, retries=0, timeout=20)
        got = remote(x, prompts)
        got_u8 = remote(q, prompts)
        got_pil = remote(ims, prompts[:4])
        served = srv.scorer.seen
    assert set(served) == {"pil"}
    assert torch.equal(got, local(q, prompts)) and torch.equal(got_u8, got)
    assert (got - local(q.float() / 255, prompts)).abs().max() > 1e-3  # the float path of the same pixels
    assert torch.equal(got_pil, local(ims, prompts[:4]))
    # what the client sends for PIL input: the image itself (mode, size, pixels, palette)
    body = json.loads(build_score_request(ims, prompts[:4]))
    for im, b64 in zip(ims, body["images"]):
        back = Image.open(io.BytesIO(base64.b64decode(b64)))
        assert back.mode == im.mode and back.size == im.size
        assert np.array_equal(np.asarray(back.convert("RGBA")), np.asarray(im.convert("RGBA")))
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 0, 0))  # PNG cannot store CMYK: sent as RGB
    assert Image.open(io.BytesIO(base64.b64decode(json.loads(build_score_request([cmyk], ["a"]))["images"][0]))).mode == "RGB"


def _tiny_imagereward():
    from transformers import BertTokenizer

    from scorers.imagereward import ImageRewardConfig, ImageRewardModel, ImageRewardScorer, prepare_tokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "cat", "dog", "photo", "of"]
    tok = prepare_tokenizer(BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}))
    model = ImageRewardModel(ImageRewardConfig.tiny(vocab_size=len(vocab) + 2))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # O(1) activations, so the score depends visibly on the pixels
        for p in model.parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
    return ImageRewardScorer(model, tok, batch_size=2)


def test_remote_imagereward_takes_the_official_path():
    """ImageReward (its own PIL routing, tests/test_imagereward.py) behind the server: the remote score
    of a float batch is the in-process score of its uint8 PNG pixels (identical), not of the float
    path."""
    s = _tiny_imagereward()
    x = torch.rand(3, 3, 50, 70, generator=torch.Generator().manual_seed(1))
    prompts = ["a red cat", "a dog", "photo of a cat"]
    with ScorerServer(s, port=0) as srv:
        got = RemoteScorer(srv.url, retries=0, timeout=30)(x, prompts)
    q = quantize_uint8(x)
    assert torch.equal(got, s(q, prompts))
    assert (got - s(q.float() / 255, prompts)).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# the server survives bad input
# ---------------------------------------------------------------------------------------------


def test_server_rejects_malformed_requests_and_keeps_serving():
    def picky(images, prompts, **meta):
        if "explode" in prompts:
            raise RuntimeError("boom")
        return images.mean(dim=(1, 2, 3))

    jpeg = io.BytesIO()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(jpeg, format="JPEG")
    big_png = io.BytesIO()
    Image.new("RGB", (20, 20)).save(big_png, format="PNG")
    J = {"Content-Type": "application/json"}
    cases = [
        (b"{not json", J, 400, "not valid JSON"),
        (b"[1, 2]", J, 400, "must be a JSON object"),
        (score_body(images=["!!!"], prompts=["a"]), J, 400, "images[0] is not valid base64"),
        (score_body(images=[base64.b64encode(jpeg.getvalue()).decode()], prompts=["a"]), J, 400, "images[0] is not a PNG"),
        (score_body(images=[base64.b64encode(big_png.getvalue()).decode()], prompts=["a"]), J, 400, "over the server's limit of 256 pixels"),
        (score_body(prompts=["a"]), J, 400, "got 2 images but 1 prompts"),
        (score_body(prompts="ab"), J, 400, "'prompts' must be a list of strings"),
        (score_body(metadata={"offset": [1, 2, 3]}), J, 400, "metadata['offset'] has 3 entries for 2 images"),
        (score_body(metadata=[1]), J, 400, "'metadata' must be a JSON object"),
        (score_body(extra=1), J, 400, "unknown field(s) ['extra']"),
        (score_body(protocol=3), J, 400, "protocol 3 is not supported"),
        (score_body(), {"Content-Type": "text/plain"}, 415, "Content-Type must be application/json"),
        (score_body(prompts=["explode", "b"]), J, 500, "raised RuntimeError: boom"),
    ]
    with ScorerServer(picky, port=0, max_image_pixels=256, request_timeout=2.0) as srv:
        for body, headers, status, text in cases:
            got_status, reply = raw_request(srv.url, "POST", "/score", body, headers)
            assert (got_status, text in reply["error"]) == (status, True), (text, reply)
        assert raw_request(srv.url, "GET", "/nope")[0] == 404
        assert raw_request(srv.url, "POST", "/nope", b"{}", J)[0] == 404
        status, reply = raw_request(srv.url, "PUT", "/score", b"{}", J)
        assert status == 501 and "error" in reply
        # no Content-Length, a truncated body, a garbage request line: answered (in JSON), not crashed.
        # (uvicorn's h11 answers HTTP/1.1 whatever the request's version; http.server echoed it.)
        no_len = raw_socket_request(srv.url, b"POST /score HTTP/1.0\r\nContent-Type: application/json\r\n\r\n{}", half_close=True)
        assert no_len.startswith(b"HTTP/1.1 411") and b"Content-Length header is required" in no_len
        short = raw_socket_request(srv.url, b"POST /score HTTP/1.0\r\nContent-Length: 100\r\n\r\n{}", half_close=True)
        assert short.startswith(b"HTTP/1.1 400") and b"body ended after 2 of 100 bytes" in short
        garbage = raw_socket_request(srv.url, b"GET / HTTP/1.0 extra words\r\n\r\n", half_close=True)
        assert garbage.startswith(b"HTTP/1.1 400") and b'{"error": "invalid HTTP request' in garbage
        binary = raw_socket_request(srv.url, b"\x00\x01 garbage\r\n\r\n", half_close=True)
        assert binary.startswith(b"HTTP/1.1 400") and b'{"error": "invalid HTTP request' in binary
        # still healthy, still scoring
        assert raw_request(srv.url, "GET", "/health") == (200, {
            "status": "ok", "protocol": "flowrl-scorer/2", "scorer": "picky", "max_request_bytes": 256 * 2**20,
        })
        x = quantized_images(2, size=4)
        got = RemoteScorer(srv.url, retries=0)(x, ["a", "b"])
        empty_status, empty = raw_request(srv.url, "POST", "/score", score_body(0), J)
    torch.testing.assert_close(got, x.mean(dim=(1, 2, 3)), rtol=1e-6, atol=1e-6)
    assert (empty_status, empty) == (200, {"scores": []})


# ---------------------------------------------------------------------------------------------
# construction errors and the command line
# ---------------------------------------------------------------------------------------------


def test_factory_validation():
    with pytest.raises(ValueError, match="url is required"):
        scorers.get("remote")
    with pytest.raises(ValueError, match="http:// or https://"):
        scorers.get("remote", url="127.0.0.1:8000")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['timout'\]"):
        scorers.get("remote", url="http://127.0.0.1:1", timout=3)
    with pytest.raises(ValueError, match="on_error must be one of"):
        scorers.get("remote", url="http://127.0.0.1:1", on_error="ignore")
    with pytest.raises(ValueError, match="differentiable"):
        scorers.get("remote", url="http://127.0.0.1:1", differentiable=True)
    with pytest.raises(ValueError, match="timeout must be a positive"):
        scorers.get("remote", url="http://127.0.0.1:1", timeout=0)
    with pytest.raises(ValueError, match="either component or weights"):
        scorers.get("remote", url="http://127.0.0.1:1", component="a", weights={"a": 1})
    r = scorers.get("remote", url="http://127.0.0.1:1/api/score")
    assert (r.url, r.health_url) == ("http://127.0.0.1:1/api/score", "http://127.0.0.1:1/api/health")
    r = scorers.get("remote", url="http://127.0.0.1:1/")
    assert (r.url, r.health_url) == ("http://127.0.0.1:1/score", "http://127.0.0.1:1/health")


def test_serve_scorer_main_rejects_bad_arguments(capsys):
    assert server_main(["no_such_scorer_xyz", "--port", "0"]) == 2
    assert "unknown scorer 'no_such_scorer_xyz'" in capsys.readouterr().err
    assert server_main(["test_remote_tiny", "--port", "0", "--dtype", "int8"]) == 2
    assert "--dtype must be a floating torch dtype" in capsys.readouterr().err
    with pytest.raises(SystemExit) as ei:
        server_main(["test_remote_tiny", "--option", "novalue"])
    assert ei.value.code == 2


def test_serve_scorer_command_line_end_to_end(tmp_path):
    """`python -m scorers.server DOTTED.PATH --port 0 --option scale=2` serves; Ctrl-C stops it."""
    (tmp_path / "cli_tiny_mod.py").write_text(
        "from scorers.base import Scorer\n"
        "class S(Scorer):\n"
        "    name = 'cli_tiny'\n"
        "    def __init__(self, scale=1.0, **kw):\n"
        "        super().__init__(**kw)\n"
        "        self.scale = scale\n"
        "    def score_batch(self, images, prompts, **meta):\n"
        "        return images.mean(dim=(1, 2, 3)) * self.scale\n"
        "def make(scale=1.0, **kw):\n"
        "    return S(scale=scale, **kw)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "scorers.server", "cli_tiny_mod:make", "--port", "0", "--option", "scale=2", "--batch-size", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        line = []
        reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(60)
        assert line and line[0].startswith("serving scorer cli_tiny_mod:make on http://127.0.0.1:"), (line, proc.poll())
        url = line[0].split(" on ", 1)[1].split(" ", 1)[0]
        x = quantized_images(3, size=4)
        got = RemoteScorer(url, retries=0, timeout=20)(x, ["a", "b", "c"])
        torch.testing.assert_close(got, 2 * x.mean(dim=(1, 2, 3)), rtol=1e-6, atol=1e-6)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()
