"""Build the policy a run config names (a flow model, or a causal LM with :func:`load_lm`), and put
saved weights into it.

A "checkpoint" argument may be either of:

* a flowrl checkpoint folder (``checkpoints/step-N``, see :mod:`flowrl.train.checkpoint`): its
  ``meta.json`` records the LoRA config (or full fine-tuning) and ``weights.safetensors`` holds
  the trainable weights, EMA weights when the run kept an EMA;
* a result folder as diffusers writes LoRAs (``pytorch_lora_weights.safetensors``), loaded with
  the pipeline's own ``load_lora_weights``.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from safetensors import safe_open

from flowrl.flow.models import FAMILIES, policy_class
from flowrl.flow.policy import FlowPolicy
from flowrl.inputs import UsageError, torch_dtype
from flowrl.train.checkpoint import COMPLETE, CheckpointError, load_checkpoint, verify_checkpoint
from flowrl.train.lora import WeightsMismatchError, add_lora_to_transformer, check_weights_fit, load_trainable_state_dict

logger = logging.getLogger(__name__)



def build_flow_policy(model_cfg, device: Optional[str] = None):
    """A :class:`flowrl.flow.policy.FlowPolicy` from ``ModelConfig`` (hub id or local folder)."""
    if not model_cfg.path:
        raise UsageError("model.path is empty: give a hub id or a local model folder")
    p = Path(model_cfg.path).expanduser()
    looks_like_hub_id = model_cfg.path.count("/") == 1 and not model_cfg.path.startswith((".", "/", "~"))
    if not p.is_dir() and not looks_like_hub_id:
        raise UsageError(f"model.path not found: {model_cfg.path}")
    cls = policy_class(model_cfg.family) if model_cfg.family in FAMILIES else FlowPolicy
    kwargs = dict(
        torch_dtype=torch_dtype(model_cfg.dtype),
        frozen_dtype=torch_dtype(model_cfg.frozen_dtype) if model_cfg.frozen_dtype else None,
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
    cfg_scale = getattr(model_cfg, "true_cfg_scale", None)
    if cfg_scale is not None:
        if not hasattr(policy, "true_cfg_scale"):
            raise UsageError(f"model.true_cfg_scale: model family {model_cfg.family!r} has no true CFG "
                             "(sample.guidance_scale is its guidance)")
        policy.true_cfg_scale = float(cfg_scale)
    if getattr(model_cfg, "batched_cfg", False):
        if not hasattr(policy, "batched_cfg"):
            raise UsageError(f"model.batched_cfg: model family {model_cfg.family!r} has no two-branch CFG to batch "
                             "(sd3 batches its CFG always; flux is guidance-distilled)")
        policy.batched_cfg = True
    if getattr(model_cfg, "offload_text_encoders", False):
        policy.offload_text_encoders("cpu")
    size = getattr(model_cfg, "condition_image_size", None)
    if size is not None:
        if not hasattr(policy, "condition_image_size"):
            raise UsageError(f"model.condition_image_size: model family {model_cfg.family!r} takes no source image")
        policy.condition_image_size = int(size) or None  # 0: the image's own size
    return policy


def apply_video_settings(policy, video_cfg) -> None:
    """``video.num_frames`` / ``guidance_scale_2`` / ``expert`` onto a video policy (Wan); an image policy
    must leave them at their defaults (UsageError naming the key)."""
    if video_cfg is None:
        return
    if not getattr(policy, "is_video", False):
        given = [k for k, d in (("num_frames", None), ("guidance_scale_2", None), ("expert", "transformer"))
                 if getattr(video_cfg, k) != d]
        if given:
            raise UsageError(f"video.{given[0]}: only video model families (wan) take it")
        return
    try:
        if video_cfg.expert != getattr(policy, "expert", "transformer"):
            policy.set_expert(video_cfg.expert)
        if video_cfg.num_frames is not None:
            policy.num_frames = int(video_cfg.num_frames)
    except ValueError as e:
        raise UsageError(f"video: {e}") from None
    policy.guidance_scale_2 = video_cfg.guidance_scale_2


def set_fixed_shift(policy, shift: float) -> None:
    """Replace the pipeline's scheduler by the same scheduler with a fixed time shift (no
    resolution-dependent shifting, no terminal stretch), as the DanceGRPO/MixGRPO/G2RPO Flux scripts and
    DanceGRPO's Qwen-Image script use shift 3 (``sigma = 3t / (1 + 2t)`` on ``t = linspace(1, 0, n + 1)``;
    Qwen-Image's own config stretches its schedule to end at ``shift_terminal`` 0.02, which they do not)."""
    if not shift > 0:
        raise UsageError(f"model.shift must be > 0, got {shift}")
    sched = policy.pipeline.scheduler
    # UniPC (Wan's released scheduler) names its flow shift flow_shift; from_config ignores unknown keys
    key = "flow_shift" if "flow_shift" in sched.config else "shift"
    policy.pipeline.scheduler = type(sched).from_config(sched.config, **{key: float(shift)}, use_dynamic_shifting=False,
                                                        shift_terminal=None)


