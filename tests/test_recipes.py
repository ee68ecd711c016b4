"""Every shipped recipe (``configs/*.yaml``, ``configs/methods/*.yaml``, ``configs/methods_text/*.yaml``) stays
loadable and buildable.

Each config is loaded through :func:`flowrl.config.load_run_config` with its model replaced by a tiny
randomly initialised stand-in of the same family (``flowrl.demo.tiny_image.save_tiny`` /
``flowrl.demo.tiny_text.save_tiny_lm``), tiny sizes (32 px, the fewest denoising steps the recipe's plan
accepts, small groups), cheap stand-in rewards where the recipe names a learned or remote scorer, CPU
precision, and its run is built (``flowrl.train.loop.Trainer``). A few recipes also train one step.
Separately, the published hyper-parameters of each recipe are pinned (a table below, values from the
papers / their code as given in the recipes' headers), so an edit that changes a recipe's meaning
fails here.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from flowrl.cli import main as flowrl_main
from flowrl.config import RunConfig, load_run_config
from flowrl.flow.plan import build_plan, plan_generator
from flowrl.text.rewards import register_reward
from flowrl.train.lora import DEFAULTS as LORA_DEFAULTS
from scorers.registry import register as register_scorer

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [p for d in ("", "methods", "methods_text") for p in sorted((ROOT / "configs" / d).glob("*.yaml"))]
IDS = [str(p.relative_to(ROOT / "configs")) for p in CONFIGS]
TINY = {"tiny_sd3.yaml", "tiny_flux.yaml", "tiny_flux_kontext.yaml", "tiny_llm.yaml", "tiny_z_image.yaml",
        "tiny_qwen_image.yaml", "tiny_flux2.yaml", "tiny_wan.yaml", "tiny_qwen_image_edit.yaml"}

# Reward stand-ins: cheap, local, no checkpoint. A recipe with k rewards gets the first k, so the
# multi-reward paths (normalize-then-sum, several components) are still exercised. (Not
# jpeg_compressibility together with jpeg_incompressibility: normalised, they cancel exactly.)
CHEAP_IMAGE = ["jpeg_compressibility", "test_brightness", "shapes"]


@register_scorer("test_brightness")
def brightness_scorer(device="cpu", dtype=torch.float32, checkpoint=None, **_):
    """Mean pixel value of each image: a cheap reward that differs between random-model samples."""
    return lambda images, prompts, **metadata: images.detach().float().mean(dim=(1, 2, 3)).cpu()


@register_reward("test_digit_fraction")
def digit_fraction(prompts, completions, **_) -> List[float]:
    """Fraction of digit characters in the completion: a random tiny LM's completions differ in it,
    so its groups have reward spread (the recipes' verifiable rewards are ~0 for random weights)."""
    return [sum(c.isdigit() for c in s) / max(1, len(s)) for s in completions]


def _raw(path: Path) -> RunConfig:
    return load_run_config(path)


class _TinyModels(dict):
    """family -> tiny model folder, each built the first time a test asks for it (every image family of
    ``flowrl.demo.TINY_BUILDERS``, and ``lm``)."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def __missing__(self, family: str) -> str:
        from flowrl.demo.tiny_image import save_tiny
        from flowrl.demo.tiny_text import save_tiny_lm

        path = str(save_tiny_lm(self.root / "lm") if family == "lm" else save_tiny(family, self.root / family))
        self[family] = path
        return path


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> Dict[str, str]:
    return _TinyModels(tmp_path_factory.mktemp("tiny_models"))


def _fewest_steps(cfg: RunConfig) -> int:
    """The fewest denoising steps (>= 4) for which the recipe's own plan (and objective) is valid."""
    from flowrl.flow.forward import eligible_steps

    for n in range(4, cfg.sample.num_steps + 1):
        try:
            cfg.plan.validate(n)
            if cfg.objective.forward:
                eligible_steps(cfg.objective, n)
        except ValueError:
            continue
        return n
    raise AssertionError(f"plan {cfg.plan} is not valid for any step count up to {cfg.sample.num_steps}")


def _leaves(cfg: RunConfig) -> int:
    return math.prod(cfg.plan.tree.branch_factors) if cfg.plan.kind == "tree" else 1


def tiny_overrides(path: Path, models: Dict[str, str], out_dir: Path, *, signal_rewards: bool = False) -> List[str]:
    """Overrides that turn recipe ``path`` into a tiny CPU run of the same method."""
    cfg = _raw(path)
    fam = cfg.model.family
    ov = [
        f"model.path={models[fam]}", f"output_dir={out_dir}", "resume=none", "model.dtype=float32",
        "model.device=cpu", "train.mixed_precision='no'",  # quoted: YAML reads a bare no as false
        "train.tracker=none", "train.progress=false",
        "train.gradient_checkpointing=false", "eval.num_prompts=1", "eval.seeds=[0]", "max_steps=1",
        "checkpoint_every=1", "eval_every=1",
    ]
    mb = cfg.train.num_minibatches
    if fam == "lm":
        group = 1 if cfg.budget.kind == "single_stream" else 4  # SPO samples one completion per prompt
        ov += [f"sample.prompts_per_step={2 * mb}", f"sample.group_size={group}", "text.max_new_tokens=4",
               "data.train=arithmetic:train", "data.eval=arithmetic:test"]
        if cfg.model.teacher:  # KDRL: the tiny LM is its own teacher (same tokenizer)
            ov += [f"model.teacher={models['lm']}"]
        if signal_rewards:
            ov += ["rewards={test_digit_fraction: 1.0}"]
        return ov
    ov += ["model.frozen_dtype=null", "sample.height=32", "sample.width=32", "sample.chunk_size=null",
           f"sample.num_steps={_fewest_steps(cfg)}", "sample.eval_num_steps=2",
           f"sample.group_size={1 if cfg.budget.kind == 'single_stream' else max(2, _leaves(cfg))}",
           f"sample.prompts_per_step={mb}",
           "data.train=shapes:train", "data.eval=shapes:test"]
    if fam in ("flux_kontext", "qwen_image_edit"):  # editing: instructions over 32-px source scenes, at their own size
        ov += ["data.train=shapes_edit:train:32", "data.eval=shapes_edit:test:32", "model.condition_image_size=0"]
    names = list(cfg.rewards)
    if not set(names) <= set(CHEAP_IMAGE):
        if len(names) > len(CHEAP_IMAGE):
            raise AssertionError(f"{path.name}: {len(names)} rewards, only {len(CHEAP_IMAGE)} stand-ins")
        stand_in = {CHEAP_IMAGE[i]: float(cfg.rewards[n]) for i, n in enumerate(names)}
        ov += ["rewards=" + json.dumps(stand_in), "reward_options={}"]
    return ov


# --------------------------------------------------------------------------------------------------
# every config: loads raw, names real things, loads tiny, builds
# --------------------------------------------------------------------------------------------------


def test_configs_are_found():
    names = {p.name for p in CONFIGS}
    expected = {
        "flow_grpo_sd35m_pickscore.yaml", "flow_grpo_fast_sd35m.yaml", "grpo_guard_sd35m.yaml",
        "dance_grpo_flux.yaml", "mixgrpo_flux.yaml", "g2rpo_flux.yaml", "tempflow_grpo_sd35m.yaml",
        "dynamic_treerpo_flux.yaml", "llm_grpo.yaml", "tiny_sd3.yaml", "tiny_flux.yaml", "tiny_llm.yaml",
    }
    assert expected <= names, f"missing recipes: {sorted(expected - names)}"


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_recipe_loads_and_names_real_models_and_rewards(path):
    cfg = _raw(path)
    text = path.read_text(encoding="utf-8")
    if path.name in TINY:
        assert cfg.model.path.startswith("runs/"), "tiny configs train a `flowrl make-tiny` folder"
    elif path.name in PUBLISHED:  # a published recipe (other configs, e.g. CPU demos, may use local assets)
        assert re.search(r"arXiv \d{4}\.\d{4,5}", text), "a recipe names its paper's arXiv id"
        assert re.fullmatch(r"[A-Za-z0-9-]+/[A-Za-z0-9._-]+", cfg.model.path), \
            f"model.path should be a hub id, got {cfg.model.path!r}"
    if cfg.model.family == "lm":
        from flowrl.text.rewards import resolve_reward

        for name in cfg.rewards:
            assert callable(resolve_reward(name))
    else:
        from scorers.registry import get_factory

        for name in cfg.rewards:
            assert callable(get_factory(name))  # registered (not built: that would need the weights)
    # the plan is valid for the recipe's own trajectory and builds
    if cfg.model.family != "lm":
        plan = build_plan(cfg.plan, cfg.sample.num_steps, 0, plan_generator(cfg.seed, 0))
        assert bool((plan.trained <= plan.sde).all()) and cfg.sample.group_size % plan.leaves == 0
        if cfg.objective.forward:  # trains clean samples: the objective's timesteps fit the rollout
            from flowrl.flow.forward import eligible_steps

            eligible_steps(cfg.objective, cfg.sample.num_steps)
        else:  # trains denoising steps
            assert plan.trained.any()


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_recipe_builds_on_a_tiny_stand_in(path, tiny_models, tmp_path):
    from flowrl.train.loop import Trainer

    raw = _raw(path)
    cfg = load_run_config(path, tiny_overrides(path, tiny_models, tmp_path / "run"))
    # only the overridden keys changed: the method (plan kind, SDE, loss, advantages, LoRA) is the recipe's
    assert cfg.plan.kind == raw.plan.kind and cfg.plan.sde == raw.plan.sde
    assert cfg.plan.noise_level == raw.plan.noise_level and cfg.plan.tree == raw.plan.tree
    assert cfg.loss == raw.loss and cfg.advantage == raw.advantage
    assert cfg.lora == raw.lora and cfg.train.learning_rate == raw.train.learning_rate

    tr = Trainer(cfg)
    from flowrl.train.tasks import FlowTask, TextTask

    assert isinstance(tr.task, TextTask if raw.model.family == "lm" else FlowTask)
    assert tr.optimizer.param_groups[0]["lr"] == pytest.approx(raw.train.learning_rate)
    trainable = {n for n, p in tr.task.module.named_parameters() if p.requires_grad}
    assert trainable, "nothing to train"
    if raw.lora.enabled:
        fam = raw.model.family
        pc = tr.task.module.peft_config["default"]
        assert pc.r == (raw.lora.rank or LORA_DEFAULTS[fam]["rank"])
        assert pc.lora_alpha == (raw.lora.alpha or LORA_DEFAULTS[fam]["alpha"])
        assert all("lora_" in n for n in trainable)
    else:  # full fine-tuning: every weight of the transformer / LM trains
        assert trainable == {n for n, _ in tr.task.module.named_parameters()}
    if raw.model.family != "lm":
        from flowrl.flow.models import policy_class

        assert type(tr.task.policy) is policy_class(raw.model.family)


# --------------------------------------------------------------------------------------------------
# the published hyper-parameters of each recipe
# --------------------------------------------------------------------------------------------------

PUBLISHED = {
    "flow_grpo_sd35m_pickscore.yaml": {
        "model.path": "stabilityai/stable-diffusion-3.5-medium", "sample.num_steps": 10, "sample.eval_num_steps": 40,
        "sample.group_size": 24, "sample.prompts_per_step": 48, "sample.guidance_scale": 4.5, "sample.height": 512,
        "plan.kind": "full", "plan.sde": "flow_sde", "plan.noise_level": 0.7, "plan.train_last_step": False,
        "loss.eps_low": 1e-4, "loss.beta": 0.01, "loss.kl_estimator": "latent", "loss.kl_drop_dt": True,
        "lora.enabled": True, "lora.rank": 32, "lora.alpha": 64, "train.learning_rate": 3e-4,
        "train.num_minibatches": 2, "ema.enabled": True, "ema.decay": 0.9, "ema.every": 8,
        "train.mixed_precision": "fp16", "advantage.scale": "batch", "advantage.clip": 5.0,
        "advantage.std_unbiased": False, "rewards": {"pickscore": 1.0},
    },
    "flow_grpo_fast_sd35m.yaml": {
        "plan.kind": "random_window", "plan.sde": "cps", "plan.noise_level": 0.8, "plan.window.size": 3,
        "plan.window.range": [0, 5], "sample.guidance_scale": 1.0, "sample.group_size": 18,
        "sample.prompts_per_step": 64, "loss.beta": 0.0, "train.learning_rate": 3e-4, "lora.rank": 32,
    },
    "grpo_guard_sd35m.yaml": {
        "loss.ratio_norm": True, "loss.ratio_norm_reweight": True, "loss.eps_low": 4e-6, "loss.beta": 0.0,
        "train.learning_rate": 1e-4, "advantage.scale": "group", "plan.sde": "flow_sde", "plan.noise_level": 0.7,
        "sample.num_steps": 10, "sample.guidance_scale": 4.5,
    },
    "dance_grpo_flux.yaml": {
        "model.path": "black-forest-labs/FLUX.1-dev", "plan.kind": "random_subset", "plan.sde": "dance_sde",
        "plan.noise_level": 0.3, "plan.subset.fraction": 0.6, "plan.subset.per_sample": True, "sample.num_steps": 16,
        "sample.group_size": 12, "sample.height": 720, "sample.same_noise": True, "loss.eps_low": 1e-4,
        "loss.beta": 0.0, "train.learning_rate": 1e-5, "lora.enabled": False, "advantage.clip": 5.0,
        "advantage.eps": 1e-8, "rewards": {"hpsv21": 1.0, "clipscore": 1.0}, "max_steps": 300, "model.shift": 3.0,
    },
    "mixgrpo_flux.yaml": {
        "plan.kind": "window", "plan.window.size": 4, "plan.window.shift_interval": 25, "plan.window.stride": 1,
        "plan.window.schedule": "progressive", "plan.window.roll_back": True, "plan.sde": "flow_sde", "plan.noise_level": 0.7,
        "sample.num_steps": 25, "sample.group_size": 12, "train.learning_rate": 1e-5, "lora.enabled": False,
        "advantage.multi_reward": "normalize_then_sum", "advantage.normalize_weights": True, "advantage.eps": 1e-8,
        "loss.beta": 0.0, "model.shift": 3.0, "rewards": {"hpsv21": 1.0, "imagereward": 1.0, "pickscore": 1.0},
    },
    "g2rpo_flux.yaml": {
        "plan.kind": "singular", "plan.singular.steps": list(range(8)), "plan.granularities": [1, 2],
        "plan.singular.choice": "all", "train.num_minibatches": 8, "plan.singular.sweep_split": "branch", "max_steps": 301,
        "plan.noise_level": 0.7, "sample.num_steps": 16, "sample.group_size": 12, "sample.same_noise": True,
        "train.learning_rate": 2e-6, "lora.enabled": False, "rewards": {"hpsv21": 1.0}, "model.shift": 3.0,
    },
    "tempflow_grpo_sd35m.yaml": {  # Shredded-Pork/TempFlow-GRPO e66824e, config/dgx.py pickscore_sd3_pr
        "plan.kind": "singular", "plan.singular.choice": "all", "plan.singular.steps": list(range(9)),
        "plan.noise_level": 0.7, "sample.num_steps": 10, "sample.same_noise": True, "sample.group_size": 6,
        "plan.step_weighting": "noise_aware", "plan.step_weight_scale": 2.25, "plan.singular.sweep_split": "prompt",
        "loss.beta": 0.001, "loss.kl_drop_dt": False, "loss.eps_low": 1e-4, "advantage.scale": "group",
        "advantage.std_unbiased": False, "model.path": "stabilityai/stable-diffusion-3.5-medium",
    },
    "dynamic_treerpo_flux.yaml": {
        "plan.kind": "tree", "plan.tree.branch_steps": None, "plan.tree.branch_noise": [0.9, 0.7, 0.5],
        "model.path": "black-forest-labs/FLUX.1-dev", "sample.group_size": 12,
    },
    # NVlabs/DiffusionNFT 24af555, config/nft.py sd3_pickscore + scripts/train_nft_sd3.py
    "diffusion_nft_sd35m.yaml": {
        "objective.kind": "nft", "objective.beta": 1.0, "objective.adv_clip": 5.0, "objective.num_timesteps": 9,
        "objective.timesteps": "permutation", "objective.timestep_share": "sample", "objective.kl_beta": 1e-4,
        "objective.guidance_scale": 1.0, "objective.old.decay_rate": 0.001, "objective.old.decay_max": 0.5,
        "objective.old.decay_flat": 0, "objective.old.sample_from": 0, "plan.kind": "ode", "plan.ode_solver": "dpm2m",
        "sample.num_steps": 10, "sample.eval_num_steps": 40, "sample.guidance_scale": 1.0, "sample.group_size": 24,
        "sample.prompts_per_step": 48, "train.learning_rate": 3e-4, "train.num_minibatches": 1, "lora.rank": 32,
        "lora.alpha": 64, "ema.decay": 0.9, "ema.every": 1, "advantage.scale": "batch", "advantage.eps": 1e-4,
        "advantage.std_unbiased": False, "train.max_grad_norm": 1.0, "train.weight_decay": 1e-4,
    },
    # scxue/advantage_weighted_matching be51372, config/dgx_awm.py (pickscore) + scripts/train_sd3_awm.py
    "awm_sd35m.yaml": {
        "objective.kind": "awm", "objective.timesteps": "stratified", "objective.num_timesteps": 6,
        "objective.timestep_first": 0, "objective.timestep_fraction": 0.9, "objective.weighting": "ghuber",
        "objective.ghuber_power": 0.25, "objective.clip_range": 1.0, "objective.adv_clip": 5.0,
        "objective.kl_beta": 1e-4, "objective.old_kl_beta": 1.0, "objective.old.decay_max": 0.3,
        "objective.old.decay_rate": 0.001, "objective.old.sample_from": None, "sample.num_steps": 14,
        "sample.guidance_scale": 1.0, "sample.group_size": 24, "train.learning_rate": 3e-4, "lora.rank": 32,
        "ema.decay": 0.99, "plan.kind": "ode",
    },
    # X-GenGroup/Flow-Factory a0b2bc5 trainers/awm.py + examples/awm/lora/flux1/default.yaml
    "awm_flux1.yaml": {
        "model.family": "flux", "model.path": "black-forest-labs/FLUX.1-dev", "model.shift": None,
        "objective.kind": "awm", "objective.timesteps": "stratified", "objective.num_timesteps": 4,
        "objective.timestep_first": 0, "objective.timestep_fraction": 0.8, "objective.timestep_share": "sample",
        "objective.noise_share": "sample", "objective.weighting": "ghuber", "objective.ghuber_power": 0.25,
        "objective.clip_range": 1.0, "objective.adv_clip": 1.0, "objective.kl_beta": 0.0,
        "objective.old_kl_beta": 0.1, "objective.guidance_scale": 3.5, "objective.old.decay_flat": 1,
        "objective.old.decay_rate": 0.001, "objective.old.decay_max": 0.3, "objective.old.sample_from": None,
        "plan.kind": "ode", "plan.ode_solver": "euler", "sample.num_steps": 10, "sample.eval_num_steps": 20,
        "sample.height": 512, "sample.guidance_scale": 3.5, "sample.group_size": 16, "sample.prompts_per_step": 48,
        "sample.store_dtype": "float16", "advantage.scale": "batch", "advantage.std_unbiased": False,
        "advantage.eps": 1e-6, "advantage.clip": None, "train.learning_rate": 3e-4, "train.weight_decay": 1e-4,
        "train.max_grad_norm": 1.0, "train.num_minibatches": 1, "train.mixed_precision": "bf16", "lora.rank": 64,
        "lora.alpha": 128, "ema.decay": 0.3, "data.max_train_prompts": 1024, "rewards": {"pickscore": 1.0},
    },
    # X-GenGroup/Flow-Factory a0b2bc5 trainers/grpo.py + examples/grpo/lora/flux2/t2i.yaml
    "grpo_flux2.yaml": {
        "model.family": "flux2", "model.path": "black-forest-labs/FLUX.2-dev", "plan.kind": "singular",
        "plan.sde": "flow_sde", "plan.noise_level": 1.0, "plan.singular.steps": [1, 2, 3], "plan.singular.choice": "random",
        "sample.num_steps": 8, "sample.eval_num_steps": 28, "sample.height": 512, "sample.guidance_scale": 4.0,
        "sample.group_size": 16, "sample.prompts_per_step": 48, "advantage.multi_reward": "normalize_then_sum",
        "advantage.post_norm": "batch", "advantage.clip": 5.0, "loss.eps_low": 1e-4, "loss.beta": 0.0,
        "train.learning_rate": 3e-4, "train.num_minibatches": 2, "lora.rank": 64, "lora.alpha": 128,
        "ema.decay": 0.9, "ema.every": 8, "rewards": {"clipscore": 1.0, "pickscore": 0.5},
    },
    # Luo-Yihong/DGPO 01ceb4b, config/dgpo.py pickscore_sd3_4gpu + scripts/train_sd3_dgpo.py
    "dgpo_sd35m.yaml": {
        "objective.kind": "dgpo", "objective.beta": 10.0, "objective.num_timesteps": 4,
        "objective.timestep_fraction": 0.7, "objective.timestep_share": "batch", "objective.noise_share": "group",
        "objective.clip_range": 0.05, "objective.kl_beta": 1e-3, "objective.guidance_scale": 1.0,
        "objective.old.decay_max": 0.3, "objective.old.decay_rate": 0.001, "objective.old.sample_from": 201,
        "sample.guidance_scale": 4.5, "sample.num_steps": 10, "sample.group_size": 24, "lora.rank": 64,
        "lora.alpha": 128, "train.learning_rate": 3e-4, "plan.kind": "ode", "plan.ode_solver": "dpm2m",
    },
    # X-GenGroup/Flow-Factory a0b2bc5 trainers/dpo.py + examples/dpo/lora/sd3_5/default.yaml
    "dpo_sd35m.yaml": {
        "objective.kind": "dpo", "objective.beta": 100.0, "objective.timesteps": "logit_normal",
        "objective.num_timesteps": 1, "objective.noise_share": "group", "sample.group_size": 4,
        "sample.num_steps": 40, "sample.guidance_scale": 1.0, "train.learning_rate": 1e-5, "lora.rank": 32,
        "plan.kind": "ode", "plan.ode_solver": "euler",
    },
    # X-GenGroup/Flow-Factory a0b2bc5 trainers/nft.py + examples/nft/lora/z_image/default.yaml
    "diffusion_nft_z_image.yaml": {
        "model.family": "z_image", "model.path": "Tongyi-MAI/Z-Image", "model.dtype": "float32",
        "objective.kind": "nft", "objective.beta": 0.1, "objective.adv_clip": 5.0, "objective.timesteps": "stratified",
        "objective.num_timesteps": 2, "objective.timestep_first": 0, "objective.timestep_fraction": 0.7,
        "objective.timestep_share": "sample", "objective.kl_beta": 0.0, "objective.guidance_scale": 4.0,
        "objective.old.decay_flat": 1, "objective.old.decay_rate": 0.001, "objective.old.decay_max": 0.5,
        "objective.old.sample_from": 0, "plan.kind": "ode", "plan.ode_solver": "euler", "sample.num_steps": 10,
        "sample.eval_num_steps": 40, "sample.height": 512, "sample.guidance_scale": 4.0, "sample.group_size": 16,
        "sample.prompts_per_step": 48, "sample.store_dtype": "float16", "advantage.scale": "group",
        "advantage.std_unbiased": False, "advantage.eps": 1e-6, "advantage.clip": None, "train.learning_rate": 3e-4,
        "train.weight_decay": 1e-4, "train.max_grad_norm": 1.0, "train.num_minibatches": 1,
        "train.mixed_precision": "bf16", "lora.rank": 64, "lora.alpha": 128, "data.max_train_prompts": 1024,
        "rewards": {"pickscore": 1.0},
    },
    # X-GenGroup/Flow-Factory a0b2bc5 trainers/grpo.py + examples/grpo/lora/z_image/default.yaml
    "flow_grpo_z_image.yaml": {
        "model.family": "z_image", "model.path": "Tongyi-MAI/Z-Image", "model.dtype": "float32",
        "plan.kind": "random_window", "plan.sde": "flow_sde", "plan.noise_level": 0.7, "plan.window.size": 1,
        "plan.window.range": [1, 4], "sample.num_steps": 10, "sample.eval_num_steps": 40, "sample.height": 512,
        "sample.guidance_scale": 4.0, "sample.group_size": 16, "sample.prompts_per_step": 48,
        "sample.store_dtype": "float16", "loss.eps_low": 1e-4, "loss.eps_high": None, "loss.beta": 0.0,
        "advantage.scale": "group", "advantage.std_unbiased": False, "advantage.eps": 1e-6, "advantage.clip": 5.0,
        "train.learning_rate": 3e-4, "train.weight_decay": 1e-4, "train.max_grad_norm": 1.0,
        "train.num_minibatches": 2, "train.mixed_precision": "bf16", "lora.rank": 64, "lora.alpha": 128,
        "ema.decay": 0.9, "ema.every": 4, "data.max_train_prompts": 1000, "rewards": {"pickscore": 1.0},
    },
    # yifan123/flow_grpo 9745241 (zhtmike/flow_grpo mirror), config/grpo.py pickscore_qwenimage_8gpu + scripts/train_qwenimage.py
    "flow_grpo_qwen_image.yaml": {
        "model.family": "qwen_image", "model.path": "Qwen/Qwen-Image", "sample.height": 512, "sample.width": 512,
        "sample.num_steps": 10, "sample.eval_num_steps": 50, "sample.guidance_scale": 4.0, "sample.negative_prompt": " ",
        "sample.group_size": 16, "sample.prompts_per_step": 32, "sample.same_noise": False, "plan.kind": "random_window",
        "plan.sde": "flow_sde", "plan.noise_level": 1.2, "plan.window.size": 2, "plan.window.range": [0, 5],
        "loss.eps_low": 1e-4, "loss.beta": 0.0, "advantage.scale": "batch", "advantage.clip": 5.0,
        "advantage.std_unbiased": False, "advantage.eps": 1e-4, "lora.enabled": True, "lora.rank": 64, "lora.alpha": 128,
        "lora.init": "gaussian", "lora.targets": LORA_DEFAULTS["qwen_image"]["targets"], "train.learning_rate": 3e-4,
        "train.weight_decay": 1e-4, "train.max_grad_norm": 1.0, "train.num_minibatches": 2, "train.mixed_precision": "bf16",
        "train.gradient_checkpointing": True, "ema.enabled": False, "seed": 42, "rewards": {"pickscore": 1.0},
    },
    # XueZeyue/DanceGRPO 15cc71d, scripts/finetune/finetune_qwenimage_grpo.sh + fastvideo/train_grpo_qwenimage.py
    "dance_grpo_qwen_image.yaml": {
        "model.family": "qwen_image", "model.path": "Qwen/Qwen-Image", "model.shift": 3.0, "sample.height": 720,
        "sample.width": 720, "sample.num_steps": 20, "sample.guidance_scale": 1.0, "sample.group_size": 12,
        "sample.prompts_per_step": 16, "sample.same_noise": True, "plan.kind": "random_subset", "plan.sde": "dance_sde",
        "plan.noise_level": 0.3, "plan.subset.fraction": 0.6, "plan.subset.per_sample": True, "plan.train_last_step": True,
        "loss.eps_low": 1e-4, "loss.beta": 0.0, "advantage.eps": 1e-8, "advantage.clip": 5.0, "advantage.std_unbiased": True,
        "lora.enabled": False, "train.learning_rate": 1e-5, "train.weight_decay": 1e-4, "train.max_grad_norm": 1.0,
        "train.num_minibatches": 2, "train.mixed_precision": "bf16", "max_steps": 300, "checkpoint_every": 60,
        "rewards": {"hpsv21": 1.0},
    },
    # X-GenGroup/Flow-Factory a0b2bc5 examples/grpo/lora/wan21/t2v.yaml + models/wan/wan2_t2v.py + trainers/grpo.py
    "flow_grpo_wan21.yaml": {
        "model.family": "wan", "model.path": "Wan-AI/Wan2.1-T2V-14B-Diffusers", "sample.height": 256,
        "video.num_frames": 5, "sample.num_steps": 10, "sample.eval_num_steps": 28, "sample.guidance_scale": 5.0,
        "sample.group_size": 16, "sample.prompts_per_step": 48, "plan.kind": "random_window", "plan.sde": "flow_sde",
        "plan.noise_level": 0.9, "plan.window.size": 1, "plan.window.range": [1, 4], "loss.eps_low": 1e-4,
        "loss.beta": 0.0, "advantage.clip": 5.0, "advantage.multi_reward": "normalize_then_sum",
        "advantage.post_norm": "batch", "train.learning_rate": 1e-4, "train.num_minibatches": 2, "lora.rank": 64,
        "lora.alpha": 128, "ema.decay": 0.9, "rewards": {"clipscore": 1.0, "pickscore": 0.5},
    },
    # X-GenGroup/Flow-Factory a0b2bc5 examples/grpo/lora/wan22/t2v.yaml (one expert trained here: see its header)
    "flow_grpo_wan22.yaml": {
        "model.family": "wan", "model.path": "Wan-AI/Wan2.2-T2V-A14B-Diffusers", "sample.height": 480,
        "video.num_frames": 5, "sample.guidance_scale": 4.0, "video.guidance_scale_2": 3.0,
        "video.expert": "transformer", "plan.noise_level": 0.9, "plan.window.range": [1, 4],
        "rewards": {"pickscore": 1.0}, "lora.rank": 64, "train.learning_rate": 1e-4,
    },
    # XueZeyue/DanceGRPO 15cc71d scripts/finetune/finetune_wan_2_1_grpo.sh + fastvideo/train_grpo_wan_2_1.py
    "dance_grpo_wan21.yaml": {
        "model.family": "wan", "model.path": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "model.shift": 3.0,
        "model.max_sequence_length": 226, "sample.height": 512, "video.num_frames": 1, "sample.num_steps": 20,
        "sample.guidance_scale": 5.0, "sample.group_size": 12, "sample.same_noise": True, "plan.kind": "random_subset",
        "plan.sde": "dance_sde", "plan.noise_level": 0.3, "plan.subset.fraction": 0.6, "loss.eps_low": 1e-4,
        "loss.beta": 0.0, "train.learning_rate": 1e-5, "lora.enabled": False, "rewards": {"hpsv21": 1.0},
    },
    # X-GenGroup/Flow-Factory a0b2bc5 trainers/grpo.py + examples/grpo/lora/flux1_kontext/default.yaml
    "flow_grpo_flux_kontext.yaml": {
        "model.family": "flux_kontext", "model.path": "black-forest-labs/FLUX.1-Kontext-dev",
        "model.condition_image_size": 384, "sample.height": 384, "sample.width": 384, "sample.num_steps": 10,
        "sample.eval_num_steps": 20, "sample.guidance_scale": 2.5, "sample.group_size": 16,
        "sample.prompts_per_step": 48, "plan.kind": "random_window", "plan.sde": "flow_sde", "plan.noise_level": 0.9,
        "plan.window.size": 1, "plan.window.range": [1, 4], "advantage.multi_reward": "normalize_then_sum",
        "advantage.post_norm": "batch", "advantage.std_unbiased": False, "advantage.clip": 5.0, "loss.eps_low": 1e-4,
        "loss.beta": 0.0, "train.learning_rate": 3e-4, "train.weight_decay": 1e-4, "train.num_minibatches": 2,
        "lora.rank": 64, "lora.alpha": 128, "ema.decay": 0.9, "ema.every": 4, "data.max_train_prompts": 1000,
        "rewards": {"pickscore": 1.0},
    },
    # yifan123/flow_grpo 9745241 (zhtmike/flow_grpo mirror), config/grpo.py counting_qwenimage_edit_8gpu + scripts/train_qwenimage_edit.py
    "flow_grpo_qwen_image_edit.yaml": {
        "model.family": "qwen_image_edit", "model.path": "Qwen/Qwen-Image-Edit", "model.condition_image_size": None,
        "sample.height": 512, "sample.width": 512, "sample.num_steps": 10, "sample.eval_num_steps": 50,
        "sample.guidance_scale": 4.0, "sample.negative_prompt": " ", "sample.group_size": 16,
        "sample.prompts_per_step": 32, "sample.same_noise": False, "plan.kind": "random_window", "plan.sde": "flow_sde",
        "plan.noise_level": 1.0, "plan.window.size": 9, "plan.window.range": [0, 9],
        "loss.eps_low": 1e-4, "loss.beta": 0.0, "advantage.scale": "batch", "advantage.clip": 5.0,
        "advantage.std_unbiased": False, "advantage.eps": 1e-4, "lora.enabled": True, "lora.rank": 64, "lora.alpha": 128,
        "lora.init": "gaussian", "lora.targets": LORA_DEFAULTS["qwen_image_edit"]["targets"], "train.learning_rate": 3e-4,
        "train.weight_decay": 1e-4, "train.max_grad_norm": 1.0, "train.num_minibatches": 2, "train.mixed_precision": "bf16",
        "train.gradient_checkpointing": True, "ema.enabled": False, "seed": 42, "checkpoint_every": 60, "eval_every": 30,
        "rewards": {"remote": 1.0},
    },
    "llm_grpo.yaml": {
        "model.family": "lm", "model.path": "Qwen/Qwen2.5-0.5B-Instruct", "sample.group_size": 8,
        "loss.aggregation": "token-mean", "loss.eps_low": 0.2, "loss.eps_high": 0.28, "loss.beta": 0.0,
        "advantage.scale": "group", "advantage.eps": 1e-4, "rewards": {"first_number_match": 1.0},
    },
}


# issue 20, rollout budgets per prompt: the upstream values each preset's header names (file and commit)
BUDGET_PRESETS = {
    # liziniu/KnapsackRL ca5d5f5 examples/knapsack_trainer/run_knapsack_grpo_7b.sh + exploration_utils.py defaults
    "methods_text/knapsack.yaml": {
        "budget.kind": "knapsack", "budget.knapsack.min_size": 2, "budget.knapsack.max_size": 128,
        "budget.history": 16, "budget.min_history": 8, "budget.knapsack.cost": "probability",
        "budget.knapsack.confidence": 0.9, "budget.knapsack.fallback": True, "sample.group_size": 8,
    },
    "methods/knapsack.yaml": {"budget.kind": "knapsack", "budget.knapsack.min_size": 2, "budget.history": 16,
                              "budget.min_history": 8, "plan.kind": "full", "sample.group_size": 8},
    # RLHFlow/GVM d640a75 em/stage_2_calc_sample_size.py ScriptArguments defaults
    "methods_text/gvm.yaml": {"budget.kind": "gvm", "budget.gvm.alpha": 1e-3, "budget.gvm.beta": 2.0,
                              "budget.gvm.filter_threshold": 0.0},
    "methods_text/vade.yaml": {"budget.kind": "vade", "budget.vade.prior": [1.0, 1.0]},  # no upstream code read
    # LengSicong/MMR1 d8161a0 examples/mmr1.yaml
    "methods_text/mmr1_vas.yaml": {"budget.kind": "mmr1", "budget.mmr1.mix": 0.5, "budget.mmr1.update_every": 4},
    # verl-project/verl-recipe 48ea0a7 spo/spo_ray_trainer.py, spo/config/spo_trainer.yaml, spo/train.sh
    "methods_text/single_stream.yaml": {
        "budget.kind": "single_stream", "budget.single_stream.rho": 0.875, "budget.single_stream.explore": 0.05,
        "budget.single_stream.prior": [0.5, 0.5], "sample.group_size": 1,
    },
}


@pytest.mark.parametrize("name", sorted(BUDGET_PRESETS))
def test_budget_preset_matches_upstream(name):
    """Each budget preset pins its upstream values and names its paper (and, but for VADE, the upstream
    file and commit) in its header; the text presets keep the text demo's rollouts per step."""
    path = ROOT / "configs" / name
    cfg, text = _raw(path), path.read_text(encoding="utf-8")
    wrong = {k: (_get(cfg, k), v) for k, v in BUDGET_PRESETS[name].items() if _get(cfg, k) != v}
    assert not wrong, f"{name}: (preset, upstream) differ: {wrong}"
    assert re.search(r"arXiv \d{4}\.\d{4,5}", text)
    assert re.search(r"\b[0-9a-f]{7}\b", text) or cfg.budget.kind == "vade", "the header names the commit checked"
    if name.startswith("methods_text/"):
        base = _raw(ROOT / "configs" / "llm_demo.yaml")
        assert cfg.sample.group_size * cfg.sample.prompts_per_step == base.sample.group_size * base.sample.prompts_per_step
        assert cfg.model == base.model and cfg.data == base.data and cfg.loss == base.loss


# the text presets (overlays of llm_demo.yaml): the method's values from the upstream code named in each header
METHODS_TEXT = {
    # lime-RL/DCPO 01787b0 recipe/dcpo/run_dcpo.sh + verl/trainer/ppo/core_algos.py
    "dcpo.yaml": {"loss.clip_bounds": "dcpo", "loss.eps_low": 0.2, "loss.eps_high": 0.28, "loss.dual_clip": 10.0,
                  "loss.beta": 0.0, "advantage.smooth_tracking": True, "advantage.std_unbiased": True},
    # winstonsmith1897/GTPO 5d33811 config.yaml (gtpo_runtime) + gtpo/gtpo_training.py
    "gtpo.yaml": {"loss.conflict_weight": 2.0, "loss.entropy_max": 0.7, "loss.entropy_scale": 0.1, "loss.beta": 0.0,
                  "advantage.scale": "none", "train.num_iterations": 1},
    # arXiv 2509.22115 (no code available to us: our reading of the paper's description)
    "d3s.yaml": {"advantage.sample_keep": 0.5, "advantage.sample_keep_end": 1.0, "advantage.sample_keep_scope": "batch",
                 "loss.token_keep": 0.5, "loss.token_keep_end": 1.0, "loss.token_keep_scope": "batch"},
    # RTkenny/RiskPO 65ec40c scripts/run_qwen2.5_1.5b_MVaR_math.sh + verl/trainer/ppo/core_algos.py
    "riskpo.yaml": {"advantage.risk": "mvar", "advantage.risk_alpha": 0.2, "advantage.risk_beta": 0.9,
                    "advantage.risk_mix": 1.5, "advantage.risk_bundle": 5, "advantage.risk_credit": "std",
                    "advantage.scale": "group", "advantage.eps": 1e-6, "loss.beta": 0.0},
}


@pytest.mark.parametrize("name", sorted(METHODS_TEXT))
def test_text_preset_keeps_its_upstream_values_and_the_demo(name):
    cfg = _raw(ROOT / "configs" / "methods_text" / name)
    wrong = {k: (_get(cfg, k), v) for k, v in METHODS_TEXT[name].items() if _get(cfg, k) != v}
    assert not wrong, f"{name}: (preset, upstream) differ: {wrong}"
    demo = _raw(ROOT / "configs" / "llm_demo.yaml")  # only the method changes: model, data, batch, optimiser stay
    assert (cfg.model, cfg.data, cfg.sample, cfg.text, cfg.rewards) == (demo.model, demo.data, demo.sample, demo.text,
                                                                         demo.rewards)
    assert cfg.train.learning_rate == demo.train.learning_rate and cfg.output_dir != demo.output_dir


def _get(cfg, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return list(obj) if isinstance(obj, tuple) else obj


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_recipe_matches_published_values(name):
    cfg = _raw(ROOT / "configs" / name)
    wrong = {k: (_get(cfg, k), v) for k, v in PUBLISHED[name].items() if _get(cfg, k) != v}
    assert not wrong, f"{name}: (recipe, published) differ: {wrong}"


def test_overlays_inherit_their_base():
    """The Fast / Guard / TempFlow overlays keep Flow-GRPO's settings they do not change."""
    base = _raw(ROOT / "configs" / "flow_grpo_sd35m_pickscore.yaml")
    for name in ("flow_grpo_fast_sd35m.yaml", "grpo_guard_sd35m.yaml", "tempflow_grpo_sd35m.yaml"):
        cfg = _raw(ROOT / "configs" / name)
        assert cfg.output_dir != base.output_dir
        assert cfg.model == base.model and cfg.data == base.data and cfg.rewards == base.rewards
        assert cfg.lora.rank == 32 and cfg.lora.alpha == 64 and cfg.ema.enabled
    fast = _raw(ROOT / "configs" / "flow_grpo_fast_sd35m.yaml")
    plan = build_plan(fast.plan, fast.sample.num_steps, 3, plan_generator(fast.seed, 3))
    assert len(plan.trained_steps) == 3 and all(0 <= s < 5 for s in plan.trained_steps)
    assert plan.sde_steps == plan.trained_steps  # ODE outside the window


def test_flow_grpo_plan_trains_nine_of_ten_steps():
    cfg = _raw(ROOT / "configs" / "flow_grpo_sd35m_pickscore.yaml")
    plan = build_plan(cfg.plan, cfg.sample.num_steps, 0, plan_generator(cfg.seed, 0))
    assert plan.trained_steps == list(range(9)) and plan.sde_steps == list(range(10))


# (recipe, iteration) -> (SDE steps, trained steps, per-sample subset size, noise per SDE step,
# children per SDE step, ODE granularities), as each paper describes its sampling
PLANS = {
    ("dance_grpo_flux.yaml", 0): (list(range(16)), list(range(15)), 9, [0.3] * 16, [1] * 16, (1,)),
    ("mixgrpo_flux.yaml", 0): ([0, 1, 2, 3], [0, 1, 2, 3], 0, [0.7] * 4, [1] * 4, (1,)),
    ("mixgrpo_flux.yaml", 24): ([0, 1, 2, 3], [0, 1, 2, 3], 0, [0.7] * 4, [1] * 4, (1,)),
    ("mixgrpo_flux.yaml", 25): ([1, 2, 3, 4], [1, 2, 3, 4], 0, [0.7] * 4, [1] * 4, (1,)),
    # sweeps: every eligible step is a branch point of every iteration (the sampler gives each its own rows)
    ("g2rpo_flux.yaml", 3): (list(range(8)), list(range(8)), 0, [0.7] * 8, [1] * 8, (1, 2)),
    ("tempflow_grpo_sd35m.yaml", 0): (list(range(9)), list(range(9)), 0, [0.7] * 9, [1] * 9, (1,)),
    ("dynamic_treerpo_flux.yaml", 0): ([0, 1, 2], [0, 1, 2], 0, [0.9, 0.7, 0.5], [3, 2, 2], (1,)),
    ("dynamic_treerpo_flux.yaml", 25): ([1, 2, 3], [1, 2, 3], 0, [0.9, 0.7, 0.5], [3, 2, 2], (1,)),
}


@pytest.mark.parametrize("name,iteration", sorted(PLANS), ids=[f"{n}@{i}" for n, i in sorted(PLANS)])
def test_recipe_plan_follows_the_paper(name, iteration):
    cfg = _raw(ROOT / "configs" / name)
    p = build_plan(cfg.plan, cfg.sample.num_steps, iteration, plan_generator(cfg.seed, iteration))
    sde, trained, subset, noise, branch, gran = PLANS[(name, iteration)]
    assert p.sde_steps == sde and p.trained_steps == trained and p.subset_size == subset
    assert p.noise_level[p.sde].tolist() == pytest.approx(noise)
    assert p.branch[p.sde].tolist() == branch and tuple(p.granularities) == gran


def test_fast_clip_matches_upstream_cps_clip():
    """Upstream's CPS clip 1e-5 acts on 2 s^2 x the true log-ratio; the recipe's eps is its mean
    equivalent over the window range [0, 5) of SD3.5's 10-step shift-3 schedule."""
    from flowrl.flow.schedule import sd3_sigmas
    from flowrl.flow.steps import cps_log_ratio_scale

    cfg = _raw(ROOT / "configs" / "flow_grpo_fast_sd35m.yaml")
    sig = sd3_sigmas(cfg.sample.num_steps, shift=3.0)
    lo, hi = cfg.plan.window.range
    equiv = 1e-5 / cps_log_ratio_scale(sig[lo + 1:hi + 1], cfg.plan.noise_level)
    assert cfg.loss.eps_low == pytest.approx(float(equiv.mean()), rel=0.01)


# --------------------------------------------------------------------------------------------------
# a few recipes train one step on the tiny stand-ins
# --------------------------------------------------------------------------------------------------

RUN = ["flow_grpo_sd35m_pickscore.yaml", "grpo_guard_sd35m.yaml", "g2rpo_flux.yaml",
       "tempflow_grpo_sd35m.yaml", "mixgrpo_flux.yaml", "llm_grpo.yaml", "diffusion_nft_sd35m.yaml"]


@pytest.mark.parametrize("name", RUN)
def test_recipe_trains_one_step(name, tiny_models, tmp_path):
    from flowrl.train.loop import Trainer

    path = ROOT / "configs" / name
    out = tmp_path / "run"
    cfg = load_run_config(path, tiny_overrides(path, tiny_models, out, signal_rewards=True))
    tr = Trainer(cfg)
    before = {n: p.detach().clone() for n, p in tr.task.module.named_parameters() if p.requires_grad}
    summary = tr.run()
    assert summary["steps"] == 1
    assert (out / "summary.json").is_file() and (out / "config.yaml").is_file()
    assert list((out / "checkpoints").glob("step-00000001*")), "no checkpoint written"
    metrics = _metrics(out)
    assert len(metrics) == 1 and math.isfinite(metrics[0]["loss"]) and metrics[0]["skipped_optimizer_steps"] == 0
    assert metrics[0]["grad_norm"] > 0, "zero gradient: the stand-in rewards gave no signal"
    if not cfg.objective.forward:  # the first pass over a fresh rollout is on-policy: every ratio is 1 (up to float rounding)
        assert abs(metrics[0]["ratio_first_min"] - 1) < 1e-4 and abs(metrics[0]["ratio_first_max"] - 1) < 1e-4
    after = dict(tr.task.module.named_parameters())
    changed = sum(int(not torch.equal(before[n], after[n].detach())) for n in before)
    assert changed > 0, "no trainable weight changed after one optimizer step"
    if raw_lora_zero_init(cfg):  # LoRA B starts at 0 (weight decay cannot move it): only the gradient did
        assert any(not torch.equal(before[n], after[n].detach()) for n in before if "lora_B" in n)
    assert Path(summary["result"]).is_dir()


def raw_lora_zero_init(cfg: RunConfig) -> bool:
    """peft's 'gaussian' and default inits both start lora_B at zero."""
    return cfg.lora.enabled and cfg.lora.init in ("gaussian", "default")


def _metrics(run_dir: Path) -> List[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_flowrl_train_runs_the_tiny_lm_config(tiny_models, tmp_path, capsys):
    out = tmp_path / "llm"
    rc = flowrl_main(["train", str(ROOT / "configs" / "tiny_llm.yaml"), f"model.path={tiny_models['lm']}",
                     f"output_dir={out}", "max_steps=1", "train.tracker=none",
                     "train.progress=false", "resume=none"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 1 and "digit_accuracy" in summary["last_eval"]
    assert math.isfinite(_metrics(out)[0]["loss"])
    assert '"steps": 1' in capsys.readouterr().out  # `flowrl train` prints the summary


def test_flowrl_train_runs_the_tiny_flux_config(tiny_models, tmp_path):
    out = tmp_path / "flux"
    rc = flowrl_main(["train", str(ROOT / "configs" / "tiny_flux.yaml"), f"model.path={tiny_models['flux']}",
                     f"output_dir={out}", "max_steps=1", "train.tracker=none",
                     "train.progress=false", "resume=none", "sample.eval_num_steps=2",
                     "eval.num_prompts=1", "eval.seeds=[0]", "rewards={jpeg_compressibility: 1.0}"])
    assert rc == 0 and json.loads((out / "summary.json").read_text())["steps"] == 1
    m = _metrics(out)[0]
    assert math.isfinite(m["loss"]) and m["grad_norm"] > 0 and m["skipped_optimizer_steps"] == 0


def test_flowrl_train_rejects_bad_keys_in_one_line(capsys):
    assert flowrl_main(["train", str(ROOT / "configs" / "tiny_llm.yaml"), "train.learnig_rate=1"]) == 2
    err = capsys.readouterr().err
    assert "train.learnig_rate" in err and "train.learning_rate" in err and "Traceback" not in err
