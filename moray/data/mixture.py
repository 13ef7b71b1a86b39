"""The arithmetic of the mixture: how much of each source, in what order.

Pure numpy, no I/O, and nothing that depends on numpy's random distributions
(whose streams may change between versions): permutations are argsorts of a
splitmix64 hash, so an order is the same on every machine and version.

Terms. A *unit* is one sequence the sampler serves at the current seq_len (a
window of seq_len + 1 tokens of one shard's packed stream). A *pass* is one
round of the whole mixture: source s contributes `totals[s]` units to it (its
epochs times its units, or its weight's share). Within a pass, source s's
item i is unit `order[i % units]` of epoch `i // units`, and the sources are
merged smoothly: item i of s sits at key (i + 0.5) / totals[s], so any stretch
of the stream holds each source in proportion to its total.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import numpy as np

_U64 = np.uint64


def salt(*parts) -> int:
    """A 64-bit key from anything printable (seed, pass, source name, epoch...)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def hash64(x: np.ndarray, key: int) -> np.ndarray:
    """splitmix64 of x + key: a bijection on uint64, so distinct x never collide."""
    with np.errstate(over="ignore"):
        z = x.astype(_U64) + _U64(key)
        z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
        return z ^ (z >> _U64(31))


def permutation(n: int, key: int) -> np.ndarray:
    return np.argsort(hash64(np.arange(n, dtype=_U64), key), kind="stable")


def pass_totals(units: Sequence[int], epochs: Sequence[Optional[float]], weights: Sequence[Optional[float]],
                names: Sequence[str]) -> List[int]:
    """Units each source contributes to one pass.

    epochs e: round(e * units). weight w next to epoch sources: w is the share of
    the whole pass (the weights must sum below 1). Weights only: relative shares,
    and the pass is as long as it takes the most under-weighted source to be seen
    exactly once (every other source is seen at least once).
    """
    for n, name in zip(units, names):
        if n <= 0:
            raise ValueError(f"data source {name!r} has no sequences at this seq_len")
    ep = [e if e is not None else (None if w is not None else 1.0) for e, w in zip(epochs, weights)]
    totals = [max(1, _round(e * n)) if e is not None else 0 for e, n in zip(ep, units)]
    weighted = [i for i, w in enumerate(weights) if w is not None]
    if not weighted:
        return totals
    wsum = sum(weights[i] for i in weighted)
    if len(weighted) < len(units):
        if wsum >= 1:
            raise ValueError(
                f"data sources {', '.join(names[i] for i in weighted)}: weights sum to {wsum:g}, but next to "
                "sources with epochs a weight is a share of the pass and they must sum below 1"
            )
        total = sum(totals) / (1 - wsum)
    else:
        total = max(units[i] * wsum / weights[i] for i in weighted)
    for i in weighted:
        totals[i] = max(1, _round(weights[i] / (1 if len(weighted) < len(units) else wsum) * total))
    return totals


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))


def interleave(consumed: np.ndarray, totals: np.ndarray, n: int) -> Tuple[np.ndarray, np.ndarray]:
    """The next n items of the pass after `consumed` per source: (source, item index) arrays.

    Split-invariant: taking 3 then 5 gives the same items as taking 8.
    """
    src, idx, keys = [], [], []
    for s, (a, t) in enumerate(zip(consumed.tolist(), totals.tolist())):
        i = np.arange(a, min(t, a + n), dtype=np.int64)
        src.append(np.full(len(i), s, dtype=np.int64))
        idx.append(i)
        keys.append((i + 0.5) / t)
    src_a, idx_a, key_a = np.concatenate(src), np.concatenate(idx), np.concatenate(keys)
    if len(key_a) < n:
        raise ValueError(f"interleave: asked for {n} items, {len(key_a)} left in the pass")
    take = np.lexsort((src_a, key_a))[:n]  # by key, ties by source index
    return src_a[take], idx_a[take]


class LRU:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.items: "OrderedDict[Hashable, object]" = OrderedDict()

    def get(self, key: Hashable, make: Callable[[], object]):
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        value = make()
        self.items[key] = value
        while len(self.items) > self.capacity:
            self.items.popitem(last=False)
        return value


class SourceOrder:
    """One source's order of units within an epoch: shuffled shards, then shuffled units
    inside windows of `window` consecutive shards, so reading needs about `window`
    shards at a time while sequences still mix across shards."""

    def __init__(self, units_per_shard: np.ndarray, window: int) -> None:
        self.units = np.asarray(units_per_shard, dtype=np.int64)
        self.total = int(self.units.sum())
        self.window = window
        self._layouts = LRU(4)
        self._perms = LRU(4 * window + 8)

    def _layout(self, key: int) -> Tuple[List[np.ndarray], List[np.ndarray], np.ndarray]:
        shards = permutation(len(self.units), key)
        groups = [shards[i : i + self.window] for i in range(0, len(shards), self.window)]
        offsets = [np.concatenate([[0], np.cumsum(self.units[g])]) for g in groups]  # unit offset of each shard
        starts = np.concatenate([[0], np.cumsum([o[-1] for o in offsets])])  # unit offset of each window
        return groups, offsets, starts

    def locate(self, key: int, k: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(shard, unit within shard) of items k (0 <= k < total) of the epoch keyed `key`."""
        groups, offsets, starts = self._layouts.get(key, lambda: self._layout(key))
        win = np.searchsorted(starts, k, side="right") - 1
        shard, unit = np.empty_like(k), np.empty_like(k)
        for w in np.unique(win).tolist():
            sel = win == w
            size = int(starts[w + 1] - starts[w])
            perm = self._perms.get((key, w), lambda: permutation(size, salt(key, w)))
            pos = perm[k[sel] - starts[w]]
            j = np.searchsorted(offsets[w], pos, side="right") - 1  # skips shards with no units
            shard[sel] = groups[w][j]
            unit[sel] = pos - offsets[w][j]
        return shard, unit


def view_units(rows: np.ndarray, stored_len: int, seq_len: int) -> np.ndarray:
    """Units per shard when shards stored at `stored_len` are read at `seq_len`: each
    shard's stream of rows * stored_len + 1 tokens cut into windows of seq_len + 1."""
    rows = np.asarray(rows, dtype=np.int64)
    return np.where(rows > 0, rows * stored_len // seq_len, 0)


def rescale(consumed: Dict[str, int], old_totals: Dict[str, int], new_totals: Dict[str, int]) -> Dict[str, int]:
    """Carry a pass position over to new totals (a seq_len or mixture change): each source keeps
    its fraction of the pass; a source new to the mixture starts at the pass's overall fraction."""
    done = sum(consumed.values()) / max(1, sum(old_totals.values()))
    out = {}
    for name, total in new_totals.items():
        frac = consumed[name] / old_totals[name] if name in consumed and old_totals.get(name) else done
        out[name] = min(total, _round(frac * total))
    return out
