"""The demo LM: supervised pretraining (a few steps), its evaluation helpers, the script, and the
shipped ``assets/demo_lm`` folder."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from flowrl.demo import pretrain_text as pt
from flowrl.demo.arithmetic import arithmetic_records
from flowrl.demo.pretrain_text import (
    PretrainConfig,
    RLCheckConfig,
    answer_nll,
    exact_match_rate,
    greedy_accuracy,
    greedy_completions,
    pass_at_k,
    pretrain,
    rl_check,
    save_demo_lm,
    sft_batch,
    task_records,
)
from flowrl.demo.tiny_text import build_tiny_lm, char_tokenizer

ROOT = Path(__file__).resolve().parent.parent
ASSET = ROOT / "assets" / "demo_lm"
TINY = dict(hidden_size=32, layers=1, heads=2, kv_heads=1, intermediate_size=64, num_train=256, num_val=32,
            num_test=32, batch_size=32, warmup_steps=0, learning_rate=1e-2)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_sft_batch_masks_the_prompt_and_the_padding():
    tok = char_tokenizer()
    recs = [{"prompt": "37+58=", "answer": "95"}, {"prompt": "99+99=", "answer": "198"}]
    b = sft_batch(tok, recs)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (2, 10)
    text0 = tok.decode(b["input_ids"][0][b["attention_mask"][0].bool()])
    assert text0 == "37+58=95" + tok.eos_token
    lab0 = b["labels"][0].tolist()
    assert lab0[:6] == [-100] * 6  # the prompt is not learned
    assert tok.decode(lab0[6:9]) == "95" + tok.eos_token
    assert lab0[9] == -100 and b["attention_mask"][0, 9] == 0 and b["input_ids"][0, 9] == tok.pad_token_id
    assert tok.decode(b["labels"][1, 6:].tolist()) == "198" + tok.eos_token and b["attention_mask"][1].all()
    with pytest.raises(ValueError, match="records"):
        sft_batch(tok, [])


def test_answer_nll_matches_a_float64_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=g)
    labels = torch.tensor([[-100, -100, 2, 3, -100], [-100, 1, 1, -100, -100], [-100, -100, -100, -100, 6]])
    terms = []
    for i in range(3):
        for t in range(4):
            y = int(labels[i, t + 1])
            if y != -100:
                terms.append(-torch.log_softmax(logits[i, t].double(), -1)[y])
    ref = torch.stack(terms).mean()
    torch.testing.assert_close(answer_nll(logits, labels).double(), ref, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="logits/labels"):
        answer_nll(logits, labels[:, :4])


def test_config_validation_names_the_argument():
    for kw, name in [({"hidden_size": 30, "heads": 4}, "hidden_size"), ({"kv_heads": 3}, "kv_heads"),
                     ({"target_accuracy": 0.0}, "target_accuracy"), ({"ops": ("*",)}, "ops"),
                     ({"batch_size": 0}, "batch_size"), ({"learning_rate": 0.0}, "learning_rate")]:
        with pytest.raises(ValueError, match=name):
            PretrainConfig(**kw).validate()
    with pytest.raises(ValueError, match="group_size"):
        RLCheckConfig(group_size=0).validate()


def test_task_records_are_disjoint_and_match_the_rl_sources():
    cfg = PretrainConfig(num_train=300, num_val=50, num_test=40, seed=3)
    train, val, test = task_records(cfg)
    assert (len(train), len(val), len(test)) == (300, 50, 40)
    keys = lambda rs: {r["prompt"] for r in rs}  # noqa: E731
    assert not keys(train) & keys(val) and not keys(train) & keys(test) and not keys(val) & keys(test)
    # the held-out set is what the RL loop's 'arithmetic:test' draws with the same seed
    assert test == arithmetic_records("test", 40, seed=3)
    for r in train[:20]:
        a, b = map(int, r["prompt"][:-1].split("+"))
        assert str(a + b) == r["answer"]


def test_few_steps_lower_the_loss_are_deterministic_and_the_folder_reloads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = PretrainConfig(max_steps=40, eval_every=20, target_accuracy=1.0, **TINY)
    res = pretrain(cfg, progress=False)
    assert res.steps == 40 and not res.reached_target
    assert [h["step"] for h in res.history] == [0, 20, 40]
    train, _, test = task_records(cfg)
    batch = sft_batch(res.tokenizer, train)
    fresh, _ = build_tiny_lm(hidden_size=32, layers=1, heads=2, kv_heads=1, intermediate_size=64,
                             max_positions=cfg.max_positions, seed=cfg.seed)  # the same initial weights
    with torch.no_grad():
        before = float(answer_nll(fresh(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                  batch["labels"]))
        after = float(answer_nll(res.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                 batch["labels"]))
    assert before > math.log(10)  # about uniform over the vocabulary at the start
    assert after < 0.75 * before, (before, after)

    again = pretrain(cfg, progress=False)
    for (n, p), (_, q) in zip(res.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(p, q), n

    out = save_demo_lm(res, cfg, tmp_path / "lm", {"test_greedy_accuracy": 0.5})
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("37+58=", add_special_tokens=False)["input_ids"] == res.tokenizer("37+58=", add_special_tokens=False)["input_ids"]
    assert tok.eos_token == "<eos>" and tok.pad_token == "<pad>"
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=batch["input_ids"][:4]).logits,
                                   res.model(input_ids=batch["input_ids"][:4]).logits)
    assert greedy_accuracy(model, tok, test) == greedy_accuracy(res.model, res.tokenizer, test)
    rec = json.loads((out / "pretrain.json").read_text())
    assert rec["steps"] == 40 and rec["config"]["hidden_size"] == 32 and rec["metrics"]["test_greedy_accuracy"] == 0.5


def test_training_stops_at_the_first_check_that_reaches_the_target(monkeypatch):
    seen = iter([0.0, 0.1, 0.3, 0.9])
    monkeypatch.setattr(pt, "greedy_accuracy", lambda *a, **k: next(seen))
    res = pretrain(PretrainConfig(max_steps=100, eval_every=5, target_accuracy=0.25, **TINY), progress=False)
    assert res.reached_target and res.steps == 10 and res.val_accuracy == 0.3
    assert [(h["step"], h["val_accuracy"]) for h in res.history] == [(0, 0.0), (5, 0.1), (10, 0.3)]


def test_exact_match_rate_and_pass_at_k_bookkeeping():
    assert exact_match_rate(["95", " 12 ", "7"], ["95", "12", "8"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="completions/answers"):
        exact_match_rate(["1"], [])
    with pytest.raises(ValueError, match="k"):
        pass_at_k(None, None, [{"prompt": "1+1=", "answer": "2"}], k=0)


def _load_script():
    spec = importlib.util.spec_from_file_location("pretrain_demo_lm", ROOT / "scripts" / "pretrain_demo_lm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_script_end_to_end_with_tiny_settings(tmp_path, capsys):
    script = _load_script()
    out = tmp_path / "lm"
    rc = script.main(["--out", str(out), "--no-progress", "--hidden-size", "32", "--layers", "1", "--heads", "2",
                      "--kv-heads", "1", "--intermediate-size", "64", "--num-train", "128", "--num-val", "16",
                      "--num-test", "16", "--max-steps", "6", "--eval-every", "3", "--pass-k", "2",
                      "--rl-check", "--rl-steps", "2", "--rl-prompts-per-step", "4", "--rl-group-size", "2",
                      "--rl-num-test", "8", "--rl-eval-every", "1", "--rl-out", str(tmp_path / "rl.json")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "held-out greedy exact-match accuracy" in text and "GRPO check" in text
    rec = json.loads((out / "pretrain.json").read_text())
    assert rec["steps"] == 6 and rec["config"]["layers"] == 1 and 0.0 <= rec["metrics"]["test_pass_at_2"] <= 1.0
    rl = json.loads((tmp_path / "rl.json").read_text())
    assert [h["step"] for h in rl["history"]] == [0, 1, 2]


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


def test_rl_check_runs_the_trainer_and_leaves_weights_alone_without_reward_signal(tmp_path):
    model, tok = build_tiny_lm(seed=0)
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    cfg = RLCheckConfig(steps=2, prompts_per_step=4, group_size=4, num_test=8, eval_every=1, num_train_prompts=16,
                        learning_rate=1e-2)
    rec = rl_check(tmp_path / "base", cfg, tmp_path / "run", progress=False)
    assert [h["step"] for h in rec["history"]] == [0, 1, 2] and rec["steps"] == 2
    assert rec["history"][0]["train_reward"] is None
    # a random model is never right, so every group has zero variance, every advantage is 0 and
    # the update (AdamW, weight_decay=0, zero gradients) leaves the weights exactly where they were
    assert all(h["train_reward"] == 0.0 and h["test_accuracy"] == 0.0 for h in rec["history"][1:])
    before, after = _weights(tmp_path / "base"), _weights(tmp_path / "run" / "model")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # the run is an ordinary flowrl run folder, with the check's settings
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "family: lm" in saved and "arithmetic:test:2" in saved and (tmp_path / "run" / "summary.json").is_file()


def test_rl_check_overrides_are_a_valid_run_config(tmp_path):
    from flowrl.config import load_run_config

    cfg = load_run_config(None, pt.rl_check_overrides("m", RLCheckConfig(max_seconds=30.0, lora=True), tmp_path))
    assert (cfg.model.family, cfg.model.path, cfg.time_budget_s, cfg.lora.enabled) == ("lm", "m", 30.0, True)
    assert (cfg.sample.prompts_per_step, cfg.sample.group_size, cfg.text.chunk_size) == (64, 8, 512)
    assert cfg.rewards == {"exact_match": 1.0} and cfg.eval.seeds == [0] and cfg.loss_preset == "grpo"


# ---------------------------------------------------------------------------------------------
# the shipped folder


@pytest.fixture(scope="module")
def shipped():
    if not (ASSET / "config.json").is_file():
        pytest.fail(f"{ASSET} is missing: run scripts/pretrain_demo_lm.py")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ASSET)
    tok.padding_side = "left"
    return AutoModelForCausalLM.from_pretrained(ASSET).eval(), tok


def test_shipped_demo_lm_is_small_and_right_sometimes_but_not_often(shipped):
    model, tok = shipped
    size = sum(f.stat().st_size for f in ASSET.iterdir() if f.is_file())
    assert size < 5e6, size
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {f.name for f in ASSET.iterdir()}
    assert model.config.model_type == "qwen2"
    test = arithmetic_records("test", 256, seed=0)
    acc = greedy_accuracy(model, tok, test)
    assert 0.15 <= acc <= 0.40, acc
    rec = json.loads((ASSET / "pretrain.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert rec["reached_target"] and rec["metrics"]["test_pass_at_8"] >= 0.5
    # what it gets wrong is the arithmetic, not the format: answers are numbers of the right length
    comps = greedy_completions(model, tok, [r["prompt"] for r in test[:64]], max_new_tokens=4)
    assert sum(c.isdigit() and len(c) == len(r["answer"]) for c, r in zip(comps, test[:64])) >= 56


def test_shipped_demo_lm_sampling_near_zero_temperature_is_greedy(shipped):
    model, tok = shipped
    test = arithmetic_records("test", 64, seed=0)
    greedy = greedy_accuracy(model, tok, test)
    cold = pass_at_k(model, tok, test, k=2, temperature=1e-4, seed=0)
    assert cold["sample_acc"] == pytest.approx(greedy) and cold["mixed_frac"] == 0.0
    hot = pass_at_k(model, tok, test, k=8, temperature=1.0, seed=0)
    assert hot["pass_at_k"] >= max(hot["sample_acc"], hot["mixed_frac"])
    assert hot["pass_at_k"] > greedy + 0.2  # groups of 8 often hold a right answer: GRPO has signal


def test_rl_check_on_the_shipped_model_moves_the_weights(shipped, tmp_path):
    rec = rl_check(ASSET, RLCheckConfig(steps=2, prompts_per_step=8, num_test=16, eval_every=1), tmp_path / "run",
                   progress=False)
    assert all(h["train_reward"] > 0.0 for h in rec["history"][1:])  # some samples are right
    before, after = _weights(ASSET), _weights(tmp_path / "run" / "model")
    assert sum(not torch.equal(before[k], after[k]) for k in before) == len(before)
    assert rec["before"] == greedy_accuracy(shipped[0], shipped[1], arithmetic_records("test", 16, seed=0),
                                            max_new_tokens=4)


@pytest.mark.slow
def test_grpo_lifts_the_shipped_demo_lm(shipped, tmp_path):
    rec = rl_check(ASSET, RLCheckConfig(steps=100, prompts_per_step=16, learning_rate=3e-4, num_train_prompts=512,
                                        num_test=256, eval_every=100), tmp_path / "run", progress=False)
    assert rec["after"] >= rec["before"] + 0.10, rec["history"]
