"""Shared checkpoint loading for the learned scorers: safe reads and strict, readable key checks.

* :func:`load_checkpoint_file` reads a ``.pt``/``.pth``/``.bin`` with ``torch.load(weights_only=True)``
  (never unpickling arbitrary objects) or a ``.safetensors`` file.
* :func:`check_state_dict` compares a state dict with a model's and raises :class:`CheckpointError`
  naming missing and unexpected keys (at most ``max_listed`` of each, then a count) and every shape
  mismatch (the key, the checkpoint's shape and the model's shape).
* :func:`load_state_dict_strict` = check, then ``module.load_state_dict(strict=True)``.
* :func:`raise_for_loading_info` applies the same rule to transformers' ``from_pretrained`` report.
* :func:`resolve_checkpoint_file` turns a local file/folder, a URL or a hub id into a local file.
"""
from __future__ import annotations

import logging
import os
import re
import urllib.parse
from typing import Any, Iterable, Mapping, MutableMapping, Optional, Tuple, Union

import torch
from safetensors.torch import load_file

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]


class CheckpointError(ValueError):
    """A checkpoint file does not fit the model it is loaded into (keys or shapes)."""


def _shape(v: Any) -> tuple:
    """A tensor's shape, or a shape given directly as a tuple / list / torch.Size."""
    if isinstance(v, (tuple, list, torch.Size)):
        return tuple(int(d) for d in v)
    return tuple(v.shape) if hasattr(v, "shape") else ()


def _list_keys(keys: Iterable[str], max_listed: int) -> str:
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:max_listed])
    more = len(keys) - max_listed
    return f"{shown} and {more} more" if more > 0 else shown


def load_checkpoint_file(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> MutableMapping[str, Any]:
    """Read a checkpoint file into a dict without executing pickled code.

    ``.safetensors`` → ``safetensors.torch.load_file``; anything else → ``torch.load(path,
    map_location=..., weights_only=True)``. Raises ``FileNotFoundError`` naming the path, and
    :class:`CheckpointError` if the file does not hold a dict (or cannot be read safely).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        obj: Any = load_file(path, device=str(map_location))
    else:
        try:
            obj = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # pickle.UnpicklingError for non-tensor objects, RuntimeError for bad zips
            raise CheckpointError(f"cannot read {path} with torch.load(weights_only=True): {e}") from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return dict(obj)


def unwrap_state_dict(obj: Mapping[str, Any], wrappers: Iterable[str] = ("state_dict", "model")) -> Mapping[str, Any]:
    """Return ``obj[w]`` for the first wrapper key ``w`` present whose value is a dict, else ``obj``.

    Training scripts often save ``{"state_dict": ..., "epoch": ...}`` (e.g. open_clip's
    training script); the released scorer files are either that or a bare state dict.
    """
    for w in wrappers:
        inner = obj.get(w)
        if isinstance(inner, Mapping):
            return inner
    return obj


def strip_prefix(state_dict: Mapping[str, Any], prefix: str) -> dict:
    """Drop ``prefix`` from every key that starts with it when *all* keys do (e.g. DDP's ``module.``)."""
    if prefix and state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix) :]: v for k, v in state_dict.items()}
    return dict(state_dict)


def format_key_problems(
    missing: Iterable[str] = (),
    unexpected: Iterable[str] = (),
    mismatched: Iterable[Tuple[str, Any, Any]] = (),
    max_listed: int = 5,
) -> str:
    """One readable line: missing and unexpected keys (``max_listed`` each, then "and N more") and
    shape mismatches as ``'key': checkpoint (a, b) vs model (c, d)``. Empty string when all is well."""
    missing, unexpected = set(missing), set(unexpected)
    mismatched = sorted((k, tuple(a), tuple(b)) for k, a, b in mismatched)
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_list_keys(missing, max_listed)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_list_keys(unexpected, max_listed)}")
    if mismatched:
        shown = "; ".join(f"{k!r}: checkpoint {a} vs model {b}" for k, a, b in mismatched[:max_listed])
        more = len(mismatched) - max_listed
        problems.append(f"shape mismatch ({len(mismatched)}): {shown}" + (f" and {more} more" if more > 0 else ""))
    return "; ".join(problems)


def check_state_dict(
    module_or_expected: Union[torch.nn.Module, Mapping[str, Any]],
    state_dict: Mapping[str, Any],
    what: str = "checkpoint",
    max_listed: int = 5,
) -> None:
    """Raise :class:`CheckpointError` unless ``state_dict`` has exactly the model's keys and shapes.

    ``module_or_expected`` is a module (its ``state_dict()``) or a mapping key → tensor/shape;
    ``state_dict`` maps keys to tensors (or shapes).
    The message lists missing and unexpected keys (``max_listed`` each, then "and N more") and
    each shape mismatch as ``'key': checkpoint (a, b) vs model (c, d)``.
    """
    if isinstance(module_or_expected, torch.nn.Module):
        expected = {k: _shape(v) for k, v in module_or_expected.state_dict().items()}
    else:
        expected = {k: _shape(v) for k, v in module_or_expected.items()}
    got = {k: _shape(v) for k, v in state_dict.items()}
    mismatched = [(k, got[k], expected[k]) for k in set(expected) & set(got) if expected[k] != got[k]]
    msg = format_key_problems(set(expected) - set(got), set(got) - set(expected), mismatched, max_listed)
    if msg:
        raise CheckpointError(f"{what} does not match the model: {msg}")


