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
    members, excluded = {}, {}
    for (label, exc), part in table.groupby(["label", "excluded"]):
        ids = part.sort_values("confidence", kind="stable").index.to_numpy(np.int64)
        (excluded if exc else members)[label] = ids
    return members, excluded


@pytest.mark.parametrize("labels", [["a", "b", "c", "d"],
                                    [f"l{i}" for i in range(20_000)]])  # past a 16-bit key
def test_members_of_each_label_least_confident_first_apart_from_the_excluded(labels):
    table = _table(30_000, labels, seed=len(labels))
    want_members, want_excluded = _reference(table)
    order = np.argsort(table["confidence"].to_numpy(), kind="stable")
    for got in (_by_label(table), _by_label(table, order)):
        members, excluded = got
        assert members.keys() == want_members.keys()
        assert excluded.keys() == want_excluded.keys()
        for label, ids in want_members.items():
            np.testing.assert_array_equal(members[label], ids)
        for label, ids in want_excluded.items():
            np.testing.assert_array_equal(excluded[label], ids)
