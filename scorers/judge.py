"""``vlm_judge``: a vision-language model behind an OpenAI-compatible chat-completions endpoint
(vLLM, SGLang, ...) grades each image against its prompt.

For every image it POSTs to ``{url}/chat/completions`` (``temperature`` 0, an optional system
message, a user message with the image as a PNG data URL and ``template`` with ``{prompt}``
filled in) and reads ``choices[0].message.content``. An edit (the metadata column ``image`` gives the
row's source image) is judged with the source image first, then the edit, and ``edit_template``. The score is the number captured by
``pattern`` (group ``score``, else the first group, else the whole match; the last match counts)
divided by ``scale``; the defaults read ``Final Score: x`` for x in 1..5 and divide by 5
(UnifiedReward's point score, arXiv:2503.05236, as Flow-GRPO uses it). An answer with no match is
an invalid sample (NaN), counted in :attr:`VLMJudge.unparseable` and warned about. Requests run
concurrently with the ``remote`` scorer's timeout and retry rules
(:func:`scorers.remote.request_json`).
"""
from __future__ import annotations

import json
import logging
import math
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from scorers._text import short
from scorers.base import Scorer
from scorers.registry import register
from scorers.remote import (
    RemoteScorerError,
    check_retry_options,
    check_url,
    encode_png_b64,
    encode_source_b64,
    request_json,
)

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = (
    "This image was generated from the text prompt: \"{prompt}\".\n"
    "Judge it on two things: how faithfully it shows everything the prompt asks for (objects, counts, "
    "colours, positions, text), and its visual quality (sharpness, anatomy, artefacts, composition). "
    "Explain briefly, then end with a line of the form 'Final Score: x', where x is an integer from "
    "1 (very poor) to 5 (excellent)."
)
# Instruction editing (a metadata column ``image`` holds each row's source image): the judge sees the source,
# then the edit, and this text with the instruction as {prompt}.
DEFAULT_EDIT_TEMPLATE = (
    "The first image is a source image; the second was made by editing it with the instruction: \"{prompt}\".\n"
    "Judge two things: how faithfully the edit carries out the instruction while keeping what the instruction "
    "does not ask to change, and the visual quality of the edited image. Explain briefly, then end with a line "
    "of the form 'Final Score: x', where x is an integer from 1 (very poor) to 5 (excellent)."
)
DEFAULT_PATTERN = r"(?i)final\s+score[\s:*]*([-+]?\d+(?:\.\d+)?)"
DEFAULT_SCALE = 5.0
_EXCERPT = 120


def parse_judge_score(text: str, pattern: "re.Pattern[str]", scale: float) -> float:
    """score = x / scale, x the number in the last match of ``pattern`` in ``text``; NaN if none.

    The number is the match's group ``score`` if the pattern names one, else group 1, else the whole
    match (UnifiedReward's "Final Score: x" / 5 by default, arXiv:2503.05236; as in Flow-GRPO,
    arXiv:2505.05470).
    """
    last = None
    for last in pattern.finditer(text):
        pass
    if last is None:
        return math.nan
    if "score" in pattern.groupindex:
        raw = last.group("score")
    elif pattern.groups >= 1:
        raw = last.group(1)
    else:
        raw = last.group(0)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return math.nan
    return value / scale if math.isfinite(value) else math.nan


def _answer_text(reply: Any) -> str:
    """``choices[0].message.content`` of a chat-completions reply (text parts joined); ValueError
    saying what is missing otherwise."""
    if not isinstance(reply, dict):
        raise ValueError(f"expected a JSON object, got {type(reply).__name__}")
    if "error" in reply and "choices" not in reply:
        err = reply["error"]
        text = err.get("message", err) if isinstance(err, dict) else err
        raise ValueError(f"the endpoint answered with an error: {short(text, 300)}")  # it may quote the prompt
    choices = reply.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ValueError("no 'choices' list in the reply")
    message = choices[0].get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list):  # content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if content is None:
        return ""  # e.g. a reply cut by max_tokens inside reasoning: no score, counted as unparseable
    if not isinstance(content, str):
        raise ValueError(f"choices[0].message.content is a {type(content).__name__}, not text")
    return content


