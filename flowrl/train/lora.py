"""LoRA through peft, saved so that diffusers and transformers/peft load it as-is.

Defaults per model family follow the anchors' recipes (Flow-GRPO's SD3 and FLUX training scripts;
TRL's usual attention projections for causal LMs; docs/methods.md, "LoRA defaults"):

* SD3: r=32, alpha=64 on the joint-attention projections.
* Flux: r=64, alpha=128 on the attention projections plus the feed-forward layers.
* FLUX.2 (dev, klein): r=64, alpha=128 on Flow-Factory's default modules (see FLUX2_TARGETS).
* LM: r=16, alpha=32 on q/k/v/o.
* Z-Image: r=64, alpha=128 on the attention projections and the SwiGLU feed-forward (Flow-Factory's recipe).
* Qwen-Image: r=64, alpha=128 on the attention projections of both streams plus both streams' MLPs
  (Flow-GRPO's Qwen-Image training script).
* Wan: r=64, alpha=128 on self- and cross-attention plus the feed-forward layers (Flow-Factory's Wan recipes).

Saving an image LoRA goes through the pipeline class's own ``save_lora_weights`` with the adapter's
metadata (``transformer_lora_adapter_metadata``), so ``pipe.load_lora_weights(dir)`` rebuilds the
same ``LoraConfig``: without that metadata diffusers assumes alpha = rank and silently rescales a
LoRA trained with alpha != rank.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from flowrl.inputs import UsageError, writable_dir

SD3_TARGETS = [
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
]
FLUX_TARGETS = SD3_TARGETS + ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
LM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
# Z-Image: X-GenGroup/Flow-Factory a0b2bc5, src/flow_factory/models/z_image/z_image.py (default_target_modules) with
# r 64 / alpha 128 of its examples/{grpo,nft}/lora/z_image/default.yaml; the suffixes match every
# ZImageTransformerBlock (main layers, noise and context refiners).
Z_IMAGE_TARGETS = [
    "attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
    "feed_forward.w1", "feed_forward.w2", "feed_forward.w3",
]
# Qwen-Image: flow_grpo's scripts/train_qwenimage.py (r=64, alpha=128): both streams' attention projections
# and both streams' MLPs (GELU input projection and output linear).
QWEN_IMAGE_TARGETS = SD3_TARGETS + ["img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"]
# FLUX.2 (dev and klein): Flow-Factory's default_target_modules (X-GenGroup/Flow-Factory a0b2bc5,
# src/flow_factory/models/flux/flux2.py and flux2_klein.py, the same list; r64 / alpha 128 in its
# examples/grpo/lora/flux2*/): the double blocks' attention and SwiGLU feed-forward projections and the single
# blocks' fused QKV+MLP input projection. Its list names "attn.to_out.0" twice and no "attn.to_out", so the single
# blocks' output projection (a plain Linear named attn.to_out) is not adapted; kept as published.
FLUX2_TARGETS = SD3_TARGETS + ["ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out",
                               "attn.to_qkv_mlp_proj"]
# Wan (WanTransformer3DModel): self-attention (attn1), cross-attention (attn2) and the feed-forward layers, as
# Flow-Factory's Wan models (src/flow_factory/models/wan/wan2_t2v.py, default_target_modules; commit a0b2bc5).
WAN_TARGETS = [
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "ffn.net.0.proj", "ffn.net.2",
]
# FLUX.1 Kontext: Flow-Factory's default_target_modules of its Kontext adapter (X-GenGroup/Flow-Factory
# src/flow_factory/models/flux/flux1_kontext.py @ a0b2bc5) with r=64, alpha=128 of its
# examples/grpo/lora/flux1_kontext/default.yaml: the same modules as FLUX.1's.
FLUX_KONTEXT_TARGETS = list(FLUX_TARGETS)
# Qwen-Image-Edit: flow_grpo's scripts/train_qwenimage_edit.py (yifan123/flow_grpo 9745241, read from the
# zhtmike/flow_grpo mirror; r=64, alpha=128, Gaussian init): the same 12 modules as Qwen-Image's.
QWEN_IMAGE_EDIT_TARGETS = list(QWEN_IMAGE_TARGETS)

DEFAULTS = {
    "sd3": {"rank": 32, "alpha": 64, "targets": SD3_TARGETS},
    "flux": {"rank": 64, "alpha": 128, "targets": FLUX_TARGETS},
    "flux2": {"rank": 64, "alpha": 128, "targets": FLUX2_TARGETS},
    "flux2_klein": {"rank": 64, "alpha": 128, "targets": FLUX2_TARGETS},
    "flux_kontext": {"rank": 64, "alpha": 128, "targets": FLUX_KONTEXT_TARGETS},
    "lm": {"rank": 16, "alpha": 32, "targets": LM_TARGETS},
    "z_image": {"rank": 64, "alpha": 128, "targets": Z_IMAGE_TARGETS},
    "qwen_image": {"rank": 64, "alpha": 128, "targets": QWEN_IMAGE_TARGETS},
    "qwen_image_edit": {"rank": 64, "alpha": 128, "targets": QWEN_IMAGE_EDIT_TARGETS},
    "wan": {"rank": 64, "alpha": 128, "targets": WAN_TARGETS},  # Flow-Factory examples/grpo/lora/wan21/t2v.yaml
}


def lora_config(family: str, rank: Optional[int] = None, alpha: Optional[float] = None,
                targets: Optional[Sequence[str]] = None, init: str = "gaussian", dropout: float = 0.0):
    """A peft ``LoraConfig`` with the family's defaults for whatever is left as None."""
    from peft import LoraConfig  # heavy: peft (imports transformers), only for LoRA runs

    if family not in DEFAULTS:
        raise ValueError(f"family: unknown model family {family!r} (expected one of {sorted(DEFAULTS)})")
    d = DEFAULTS[family]
    kwargs = dict(
        r=int(rank if rank is not None else d["rank"]),
        lora_alpha=float(alpha if alpha is not None else d["alpha"]),
        target_modules=list(targets if targets else d["targets"]),
        lora_dropout=float(dropout),
        init_lora_weights=True if init == "default" else init,
    )
    if family == "lm":
        kwargs["task_type"] = "CAUSAL_LM"
    return LoraConfig(**kwargs)


