"""Cosine schedule with warm-up, and per-group learning-rate scales."""
from __future__ import annotations

import pytest
import torch

from selfclassifier_core.engine.schedules import cosine_with_warmup, set_lr


def test_endpoints_and_known_points():
    # total 110 steps, 10 warm-up, base 1.0, final 0.1
    f = lambda s: cosine_with_warmup(s, total_steps=110, warmup_steps=10, base_value=1.0,  # noqa: E731
                                     final_value=0.1)
    assert f(0) == 0.0                       # warm-up starts at 0
    assert f(5) == pytest.approx(0.5)        # half-way through the warm-up: base / 2
    assert f(10) == pytest.approx(1.0)       # end of warm-up: base
    # half-way through the cosine (step 60 of 10..110): cos(pi/2) = 0 -> (1 + 0.1) / 2 = 0.55
    assert f(60) == pytest.approx(0.55)
    # a quarter through (step 35): cos(pi/4) = 0.7071 -> 0.1 + 0.9 * 1.7071 / 2 = 0.868198
    assert f(35) == pytest.approx(0.868198, abs=1e-6)
    assert f(110) == pytest.approx(0.1)      # end: final value
    assert f(500) == pytest.approx(0.1)      # past the end: stays at final


def test_monotone_up_then_down():
    values = [cosine_with_warmup(s, 200, 20, 0.5) for s in range(201)]
    warm, decay = values[:21], values[20:]
    assert all(a < b for a, b in zip(warm, warm[1:]))
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert max(values) == pytest.approx(0.5) and values[-1] == pytest.approx(0.0)


def test_no_warmup_starts_at_base():
    assert cosine_with_warmup(0, 10, 0, 2.0) == pytest.approx(2.0)
    assert cosine_with_warmup(10, 10, 0, 2.0) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("args, name", [((0, 0, 0, 1.0), "total_steps"), ((0, 10, 11, 1.0), "warmup_steps"),
                                        ((-1, 10, 2, 1.0), "step")])
def test_bad_arguments(args, name):
    with pytest.raises(ValueError, match=name):
        cosine_with_warmup(*args)


def test_set_lr_respects_lr_scale():
    head = torch.nn.Parameter(torch.zeros(2))
    body = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [head]}, {"params": [body], "lr_scale": 0.1}], lr=1.0)
    set_lr(opt, 0.5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.05)
    with pytest.raises(ValueError, match="lr"):
        set_lr(opt, -1.0)


def test_default_base_value_gives_a_multiplier():
    assert cosine_with_warmup(5, 20, 10) == pytest.approx(0.5)
    assert cosine_with_warmup(10, 20, 10) == pytest.approx(1.0)
    assert cosine_with_warmup(20, 20, 10) == pytest.approx(0.0, abs=1e-12)
