"""Building the policy from a run config: paths, hub ids, and the fixed-shift option."""
import pytest
import torch

from flowrl.config import load_run_config
from flowrl.flow.schedule import flux_sigmas
from flowrl.inputs import UsageError
from flowrl.train.model import build_flow_policy


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    from flowrl.demo.tiny_image import save_tiny

    return str(save_tiny("flux", tmp_path_factory.mktemp("flux") / "m"))


def test_fixed_shift_replaces_resolution_dependent_shifting(tiny_flux):
    base = build_flow_policy(load_run_config(None, [f"model.path={tiny_flux}", "model.family=flux"]).model)
    fixed = build_flow_policy(load_run_config(None, [f"model.path={tiny_flux}", "model.family=flux", "model.shift=3"]).model)
    seq = base.image_seq_len(32, 32)
    torch.testing.assert_close(base.sigmas(6, 32, 32), flux_sigmas(6, seq))
    s = fixed.sigmas(6, 32, 32)
    assert not torch.allclose(s, base.sigmas(6, 32, 32))
    # Flux feeds sigmas linspace(1, 1/n, n); a fixed shift 3 maps each t to 3t / (1 + 2t)
    t = torch.linspace(1.0, 1.0 / 6, 6, dtype=torch.float64)
    torch.testing.assert_close(s[:-1].double(), 3 * t / (1 + 2 * t), atol=1e-6, rtol=0)
    assert s[-1] == 0


def test_missing_model_path_and_bad_shift(tmp_path):
    with pytest.raises(UsageError, match="model.path not found"):
        build_flow_policy(load_run_config(None, [f"model.path={tmp_path / 'nope'}"]).model)
    with pytest.raises(UsageError, match="model.path is empty"):
        build_flow_policy(load_run_config(None, []).model)
