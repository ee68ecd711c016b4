"""One adapter per model family over its diffusers pipeline, behind the :class:`flowrl.flow.policy.FlowPolicy`
interface.

``FAMILIES`` maps a ``model.family`` name to the module and class of its policy. A family module
imports diffusers only inside its methods, so reading the registry is cheap. To add a family: write
``flowrl/flow/models/<family>.py`` with a ``FlowPolicy`` subclass (``family``, ``pipeline_class_name``,
``_encode_batch``, ``latent_shape``, ``image_seq_len``, ``initial_noise``, ``velocity``, ``decode``), add
it here, its LoRA defaults to :data:`flowrl.train.lora.DEFAULTS` and its tiny builder to
:data:`flowrl.demo.TINY_BUILDERS`.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Dict

if TYPE_CHECKING:  # pragma: no cover
    from flowrl.flow.policy import FlowPolicy

FAMILIES: Dict[str, str] = {
    "sd3": "flowrl.flow.models.sd3:SD3Policy",
    "flux": "flowrl.flow.models.flux:FluxPolicy",
    "z_image": "flowrl.flow.models.z_image:ZImagePolicy",
    "qwen_image": "flowrl.flow.models.qwen_image:QwenImagePolicy",
    "flux2": "flowrl.flow.models.flux2:Flux2Policy",
    "flux2_klein": "flowrl.flow.models.flux2:Flux2KleinPolicy",
    "wan": "flowrl.flow.models.wan:WanPolicy",
    "flux_kontext": "flowrl.flow.models.flux_kontext:FluxKontextPolicy",
    "qwen_image_edit": "flowrl.flow.models.qwen_image_edit:QwenImageEditPolicy",
}


def policy_class(family: str) -> "type[FlowPolicy]":
    """The policy class of ``family`` (a key of :data:`FAMILIES`)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown image model family {family!r}; known: {sorted(FAMILIES)}")
    module, name = FAMILIES[family].split(":")
    return getattr(importlib.import_module(module), name)


def policy_classes() -> "Dict[str, type[FlowPolicy]]":
    """Every registered family's policy class, by family name."""
    return {f: policy_class(f) for f in FAMILIES}
