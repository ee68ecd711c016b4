"""The one learning-rate schedule (flowrl/train/optim.py): bit-identical to the three formulas it
replaced (the RL loop's warm-up lambda, the demo LM's and the demo image model's pretraining
schedules), and a scheduler whose saved state resumes as the old one did."""
import math

import pytest
import torch

from flowrl.train.optim import lr_factor, warmup_scheduler


def _old_loop(s, warm):  # flowrl/train/loop.py before: LambdaLR(opt, lambda s: ...)
    return min(1.0, (s + 1) / warm) if warm else 1.0


def _old_text(step, peak, warmup):  # flowrl/demo/pretrain_text.py lr_at before
    if warmup <= 0:
        return peak
    return peak * min(1.0, (step + 1) / warmup)


def _old_image(step, total, peak, warmup, final_frac=0.1):  # flowrl/demo/pretrain_image.py lr_at before
    if step < warmup:
        return peak * (step + 1) / warmup
    span = max(total - warmup, 1)
    p = min(max(step - warmup, 0) / span, 1.0)
    return peak * (final_frac + (1.0 - final_frac) * 0.5 * (1.0 + math.cos(math.pi * p)))


@pytest.mark.parametrize("warm", [0, 1, 3, 7, 50, 200])
def test_constant_after_warmup_is_the_old_rl_and_lm_schedule_bit_for_bit(warm):
    for s in range(2000):
        assert lr_factor(s, warm) == _old_loop(s, warm), (s, warm)
        for peak in (3e-3, 1e-3, 3e-4, 5e-4, 0.1):
            assert peak * lr_factor(s, warm) == _old_text(s, peak, warm), (s, warm, peak)


@pytest.mark.parametrize("warm,total", [(0, 100), (10, 100), (200, 6000), (200, 1500), (2, 12), (20, 10)])
def test_cosine_is_the_old_image_schedule_bit_for_bit(warm, total):
    for s in range(total + 50):
        assert lr_factor(s, warm, total, 0.1) == _old_image(s, total, 1.0, warm), (s, warm, total)
        # the learning rate itself: equal after the warm-up; in it peak * ((s+1)/w) may round
        # differently from the old (peak * (s+1)) / w, by at most two units in the last place
        for peak in (2e-3, 3e-3):
            new, old = peak * lr_factor(s, warm, total, 0.1), _old_image(s, total, peak, warm)
            assert new == old if s >= warm else abs(new - old) <= 2 * math.ulp(old), (s, peak, new, old)


def test_shape_of_the_cosine_schedule():
    warm, total = 10, 100
    f = [lr_factor(s, warm, total, 0.1) for s in range(total + 1)]
    assert f[0] == pytest.approx(1 / warm) and f[warm - 1] == 1.0 and f[warm] == 1.0
    assert all(a >= b for a, b in zip(f[warm:], f[warm + 1:]))
    assert f[total] == pytest.approx(0.1)
    assert f[warm + (total - warm) // 2] == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-9)
    with pytest.raises(ValueError, match="total_steps"):
        lr_factor(5, 0, 0)


def test_warmup_scheduler_state_and_resume_match_the_old_lambda():
    def make(build):
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
        return opt, build(opt)

    new_opt, new = make(lambda o: warmup_scheduler(o, 5))
    old_opt, old = make(lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: _old_loop(s, 5)))
    for _ in range(8):
        assert new.get_last_lr() == old.get_last_lr()
        new_opt.step(), old_opt.step(), new.step(), old.step()
    state = new.state_dict()
    assert state == old.state_dict() and state["lr_lambdas"] == [None]  # nothing of the function is saved
    again_opt, again = make(lambda o: warmup_scheduler(o, 5))
    again.load_state_dict(state)
    again_opt.step(), again.step(), new_opt.step(), new.step()
    assert again.get_last_lr() == new.get_last_lr()
