"""Tests of flowrl.train.evaluate: held-out evaluation on a tiny SD3 model (seeds equal to the
diffusers pipeline's own, determinism, batch independence, means over valid samples, per-category
numbers); flowrl.train.grids: image grids (pixel size and content); flowrl.commands:
``sample_to_dir``, ``flowrl grid`` with a LoRA checkpoint; the make_grid script, and one-line
UsageErrors for bad inputs.
"""
from __future__ import annotations

import csv
import runpy
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from flowrl.config import RunConfig, load_run_config
from flowrl.inputs import UsageError
from flowrl.commands import grid_command, sample_file_name, sample_to_dir
from flowrl.train import evaluate as ev
from flowrl.train.evaluate import (
    EvalResult,
    evaluate_from_config,
    evaluate_policy,
    load_policy,
    prompt_seeds,
    prompt_source,
)
from flowrl.train.grids import PAD, caption_lines, cell_size, image_grid, line_height, side_by_side

REPO = Path(__file__).resolve().parents[1]
H = W = 32
STEPS = 4
GS = 4.5
PROMPTS = ["a red circle", "a blue square above a green triangle", "three yellow triangles"]


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from flowrl.demo.tiny_image import save_tiny

    return save_tiny("sd3", tmp_path_factory.mktemp("tiny_sd3"), seed=0)


def make_cfg(tiny_dir, **rewards) -> RunConfig:
    data = {
        "model": {"family": "sd3", "path": str(tiny_dir)},
        "sample": {"height": H, "width": W, "eval_num_steps": STEPS, "guidance_scale": GS,
                   "prompts_per_step": 2, "group_size": 2},
        "rewards": rewards or {"shapes": 1.0},
    }
    from flowrl.config import from_dict

    return from_dict(RunConfig, data)


@pytest.fixture(scope="module")
def policy(tiny_dir):
    return load_policy(make_cfg(tiny_dir))


@pytest.fixture(scope="module")
def reward():
    from scorers.multi import MultiReward

    return MultiReward({"jpeg_compressibility": 1.0, "shapes": 0.5})


def run_eval(policy, reward, prompts=PROMPTS, seeds=(0, 1), **kw):
    args = dict(num_steps=STEPS, height=H, width=W, guidance_scale=GS, reward=reward, batch_size=16)
    args.update(kw)
    return evaluate_policy(policy, list(prompts), list(seeds), **args)


def one_line(e: BaseException) -> str:
    msg = str(e)
    assert msg and "\n" not in msg, f"not a one-line message: {msg!r}"
    return msg


# ---------------------------------------------------------------------------------------------
# evaluate_policy
# ---------------------------------------------------------------------------------------------


def test_seed_gives_the_diffusers_pipelines_image(policy):
    """Image (prompt, seed s) is what StableDiffusion3Pipeline makes with manual_seed(s): the same
    initial noise, the same 4-step Euler ODE and CFG (an independent implementation)."""
    r = run_eval(policy, lambda im, p: im.mean(dim=(1, 2, 3)), prompts=PROMPTS[:2], seeds=[3, 11], batch_size=4)
    assert r.images.shape == (4, 3, H, W)
    for i, (p, s) in enumerate(zip(r.row_prompts(), r.row_seeds())):
        ref = policy.pipeline(prompt=p, num_inference_steps=STEPS, guidance_scale=GS, height=H, width=W,
                              generator=torch.Generator().manual_seed(s), output_type="pt").images[0]
        torch.testing.assert_close(r.images[i], ref.float(), atol=1e-4, rtol=0)
    # a plain callable reward: one component named "reward", scores = its output
    torch.testing.assert_close(r.scores["reward"], r.images.mean(dim=(1, 2, 3)))
    assert r.means["reward"] == pytest.approx(float(r.images.double().mean()), abs=1e-6)


