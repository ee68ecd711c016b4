"""The KL reference of an adapter-tuned model: the same model with its adapters disabled.

No second copy of the weights (Flow-GRPO and TRL do the same for LoRA runs). Duck-typed, no
peft import: a peft ``PeftModel`` has the ``disable_adapter()`` context manager; a diffusers or
transformers model with adapters added through their PEFT integration has
``disable_adapters()``/``enable_adapters()``. A data-parallel wrapper (``.module``) is unwrapped.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

__all__ = ["adapters_disabled", "has_adapters", "reference_policy", "unwrap"]


def unwrap(module: Any) -> Any:
    """The model inside a DistributedDataParallel-like wrapper (``.module``), else the module."""
    inner = getattr(module, "module", None)
    return inner if isinstance(inner, torch.nn.Module) else module


def has_adapters(module: Any) -> bool:
    """Whether ``module`` carries a peft adapter (a ``PeftModel`` or a diffusers/transformers PEFT integration)."""
    return bool(getattr(unwrap(module), "peft_config", None))


@contextlib.contextmanager
def adapters_disabled(module: Any) -> Iterator[None]:
    """Run ``module`` as its base model inside the block; the adapters are back on after it.

    ``disable_adapter()`` is preferred when present: a ``PeftModel`` also answers
    ``disable_adapters`` (forwarded to the model it wraps, which has no integration adapters)."""
    m = unwrap(module)
    if callable(getattr(m, "disable_adapter", None)):
        with m.disable_adapter():
            yield
        return
    m.disable_adapters()
    try:
        yield
    finally:
        m.enable_adapters()


@contextlib.contextmanager
def reference_policy(policy: Any, ref_transformer: Any = None) -> Iterator[None]:
    """``policy`` as the KL reference inside the block: ``ref_transformer`` (a frozen copy, full
    fine-tuning) swapped in as ``policy.transformer``, else its adapters disabled."""
    if ref_transformer is not None:
        current = policy.transformer
        policy.transformer = ref_transformer
        try:
            yield
        finally:
            policy.transformer = current
        return
    transformer = getattr(policy, "transformer", None)
    if transformer is None or not has_adapters(transformer):
        raise ValueError("ref_transformer: the KL term needs a LoRA adapter on policy.transformer or a "
                         "ref_transformer")
    with adapters_disabled(transformer):
        yield
