"""The engine core over a pipelined executor, in one process: several steps in flight, and a
lost KV cache mid-generation. Outputs never change.

`DeferredExecutor` is the in-process ModelExecutor with the pipeline's contract: `submit`
queues a step and `collect` runs the queued steps in submission order, as stage actors run
them first in, first out. That is what a pipeline does to the core: a step's tokens are known
only when it comes back, so the next step must not hold the same requests. `failing_at`
wipes the KV cache and raises ExecutorFailure at one collect, as a rebuilt stage gang does.
The Ray stage gang itself is tested in test_serve_gang.py.
"""

from __future__ import annotations

from collections import deque

import pytest
import torch

from moray.model import ModelConfig, build_model
from moray.serve.engine.config import EngineConfig
from moray.serve.engine.core import EngineCore
from moray.serve.engine.executor import ExecutorFailure, ModelExecutor
from moray.serve.engine.llm import LLM
from moray.serve.engine.sampling import SamplingParams

CFG = ModelConfig(vocab_size=320, d_model=64, n_layers=2, n_heads=4, n_kv_heads=1, ffn_hidden=128,
                  mlp="swiglu", n_experts=4, top_k=2, max_seq_len=256, init_std=0.1)
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


class DeferredExecutor(ModelExecutor):
    def __init__(self, *args, inflight: int = 2, failing_at=None, **kw):
        super().__init__(*args, **kw)
        self.max_inflight = inflight
        self.queue: deque = deque()
        self.most_in_flight = 0
        self.failing_at, self.collects = failing_at, 0

    def submit(self, chunks):
        self.queue.append(chunks)
        self.most_in_flight = max(self.most_in_flight, len(self.queue))
        return len(self.queue)

    def collect(self, handle):
        return self.execute(self.queue.popleft())

    def execute(self, chunks):
        self.collects += 1
        if self.collects == self.failing_at:
            self.queue.clear()
            for k, v in self.kv_caches:  # what a rebuilt gang has: nothing
                k.zero_(), v.zero_()
            raise ExecutorFailure("stage actor 1 died (test)", rebuild_seconds=0.0)
        return super().execute(chunks)


@pytest.fixture(scope="module")
def model():
    return build_model(CFG, seed=11).eval()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(5)
    shared = torch.randint(0, 256, (34,), generator=g).tolist()
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in (4, 19, 37, 8, 26)] + [shared + [9], shared]


def _core(model, **executor_kw) -> EngineCore:
    cfg = EngineConfig(kv_block_size=8, kv_cache_blocks=96, max_batch_tokens=24)
    executor = DeferredExecutor(model, 96, 8, **executor_kw) if executor_kw else None
    return EngineCore(model, CFG, cfg, executor=executor) if executor else EngineCore(model, CFG, cfg)


def _staggered(core, prompts):
    pending, done, step = list(enumerate(prompts)), {}, 0
    while pending or core.has_unfinished_requests():
        if pending and step % 2 == 0:
            i, p = pending.pop(0)
            core.add_request(f"r{i}", p, GREEDY)
        for out in core.step():
            if out.finished:
                done[out.request_id] = out
        step += 1
        assert step < 500
    return [done[f"r{i}"].outputs[0].token_ids for i in range(len(prompts))]


def test_two_steps_in_flight_give_the_same_tokens(model, prompts):
    ref = _staggered(_core(model), prompts)
    core = _core(model, inflight=2)
    assert _staggered(core, prompts) == ref
    assert core.executor.most_in_flight == 2  # the pipeline was actually full
    assert core.kv.usage == 0.0 and not core.scheduler.running


def test_a_request_is_never_in_two_steps_at_once(model, prompts):
    core = _core(model, inflight=3)
    for i, p in enumerate(prompts):
        core.add_request(f"r{i}", p, GREEDY)
    in_flight = []
    while core.has_unfinished_requests():
        core.step()
        in_flight.append([s.request_id for o, _ in core._inflight for s in o.scheduled])
    for ids in in_flight:
        assert len(ids) == len(set(ids)), ids


def test_abort_while_in_flight_frees_and_the_rest_go_on(model, prompts):
    ref = _staggered(_core(model), prompts)
    core = _core(model, inflight=2)
    for i, p in enumerate(prompts):
        core.add_request(f"r{i}", p, GREEDY)
    core.step()
    assert core._inflight
    core.abort_request("r2")
    done = {}
    while core.has_unfinished_requests():
        for out in core.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    assert "r2" not in done
    assert all(done[f"r{i}"] == ref[i] for i in range(len(prompts)) if i != 2)
    assert core.kv.usage == 0.0


@pytest.mark.parametrize("inflight", [1, 2])
def test_lost_kv_cache_requeues_and_outputs_do_not_change(model, prompts, inflight):
    ref = _staggered(_core(model), prompts)
    core = _core(model, inflight=inflight, failing_at=9)  # mid-generation: prefills done, decodes running
    got = _staggered(core, prompts)
    assert got == ref
    assert core.stats.executor_failures == 1
    rec = core.stats.recoveries[0]
    assert rec["cause"].startswith("stage actor 1 died") and rec["requeued"] >= 1


def test_streams_go_on_after_a_failure(model, prompts):
    """Each request's stream of outputs only grows: tokens sent before the failure stay."""
    core = _core(model, inflight=2, failing_at=6)
    for i, p in enumerate(prompts[:4]):
        core.add_request(f"r{i}", p, GREEDY)
    seen = {}
    while core.has_unfinished_requests():
        for out in core.step():
            toks = out.outputs[0].token_ids
            prev = seen.get(out.request_id, [])
            assert toks[:len(prev)] == prev
            seen[out.request_id] = toks
    assert core.stats.executor_failures == 1
    assert all(len(t) == GREEDY.max_tokens for t in seen.values())


def test_llm_generate_over_a_pipelined_executor(model, prompts):
    ref = LLM.from_core(_core(model)).generate(prompts, GREEDY)
    got = LLM.from_core(_core(model, inflight=2)).generate(prompts, GREEDY)
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
