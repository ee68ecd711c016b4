"""A megabyte-long prompt that fails scoring or validation is quoted in messages cut to a few
hundred characters, never copied whole into logs, reward issues or exceptions."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from scorers._text import short

LONG = "a red circle " + "x" * 1_000_000  # outside the shapes grammar, 1 MB
LIMIT = 4000  # characters of log / exception text one failing batch may produce


def _imgs(n):
    return torch.full((n, 3, 32, 32), 0.5)


def test_short_keeps_short_text_and_cuts_long_text():
    assert short("a red circle") == "a red circle"
    assert short("a red circle", quote=True) == "'a red circle'"
    assert short("x" * 100, 10) == "xxxxxxxxxx... (100 chars)"
    assert short("x" * 100, 10, quote=True) == "'xxxxxxxxxx'... (100 chars)"
    assert short(ValueError("boom")) == "boom"
    assert len(short(LONG)) < 120 and str(len(LONG)) in short(LONG)


def test_shapes_parse_error_quotes_a_cut_prompt():
    from flowrl.demo import shapes

    for bad in (LONG, "a " + "q" * 1_000_000 + " circle", " " * 1_000_000, "three " + "r" * 1_000_000 + " circles"):
        with pytest.raises(ValueError) as ei:
            shapes.parse(bad)
        assert len(str(ei.value)) < 500 and "chars)" in str(ei.value)


@pytest.mark.parametrize("on_error", ["mask", "raise"])
def test_multi_reward_with_a_failing_long_prompt_logs_a_few_kb(on_error, caplog):
    from scorers.multi import MultiReward

    m = MultiReward({"shapes": 1.0}, on_error=on_error)  # the shapes scorer raises on a prompt outside its grammar
    with caplog.at_level(logging.DEBUG):
        if on_error == "raise":
            with pytest.raises(RuntimeError) as ei:
                m(_imgs(2), [LONG, "a red circle"])
            assert len(str(ei.value)) < LIMIT and "shapes" in str(ei.value)
        else:
            out = m(_imgs(2), [LONG, "a red circle"])
            assert not out.valid.any() and [i.kind for i in out.issues] == ["error"]
            assert len(str(out.issues[0])) < LIMIT
            assert "(1000013 chars)" in out.issues[0].message
            assert "Traceback" in caplog.text and "score_batch" in caplog.text  # the frames are kept
    assert len(caplog.text) < LIMIT


def test_shapes_scorer_marking_a_long_prompt_nan_logs_a_few_kb(caplog):
    from scorers.shapes import ShapesScorer

    with caplog.at_level(logging.DEBUG):
        out = ShapesScorer(on_invalid_prompt="nan")(_imgs(2), [LONG, "a red circle"])
    assert torch.isnan(out[0]) and torch.isfinite(out[1])
    assert 0 < len(caplog.text) < LIMIT and "outside the grammar" in caplog.text


def test_any_scorer_error_quoting_the_prompt_is_cut(caplog):
    from scorers.multi import MultiReward

    def quoting(images, prompts, **_):
        raise ValueError(f"cannot score {prompts[0]!r}")

    with caplog.at_level(logging.DEBUG):
        out = MultiReward({"q": 1.0}, scorers={"q": quoting})(_imgs(1), [LONG])
    assert len(out.issues[0].message) < 1000 and len(caplog.text) < LIMIT


def test_text_reward_function_error_quoting_the_prompt_is_cut(caplog):
    from flowrl.text.rewards import score_completions

    def quoting(prompts, completions, **_):
        raise ValueError(f"bad prompt {prompts[0]!r}")

    with caplog.at_level(logging.DEBUG):
        r, names = score_completions({"q": quoting}, [LONG], ["42"])
    assert torch.isnan(r).all() and names == ["q"]
    assert 0 < len(caplog.text) < LIMIT


def test_server_and_judge_error_texts_are_cut():
    from scorers.judge import _answer_text
    from scorers.remote import _server_message

    for body in ({"error": f"bad prompt {LONG}"}, {"error": {"message": LONG}}, {"message": LONG}):
        assert len(_server_message(json.dumps(body).encode())) < 500
    with pytest.raises(ValueError) as ei:
        _answer_text({"error": {"message": f"prompt too long: {LONG}"}})
    assert len(str(ei.value)) < 500


def test_library_log_records_are_bounded_once_installed():
    """diffusers' CLIP truncation notice quotes the whole cut-off prompt (22 MB of stderr for two
    steps with an 11 MB prompt line); flowrl's commands install a record factory that cuts every
    record, a library's included, to 2000 characters."""
    import io
    import logging

    from scorers._text import bound_log_messages

    bound_log_messages()
    stream = io.StringIO()
    lib = logging.getLogger("diffusers.pipelines.fake")  # a library logger with its own handler
    handler = logging.StreamHandler(stream)
    lib.addHandler(handler)
    try:
        lib.warning("The following part of your input was truncated: %s", ["a red cube " * 100_000])
    finally:
        lib.removeHandler(handler)
    out = stream.getvalue()
    assert 2000 <= len(out) < 2100 and out.rstrip().endswith("... (1100052 chars)"), len(out)