def raise_for_loading_info(info: Mapping[str, Any], what: str = "checkpoint", max_listed: int = 5) -> None:
    """Raise :class:`CheckpointError` from transformers' ``from_pretrained(..., output_loading_info=True)``
    report (``missing_keys``, ``unexpected_keys``, ``mismatched_keys`` as (key, ckpt shape, model shape),
    ``error_msgs``) in the same format as :func:`check_state_dict`."""
    msg = format_key_problems(
        info.get("missing_keys", ()), info.get("unexpected_keys", ()), info.get("mismatched_keys", ()), max_listed
    )
    errors = [str(e) for e in info.get("error_msgs", ()) or ()]
    if errors:
        msg = "; ".join([m for m in (msg, "errors: " + " | ".join(errors[:max_listed])) if m])
    if msg:
        raise CheckpointError(f"{what} does not match the model: {msg}")


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*([/:].+)?$")


def default_cache_dir() -> str:
    """Where downloaded URL checkpoints go: ``$FLOWRL_CACHE`` or ``~/.cache/flowrl/checkpoints``."""
    return os.environ.get("FLOWRL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "flowrl", "checkpoints")


def resolve_checkpoint_file(checkpoint: PathLike, filename: Optional[str] = None, what: str = "checkpoint") -> str:
    """Turn a user's ``checkpoint`` into a local file path.

    Accepted forms: a local file; a local folder holding ``filename``; an ``http(s)://`` URL
    (downloaded once into :func:`default_cache_dir`); a Hugging Face Hub id ``owner/name`` (the file
    ``filename``), ``owner/name/path/in/repo`` or ``owner/name:path/in/repo`` (downloaded with
    ``huggingface_hub.hf_hub_download``, which honours ``HF_HUB_OFFLINE`` and the HF cache).
    Errors name the argument and what was tried.
    """
    if checkpoint is None:
        raise ValueError(f"{what}: checkpoint is None; pass a file, a folder, a URL or a hub id")
    spec = os.fspath(checkpoint)
    if os.path.isfile(spec):
        return spec
    if os.path.isdir(spec):
        if not filename:
            raise ValueError(f"{what}: checkpoint {spec!r} is a folder; pass the file itself")
        path = os.path.join(spec, filename)
        if not os.path.isfile(path):
            listing = ", ".join(sorted(os.listdir(spec))[:10]) or "nothing"
            raise FileNotFoundError(f"{what}: {filename!r} not found in folder {spec!r} (it holds: {listing})")
        return path
    if spec.startswith(("http://", "https://")):
        name = urllib.parse.unquote(os.path.basename(urllib.parse.urlparse(spec).path)) or (filename or "checkpoint")
        cache = default_cache_dir()
        path = os.path.join(cache, name)
        if not os.path.isfile(path):
            if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("FLOWRL_OFFLINE") == "1":
                raise FileNotFoundError(f"{what}: {spec} is not cached at {path} and downloads are disabled (offline)")
            os.makedirs(cache, exist_ok=True)
            logger.info("%s: downloading %s to %s", what, spec, path)
            try:
                torch.hub.download_url_to_file(spec, path, progress=False)
            except Exception as e:
                raise OSError(f"{what}: cannot download {spec}: {e}") from e
        return path
    m = _HUB_ID.match(spec)
    if m and not spec.startswith((".", "/", "~")):
        owner, rest = spec.split("/", 1)
        if ":" in rest:
            name, _, file_in_repo = rest.partition(":")
        elif "/" in rest:
            name, _, file_in_repo = rest.partition("/")
        else:
            name, file_in_repo = rest, filename
        if not file_in_repo:
            raise ValueError(f"{what}: hub id {spec!r} needs a file name (use 'owner/name:file')")
        from huggingface_hub import hf_hub_download  # heavy: only to download a hub checkpoint

        try:
            return hf_hub_download(repo_id=f"{owner}/{name}", filename=file_in_repo)
        except Exception as e:
            raise OSError(
                f"{what}: cannot get {file_in_repo!r} from the Hugging Face Hub repo {owner}/{name} "
                f"({type(e).__name__}: {e}); pass a local path as checkpoint="
            ) from e
    raise FileNotFoundError(f"{what}: checkpoint {spec!r} is not a file, a folder, a URL or a hub id 'owner/name'")


def load_state_dict_strict(module: torch.nn.Module, state_dict: Mapping[str, Any], what: str = "checkpoint") -> torch.nn.Module:
    """:func:`check_state_dict`, then ``module.load_state_dict(state_dict, strict=True)``; returns ``module``."""
    check_state_dict(module, state_dict, what)
    module.load_state_dict(dict(state_dict), strict=True)
    logger.info("%s: loaded %d tensors", what, len(state_dict))
    return module
