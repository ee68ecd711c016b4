"""FLUX.1 Kontext (instruction editing) behind the FlowPolicy interface, on a tiny random-weight model in the
real format (``flowrl make-tiny flux_kontext DIR``).

* parity: flowrl's all-ODE Euler loop gives the latents and images of ``FluxKontextPipeline.__call__`` (same
  source images, noise, steps, guidance; with and without true CFG; a non-square output), and its sigmas
  are the scheduler's;
* a row's velocity does not depend on the other rows; source images are cached by content;
* LoRA: saved with ``save_diffusers_lora``, loaded by the pipeline's ``load_lora_weights`` (alpha intact);
* gradient checkpointing gives the gradient of the plain forward;
* ``flowrl train configs/tiny_flux_kontext.yaml`` runs (a likelihood objective for 2 steps on the
  ``shapes_edit`` task, and a forward objective for 1 step), with a source | base | tuned grid;
* the shapes editing task: the checker accepts the target render and rejects the source and wrong edits;
  its prompt source, scorer and the JSONL ``image`` column; the remote protocol's source images.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from flowrl.cli import main as flowrl_main
from flowrl.flow.policy import FlowPolicy

ROOT = Path(__file__).resolve().parents[1]
MSL = 48  # T5 tokens (character-level tiny tokenizer): both prompts below fit without truncation
PROMPTS = ["make the circle red", "add a blue square left of the triangle"]
RANK, ALPHA = 4, 16


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread while this module runs: the tiny model's ops are small, and on a loaded 2-core machine
    the threads' synchronisation dominates them."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("kontext") / "model"
    assert flowrl_main(["make-tiny", "flux_kontext", str(d)]) == 0
    return d


@pytest.fixture(scope="module")
def policy(tiny_dir):
    p = FlowPolicy.from_pretrained(tiny_dir, max_sequence_length=MSL)
    p.condition_image_size = None  # the source image's own size (the pipeline's _auto_resize=False)
    return p


def _sources(sizes=((32, 32), (32, 32))):
    """Two different rendered shapes scenes as PIL images of the given (height, width)."""
    from flowrl.demo.shapes_edit import make_edit
    from flowrl.demo.shapes import draw

    out = []
    for k, (h, w) in enumerate(sizes):
        src, _ = make_edit(PROMPTS[k], 64, rng=k)
        out.append(draw(src, 64).resize((w, h)))
    return out


def test_make_tiny_gives_the_kontext_policy(tiny_dir, policy):
    from flowrl.flow.models.flux_kontext import FluxKontextPolicy

    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["_class_name"] == "FluxKontextPipeline"
    assert type(policy) is FluxKontextPolicy and policy.family == "flux_kontext"
    assert policy.transformer.config.guidance_embeds


def _euler(policy, x, embeds, sigmas, guidance, **kw):
    for i in range(len(sigmas) - 1):
        x = x + (sigmas[i + 1] - sigmas[i]) * policy.velocity(x, sigmas[i], embeds, guidance, **kw)
    return x


@pytest.mark.parametrize("guidance,hw,true_cfg", [(2.5, (32, 32), 1.0), (3.5, (32, 48), 3.0)])
def test_ode_loop_reproduces_the_pipeline_call(policy, guidance, hw, true_cfg):
    pipe = policy.pipeline
    h, w = hw
    steps = 4
    images = _sources()
    policy.true_cfg_scale = true_cfg
    try:
        noise = policy.initial_noise(2, h, w, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            embeds = policy.encode_prompts(PROMPTS, images=images)
            assert embeds.has_negative == (true_cfg > 1)
            sig = policy.sigmas(steps, h, w)
            x = _euler(policy, noise.clone(), embeds, sig, guidance, height=h, width=w)
            img = policy.decode(x, height=h, width=w)
            seen = {}

            def grab(p, i, t, kw):
                seen["latents"] = kw["latents"]
                return {}

            common = dict(image=images, prompt=PROMPTS, num_inference_steps=steps, guidance_scale=guidance, height=h,
                          width=w, max_area=h * w, _auto_resize=False, output_type="pt", max_sequence_length=MSL,
                          true_cfg_scale=true_cfg, negative_prompt="" if true_cfg > 1 else None)
            ref = pipe(latents=noise.clone(), callback_on_step_end=grab, **common).images
            # (once) the pipeline drawing its own start from the same generator
            ref_gen = pipe(generator=torch.Generator().manual_seed(5), **common).images if true_cfg == 1.0 else ref
    finally:
        policy.true_cfg_scale = 1.0
    torch.testing.assert_close(pipe.scheduler.sigmas.float(), sig, rtol=0, atol=1e-7)  # the scheduler's sigmas
    assert img.shape == (2, 3, h, w) and float(img.std()) > 0.01
    # float32 throughout: the only differences are the order of float operations (per-image VAE encoding here,
    # a batch of two in the pipeline; the Euler update written out here, the scheduler's step there), a few ulp
    # (float32 eps 1.2e-7 x latents of magnitude ~5) per step over 4 steps; measured max |diff| 4.8e-7 / 1.1e-6
    # (latents) and 4.5e-7 / 7.5e-7 (images) for the two cases; 2e-5 leaves room for other CPUs' kernels
    torch.testing.assert_close(x, seen["latents"].float(), rtol=0, atol=2e-5)
    torch.testing.assert_close(img, ref, rtol=0, atol=2e-5)
    torch.testing.assert_close(ref_gen, ref, rtol=0, atol=0)  # the pipeline's own draw is the policy's noise
    assert not torch.allclose(img[0], img[1], atol=1e-3)


def test_source_image_conditions_the_velocity_per_row(policy):
    """The image tokens change the velocity; a row's velocity is the same alone or beside another row;
    the image ids are the noisy tokens' with the first axis 1; images are cached by content."""
    a, b = _sources()
    with torch.no_grad():
        e2 = policy.encode_prompts(PROMPTS, images=[a, b])
        assert e2.image_latents.shape == (2, 64, 64) and e2.image_ids.shape == (2, 64, 3)
        assert bool((e2.image_ids[..., 0] == 1).all()) and int(e2.image_ids[..., 1].max()) == 7
        x = policy.initial_noise(2, 32, 32, generator=torch.Generator().manual_seed(0))
        v2 = policy.velocity(x, 0.6, e2, 2.5)
        v1 = policy.velocity(x[1:], 0.6, e2.select([1]), 2.5)
        torch.testing.assert_close(v1[0], v2[1], rtol=0, atol=1e-6)
        swapped = policy.velocity(x, 0.6, policy.encode_prompts(PROMPTS, images=[b, a]), 2.5)
        assert not torch.allclose(swapped[0], v2[0], atol=1e-4), "the source image must change the velocity"
        plain = policy.velocity(x, 0.6, policy.encode_prompts(PROMPTS), 2.5)  # text-to-image, no source image
        assert plain.shape == v2.shape and not torch.allclose(plain, v2, atol=1e-4)
        n = len(policy._image_cache)
        policy.encode_prompts([PROMPTS[0]] * 2, images=[a, a.copy()])
        assert len(policy._image_cache) == n  # same pixels, same key
    with pytest.raises(ValueError, match="one source image per prompt"):
        policy.encode_prompts(PROMPTS, images=[a])
    with pytest.raises(ValueError, match="every prompt needs a source image"):
        policy.encode_prompts(PROMPTS, images=[a, None])


