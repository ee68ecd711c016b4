"""``bench/memory.py``: its cases run on CPU at a tiny size (so the bench never rots), for the tiny Wan
video model (``--model wan``) and the default SD3; decoding a video in chunks of rows gives the same
frames; the table and its summary are computed from the medians as documented (docs/methods.md)."""

from __future__ import annotations

import json
import runpy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--rows", "2", "--steps", "2", "--size", "16", "--layers", "1"]


@pytest.fixture(scope="module")
def bench():
    return runpy.run_path(str(ROOT / "bench" / "memory.py"), run_name="bench_memory")


def _child(bench, capsys, case, *extra):
    assert bench["main"](["--child", case, *TINY, *extra]) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    return json.loads(out)


def test_wan_cases_run_in_process_at_a_tiny_size(bench, capsys):
    # every kind of case (the unit, the learner with KL, the one-graph baseline, both decodes) runs
    for case in ("fwd_bwd", "learner_2_kl", "one_graph_2", "decode_rows_1"):
        rec = _child(bench, capsys, case, "--model", "wan", "--frames", "5")
        assert rec["case"] == case and rec["rss_before"] > 0 and rec["growth"] >= 0, rec
    with pytest.raises(ValueError, match="unknown case 'decode'.*sd3"):
        _child(bench, capsys, "decode", "--head-dim", "8")  # video cases are wan only


def test_wan_arguments_are_checked(bench):
    for bad in (["--head-dim", "20"], ["--frames", "6"], ["--size", "40"]):
        with pytest.raises(SystemExit):
            bench["main"](["--model", "wan", *bad])
    assert bench["cases_for"]("wan")[-2:] == ["decode", "decode_rows_1"]
    assert "decode" not in bench["cases_for"]("sd3")
    with pytest.raises(ValueError, match="unknown model"):
        bench["cases_for"]("flux")


def test_decoding_video_rows_in_chunks_gives_the_same_frames(bench):
    args = SimpleNamespace(model="wan", layers=1, head_dim=12, frames=5, size=32)
    policy = bench["build_policy"](args)
    x = policy.initial_noise(2, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = bench["decode_rows"](policy, x, None)
        rows = bench["decode_rows"](policy, x, 1)
    assert whole.shape == (2, 3, 5, 32, 32)
    assert whole.std() > 0.01 and not torch.equal(whole[0], whole[1])  # two different, non-constant videos
    # equal within float32 rounding: oneDNN's convolutions may sum in another order for another batch
    # size (measured: max |diff| 7e-6 on frames in [0, 1])
    torch.testing.assert_close(rows, whole, rtol=0, atol=2e-5)
    with pytest.raises(ValueError, match="chunk"):
        bench["decode_rows"](policy, x, 0)


def test_summary_and_table_follow_the_medians(bench):
    mib = 2**20
    med = {c: 10 * mib for c in bench["cases_for"]("wan")}
    med.update(calibration=64 * mib, learner_2=10 * mib, learner_5=10.5 * mib, learner_10=11 * mib,
               one_graph_10=60 * mib)
    worst, spread = bench["learner_summary"](med)
    assert worst == pytest.approx(1.1) and spread == pytest.approx(1.1)
    args = SimpleNamespace(model="wan", layers=4, head_dim=24, frames=17, size=64, rows=8, repeats=3)
    table = bench["format_table"](med, args)
    assert "tiny Wan2.1 T2V" in table and "17 frames of 64x64" in table
    assert "one_graph_10" in table and "6.000" in table and "decode_rows_1" in table
    with pytest.raises(ValueError, match="fwd_bwd"):
        bench["learner_summary"](dict(med, fwd_bwd=0))


def test_case_names(bench):
    assert bench["is_case"]("learner_3_kl", "sd3") and bench["is_case"]("one_graph_7", "wan")
    assert bench["is_case"]("decode", "wan") and not bench["is_case"]("decode", "sd3")
    assert not bench["is_case"]("learner_0", "wan") and not bench["is_case"]("learner_2_kl_x", "wan")