def load_lm(path: str, *, dtype: Optional[torch.dtype] = None, device: str = "cpu", key: str = "model.path"):
    """(model, tokenizer) from a hub id or a local folder (the same code for both); left padding.
    ``key`` names the config key in errors (``model.teacher`` for KDRL's teacher)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: transformers, only for LM runs

    p = Path(path)
    if (path.startswith((".", "/", "~")) or p.exists()) and not (p / "config.json").is_file():
        raise UsageError(f"{key} {path!r} is not a transformers model folder (no config.json)")
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32).to(device)
    return model, tok


LORA_FILE = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes
_FLOWRL_FILES = ("weights.safetensors", "meta.json", "state.pt")


def _is_flowrl_checkpoint(path: Path) -> bool:
    """A flowrl checkpoint folder (complete or not); otherwise a diffusers LoRA folder is assumed."""
    if (path / COMPLETE).is_file():
        return True
    return not (path / LORA_FILE).is_file() and any((path / n).exists() for n in _FLOWRL_FILES)


def _safetensors_shapes(path: Path, name: str) -> Dict[str, Tuple[int, ...]]:
    """Name -> shape of every tensor in ``path / name``, read from its header only."""
    try:
        with safe_open(str(path / name), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a malformed file
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"checkpoint {path}: {name} is not a readable safetensors file ({msg})") from None


def _lora_config(lora: Any, path: Path):
    from peft import LoraConfig  # heavy: peft (imports transformers), only to read a saved LoRA

    try:
        return LoraConfig(**lora)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: meta.json holds no valid LoRA config ({str(e).splitlines()[0]})") from None


def _checkpoint_kind(path: Path) -> str:
    """``"flowrl"`` or ``"diffusers"``; UsageError naming ``path`` when it is neither, or a
    half-written flowrl checkpoint."""
    if not path.exists():
        raise UsageError(f"checkpoint not found: {path}")
    if not path.is_dir():
        raise UsageError(f"checkpoint {path} is a file: give a checkpoint folder (flowrl checkpoint or diffusers LoRA)")
    if _is_flowrl_checkpoint(path):
        if not (path / COMPLETE).is_file():
            verify_checkpoint(path)  # raises: no marker, half-written
        return "flowrl"
    if (path / LORA_FILE).is_file():
        return "diffusers"
    raise UsageError(f"{path} is neither a flowrl checkpoint (no COMPLETE marker) nor a diffusers LoRA folder "
                     f"(no {LORA_FILE})")


def _meta_lora(path: Path) -> Optional[dict]:
    """The LoRA config recorded in a flowrl checkpoint's meta.json (None: full weights)."""
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: meta.json is unreadable ({type(e).__name__})") from None
    lora = meta.get("lora") if isinstance(meta, dict) else None
    if lora:
        _lora_config(lora, path)
    return lora or None


def check_checkpoint(checkpoint) -> Path:
    """Check a checkpoint folder (see module doc) before any model is loaded: a flowrl checkpoint
    verifies against its manifest (:func:`flowrl.train.checkpoint.verify_checkpoint`; half-written,
    truncated, damaged), and its weights file, like a diffusers LoRA's, must be readable
    safetensors. Returns the folder; raises a UsageError naming it otherwise."""
    path = Path(checkpoint)
    if _checkpoint_kind(path) == "flowrl":
        verify_checkpoint(path)
        _safetensors_shapes(path, "weights.safetensors")
        _meta_lora(path)
    else:
        _safetensors_shapes(path, LORA_FILE)
    return path


def model_name(policy) -> str:
    """How errors name the policy's model: its folder or hub id and transformer class."""
    tr = policy.transformer
    where = getattr(policy.pipeline, "name_or_path", None) or getattr(tr, "config", {}).get("_name_or_path")
    return f"model {where} ({type(tr).__name__})" if where else f"the {type(tr).__name__} model"


def _lora_shapes(transformer, config, source: str, target: str) -> Optional[Dict[str, Tuple[int, ...]]]:
    """Name -> shape of the LoRA weights that ``config`` adds to ``transformer``, found on a copy of
    its architecture on the meta device (no memory, the model is not changed); None when no copy
    can be built."""
    if getattr(transformer, "peft_config", None):  # an adapter is already there: the checkpoint loads into it
        return {n: tuple(p.shape) for n, p in transformer.named_parameters() if "lora_" in n}
    try:
        with torch.device("meta"):
            clone = type(transformer).from_config(transformer.config)
    except Exception as e:  # an architecture that cannot be rebuilt from its config: the load itself checks
        logger.debug("no meta-device copy of %s (%s): the LoRA fit is checked when it loads", type(transformer).__name__, e)
        return None
    try:
        add_lora_to_transformer(clone, config)
    except ValueError as e:  # peft: "Target modules ... not found in the base model"
        raise WeightsMismatchError(f"{source} does not fit {target}: {str(e).splitlines()[0]}") from None
    except Exception as e:  # e.g. an initialisation that needs real weights
        logger.debug("no LoRA on the meta-device copy (%s): the LoRA fit is checked when it loads", e)
        return None
    return {n: tuple(p.shape) for n, p in clone.named_parameters() if p.requires_grad}


