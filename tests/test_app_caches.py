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