def test_condition_size_follows_the_pipeline(policy):
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    old = policy.condition_image_size
    try:
        policy.condition_image_size = "auto"
        w, h = min(PREFERRED_KONTEXT_RESOLUTIONS, key=lambda r: abs(48 / 32 - r[0] / r[1]))
        assert policy.condition_size(32, 48) == (h, w)
        policy.condition_image_size = None
        assert policy.condition_size(34, 47) == (32, 44)  # own size, down to a multiple of 2 x vae_scale_factor
        policy.condition_image_size = 24
        assert policy.condition_size(100, 60) == (24, 24)
        policy.condition_image_size = "big"
        with pytest.raises(ValueError, match="condition_image_size"):
            policy.condition_size(32, 32)
    finally:
        policy.condition_image_size = old


def test_lora_round_trip_through_load_lora_weights(tiny_dir, tmp_path):
    """A LoRA with alpha != rank saved by flowrl loads into a fresh FluxKontextPipeline with the same scale and
    gives the same velocity; saved without the adapter metadata it loads with alpha = rank (a different velocity)."""
    from diffusers import FluxKontextPipeline
    from peft.utils import get_peft_model_state_dict

    from flowrl.train.lora import add_lora_to_transformer, lora_config, lora_targets_present, save_diffusers_lora

    pol = FlowPolicy.from_pretrained(tiny_dir, max_sequence_length=MSL)
    pol.condition_image_size = None
    lc = lora_config("flux_kontext", rank=RANK, alpha=ALPHA)
    present = lora_targets_present(pol.transformer, sorted(lc.target_modules))
    assert set(present) == set(lc.target_modules)  # every default target exists in the Kontext transformer
    lc.target_modules = set(present)
    add_lora_to_transformer(pol.transformer, lc)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pol.transformer.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    out = save_diffusers_lora(FluxKontextPipeline, pol.transformer, tmp_path / "lora")
    bare = tmp_path / "bare"
    bare.mkdir()
    FluxKontextPipeline.save_lora_weights(bare, transformer_lora_layers=get_peft_model_state_dict(pol.transformer),
                                          safe_serialization=True)
    with torch.no_grad():
        e = pol.encode_prompts(PROMPTS, images=_sources())
        x = pol.initial_noise(2, 32, 32, generator=torch.Generator().manual_seed(1))
        v_ours = pol.velocity(x, 0.7, e, 2.5)

    def loaded_velocity(folder):
        pipe = FluxKontextPipeline.from_pretrained(tiny_dir)
        pipe.load_lora_weights(folder)
        scales = {float(v) for m in pipe.transformer.modules() for v in (getattr(m, "scaling", None) or {}).values()}
        q = FlowPolicy.from_pipeline(pipe, max_sequence_length=MSL)
        with torch.no_grad():
            return scales, q.velocity(x, 0.7, e, 2.5)

    scales, v = loaded_velocity(out)
    assert scales == {ALPHA / RANK}
    torch.testing.assert_close(v, v_ours, rtol=0, atol=1e-5)
    scales, v_bare = loaded_velocity(bare)
    assert scales == {1.0} and not torch.allclose(v_bare, v_ours, atol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradient(policy):
    t = policy.transformer
    e = policy.encode_prompts(PROMPTS, images=_sources())
    x = policy.initial_noise(2, 32, 32, generator=torch.Generator().manual_seed(2))
    params = [p for p in t.parameters()]
    was = [p.requires_grad for p in params]

    def grads():
        t.zero_grad(set_to_none=True)
        for p in params:
            p.requires_grad_(True)
        (policy.velocity(x, 0.4, e, 2.5) ** 2).mean().backward()
        return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]

    calls = []
    try:
        plain = grads()
        t.enable_gradient_checkpointing()
        inner = t._gradient_checkpointing_func
        t._gradient_checkpointing_func = lambda *a, **k: (calls.append(1), inner(*a, **k))[1]
        ckpt = grads()
    finally:
        t.disable_gradient_checkpointing()
        t.zero_grad(set_to_none=True)
        for p, r in zip(params, was):
            p.requires_grad_(r)
    assert calls, "gradient checkpointing was not used"
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_model_config_sets_true_cfg_and_condition_size(tiny_dir):
    from flowrl.config import load_run_config
    from flowrl.inputs import UsageError
    from flowrl.train.model import build_flow_policy

    cfg = load_run_config(ROOT / "configs" / "tiny_flux_kontext.yaml", [f"model.path={tiny_dir}", "model.true_cfg_scale=2.5",
                                                                        "model.condition_image_size=24"])
    pol = build_flow_policy(cfg.model)
    assert pol.true_cfg_scale == 2.5 and pol.condition_image_size == 24 and pol._uses_negative
    assert pol.max_sequence_length == 64
    flux = load_run_config(ROOT / "configs" / "tiny_flux_kontext.yaml", [f"model.path={tiny_dir}", "model.family=flux"])
    with pytest.raises(UsageError, match="holds a FluxKontextPipeline"):
        build_flow_policy(flux.model)
    with pytest.raises(ValueError, match="true_cfg_scale"):
        load_run_config(ROOT / "configs" / "tiny_flux_kontext.yaml", ["model.true_cfg_scale=-1"])