def test_deterministic_and_batch_independent(policy, reward):
    a = run_eval(policy, reward, batch_size=16)
    b = run_eval(policy, reward, batch_size=16)
    assert torch.equal(a.images, b.images)  # same call twice: bitwise the same
    for k in a.scores:
        assert torch.equal(a.scores[k], b.scores[k])
    c = run_eval(policy, reward, batch_size=1)  # one row per sampling call
    d = run_eval(policy, reward, batch_size=16, chunk_size=1)  # one sampling call, one row per transformer call
    for other in (c, d):
        torch.testing.assert_close(other.images, a.images, atol=2e-5, rtol=0)
        assert other.row_prompts() == a.row_prompts() and other.row_seeds() == a.row_seeds()
    # a prompt evaluated alone gets the same images as inside the full batch
    alone = run_eval(policy, reward, prompts=[PROMPTS[2]], seeds=[1])
    torch.testing.assert_close(alone.images[0], a.images[2 * 2 + 1], atol=2e-5, rtol=0)
    # the seeds matter and the prompts matter
    assert (a.images[0] - a.images[1]).abs().max() > 1e-2  # same prompt, seeds 0 and 1
    assert (a.images[0] - a.images[2]).abs().max() > 1e-3  # same seed, two prompts
    # scores of the batch-1 run are the reward of its own images
    torch.testing.assert_close(c.scores["jpeg_compressibility"], reward(c.images, c.row_prompts()).components["jpeg_compressibility"])


def test_repeated_prompts_get_new_seeds(policy):
    """A prompt listed twice is sampled from new noise the second time (not a copy of the first);
    its first occurrence keeps the listed seeds."""
    assert prompt_seeds(["a", "b", "a", "a"], [0, 4]) == [[0, 4], [0, 4], [5, 9], [10, 14]]
    score = lambda im, p: im.mean(dim=(1, 2, 3))  # noqa: E731
    r = run_eval(policy, score, prompts=[PROMPTS[0], PROMPTS[1], PROMPTS[0]], seeds=[0, 1], batch_size=4)
    assert r.row_seeds() == [0, 1, 0, 1, 2, 3]
    assert (r.images[0] - r.images[4]).abs().max() > 1e-2  # the repeat is a new image
    again = run_eval(policy, score, prompts=[PROMPTS[0]], seeds=[2, 3])
    torch.testing.assert_close(r.images[4:], again.images, atol=2e-5, rtol=0)  # ... the one seeds 2, 3 give


def test_means_over_valid_samples_details_and_nfe(policy):
    from flowrl.demo import shapes
    from scorers.multi import MultiReward

    def flaky(images, prompts):  # NaN for the second image of every call
        out = images.mean(dim=(1, 2, 3)).clone()
        out[1::2] = float("nan")
        return out

    rw = MultiReward({"jpeg_compressibility": 1.0, "shapes": 0.5, "flaky": 0.25}, scorers={"flaky": flaky})
    policy.transformer.train()  # evaluation must switch to eval mode and back
    r = run_eval(policy, rw, batch_size=16)
    assert policy.transformer.training
    policy.transformer.eval()
    n = len(PROMPTS) * 2
    assert r.valid.tolist() == [i % 2 == 0 for i in range(n)]
    valid = r.valid.numpy()
    for k in ("jpeg_compressibility", "shapes", "flaky"):
        x = r.scores[k].double().numpy()
        assert r.means[k] == pytest.approx(float(x[valid].mean()), abs=1e-9)
    expect_total = (r.scores["jpeg_compressibility"].double() + 0.5 * r.scores["shapes"].double()
                    + 0.25 * r.scores["flaky"].double()).numpy()[valid].mean()
    assert r.means["total"] == pytest.approx(float(expect_total), abs=1e-5)
    assert torch.isnan(r.total[1]) and not torch.isnan(r.total[0])
    # per-category numbers of the shapes scorer, as flowrl.demo.shapes.evaluate gives them
    ref = shapes.evaluate(r.images, r.row_prompts())
    for cat in ("colors", "position", "counting"):
        assert f"shapes/accuracy/{cat}" in r.details
    for k, v in ref.items():
        assert r.details[f"shapes/{k}"] == pytest.approx(v)
    assert not any(k.startswith(("jpeg", "flaky")) for k in r.details)
    # NFE: one velocity evaluation per image per step (a CFG pair counts once)
    assert r.nfe == n * STEPS and r.nfe_per_image == STEPS
    summary = r.summary()
    assert summary["num_invalid"] == n // 2 and summary["nfe"] == n * STEPS
    assert summary["means"]["total"] == pytest.approx(r.means["total"])


