"""Config loading: YAML + dotted overrides, and one-line errors with exit status 2."""
import subprocess
import sys

import pytest

from flowrl.cli import main
from flowrl.config import ConfigError, RunConfig, dump, load, load_run_config, to_dict


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