def test_fsdp_config_names_the_kontext_blocks(policy):
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / "accelerate" / "fsdp_flux_kontext.yaml").read_text())
    names = cfg["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"].split(",")
    present = {type(m).__name__ for m in policy.transformer.modules()}
    assert names and set(names) <= present


# ------------------------------------------------------------------------------------------------
# training runs
# ------------------------------------------------------------------------------------------------


def _train(tiny_dir, out, *extra):
    return flowrl_main(["train", str(ROOT / "configs" / "tiny_flux_kontext.yaml"), f"model.path={tiny_dir}",
                        f"output_dir={out}", "train.tracker=none", "train.progress=false", "resume=none",
                        "sample.eval_num_steps=2", "eval.num_prompts=1", "eval.seeds=[0]", "sample.group_size=2",
                        "data.max_train_prompts=4",
                        "rewards={shapes_edit: 1.0, jpeg_compressibility: 1.0}", *extra])


def test_flowrl_train_runs_the_tiny_kontext_config(tiny_dir, tmp_path, monkeypatch):
    from flowrl.train.grids import PAD, cell_size

    monkeypatch.setenv("FLOWRL_CACHE", str(tmp_path / "cache"))
    # the HTML report (matplotlib curves) is not under test here and costs more than the two training steps
    monkeypatch.setattr("flowrl.train.loop.write_report", lambda run_dir: None)
    out = tmp_path / "run"
    assert _train(tiny_dir, out, "max_steps=2") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and "shapes_edit" in summary["last_eval"]
    assert "shapes_edit/accuracy" in summary["last_eval_details"]  # the evaluator got the source images
    m = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(m) == 2 and all(math.isfinite(r["loss"]) and r["skipped_optimizer_steps"] == 0 for r in m)
    assert m[0]["grad_norm"] > 0
    from PIL import Image

    grid = Image.open(out / "before_after" / "grid.png")
    _, cw = cell_size(32, 32)
    assert grid.width == 3 * (cw + 2 * PAD)  # source | base | tuned
    # flowrl grid on a JSONL of editing records: the source column comes from the records' images
    src = sorted((tmp_path / "cache" / "shapes_edit").rglob("*.png"))[0]
    prompts = tmp_path / "edits.jsonl"
    prompts.write_text(json.dumps({"prompt": "remove the circle", "image": str(src)}) + "\n")
    assert flowrl_main(["grid", str(ROOT / "configs" / "tiny_flux_kontext.yaml"), f"model.path={tiny_dir}",
                        "sample.eval_num_steps=2", "rewards={jpeg_compressibility: 1.0}", "--checkpoint",
                        summary["result"], "--prompts", str(prompts), "--out", str(tmp_path / "grid")]) == 0
    assert Image.open(tmp_path / "grid" / "grid.png").width == 3 * (cw + 2 * PAD)
    assert flowrl_main(["sample", str(ROOT / "configs" / "tiny_flux_kontext.yaml"), f"model.path={tiny_dir}",
                        "sample.eval_num_steps=2", "rewards={jpeg_compressibility: 1.0}", "model.true_cfg_scale=2.0",
                        "--prompts", str(prompts), "--out", str(tmp_path / "samples")]) == 0
    assert len(list((tmp_path / "samples").glob("*.png"))) == 1 and (tmp_path / "samples" / "scores.csv").is_file()
    forward = tmp_path / "dgpo"
    assert _train(tiny_dir, forward, "max_steps=1", "objective.kind=dgpo", "objective.timestep_share=group",
                  "plan.kind=ode", "eval.at_start=false") == 0
    assert json.loads((forward / "summary.json").read_text())["steps"] == 1


