"""Parity of flowrl.core with TRL 1.16's own GRPOTrainer loss and advantages (CPU, offline).

Harness (research notes llm_core.md section 4.3-4.4): a tiny random Qwen2 and a character-level
tokenizer are built offline and saved to a temp dir; a real ``GRPOTrainer`` is constructed for
each configuration; its ``_get_per_token_logps_and_entropies`` is monkeypatched to return a
synthetic leaf tensor, and the loss *and* its gradient from TRL's ``_compute_loss`` are compared
with ``flowrl.core.policy_loss`` using the matching preset. Advantages are compared on the
output of TRL's real ``_generate_and_score_completions`` (generation with the tiny model).
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch
import trl  # the dev extra pins it (pyproject.toml): a missing or broken trl fails here, it is not skipped

pytestmark = pytest.mark.trl

from flowrl.core import (  # noqa: E402
    AdvantageConfig,
    advantage_preset,
    compute_advantages,
    loss_normalizers,
    loss_preset,
    policy_loss,
)

MAX_LEN = 7  # max_completion_length (the Dr. GRPO constant)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    path = tmp_path_factory.mktemp("tiny_qwen2")
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789 .,!?")
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<eos>", "<unk>"] + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left"
    )
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        pad_token_id=0, eos_token_id=1,
    )
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _trainer(tiny_dir, reward_funcs, **cfg):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(
        output_dir=os.path.join(tiny_dir, "out"), use_cpu=True, report_to="none", save_strategy="no",
        per_device_train_batch_size=8, num_generations=4, max_completion_length=MAX_LEN,
        logging_steps=1, seed=0, **cfg,
    )
    ds = Dataset.from_dict({"prompt": ["abc", "hello", "xyz", "foo"]})
    trainer = GRPOTrainer(model=tiny_dir, reward_funcs=reward_funcs, args=args, train_dataset=ds)
    trainer.model.train()
    return trainer


def _zero_reward(completions, **kwargs):
    return [0.0 for _ in completions]


def _synthetic_batch(seed=0, b=6, t=MAX_LEN):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([t, 3, 0, 5, 1, t - 1])[:b]
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    logps = -torch.rand(b, t, generator=gen) * 2 - 0.05
    old = logps + 0.4 * torch.randn(b, t, generator=gen)  # off-policy enough to clip on both sides
    ref = logps + 0.3 * torch.randn(b, t, generator=gen)
    adv = torch.randn(b, generator=gen)
    return logps, old, ref, mask, adv


def _trl_loss_and_grad(trainer, logps, old, ref, mask, adv, beta):
    leaf = logps.clone().requires_grad_(True)
    b, t = mask.shape
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (leaf, torch.rand(b, t), None)
    trainer.current_gradient_accumulation_steps = 1
    inputs = {
        "prompt_ids": torch.ones(b, 2, dtype=torch.long),
        "prompt_mask": torch.ones(b, 2, dtype=torch.long),
        "completion_ids": torch.ones(b, t, dtype=torch.long),
        "completion_mask": mask,
        "advantages": adv,
        "old_per_token_logps": old,
        "num_items_in_batch": mask.sum(),
    }
    if beta != 0:
        inputs["ref_per_token_logps"] = ref
    loss = trainer._compute_loss(trainer.model, inputs)
    (g,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), g


def _ours(name, logps, old, ref, mask, adv, **cfg):
    c = loss_preset(name, **cfg)
    leaf = logps.clone().requires_grad_(True)
    norm = loss_normalizers(mask, c.aggregation, max_len=MAX_LEN)
    loss, _ = policy_loss(leaf, old, adv, mask.bool(), c, normalizer=norm, ref_logps=ref)
    (g,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), g


# TRL loss_type / importance level for each of our presets
_TRL_NAME = {
    "grpo": ("grpo", "token"),
    "bnpo": ("bnpo", "token"),
    "dr_grpo": ("dr_grpo", "token"),
    "dapo": ("dapo", "token"),
    "gspo": ("grpo", "sequence"),
    "luspo": ("luspo", "sequence"),
    "cispo": ("cispo", "token"),
    "sapo": ("sapo", "token"),
}


def _cases():
    main = itertools.product(["grpo", "bnpo", "dr_grpo", "dapo", "gspo"], [0.0, 0.04], [None, 1.5], [None, 0.28])
    for name, beta, delta, eps_high in main:
        for bias in ([True] if beta == 0 else [False, True]):
            yield name, beta, delta, eps_high, bias
    for name, beta, bias in itertools.product(["cispo", "luspo", "sapo"], [0.0, 0.04], [False, True]):
        if beta == 0 and not bias:
            continue
        yield name, beta, None, (5.0 if name == "cispo" else None), bias


def test_trl_version_is_pinned():
    # the parity below is for the pinned release (the dev extra installs trl==1.16.0)
    assert trl.__version__ == "1.16.0"


def test_loss_and_gradient_match_trl(tiny_dir):
    logps, old, ref, mask, adv = _synthetic_batch()
    checked = 0
    worst = 0.0
    for name, beta, delta, eps_high, bias in _cases():
        trl_type, level = _TRL_NAME[name]
        eps = 3e-4 if name == "gspo" else 0.2
        trl_eps_high = (4e-4 if name == "gspo" else None) if eps_high is None else eps_high
        trainer = _trainer(
            tiny_dir, [_zero_reward], loss_type=trl_type, importance_sampling_level=level, beta=beta,
            epsilon=eps, epsilon_high=trl_eps_high, delta=delta, use_bias_correction_kl=bias,
        )
        l_trl, g_trl = _trl_loss_and_grad(trainer, logps, old, ref, mask, adv, beta)
        ours_eps_high = trl_eps_high if trl_eps_high is not None else eps  # TRL: None -> epsilon
        l_us, g_us = _ours(
            name, logps, old, ref, mask, adv, beta=beta, delta=delta, eps_low=eps, eps_high=ours_eps_high,
            kl_ratio_weighted="importance" if bias else "none",
        )
        tag = f"{name} beta={beta} delta={delta} eps_high={trl_eps_high} bias_kl={bias}"
        torch.testing.assert_close(l_us, l_trl, rtol=1e-6, atol=1e-6, msg=lambda m: f"loss {tag}: {m}")
        torch.testing.assert_close(g_us, g_trl, rtol=1e-5, atol=1e-6, msg=lambda m: f"grad {tag}: {m}")
        worst = max(worst, (l_us - l_trl).abs().item(), (g_us - g_trl).abs().max().item())
        checked += 1
    assert checked == 69  # 5 presets x 2 delta x 2 eps_high x (beta 0 | beta .04 x bias F/T) + 9
    # the synthetic batch really exercises the clip on both sides
    w = torch.exp(logps - old)[mask.bool()]
    assert (w > 1.28).any() and (w < 0.8).any() and (w > 1.5).any()
    assert worst < 1e-5


def test_bias_correction_default_changes_the_loss(tiny_dir):
    """TRL 1.16 defaults use_bias_correction_kl=True; our grpo preset follows it, 'none' does not."""
    logps, old, ref, mask, adv = _synthetic_batch(seed=1)
    trainer = _trainer(tiny_dir, [_zero_reward], loss_type="grpo", beta=0.04)  # TRL's default here
    assert trainer.args.use_bias_correction_kl is True
    l_trl, _ = _trl_loss_and_grad(trainer, logps, old, ref, mask, adv, 0.04)
    l_pre, _ = _ours("grpo", logps, old, ref, mask, adv, beta=0.04)
    l_off, _ = _ours("grpo", logps, old, ref, mask, adv, beta=0.04, kl_ratio_weighted="none")
    torch.testing.assert_close(l_pre, l_trl, rtol=1e-6, atol=1e-6)
    assert abs(l_off.item() - l_trl.item()) > 1e-4


class _Recorder:
    """Two reward functions with some None (NaN) outputs; records what TRL received."""

    def __init__(self):
        self.calls: list[list[float | None]] = []

    def length(self, completions, **kwargs):
        out = [float(len(c)) for c in completions]
        out[2] = None  # row 2: unscorable by this function
        self.calls.append(out)
        return out

    def vowels(self, completions, prompts=None, **kwargs):
        out: list[float | None] = []
        for i, (p, c) in enumerate(zip(prompts, completions)):
            if p == "xyz":
                out.append(1.0)  # constant within this prompt's group
            else:
                out.append(float(sum(ch in "aeiou" for ch in c)) + 0.1 * i)
        out[2] = None  # row 2 is unscorable by every function -> advantage 0
        out[5] = None  # row 5: partially scored
        self.calls.append(out)
        return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("multi", ["sum_then_normalize", "normalize_then_sum"])
def test_advantages_match_trl(tiny_dir, scale, multi):
    rec = _Recorder()
    weights = [1.0, 0.5]
    trainer = _trainer(
        tiny_dir, [rec.length, rec.vowels], scale_rewards=scale, multi_objective_aggregation=multi,
        reward_weights=weights, beta=0.0, loss_type="grpo",
    )
    g = trainer.num_generations
    batch = [{"prompt": p} for p in ["abc", "hello", "xyz", "foo"] for _ in range(g)]  # 4 groups of G
    torch.manual_seed(0)
    out = trainer._generate_and_score_completions(batch)
    assert len(rec.calls) == 2
    rewards = torch.tensor(
        [[float("nan") if v is None else v for v in col] for col in rec.calls], dtype=torch.float32
    ).T  # [N, 2]
    group_ids = torch.arange(rewards.shape[0]) // g
    if multi == "normalize_then_sum":  # TRL ignores scale_rewards here (GDPO)
        cfg = advantage_preset("gdpo", reward_weights=tuple(weights))
    else:
        cfg = AdvantageConfig(scale=scale, nan_policy="all", reward_weights=tuple(weights))
    ours, st = compute_advantages(rewards, group_ids, cfg)
    torch.testing.assert_close(ours, out["advantages"].float(), rtol=1e-5, atol=2e-5)
    assert ours[2] == 0.0 and not st["keep"][2]  # unscorable row
    assert st["keep"][5]  # partially scored row stays (TRL nansum semantics)
    assert rewards.shape == (4 * g, 2) and ours.abs().max() > 0.1  # a non-trivial batch
    assert torch.isnan(rewards[:, 0]).sum() == 1 and torch.isnan(rewards[:, 1]).sum() == 2
    assert (rewards[2 * g : 3 * g, 1] == 1.0).all()  # the constant "xyz" column
