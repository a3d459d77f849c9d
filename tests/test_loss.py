"""Self-Classifier loss: parity with a loop reference, a hand case, the uniform prior, gradients."""
from __future__ import annotations

import math

import pytest
import torch

from selfclassifier_core.engine.loss import SelfClassifierLoss, self_classifier_loss, view_pairs


# ----------------------------------------------------------------------------------------------
# Reference written out from the paper's formulas (issue 3), element by element, in float64.
# ----------------------------------------------------------------------------------------------
def _ref_target(z: torch.Tensor, col_tau: float) -> list[list[torch.Tensor]]:
    """softmax over the batch (column-wise), then each row divided by its sum."""
    n, c = z.shape
    soft = [[None] * c for _ in range(n)]
    for k in range(c):
        denom = sum(torch.exp(z[r, k] / col_tau) for r in range(n))
        for r in range(n):
            soft[r][k] = torch.exp(z[r, k] / col_tau) / denom
    out = []
    for r in range(n):
        row_sum = sum(soft[r])
        out.append([soft[r][k] / row_sum for k in range(c)])
    return out


def _ref_log_pred(z: torch.Tensor, row_tau: float, eps: float) -> list[list[torch.Tensor]]:
    """softmax over classes (row-wise), each column divided by its sum, log(N/C * p + eps)."""
    n, c = z.shape
    soft = []
    for r in range(n):
        denom = sum(torch.exp(z[r, k] / row_tau) for k in range(c))
        soft.append([torch.exp(z[r, k] / row_tau) / denom for k in range(c)])
    col_sums = [sum(soft[r][k] for r in range(n)) for k in range(c)]
    return [[torch.log(n / c * soft[r][k] / col_sums[k] + eps) for k in range(c)] for r in range(n)]


def reference_loss(head_logits, n_global=2, row_tau=0.1, col_tau=0.05, eps=1e-8,
                   include_local_pairs=False, detach_targets=False, detach_preds=False):
    terms = []
    for views in head_logits:
        views = [z.double() for z in views]
        n_views = len(views)
        for i in range(n_views):
            for j in range(n_views):
                if i == j:
                    continue
                if not include_local_pairs and i >= n_global and j >= n_global:
                    continue
                zi = views[i].detach() if detach_targets else views[i]
                zj = views[j].detach() if detach_preds else views[j]
                t = _ref_target(zi, col_tau)
                lp = _ref_log_pred(zj, row_tau, eps)
                n, c = zi.shape
                total = 0.0
                for r in range(n):
                    total = total + sum(t[r][k] * lp[r][k] for k in range(c))
                terms.append(-total / n)
    return sum(terms) / len(terms)


def _logits(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


# ----------------------------------------------------------------------------------------------
def test_parity_with_reference_default_temperatures():
    heads = [[_logits(6, 3, seed=v) for v in range(4)]]  # 2 global + 2 local views
    got = SelfClassifierLoss()(heads, n_global=2)
    want = reference_loss(heads, n_global=2)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)


def test_parity_with_reference_other_temperatures_and_n_over_c():
    # N/C = 8/2 = 4, non-default temperatures and eps
    heads = [[_logits(8, 2, seed=10 + v, scale=0.5) for v in range(3)]]
    got = SelfClassifierLoss(row_tau=0.3, col_tau=0.2, eps=1e-4)(heads, n_global=1)
    want = reference_loss(heads, n_global=1, row_tau=0.3, col_tau=0.2, eps=1e-4)
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)