def test_published_recipe_trains_one_step_on_the_tiny_model(tiny_dir, tmp_path, monkeypatch):
    """Flow-Factory's Kontext Flow-GRPO recipe (one Flow-SDE step drawn from steps 1..3, GDPO advantages) at tiny
    sizes on the editing task: the first pass is on-policy (ratio 1) and the LoRA gets a gradient."""
    monkeypatch.setenv("FLOWRL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("flowrl.train.loop.write_report", lambda run_dir: None)
    out = tmp_path / "recipe"
    assert flowrl_main([
        "train", str(ROOT / "configs" / "flow_grpo_flux_kontext.yaml"), f"model.path={tiny_dir}", f"output_dir={out}",
        "resume=none", "model.dtype=float32", "model.frozen_dtype=null", "train.mixed_precision='no'",
        "model.condition_image_size=0", "model.max_sequence_length=64", "sample.height=32", "sample.width=32",
        "sample.num_steps=5", "sample.eval_num_steps=2", "sample.group_size=2", "sample.prompts_per_step=2",
        "sample.chunk_size=null", "data.train=shapes_edit:train:32", "data.eval=shapes_edit:test:32",
        "data.max_train_prompts=4", "eval.num_prompts=1", "rewards={jpeg_compressibility: 1.0}", "max_steps=1",
        "train.tracker=none", "train.progress=false"]) == 0
    m = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(m["ratio_first_min"] - 1) < 1e-4 and abs(m["ratio_first_max"] - 1) < 1e-4
    assert m["grad_norm"] > 0 and m["skipped_optimizer_steps"] == 0


# ------------------------------------------------------------------------------------------------
# the shapes editing task
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind_text", ["make the circle red", "add a blue square left of the triangle",
                                       "remove the triangle", "add an orange circle below the square"])