def test_bad_arguments(policy, reward):
    with pytest.raises(ValueError, match="prompts"):
        run_eval(policy, reward, prompts=[])
    with pytest.raises(ValueError, match="seeds"):
        run_eval(policy, reward, seeds=[1, 1])
    with pytest.raises(ValueError, match="seeds"):
        run_eval(policy, reward, seeds=[])
    with pytest.raises(ValueError, match="num_steps"):
        run_eval(policy, reward, num_steps=0)
    with pytest.raises(ValueError, match="batch_size"):
        run_eval(policy, reward, batch_size=0)


def test_evaluate_from_config(tiny_dir, policy):
    cfg = make_cfg(tiny_dir, jpeg_compressibility=1.0)
    cfg.eval.num_prompts = 2
    cfg.eval.seeds = [5]
    cfg.eval.guidance_scale = 1.0
    r = evaluate_from_config(policy, cfg)
    from flowrl.demo import shapes

    assert len(r.prompts) == 2 and r.seeds == [5]
    assert all(shapes.split_of(p) == "test" for p in r.prompts)  # held-out pool
    assert r.guidance_scale == 1.0 and r.num_steps == STEPS
    assert list(r.scores) == ["jpeg_compressibility"]


def test_shapes_training_prompts_are_balanced_over_categories():
    """All of ``shapes:train`` is drawn balanced over the GenEval categories like the held-out
    prompts; the raw pools differ 300x in size, and uniform strings would be ~77% position prompts."""
    from collections import Counter

    from flowrl.train.data import load_records
    from flowrl.demo import shapes

    recs = load_records("shapes:train", seed=0)
    counts = Counter(shapes.parse(r["prompt"]).category for r in recs)
    assert set(counts) == set(shapes.CATEGORIES) and len(set(counts.values())) == 1, counts
    assert {r["prompt"] for r in recs} == set(shapes.all_prompts("train"))  # every string, no test string
    assert load_records("shapes:train", seed=0) == recs  # deterministic


def test_prompt_source(tmp_path):
    from flowrl.demo import shapes

    ps = prompt_source("shapes:test", 12, seed=3)
    assert len(ps) == 12 and all(shapes.split_of(p) == "test" for p in ps)
    assert prompt_source("shapes:test", 12, seed=3) == ps
    f = tmp_path / "p.txt"
    f.write_text("# comment\nfirst\n\nsecond\nthird\n", encoding="utf-8")
    assert prompt_source(str(f), 2) == ["first", "second"]
    j = tmp_path / "p.jsonl"
    j.write_text('{"prompt": "a red circle"}\n\n{"prompt": "two blue squares"}\n', encoding="utf-8")
    assert prompt_source(str(j)) == ["a red circle", "two blue squares"]
    for bad, match in (("shapes:val", "split"), ("arithmetic:dev", "split"),
                       (str(tmp_path / "missing.txt"), "not found")):
        with pytest.raises(UsageError, match=match) as e:
            prompt_source(bad, 4)
        one_line(e.value)


# ---------------------------------------------------------------------------------------------
# grids
# ---------------------------------------------------------------------------------------------


def _upscaled(img: torch.Tensor, side: int) -> np.ndarray:
    arr = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return np.asarray(Image.fromarray(arr).resize((side, side), Image.NEAREST))


def test_cell_size():
    assert cell_size(32, 32) == (128, 128)  # x4
    assert cell_size(48, 48) == (144, 144)  # x3 (integer factors only)
    assert cell_size(64, 32) == (128, 64)  # x2, aspect kept
    assert cell_size(200, 300) == (200, 300)
    assert cell_size(1024, 512) == (512, 256)


def test_image_grid_size_and_content():
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(6, 3, 32, 32, generator=g)
    caps = [f"prompt number {i}\nseed {i}, total 0.{i}" for i in range(6)]
    grid = image_grid(imgs, caps, ncols=4)
    lh = line_height()
    cell_w, cell_h = 128 + 2 * PAD, 128 + 2 * PAD + 3 * lh + PAD
    assert grid.size == (4 * cell_w, 2 * cell_h)
    arr = np.asarray(grid)
    for i in range(6):
        r, c = divmod(i, 4)
        x0, y0 = c * cell_w + PAD, r * cell_h + PAD
        np.testing.assert_array_equal(arr[y0:y0 + 128, x0:x0 + 128], _upscaled(imgs[i], 128))
        band = arr[y0 + 128 + PAD:(r + 1) * cell_h, c * cell_w:(c + 1) * cell_w]
        assert (band < 128).any(), f"no caption text under image {i}"
    empty = arr[cell_h:, 2 * cell_w:]  # cells 6 and 7 hold nothing
    assert (empty == 255).all()
    # no captions: no caption band; default columns ceil(sqrt(6)) = 3
    assert image_grid(imgs).size == (3 * cell_w, 2 * (128 + 2 * PAD))
    # PIL input, a larger image is not upscaled
    big = [Image.new("RGB", (200, 150), (10, 20, 30))] * 2
    assert image_grid(big, ncols=2).size == (2 * (200 + 2 * PAD), 150 + 2 * PAD)
    with pytest.raises(ValueError, match="captions"):
        image_grid(imgs, caps[:2])
    with pytest.raises(ValueError, match="one size"):
        image_grid([Image.new("RGB", (8, 8)), Image.new("RGB", (16, 8))])