def test_hand_computed_2x2():
    # row_tau = col_tau = 1, eps = 0, N = C = 2 (so N/C = 1), two global views.
    # z0 = log [[3, 1], [1, 1]]
    #   target t0: column softmax -> col0 [3,1]/4 = [.75,.25], col1 [1,1]/2 = [.5,.5]
    #              -> [[.75, .5], [.25, .5]]; rows / their sums (1.25, .75) -> [[.6, .4], [1/3, 2/3]]
    #   pred p0:   row softmax -> [[.75, .25], [.5, .5]]; columns / sums (1.25, .75)
    #              -> [[.6, 1/3], [.4, 2/3]]
    # z1 = log [[1, 1], [1, 3]]
    #   target t1: column softmax -> [[.5, .25], [.5, .75]]; rows / (.75, 1.25) -> [[2/3, 1/3], [.4, .6]]
    #   pred p1:   row softmax -> [[.5, .5], [.25, .75]]; columns / (.75, 1.25) -> [[2/3, .4], [1/3, .6]]
    # term(0 -> 1) = -mean( .6 ln(2/3) + .4 ln(.4),  (1/3) ln(1/3) + (2/3) ln(.6) )
    #              = -mean( .6(-0.405465) + .4(-0.916291), (1/3)(-1.098612) + (2/3)(-0.510826) )
    #              = -mean( -0.609795, -0.706755 ) = 0.658275
    # term(1 -> 0) = -mean( (2/3) ln(.6) + (1/3) ln(1/3), .4 ln(.4) + .6 ln(2/3) ) = 0.658275
    # loss = mean of the two terms = 0.658275
    z0 = torch.log(torch.tensor([[3.0, 1.0], [1.0, 1.0]]))
    z1 = torch.log(torch.tensor([[1.0, 1.0], [1.0, 3.0]]))
    loss = self_classifier_loss([[z0, z1]], n_global=2, row_tau=1.0, col_tau=1.0, eps=0.0)
    assert loss.item() == pytest.approx(0.658275, abs=1e-5)


def test_balanced_predictions_beat_collapsed_ones():
    n = c = 4
    balanced = torch.eye(n, c) * 5.0                      # every sample its own class
    collapsed = torch.zeros(n, c)
    collapsed[:, 0] = 5.0                                  # everyone in class 0
    loss_fn = SelfClassifierLoss()
    good = loss_fn([[balanced, balanced.clone()]])
    bad = loss_fn([[collapsed, collapsed.clone()]])
    # collapsed: every column of p is uniform over rows -> log(N/C * 1/N) = log(1/C) -> loss = ln C
    assert bad.item() == pytest.approx(math.log(c), rel=1e-4)
    assert good.item() < 0.1
    assert good.item() < bad.item()


def test_gradients_finite_and_flow_through_targets_and_predictions():
    views = [_logits(5, 3, seed=20 + v).double().requires_grad_(True) for v in range(3)]
    loss = self_classifier_loss([views], n_global=2)
    grads = torch.autograd.grad(loss, views)
    for g in grads:
        assert torch.isfinite(g).all()
        assert g.abs().sum() > 0

    # The gradient equals (target-side part) + (prediction-side part) of the reference:
    # the target side is not stopped.
    full = torch.autograd.grad(reference_loss([views], n_global=2), views)
    pred_only = torch.autograd.grad(reference_loss([views], n_global=2, detach_targets=True), views)
    target_only = torch.autograd.grad(reference_loss([views], n_global=2, detach_preds=True), views)
    for g, f, p, t in zip(grads, full, pred_only, target_only):
        torch.testing.assert_close(g, f.to(g.dtype), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(g, (p + t).to(g.dtype), rtol=1e-4, atol=1e-7)
        assert t.abs().sum() > 1e-6            # target side alone carries gradient
        assert not torch.allclose(g, p)        # so a stop-gradient version would differ


def test_gradient_reaches_a_view_through_its_target_role_only():
    # n_global=1 with one local view: pairs (0,1) and (1,0). Detaching view 1 wherever it is a
    # prediction leaves only its target role; its gradient must still be non-zero.
    z0 = _logits(4, 2, seed=31).requires_grad_(True)
    z1 = _logits(4, 2, seed=32).requires_grad_(True)
    loss = reference_loss([[z0, z1]], n_global=1, detach_preds=True)
    (g1,) = torch.autograd.grad(loss, [z1])
    assert g1.abs().sum() > 1e-6
    ours = self_classifier_loss([[z0, z1]], n_global=1)
    (ours_g1,) = torch.autograd.grad(ours, [z1])
    assert ours_g1.abs().sum() > 1e-6


def test_local_local_pairs_excluded():
    heads = [[_logits(6, 3, seed=40 + v) for v in range(5)]]   # 2 global + 3 local
    got = self_classifier_loss(heads, n_global=2)
    excluded = reference_loss(heads, n_global=2)
    included = reference_loss(heads, n_global=2, include_local_pairs=True)
    assert got.item() == pytest.approx(excluded.item(), rel=1e-5)
    assert abs(included.item() - excluded.item()) > 1e-3   # the exclusion is visible


def test_two_local_views_meet_the_globals_only():
    # 2 global + 2 local views: the 10 ordered pairs that involve a global view, written out.
    assert view_pairs(4, 2) == [(0, 1), (0, 2), (0, 3), (1, 0), (1, 2), (1, 3),
                                (2, 0), (2, 1), (3, 0), (3, 1)]
    g0, g1, l0, l1 = (_logits(6, 3, seed=50 + v) for v in range(4))
    got = self_classifier_loss([[g0, g1, l0, l1]], n_global=2)
    assert got.item() == pytest.approx(reference_loss([[g0, g1, l0, l1]], n_global=2).item(),
                                       rel=1e-5)
    with_local_pairs = reference_loss([[g0, g1, l0, l1]], n_global=2, include_local_pairs=True)
    assert abs(got.item() - with_local_pairs.item()) > 1e-3
    # Without a (l0, l1) or (l1, l0) term, l1's gradient cannot depend on l0 at all.
    grads = []
    for other in (l0, _logits(6, 3, seed=99, scale=3.0)):
        l1_ = l1.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(self_classifier_loss([[g0, g1, other, l1_]], n_global=2),
                                   [l1_])
        grads.append(g)
    assert grads[0].abs().sum() > 1e-6
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-7)
    # and with all four marked global the local/local pairs enter the mean
    c = self_classifier_loss([[g0, g1, l0, l1]], n_global=4)
    assert c.item() == pytest.approx(reference_loss([[g0, g1, l0, l1]], n_global=4).item(), rel=1e-5)