def add_lora_to_transformer(transformer: torch.nn.Module, config, adapter_name: str = "default") -> None:
    """Attach a LoRA adapter to a diffusers transformer in place (diffusers' PEFT integration) and
    freeze everything else."""
    transformer.requires_grad_(False)
    transformer.add_adapter(config, adapter_name=adapter_name)
    # add_adapter makes the LoRA parameters trainable; make sure nothing else is.
    for name, p in transformer.named_parameters():
        p.requires_grad_("lora_" in name)


def trainable_state_dict(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Name -> tensor of every parameter that requires grad (LoRA or full fine-tuning), whole: FSDP2's sharded
    parameters are gathered, so every process must call it."""
    from flowrl.train.processes import full_tensor

    return {n: full_tensor(p.detach()) for n, p in module.named_parameters() if p.requires_grad}


class WeightsMismatchError(UsageError):
    """Saved weights that do not fit the model they are loaded into (trained on another
    architecture or other sizes): one line naming both and the first difference."""


def _shape(x) -> Tuple[int, ...]:
    return tuple(int(d) for d in (x.shape if hasattr(x, "shape") else x))


def check_weights_fit(expected: Mapping[str, Any], saved: Mapping[str, Any], source: str = "checkpoint",
                      target: str = "the model") -> None:
    """Raise :class:`WeightsMismatchError` unless ``saved`` has exactly the names of ``expected``
    with the same shapes (values: tensors or shapes)."""
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    where = f"{source} does not fit {target}"
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of {len(expected)} weights missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} of its {len(saved)} weights not in the model (e.g. {unexpected[0]})")
        raise WeightsMismatchError(f"{where}: {'; '.join(parts)}")
    wrong = [n for n in sorted(expected) if _shape(expected[n]) != _shape(saved[n])]
    if wrong:
        n = wrong[0]
        raise WeightsMismatchError(f"{where}: shape mismatch at {n}: saved {_shape(saved[n])}, model {_shape(expected[n])} "
                                   f"({len(wrong)} of {len(expected)} weights differ in shape)")


def load_trainable_state_dict(module: torch.nn.Module, state: Dict[str, torch.Tensor], *, source: str = "checkpoint",
                              target: str = "the model") -> None:
    """Copy saved trainable weights back in place; every key must match a trainable parameter with
    its shape, else :class:`WeightsMismatchError` (a UsageError) naming ``source`` and ``target``
    and nothing is copied."""
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    check_weights_fit(params, state, source, target)
    with torch.no_grad():
        for n, p in params.items():
            value = state[n].to(p.device, p.dtype)
            if hasattr(p, "placements"):  # an FSDP2 shard: this process's part of the whole tensor
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value, p.device_mesh, p.placements)
            p.copy_(value)


def save_diffusers_lora(pipeline_cls, transformer: torch.nn.Module, out_dir, adapter_name: str = "default") -> Path:
    """Write ``pytorch_lora_weights.safetensors`` that ``pipe.load_lora_weights(out_dir)`` loads,
    with the adapter's LoraConfig (alpha included) in the file's metadata."""
    from peft.utils import get_peft_model_state_dict  # heavy: peft (see above)

    out = writable_dir(out_dir, "LoRA folder")
    state = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    config = transformer.peft_config[adapter_name]
    meta = config.to_dict()
    meta["target_modules"] = sorted(meta["target_modules"]) if meta.get("target_modules") else meta.get("target_modules")
    pipeline_cls.save_lora_weights(
        out, transformer_lora_layers=state, transformer_lora_adapter_metadata=meta, safe_serialization=True,
    )
    return out


def lora_targets_present(module: torch.nn.Module, targets: Sequence[str]) -> List[str]:
    """The target suffixes that match at least one module (to report targets that match nothing)."""
    names = [n for n, _ in module.named_modules()]
    return [t for t in targets if any(n == t or n.endswith("." + t) for n in names)]
