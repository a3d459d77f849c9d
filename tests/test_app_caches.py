"""The app's caches that sort and group a million rows, against plain pandas."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from app.caches import _by_label


def _table(n: int, labels: list[str], seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "label": pd.array(rng.permutation(np.resize(labels, n)), dtype="str"),  # all used
        "confidence": rng.choice([0.1, 0.3, 0.5, 0.9], n).astype(np.float32),  # many ties
        "excluded": rng.random(n) < 0.2,
    }, index=pd.Index(np.sort(rng.choice(10 * n, n, replace=False)), name="id"))


def _reference(table: pd.DataFrame) -> tuple[dict, dict]:
    """Plain pandas: a stable sort by label, exclusion and confidence (ties keep id order)."""
    ordered = table.sort_values(["label", "excluded", "confidence"], kind="stable")
    members, excluded = {}, {}
    for (label, exc), ids in ordered.groupby(["label", "excluded"], sort=False).groups.items():
        (excluded if exc else members)[label] = list(ids)
    return members, excluded


@pytest.mark.parametrize("labels", [["a", "b", "c", "d"],
                                    [f"l{i}" for i in range(16_500)]])  # past a 16-bit key
def test_members_of_each_label_least_confident_first_apart_from_the_excluded(labels):
    table = _table(17_000, labels, seed=len(labels))
    want_members, want_excluded = _reference(table)
    order = np.argsort(table["confidence"].to_numpy(), kind="stable")
    for members, excluded in (_by_label(table), _by_label(table, order)):
        assert {k: v.tolist() for k, v in members.items()} == want_members
        assert {k: v.tolist() for k, v in excluded.items()} == want_excluded


def test_least_confident_first_is_a_stable_sort_at_a_65535th():
    from app.caches import least_confident_first

    conf = np.array([0.5, 0.2, 0.5, 0.9, 0.2 + 1e-6, 0.0, 1.0, 0.2 - 1e-4], np.float32)
    # 0.2 and 0.2 + 1e-6 round alike (rows 1, 4 keep their order); 0.2 - 1e-4 comes before
    assert least_confident_first(conf).tolist() == [5, 7, 1, 4, 0, 2, 3, 6]
    rng = np.random.default_rng(0)
    many = rng.random(100_000).astype(np.float32)
    order = least_confident_first(many)
    assert sorted(order.tolist()) == list(range(100_000))
    assert (np.diff(many[order]) > -1 / 65535).all()          # sorted, to the key's step
