"""flowrl.core.reference: the KL reference as the same model with its adapters disabled, for a peft
``PeftModel`` (the text path), a diffusers model with PEFT adapters (the flow path) and a PeftModel that
wraps a diffusers model (which answers both ``disable_adapter`` and ``disable_adapters``)."""
from __future__ import annotations

import pytest
import torch

from flowrl.core.reference import adapters_disabled, has_adapters, unwrap

peft = pytest.importorskip("peft")
diffusers = pytest.importorskip("diffusers")


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.proj(x)


class _TinyDiffusersModel(diffusers.ModelMixin, diffusers.ConfigMixin, diffusers.loaders.PeftAdapterMixin):
    @diffusers.configuration_utils.register_to_config
    def __init__(self, dim: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        return self.proj(x)


class _Wrapper(torch.nn.Module):  # what DistributedDataParallel looks like from outside
    def __init__(self, module):
        super().__init__()
        self.module = module


def _lora():
    return peft.LoraConfig(r=2, lora_alpha=4, target_modules=["proj"], init_lora_weights="gaussian")


def _trained(model):
    """A LoRA that changes the output (a fresh one has B = 0)."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def _peft_model():
    return _trained(peft.get_peft_model(_Net(), _lora()))


def _diffusers_model():
    m = _TinyDiffusersModel()
    m.add_adapter(_lora())
    return _trained(m)


def _peft_on_diffusers():
    return _trained(peft.get_peft_model(_TinyDiffusersModel(), _lora()))


@pytest.mark.parametrize("build", [_peft_model, _diffusers_model, _peft_on_diffusers])
@pytest.mark.parametrize("wrapped", [False, True])
def test_adapters_disabled_is_the_base_model_and_restores(build, wrapped):
    model = build()
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    base = _Net()(x)  # the same seeded base weights, no adapter
    outer = _Wrapper(model) if wrapped else model
    assert unwrap(outer) is model and has_adapters(outer)
    with torch.no_grad():
        tuned = model(x)
        assert not torch.allclose(tuned, base), "the LoRA does not change the output: the test would be vacuous"
        with adapters_disabled(outer):
            torch.testing.assert_close(model(x), base, rtol=0, atol=0)
        torch.testing.assert_close(model(x), tuned, rtol=0, atol=0)
        with pytest.raises(RuntimeError):
            with adapters_disabled(outer):
                raise RuntimeError("inside")
        torch.testing.assert_close(model(x), tuned, rtol=0, atol=0)


def test_no_adapters():
    assert not has_adapters(_Net()) and not has_adapters(_TinyDiffusersModel())
