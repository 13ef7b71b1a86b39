"""The mixture sampler: exactly-once resume, epochs per source, layout and length changes."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from moray.data import MixtureSampler
from test_data_helpers import prepare_corpus, shard_stream

SEED = 1234


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return prepare_corpus(tmp_path_factory.mktemp("sampler"))


def samplers(manifest, R, **kw):
    return [MixtureSampler(manifest, seed=SEED, dp_rank=r, dp_size=R, **kw) for r in range(R)]


def step(ranks, batch, **kw):
    """One training step on every rank: [(tokens, ids)] in rank order."""
    return [s.next_batch(batch, with_ids=True, **kw) for s in ranks]


@pytest.mark.parametrize("R", [1, 2, 4])
def test_resume_is_exactly_once(manifest, R):
    B, steps = 3, 10
    ranks = samplers(manifest, R)
    whole = [step(ranks, B) for _ in range(steps)]
    for k in (0, 1, 4, 9):
        ranks = samplers(manifest, R)
        head = [step(ranks, B) for _ in range(k)]
        states = [json.loads(json.dumps(s.state_dict())) for s in ranks]
        assert all(st == states[0] for st in states), "the state is global: every rank holds the same"
        fresh = samplers(manifest, R)
        for s in fresh:
            s.load_state_dict(states[0])
        tail = [step(fresh, B) for _ in range(steps - k)]
        for got, want in zip(head + tail, whole):
            for (x, ids), (wx, wids) in zip(got, want):
                np.testing.assert_array_equal(x, wx)
                np.testing.assert_array_equal(ids, wids)


def global_stream(manifest, R, B, n_sequences, **kw):
    """Ids of the first n_sequences of the global stream, as R ranks see it."""
    ranks = samplers(manifest, R, **kw)
    out = []
    while len(out) < n_sequences:
        for x, ids in step(ranks, B):
            out.extend(map(tuple, ids.tolist()))
    return out[:n_sequences], ranks[0]


@pytest.mark.parametrize("R,B", [(1, 7), (2, 5), (4, 3)])
def test_each_source_seen_its_epochs_once_per_epoch(manifest, R, B):
    P = MixtureSampler(manifest, seed=SEED).pass_sequences
    stream, sampler = global_stream(manifest, R, B, P)
    units = {s: sampler._units[s] for s in range(len(manifest.sources))}
    epochs = {0: 2, 1: 4}  # text, code (as prepared)
    for s, name in enumerate(sampler.names):
        seen = [u for u in stream if u[0] == s]
        assert len(seen) == epochs[s] * units[s], name
        assert set(Counter(seen).values()) == {epochs[s]}, f"{name}: every sequence {epochs[s]} times"
        for e in range(epochs[s]):  # each epoch is a permutation: no sequence twice within it, across ranks
            assert len(set(seen[e * units[s] : (e + 1) * units[s]])) == units[s]


def test_sources_are_mixed_in_proportion(manifest):
    stream, sampler = global_stream(manifest, 1, 50, 400)
    totals = sampler._totals / sampler._totals.sum()
    for start in range(0, 400, 50):
        window = Counter(u[0] for u in stream[start : start + 50])
        for s, share in enumerate(totals):
            assert abs(window[s] - 50 * share) <= 1.0, "a smooth mixture: every stretch holds its share"


def test_batch_size_and_layout_changes_keep_the_global_stream(manifest):
    want, _ = global_stream(manifest, 1, 1, 200)
    ranks = samplers(manifest, 2)
    got = []
    for B in (1, 4, 2, 7):  # a batch ramp on 2 ranks
        got += [u for _, ids in step(ranks, B) for u in map(tuple, ids.tolist())]
    state = ranks[0].state_dict()
    ranks = samplers(manifest, 4)  # resume on 4 ranks
    for s in ranks:
        s.load_state_dict(state)
    while len(got) < 200:
        got += [u for _, ids in step(ranks, 3) for u in map(tuple, ids.tolist())]
    assert got[:200] == want


def test_passes_continue_with_new_orders(manifest):
    P = MixtureSampler(manifest, seed=SEED).pass_sequences
    stream, sampler = global_stream(manifest, 2, 9, 2 * P)
    assert sampler.progress()["pass"] >= 2
    assert Counter(stream[:P]) == Counter(stream[P:]), "each pass serves the same multiset"
    assert stream[:P] != stream[P:], "in a new order"


def test_rows_are_the_shard_text(manifest):
    s = MixtureSampler(manifest, seed=SEED)
    for L in (16, 40, 8):  # as prepared, longer (context extension), shorter
        x, ids = s.next_batch(6, seq_len=L, with_ids=True)
        assert x.shape == (6, L + 1) and x.dtype == np.int64
        for row, (src, shard, unit) in zip(x, ids):
            stream = shard_stream(manifest, src, shard)
            np.testing.assert_array_equal(row, stream[unit * L : unit * L + L + 1])


def test_seq_len_change_keeps_progress_and_resumes(manifest):
    s = MixtureSampler(manifest, seed=SEED)
    for _ in range(20):
        s.next_batch(4)
    before = s.progress()["epochs"]
    s.next_batch(2, seq_len=32)
    after = s.progress()["epochs"]
    for name in before:
        assert abs(after[name] - before[name]) < 0.05, "each source keeps its place in the pass"
    state = s.state_dict()
    assert state["seq_len"] == 32
    want = s.next_batch(5)
    t = MixtureSampler(manifest, seed=SEED)
    t.load_state_dict(state)
    np.testing.assert_array_equal(t.next_batch(5), want)


def test_mixture_override_weights_and_fractional_epochs(manifest):
    mix = {"code": {"epochs": 1.5}, "text": {"weight": 0.25}}
    s = MixtureSampler(manifest, seed=SEED, mixture=mix)
    code_units = int(s._units[1])
    assert s._totals[1] == round(1.5 * code_units)
    assert s._totals[0] == round(0.25 * s._totals[1] / 0.75), "text is a quarter of the pass"
    stream, _ = global_stream(manifest, 1, 11, s.pass_sequences, mixture=mix)
    code = [u for u in stream if u[0] == 1]
    assert len(set(code[:code_units])) == code_units, "the first epoch is whole"
    assert set(Counter(code).values()) == {1, 2}, "the half epoch is a subset"


def test_seed_decides_the_order(manifest):
    a = MixtureSampler(manifest, seed=1).next_batch(8)
    b = MixtureSampler(manifest, seed=1).next_batch(8)
    c = MixtureSampler(manifest, seed=2).next_batch(8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_reads_lazily_with_bounded_cache(manifest):
    n_shards = sum(len(src.shards) for src in manifest.sources)
    s = MixtureSampler(manifest, seed=SEED, cache_shards=3, shuffle_window=1)
    assert s.shard_loads == 0, "nothing is read before the first batch"
    s.next_batch(1)
    assert s.shard_loads == 1
    for _ in range(200):
        s.next_batch(4)
        assert len(s._cache.items) <= 3
    assert n_shards > 3 and s.shard_loads > 3


def test_from_config_is_what_the_trainer_builds(manifest):
    from pathlib import Path

    from moray.platform.config import load_config

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    cfg = load_config(tiny, [f"data.dir={manifest.dir}", "train.seq_len=32", "data.seed=7"])
    s = MixtureSampler.from_config(cfg, dp_rank=1, dp_size=2)
    assert (s.seed, s.seq_len, s.dp_rank, s.dp_size) == (7, 32, 1, 2)
    assert s.next_batch(cfg.train.micro_batch_size).shape == (cfg.train.micro_batch_size, 33)
