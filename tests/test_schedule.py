import math

import pytest

from moray.platform.schedule import batch_sequences_at, lr_at


def test_lr_warmup_then_cosine_to_min():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=10, decay_steps=110)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, **kw) == pytest.approx(0.1)
    assert lr_at(500, **kw) == pytest.approx(0.1)
    values = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_batch_ramp_grows_in_whole_rounds_and_reaches_target():
    kw = dict(seq_len=128, unit=8, batch_tokens=128 * 64, batch_tokens_start=128 * 8, batch_ramp_tokens=10_000)
    assert batch_sequences_at(0, **kw) == 8
    mid = batch_sequences_at(5_000, **kw)
    assert 8 < mid < 64 and mid % 8 == 0
    assert batch_sequences_at(10_000, **kw) == 64
    assert batch_sequences_at(10**9, **kw) == 64
    # Without a ramp: one round of microbatches unless batch_tokens says otherwise.
    assert batch_sequences_at(0, seq_len=128, unit=8, batch_tokens=None, batch_tokens_start=None,
                              batch_ramp_tokens=0) == 8
    # Never below one round, even for a tiny batch_tokens.
    assert batch_sequences_at(0, seq_len=128, unit=8, batch_tokens=128, batch_tokens_start=None,
                              batch_ramp_tokens=0) == 8
