"""`vlm_judge` against a small local endpoint that speaks OpenAI's chat-completions protocol.

The fake endpoint checks each request's shape (model, temperature, max_tokens, the image as a PNG
data URL, the prompt inside the template) and answers from the image's colour: red -> "Final Score: 4",
blue -> "**Final Score:** 2.5", green -> an answer with no score. Servers run on 127.0.0.1 on a free
port in a daemon thread and are shut down by their context manager; every wait is bounded.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import math
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

import scorers
from scorers.judge import DEFAULT_PATTERN, VLMJudge, parse_judge_score
from scorers.remote import RemoteScorerError

COLOURS = {"red": (1.0, 0.0, 0.0), "blue": (0.0, 0.0, 1.0), "green": (0.0, 1.0, 0.0)}
ANSWERS = {
    "red": "The objects are all there and sharp.\nFinal Score: 4",
    "blue": "Colours are off; earlier I thought Final Score: 5 but no.\n**Final Score:** 2.5",
    "green": "I am unable to evaluate this image.",
}


def solid(names, size=8) -> torch.Tensor:
    return torch.stack([torch.tensor(COLOURS[n]).view(3, 1, 1).expand(3, size, size) for n in names]).float()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def colour_of(data_url: str) -> str:
    assert data_url.startswith("data:image/png;base64,")
    im = Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])), formats=["PNG"])
    mean = np.asarray(im.convert("RGB"), dtype=np.float32).mean(axis=(0, 1))
    return ["red", "green", "blue"][int(mean.argmax())]


class FakeChatEndpoint:
    """``POST /v1/chat/completions``; ``answer(request, colour, k) -> (status, reply object)``."""

    def __init__(self, expect_model="judge-model", expect_max_tokens=64, answer=None, barrier=None):
        outer = self
        self.requests = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.barrier = barrier

        def default_answer(req, colour, k):
            return 200, {"id": f"c{k}", "object": "chat.completion",
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWERS[colour]},
                                      "finish_reason": "stop"}]}

        self.answer = answer or default_answer

        def check(req):
            """Problems with the request's shape, as a list of strings (empty when it is right)."""
            errs = []
            if req.get("model") != expect_model:
                errs.append(f"model {req.get('model')!r}")
            if req.get("temperature") != 0.0:
                errs.append(f"temperature {req.get('temperature')!r}")
            if req.get("max_tokens") != expect_max_tokens:
                errs.append(f"max_tokens {req.get('max_tokens')!r}")
            user = req["messages"][-1]
            layouts = (["image_url", "text"], ["image_url", "image_url", "text"])  # an image, or source + edit
            if user["role"] != "user" or [p["type"] for p in user["content"]] not in layouts:
                errs.append("user message layout")
            return errs

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with outer.lock:
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                    k = len(outer.requests)
                    req = json.loads(body)
                    outer.requests.append({"req": req, "auth": self.headers.get("Authorization")})
                try:
                    if outer.barrier is not None and k < outer.barrier.parties:
                        outer.barrier.wait(10)  # the first ones meet: proves the client sends concurrently
                    errs = [] if self.path == "/v1/chat/completions" else [f"path {self.path}"]
                    errs += check(req)
                    if errs:
                        status, reply = 400, {"error": {"message": "bad request: " + ", ".join(errs)}}
                    else:
                        colour = colour_of(req["messages"][-1]["content"][0]["image_url"]["url"])
                        status, reply = outer.answer(req, colour, k)
                    data = json.dumps(reply).encode() if not isinstance(reply, bytes) else reply
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass
                finally:
                    with outer.lock:
                        outer.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.barrier is not None:
            self.barrier.abort()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


def judge(url, **kw) -> VLMJudge:
    kw.setdefault("model", "judge-model")
    kw.setdefault("max_tokens", 64)
    kw.setdefault("retries", 0)
    kw.setdefault("timeout", 10)
    return scorers.get("vlm_judge", url=url, **kw)


