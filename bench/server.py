"""The scorer server under load: micro-batching against one scorer call per request, side by side.

Run: ``python bench/server.py`` (about half a minute on 2 CPU cores).

A ``scorers.server.ScorerServer`` subprocess serves a simulated GPU model (``--call-ms`` per call plus
``--image-ms`` per image, spent sleeping); ``--clients`` ``remote`` clients send ``--requests``
requests each. The same load runs against a fresh server with batching (``--max-batch-images``) and
without (0); printed per mode: correct replies, errors and retries by cause, scorer calls, the
server's peak memory and CPU seconds, wall time and throughput, then the throughput ratio, which is
the result. What each number is: docs/methods.md ("How bench/server.py loads the scorer server").
"""
from __future__ import annotations

import argparse
import collections
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import torch

from scorers.remote import RemoteScorer, RemoteScorerError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SimulatedModel:
    """``call_ms`` per call + ``image_ms`` per image of sleep; score = mean pixel value."""

    def __init__(self, call_ms: float, image_ms: float):
        self.call_s, self.image_s = call_ms / 1000.0, image_ms / 1000.0
        self.__name__ = f"simulated({call_ms:g} ms + {image_ms:g} ms/image)"

    def __call__(self, images, prompts, **metadata):
        time.sleep(self.call_s + self.image_s * len(images))
        return images.mean(dim=(1, 2, 3))


