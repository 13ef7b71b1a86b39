"""The scheduler and the KV cache manager, driven by a fake executor (no model).

The fake executor keeps a token-level stand-in for the paged KV cache: it
writes each chunk's tokens into the slots its block table names, and its
"sampled" token is a pure function of the sequence it reads back through the
block table. So a wrong block table, a prefix hit on the wrong block or an
eviction of a block still in use changes the outputs, and outputs under a
tiny cache (with preemptions) are comparable with a big cache's.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from moray.serve.engine.kv_cache import NULL_BLOCK, KVCacheManager
from moray.serve.engine.request import Request, RequestStatus
from moray.serve.engine.scheduler import Scheduler, fit_step_time


@dataclass
class SP:
    max_tokens: int
    n: int = 1


def next_token(history: list[int]) -> int:
    h = len(history)
    for i, t in enumerate(history):
        h = (h * 1000003 + (i + 1) * t) % 2_147_483_647
    return h % 997


class FakeExecutor:
    def __init__(self, kv: KVCacheManager):
        self.bs = kv.block_size
        self.slots = [[None] * kv.block_size for _ in range(kv.num_blocks)]

    def execute(self, out) -> dict[str, list[int]]:
        sampled = {}
        for s in out.scheduled:
            assert NULL_BLOCK not in s.block_table
            assert len(s.block_table) * self.bs >= s.start_pos + s.num_new_tokens
            assert s.token_ids == s.request.all_token_ids[s.start_pos:s.start_pos + s.num_new_tokens]
            for p, tok in enumerate(s.token_ids, start=s.start_pos):
                self.slots[s.block_table[p // self.bs]][p % self.bs] = tok
            if s.needs_logits:
                end = s.start_pos + s.num_new_tokens
                seen = [self.slots[s.block_table[p // self.bs]][p % self.bs] for p in range(end)]
                assert seen == s.request.all_token_ids[:end], "the cache holds other tokens"
                sampled[s.request.request_id] = [next_token(seen)]
        return sampled


def make(num_blocks=64, block_size=4, max_num_seqs=8, max_batch_tokens=32, **kw):
    kv = KVCacheManager(num_blocks, block_size)
    return kv, Scheduler(kv, max_num_seqs, max_batch_tokens, **kw)


def run(sched: Scheduler, arrivals: dict[int, list[Request]], check=None, max_steps=20_000, ex=None):
    """Drive the scheduler to the end; arrivals maps step -> requests added before it."""
    ex = ex or FakeExecutor(sched.kv)
    step, outs = 0, []
    while any(k >= step for k in arrivals) or sched.has_unfinished_requests():
        for r in arrivals.get(step, ()):
            sched.add_request(r)
        out = sched.schedule()
        sched.update_from_output(out, ex.execute(out))
        if check:
            check(sched, out)
        outs.append(out)
        step += 1
        assert step < max_steps, "the scheduler does not finish"
    return outs


def reference(prompt: list[int], max_tokens: int) -> list[int]:
    seq = list(prompt)
    for _ in range(max_tokens):
        seq.append(next_token(seq))
    return seq[len(prompt):]


def workload(n, seed=0, prompt=(1, 40), out=(1, 24), spread=3):
    rng = random.Random(seed)
    arrivals: dict[int, list[Request]] = {}
    reqs = []
    for i in range(n):
        r = Request(f"r{i}", [rng.randrange(997) for _ in range(rng.randint(*prompt))],
                    SP(rng.randint(*out)))
        arrivals.setdefault(rng.randrange(n * spread), []).append(r)
        reqs.append(r)
    return reqs, arrivals


def test_request_tracks_known_against_computed():
    r = Request("a", [1, 2, 3], SP(4))
    r.append_output_token_ids([7])
    r.append_output_token_ids(8)
    assert (r.num_tokens, r.num_prompt_tokens, r.num_output_tokens) == (5, 3, 2)
    assert r.all_token_ids == [1, 2, 3, 7, 8] and r.token_ids_slice(2, 5) == [3, 7, 8]
    assert [RequestStatus.is_finished(s) for s in RequestStatus] == [False] * 3 + [True] * 3


def test_budget_and_seq_cap_respected_every_step():
    kv, sched = make(num_blocks=128, max_num_seqs=4, max_batch_tokens=24)
    reqs, arrivals = workload(30, seed=1)

    def check(s, out):
        assert out.num_batched_tokens == sum(x.num_new_tokens for x in out.scheduled) <= 24
        assert len(out.scheduled) <= 4 and s.num_running <= 4
        assert len({x.request_id for x in out.scheduled}) == len(out.scheduled)

    run(sched, arrivals, check)
    for r in reqs:
        assert r.status == RequestStatus.FINISHED_LENGTH
        assert r.output_token_ids == reference(r.prompt_token_ids, r.sampling_params.max_tokens)
    assert kv.num_free_blocks == kv.num_usable_blocks


def test_decodes_come_before_prefills_and_the_prompt_takes_what_is_left():
    kv, sched = make(max_batch_tokens=16)
    ex = FakeExecutor(kv)
    for i in range(3):
        sched.add_request(Request(f"d{i}", [i + 1] * 5, SP(10)))
    out = sched.schedule()
    sched.update_from_output(out, ex.execute(out))  # all three prefilled, each sampled one token
    sched.add_request(Request("long", list(range(100)), SP(2)))
    out = sched.schedule()
    kinds = [(x.request_id, x.num_new_tokens) for x in out.scheduled]
    assert kinds == [("d0", 1), ("d1", 1), ("d2", 1), ("long", 13)]
    assert [x.needs_logits for x in out.scheduled] == [True, True, True, False]
    sched.update_from_output(out, ex.execute(out))
    out = sched.schedule()  # the running chunked prompt comes after the decodes too
    assert [x.num_new_tokens for x in out.scheduled] == [1, 1, 1, 13]
    assert out.scheduled[-1].start_pos == 13


def test_long_prompt_is_chunked_and_completes():
    kv, sched = make(num_blocks=64, max_batch_tokens=16)
    r = Request("long", [i % 97 for i in range(100)], SP(5))
    outs = run(sched, {0: [r]})
    chunks = [x for o in outs for x in o.scheduled]
    assert [c.num_new_tokens for c in chunks[:7]] == [16] * 6 + [4]
    assert [c.start_pos for c in chunks[:7]] == list(range(0, 100, 16))
    assert [c.needs_logits for c in chunks[:7]] == [False] * 6 + [True]
    assert r.output_token_ids == reference(r.prompt_token_ids, 5)


def test_chunked_prefill_off_schedules_whole_prompts_only():
    kv, sched = make(max_batch_tokens=16, chunked_prefill=False)
    ex = FakeExecutor(kv)
    a, b, big = Request("a", [1] * 10, SP(2)), Request("b", [2] * 10, SP(2)), Request("big", [3] * 17, SP(2))
    for r in (a, b, big):
        sched.add_request(r)
    out = sched.schedule()
    assert [(x.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 10)]
    sched.update_from_output(out, ex.execute(out))
    run(sched, {}, ex=ex)
    assert a.status == b.status == RequestStatus.FINISHED_LENGTH
    assert big.status == RequestStatus.FINISHED_ABORTED and "max_batch_tokens" in big.abort_reason


def test_continuous_admission_when_a_request_finishes():
    kv, sched = make(max_num_seqs=2)
    short, long_, late = Request("short", [1, 2], SP(2)), Request("long", [3, 4], SP(10)), Request("late", [5], SP(2))
    steps = []
    run(sched, {0: [short, long_, late]},
        check=lambda s, out: steps.append([x.request_id for x in out.scheduled]))
    assert steps[0] == ["short", "long"] and steps[1] == ["short", "long"]
    # short finished with its 2nd token in step 1; late joins in step 2, long still decoding
    assert steps[2] == ["long", "late"]
    assert late.output_token_ids == reference([5], 2)


def test_prefix_cache_shares_a_two_block_prefix():
    bs = 4
    kv, sched = make(num_blocks=32, block_size=bs, max_batch_tokens=64)
    ex = FakeExecutor(kv)
    prefix = [11, 12, 13, 14, 15, 16, 17, 18]
    a = Request("a", prefix + [1, 2, 3], SP(20))
    sched.add_request(a)
    out = sched.schedule()
    sched.update_from_output(out, ex.execute(out))
    a_blocks = kv.block_table("a")
    b = Request("b", prefix + [4, 5, 6, 7, 8], SP(3))
    sched.add_request(b)
    out = sched.schedule()
    assert b.num_cached_tokens == 2 * bs
    chunk = next(x for x in out.scheduled if x.request_id == "b")
    assert (chunk.start_pos, chunk.num_new_tokens) == (8, 5)
    assert chunk.block_table[:2] == a_blocks[:2] and chunk.block_table[2] not in a_blocks
    assert [kv.ref_cnt[x] for x in a_blocks[:2]] == [2, 2]
    assert (kv.prefix_queries, kv.prefix_hits) == (11 + 13, 8)
    sched.update_from_output(out, ex.execute(out))
    sched.abort_request("a")
    assert [kv.ref_cnt[x] for x in a_blocks] == [1, 1, 0]
    run(sched, {}, ex=ex)
    assert b.output_token_ids == reference(b.prompt_token_ids, 3)
    assert all(kv.ref_cnt[x] == 0 for x in range(kv.num_blocks))
    assert kv.num_free_blocks == kv.num_usable_blocks and kv.usage == 0.0
    # the last prompt token is always recomputed: a fully cached prompt hits all blocks but the last
    c = Request("c", list(prefix), SP(1))
    assert kv.get_computed_blocks(c) == (a_blocks[:1], bs)
    kv.reset_prefix_cache()
    assert kv.get_computed_blocks(c) == ([], 0)


def test_lru_evicts_the_least_recently_freed_cached_blocks_first():
    bs = 2
    kv = KVCacheManager(num_blocks=9, block_size=bs)  # 8 usable

    def fill(rid, tokens):
        r = Request(rid, tokens, SP(1))
        hit, n = kv.get_computed_blocks(r)
        assert kv.allocate_slots(r, len(tokens) - n, hit) is not None
        r.num_computed_tokens = len(tokens)
        kv.cache_full_blocks(r)
        return r

    a = fill("a", [1, 2, 3, 4, 5, 6])  # 3 cached blocks
    b = fill("b", [7, 8, 9, 10, 11])  # 2 cached + 1 partial
    kv.free(a)
    kv.free(b)
    # touch a's first block: a hit moves it to the back when it is freed again
    a2 = fill("a2", [1, 2, 99])
    kv.free(a2)
    # free queue now: the unkeyed blocks (b's partial, a2's partial, never used ones) first,
    # then a's tail blocks (a[2], a[1]), then b's (b[1], b[0]), then a's re-touched a[0]
    c = Request("c", list(range(200, 216)), SP(1))
    assert kv.allocate_slots(c, 16) is not None and kv.num_free_blocks == 0
    kv.free(c)
    assert kv.get_computed_blocks(Request("q", [1, 2, 3, 4, 5, 6, 0], SP(1)))[1] == 0

    # the same again with room for the cached ones to survive
    kv = KVCacheManager(num_blocks=9, block_size=bs)
    a = fill("a", [1, 2, 3, 4, 5, 6])
    b = fill("b", [7, 8, 9, 10, 11])
    kv.free(a)
    kv.free(b)
    a2 = fill("a2", [1, 2, 99])
    kv.free(a2)
    c = Request("c", list(range(200, 230)), SP(1))
    hit = lambda toks: kv.get_computed_blocks(Request("q", toks, SP(1)))[1]  # noqa: E731
    kv.allocate_slots(c, 6)  # 3 blocks: the unkeyed ones
    assert hit([1, 2, 3, 4, 5, 6, 0]) == 6 and hit([7, 8, 9, 10, 0]) == 4
    kv.allocate_slots(c, 8)  # 1 more: a's tail block
    assert hit([1, 2, 3, 4, 5, 6, 0]) == 4 and hit([7, 8, 9, 10, 0]) == 4
    kv.allocate_slots(c, 12)  # 2 more: a's middle block, then b's tail block
    assert hit([1, 2, 3, 4, 5, 6, 0]) == 2 and hit([7, 8, 9, 10, 0]) == 2
    kv.allocate_slots(c, 14)  # 1 more: b's first block; a's first, touched last, survives
    assert hit([7, 8, 0]) == 0 and hit([1, 2, 0]) == 2
    assert kv.num_free_blocks == 1


def test_tiny_cache_preempts_the_newest_and_outputs_are_unchanged():
    reqs, arrivals = workload(24, seed=3, prompt=(4, 30), out=(8, 30), spread=1)
    kv, big = make(num_blocks=512, max_num_seqs=8, max_batch_tokens=48)
    run(big, arrivals)
    want = {r.request_id: list(r.output_token_ids) for r in reqs}
    assert all(r.num_preemptions == 0 for r in reqs)

    reqs, arrivals = workload(24, seed=3, prompt=(4, 30), out=(8, 30), spread=1)
    kv, tiny = make(num_blocks=20, max_num_seqs=8, max_batch_tokens=48)  # 19 blocks of 4: 76 tokens
    preemptions = []
    schedule = tiny.schedule

    def schedule_and_check_victims():
        running_before = [r.request_id for r in tiny.running]
        out = schedule()
        if out.preempted:
            # the victims are the newest of those running, newest first, and go to the queue's front
            assert out.preempted == running_before[::-1][:len(out.preempted)]
            assert [r.request_id for r in list(tiny.waiting)[:len(out.preempted)]] == out.preempted[::-1]
            assert all(tiny.requests[rid].num_computed_tokens == 0 for rid in out.preempted)
            assert not set(out.preempted) & {x.request_id for x in out.scheduled}
            preemptions.append(out.preempted)
        return out

    tiny.schedule = schedule_and_check_victims
    run(tiny, arrivals)
    assert len(preemptions) >= 3, "the tiny cache should have forced preemptions"
    for r in reqs:
        assert r.status == RequestStatus.FINISHED_LENGTH, (r.request_id, r.status, r.abort_reason)
        assert r.output_token_ids == want[r.request_id]
    assert kv.num_free_blocks == kv.num_usable_blocks


def test_preempted_request_hits_its_own_blocks_on_readmission():
    kv, sched = make(num_blocks=8, block_size=4, max_num_seqs=2, max_batch_tokens=64)  # 7 usable
    old, new = Request("old", list(range(12)), SP(12)), Request("new", list(range(50, 62)), SP(12))
    outs = run(sched, {0: [old], 1: [new]})
    assert new.num_preemptions >= 1 and old.num_preemptions == 0
    first = next(i for i, o in enumerate(outs) if "new" in o.preempted)
    readmitted = next(x for o in outs[first + 1:] for x in o.scheduled if x.request_id == "new")
    assert readmitted.start_pos > 0  # its own prompt blocks, still cached
    assert kv.prefix_hits >= readmitted.start_pos
    assert new.output_token_ids == reference(new.prompt_token_ids, 12)
    assert old.output_token_ids == reference(old.prompt_token_ids, 12)
    assert new.num_cached_tokens == 0  # set at first admission only


def test_abort_frees_blocks_at_once():
    kv, sched = make(num_blocks=32, max_batch_tokens=8)
    ex = FakeExecutor(kv)
    a, b = Request("a", list(range(20)), SP(5)), Request("b", list(range(30)), SP(5))
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    sched.update_from_output(out, ex.execute(out))
    assert kv.num_free_blocks < kv.num_usable_blocks and sched.num_running == 1 and sched.num_waiting == 1
    sched.abort_request("a")
    sched.abort_request("b")  # waiting: also fine
    sched.abort_request("nope")  # unknown: a no-op
    assert a.status == b.status == RequestStatus.FINISHED_ABORTED
    assert kv.num_free_blocks == kv.num_usable_blocks and not sched.has_unfinished_requests()
    assert sched.schedule().scheduled == []


def test_allocated_but_unused_slots_stay_small():
    bs = 16
    kv, sched = make(num_blocks=513, block_size=bs, max_num_seqs=16, max_batch_tokens=512)
    reqs, arrivals = workload(80, seed=5, prompt=(100, 800), out=(20, 200), spread=4)
    figures = []

    def check(s, out):
        filled: dict[int, int] = {}
        for r in s.running:
            for i, blk in enumerate(kv.block_table(r.request_id)):
                filled[blk] = max(filled.get(blk, 0), min(bs, max(0, r.num_computed_tokens - i * bs)))
        unused = sum(bs - f for f in filled.values())
        if kv.usage > 0.75:
            figures.append(unused / (kv.num_usable_blocks * bs))

    run(sched, arrivals, check)
    assert all(r.output_token_ids == reference(r.prompt_token_ids, r.sampling_params.max_tokens) for r in reqs)
    assert len(figures) > 50, "the workload should keep the cache mostly full for a while"
    mean, worst = sum(figures) / len(figures), max(figures)
    print(f"allocated-but-unused KV slots with the cache >75% full: mean {mean:.2%}, worst {worst:.2%}")
    assert worst < 0.04


def test_latency_model_fits_a_synthetic_step_time():
    a, b, c = 0.004, 2e-5, 3e-4
    rng = random.Random(0)
    samples = [(t, s, a + b * t + c * s) for t, s in ((rng.randint(1, 512), rng.randint(1, 32)) for _ in range(40))]
    m = fit_step_time(samples)
    assert m.a == pytest.approx(a, rel=1e-4) and m.b == pytest.approx(b, rel=1e-4) and m.c == pytest.approx(c, rel=1e-4)
    # all-decode steps (tokens == seqs) are collinear: the fit stays defined and predicts them
    m = fit_step_time([(n, n, a + (b + c) * n) for n in range(1, 20)])
    assert m.predict(10, 10) == pytest.approx(a + (b + c) * 10, rel=1e-3)
    assert fit_step_time([(8, 8, 0.01)] * 5) is None


@pytest.mark.parametrize("bound_ms", [6.0, 12.0])
def test_latency_bound_shrinks_the_step(bound_ms):
    a, b = 0.002, 2e-5  # 2 ms + 20 us per token: 12 ms allows 500 tokens, 6 ms 200
    kv, sched = make(num_blocks=2048, block_size=16, max_num_seqs=16, max_batch_tokens=1024,
                     max_step_latency_ms=bound_ms)
    ex = FakeExecutor(kv)
    for i in range(12):
        sched.add_request(Request(f"r{i}", [(i * 7 + j) % 997 for j in range(600)], SP(4)))
    tokens = []
    while sched.has_unfinished_requests():
        out = sched.schedule()
        sched.update_from_output(out, ex.execute(out))
        sched.record_step(out.num_batched_tokens, len(out.scheduled), a + b * out.num_batched_tokens)
        tokens.append(out.num_batched_tokens)
    assert tokens[0] == 16  # conservative before any measurement
    m = sched.latency_model
    assert m.a == pytest.approx(a, rel=1e-3) and m.b == pytest.approx(b, rel=1e-3) and m.c < 1e-6
    steady = tokens[10:]
    assert max(steady) <= (bound_ms / 1000 - a) / b + 1e-6  # every measured step under the bound
    assert max(steady) >= 0.9 * (bound_ms / 1000 - a) / b  # and it fills it
    # with the bound off the same workload takes the full budget
    kv2, free = make(num_blocks=2048, block_size=16, max_num_seqs=16, max_batch_tokens=1024)
    free.add_request(Request("x", list(range(600)) * 2, SP(1)))
    assert free.schedule().num_batched_tokens == 1024


def test_latency_bound_below_the_fixed_cost_still_makes_progress():
    kv, sched = make(max_step_latency_ms=1.0, max_batch_tokens=64)
    ex = FakeExecutor(kv)
    r = Request("r", list(range(40)), SP(3))
    sched.add_request(r)
    steps = 0
    while sched.has_unfinished_requests():
        out = sched.schedule()
        assert out.num_batched_tokens >= 1
        sched.update_from_output(out, ex.execute(out))
        sched.record_step(out.num_batched_tokens, len(out.scheduled), 0.005 + 1e-5 * out.num_batched_tokens)
        steps += 1
        assert steps < 1000
    assert r.output_token_ids == reference(r.prompt_token_ids, 3)


def test_a_request_too_large_for_the_whole_cache_is_aborted_not_looped_on():
    kv, sched = make(num_blocks=9, block_size=4, max_batch_tokens=16)  # 8 usable blocks: 32 tokens
    huge = Request("huge", list(range(40)), SP(4))  # the prompt alone does not fit
    grows = Request("grows", list(range(20)), SP(30))  # fits, until its output outgrows the cache
    ok = Request("ok", list(range(5)), SP(3))
    outs = run(sched, {0: [huge, grows, ok]})
    assert huge.status == RequestStatus.FINISHED_ABORTED and "40 tokens" in huge.abort_reason
    assert grows.status == RequestStatus.FINISHED_ABORTED and "33 tokens" in grows.abort_reason
    assert grows.num_output_tokens == 13  # the 13th was sampled; the cache cannot hold its KV
    assert ok.status == RequestStatus.FINISHED_LENGTH and ok.output_token_ids == reference(ok.prompt_token_ids, 3)
    assert [r.request_id for o in outs for r in o.aborted] == ["huge", "grows"]
    assert kv.num_free_blocks == kv.num_usable_blocks