def test_edit_checker_accepts_the_target_and_rejects_the_rest(kind_text):
    from flowrl.demo.shapes import draw
    from flowrl.demo.shapes_edit import check_edit, make_edit, parse_instruction

    e = parse_instruction(kind_text)
    for seed in range(3):
        src, tgt = make_edit(kind_text, 64, rng=seed)
        source, target = draw(src, 64), draw(tgt, 64)
        ok = check_edit(target, kind_text, source)
        assert ok.correct and ok.score == 1.0, (seed, ok.details)
        same = check_edit(source, kind_text, source)
        assert not same.correct and same.score < 1.0
        # wrong edits: recolour to another colour, add on the opposite side, remove the other object
        if e.kind == "recolor":
            wrong = [o if o.shape != e.shape else type(o)(("blue" if e.color != "blue" else "green"), o.shape, o.bbox, o.area)
                     for o in tgt]
        elif e.kind == "add":
            new, ref = tgt[0], tgt[1]
            dx = ref.center[0] - new.center[0]
            dy = ref.center[1] - new.center[1]
            b = new.bbox
            wrong = [type(new)(new.color, new.shape, (b[0] + 2 * dx, b[1] + 2 * dy, b[2] + 2 * dx, b[3] + 2 * dy)), ref]
        else:
            wrong = [o for o in src if o.shape == e.shape]
        bad = check_edit(draw(wrong, 64), kind_text, source)
        assert not bad.correct and bad.score < 1.0, (seed, bad.details)
        # a smaller edited image (the checker works in fractions of the image side)
        assert check_edit(target.resize((48, 48)), kind_text, source).correct


def test_edit_grammar_and_splits():
    from flowrl.demo.shapes_edit import all_instructions, format_instruction, parse_instruction, split_of_instruction

    every = all_instructions()
    assert len(every) == 18 + 3 + 144 and all(format_instruction(parse_instruction(t)) == t for t in every)
    train, test = set(all_instructions("train")), set(all_instructions("test"))
    assert train and test and not train & test and train | test == set(every)
    assert split_of_instruction("Remove the CIRCLE.") == split_of_instruction("remove the circle")
    for bad in ("make the circle", "paint the circle red", "add a red circle near the square", "remove the cube",
                "add a red circle left of the circle"):
        with pytest.raises(ValueError, match="instruction"):
            parse_instruction(bad)


