"""Atomic checkpoints with everything needed for a bit-exact resume.

Layout of one checkpoint folder ``<run>/checkpoints/step-00000010/``::

    weights.safetensors   trainable weights (LoRA or full), as safetensors
    state.pt              optimizer + LR scheduler state dicts and other tensor state (torch.save; read
                          back with ``torch.load(weights_only=True)`` only, so no pickle code runs)
    rng.json              every RNG state: Python, numpy, torch CPU (+ CUDA), named torch generators
    meta.json             step, wall clock, the JSON-able state of the loop (stat tracker, counters)
    COMPLETE              written last: a folder without it is half-written and ignored on resume

The folder is written under a temporary name in the same directory and renamed into place, so a
crash at any moment leaves either the previous checkpoints or the new one, never a torn one. The
previous checkpoint is kept until the new one is complete; ``keep_last`` bounds how many stay.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step-(\d{8})$")
COMPLETE = "COMPLETE"


# ------------------------------------------------------------------------------------------- RNG

def capture_rng(generators: Optional[Mapping[str, torch.Generator]] = None) -> Dict[str, Any]:
    """JSON-able snapshot of the Python, numpy and torch (CPU, CUDA) RNGs and of named generators."""
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    out: Dict[str, Any] = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
        "generators": {k: g.get_state().tolist() for k, g in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        out["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return out


def restore_rng(state: Mapping[str, Any], generators: Optional[Mapping[str, torch.Generator]] = None) -> None:
    """Inverse of :func:`capture_rng` (generators are restored in place, by name)."""
    v, s, g = state["python"]
    random.setstate((v, tuple(s), g))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
    for k, gen in (generators or {}).items():
        if k not in state.get("generators", {}):
            raise KeyError(f"checkpoint has no state for generator {k!r}")
        gen.set_state(torch.tensor(state["generators"][k], dtype=torch.uint8))


# ----------------------------------------------------------------------------------- save / load

def checkpoint_dir(run_dir, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(
    run_dir,
    step: int,
    *,
    weights: Mapping[str, torch.Tensor],
    tensor_state: Optional[Mapping[str, Any]] = None,
    meta: Optional[Mapping[str, Any]] = None,
    rng: Optional[Mapping[str, Any]] = None,
    keep_last: Optional[int] = 2,
) -> Path:
    """Write checkpoint ``step`` atomically and prune older ones down to ``keep_last`` (None: keep all).

    ``weights``: flat name -> tensor (saved as safetensors). ``tensor_state``: optimizer/scheduler
    state dicts and other nested containers of tensors and numbers. ``meta``: JSON-able loop state.
    ``rng``: :func:`capture_rng` output."""
    final = checkpoint_dir(run_dir, step)
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
    with open(tmp / "state.pt", "wb") as f:
        torch.save(dict(tensor_state or {}), f)
        f.flush()
        os.fsync(f.fileno())
    _write_json(tmp / "rng.json", dict(rng or {}))
    _write_json(tmp / "meta.json", {"step": int(step), **dict(meta or {})})
    _write_json(tmp / COMPLETE, {"step": int(step)})
    _fsync_dir(tmp)
    if final.exists():  # a re-save of the same step (e.g. after resume): replace it atomically enough
        old = parent / f".old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(parent)
    if keep_last is not None:
        prune_checkpoints(run_dir, keep_last)
    return final


def list_checkpoints(run_dir, complete_only: bool = True):
    """Checkpoint folders of a run, oldest first."""
    parent = Path(run_dir) / "checkpoints"
    if not parent.is_dir():
        return []
    out = []
    for p in parent.iterdir():
        m = _NAME.match(p.name)
        if not m or not p.is_dir():
            continue
        if complete_only and not (p / COMPLETE).is_file():
            continue
        out.append((int(m.group(1)), p))
    return [p for _, p in sorted(out)]


def prune_checkpoints(run_dir, keep_last: int) -> None:
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    done = list_checkpoints(run_dir)
    for p in done[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)
    # leftovers of crashed writes
    parent = Path(run_dir) / "checkpoints"
    for p in parent.glob(".tmp-step-*"):
        shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(run_dir) -> Optional[Path]:
    """The newest complete checkpoint; half-written ones are skipped with a warning."""
    for p in reversed(list_checkpoints(run_dir, complete_only=False)):
        if (p / COMPLETE).is_file():
            return p
        log.warning("ignoring half-written checkpoint %s (no %s marker)", p, COMPLETE)
    return None


def load_checkpoint(path, map_location="cpu") -> Dict[str, Any]:
    """Read a checkpoint folder: {'weights', 'tensor_state', 'rng', 'meta'}. Never unpickles code."""
    p = Path(path)
    if not (p / COMPLETE).is_file():
        raise FileNotFoundError(f"{p} is not a complete checkpoint (no {COMPLETE} marker)")
    return {
        "weights": load_file(str(p / "weights.safetensors"), device=str(map_location)),
        "tensor_state": torch.load(p / "state.pt", map_location=map_location, weights_only=True),
        "rng": json.loads((p / "rng.json").read_text(encoding="utf-8")),
        "meta": json.loads((p / "meta.json").read_text(encoding="utf-8")),
    }