def test_judge_scores_parses_and_counts_unparseable(caplog):
    names = ["red", "blue", "green", "red", "blue"]
    prompts = [f"prompt number {i} with {{braces}}" for i in range(5)]
    with FakeChatEndpoint() as ep:
        j = judge(ep.url, concurrency=3, batch_size=4, api_key="sk-test")
        with caplog.at_level(logging.WARNING, logger="scorers.judge"):
            got = j(solid(names), prompts)
    assert got.dtype == torch.float32 and got.shape == (5,)
    assert torch.equal(got[[0, 3]], torch.tensor([0.8, 0.8]))  # 4 / 5 (as float32)
    assert torch.equal(got[[1, 4]], torch.tensor([0.5, 0.5]))  # the last "Final Score" (2.5) counts, not the earlier 5
    assert math.isnan(got[2])
    assert j.stats() == {"requests": 5, "unparseable": 1, "failed": 0}
    assert any("1 of 4 answers have no score" in r.message and "unable to evaluate" in r.message for r in caplog.records)
    # every prompt reached the judge inside the template, braces untouched, with its own image
    texts = sorted(r["req"]["messages"][-1]["content"][1]["text"] for r in ep.requests)
    assert all(f'prompt: "{p}"' in t for p, t in zip(sorted(prompts), texts))
    assert {r["auth"] for r in ep.requests} == {"Bearer sk-test"}
    assert all(len(r["req"]["messages"]) == 1 for r in ep.requests)  # no system message unless asked


def test_judge_requests_run_concurrently_up_to_the_limit():
    barrier = threading.Barrier(3)  # the first three requests wait for each other: needs 3 in flight
    with FakeChatEndpoint(barrier=barrier) as ep:
        got = judge(ep.url, concurrency=3)(solid(["red"] * 7), ["p"] * 7)
    assert torch.allclose(got, torch.full((7,), 0.8))
    assert ep.max_in_flight == 3


def test_custom_template_system_pattern_and_scale():
    def answer(req, colour, k):
        return 200, {"choices": [{"message": {"content": [{"type": "text", "text": "Rating: 7/10"}]}}]}

    with FakeChatEndpoint(answer=answer) as ep:
        j = judge(ep.url + "/chat/completions", template="Rate '{prompt}' {not a field}", system="You grade images.",
                  pattern=r"Rating: (?P<score>\d+)/10", scale=10, extra_body={"top_p": 1.0})
        got = j(solid(["red", "blue"]), ["cat", "dog"])
    assert torch.allclose(got, torch.tensor([0.7, 0.7]))
    req = ep.requests[0]["req"]
    assert req["messages"][0] == {"role": "system", "content": "You grade images."}
    assert req["messages"][1]["content"][1]["text"] in ("Rate 'cat' {not a field}", "Rate 'dog' {not a field}")
    assert req["top_p"] == 1.0


def test_judge_sees_the_source_image_of_an_edit_first():
    """Instruction editing: with a source image per row (metadata column ``image``) the judge gets the source,
    then the edit, and the edit template with the instruction; a row without one is judged as an image."""
    def answer(req, colour, k):
        content = req["messages"][-1]["content"]
        shown = [colour_of(c["image_url"]["url"]) for c in content if c["type"] == "image_url"]
        score = {("green", "red"): 4, ("blue",): 2}.get(tuple(shown), 1)
        return 200, {"choices": [{"message": {"content": f"Final Score: {score}"}}]}

    with FakeChatEndpoint(answer=answer) as ep:
        got = judge(ep.url, concurrency=1)(solid(["red", "blue"]), ["make the square red", "a blue square"],
                                           image=[solid(["green"])[0], None])
    assert torch.allclose(got, torch.tensor([0.8, 0.4]))
    texts = {len(r["req"]["messages"][-1]["content"]): r["req"]["messages"][-1]["content"][-1]["text"] for r in ep.requests}
    assert 'editing it with the instruction: "make the square red"' in texts[3]
    assert texts[2].startswith('This image was generated from the text prompt: "a blue square"')
    with pytest.raises(ValueError, match="one source image per image"):
        judge(ep.url)(solid(["red", "blue"]), ["a", "b"], image=[None])