def test_caption_lines_keep_the_score_line():
    from PIL import ImageFont

    font = ImageFont.load_default()
    long = "a red circle above a blue square and " * 6
    lines = caption_lines(f"{long}\nseed 1, total 0.123", font, 128, 3)
    assert len(lines) == 3
    assert lines[-1] == "seed 1, total 0.123"
    assert lines[1].endswith("...")
    assert all(font.getbbox(s)[2] - font.getbbox(s)[0] <= 128 for s in lines)
    # a single unbreakable word is cut by characters
    lines = caption_lines("x" * 200, font, 64, 5)
    assert len(lines) == 5 and all(font.getbbox(s)[2] - font.getbbox(s)[0] <= 64 for s in lines)


def _fake_result(images, total, prompts=("p one", "p two"), seeds=(0,)) -> EvalResult:
    n = images.shape[0]
    return EvalResult(prompts=list(prompts), seeds=list(seeds), images=images, scores={"r": total.clone()},
                      total=total, valid=torch.ones(n, dtype=torch.bool), weights={"r": 1.0},
                      means={"r": float(total.mean()), "total": float(total.mean())}, num_steps=4,
                      guidance_scale=1.0, height=images.shape[-2], width=images.shape[-1])


def test_side_by_side_layout():
    g = torch.Generator().manual_seed(1)
    base = _fake_result(torch.rand(2, 3, 32, 32, generator=g), torch.tensor([0.1, 0.2]))
    tuned = _fake_result(torch.rand(2, 3, 32, 32, generator=g), torch.tensor([0.3, 0.1]))
    out = side_by_side(base, tuned, pairs_per_row=1)
    lh = line_height()
    cell_w, cell_h, header = 128 + 2 * PAD, 128 + 3 * PAD + 3 * lh, lh + 2 * PAD
    assert out.size == (2 * cell_w, header + 2 * cell_h)
    arr = np.asarray(out)
    for i in range(2):
        y0 = header + i * cell_h + PAD
        np.testing.assert_array_equal(arr[y0:y0 + 128, PAD:PAD + 128], _upscaled(base.images[i], 128))
        np.testing.assert_array_equal(arr[y0:y0 + 128, cell_w + PAD:cell_w + PAD + 128], _upscaled(tuned.images[i], 128))
    assert (arr[:header] < 128).any()  # the "base" / "tuned" titles
    with pytest.raises(ValueError, match="same prompts"):
        side_by_side(base, _fake_result(tuned.images, tuned.total, prompts=("x", "y")))


# ---------------------------------------------------------------------------------------------
# sample_to_dir
# ---------------------------------------------------------------------------------------------


