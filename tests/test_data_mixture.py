"""The mixture arithmetic: permutations, pass totals, the smooth merge, windowed epoch orders."""

from __future__ import annotations

import numpy as np
import pytest

from moray.data.mixture import SourceOrder, interleave, pass_totals, permutation, rescale, salt, view_units


def test_permutation_is_pinned_and_a_bijection():
    p = permutation(1000, 42)
    assert sorted(p.tolist()) == list(range(1000))
    np.testing.assert_array_equal(p, permutation(1000, 42))
    assert not np.array_equal(p, permutation(1000, 43))
    # pinned: a resumed run on another machine or numpy version must see the same order
    assert salt(1234, 0, "code", 0) == 5794493770588036881
    assert permutation(8, salt(1234, 0, "code", 0)).tolist() == [0, 5, 6, 4, 3, 2, 7, 1]


def test_pass_totals():
    names = ["a", "b", "c"]
    assert pass_totals([10, 20, 5], [2, 4, None], [None, None, None], names) == [20, 80, 5]
    assert pass_totals([10, 20], [1.5, None], [None, 0.2], ["a", "b"]) == [15, 4]  # 15 / 0.8 * 0.2 = 3.75
    # weights only: the most under-weighted source (b: 20 units at 1/2) is seen once
    assert pass_totals([10, 20], [None, None], [1, 1], ["a", "b"]) == [20, 20]
    with pytest.raises(ValueError, match="sum below 1"):
        pass_totals([10, 20], [1, None], [None, 1.0], ["a", "b"])
    with pytest.raises(ValueError, match="no sequences"):
        pass_totals([0], [1], [None], ["a"])


def test_interleave_is_split_invariant_and_exhaustive():
    totals = np.array([7, 30, 13])
    whole_s, whole_i = interleave(np.zeros(3, np.int64), totals, 50)
    assert np.bincount(whole_s).tolist() == [7, 30, 13]
    for s in range(3):
        assert whole_i[whole_s == s].tolist() == list(range(totals[s])), "each source in its own order"
    consumed = np.zeros(3, np.int64)
    parts = []
    for n in (1, 9, 3, 20, 17):
        s, i = interleave(consumed, totals, n)
        consumed += np.bincount(s, minlength=3)
        parts.append(s)
    np.testing.assert_array_equal(np.concatenate(parts), whole_s)
    with pytest.raises(ValueError, match="left in the pass"):
        interleave(consumed, totals, 1)


def test_source_order_windows_and_bijection():
    units = np.array([5, 0, 7, 3, 9, 4, 6])
    order = SourceOrder(units, window=2)
    k = np.arange(units.sum())
    shard, unit = order.locate(123, k)
    pairs = set(zip(shard.tolist(), unit.tolist()))
    assert len(pairs) == units.sum() and all(0 <= u < units[s] for s, u in pairs)
    # locality: each stretch of one window's items touches at most 2 shards
    groups, offsets, starts = order._layout(123)
    for w in range(len(groups)):
        assert len(set(shard[starts[w] : starts[w + 1]].tolist())) <= 2
    s2, u2 = order.locate(123, k[::-1].copy())
    np.testing.assert_array_equal(s2[::-1], shard)
    np.testing.assert_array_equal(u2[::-1], unit)


def test_view_units_and_rescale():
    assert view_units(np.array([10, 0, 3]), 16, 32).tolist() == [5, 0, 1]
    assert view_units(np.array([10]), 16, 8).tolist() == [20]
    assert rescale({"a": 5, "b": 10}, {"a": 10, "b": 40}, {"a": 20, "b": 80, "c": 10}) == {"a": 10, "b": 20, "c": 3}