def test_parse_judge_score():
    p = re.compile(DEFAULT_PATTERN)
    assert parse_judge_score("Final Score: 4", p, 5) == 0.8
    assert parse_judge_score("final score 3.5 / 5", p, 5) == 0.7
    assert parse_judge_score("**Final Score:** 2\n", p, 5) == 0.4
    assert parse_judge_score("Final Score: 1 ... revised. Final Score: 5", p, 5) == 1.0
    assert math.isnan(parse_judge_score("Score: 4", p, 5))
    assert math.isnan(parse_judge_score("", p, 5))
    assert parse_judge_score("good: 9", re.compile(r"\d+"), 10) == 0.9  # no group: the whole match
    assert parse_judge_score("a=1 b=2", re.compile(r"a=(\d) b=(?P<score>\d)"), 1) == 2.0  # named group wins


def test_judge_errors_are_clear():
    release = threading.Event()

    def slow(req, colour, k):
        release.wait(10)
        return 200, {"choices": []}

    with FakeChatEndpoint(answer=slow) as ep:
        try:
            with pytest.raises(RemoteScorerError, match=r"vlm_judge http://127\.0\.0\.1:\d+/v1/chat/completions: timed out after 0\.3 s"):
                judge(ep.url, timeout=0.3)(solid(["red"]), ["p"])
        finally:
            release.set()
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(RemoteScorerError, match=r"chat/completions: connection refused .*\(after 2 attempts\)"):
        judge(dead, retries=1, backoff=0.01)(solid(["red"]), ["p"])
    with FakeChatEndpoint(answer=lambda req, colour, k: (200, {"object": "chat.completion"})) as ep:
        with pytest.raises(RemoteScorerError, match="malformed reply: no 'choices' list"):
            judge(ep.url)(solid(["red"]), ["p"])
    with FakeChatEndpoint(answer=lambda req, colour, k: (200, b"not json")) as ep:
        with pytest.raises(RemoteScorerError, match="malformed reply: not JSON"):
            judge(ep.url)(solid(["red"]), ["p"])
    with FakeChatEndpoint(expect_model="other-model") as ep:  # the endpoint rejects our model name
        with pytest.raises(RemoteScorerError, match="HTTP 400 Bad Request: bad request: model 'judge-model'"):
            judge(ep.url)(solid(["red"]), ["p"])


def test_judge_on_error_invalid_gives_nan_and_counts(caplog):
    def half_broken(req, colour, k):
        if colour == "blue":
            return 400, {"error": {"message": "image too large"}}
        return 200, {"choices": [{"message": {"content": ANSWERS[colour]}}]}

    with FakeChatEndpoint(answer=half_broken) as ep:
        j = judge(ep.url, on_error="invalid")
        with caplog.at_level(logging.WARNING, logger="scorers.judge"):
            got = j(solid(["red", "blue", "green"]), ["a", "b", "c"])
    assert got[0].item() == pytest.approx(0.8) and math.isnan(got[1]) and math.isnan(got[2])
    assert j.stats() == {"requests": 3, "unparseable": 1, "failed": 1}
    assert any("1 of 3 requests failed" in r.message and "image too large" in r.message for r in caplog.records)


def test_factory_validation():
    with pytest.raises(ValueError, match="url is required"):
        scorers.get("vlm_judge", model="m")
    with pytest.raises(ValueError, match="model is required"):
        scorers.get("vlm_judge", url="http://127.0.0.1:1/v1")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['temprature'\]"):
        scorers.get("vlm_judge", url="http://127.0.0.1:1/v1", model="m", temprature=0)
    with pytest.raises(ValueError, match="pattern is not a valid regular expression"):
        scorers.get("vlm_judge", url="http://127.0.0.1:1/v1", model="m", pattern="(")
    with pytest.raises(ValueError, match="scale must be a finite non-zero"):
        scorers.get("vlm_judge", url="http://127.0.0.1:1/v1", model="m", scale=0)
    with pytest.raises(ValueError, match="concurrency must be"):
        scorers.get("vlm_judge", url="http://127.0.0.1:1/v1", model="m", concurrency=0)
    assert scorers.get("vlm_judge", url="http://h:1/v1/", model="m").url == "http://h:1/v1/chat/completions"
    assert "vlm_judge" in scorers.available() and "remote" in scorers.available()
