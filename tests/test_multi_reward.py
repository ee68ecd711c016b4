"""Weighted multi-reward (NaN/inf/exception reporting and masking) and the `flowrl score` CLI."""
from __future__ import annotations

import csv
import io
import json
import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image

import scorers
from scorers.base import Scorer
from scorers.cli import main as score_main
from scorers.multi import MultiReward, RewardIssue, combine


class _Fixed(Scorer):
    """Returns preset values (mean pixel + offset, with chosen entries replaced)."""

    def __init__(self, offset=0.0, replace=None, fail=None, **kw):
        super().__init__(**kw)
        self.offset, self.replace, self.fail = offset, dict(replace or {}), fail
        self.calls = 0

    def score_batch(self, images, prompts, **metadata):
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        out = images.mean(dim=(1, 2, 3)) + self.offset
        for i, v in self.replace.items():
            if i < out.shape[0]:
                out[i] = v
        return out


@scorers.register("_test_fixed")
def _make_fixed(device="cpu", dtype=torch.float32, checkpoint=None, batch_size=16, differentiable=False, offset=0.0):
    return _Fixed(offset=offset, device=device, dtype=dtype, batch_size=batch_size, differentiable=differentiable)


def _imgs(n=6, seed=0):
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------
# combine: the pure math


def test_combine_weighted_sum_and_masking():
    a = torch.tensor([1.0, 2.0, float("nan"), 4.0, 5.0])
    b = torch.tensor([10.0, float("inf"), 30.0, float("-inf"), 50.0])
    total, valid, issues = combine({"a": a, "b": b}, {"a": 1.0, "b": 0.5})
    assert valid.tolist() == [True, False, False, False, True]
    torch.testing.assert_close(total[valid], torch.tensor([1 + 5.0, 5 + 25.0]))
    assert torch.isnan(total[~valid]).all()  # never a number that could be averaged silently
    assert set(issues) == {RewardIssue("a", "nan", 1), RewardIssue("b", "inf", 2)}
    # float64 recomputation of the valid entries
    ref = 1.0 * a.double() + 0.5 * b.double()
    assert torch.allclose(total[valid].double(), ref[valid.numpy()])


def test_combine_zero_weight_is_monitored_not_masked():
    a = torch.tensor([1.0, 2.0])
    m = torch.tensor([float("nan"), 3.0])
    total, valid, issues = combine({"a": a, "m": m}, {"a": 2.0, "m": 0.0})
    assert valid.all()
    torch.testing.assert_close(total, torch.tensor([2.0, 4.0]))
    assert issues == [RewardIssue("m", "nan", 1)]


def test_combine_rejects_bad_input():
    with pytest.raises(ValueError, match="weights has no entry"):
        combine({"a": torch.zeros(2)}, {"b": 1.0})
    with pytest.raises(ValueError, match="1-D of one length"):
        combine({"a": torch.zeros(2), "b": torch.zeros(3)}, {"a": 1.0, "b": 1.0})
    with pytest.raises(ValueError, match="at least one"):
        combine({}, {})


# ------------------------------------------------------------------------------------------------
# MultiReward


def test_multireward_components_and_total():
    x = _imgs()
    m = MultiReward({"_test_fixed": 1.0, "jpeg_compressibility": 0.25})
    out = m(x, [""] * 6)
    assert set(out.components) == {"_test_fixed", "jpeg_compressibility"}
    torch.testing.assert_close(out.components["_test_fixed"], x.mean(dim=(1, 2, 3)))
    jpeg = scorers.get("jpeg_compressibility")(x, [""] * 6)
    torch.testing.assert_close(out.components["jpeg_compressibility"], jpeg)
    torch.testing.assert_close(out.total, x.mean(dim=(1, 2, 3)) + 0.25 * jpeg)
    assert out.valid.all() and out.issues == [] and out.n_invalid == 0
    s = out.summary()
    assert s["invalid"] == 0 and math.isclose(s["total"], float(out.total.mean()), rel_tol=1e-6)


