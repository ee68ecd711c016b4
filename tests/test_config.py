"""Config loading: YAML + dotted overrides, and one-line errors with exit status 2."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flowrl.cli import main
from flowrl.config import MOVED, ConfigError, RunConfig, dump, load, load_run_config, to_dict


def test_defaults_and_overrides_parse_types():
    cfg = load_run_config(None, ["sample.num_steps=12", "seed=3", "model.path=123", "sample.guidance_scale=1"])
    assert cfg.sample.num_steps == 12 and cfg.seed == 3
    assert cfg.model.path == "123"  # a str field keeps the raw text
    assert isinstance(cfg.sample.guidance_scale, float) and cfg.sample.guidance_scale == 1.0


def test_yaml_then_overrides_win(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("seed: 5\nsample:\n  num_steps: 7\n  group_size: 3\n")
    cfg = load_run_config(p, ["sample.group_size=6"])
    assert (cfg.seed, cfg.sample.num_steps, cfg.sample.group_size) == (5, 7, 6)


def test_dump_round_trip(tmp_path):
    cfg = load_run_config(None, ["sample.num_steps=9", "model.frozen_dtype=bfloat16"])
    dump(cfg, tmp_path / "config.yaml")
    again = load(RunConfig, tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(cfg)


@pytest.mark.parametrize(
    "override, key, fragment",
    [
        (["sample.num_step=3"], "sample.num_step", "did you mean 'sample.num_steps'"),
        (["modle.path=x"], "modle.path", "did you mean 'model.path'"),
        (["sample.num_steps=-1"], "sample.num_steps", ">= 1"),
        (["sample.num_steps=abc"], "sample.num_steps", "expected an integer"),
        (["model.family=sdx"], "model.family", "did you mean 'sd3'"),
        (["sample.height=65"], "sample.height", "multiple of 8"),
        (["max_steps=-2"], "max_steps", ">= 0"),
        (["sample.guidance_scale=yes"], "sample.guidance_scale", "expected a number"),
        (["seed"], "seed", "dotted.key=value"),
        (["seed.x=1"], "seed.x", "not a section"),
    ],
)
def test_bad_values_name_the_key(override, key, fragment):
    with pytest.raises(ConfigError) as ei:
        load_run_config(None, override)
    assert ei.value.key == key
    assert fragment in str(ei.value)


def test_unknown_yaml_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("sample:\n  grop_size: 3\n")
    with pytest.raises(ConfigError, match="sample.grop_size: unknown key; did you mean 'sample.group_size'"):
        load_run_config(p)


def test_cli_reports_one_line_and_exit_2(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text("sample:\n  num_steps: 4\n")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    rc = main(["sample", str(p), "sample.windw=3", "--prompts", str(prompts), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "sample.windw" in err and "Traceback" not in err


def test_console_script_exit_status(tmp_path):
    """The installed entry point itself exits 2 with one line (no traceback)."""
    p = tmp_path / "c.yaml"
    p.write_text("sample: [1, 2]\n")
    r = subprocess.run([sys.executable, "-m", "flowrl.cli", "sample", str(p), "--prompts", "x", "--out", "y"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "sample" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------ non-finite and absurd numbers


def _float_keys(cls, prefix=""):
    """(dotted key, type, default) of every field of the run config that holds floats."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            yield from _float_keys(tp, key + ".")
            continue
        args = typing.get_args(tp)
        if tp is float or float in args or any(float in typing.get_args(a) for a in args):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            yield key, tp, default


_FLOAT_KEYS = list(_float_keys(RunConfig))
_INF_MEANS_SOMETHING = {"train.max_grad_norm"}  # .inf: no gradient clipping


def test_float_keys_cover_every_section():
    keys = {k for k, _, _ in _FLOAT_KEYS}
    for k in ("time_budget_s", "rewards", "model.shift", "sample.guidance_scale", "text.temperature", "text.top_p",
              "eval.guidance_scale", "train.learning_rate", "train.weight_decay", "train.adam_eps", "train.adam_betas",
              "lora.alpha", "plan.noise_level", "plan.tree.branch_noise", "advantage.eps", "advantage.clip",
              "advantage.reward_weights", "loss.eps_low", "loss.kl_target", "loss.sapo_tau_neg"):
        assert k in keys, k


