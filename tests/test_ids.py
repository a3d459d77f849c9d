"""Finding image ids among the ascending ids of a table: the one lookup every table uses."""
from __future__ import annotations

import numpy as np

from selfclassifier_core.store.ids import find_ids, shown_ids


def test_each_id_s_position_where_it_is_there_in_any_order():
    table = np.array([2, 5, 9, 14], np.int64)
    pos, found = find_ids(table, [14, 1, 5, 99, 9, 2, 6])
    assert found.tolist() == [True, False, True, False, True, True, False]
    assert pos[found].tolist() == [3, 1, 2, 0]
    assert ((pos >= 0) & (pos < len(table))).all()        # in range even where not found
    pos, found = find_ids(table, np.zeros(0, np.int64))
    assert pos.shape == found.shape == (0,)


def test_an_empty_table_finds_nothing():
    pos, found = find_ids(np.zeros(0, np.int64), iter([3, 4]))
    assert pos.tolist() == [0, 0] and found.tolist() == [False, False]


def test_ids_shown_in_a_message_stop_at_ten():
    assert shown_ids(np.array([7, 3])) == "7, 3"
    assert shown_ids(np.arange(12)) == "0, 1, 2, 3, 4, 5, 6, 7, 8, 9 ..."