def test_nan_from_one_scorer_is_reported_by_name_and_masked(caplog):
    x = _imgs()
    good = _Fixed(offset=1.0)
    bad = _Fixed(replace={1: float("nan"), 4: float("inf"), 5: float("nan")})
    m = MultiReward({"good": 1.0, "bad": 2.0}, scorers={"good": good, "bad": bad})
    with caplog.at_level(logging.WARNING, logger="scorers.multi"):
        out = m(x, ["p"] * 6)
    assert out.valid.tolist() == [True, False, True, True, False, False]
    kinds = {(i.scorer, i.kind, i.count) for i in out.issues}
    assert kinds == {("bad", "nan", 2), ("bad", "inf", 1)}
    assert "bad: nan in 2 sample(s)" in caplog.text and "bad: inf in 1 sample(s)" in caplog.text
    mean_px = x.mean(dim=(1, 2, 3))
    ok = out.valid
    torch.testing.assert_close(out.total[ok], (mean_px + 1.0 + 2.0 * mean_px)[ok])
    assert torch.isnan(out.total[~ok]).all()
    # the summary averages only valid samples; the bad scorer's component only over finite values
    s = out.summary()
    assert math.isclose(s["total"], float((3 * mean_px + 1)[ok].mean()), rel_tol=1e-6)
    assert math.isclose(s["bad"], float(mean_px[[0, 2, 3]].mean()), rel_tol=1e-6)
    assert s["invalid"] == 3


def test_raising_scorer_marks_its_batch_invalid_or_aborts(caplog):
    x = _imgs(4)
    boom = _Fixed(fail=RuntimeError("CUDA out of memory (simulated)"))
    m = MultiReward({"ok": 1.0, "boom": 1.0}, scorers={"ok": _Fixed(), "boom": boom})
    with caplog.at_level(logging.ERROR, logger="scorers.multi"):
        out = m(x, ["p"] * 4)
    assert not out.valid.any() and torch.isnan(out.total).all()
    assert len(out.issues) == 1
    issue = out.issues[0]
    assert (issue.scorer, issue.kind, issue.count) == ("boom", "error", 4)
    assert "CUDA out of memory (simulated)" in issue.message and "boom" in caplog.text
    torch.testing.assert_close(out.components["ok"], x.mean(dim=(1, 2, 3)))  # the others still computed
    m2 = MultiReward({"ok": 1.0, "boom": 1.0}, scorers={"ok": _Fixed(), "boom": boom}, on_error="raise")
    with pytest.raises(RuntimeError, match="scorer 'boom' failed: RuntimeError: CUDA out of memory"):
        m2(x, ["p"] * 4)


def test_wrong_output_shape_is_an_issue():
    m = MultiReward({"a": 1.0, "short": 1.0}, scorers={"a": _Fixed(), "short": lambda im, pr: torch.zeros(2)})
    out = m(_imgs(3), ["p"] * 3)
    assert not out.valid.any()
    assert [(i.scorer, i.kind, i.count) for i in out.issues] == [("short", "shape", 3)]


def test_options_reach_the_factories_and_names_are_checked():
    m = MultiReward({"_test_fixed": 1.0}, options={"_test_fixed": {"offset": 5.0, "batch_size": 2}})
    assert m.scorers["_test_fixed"].offset == 5.0 and m.scorers["_test_fixed"].batch_size == 2
    with pytest.raises(ValueError, match="not in weights"):
        MultiReward({"_test_fixed": 1.0}, options={"pickscore": {}})
    with pytest.raises(ValueError, match=r"weights\['_test_fixed'\] must be finite"):
        MultiReward({"_test_fixed": float("nan")})
    with pytest.raises(ValueError, match="non-empty"):
        MultiReward({})
    with pytest.raises(ValueError, match="on_error"):
        MultiReward({"_test_fixed": 1.0}, on_error="ignore")
    with pytest.raises(scorers.UnknownScorerError, match="did you mean 'pickscore'"):
        MultiReward({"pickscor": 1.0})


# ------------------------------------------------------------------------------------------------
# flowrl score


