"""The LLM text path: offline tiny Qwen2 + char tokenizer, rollouts, masks, one GRPO update."""
import pytest
import torch

from flowrl.core.advantages import AdvantageConfig, compute_advantages
from flowrl.core.losses import loss_normalizers, loss_preset
from flowrl.demo.tiny_text import build_tiny_lm, save_tiny_lm
from flowrl.text.learner import TextLearner
from flowrl.text.rewards import score_completions, resolve_reward
from flowrl.text.rollout import completion_mask_from_ids, generate, token_logps
from flowrl.train.model import load_lm


@pytest.fixture(scope="module")
def lm():
    return build_tiny_lm(seed=0)


def test_completion_mask_stops_after_first_eos():
    ids = torch.tensor([[5, 1, 7, 7], [5, 6, 7, 8], [1, 0, 0, 0]])
    mask, trunc = completion_mask_from_ids(ids, eos_token_id=1)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert trunc.tolist() == [False, True, False]


def test_generation_is_per_row_seeded_and_batch_independent(lm):
    model, tok = lm
    a = generate(model, tok, ["12+3=", "7+8="], group_size=3, max_new_tokens=6, seed=1)
    b = generate(model, tok, ["7+8="], group_size=3, max_new_tokens=6, seed=1)
    # prompt "7+8=" gets the same completions whether or not another prompt shares the batch
    assert a.completions[3:] == b.completions
    assert a.prompt_index.tolist() == [0, 0, 0, 1, 1, 1]
    c = generate(model, tok, ["12+3=", "7+8="], group_size=3, max_new_tokens=6, seed=2)
    assert c.completions != a.completions  # another seed, other samples
    # a prompt's keys name its rows' streams: the same keys give the same rows in any batch
    d = generate(model, tok, ["7+8=", "12+3="], group_size=3, max_new_tokens=6, seed=1, prompt_keys=[(0, 1, 1), (0, 0, 0)])
    e = generate(model, tok, ["12+3="], group_size=3, max_new_tokens=6, seed=1, prompt_keys=[(0, 0, 0)])
    assert d.completions[3:] == e.completions


def test_padding_and_prompt_tokens_are_excluded_from_logps(lm):
    model, tok = lm
    ro = generate(model, tok, ["1+1=", "123+456="], group_size=2, max_new_tokens=5, seed=0)
    lp = token_logps(model, ro.input_ids(), ro.attention_mask(), ro.completion_ids.shape[1])
    assert lp.shape == ro.completion_ids.shape
    # same prompt without left padding gives the same completion log-probs (positions follow the mask)
    row = 0  # "1+1=" is left-padded in this batch
    assert ro.prompt_mask[row].sum() < ro.prompt_mask.shape[1]
    n_pad = int((ro.prompt_mask[row] == 0).sum())
    ids = ro.input_ids()[row:row + 1, n_pad:]
    am = ro.attention_mask()[row:row + 1, n_pad:]
    alone = token_logps(model, ids, am, ro.completion_ids.shape[1])
    m = ro.completion_mask[row].bool()
    torch.testing.assert_close(alone[0][m], lp[row][m], atol=1e-5, rtol=1e-5)


def test_rewards_nan_for_unscorable_and_failing_functions(caplog):
    def boom(prompts, completions, **_):
        raise RuntimeError("down")

    fns = {"exact_match": resolve_reward("exact_match"), "none": lambda prompts, completions, **_: [None, 1.0], "boom": boom}
    r, names = score_completions(fns, ["a", "b"], ["4", "5"], {"answer": ["4", "6"]})
    assert names == ["exact_match", "none", "boom"]
    assert r[:, 0].tolist() == [1.0, 0.0]
    assert torch.isnan(r[0, 1]) and r[1, 1] == 1.0
    assert torch.isnan(r[:, 2]).all()
    assert "boom raised RuntimeError" in caplog.text
    with pytest.raises(KeyError, match="unknown reward function"):
        resolve_reward("nope")


