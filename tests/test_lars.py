"""LARS against updates worked out by hand."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from selfclassifier_core.engine.lars import LARS


def _vec(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def test_two_steps_by_hand():
    # weight: 2-D (adapted, decayed); bias: 1-D (plain momentum SGD)
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]], dtype=torch.float64))
    b = torch.nn.Parameter(_vec(1.0, -1.0))
    opt = LARS([w, b], lr=2.0, momentum=0.9, weight_decay=0.1, trust_coefficient=0.001, eps=0.0)

    # step 1: g = [0.2, -0.4]; d = g + 0.1 * w = [0.2 + 0.3, -0.4 + 0.4] = [0.5, 0.0]
    #   ||w|| = 5, ||d|| = 0.5 -> q = 0.001 * 5 / 0.5 = 0.01 -> d = [0.005, 0]
    #   buf = [0.005, 0]; w = [3, 4] - 2 * [0.005, 0] = [2.99, 4.0]
    # bias: g = [0.5, 0.5], buf = [0.5, 0.5], b = [1, -1] - 2 * [0.5, 0.5] = [0, -2]
    w.grad = torch.tensor([[0.2, -0.4]], dtype=torch.float64)
    b.grad = _vec(0.5, 0.5)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([[2.99, 4.0]], dtype=torch.float64))
    torch.testing.assert_close(b.detach(), _vec(0.0, -2.0))

    # step 2: g = [0.001, 0.0]; d = g + 0.1 * [2.99, 4] = [0.3, 0.4], ||d|| = 0.5
    #   ||w|| = sqrt(2.99^2 + 4^2) = sqrt(24.9401); q = 0.001 * sqrt(24.9401) / 0.5
    #   buf = 0.9 * [0.005, 0] + q * [0.3, 0.4]; w = [2.99, 4] - 2 * buf
    # bias: g = [1, 0]; buf = 0.9 * [0.5, 0.5] + [1, 0] = [1.45, 0.45]
    #   b = [0, -2] - 2 * [1.45, 0.45] = [-2.9, -2.9]
    w.grad = torch.tensor([[0.001, 0.0]], dtype=torch.float64)
    b.grad = _vec(1.0, 0.0)
    opt.step()
    q = 0.001 * math.sqrt(24.9401) / 0.5
    buf = [0.9 * 0.005 + q * 0.3, q * 0.4]
    expect = [[2.99 - 2 * buf[0], 4.0 - 2 * buf[1]]]
    torch.testing.assert_close(w.detach(), torch.tensor(expect, dtype=torch.float64))
    torch.testing.assert_close(b.detach(), _vec(-2.9, -2.9))


def test_group_flag_overrides_automatic_exclusion():
    # a 2-D weight in a group marked lars_exclude=True: plain momentum SGD, no decay
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]], dtype=torch.float64))
    # a 1-D parameter in a group marked lars_exclude=False: adapted and decayed
    v = torch.nn.Parameter(_vec(3.0, 4.0))
    opt = LARS([{"params": [w], "lars_exclude": True}, {"params": [v], "lars_exclude": False}],
               lr=1.0, momentum=0.9, weight_decay=0.1, eps=0.0)
    w.grad = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    v.grad = _vec(0.2, -0.4)
    opt.step()
    # w: [3, 4] - 1 * [1, 1] = [2, 3]
    torch.testing.assert_close(w.detach(), torch.tensor([[2.0, 3.0]], dtype=torch.float64))
    # v: d = [0.5, 0], q = 0.001 * 5 / 0.5 = 0.01 -> v = [3 - 0.005, 4]
    torch.testing.assert_close(v.detach(), _vec(2.995, 4.0))


def test_zero_weight_uses_unit_trust_ratio_and_no_grad_is_skipped():
    w = torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
    frozen = torch.nn.Parameter(torch.ones(2, 2, dtype=torch.float64))
    opt = LARS([w, frozen], lr=0.5, weight_decay=0.1)
    w.grad = torch.full((2, 2), 2.0, dtype=torch.float64)
    opt.step()
    # ||w|| = 0 -> q = 1; d = g + 0.1 * 0 = 2 -> w = 0 - 0.5 * 2 = -1
    torch.testing.assert_close(w.detach(), torch.full((2, 2), -1.0, dtype=torch.float64))
    torch.testing.assert_close(frozen.detach(), torch.ones(2, 2, dtype=torch.float64))


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    a = torch.nn.Linear(3, 2)
    b = torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    opt_a = LARS(a.parameters(), lr=0.1)
    x = torch.randn(4, 3)
    a(x).square().sum().backward()
    opt_a.step()
    b.load_state_dict(a.state_dict())
    opt_b = LARS(b.parameters(), lr=0.1)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as if saved and loaded
    for model, opt in ((a, opt_a), (b, opt_b)):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, name", [({"lr": -1.0}, "lr"), ({"lr": 0.1, "momentum": 1.0}, "momentum"),
                                          ({"lr": 0.1, "weight_decay": -1.0}, "weight_decay"),
                                          ({"lr": 0.1, "trust_coefficient": 0.0}, "trust_coefficient")])
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LARS([torch.nn.Parameter(torch.zeros(2))], **kwargs)