def _check_diffusers_lora_fits(transformer, saved: Dict[str, Tuple[int, ...]], source: str, target: str) -> None:
    """Every ``transformer.<layer>.lora_A/B.weight`` of a diffusers LoRA must name a layer of the
    model with matching sizes (diffusers itself ignores LoRA weights of layers the model lacks).
    Weights in other layouts are left to diffusers' own converters and checks."""
    keys = sorted(k for k in saved if re.fullmatch(r"transformer\..+\.lora_[AB]\.weight", k))
    if not keys:
        return
    modules = dict(transformer.named_modules())
    absent, wrong = [], []
    for k in keys:
        name, ab = k[len("transformer."):-len(".lora_A.weight")], k[-len("A.weight")]
        layer = modules.get(name)
        if layer is None:
            absent.append(k)
            continue
        layer = getattr(layer, "base_layer", layer)
        fin, fout, shape = getattr(layer, "in_features", None), getattr(layer, "out_features", None), saved[k]
        if fin is None or fout is None or len(shape) != 2:
            continue
        want = (shape[0], fin) if ab == "A" else (fout, shape[1])
        if tuple(shape) != want:
            wrong.append((k, shape, want))
    where = f"{source} does not fit {target}"
    if absent:
        raise WeightsMismatchError(f"{where}: {len(absent)} of its {len(keys)} LoRA weights are for layers the model "
                                   f"does not have (e.g. {absent[0]})")
    if wrong:
        k, shape, want = wrong[0]
        raise WeightsMismatchError(f"{where}: shape mismatch at {k}: saved {tuple(shape)}, model {want} "
                                   f"({len(wrong)} of {len(keys)} LoRA weights differ in shape)")


def check_checkpoint_fits(policy, checkpoint, model: Optional[str] = None) -> None:
    """Raise :class:`flowrl.train.lora.WeightsMismatchError` (a UsageError) when ``checkpoint``
    was trained on another model (other architecture or sizes), from the weights' names and shapes
    only: ``policy`` is not changed. ``model``: how the message names the model."""
    path = Path(checkpoint)
    kind = _checkpoint_kind(path)
    source, target = f"checkpoint {path}", model or model_name(policy)
    tr = policy.transformer
    if kind == "flowrl":
        saved = _safetensors_shapes(path, "weights.safetensors")
        lora = _meta_lora(path)
        if lora:
            expected = _lora_shapes(tr, _lora_config(lora, path), source, target)
            if expected is None:
                return
        else:
            expected = {n: tuple(p.shape) for n, p in tr.named_parameters()}
        check_weights_fit(expected, saved, source, target)
    else:
        _check_diffusers_lora_fits(tr, _safetensors_shapes(path, LORA_FILE), source, target)


def apply_checkpoint(policy, checkpoint, model: Optional[str] = None) -> str:
    """Load ``checkpoint`` (see module doc) into ``policy``'s transformer; returns what was loaded.
    A bad folder or weights trained on another model raise a one-line UsageError naming the folder
    (and the model: ``model``, else :func:`model_name`) before the model is changed."""
    path = Path(checkpoint)
    kind = _checkpoint_kind(path)
    source, target = f"checkpoint {path}", model or model_name(policy)
    check_checkpoint_fits(policy, path, target)
    tr = policy.transformer
    if kind == "flowrl":
        ck = load_checkpoint(path)
        lora = ck["meta"].get("lora")
        if lora:
            if not getattr(tr, "peft_config", None):
                try:
                    add_lora_to_transformer(tr, _lora_config(lora, path))
                except ValueError as e:
                    raise WeightsMismatchError(f"{source} does not fit {target}: {str(e).splitlines()[0]}") from None
            else:  # load into the adapter already there
                for n, p in tr.named_parameters():
                    p.requires_grad_("lora_" in n)
        else:
            tr.requires_grad_(True)
        try:
            load_trainable_state_dict(tr, ck["weights"], source=source, target=target)
        finally:
            tr.requires_grad_(False)
        return f"flowrl checkpoint {path.name} ({'LoRA' if lora else 'full weights'})"
    try:
        policy.pipeline.load_lora_weights(str(path))
    except (ValueError, RuntimeError, KeyError, TypeError, OSError) as e:
        msg = str(e).strip().splitlines()
        raise WeightsMismatchError(f"{source}: diffusers cannot load this LoRA into {target} "
                                   f"({type(e).__name__}: {(msg[0] if msg else '')[:300]})") from None
    return f"diffusers LoRA {path}"


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