class VLMJudge(Scorer):
    """Grades images with a VLM served behind an OpenAI-compatible chat-completions API.

    Args:
        url: the API base (``http://127.0.0.1:8000/v1``; ``/chat/completions`` is appended) or the
            full endpoint.
        model: the served model's name (as the endpoint lists it at ``/v1/models``).
        template: the user text, ``{prompt}`` replaced by the image's prompt (plain replacement, so
            other braces are kept as they are).
        edit_template: the user text for a row with a source image (instruction editing), the
            instruction as ``{prompt}``.
        system: optional system message.
        pattern: regular expression for the score (see :func:`parse_judge_score`).
        scale: the parsed number is divided by it (5 for UnifiedReward's 1..5 scores).
        max_tokens, temperature: generation settings (temperature 0 makes grading repeatable).
        concurrency: requests in flight at once.
        timeout, retries, backoff, on_error, headers, trust_env: as for the ``remote`` scorer;
            ``on_error="invalid"`` turns a failed request into NaN for its image.
        api_key: sent as ``Authorization: Bearer ...`` when set.
        extra_body: more fields merged into every request (e.g. ``{"top_p": 1.0}``).
        batch_size: images per call of :meth:`score_batch` (each image is its own request).

    Counters: ``requests``, ``unparseable`` (answers without a score), ``failed`` (requests that
    failed with ``on_error="invalid"``), summed over the scorer's life.
    """

    name = "vlm_judge"

    def __init__(
        self,
        url: str,
        model: str,
        *,
        template: str = DEFAULT_TEMPLATE,
        edit_template: str = DEFAULT_EDIT_TEMPLATE,
        system: Optional[str] = None,
        pattern: str = DEFAULT_PATTERN,
        scale: float = DEFAULT_SCALE,
        max_tokens: int = 512,
        temperature: float = 0.0,
        concurrency: int = 8,
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 1.0,
        on_error: str = "raise",
        api_key: Optional[str] = None,
        headers: Optional[Mapping[str, str]] = None,
        extra_body: Optional[Mapping[str, Any]] = None,
        trust_env: bool = False,
        batch_size: int = 16,
    ):
        super().__init__(device="cpu", dtype=torch.float32, batch_size=batch_size, differentiable=False)
        parts = check_url(url, example="http://127.0.0.1:8000/v1")
        check_retry_options(timeout, retries, backoff, on_error)
        if not isinstance(model, str) or not model:
            raise ValueError("model is required: the served model's name, as GET {url}/models lists it")
        if not isinstance(template, str) or not template:
            raise ValueError("template must be a non-empty string with {prompt} where the prompt goes")
        if "{prompt}" not in template:
            log.warning("vlm_judge: the template has no {prompt}; the judge will not see the prompts")
        if not isinstance(edit_template, str) or not edit_template:
            raise ValueError("edit_template must be a non-empty string with {prompt} where the instruction goes")
        try:
            self.pattern = re.compile(pattern)
        except (re.error, TypeError) as e:
            raise ValueError(f"pattern is not a valid regular expression: {e}") from None
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale != 0):
            raise ValueError(f"scale must be a finite non-zero number, got {scale!r}")
        if not (isinstance(max_tokens, int) and max_tokens >= 1):
            raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
        if not (isinstance(temperature, (int, float)) and temperature >= 0):
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        if not (isinstance(concurrency, int) and concurrency >= 1):
            raise ValueError(f"concurrency must be an integer >= 1, got {concurrency!r}")
        path = parts.path.rstrip("/")
        if not path.endswith("/chat/completions"):
            path += "/chat/completions"
        self.url = f"{parts.scheme}://{parts.netloc}{path}" + (f"?{parts.query}" if parts.query else "")
        self.model = model
        self.template = template
        self.edit_template = edit_template
        self.system = system
        self.scale = float(scale)
        self.max_tokens = int(max_tokens)
        self.temperature = float(temperature)
        self.concurrency = int(concurrency)
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.on_error = on_error
        self.headers = dict(headers or {})
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.extra_body = dict(extra_body or {})
        self.trust_env = bool(trust_env)
        self.requests = 0
        self.unparseable = 0
        self.failed = 0
        self._lock = threading.Lock()

    def build_request(self, image_b64: str, prompt: str, source_b64: Optional[str] = None) -> Dict[str, Any]:
        """The chat-completions request body for one image (base64 PNG) and its prompt; with ``source_b64``
        (an edit's source image) the source comes first, then the edit, with ``edit_template``."""
        messages: List[Dict[str, Any]] = []
        if self.system:
            messages.append({"role": "system", "content": self.system})
        shown = [source_b64, image_b64] if source_b64 is not None else [image_b64]
        text = (self.edit_template if source_b64 is not None else self.template).replace("{prompt}", prompt)
        messages.append({
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b}"}} for b in shown]
            + [{"type": "text", "text": text}],
        })
        body = {"model": self.model, "messages": messages, "temperature": self.temperature, "max_tokens": self.max_tokens}
        body.update(self.extra_body)
        return body

    def _judge_one(self, image: torch.Tensor, prompt: str, source: Any = None) -> Tuple[float, str]:
        """(score, answer text) for one image (and its source image, editing); raises RemoteScorerError
        when the request fails."""
        payload = json.dumps(self.build_request(encode_png_b64(image), prompt, encode_source_b64(source))).encode("utf-8")
        reply = request_json(
            self.url, payload, timeout=self.timeout, retries=self.retries, backoff=self.backoff,
            headers=self.headers, what="vlm_judge", trust_env=self.trust_env,
        )
        try:
            text = _answer_text(reply)
        except ValueError as e:
            raise RemoteScorerError("vlm_judge", self.url, f"malformed reply: {e}") from None
        return parse_judge_score(text, self.pattern, self.scale), text

    def score_batch(self, images: torch.Tensor, prompts: List[str], **metadata) -> torch.Tensor:
        n = images.shape[0]
        images = images.detach().cpu()
        sources = metadata.get("image")  # instruction editing: each row's source image (or None)
        if sources is not None and (isinstance(sources, (str, bytes)) or len(sources) != n):
            raise ValueError(f"vlm_judge: metadata['image'] must hold one source image per image ({n})")
        with ThreadPoolExecutor(max_workers=min(self.concurrency, n), thread_name_prefix="vlm_judge") as pool:
            futures = [pool.submit(self._judge_one, images[i], prompts[i], None if sources is None else sources[i])
                       for i in range(n)]
            results = []
            for f in futures:
                try:
                    results.append(f.result())
                except RemoteScorerError as err:
                    results.append(err)
        errors = [r for r in results if isinstance(r, RemoteScorerError)]
        with self._lock:
            self.requests += n
        if errors and self.on_error == "raise":
            raise errors[0]
        scores = torch.full((n,), math.nan)
        bad: List[str] = []
        for i, r in enumerate(results):
            if isinstance(r, RemoteScorerError):
                continue
            score, text = r
            scores[i] = score
            if math.isnan(score):
                bad.append(text)
        if errors:
            with self._lock:
                self.failed += len(errors)
            log.warning("vlm_judge: %d of %d requests failed, marked invalid (NaN); first: %s", len(errors), n, errors[0])
        if bad:
            with self._lock:
                self.unparseable += len(bad)
            excerpt = bad[0][-_EXCERPT:].replace("\n", " ")
            log.warning(
                "vlm_judge: %d of %d answers have no score matching %r, marked invalid (NaN); one ends with %r",
                len(bad), n, self.pattern.pattern, excerpt,
            )
        return scores

    def stats(self) -> Dict[str, int]:
        """Counters so far: requests, unparseable answers, failed requests."""
        with self._lock:
            return {"requests": self.requests, "unparseable": self.unparseable, "failed": self.failed}

    def __repr__(self) -> str:
        return f"VLMJudge(url={self.url!r}, model={self.model!r}, concurrency={self.concurrency})"


@register("vlm_judge")
def make_vlm_judge(
    device: Any = "cpu",
    dtype: torch.dtype = torch.float32,
    checkpoint: Optional[str] = None,
    batch_size: int = 16,
    differentiable: bool = False,
    *,
    url: Optional[str] = None,
    model: Optional[str] = None,
    **options: Any,
) -> VLMJudge:
    """Factory of the ``vlm_judge`` scorer (see :class:`VLMJudge` for the options). ``device`` and
    ``dtype`` are accepted for the common signature and unused: the model runs behind the endpoint."""
    if checkpoint is not None:
        raise ValueError("vlm_judge: checkpoint is chosen by the endpoint; pass the served model's name as model=")
    if differentiable:
        raise ValueError("vlm_judge: differentiable=True is impossible, gradients do not cross HTTP")
    valid = {
        "template", "edit_template", "system", "pattern", "scale", "max_tokens", "temperature", "concurrency", "timeout",
        "retries", "backoff", "on_error", "api_key", "headers", "extra_body", "trust_env",
    }
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ValueError(f"vlm_judge: unknown option(s) {unknown}; valid: url, model, batch_size, {', '.join(sorted(valid))}")
    return VLMJudge(url, model, batch_size=batch_size, **options)