def test_sample_to_dir_files_and_scores(tiny_dir, policy, tmp_path):
    from scorers.jpeg import jpeg_size_kb

    cfg = make_cfg(tiny_dir, shapes=1.0, jpeg_compressibility=0.1)
    prompts = PROMPTS[:2]
    out = sample_to_dir(cfg, prompts, tmp_path / "samples", seeds=2)
    names = [sample_file_name(i, p, s, 2) for i, p in enumerate(prompts) for s in (0, 1)]
    assert names[0] == "0000-a-red-circle-s0.png"
    assert sorted(x.name for x in out.iterdir()) == sorted(names + ["scores.csv"])
    with open(out / "scores.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["prompt", "seed", "file", "shapes", "jpeg_compressibility", "total"]
    assert [(r["prompt"], int(r["seed"]), r["file"]) for r in rows] == [
        (p, s, sample_file_name(i, p, s, 2)) for i, p in enumerate(prompts) for s in (0, 1)]
    # the PNGs are the evaluation images (same settings, same batch), quantised round(x * 255)
    ref = evaluate_policy(policy, prompts, [0, 1], reward=lambda im, p: im.mean(dim=(1, 2, 3)), **ev.eval_settings(cfg))
    for i, r in enumerate(rows):
        png = np.asarray(Image.open(out / r["file"]).convert("RGB"))
        expect = (ref.images[i].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        assert np.abs(png.astype(int) - expect.astype(int)).max() <= 1
        # the CSV's JPEG score is DDPO's compressibility of the written PNG's pixels
        assert float(r["jpeg_compressibility"]) == pytest.approx(-jpeg_size_kb(png), abs=2e-3)
        total = float(r["shapes"]) + 0.1 * float(r["jpeg_compressibility"])
        assert float(r["total"]) == pytest.approx(total, abs=1e-4)
    # names are stable: a second run writes the same files
    out2 = sample_to_dir(cfg, prompts, tmp_path / "again", seeds=2)
    assert sorted(x.name for x in out2.iterdir()) == sorted(x.name for x in out.iterdir())


def test_sample_to_dir_bad_inputs(tiny_dir, tmp_path):
    cfg = make_cfg(tiny_dir)
    with pytest.raises(UsageError, match="checkpoint not found") as e:
        sample_to_dir(cfg, PROMPTS, tmp_path / "o", seeds=1, checkpoint=tmp_path / "nope")
    one_line(e.value)
    with pytest.raises(UsageError, match="prompts") as e:
        sample_to_dir(cfg, [], tmp_path / "o")
    one_line(e.value)
    with pytest.raises(UsageError, match="seeds") as e:
        sample_to_dir(cfg, PROMPTS, tmp_path / "o", seeds=0)
    one_line(e.value)
    lm = make_cfg(tiny_dir)
    lm.model.family = "lm"
    with pytest.raises(UsageError, match="image model") as e:
        sample_to_dir(lm, PROMPTS, tmp_path / "o")
    one_line(e.value)
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# flowrl grid
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_checkpoint(tiny_dir, tmp_path_factory):
    """A flowrl checkpoint holding a LoRA whose B matrices are non-zero (so it changes the model)."""
    from flowrl.train.checkpoint import save_checkpoint
    from flowrl.train.lora import add_lora_to_transformer, lora_config, trainable_state_dict
    from flowrl.train.model import lora_meta

    pol = load_policy(make_cfg(tiny_dir))
    add_lora_to_transformer(pol.transformer, lora_config("sd3", rank=4, alpha=4))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in pol.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    run = tmp_path_factory.mktemp("lora_run")
    return save_checkpoint(run, 5, weights=trainable_state_dict(pol.transformer),
                           meta={"lora": lora_meta(pol.transformer)}, keep_last=None)


def _write_config(tiny_dir, path: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "model": {"family": "sd3", "path": str(tiny_dir)},
        "sample": {"height": H, "width": W, "eval_num_steps": STEPS, "guidance_scale": GS,
                   "prompts_per_step": 2, "group_size": 2},
        "rewards": {"shapes": 1.0, "jpeg_compressibility": 0.1},
    }), encoding="utf-8")
    return path


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.cells, self._in_cell = [], [], False

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs)["src"])
        self._in_cell = tag in ("td", "th")

    def handle_endtag(self, tag):
        self._in_cell = False

    def handle_data(self, data):
        if self._in_cell:
            self.cells.append(data)


