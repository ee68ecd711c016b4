"""Build the policy a run config names, and put saved weights into it.

A "checkpoint" argument may be either of:

* a flowrl checkpoint folder (``checkpoints/step-N``, see :mod:`flowrl.train.checkpoint`): its
  ``meta.json`` records the LoRA config (or full fine-tuning) and ``weights.safetensors`` holds
  the trainable weights, EMA weights when the run kept an EMA;
* a result folder as diffusers writes LoRAs (``pytorch_lora_weights.safetensors``), loaded with
  the pipeline's own ``load_lora_weights``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from flowrl.inputs import UsageError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_flow_policy(model_cfg, device: Optional[str] = None):
    """A :class:`flowrl.flow.policy.FlowPolicy` from ``ModelConfig`` (hub id or local folder)."""
    from flowrl.flow.policy import FlowPolicy, FluxPolicy, SD3Policy

    if not model_cfg.path:
        raise UsageError("model.path is empty: give a hub id or a local model folder")
    p = Path(model_cfg.path).expanduser()
    looks_like_hub_id = model_cfg.path.count("/") == 1 and not model_cfg.path.startswith((".", "/", "~"))
    if not p.is_dir() and not looks_like_hub_id:
        raise UsageError(f"model.path not found: {model_cfg.path}")
    cls = {"sd3": SD3Policy, "flux": FluxPolicy}.get(model_cfg.family, FlowPolicy)
    kwargs = dict(
        torch_dtype=DTYPES[model_cfg.dtype],
        frozen_dtype=DTYPES[model_cfg.frozen_dtype] if model_cfg.frozen_dtype else None,
        device=device or model_cfg.device,
    )
    if getattr(model_cfg, "max_sequence_length", None) is not None:
        kwargs["max_sequence_length"] = int(model_cfg.max_sequence_length)
    try:
        policy = cls.from_pretrained(model_cfg.path, **kwargs)
    except (FileNotFoundError, OSError, ValueError) as e:
        where = "local folder" if p.is_dir() else "hub id (no local folder of that name)"
        raise UsageError(f"cannot load model.path {model_cfg.path!r} as a {where}: {str(e).splitlines()[0]}") from None
    if getattr(model_cfg, "shift", None) is not None:
        set_fixed_shift(policy, model_cfg.shift)
    return policy


def set_fixed_shift(policy, shift: float) -> None:
    """Replace the pipeline's scheduler by the same scheduler with a fixed time shift (no
    resolution-dependent shifting), as the DanceGRPO/MixGRPO/G2RPO Flux scripts use shift 3."""
    if not shift > 0:
        raise UsageError(f"model.shift must be > 0, got {shift}")
    sched = policy.pipeline.scheduler
    policy.pipeline.scheduler = type(sched).from_config(sched.config, shift=float(shift), use_dynamic_shifting=False)


def apply_checkpoint(policy, checkpoint) -> str:
    """Load ``checkpoint`` (see module doc) into ``policy``'s transformer; returns what was loaded."""
    from flowrl.train.checkpoint import COMPLETE, load_checkpoint
    from flowrl.train.lora import add_lora_to_transformer, load_trainable_state_dict

    path = Path(checkpoint)
    if not path.is_dir():
        raise UsageError(f"checkpoint not found: {path}")
    if (path / COMPLETE).is_file():
        ck = load_checkpoint(path)
        lora = ck["meta"].get("lora")
        if lora:
            from peft import LoraConfig

            if not getattr(policy.transformer, "peft_config", None):
                add_lora_to_transformer(policy.transformer, LoraConfig(**lora))
        else:
            policy.transformer.requires_grad_(True)
        load_trainable_state_dict(policy.transformer, ck["weights"])
        policy.transformer.requires_grad_(False)
        return f"flowrl checkpoint {path.name} ({'LoRA' if lora else 'full weights'})"
    if (path / "pytorch_lora_weights.safetensors").is_file():
        policy.pipeline.load_lora_weights(str(path))
        return f"diffusers LoRA {path}"
    raise UsageError(f"{path} is neither a flowrl checkpoint (no COMPLETE marker) nor a diffusers LoRA folder")


def lora_meta(transformer) -> Optional[dict]:
    """JSON-able LoRA config of the transformer's default adapter (None for full fine-tuning)."""
    cfg = getattr(transformer, "peft_config", {}).get("default") if hasattr(transformer, "peft_config") else None
    if cfg is None:
        return None
    d = cfg.to_dict()
    out = {}
    for k in ("r", "lora_alpha", "target_modules", "lora_dropout", "init_lora_weights", "bias", "use_rslora", "use_dora"):
        v = d.get(k)
        out[k] = sorted(v) if isinstance(v, (set, frozenset)) else v
    return json.loads(json.dumps(out, default=list))