def test_multiple_heads_averaged():
    h1 = [_logits(8, 2, seed=60 + v) for v in range(3)]
    h2 = [_logits(8, 5, seed=70 + v) for v in range(3)]
    both = self_classifier_loss([h1, h2], n_global=2)
    one = self_classifier_loss([h1], n_global=2)
    two = self_classifier_loss([h2], n_global=2)
    assert both.item() == pytest.approx((one.item() + two.item()) / 2, rel=1e-6)
    assert both.item() == pytest.approx(reference_loss([h1, h2], n_global=2).item(), rel=1e-5)


def test_float32_under_bf16_autocast():
    lin = torch.nn.Linear(4, 3)
    x = [_logits(6, 4, seed=80 + v) for v in range(2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = [lin(v) for v in x]
        assert logits[0].dtype == torch.bfloat16
        loss = SelfClassifierLoss()([logits])
    assert loss.dtype == torch.float32
    want = reference_loss([[z.float() for z in logits]])
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    loss.backward()
    assert torch.isfinite(lin.weight.grad).all()


@pytest.mark.parametrize(
    "heads, match",
    [
        ([], "at least one head"),
        ([[]], "at least 2 views"),
        ([[torch.zeros(4, 2)]], "at least 2 views"),
        ([[torch.zeros(4, 2), torch.zeros(4, 3)]], "shape"),
        ([[torch.zeros(4, 2), torch.zeros(4, 2)], [torch.zeros(5, 2), torch.zeros(5, 2)]], "batch"),
        ([[torch.zeros(4, 2), torch.zeros(4, 2)], [torch.zeros(4, 2)]], "views"),
        ([[torch.zeros(4), torch.zeros(4)]], "2-D"),
    ],
)
def test_bad_shapes_rejected(heads, match):
    with pytest.raises(ValueError, match=match):
        self_classifier_loss(heads)


def test_batch_smaller_than_classes_rejected():
    with pytest.raises(ValueError, match=r"batch of 3 rows cannot spread over 5 classes.*batch >= 5"):
        self_classifier_loss([[torch.zeros(3, 5), torch.zeros(3, 5)]])


@pytest.mark.parametrize("kwargs", [{"row_tau": 0.0}, {"col_tau": -1.0}, {"eps": -1e-3}])
def test_bad_hyperparameters_rejected(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        SelfClassifierLoss(**kwargs)


def test_bad_n_global_rejected():
    with pytest.raises(ValueError, match="n_global"):
        self_classifier_loss([[torch.zeros(4, 2), torch.zeros(4, 2)]], n_global=3)