@pytest.mark.parametrize("bad", [".nan", ".inf", "-.inf"])
@pytest.mark.parametrize("key, tp, default", _FLOAT_KEYS, ids=[k for k, _, _ in _FLOAT_KEYS])
def test_every_float_key_rejects_nan_and_inf(key, tp, default, bad):
    import typing

    if key == "rewards":
        override, want = f"rewards.shapes={bad}", "rewards.shapes"
    elif typing.get_origin(tp) in (list, tuple) or any(typing.get_origin(a) in (list, tuple) for a in typing.get_args(tp)):
        n = len(default) if default else {"plan.tree.branch_noise": 2, "advantage.reward_weights": 1}[key]
        override, want = f"{key}=[{', '.join([bad] * n)}]", key
    else:
        override, want = f"{key}={bad}", key
    if bad == ".inf" and key in _INF_MEANS_SOMETHING:
        load_run_config(None, [override])
        return
    with pytest.raises(ConfigError) as ei:
        load_run_config(None, [override])
    assert ei.value.key == want, str(ei.value)
    assert "\n" not in str(ei.value)


@pytest.mark.parametrize(
    "override, key, fragment",
    [
        (["train.learning_rate=.inf"], "train.learning_rate", "must be a finite number > 0 and <= 1"),
        (["train.learning_rate=10"], "train.learning_rate", "an AdamW learning rate above 1 is never meant"),
        (["train.learning_rate=0"], "train.learning_rate", "> 0"),
        (["rewards={shapes: .inf}"], "rewards.shapes", "must be a finite number"),
        (["time_budget_s=-1"], "time_budget_s", "must be a finite number > 0 or null"),
        (["time_budget_s=0"], "time_budget_s", "> 0"),
        (["train.weight_decay=-0.1"], "train.weight_decay", ">= 0"),
        (["train.adam_eps=0"], "train.adam_eps", "> 0"),
        (["model.shift=0"], "model.shift", "> 0 or null"),
        (["model.device=gpu"], "model.device", "not a torch device"),
        (["sample.guidance_scale=-1"], "sample.guidance_scale", ">= 0"),
        (["loss.sapo_tau_neg=0"], "loss.sapo_tau_neg", "> 0"),
        (["advantage.reward_weights=[1, 2]"], "advantage.reward_weights", "2 weights for the 1 reward(s)"),
        (["advantage.normalize_weights=true", "rewards={shapes: 1, jpeg: -1}"], "advantage.normalize_weights",
         "positive sum"),
        (["advantage.stat_tracking=true", "advantage.ngrpo_max_reward=1"], "advantage.stat_tracking",
         "ngrpo_max_reward"),
        (["advantage.stat_tracking=true", "advantage.multi_reward=normalize_then_sum",
          "rewards={shapes: 1, jpeg: 1}"], "advantage.stat_tracking", "normalize_then_sum"),
        (["lora.rank=0"], "lora.rank", ">= 1"),
        (["ema.decay=1"], "ema.decay", "< 1"),
        (["ema.every=0"], "ema.every", ">= 1"),
        (["plan.window.size=0"], "plan.window.size", ">= 1"),
        (["plan.kind=window", "plan.window.size=9"], "plan.window.size", "do not fit"),
        (["plan.tail.ratio=2"], "plan.tail.ratio", "(0, 1]"),
        (["plan.singular.sweep_split=steps"], "plan.singular.sweep_split", "not one of"),
    ],
)
def test_absurd_values_name_the_key(override, key, fragment):
    with pytest.raises(ConfigError) as ei:
        load_run_config(None, override)
    assert ei.value.key == key
    assert fragment in str(ei.value)


def test_meaningful_edge_values_still_load():
    cfg = load_run_config(None, ["train.learning_rate=1", "train.max_grad_norm=.inf", "time_budget_s=null",
                                 "rewards={shapes: 0}", "sample.guidance_scale=0", "train.weight_decay=0",
                                 "model.device=cuda:1"])
    assert cfg.train.learning_rate == 1.0 and cfg.train.max_grad_norm == float("inf") and cfg.time_budget_s is None
    # the tracker is not used by tree plans: its NGRPO conflict does not apply there (preflight warns instead)
    load_run_config(None, ["advantage.stat_tracking=true", "advantage.ngrpo_max_reward=1", "plan.kind=tree",
                           "sample.same_noise=true"])