def test_grid_command_base_vs_tuned(tiny_dir, lora_checkpoint, tmp_path):
    from flowrl.train.model import apply_checkpoint

    cfg_path = _write_config(tiny_dir, tmp_path / "run.yaml")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n", encoding="utf-8")
    out = tmp_path / "grid"
    rc = grid_command([str(cfg_path), "sample.guidance_scale=2.0", "--checkpoint", str(lora_checkpoint),
                       "--prompts", str(prompts), "--out", str(out), "--seeds", "2", "--pairs-per-row", "2"])
    assert rc == 0
    png = Image.open(out / "grid.png")
    lh = line_height()
    cell_w, cell_h = 128 + 2 * PAD, 128 + 3 * PAD + 3 * lh
    assert png.size == (4 * cell_w, lh + 2 * PAD + 2 * cell_h)  # 4 pairs, 2 per row
    page = _Page()
    page.feed((out / "index.html").read_text(encoding="utf-8"))
    assert page.imgs == ["grid.png"] and (out / page.imgs[0]).is_file()

    # independent recomputation: the base model, and the model with the checkpoint applied
    cfg = load_run_config(cfg_path, ["sample.guidance_scale=2.0"])
    settings = ev.eval_settings(cfg)
    rw = ev.reward_from_config(cfg)
    fresh = load_policy(cfg)
    base = evaluate_policy(fresh, PROMPTS[:2], [0, 1], reward=rw, **settings)
    apply_checkpoint(fresh, lora_checkpoint)
    tuned = evaluate_policy(fresh, PROMPTS[:2], [0, 1], reward=rw, **settings)
    assert (tuned.images - base.images).abs().max() > 1e-3  # the LoRA changes the images
    with open(out / "scores.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4
    for i, r in enumerate(rows):
        assert float(r["base/total"]) == pytest.approx(float(base.total[i]), abs=1e-4)
        assert float(r["tuned/total"]) == pytest.approx(float(tuned.total[i]), abs=1e-4)
    # the page's table: mean scores base vs tuned with the change
    cells = [c.strip() for c in page.cells]
    i = cells.index("jpeg_compressibility")
    assert cells[i + 1] == f"{base.means['jpeg_compressibility']:.3f}"
    assert cells[i + 2] == f"{tuned.means['jpeg_compressibility']:.3f}"
    assert cells[i + 3] == f"{tuned.means['jpeg_compressibility'] - base.means['jpeg_compressibility']:+.3f}"
    assert "shapes/geneval" in cells  # per-category numbers too


def test_grid_command_bad_inputs(tiny_dir, lora_checkpoint, tmp_path):
    cfg_path = _write_config(tiny_dir, tmp_path / "run.yaml")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n", encoding="utf-8")
    good = tmp_path / "p.txt"
    good.write_text("a red circle\n", encoding="utf-8")
    base = [str(cfg_path), "--out", str(tmp_path / "o")]
    with pytest.raises(UsageError, match="holds no prompts") as e:
        grid_command(base + ["--checkpoint", str(lora_checkpoint), "--prompts", str(empty)])
    one_line(e.value)
    with pytest.raises(UsageError, match="checkpoint not found") as e:
        grid_command(base + ["--checkpoint", str(tmp_path / "missing"), "--prompts", str(good)])
    one_line(e.value)
    with pytest.raises(UsageError, match="--seeds") as e:
        grid_command(base + ["--checkpoint", str(lora_checkpoint), "--prompts", str(good), "--seeds", "0"])
    one_line(e.value)
    assert not (tmp_path / "o").exists()  # nothing sampled or written


def test_make_grid_script(tiny_dir, tmp_path, monkeypatch, capsys):
    """The entry script with a diffusers-format LoRA folder (save_diffusers_lora)."""
    from diffusers import StableDiffusion3Pipeline

    from flowrl.train.lora import add_lora_to_transformer, lora_config, save_diffusers_lora

    pol = load_policy(make_cfg(tiny_dir))
    add_lora_to_transformer(pol.transformer, lora_config("sd3", rank=2, alpha=2))
    with torch.no_grad():
        for name, p in pol.transformer.named_parameters():
            if "lora_B" in name:
                p.fill_(0.05)
    lora_dir = save_diffusers_lora(StableDiffusion3Pipeline, pol.transformer, tmp_path / "lora")
    cfg_path = _write_config(tiny_dir, tmp_path / "run.yaml")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n", encoding="utf-8")
    out = tmp_path / "script_out"
    monkeypatch.setattr(sys, "argv", ["make_grid.py", str(cfg_path), "--checkpoint", str(lora_dir),
                                      "--prompts", str(prompts), "--out", str(out)])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(REPO / "scripts" / "make_grid.py"), run_name="__main__")
    assert e.value.code == 0
    assert (out / "grid.png").is_file() and (out / "index.html").is_file()
    with open(out / "scores.csv", newline="", encoding="utf-8") as fh:
        row = next(csv.DictReader(fh))
    assert float(row["base/jpeg_compressibility"]) != float(row["tuned/jpeg_compressibility"])
    assert "wrote" in capsys.readouterr().out
