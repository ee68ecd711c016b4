"""Typed run configuration: dataclasses, YAML loading, dotted command-line overrides, validation.

One dataclass per concern (model, sampling, plan, advantages, loss, ...); the YAML file mirrors the
nesting, and every field has a default and a one-line comment. A command line overrides any field as
``dotted.key=value`` (the value is parsed as YAML: ``10``, ``0.5``, ``true``, ``[1, 2]``, ``null``).

Every problem with a config (an unknown key, a wrong type, an impossible value) raises
:class:`ConfigError`, whose message is one line naming the key and, for unknown keys, the closest
valid key. The command line turns it into that line on stderr and exit status 2, never a traceback.
A key of an earlier version (:data:`MOVED`, e.g. ``train.lora_rank``) is refused with the key it
moved to (``train.lora_rank: moved to lora.rank``).

The machinery here (``from_dict``, ``apply_overrides``, ``to_dict``) is generic over dataclasses:
a concern's dataclass may live next to the code that uses it (``flowrl.flow.plan.PlanConfig``) and
only needs a ``validate()`` method (optionally taking the run config) that raises
``ValueError("<field>: <reason>")``.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Union

import yaml

from flowrl.core.checks import check_number


class ConfigError(ValueError):
    """A config problem, reported as one line that names the key."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


# --------------------------------------------------------------------------------------------------
# Generic dataclass <-> dict machinery
# --------------------------------------------------------------------------------------------------

_MISSING = object()


def _hints(cls) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, List, Sequence, tuple, Tuple):
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin in (dict, Dict):
        args = typing.get_args(tp)
        return f"mapping of {_type_name(args[1])}" if args else "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def valid_keys(cls, prefix: str = "") -> List[str]:
    """Every dotted key of a config dataclass (leaves and sections)."""
    keys = []
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        key = f"{prefix}{f.name}"
        keys.append(key)
        if _is_dataclass_type(tp):
            keys.extend(valid_keys(tp, key + "."))
    return keys