def test_cli_refuses_an_infinite_learning_rate_in_one_line(tmp_path, capsys):
    demo = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
    rc = main(["train", str(demo), "train.learning_rate=.inf", f"output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "train.learning_rate" in err and "Traceback" not in err


# ------------------------------------------------------------------------------ keys of earlier versions


def _nested(key: str, value) -> dict:
    """``{"a": {"b": value}}`` for the dotted key ``a.b``."""
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


@pytest.mark.parametrize("old, new", sorted(MOVED.items()))
def test_moved_keys_name_their_new_place(old, new, tmp_path):
    with pytest.raises(ConfigError) as ei:
        load_run_config(None, [f"{old}=1"])
    assert str(ei.value) == f"{old}: moved to {new}"
    p = tmp_path / "old.yaml"
    p.write_text(yaml.safe_dump(_nested(old, 1)))
    with pytest.raises(ConfigError) as ei:
        load_run_config(p)
    assert str(ei.value) == f"{old}: moved to {new}"


def test_moved_keys_in_an_included_base_and_sections_that_kept_the_name(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("train:\n  ema_decay: 0.9\n")
    (tmp_path / "c.yaml").write_text("include: base.yaml\nseed: 1\n")
    with pytest.raises(ConfigError, match="^train.ema_decay: moved to ema.decay$"):
        load_run_config(tmp_path / "c.yaml")
    # plan.window is a section now: a mapping there is the new form, not the old key
    (tmp_path / "new.yaml").write_text("plan:\n  kind: window\n  window:\n    size: 3\n")
    cfg = load_run_config(tmp_path / "new.yaml", ["plan.window.start=1", "plan.window={size: 2}"])
    assert (cfg.plan.window.size, cfg.plan.window.start) == (2, 0)
    assert load_run_config(tmp_path / "new.yaml", ["plan.window.start=1"]).plan.window.size == 3


def test_cli_refuses_a_moved_key_in_one_line(tmp_path, capsys):
    demo = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
    rc = main(["train", str(demo), "train.lora_rank=8", f"output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.strip().endswith("train.lora_rank: moved to lora.rank"), err


# What flowrl 4ad3c63 saved (meta.json "config") for the demo's config of the time (a 3-step window plan), in the
# parts that moved since.
_OLD_PLAN = {"kind": "full", "noise_level": 0.7, "sde": "flow_sde", "reduction": "mean", "train_last_step": False,
             "fraction": 0.6, "per_sample": True, "window": 3, "window_start": 0, "stride": 1,
             "shift_interval": 1000000, "schedule": "progressive", "roll_back": True, "min_shift_interval": None,
             "exp_k": 0.1, "exp_threshold": 13, "window_range": None, "ode_solver": "euler", "head_solver": None,
             "compress_ratio": None, "compress_shift": 3.0, "singular_steps": None, "singular_choice": "random",
             "granularities": [1], "branch_factors": [2, 2], "branch_steps": None, "branch_noise": None,
             "tree_dedup": True}
_OLD_TRAIN = {"sweep_split": "branch", "lora": True, "lora_rank": 16, "lora_alpha": 32.0, "lora_targets": None,
              "lora_init": "gaussian", "ema": True, "ema_decay": 0.97, "ema_every": 1, "step_weighting": "none",
              "step_weight_scale": None, "per_prompt_stat_tracking": False, "stat_buffer_size": 32,
              "stat_min_count": 0}


def _saved_by_4ad3c63(cfg) -> dict:
    d = to_dict(cfg)
    for name in ("lora", "ema"):
        del d[name]
    for name in ("stat_tracking", "stat_buffer_size", "stat_min_count"):
        del d["advantage"][name]
    d["train"].update(_OLD_TRAIN)
    d["plan"] = dict(_OLD_PLAN)
    return d


def test_a_checkpoint_with_the_old_keys_still_resumes(tmp_path):
    from flowrl.inputs import UsageError
    from flowrl.train.guard import check_resume_config

    # the demo's window plan of that time (configs/demo.yaml has run other presets since)
    demo = Path(__file__).resolve().parent.parent / "configs" / "methods" / "flow_grpo.yaml"
    cfg = load_run_config(demo)
    saved = _saved_by_4ad3c63(cfg)
    assert check_resume_config(saved, to_dict(cfg), tmp_path) == []
    changed = load_run_config(demo, ["lora.rank=8"])
    with pytest.raises(UsageError, match="^resume: lora.rank is 16 in checkpoint .* and 8 now"):
        check_resume_config(saved, to_dict(changed), tmp_path)
    changed = load_run_config(demo, ["plan.window.size=2"])
    with pytest.raises(UsageError, match="^resume: plan.window.size is 3 in checkpoint"):
        check_resume_config(saved, to_dict(changed), tmp_path)