def serve(args) -> int:
    """The server subprocess: print the URL, serve until SIGINT, print the scorer's counters."""
    from scorers.server import ScorerServer  # in the server subprocess only

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    kw = {"max_inflight_pixels": args.max_inflight_pixels} if args.max_inflight_pixels else {}
    srv = ScorerServer(SimulatedModel(args.call_ms, args.image_ms), port=0, max_batch_images=args.max_batch_images, **kw)
    print(f"URL {srv.url}", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    print(f"COUNTERS {srv.scorer_calls} {srv.requests_served}", flush=True)
    return 0


def _proc_status(pid: int) -> dict:
    text = open(f"/proc/{pid}/status").read()
    return {k: int(re.search(k + r":\s+(\d+)", text).group(1)) / 1024 for k in ("VmRSS", "VmHWM")}  # MiB


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _RetryCounter(logging.Handler):
    """Counts the `remote` client's "retrying" warnings by cause."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def emit(self, record):
        msg = record.getMessage()
        m = re.search(r"HTTP (\d{3})", msg)
        self.counts[f"HTTP {m.group(1)}" if m else msg.split(": ", 1)[-1].split(";")[0][:60]] += 1


def run_mode(args, max_batch_images: int) -> dict:
    log_path = tempfile.mktemp(prefix="flowrl-bench-server-", suffix=".log")
    cmd = [sys.executable, os.path.abspath(__file__), "--serve", "--call-ms", str(args.call_ms), "--image-ms",
           str(args.image_ms), "--max-batch-images", str(max_batch_images)]
    if args.max_inflight_pixels:
        cmd += ["--max-inflight-pixels", str(args.max_inflight_pixels)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_file, text=True, env=env)
    try:
        line = proc.stdout.readline()
        if not line.startswith("URL "):
            proc.wait(10)
            raise RuntimeError(f"server did not start: {line!r}; its log ends: {open(log_path).read()[-500:]}")
        url = line.split()[1]
        RemoteScorer(url, retries=5, timeout=30).health()
        # a warm-up request, so the first call's one-time costs are not in the timing or the idle RSS
        warm = torch.rand(args.images, 3, args.size, args.size)
        RemoteScorer(url, retries=5, timeout=30)(warm, ["warm-up"] * args.images)
        idle = _proc_status(proc.pid)["VmRSS"]

        g = torch.Generator().manual_seed(0)
        inputs = [[torch.randint(0, 256, (args.images, 3, args.size, args.size), generator=g).float() / 255
                   for _ in range(args.requests)] for _ in range(args.clients)]
        prompts = [f"prompt {k}" for k in range(args.images)]
        served, images, errors = [0], [0], collections.Counter()
        lock = threading.Lock()
        barrier = threading.Barrier(args.clients + 1)
        retries = _RetryCounter()
        client_log = logging.getLogger("scorers.remote")
        client_log.addHandler(retries)
        client_log.propagate = False

        def client(i):
            remote = RemoteScorer(url, batch_size=args.images, retries=args.retries, backoff=0.2, timeout=300)
            barrier.wait()
            for x in inputs[i]:
                try:
                    got = remote(x, prompts)
                except RemoteScorerError as e:
                    with lock:
                        errors[f"HTTP {e.status}" if e.status else e.cause.split(" (")[0][:60]] += 1
                    continue
                ok = torch.allclose(got, x.mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-6)
                with lock:
                    if ok:
                        served[0] += 1
                        images[0] += len(x)
                    else:
                        errors["wrong scores"] += 1

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
        for t in threads:
            t.start()
        barrier.wait()
        t0, cpu0 = time.perf_counter(), _cpu_s(proc.pid)
        for t in threads:
            t.join()
        wall, cpu = time.perf_counter() - t0, _cpu_s(proc.pid) - cpu0
        client_log.removeHandler(retries)
        client_log.propagate = True
        peak = _proc_status(proc.pid)["VmHWM"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    counters = re.search(r"COUNTERS (\d+) (\d+)", out or "")
    log_text = open(log_path).read()
    os.unlink(log_path)
    return {
        "served": served[0], "images": images[0], "errors": errors, "retries": retries.counts, "wall": wall, "cpu": cpu,
        "peak": peak, "idle": idle, "calls": int(counters.group(1)) - 1 if counters else None,  # less the warm-up
        "tracebacks": log_text.count("Traceback"),
    }


def _kinds(counter) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(counter.items())) or "none"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=200, help="concurrent client threads")
    ap.add_argument("--requests", type=int, default=2, help="requests per client, one after the other")
    ap.add_argument("--images", type=int, default=4, help="images per request")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--call-ms", type=float, default=20.0, help="simulated fixed cost of one scorer call")
    ap.add_argument("--image-ms", type=float, default=1.0, help="simulated cost per image")
    ap.add_argument("--max-batch-images", type=int, default=64, help="the server's batch limit in the batching run")
    ap.add_argument("--max-inflight-pixels", type=int, default=None, help="the server's in-flight budget (default: its own)")
    ap.add_argument("--retries", type=int, default=8, help="client retries per request")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        return serve(args)

    print(f"simulated model: {args.call_ms:g} ms per call + {args.image_ms:g} ms per image (sleep); "
          f"{args.clients} clients x {args.requests} requests x {args.images} images of {args.size}x{args.size}")
    rows = [(f"batching (max {args.max_batch_images} images)", run_mode(args, args.max_batch_images)),
            ("no batching", run_mode(args, 0))]
    total = args.clients * args.requests
    print(f"{'mode':28s} {'served':>9s} {'calls':>6s} {'peak RSS MiB':>13s} {'idle RSS MiB':>13s} {'tracebacks':>10s} "
          f"{'server CPU s':>12s} {'wall s':>7s} {'images/s':>9s}")
    for name, r in rows:
        print(f"{name:28s} {r['served']:>4d}/{total:<4d} {r['calls'] if r['calls'] is not None else '?':>6} {r['peak']:13.0f} "
              f"{r['idle']:13.0f} {r['tracebacks']:10d} {r['cpu']:12.2f} {r['wall']:7.2f} {r['images'] / r['wall']:9.0f}")
    for name, r in rows:
        print(f"{name}: errors: {_kinds(r['errors'])}; retried attempts: {_kinds(r['retries'])}")
    (_, a), (_, b) = rows
    print(f"throughput ratio (batching / no batching): {(a['images'] / a['wall']) / (b['images'] / b['wall']):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
