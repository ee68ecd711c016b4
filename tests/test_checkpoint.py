"""Atomic checkpoints and RNG capture: what exact resume is built on."""
import random

import numpy as np
import pytest
import torch

from flowrl.train.checkpoint import (
    COMPLETE, CheckpointError, capture_rng, latest_checkpoint, list_checkpoints, load_checkpoint, restore_rng,
    save_checkpoint, verify_checkpoint,
)


def _draws(gen):
    return (random.random(), float(np.random.rand()), torch.rand(3).tolist(), torch.rand(2, generator=gen).tolist())


def test_rng_round_trip_restores_every_stream():
    gen = torch.Generator().manual_seed(7)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = capture_rng({"plan": gen})
    first = _draws(gen)
    _draws(gen)  # advance everything
    restore_rng(state, {"plan": gen})
    assert _draws(gen) == first


def test_save_load_and_keep_last(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, weights=dict(model.state_dict()), tensor_state={"optimizer": opt.state_dict()},
                        meta={"note": "x"}, rng=capture_rng(), keep_last=2)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step-00000002", "step-00000003"]
    ck = load_checkpoint(latest_checkpoint(tmp_path))
    assert ck["meta"]["step"] == 3 and ck["meta"]["note"] == "x"
    assert torch.equal(ck["weights"]["weight"], model.weight.detach())
    opt2 = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1e-3)
    opt2.load_state_dict(ck["tensor_state"]["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_half_written_checkpoint_is_ignored_with_warning(tmp_path, caplog):
    save_checkpoint(tmp_path, 1, weights={"w": torch.ones(2)}, keep_last=None)
    p = save_checkpoint(tmp_path, 2, weights={"w": torch.zeros(2)}, keep_last=None)
    (p / COMPLETE).unlink()  # as if killed before the marker was written
    with caplog.at_level("WARNING"):
        latest = latest_checkpoint(tmp_path)
    assert latest.name == "step-00000001"
    assert "half-written" in caplog.text
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_checkpoint(p)


def _flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garble(path):
    path.write_bytes(b"{not json \xff")


# each damage of the newest checkpoint, and the words the one-line error must contain
DAMAGE = {
    "truncated weights": (lambda p: _truncate(p / "weights.safetensors"), "weights.safetensors has"),
    "bit-flipped tensor data": (lambda p: _flip_byte(p / "weights.safetensors", -3), "weights.safetensors does not match"),
    "garbled meta.json": (lambda p: _garble(p / "meta.json"), "meta.json"),
    "garbled rng.json": (lambda p: _garble(p / "rng.json"), "rng.json"),
    "garbled state.pt": (lambda p: _garble(p / "state.pt"), "state.pt"),
    "missing state.pt": (lambda p: (p / "state.pt").unlink(), "state.pt is missing"),
    "garbled marker": (lambda p: _garble(p / COMPLETE), COMPLETE),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_the_previous_with_a_warning(tmp_path, caplog, damage):
    """A checkpoint is verified against the size and SHA-256 manifest in its marker: a damaged newest
    one is skipped (warning naming it and why) and resume falls back to the previous complete one;
    loading it directly is one CheckpointError line naming the folder."""
    save_checkpoint(tmp_path, 1, weights={"w": torch.ones(64)}, tensor_state={"x": torch.ones(3)},
                    meta={"a": 1}, rng=capture_rng(), keep_last=None)
    p = save_checkpoint(tmp_path, 2, weights={"w": torch.zeros(64)}, tensor_state={"x": torch.zeros(3)},
                        meta={"a": 2}, rng=capture_rng(), keep_last=None)
    verify_checkpoint(p)
    fn, words = DAMAGE[damage]
    fn(p)
    with caplog.at_level("WARNING"):
        latest = latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == "step-00000001"
    assert "step-00000002" in caplog.text and "falling back" in caplog.text
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p)
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg and words in msg, msg
    assert load_checkpoint(latest)["meta"]["a"] == 1


def test_meta_step_is_checked_against_the_folder_name(tmp_path, caplog):
    """A checkpoint claiming another step than its folder (meta.json rewritten with step 99 and its
    manifest entry with it) is not trusted."""
    import json

    save_checkpoint(tmp_path, 1, weights={"w": torch.ones(2)}, keep_last=None)
    p = save_checkpoint(tmp_path, 2, weights={"w": torch.zeros(2)}, keep_last=None)
    meta = json.loads((p / "meta.json").read_text())
    meta["step"] = 99
    (p / "meta.json").write_text(json.dumps(meta))
    marker = json.loads((p / COMPLETE).read_text())
    from flowrl.train.checkpoint import _file_entry

    marker["files"]["meta.json"] = _file_entry(p / "meta.json")  # a consistent manifest: only the step lies
    (p / COMPLETE).write_text(json.dumps(marker))
    with pytest.raises(CheckpointError, match="meta.json says step 99"):
        verify_checkpoint(p)
    with caplog.at_level("WARNING"):
        assert latest_checkpoint(tmp_path).name == "step-00000001"
    marker["step"] = 99
    (p / COMPLETE).write_text(json.dumps(marker))
    with pytest.raises(CheckpointError, match="folder name says step 2"):
        verify_checkpoint(p)