@pytest.mark.parametrize("preset", ["grpo", "bnpo", "dr_grpo", "dapo", "gspo"])
def test_one_update_is_on_policy_first_and_changes_the_model(preset):
    model, tok = build_tiny_lm(seed=0)
    learner = TextLearner(model, tok, loss_preset(preset), max_new_tokens=6, chunk_size=3)
    prompts = ["12+3=", "7+8="]
    answers = ["15", "15"]
    ro = learner.rollout(prompts, group_size=4, seed=0)
    rewards = torch.tensor(resolve_reward("digit_accuracy")(prompts, ro.completions,
                                                               answer=[answers[i] for i in ro.prompt_index.tolist()]))
    rewards = rewards + 0.01 * torch.arange(8)  # no zero-variance group
    adv, _ = compute_advantages(rewards, ro.prompt_index, AdvantageConfig())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    mode = learner.loss.aggregation
    norm = loss_normalizers(ro.completion_mask, mode)
    stats = learner.minibatch_gradient(ro, adv, normalizer=norm)
    assert stats["ratio_min"] == 1.0 and stats["ratio_max"] == 1.0  # exactly on-policy
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    changed = sum(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert changed > 0


def test_on_policy_update_needs_no_old_logprob_pass():
    """TRL's shortcut: with the sampling weights, the update's own detached log-probs are the old
    ones. The gradient equals the one against a separate old pass with the same chunking (same
    process: bit-exact), and an off-policy minibatch without old log-probs is refused."""
    model, tok = build_tiny_lm(seed=2)
    learner = TextLearner(model, tok, loss_preset("grpo"), max_new_tokens=5, chunk_size=3)
    ro = learner.rollout(["3+4=", "9+9="], group_size=3, seed=0, old_logps=False)
    assert ro.old_logps is None
    adv = torch.randn(ro.num_samples)
    norm = loss_normalizers(ro.completion_mask, "seq-mean-token-mean")
    with pytest.raises(ValueError, match="old log-probs missing"):
        learner.minibatch_gradient(ro, adv, normalizer=norm)
    grads = []
    for on_policy in (True, False):
        model.zero_grad()
        if not on_policy:
            learner.fill_old_logps(ro, torch.arange(ro.num_samples))
        st = learner.minibatch_gradient(ro, adv, normalizer=norm, on_policy=on_policy)
        assert st["ratio_min"] == 1.0 and st["ratio_max"] == 1.0
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.equal(grads[0], grads[1])
    # rows not filled stay NaN; a minibatch of the filled rows only is accepted off-policy
    ro2 = learner.rollout(["3+4=", "9+9="], group_size=3, seed=0, old_logps=False)
    learner.fill_old_logps(ro2, torch.tensor([3, 4, 5]))
    assert torch.isnan(ro2.old_logps[:3]).all() and torch.equal(ro2.old_logps[3:], ro.old_logps[3:])
    learner.minibatch_gradient(ro2.select([3, 4, 5]), adv[3:], normalizer=norm)


def test_chunking_does_not_change_the_gradient():
    model, tok = build_tiny_lm(seed=1)
    ro = TextLearner(model, tok, loss_preset("grpo"), max_new_tokens=5).rollout(["3+4=", "9+9="], group_size=3, seed=0)
    ro.old_logps = ro.old_logps + 0.05 * torch.randn(ro.old_logps.shape)  # off-policy: clipping active
    adv = torch.randn(ro.num_samples)
    grads = []
    for chunk in (ro.num_samples, 2):
        model.zero_grad()
        learner = TextLearner(model, tok, loss_preset("grpo"), max_new_tokens=5, chunk_size=chunk)
        learner.minibatch_gradient(ro, adv, normalizer=loss_normalizers(ro.completion_mask, "seq-mean-token-mean"))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_kl_with_lora_uses_the_adapter_disabled_reference(tmp_path):
    from peft import get_peft_model

    from flowrl.train.lora import lora_config

    path = save_tiny_lm(tmp_path / "lm", seed=0)
    model, tok = load_lm(str(path))
    model = get_peft_model(model, lora_config("lm", rank=4, alpha=8))
    learner = TextLearner(model, tok, loss_preset("grpo", beta=0.04), max_new_tokens=4)
    ro = learner.rollout(["1+2="], group_size=2, seed=0)
    # a fresh LoRA (B=0) equals its base model: reference log-probs equal the old ones
    torch.testing.assert_close(ro.ref_logps, ro.old_logps)
    with pytest.raises(ValueError, match="LoRA model"):
        TextLearner(build_tiny_lm()[0], tok, loss_preset("grpo", beta=0.1)).rollout(["1+2="], group_size=1, seed=0)


def test_load_lm_rejects_a_folder_without_config(tmp_path):
    from flowrl.inputs import UsageError

    with pytest.raises(UsageError, match="not a transformers model folder"):
        load_lm(str(tmp_path))
