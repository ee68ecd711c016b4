"""Atomic checkpoints with everything needed for a bit-exact resume.

Layout of one checkpoint folder ``<run>/checkpoints/step-00000010/``::

    weights.safetensors   trainable weights (LoRA or full)
    state.pt              optimizer + LR scheduler state and other tensors (read with weights_only=True)
    rng.json              every RNG state: Python, numpy, torch CPU (+ CUDA), named torch generators
    meta.json             step, wall clock, the JSON-able state of the loop
    COMPLETE              written last: the step and a manifest (size and SHA-256 of every file)

A folder is written under a temporary name and renamed into place, so a crash leaves either the
previous checkpoints or the new one; ``keep_last`` bounds how many stay. :func:`verify_checkpoint`
checks a folder against its manifest (raising :class:`CheckpointError`, one line);
:func:`latest_checkpoint` returns the newest that verifies; :func:`load_checkpoint` verifies first.
"""
from __future__ import annotations

import hashlib
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

from flowrl.inputs import UsageError

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step-(\d{8})$")
COMPLETE = "COMPLETE"
FILES = ("weights.safetensors", "state.pt", "rng.json", "meta.json")


class CheckpointError(UsageError):
    """A checkpoint folder that cannot be used (half-written, damaged, not a checkpoint): one line
    naming the folder and the problem."""


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
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
        with open(tmp / "state.pt", "wb") as f:
            torch.save(dict(tensor_state or {}), f)
            f.flush()
            os.fsync(f.fileno())
        _write_json(tmp / "rng.json", dict(rng or {}))
        _write_json(tmp / "meta.json", {"step": int(step), **dict(meta or {})})
        _write_json(tmp / COMPLETE, {"step": int(step), "files": {name: _file_entry(tmp / name) for name in FILES}})
        _fsync_dir(tmp)
    except BaseException:  # a full disk, a kill signal turned exception: leave no partial folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _file_entry(path: Path) -> Dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": _sha256(path)}


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path.parent}: {what} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path.parent}: {what} is unreadable ({type(e).__name__})") from None


def verify_checkpoint(path) -> Dict[str, Any]:
    """Check folder ``path`` against the manifest in its ``COMPLETE`` marker: every file present
    with its size and SHA-256, and the step of the folder name, the marker and ``meta.json``
    agreeing. Returns the marker; raises :class:`CheckpointError` on the first problem. (A marker
    without a manifest, from before manifests existed, is checked for the files and steps only.)"""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"checkpoint not found: {p}")
    if not (p / COMPLETE).is_file():
        raise CheckpointError(f"{p} is not a complete checkpoint (no {COMPLETE} marker: half-written, or not a checkpoint)")
    marker = _read_json(p / COMPLETE, f"its {COMPLETE} marker")
    if not isinstance(marker, dict) or not isinstance(marker.get("step"), int):
        raise CheckpointError(f"checkpoint {p}: its {COMPLETE} marker is garbled")
    m = _NAME.match(p.name)
    if m and int(m.group(1)) != marker["step"]:
        raise CheckpointError(f"checkpoint {p}: the folder name says step {int(m.group(1))}, its marker step {marker['step']}")
    files = marker.get("files")
    for name in FILES:
        f = p / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {p}: {name} is missing")
        if files is None:
            continue
        want = files.get(name) if isinstance(files, dict) else None
        if not isinstance(want, dict):
            raise CheckpointError(f"checkpoint {p}: {name} is not in its manifest")
        size = f.stat().st_size
        if size != want.get("size"):
            raise CheckpointError(f"checkpoint {p}: {name} has {size} bytes, its manifest says {want.get('size')} (truncated or replaced)")
        if _sha256(f) != want.get("sha256"):
            raise CheckpointError(f"checkpoint {p}: {name} does not match its manifest checksum (damaged)")
    meta = _read_json(p / "meta.json", "meta.json")
    if not isinstance(meta, dict) or meta.get("step") != marker["step"]:
        raise CheckpointError(f"checkpoint {p}: meta.json says step {meta.get('step') if isinstance(meta, dict) else '?'}, "
                              f"its marker step {marker['step']}")
    return marker


def latest_checkpoint(run_dir) -> Optional[Path]:
    """The newest checkpoint that verifies (:func:`verify_checkpoint`); each newer one that does not
    (half-written, truncated, damaged) is skipped with a warning naming it and why."""
    for p in reversed(list_checkpoints(run_dir, complete_only=False)):
        if not (p / COMPLETE).is_file():
            log.warning("ignoring half-written checkpoint %s (no %s marker)", p, COMPLETE)
            continue
        try:
            verify_checkpoint(p)
        except CheckpointError as e:
            log.warning("skipping a damaged checkpoint, falling back to the previous one: %s", e)
            continue
        return p
    return None


def load_checkpoint(path, map_location="cpu", verify: bool = True) -> Dict[str, Any]:
    """Verify and read a checkpoint folder: {'weights', 'tensor_state', 'rng', 'meta'}. Never
    unpickles code. Any problem is a :class:`CheckpointError` naming the folder. ``verify=False``
    skips the checksum pass for a folder the caller has just verified (resume)."""
    p = Path(path)
    if verify:
        verify_checkpoint(p)
    try:
        weights = load_file(str(p / "weights.safetensors"), device=str(map_location))
    except Exception as e:  # safetensors raises its own error types for a malformed file
        raise CheckpointError(f"checkpoint {p}: weights.safetensors is unreadable ({type(e).__name__}: {str(e)[:200]})") from None
    try:
        tensor_state = torch.load(p / "state.pt", map_location=map_location, weights_only=True)
    except Exception as e:  # a corrupt zip / pickle stream
        raise CheckpointError(f"checkpoint {p}: state.pt is unreadable ({type(e).__name__}: {str(e)[:200]})") from None
    rng = _read_json(p / "rng.json", "rng.json")
    meta = _read_json(p / "meta.json", "meta.json")
    if not isinstance(rng, dict) or not isinstance(tensor_state, dict):
        raise CheckpointError(f"checkpoint {p}: rng.json or state.pt does not hold a mapping")
    return {"weights": weights, "tensor_state": tensor_state, "rng": rng, "meta": meta}
