"""The scorer server's micro-batching: requests wait in the event loop and are scored one scorer
call at a time in one worker thread, compatible requests merged into one call.

Part of :mod:`scorers.server`."""
import asyncio
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch

from scorers._server_requests import split_scores

log = logging.getLogger("scorers.server")  # the server's logger: one name for all of its messages


class _Failure:
    """A request's error reply: the scorer raised (500) or the server is stopping (503)."""

    def __init__(self, message: str, status: int = 500):
        self.message = message
        self.status = status


class _Job:
    """One request waiting for the scorer: its input (PIL list or float tensor), prompts, metadata."""

    __slots__ = ("inputs", "prompts", "metadata", "n", "key", "future", "t")

    def __init__(self, inputs, prompts, metadata, key, future, t):
        self.inputs, self.prompts, self.metadata = inputs, prompts, metadata
        self.n, self.key, self.future, self.t = len(prompts), key, future, t


def _batch_key(size: Optional[Tuple[int, int]], metadata: Mapping[str, Any]) -> tuple:
    """Requests with equal keys can share a scorer call: same image size (when the scorer needs one),
    same metadata keys, per-sample lists under the same keys and equal values under the others."""
    meta = tuple(
        (k, None if isinstance(v, list) else json.dumps(v, sort_keys=True)) for k, v in sorted(metadata.items())
    )
    return size, meta


class _Batcher:
    """Collects jobs in the event loop and scores them in one worker thread, merging compatible ones."""

    def __init__(self, scorer: Callable, name: str, max_batch_images: int, batch_wait_s: float):
        self.scorer = scorer
        self.name = name
        self.max_batch_images = max_batch_images  # 0: every request alone
        self.batch_wait_s = batch_wait_s
        self.queue: List[_Job] = []
        self.running: List[_Job] = []
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="flowrl-scorer")
        self.calls = 0  # scorer calls
        self.requests_served = 0  # requests the scorer returned scores for
        self._wake: Optional[asyncio.Event] = None

    def submit(self, job: _Job) -> None:
        self.queue.append(job)
        self._wake.set()

    def fail_all(self, failure: _Failure) -> None:
        """Answer every queued and running job with ``failure`` (the server is stopping)."""
        for job in self.queue + self.running:
            if not job.future.done():
                job.future.set_result(failure)
        self.queue = []

    def _compatible_images(self, first: _Job) -> int:
        return sum(j.n for j in self.queue if j.key == first.key)

    def _take(self) -> List[_Job]:
        self.queue = [j for j in self.queue if not j.future.done()]  # cancelled: the request is gone
        if not self.queue:
            return []
        first = self.queue[0]
        batch, total = [first], first.n
        if self.max_batch_images > 0:
            for j in self.queue[1:]:
                if j.key == first.key and total + j.n <= self.max_batch_images:
                    batch.append(j)
                    total += j.n
        taken = set(map(id, batch))
        self.queue = [j for j in self.queue if id(j) not in taken]
        return batch

    async def run(self) -> None:
        """The collector: forever, take the oldest job and what can join it, score them, reply."""
        self._wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                self._wake.clear()
                await self._wake.wait()
            if self.max_batch_images > 0 and self.batch_wait_s > 0:
                # a short wait for company, counted from the oldest job's arrival (none when it waited
                # already, e.g. while the scorer was busy)
                deadline = self.queue[0].t + self.batch_wait_s
                while self.queue and self._compatible_images(self.queue[0]) < self.max_batch_images:
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), left)
                    except asyncio.TimeoutError:
                        break
            batch = self._take()
            if not batch:
                continue
            self.running = batch
            try:
                results = await loop.run_in_executor(self.pool, self._score, batch)
            except Exception as e:  # a bug here must not stop the collector
                log.exception("scorer worker failed")
                results = [_Failure(f"internal server error: {type(e).__name__}: {e}")] * len(batch)
            finally:
                self.running = []
            for job, res in zip(batch, results):
                if not job.future.done():
                    job.future.set_result(res)

    def _call(self, jobs: List[_Job]) -> List[Dict[str, Any]]:
        if len(jobs) == 1:
            inputs, prompts, meta = jobs[0].inputs, jobs[0].prompts, jobs[0].metadata
        else:
            first = jobs[0].inputs
            inputs = torch.cat([j.inputs for j in jobs]) if isinstance(first, torch.Tensor) else [im for j in jobs for im in j.inputs]
            prompts = [p for j in jobs for p in j.prompts]
            meta = {
                k: ([x for j in jobs for x in j.metadata[k]] if isinstance(v, list) else v)
                for k, v in jobs[0].metadata.items()
            }
        self.calls += 1
        out = self.scorer(inputs, prompts, **meta)
        replies = split_scores(out, [j.n for j in jobs])
        self.requests_served += len(jobs)
        return replies

    def _score(self, jobs: List[_Job]) -> List[Union[Dict[str, Any], _Failure]]:
        """In the worker thread: one call for ``jobs``; if it raises and merged several requests, each
        request again alone, so that only the failing one gets the 500."""
        try:
            return self._call(jobs)
        except Exception as e:  # the scorer's failure is the client's 500, never the server's end
            if len(jobs) > 1:
                log.warning(
                    "scorer %s raised %s on %d merged requests (%d images); scoring them one by one",
                    self.name, type(e).__name__, len(jobs), sum(j.n for j in jobs),
                )
                return [self._score([j])[0] for j in jobs]
            log.exception("scorer %s failed on a batch of %d", self.name, jobs[0].n)
            return [_Failure(f"scorer {self.name!r} raised {type(e).__name__}: {e}")]