def _unknown_key(key: str, candidates: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    if not close:  # try matching the last component only, within the same section
        section, _, leaf = key.rpartition(".")
        leaves = [c.rpartition(".")[2] for c in candidates if c.rpartition(".")[0] == section]
        near = difflib.get_close_matches(leaf, leaves, n=1, cutoff=0.4)
        close = [f"{section}.{near[0]}" if section else near[0]] if near else []
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(key, f"unknown key{hint}")


def _coerce(value: Any, tp, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (with the usual YAML leniency: an int is a
    valid float). Returns the value, converted where that is lossless."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping (section), got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(key, f"{value!r} is not one of {', '.join(repr(c) for c in choices)}{hint}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
    if origin in (list, List, Sequence, tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
        args = typing.get_args(tp)
        if origin in (tuple, Tuple) and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(key, f"expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin in (tuple, Tuple) else out
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
        kt, vt = typing.get_args(tp) or (Any, Any)
        return {_coerce(k, kt, key): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(key, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(key, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(key, f"expected a string, got {value!r}")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls, data: Optional[dict], prefix: str = ""):
    """Build dataclass ``cls`` from a (nested) dict; unknown keys and wrong types raise ConfigError."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(prefix.rstrip("."), f"expected a mapping, got {data!r}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        if k not in names:
            raise _unknown_key(f"{prefix}{k}", valid_keys(cls, prefix))
        kwargs[k] = _coerce(v, hints[k], f"{prefix}{k}")
    try:
        return cls(**kwargs)
    except ValueError as e:  # a __post_init__ check
        raise _value_error(prefix, e) from None


def to_dict(cfg) -> dict:
    """Plain nested dict (lists instead of tuples) of a config dataclass: what YAML dumps."""

    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(cfg)


def flat_dict(d: dict, sep: str = ".", whole: Sequence[str] = (), scalars_only: bool = False) -> Dict[str, Any]:
    """The leaves of a nested dict as ``{"train.learning_rate": 3e-4, ...}``. A section named in
    ``whole`` (a top-level key) and an empty section are one leaf each; ``scalars_only`` turns every
    value that is not a bool, int, float or str into its ``str`` (for a tracker's hyperparameters)."""
    out: Dict[str, Any] = {}

    def walk(v, key):
        if isinstance(v, dict) and v and key not in whole:
            for k, x in v.items():
                walk(x, f"{key}{sep}{k}" if key else str(k))
        else:
            out[key] = v if not scalars_only or isinstance(v, (bool, int, float, str)) else str(v)

    walk(d, "")
    return out


def _parse_override(item: str) -> Tuple[str, Any, str]:
    if "=" not in item:
        raise ConfigError(item, "an override must look like dotted.key=value")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(item, "an override must look like dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value, raw


def _is_literal_union(tp) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType) and any(
        typing.get_origin(a) is Literal for a in typing.get_args(tp))


def _keeps_raw_text(tp) -> bool:
    """String-valued fields take an override's text as it is: ``model.path=123`` is the string
    "123", and ``train.mixed_precision=no`` is "no" (YAML would read it as false)."""
    if tp is str:
        return True
    if typing.get_origin(tp) is Literal:
        return all(isinstance(c, str) for c in typing.get_args(tp))
    if typing.get_origin(tp) in (Union, types.UnionType):
        return any(_keeps_raw_text(a) for a in typing.get_args(tp) if a is not type(None))
    return False


def apply_overrides(cls, data: dict, overrides: Sequence[str]) -> dict:
    """Apply ``dotted.key=value`` strings to the raw dict ``data`` of dataclass ``cls``.

    Keys are checked against the schema here, so a misspelt override is reported with the closest
    valid key. String fields keep the raw text (``model.path=123`` stays the string "123")."""
    data = dict(data or {})
    all_keys = valid_keys(cls)
    for item in overrides:
        key, value, raw = _parse_override(item)
        parts = key.split(".")
        node_cls, node = cls, data
        for depth, part in enumerate(parts):
            names = {f.name: f for f in dataclasses.fields(node_cls)}
            if part not in names:
                raise _unknown_key(key, all_keys)
            tp = _hints(node_cls)[part]
            last = depth == len(parts) - 1
            if last:
                if _keeps_raw_text(tp) and raw.strip() not in ("null", "~", "None") and not isinstance(value, str):
                    value = raw.strip() if typing.get_origin(tp) is Literal or _is_literal_union(tp) else raw
                node[part] = value
            else:
                if not _is_dataclass_type(tp):
                    if typing.get_origin(tp) in (dict, Dict):  # free-form mapping, e.g. rewards.pickscore=1
                        sub = dict(node.get(part) or {})
                        rest = ".".join(parts[depth + 1:])
                        sub[rest] = value
                        node[part] = sub
                        break
                    raise ConfigError(key, f"'{'.'.join(parts[:depth + 1])}' is not a section")
                child = node.get(part)
                child = dict(child) if isinstance(child, dict) else {}
                node[part] = child
                node_cls, node = tp, child
    return data


def _value_error(prefix: str, e: ValueError) -> ConfigError:
    msg = str(e)
    head, sep, tail = msg.partition(":")
    if sep and head and " " not in head.strip():
        return ConfigError(f"{prefix}{head.strip()}", tail.strip())
    return ConfigError(prefix.rstrip("."), msg)


def validate(cfg, root=None, prefix: str = "") -> None:
    """Call ``validate()`` on ``cfg`` and every nested config dataclass (depth first). A validate
    method may take the root config as its one argument, for cross-section checks. A ValueError
    ``"<field>: <reason>"`` becomes a ConfigError naming the dotted key."""
    root = cfg if root is None else root
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            validate(v, root, f"{prefix}{f.name}.")
    fn = getattr(cfg, "validate", None)
    if fn is None:
        return
    try:
        if len(inspect.signature(fn).parameters) >= 1:
            fn(root)
        else:
            fn()
    except ConfigError:
        raise
    except ValueError as e:
        raise _value_error(prefix, e) from None


def _leaf(data: dict, key: str) -> Any:
    """The value at dotted ``key`` of a nested dict, or _MISSING."""
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def check_moved(cls, moved: Dict[str, str], data: dict, overrides: Sequence[str] = ()) -> None:
    """Raise ``ConfigError("<old key>: moved to <new key>")`` for the first key of ``moved`` (old
    dotted key -> new) found in the raw dict ``data`` or as an override's key. An old key that is a
    section of ``cls`` now (``plan.window``) counts only when it holds a plain value."""
    sections = set(valid_keys(cls))
    given = [(key, value) for key, value, _ in map(_parse_override, overrides)]
    given += [(key, _leaf(data, key)) for key in moved]
    for key, value in given:
        if key in moved and value is not _MISSING and not (key in sections and isinstance(value, dict)):
            raise ConfigError(key, f"moved to {moved[key]}")


def load(cls, path: Optional[Union[str, Path]] = None, overrides: Sequence[str] = (), preprocess=None,
         moved: Optional[Dict[str, str]] = None):
    """Load a config of dataclass ``cls`` from YAML ``path`` (optional; ``include:`` overlays are
    followed), refuse keys that ``moved`` (old dotted key -> new) names, apply overrides, then
    ``preprocess(data)`` (e.g. presets), build and validate."""
    data = _read_yaml_with_includes(Path(path)) if path is not None else {}
    check_moved(cls, moved or {}, data, overrides)
    data = apply_overrides(cls, data, overrides)
    if preprocess is not None:
        data = preprocess(data)
    cfg = from_dict(cls, data)
    validate(cfg)
    return cfg


def dump(cfg, path: Union[str, Path]) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# The run config
# --------------------------------------------------------------------------------------------------

DTypeName = Literal["float32", "float16", "bfloat16"]


@dataclass
class ModelConfig:
    family: str = "sd3"  # which loader reads model.path: an image family of flowrl.flow.models (sd3, flux, ...) or lm (a transformers causal LM)
    path: str = ""  # hub id or local folder (the same loading code for both)
    dtype: DTypeName = "float32"  # dtype of the trainable model (transformer / LM)
    frozen_dtype: Optional[DTypeName] = None  # dtype of the frozen text encoders and VAE (null: same as dtype)
    device: str = "cpu"  # torch device when not launched by accelerate (accelerate picks its own)
    max_sequence_length: Optional[int] = None  # T5 tokens (SD3: zero padding when there is no T5); null: the pipeline's default (256/512)
    shift: Optional[float] = None  # fixed sigma shift replacing the scheduler's (e.g. 3.0 for Flux as DanceGRPO/MixGRPO); null: the model's own
    true_cfg_scale: Optional[float] = None  # flux_kontext: the pipeline's true CFG, v_neg + s (v - v_neg) with sample.negative_prompt, when > 1 (two transformer calls per step); null: off
    offload_text_encoders: bool = False  # keep the text encoders on the CPU between prompt encodings (cached prompts need none); frees their memory on the GPU
    batched_cfg: bool = False  # qwen_image, wan: CFG's two branches in one transformer call on 2B rows (false: two calls, the pipeline's rounding)
    condition_image_size: Optional[int] = None  # editing families (flux_kontext): side in px of the square each source image is resized to; 0: the image's own size; null: the pipeline's choice (Kontext: its preferred resolution nearest the image's aspect)
    teacher: Optional[str] = None  # lm only, KDRL: a causal LM (hub id or folder) sharing the tokenizer; loss.teacher_beta weighs KL(policy || teacher); null: none

    def validate(self) -> None:
        from flowrl.flow.models import FAMILIES

        known = [*FAMILIES, "lm"]
        if self.family not in known:
            close = difflib.get_close_matches(str(self.family), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"family: unknown model family {self.family!r}{hint}; known: {', '.join(known)}")
        if self.frozen_dtype is not None and self.family == "lm":
            raise ValueError("frozen_dtype: only image models have frozen parts")
        if self.teacher is not None and self.family != "lm":
            raise ValueError("teacher: a teacher model (KDRL) is for causal LMs (family lm); image runs have none")
        if self.max_sequence_length is not None and self.max_sequence_length < 1:
            raise ValueError(f"max_sequence_length: must be >= 1, got {self.max_sequence_length}")
        check_number("shift", self.shift, gt=0, none_ok=True)
        check_number("true_cfg_scale", self.true_cfg_scale, gt=0, none_ok=True)
        if self.condition_image_size is not None and self.condition_image_size < 0:
            raise ValueError(f"condition_image_size: must be >= 0 (0: the image's own size) or null, got {self.condition_image_size}")
        import torch

        try:
            torch.device(self.device)
        except (RuntimeError, ValueError, TypeError):
            raise ValueError(f"device: {self.device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1')") from None


@dataclass
class SampleConfig:
    height: int = 64  # image height in pixels
    width: int = 64  # image width in pixels
    num_steps: int = 10  # denoising steps of a training rollout
    eval_num_steps: int = 40  # ODE steps at evaluation (more than num_steps: "denoising reduction")
    guidance_scale: float = 4.5  # CFG scale (SD3) or distilled guidance (Flux); <= 1 disables SD3's CFG branch
    negative_prompt: str = ""  # SD3 negative prompt for CFG
    group_size: int = 4  # samples per prompt (the GRPO group); for tree plans, the number of leaves
    prompts_per_step: int = 2  # distinct prompts per rollout, over all processes (the global batch is this x group_size)
    same_noise: bool = False  # group members share their initial noise (DanceGRPO --init_same_noise)
    store_dtype: DTypeName = "float32"  # dtype of stored latents (log-probs are taken on the rounded values)
    chunk_size: Optional[int] = None  # at most this many rows per transformer call while sampling (null: all)
    decode_chunk_size: Optional[int] = None  # at most this many rows per VAE decode of a rollout (null: chunk_size); a video VAE's memory grows with them
    rollout_chunks: int = 1  # a step's prompts (on each process) are sampled in this many sub-batches, one after the other, each scored on its own (images and text)
    overlap_rewards: bool = False  # score a sub-batch in a worker thread while the next one samples (same numbers as false; needs rollout_chunks > 1 to overlap)

    def validate(self) -> None:
        for name in ("height", "width"):
            v = getattr(self, name)
            if v < 8 or v % 8:
                raise ValueError(f"{name}: must be a positive multiple of 8, got {v}")
        for name in ("num_steps", "eval_num_steps", "group_size", "prompts_per_step", "rollout_chunks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("chunk_size", "decode_chunk_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1 or null, got {getattr(self, name)}")
        if self.rollout_chunks > self.prompts_per_step:
            raise ValueError(f"rollout_chunks: {self.rollout_chunks} sub-batches of {self.prompts_per_step} prompts "
                             f"(sample.prompts_per_step): a sub-batch holds at least one prompt")
        check_number("guidance_scale", self.guidance_scale, ge=0)


@dataclass
class TextConfig:
    max_new_tokens: int = 16  # completion length limit
    temperature: float = 1.0  # sampling temperature (log-probs use logits / temperature, as TRL)
    top_k: Optional[int] = None  # top-k sampling (null: off)
    top_p: Optional[float] = None  # nucleus sampling (null: off)
    chunk_size: int = 16  # rows per forward pass when computing token log-probs

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        check_number("temperature", self.temperature, gt=0)
        check_number("top_p", self.top_p, gt=0, le=1, none_ok=True)
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size: must be >= 1, got {self.chunk_size}")


@dataclass
class DataConfig:
    train: str = "shapes:train"  # training prompts: a .txt (one per line) or .jsonl file, or 'shapes:train' / 'arithmetic:train'
    eval: str = "shapes:test"  # held-out prompts, same forms ('shapes:test', 'arithmetic:test', a file)
    max_train_prompts: Optional[int] = None  # use at most this many training prompts (null: all)


@dataclass
class EvalConfig:
    num_prompts: int = 16  # held-out prompts evaluated (the first N of data.eval)
    seeds: List[int] = field(default_factory=lambda: [0, 1])  # fixed seeds per prompt (images) or 1 greedy pass (text)
    guidance_scale: Optional[float] = None  # null: sample.guidance_scale
    at_start: bool = True  # evaluate the base model before the first step (summary.json first_eval)
    ends_num_prompts: Optional[int] = None  # null: num_prompts. The first and the last evaluation use this many prompts (a precise before/after), those in between the first num_prompts of them (a cheap curve)

    def validate(self) -> None:
        if self.num_prompts < 1:
            raise ValueError(f"num_prompts: must be >= 1, got {self.num_prompts}")
        if not self.seeds:
            raise ValueError("seeds: give at least one seed")
        check_number("guidance_scale", self.guidance_scale, ge=0, none_ok=True)
        if self.ends_num_prompts is not None and self.ends_num_prompts < self.num_prompts:
            raise ValueError(f"ends_num_prompts: must be >= num_prompts ({self.num_prompts}), got {self.ends_num_prompts} "
                             "(null: the first and last evaluations use num_prompts too)")


@dataclass
class TrainConfig:
    learning_rate: float = 3e-4  # AdamW learning rate (Flow-GRPO LoRA 3e-4)
    weight_decay: float = 1e-4  # AdamW weight decay
    adam_betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    adam_eps: float = 1e-8  # AdamW epsilon
    max_grad_norm: float = 1.0  # gradient clipping (DanceGRPO recommends 0.01 when unstable; .inf: no clipping)
    warmup_steps: int = 0  # linear LR warm-up (optimizer steps)
    num_iterations: int = 1  # K inner epochs over each rollout (1: exactly on-policy)
    num_minibatches: int = 1  # optimizer steps per inner epoch (the rollout split into this many minibatches)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"  # accelerate autocast
    gradient_checkpointing: bool = False  # trade compute for memory in the update
    max_bad_steps: int = 3  # stop after this many consecutive steps with a NaN/inf loss or gradient
    max_update_ratio: Optional[float] = 0.5  # stop (without checkpointing) when one optimizer step changes the trainable weights' norm by more than this fraction; null: off
    keep_last: int = 2  # checkpoints kept on disk
    deterministic: bool = False  # torch deterministic algorithms (exact resume on CPU)
    tracker: Literal["tensorboard", "wandb", "none"] = "tensorboard"  # accelerate tracker
    progress: bool = True  # progress bar on stderr

    def validate(self) -> None:
        check_number("learning_rate", self.learning_rate, gt=0, le=1.0,
                     why="an AdamW learning rate above 1 is never meant; LoRA RL uses 1e-5 to 1e-3")
        check_number("weight_decay", self.weight_decay, ge=0)
        check_number("adam_eps", self.adam_eps, gt=0)
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas: two numbers in [0, 1), got {self.adam_betas}")
        for name in ("num_iterations", "num_minibatches", "keep_last", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        check_number("max_grad_norm", self.max_grad_norm, gt=0, inf_ok=True, why=".inf: no clipping")
        check_number("max_update_ratio", self.max_update_ratio, gt=0, none_ok=True)


@dataclass
class LoraConfig:
    enabled: bool = True  # train a LoRA adapter (false: full fine-tuning)
    rank: Optional[int] = None  # null: the family default (SD3 32, Flux 64, LM 16)
    alpha: Optional[float] = None  # null: the family default (2 x rank)
    targets: Optional[List[str]] = None  # module name suffixes (null: the family default)
    init: str = "gaussian"  # peft init_lora_weights ('gaussian' as Flow-GRPO, or 'default')

    def validate(self) -> None:
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank: must be >= 1, got {self.rank}")
        check_number("alpha", self.alpha, gt=0, none_ok=True)


@dataclass
class VideoConfig:
    num_frames: Optional[int] = None  # frames of a video model's samples (Wan: (n - 1) % 4 == 0); null: the pipeline's default (81). Image models: must stay null
    score_frames: Literal["all", "first_last", "every_k"] = "all"  # the frames an image scorer scores (a video's score is their mean)
    every_k: int = 4  # score_frames: every_k scores frames 0, k, 2k, ... and the last
    guidance_scale_2: Optional[float] = None  # Wan2.2: CFG scale of the low-noise expert (null: sample.guidance_scale)
    expert: Literal["transformer", "transformer_2"] = "transformer"  # Wan2.2: the expert trained (the other is frozen)

    def validate(self) -> None:
        if self.num_frames is not None and self.num_frames < 1:
            raise ValueError(f"num_frames: must be >= 1, got {self.num_frames}")
        if self.every_k < 1:
            raise ValueError(f"every_k: must be >= 1, got {self.every_k}")
        check_number("guidance_scale_2", self.guidance_scale_2, ge=0, none_ok=True)


@dataclass
class EmaConfig:
    enabled: bool = False  # keep an EMA of the trainable weights for evaluation and saving
    decay: float = 0.9  # EMA decay (Flow-GRPO 0.9 with warm-up min((1+n)/(10+n), decay))
    every: int = 1  # optimizer steps between EMA updates (Flow-GRPO 8)

    def validate(self) -> None:
        if self.every < 1:
            raise ValueError(f"every: must be >= 1, got {self.every}")
        check_number("decay", self.decay, gt=0, lt=1)


from flowrl.core.advantages import AdvantageConfig  # noqa: E402  (torch-only modules)
from flowrl.core.budgets import BudgetConfig  # noqa: E402
from flowrl.core.losses import LossConfig  # noqa: E402
from flowrl.core.objectives import ObjectiveConfig  # noqa: E402
from flowrl.flow.plan import PlanConfig  # noqa: E402


@dataclass
class RunConfig:
    output_dir: str = "runs/flowrl"  # the run folder (config.yaml, summary.json, report.html, checkpoints/)
    seed: int = 0  # global seed; sampling noise and plans derive from (seed, step), identical on every process
    max_steps: int = 100  # training steps (rollout + updates)
    time_budget_s: Optional[float] = None  # also stop after the step at which training time (without evaluation) exceeds this
    resume: str = "auto"  # 'auto' (last complete checkpoint in output_dir), a checkpoint path, or 'none'
    checkpoint_every: int = 50  # steps between checkpoints (and one at the end)
    eval_every: int = 50  # steps between evaluations (and one at the end)
    eval_every_s: Optional[float] = None  # also evaluate each time training time (without evaluation) passes a multiple of this
    loss_preset: Optional[str] = None  # grpo|bnpo|dr_grpo|dapo|gspo|cispo|luspo|sapo: fills loss.* (explicit loss.* keys win)
    advantage_preset: Optional[str] = None  # flow_grpo|dance_grpo|mixgrpo|trl|dr_grpo|gdpo|ngrpo|dapo|verl: fills advantage.*
    rewards: Dict[str, float] = field(default_factory=lambda: {"shapes": 1.0})  # reward name -> weight (scorers, or text reward functions)
    reward_options: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # reward name -> factory options (checkpoint=, url=, ...)
    model: ModelConfig = field(default_factory=ModelConfig)  # the policy model
    sample: SampleConfig = field(default_factory=SampleConfig)  # rollout settings (images)
    plan: PlanConfig = field(default_factory=PlanConfig)  # which steps are stochastic / trained / branching
    text: TextConfig = field(default_factory=TextConfig)  # rollout settings (text)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)  # rewards -> advantages
    loss: LossConfig = field(default_factory=LossConfig)  # the policy loss
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)  # likelihood (loss) or a forward-process objective
    train: TrainConfig = field(default_factory=TrainConfig)  # optimizer, precision, loop robustness
    lora: LoraConfig = field(default_factory=LoraConfig)  # the LoRA adapter (or full fine-tuning)
    ema: EmaConfig = field(default_factory=EmaConfig)  # an EMA of the trained weights
    data: DataConfig = field(default_factory=DataConfig)  # prompt sources
    eval: EvalConfig = field(default_factory=EvalConfig)  # held-out evaluation
    video: VideoConfig = field(default_factory=VideoConfig)  # video models (Wan): frames, how image scorers score them
    budget: BudgetConfig = field(default_factory=BudgetConfig)  # rollouts per prompt and which prompts a step draws

    @property
    def stat_tracker_applies(self) -> bool:
        """Whether ``advantage.stat_tracking`` would be used: text runs and flat image plans
        (trees compare siblings, multi-granularity plans normalise within each granularity)."""
        return self.model.family == "lm" or (self.plan.kind != "tree" and list(self.plan.granularities) == [1])

    def validate(self) -> None:
        if self.max_steps < 0:
            raise ValueError(f"max_steps: must be >= 0, got {self.max_steps}")
        for name in ("checkpoint_every", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        check_number("time_budget_s", self.time_budget_s, gt=0, none_ok=True, why="null: no time limit")
        check_number("eval_every_s", self.eval_every_s, gt=0, none_ok=True, why="null: evaluate by steps only")
        if not self.rewards:
            raise ValueError("rewards: name at least one reward")
        for name, w in self.rewards.items():
            check_number(f"rewards.{name}", w, why="the weight of that reward")
        unknown = sorted(set(self.reward_options) - set(self.rewards))
        if unknown:
            raise ValueError(f"reward_options: options for rewards not in 'rewards': {unknown}")
        adv = self.advantage  # what compute_advantages would refuse at the first step
        if adv.reward_weights is not None and len(adv.reward_weights) != len(self.rewards):
            raise ValueError(f"advantage.reward_weights: {len(adv.reward_weights)} weights for the {len(self.rewards)} "
                             "reward(s) in 'rewards' (null: the weights in 'rewards')")
        if adv.normalize_weights and adv.reward_weights is None and not sum(self.rewards.values()) > 0:
            raise ValueError(f"advantage.normalize_weights: the weights in 'rewards' must have a positive sum to be "
                             f"normalised, got {dict(self.rewards)}")
        if adv.stat_tracking and self.stat_tracker_applies:
            if adv.ngrpo_max_reward is not None:
                raise ValueError("advantage.stat_tracking: cannot be combined with advantage.ngrpo_max_reward "
                                 "(NGRPO calibrates the group baseline; the tracker replaces it)")
            if adv.multi_reward == "normalize_then_sum" and len(self.rewards) > 1:
                raise ValueError("advantage.stat_tracking: not supported with advantage.multi_reward: "
                                 "normalize_then_sum and several rewards")
        if self.plan.kind == "ode" and self.sample.same_noise:
            raise ValueError("sample.same_noise: with plan.kind 'ode' every member of a group would be the same "
                             "deterministic sample (no reward spread, no gradient); set it to false")
        if self.plan.is_sweep and not self.sample.same_noise:
            raise ValueError("sample.same_noise: must be true for a singular sweep (plan.singular.choice: all): "
                             "every branch step starts from the prompt's one ODE trunk")
        self._validate_objective()
        self._validate_budget()
        self._validate_variants()
        if self.plan.kind == "tree":  # the leaves of a tree: the product of its branch factors
            leaves = 1
            for b in self.plan.tree.branch_factors:
                leaves *= b
            if self.sample.group_size % leaves:
                raise ValueError(f"sample.group_size: {self.sample.group_size} is not a multiple of the tree's "
                                 f"{leaves} leaves (plan.tree.branch_factors={self.plan.tree.branch_factors})")


    def _validate_budget(self) -> None:
        """What a rollout budget other than uniform needs: flat groups of one reward total per sample, and
        group sizes that fit its bounds (single_stream: one sample per prompt, its own baseline)."""
        b, g = self.budget, self.sample.group_size
        if b.kind == "uniform":
            return
        if self.model.family != "lm" and (self.plan.kind == "tree" or self.plan.is_sweep or list(self.plan.granularities) != [1]):
            raise ValueError(f"budget.kind: {b.kind} needs flat groups (no plan.kind tree, singular sweep or "
                             "plan.granularities)")
        if b.kind == "knapsack" and not b.knapsack.min_size <= g <= b.knapsack.max_size:
            raise ValueError(f"sample.group_size: {g} must lie in [budget.knapsack.min_size, budget.knapsack.max_size] "
                             f"= [{b.knapsack.min_size}, {b.knapsack.max_size}] (a prompt without a success rate gets it)")
        if b.kind == "gvm" and b.gvm.grad_norms != "none" and self.model.family != "lm":
            raise ValueError("budget.gvm.grad_norms: 'embedding' differentiates -log pi(y) of a completion with respect "
                             "to the token embeddings of a causal LM (family lm); an image step has no such table")
        if b.kind == "gvm" and b.gvm.min_size > g:
            raise ValueError(f"budget.gvm.min_size: {b.gvm.min_size} is more than sample.group_size ({g}), the "
                             "average a step can give")
        if b.variable_sizes and self.objective.kind == "dgpo":
            raise ValueError(f"budget.kind: {b.kind} gives groups of different sizes; objective.kind dgpo needs one "
                             "group size")
        if b.kind == "single_stream":
            if g != 1:
                raise ValueError(f"sample.group_size: budget.kind single_stream (SPO) samples one completion per "
                                 f"prompt; set it to 1, got {g}")
            if self.advantage.stat_tracking:
                raise ValueError("advantage.stat_tracking: budget.kind single_stream has its own per-prompt baseline")
            if b.single_stream.rho_type == "kl" and self.model.family != "lm":
                raise ValueError("budget.single_stream.rho_type: 'kl' measures how far the token log-probs of a prompt's "
                                 "previous completion drifted; it is for causal LMs (family lm); use 'constant'")

    def _validate_variants(self) -> None:
        """DCPO / GTPO / D3S token terms need token probabilities, ids or entropies (the text path);
        DCPO's and RiskPO's advantages and D3S's sample selection need flat groups."""
        if self.model.family != "lm":
            keys = self.loss.text_only_keys()
            if keys:
                raise ValueError(f"loss.{keys[0]}: works on tokens (their probabilities, ids or entropies) and exists "
                                 f"for the text path only (model.family: lm), not for {self.model.family!r}")
        adv = self.advantage
        used = [k for k, on in (("smooth_tracking", adv.smooth_tracking), ("risk", adv.risk != "none"),
                                ("sample_keep", adv.sample_keep is not None)) if on]
        if used and not self.stat_tracker_applies:
            raise ValueError(f"advantage.{used[0]}: needs flat groups; a tree plan or plan.granularities "
                             "compute their advantages otherwise")
        # KDRL needs a teacher, DisCO and the unlikeliness reward a causal LM, dynamic reward weights several
        # rewards and flat groups
        lm, loss = self.model.family == "lm", self.loss
        if (self.model.teacher is not None) != (loss.teacher_beta > 0):
            raise ValueError("model.teacher: KDRL needs both a teacher (model.teacher) and its weight loss.teacher_beta > 0; "
                             f"got teacher={self.model.teacher!r}, teacher_beta={loss.teacher_beta}")
        if loss.surrogate == "disco":
            if not lm:
                raise ValueError("loss.surrogate: 'disco' scores completions by their token log-probs; it is for causal LMs "
                                 "(family lm)")
            if self.sample.group_size < 2:
                raise ValueError("sample.group_size: DisCO contrasts the positives and negatives of a group; it needs >= 2")
        if adv.unlikely_penalty > 0 and not lm:
            raise ValueError("advantage.unlikely_penalty: ranks completions by their likelihood under the sampling policy; "
                             "it is for causal LMs (an image step's Gaussian log-prob of its own sample measures only the "
                             "noise drawn, not how likely the image is)")
        if adv.dynamic_weights:
            if len(self.rewards) < 2:
                raise ValueError("advantage.dynamic_weights: weighs several rewards; 'rewards' names one")
            if not all(w > 0 for w in self.rewards.values()):
                raise ValueError(f"rewards: dynamic reward weights start from positive weights, got {dict(self.rewards)}")
            if adv.reward_weights is not None:
                raise ValueError("advantage.reward_weights: with dynamic_weights the weights start from 'rewards' and then "
                                 "follow the gradients; leave reward_weights null")
            if not self.stat_tracker_applies:
                raise ValueError("advantage.dynamic_weights: needs flat groups (no plan.kind tree, plan.granularities [1])")
            if adv.stat_tracking:
                raise ValueError("advantage.dynamic_weights: cannot be combined with advantage.stat_tracking (each reward's "
                                 "own advantages would enter the tracker's history)")
            if adv.unlikely_penalty > 0:
                raise ValueError("advantage.dynamic_weights: not combined with advantage.unlikely_penalty")

    def _validate_objective(self) -> None:
        """What the objective needs of the rest: a likelihood objective trains SDE steps, a forward one
        an image policy with flat groups (no sweep, no granularities)."""
        o = self.objective
        if not o.forward:
            if self.plan.kind == "ode" and self.model.family != "lm":
                raise ValueError("plan.kind: 'ode' trains no step by log-prob; it needs a forward-process "
                                 "objective (objective.kind: nft, awm, dgpo or dpo)")
            return
        if self.model.family == "lm":
            raise ValueError(f"objective.kind: {o.kind} is a forward-process objective for flow models; "
                             "a causal LM trains with 'likelihood'")
        if self.plan.is_sweep or list(self.plan.granularities) != [1]:
            raise ValueError(f"objective.kind: {o.kind} trains the clean samples of flat groups; it cannot be "
                             "combined with a singular sweep or plan.granularities")
        from flowrl.flow.forward import eligible_steps  # the objective's timesteps among the rollout's steps

        try:
            eligible_steps(o, self.sample.num_steps)
        except ValueError as e:
            raise ValueError(f"objective.{e}") from None
        if o.kind in ("dgpo", "dpo") and self.sample.group_size < 2:
            raise ValueError(f"sample.group_size: {o.kind} compares the members of a group; it needs >= 2")


_PRESETS = {
    "loss": ("loss_preset", "flowrl.core.losses", "loss_preset"),
    "advantage": ("advantage_preset", "flowrl.core.advantages", "advantage_preset"),
}


def _apply_presets(data: dict) -> dict:
    """``loss_preset: dapo`` fills the ``loss`` section with the preset's values; keys given
    explicitly under ``loss:`` (in YAML or as overrides) win. Same for ``advantage_preset``."""
    import importlib

    data = dict(data)
    for section, (key, module, fn_name) in _PRESETS.items():
        name = data.get(key)
        if not name:
            continue
        fn = getattr(importlib.import_module(module), fn_name)
        try:
            preset = fn(str(name))
        except ValueError as e:
            raise ConfigError(key, str(e).partition(": ")[2] or str(e)) from None
        explicit = data.get(section) or {}
        if not isinstance(explicit, dict):
            raise ConfigError(section, f"expected a mapping (section), got {explicit!r}")
        data[section] = {**to_dict(preset), **explicit}
    return data


# Keys of earlier versions (old dotted key -> where it lives now). A config that uses one is refused
# with one line naming the new key; a checkpoint's saved config is read through it (upgrade_keys).
MOVED = {
    **{f"train.{old}": f"lora.{new}" for old, new in (
        ("lora", "enabled"), ("lora_rank", "rank"), ("lora_alpha", "alpha"), ("lora_targets", "targets"),
        ("lora_init", "init"))},
    **{f"train.{old}": f"ema.{new}" for old, new in (("ema", "enabled"), ("ema_decay", "decay"), ("ema_every", "every"))},
    "train.per_prompt_stat_tracking": "advantage.stat_tracking",
    "train.stat_buffer_size": "advantage.stat_buffer_size",
    "train.stat_min_count": "advantage.stat_min_count",
    "train.sweep_split": "plan.singular.sweep_split",
    "train.step_weighting": "plan.step_weighting",
    "train.step_weight_scale": "plan.step_weight_scale",
    "plan.fraction": "plan.subset.fraction",
    "plan.per_sample": "plan.subset.per_sample",
    "plan.window": "plan.window.size",
    "plan.window_start": "plan.window.start",
    "plan.window_range": "plan.window.range",
    **{f"plan.{name}": f"plan.window.{name}" for name in (
        "stride", "shift_interval", "schedule", "roll_back", "min_shift_interval", "exp_k", "exp_threshold")},
    "plan.compress_ratio": "plan.tail.ratio",
    "plan.compress_shift": "plan.tail.shift",
    "plan.singular_steps": "plan.singular.steps",
    "plan.singular_choice": "plan.singular.choice",
    **{f"plan.{name}": f"plan.tree.{name}" for name in ("branch_factors", "branch_steps", "branch_noise")},
    "plan.tree_dedup": "plan.tree.dedup",
}


#: sections added after checkpoints were first written: a checkpoint without them ran with their defaults
ADDED_SECTIONS = ("objective", "video", "budget")


def upgrade_keys(flat: Dict[str, Any]) -> Dict[str, Any]:
    """A flattened (dotted keys) config with every old key of :data:`MOVED` renamed to its new
    key, and the defaults of :data:`ADDED_SECTIONS` it lacks: how a checkpoint saved by an earlier
    version is compared with the current config."""
    out = {MOVED.get(key, key): value for key, value in flat.items()}
    for section in ADDED_SECTIONS:
        if not any(k == section or k.startswith(section + ".") for k in out):
            out.update({f"{section}.{k}": v for k, v in flat_dict(to_dict(getattr(RunConfig(), section))).items()})
    return out


def load_run_config(path=None, overrides: Sequence[str] = ()) -> RunConfig:
    """The CLI's entry point: YAML (with ``include:`` of a base file) + overrides + presets ->
    validated :class:`RunConfig`. Keys of earlier versions (:data:`MOVED`) are refused by name."""
    return load(RunConfig, path, overrides, preprocess=_apply_presets, moved=MOVED)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("rewards", "reward_options"):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _read_yaml_with_includes(p: Path, seen=()) -> dict:
    """Read YAML; a top-level ``include: other.yaml`` (relative to this file) is read first and
    this file's keys are merged over it (method presets are overlays of a base config)."""
    if not p.is_file():
        raise ConfigError("", f"config file not found: {p}")
    if p.resolve() in seen:
        raise ConfigError("include", f"include cycle through {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError("", f"cannot parse {p}: {first}") from None
    if not isinstance(data, dict):
        raise ConfigError("", f"{p} must hold a mapping at the top level")
    inc = data.pop("include", None)
    if inc is None:
        return data
    if not isinstance(inc, str):
        raise ConfigError("include", f"expected a file name, got {inc!r}")
    base = _read_yaml_with_includes((p.parent / inc), seen + (p.resolve(),))
    return _deep_merge(base, data)