def test_shapes_edit_source_scorer_and_jsonl(tmp_path, monkeypatch):
    from PIL import Image

    from flowrl.demo.shapes import draw
    from flowrl.demo.shapes_edit import make_edit
    from flowrl.inputs import UsageError
    from flowrl.train.data import load_records, record_images
    from scorers.registry import get_factory

    monkeypatch.setenv("FLOWRL_CACHE", str(tmp_path / "cache"))
    recs = load_records("shapes_edit:test:32", limit=6, seed=1)
    assert recs == load_records("shapes_edit:test:32", limit=6, seed=1)
    assert {r["kind"] for r in recs} == {"recolor", "add", "remove"}
    paths = record_images(recs)
    assert all(Path(p).is_file() and Image.open(p).size == (32, 32) for p in paths)
    scorer = get_factory("shapes_edit")()
    src, tgt = make_edit(recs[0]["prompt"], 64, rng=0)
    src_png = tmp_path / "src.png"
    draw(src, 64).save(src_png)
    good = torch.from_numpy(np.asarray(draw(tgt, 64), dtype=np.float32) / 255).permute(2, 0, 1)
    unedited = torch.from_numpy(np.asarray(draw(src, 64), dtype=np.float32) / 255).permute(2, 0, 1)
    scores = scorer(torch.stack([good, unedited]), [recs[0]["prompt"]] * 2, image=[str(src_png)] * 2)
    assert float(scores[0]) == 1.0 and float(scores[1]) < 1.0
    with pytest.raises(ValueError, match="source image"):
        scorer(good[None], [recs[0]["prompt"]])
    # a JSONL with an image column: relative paths from the file's folder; a missing image is one line
    good_file = tmp_path / "edit.jsonl"
    good_file.write_text(json.dumps({"prompt": "remove the circle", "image": "src.png"}) + "\n")
    assert load_records(str(good_file))[0]["image"] == str(src_png.resolve())
    bad_file = tmp_path / "bad.jsonl"
    bad_file.write_text(json.dumps({"prompt": "remove the circle", "image": "nope.png"}) + "\n")
    with pytest.raises(UsageError, match=r"bad.jsonl:1: source image not found: nope.png"):
        load_records(str(bad_file))
    (tmp_path / "junk.png").write_bytes(b"not a png")
    bad_file.write_text(json.dumps({"prompt": "remove the circle", "image": "junk.png"}) + "\n")
    with pytest.raises(UsageError, match="not a readable image"):
        load_records(str(bad_file))
    with pytest.raises(UsageError, match="no source image"):
        record_images([{"prompt": "a", "image": str(src_png)}, {"prompt": "b"}])
    with pytest.raises(UsageError, match="shapes_edit:<train|test>"):
        load_records("shapes_edit:valid")


def test_remote_protocol_carries_source_images(tmp_path):
    from flowrl.demo.shapes import draw
    from flowrl.demo.shapes_edit import make_edit
    from scorers._server_requests import BadRequest, read_score_request
    from scorers.remote import PROTOCOL, RemoteScorer, build_score_request
    from scorers.server import ScorerServer

    assert PROTOCOL == "flowrl-scorer/2"
    src, _ = make_edit("remove the circle", 32, rng=0)
    src_png = tmp_path / "s.png"
    draw(src, 32).save(src_png)
    imgs = torch.rand(2, 3, 8, 8)
    body = json.loads(build_score_request(imgs, ["a", "b"], {"image": [str(src_png), None], "k": [1, 2]}))
    assert body["protocol"] == 2 and len(body["source_images"]) == 2 and body["source_images"][1] is None
    assert "image" not in body["metadata"]
    plain = json.loads(build_score_request(imgs, ["a", "b"], {"k": [1, 2]}))
    assert plain["protocol"] == 1 and "source_images" not in plain  # version-1 servers still understand it
    req = read_score_request(json.dumps(body).encode())
    assert [s is None for s in req.decode_sources()] == [False, True]
    v1 = dict(body, protocol=1)
    with pytest.raises(BadRequest, match="unknown field"):
        read_score_request(json.dumps(v1).encode())
    with pytest.raises(BadRequest, match="protocol 3"):
        read_score_request(json.dumps(dict(body, protocol=3)).encode())

    seen = {}

    def judge(images, prompts, **metadata):
        seen["image"] = metadata.get("image")
        return torch.tensor([float(np.asarray(s).mean()) if s is not None else -1.0 for s in metadata["image"]])

    with ScorerServer(judge, port=0) as srv:
        got = RemoteScorer(srv.url, retries=0)(imgs, ["a", "b"], image=[str(src_png), None])
    expected = float(np.asarray(draw(src, 32)).mean())
    assert abs(float(got[0]) - expected) < 1e-3 and float(got[1]) == -1.0
    assert seen["image"][0].size == (32, 32) and seen["image"][0].mode == "RGB"
