"""Name -> factory registry for reward scorers.

Every scorer follows one call convention::

    scorer(images, prompts, **metadata) -> torch.Tensor  # shape [B], float32, on CPU

``images`` is a float tensor [B, 3, H, W] in [0, 1] (what a flow policy decodes) or a list of
PIL images; ``prompts`` is a list of B strings. A factory is any callable that accepts the keyword
arguments ``device``, ``dtype`` and ``checkpoint`` (all optional) plus its own options, and returns
such a scorer.

Built-in scorers register themselves with :func:`register`; users add their own the same way, or
name a factory by its dotted Python path (``"mypkg.rewards:make_scorer"`` or
``"mypkg.rewards.make_scorer"``) wherever a scorer name is accepted.
"""
from __future__ import annotations

import difflib
import importlib
from typing import Callable, Dict, List

_REGISTRY: Dict[str, Callable] = {}

# Modules that register the built-in scorers when imported. They are imported lazily, on the first
# look-up, so that `import scorers` stays cheap and a missing optional dependency of one scorer does
# not break the others.
_BUILTIN_MODULES = (
    "scorers.jpeg",
    "scorers.clip",
    "scorers.pickscore",
    "scorers.hps",
    "scorers.aesthetic",
    "scorers.imagereward",
    "scorers.shapes",
    "scorers.shapes_edit",
    "scorers.remote",
    "scorers.judge",
    "scorers.video",
)
_builtins_loaded = False


class UnknownScorerError(KeyError):
    """Raised for a scorer name that is neither registered nor an importable dotted path."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def register(name: str) -> Callable[[Callable], Callable]:
    """Decorator: register ``factory`` under ``name`` (a later registration of a name replaces it)."""

    def deco(factory: Callable) -> Callable:
        _REGISTRY[name] = factory
        return factory

    return deco


def _load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    for mod in _BUILTIN_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:  # a built-in module not written yet, or an optional dep
            if e.name != mod:
                raise


def available() -> List[str]:
    """Sorted names of every registered scorer."""
    _load_builtins()
    return sorted(_REGISTRY)


def _from_dotted_path(path: str) -> Callable:
    mod_name, sep, attr = path.partition(":")
    if not sep:
        mod_name, _, attr = path.rpartition(".")
    if not mod_name or not attr:
        raise ImportError(path)
    obj = importlib.import_module(mod_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{path} is not callable")
    return obj


def get_factory(name: str) -> Callable:
    """The factory registered as ``name``, or the callable at dotted path ``name``."""
    _load_builtins()
    if name in _REGISTRY:
        return _REGISTRY[name]
    if "." in name or ":" in name:
        try:
            return _from_dotted_path(name)
        except (ImportError, AttributeError, TypeError) as e:
            raise UnknownScorerError(f"scorer {name!r}: cannot import it as a dotted path ({e})") from None
    close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise UnknownScorerError(f"unknown scorer {name!r}{hint} (available: {', '.join(sorted(_REGISTRY))})")


def get(name: str, **kwargs):
    """Build the scorer ``name`` (registered name or dotted path) with ``kwargs``
    (``device=``, ``dtype=``, ``checkpoint=`` and the scorer's own options)."""
    return get_factory(name)(**kwargs)