def _write_images(folder, sizes, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, (h, w) in enumerate(sizes):
        name = f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
        names.append(name)
    return names


def test_cli_scores_sorted_images_writes_csv_and_table(tmp_path):
    img_dir = tmp_path / "imgs"
    names = _write_images(img_dir, [(32, 32), (24, 40), (32, 32), (16, 16)])
    (img_dir / "notes.txt").write_text("ignored")
    (tmp_path / "prompts.txt").write_text("a cat\na dog\n\nthree red squares\n", encoding="utf-8")
    out_csv = tmp_path / "scores.csv"
    buf = io.StringIO()
    rc = score_main(["--scorer", "jpeg_compressibility", "--images", str(img_dir), "--prompts",
                     str(tmp_path / "prompts.txt"), "--output", str(out_csv), "--batch-size", "2"], stdout=buf)
    assert rc == 0
    rows = list(csv.DictReader(out_csv.open()))
    assert [r["image"] for r in rows] == names
    assert [r["prompt"] for r in rows] == ["a cat", "a dog", "", "three red squares"]
    # each value equals the scorer run directly on that image
    s = scorers.get("jpeg_compressibility")
    for r in rows:
        ref = float(s([Image.open(img_dir / r["image"]).convert("RGB")], [r["prompt"]])[0])
        assert float(r["jpeg_compressibility"]) == pytest.approx(ref, rel=1e-6)
    text = buf.getvalue()
    assert "jpeg_compressibility: mean" in text and "over 4 images" in text and "001.png" in text


def test_cli_single_prompt_several_scorers_and_options(tmp_path):
    img_dir = tmp_path / "imgs"
    _write_images(img_dir, [(16, 16)] * 3)
    (tmp_path / "p.txt").write_text("one prompt for all\n")
    rc = score_main(["--scorer", "jpeg_compressibility", "--scorer", "_test_fixed", "--images", str(img_dir),
                     "--prompts", str(tmp_path / "p.txt"), "--output", str(tmp_path / "o.csv"),
                     "--option", "_test_fixed.offset=100", "--option", "batch_size=1"], stdout=io.StringIO())
    assert rc == 0
    rows = list(csv.DictReader((tmp_path / "o.csv").open()))
    assert len(rows) == 3 and {r["prompt"] for r in rows} == {"one prompt for all"}
    assert all(100 < float(r["_test_fixed"]) < 101 for r in rows)


def test_cli_errors(tmp_path, capsys):
    img_dir = tmp_path / "imgs"
    _write_images(img_dir, [(16, 16)] * 3)
    (tmp_path / "p.txt").write_text("a\nb\n")
    base = ["--images", str(img_dir), "--prompts", str(tmp_path / "p.txt"), "--output", str(tmp_path / "o.csv")]
    assert score_main(["--scorer", "jpeg_compressibility", *base]) == 2
    assert "has 2 lines but --images has 3 images" in capsys.readouterr().err
    assert score_main(["--scorer", "a", "--scorer", "b", "--checkpoint", "x", *base]) == 2
    assert "--checkpoint needs a single --scorer" in capsys.readouterr().err
    (tmp_path / "p.txt").write_text("a\nb\nc\n")
    assert score_main(["--scorer", "pickscor", *base]) == 2
    assert "did you mean 'pickscore'" in capsys.readouterr().err
    assert score_main(["--scorer", "jpeg_compressibility", "--images", str(tmp_path / "none"), "--prompts", "x"]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert not (tmp_path / "o.csv").exists()


def test_cli_with_a_checkpoint_file(tmp_path):
    """--checkpoint goes through the scorer's real loading path (a reduced HPS v2 file)."""
    import open_clip

    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "head_width": 16, "patch_size": 14},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "cli-tiny-ViT-H-14.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(str(tmp_path / "cli-tiny-ViT-H-14.json"))
    model = open_clip.create_model("cli-tiny-ViT-H-14")
    torch.save({"state_dict": model.state_dict()}, tmp_path / "HPS_v2_compressed.pt")
    img_dir = tmp_path / "imgs"
    _write_images(img_dir, [(40, 40)] * 2)
    (tmp_path / "p.txt").write_text("a\nb\n")
    rc = score_main(["--scorer", "hpsv2", "--checkpoint", str(tmp_path / "HPS_v2_compressed.pt"),
                     "--option", f"arch={tmp_path / 'cli-tiny-ViT-H-14.json'}", "--images", str(img_dir),
                     "--prompts", str(tmp_path / "p.txt"), "--output", str(tmp_path / "o.csv")], stdout=io.StringIO())
    assert rc == 0
    rows = list(csv.DictReader((tmp_path / "o.csv").open()))
    direct = scorers.get("hpsv2", checkpoint=str(tmp_path), arch=str(tmp_path / "cli-tiny-ViT-H-14.json"))(
        [Image.open(img_dir / r["image"]).convert("RGB") for r in rows], ["a", "b"])
    assert [float(r["hpsv2"]) for r in rows] == pytest.approx(direct.tolist(), rel=1e-5, abs=1e-6)
